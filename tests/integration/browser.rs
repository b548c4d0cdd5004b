//! A headless Chromium driven over the W3C WebDriver protocol, for the tests
//! of the inspector's page: the Debian `chromedriver` on a loopback port of
//! its own, spoken to with `ureq` (a dozen endpoints do not need a WebDriver
//! crate and its async runtime).
//!
//! The test at the bottom opens the inspector of a real serve-webhook.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::{Emulator, eventually, wait_until};
use crate::serve_webhook::{SECRET, Server, post, signed_here};

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

    /// The first element matching `css` inside `parent`.
    pub fn find_in(&self, parent: &Element, css: &str) -> Element {
        let path = format!("/element/{}/element", parent.0);
        element_of(&self.must("POST", &path, Some(&locator(css))))
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

const WAIT: Duration = Duration::from_secs(20);

/// The message of the deliveries below, as canonical JSON.
const MESSAGE: &str =
    r#"{"chat":{"id":"u_1","type":"private"},"data":{"content":"hi"},"msgType":"text"}"#;

/// The inspector of a real serve-webhook, in a real browser: a delivery
/// appears without a reload; a delivery with a bad signature shows the
/// steps of the check; `Replay` on a good one makes the platform send the
/// reply again. With `FLY_README_SCREENSHOT=1`, it also takes the README's
/// picture.
#[test]
#[ignore = "needs chromium"]
fn the_inspector_shows_explains_and_replays_deliveries() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret", SECRET, "--inspect", "127.0.0.1:0"],
    );
    let inspector = inspector_url(&server.log());
    let browser = Browser::start();
    browser.navigate(&inspector);
    browser.wait_for("#status", Until::TextContains("live"), WAIT);

    // Delivered while the page is open: the row comes over the event stream.
    let good = signed_here(501, "message", MESSAGE, "nonce-501");
    assert_eq!(post(&server.url, &good).status, 200);
    browser.wait_for("#updates tr.update", Until::Count(1), WAIT);
    let forged = signed_here(502, "message", MESSAGE, "nonce-502").replace("\"hi\"", "\"hi!\"");
    assert_eq!(post(&server.url, &forged).status, 401);
    browser.wait_for("#updates tr.update", Until::Count(2), WAIT);
    let row_of = |update_id: &str| {
        browser
            .find_all("#updates tr.update")
            .into_iter()
            .find(|row| {
                let cell = browser.find_in(row, ".update-id");
                browser.text(&cell) == update_id
            })
            .unwrap_or_else(|| panic!("no row for update {update_id}"))
    };
    let forged_row = row_of("502");
    assert_eq!(
        browser.text(&browser.find_in(&forged_row, ".signature")),
        "SIGNATURE_MISMATCH"
    );

    check_explained(&browser, &forged_row);

    // Replay the good one: the platform gets the reply again, with an id of its own.
    let good_row = row_of("501");
    let good_id = browser.attribute(&good_row, "data-id").unwrap();
    browser.click(&good_row);
    browser.wait_for("#detail-body-raw", Until::TextContains("nonce-501"), WAIT);
    let pretty = browser.execute_script(
        "return document.getElementById('detail-body-pretty').textContent",
        &[],
    );
    assert!(
        pretty.as_str().unwrap().contains("\"update_id\": 501"),
        "{pretty}"
    );
    if std::env::var_os("FLY_README_SCREENSHOT").is_some() {
        save_readme_screenshot(&browser);
    }
    browser.click(&browser.find("#replay"));
    wait_until(WAIT, "the replayed reply", || {
        emulator
            .sent()
            .iter()
            .any(|sent| sent["client_msg_id"] == "replay_501_1")
    });
    browser.wait_for("#updates tr.update", Until::Count(3), WAIT);
    let replay_of = browser.find("#updates tr.update .replay-of");
    assert!(browser.text(&replay_of).contains(&good_id), "{good_id}");
    let sent: Vec<Value> = emulator.sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0]["client_msg_id"], "echo_501");

    // The text filter asks the server: only the forged delivery has "hi!".
    browser.send_keys(&browser.find("#filter-text"), "hi!");
    browser.wait_for("#updates tr.update", Until::Count(1), WAIT);
    browser.wait_for(
        "#updates tr.update .update-id",
        Until::TextContains("502"),
        WAIT,
    );
    browser.wait_for("#empty:not([hidden])", Until::Absent, WAIT);
    browser.wait_for("#updates tr.update", Until::Present, WAIT);

    let refusals: Vec<_> = browser
        .console_messages()
        .into_iter()
        .filter(|message| message.contains("Content Security Policy"))
        .collect();
    assert!(refusals.is_empty(), "the CSP refused: {refusals:?}");
}

/// The refused delivery explained: what was signed, and what was expected.
fn check_explained(browser: &Browser, row: &Element) {
    browser.click(row);
    browser.wait_for("#detail[hidden]", Until::Absent, WAIT);
    browser.wait_for(
        "#detail-explain",
        Until::TextContains("canonical JSON"),
        WAIT,
    );
    let explain = browser.text(&browser.find("#detail-explain"));
    let signed =
        r#"{"chat":{"id":"u_1","type":"private"},"data":{"content":"hi!"},"msgType":"text"}"#;
    assert!(
        explain.contains(signed)
            && explain.contains("expected")
            && explain.contains("✗ differs")
            && explain.contains("secret from --secret"),
        "{explain}"
    );
}

/// The inspector's address, from serve-webhook's start line.
fn inspector_url(log: &str) -> String {
    log.lines()
        .find_map(|line| line.split("inspector url=").nth(1))
        .map(|url| url.trim().to_string())
        .unwrap_or_else(|| panic!("no inspector line in: {log}"))
}
