//! `--exec` handlers (poll-echo and serve-webhook) and `fly forward`, against
//! the emulator: the handler contract (stdin, environment, stdout as the
//! reply, exit codes, timeout), retries that never double-post, per-chat order
//! under concurrency, and forward's delivery until the receiver answers 2xx.
//!
//! Handlers are plain `sh` with `sed`/`tr`, so the tests need nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{
    Emulator, RefusedPort, Service, TOKEN, eventually, fly, fly_at, live_members_of_group,
    processes_matching, sign_update, silent_receiver, stderr_of, unique_number, wait_until,
};

/// Prints the text content of the update on stdin (plain ASCII without quotes
/// is all these tests send).
/// The text of the update on stdin, which comes as the platform sent it
/// (the test emulator's client sends it pretty-printed).
const CONTENT: &str = r#"tr -d '\n' | sed -n 's/.*"content": *"\([^"]*\)".*/\1/p'"#;

/// `fly poll-echo --once --state STATE --exec HANDLER EXTRA…`, bounded in time.
fn poll_once(
    emulator: &Emulator,
    state: &Path,
    handler: &str,
    extra: &[&str],
) -> std::process::Output {
    fly_at(emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(state)
        .args(["--exec", handler])
        .args(extra)
        .timeout(Duration::from_secs(15))
        .output()
        .unwrap()
}

/// The text reply a handler's stdout becomes.
pub(crate) fn text_reply(update_id: i64, content: &str, chat_type: &str, chat_id: &str) -> Value {
    let mut expected = json!({
        "msg_type": "text",
        "data": {"content": content},
        "client_msg_id": format!("reply_{update_id}"),
    });
    expected[target_field(chat_type)] = json!(chat_id);
    expected
}

fn target_field(chat_type: &str) -> &'static str {
    if chat_type == "group" {
        "group_id"
    } else {
        "to_user_id"
    }
}

fn sorted_by_id(mut sent: Vec<Value>) -> Vec<Value> {
    sent.sort_by_key(|s| s["client_msg_id"].as_str().unwrap_or_default().to_string());
    sent
}

fn client_msg_ids(sent: &[Value]) -> Vec<String> {
    sent.iter()
        .map(|s| s["client_msg_id"].as_str().unwrap().to_string())
        .collect()
}

/// Upper-cases the text and reports what the handler saw in its environment.
const UPPERCASE_AND_ENV: &str = r#"
    echo run >> "$RUNS"
    text=$(tr -d '\n' | sed -n 's/.*"content": *"\([^"]*\)".*/\1/p' | tr '[:lower:]' '[:upper:]')
    printf '%s|%s|%s|%s|%s|%s|token=%s|secret=%s\n' "$text" \
        "$FLY_UPDATE_ID" "$FLY_UPDATE_TYPE" "$FLY_CHAT_ID" "$FLY_CHAT_TYPE" "$FLY_MSG_TYPE" \
        "${FLY_BOT_TOKEN-unset}" "${FLY_WEBHOOK_SECRET-unset}"
"#;

#[test]
fn a_shell_handler_replies_with_its_stdout_and_sees_the_update_but_not_the_token() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let runs = dir.path().join("runs");
    let handler = UPPERCASE_AND_ENV.replace("$RUNS", &runs.display().to_string());
    let conversation = [
        ("private", "u_1", "hello world"),
        ("group", "g_1", "mixed Case 123"),
        ("private", "u_1", "second one"),
    ];
    let mut expected = Vec::new();
    for (chat_type, chat_id, text) in conversation {
        let update_id = emulator.user_says(chat_type, chat_id, text);
        let reply = format!(
            "{}|{update_id}|message|{chat_id}|{chat_type}|text|token=unset|secret=unset",
            text.to_uppercase()
        );
        expected.push(text_reply(update_id, &reply, chat_type, chat_id));
    }
    // Not a message: the handler is not run for it.
    emulator.post(
        "/_emulator/updates",
        json!({"type": "callback_query", "callback_query": {"id": "cb1"}}),
    );

    let output = fly_at(&emulator)
        .env("FLY_WEBHOOK_SECRET", "webhook-secret-not-for-handlers")
        .args(["poll-echo", "--once", "--state"])
        .arg(&state)
        .args(["--exec", &handler])
        .timeout(Duration::from_secs(20))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        sorted_by_id(emulator.sent()),
        sorted_by_id(expected.clone())
    );
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 3);
    let log = stderr_of(&output);
    assert_eq!(log.matches("outcome=replied").count(), 3, "{log}");
    assert!(
        !log.contains(TOKEN),
        "the token never reaches the log: {log}"
    );

    // With --exec-pass-token the handler gets the token.
    let update_id = emulator.user_says("group", "g_2", "token please");
    let output = poll_once(&emulator, &state, &handler, &["--exec-pass-token"]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let reply =
        format!("TOKEN PLEASE|{update_id}|message|g_2|group|text|token={TOKEN}|secret=unset");
    expected.push(text_reply(update_id, &reply, "group", "g_2"));
    assert_eq!(sorted_by_id(emulator.sent()), sorted_by_id(expected));
}

#[test]
fn a_json_reply_with_msg_type_and_data_is_sent_as_that_message() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let image =
        json!({"originalUrl": "https://cdn.example/cat.jpg", "width": 640, "caption": "猫"});
    // Other JSON objects are no reply at all: see exec_answers.rs.
    let handler = format!(
        r#"cat > /dev/null
        printf '%s\n' '{}'"#,
        json!({"msg_type": "image", "data": image})
    );
    let image_id = emulator.user_says("private", "u_img", "a picture please");
    let output = poll_once(&emulator, &dir.path().join("s.db"), &handler, &[]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        emulator.sent(),
        vec![
            json!({"msg_type": "image", "data": image, "client_msg_id": format!("reply_{image_id}"), "to_user_id": "u_img"}),
        ]
    );
}

#[test]
fn a_failing_handler_is_retried_until_it_succeeds_and_replies_once() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("failed-once");
    let runs = dir.path().join("runs");
    let handler = format!(
        r#"echo run >> '{runs}'
        if [ -e '{marker}' ]; then
            echo "recovered on update $FLY_UPDATE_ID"
        else
            touch '{marker}'
            echo 'first try: database unavailable' >&2
            exit 3
        fi"#,
        runs = runs.display(),
        marker = marker.display()
    );
    let update_id = emulator.user_says("private", "u_r", "try me");
    let state = dir.path().join("s.db");
    let state = state.to_str().unwrap();
    let mut service = Service::start(
        &emulator,
        &[
            "poll-echo",
            "--state",
            state,
            "--max-updates",
            "1",
            "--poll-timeout",
            "1",
            "--exec",
            &handler,
        ],
    );
    let status = service
        .wait(Duration::from_secs(20))
        .expect("poll-echo stops after one handled update");
    let log = service.log();
    assert!(status.success(), "{log}");
    assert_eq!(
        emulator.sent(),
        vec![text_reply(
            update_id,
            &format!("recovered on update {update_id}"),
            "private",
            "u_r"
        )]
    );
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 2);
    assert!(
        log.contains("[exec] first try: database unavailable"),
        "the handler's stderr is logged with a prefix: {log}"
    );
    assert!(
        log.contains("will retry") && log.contains("exit status: 3"),
        "{log}"
    );
    assert_eq!(log.matches("outcome=replied").count(), 1, "{log}");
}

#[test]
fn stderr_lines_after_one_that_is_not_utf8_still_reach_the_log() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let update_id = emulator.user_says("private", "u_b", "bytes");
    // \377 is never valid UTF-8; a CRLF line ending is trimmed like LF.
    let handler = r#"cat > /dev/null; printf 'first\n\377bad\nthird\r\nno newline' >&2; echo ok"#;
    let output = poll_once(&emulator, &state, handler, &[]);
    let log = stderr_of(&output);
    assert!(output.status.success(), "{log}");
    for line in [
        "[exec] first",
        "[exec] \u{FFFD}bad",
        "[exec] third",
        "[exec] no newline",
    ] {
        assert!(
            log.contains(line),
            "{line:?} is missing from the log: {log}"
        );
    }
    assert!(!log.contains('\r'), "{log:?}");
    assert_eq!(
        emulator.sent(),
        vec![text_reply(update_id, "ok", "private", "u_b")]
    );
}

/// Runs a hanging handler on one update with `--exec-timeout 1`: fly gives up
/// quickly with exit 1, kills the handler's whole process group, sends
/// nothing, and keeps the update for the next run.
fn assert_hanging_handler_is_killed(content: &str, hang: &str) {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let update_id = emulator.user_says("private", "u_h", content);
    let suffix = unique_number();
    let sleep = format!("sleep 31.{suffix}");
    let handler = hang.replace("SLEEP", &sleep);

    let started = Instant::now();
    let output = poll_once(&emulator, &state, &handler, &["--exec-timeout", "1"]);
    let elapsed = started.elapsed();
    let log = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{log}");
    // Not killed, the handler would hold it 31 s (past poll_once's 15 s).
    assert!(elapsed < Duration::from_secs(12), "took {elapsed:?}: {log}");
    assert!(log.contains("timed out"), "{log}");
    assert!(emulator.sent().is_empty(), "{:?}", emulator.sent());
    // SIGKILL to the group is immediate; allow a moment for the reaping.
    let pattern = format!("sleep 31\\.{suffix}");
    assert!(
        eventually(Duration::from_secs(2), || processes_matching(&pattern)
            .is_empty()),
        "the handler's processes outlived the timeout: {}",
        processes_matching(&pattern)
    );

    // The offset did not move: the next run answers the same update.
    let output = poll_once(&emulator, &state, "cat > /dev/null; echo answered", &[]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        emulator.sent(),
        vec![text_reply(update_id, "answered", "private", "u_h")]
    );
}

#[test]
fn a_hanging_handler_is_killed_at_the_timeout_with_its_children() {
    // `sleep` runs as a child of the shell: only a group kill reaches it.
    assert_hanging_handler_is_killed("hang", "cat > /dev/null; SLEEP; echo too late");
}

#[test]
fn a_hanging_handler_that_never_reads_a_large_update_is_killed_at_the_timeout() {
    // More than a pipe buffer of update that the handler never reads.
    assert_hanging_handler_is_killed(&"x".repeat(300_000), "SLEEP; echo too late");
}

#[test]
fn a_handler_whose_background_job_keeps_stdout_open_times_out() {
    // The shell exits at once, but its background job holds stdout (and
    // stderr) open: the reply is not complete before the timeout.
    assert_hanging_handler_is_killed("bg", "cat > /dev/null; echo partial; SLEEP &");
}

#[test]
fn concurrent_handlers_keep_each_chats_order() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events");
    let running = dir.path().join("running");
    std::fs::create_dir(&running).unwrap();
    // Logs "start ID CHAT N" (N = handlers running at that moment) and
    // "end ID CHAT", and replies with the text it was given.
    let handler = format!(
        r#"text=$({CONTENT})
        touch '{running}/'"$FLY_UPDATE_ID"
        n=$(ls '{running}' | wc -l)
        echo "start $FLY_UPDATE_ID $FLY_CHAT_ID $n" >> '{events}'
        sleep 0.3
        echo "end $FLY_UPDATE_ID $FLY_CHAT_ID" >> '{events}'
        rm '{running}/'"$FLY_UPDATE_ID"
        echo "$text""#,
        running = running.display(),
        events = events.display()
    );
    let chats = ["c_1", "c_2", "c_3", "c_4", "c_5", "c_6"];
    let mut expected: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for round in 0..3 {
        for chat in chats {
            let text = format!("{chat}-m{round}");
            let update_id = emulator.user_says("group", chat, &text);
            expected
                .entry(chat)
                .or_default()
                .push(text_reply(update_id, &text, "group", chat));
        }
    }
    let output = poll_once(
        &emulator,
        &dir.path().join("s.db"),
        &handler,
        &["--concurrency", "4"],
    );
    assert!(output.status.success(), "{}", stderr_of(&output));

    let sent = emulator.sent();
    assert_eq!(sent.len(), 18);
    for (chat, replies) in &expected {
        let of_chat: Vec<Value> = sent
            .iter()
            .filter(|s| s["group_id"] == json!(chat))
            .cloned()
            .collect();
        assert_eq!(&of_chat, replies, "replies of {chat} in update order");
    }

    // Per chat, each handler ends before the next one starts, in update order.
    let events = std::fs::read_to_string(&events).unwrap();
    let (per_chat, most_at_once) = handler_runs(&events);
    for (chat, replies) in &expected {
        let ids: Vec<String> = client_msg_ids(replies)
            .iter()
            .map(|id| id.trim_start_matches("reply_").to_string())
            .collect();
        let order: Vec<String> = ids
            .iter()
            .flat_map(|id| [format!("start {id}"), format!("end {id}")])
            .collect();
        assert_eq!(per_chat[*chat], order, "handlers of {chat}:\n{events}");
    }
    assert!(
        (2..=4).contains(&most_at_once),
        "--concurrency 4 runs several handlers at once, never more than 4 (saw {most_at_once}):\n{events}"
    );
}

/// From the handler's events: "start ID" and "end ID" per chat, in the
/// order they happened, and the most handlers running at once.
fn handler_runs(events: &str) -> (BTreeMap<String, Vec<String>>, u32) {
    let mut per_chat: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut most_at_once = 0;
    for line in events.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        per_chat
            .entry(fields[2].to_string())
            .or_default()
            .push(format!("{} {}", fields[0], fields[1]));
        if fields[0] == "start" {
            most_at_once = most_at_once.max(fields[3].parse::<u32>().unwrap());
        }
    }
    (per_chat, most_at_once)
}

#[test]
fn empty_output_with_exit_0_is_handled_without_a_reply_and_not_retried() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let runs = dir.path().join("runs");
    let handler = format!(
        r#"echo "$FLY_UPDATE_ID" >> '{}'
        case "$({CONTENT})" in
            quiet) ;;
            *) printf ' \n\n' ;;
        esac"#,
        runs.display()
    );
    let quiet = emulator.user_says("private", "u_q", "quiet");
    let blank = emulator.user_says("group", "g_q", "blank");
    let output = poll_once(&emulator, &state, &handler, &[]);
    let log = stderr_of(&output);
    assert!(output.status.success(), "{log}");
    assert_eq!(log.matches("outcome=handled").count(), 2, "{log}");
    assert!(emulator.sent().is_empty(), "{:?}", emulator.sent());
    // Handled means done: another run does not call the handler again.
    let output = poll_once(&emulator, &state, &handler, &[]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let mut ran: Vec<String> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    ran.sort();
    let mut expected = vec![quiet.to_string(), blank.to_string()];
    expected.sort();
    assert_eq!(ran, expected);
    assert!(emulator.sent().is_empty());
}

/// `fly serve-webhook --exec HANDLER` on a port, pointed at the emulator;
/// returns the service and the URL it printed.
fn start_receiver(
    emulator: &Emulator,
    port: u16,
    state: &Path,
    handler: &str,
) -> (Service, String) {
    start_receiver_with(emulator, port, state, &["--exec", handler])
}

/// `fly serve-webhook` on a port with `extra` arguments (the handler).
pub(crate) fn start_receiver_with(
    emulator: &Emulator,
    port: u16,
    state: &Path,
    extra: &[&str],
) -> (Service, String) {
    let port = port.to_string();
    let mut args = vec![
        "serve-webhook",
        "--bind",
        "127.0.0.1",
        "--port",
        &port,
        "--state",
        state.to_str().unwrap(),
        "--secret",
        "forward-test-secret",
    ];
    args.extend_from_slice(extra);
    let mut receiver = Service::start(emulator, &args);
    let url = receiver.first_line();
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "{url:?}: {}",
        receiver.log()
    );
    (receiver, url)
}

fn start_forward(emulator: &Emulator, url: &str, state: &Path) -> Service {
    start_forward_with(emulator, url, state, &[])
}

/// `fly forward --to URL` with `start_receiver`'s secret and `extra` arguments.
pub(crate) fn start_forward_with(
    emulator: &Emulator,
    url: &str,
    state: &Path,
    extra: &[&str],
) -> Service {
    let mut args = vec![
        "forward",
        "--to",
        url,
        "--secret",
        "forward-test-secret",
        "--state",
        state.to_str().unwrap(),
        "--poll-timeout",
        "1",
        "--grace",
        "1",
    ];
    args.extend_from_slice(extra);
    Service::start(emulator, &args)
}

/// Replies `shout: TEXT` and records each run's update id.
fn shouting_handler(runs: &Path) -> String {
    format!(
        r#"echo "$FLY_UPDATE_ID" >> '{}'
        echo "shout: $({CONTENT} | tr '[:lower:]' '[:upper:]')""#,
        runs.display()
    )
}

#[test]
fn forward_delivers_into_serve_webhook_exec_end_to_end() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let (receiver, url) = start_receiver(
        &emulator,
        0,
        &dir.path().join("receiver.db"),
        &shouting_handler(&runs),
    );
    let forward = start_forward(&emulator, &url, &dir.path().join("forward.db"));
    let conversation = [
        ("private", "u_1", "hello"),
        ("group", "g_1", "from the group"),
        ("private", "u_2", "third"),
    ];
    let mut expected = Vec::new();
    for (chat_type, chat_id, text) in conversation {
        let update_id = emulator.user_says(chat_type, chat_id, text);
        let reply = format!("shout: {}", text.to_uppercase());
        expected.push(text_reply(update_id, &reply, chat_type, chat_id));
    }
    assert!(
        eventually(Duration::from_secs(20), || emulator.sent().len() >= 3),
        "sent {:?}\nforward: {}\nreceiver: {}",
        emulator.sent(),
        forward.log(),
        receiver.log()
    );
    assert_eq!(sorted_by_id(emulator.sent()), sorted_by_id(expected));
    // The replies land before the receiver answers forward: the third
    // delivery may still be on its way back when they do.
    let delivered = |log: &str| log.lines().filter(|l| l.contains(" delivery ")).count();
    eventually(Duration::from_secs(10), || {
        delivered(&forward.log()) >= 3 && receiver.log().matches("result=\"OK\"").count() >= 3
    });
    let log = forward.log();
    let deliveries: Vec<&str> = log.lines().filter(|l| l.contains(" delivery ")).collect();
    assert_eq!(deliveries.len(), 3, "{log}");
    for line in deliveries {
        assert!(
            line.contains("status=200") && line.contains("latency_ms="),
            "{line}"
        );
    }
    assert_eq!(
        receiver.log().matches("result=\"OK\"").count(),
        3,
        "{}",
        receiver.log()
    );
}

#[test]
fn forward_waits_for_a_receiver_that_is_down_and_loses_nothing() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    // Refused until the receiver comes up there.
    let down = RefusedPort::new();
    let url = format!("{}/webhook", down.url());
    let forward = start_forward(&emulator, &url, &dir.path().join("forward.db"));
    let mut expected = BTreeSet::new();
    for n in 0..5 {
        let chat = format!("u_{}", n % 2);
        expected.insert(emulator.user_says("private", &chat, &format!("m{n}")));
    }
    // Each attempt is logged; an update failing for the third time shows
    // forward retrying rather than giving up or skipping it.
    wait_until(Duration::from_secs(20), "a third failed attempt", || {
        forward.log().contains("failures=3")
    });
    assert!(
        forward.log().contains("delivery failed"),
        "{}",
        forward.log()
    );
    assert!(emulator.sent().is_empty());

    let (receiver, receiver_url) = start_receiver(
        &emulator,
        down.hand_over(),
        &dir.path().join("receiver.db"),
        &shouting_handler(&runs),
    );
    assert_eq!(receiver_url, url);
    expected.insert(emulator.user_says("group", "g_late", "after it came up"));
    // Every update delivered and accepted (200): forward has none left in
    // hand, so a doubled delivery would have been made by now.
    let accepted = || accepted_deliveries(&forward.log());
    assert!(
        eventually(Duration::from_secs(30), || accepted().len()
            >= expected.len()),
        "sent {:?}\nforward: {}\nreceiver: {}",
        emulator.sent(),
        forward.log(),
        receiver.log()
    );
    assert_eq!(accepted(), expected.iter().copied().collect::<Vec<_>>());
    let sent = emulator.sent();
    let expected_ids: BTreeSet<String> = expected.iter().map(|id| format!("reply_{id}")).collect();
    let ids = client_msg_ids(&sent);
    assert_eq!(ids.len(), expected.len(), "{ids:?}");
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), expected_ids);
    // Each handler ran once: no update was delivered and handled twice.
    let mut ran: Vec<i64> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect();
    ran.sort();
    assert_eq!(ran, expected.into_iter().collect::<Vec<_>>());
}

/// The update ids of forward's accepted deliveries (`delivery update_id=N
/// status=200 …` lines), sorted, each as often as it was delivered.
fn accepted_deliveries(log: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = log
        .lines()
        .filter(|line| line.contains(" delivery ") && line.contains("status=200"))
        .map(|line| {
            let field = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("update_id="))
                .unwrap_or_else(|| panic!("no update_id in {line:?}"));
            field.parse().unwrap()
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn bad_usage_is_exit_2_with_one_error_line() {
    for args in [
        &["poll-echo", "--once", "--exec-pass-token"][..],
        &["serve-webhook", "--exec-pass-token"],
        &["forward", "--to", "ftp://x"],
    ] {
        let output = fly()
            .env("FLY_BOT_TOKEN", TOKEN)
            .args(args)
            .output()
            .unwrap();
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("fly: error: "), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    let output = fly()
        .env("FLY_BOT_TOKEN", TOKEN)
        .args(["forward", "--to", "ftp://x"])
        .output()
        .unwrap();
    assert!(
        stderr_of(&output).contains("--to"),
        "{}",
        stderr_of(&output)
    );
}

/// A receiver answering 302 has not taken the update: forward does not
/// follow the redirect (a bodyless GET whose 200 would look like delivery),
/// and keeps retrying the POST, logging the status.
#[test]
fn forward_does_not_follow_a_receivers_redirect() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (receiver_url, seen) = crate::common::misbehaving_server(crate::common::REDIRECT);
    let forward = start_forward(
        &emulator,
        &format!("{receiver_url}/hook"),
        &dir.path().join("forward.db"),
    );
    emulator.user_says("private", "u_1", "hello");
    assert!(
        eventually(Duration::from_secs(10), || seen.lock().unwrap().len() >= 2),
        "{}",
        forward.log()
    );
    let requests = seen.lock().unwrap().clone();
    assert!(
        requests.iter().all(|line| line == "POST /hook HTTP/1.1"),
        "{requests:?}"
    );
    assert!(forward.log().contains("302"), "{}", forward.log());
    assert!(!forward.log().contains("delivered"), "{}", forward.log());
}

/// SIGTERM while the receiver holds a delivery without answering stops
/// forward at once (exit 0), not after the 60 s delivery timeout; the
/// update stays unconfirmed, for the next run.
#[test]
fn forward_stops_within_the_grace_period_while_a_receiver_hangs() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, held) = silent_receiver();
    let mut forward = start_forward(&emulator, &url, &dir.path().join("forward.db"));
    emulator.user_says("private", "u_1", "hello");
    // The delivery was read whole: forward is waiting for the answer.
    let _connection = held.join().unwrap();
    let signalled = Instant::now();
    signal(&forward, "TERM");
    let status = forward.wait(Duration::from_secs(50)).expect("stops");
    assert!(status.success(), "{status}: {}", forward.log());
    // --grace 1; waiting for the answer would have taken the 60 s timeout.
    assert!(
        signalled.elapsed() < Duration::from_secs(30),
        "took {:?}",
        signalled.elapsed()
    );
}

/// On start, forward says what it does: where from, where to, which secret
/// (its source, never its value) and how to stop.
#[test]
fn forward_says_what_it_does_on_start() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let nothing_listens = RefusedPort::new();
    let url = format!("{}/webhook", nothing_listens.url());
    let state = dir.path().join("forward.db");
    let forward = Service::start(
        &emulator,
        &["forward", "--to", &url, "--state", state.to_str().unwrap()],
    );
    wait_until(Duration::from_secs(10), "the start line", || {
        forward.log().contains("Ctrl-C")
    });
    let log = forward.log();
    let start = log.lines().find(|line| line.contains("Ctrl-C")).unwrap();
    assert!(
        start.contains(&format!("from {} to {url}", emulator.base_url))
            && start.contains("signed with sha256 of the bot token"),
        "{start}"
    );
    let default_secret = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(TOKEN.as_bytes()));
    assert!(
        !log.contains(TOKEN) && !log.contains(&default_secret),
        "{log}"
    );
}

/// Each delivery attempt is one log line: the receiver's 500s one warning
/// each (what happened and when the next try is), its 200 one info line.
#[test]
fn forward_logs_one_line_per_delivery_attempt() {
    const ANSWER_500: &str =
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    const ANSWER_200: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (receiver_url, seen) =
        crate::common::answering_in_turn(&[ANSWER_500, ANSWER_500, ANSWER_200]);
    let forward = start_forward(
        &emulator,
        &format!("{receiver_url}/hook"),
        &dir.path().join("forward.db"),
    );
    let update_id = emulator.user_says("private", "u_1", "hello");
    let tag = format!("update_id={update_id}");
    wait_until(Duration::from_secs(15), "the update handled", || {
        forward.log().contains("update handled")
    });
    assert_eq!(seen.lock().unwrap().len(), 3, "{}", forward.log());
    let log = forward.log();
    let attempts: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(&tag) && !line.contains("update handled"))
        .collect();
    assert_eq!(attempts.len(), 3, "{log}");
    for failed in &attempts[..2] {
        assert!(
            failed.contains("WARN")
                && failed.contains("delivery failed: the receiver answered HTTP 500")
                && failed.contains("retrying in"),
            "{failed}"
        );
    }
    assert!(
        attempts[2].contains("INFO") && attempts[2].contains("status=200"),
        "{}",
        attempts[2]
    );
}

// ---------------------------------------------------------------------------
// Handlers that cannot run at all (exit 126/127): a set-up error, not a
// failed update. fly stops with exit 1 and one line naming the fix, and the
// update waits for the run after the fix.

/// A handler that cannot run, and what its error line must say.
struct Unrunnable {
    what: &'static str,
    command: String,
    fix: Vec<String>,
    /// Where a handler that did start records each run.
    runs: Option<std::path::PathBuf>,
}

/// A script without execute permission (126), a missing command (127), and a
/// script that runs but calls a missing command (127 from inside it).
fn unrunnable_handlers(dir: &Path) -> Vec<Unrunnable> {
    use std::os::unix::fs::PermissionsExt;
    let script = |name: &str, body: &str, mode: u32| {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.display().to_string()
    };
    let upper = script("upper.sh", "tr '[:lower:]' '[:upper:]'", 0o644);
    let runs = dir.join("runs");
    let calls_missing = script(
        "calls-missing.sh",
        &format!(
            "echo run >> '{}'\nno-such-tool-{} --json",
            runs.display(),
            unique_number()
        ),
        0o755,
    );
    let missing = format!("no-such-fly-handler-{}", unique_number());
    vec![
        Unrunnable {
            what: "not executable",
            fix: vec![format!("is it executable? chmod +x {upper}")],
            command: upper,
            runs: None,
        },
        Unrunnable {
            what: "not found",
            fix: vec!["not found".into(), "PATH".into()],
            command: missing,
            runs: None,
        },
        Unrunnable {
            what: "calls a command that is not found",
            fix: vec![
                format!("a command in {calls_missing}"),
                "not found".into(),
                "PATH".into(),
            ],
            command: calls_missing,
            runs: Some(runs),
        },
    ]
}

/// The log has exactly one `fly: error:` line, and it names the command and
/// the fix.
fn assert_one_set_up_error_line(log: &str, handler: &Unrunnable) {
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with("fly: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{}: {log}", handler.what);
    let line = errors[0];
    assert!(
        line.contains(&format!("--exec {:?}", handler.command)),
        "{}: the line names the command: {line}",
        handler.what
    );
    for fix in &handler.fix {
        assert!(
            line.contains(fix.as_str()),
            "{}: {fix:?} in {line}",
            handler.what
        );
    }
}

#[test]
fn poll_echo_stops_with_exit_1_on_a_handler_that_cannot_run_and_keeps_the_update() {
    let dir = tempfile::tempdir().unwrap();
    for handler in unrunnable_handlers(dir.path()) {
        let emulator = Emulator::start();
        let state = dir.path().join(format!("{}.db", unique_number()));
        let update_id = emulator.user_says("private", "u_s", "set me up");
        // A service, not --once: it used to retry this forever.
        let mut service = Service::start(
            &emulator,
            &[
                "poll-echo",
                "--state",
                state.to_str().unwrap(),
                "--poll-timeout",
                "1",
                "--exec",
                &handler.command,
            ],
        );
        let status = service.wait(Duration::from_secs(20));
        let log = service.log();
        let status = status.unwrap_or_else(|| panic!("{}: still running: {log}", handler.what));
        assert_eq!(status.code(), Some(1), "{}: {log}", handler.what);
        assert_one_set_up_error_line(&log, &handler);
        assert!(emulator.sent().is_empty(), "{:?}", emulator.sent());
        if let Some(runs) = &handler.runs {
            let ran = std::fs::read_to_string(runs).unwrap();
            assert_eq!(ran.lines().count(), 1, "not retried: {ran}");
        }

        // Not confirmed: the run after the fix answers it.
        let output = poll_once(&emulator, &state, "cat > /dev/null; echo fixed", &[]);
        assert!(output.status.success(), "{}", stderr_of(&output));
        assert_eq!(
            emulator.sent(),
            vec![text_reply(update_id, "fixed", "private", "u_s")],
            "{}",
            handler.what
        );
    }
}

/// A delivery of a text update, signed for `start_receiver`'s secret.
pub(crate) fn signed_delivery(update_id: i64, chat_id: &str, text: &str) -> String {
    let update = json!({
        "update_id": update_id,
        "type": "message",
        "message": {
            "chat": {"type": "private", "id": chat_id},
            "msgType": "text",
            "data": {"content": text},
        },
    });
    sign_update(&update.to_string(), "forward-test-secret", &[])
}

/// POSTs a delivery; returns the status code and body.
pub(crate) fn deliver(url: &str, body: &str) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .proxy(None)
        .build()
        .new_agent();
    let mut response = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap_or_else(|error| panic!("POST {url}: {error}"));
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

#[test]
fn serve_webhook_answers_500_and_exits_1_on_a_handler_that_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    for (n, handler) in unrunnable_handlers(dir.path()).into_iter().enumerate() {
        let emulator = Emulator::start();
        let state = dir.path().join(format!("{}.db", unique_number()));
        let update_id = 7000 + n as i64;
        let delivery = signed_delivery(update_id, "u_w", "set me up");
        let (mut receiver, url) = start_receiver(&emulator, 0, &state, &handler.command);
        let answer = deliver(&url, &delivery);
        assert_eq!(answer.0, 500, "{}: {answer:?}", handler.what);
        // It stops by itself: no signal.
        let status = receiver.wait(Duration::from_secs(20));
        let log = receiver.log();
        let status = status.unwrap_or_else(|| panic!("{}: still running: {log}", handler.what));
        assert_eq!(status.code(), Some(1), "{}: {log}", handler.what);
        assert_one_set_up_error_line(&log, &handler);
        assert!(emulator.sent().is_empty(), "{:?}", emulator.sent());

        // Not marked handled: the platform's redelivery, to the fixed
        // server, is answered.
        let (_fixed, url) = start_receiver(&emulator, 0, &state, "cat > /dev/null; echo fixed");
        assert_eq!(deliver(&url, &delivery), (200, "OK".to_string()));
        assert_eq!(
            emulator.sent(),
            vec![text_reply(update_id, "fixed", "private", "u_w")],
            "{}",
            handler.what
        );
    }
}

/// The stop after a set-up error is graceful: a delivery whose handler is
/// still running is answered (and its reply sent) before fly exits 1.
#[test]
fn serve_webhook_finishes_a_delivery_in_flight_before_stopping_on_a_set_up_error() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let release = dir.path().join("release");
    // u_slow waits for the test's go-ahead; any other chat exits 127 as a
    // missing program would.
    let handler = format!(
        r#"cat > /dev/null
        case "$FLY_CHAT_ID" in
            u_slow)
                touch '{started}'
                while [ ! -e '{release}' ]; do sleep 0.05; done
                echo finished ;;
            *) exit 127 ;;
        esac"#,
        started = started.display(),
        release = release.display()
    );
    let (mut receiver, url) = start_receiver(&emulator, 0, &dir.path().join("s.db"), &handler);
    let slow = signed_delivery(8001, "u_slow", "slow");
    let in_flight = std::thread::spawn({
        let url = url.clone();
        move || deliver(&url, &slow)
    });
    crate::common::wait_until(Duration::from_secs(10), "the slow handler", || {
        started.exists()
    });
    let failing = signed_delivery(8002, "u_fail", "fails");
    assert_eq!(deliver(&url, &failing).0, 500);
    // Stopping, but still waiting for the delivery in flight.
    assert!(
        receiver.child.try_wait().unwrap().is_none(),
        "{}",
        receiver.log()
    );
    std::fs::write(&release, "").unwrap();
    assert_eq!(in_flight.join().unwrap(), (200, "OK".to_string()));
    let status = receiver
        .wait(Duration::from_secs(20))
        .expect("stops by itself");
    let log = receiver.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("command not found (exit 127)"), "{log}");
    assert_eq!(
        emulator.sent(),
        vec![text_reply(8001, "finished", "private", "u_slow")]
    );
}

#[test]
fn forward_records_an_update_it_cannot_sign_as_a_dead_letter_and_goes_on() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let (_receiver, url) = start_receiver(
        &emulator,
        0,
        &dir.path().join("receiver.db"),
        &shouting_handler(&runs),
    );
    let state = dir.path().join("forward.db");
    let forward = start_forward(&emulator, &url, &state);
    // Python cannot encode a lone surrogate as UTF-8, so the platform could
    // never sign this message (v1 hashes its canonical UTF-8).
    let unsignable = emulator.raw_update(
        r#"{"type":"message","message":{"chat":{"type":"private","id":"u_1"},"msgType":"text","data":{"content":"cut \ud83d"}}}"#,
    );
    let next = emulator.user_says("private", "u_1", "after");
    assert!(
        eventually(Duration::from_secs(20), || !emulator.sent().is_empty()),
        "forward: {}",
        forward.log()
    );
    assert_eq!(
        emulator.sent(),
        [text_reply(next, "shout: AFTER", "private", "u_1")]
    );
    let listed = fly()
        .args(["dead-letters", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    let lines: Vec<Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}\n{}", forward.log());
    assert_eq!(lines[0]["update_id"], unsignable);
    assert!(
        lines[0]["reason"]
            .as_str()
            .unwrap()
            .contains("lone surrogate"),
        "{}",
        lines[0]
    );
}

// ---------------------------------------------------------------------------
// The runtime: chats never wait for each other; the staged stop.

/// A handler that hangs for chat `u_slow` until `release` exists, writing
/// its process group id to `group` first; other chats are answered at once.
fn slow_chat_handler(release: &Path, group: &Path) -> String {
    format!(
        r#"cat > /dev/null
        if [ "$FLY_CHAT_ID" = u_slow ]; then
            echo $$ > '{group}.tmp' && mv '{group}.tmp' '{group}'
            while [ ! -e '{release}' ]; do sleep 0.05; done
        fi
        echo "done $FLY_CHAT_ID""#,
        group = group.display(),
        release = release.display()
    )
}

fn start_poll_echo(emulator: &Emulator, dir: &Path, handler: &str, extra: &[&str]) -> Service {
    let state = dir.join("s.db");
    let mut args = vec![
        "poll-echo",
        "--state",
        state.to_str().unwrap(),
        "--poll-timeout",
        "1",
        "--exec",
        handler,
    ];
    args.extend_from_slice(extra);
    Service::start(emulator, &args)
}

pub(crate) fn signal(service: &Service, name: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{name}"), &service.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// SIGTERM; the service must then end by itself, exit 0, within 15 s.
pub(crate) fn stop_with_sigterm(service: &mut Service) {
    signal(service, "TERM");
    let status = service.wait(Duration::from_secs(15));
    assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{}", service.log());
}

/// SIGINT, then once the stop has begun a second SIGINT; the exit status
/// if the service ends within 10 s after it.
pub(crate) fn signal_twice(service: &mut Service) -> Option<ExitStatus> {
    signal(service, "INT");
    wait_until(Duration::from_secs(10), "the stop to begin", || {
        service.log().contains("stopping")
    });
    signal(service, "INT");
    service.wait(Duration::from_secs(10))
}

fn read_group(group_file: &Path) -> String {
    wait_until(Duration::from_secs(15), "the slow handler to start", || {
        group_file.exists()
    });
    std::fs::read_to_string(group_file)
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_slow_chat_does_not_hold_up_the_others() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let group_file = dir.path().join("group");
    let handler = slow_chat_handler(&release, &group_file);
    let service = start_poll_echo(&emulator, dir.path(), &handler, &[]);
    let slow = emulator.user_says("private", "u_slow", "first");
    read_group(&group_file);
    // Sent while the slow chat's handler runs: answered without waiting for it.
    let quick = emulator.user_says("private", "u_quick", "second");
    let answered = eventually(Duration::from_secs(10), || !emulator.sent().is_empty());
    // What was answered while the slow handler still ran: read before it is
    // released (then its own reply may come at any moment), and released
    // before asserting, so a failure leaves no handler waiting.
    let sent_while_slow_ran = emulator.sent();
    std::fs::write(&release, "").unwrap();
    assert!(
        answered,
        "chat u_quick waited for u_slow: {}",
        service.log()
    );
    assert_eq!(
        sent_while_slow_ran,
        [text_reply(quick, "done u_quick", "private", "u_quick")]
    );
    wait_until(Duration::from_secs(10), "the slow chat's reply", || {
        emulator.sent().len() == 2
    });
    assert_eq!(
        emulator.sent()[1],
        text_reply(slow, "done u_slow", "private", "u_slow")
    );
}

#[test]
fn sigterm_with_a_hanging_handler_exits_0_after_the_grace_period_and_leaves_nothing_running() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("never");
    let group_file = dir.path().join("group");
    let handler = slow_chat_handler(&release, &group_file);
    let mut service = start_poll_echo(&emulator, dir.path(), &handler, &["--grace", "1"]);
    let hanging = emulator.user_says("private", "u_slow", "hang");
    let group = read_group(&group_file);
    stop_with_sigterm(&mut service);
    let left = live_members_of_group(&group);
    assert!(left.is_empty(), "left running: {left}");
    assert!(service.log().contains("grace period"), "{}", service.log());
    // Not confirmed: the next run gets the update again.
    std::fs::write(&release, "").unwrap();
    let output = poll_once(&emulator, &dir.path().join("s.db"), &handler, &[]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        emulator.sent(),
        [text_reply(hanging, "done u_slow", "private", "u_slow")]
    );
}

#[test]
fn a_second_signal_stops_poll_echo_at_once_with_130_and_no_handler_left() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let group_file = dir.path().join("group");
    let handler = slow_chat_handler(&dir.path().join("never"), &group_file);
    let mut service = start_poll_echo(&emulator, dir.path(), &handler, &["--grace", "600"]);
    emulator.user_says("private", "u_slow", "hang");
    let group = read_group(&group_file);
    let status = signal_twice(&mut service);
    let left = live_members_of_group(&group);
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(130)),
        "{}",
        service.log()
    );
    assert!(left.is_empty(), "left running: {left}");
}

#[test]
fn a_second_signal_stops_serve_webhook_at_once_with_130_and_no_handler_left() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let group_file = dir.path().join("group");
    let handler = slow_chat_handler(&dir.path().join("never"), &group_file);
    let (mut receiver, url) = start_receiver(&emulator, 0, &dir.path().join("r.db"), &handler);
    let delivery = signed_delivery(9101, "u_slow", "hang");
    std::thread::spawn(move || deliver(&url, &delivery));
    let group = read_group(&group_file);
    let status = signal_twice(&mut receiver);
    let left = live_members_of_group(&group);
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(130)),
        "{}",
        receiver.log()
    );
    assert!(left.is_empty(), "left running: {left}");
}

#[test]
fn a_second_signal_stops_forward_at_once_with_130() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, held) = silent_receiver();
    let state = dir.path().join("forward.db");
    let mut forward = Service::start(
        &emulator,
        &[
            "forward",
            "--to",
            &url,
            "--secret",
            "s",
            "--state",
            state.to_str().unwrap(),
            "--grace",
            "600",
        ],
    );
    emulator.user_says("private", "u_1", "hello");
    let _connection = held.join().unwrap();
    let status = signal_twice(&mut forward);
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(130)),
        "{}",
        forward.log()
    );
}

#[test]
fn forward_delivers_in_the_platforms_order_across_chats() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let mut expected = Vec::new();
    for round in 0..4 {
        for chat in ["u_a", "u_b", "u_c"] {
            expected.push(emulator.user_says("private", chat, &format!("m{round}")));
        }
    }
    let handler = format!(
        "cat > /dev/null; echo \"$FLY_UPDATE_ID\" >> '{}'",
        runs.display()
    );
    let (_receiver, url) = start_receiver(&emulator, 0, &dir.path().join("r.db"), &handler);
    let forward = start_forward(&emulator, &url, &dir.path().join("forward.db"));
    let delivered = || -> Vec<i64> {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .map(|line| line.parse().unwrap())
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(20), || delivered().len()
            == expected.len()),
        "{:?}\n{}",
        delivered(),
        forward.log()
    );
    assert_eq!(delivered(), expected);
}

/// Whether process `pid` still runs (a zombie waiting to be reaped does not).
fn runs(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A handler that starts a daemon outside its process group (`setsid`), so
/// no group kill reaches it, and exits at once: fly still stops the daemon
/// when it stops (it became fly's child as the subreaper), and reaps it.
#[test]
fn a_daemon_a_handler_starts_with_setsid_does_not_outlive_fly() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("daemon.pid");
    let handler = format!(
        r#"cat > /dev/null
        setsid sh -c 'echo $$ > "{pid}.tmp" && mv "{pid}.tmp" "{pid}" && exec sleep 300' \
            </dev/null >/dev/null 2>&1 &
        echo started"#,
        pid = pid_file.display()
    );
    let mut service = start_poll_echo(&emulator, dir.path(), &handler, &[]);
    let id = emulator.user_says("private", "u_1", "start a daemon");
    wait_until(Duration::from_secs(15), "the reply", || {
        emulator.sent() == [text_reply(id, "started", "private", "u_1")]
    });
    wait_until(Duration::from_secs(10), "the daemon's pid", || {
        pid_file.exists()
    });
    let daemon = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(
        runs(&daemon),
        "the daemon {daemon} should run while fly does"
    );
    stop_with_sigterm(&mut service);
    let stopped = eventually(Duration::from_secs(5), || !runs(&daemon));
    if !stopped {
        // Not left behind by a failing test.
        let _ = Command::new("kill").args(["-KILL", &daemon]).status();
    }
    assert!(
        stopped,
        "the daemon {daemon} outlived fly\n{}",
        service.log()
    );
    let gone = !Path::new(&format!("/proc/{daemon}")).exists();
    assert!(gone, "the daemon {daemon} was killed but not reaped");
}
