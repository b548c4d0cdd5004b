//! The `fly emulator` subcommands that talk to a running emulator (`say`,
//! `sent`, `webhook`, `media`), each against a real `fly emulator --port 0`,
//! in text and in `--json`; and what the running emulator logs.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    Emulator, RefusedPort, TOKEN, fly, fly_at, fly_child, media_pattern, signal, stderr_of,
    wait_for_exit, wait_until,
};
use crate::serve_webhook::Server;

const LIMIT: Duration = Duration::from_secs(20);

/// `fly emulator ARGS…` against `emulator`, its base URL in FLY_BASE_URL.
fn emulator_command(emulator: &Emulator, args: &[&str]) -> std::process::Output {
    fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .arg("emulator")
        .args(args)
        .output()
        .unwrap()
}

/// stdout of a command that must succeed.
fn stdout_of_success(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status.code(),
        stderr_of(output)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The bot sends `text` to user `to` (the real `fly send`).
fn bot_sends(emulator: &Emulator, args: &[&str]) {
    let output = fly_at(emulator).arg("send").args(args).output().unwrap();
    stdout_of_success(&output);
}

#[test]
fn say_prints_the_update_id_and_sent_shows_what_the_bot_sent() {
    let mut emulator = Emulator::start();
    let said = stdout_of_success(&emulator_command(
        &emulator,
        &["say", "--chat", "u_1", "hi"],
    ));
    let update_id: i64 = said.trim().parse().unwrap();
    let said = stdout_of_success(&emulator_command(
        &emulator,
        &["say", "--group", "g_1", "--json", "hello"],
    ));
    let answer: Value = serde_json::from_str(said.trim()).unwrap();
    assert_eq!(answer, json!({"update_id": update_id + 1}));

    bot_sends(
        &emulator,
        &[
            "--to",
            "u_1",
            "--client-msg-id",
            "c1",
            "line one\nline \"two\"",
        ],
    );
    bot_sends(
        &emulator,
        &[
            "--group",
            "g_1",
            "--client-msg-id",
            "c2",
            "--type",
            "image",
            "--data",
            r#"{"originalUrl":"https://cdn.example/a.png"}"#,
        ],
    );
    let text = stdout_of_success(&emulator_command(&emulator, &["sent"]));
    assert_eq!(
        text,
        "user:u_1 text \"line one\\nline \\\"two\\\"\" client_msg_id=c1\n\
         group:g_1 image https://cdn.example/a.png client_msg_id=c2\n"
    );
    // --json: each send request body as the emulator recorded it, one a line.
    let lines = stdout_of_success(&emulator_command(&emulator, &["sent", "--json"]));
    let bodies: Vec<Value> = lines
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(bodies, emulator.sent());

    // The emulator's log: the text of each message the bot sent, escaped
    // onto its line; and its stop.
    let log = emulator.log();
    let sent_line = log
        .lines()
        .find(|line| line.contains("bot sent") && line.contains("client_msg_id=\"c1\""))
        .unwrap_or_else(|| panic!("no log line for the sent text: {log}"));
    assert!(
        sent_line.contains(r#"text="line one\nline \"two\"""#),
        "{sent_line}"
    );
    assert!(sent_line.contains(r#"chat="u_1""#), "{sent_line}");
    assert!(
        log.lines()
            .any(|line| line.contains("bot sent")
                && line.contains(r#"url="https://cdn.example/a.png""#)),
        "{log}"
    );
    signal(emulator.pid(), libc::SIGTERM);
    let status = emulator.wait_for_exit(LIMIT).expect("the emulator stops");
    assert!(status.success(), "{status}");
    let log = emulator.log();
    assert!(
        log.lines()
            .last()
            .is_some_and(|line| line.contains("stopped") && line.contains("sent=2")),
        "{log}"
    );
}

#[test]
fn sent_follow_prints_new_messages_as_they_come_and_stops_on_sigterm() {
    let emulator = Emulator::start();
    bot_sends(
        &emulator,
        &["--to", "u_1", "--client-msg-id", "before", "one"],
    );
    let mut follower = fly_child(&emulator.base_url)
        .args(["emulator", "sent", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "user:u_1 text \"one\" client_msg_id=before\n");
    // It prints what was sent before it started; now one sent after.
    bot_sends(
        &emulator,
        &["--to", "u_2", "--client-msg-id", "after", "two"],
    );
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "user:u_2 text \"two\" client_msg_id=after\n");
    signal(follower.id(), libc::SIGTERM);
    let status = wait_for_exit(&mut follower, LIMIT).expect("sent --follow stops on SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn sent_follow_ends_quietly_when_its_reader_goes_away() {
    let emulator = Emulator::start();
    bot_sends(&emulator, &["--to", "u_1", "one"]);
    let mut follower = fly_child(&emulator.base_url)
        .args(["emulator", "sent", "--follow", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    let body: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(body, emulator.sent()[0]);
    // `| head -1`: the reader leaves while the follower waits for more.
    drop(lines);
    let status = wait_for_exit(&mut follower, LIMIT).expect("sent --follow ends");
    let output = follower.wait_with_output().unwrap();
    assert!(status.success(), "{status}: {}", stderr_of(&output));
    assert!(output.stderr.is_empty(), "{}", stderr_of(&output));
}

#[test]
fn webhook_set_status_and_unset() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = "a-webhook-secret-5e1f";
    let secret_file = dir.path().join("secret.txt");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let secret_path = secret_file.to_str().unwrap();
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret-file", secret_path],
    );

    let set = stdout_of_success(&emulator_command(
        &emulator,
        &[
            "webhook",
            "set",
            &server.url,
            "--secret-file",
            secret_path,
            "--bot-id",
            "42",
        ],
    ));
    assert_eq!(
        set,
        format!(
            "webhook set: each update goes to {} as bot 42, signed with the secret in \
             --secret-file {secret_path}\n",
            server.url
        )
    );
    let update_id = emulator.user_says("private", "u_1", "hi");
    wait_until(LIMIT, "the delivery", || {
        emulator.get("/_emulator/webhook")["delivered"]
            .as_array()
            .is_some_and(|delivered| delivered.len() == 1)
    });
    let status = stdout_of_success(&emulator_command(&emulator, &["webhook", "status"]));
    assert_eq!(
        status,
        format!(
            "url: {}\nbot_id: 42\npending: 0\nupdate {update_id}: HTTP 200, 1 attempt\n",
            server.url
        ),
        "{}",
        server.log()
    );
    let status = stdout_of_success(&emulator_command(
        &emulator,
        &["webhook", "status", "--json"],
    ));
    assert!(!status.contains(secret), "{status}");
    let report: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        report["delivered"],
        json!([{"update_id": update_id, "status": 200, "attempts": 1}])
    );
    // The receiver answered it: the echo went out.
    assert_eq!(emulator.sent().len(), 1);

    let unset = stdout_of_success(&emulator_command(&emulator, &["webhook", "unset"]));
    assert_eq!(
        unset,
        "webhook unset: updates are queued for polling again\n"
    );
    let status = stdout_of_success(&emulator_command(&emulator, &["webhook", "status"]));
    assert_eq!(
        status,
        format!(
            "url: none (updates are queued for polling)\npending: 0\n\
             update {update_id}: HTTP 200, 1 attempt\n"
        )
    );
}

#[test]
fn webhook_status_shows_a_failing_delivery_and_its_error() {
    let emulator = Emulator::start_strict();
    let refused = RefusedPort::new();
    let url = format!("{}/webhook", refused.url());
    // No secret given: the emulator signs with the sha256 of its token.
    let set = stdout_of_success(&emulator_command(&emulator, &["webhook", "set", &url]));
    assert!(
        set.ends_with("as bot bot_emulator, signed with the sha256 of the emulator's --token\n"),
        "{set}"
    );
    let update_id = emulator.user_says("private", "u_1", "hi");
    wait_until(LIMIT, "a failed attempt", || {
        !emulator.get("/_emulator/webhook")["retrying"].is_null()
    });
    let status = stdout_of_success(&emulator_command(&emulator, &["webhook", "status"]));
    let last = status.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("update {update_id}: retrying, ")) && last.contains("(last: "),
        "{status}"
    );
}

#[test]
fn webhook_set_refusals() {
    // An emulator without --token has no default secret: refused, exit 1.
    let emulator = Emulator::start();
    let output = fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .args(["emulator", "webhook", "set", "http://127.0.0.1:9/webhook"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("secret is required"), "{stderr}");
    // FLY_WEBHOOK_SECRET is the secret when there is no --secret-file.
    let output = fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_WEBHOOK_SECRET", "from-the-environment")
        .args(["emulator", "webhook", "set", "http://127.0.0.1:9/webhook"])
        .output()
        .unwrap();
    assert!(
        stdout_of_success(&output).ends_with("signed with FLY_WEBHOOK_SECRET\n"),
        "{}",
        stderr_of(&output)
    );
    // Bad input: exit 2.
    for args in [
        &["webhook", "set", "ftp://127.0.0.1/webhook"][..],
        &[
            "webhook",
            "set",
            "http://127.0.0.1:9/",
            "--secret-file",
            "/nonexistent/s",
        ],
        &["webhook", "set", "http://127.0.0.1:9/", "--bot-id", ""],
        &["webhook"],
    ] {
        let output = emulator_command(&emulator, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr_of(&output)
        );
    }
}

#[test]
fn say_callback_queues_a_callback_query_update() {
    let emulator = Emulator::start();
    let said = stdout_of_success(&emulator_command(
        &emulator,
        &["say", "--chat", "u_1", "--callback", "vote:yes"],
    ));
    let update_id: i64 = said.trim().parse().unwrap();
    let said = stdout_of_success(&emulator_command(
        &emulator,
        &["say", "--group", "g_1", "--callback", "vote:no", "--json"],
    ));
    assert_eq!(
        serde_json::from_str::<Value>(&said).unwrap(),
        json!({"update_id": update_id + 1})
    );
    let updates = ureq::post(&format!("{}/api/v1/s/bot/updates", emulator.base_url))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(json!({"offset": 0}))
        .unwrap()
        .body_mut()
        .read_json::<Value>()
        .unwrap();
    let updates = updates["data"]["updates"].as_array().unwrap().clone();
    assert_eq!(updates.len(), 2, "{updates:?}");
    for (update, (id, chat, data)) in updates.iter().zip([
        (
            update_id,
            json!({"type": "private", "id": "u_1"}),
            "vote:yes",
        ),
        (
            update_id + 1,
            json!({"type": "group", "id": "g_1"}),
            "vote:no",
        ),
    ]) {
        assert_eq!(update["update_id"], id);
        assert_eq!(update["type"], "callback_query");
        let query = &update["callback_query"];
        assert_eq!(query["chat"], chat);
        assert_eq!(query["data"], data);
        assert!(
            query["id"].as_str().is_some_and(|id| id.starts_with("cb_")),
            "{query}"
        );
    }
    // The bot confirms it without answering (no handler for callback queries).
    let output = fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(tempfile::tempdir().unwrap().path().join("s.db"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains("callback_query"),
        "{}",
        stderr_of(&output)
    );
    assert!(emulator.sent().is_empty());
    // Exactly one of TEXT, --image and --callback.
    let output = emulator_command(
        &emulator,
        &["say", "--chat", "u_1", "--callback", "x", "hi"],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
}

#[test]
fn media_add_makes_a_url_that_fetch_media_downloads() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let sized = "https://cdn.example/a/photo.jpg";
    let added = stdout_of_success(&emulator_command(
        &emulator,
        &["media", "add", sized, "--size", "48000"],
    ));
    assert_eq!(
        added,
        format!("{sized}: 48000 bytes, downloadable through batch_access\n")
    );
    let file = dir.path().join("cat.bin");
    let bytes: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let from_file = "https://cdn.example/a/cat.bin";
    let added = stdout_of_success(&emulator_command(
        &emulator,
        &[
            "media",
            "add",
            from_file,
            "--file",
            file.to_str().unwrap(),
            "--json",
        ],
    ));
    assert_eq!(
        serde_json::from_str::<Value>(&added).unwrap(),
        json!({"url": from_file, "size": 70_000})
    );
    for (name, url, expected) in [
        ("photo.jpg", sized, media_pattern(48_000)),
        ("cat.out", from_file, bytes),
    ] {
        let target = dir.path().join(name);
        let output = fly_at(&emulator)
            .args(["fetch-media", url, "-o"])
            .arg(&target)
            .output()
            .unwrap();
        stdout_of_success(&output);
        assert!(std::fs::read(&target).unwrap() == expected, "{url}");
    }
    // Bad input: exit 2.
    for args in [
        &["media", "add", sized][..],
        &["media", "add", sized, "--size", "1", "--file", "x"],
        &["media", "add", sized, "--file", "/nonexistent/file"],
        &["media", "add", "", "--size", "1"],
        &["media", "add", sized, "--size", "-1"],
    ] {
        let output = emulator_command(&emulator, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr_of(&output)
        );
    }
}

#[test]
fn an_emulator_that_is_not_there_is_one_line_and_exit_1() {
    let refused = RefusedPort::new();
    for args in [
        &["sent"][..],
        &["sent", "--follow"],
        &["say", "--chat", "u_1", "hi"],
        &["say", "--chat", "u_1", "--callback", "x"],
        &["webhook", "status"],
        &["webhook", "unset"],
        &["webhook", "set", "http://127.0.0.1:9/webhook"],
        &["media", "add", "https://x/a", "--size", "1"],
    ] {
        let output = fly()
            .env("FLY_BASE_URL", refused.url())
            .arg("emulator")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = stderr_of(&output);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("fly: error: no emulator at {}", refused.url())),
            "{args:?}: {stderr}"
        );
    }
    // A base URL with the API path: bad input.
    let output = fly()
        .args([
            "emulator",
            "sent",
            "--base-url",
            "http://127.0.0.1:9/api/v1",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
}
