//! `fly serve-webhook`: signed deliveries from the emulator's webhook mode and
//! raw requests for every status code, key rotation, a slowloris crowd,
//! dedupe across a restart, HTTPS, and clean stops.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::common::{
    Emulator, TOKEN, echo, eventually, fly, fly_child, live_members_of_group, new_log_file,
    show_log_file_if_failing, sign_update, stderr_of, wait_until, write_certificate,
};

pub(crate) const SECRET: &str = "hook-secret";
const FIVE_MIB: usize = 5 * 1024 * 1024;

/// A `fly serve-webhook --bind 127.0.0.1 --port 0` child, killed when dropped.
/// Its stderr (the log) goes to a file, so a chatty server never blocks on a
/// full pipe; a failing test shows what it said.
pub(crate) struct Server {
    pub(crate) child: Child,
    _stdout: BufReader<ChildStdout>,
    /// The URL it printed: where deliveries go.
    pub(crate) url: String,
    /// `scheme://127.0.0.1:port`, for other paths.
    pub(crate) origin: String,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// Serves in `dir` (state store `dir/s.db`) for the emulator at `base_url`.
    pub(crate) fn start(base_url: &str, dir: &Path, extra: &[&str]) -> Server {
        Server::start_with_state(base_url, dir, dir.join("s.db").as_os_str(), extra)
    }

    /// Serves for the emulator at `base_url` with `--state state` (a file
    /// or a server URL), its log in `dir`.
    pub(crate) fn start_with_state(
        base_url: &str,
        dir: &Path,
        state: &std::ffi::OsStr,
        extra: &[&str],
    ) -> Server {
        Server::start_from(fly_child(base_url), dir, state, extra)
    }

    /// As [`Server::start`], allowed at most `open_files` file descriptors.
    fn start_with_open_files(
        base_url: &str,
        dir: &Path,
        extra: &[&str],
        open_files: u64,
    ) -> Server {
        use std::os::unix::process::CommandExt;
        let mut command = fly_child(base_url);
        // SAFETY: setrlimit(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: open_files,
                    rlim_max: open_files,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Server::start_from(command, dir, dir.join("s.db").as_os_str(), extra)
    }

    pub(crate) fn start_from(
        mut command: Command,
        dir: &Path,
        state: &std::ffi::OsStr,
        extra: &[&str],
    ) -> Server {
        let log = new_log_file(dir, "serve-webhook-");
        let mut child = command
            .args([
                "serve-webhook",
                "--bind",
                "127.0.0.1",
                "--port",
                "0",
                "--state",
            ])
            .arg(state)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn fly serve-webhook");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first_line = String::new();
        stdout.read_line(&mut first_line).unwrap();
        let url = first_line.trim().to_string();
        if url.is_empty() {
            let status = child.wait().unwrap();
            panic!(
                "serve-webhook printed no URL ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or_else(|| panic!("first line should be the URL, got {url:?}"));
        let authority = rest.split('/').next().unwrap();
        let addr: SocketAddr = authority.parse().unwrap();
        let origin = url[..url.len() - rest.len() + authority.len()].to_string();
        Server {
            child,
            _stdout: stdout,
            url,
            origin,
            addr,
            log,
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as a service manager stops it.
    pub(crate) fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    pub(crate) fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        crate::common::wait_for_exit(&mut self.child, limit)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        show_log_file_if_failing("fly serve-webhook", &self.log);
    }
}

/// A status code, its body and the `Allow` header.
#[derive(Debug, PartialEq)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: String,
    allow: Option<String>,
}

pub(crate) fn answer(status: u16, body: &str) -> Answer {
    Answer {
        status,
        body: body.to_string(),
        allow: None,
    }
}

pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .proxy(None)
        .build()
        .new_agent()
}

fn read(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut response = result.expect("request to serve-webhook");
    let allow = response
        .headers()
        .get("allow")
        .map(|value| value.to_str().unwrap().to_string());
    Answer {
        status: response.status().as_u16(),
        body: response.body_mut().read_to_string().unwrap(),
        allow,
    }
}

pub(crate) fn post_with(agent: &ureq::Agent, url: &str, body: &str) -> Answer {
    read(
        agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(body),
    )
}

pub(crate) fn post(url: &str, body: &str) -> Answer {
    post_with(&agent(), url, body)
}

pub(crate) fn get(url: &str) -> Answer {
    read(agent().get(url).call())
}

/// A text message update as the platform sends it (before signing).
pub(crate) fn text_update(update_id: i64, chat: (&str, &str), text: &str) -> String {
    json!({
        "update_id": update_id,
        "type": "message",
        "message": {
            "chat": {"type": chat.0, "id": chat.1},
            "msgType": "text",
            "data": {"content": text},
        },
    })
    .to_string()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Sends `head`, then has `write_body` write to the socket from another
/// thread (the server may answer, and close, before reading all of it), and
/// reads one response: its status line's code and its body.
fn raw_exchange(
    addr: SocketAddr,
    head: &str,
    write_body: impl FnOnce(&mut TcpStream) + Send + 'static,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let writing = std::thread::spawn(move || write_body(&mut writer));

    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    let response = loop {
        if let Some(end) = find(&received, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            if received.len() >= end + 4 + length {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                let body = String::from_utf8_lossy(&received[end + 4..end + 4 + length]);
                break (status, body.into_owned());
            }
        }
        match stream.read(&mut buffer) {
            Ok(0) => panic!(
                "connection closed before a full response: {:?}",
                String::from_utf8_lossy(&received)
            ),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) => panic!(
                "reading the response: {error} (got {:?})",
                String::from_utf8_lossy(&received)
            ),
        }
    };
    // Unblocks the writer if the server neither reads nor closes.
    let _ = stream.shutdown(Shutdown::Both);
    writing.join().unwrap();
    response
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

// ---------------------------------------------------------------------------
// Deliveries from the emulator

#[test]
fn emulator_deliveries_are_echoed_to_users_and_groups() {
    let emulator = Emulator::start_strict();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    emulator.post(
        "/_emulator/webhook",
        json!({"url": server.url, "secret": SECRET, "bot_id": 42}),
    );
    let private = emulator.user_says("private", "u_1", "hello 你好 👋🏽");
    let group = emulator.user_says("group", "g_1", "line one\nline \"two\"");
    wait_until(Duration::from_secs(15), "both deliveries", || {
        emulator.get("/_emulator/webhook")["delivered"]
            .as_array()
            .is_some_and(|delivered| delivered.len() == 2)
    });
    let report = emulator.get("/_emulator/webhook");
    assert_eq!(
        report["delivered"],
        json!([
            {"update_id": private, "status": 200, "attempts": 1},
            {"update_id": group, "status": 200, "attempts": 1},
        ]),
        "{}",
        server.log()
    );
    assert_eq!(report["pending"], 0);
    assert_eq!(
        emulator.sent(),
        [
            echo(private, "hello 你好 👋🏽", ("to_user_id", "u_1")),
            echo(group, "line one\nline \"two\"", ("group_id", "g_1")),
        ]
    );
}

// ---------------------------------------------------------------------------
// Status codes, with raw requests

#[test]
fn a_handled_update_is_answered_ok_once_and_its_redelivery_is_a_duplicate() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);

    let signed = sign_update(&text_update(101, ("private", "u_1"), "first"), SECRET, &[]);
    assert_eq!(post(&server.url, &signed), answer(200, "OK"));
    assert_eq!(post(&server.url, &signed), answer(200, "DUPLICATE"));

    // The platform's bot.id may be a number: 42 signs as "42".
    let signed = sign_update(
        &text_update(102, ("group", "g_1"), "numeric bot id"),
        SECRET,
        &["--bot-id", "42"],
    );
    let numeric = signed.replace(r#""bot":{"id":"42"}"#, r#""bot":{"id":42}"#);
    assert_ne!(numeric, signed);
    assert_eq!(post(&server.url, &numeric), answer(200, "OK"));
    assert_eq!(post(&server.url, &numeric), answer(200, "DUPLICATE"));

    // An update without a message (a callback_query) is confirmed, not answered.
    let callback = sign_update(
        r#"{"update_id":103,"type":"callback_query","callback_query":{"id":"cb1"}}"#,
        SECRET,
        &[],
    );
    assert_eq!(post(&server.url, &callback), answer(200, "OK"));
    assert_eq!(post(&server.url, &callback), answer(200, "DUPLICATE"));

    assert_eq!(
        emulator.sent(),
        [
            echo(101, "first", ("to_user_id", "u_1")),
            echo(102, "numeric bot id", ("group_id", "g_1")),
        ]
    );
    assert_eq!(
        get(&format!("{}/healthz", server.origin)),
        answer(200, "ok")
    );
}

#[test]
fn bad_json_signatures_replays_and_reused_nonces_are_refused() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    let url = server.url.as_str();

    // 400: not JSON, not UTF-8, not an update.
    assert_eq!(post(url, r#"{"update_id":"#), answer(400, "MALFORMED_JSON"));
    let (status, body) = raw_exchange(
        server.addr,
        "POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n",
        |stream| stream.write_all(b"\xff\xfe").unwrap(),
    );
    assert_eq!((status, body.as_str()), (400, "MALFORMED_JSON"));
    assert_eq!(post(url, "[1,2]"), answer(400, "INVALID_UPDATE"));
    // A signed update without a usable id verifies (as in `fly verify-sig`):
    // it is recorded as a dead letter and accepted, never refused with a 400
    // that would make the platform drop it.
    let zero_id = sign_update(r#"{"update_id":0,"type":"message"}"#, SECRET, &[]);
    assert_eq!(post(url, &zero_id), answer(200, "DEAD_LETTER"));

    // 401: another secret, a field changed after signing.
    let update = text_update(201, ("private", "u_1"), "hi");
    let foreign = sign_update(&update, "another-secret", &[]);
    assert_eq!(post(url, &foreign), answer(401, "SIGNATURE_MISMATCH"));
    let signed = sign_update(&update, SECRET, &[]);
    for tampered in [
        signed.replace(r#""content":"hi""#, r#""content":"ho""#),
        signed.replace(r#""id":"u_1""#, r#""id":"u_2""#),
        signed.replace(r#""update_id":201"#, r#""update_id":209"#),
    ] {
        assert_ne!(tampered, signed);
        assert_eq!(post(url, &tampered), answer(401, "SIGNATURE_MISMATCH"));
    }

    // 401: signed 1000 s ago, or 1000 s ahead (window 300 s).
    for skew in [-1000, 1000] {
        let stale = sign_update(
            &text_update(202, ("private", "u_1"), "late"),
            SECRET,
            &[&format!("--now={}", unix_now() + skew)],
        );
        assert_eq!(post(url, &stale), answer(401, "REPLAY_WINDOW_EXCEEDED"));
    }

    // 401: a nonce already seen with another update.
    let first = sign_update(
        &text_update(203, ("private", "u_1"), "one"),
        SECRET,
        &["--nonce", "n-shared"],
    );
    let second = sign_update(
        &text_update(204, ("private", "u_1"), "two"),
        SECRET,
        &["--nonce", "n-shared"],
    );
    assert_eq!(post(url, &first), answer(200, "OK"));
    assert_eq!(post(url, &second), answer(401, "NONCE_REUSED"));
    // A redelivery of the first (same nonce, same update) is not a replay.
    assert_eq!(post(url, &first), answer(200, "DUPLICATE"));

    // The refused deliveries were not answered, and were not marked handled:
    // the untampered update still gets its echo.
    assert_eq!(post(url, &signed), answer(200, "OK"));
    assert_eq!(
        emulator.sent(),
        [
            echo(203, "one", ("to_user_id", "u_1")),
            echo(201, "hi", ("to_user_id", "u_1")),
        ]
    );
}

#[test]
fn other_paths_are_404_and_other_methods_405() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    let signed = sign_update(&text_update(301, ("private", "u_1"), "x"), SECRET, &[]);
    for path in ["/", "/other", "/webhook/", "/webhook/x", "/WEBHOOK"] {
        let url = format!("{}{path}", server.origin);
        assert_eq!(post(&url, &signed), answer(404, "NOT_FOUND"), "POST {path}");
        assert_eq!(get(&url), answer(404, "NOT_FOUND"), "GET {path}");
    }
    let not_allowed = Answer {
        status: 405,
        body: "METHOD_NOT_ALLOWED".into(),
        allow: Some("POST".into()),
    };
    assert_eq!(get(&server.url), not_allowed);
    assert_eq!(
        read(agent().put(&server.url).send(signed.as_str())),
        not_allowed
    );
    assert_eq!(read(agent().delete(&server.url).call()), not_allowed);
    assert!(emulator.sent().is_empty());
}

#[test]
fn bodies_over_max_body_are_413_with_or_without_content_length() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);

    let head = format!("POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: {FIVE_MIB}\r\n\r\n");
    let (status, body) = raw_exchange(server.addr, &head, |stream| {
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..FIVE_MIB / chunk.len() {
            if stream.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    assert_eq!((status, body.as_str()), (413, "PAYLOAD_TOO_LARGE"));

    // Chunked: no length to check up front, so the limit holds while reading.
    let head = "POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (status, body) = raw_exchange(server.addr, head, |stream| {
        let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
        for _ in 0..FIVE_MIB / 0x10000 {
            if stream.write_all(chunk.as_bytes()).is_err() {
                return;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n");
    });
    assert_eq!((status, body.as_str()), (413, "PAYLOAD_TOO_LARGE"));
    assert_eq!(
        get(&format!("{}/healthz", server.origin)),
        answer(200, "ok")
    );

    // --max-body is the exact limit: a signed update padded to it is handled.
    let small_dir = tempfile::tempdir().unwrap();
    let small = Server::start(
        &emulator.base_url,
        small_dir.path(),
        &["--secret", SECRET, "--max-body", "4096"],
    );
    let signed = sign_update(&text_update(401, ("private", "u_1"), "fits"), SECRET, &[]);
    let padded = format!("{signed}{}", " ".repeat(4096 - signed.len()));
    let over = format!("{padded} ");
    assert_eq!(post(&small.url, &over), answer(413, "PAYLOAD_TOO_LARGE"));
    let (status, body) = raw_exchange(
        small.addr,
        "POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        move |stream| {
            let chunked = format!("{:x}\r\n{over}\r\n0\r\n\r\n", over.len());
            let _ = stream.write_all(chunked.as_bytes());
        },
    );
    assert_eq!((status, body.as_str()), (413, "PAYLOAD_TOO_LARGE"));
    assert_eq!(post(&small.url, &padded), answer(200, "OK"));
    assert_eq!(emulator.sent(), [echo(401, "fits", ("to_user_id", "u_1"))]);
}

#[test]
fn a_reply_that_cannot_be_sent_is_500_and_the_redelivery_is_answered_once() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    let signed = sign_update(
        &text_update(501, ("group", "g_7"), "try again"),
        SECRET,
        &[],
    );

    emulator.faults(json!({"error_rate": 1.0, "retry_after": 0}));
    assert_eq!(post(&server.url, &signed), answer(500, "REPLY_FAILED"));
    assert_eq!(post(&server.url, &signed), answer(500, "REPLY_FAILED"));
    assert!(emulator.sent().is_empty());

    emulator.faults(json!({}));
    assert_eq!(post(&server.url, &signed), answer(200, "OK"));
    assert_eq!(post(&server.url, &signed), answer(200, "DUPLICATE"));
    assert_eq!(
        emulator.sent(),
        [echo(501, "try again", ("group_id", "g_7"))]
    );
}

/// A refused token would fail every reply the same way: the delivery is 500
/// (the platform delivers it again) and the server stops by itself, exit 1,
/// with one line saying the token was refused.
#[test]
fn a_refused_token_is_500_and_stops_the_server_with_exit_1() {
    let emulator = Emulator::start_strict();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret", SECRET, "--token", "revoked-token"],
    );
    let signed = sign_update(&text_update(511, ("private", "u_1"), "hello"), SECRET, &[]);
    assert_eq!(post(&server.url, &signed), answer(500, "FATAL_ERROR"));
    let status = server.wait_for_exit(Duration::from_secs(20));
    let log = server.log();
    let status = status.unwrap_or_else(|| panic!("still running: {log}"));
    assert_eq!(status.code(), Some(1), "{log}");
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with("fly: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].contains("refused the bot token"), "{log}");
    assert!(!log.contains("revoked-token"), "{log}");
    assert!(emulator.sent().is_empty());
}

#[test]
fn a_redelivery_while_the_first_is_still_being_answered_is_409() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    let signed = sign_update(&text_update(601, ("private", "u_1"), "slow"), SECRET, &[]);

    // The reply to the first delivery takes 2 s to be answered.
    emulator.faults(json!({"latency_ms": 2000}));
    let url = server.url.clone();
    let body = signed.clone();
    let first = std::thread::spawn(move || post(&url, &body));
    // Counted as it arrives, before the latency: the reply is in flight.
    wait_until(
        Duration::from_secs(10),
        "the first reply to be sent",
        || emulator.send_attempts() == 1,
    );
    assert_eq!(post(&server.url, &signed), answer(409, "IN_PROGRESS"));
    // Verification does not wait for the reply being sent: the 409 came
    // while the first delivery was still being answered.
    assert!(!first.is_finished(), "the 409 waited for the first reply");
    assert_eq!(first.join().unwrap(), answer(200, "OK"));
    assert_eq!(post(&server.url, &signed), answer(200, "DUPLICATE"));
    assert_eq!(emulator.sent(), [echo(601, "slow", ("to_user_id", "u_1"))]);
}

// ---------------------------------------------------------------------------
// Secrets

#[test]
fn any_of_several_secrets_verifies_and_the_default_is_the_token_hash() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret", "old", "--secret", "new"],
    );
    let update = |id: i64| text_update(id, ("private", "u_1"), &format!("update {id}"));
    assert_eq!(
        post(&server.url, &sign_update(&update(701), "old", &[])),
        answer(200, "OK")
    );
    assert_eq!(
        post(&server.url, &sign_update(&update(702), "new", &[])),
        answer(200, "OK")
    );
    assert_eq!(
        post(&server.url, &sign_update(&update(703), "third", &[])),
        answer(401, "SIGNATURE_MISMATCH")
    );
    let token_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(TOKEN.as_bytes()));
    assert_eq!(
        post(&server.url, &sign_update(&update(704), &token_hash, &[])),
        answer(401, "SIGNATURE_MISMATCH")
    );

    // Without --secret (and FLY_WEBHOOK_SECRET) the secret is sha256(token).
    let default_dir = tempfile::tempdir().unwrap();
    let default = Server::start(&emulator.base_url, default_dir.path(), &[]);
    assert_eq!(
        post(&default.url, &sign_update(&update(705), &token_hash, &[])),
        answer(200, "OK")
    );
    assert_eq!(
        post(&default.url, &sign_update(&update(706), TOKEN, &[])),
        answer(401, "SIGNATURE_MISMATCH")
    );

    let ids: Vec<Value> = emulator
        .sent()
        .iter()
        .map(|sent| sent["client_msg_id"].clone())
        .collect();
    assert_eq!(
        ids,
        [json!("echo_701"), json!("echo_702"), json!("echo_705")]
    );
}

/// `--secret-file`: the secret in the file (its trailing newline ignored)
/// verifies deliveries, as `--secret` would, with no warning in the log.
#[test]
fn a_secret_file_verifies_deliveries() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret-file", secret_file.to_str().unwrap()],
    );
    let update = |id: i64| text_update(id, ("private", "u_1"), &format!("update {id}"));
    assert_eq!(
        post(&server.url, &sign_update(&update(711), SECRET, &[])),
        answer(200, "OK")
    );
    assert_eq!(
        post(&server.url, &sign_update(&update(712), "other", &[])),
        answer(401, "SIGNATURE_MISMATCH")
    );
    // The refusal is the one warning: the secret file itself is fine.
    let log = server.log();
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("delivery refused (401 SIGNATURE_MISMATCH)")
            && warnings[0].contains("fly verify-sig --explain"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------
// Slowloris

/// True when the server has closed `stream` (EOF or reset), after reading
/// whatever it sent first; false while it is open. `stream` is non-blocking.
fn is_closed(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) if error.kind() == ErrorKind::WouldBlock => return false,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

#[test]
fn five_hundred_stalled_connections_neither_block_healthz_nor_stay_open() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret", SECRET, "--header-timeout", "2"],
    );
    let opened = Instant::now();
    // Each connection with the time it was established: the listen backlog
    // (128) can make a burst wait for a SYN retransmit, and the header
    // timeout runs from the server's accept.
    let mut stalled: Vec<(TcpStream, Duration)> = (0..500)
        .map(|n| {
            let mut stream = TcpStream::connect(server.addr).unwrap();
            // Half of them send nothing, half stop in the middle of the request line.
            if n % 2 == 1 {
                stream.write_all(b"POST /webh").unwrap();
            }
            stream.set_nonblocking(true).unwrap();
            (stream, opened.elapsed())
        })
        .collect();
    let connected = opened.elapsed();

    let asked = Instant::now();
    assert_eq!(
        get(&format!("{}/healthz", server.origin)),
        answer(200, "ok")
    );
    let answered = asked.elapsed();
    assert!(
        answered < Duration::from_secs(1),
        "/healthz took {answered:?} behind 500 stalled connections"
    );

    // Watch them until the server closes them (giving up 6 s after the last connected).
    let mut lifetimes: Vec<Option<Duration>> = vec![None; stalled.len()];
    let give_up = Instant::now() + Duration::from_secs(6);
    while lifetimes.iter().any(Option::is_none) && Instant::now() < give_up {
        for ((stream, established), lifetime) in stalled.iter_mut().zip(&mut lifetimes) {
            if lifetime.is_none() && is_closed(stream) {
                *lifetime = Some(opened.elapsed() - *established);
            }
        }
        // The polling interval.
        std::thread::sleep(Duration::from_millis(20));
    }
    let still_open = lifetimes.iter().filter(|closed| closed.is_none()).count();
    assert_eq!(still_open, 0, "stalled connections left open for 6 s");
    let shortest = lifetimes.iter().flatten().min().copied().unwrap();
    // Not before the 2 s header timeout (and, above, every one of them
    // within 6 s: no tighter upper bound, which a loaded machine could break).
    assert!(
        shortest >= Duration::from_millis(1900),
        "stalled connections lived {shortest:?} at least (opening all took {connected:?})"
    );
    assert_eq!(
        get(&format!("{}/healthz", server.origin)),
        answer(200, "ok")
    );
}

// ---------------------------------------------------------------------------
// The state store: bounded by --retention, one server per file, crashes

/// A signed update, signed here as the platform's Python signs it, for
/// tests that need hundreds (a `fly sign` process each would be slow).
/// `payload` is the message or callback_query as canonical JSON: keys
/// sorted, no spaces.
pub(crate) fn signed_here(update_id: i64, kind: &str, payload: &str, nonce: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let payload_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(payload.as_bytes()));
    let timestamp = unix_now();
    let signing = format!("{update_id}\n{kind}\nbot_test\n{timestamp}\n{nonce}\n{payload_sha}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(signing.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    format!(
        r#"{{"update_id":{update_id},"type":"{kind}","{kind}":{payload},"bot":{{"id":"bot_test"}},"timestamp":{timestamp},"nonce":"{nonce}","signature":"{signature}"}}"#
    )
}

/// A callback query (confirmed, not answered).
pub(crate) fn signed_callback(update_id: i64, nonce: &str) -> String {
    let payload = format!(r#"{{"data":"tap","id":"cb_{update_id}"}}"#);
    signed_here(update_id, "callback_query", &payload, nonce)
}

/// What the state file holds: handled ids, and nonces (logged or merged).
fn stored_rows(state: &Path) -> (i64, i64) {
    let connection = rusqlite::Connection::open(state).unwrap();
    connection.busy_timeout(Duration::from_secs(5)).unwrap();
    let count = |sql: &str| -> i64 { connection.query_row(sql, [], |row| row.get(0)).unwrap() };
    (
        count("SELECT count(*) FROM handled_updates"),
        count("SELECT (SELECT count(*) FROM nonce_log) + (SELECT count(*) FROM nonce_runs)"),
    )
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |found| found.len())
}

/// serve-webhook has no poll offset to prune handled ids by: they are kept
/// for --retention, nonces for twice the window, so round after round of
/// deliveries the file stays the same size (freed pages are reused) and the
/// write-ahead log is emptied once writes pause.
#[test]
fn the_state_file_stops_growing_past_the_retention() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret", SECRET, "--retention", "1s", "--window", "1"],
    );
    let state = dir.path().join("s.db");
    let wal = dir.path().join("s.db-wal");
    let agent = agent();
    let mut sizes = Vec::new();
    for round in 1..=3i64 {
        for n in 0..300 {
            let update_id = round * 10_000 + n;
            let body = signed_callback(update_id, &format!("n-{update_id}"));
            assert_eq!(post_with(&agent, &server.url, &body), answer(200, "OK"));
        }
        // Inside the retention, a redelivery is still a duplicate.
        let first = round * 10_000;
        let again = signed_callback(first, &format!("n-{first}"));
        assert_eq!(
            post_with(&agent, &server.url, &again),
            answer(200, "DUPLICATE")
        );
        wait_until(
            Duration::from_secs(30),
            &format!("round {round}'s handled ids and nonces pruned"),
            || stored_rows(&state) == (0, 0),
        );
        wait_until(Duration::from_secs(10), "the log emptied", || {
            file_size(&wal) == 0
        });
        sizes.push(file_size(&state));
    }
    // A page or two of slack: the trees' inner pages move as ids grow.
    assert!(
        sizes[2] <= sizes[0] + 2 * 4096,
        "the state file grew round after round: {sizes:?}\n{}",
        server.log()
    );
}

/// Out of file descriptors (EMFILE), every accept fails until a connection
/// closes: one warning for the burst while the retries back off, one line
/// when it clears, and the server serves again; not a warning every 50 ms.
#[test]
fn running_out_of_file_descriptors_is_logged_once_per_burst() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_open_files(
        &emulator.base_url,
        dir.path(),
        &["--secret", SECRET, "--header-timeout", "120", "-v"],
        64,
    );
    // More than the server has descriptors left: the rest wait in the backlog.
    let clients: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    let failed = "accepting a connection failed";
    wait_until(Duration::from_secs(20), "a failed accept", || {
        server.log().contains(failed)
    });
    // Retried, backing off, until the pause reached its cap of a second.
    wait_until(Duration::from_secs(20), "the back-off at its cap", || {
        server.log().contains("next try in 1000 ms")
    });
    drop(clients);
    // Served again, and the burst said to be over.
    let cleared = "accepting connections again after ";
    wait_until(Duration::from_secs(30), "the burst to clear", || {
        get(&format!("{}/healthz", server.origin)).status == 200 && server.log().contains(cleared)
    });
    let log = server.log();
    let warnings = log.lines().filter(|line| line.contains(failed)).count();
    assert_eq!(warnings, 1, "{log}");
    let attempts: u64 = log
        .split(cleared)
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count of failed attempts: {log}"));
    assert!(attempts >= 6, "{log}");
}

#[test]
fn a_second_server_on_the_same_state_file_is_refused_with_one_line() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let _first = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    let second = fly()
        .args(["serve-webhook", "--bind", "127.0.0.1", "--port", "0"])
        .arg("--state")
        .arg(dir.path().join("s.db"))
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .env("FLY_WEBHOOK_SECRET", SECRET)
        .timeout(Duration::from_secs(20))
        .output()
        .unwrap();
    let stderr = stderr_of(&second);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("fly: error: ") && stderr.contains("already serving webhooks"),
        "{stderr}"
    );
}

/// kill -9 right after the answers: what the state file lost (marks not yet
/// committed) is answered again on redelivery, and each reply's
/// client_msg_id makes the platform record it once.
#[test]
fn a_crash_loses_only_what_redelivery_answers_again_once() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut first = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    let bodies: Vec<(i64, String)> = (0..40)
        .map(|n| {
            let update_id = 7_000 + n;
            let message = format!(
                r#"{{"chat":{{"id":"u_crash","type":"private"}},"data":{{"content":"m {n}"}},"msgType":"text"}}"#
            );
            (update_id, signed_here(update_id, "message", &message, &format!("c-{n}")))
        })
        .collect();
    let agent = agent();
    for (_, body) in &bodies {
        assert_eq!(post_with(&agent, &first.url, body), answer(200, "OK"));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let second = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    for (update_id, body) in &bodies {
        let again = post_with(&agent, &second.url, body);
        assert!(
            again == answer(200, "DUPLICATE") || again == answer(200, "OK"),
            "update {update_id}: {again:?}\n{}",
            second.log()
        );
    }
    let echoed: Vec<i64> = emulator
        .sent()
        .iter()
        .map(|sent| {
            sent["client_msg_id"].as_str().unwrap()["echo_".len()..]
                .parse()
                .unwrap()
        })
        .collect();
    let expected: Vec<i64> = bodies.iter().map(|(update_id, _)| *update_id).collect();
    assert_eq!(echoed, expected, "each reply recorded once, in order");
}

// ---------------------------------------------------------------------------
// Restart, stop, usage

#[test]
fn handled_updates_and_seen_nonces_survive_a_restart() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let signed = sign_update(
        &text_update(801, ("private", "u_1"), "before restart"),
        SECRET,
        &["--nonce", "n-801"],
    );
    let mut first = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    assert_eq!(post(&first.url, &signed), answer(200, "OK"));
    first.terminate();
    // (How soon it stops: sigterm_while_idle_exits_0_quickly.)
    let status = first
        .wait_for_exit(Duration::from_secs(30))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}: {}", first.log());

    let second = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    assert_eq!(post(&second.url, &signed), answer(200, "DUPLICATE"));
    let replay = sign_update(
        &text_update(802, ("private", "u_1"), "same nonce"),
        SECRET,
        &["--nonce", "n-801"],
    );
    assert_eq!(post(&second.url, &replay), answer(401, "NONCE_REUSED"));
    assert_eq!(
        emulator.sent(),
        [echo(801, "before restart", ("to_user_id", "u_1"))]
    );
}

#[test]
fn sigterm_while_idle_exits_0_quickly() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret", SECRET, "--grace", "120"],
    );
    // One idle keep-alive connection must not hold the stop up (until the
    // end of the 120 s grace).
    let keep_alive = agent();
    assert_eq!(
        read(keep_alive.get(&format!("{}/healthz", server.origin)).call()),
        answer(200, "ok")
    );
    let signalled = Instant::now();
    server.terminate();
    let status = server
        .wait_for_exit(Duration::from_secs(90))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}: {}", server.log());
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(60), "stopping took {took:?}");
}

#[test]
fn sigterm_lets_a_reply_in_flight_finish() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    let signed = sign_update(
        &text_update(901, ("private", "u_1"), "last one"),
        SECRET,
        &[],
    );
    // The reply takes 2 s to be answered.
    emulator.faults(json!({"latency_ms": 2000}));
    let url = server.url.clone();
    let in_flight = std::thread::spawn(move || post(&url, &signed));
    // Counted as it arrives, before the latency: the reply is in flight.
    wait_until(Duration::from_secs(10), "the reply to be sent", || {
        emulator.send_attempts() == 1
    });
    server.terminate();
    // No longer accepting, while the delivery is still in flight...
    wait_until(Duration::from_secs(10), "connections to be refused", || {
        TcpStream::connect(server.addr).is_err()
    });
    assert!(
        !in_flight.is_finished(),
        "it kept accepting until the delivery was answered"
    );
    // ...which is answered, and then it exits 0.
    assert_eq!(in_flight.join().unwrap(), answer(200, "OK"));
    let status = server
        .wait_for_exit(Duration::from_secs(5))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}: {}", server.log());
    assert_eq!(
        emulator.sent(),
        [echo(901, "last one", ("to_user_id", "u_1"))]
    );
}

#[test]
fn sigterm_with_a_hanging_exec_handler_kills_it_after_the_drain_and_exits_0() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let group_file = dir.path().join("handler-group");
    // The handler runs in its own process group, led by its shell.
    let handler = format!(
        "echo $$ > '{group}.tmp' && mv '{group}.tmp' '{group}'; cat > /dev/null; sleep 100; echo too late",
        group = group_file.display()
    );
    let mut server = Server::start(
        &emulator.base_url,
        dir.path(),
        &[
            "--secret",
            SECRET,
            "--exec-timeout",
            "60",
            "--grace",
            "1",
            "--exec",
            &handler,
        ],
    );
    let signed = sign_update(&text_update(951, ("private", "u_1"), "hang"), SECRET, &[]);
    let url = server.url.clone();
    let body = signed.clone();
    let in_flight = std::thread::spawn(move || {
        agent()
            .post(&url)
            .header("Content-Type", "application/json")
            .send(&body)
            .map(|response| response.status().as_u16())
    });
    wait_until(Duration::from_secs(10), "the handler starts", || {
        group_file.exists()
    });
    let group = std::fs::read_to_string(&group_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(!live_members_of_group(&group).is_empty());

    let signalled = Instant::now();
    server.terminate();
    // Waiting for the handler would take 100 s, for its timeout 60 s.
    let Some(status) = server.wait_for_exit(Duration::from_secs(30)) else {
        kill_group(&group);
        panic!(
            "still running 30 s after SIGTERM (grace 1 s): {}",
            server.log()
        );
    };
    let took = signalled.elapsed();
    assert!(status.success(), "{status}: {}", server.log());
    // The handler had its grace before it was killed.
    assert!(
        took >= Duration::from_millis(900),
        "stopped after {took:?}, within the 1 s grace"
    );
    // The delivery was answered 500: the platform will deliver it again.
    assert_eq!(in_flight.join().unwrap().ok(), Some(500));
    let survivors = survivors_of_group(&group);
    assert!(
        survivors.is_empty(),
        "the handler outlived fly: {survivors}{}",
        server.log()
    );

    // Not marked handled: the redelivery is answered.
    let again = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    assert_eq!(post(&again.url, &signed), answer(200, "OK"));
    assert_eq!(emulator.sent(), [echo(951, "hang", ("to_user_id", "u_1"))]);
}

fn kill_group(group: &str) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status();
}

/// The members of process group `group` still alive after a moment
/// (killed, so the test leaves none behind), or nothing.
fn survivors_of_group(group: &str) -> String {
    if eventually(Duration::from_secs(2), || {
        live_members_of_group(group).is_empty()
    }) {
        return String::new();
    }
    let survivors = live_members_of_group(group);
    kill_group(group);
    survivors
}

fn assert_usage_error(output: &std::process::Output, mentions: &str) {
    let stderr = stderr_of(output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("fly: error: "), "{stderr}");
    assert!(stderr.contains(mentions), "{stderr}");
}

#[test]
fn bad_usage_exits_2_with_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let serve = |extra: &[&str], token: bool| {
        let mut command = fly();
        command
            .args([
                "serve-webhook",
                "--bind",
                "127.0.0.1",
                "--port",
                "0",
                "--state",
            ])
            .arg(&state)
            .args(extra)
            .env("FLY_BASE_URL", "http://127.0.0.1:9");
        if token {
            command.env("FLY_BOT_TOKEN", TOKEN);
        }
        command.timeout(Duration::from_secs(10)).output().unwrap()
    };
    for path in ["nopath", "/héllo", "/webhook?x=1", "/a b", "/a#b"] {
        assert_usage_error(&serve(&["--path", path], true), "--path");
    }
    assert_usage_error(&serve(&[], false), "token");
    assert_usage_error(&serve(&["--header-timeout", "0"], true), "--header-timeout");
    assert_usage_error(
        &serve(&["--max-connections", "0"], true),
        "--max-connections",
    );
}

// ---------------------------------------------------------------------------
// TLS

/// `serve-webhook` started with `cert` and `key`, run to its end (an error,
/// in the tests that use it).
fn serve_with_tls(state: &Path, cert: &Path, key: &Path) -> std::process::Output {
    fly()
        .args([
            "serve-webhook",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--state",
        ])
        .arg(state)
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .env("FLY_BASE_URL", "http://127.0.0.1:9")
        .env("FLY_BOT_TOKEN", TOKEN)
        .timeout(Duration::from_secs(10))
        .output()
        .unwrap()
}

#[test]
fn tls_serves_https_with_the_given_certificate() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, cert_pem) = write_certificate(dir.path());
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &[
            "--secret",
            SECRET,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(
        server.url.starts_with("https://127.0.0.1:") && server.url.ends_with("/webhook"),
        "{}",
        server.url
    );

    let trusted = ureq::tls::Certificate::from_pem(cert_pem.as_bytes()).unwrap();
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![trusted])))
        .build();
    let https = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .proxy(None)
        .tls_config(tls)
        .build()
        .new_agent();
    assert_eq!(
        read(https.get(&format!("{}/healthz", server.origin)).call()),
        answer(200, "ok")
    );
    let signed = sign_update(
        &text_update(1001, ("private", "u_1"), "over tls"),
        SECRET,
        &[],
    );
    assert_eq!(post_with(&https, &server.url, &signed), answer(200, "OK"));
    assert_eq!(
        post_with(&https, &server.url, &signed),
        answer(200, "DUPLICATE")
    );
    assert_eq!(
        emulator.sent(),
        [echo(1001, "over tls", ("to_user_id", "u_1"))]
    );

    // A client that does not trust the certificate gets no answer.
    assert!(
        agent()
            .get(&format!("{}/healthz", server.origin))
            .call()
            .is_err()
    );
    // Plain HTTP to the TLS port does not get through.
    let plain = format!("http://{}/healthz", server.addr);
    match agent().get(&plain).call() {
        Err(_) => {}
        Ok(response) => panic!("plain HTTP was answered {}", response.status()),
    }
    // The server carries on.
    assert_eq!(
        read(https.get(&format!("{}/healthz", server.origin)).call()),
        answer(200, "ok")
    );
}

#[test]
fn bad_tls_files_exit_2_with_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_certificate(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (_, other_key, _) = write_certificate(other.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let state = dir.path().join("s.db");
    let serve = |cert: &Path, key: &Path| serve_with_tls(&state, cert, key);
    assert_usage_error(&serve(&missing, &key), "--tls-cert");
    assert_usage_error(&serve(&cert, &missing), "--tls-key");
    assert_usage_error(&serve(&garbage, &key), "--tls-cert");
    assert_usage_error(&serve(&cert, &garbage), "--tls-key");
    assert_usage_error(&serve(&cert, &other_key), "--tls-cert/--tls-key");
    assert!(!state.exists(), "a failed start leaves no state file");
    // --tls-cert alone is a usage error too.
    let alone = fly()
        .args(["serve-webhook", "--port", "0", "--tls-cert"])
        .arg(&cert)
        .env("FLY_BOT_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_usage_error(&alone, "--tls-key");
}

/// Material that cannot serve is named at start, with what is wrong with it:
/// no server that fails every handshake, no read that never ends.
#[test]
fn broken_tls_material_is_refused_at_start_saying_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, cert_pem) = write_certificate(dir.path());
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let broken_der = write(
        "broken-der.pem",
        &format!("{cert_pem}-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n"),
    );
    let broken_base64 = write(
        "broken-base64.pem",
        &format!("{cert_pem}-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
    );
    let unterminated = write(
        "unterminated.pem",
        &format!("{cert_pem}-----BEGIN CERTIFICATE-----\nAAAA\n"),
    );
    let encrypted = write(
        "encrypted.pem",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
    );
    let fifo = dir.path().join("fifo.pem");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let state = dir.path().join("s.db");
    let serve = |cert: &Path, key: &Path| serve_with_tls(&state, cert, key);
    assert_usage_error(&serve(&broken_der, &key), "certificate 2 is broken");
    assert_usage_error(
        &serve(&broken_base64, &key),
        "certificate 2 is not valid PEM",
    );
    assert_usage_error(
        &serve(&unterminated, &key),
        "certificate 2 is not valid PEM",
    );
    assert_usage_error(&serve(&cert, &encrypted), "is encrypted");
    assert_usage_error(
        &serve(&cert, &cert),
        "holds a certificate, not a private key",
    );
    assert_usage_error(
        &serve(&fifo, &key),
        "is a FIFO (named pipe), not a regular file",
    );
    assert_usage_error(
        &serve(&cert, &fifo),
        "is a FIFO (named pipe), not a regular file",
    );
    let zero = Path::new("/dev/zero");
    let urandom = Path::new("/dev/urandom");
    assert_usage_error(&serve(zero, &key), "--tls-cert /dev/zero is a device");
    assert_usage_error(&serve(&cert, urandom), "--tls-key /dev/urandom is a device");
    assert!(!state.exists(), "a failed start leaves no state file");
}

// ---------------------------------------------------------------------------
// Updates as the platform's Python reads them

/// A text message update whose `data` also holds `extra` (JSON text).
fn odd_update(update_id: i64, content: &str, extra: &str) -> String {
    format!(
        r#"{{"update_id":{update_id},"type":"message","message":{{"chat":{{"type":"private","id":"u_odd"}},"msgType":"text","data":{{"content":"{content}","extra":{extra}}}}}}}"#
    )
}

#[test]
fn odd_deliveries_that_verify_are_answered_never_refused() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let odd = [
        (301, "deep", deep.as_str()),
        (302, "nan", "NaN"),
        (303, "neginf", "-Infinity"),
        (304, "huge", "1e400"),
        (305, "bigint", "123456789012345678901234567890"),
    ];
    for (update_id, name, extra) in odd {
        let signed = sign_update(&odd_update(update_id, name, extra), SECRET, &[]);
        let verified = fly()
            .args(["verify-sig", "--secret", SECRET])
            .write_stdin(signed.clone())
            .output()
            .unwrap();
        assert!(
            verified.status.success(),
            "{name}: {}",
            stderr_of(&verified)
        );
        assert_eq!(post(&server.url, &signed), answer(200, "OK"), "{name}");
        let echo =
            format!(r#""data":{{"content":"echo: {name}"}},"client_msg_id":"echo_{update_id}""#);
        assert!(
            emulator.sent_text().contains(&echo),
            "{name}: {}",
            server.log()
        );
    }
}

#[test]
fn emulator_deliveries_of_odd_raw_updates_are_signed_and_answered() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&emulator.base_url, dir.path(), &["--secret", SECRET]);
    emulator.post(
        "/_emulator/webhook",
        json!({"url": server.url, "secret": SECRET}),
    );
    let odd = r#"{"type":"message","message":{"chat":{"type":"private","id":"u_1"},"msgType":"text","data":{"content":"nan","x":NaN,"n":1E2}}}"#;
    let update_id = emulator.raw_update(odd);
    wait_until(Duration::from_secs(15), "the delivery", || {
        emulator.get("/_emulator/webhook")["pending"] == 0
    });
    assert_eq!(
        emulator.get("/_emulator/webhook")["delivered"],
        json!([{"update_id": update_id, "status": 200, "attempts": 1}]),
        "{}",
        server.log()
    );
    assert_eq!(
        emulator.sent(),
        [echo(update_id, "nan", ("to_user_id", "u_1"))]
    );
}

#[test]
fn exec_stdin_is_the_delivery_body_byte_for_byte() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let stdin_dir = dir.path().join("stdin");
    std::fs::create_dir(&stdin_dir).unwrap();
    let handler = format!("cat > '{}'/\"$FLY_UPDATE_ID\"", stdin_dir.display());
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret", SECRET, "--exec", &handler],
    );
    let signed = sign_update(
        &odd_update(401, r"a\/b \u00e9", "[18446744073709551617, 1E2, -0.0]"),
        SECRET,
        &[],
    );
    // Whitespace between tokens is not signed: the body keeps its own.
    let body = format!("{{\n  {}\n", &signed[1..]);
    assert_eq!(
        post(&server.url, &body),
        answer(200, "OK"),
        "{}",
        server.log()
    );
    let received = std::fs::read(stdin_dir.join("401")).unwrap();
    assert_eq!(String::from_utf8(received).unwrap(), body);
}

#[test]
fn handled_ids_past_the_retention_are_pruned_so_the_state_file_stays_bounded() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret", SECRET, "--retention", "3s"],
    );
    let handled = || -> i64 {
        let connection = rusqlite::Connection::open(dir.path().join("s.db")).unwrap();
        connection
            .query_row("SELECT count(*) FROM handled_updates", [], |row| row.get(0))
            .unwrap_or(-1)
    };
    for update_id in 1001..1021 {
        let signed = sign_update(
            &text_update(update_id, ("private", "u_1"), "keep me briefly"),
            SECRET,
            &[],
        );
        assert_eq!(
            post(&server.url, &signed),
            answer(200, "OK"),
            "{}",
            server.log()
        );
    }
    wait_until(
        Duration::from_secs(15),
        "the handled ids to be written",
        || handled() > 0,
    );
    wait_until(
        Duration::from_secs(15),
        "the handled ids to be pruned",
        || handled() == 0,
    );
}
