//! `fly send` against the emulator: exact payloads, bad input, faults, the token.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::common::{Emulator, TOKEN, fly, fly_at, stderr_of};

#[test]
fn text_to_a_user_is_sent_exactly_and_its_data_printed() {
    let emulator = Emulator::start_strict();
    let output = fly_at(&emulator)
        .args([
            "send",
            "--to",
            "u_123",
            "--client-msg-id",
            "deploy-42",
            "deploy finished ✓",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let printed: Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    assert_eq!(printed["client_msg_id"], "deploy-42");
    assert!(printed["message_id"].is_string(), "{printed}");
    assert_eq!(output.stdout.iter().filter(|&&b| b == b'\n').count(), 1);

    assert_eq!(
        emulator.sent(),
        vec![json!({
            "msg_type": "text",
            "data": {"content": "deploy finished ✓"},
            "client_msg_id": "deploy-42",
            "to_user_id": "u_123",
        })]
    );
}

#[test]
fn group_target_and_text_from_stdin() {
    let emulator = Emulator::start();
    fly_at(&emulator)
        .args(["send", "--group", "g_9", "-"])
        .write_stdin("line one\nline two\n\n")
        .assert()
        .success();
    let sent = emulator.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["group_id"], "g_9");
    assert!(sent[0].get("to_user_id").is_none());
    // Trailing newlines are dropped, inner ones kept.
    assert_eq!(sent[0]["data"]["content"], "line one\nline two");
    let id = sent[0]["client_msg_id"].as_str().unwrap();
    assert!(id.starts_with("fly_send_"), "generated id {id}");
}

#[test]
fn other_types_take_their_data_as_json() {
    let emulator = Emulator::start();
    fly_at(&emulator)
        .args(["send", "--to", "u_1", "--type", "image"])
        .args([
            "--data",
            r#"{"originalUrl":"https://cdn.example/a.png","w":640}"#,
        ])
        .assert()
        .success();
    let sent = emulator.sent();
    assert_eq!(sent[0]["msg_type"], "image");
    assert_eq!(
        sent[0]["data"],
        json!({"originalUrl": "https://cdn.example/a.png", "w": 640})
    );
}

/// Each bad input: exit 2, one `fly: error:` line naming what is wrong, nothing sent.
#[test]
fn bad_input_is_exit_2_with_one_line() {
    let emulator = Emulator::start();
    let cases: &[(&[&str], &str)] = &[
        (&["send", "hello"], "--to"),
        (&["send", "--to", "u", "--group", "g", "hi"], "--group"),
        (&["send", "--to", "u"], "missing message"),
        (
            &["send", "--to", "u", "--type", "image", "--data", "{oops"],
            "--data is not valid JSON",
        ),
        (
            &["send", "--to", "u", "--type", "image", "--data", "[1,2]"],
            "--data must be a JSON object",
        ),
        (
            &["send", "--to", "u", "--type", "image", "caption"],
            "needs --data",
        ),
        (
            &["send", "--to", "u", "hi", "--no-such-flag"],
            "--no-such-flag",
        ),
    ];
    for (args, expected) in cases {
        let output = fly_at(&emulator).args(*args).output().unwrap();
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("fly: error: "), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?} should mention {expected}: {stderr}"
        );
    }
    assert!(emulator.sent().is_empty());
}

#[test]
fn missing_token_is_exit_2_naming_the_variable() {
    let emulator = Emulator::start();
    let output = fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .args(["send", "--to", "u", "hi"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr_of(&output).contains("FLY_BOT_TOKEN"));
}

/// The file is read and trimmed, and wins over FLY_BOT_TOKEN (a stale
/// variable in the environment must not make --token-file unusable).
#[test]
fn token_file_is_read_and_trimmed() {
    let emulator = Emulator::start_strict();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", "a-stale-token-from-the-environment")
        .args(["send", "--to", "u", "hi", "--token-file"])
        .arg(&path)
        .assert()
        .success();
    assert_eq!(emulator.sent().len(), 1);
}

/// A line break inside the token is bad input (exit 2) named at once, not a
/// failed request after retries; the token is still not shown.
#[test]
fn a_token_with_a_line_break_is_exit_2() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "secret-part-one\nsecret-part-two\n").unwrap();
    let output = fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .args(["send", "--to", "u", "hi", "--token-file"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("line break"), "{stderr}");
    assert!(!stderr.contains("secret-part"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(emulator.sent().is_empty());
}

/// A token an Authorization header cannot carry (non-ASCII) is exit 2 at
/// once, before any request, and is not shown.
#[test]
fn a_token_that_is_not_a_header_value_is_exit_2_at_once() {
    let emulator = Emulator::start();
    let output = fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", "tök-secret-ünicode")
        .args(["send", "--to", "u", "hi"])
        .timeout(std::time::Duration::from_secs(10))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("HTTP header cannot carry"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        emulator.get("/_emulator/sent")["sent"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// Text piped from a binary by mistake (NUL bytes) is exit 2, not sent.
#[test]
fn text_with_nul_bytes_is_exit_2() {
    let emulator = Emulator::start();
    for text in ["\0\0\0", "hello\0world"] {
        let output = fly_at(&emulator)
            .args(["send", "--to", "u", "-"])
            .write_stdin(text)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
        assert!(stderr_of(&output).contains("NUL bytes"));
    }
    assert!(emulator.sent().is_empty());
}

/// A refused token: exit 1 at once (no retries), a message saying so, and the
/// token in no output even at the most verbose log level.
#[test]
fn refused_token_is_fatal_and_never_printed() {
    let emulator = Emulator::start_strict();
    let wrong = "wrong-token-d41d8cd98f";
    let output = fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", wrong)
        .args(["-vv", "send", "--to", "u", "hi"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("refused the bot token"), "{stderr}");
    assert!(
        stderr.contains("check FLY_BOT_TOKEN or --token-file"),
        "{stderr}"
    );
    assert_eq!(emulator.send_attempts(), 1, "401 must not be retried");
    for text in [stderr.as_str(), &String::from_utf8_lossy(&output.stdout)] {
        assert!(!text.contains(wrong), "token leaked: {text}");
    }
    // Nor split across the lines of a hex dump (the text column of each line).
    let dump_text: String = stderr
        .lines()
        .filter_map(|line| line.rsplit(' ').next())
        .collect();
    assert!(
        !dump_text.contains(wrong),
        "token leaked in a dump: {stderr}"
    );
    assert!(emulator.sent().is_empty());

    // --help shows the variable but never its value.
    let help = fly()
        .env("FLY_BOT_TOKEN", wrong)
        .args(["send", "--help"])
        .output()
        .unwrap();
    let help_text = String::from_utf8_lossy(&help.stdout);
    assert!(help_text.contains("FLY_BOT_TOKEN"));
    assert!(!help_text.contains(wrong));
}

#[test]
fn a_rejected_request_shows_the_envelope_and_exits_1() {
    let emulator = Emulator::start();
    let output = fly_at(&emulator)
        .args(["send", "--to", "u", "-"])
        // Far more than socket buffers hold: the emulator must read it all
        // (and drop it) for the 413 to reach a client still sending.
        .write_stdin("x".repeat(24 << 20))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("HTTP 413 (code 413"), "{stderr}");
}

/// Half of all calls fail (5xx/429 before processing, or the answer is lost
/// after processing); every send still lands exactly once.
#[test]
fn survives_50_percent_faults_without_duplicates() {
    let emulator = Emulator::start();
    emulator.faults(json!({"error_rate": 0.25, "drop_rate": 0.25, "retry_after": 0, "seed": 7}));
    let mut ids = Vec::new();
    for n in 0..12 {
        let output = fly_at(&emulator)
            .args(["send", "--to", "u_faults", &format!("message {n}")])
            .output()
            .unwrap();
        assert!(output.status.success(), "send {n}: {}", stderr_of(&output));
        let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
        ids.push(printed["client_msg_id"].as_str().unwrap().to_string());
    }
    let sent = emulator.sent();
    let contents: Vec<&str> = sent
        .iter()
        .map(|s| s["data"]["content"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..12).map(|n| format!("message {n}")).collect();
    assert_eq!(contents, expected, "each message exactly once, in order");
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 12);
}

#[test]
fn gives_up_after_bounded_retries_with_exit_1() {
    let emulator = Emulator::start();
    emulator.faults(json!({"error_rate": 1.0, "retry_after": 0}));
    let output = fly_at(&emulator)
        .args(["send", "--to", "u", "hi"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    let last = stderr.lines().last().unwrap();
    assert!(
        last.starts_with("fly: error: sending the message: /api/v1/s/bot/send failed after"),
        "{stderr}"
    );
    assert!(stderr.contains("retrying"), "retries are logged: {stderr}");
    assert!(emulator.sent().is_empty());
}

#[test]
fn unreachable_server_is_exit_1_not_a_hang() {
    // A port nothing listens on: connection refused on every attempt.
    let nothing_listens = crate::common::RefusedPort::new();
    let output = fly()
        .env("FLY_BASE_URL", nothing_listens.url())
        .env("FLY_BOT_TOKEN", TOKEN)
        .args(["-q", "send", "--to", "u", "hi"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr_of(&output).contains("connection"),
        "{}",
        stderr_of(&output)
    );
}

/// `fly send --to u hi` against a server that is not the platform.
fn send_to(base_url: &str) -> std::process::Output {
    fly()
        .env("FLY_BASE_URL", base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .args(["send", "--to", "u", "hi"])
        .output()
        .unwrap()
}

/// A redirect is not followed (it would turn the POST into a bodyless GET
/// whose 2xx looks like success): exit 1 naming it.
#[test]
fn a_redirect_is_an_error_not_a_silent_success() {
    let (base_url, seen) = crate::common::misbehaving_server(crate::common::REDIRECT);
    let output = send_to(&base_url);
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains("HTTP 302") && stderr.contains("redirect"),
        "{stderr}"
    );
    assert_eq!(*seen.lock().unwrap(), ["POST /api/v1/s/bot/send HTTP/1.1"]);
}

/// A 2xx envelope without `data` did not send anything: exit 1, not a
/// printed `null`.
#[test]
fn an_answer_without_data_is_an_error() {
    let (base_url, _) = crate::common::misbehaving_server(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{\"code\":0}",
    );
    let output = send_to(&base_url);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = stderr_of(&output);
    assert!(stderr.contains("without data"), "{stderr}");
}

/// `429` asking for a 5 minute wait, with the platform's envelope.
const SLOW_DOWN_300: &str = "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 300\r\nContent-Type: application/json\r\nContent-Length: 32\r\nConnection: close\r\n\r\n{\"code\":42900,\"msg\":\"slow down\"}";

/// A `Retry-After` longer than the ~30 s a one-shot command retries for is
/// not waited for (it used to be, up to 5 minutes on each of 5 retries): exit
/// 1 at once, after one request, with one line naming the wait asked for.
#[test]
fn a_retry_after_past_the_budget_fails_at_once_naming_the_wait() {
    let (base_url, seen) = crate::common::answering_in_turn(&[SLOW_DOWN_300]);
    let output = fly()
        .env("FLY_BASE_URL", &base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .args(["send", "--to", "u", "hi"])
        // Twice the budget: a regression that waits is a failure, not a hang.
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr,
        "fly: error: sending the message: /api/v1/s/bot/send failed: \
         HTTP 429 (code 42900: slow down); the platform asked to wait 300 s (Retry-After), \
         more than the ~30 s this command retries for\n"
    );
    let requests: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(line, _)| line.clone())
        .collect();
    assert_eq!(requests, ["POST /api/v1/s/bot/send HTTP/1.1"]);
}

/// A `Retry-After` that fits is honoured: the retry comes no sooner than
/// asked, and succeeds.
#[test]
fn a_short_retry_after_is_waited_for_and_the_retry_succeeds() {
    let (base_url, seen) = crate::common::answering_in_turn(&[
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 82\r\nConnection: close\r\n\r\n{\"code\":0,\"msg\":\"ok\",\"data\":{\"message_id\":\"m_7\",\"client_msg_id\":\"after-the-wait\"}}",
    ]);
    let output = fly()
        .env("FLY_BASE_URL", &base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .args([
            "send",
            "--to",
            "u",
            "--client-msg-id",
            "after-the-wait",
            "hi",
        ])
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    let stderr = stderr_of(&output);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "{\"message_id\":\"m_7\",\"client_msg_id\":\"after-the-wait\"}\n"
    );
    assert!(stderr.contains("retrying in 1.0s"), "{stderr}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen[1].1 - seen[0].1 >= std::time::Duration::from_secs(1),
        "the retry came before the platform's Retry-After: {seen:?}"
    );
}

/// What would fail the same way again is tried once: 501, a 2xx that is
/// not the platform's JSON, HTTP that cannot be read.
#[test]
fn answers_that_cannot_get_better_are_not_retried() {
    let cases: [(&'static str, &str); 3] = [
        (
            "HTTP/1.1 501 Not Implemented\r\nContent-Type: application/json\r\nContent-Length: 38\r\nConnection: close\r\n\r\n{\"code\":50100,\"msg\":\"not implemented\"}",
            "HTTP 501 (code 50100: not implemented)",
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 17\r\nConnection: close\r\n\r\n<html>busy</html>",
            "not a JSON object",
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: abc\r\nConnection: close\r\n\r\n{}",
            "malformed HTTP",
        ),
    ];
    for (answer, expected) in cases {
        let (base_url, seen) = crate::common::misbehaving_server(answer);
        let output = send_to(&base_url);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{expected}: {stderr}");
        assert_eq!(seen.lock().unwrap().len(), 1, "{expected} was retried");
    }
}
