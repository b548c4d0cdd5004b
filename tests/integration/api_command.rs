//! `fly api PATH` against the emulator: the call made and its answer
//! printed, the body from stdin, the platform's refusals, bad input, the
//! token, retries; and an `https://` URL whose server speaks plain HTTP,
//! which every client refuses at once.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Emulator, Service, TOKEN, fly, fly_at, stderr_of};

const SEND_BODY: &str =
    r#"{"msg_type":"text","data":{"content":"raw ✓"},"client_msg_id":"api-1","to_user_id":"u_7"}"#;

/// stdout and stderr together, to look for the token in.
fn everything(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr_of(output)
    )
}

#[test]
fn a_call_is_made_and_its_answer_printed_on_one_line() {
    let emulator = Emulator::start_strict();
    for path in ["send", "/api/v1/s/bot/send"] {
        let output = fly_at(&emulator)
            .args(["api", path, "--data", SEND_BODY])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr_of(&output));
        let stdout = String::from_utf8(output.stdout.clone()).unwrap();
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        let answer: Value = serde_json::from_str(&stdout).expect("stdout is JSON");
        assert_eq!(answer["code"], 0, "{answer}");
        assert_eq!(answer["data"]["client_msg_id"], "api-1", "{answer}");
        assert!(!everything(&output).contains(TOKEN));
    }
    // The same client_msg_id twice: the platform recorded it once.
    assert_eq!(
        emulator.sent(),
        vec![json!({
            "msg_type": "text",
            "data": {"content": "raw ✓"},
            "client_msg_id": "api-1",
            "to_user_id": "u_7",
        })]
    );
}

#[test]
fn the_body_comes_from_stdin_with_data_dash() {
    let emulator = Emulator::start();
    let update_id = emulator.user_says("private", "u_1", "hello from stdin test");
    let output = fly_at(&emulator)
        .args(["api", "updates", "--data", "-"])
        .write_stdin("{\n  \"limit\": 5,\n  \"timeout\": 0\n}\n")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    let updates = answer["data"]["updates"].as_array().expect("updates");
    assert_eq!(updates.len(), 1, "{answer}");
    assert_eq!(updates[0]["update_id"], update_id);
    assert_eq!(
        updates[0]["message"]["data"]["content"],
        "hello from stdin test"
    );
}

/// The platform's refusal (its `{"code","msg"}` envelope): exit 1, one line
/// with its code and message.
#[test]
fn an_error_envelope_is_exit_1_with_the_platforms_code_and_message() {
    let emulator = Emulator::start();
    for (path, body, said) in [
        (
            "send",
            r#"{"to_user_id":"u_1"}"#,
            "/api/v1/s/bot/send was rejected: HTTP 400 (code 40001: msg_type must be a non-empty string)",
        ),
        (
            "no/such/call",
            "{}",
            "/api/v1/s/bot/no/such/call was rejected: HTTP 404 (code 40400: no such bot API method)",
        ),
    ] {
        let output = fly_at(&emulator)
            .args(["api", path, "--data", body])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
        assert!(output.stdout.is_empty());
        assert_eq!(stderr_of(&output).trim(), format!("fly: error: {said}"));
    }
}

/// Bad JSON, a URL, a path out of the bot API, no token: exit 2, one line,
/// nothing sent.
#[test]
fn bad_input_is_exit_2_with_one_line_and_nothing_sent() {
    let emulator = Emulator::start();
    let cases: [(&[&str], &str); 6] = [
        (
            &["api", "send", "--data", "{nope"],
            "--data is not valid JSON",
        ),
        (
            &["api", "send", "--data", "[1]"],
            "--data must be a JSON object",
        ),
        (
            &["api", "https://evil.example/api/v1/s/bot/send"],
            "is a URL",
        ),
        (&["api", "../../_emulator/sent"], "not a plain path"),
        (&["api", "send?x=1"], "contains '?'"),
        (&["api", "/api/v1/other"], "outside the Bot API"),
    ];
    for (args, said) in cases {
        let output = fly_at(&emulator).args(args).output().unwrap();
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("fly: error: ") && stderr.contains(said),
            "{args:?}: {stderr}"
        );
    }
    let output = fly_at(&emulator)
        .args(["api", "updates", "--data", "-"])
        .write_stdin("")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
    assert!(stderr_of(&output).contains("the body on stdin (--data -) is not valid JSON"));

    let output = fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .args(["api", "send", "--data", SEND_BODY])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr_of(&output).contains("missing bot token"));
    assert_eq!(emulator.send_attempts(), 0);
}

#[test]
fn a_refused_token_keeps_the_token_hint_and_is_never_shown() {
    let emulator = Emulator::start_strict();
    let wrong = "wrong-token-0123456789";
    let output = fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", wrong)
        .args(["api", "updates"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains("the platform refused the bot token")
            && stderr
                .trim_end()
                .ends_with("check FLY_BOT_TOKEN or --token-file"),
        "{stderr}"
    );
    assert!(!everything(&output).contains(wrong));
}

/// Injected 5xx/429 and lost answers: the calls are retried, as every call
/// of the one client is, and each lands once.
#[test]
fn calls_are_retried_through_faults() {
    let emulator = Emulator::start();
    emulator.faults(json!({"error_rate": 0.4, "drop_rate": 0.2, "retry_after": 0, "seed": 11}));
    let mut retried = false;
    for n in 0..6 {
        let body = json!({
            "msg_type": "text",
            "data": {"content": format!("through faults {n}")},
            "client_msg_id": format!("api-faults-{n}"),
            "to_user_id": "u_f",
        });
        let output = fly_at(&emulator)
            .args(["api", "send", "--data", &body.to_string()])
            .output()
            .unwrap();
        let stderr = stderr_of(&output);
        assert!(output.status.success(), "call {n}: {stderr}");
        retried |= stderr.contains("retrying");
        let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(answer["data"]["client_msg_id"], format!("api-faults-{n}"));
    }
    assert!(retried, "the faults should have made at least one retry");
    let contents: Vec<String> = emulator
        .sent()
        .iter()
        .map(|sent| sent["data"]["content"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..6).map(|n| format!("through faults {n}")).collect();
    assert_eq!(contents, expected, "each call exactly once, in order");
}

/// `https://` to the emulator (plain HTTP): refused at the first attempt
/// with the URL to use, never retried.
#[test]
fn https_to_a_plain_http_server_fails_at_once_with_the_url_to_use() {
    let emulator = Emulator::start();
    let https = emulator.base_url.replacen("http://", "https://", 1);
    let said = format!(
        "the server at {https} answered plain HTTP: use {}",
        emulator.base_url
    );
    let run = |args: &[&str]| {
        fly()
            .env("FLY_BOT_TOKEN", TOKEN)
            .args(["-v"])
            .args(args)
            .args(["--base-url", &https])
            .output()
            .unwrap()
    };
    // -v logs each attempt (with its latency, ms=): one, and no retry.
    let attempts = |stderr: &str, path: &str| {
        stderr
            .lines()
            .filter(|line| line.contains(&format!("POST {path}:")) && line.contains(" ms="))
            .count()
    };

    for args in [
        &["send", "--to", "u_1", "hi"][..],
        &["api", "send", "--data", SEND_BODY][..],
    ] {
        let output = run(args);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("retrying"), "{args:?}: {stderr}");
        assert_eq!(attempts(&stderr, "/api/v1/s/bot/send"), 1, "{stderr}");
        let last = stderr.lines().last().unwrap();
        assert_eq!(
            last,
            format!("fly: error: {}{said} (--base-url or FLY_BASE_URL)", {
                if args[0] == "send" {
                    "sending the message: "
                } else {
                    ""
                }
            }),
        );
    }

    let output = run(&["doctor"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("FAIL  API       {said}\n")),
        "{stdout}"
    );
    assert!(!stderr.contains("retrying"), "{stderr}");
    assert_eq!(attempts(&stderr, "/api/v1/s/bot/updates"), 1, "{stderr}");
    assert_eq!(emulator.send_attempts(), 0);
}

/// `fly forward --to https://…` to a receiver that speaks plain HTTP: it
/// stops at the first delivery, saying which URL to use, and the update is
/// not confirmed (the run after the fix gets it).
#[test]
fn forward_to_an_https_receiver_speaking_plain_http_stops_with_the_url_to_use() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("forward.db");
    // The emulator itself is a plain-HTTP server to deliver to.
    let receiver = format!(
        "{}/hook",
        emulator.base_url.replacen("http://", "https://", 1)
    );
    emulator.user_says("private", "u_plain", "to a plain receiver");
    let mut forward = Service::start(
        &emulator,
        &[
            "forward",
            "--secret",
            "s3cret",
            "--state",
            state.to_str().unwrap(),
            "--to",
            &receiver,
            "--poll-timeout",
            "1",
        ],
    );
    let status = forward
        .wait(Duration::from_secs(30))
        .expect("forward stops by itself");
    let log = forward.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(!log.contains("retrying"), "{log}");
    let plain = receiver.replacen("https://", "http://", 1);
    assert!(
        log.trim_end().ends_with(&format!(
            "fly: error: the server at {receiver} answered plain HTTP: use {plain}"
        )),
        "{log}"
    );
    // Not confirmed: the update is still there for the next poll.
    let output = fly_at(&emulator)
        .args(["api", "updates", "--data", r#"{"timeout":0}"#])
        .output()
        .unwrap();
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        answer["data"]["updates"][0]["message"]["data"]["content"],
        "to a plain receiver"
    );
}
