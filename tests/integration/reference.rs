//! The platform's own examples (`../shared/reference/`) run unchanged against
//! `fly emulator`: the emulator is faithful to what they expect.
//!
//! They need the examples next to the repository (`../shared/reference/`, as
//! in CI), python3 with `requests` and node 18+: so they are `#[ignore]`d for
//! a plain `cargo test`, and `bash .ci/run` installs what they need and runs
//! them (`cargo test -- --include-ignored`). Run where something is missing,
//! they fail saying what, rather than pass without running.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Background, Emulator, TOKEN, eventually, listening_port, wait_until};

fn reference_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference");
    dir.join("hello_bot_polling.py").exists().then_some(dir)
}

fn python_with_requests() -> bool {
    Command::new("python3")
        .args(["-c", "import requests"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Node with a global `fetch` (18+), which the example needs.
fn node_available() -> bool {
    Command::new("node")
        .args(["-e", "if (typeof fetch !== 'function') process.exit(1)"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The reference directory; fails the test, saying what is missing, when
/// the examples or their interpreters are not there.
fn prerequisites(needs_node: bool) -> PathBuf {
    let dir = reference_dir()
        .expect("../shared/reference not found next to the repository (run this test in CI)");
    assert!(
        python_with_requests(),
        "python3 with the `requests` package is needed (bash .ci/run installs it)"
    );
    assert!(
        !needs_node || node_available(),
        "node 18+ (with fetch) is needed (bash .ci/run installs it)"
    );
    dir
}

fn start_example(
    program: &str,
    script: PathBuf,
    emulator: &Emulator,
    extra_env: &[(&str, String)],
) -> Background {
    let mut command = Command::new(program);
    command
        .arg(script)
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .env("PYTHONUNBUFFERED", "1")
        // The emulator is on loopback: never go through a proxy from the environment.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("FLY_WEBHOOK_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    for (name, value) in extra_env {
        command.env(name, value);
    }
    Background::spawn(program, &mut command)
}

/// Waits until the emulator recorded `count` sends, or fails after 20 s.
fn wait_for_sent(emulator: &Emulator, count: usize) -> Vec<Value> {
    let mut sent = Vec::new();
    let arrived = eventually(Duration::from_secs(20), || {
        sent = emulator.sent();
        sent.len() >= count
    });
    assert!(arrived, "expected {count} sends, got {sent:?}");
    sent
}

fn conversation(emulator: &Emulator) -> (i64, i64) {
    let private = emulator.user_says("private", "u_1", "hello 你好");
    let group = emulator.user_says("group", "g_7", "multi\nline");
    (private, group)
}

fn expected_echoes(private: i64, group: i64) -> Vec<Value> {
    vec![
        json!({"msg_type": "text", "data": {"content": "echo: hello 你好"},
               "client_msg_id": format!("echo_{private}"), "to_user_id": "u_1"}),
        json!({"msg_type": "text", "data": {"content": "echo: multi\nline"},
               "client_msg_id": format!("echo_{group}"), "group_id": "g_7"}),
    ]
}

#[test]
#[ignore = "needs ../shared/reference, python3 requests and node (bash .ci/run)"]
fn python_polling_example_echoes_through_the_emulator() {
    let dir = prerequisites(false);
    let emulator = Emulator::start_strict();
    let _bot = start_example("python3", dir.join("hello_bot_polling.py"), &emulator, &[]);
    let (private, group) = conversation(&emulator);
    assert_eq!(wait_for_sent(&emulator, 2), expected_echoes(private, group));
}

#[test]
#[ignore = "needs ../shared/reference, python3 requests and node (bash .ci/run)"]
fn node_polling_example_echoes_through_the_emulator() {
    let dir = prerequisites(true);
    let emulator = Emulator::start_strict();
    let _bot = start_example("node", dir.join("hello_bot_polling.js"), &emulator, &[]);
    let (private, group) = conversation(&emulator);
    assert_eq!(wait_for_sent(&emulator, 2), expected_echoes(private, group));
}

#[test]
#[ignore = "needs ../shared/reference, python3 requests and node (bash .ci/run)"]
fn python_media_roundtrip_example_downloads_and_forwards() {
    let dir = prerequisites(false);
    let emulator = Emulator::start_strict();
    let media_url = "https://cdn.example/photo-original.png";
    let content = b"\x89PNG fake image bytes \x00\x01\x02 for the round trip".to_vec();
    emulator.post(
        "/_emulator/media",
        json!({"url": media_url, "content_base64": base64_encode(&content)}),
    );
    let mut bot = start_example(
        "python3",
        dir.join("media_roundtrip_polling_batch_access.py"),
        &emulator,
        &[],
    );
    let data =
        json!({"originalUrl": media_url, "thumbnailUrl": "https://cdn.example/unknown-thumb.png"});
    let update_id = emulator.post(
        "/_emulator/messages",
        json!({"chat": {"type": "group", "id": "g_media"}, "msgType": "image", "data": data}),
    )["update_id"]
        .as_i64()
        .unwrap();

    let sent = wait_for_sent(&emulator, 1);
    assert_eq!(
        sent,
        vec![json!({"msg_type": "image", "data": data,
                    "client_msg_id": format!("fwd_{update_id}"), "group_id": "g_media"})]
    );
    // The example prints the path it downloaded to; the bytes must be exact.
    let stdout = bot.child.stdout.take().unwrap();
    let mut first_line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first_line).unwrap();
    let downloaded = std::fs::read(first_line.trim()).expect("downloaded file");
    assert_eq!(downloaded, content);
}

#[test]
#[ignore = "needs ../shared/reference, python3 requests and node (bash .ci/run)"]
fn python_webhook_example_accepts_the_emulators_signed_deliveries() {
    let dir = prerequisites(false);
    let emulator = Emulator::start_strict();
    let secret = "whsec-reference-test";
    // Port 0: the example binds whatever port the system gives it and does
    // not say which; it is read back from /proc once it listens.
    let server = start_example(
        "python3",
        dir.join("hello_bot_webhook_server.py"),
        &emulator,
        &[
            ("FLY_WEBHOOK_PORT", "0".to_string()),
            ("FLY_WEBHOOK_SECRET", secret.to_string()),
        ],
    );
    let mut port = None;
    wait_until(Duration::from_secs(10), "the example to listen", || {
        port = listening_port(server.child.id());
        port.is_some()
    });
    let port = port.unwrap();
    emulator.post(
        "/_emulator/webhook",
        json!({"url": format!("http://127.0.0.1:{port}/webhook"), "secret": secret, "bot_id": 42}),
    );
    let (private, group) = conversation(&emulator);
    // The reference server verifies each signature (it raises, i.e. no 200,
    // on a bad one) and replies through the emulator's send.
    assert_eq!(wait_for_sent(&emulator, 2), expected_echoes(private, group));
    // The second echo can be sent before its delivery's 200 is back.
    wait_until(Duration::from_secs(10), "both deliveries answered", || {
        emulator.get("/_emulator/webhook")["pending"] == 0
    });
    let deliveries = emulator.get("/_emulator/webhook");
    let statuses: Vec<i64> = deliveries["delivered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, vec![200, 200], "{deliveries}");
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
