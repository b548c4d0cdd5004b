//! `--inspect` (issue 25) without a browser: the real `fly` serve-webhook,
//! poll-echo and forward with the inspector on port 0, asked over plain
//! HTTP as its page asks. The safety rules (a foreign `Host`, a POST
//! without the page's header, the Content-Security-Policy, no secret in
//! any answer), the memory cap under 100k deliveries, what an entry's
//! detail holds, replays and their `client_msg_id`s, the filters and the
//! live event stream, and a port that is taken.
//!
//! Requests are written on a raw socket: the tests choose the `Host`
//! header themselves, which an HTTP client would not let them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{
    Emulator, Service, TOKEN, eventually, fly_child, fly_path, sign_update, stderr_of, wait_until,
};
use crate::exec::{start_forward_with, start_receiver_with};
use crate::metrics::url_in_start_line;
use crate::serve_webhook::{Server, agent, answer, post, text_update};

/// serve-webhook's secret in these tests (from FLY_WEBHOOK_SECRET): no
/// answer of the inspector may hold it.
const WEBHOOK_SECRET: &str = "whsec-inspect-9d2f41c7e05b";

/// One answer of the inspector.
#[derive(Debug)]
struct Reply {
    what: String,
    status: u16,
    /// Names lower-cased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(named, _)| named == name)
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("{}: not JSON ({error}): {self:?}", self.what))
    }

    /// 403 with `{"error": code}`.
    fn assert_refused(&self, code: &str) {
        assert_eq!(self.status, 403, "{self:?}");
        assert_eq!(self.json(), json!({ "error": code }), "{self:?}");
    }
}

/// The inspector of a running command, found by its start line
/// `inspector url=http://127.0.0.1:PORT/`.
struct Inspector {
    addr: SocketAddr,
}

impl Inspector {
    /// Waits (up to 20 s) for the start line in `log()`.
    fn of(log: impl Fn() -> String) -> Inspector {
        let mut url = None;
        wait_until(
            Duration::from_secs(20),
            "the inspector's start line",
            || {
                url = url_in_start_line(&log(), "inspector");
                url.is_some()
            },
        );
        let url = url.unwrap();
        let authority = url
            .strip_prefix("http://")
            .and_then(|rest| rest.strip_suffix('/'))
            .unwrap_or_else(|| panic!("{url:?} should be http://ADDR/"));
        let addr: SocketAddr = authority.parse().unwrap();
        assert!(addr.ip().is_loopback() && addr.port() != 0, "{url}");
        Inspector { addr }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `METHOD path` with `headers`, and `Host: 127.0.0.1:PORT` unless
    /// they name a host of their own.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("host"))
        {
            head.push_str(&format!("Host: {}\r\n", self.addr));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if method == "POST" {
            head.push_str("Content-Length: 0\r\n");
        }
        head.push_str("\r\n");
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let mut received = Vec::new();
        stream
            .read_to_end(&mut received)
            .unwrap_or_else(|error| panic!("{method} {path}: {error}"));
        parse_reply(&format!("{method} {path}"), &received)
    }

    fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[])
    }

    /// `GET path`, which must answer 200 with JSON.
    fn get_json(&self, path: &str) -> Value {
        let reply = self.get(path);
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.json()
    }

    /// `GET /api/updates{query}`: the rows, newest first.
    fn updates(&self, query: &str) -> Vec<Value> {
        match self.get_json(&format!("/api/updates{query}"))["updates"].take() {
            Value::Array(rows) => rows,
            other => panic!("/api/updates{query}: {other}"),
        }
    }

    /// The list once it holds `count` entries (the inspector takes in what
    /// happened a few tens of milliseconds after it happened).
    fn updates_once(&self, count: usize) -> Vec<Value> {
        let mut rows = Vec::new();
        wait_until(Duration::from_secs(10), &format!("{count} entries"), || {
            rows = self.updates("");
            rows.len() >= count
        });
        rows
    }

    fn detail(&self, id: u64) -> Value {
        self.get_json(&format!("/api/updates/{id}"))
    }

    /// `POST /api/updates/{id}/replay` with the page's header.
    fn post_replay(&self, id: u64) -> Reply {
        self.request(
            "POST",
            &format!("/api/updates/{id}/replay"),
            &[("X-Fly-Inspector", "1")],
        )
    }

    /// A replay that must be accepted: the new entry's id.
    fn replay(&self, id: u64) -> u64 {
        let reply = self.post_replay(id);
        assert_eq!(reply.status, 202, "{reply:?}");
        let new = reply.json()["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{reply:?}"));
        assert_ne!(new, id);
        new
    }

    /// Waits (up to 30 s) for a row that `which` accepts; returns it.
    fn wait_for(&self, what: &str, which: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        let mut last = Vec::new();
        let seen = eventually(Duration::from_secs(30), || {
            last = self.updates("");
            found = last.iter().find(|row| which(row)).cloned();
            found.is_some()
        });
        assert!(seen, "no entry {what} in {last:#?}");
        found.unwrap()
    }

    /// Waits for the entry of `update_id` (not a replay) to have ended
    /// with `outcome`; returns its row.
    fn wait_for_update(&self, update_id: i64, outcome: &str) -> Value {
        self.wait_for(&format!("of update {update_id} {outcome}"), |row| {
            row["update_id"] == update_id && row["replay_of"].is_null() && row["outcome"] == outcome
        })
    }

    /// Waits for entry `id` to have ended (a replay: its entry is there,
    /// `running`, from the moment it is asked for); returns its row.
    fn wait_for_end(&self, id: u64) -> Value {
        self.wait_for(&format!("{id} ended"), |row| {
            row["id"] == id && row["outcome"] != "running"
        })
    }
}

fn id_of(row: &Value) -> u64 {
    row["id"].as_u64().unwrap_or_else(|| panic!("no id: {row}"))
}

/// A whole HTTP/1.1 answer (the server closed after it).
fn parse_reply(what: &str, received: &[u8]) -> Reply {
    let end = find(received, b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: no whole head in {received:?}"));
    let head = String::from_utf8_lossy(&received[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no status line in {head}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_ascii_lowercase(), value.trim().to_string()))
        })
        .collect();
    let mut body = received[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Reply {
        what: what.to_string(),
        status,
        headers,
        body: String::from_utf8(body).unwrap_or_else(|error| panic!("{what}: {error}")),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A chunked body's data.
fn dechunk(mut chunked: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    while let Some(end) = find(chunked, b"\r\n") {
        let size_text = String::from_utf8_lossy(&chunked[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
        if size == 0 {
            break;
        }
        let start = end + 2;
        data.extend_from_slice(&chunked[start..start + size]);
        chunked = &chunked[start + size + 2..];
    }
    data
}

/// `GET /api/events`, read as it comes.
struct Events {
    head: Reply,
    reader: BufReader<TcpStream>,
    /// Everything read from the stream so far (chunk sizes included).
    seen: String,
}

impl Events {
    /// Opens the stream; once its head is read, the inspector has
    /// subscribed it to every change from then on.
    fn open(inspector: &Inspector) -> Events {
        let mut stream = TcpStream::connect(inspector.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let request = format!(
            "GET /api/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            inspector.addr
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            reader.read_until(b'\n', &mut line).unwrap();
            assert!(!line.is_empty(), "the event stream closed in its head");
            head.extend_from_slice(&line);
            if line == b"\r\n" {
                break;
            }
        }
        let head = parse_reply("GET /api/events", &head);
        assert_eq!(head.status, 200, "{head:?}");
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        Events {
            head,
            reader,
            seen: String::new(),
        }
    }

    /// The summary of the next `event: update`, within `within`.
    fn next_update(&mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        let mut event = None;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no `event: update` in {within:?}: {}", self.seen));
            self.reader
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut line = String::new();
            let read = self.reader.read_line(&mut line).unwrap_or_else(|error| {
                panic!("no `event: update` in {within:?} ({error}): {}", self.seen)
            });
            assert!(read > 0, "the event stream ended: {}", self.seen);
            self.seen.push_str(&line);
            let line = line.trim_end();
            if let Some(name) = line.strip_prefix("event: ") {
                event = Some(name.to_string());
            } else if let Some(data) = line.strip_prefix("data: ")
                && event.as_deref() == Some("update")
            {
                return serde_json::from_str(data)
                    .unwrap_or_else(|error| panic!("{error}: {data}"));
            }
        }
    }
}

/// `fly serve-webhook --inspect 127.0.0.1:0 EXTRA…`, its secret from
/// FLY_WEBHOOK_SECRET, its state in `dir`.
fn inspected_webhook(emulator: &Emulator, dir: &Path, extra: &[&str]) -> Server {
    let mut command = fly_child(&emulator.base_url);
    command.env("FLY_WEBHOOK_SECRET", WEBHOOK_SECRET);
    let args = [&["--inspect", "127.0.0.1:0"][..], extra].concat();
    Server::start_from(command, dir, dir.join("s.db").as_os_str(), &args)
}

/// A text message in chat `chat` (`private:u_1` style parts), signed with
/// `secret`.
fn signed(update_id: i64, chat: (&str, &str), text: &str, secret: &str) -> String {
    sign_update(&text_update(update_id, chat, text), secret, &[])
}

/// The `client_msg_id`s the emulator has accepted.
fn sent_ids(emulator: &Emulator) -> Vec<String> {
    emulator
        .sent()
        .iter()
        .map(|sent| {
            sent["client_msg_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn wait_for_sent(emulator: &Emulator, client_msg_id: &str) {
    let mut last = Vec::new();
    let seen = eventually(Duration::from_secs(30), || {
        last = sent_ids(emulator);
        last.iter().any(|id| id == client_msg_id)
    });
    assert!(seen, "{client_msg_id} never sent; sent: {last:?}");
}

// ---------------------------------------------------------------------------
// Safe by default

/// A foreign `Host` is refused (DNS rebinding), `localhost:PORT` is not;
/// a POST without the page's header is refused and changes nothing; every
/// answer carries the strict CSP; and no answer (page, script, list,
/// details, events) holds the webhook secret or the bot token, which the
/// first delivery even sends as its `Authorization`.
#[test]
fn foreign_hosts_and_headerless_posts_are_refused_and_no_answer_holds_a_secret() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = inspected_webhook(&emulator, dir.path(), &[]);
    let inspector = Inspector::of(|| server.log());
    let mut answers: Vec<Reply> = Vec::new();
    let mut events = Events::open(&inspector);

    let good = signed(101, ("private", "u_1"), "hello", WEBHOOK_SECRET);
    let mut response = agent()
        .post(&server.url)
        .header("Content-Type", "application/json")
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .header("X-Webhook-Secret", WEBHOOK_SECRET)
        .send(&good)
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.body_mut().read_to_string().unwrap(), "OK");
    let bad = signed(102, ("private", "u_2"), "forged", "not-the-secret");
    assert_eq!(post(&server.url, &bad), answer(401, "SIGNATURE_MISMATCH"));
    // (A body is shown as the sender sent it: the test sends none that
    // holds a secret, as the platform would not.)
    assert_eq!(
        post(&server.url, r#"{"update_id":"#),
        answer(400, "MALFORMED_JSON")
    );
    wait_for_sent(&emulator, "echo_101");

    // A chunk of the event stream: the deliveries' summaries.
    for _ in 0..3 {
        events.next_update(Duration::from_secs(20));
    }
    let good_row = inspector.wait_for_update(101, "replied");
    let good_id = id_of(&good_row);
    let rows = inspector.updates("");
    assert_eq!(rows.len(), 3, "{rows:#?}");

    // Everything the page loads, and every detail.
    for path in ["/", "/app.js", "/app.css", "/api/updates"] {
        let reply = inspector.get(path);
        assert_eq!(reply.status, 200, "{reply:?}");
        answers.push(reply);
    }
    assert!(answers[0].body.contains("app.js"), "{:?}", answers[0]);
    for row in &rows {
        let reply = inspector.get(&format!("/api/updates/{}", id_of(row)));
        assert_eq!(reply.status, 200, "{reply:?}");
        answers.push(reply);
    }
    let detail = inspector.detail(good_id);
    let headers = detail["headers"].as_array().unwrap();
    assert!(
        headers.contains(&json!(["authorization", "(redacted)"])),
        "{headers:?}"
    );
    assert!(
        headers.contains(&json!(["x-webhook-secret", "(redacted)"])),
        "{headers:?}"
    );

    answers.extend(assert_only_its_own_host_is_answered(&inspector, good_id));

    // A POST without the page's header: refused, and nothing happens.
    let sent_before = emulator.sent_text();
    let reply = inspector.request("POST", &format!("/api/updates/{good_id}/replay"), &[]);
    reply.assert_refused("CSRF_HEADER_MISSING");
    answers.push(reply);
    let rows = inspector.updates("");
    assert_eq!(rows.len(), 3, "a refused replay made an entry: {rows:#?}");
    assert!(
        rows.iter().all(|row| row["replay_of"].is_null()),
        "{rows:#?}"
    );
    // With the header it runs: the first replay, so the refused one never ran.
    let replayed = inspector.replay(good_id);
    wait_for_sent(&emulator, "replay_101_1");
    inspector.wait_for_end(replayed);
    let replays: Vec<String> = sent_ids(&emulator)
        .into_iter()
        .filter(|id| id.starts_with("replay_"))
        .collect();
    assert_eq!(replays, ["replay_101_1"]);
    assert_ne!(emulator.sent_text(), sent_before);
    answers.push(inspector.get(&format!("/api/updates/{replayed}")));
    answers.push(inspector.get("/api/updates/999999"));

    assert_safe_answers(&answers, &events);
}

/// A foreign `Host` is refused on the page, the API, the event stream and a
/// POST; `localhost:PORT` is the address too. Returns the answers.
fn assert_only_its_own_host_is_answered(inspector: &Inspector, good_id: u64) -> Vec<Reply> {
    let mut answers = Vec::new();
    // A foreign Host: refused on the page, the API and a POST.
    for host in [
        "evil.example:4040",
        &format!("evil.example:{}", inspector.port()),
    ] {
        for (method, path) in [
            ("GET", "/".to_string()),
            ("GET", "/api/updates".to_string()),
            ("GET", "/api/events".to_string()),
            ("POST", format!("/api/updates/{good_id}/replay")),
        ] {
            let reply =
                inspector.request(method, &path, &[("Host", host), ("X-Fly-Inspector", "1")]);
            reply.assert_refused("FOREIGN_HOST");
            answers.push(reply);
        }
    }
    // The loopback name of the same port is the address too.
    let localhost = format!("localhost:{}", inspector.port());
    let reply = inspector.request("GET", "/api/updates", &[("Host", &localhost)]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["updates"].as_array().unwrap().len(), 3);
    answers.push(reply);

    answers
}

/// Every answer (and the event stream's head) has the strict CSP; none,
/// nor the event stream, holds the webhook secret or the token.
fn assert_safe_answers(answers: &[Reply], events: &Events) {
    let answers: Vec<&Reply> = answers.iter().chain([&events.head]).collect();
    for reply in &answers {
        let csp = reply.header("content-security-policy").unwrap_or_default();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{}: {csp:?}",
            reply.what
        );
        assert_eq!(
            reply.header("x-content-type-options"),
            Some("nosniff"),
            "{}",
            reply.what
        );
    }
    // No answer holds the secret or the token.
    let mut texts: Vec<(String, String)> = answers
        .iter()
        .map(|reply| {
            (
                reply.what.clone(),
                format!("{:?}\n{}", reply.headers, reply.body),
            )
        })
        .collect();
    texts.push(("the event stream".into(), events.seen.clone()));
    for (what, text) in &texts {
        for secret in [WEBHOOK_SECRET, TOKEN] {
            assert!(!text.contains(secret), "{what} holds {secret:?}:\n{text}");
        }
    }
}

// ---------------------------------------------------------------------------
// Memory

/// A serve-webhook's peak resident memory (VmHWM, KiB) after `count`
/// deliveries of about 1.5 KB each, sent by `THREADS` clients, each with a
/// bad signature (refused at once, and each an entry of its own for the
/// inspector: the cheapest deliveries it keeps whole); then one good
/// delivery, update 77, the last.
fn peak_after_deliveries(
    emulator: &Emulator,
    dir: &Path,
    extra: &[&str],
    count: usize,
) -> (Server, u64) {
    const THREADS: usize = 4;
    std::fs::create_dir_all(dir).unwrap();
    let server = inspected_webhook_or_not(emulator, dir, extra);
    let template = signed(
        1_000_000,
        ("private", "u_load"),
        &"x".repeat(1_300),
        "not-the-secret",
    );
    assert!(
        (1_400..1_700).contains(&template.len()),
        "{}",
        template.len()
    );
    let (authority, path) = split_url(&server.url);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let template = &template;
            let authority = &authority;
            let path = &path;
            scope.spawn(move || {
                let mut client = RawClient::connect(authority);
                for n in (thread..count).step_by(THREADS) {
                    let body = template.replacen(
                        "\"update_id\":1000000,",
                        &format!("\"update_id\":{},", 1_000_000 + n),
                        1,
                    );
                    let (status, answer) = client.post(authority, path, &body);
                    assert_eq!(
                        (status, answer.as_str()),
                        (401, "SIGNATURE_MISMATCH"),
                        "delivery {n}"
                    );
                }
            });
        }
    });
    let last = signed(77, ("private", "u_last"), "the last", WEBHOOK_SECRET);
    assert_eq!(post(&server.url, &last), answer(200, "OK"));
    let peak = memory_kib(server.child.id(), "VmHWM");
    (server, peak)
}

fn inspected_webhook_or_not(emulator: &Emulator, dir: &Path, extra: &[&str]) -> Server {
    let mut command = fly_child(&emulator.base_url);
    command.env("FLY_WEBHOOK_SECRET", WEBHOOK_SECRET);
    Server::start_from(command, dir, dir.join("s.db").as_os_str(), extra)
}

/// `("127.0.0.1:PORT", "/path")` of an `http://` URL.
fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let slash = rest.find('/').unwrap_or(rest.len());
    let path = if slash == rest.len() {
        "/"
    } else {
        &rest[slash..]
    };
    (rest[..slash].to_string(), path.to_string())
}

/// A kept-alive HTTP/1.1 connection that POSTs bodies, for volume.
struct RawClient {
    reader: BufReader<TcpStream>,
}

impl RawClient {
    fn connect(authority: &str) -> RawClient {
        let stream = TcpStream::connect(authority).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient {
            reader: BufReader::new(stream),
        }
    }

    /// The status and body of one POST (again on a new connection if the
    /// server closed this one).
    fn post(&mut self, authority: &str, path: &str, body: &str) -> (u16, String) {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if let Some(answer) = self.exchange(&request) {
            return answer;
        }
        *self = RawClient::connect(authority);
        self.exchange(&request)
            .unwrap_or_else(|| panic!("no answer from {authority}"))
    }

    fn exchange(&mut self, request: &str) -> Option<(u16, String)> {
        self.reader.get_mut().write_all(request.as_bytes()).ok()?;
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line).ok()? == 0 {
            return None;
        }
        let status = status_line.split(' ').nth(1)?.parse().ok()?;
        let mut length = 0;
        let mut close = false;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).ok()?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':')?;
            let name = name.to_ascii_lowercase();
            if name == "content-length" {
                length = value.trim().parse().ok()?;
            } else if name == "connection" && value.trim().eq_ignore_ascii_case("close") {
                close = true;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).ok()?;
        if close {
            // The next request goes on a new connection.
            let _ = self.reader.get_ref().shutdown(std::net::Shutdown::Both);
        }
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// 100k deliveries through an inspector told to keep 100k: its byte cap
/// (64 MiB) holds, so the server's peak memory stays within 64 MiB (and
/// some room for the allocator) of the same server's without `--inspect`,
/// the list is shorter than 100k, newest first, and starts with the last
/// delivery.
#[test]
fn the_inspector_stays_under_its_memory_cap_when_100k_deliveries_pass() {
    const COUNT: usize = 100_000;
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    // Without --inspect nothing is kept per refused delivery: a tenth of
    // the load reaches the same peak.
    let (baseline_server, baseline) =
        peak_after_deliveries(&emulator, &dir.path().join("plain"), &[], COUNT / 10);
    drop(baseline_server);
    let baseline_time = started.elapsed();
    let (server, peak) = peak_after_deliveries(
        &emulator,
        &dir.path().join("inspected"),
        &["--inspect", "127.0.0.1:0", "--inspect-keep", "100000"],
        COUNT,
    );
    let inspector = Inspector::of(|| server.log());
    let rows = inspector.updates("");
    eprintln!(
        "baseline peak {baseline} KiB ({} deliveries, {baseline_time:?}), with --inspect {peak} KiB, \
         {} entries kept, {:?} in all",
        COUNT / 10,
        rows.len(),
        started.elapsed()
    );
    // Measured: about 67 MiB over the baseline (the entries, the records
    // on their way to the inspector's thread, the allocator's slack); 114
    // MiB when an attempt's JSON was counted as 256 bytes.
    const MIB: u64 = 1024;
    assert!(
        peak < baseline + 64 * MIB + 12 * MIB,
        "peak {peak} KiB with --inspect, {baseline} KiB without"
    );
    assert!(
        rows.len() < COUNT && rows.len() > 1_000,
        "{} entries",
        rows.len()
    );
    assert_eq!(rows[0]["update_id"], 77, "{}", rows[0]);
    assert_eq!(rows[0]["outcome"], "replied", "{}", rows[0]);
    assert_eq!(rows[1]["signature"], "SIGNATURE_MISMATCH", "{}", rows[1]);
    let ids: Vec<u64> = rows.iter().map(id_of).collect();
    assert!(
        ids.windows(2).all(|pair| pair[0] > pair[1]),
        "not newest first"
    );
    // The oldest went first: what is kept is the end of the run.
    assert_eq!(ids[0], COUNT as u64 + 1, "ids count every delivery");
    assert_eq!(*ids.last().unwrap(), ids[0] + 1 - ids.len() as u64);
}

// ---------------------------------------------------------------------------
// What an entry holds, and replays

/// A handler that saves its stdin as `DIR/stdin_UPDATE_ID`, says a line on
/// stderr, fails once for chat `u_flaky` (until `DIR/failed` exists) and
/// otherwise replies `got UPDATE_ID`.
fn noting_handler(dir: &Path) -> String {
    format!(
        r#"cat > '{dir}/stdin_'"$FLY_UPDATE_ID"
        echo "to stderr $FLY_UPDATE_ID" >&2
        if [ "$FLY_CHAT_ID" = u_flaky ] && [ ! -e '{dir}/failed' ]; then
            touch '{dir}/failed'; echo 'fails once' >&2; exit 3
        fi
        echo "got $FLY_UPDATE_ID""#,
        dir = dir.display()
    )
}

/// The entry of update `hello` (chat u_1, replied): the handler's command,
/// stdin (as `noting_handler` saved it in `dir`), stdout and stderr, the
/// reply and the platform's answer, one attempt. Returns its id.
fn assert_handler_io_and_reply(inspector: &Inspector, dir: &Path, hello: i64) -> u64 {
    let row = inspector.wait_for_update(hello, "replied");
    assert_eq!(row["chat"], "private:u_1", "{row}");
    assert_eq!(row["source"], "poll", "{row}");
    assert_eq!(row["signature"], Value::Null, "{row}");
    let original = id_of(&row);
    let detail = inspector.detail(original);
    let ran = &detail["handler"];
    let command = ran["command"]
        .as_str()
        .unwrap_or_else(|| panic!("{detail:#}"));
    assert!(
        command.starts_with("--exec ") && command.contains("to stderr"),
        "{command}"
    );
    let stdin = std::fs::read_to_string(dir.join(format!("stdin_{hello}"))).unwrap();
    assert_eq!(ran["stdin"], stdin.as_str(), "{detail:#}");
    assert_eq!(detail["body"], stdin.as_str(), "{detail:#}");
    assert_eq!(ran["stdout"], format!("got {hello}\n"), "{detail:#}");
    assert_eq!(ran["stderr"], format!("to stderr {hello}\n"), "{detail:#}");
    let request: Value = serde_json::from_str(detail["reply"]["request"].as_str().unwrap())
        .unwrap_or_else(|error| panic!("{error}: {detail:#}"));
    assert_eq!(request["client_msg_id"], format!("reply_{hello}"));
    assert_eq!(request["data"]["content"], format!("got {hello}"));
    let platform = detail["reply"]["answer"].as_str().unwrap_or_default();
    assert!(!platform.is_empty(), "{detail:#}");
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{detail:#}");
    assert_eq!(attempts[0]["error"], Value::Null, "{detail:#}");

    original
}

/// Update `flaky` failed once, then replied: one entry, two attempts.
fn assert_one_entry_of_two_attempts(inspector: &Inspector, flaky: i64) {
    let row = inspector.wait_for_update(flaky, "replied");
    assert_eq!(row["attempts"], 2, "{row}");
    assert_eq!(
        inspector
            .updates("")
            .iter()
            .filter(|row| row["update_id"] == flaky)
            .count(),
        1
    );
    let detail = inspector.detail(id_of(&row));
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{detail:#}");
    assert_eq!(attempts[0]["outcome"], "failed", "{detail:#}");
    assert!(
        attempts[0]["error"]
            .as_str()
            .is_some_and(|error| !error.is_empty()),
        "{detail:#}"
    );
    assert_eq!(attempts[1]["error"], Value::Null, "{detail:#}");
    assert_eq!(attempts[1]["outcome"], "replied", "{detail:#}");
    assert!(
        detail["handler"]["stderr"]
            .as_str()
            .is_some_and(|stderr| stderr.contains("fails once")),
        "{detail:#}"
    );
}

/// poll-echo's entry of an update holds the handler's command, stdin,
/// stdout and stderr, the reply sent and the platform's answer; a handler
/// that fails once makes one entry of two attempts; two replays send
/// `replay_{id}_1` and `replay_{id}_2` and are entries of their own,
/// linked to the original.
#[test]
fn poll_echo_entries_hold_the_handlers_io_and_reply_and_replays_send_new_messages() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let handler = noting_handler(dir.path());
    let state = dir.path().join("s.db");
    let poller = Service::start(
        &emulator,
        &[
            "poll-echo",
            "--state",
            state.to_str().unwrap(),
            "--poll-timeout",
            "1",
            "--exec",
            &handler,
            "--inspect",
            "127.0.0.1:0",
        ],
    );
    let inspector = Inspector::of(|| poller.log());
    let hello = emulator.user_says("private", "u_1", "hello");
    let flaky = emulator.user_says("private", "u_flaky", "wobbly");
    wait_for_sent(&emulator, &format!("reply_{hello}"));
    wait_for_sent(&emulator, &format!("reply_{flaky}"));

    let original = assert_handler_io_and_reply(&inspector, dir.path(), hello);
    assert_one_entry_of_two_attempts(&inspector, flaky);

    // Two replays: two new entries, two new messages.
    let first = inspector.replay(original);
    let second = inspector.replay(original);
    assert!(
        second > first && first > original,
        "{original} {first} {second}"
    );
    wait_for_sent(&emulator, &format!("replay_{hello}_1"));
    wait_for_sent(&emulator, &format!("replay_{hello}_2"));
    for replay in [first, second] {
        let row = inspector.wait_for_end(replay);
        assert_eq!(row["replay_of"], original, "{row}");
        assert_eq!(row["outcome"], "replied", "{row}");
        assert_eq!(row["update_id"], hello, "{row}");
    }
    let replies: Vec<Value> = emulator
        .sent()
        .into_iter()
        .filter(|sent| {
            sent["client_msg_id"]
                .as_str()
                .unwrap()
                .starts_with("replay_")
        })
        .collect();
    assert_eq!(replies.len(), 2, "{replies:?}");
    for reply in &replies {
        assert_eq!(reply["data"]["content"], format!("got {hello}"), "{reply}");
        assert_eq!(reply["to_user_id"], "u_1", "{reply}");
    }
    // The original is as it was.
    assert_eq!(
        inspector.detail(original)["attempts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// serve-webhook: a delivery whose signature fails is an entry of its own
/// (even when it claims a good delivery's update_id), explained step by
/// step, with the commands to send it again and to check it, and is not
/// replayed; a good delivery's replay sends `replay_{id}_1` and leaves the
/// state store alone (the same delivery again is still a duplicate). The
/// entries' "Copy as curl" and "Copy as fly verify-sig" commands run.
#[test]
fn a_signature_mismatch_is_explained_and_not_replayed_and_a_good_replay_keeps_the_store() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = inspected_webhook(&emulator, dir.path(), &[]);
    let inspector = Inspector::of(|| server.log());
    let good = signed(201, ("private", "u_1"), "good", WEBHOOK_SECRET);
    assert_eq!(post(&server.url, &good), answer(200, "OK"));
    let forged = signed(201, ("private", "u_1"), "forged", "not-the-secret");
    assert_eq!(
        post(&server.url, &forged),
        answer(401, "SIGNATURE_MISMATCH")
    );

    let rows = inspector.updates_once(2);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let good_row = inspector.wait_for_update(201, "replied");
    assert_eq!(good_row["signature"], "OK", "{good_row}");
    assert_eq!(good_row["attempts"], 1, "{good_row}");
    let mismatch = rows
        .iter()
        .find(|row| row["signature"] == "SIGNATURE_MISMATCH")
        .unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!(mismatch["outcome"], "refused", "{mismatch}");
    assert_eq!(mismatch["status"], 401, "{mismatch}");
    assert_eq!(mismatch["result"], "SIGNATURE_MISMATCH", "{mismatch}");
    let mismatch_id = id_of(mismatch);

    let detail = inspector.detail(mismatch_id);
    assert_eq!(detail["body"], forged.as_str(), "{detail:#}");
    let explain = detail["explain"]
        .as_str()
        .unwrap_or_else(|| panic!("{detail:#}"));
    for part in ["canonical JSON", "expected", "✗ differs"] {
        assert!(explain.contains(part), "{part:?} not in:\n{explain}");
    }
    let curl = detail["curl"]
        .as_str()
        .unwrap_or_else(|| panic!("{detail:#}"));
    assert!(curl.starts_with("curl ") && curl.contains(&forged) && curl.contains(&server.url));
    let verify = detail["verify_sig"]
        .as_str()
        .unwrap_or_else(|| panic!("{detail:#}"));
    assert!(
        verify.starts_with("fly verify-sig") && verify.contains(&forged),
        "{verify}"
    );
    // They run: the forged one does not verify, and POSTed again it is
    // refused again.
    let (status, said) = run_shell(verify);
    assert_eq!(status, Some(1), "{verify}: {said}");
    assert!(said.contains("✗ differs"), "{said}");
    let (status, said) = run_shell(curl);
    assert_eq!(
        (status, said.as_str()),
        (Some(0), "SIGNATURE_MISMATCH"),
        "{curl}"
    );

    let refused = inspector.post_replay(mismatch_id);
    assert_eq!(refused.status, 409, "{refused:?}");
    assert!(refused.json()["error"].as_str().is_some(), "{refused:?}");

    let good_id = id_of(&good_row);
    let good_detail = inspector.detail(good_id);
    let verify = good_detail["verify_sig"].as_str().unwrap();
    let (status, said) = run_shell(verify);
    assert_eq!(status, Some(0), "{verify}: {said}");
    let replayed = inspector.replay(good_id);
    wait_for_sent(&emulator, "replay_201_1");
    let row = inspector.wait_for_end(replayed);
    assert_eq!(row["replay_of"], good_id, "{row}");
    assert_eq!(row["outcome"], "replied", "{row}");
    let echoes: Vec<String> = sent_ids(&emulator);
    assert_eq!(echoes, ["echo_201", "replay_201_1"]);
    // The store was not told: the same delivery again is a duplicate, and
    // "Copy as curl" sends just that.
    assert_eq!(post(&server.url, &good), answer(200, "DUPLICATE"));
    let curl = good_detail["curl"].as_str().unwrap();
    let (status, said) = run_shell(curl);
    assert_eq!((status, said.as_str()), (Some(0), "DUPLICATE"), "{curl}");
    let row = inspector.wait_for(&format!("{good_id} with 3 attempts"), |row| {
        row["id"] == good_id && row["attempts"] == 3
    });
    assert_eq!(row["outcome"], "duplicate", "{row}");
    assert_eq!(sent_ids(&emulator).len(), 2);
}

/// Runs `command` with `sh`, fly first on the PATH and the webhook secret
/// in FLY_WEBHOOK_SECRET: its exit code and its stdout and stderr.
fn run_shell(command: &str) -> (Option<i32>, String) {
    let fly_dir = fly_path().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        fly_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = std::process::Command::new("sh")
        .args(["-c", command])
        .env_clear()
        .env("PATH", path)
        .env("FLY_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr_of(&output)
    );
    (output.status.code(), said.trim().to_string())
}

/// forward: a replay delivers the update, signed, to the receiver again.
#[test]
fn a_forward_replay_delivers_to_the_receiver_again() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (receiver, url) = start_receiver_with(&emulator, 0, &dir.path().join("r.db"), &[]);
    let forward = start_forward_with(
        &emulator,
        &url,
        &dir.path().join("f.db"),
        &["--inspect", "127.0.0.1:0"],
    );
    let inspector = Inspector::of(|| forward.log());
    let update_id = emulator.user_says("private", "u_1", "forward me");
    wait_for_sent(&emulator, &format!("echo_{update_id}"));
    let row = inspector.wait_for_update(update_id, "delivered");
    assert_eq!(row["source"], "forward", "{row}");
    let original = id_of(&row);
    let detail = inspector.detail(original);
    let request = detail["reply"]["request"].as_str().unwrap_or_default();
    assert!(request.starts_with(&format!("POST {url}")), "{detail:#}");
    assert_eq!(detail["reply"]["answer"], "HTTP 200", "{detail:#}");

    let receptions = || {
        receiver
            .log()
            .lines()
            .filter(|line| {
                line.contains("delivery answered")
                    && line.contains(&format!("update_id={update_id} "))
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // (The receiver's log is read as it comes: wait for its line.)
    wait_until(Duration::from_secs(20), "the receiver's delivery", || {
        receptions().len() == 1
    });
    let replayed = inspector.replay(original);
    let row = inspector.wait_for_end(replayed);
    assert_eq!(row["outcome"], "delivered", "{row}");
    assert_eq!(row["replay_of"], original, "{row}");
    wait_until(
        Duration::from_secs(20),
        "the receiver's second delivery",
        || receptions().len() == 2,
    );
    // Signed anew, it verified; the receiver's store knew the update.
    let second = &receptions()[1];
    assert!(
        second.contains("signature=\"OK\"") && second.contains("outcome=duplicate"),
        "{second}"
    );
}

// ---------------------------------------------------------------------------
// The list

/// `?chat=`, `?outcome=` and `?q=` select the right rows; an unknown id is
/// 404; the event stream brings a new delivery's row as it happens.
#[test]
fn filters_select_the_right_rows_and_events_bring_new_ones() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = inspected_webhook(&emulator, dir.path(), &[]);
    let inspector = Inspector::of(|| server.log());
    let deliveries = [
        signed(301, ("private", "u_a"), "apple pie", WEBHOOK_SECRET),
        signed(302, ("group", "g_b"), "banana split", WEBHOOK_SECRET),
        signed(303, ("private", "u_a"), "cherry", "not-the-secret"),
    ];
    let answers: Vec<u16> = deliveries
        .iter()
        .map(|body| post(&server.url, body).status)
        .collect();
    assert_eq!(answers, [200, 200, 401]);
    inspector.updates_once(3);
    let update_ids = |query: &str| -> Vec<i64> {
        inspector
            .updates(query)
            .iter()
            .map(|row| row["update_id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(update_ids(""), [303, 302, 301]);
    assert_eq!(update_ids("?chat=private%3Au_a"), [303, 301]);
    assert_eq!(update_ids("?chat=group:g_b"), [302]);
    assert_eq!(update_ids("?chat=private%3Au_zzz"), Vec::<i64>::new());
    assert_eq!(update_ids("?outcome=refused"), [303]);
    assert_eq!(update_ids("?outcome=replied"), [302, 301]);
    assert_eq!(update_ids("?q=banana"), [302]);
    assert_eq!(update_ids("?q=BANANA+split"), [302]);
    assert_eq!(update_ids("?q=apple&chat=private:u_a"), [301]);
    assert_eq!(update_ids("?q=apple&outcome=refused"), Vec::<i64>::new());
    assert_eq!(update_ids("?q=cherry&outcome="), [303]);
    assert_eq!(update_ids("?q=303"), [303]);

    for path in ["/api/updates/999999", "/api/updates/abc", "/api/nothing"] {
        let reply = inspector.get(path);
        assert_eq!(reply.status, 404, "{reply:?}");
        assert_eq!(reply.json(), json!({"error": "NOT_FOUND"}), "{reply:?}");
    }
    assert_eq!(inspector.post_replay(999_999).status, 404);

    let mut events = Events::open(&inspector);
    let fresh = signed(304, ("private", "u_c"), "durian", WEBHOOK_SECRET);
    assert_eq!(post(&server.url, &fresh), answer(200, "OK"));
    let event = events.next_update(Duration::from_secs(20));
    assert_eq!(event["update_id"], 304, "{event}");
    assert_eq!(event["chat"], "private:u_c", "{event}");
    assert_eq!(event["outcome"], "replied", "{event}");
    let newest = inspector.updates("").remove(0);
    assert_eq!(event, newest);
}

// ---------------------------------------------------------------------------
// Start-up

/// An `--inspect` port that is taken: exit 1 with one line naming
/// `--inspect` and the address, for each command that has it, before any
/// state file is made.
#[test]
fn an_inspect_port_in_use_is_exit_1_with_one_line() {
    crate::metrics::a_taken_port_is_exit_1_with_one_line("--inspect");
}
