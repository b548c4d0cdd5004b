//! `fly poll-echo` against the emulator: exact echoes, persisted state,
//! faults, clean and unclean stops, the media round trip.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{
    Background, Emulator, Service, TOKEN, echo, eventually, fly, fly_at, fly_child, media_pattern,
    signal, stderr_of, wait_for_a_request_in_flight, wait_for_exit, wait_until,
};
use crate::metrics::{Listener, metric};

fn poll_once(emulator: &Emulator, state: &Path) -> std::process::Output {
    fly_at(emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(state)
        .output()
        .unwrap()
}

/// A `fly poll-echo` child running as a service against `emulator`.
fn spawn_service(emulator: &Emulator, state: &Path, extra: &[&str]) -> Service {
    let mut args = vec!["poll-echo", "--state", state.to_str().unwrap()];
    args.extend_from_slice(extra);
    Service::start(emulator, &args)
}

#[test]
fn echoes_text_exactly_and_routes_groups_and_users() {
    let emulator = Emulator::start_strict();
    let dir = tempfile::tempdir().unwrap();
    let long = "长".repeat(3000) + &"x".repeat(3000);
    let conversation = [
        ("private", "u_1", "hello 你好 👋🏽"),
        ("group", "g_1", "line one\nline two\r\n\ttabbed"),
        ("private", "u_2", long.as_str()),
        (
            "group",
            "g_1",
            "\"quotes\" and \\backslashes\\ and \u{0}nul",
        ),
    ];
    let mut expected = Vec::new();
    for (chat_type, chat_id, text) in conversation {
        let update_id = emulator.user_says(chat_type, chat_id, text);
        let field = if chat_type == "group" {
            "group_id"
        } else {
            "to_user_id"
        };
        expected.push(echo(update_id, text, (field, chat_id)));
    }
    // A callback_query is logged and confirmed, not answered.
    emulator.post(
        "/_emulator/updates",
        json!({"type": "callback_query", "callback_query": {"id": "cb1"}}),
    );

    let output = poll_once(&emulator, &dir.path().join("state.db"));
    assert!(output.status.success(), "{}", stderr_of(&output));
    let mut sent = emulator.sent();
    // Different chats may be answered concurrently: compare per chat, in order.
    let by_chat = |list: &[Value], chat: &str| -> Vec<Value> {
        list.iter()
            .filter(|s| s.get("group_id").or(s.get("to_user_id")) == Some(&json!(chat)))
            .cloned()
            .collect()
    };
    for chat in ["u_1", "g_1", "u_2"] {
        assert_eq!(
            by_chat(&sent, chat),
            by_chat(&expected, chat),
            "chat {chat}"
        );
    }
    sent.sort_by_key(|s| s["client_msg_id"].as_str().unwrap().to_string());
    expected.sort_by_key(|s| s["client_msg_id"].as_str().unwrap().to_string());
    assert_eq!(sent, expected);
    assert!(
        stderr_of(&output).contains("outcome=ignored"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn a_restart_with_the_same_state_answers_only_new_updates() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let first = emulator.user_says("private", "u_1", "first");
    assert!(poll_once(&emulator, &state).status.success());
    let second = emulator.user_says("private", "u_1", "second");
    assert!(poll_once(&emulator, &state).status.success());
    assert!(poll_once(&emulator, &state).status.success());
    let ids: Vec<Value> = emulator
        .sent()
        .iter()
        .map(|s| s["client_msg_id"].clone())
        .collect();
    assert_eq!(
        ids,
        vec![
            json!(format!("echo_{first}")),
            json!(format!("echo_{second}"))
        ]
    );
}

#[test]
fn json_logs_have_one_object_per_handled_update() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let update_id = emulator.user_says("group", "g_5", "hi");
    let output = fly_at(&emulator)
        .args(["--log-format", "json", "poll-echo", "--once", "--state"])
        .arg(dir.path().join("s.db"))
        .output()
        .unwrap();
    assert!(output.status.success());
    let handled: Vec<Value> = stderr_of(&output)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("every log line is JSON"))
        .filter(|line| line["message"] == "update handled")
        .collect();
    assert_eq!(handled.len(), 1);
    assert_eq!(handled[0]["update_id"], update_id);
    assert_eq!(handled[0]["chat"], "group:g_5");
    assert_eq!(handled[0]["outcome"], "replied");
    assert!(handled[0]["latency_ms"].is_u64());
}

/// A chat id is the sender's to choose: one holding a newline and a fake log
/// line, or terminal escapes, stays inside its own line of the text log.
#[test]
fn text_logs_cannot_be_forged_by_a_chat_id() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let forged = "u_1\n2026-01-01T00:00:00Z  INFO stopped\u{1b}[2J\u{1b}[31m";
    emulator.user_says("private", forged, "hi");
    let output = fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(dir.path().join("s.db"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let log = stderr_of(&output);
    assert!(!log.contains('\u{1b}'), "raw escape in the log: {log:?}");
    assert!(
        log.lines().all(|line| !line.starts_with("2026-01-01")),
        "a forged line: {log}"
    );
    let handled: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("update handled"))
        .collect();
    assert_eq!(handled.len(), 1, "{log}");
    assert!(
        handled[0].contains(r"chat=private:u_1\n2026-01-01T00:00:00Z  INFO stopped\u{1b}[2J"),
        "{log}"
    );
}

/// Credentials in `FLY_BASE_URL` are used, never shown or kept: not in
/// `--help`, not in the state file.
#[test]
fn a_password_in_the_base_url_is_not_shown_or_stored() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let with_password = emulator
        .base_url
        .replacen("http://", "http://user:PASSWORD_42@", 1);
    for command in ["poll-echo", "send", "doctor", "forward"] {
        let help = fly()
            .env("FLY_BASE_URL", &with_password)
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(help.status.success());
        let shown = String::from_utf8_lossy(&help.stdout);
        assert!(!shown.contains("PASSWORD_42"), "{command} --help: {shown}");
    }
    emulator.user_says("private", "u_1", "hi");
    let output = fly()
        .env("FLY_BASE_URL", &with_password)
        .env("FLY_BOT_TOKEN", TOKEN)
        .args(["poll-echo", "--once", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(emulator.sent().len(), 1);
    assert!(!stderr_of(&output).contains("PASSWORD_42"));
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("PASSWORD_42"));
    }
}

/// A state file fly may not write is named as such, not as a foreign file.
#[test]
fn a_read_only_state_file_says_so() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    assert!(poll_once(&emulator, &state).status.success());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Root may write anything: the check runs as nobody when the tests do as root.
    let root = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    let mut command = if root.trim() == "0" {
        let mut setpriv = Command::new("setpriv");
        setpriv.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        setpriv.arg(crate::common::fly_path());
        setpriv
    } else {
        Command::new(crate::common::fly_path())
    };
    let output = command
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .args(["poll-echo", "--once", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("is read-only"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// 30% errors and 10% lost answers on every call: every update is answered,
/// each exactly once.
#[test]
fn survives_errors_and_dropped_connections() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut expected = BTreeSet::new();
    for n in 0..30 {
        let chat = format!("u_{}", n % 4);
        expected.insert(format!(
            "echo_{}",
            emulator.user_says("private", &chat, &format!("m{n}"))
        ));
    }
    emulator.faults(json!({"error_rate": 0.3, "drop_rate": 0.1, "retry_after": 0, "seed": 11}));
    let mut service = spawn_service(
        &emulator,
        &dir.path().join("s.db"),
        &["--max-updates", "30", "--poll-timeout", "1"],
    );
    let status = service
        .wait(Duration::from_secs(90))
        .expect("poll-echo finished");
    assert!(status.success());
    let sent = emulator.sent();
    let ids: Vec<String> = sent
        .iter()
        .map(|s| s["client_msg_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 30, "{ids:?}");
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), expected);
}

#[test]
fn sigterm_ends_an_idle_long_poll_quickly_with_exit_0() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut service = spawn_service(
        &emulator,
        &dir.path().join("s.db"),
        &["--poll-timeout", "120"],
    );
    wait_until(Duration::from_secs(10), "the start line", || {
        service.log().contains("polling for updates")
    });
    wait_for_a_request_in_flight(service.child.id(), emulator.port(), "the long poll");
    let signalled = Instant::now();
    signal(service.child.id(), libc::SIGTERM);
    let status = service
        .wait(Duration::from_secs(90))
        .expect("stopped after SIGTERM");
    // Not cut short, the long poll would have taken its 120 s.
    assert!(
        signalled.elapsed() < Duration::from_secs(60),
        "took {:?}",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", service.log());
}

/// `kill -9` in the middle of a backlog, four times (each run killed once
/// it has answered something, with more left), then a restart: every
/// update is answered, each once.
#[test]
fn kill_9_mid_backlog_loses_nothing() {
    const MESSAGES: usize = 120;
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let mut expected = HashSet::new();
    for n in 0..MESSAGES {
        let chat = format!("c_{}", n % 7);
        expected.insert(format!(
            "echo_{}",
            emulator.user_says("group", &chat, &format!("m{n}"))
        ));
    }
    // Replies take a moment: the backlog lasts long enough to be cut.
    emulator.faults(json!({"latency_ms": 30}));
    for round in 0..4 {
        let answered = emulator.sent().len();
        let mut service = spawn_service(&emulator, &state, &["--poll-timeout", "1"]);
        wait_until(
            Duration::from_secs(20),
            &format!("run {round} to answer something"),
            || emulator.sent().len() > answered,
        );
        service.child.kill().unwrap(); // SIGKILL: no chance to clean up
        service.child.wait().unwrap();
        assert!(
            emulator.sent().len() < MESSAGES,
            "run {round} answered the whole backlog before it was killed"
        );
    }
    emulator.faults(json!({}));
    let _service = spawn_service(&emulator, &state, &["--poll-timeout", "1"]);
    let answered = || -> HashSet<String> {
        emulator
            .sent()
            .iter()
            .map(|s| s["client_msg_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(60), || answered() == expected),
        "missing {:?}",
        expected.difference(&answered())
    );
    assert_eq!(
        emulator.sent().len(),
        expected.len(),
        "no update answered twice"
    );
}

#[test]
fn a_refused_token_exits_1_at_once() {
    let mut emulator = Emulator::start_strict();
    let dir = tempfile::tempdir().unwrap();
    let output = crate::common::fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", "not-the-right-token")
        .args(["poll-echo", "--state"])
        .arg(dir.path().join("s.db"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("refused the bot token"), "{stderr}");
    assert!(!stderr.contains("not-the-right-token"));
    // Every request fly made was logged before it was answered.
    emulator.stop();
    let refused = emulator
        .log()
        .lines()
        .filter(|line| line.contains("updates") && line.contains("401"))
        .count();
    assert_eq!(
        refused,
        1,
        "a refused token is not retried: {}",
        emulator.log()
    );
}

#[test]
fn a_foreign_state_file_is_an_error_and_left_alone() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("notes.txt");
    std::fs::write(&state, "my precious notes\n".repeat(200)).unwrap();
    let output = poll_once(&emulator, &state);
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("not a fly state file"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        std::fs::read_to_string(&state)
            .unwrap()
            .starts_with("my precious notes")
    );
}

#[test]
fn media_round_trip_is_byte_exact_and_forwards_the_message() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let media_dir = dir.path().join("media");
    let original = "https://cdn.example/u/photo.jpg?sig=abc";
    // Both URLs end in the same name: neither file may replace the other.
    let thumbnail = "https://cdn.example/u/thumbs/photo.jpg";
    let size = 3 * 1024 * 1024 + 17;
    emulator.post("/_emulator/media", json!({"url": original, "size": size}));
    emulator.post("/_emulator/media", json!({"url": thumbnail, "size": 1000}));
    let data = json!({"originalUrl": original, "thumbnailUrl": thumbnail, "width": 800});
    let update_id = emulator.post(
        "/_emulator/messages",
        json!({"chat": {"type": "private", "id": "u_m"}, "msgType": "image", "data": data}),
    )["update_id"]
        .as_i64()
        .unwrap();
    let output = fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(dir.path().join("s.db"))
        .arg("--media-dir")
        .arg(&media_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));

    let photo = std::fs::read(media_dir.join(format!("{update_id}-photo.jpg"))).unwrap();
    assert!(photo == media_pattern(size), "photo bytes differ");
    let thumb = std::fs::read(media_dir.join(format!("{update_id}-thumb-photo.jpg"))).unwrap();
    assert_eq!(thumb, media_pattern(1000));
    assert_eq!(
        std::fs::read_dir(&media_dir).unwrap().count(),
        2,
        "no temp files left"
    );
    assert_eq!(
        emulator.sent(),
        vec![
            json!({"msg_type": "image", "data": data, "client_msg_id": format!("fwd_{update_id}"), "to_user_id": "u_m"})
        ]
    );
}

/// The platform's polling example and `fly poll-echo` send the same thing for
/// the same conversation.
#[test]
#[ignore = "needs ../shared/reference and python3 requests (bash .ci/run)"]
fn same_sends_as_the_reference_polling_example() {
    let reference =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/hello_bot_polling.py");
    let python_ok = Command::new("python3")
        .args(["-c", "import requests"])
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        reference.exists() && python_ok,
        "needs ../shared/reference and python3 with requests (bash .ci/run)"
    );
    let conversation = [
        ("private", "u_1", "hi"),
        ("group", "g_1", "群聊 hello"),
        ("private", "u_1", "second\nmessage"),
        ("private", "u_2", ""),
    ];
    let play = |emulator: &Emulator| -> Vec<i64> {
        conversation
            .iter()
            .map(|(chat_type, chat_id, text)| emulator.user_says(chat_type, chat_id, text))
            .collect()
    };

    let ours = Emulator::start();
    let our_ids = play(&ours);
    let dir = tempfile::tempdir().unwrap();
    assert!(poll_once(&ours, &dir.path().join("s.db")).status.success());

    let theirs = Emulator::start();
    let their_ids = play(&theirs);
    let python = Background::spawn(
        "python3 hello_bot_polling.py",
        Command::new("python3")
            .arg(&reference)
            .env("FLY_BASE_URL", &theirs.base_url)
            .env("FLY_BOT_TOKEN", TOKEN)
            .stdout(Stdio::null()),
    );
    wait_until(Duration::from_secs(20), "the reference's echoes", || {
        theirs.sent().len() >= conversation.len()
    });
    drop(python);

    // Each emulator run numbers its updates from its own start (the clock),
    // so `echo_{update_id}` is compared as "the echo of the n-th message".
    let sorted = |mut sent: Vec<Value>, ids: &[i64]| {
        for send in &mut sent {
            let id = send["client_msg_id"].as_str().unwrap().to_string();
            let position = ids
                .iter()
                .position(|update_id| id == format!("echo_{update_id}"))
                .unwrap_or_else(|| panic!("{id} answers none of {ids:?}"));
            send["client_msg_id"] = format!("echo_of_message_{position}").into();
        }
        sent.sort_by_key(|s| s["client_msg_id"].as_str().unwrap().to_string());
        sent
    };
    assert_eq!(
        sorted(ours.sent(), &our_ids),
        sorted(theirs.sent(), &their_ids)
    );
}

/// Durations beyond what the tools can wait are refused up front (exit 2),
/// not left to overflow a clock later; so is an empty --exec.
#[test]
fn out_of_range_timeouts_are_usage_errors() {
    let huge = "18446744073709551615";
    for args in [
        vec!["poll-echo", "--once", "--poll-timeout", huge],
        vec![
            "poll-echo",
            "--once",
            "--exec",
            "cat",
            "--exec-timeout",
            huge,
        ],
        vec!["serve-webhook", "--exec", "cat", "--exec-timeout", huge],
        vec!["serve-webhook", "--window", huge],
        vec![
            "forward",
            "--to",
            "http://127.0.0.1:1/x",
            "--poll-timeout",
            huge,
        ],
    ] {
        let output = fly()
            .env("FLY_BOT_TOKEN", TOKEN)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = stderr_of(&output);
        assert!(
            stderr.contains("is not in") || stderr.contains("value is required"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

/// Content that is not a string is echoed as the Python example prints it
/// (`str(content or "")`), not dropped.
#[test]
fn non_string_content_is_echoed_as_the_python_example_would() {
    let emulator = Emulator::start();
    for content in [json!(5), json!(true), json!(0), json!({"a": 1})] {
        emulator.post(
            "/_emulator/messages",
            json!({"chat": {"type": "private", "id": "u_1"}, "msgType": "text", "data": {"content": content}}),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let output = poll_once(&emulator, &dir.path().join("s.db"));
    assert!(output.status.success(), "{}", stderr_of(&output));
    let echoed: Vec<Value> = emulator
        .sent()
        .iter()
        .map(|sent| sent["data"]["content"].clone())
        .collect();
    assert_eq!(
        echoed,
        ["echo: 5", "echo: True", "echo: ", "echo: {'a': 1}"]
    );
}

/// A second poller on the same state file is refused (exit 1, one line)
/// while the first runs; once the first has stopped, the file is free again.
#[test]
fn one_poller_per_state_file() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let first = spawn_service(&emulator, &state, &["--poll-timeout", "30"]);
    wait_until(Duration::from_secs(10), "the first to poll", || {
        first.log().contains("polling for updates")
    });

    let second = poll_once(&emulator, &state);
    assert_eq!(second.status.code(), Some(1));
    let message = stderr_of(&second);
    assert!(message.contains("already polling"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");

    drop(first);
    let third = poll_once(&emulator, &state);
    assert!(third.status.success(), "{}", stderr_of(&third));
}

/// A stderr nobody reads any more (`2>&1 | head -1`, a logger that died)
/// loses the log lines, not the work: no panic, every update answered.
#[test]
fn a_closed_stderr_does_not_stop_the_bot() {
    let emulator = Emulator::start();
    for n in 0..3 {
        emulator.user_says("private", "u_1", &format!("m{n}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = fly_child(&emulator.base_url)
        .args(["-vv", "poll-echo", "--once", "--state"])
        .arg(dir.path().join("s.db"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = wait_for_exit(&mut child, Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert_eq!(emulator.sent().len(), 3);
}

#[test]
fn a_state_path_in_a_missing_directory_is_exit_2_and_creates_nothing() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let output = fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(missing.join("bot.db"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
    let stderr = stderr_of(&output);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(!missing.exists());
}

/// After a poll that brought only updates still in hand, the next poll
/// waits for one of them to end (the offset to move), never a fixed
/// interval (issue 28: a backlog drain stalled 0.2 s at a time). With one
/// update per poll and one worker, each update costs two polls: the one
/// that brings it and one that finds it still in hand; however long its
/// handler runs. A poller on a timer polls again while the handler runs
/// (and sleeps on through its end); one that is never woken stops: both
/// fail here. Counted, not timed: the handler's sleep only keeps each
/// update in hand long enough for a timer to show.
#[test]
fn a_poll_of_updates_in_hand_waits_for_one_to_end_not_for_a_timer() {
    const UPDATES: u32 = 4;
    let emulator = Emulator::start();
    for n in 0..UPDATES {
        emulator.user_says("private", &format!("u_{n}"), "hi");
    }
    let dir = tempfile::tempdir().unwrap();
    let service = spawn_service(
        &emulator,
        &dir.path().join("s.db"),
        &[
            "--limit",
            "1",
            "--concurrency",
            "1",
            // The poll after the last update waits for a new one: not counted.
            "--poll-timeout",
            "60",
            "--metrics",
            "127.0.0.1:0",
            "--exec",
            "sleep 0.5; cat >/dev/null; echo re",
        ],
    );
    let listener = Listener::of(|| service.log());
    listener.wait_for("fly_updates_total{outcome=\"replied\"}", f64::from(UPDATES));
    let text = listener.scrape();
    let polls = metric(
        &text,
        "fly_api_requests_total{endpoint=\"updates\",code=\"200\"}",
    )
    .unwrap_or_else(|| panic!("no polls counted in\n{text}"));
    assert!(
        polls <= f64::from(2 * UPDATES),
        "{polls} polls for {UPDATES} updates, one at a time:\n{}",
        service.log()
    );
    assert_eq!(emulator.sent().len(), UPDATES as usize);
}
