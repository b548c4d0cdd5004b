//! A headless Chromium driven over the W3C WebDriver protocol, for the tests
//! of the inspector's page: the Debian `chromedriver` on a loopback port of
//! its own, spoken to with `ureq` (a dozen endpoints do not need a WebDriver
//! crate and its async runtime).
//!
//! The test at the bottom serves the page's files with a static fake of the
//! inspector's API: scaffolding that proves the client and the page, to be
//! replaced by a test against the real `--inspect` server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::{eventually, wait_until};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The key of an element reference in WebDriver's JSON (W3C, section 12.1).
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long chromedriver may take to listen, and a WebDriver call to answer.
const DRIVER_LIMIT: Duration = Duration::from_secs(60);

/// An element found in the page: WebDriver's reference to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element(String);

/// What [`Browser::wait_for`] waits for, about the elements a selector matches.
#[derive(Clone, Copy, Debug)]
pub enum Until<'a> {
    /// At least one matches.
    Present,
    /// None matches.
    Absent,
    /// Exactly this many match.
    Count(usize),
    /// One of them shows this text (rendered text: hidden elements show none).
    TextContains(&'a str),
}

/// A WebDriver error answer: `error` is the code ("no such element", …).
#[derive(Debug)]
struct WebDriverError {
    error: String,
    message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

impl WebDriverError {
    /// Errors that a page still changing under a wait can cause.
    fn is_transient(&self) -> bool {
        matches!(
            self.error.as_str(),
            "no such element" | "stale element reference"
        )
    }
}

/// A chromedriver process in a process group of its own, so that killing the
/// group also ends a browser it started and could not quit.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    /// chromedriver on a free loopback port; another port if that one is
    /// taken between the look-up and chromedriver's bind (it then exits).
    fn start(agent: &ureq::Agent) -> Driver {
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap_or_else(|error| panic!("cannot start {CHROMEDRIVER}: {error}"));
            let mut driver = Driver {
                child,
                url: format!("http://127.0.0.1:{port}"),
            };
            if driver.wait_ready(agent) {
                return driver;
            }
        }
        panic!("chromedriver did not start on any of 5 ports");
    }

    /// True once `/status` says ready; false if chromedriver exited.
    fn wait_ready(&mut self, agent: &ureq::Agent) -> bool {
        let status = format!("{}/status", self.url);
        let mut exited = false;
        let ready = eventually(DRIVER_LIMIT, || {
            exited = self.child.try_wait().ok().flatten().is_some();
            exited
                || agent
                    .get(&status)
                    .call()
                    .ok()
                    .and_then(|mut response| response.body_mut().read_json::<Value>().ok())
                    .is_some_and(|answer| answer["value"]["ready"] == true)
        });
        assert!(ready, "chromedriver not ready after {DRIVER_LIMIT:?}");
        !exited
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) takes no memory from us; the group is chromedriver's own.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A headless Chromium session. Dropping it quits the browser and kills
/// chromedriver.
pub struct Browser {
    agent: ureq::Agent,
    /// `http://127.0.0.1:PORT/session/ID`, the prefix of every command.
    session: String,
    // Dropped after `Browser::drop` has ended the session.
    _driver: Driver,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium (1280×900, for screenshots
    /// of a known size).
    pub fn start() -> Browser {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(DRIVER_LIMIT))
            .build()
            .new_agent();
        let driver = Driver::start(&agent);
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let answer = call(
            &agent,
            "POST",
            &format!("{}/session", driver.url),
            Some(&capabilities),
        )
        .unwrap_or_else(|error| panic!("no browser session: {error}"));
        let id = answer["sessionId"].as_str().expect("sessionId").to_string();
        Browser {
            session: format!("{}/session/{id}", driver.url),
            agent,
            _driver: driver,
        }
    }

    /// One command of the session: its `value`, or the WebDriver error.
    fn command(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, WebDriverError> {
        call(
            &self.agent,
            method,
            &format!("{}{path}", self.session),
            body,
        )
    }

    /// Like [`Browser::command`], failing the test on an error.
    fn must(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.command(method, path, body)
            .unwrap_or_else(|error| panic!("WebDriver {method} {path}: {error}"))
    }

    /// Opens `url` and returns once the page has loaded.
    pub fn navigate(&self, url: &str) {
        self.must("POST", "/url", Some(&json!({"url": url})));
    }

    /// The first element matching `css`; fails the test if there is none.
    pub fn find(&self, css: &str) -> Element {
        let found = self.must("POST", "/element", Some(&locator(css)));
        element_of(&found)
    }

    /// Every element matching `css` (none is not an error).
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.try_find_all(css)
            .unwrap_or_else(|error| panic!("find_all {css:?}: {error}"))
    }

    fn try_find_all(&self, css: &str) -> Result<Vec<Element>, WebDriverError> {
        let found = self.command("POST", "/elements", Some(&locator(css)))?;
        Ok(found
            .as_array()
            .expect("a list")
            .iter()
            .map(element_of)
            .collect())
    }

    /// The element's rendered text, as a user sees it.
    pub fn text(&self, element: &Element) -> String {
        self.try_text(element)
            .unwrap_or_else(|error| panic!("text of {element:?}: {error}"))
    }

    fn try_text(&self, element: &Element) -> Result<String, WebDriverError> {
        let text = self.command("GET", &format!("/element/{}/text", element.0), None)?;
        Ok(text.as_str().unwrap_or_default().to_string())
    }

    /// The value of attribute `name`, if the element has it.
    pub fn attribute(&self, element: &Element, name: &str) -> Option<String> {
        let path = format!("/element/{}/attribute/{name}", element.0);
        self.must("GET", &path, None).as_str().map(str::to_string)
    }

    pub fn click(&self, element: &Element) {
        self.must(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(&json!({})),
        );
    }

    /// Types `text` into the element, as keystrokes (input events fire).
    pub fn send_keys(&self, element: &Element, text: &str) {
        let path = format!("/element/{}/value", element.0);
        self.must("POST", &path, Some(&json!({"text": text})));
    }

    /// Runs `script` (a function body: `return …` gives the result) with
    /// `arguments` = `args`, for reading what WebDriver has no command for.
    pub fn execute_script(&self, script: &str, args: &[Value]) -> Value {
        self.must(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": args})),
        )
    }

    /// Waits until the elements matching `css` satisfy `until`, reading the
    /// DOM again and again (the page changes on its own: events, fetches);
    /// returns them, or fails the test naming what was seen last.
    pub fn wait_for(&self, css: &str, until: Until, limit: Duration) -> Vec<Element> {
        let mut matched = None;
        let mut seen = String::from("nothing yet");
        eventually(limit, || match self.check(css, until) {
            Ok((true, found, _)) => {
                matched = Some(found);
                true
            }
            Ok((false, _, texts)) => {
                seen = format!("{texts:?}");
                false
            }
            Err(error) if error.is_transient() => false,
            Err(error) => panic!("waiting for {css:?}: {error}"),
        });
        matched.unwrap_or_else(|| {
            panic!("timed out after {limit:?} waiting for {css:?} {until:?}; last seen: {seen}")
        })
    }

    /// Whether the matches satisfy `until`, the matches, and their texts.
    fn check(
        &self,
        css: &str,
        until: Until,
    ) -> Result<(bool, Vec<Element>, Vec<String>), WebDriverError> {
        let found = self.try_find_all(css)?;
        let texts = found
            .iter()
            .map(|element| self.try_text(element))
            .collect::<Result<Vec<_>, _>>()?;
        let met = match until {
            Until::Present => !found.is_empty(),
            Until::Absent => found.is_empty(),
            Until::Count(count) => found.len() == count,
            Until::TextContains(part) => texts.iter().any(|text| text.contains(part)),
        };
        Ok((met, found, texts))
    }

    /// Saves the visible part of the page as a PNG file.
    pub fn screenshot(&self, path: &Path) {
        let encoded = self.must("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("base64 text"))
            .expect("a base64 screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap_or_else(|error| panic!("write {path:?}: {error}"));
    }

    /// The browser console's messages so far (chromedriver's log extension),
    /// e.g. to find Content-Security-Policy refusals.
    pub fn console_messages(&self) -> Vec<String> {
        let entries = self.must("POST", "/se/log", Some(&json!({"type": "browser"})));
        entries
            .as_array()
            .expect("log entries")
            .iter()
            .map(|entry| entry["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Quits Chromium; chromedriver's group is killed after, whatever this says.
        let _ = self.command("DELETE", "", None);
    }
}

/// The README's picture of the inspector, `docs/img/inspector.png`, taken
/// from the page as `browser` shows it now.
#[allow(dead_code, reason = "called by the inspector's browser test")]
pub fn save_readme_screenshot(browser: &Browser) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/img/inspector.png");
    browser.screenshot(&path);
    path
}

/// One WebDriver call: the answer's `value`, or its error.
fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<&Value>,
) -> Result<Value, WebDriverError> {
    let sent = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("DELETE", _) => agent.delete(url).call(),
        (_, Some(body)) => agent.post(url).send_json(body),
        (_, None) => agent.post(url).send_empty(),
    };
    let mut response = sent.unwrap_or_else(|error| panic!("WebDriver {method} {url}: {error}"));
    let ok = response.status().is_success();
    let bytes = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024) // screenshots
        .read_to_vec()
        .unwrap_or_else(|error| panic!("WebDriver {method} {url}: {error}"));
    let answer: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|error| panic!("WebDriver {method} {url}: not JSON: {error}"));
    let value = answer["value"].clone();
    if ok {
        return Ok(value);
    }
    Err(WebDriverError {
        error: value["error"]
            .as_str()
            .unwrap_or("unknown error")
            .to_string(),
        message: value["message"].as_str().unwrap_or_default().to_string(),
    })
}

fn locator(css: &str) -> Value {
    json!({"using": "css selector", "value": css})
}

fn element_of(found: &Value) -> Element {
    Element(
        found[ELEMENT_KEY]
            .as_str()
            .expect("an element reference")
            .to_string(),
    )
}

/// A loopback port free when looked up (chromedriver binds it itself; a
/// clash is retried by [`Driver::start`]).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---- scaffolding: the page against a static fake of the inspector's API ----

/// The CSP of /work/inspect_api.md, so the page is proven to run under it.
const FAKE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// A refused webhook delivery; its body has an integer past 2^53, which the
/// pretty view must keep digit for digit.
const FAKE_BODY: &str = r#"{"update_id":1796672753506,"message":{"message_id":9007199254740993,"chat":{"type":"private","id":"u_1"},"text":"hi"}}"#;

fn fake_summary(id: u64, signature: &str, outcome: &str) -> Value {
    json!({"id": id, "time_ms": 1_796_672_753_506_u64, "source": "webhook",
           "update_id": 1_796_672_753_505_u64 + id, "chat": "private:u_1", "kind": "message",
           "msg_type": "text", "signature": signature, "outcome": outcome, "result": null,
           "status": 401, "latency_ms": 3, "attempts": 1, "replay_of": null})
}

fn fake_detail() -> Value {
    let mut detail = fake_summary(1, "SIGNATURE_MISMATCH", "refused");
    let more = json!({
        "body": FAKE_BODY,
        "headers": [["content-type", "application/json"], ["authorization", "(redacted)"]],
        "explain": "1. payload = update.message, canonical JSON: {…}\n2. expected 9f2c… given 0000…",
        "handler": null, "reply": null,
        "attempts": [{"attempt": 1, "time_ms": 1_796_672_753_506_u64, "outcome": "refused",
                      "error": "SIGNATURE_MISMATCH", "steps": {"verify_us": 12}}],
        "curl": "curl -X POST …", "verify_sig": "printf '%s' '…' | fly verify-sig --explain"});
    detail
        .as_object_mut()
        .unwrap()
        .extend(more.as_object().unwrap().clone());
    detail
}

/// Static answers in place of the inspector: the list holds #1, the event
/// stream announces #2 once, a replay is refused. Records each request as
/// "METHOD TARGET" (plus " +header" when it carries `X-Fly-Inspector: 1`).
struct StaticFakeInspector {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl StaticFakeInspector {
    fn start() -> StaticFakeInspector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = Arc::clone(&log);
                thread::spawn(move || fake_answer(stream, &log));
            }
        });
        StaticFakeInspector { url, requests }
    }

    fn saw(&self, request: &str) -> bool {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .any(|seen| seen == request)
    }
}

fn fake_answer(stream: TcpStream, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    let _ = reader.read_line(&mut request_line);
    let mut headers = String::new();
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|read| read > 2) {
        headers.push_str(&line.to_ascii_lowercase());
        line.clear();
    }
    let mut words = request_line.split_whitespace();
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let marked = if headers.contains("x-fly-inspector: 1\r\n") {
        " +header"
    } else {
        ""
    };
    log.lock()
        .unwrap()
        .push(format!("{method} {target}{marked}"));
    let path = target.split('?').next().unwrap_or_default();
    let mut stream = reader.into_inner();
    let (status, kind, body) = match (method, path) {
        ("GET", "/") => (
            200,
            "text/html",
            include_str!("../../src/inspect/page/index.html").to_string(),
        ),
        ("GET", "/app.js") => (
            200,
            "text/javascript",
            include_str!("../../src/inspect/page/app.js").to_string(),
        ),
        ("GET", "/app.css") => (
            200,
            "text/css",
            include_str!("../../src/inspect/page/app.css").to_string(),
        ),
        ("GET", "/api/updates") => (
            200,
            "application/json",
            json!({"updates": [fake_summary(1, "SIGNATURE_MISMATCH", "refused")]}).to_string(),
        ),
        ("GET", "/api/updates/1") => (200, "application/json", fake_detail().to_string()),
        ("GET", "/api/events") => return fake_events(stream),
        ("POST", "/api/updates/1/replay") => (
            409,
            "application/json",
            r#"{"error":"NOT_REPLAYABLE"}"#.to_string(),
        ),
        _ => (
            404,
            "application/json",
            r#"{"error":"NOT_FOUND"}"#.to_string(),
        ),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\
         content-security-policy: {FAKE_CSP}\r\nx-content-type-options: nosniff\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// One event, then the stream stays open until the browser leaves.
fn fake_events(mut stream: TcpStream) {
    let summary = fake_summary(2, "OK", "replied");
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n\r\n\
         event: update\ndata: {summary}\n\n"
    );
    let _ = stream.read_to_end(&mut Vec::new());
}

const WAIT: Duration = Duration::from_secs(20);

#[test]
#[ignore = "needs chromium"]
fn page_renders_rows_and_detail_against_a_static_fake() {
    let fake = StaticFakeInspector::start();
    let browser = Browser::start();
    browser.navigate(&fake.url);

    // The list from /api/updates, and #2 from the event stream, newest first.
    browser.wait_for("#status", Until::TextContains("live"), WAIT);
    browser.wait_for("tr.update[data-id=\"1\"]", Until::Present, WAIT);
    browser.wait_for("#updates tr.update", Until::Count(2), WAIT);
    let rows = browser.find_all("#updates tr.update");
    let ids: Vec<_> = rows
        .iter()
        .map(|row| browser.attribute(row, "data-id"))
        .collect();
    assert_eq!(ids, [Some("2".to_string()), Some("1".to_string())]);
    let cell =
        |class: &str| browser.text(&browser.find(&format!("tr.update[data-id=\"1\"] .{class}")));
    assert_eq!(cell("update-id"), "1796672753506");
    assert_eq!(cell("chat"), "private:u_1");
    assert_eq!(cell("type"), "message/text");
    assert_eq!(cell("signature"), "SIGNATURE_MISMATCH");
    assert_eq!(cell("outcome"), "refused");
    assert_eq!(cell("latency"), "3 ms");

    browser.click(&browser.find("tr.update[data-id=\"1\"]"));
    browser.wait_for("#detail[hidden]", Until::Absent, WAIT);
    browser.wait_for(
        "#detail-explain",
        Until::TextContains("canonical JSON"),
        WAIT,
    );
    check_detail(&browser);

    browser.send_keys(&browser.find("#filter-chat"), "private:u_1");
    wait_until(WAIT, "the chat filter's request", || {
        fake.saw("GET /api/updates?chat=private%3Au_1")
    });
    browser.click(&browser.find("#replay"));
    browser.wait_for(
        "#action-message",
        Until::TextContains("NOT_REPLAYABLE"),
        WAIT,
    );
    assert!(
        fake.saw("POST /api/updates/1/replay +header"),
        "{:?}",
        fake.requests
    );

    let refusals: Vec<_> = browser
        .console_messages()
        .into_iter()
        .filter(|message| message.contains("Content Security Policy"))
        .collect();
    assert!(refusals.is_empty(), "the CSP refused: {refusals:?}");
    let png = tempfile::tempdir().unwrap();
    browser.screenshot(&png.path().join("page.png"));
    let bytes = std::fs::read(png.path().join("page.png")).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "{} bytes",
        bytes.len()
    );
}

/// The detail of #1 as the static fake describes it.
fn check_detail(browser: &Browser) {
    let text_content = |id: &str| {
        let script = "return document.getElementById(arguments[0]).textContent";
        browser.execute_script(script, &[json!(id)])
    };
    assert_eq!(text_content("detail-body-raw"), FAKE_BODY);
    let pretty = text_content("detail-body-pretty");
    let pretty = pretty.as_str().unwrap();
    assert!(
        pretty.contains("\n    \"message_id\": 9007199254740993,\n"),
        "{pretty}"
    );
    let headers = browser.text(&browser.find("#detail-headers"));
    assert!(headers.contains("authorization (redacted)"), "{headers}");
    let attempts = browser.text(&browser.find("#detail-attempts"));
    assert!(
        attempts.contains("SIGNATURE_MISMATCH") && attempts.contains("verify 12 µs"),
        "{attempts}"
    );
    let handler = browser.text(&browser.find("#detail-handler"));
    assert_eq!(handler, "No handler ran for this entry.");
}
