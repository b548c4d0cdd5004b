//! Updates as the platform's Python reads them: everything `json.loads`
//! accepts is answered, reaches `--exec` byte for byte, and an update that
//! can never be handled is recorded as a dead letter instead of blocking the
//! ones after it. The odd updates travel the real path: posted to the
//! emulator as text, served byte for byte, polled by the real binary.

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

use crate::common::{Emulator, fly, fly_at, served_update, stderr_of};

/// A text message to `chat` whose `data` also holds `extra` (JSON text).
fn message_with(chat: &str, content: &str, extra: &str) -> String {
    format!(
        r#"{{"type":"message","message":{{"chat":{{"type":"private","id":"{chat}"}},"msgType":"text","data":{{"content":"{content}","extra":{extra}}}}}}}"#
    )
}

fn poll_once(emulator: &Emulator, state: &Path, extra: &[&str]) -> std::process::Output {
    fly_at(emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(state)
        .args(extra)
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap()
}

/// A handler that saves its stdin as `DIR/stdin/UPDATE_ID`: that directory
/// and the handler.
fn stdin_recorder(dir: &Path) -> (std::path::PathBuf, String) {
    let stdin_dir = dir.join("stdin");
    std::fs::create_dir(&stdin_dir).unwrap();
    let handler = format!("cat > '{}'/\"$FLY_UPDATE_ID\"", stdin_dir.display());
    (stdin_dir, handler)
}

/// The echo of update `update_id` as it appears in the emulator's sent text.
fn echo_json(update_id: i64, content: &str, chat: &str) -> String {
    format!(
        r#"{{"msg_type":"text","data":{{"content":"echo: {content}"}},"client_msg_id":"echo_{update_id}","to_user_id":"{chat}"}}"#
    )
}

#[test]
fn odd_updates_python_accepts_are_all_answered_and_never_block_the_next() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let odd = [
        ("deep", deep.as_str()),
        ("nan", "NaN"),
        ("neginf", "-Infinity"),
        ("huge", "1e400"),
        ("bigint", "123456789012345678901234567890"),
    ];
    let mut expected = Vec::new();
    for (name, extra) in odd {
        let update_id = emulator.raw_update(&message_with("u_odd", name, extra));
        expected.push(echo_json(update_id, name, "u_odd"));
        let normal = emulator.user_says("private", "u_next", &format!("after {name}"));
        expected.push(echo_json(normal, &format!("after {name}"), "u_next"));
    }
    // A JavaScript client cut a message inside an emoji: Python echoes the
    // lone surrogate back as its escape.
    let cut = emulator.raw_update(&message_with("u_odd", r"cut \ud83d", "1"));
    expected.push(echo_json(cut, r"cut \ud83d", "u_odd"));
    let last = emulator.user_says("private", "u_next", "last");
    expected.push(echo_json(last, "last", "u_next"));

    let output = poll_once(&emulator, &dir.path().join("s.db"), &[]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let sent = emulator.sent_text();
    for echo in &expected {
        assert!(sent.contains(echo.as_str()), "missing {echo} in {sent}");
    }
    assert_eq!(sent.matches("\"client_msg_id\"").count(), expected.len());
}

#[test]
fn exec_stdin_is_the_update_byte_for_byte() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let posted = "{\n  \"type\": \"message\",\n  \"zeta\": 18446744073709551617,\n  \"message\": {\"msgType\":\"text\", \"data\": {\"content\": \"a\\/b \\u00e9\", \"n\": 1E2, \"f\": -0.0},\n    \"chat\": {\"id\": \"u_1\", \"type\": \"private\"}},\n  \"alpha\": [1.50, 1e-7]\n}";
    let update_id = emulator.raw_update(posted);
    let expected = served_update(update_id, posted);
    // What the platform's updates call serves is exactly that text.
    let polled = ureq::post(&format!("{}/api/v1/s/bot/updates", emulator.base_url))
        .header("Authorization", "Bearer t")
        .send("{}")
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(polled.contains(&expected), "{polled}");

    let (stdin_dir, handler) = stdin_recorder(dir.path());
    let output = poll_once(
        &emulator,
        &dir.path().join("s.db"),
        &["--exec", handler.as_str()],
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    let received = std::fs::read(stdin_dir.join(update_id.to_string())).unwrap();
    assert_eq!(String::from_utf8(received).unwrap(), expected);
}

#[test]
fn an_update_that_cannot_be_answered_is_a_dead_letter_and_the_next_goes_on() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let no_chat = r#"{"type":"message","message":{"msgType":"text","data":{"content":"no chat"}}}"#;
    let dead = emulator.raw_update(no_chat);
    let next = emulator.user_says("private", "u_1", "still answered");

    let output = poll_once(&emulator, &state, &[]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let stderr = stderr_of(&output);
    assert_eq!(stderr.matches("dead letter").count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("update_id={dead}")), "{stderr}");
    let sent = emulator.sent_text();
    assert!(
        sent.contains(&echo_json(next, "still answered", "u_1")),
        "{sent}"
    );
    assert!(!sent.contains(&format!("echo_{dead}")), "{sent}");

    let listed = fly()
        .args(["dead-letters", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", stderr_of(&listed));
    let lines: Vec<Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["update_id"], dead);
    assert!(
        lines[0]["reason"]
            .as_str()
            .unwrap()
            .contains("without a chat")
    );
    assert_eq!(lines[0]["raw"], served_update(dead, no_chat));
    assert!(lines[0]["recorded_at"].as_i64().unwrap() > 0);

    // Confirmed: the next run neither answers it nor records it again.
    let again = poll_once(&emulator, &state, &[]);
    assert!(again.status.success(), "{}", stderr_of(&again));
    assert!(!stderr_of(&again).contains("dead letter"));
    assert_eq!(emulator.sent().len(), 1);

    let purged = fly()
        .args(["dead-letters", "--purge", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(purged.status.success(), "{}", stderr_of(&purged));
    let listed = fly()
        .args(["dead-letters", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(listed.status.success() && listed.stdout.is_empty());
}

#[test]
fn dead_letters_of_a_missing_state_file_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.db");
    let output = fly()
        .args(["dead-letters", "--state"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr_of(&output).contains("no state file"));
    assert!(!missing.exists());
}

/// JSON text with what serde_json would rewrite or refuse: number lexemes
/// Python keeps apart, escapes, non-ASCII, lone surrogates, and whitespace
/// between tokens.
fn odd_json() -> impl Strategy<Value = String> {
    let space = prop::sample::select(vec!["", " ", "\n  ", "\t", "\r\n"]);
    let number = prop::sample::select(vec![
        "0",
        "-0",
        "1E2",
        "1e-7",
        "-0.0",
        "1.50",
        "18446744073709551617",
        "-123456789012345678901234567890",
        "1e400",
        "NaN",
        "Infinity",
        "-Infinity",
    ]);
    let piece = prop::sample::select(vec![
        "a",
        " ",
        "é",
        "😀",
        "中文",
        "\\/",
        "\\\"",
        "\\\\",
        "\\n",
        "\\u00e9",
        "\\ud83d\\ude00",
        "\\ud83d",
        "\\udc00x",
        "\\u0000",
    ]);
    let string =
        prop::collection::vec(piece, 0..6).prop_map(|pieces| format!("\"{}\"", pieces.concat()));
    let leaf = prop_oneof![
        number.prop_map(str::to_string),
        string.clone(),
        prop::sample::select(vec!["true", "false", "null"]).prop_map(str::to_string),
    ];
    leaf.prop_recursive(4, 24, 4, move |inner| {
        let member = (string.clone(), space.clone(), inner.clone())
            .prop_map(|(key, space, value)| format!("{space}{key}{space}:{value}{space}"));
        prop_oneof![
            prop::collection::vec(inner, 0..4).prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec(member, 0..4)
                .prop_map(|members| format!("{{{}}}", members.join(","))),
        ]
    })
}

#[test]
fn random_odd_updates_reach_the_handler_byte_for_byte() {
    let mut runner = TestRunner::new(Config {
        cases: 4,
        ..Config::default()
    });
    let updates = prop::collection::vec(odd_json(), 10..30);
    runner
        .run(&updates, |extras| {
            let emulator = Emulator::start();
            let dir = tempfile::tempdir().unwrap();
            let expected: Vec<(i64, String)> = extras
                .iter()
                .enumerate()
                .map(|(index, extra)| {
                    let posted = message_with(&format!("u_{}", index % 3), "x", extra);
                    let update_id = emulator.raw_update(&posted);
                    (update_id, served_update(update_id, &posted))
                })
                .collect();
            let (stdin_dir, handler) = stdin_recorder(dir.path());
            let output = poll_once(
                &emulator,
                &dir.path().join("s.db"),
                &["--limit", "100", "--exec", handler.as_str()],
            );
            prop_assert!(output.status.success(), "{}", stderr_of(&output));
            for (update_id, served) in &expected {
                let received = std::fs::read(stdin_dir.join(update_id.to_string())).unwrap();
                prop_assert_eq!(String::from_utf8_lossy(&received), served.as_str());
            }
            Ok(())
        })
        .unwrap();
}
