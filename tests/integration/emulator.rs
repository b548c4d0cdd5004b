//! `fly emulator` over raw HTTP: the bot API as SPEC section 1 describes it,
//! the control API, fault injection, webhook mode, and the platform's own
//! example bots from `shared/reference/` running against it unchanged.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::common::{Emulator, TOKEN, fly, signal, wait_for_a_request_in_flight, wait_until};

const BOT_UPDATES: &str = "/api/v1/s/bot/updates";
const BOT_SEND: &str = "/api/v1/s/bot/send";
const BOT_BATCH_ACCESS: &str = "/api/v1/s/bot/files/batch_access";

/// A raw answer: status, headers, body.
struct Answer {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(90)))
        .build()
        .new_agent()
}

fn read_answer(response: ureq::http::Response<ureq::Body>) -> Answer {
    let (parts, mut body) = response.into_parts();
    let body = body
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_vec()
        .expect("read body");
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// A bot API call with `Authorization: Bearer <token>` (none if `token` is `None`).
fn bot_call(emulator: &Emulator, path: &str, token: Option<&str>, body: &Value) -> Answer {
    let mut request = agent().post(&format!("{}{path}", emulator.base_url));
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    read_answer(request.send_json(body).expect("bot API call"))
}

/// A successful bot API call's `data`.
fn bot_data(emulator: &Emulator, path: &str, body: &Value) -> Value {
    let answer = bot_call(emulator, path, Some(TOKEN), body);
    let envelope = answer.json();
    assert_eq!(answer.status, 200, "{path}: {envelope}");
    assert_eq!(envelope["code"], 0, "{envelope}");
    assert_eq!(envelope["msg"], "ok");
    envelope["data"].clone()
}

fn poll(emulator: &Emulator, body: Value) -> Vec<Value> {
    match bot_data(emulator, BOT_UPDATES, &body)["updates"].take() {
        Value::Array(updates) => updates,
        other => panic!("updates is not a list: {other}"),
    }
}

fn update_ids(updates: &[Value]) -> Vec<i64> {
    updates
        .iter()
        .map(|update| update["update_id"].as_i64().expect("update_id"))
        .collect()
}

fn get(url: &str, range: Option<&str>) -> Answer {
    let mut request = agent().get(url);
    if let Some(range) = range {
        request = request.header("Range", range);
    }
    read_answer(request.call().expect("GET"))
}

/// The access URL batch_access grants for a registered media URL.
fn access_url(emulator: &Emulator, url: &str, expire_seconds: u64) -> String {
    let data = bot_data(
        emulator,
        BOT_BATCH_ACCESS,
        &json!({"files": [{"url": url}], "expire_seconds": expire_seconds}),
    );
    data["files"][url]
        .as_str()
        .unwrap_or_else(|| panic!("no access URL for {url}: {data}"))
        .to_string()
}

/// Byte `i` of a file registered by size (documented in src/emulator/media.rs).
fn pattern_byte(index: u64) -> u8 {
    (index % 251) as u8
}

fn send_body(client_msg_id: &str, to: &str) -> Value {
    json!({"msg_type": "text", "data": {"content": "hello"}, "client_msg_id": client_msg_id, "to_user_id": to})
}

#[test]
fn long_poll_returns_as_soon_as_a_message_arrives() {
    let emulator = Arc::new(Emulator::start());
    let poller = {
        let emulator = Arc::clone(&emulator);
        thread::spawn(move || {
            let started = Instant::now();
            let updates = poll(&emulator, json!({"offset": 0, "limit": 50, "timeout": 120}));
            (updates, started.elapsed())
        })
    };
    wait_for_a_request_in_flight(std::process::id(), emulator.port(), "the long poll");
    let update_id = emulator.user_says("private", "u_1", "hi");
    let (updates, elapsed) = poller.join().unwrap();
    // Not woken, it would have waited out its 120 s.
    assert!(
        elapsed < Duration::from_secs(60),
        "long poll took {elapsed:?}"
    );
    assert_eq!(update_ids(&updates), [update_id]);
    assert_eq!(
        updates[0],
        json!({"update_id": update_id, "type": "message", "message": {
            "chat": {"type": "private", "id": "u_1"}, "msgType": "text", "data": {"content": "hi"}}})
    );
}

#[test]
fn idle_long_poll_honours_its_timeout() {
    let emulator = Emulator::start();
    let started = Instant::now();
    let updates = poll(&emulator, json!({"timeout": 1}));
    let elapsed = started.elapsed();
    assert!(updates.is_empty());
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(20),
        "timeout 1 took {elapsed:?}"
    );
}

#[test]
fn offset_confirms_earlier_updates_and_limit_caps_the_batch() {
    let emulator = Emulator::start();
    let ids: Vec<i64> = ["a", "b", "c", "d"]
        .into_iter()
        .map(|text| emulator.user_says("group", "g_1", text))
        .collect();
    let first = ids[0];
    assert_eq!(ids, [first, first + 1, first + 2, first + 3]);
    assert_eq!(
        update_ids(&poll(&emulator, json!({"limit": 2}))),
        [first, first + 1]
    );
    // Nothing is confirmed until a later offset says so.
    assert_eq!(update_ids(&poll(&emulator, json!({}))), ids);
    assert_eq!(
        update_ids(&poll(&emulator, json!({"offset": first + 2}))),
        [first + 2, first + 3]
    );
    assert_eq!(
        update_ids(&poll(&emulator, json!({"offset": 0}))),
        [first + 2, first + 3]
    );
    assert!(poll(&emulator, json!({"offset": first + 4})).is_empty());

    for (body, field) in [
        (json!({"limit": 0}), "limit"),
        (json!({"limit": 101}), "limit"),
        (json!({"offset": "x"}), "offset"),
        (json!({"timeout": -1}), "timeout"),
    ] {
        let answer = bot_call(&emulator, BOT_UPDATES, Some(TOKEN), &body);
        assert_eq!(answer.status, 400, "{body}");
        assert!(answer.json()["msg"].as_str().unwrap().contains(field));
    }
}

#[test]
fn raw_updates_are_numbered_and_delivered() {
    let emulator = Emulator::start();
    let answer = emulator.post(
        "/_emulator/updates",
        json!({"type": "callback_query", "callback_query": {"data": "yes"}}),
    );
    let update_id = answer["update_id"].as_i64().expect("update_id");
    assert_eq!(answer, json!({"update_id": update_id}));
    let updates = poll(&emulator, json!({}));
    assert_eq!(
        updates,
        [
            json!({"update_id": update_id, "type": "callback_query", "callback_query": {"data": "yes"}})
        ]
    );
}

#[test]
fn strict_emulator_refuses_missing_and_wrong_tokens() {
    let emulator = Emulator::start_strict();
    for token in [None, Some("wrong-token"), Some("")] {
        let answer = bot_call(&emulator, BOT_SEND, token, &send_body("c1", "u_1"));
        assert_eq!(answer.status, 401, "token {token:?}");
        assert_eq!(
            answer.json(),
            json!({"code": 40100, "msg": "invalid token"})
        );
    }
    assert!(emulator.sent().is_empty());
    bot_data(&emulator, BOT_SEND, &send_body("c1", "u_1"));
    assert_eq!(emulator.sent().len(), 1);
}

#[test]
fn any_non_empty_token_is_accepted_without_token_flag() {
    let emulator = Emulator::start();
    let answer = bot_call(&emulator, BOT_UPDATES, Some("anything"), &json!({}));
    assert_eq!(answer.status, 200);
    let answer = bot_call(&emulator, BOT_UPDATES, None, &json!({}));
    assert_eq!(answer.status, 401);
}

#[test]
fn http_errors_use_the_envelope() {
    let emulator = Emulator::start();
    let unknown = get(&format!("{}/api/v1/s/bot/nothing", emulator.base_url), None);
    assert_eq!(
        (unknown.status, unknown.json()["code"].clone()),
        (404, json!(40400))
    );
    let wrong_method = get(&format!("{}{BOT_UPDATES}", emulator.base_url), None);
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.json()["code"], 40500);
    assert_eq!(wrong_method.header("allow"), Some("POST"));
    let malformed = read_answer(
        agent()
            .post(&format!("{}{BOT_SEND}", emulator.base_url))
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .send("{not json")
            .unwrap(),
    );
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["code"], 40000);
    let bad_control = read_answer(
        agent()
            .post(&format!("{}/_emulator/messages", emulator.base_url))
            .send_json(json!({"msgType": "text"}))
            .unwrap(),
    );
    assert_eq!(bad_control.status, 400);
    assert!(bad_control.json()["msg"].as_str().unwrap().contains("chat"));
}

#[test]
fn send_validates_its_body_and_names_the_field() {
    let emulator = Emulator::start();
    let cases = [
        (json!({"data": {}, "to_user_id": "u"}), "msg_type"),
        (json!({"msg_type": "text", "to_user_id": "u"}), "data"),
        (json!({"msg_type": "text", "data": {}}), "to_user_id"),
        (
            json!({"msg_type": "text", "data": {}, "to_user_id": "u", "group_id": "g"}),
            "group_id",
        ),
        (
            json!({"msg_type": "text", "data": {}, "to_user_id": "u", "client_msg_id": 7}),
            "client_msg_id",
        ),
    ];
    for (body, field) in cases {
        let answer = bot_call(&emulator, BOT_SEND, Some(TOKEN), &body);
        assert_eq!(answer.status, 400, "{body}");
        let envelope = answer.json();
        assert_eq!(envelope["code"], 40001);
        assert!(
            envelope["msg"].as_str().unwrap().contains(field),
            "{envelope}"
        );
    }
    assert!(emulator.sent().is_empty());
}

#[test]
fn a_repeated_client_msg_id_is_recorded_once() {
    let emulator = Emulator::start();
    let first = bot_data(&emulator, BOT_SEND, &send_body("echo_1", "u_1"));
    assert_eq!(
        first,
        json!({"message_id": "m_1", "msg_type": "text", "client_msg_id": "echo_1", "to_user_id": "u_1"})
    );
    let retry = bot_data(&emulator, BOT_SEND, &send_body("echo_1", "u_1"));
    assert_eq!(retry, first);
    let group = json!({"msg_type": "text", "data": {"content": "hey"}, "client_msg_id": "echo_2", "group_id": "g_9"});
    let second = bot_data(&emulator, BOT_SEND, &group);
    assert_eq!(second["message_id"], "m_2");
    assert_eq!(second["group_id"], "g_9");
    assert_eq!(emulator.sent(), [send_body("echo_1", "u_1"), group]);
}

#[test]
fn batch_access_leaves_unknown_urls_out() {
    let emulator = Emulator::start();
    emulator.post(
        "/_emulator/media",
        json!({"url": "fly://known", "size": 10}),
    );
    let data = bot_data(
        &emulator,
        BOT_BATCH_ACCESS,
        &json!({"files": [{"url": "fly://known"}, {"url": "fly://unknown"}], "expire_seconds": 600}),
    );
    let files = data["files"].as_object().unwrap();
    assert_eq!(files.len(), 1, "{data}");
    let access = files["fly://known"].as_str().unwrap();
    assert!(access.starts_with(&format!("{}/_emulator/files/", emulator.base_url)));
}

#[test]
fn downloads_are_byte_exact_with_content_length() {
    let emulator = Emulator::start();
    let stored: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 256) as u8).collect();
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &stored);
    emulator.post(
        "/_emulator/media",
        json!({"url": "fly://stored", "content_base64": encoded}),
    );
    let size = 300_001u64;
    emulator.post(
        "/_emulator/media",
        json!({"url": "fly://sized", "size": size}),
    );

    let download = get(&access_url(&emulator, "fly://stored", 600), None);
    assert_eq!(download.status, 200);
    assert_eq!(
        download.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(download.header("content-length"), Some("100000"));
    assert_eq!(download.body, stored);

    let sized_url = access_url(&emulator, "fly://sized", 600);
    // HEAD: the same headers, no body.
    let head = read_answer(agent().head(&sized_url).call().expect("HEAD"));
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("300001"));
    assert!(head.body.is_empty());

    let download = get(&sized_url, None);
    assert_eq!(download.status, 200);
    assert_eq!(download.header("content-length"), Some("300001"));
    assert_eq!(download.body.len() as u64, size);
    assert!(
        download
            .body
            .iter()
            .enumerate()
            .all(|(i, byte)| *byte == pattern_byte(i as u64))
    );
}

#[test]
fn range_requests_resume_a_download() {
    let emulator = Emulator::start();
    emulator.post(
        "/_emulator/media",
        json!({"url": "fly://big", "size": 200_000}),
    );
    let url = access_url(&emulator, "fly://big", 600);
    let part = get(&url, Some("bytes=150000-"));
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-length"), Some("50000"));
    assert_eq!(
        part.header("content-range"),
        Some("bytes 150000-199999/200000")
    );
    assert!(
        part.body
            .iter()
            .enumerate()
            .all(|(i, byte)| *byte == pattern_byte(150_000 + i as u64))
    );
    let past_end = get(&url, Some("bytes=200000-"));
    assert_eq!(past_end.status, 416);
    assert_eq!(past_end.header("content-range"), Some("bytes */200000"));
}

#[test]
fn access_urls_expire_and_unknown_ones_are_404() {
    let emulator = Emulator::start();
    emulator.post(
        "/_emulator/media",
        json!({"url": "fly://brief", "content_base64": "aGk="}),
    );
    let url = access_url(&emulator, "fly://brief", 1);
    assert_eq!(get(&url, None).body, b"hi");
    wait_until(Duration::from_secs(10), "the access URL to expire", || {
        get(&url, None).status == 403
    });
    let unknown = format!("{}/_emulator/files/0123456789abcdef", emulator.base_url);
    assert_eq!(get(&unknown, None).status, 404);
}

#[test]
fn error_rate_answers_500_or_429_with_retry_after_and_processes_nothing() {
    let emulator = Emulator::start();
    emulator.faults(json!({"error_rate": 1.0, "retry_after": 3}));
    assert_eq!(
        emulator.get("/_emulator/faults"),
        json!({"error_rate": 1.0, "drop_rate": 0.0, "latency_ms": 0, "retry_after": 3, "download_cut_rate": 0.0})
    );
    let mut statuses = Vec::new();
    for index in 0..16 {
        let answer = bot_call(
            &emulator,
            BOT_SEND,
            Some(TOKEN),
            &send_body(&format!("c{index}"), "u"),
        );
        assert_eq!(answer.header("retry-after"), Some("3"));
        assert_eq!(answer.json()["code"], u64::from(answer.status) * 100);
        statuses.push(answer.status);
    }
    assert!(statuses.iter().all(|status| [500, 429].contains(status)));
    assert!(
        statuses.contains(&500) && statuses.contains(&429),
        "{statuses:?}"
    );
    assert!(emulator.sent().is_empty());
    // The control API is never faulty.
    emulator.user_says("private", "u_1", "still works");
}

#[test]
fn drop_rate_processes_the_request_but_sends_no_answer() {
    let emulator = Emulator::start();
    emulator.faults(json!({"drop_rate": 1.0}));
    let body = send_body("lost_1", "u_1").to_string();
    let address: SocketAddr = emulator
        .base_url
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    // A raw socket shows what a client library would hide: not one byte comes back.
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {BOT_SEND} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    assert!(
        received.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(emulator.sent(), [send_body("lost_1", "u_1")]);

    let retry = agent()
        .post(&format!("{}{BOT_SEND}", emulator.base_url))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(send_body("lost_1", "u_1"));
    assert!(retry.is_err());
    emulator.faults(json!({}));
    // The client's retry with the same client_msg_id is harmless.
    bot_data(&emulator, BOT_SEND, &send_body("lost_1", "u_1"));
    assert_eq!(emulator.sent().len(), 1);
}

#[test]
fn download_cut_rate_closes_after_half_the_announced_body() {
    let emulator = Emulator::start();
    emulator.post(
        "/_emulator/media",
        json!({"url": "fly://cut", "size": 1_000_000}),
    );
    let url = access_url(&emulator, "fly://cut", 600);
    emulator.faults(json!({"download_cut_rate": 1.0}));
    let mut response = agent().get(&url).call().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("content-length").unwrap(), "1000000");
    let mut received = 0u64;
    let mut reader = response.body_mut().as_reader();
    let mut buffer = vec![0u8; 64 * 1024];
    let outcome = loop {
        match reader.read(&mut buffer) {
            Ok(0) => break Ok(()),
            Ok(n) => received += n as u64,
            Err(error) => break Err(error),
        }
    };
    assert!(
        outcome.is_err(),
        "a cut download must fail, not end cleanly"
    );
    assert!(received <= 500_000, "received {received} bytes");
}

#[test]
fn latency_delays_bot_api_answers() {
    let emulator = Emulator::start();
    emulator.faults(json!({"latency_ms": 300}));
    let started = Instant::now();
    poll(&emulator, json!({}));
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[test]
fn a_one_gib_download_streams_in_flat_memory() {
    let emulator = Emulator::start();
    let size: u64 = 1 << 30;
    emulator.post(
        "/_emulator/media",
        json!({"url": "fly://huge", "size": size}),
    );
    let url = access_url(&emulator, "fly://huge", 600);

    let pid = emulator.pid();
    let peak = Arc::new(Mutex::new(0u64));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(rss) = resident_kib(pid) {
                    let mut peak = peak.lock().unwrap();
                    *peak = (*peak).max(rss);
                }
                // The sampling interval.
                thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let mut response = agent().get(&url).call().unwrap();
    assert_eq!(
        response.headers().get("content-length").unwrap(),
        &size.to_string()
    );
    let mut reader = response.body_mut().as_reader();
    let mut first = [0u8; 1000];
    reader.read_exact(&mut first).unwrap();
    assert!(
        first
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(i as u64))
    );
    let rest = std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().unwrap();
    assert_eq!(rest + 1000, size);

    let Some(after) = resident_kib(pid) else {
        eprintln!("skipping the memory check: no /proc/{pid}/status on this system");
        return;
    };
    let peak = (*peak.lock().unwrap()).max(after);
    eprintln!("emulator peak RSS while streaming 1 GiB: {peak} KiB");
    assert!(
        peak < 64 * 1024,
        "emulator peak RSS {peak} KiB while streaming 1 GiB"
    );
}

/// VmRSS of a process in KiB, from /proc (Linux).
fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn sigterm_stops_the_emulator_with_exit_0() {
    let mut emulator = Emulator::start();
    signal(emulator.pid(), libc::SIGTERM);
    let status = emulator
        .wait_for_exit(Duration::from_secs(10))
        .expect("the emulator stops on SIGTERM");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_busy_port_fails_with_one_clear_line() {
    let emulator = Emulator::start();
    let port = emulator.base_url.rsplit(':').next().unwrap();
    let output = fly().args(["emulator", "--port", port]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        format!("fly: error: cannot listen on 127.0.0.1:{port}: Address already in use")
    );
    assert!(output.stdout.is_empty());
}

// ---------------------------------------------------------------------------
// Webhook mode

/// A webhook receiver for tests (hyper): answers 500 to the first `failures`
/// deliveries, then 200, and keeps every body it was sent.
struct WebhookReceiver {
    url: String,
    received: Arc<Mutex<Vec<Value>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl WebhookReceiver {
    fn start(failures: usize) -> WebhookReceiver {
        use http_body_util::{BodyExt, Full};
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/webhook", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let store = Arc::clone(&received);
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let stream = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => accepted.unwrap().0,
                    };
                    let store = Arc::clone(&store);
                    tokio::spawn(async move {
                        let service =
                            service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                                let store = Arc::clone(&store);
                                async move {
                                    let bytes = request.into_body().collect().await?.to_bytes();
                                    let body: Value =
                                        serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                                    let mut store = store.lock().unwrap();
                                    store.push(body);
                                    let status = if store.len() <= failures { 500 } else { 200 };
                                    let mut response =
                                        hyper::Response::new(Full::new(bytes::Bytes::from("ok")));
                                    *response.status_mut() =
                                        hyper::StatusCode::from_u16(status).unwrap();
                                    Ok::<_, hyper::Error>(response)
                                }
                            });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        WebhookReceiver {
            url,
            received,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Signature v1 recomputed independently of `fly` (payloads here are
/// ASCII-only and float-free, where serde_json's sorted compact form is
/// Python's canonical JSON).
fn signature_v1(signed: &Value, secret: &str) -> String {
    use hmac::{KeyInit, Mac};
    use sha2::Digest;
    let payload = signed
        .get("message")
        .filter(|m| !m.is_null())
        .cloned()
        .unwrap_or(json!({}));
    let payload_sha = hex::encode(sha2::Sha256::digest(payload.to_string().as_bytes()));
    let plain = |value: &Value| match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let signing = [
        plain(&signed["update_id"]),
        plain(&signed["type"]),
        plain(&signed["bot"]["id"]),
        plain(&signed["timestamp"]),
        plain(&signed["nonce"]),
        payload_sha,
    ]
    .join("\n");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signing.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[test]
fn webhook_mode_delivers_signed_updates_in_order_retrying_until_2xx() {
    let emulator = Emulator::start();
    let receiver = WebhookReceiver::start(2);
    emulator.post(
        "/_emulator/webhook",
        json!({"url": receiver.url, "secret": "hook-secret", "bot_id": "bot_42"}),
    );
    let first = emulator.user_says("private", "u_1", "one");
    let second = emulator.user_says("group", "g_1", "two");
    wait_until(Duration::from_secs(15), "both deliveries", || {
        emulator.get("/_emulator/webhook")["delivered"]
            .as_array()
            .is_some_and(|delivered| delivered.len() == 2)
    });
    let report = emulator.get("/_emulator/webhook");
    assert_eq!(report["url"], receiver.url.as_str());
    assert_eq!(report["pending"], 0);
    assert_eq!(
        report["delivered"],
        json!([
            {"update_id": first, "status": 200, "attempts": 3},
            {"update_id": second, "status": 200, "attempts": 1},
        ])
    );
    assert!(report.get("secret").is_none());

    let received = receiver.received();
    assert_eq!(received.len(), 4);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for signed in &received {
        assert_eq!(signed["bot"]["id"], "bot_42");
        assert!((signed["timestamp"].as_i64().unwrap() - now).abs() < 60);
        assert_eq!(
            signed["signature"],
            signature_v1(signed, "hook-secret").as_str()
        );
    }
    // Redeliveries of one update keep its nonce; another update gets its own.
    let ids: Vec<i64> = received
        .iter()
        .map(|s| s["update_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [first, first, first, second]);
    assert_eq!(received[0]["nonce"], received[2]["nonce"]);
    assert_ne!(received[2]["nonce"], received[3]["nonce"]);
    assert_eq!(received[3]["message"]["data"]["content"], "two");
    emulator.post("/_emulator/webhook", json!({"url": null}));
    // Delivered updates were not also queued for polling.
    let third = emulator.user_says("private", "u_1", "three");
    assert_eq!(update_ids(&poll(&emulator, json!({}))), [third]);
}

#[test]
fn webhook_secret_defaults_to_the_token_hash_and_is_required_without_one() {
    let anonymous = Emulator::start();
    let answer = read_answer(
        agent()
            .post(&format!("{}/_emulator/webhook", anonymous.base_url))
            .send_json(json!({"url": "http://127.0.0.1:9/webhook"}))
            .unwrap(),
    );
    assert_eq!(answer.status, 400);
    assert!(answer.json()["msg"].as_str().unwrap().contains("secret"));

    let emulator = Emulator::start_strict();
    let receiver = WebhookReceiver::start(0);
    emulator.post("/_emulator/webhook", json!({"url": receiver.url}));
    emulator.user_says("private", "u_1", "hi");
    wait_until(Duration::from_secs(10), "the delivery", || {
        !receiver.received().is_empty()
    });
    let signed = &receiver.received()[0];
    let default_secret = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(TOKEN.as_bytes()));
    assert_eq!(signed["bot"]["id"], "bot_emulator");
    assert_eq!(
        signed["signature"],
        signature_v1(signed, &default_secret).as_str()
    );
}

#[test]
fn turning_webhook_off_hands_undelivered_updates_to_polling() {
    let emulator = Emulator::start();
    // Nothing listens there: every attempt fails.
    let nothing_listens = crate::common::RefusedPort::new();
    emulator.post(
        "/_emulator/webhook",
        json!({"url": format!("{}/webhook", nothing_listens.url()), "secret": "s"}),
    );
    let update_id = emulator.user_says("private", "u_1", "anyone?");
    assert_eq!(emulator.get("/_emulator/webhook")["pending"], 1);
    emulator.post("/_emulator/webhook", json!({"url": null}));
    assert_eq!(update_ids(&poll(&emulator, json!({}))), [update_id]);
    let report = emulator.get("/_emulator/webhook");
    assert_eq!(
        (report["pending"].clone(), report["url"].clone()),
        (json!(0), Value::Null)
    );
}

/// poll-echo's offset outlives an emulator run (it is in the state file):
/// the next run numbers its updates above the last run's, so the saved
/// offset does not hide them.
#[test]
fn a_restarted_emulator_numbers_updates_above_the_last_runs_offset() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("bot.db");
    let poll_echo_once = |emulator: &Emulator| {
        let output = crate::common::fly_at(emulator)
            .args(["poll-echo", "--once", "--state"])
            .arg(&state)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            crate::common::stderr_of(&output)
        );
    };

    let mut first_run = Emulator::start();
    // The second run listens where the first did, read back from it.
    let port = first_run.port();
    let before = first_run.user_says("private", "u_1", "before the restart");
    poll_echo_once(&first_run);
    assert_eq!(
        first_run.sent(),
        [crate::common::echo(
            before,
            "before the restart",
            ("to_user_id", "u_1")
        )]
    );
    first_run.stop();

    let second_run = Emulator::start_on_port(port);
    let after = second_run.user_says("private", "u_1", "after the restart");
    poll_echo_once(&second_run);
    // With ids starting at 1 again, the saved offset hid this message.
    assert_eq!(
        second_run.sent(),
        [crate::common::echo(
            after,
            "after the restart",
            ("to_user_id", "u_1")
        )]
    );
    assert!(after > before, "{after} after {before}");
}

/// As real bot platforms do, the emulator refuses polling while a webhook
/// is set (409, code 40901) instead of starving the poller in silence.
#[test]
fn polling_while_a_webhook_is_set_answers_an_error_saying_so() {
    let emulator = Arc::new(Emulator::start());
    // A long poll already waiting is answered with the refusal too.
    let waiting = {
        let emulator = Arc::clone(&emulator);
        thread::spawn(move || {
            bot_call(
                &emulator,
                BOT_UPDATES,
                Some(TOKEN),
                &json!({"timeout": 120}),
            )
        })
    };
    wait_for_a_request_in_flight(std::process::id(), emulator.port(), "the long poll");
    let started = Instant::now();
    emulator.post(
        "/_emulator/webhook",
        json!({"url": "http://127.0.0.1:9/webhook", "secret": "s"}),
    );
    let waited = waiting.join().unwrap();
    // Left waiting, it would have been answered after its 120 s.
    assert!(started.elapsed() < Duration::from_secs(60));
    for answer in [
        waited,
        bot_call(&emulator, BOT_UPDATES, Some(TOKEN), &json!({})),
    ] {
        assert_eq!(answer.status, 409);
        let envelope = answer.json();
        assert_eq!(envelope["code"], 40901, "{envelope}");
        assert!(
            envelope["msg"].as_str().unwrap().contains("webhook is set"),
            "{envelope}"
        );
    }

    let output = crate::common::fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(tempfile::tempdir().unwrap().path().join("bot.db"))
        .output()
        .unwrap();
    let stderr = crate::common::stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let error_line = stderr.lines().last().unwrap();
    assert!(
        error_line.starts_with("fly: error: ")
            && error_line.contains("HTTP 409")
            && error_line.contains("webhook is set"),
        "{stderr}"
    );

    // Off again: polling works.
    emulator.post("/_emulator/webhook", json!({"url": null}));
    assert!(poll(&emulator, json!({})).is_empty());
}

#[test]
fn emulator_say_queues_a_user_message_that_poll_echo_answers() {
    let emulator = Emulator::start();
    let say = |args: &[&str]| {
        let output = fly()
            .env("FLY_BASE_URL", &emulator.base_url)
            .args(["emulator", "say"])
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // The update id, alone on stdout, for scripts.
        stdout
            .trim_end()
            .parse::<i64>()
            .unwrap_or_else(|_| panic!("{args:?}: stdout is not an update id: {stdout:?}"))
    };
    let private = say(&["--chat", "u_7", "hello from the shell"]);
    let group = say(&["--group", "g_7", "hi all"]);
    let image = say(&["--chat", "u_7", "--image", "https://cdn.example/cat.png"]);
    assert_eq!([group, image], [private + 1, private + 2]);
    let updates = poll(&emulator, json!({}));
    assert_eq!(
        updates[2]["message"],
        json!({"chat": {"type": "private", "id": "u_7"}, "msgType": "image",
               "data": {"originalUrl": "https://cdn.example/cat.png"}})
    );

    let output = crate::common::fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(tempfile::tempdir().unwrap().path().join("bot.db"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        crate::common::stderr_of(&output)
    );
    let mut sent = emulator.sent();
    sent.sort_by_key(|request| request["client_msg_id"].as_str().unwrap().to_string());
    let mut expected = vec![
        crate::common::echo(private, "hello from the shell", ("to_user_id", "u_7")),
        crate::common::echo(group, "hi all", ("group_id", "g_7")),
        crate::common::echo(image, "", ("to_user_id", "u_7")),
    ];
    expected.sort_by_key(|request| request["client_msg_id"].as_str().unwrap().to_string());
    assert_eq!(sent, expected);
}

#[test]
fn emulator_say_without_an_emulator_or_a_chat_is_one_clear_error() {
    let nothing_listens = crate::common::RefusedPort::new();
    let port = nothing_listens.port;
    let output = fly()
        .env("FLY_BASE_URL", nothing_listens.url())
        .args(["emulator", "say", "--chat", "u_1", "hello"])
        .output()
        .unwrap();
    let stderr = crate::common::stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "fly: error: no emulator at http://127.0.0.1:{port} (connection refused)"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("or point --base-url / FLY_BASE_URL at it"),
        "{stderr}"
    );
    let output = fly().args(["emulator", "say", "hello"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
}

/// One info line per request (method, path, status, latency), never the token.
#[test]
fn the_emulator_logs_one_line_per_request_without_the_token() {
    let mut emulator = Emulator::start_strict();
    let base_url = emulator.base_url.clone();
    let call = |path: &str, token: &str| {
        agent()
            .post(&format!("{base_url}{path}"))
            .header("Authorization", &format!("Bearer {token}"))
            .send_json(json!({}))
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(call(BOT_UPDATES, TOKEN), 200);
    assert_eq!(call(BOT_UPDATES, "wrong-token-but-secret-too"), 401);
    assert_eq!(call(BOT_SEND, TOKEN), 400);
    let lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains(" request "))
            .map(str::to_string)
            .collect()
    };
    wait_until(Duration::from_secs(5), "three request lines", || {
        lines(&emulator.log()).len() >= 3
    });
    emulator.stop();
    let log = emulator.log();
    let lines = lines(&log);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for (line, (path, status)) in
        lines
            .iter()
            .zip([(BOT_UPDATES, 200), (BOT_UPDATES, 401), (BOT_SEND, 400)])
    {
        assert!(
            line.contains(" INFO ")
                && line.contains("method=POST")
                && line.contains(&format!("path={path}"))
                && line.contains(&format!("status={status}"))
                && line.contains("latency_ms="),
            "{line}"
        );
    }
    assert!(!log.contains(TOKEN) && !log.contains("wrong-token-but-secret-too"));
}
