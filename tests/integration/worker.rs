//! `--exec-worker`: long-lived handlers behind poll-echo and serve-webhook,
//! against the emulator. The protocol (one update per line in, one JSON
//! answer per line out), order per chat, workers that die, answer garbage or
//! hang (replaced, their update retried and answered once), and stops that
//! leave no worker behind.
//!
//! Most workers here are `sh` read loops, so the tests need nothing else;
//! the Python and Node examples in `fixtures/` have tests of their own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    Emulator, Service, fly_at, live_members_of_group, processes_matching, stderr_of, unique_number,
    wait_until,
};
use crate::exec::{
    deliver, signal_twice, signed_delivery, start_receiver_with, stop_with_sigterm, text_reply,
};

/// The text content of the update line in `$line` (ASCII without quotes is
/// all these tests send), its update id, which every answer names, and its
/// user chat (`u_…`).
const CONTENT_OF_LINE: &str = r#"text=$(printf '%s' "$line" | sed -n 's/.*"content":"\([^"]*\)".*/\1/p')
id=$(printf '%s' "$line" | sed -n 's/.*"update_id":\([0-9]*\).*/\1/p')
chat=$(printf '%s' "$line" | sed -n 's/.*"id":"\(u_[0-9a-z_]*\)".*/\1/p')"#;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Writes a `sh` worker into `dir` that records its process group (its
/// `$$`: the worker is the leader) in `dir/groups`, then runs `body` once
/// per update line (in `$line`, its text in `$text`, its id in `$id`, its
/// chat in `$chat`); returns the command.
pub(crate) fn sh_worker(dir: &Path, body: &str) -> String {
    sh_worker_starting_with(dir, "", body)
}

/// [`sh_worker`], running `start` once before its first update (a banner,
/// an announcement).
pub(crate) fn sh_worker_starting_with(dir: &Path, start: &str, body: &str) -> String {
    let script = dir.join("worker.sh");
    std::fs::write(
        &script,
        format!(
            "echo $$ >> '{groups}'\n{start}\nwhile IFS= read -r line; do\n{CONTENT_OF_LINE}\n{body}\ndone\n",
            groups = dir.join("groups").display()
        ),
    )
    .unwrap();
    format!("sh '{}'", script.display())
}

/// The process groups of every worker started so far.
fn groups(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("groups"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn start_poll_echo(emulator: &Emulator, dir: &Path, worker: &str, extra: &[&str]) -> Service {
    let state = dir.join("s.db");
    let mut args = vec![
        "poll-echo",
        "--state",
        state.to_str().unwrap(),
        "--poll-timeout",
        "1",
        "--exec-worker",
        worker,
    ];
    args.extend_from_slice(extra);
    Service::start(emulator, &args)
}

/// The reply texts the emulator got, per chat, in the order they came.
pub(crate) fn replies_per_chat(sent: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut chats: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for reply in sent {
        let chat = reply["to_user_id"]
            .as_str()
            .or(reply["group_id"].as_str())
            .unwrap()
            .to_string();
        let text = reply["data"]["content"].as_str().unwrap().to_string();
        chats.entry(chat).or_default().push(text);
    }
    chats
}

/// Every reply once: no `client_msg_id` twice, one per update.
fn assert_each_answered_once(sent: &[Value], updates: usize) {
    let mut ids: Vec<&str> = sent
        .iter()
        .map(|reply| reply["client_msg_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), sent.len(), "a reply was sent twice");
    assert_eq!(sent.len(), updates);
}

/// No process is left in any of these (worker) process groups.
fn assert_none_left_in(groups: &[String]) {
    for group in groups {
        let left = live_members_of_group(group);
        assert!(left.is_empty(), "left running: {left}");
    }
}

/// `fly poll-echo --once --exec-worker WORKER` on the state in `dir`.
fn poll_once_with_worker(emulator: &Emulator, dir: &Path, worker: &str) -> std::process::Output {
    fly_at(emulator)
        .args(["poll-echo", "--once", "--exec-worker", worker, "--state"])
        .arg(dir.join("s.db"))
        .output()
        .unwrap()
}

/// `count` messages over `chats`, answered by the fixture worker `worker`
/// (its command) with `--concurrency concurrency`: each once, each chat's
/// in order, in capitals.
fn assert_fixture_worker_keeps_each_chats_order(
    worker: &str,
    chats: &[&str],
    count: usize,
    concurrency: u32,
) {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let expected = messages_over_chats(&emulator, chats, count);
    let output = fly_at(&emulator)
        .args(["poll-echo", "--poll-timeout", "1"])
        .args(["--max-updates", &count.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--exec-worker", worker, "--state"])
        .arg(dir.path().join("s.db"))
        .timeout(Duration::from_secs(90))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let sent = emulator.sent();
    assert_each_answered_once(&sent, count);
    assert_eq!(replies_per_chat(&sent), uppercase(&expected));
}

/// `count` text messages `m0`, `m1`, … spread over `chats` in turn; returns
/// each chat's texts in the order they were sent.
fn messages_over_chats(
    emulator: &Emulator,
    chats: &[&str],
    count: usize,
) -> BTreeMap<String, Vec<String>> {
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for index in 0..count {
        let chat = chats[index % chats.len()];
        let text = format!("m{index}");
        emulator.user_says("private", chat, &text);
        expected.entry(chat.to_string()).or_default().push(text);
    }
    expected
}

fn uppercase(expected: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    expected
        .iter()
        .map(|(chat, texts)| {
            (
                chat.clone(),
                texts.iter().map(|text| text.to_uppercase()).collect(),
            )
        })
        .collect()
}

#[test]
#[ignore = "needs python3"]
fn a_python_worker_answers_500_messages_in_order_per_chat() {
    assert_fixture_worker_keeps_each_chats_order(
        &format!("python3 '{}'", fixture("worker.py").display()),
        &["u_a", "u_b", "u_c", "u_d", "u_e"],
        500,
        4,
    );
}

/// The fixtures' bot, per update and as a worker, gives the same answers:
/// text in capitals, nothing for an image.
fn assert_fixture_bots_agree(per_update: &str, worker: &str) {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    for (chat, text) in [("u_1", "hello"), ("u_2", "Grüße, ☃"), ("u_1", "again")] {
        let update_id = emulator.user_says("private", chat, text);
        expected.push(text_reply(update_id, &text.to_uppercase(), "private", chat));
    }
    emulator.post(
        "/_emulator/messages",
        json!({"chat": {"type": "private", "id": "u_1"}, "msgType": "image",
               "data": {"originalUrl": "https://cdn.example/a.png"}}),
    );
    for (flag, command, state) in [
        ("--exec", per_update, "a.db"),
        ("--exec-worker", worker, "b.db"),
    ] {
        let output = fly_at(&emulator)
            .args(["poll-echo", "--once", flag, command, "--state"])
            .arg(dir.path().join(state))
            .timeout(Duration::from_secs(60))
            .output()
            .unwrap();
        assert!(output.status.success(), "{command}: {}", stderr_of(&output));
    }
    let mut sent = emulator.sent();
    // Both runs answer the same updates with the same client_msg_ids: the
    // emulator keeps the first reply of each.
    sent.sort_by_key(|reply| reply["client_msg_id"].as_str().unwrap().to_string());
    expected.sort_by_key(|reply| reply["client_msg_id"].as_str().unwrap().to_string());
    assert_eq!(sent, expected);
}

#[test]
#[ignore = "needs python3"]
fn the_python_bot_answers_the_same_per_update_and_as_a_worker() {
    assert_fixture_bots_agree(
        &format!("python3 '{}'", fixture("bot.py").display()),
        &format!("python3 '{}'", fixture("worker.py").display()),
    );
}

#[test]
#[ignore = "needs node"]
fn the_node_bot_answers_the_same_per_update_and_as_a_worker() {
    assert_fixture_bots_agree(
        &format!("node '{}'", fixture("bot.js").display()),
        &format!("node '{}'", fixture("worker.js").display()),
    );
}

#[test]
#[ignore = "needs node"]
fn a_node_worker_answers_200_messages_in_order_per_chat() {
    assert_fixture_worker_keeps_each_chats_order(
        &format!("node '{}'", fixture("worker.js").display()),
        &["u_a", "u_b", "u_c"],
        200,
        2,
    );
}

#[test]
fn the_worker_sees_the_update_on_one_line_with_every_token_kept() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let worker = sh_worker(
        dir.path(),
        &format!(
            "printf '%s\\n' \"$line\" >> '{}'; echo 'a note from the worker' >&2; \
             printf '{{\"update_id\":%s}}\n' \"$id\"",
            seen.display()
        ),
    );
    // Spaces, line breaks and tabs between tokens; big and exotic numbers,
    // escapes and spaces inside strings.
    let posted = "{ \"type\" : \"message\",\n \"message\": {\"chat\": {\"type\": \"private\", \
                  \"id\": \"u_1\"},\n\t\"msgType\": \"text\", \"data\": {\"content\": \
                  \"a  b \\\" \\u00e9\\/\", \"n\": [18446744073709551617, 1E2, -0.0]}}}";
    let update_id = emulator.raw_update(posted);
    let output = poll_once_with_worker(&emulator, dir.path(), &worker);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap(),
        format!(
            "{{\"update_id\":{update_id},\"type\":\"message\",\"message\":{{\"chat\":{{\"type\":\
             \"private\",\"id\":\"u_1\"}},\"msgType\":\"text\",\"data\":{{\"content\":\
             \"a  b \\\" \\u00e9\\/\",\"n\":[18446744073709551617,1E2,-0.0]}}}}}}\n"
        )
    );
    // `{}`: handled, no reply.
    assert!(emulator.sent().is_empty());
    // stderr goes to the log, tagged with the update in hand.
    let log = stderr_of(&output);
    let note = log
        .lines()
        .find(|line| line.contains("[exec] a note from the worker"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(note.contains(&format!("update_id={update_id}")), "{note}");
}

#[test]
fn a_worker_killed_with_kill_9_mid_run_is_restarted_and_every_message_answered_once() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let expected = messages_over_chats(&emulator, &["u_a", "u_b", "u_c"], 150);
    // A little work per update, so that the run is still going when the
    // workers are killed.
    let worker = sh_worker(
        dir.path(),
        r#"sleep 0.01; printf '{"update_id":%s,"reply":"got %s"}\n' "$id" "$text""#,
    );
    let mut service = start_poll_echo(
        &emulator,
        dir.path(),
        &worker,
        &["--concurrency", "2", "--max-updates", "150"],
    );
    wait_until(Duration::from_secs(30), "the first replies", || {
        emulator.sent().len() >= 20
    });
    let first = groups(dir.path());
    assert_eq!(first.len(), 2, "{first:?}");
    for group in &first {
        assert!(
            Command::new("kill")
                .args(["-9", group])
                .status()
                .unwrap()
                .success()
        );
    }
    let status = service.wait(Duration::from_secs(60));
    assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{}", service.log());
    let sent = emulator.sent();
    assert_each_answered_once(&sent, 150);
    // Not even a repeat absorbed by its client_msg_id: a worker killed
    // before it answered had sent nothing, one killed after had answered.
    assert_eq!(emulator.send_attempts(), 150);
    let got: BTreeMap<String, Vec<String>> = expected
        .iter()
        .map(|(chat, texts)| {
            (
                chat.clone(),
                texts.iter().map(|text| format!("got {text}")).collect(),
            )
        })
        .collect();
    assert_eq!(replies_per_chat(&sent), got);
    assert!(groups(dir.path()).len() > 2, "no worker was restarted");
    assert!(service.log().contains("restarting"), "{}", service.log());
}

#[test]
fn a_worker_that_answers_garbage_or_hangs_is_replaced_and_its_update_retried() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let once = |name: &str| dir.path().join(name).display().to_string();
    let hang = unique_number();
    let worker = sh_worker(
        dir.path(),
        &format!(
            r#"case "$text" in
            garbage) [ -e '{g}' ] || {{ touch '{g}'; echo 'this is not JSON'; continue; }} ;;
            hang) [ -e '{h}' ] || {{ touch '{h}'; sleep {hang}; }} ;;
            refuse) [ -e '{r}' ] || {{ touch '{r}'; printf '{{"update_id":%s,"error":"not yet"}}\n' "$id"; continue; }} ;;
            esac
            printf '{{"update_id":%s,"reply":"got %s"}}\n' "$id" "$text""#,
            g = once("garbage.done"),
            h = once("hang.done"),
            r = once("refuse.done"),
        ),
    );
    let texts = ["a", "garbage", "b", "hang", "c", "refuse", "d"];
    for text in texts {
        emulator.user_says("private", "u_1", text);
    }
    let mut service = start_poll_echo(
        &emulator,
        dir.path(),
        &worker,
        &[
            "--concurrency",
            "1",
            "--exec-timeout",
            "1",
            "--max-updates",
            "7",
        ],
    );
    let status = service.wait(Duration::from_secs(60));
    let log = service.log();
    assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{log}");
    let sent = emulator.sent();
    assert_each_answered_once(&sent, texts.len());
    assert_eq!(emulator.send_attempts(), texts.len() as u64);
    let replies: Vec<String> = texts.iter().map(|text| format!("got {text}")).collect();
    assert_eq!(replies_per_chat(&sent)["u_1"], replies);
    assert!(log.contains("broke the protocol"), "{log}");
    assert!(log.contains("\"this is not JSON\""), "{log}");
    assert!(log.contains("did not answer within 1s"), "{log}");
    assert!(log.contains("answered an error: not yet"), "{log}");
    // Replaced after the garbage and after the hang; not after the error,
    // which is a failed update, not a broken worker.
    assert_eq!(groups(dir.path()).len(), 3, "{log}");
    assert_eq!(processes_matching(&format!("sleep {hang}")), "");
}

/// A worker that answers `{"reply":"ok"}` and, after the end of its stdin,
/// goes on sleeping (ignoring SIGTERM): only the kill of its group ends
/// it. Returns the command and the sleep's unique duration.
fn stubborn_worker(dir: &Path) -> (String, String) {
    let linger = unique_number();
    let script = dir.join("stubborn.sh");
    std::fs::write(
        &script,
        format!(
            "trap '' TERM\necho $$ >> '{groups}'\nwhile IFS= read -r line; do {CONTENT_OF_LINE}\nprintf '{{\"update_id\":%s,\"reply\":\"ok\"}}\\n' \"$id\"; done\nsleep {linger}\n",
            groups = dir.join("groups").display()
        ),
    )
    .unwrap();
    (format!("sh '{}'", script.display()), linger)
}

#[test]
fn serve_webhook_stop_leaves_no_worker_process() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (worker, linger) = stubborn_worker(dir.path());
    let (mut receiver, url) = start_receiver_with(
        &emulator,
        0,
        &dir.path().join("r.db"),
        &["--exec-worker", &worker, "--concurrency", "2"],
    );
    assert_eq!(
        deliver(&url, &signed_delivery(7201, "u_1", "hello")),
        (200, "OK".to_string())
    );
    wait_until(Duration::from_secs(10), "the workers to start", || {
        groups(dir.path()).len() == 2
    });
    stop_with_sigterm(&mut receiver);
    assert_none_left_in(&groups(dir.path()));
    assert_eq!(processes_matching(&format!("sleep {linger}")), "");
}

#[test]
fn stop_leaves_no_worker_process_even_one_that_ignores_the_end_of_its_stdin() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (worker, linger) = stubborn_worker(dir.path());
    let mut service = start_poll_echo(&emulator, dir.path(), &worker, &["--concurrency", "3"]);
    emulator.user_says("private", "u_1", "hello");
    wait_until(Duration::from_secs(20), "the reply", || {
        emulator.sent().len() == 1
    });
    wait_until(Duration::from_secs(10), "the workers to start", || {
        groups(dir.path()).len() == 3
    });
    let started = groups(dir.path());
    stop_with_sigterm(&mut service);
    assert_none_left_in(&started);
    assert_eq!(processes_matching(&format!("sleep {linger}")), "");
}

#[test]
fn a_worker_busy_at_the_grace_deadline_is_killed_and_its_update_comes_again() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let busy = dir.path().join("busy");
    let worker = sh_worker(
        dir.path(),
        &format!(
            r#"touch '{}'; while [ ! -e '{}' ]; do sleep 0.05; done
            printf '{{"update_id":%s,"reply":"got %s"}}\n' "$id" "$text""#,
            busy.display(),
            release.display()
        ),
    );
    let mut service = start_poll_echo(
        &emulator,
        dir.path(),
        &worker,
        &["--concurrency", "1", "--grace", "1"],
    );
    let update_id = emulator.user_says("private", "u_1", "slow");
    wait_until(
        Duration::from_secs(10),
        "the worker to take the update",
        || busy.exists(),
    );
    stop_with_sigterm(&mut service);
    assert!(service.log().contains("grace period"), "{}", service.log());
    assert_none_left_in(&groups(dir.path()));
    assert!(emulator.sent().is_empty());
    // Not confirmed: the next run answers it.
    std::fs::write(&release, "").unwrap();
    let output = poll_once_with_worker(&emulator, dir.path(), &worker);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        emulator.sent(),
        [text_reply(update_id, "got slow", "private", "u_1")]
    );
}

#[test]
fn a_second_signal_stops_at_once_with_130_and_no_worker_left() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let busy = dir.path().join("busy");
    let worker = sh_worker(
        dir.path(),
        &format!(
            "touch '{}'; sleep 1000; printf '{{\"update_id\":%s}}\n' \"$id\"",
            busy.display()
        ),
    );
    let mut service = start_poll_echo(&emulator, dir.path(), &worker, &["--grace", "600"]);
    emulator.user_says("private", "u_1", "hang");
    wait_until(
        Duration::from_secs(10),
        "a worker to take the update",
        || busy.exists() && groups(dir.path()).len() == 8,
    );
    let status = signal_twice(&mut service);
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(130)),
        "{}",
        service.log()
    );
    assert_none_left_in(&groups(dir.path()));
}

#[test]
fn a_worker_command_that_cannot_run_stops_fly_with_one_error_line() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-worker.sh");
    let command = missing.display().to_string();
    emulator.user_says("private", "u_1", "hello");
    let output = poll_once_with_worker(&emulator, dir.path(), &command);
    let log = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{log}");
    let error: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("fly: error:"))
        .collect();
    assert_eq!(
        error,
        [format!(
            "fly: error: --exec-worker {command:?}: {command} not found (exit 127): check the \
             path (a relative one starts from fly's working directory)"
        )],
        "{log}"
    );
    assert!(emulator.sent().is_empty());
}

#[test]
fn serve_webhook_workers_answer_messages_and_confirm_other_updates_without_them() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let worker = sh_worker(
        dir.path(),
        &format!(
            r#"echo "$text" >> '{}'; printf '{{"update_id":%s,"reply":"got %s"}}\n' "$id" "$text""#,
            seen.display()
        ),
    );
    let (_receiver, url) = start_receiver_with(
        &emulator,
        0,
        &dir.path().join("r.db"),
        &["--exec-worker", &worker, "--concurrency", "2"],
    );
    assert_eq!(
        deliver(&url, &signed_delivery(7101, "u_1", "hello")),
        (200, "OK".to_string())
    );
    let callback = crate::common::sign_update(
        r#"{"update_id":7102,"type":"callback_query","callback_query":{"id":"cb","data":"x"}}"#,
        "forward-test-secret",
        &[],
    );
    assert_eq!(deliver(&url, &callback), (200, "OK".to_string()));
    // Delivered again: a duplicate, not sent to a worker twice.
    assert_eq!(
        deliver(&url, &signed_delivery(7101, "u_1", "hello")),
        (200, "DUPLICATE".to_string())
    );
    assert_eq!(
        emulator.sent(),
        [text_reply(7101, "got hello", "private", "u_1")]
    );
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), "hello\n");
}

#[test]
fn serve_webhook_gives_a_chats_concurrent_deliveries_to_one_worker_at_a_time() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    // Each update: "start CHAT", a pause, "end CHAT"; appends of one short
    // line are atomic, so the trace shows any overlap.
    let worker = sh_worker(
        dir.path(),
        &format!(
            r#"chat=$(printf '%s' "$line" | sed -n 's/.*"id":"\(u_[a-z]*\)".*/\1/p')
            echo "start $chat" >> '{trace}'; sleep 0.05; echo "end $chat" >> '{trace}'
            printf '{{"update_id":%s}}\n' "$id""#,
            trace = trace.display()
        ),
    );
    let (receiver, url) = start_receiver_with(
        &emulator,
        0,
        &dir.path().join("r.db"),
        &["--exec-worker", &worker, "--concurrency", "4"],
    );
    let mut deliveries = Vec::new();
    for index in 0..12i64 {
        let chat = if index % 2 == 0 { "u_even" } else { "u_odd" };
        let body = signed_delivery(8000 + index, chat, &format!("m{index}"));
        let url = url.clone();
        deliveries.push(std::thread::spawn(move || deliver(&url, &body)));
    }
    for delivery in deliveries {
        assert_eq!(delivery.join().unwrap(), (200, "OK".to_string()));
    }
    let trace = std::fs::read_to_string(&trace).unwrap();
    for chat in ["u_even", "u_odd"] {
        let steps: Vec<&str> = trace
            .lines()
            .filter(|line| line.ends_with(chat))
            .map(|line| line.split(' ').next().unwrap())
            .collect();
        let alternating: Vec<&str> = ["start", "end"].into_iter().cycle().take(12).collect();
        assert_eq!(steps, alternating, "{chat}:\n{trace}\n{}", receiver.log());
    }
}
