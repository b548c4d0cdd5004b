//! `--metrics ADDR` (issue 24): after a known run through the emulator,
//! `/metrics` of poll-echo, forward and serve-webhook counts exactly what
//! happened; `/healthz` and `/readyz` (a poller's goes 503 while its Redis
//! state is down); a port that cannot be bound; and the log lines that go
//! with them (serve-webhook's start line, refusal warnings, handler stderr).
//!
//! Counts are read from a real GET of `/metrics`, parsed line by line
//! ([`metric`]); waits are on a count being reached, never on time.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{Emulator, Service, fly_at, fly_child, sign_update, stderr_of, wait_until};
use crate::exec::{start_forward_with, start_receiver_with};
use crate::redis::{Poller, RedisServer};
use crate::serve_webhook::{SECRET, Server, agent, answer, post_with, text_update};

/// The value of the one sample `series` in a Prometheus (or OpenMetrics)
/// text: `series` is the metric's name with its labels exactly as fly
/// writes them, e.g. `fly_updates_total{outcome="replied"}`. `None` when
/// no such sample is there; a second sample of the same series fails the test.
pub(crate) fn metric(text: &str, series: &str) -> Option<f64> {
    let mut values = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|rest| {
            // A value, maybe followed by a timestamp.
            let value = rest.split(' ').next().unwrap_or_default();
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("{series}: not a number {value:?} in\n{text}"))
        });
    let value = values.next();
    assert!(values.next().is_none(), "{series} twice in\n{text}");
    value
}

/// The samples of `name` (any labels) in `text`: `(labels, value)`.
fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = rest.rsplit_once(' ')?;
            (labels.is_empty() || labels.starts_with('{')).then(|| (labels, value.parse().unwrap()))
        })
        .collect()
}

#[test]
fn the_parser_reads_exact_series_only() {
    let text = "# HELP fly_updates_total x\n\
                fly_updates_total{outcome=\"replied\"} 3\n\
                fly_updates_total{outcome=\"replied_later\"} 7\n\
                fly_poll_offset 12\n\
                fly_poll_offset_other 1\n\
                fly_update_duration_seconds_sum 0.25\n";
    assert_eq!(
        metric(text, "fly_updates_total{outcome=\"replied\"}"),
        Some(3.0)
    );
    assert_eq!(metric(text, "fly_poll_offset"), Some(12.0));
    assert_eq!(metric(text, "fly_update_duration_seconds_sum"), Some(0.25));
    assert_eq!(metric(text, "fly_updates_total{outcome=\"parked\"}"), None);
    assert_eq!(metric(text, "fly_updates_total"), None);
    assert_eq!(samples(text, "fly_updates_total").len(), 2);
}

/// One answer of the `--metrics` listener.
#[derive(Debug)]
pub(crate) struct Got {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) allow: Option<String>,
    pub(crate) body: String,
}

/// The `--metrics` listener of a running command, found by its start line
/// `serving metrics url=http://127.0.0.1:PORT/metrics`.
pub(crate) struct Listener {
    origin: String,
    agent: ureq::Agent,
}

impl Listener {
    /// Waits (up to 20 s) for the start line in `log()`.
    pub(crate) fn of(log: impl Fn() -> String) -> Listener {
        let mut url = None;
        wait_until(Duration::from_secs(20), "the metrics start line", || {
            url = metrics_url_in(&log());
            url.is_some()
        });
        let url = url.unwrap();
        let origin = url
            .strip_suffix("/metrics")
            .unwrap_or_else(|| panic!("{url:?} should end in /metrics"))
            .to_string();
        assert!(origin.starts_with("http://127.0.0.1:"), "{origin}");
        assert_ne!(crate::common::port_of(&origin), 0, "{origin}");
        Listener {
            origin,
            agent: agent(),
        }
    }

    pub(crate) fn get(&self, path: &str, accept: Option<&str>) -> Got {
        let mut request = self.agent.get(&format!("{}{path}", self.origin));
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        got(request.call())
    }

    pub(crate) fn post(&self, path: &str) -> Got {
        got(self
            .agent
            .post(&format!("{}{path}", self.origin))
            .send_empty())
    }

    /// `GET /metrics`, which must answer 200.
    pub(crate) fn scrape(&self) -> String {
        let got = self.get("/metrics", None);
        assert_eq!(got.status, 200, "{got:?}");
        got.body
    }

    /// `series` in a scrape now.
    pub(crate) fn value(&self, series: &str) -> Option<f64> {
        metric(&self.scrape(), series)
    }

    /// Waits (up to 30 s) until `series` is `value`.
    pub(crate) fn wait_for(&self, series: &str, value: f64) {
        let mut last = None;
        let reached = crate::common::eventually(Duration::from_secs(30), || {
            last = self.value(series);
            last == Some(value)
        });
        assert!(
            reached,
            "{series} stayed {last:?}, not {value}:\n{}",
            self.scrape()
        );
    }

    /// The status code of `GET path`.
    pub(crate) fn status(&self, path: &str) -> u16 {
        self.get(path, None).status
    }
}

fn got(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Got {
    let mut response = result.expect("a request to the --metrics listener");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|value| value.to_str().unwrap().to_string())
    };
    let content_type = header("content-type").unwrap_or_default();
    let allow = header("allow");
    Got {
        status: response.status().as_u16(),
        content_type,
        allow,
        body: response.body_mut().read_to_string().unwrap(),
    }
}

/// The URL of the `serving metrics` start line in `log`.
fn metrics_url_in(log: &str) -> Option<String> {
    url_in_start_line(log, "serving metrics")
}

/// The `url=` of the first line of `log` holding `words` (a listener's
/// start line, e.g. `serving metrics` or `inspector`).
pub(crate) fn url_in_start_line(log: &str, words: &str) -> Option<String> {
    let line = log
        .lines()
        .find(|line| line.contains(words) && line.contains("url="))?;
    let rest = &line[line.find("url=")? + "url=".len()..];
    Some(
        rest.split_whitespace()
            .next()?
            .trim_matches('"')
            .to_string(),
    )
}

/// Lines of `log` holding every one of `parts`.
fn lines_with<'a>(log: &'a str, parts: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|line| parts.iter().all(|part| line.contains(part)))
        .collect()
}

/// A handler that records each run in `runs`, fails every time for chat
/// `u_bad`, fails the first time for chat `u_flaky` (until `marker`
/// exists), and otherwise replies `re: UPDATE_ID`.
fn failing_handler(runs: &Path, marker: &Path) -> String {
    format!(
        r#"cat > /dev/null
        echo "$FLY_UPDATE_ID" >> '{runs}'
        case "$FLY_CHAT_ID" in
            u_bad) echo 'always fails' >&2; exit 1 ;;
            u_flaky) if [ ! -e '{marker}' ]; then touch '{marker}'; echo 'fails once' >&2; exit 3; fi ;;
        esac
        echo "re: $FLY_UPDATE_ID""#,
        runs = runs.display(),
        marker = marker.display()
    )
}

fn runs_in(runs: &Path) -> f64 {
    std::fs::read_to_string(runs)
        .unwrap_or_default()
        .lines()
        .count() as f64
}

/// A message the platform could send but nobody can answer: no chat.
const NO_CHAT: &str =
    r#"{"type":"message","message":{"msgType":"text","data":{"content":"no chat"}}}"#;

/// Each `(series, value)` is in `text` with that value.
fn assert_counts(text: &str, expected: &[(&str, f64)]) {
    for (series, value) in expected {
        assert_eq!(metric(text, series), Some(*value), "{series} in\n{text}");
    }
}

/// `fly_build_info{version="…",commit="…"} 1`, and the process metrics.
fn assert_build_and_process_metrics(text: &str) {
    let build = samples(text, "fly_build_info");
    assert_eq!(build.len(), 1, "{text}");
    let (labels, value) = build[0];
    assert_eq!(value, 1.0, "{text}");
    assert!(
        labels.starts_with(&format!(
            "{{version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{labels}"
    );
    assert!(
        metric(text, "process_resident_memory_bytes").unwrap() > 0.0,
        "{text}"
    );
    assert!(metric(text, "process_open_fds").unwrap() >= 3.0, "{text}");
    assert!(
        metric(text, "process_start_time_seconds").unwrap() > 1.5e9,
        "{text}"
    );
    assert!(
        metric(text, "process_cpu_seconds_total").unwrap() >= 0.0,
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// Counts after a known run

#[test]
fn serve_webhook_metrics_count_a_known_run_exactly() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let handler = failing_handler(&runs, &dir.path().join("failed-once"));
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &[
            "--secret",
            SECRET,
            "--metrics",
            "127.0.0.1:0",
            "--exec",
            &handler,
        ],
    );
    let listener = Listener::of(|| server.log());
    deliver_a_known_run(&server);

    let text = listener.scrape();
    let replies = emulator.sent().len() as f64;
    assert_eq!(replies, 3.0);
    // The handler ran for 11, 12, 13 and twice for 15.
    assert_eq!(runs_in(&runs), 5.0);
    assert_counts(
        &text,
        &[
            ("fly_updates_total{outcome=\"replied\"}", 3.0),
            ("fly_updates_total{outcome=\"duplicate\"}", 1.0),
            ("fly_updates_total{outcome=\"dead_letter\"}", 1.0),
            ("fly_update_failures_total{reason=\"handler\"}", 1.0),
            (
                "fly_webhook_requests_total{code=\"200\",result=\"OK\"}",
                3.0,
            ),
            (
                "fly_webhook_requests_total{code=\"200\",result=\"DUPLICATE\"}",
                1.0,
            ),
            (
                "fly_webhook_requests_total{code=\"200\",result=\"DEAD_LETTER\"}",
                1.0,
            ),
            (
                "fly_webhook_requests_total{code=\"401\",result=\"SIGNATURE_MISMATCH\"}",
                1.0,
            ),
            (
                "fly_webhook_requests_total{code=\"500\",result=\"REPLY_FAILED\"}",
                1.0,
            ),
            (
                "fly_api_requests_total{endpoint=\"send\",code=\"200\"}",
                replies,
            ),
            (
                "fly_api_request_duration_seconds_count{endpoint=\"send\"}",
                replies,
            ),
            ("fly_handler_duration_seconds_count", 5.0),
            // Received to end: the three replied, the duplicate, the dead letter.
            ("fly_update_duration_seconds_count", 5.0),
            ("fly_updates_in_flight", 0.0),
        ],
    );
    // Nothing else: no other outcome, failure, answer or API call.
    for (name, series) in [
        ("fly_updates_total", 3),
        ("fly_update_failures_total", 1),
        ("fly_webhook_requests_total", 5),
        ("fly_api_requests_total", 1),
    ] {
        assert_eq!(samples(&text, name).len(), series, "{name} in\n{text}");
    }
    assert_build_and_process_metrics(&text);
    // Label values from fixed sets: no chat or update id anywhere.
    for never in ["u_1", "g_1", "u_flaky", "update_id", "chat"] {
        assert!(!text.contains(never), "{never} in\n{text}");
    }

    assert_delivery_lines(&server.log());
}

/// Two updates replied (11, 12), a redelivery of 11, a dead letter (13,
/// no chat), a bad signature (14), and 15, whose handler fails the first
/// time and succeeds when it is delivered again.
fn deliver_a_known_run(server: &Server) {
    let agent = agent();
    let deliver = |body: &str| post_with(&agent, &server.url, body);
    let signed = |update: &str| sign_update(update, SECRET, &[]);

    let first = signed(&text_update(11, ("private", "u_1"), "one"));
    assert_eq!(deliver(&first), answer(200, "OK"));
    let second = signed(&text_update(12, ("group", "g_1"), "two"));
    assert_eq!(deliver(&second), answer(200, "OK"));
    assert_eq!(deliver(&first), answer(200, "DUPLICATE"));
    let no_chat = signed(&NO_CHAT.replace(r#"{"type""#, r#"{"update_id":13,"type""#));
    assert_eq!(deliver(&no_chat), answer(200, "DEAD_LETTER"));
    let foreign = sign_update(
        &text_update(14, ("private", "u_1"), "forged"),
        "another-secret",
        &[],
    );
    assert_eq!(deliver(&foreign), answer(401, "SIGNATURE_MISMATCH"));
    let flaky = signed(&text_update(15, ("private", "u_flaky"), "again"));
    assert_eq!(deliver(&flaky), answer(500, "REPLY_FAILED"));
    assert_eq!(deliver(&flaky), answer(200, "OK"));
}

/// Each delivery line names its update, chat and outcome.
fn assert_delivery_lines(log: &str) {
    assert_eq!(
        lines_with(
            log,
            &[
                "delivery answered",
                "status=500",
                "update_id=15",
                "chat=private:u_flaky",
                "outcome=failed"
            ]
        )
        .len(),
        1,
        "{log}"
    );
    assert_eq!(
        lines_with(
            log,
            &[
                "delivery answered",
                "status=200",
                "update_id=15",
                "outcome=replied"
            ]
        )
        .len(),
        1,
        "{log}"
    );
    assert_eq!(
        lines_with(
            log,
            &["delivery answered", "update_id=11", "outcome=duplicate"]
        )
        .len(),
        1,
        "{log}"
    );
}

/// poll-echo with an `--exec` handler: replies, a dead letter, a handler
/// that fails once and is retried, and one that always fails and is parked
/// on its second attempt (`--max-attempts 2`).
#[test]
fn poll_echo_metrics_count_a_known_run_exactly() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let handler = failing_handler(&runs, &dir.path().join("failed-once"));
    let mut ids = [
        emulator.user_says("private", "u_1", "one"),
        emulator.user_says("group", "g_1", "two"),
        emulator.raw_update(NO_CHAT),
        emulator.user_says("private", "u_flaky", "again"),
        emulator.user_says("private", "u_bad", "never"),
    ];
    let state = dir.path().join("s.db");
    let service = Service::start(
        &emulator,
        &[
            "poll-echo",
            "--state",
            state.to_str().unwrap(),
            "--poll-timeout",
            "1",
            "--max-attempts",
            "2",
            "--metrics",
            "127.0.0.1:0",
            "--exec",
            &handler,
        ],
    );
    let listener = Listener::of(|| service.log());
    listener.wait_for("fly_updates_total{outcome=\"parked\"}", 1.0);
    listener.wait_for("fly_updates_total{outcome=\"replied\"}", 3.0);
    listener.wait_for("fly_updates_total{outcome=\"dead_letter\"}", 1.0);
    ids.sort_unstable();
    let past_last = (ids[ids.len() - 1] + 1) as f64;
    listener.wait_for("fly_poll_offset", past_last);

    let text = listener.scrape();
    let count = |series: &str| metric(&text, series);
    assert_eq!(samples(&text, "fly_updates_total").len(), 3, "{text}");
    assert_eq!(count("fly_parked_updates"), Some(1.0), "{text}");
    // u_flaky's first attempt, and both of u_bad's.
    assert_eq!(
        count("fly_update_failures_total{reason=\"handler\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        samples(&text, "fly_update_failures_total").len(),
        1,
        "{text}"
    );
    assert_eq!(runs_in(&runs), 7.0);
    assert_eq!(
        count("fly_handler_duration_seconds_count"),
        Some(7.0),
        "{text}"
    );
    // Received to end: three replied, the dead letter, the parked one.
    assert_eq!(
        count("fly_update_duration_seconds_count"),
        Some(5.0),
        "{text}"
    );
    assert_eq!(count("fly_polling_lease_held"), Some(1.0), "{text}");
    assert!(
        count("fly_api_requests_total{endpoint=\"updates\",code=\"200\"}").unwrap() > 0.0,
        "{text}"
    );
    let replies = emulator.sent().len() as f64;
    assert_eq!(replies, 3.0);
    assert_eq!(
        count("fly_api_requests_total{endpoint=\"send\",code=\"200\"}"),
        Some(replies),
        "{text}"
    );
    assert!(
        samples(&text, "fly_webhook_requests_total").is_empty(),
        "{text}"
    );
    assert_build_and_process_metrics(&text);
    assert_eq!(listener.status("/readyz"), 200);
}

/// forward counts what it delivered to a receiver.
#[test]
fn forward_metrics_count_deliveries() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (_receiver, url) = start_receiver_with(&emulator, 0, &dir.path().join("r.db"), &[]);
    emulator.user_says("private", "u_1", "one");
    emulator.user_says("group", "g_1", "two");
    let forward = start_forward_with(
        &emulator,
        &url,
        &dir.path().join("f.db"),
        &["--metrics", "127.0.0.1:0"],
    );
    let listener = Listener::of(|| forward.log());
    listener.wait_for("fly_updates_total{outcome=\"delivered\"}", 2.0);
    let text = listener.scrape();
    assert_eq!(samples(&text, "fly_updates_total").len(), 1, "{text}");
    assert_eq!(metric(&text, "fly_polling_lease_held"), Some(1.0), "{text}");
    assert!(
        metric(
            &text,
            "fly_api_requests_total{endpoint=\"updates\",code=\"200\"}"
        )
        .unwrap()
            > 0.0,
        "{text}"
    );
    // The receiver replied, not forward.
    assert_eq!(
        metric(
            &text,
            "fly_api_requests_total{endpoint=\"send\",code=\"200\"}"
        ),
        None,
        "{text}"
    );
    assert_eq!(emulator.sent().len(), 2);
    assert_eq!(listener.status("/readyz"), 200);
}

// ---------------------------------------------------------------------------
// The listener itself

#[test]
fn health_readiness_formats_and_other_requests() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let service = Service::start(
        &emulator,
        &[
            "poll-echo",
            "--state",
            state.to_str().unwrap(),
            "--poll-timeout",
            "1",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let listener = Listener::of(|| service.log());
    // Once a poll has answered, its request is counted.
    emulator.user_says("private", "u_1", "hi");
    listener.wait_for("fly_updates_total{outcome=\"replied\"}", 1.0);
    let healthz = listener.get("/healthz", None);
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok"));
    wait_until(Duration::from_secs(20), "/readyz to be 200", || {
        listener.status("/readyz") == 200
    });
    assert_eq!(listener.get("/readyz", None).body, "ready");
    for path in ["/", "/metric", "/metrics/", "/webhook", "/READYZ"] {
        assert_eq!(listener.status(path), 404, "{path}");
    }
    let post = listener.post("/metrics");
    assert_eq!(post.status, 405, "{post:?}");
    assert_eq!(post.allow.as_deref(), Some("GET, HEAD"), "{post:?}");

    let plain = listener.get("/metrics", None);
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.content_type,
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(!plain.body.contains("# EOF"), "{}", plain.body);
    assert!(
        metric(&plain.body, "fly_polling_lease_held").is_some(),
        "{}",
        plain.body
    );

    // As Prometheus asks for it.
    let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                  version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let open = listener.get("/metrics", Some(accept));
    assert_eq!(open.status, 200);
    assert_eq!(
        open.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(open.body.ends_with("# EOF\n"), "{}", open.body);
    assert_eq!(open.body.matches("# EOF").count(), 1, "{}", open.body);
    // OpenMetrics names a counter's family without `_total`.
    assert!(
        open.body.contains("# TYPE fly_api_requests counter"),
        "{}",
        open.body
    );
    assert!(
        metric(
            &open.body,
            "fly_api_requests_total{endpoint=\"updates\",code=\"200\"}"
        )
        .is_some(),
        "{}",
        open.body
    );
    assert_build_and_process_metrics(&open.body);
}

/// A poller's `/readyz` follows its Redis state: 503 while it is down (the
/// process itself still healthy), 200 again once it is back; a standby
/// poller is ready too, without the lease.
#[test]
#[ignore = "needs redis-server"]
fn a_pollers_readyz_is_503_while_its_redis_is_down_and_a_standby_is_ready() {
    let emulator = Emulator::start();
    let mut redis = RedisServer::unix();
    let dir = tempfile::tempdir().unwrap();
    let metrics = ["--metrics", "127.0.0.1:0"];
    let active = Poller::start(&emulator, &redis, dir.path(), &metrics);
    let listener = Listener::of(|| active.log());
    listener.wait_for("fly_polling_lease_held", 1.0);
    wait_until(Duration::from_secs(20), "/readyz 200", || {
        listener.status("/readyz") == 200
    });

    let standby = Poller::standby(&emulator, &redis, dir.path(), &metrics);
    let standing_by = Listener::of(|| standby.log());
    assert_eq!(standing_by.status("/readyz"), 200);
    assert_eq!(standing_by.status("/healthz"), 200);
    assert_eq!(standing_by.value("fly_polling_lease_held"), Some(0.0));
    assert_eq!(listener.value("fly_polling_lease_held"), Some(1.0));
    drop(standby);

    redis.kill();
    wait_until(
        Duration::from_secs(30),
        "/readyz 503 with Redis down",
        || listener.status("/readyz") == 503,
    );
    assert_eq!(listener.get("/healthz", None).body, "ok");
    assert_eq!(listener.status("/metrics"), 200);

    redis.restart();
    wait_until(
        Duration::from_secs(30),
        "/readyz 200 with Redis back",
        || listener.status("/readyz") == 200,
    );
    // And it polls again: a message is answered.
    let id = emulator.user_says("private", "u_1", "back");
    wait_until(Duration::from_secs(30), "the echo after the outage", || {
        emulator
            .sent()
            .iter()
            .any(|sent| sent["client_msg_id"] == format!("echo_{id}"))
    });
}

/// A `--metrics` port that is taken: exit 1 with one line naming
/// `--metrics` and the address, for each command that has it.
#[test]
fn a_metrics_port_in_use_is_exit_1_with_one_line() {
    a_taken_port_is_exit_1_with_one_line("--metrics");
}

/// `flag ADDR` with ADDR taken, for poll-echo, serve-webhook and forward:
/// each exits 1 with one error line, the last, naming `flag`, the address
/// and "in use", before any state file is made. `--metrics` and `--inspect`
/// share it.
pub(crate) fn a_taken_port_is_exit_1_with_one_line(flag: &str) {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let state = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let commands: Vec<Vec<String>> = vec![
        vec!["poll-echo".into(), "--state".into(), state("p.db")],
        vec![
            "serve-webhook".into(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            "0".into(),
            "--state".into(),
            state("w.db"),
        ],
        vec![
            "forward".into(),
            "--to".into(),
            "http://127.0.0.1:9/hook".into(),
            "--secret".into(),
            "s".into(),
            "--state".into(),
            state("f.db"),
        ],
    ];
    for args in commands {
        let output = fly_at(&emulator)
            .args(&args)
            .args([flag, &address])
            .timeout(Duration::from_secs(20))
            .output()
            .unwrap();
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        // forward says what it will do (and where its secret comes from)
        // before it starts; the one error line is the last.
        let errors = lines_with(&stderr, &["error"]);
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert_eq!(stderr.lines().last(), Some(errors[0]), "{stderr}");
        assert!(
            errors[0].starts_with("fly: error: ")
                && errors[0].contains(flag)
                && errors[0].contains(&address)
                && errors[0].contains("in use"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            !stderr.contains(" url=http"),
            "a listener started: {stderr}"
        );
    }
    // Refused before the state store was opened: no state file was made.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

// ---------------------------------------------------------------------------
// Log lines

/// serve-webhook's start line names where its secret comes from and where
/// its state is; a burst of bad signatures warns at most once a second,
/// naming `fly verify-sig --explain`.
#[test]
fn serve_webhook_says_its_secret_source_and_state_and_warns_of_refusals_once_a_second() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let server = Server::start(&emulator.base_url, dir.path(), &[]);
    let start = start_line(&server);
    assert!(start.contains("sha256 of the bot token"), "{start}");
    assert!(start.contains(state.to_str().unwrap()), "{start}");

    let agent = agent();
    let began = Instant::now();
    for n in 0..5 {
        let forged = sign_update(
            &text_update(900 + n, ("private", "u_1"), "forged"),
            "not-the-secret",
            &[],
        );
        assert_eq!(
            post_with(&agent, &server.url, &forged),
            answer(401, "SIGNATURE_MISMATCH")
        );
    }
    let elapsed = began.elapsed().as_secs_f64();
    let log = server.log();
    let warnings = lines_with(&log, &["WARN", "fly verify-sig --explain"]);
    assert!(!warnings.is_empty(), "{log}");
    assert!(
        warnings.len() as f64 <= elapsed.floor() + 1.0,
        "{} warnings in {elapsed:.1} s:\n{log}",
        warnings.len()
    );
    assert!(
        warnings[0].contains("SIGNATURE_MISMATCH") && warnings[0].contains("update_id=900"),
        "{log}"
    );
    // Each refused delivery still has its INFO line.
    assert_eq!(
        lines_with(
            &log,
            &[
                " INFO ",
                "delivery answered",
                "status=401",
                "signature=\"SIGNATURE_MISMATCH\""
            ]
        )
        .len(),
        5,
        "{log}"
    );

    // With FLY_WEBHOOK_SECRET, the start line says so.
    let env_dir = tempfile::tempdir().unwrap();
    let mut command = fly_child(&emulator.base_url);
    command.env("FLY_WEBHOOK_SECRET", SECRET);
    let from_env = Server::start_from(
        command,
        env_dir.path(),
        env_dir.path().join("e.db").as_os_str(),
        &[],
    );
    let start = start_line(&from_env);
    assert!(start.contains("FLY_WEBHOOK_SECRET"), "{start}");
    assert!(!start.contains("sha256 of the bot token"), "{start}");
    assert!(
        !start.contains(SECRET),
        "the secret itself is never shown: {start}"
    );
}

/// serve-webhook's start line, once logged (just after it prints its URL).
fn start_line(server: &Server) -> String {
    let mut line = None;
    wait_until(
        Duration::from_secs(10),
        "serve-webhook's start line",
        || {
            line = lines_with(&server.log(), &["receiving webhook deliveries"])
                .first()
                .map(|line| line.to_string());
            line.is_some()
        },
    );
    line.unwrap()
}

/// What a handler prints on stderr (debug prints) is INFO, not a warning.
#[test]
fn exec_handler_stderr_lines_are_info() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let update_id = emulator.user_says("private", "u_1", "hi");
    let output = fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(dir.path().join("s.db"))
        .args([
            "--exec",
            "cat > /dev/null; echo 'debug: looking up the user' >&2; echo ok",
        ])
        .timeout(Duration::from_secs(20))
        .output()
        .unwrap();
    let log = stderr_of(&output);
    assert!(output.status.success(), "{log}");
    let lines = lines_with(&log, &["[exec] debug: looking up the user"]);
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains(" INFO "), "{log}");
    assert!(
        lines[0].contains(&format!("update_id={update_id}")),
        "{log}"
    );
    assert!(!log.contains("WARN"), "{log}");
}
