//! What a handler may write, and what fly does with the rest: worker lines
//! that are not the answer to the update in hand (a banner, a late or extra
//! answer) are never sent to anyone; stdout over its cap fails the update
//! instead of sending a prefix; stderr floods reach the log within a budget
//! per update; a reply to a message without a chat is a dead letter.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::{Emulator, fly, fly_at, stderr_of};
use crate::exec::{deliver, signed_delivery, start_receiver_with};
use crate::worker::{replies_per_chat, sh_worker, sh_worker_starting_with};

/// `fly poll-echo --once` with the handler flags `handler` on the state in `dir`.
fn poll_once(emulator: &Emulator, dir: &Path, handler: &[&str]) -> std::process::Output {
    fly_at(emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(dir.join("s.db"))
        .args(handler)
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap()
}

/// `fly poll-echo` until `updates` are handled, one worker (`worker`) at a time.
fn poll_with_one_worker(
    emulator: &Emulator,
    dir: &Path,
    updates: usize,
    worker: &str,
) -> std::process::Output {
    fly_at(emulator)
        .args(["poll-echo", "--poll-timeout", "1"])
        .args(["--max-updates", &updates.to_string()])
        .args(["--concurrency", "1", "--exec-worker", worker, "--state"])
        .arg(dir.join("s.db"))
        .timeout(Duration::from_secs(90))
        .output()
        .unwrap()
}

/// Six users, one message each: `m1` from `u_1`, … The replies each user
/// should get from a worker answering `got TEXT for CHAT`.
fn six_users(emulator: &Emulator) -> BTreeMap<String, Vec<String>> {
    (1..=6)
        .map(|user| {
            let (chat, text) = (format!("u_{user}"), format!("m{user}"));
            emulator.user_says("private", &chat, &text);
            let reply = format!("got {text} for {chat}");
            (chat, vec![reply])
        })
        .collect()
}

const ANSWER: &str = r#"printf '{"update_id":%s,"reply":"got %s for %s"}\n' "$id" "$text" "$chat""#;

#[test]
fn a_workers_banner_is_never_taken_as_an_answer() {
    for banner in [r#"{}"#, r#"{"reply":"banner"}"#, "starting up"] {
        let emulator = Emulator::start();
        let dir = tempfile::tempdir().unwrap();
        let expected = six_users(&emulator);
        let with_banner = sh_worker_starting_with(dir.path(), &format!("echo '{banner}'"), ANSWER);
        let args = ["--concurrency", "1", "--exec-worker", &with_banner];
        let output = poll_once(&emulator, dir.path(), &args);
        let log = stderr_of(&output);
        // Every worker starts with its banner, so no update can be
        // answered: each fails (exit 1 with --once), none is sent anything
        // and none is marked handled.
        assert_eq!(output.status.code(), Some(1), "{banner}: {log}");
        assert_eq!(emulator.sent(), Vec::<Value>::new(), "{banner}: {log}");
        assert!(
            log.contains("wrote to stdout while it had no update")
                || log.contains("no update_id in"),
            "{banner}: {log}"
        );
        // The banner gone, the next run answers each user once, in their own chat.
        let fixed = sh_worker(dir.path(), ANSWER);
        let args = ["--concurrency", "1", "--exec-worker", &fixed];
        let output = poll_once(&emulator, dir.path(), &args);
        assert!(output.status.success(), "{}", stderr_of(&output));
        assert_eq!(replies_per_chat(&emulator.sent()), expected, "{banner}");
    }
}

#[test]
fn serve_webhook_answers_500_not_200_while_a_workers_banner_breaks_the_protocol() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let worker = sh_worker_starting_with(dir.path(), r#"echo '{"reply":"banner"}'"#, ANSWER);
    let (receiver, url) = start_receiver_with(
        &emulator,
        0,
        &dir.path().join("r.db"),
        &["--exec-worker", &worker, "--concurrency", "2"],
    );
    for (update_id, chat) in [(9101, "u_1"), (9102, "u_2"), (9103, "u_3")] {
        let (status, _) = deliver(&url, &signed_delivery(update_id, chat, "hello"));
        assert_eq!(status, 500, "{}", receiver.log());
    }
    assert_eq!(emulator.sent(), Vec::<Value>::new(), "{}", receiver.log());
}

#[test]
fn a_workers_late_second_line_never_reaches_the_next_user() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let expected = six_users(&emulator);
    // Works 0.3 s per update; answers, then writes a second line for the
    // same update 0.1 s later: by then the next user's update is in hand.
    let late = format!(
        r#"sleep 0.3; {ANSWER}
        (sleep 0.1; printf '{{"update_id":%s,"reply":"private answer for %s"}}\n' "$id" "$chat") &"#
    );
    let worker = sh_worker(dir.path(), &late);
    let output = poll_with_one_worker(&emulator, dir.path(), 6, &worker);
    let log = stderr_of(&output);
    assert!(output.status.success(), "{log}");
    assert_eq!(replies_per_chat(&emulator.sent()), expected, "{log}");
    assert!(log.contains("while it had update"), "{log}");
}

#[test]
fn a_worker_that_closes_its_stdout_is_said_to_and_its_update_retried() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    emulator.user_says("private", "u_1", "hello");
    // `exec`: the worker is the only holder of its stdout, not a shell
    // around it.
    let worker = format!("exec {}", sh_worker(dir.path(), "exec >&-; sleep 30"));
    let args = ["--exec-worker", &worker, "--exec-timeout", "20"];
    let output = poll_once(&emulator, dir.path(), &args);
    let log = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{log}");
    assert!(log.contains("closed its stdout but kept running"), "{log}");
    assert!(emulator.sent().is_empty());
}

#[test]
#[ignore = "needs python3"]
fn fresh_workers_get_no_update_before_they_announce_that_they_are_ready() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    // Loads slowly, then says whether an update was already waiting on its
    // stdin when it announced; answers one update and exits, so each
    // update goes to a fresh worker.
    let script = dir.path().join("slow_start.py");
    std::fs::write(
        &script,
        r#"import json, select, sys, time
time.sleep(0.3)
early = bool(select.select([sys.stdin], [], [], 0)[0])
print(json.dumps({"ready": True}), flush=True)
update = json.loads(sys.stdin.readline())
said = "handed over early" if early else "handed over when ready"
print(json.dumps({"update_id": update["update_id"], "reply": said}), flush=True)
"#,
    )
    .unwrap();
    for text in ["a", "b", "c"] {
        emulator.user_says("private", "u_1", text);
    }
    let worker = format!("python3 '{}'", script.display());
    let output = poll_with_one_worker(&emulator, dir.path(), 3, &worker);
    let log = stderr_of(&output);
    assert!(output.status.success(), "{log}");
    let said = &replies_per_chat(&emulator.sent())["u_1"];
    assert_eq!(said.len(), 3, "{log}");
    // The first worker may be handed its update before fly knows that
    // these workers announce; once one has, fresh ones are waited for.
    assert_eq!(
        said[1..],
        ["handed over when ready", "handed over when ready"],
        "{log}"
    );
}

#[test]
fn exec_output_over_one_mib_fails_the_update_and_sends_nothing() {
    for output_command in [
        // Just over: no prefix is sent.
        "head -c 1048577 /dev/zero | tr '\\0' a",
        // A gigabyte: stopped at the cap, not read to its end.
        "yes | head -c 1000000000",
    ] {
        let emulator = Emulator::start();
        let dir = tempfile::tempdir().unwrap();
        emulator.user_says("private", "u_1", "hello");
        let handler = format!("cat > /dev/null; {output_command}");
        let started = std::time::Instant::now();
        let output = poll_once(&emulator, dir.path(), &["--exec", &handler]);
        let log = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{log}");
        assert!(
            log.contains("the handler wrote more than 1 MiB to stdout"),
            "{log}"
        );
        assert!(emulator.sent().is_empty(), "{output_command}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{output_command}: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_worker_line_over_one_mib_fails_the_update_and_sends_nothing() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    emulator.user_says("private", "u_1", "hello");
    let worker = sh_worker_starting_with(
        dir.path(),
        "",
        r#"printf '{"update_id":%s,"reply":"' "$id"; head -c 1048577 /dev/zero | tr '\0' a; echo '"}'"#,
    );
    let output = poll_once(&emulator, dir.path(), &["--exec-worker", &worker]);
    let log = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{log}");
    assert!(log.contains("a line longer than 1024 KiB"), "{log}");
    assert!(emulator.sent().is_empty());
}

/// The `[exec]` lines of a log, and their bytes in all.
fn exec_lines(log: &str) -> (Vec<&str>, usize) {
    let lines: Vec<&str> = log.lines().filter(|line| line.contains("[exec]")).collect();
    let bytes = lines.iter().map(|line| line.len()).sum();
    (lines, bytes)
}

#[test]
fn a_handlers_stderr_flood_is_logged_within_a_budget_per_update() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    emulator.user_says("private", "u_1", "hello");
    // 5 MB of 100-byte lines, then one line of 1 MB, then the reply.
    let handler = "cat > /dev/null; head -c 5000000 /dev/zero | tr '\\0' x | fold -w 99 >&2; \
                   head -c 1000000 /dev/zero | tr '\\0' y >&2; echo ok";
    let output = poll_once(&emulator, dir.path(), &["--exec", handler]);
    let log = stderr_of(&output);
    assert!(output.status.success(), "{log}");
    assert_eq!(replies_per_chat(&emulator.sent())["u_1"], ["ok"]);
    let (lines, bytes) = exec_lines(&log);
    assert!(bytes < 200 * 1024, "{bytes} bytes of [exec] lines");
    let note = lines.last().unwrap();
    assert!(
        note.contains("bytes of stderr not logged (the log takes 64 KiB per update)"),
        "{note}"
    );
    let unlogged: u64 = note
        .split("… ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    assert!(unlogged > 5_000_000, "{note}");
}

#[test]
fn a_workers_stderr_flood_is_logged_within_a_budget_per_update() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let first = emulator.user_says("private", "u_1", "one");
    let second = emulator.user_says("private", "u_1", "two");
    let worker = sh_worker_starting_with(
        dir.path(),
        "",
        &format!("head -c 2000000 /dev/zero | tr '\\0' x | fold -w 99 >&2; {ANSWER}"),
    );
    let output = poll_with_one_worker(&emulator, dir.path(), 2, &worker);
    let log = stderr_of(&output);
    assert!(output.status.success(), "{log}");
    let (lines, bytes) = exec_lines(&log);
    assert!(bytes < 300 * 1024, "{bytes} bytes of [exec] lines");
    for update_id in [first, second] {
        assert!(
            lines
                .iter()
                .any(|line| line.contains("bytes of stderr not logged")
                    && line.contains(&format!("update_id={update_id}"))),
            "no note for {update_id}: {:?}",
            lines
                .iter()
                .filter(|l| l.contains("not logged"))
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_reply_to_a_message_without_a_chat_is_a_dead_letter_with_exec_and_workers() {
    let no_chat = r#"{"type":"message","message":{"msgType":"text","data":{"content":"hi"}}}"#;
    let worker_answer = r#"printf '{"update_id":%s,"reply":"hello"}\n' "$id""#;
    for kind in ["--exec", "--exec-worker"] {
        let emulator = Emulator::start();
        let dir = tempfile::tempdir().unwrap();
        let dead = emulator.raw_update(no_chat);
        let handler = match kind {
            "--exec" => "cat > /dev/null; echo hello".to_string(),
            _ => sh_worker(dir.path(), worker_answer),
        };
        let output = poll_once(&emulator, dir.path(), &[kind, &handler]);
        let log = stderr_of(&output);
        assert!(output.status.success(), "{kind}: {log}");
        assert!(log.contains("dead letter"), "{kind}: {log}");
        let listed = fly()
            .args(["dead-letters", "--state"])
            .arg(dir.path().join("s.db"))
            .output()
            .unwrap();
        let listed = String::from_utf8(listed.stdout).unwrap();
        let letters: Vec<Value> = listed
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(letters.len(), 1, "{kind}: {listed}");
        assert_eq!(letters[0]["update_id"], dead);
        assert!(
            letters[0]["reason"]
                .as_str()
                .unwrap()
                .contains("no chat (type and id) to reply to"),
            "{kind}: {listed}"
        );
        assert!(emulator.sent().is_empty());
    }
}
