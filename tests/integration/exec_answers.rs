//! The one answer language of `--exec` and `--exec-worker`, against the
//! emulator: each answer object gives the same result from a process per
//! update as from a worker; a JSON object that is no answer fails its
//! update, quoted, and is never sent as text; a worker that times out
//! having written nothing is told about output buffering.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Emulator, eventually, fly_at, stderr_of};
use crate::exec::{deliver, signed_delivery, start_receiver_with};
use crate::worker::sh_worker;

/// `fly poll-echo --once` with `handler` (`--exec CMD` or
/// `--exec-worker CMD`) and `extra` arguments, on the state in `dir`.
fn poll_once(emulator: &Emulator, dir: &Path, handler: [&str; 2], extra: &[&str]) -> Output {
    fly_at(emulator)
        .args(["poll-echo", "--once", "--concurrency", "1", "--state"])
        .arg(dir.join("s.db"))
        .args(handler)
        .args(extra)
        .timeout(Duration::from_secs(30))
        .output()
        .unwrap()
}

/// What a run did: whether it succeeded, and the messages it sent, each
/// without its `client_msg_id` (checked here to be the update's).
fn outcome(output: &Output, emulator: &Emulator, update_id: i64) -> (bool, Vec<Value>) {
    let sent = emulator
        .sent()
        .into_iter()
        .map(|mut message| {
            let object = message.as_object_mut().unwrap();
            assert_eq!(
                object.remove("client_msg_id"),
                Some(json!(format!("reply_{update_id}")))
            );
            message
        })
        .collect();
    (output.status.success(), sent)
}

#[test]
fn each_answer_object_does_the_same_from_exec_and_from_a_worker() {
    let image = json!({"originalUrl": "https://cdn.example/cat.jpg"});
    // Each answer with the update's id in `%s`, and what it does.
    let table: [(&str, Option<Value>, Option<&str>); 4] = [
        (
            r#"{"update_id":%s,"reply":"hi there"}"#,
            Some(json!({"msg_type": "text", "data": {"content": "hi there"}})),
            None,
        ),
        (
            r#"{"update_id":%s,"reply":{"msg_type":"image","data":{"originalUrl":"https://cdn.example/cat.jpg"}}}"#,
            Some(json!({"msg_type": "image", "data": image})),
            None,
        ),
        (r#"{"update_id":%s}"#, None, None),
        (
            r#"{"update_id":%s,"error":"the database is down"}"#,
            None,
            Some("answered an error: the database is down"),
        ),
    ];
    for (answer, reply, failure) in table {
        let without_id = answer
            .replace(r#""update_id":%s,"#, "")
            .replace(r#""update_id":%s"#, "");
        let dir = tempfile::tempdir().unwrap();
        let worker = sh_worker(dir.path(), &format!("printf '{answer}\\n' \"$id\""));
        let exec_with_id = format!("cat > /dev/null; printf '{answer}\\n' \"$FLY_UPDATE_ID\"");
        let exec_without_id = format!("cat > /dev/null; printf '{without_id}\\n'");
        let runs = [
            ["--exec-worker", worker.as_str()],
            ["--exec", exec_with_id.as_str()],
            ["--exec", exec_without_id.as_str()],
        ];
        let mut outcomes = Vec::new();
        for (n, handler) in runs.into_iter().enumerate() {
            let emulator = Emulator::start();
            let update_id = emulator.user_says("private", "u_1", "hello");
            let state = dir.path().join(format!("run{n}"));
            std::fs::create_dir(&state).unwrap();
            let output = poll_once(&emulator, &state, handler, &[]);
            let log = stderr_of(&output);
            let (succeeded, sent) = outcome(&output, &emulator, update_id);
            let what = format!("{answer} through {}\n{log}", handler[0]);
            let expected_sent: Vec<Value> = reply
                .iter()
                .map(|reply| {
                    let mut reply = reply.clone();
                    reply["to_user_id"] = json!("u_1");
                    reply
                })
                .collect();
            assert_eq!(sent, expected_sent, "{what}");
            assert_eq!(succeeded, failure.is_none(), "{what}");
            if let Some(failure) = failure {
                assert!(log.contains(failure), "{what}");
            }
            outcomes.push((succeeded, sent));
        }
        assert!(
            outcomes.windows(2).all(|pair| pair[0] == pair[1]),
            "{answer}: {outcomes:?}"
        );
    }
}

#[test]
fn a_json_object_that_is_no_answer_fails_the_update_quoted_and_is_never_sent() {
    let long = format!(r#"{{"text":"{}"}}"#, "x".repeat(1000));
    let cases = [
        (
            r#"{"text":"hi"}"#.to_string(),
            r#"unknown key "text" in "{\"text\":\"hi\"}"; nothing sent"#,
        ),
        // Python's print(dict): no JSON, but meant as an answer.
        ("{'reply': 'hi'}".to_string(), "is not JSON"),
        (long, "xxx\"…; nothing sent"),
    ];
    for (printed, says) in &cases {
        let emulator = Emulator::start();
        let dir = tempfile::tempdir().unwrap();
        emulator.user_says("private", "u_1", "hello");
        let answer = dir.path().join("answer");
        std::fs::write(&answer, format!("{printed}\n")).unwrap();
        let handler = format!("cat > /dev/null; cat '{}'", answer.display());
        let output = poll_once(&emulator, dir.path(), ["--exec", &handler], &[]);
        let log = stderr_of(&output);
        assert!(!output.status.success(), "{printed}: {log}");
        assert!(emulator.sent().is_empty(), "{printed}: {log}");
        assert!(log.contains("its output is not an answer"), "{log}");
        assert!(log.contains(says), "{printed}: should say {says}: {log}");
        assert!(
            !log.contains(&"x".repeat(300)),
            "the line is cut short: {log}"
        );
    }

    // The same behind serve-webhook: the delivery fails (500), nothing sent.
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let handler = r#"cat > /dev/null; printf '%s\n' '{"text":"hi"}'"#;
    let (receiver, url) = start_receiver_with(
        &emulator,
        0,
        &dir.path().join("receiver.db"),
        &["--exec", handler],
    );
    let (status, _) = deliver(&url, &signed_delivery(41, "u_1", "hello"));
    assert_eq!(status, 500, "{}", receiver.log());
    assert!(
        eventually(Duration::from_secs(10), || receiver
            .log()
            .contains(r#"unknown key "text" in "{\"text\":\"hi\"}""#)),
        "{}",
        receiver.log()
    );
    assert!(emulator.sent().is_empty());
}

#[test]
fn an_exec_answer_naming_another_update_fails_and_sends_nothing() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let update_id = emulator.user_says("private", "u_1", "hello");
    let handler = r#"cat > /dev/null; printf '{"update_id":%s,"reply":"hi"}\n' 12345"#;
    let output = poll_once(&emulator, dir.path(), ["--exec", handler], &[]);
    let log = stderr_of(&output);
    assert!(!output.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "answered update 12345, but it was run for update {update_id}"
        )),
        "{log}"
    );
    assert!(emulator.sent().is_empty());
}

const FLUSH_HINT: &str = "print(…, flush=True), or run python3 -u";

#[test]
#[ignore = "needs python3"]
fn a_python_worker_that_does_not_flush_times_out_with_the_hint_to_flush() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let worker = dir.path().join("worker.py");
    std::fs::write(
        &worker,
        "import json, sys\n\
         for line in sys.stdin:\n    \
             update = json.loads(line)\n    \
             print(json.dumps({\"update_id\": update[\"update_id\"], \"reply\": \"hi\"}))\n",
    )
    .unwrap();
    emulator.user_says("private", "u_1", "hello");
    let command = format!("python3 '{}'", worker.display());
    let output = poll_once(
        &emulator,
        dir.path(),
        ["--exec-worker", &command],
        &["--exec-timeout", "1"],
    );
    let log = stderr_of(&output);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("did not answer within 1s"), "{log}");
    assert!(log.contains(FLUSH_HINT), "{log}");
    assert!(emulator.sent().is_empty());

    // Flushed (python3 -u), the same worker answers.
    let unbuffered = format!("python3 -u '{}'", worker.display());
    let output = poll_once(
        &emulator,
        dir.path(),
        ["--exec-worker", &unbuffered],
        &["--exec-timeout", "5"],
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(emulator.sent().len(), 1);
}

#[test]
fn a_worker_that_times_out_having_written_nothing_gets_the_hint_to_flush_and_only_then() {
    // Silent, waiting for a line that never comes: the hint. Part of its
    // answer, then the same wait: its output is not stuck in a buffer.
    for (body, hint) in [
        ("read -r more", true),
        (r#"printf '{"update_id":%s' "$id"; read -r more"#, false),
    ] {
        let emulator = Emulator::start();
        let dir = tempfile::tempdir().unwrap();
        let worker = sh_worker(dir.path(), body);
        emulator.user_says("private", "u_1", "hello");
        let output = poll_once(
            &emulator,
            dir.path(),
            ["--exec-worker", &worker],
            &["--exec-timeout", "1"],
        );
        let log = stderr_of(&output);
        assert!(!output.status.success(), "{log}");
        assert!(log.contains("did not answer within 1s"), "{log}");
        assert_eq!(log.contains(FLUSH_HINT), hint, "{body}: {log}");
        assert!(emulator.sent().is_empty());
    }
}
