//! fly's `--metrics` read by Prometheus' own tools: `promtool check metrics`
//! accepts what poll-echo and serve-webhook serve after a known run, the
//! README's scrape config and alert rules (fixtures/prometheus/) pass
//! `promtool check`, and a real Prometheus server, started here on the
//! README's config, scrapes fly (it asks for OpenMetrics), answers a query
//! with what fly counted and evaluates the two alerts. `.ci/run` installs
//! Debian's `prometheus` package; without it these tests fail, they do not
//! skip. The README holds the fixture files verbatim (not ignored).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::{
    Emulator, Service, new_log_file, show_log_file_if_failing, sign_update, wait_until,
};
use crate::serve_webhook::{SECRET, Server, agent, post_with, text_update};

const INSTALL: &str = "install Debian's prometheus package \
                       (apt-get install --no-install-recommends prometheus; .ci/run does)";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/prometheus")
        .join(name)
}

/// `promtool ARGS…` with `stdin`; its exit status and everything it printed.
fn promtool(args: &[&str], stdin: &str) -> (Output, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run promtool ({error}): {INSTALL}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, printed)
}

/// The URL of fly's `serving metrics url=…` start line, once `log` has it.
fn metrics_url(log: impl Fn() -> String) -> String {
    let mut url = None;
    wait_until(
        Duration::from_secs(20),
        "the `serving metrics` line",
        || {
            url = log()
                .lines()
                .filter(|line| line.contains("serving metrics"))
                .find_map(|line| line.split("url=").nth(1))
                .map(|url| url.trim().to_string());
            url.is_some()
        },
    );
    url.unwrap()
}

/// `GET url`: its body, which must come with a 200.
fn get_text(url: &str) -> String {
    let mut response = agent()
        .get(url)
        .call()
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let body = response.body_mut().read_to_string().unwrap();
    assert_eq!(response.status().as_u16(), 200, "GET {url}: {body}");
    body
}

/// The value of the sample `series` (`name{labels}` as fly writes it).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

/// `fly_updates_total` by outcome, as fly serves it.
fn updates_by_outcome(metrics: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("fly_updates_total{outcome=\""))
        .map(|rest| {
            let (outcome, value) = rest.split_once("\"} ").unwrap();
            (outcome.to_string(), value.trim().parse().unwrap())
        })
        .collect()
}

fn assert_promtool_accepts(metrics: &str, whose: &str) {
    let (output, printed) = promtool(&["check", "metrics"], metrics);
    assert!(
        output.status.success() && printed.trim().is_empty(),
        "promtool check metrics on {whose}'s /metrics ({}): {printed}\n--- the metrics:\n{metrics}",
        output.status
    );
}

/// A poll-echo with `--metrics` whose `--exec` handler answers three
/// chats and always fails for a fourth, whose update is parked after two
/// attempts. Returns it and its metrics URL once all four reached an end.
fn poll_echo_with_a_parked_update(emulator: &Emulator, dir: &Path) -> (Service, String) {
    for chat in ["u_1", "u_2", "u_3", "u_parked"] {
        emulator.user_says("private", chat, "hello");
    }
    let handler = r#"case "$FLY_CHAT_ID" in
        u_parked) echo 'cannot answer this one' >&2; exit 3 ;;
        *) echo "hello $FLY_CHAT_ID" ;;
    esac"#;
    let state = dir.join("s.db");
    let service = Service::start(
        emulator,
        &[
            "poll-echo",
            "--state",
            state.to_str().unwrap(),
            "--poll-timeout",
            "1",
            "--max-attempts",
            "2",
            "--exec",
            handler,
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let url = metrics_url(|| service.log());
    wait_until(
        Duration::from_secs(30),
        "three replies and one parked update",
        || {
            let metrics = get_text(&url);
            sample(&metrics, r#"fly_updates_total{outcome="replied"}"#) == Some(3.0)
                && sample(&metrics, "fly_parked_updates") == Some(1.0)
        },
    );
    (service, url)
}

#[test]
#[ignore = "needs prometheus"]
fn promtool_accepts_what_poll_echo_serves() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (_service, url) = poll_echo_with_a_parked_update(&emulator, dir.path());
    let metrics = get_text(&url);
    // The run shows in it: not an empty registry that passes trivially.
    assert_eq!(
        sample(&metrics, r#"fly_update_failures_total{reason="handler"}"#),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "fly_polling_lease_held"), Some(1.0));
    assert_promtool_accepts(&metrics, "poll-echo");
}

#[test]
#[ignore = "needs prometheus"]
fn promtool_accepts_what_serve_webhook_serves() {
    let emulator = Emulator::start_strict();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &emulator.base_url,
        dir.path(),
        &["--secret", SECRET, "--metrics", "127.0.0.1:0"],
    );
    let url = metrics_url(|| server.log());
    emulator.post(
        "/_emulator/webhook",
        serde_json::json!({"url": server.url, "secret": SECRET, "bot_id": 42}),
    );
    emulator.user_says("private", "u_1", "one");
    emulator.user_says("group", "g_1", "two");
    // Sent by hand: a delivery, its redelivery, and a forgery.
    let update = text_update(7_000_001, ("private", "u_2"), "three");
    let signed = sign_update(&update, SECRET, &[]);
    let agent = agent();
    assert_eq!(post_with(&agent, &server.url, &signed).body, "OK");
    assert_eq!(post_with(&agent, &server.url, &signed).body, "DUPLICATE");
    let forged = sign_update(&update, "not-the-secret", &[]);
    assert_eq!(
        post_with(&agent, &server.url, &forged).body,
        "SIGNATURE_MISMATCH"
    );
    wait_until(Duration::from_secs(20), "three replies counted", || {
        sample(&get_text(&url), r#"fly_updates_total{outcome="replied"}"#) == Some(3.0)
    });
    let metrics = get_text(&url);
    for series in [
        r#"fly_updates_total{outcome="duplicate"}"#,
        r#"fly_webhook_requests_total{code="401",result="SIGNATURE_MISMATCH"}"#,
        r#"fly_webhook_requests_total{code="200",result="DUPLICATE"}"#,
    ] {
        assert_eq!(sample(&metrics, series), Some(1.0), "{series}: {metrics}");
    }
    assert_promtool_accepts(&metrics, "serve-webhook");
}

/// What `promtool check rules|config` printed must be its success lines only.
fn assert_promtool_check_passes(args: &[&str], expected: &[&str]) {
    let (output, printed) = promtool(args, "");
    assert!(
        output.status.success(),
        "promtool {args:?} ({}): {printed}",
        output.status
    );
    let problems: Vec<&str> = printed
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty() && !line.starts_with("Checking ") && !line.starts_with("SUCCESS: ")
        })
        .collect();
    assert!(problems.is_empty(), "promtool {args:?}: {printed}");
    for line in expected {
        assert!(printed.contains(line), "promtool {args:?}: {printed}");
    }
}

#[test]
#[ignore = "needs prometheus"]
fn promtool_accepts_the_readmes_alert_rules_and_scrape_config() {
    let rules = fixture("fly-alerts.yml");
    let config = fixture("prometheus.yml");
    assert_promtool_check_passes(
        &["check", "rules", rules.to_str().unwrap()],
        &["SUCCESS: 2 rules found"],
    );
    // The config names the rules file next to it: both are checked.
    assert_promtool_check_passes(
        &["check", "config", config.to_str().unwrap()],
        &[
            "SUCCESS: 1 rule files found",
            "is valid prometheus config file syntax",
            "SUCCESS: 2 rules found",
        ],
    );
}

/// A `prometheus` server of this test's own, on the README's config with
/// its intervals cut to a second and its target replaced; killed when
/// dropped, its log shown if the test fails.
struct PrometheusServer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    origin: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Port 0: Prometheus' `Listening on` line names the port it got.
    fn start(target: &str) -> PrometheusServer {
        let dir = tempfile::tempdir().unwrap();
        let shown = std::fs::read_to_string(fixture("prometheus.yml")).unwrap();
        let mut config = shown.clone();
        for (from, to, times) in [
            (": 15s", ": 1s".to_string(), 2),
            ("\"127.0.0.1:9464\"", format!("\"{target}\""), 1),
            (
                "fly-alerts.yml",
                fixture("fly-alerts.yml").display().to_string(),
                1,
            ),
        ] {
            assert_eq!(config.matches(from).count(), times, "{from} in {shown}");
            config = config.replace(from, &to);
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = new_log_file(dir.path(), "prometheus-");
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run prometheus ({error}): {INSTALL}"));
        let mut address = None;
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_until(Duration::from_secs(30), "prometheus to listen", || {
            // `msg="Listening on" address=127.0.0.1:PORT`
            address = read_log()
                .lines()
                .filter(|line| line.contains("msg=\"Listening on\""))
                .find_map(|line| line.split(" address=").nth(1))
                .map(|rest| rest.split_whitespace().next().unwrap().to_string());
            address.is_some() || child.try_wait().unwrap().is_some()
        });
        let Some(address) = address else {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!("prometheus exited ({status}): {}", read_log());
        };
        let server = PrometheusServer {
            child,
            origin: format!("http://{address}"),
            log,
            _dir: dir,
        };
        wait_until(Duration::from_secs(30), "prometheus to be ready", || {
            agent()
                .get(&format!("{}/-/ready", server.origin))
                .call()
                .is_ok_and(|response| response.status() == 200)
        });
        server
    }

    /// `GET /api/v1/PATH`'s `data`, from a `"status":"success"` answer.
    fn api(&self, path: &str) -> Value {
        let answer: Value =
            serde_json::from_str(&get_text(&format!("{}/api/v1/{path}", self.origin))).unwrap();
        assert_eq!(answer["status"], "success", "{path}: {answer}");
        answer["data"].clone()
    }

    /// `fly_updates_total` by outcome, as the query API answers it.
    fn updates_by_outcome(&self) -> BTreeMap<String, f64> {
        let data = self.api("query?query=fly_updates_total");
        let Value::Array(results) = &data["result"] else {
            panic!("no result: {data}");
        };
        results
            .iter()
            .map(|series| {
                assert_eq!(series["metric"]["job"], "fly", "{series}");
                let outcome = series["metric"]["outcome"].as_str().unwrap().to_string();
                let value = series["value"][1].as_str().unwrap().parse().unwrap();
                (outcome, value)
            })
            .collect()
    }

    /// The state (`inactive`, `pending`, `firing`) of each alert, with its
    /// rule's health (`ok` once evaluated without an error).
    fn alerts(&self) -> BTreeMap<String, String> {
        let data = self.api("rules?type=alert");
        let mut alerts = BTreeMap::new();
        for group in data["groups"].as_array().unwrap() {
            for rule in group["rules"].as_array().unwrap() {
                alerts.insert(
                    rule["name"].as_str().unwrap().to_string(),
                    format!(
                        "{} ({})",
                        rule["state"].as_str().unwrap(),
                        rule["health"].as_str().unwrap()
                    ),
                );
            }
        }
        alerts
    }

    fn wait_for_alerts(&self, parked: &str, not_polling: &str) {
        let expected = BTreeMap::from([
            ("FlyNotPolling".to_string(), not_polling.to_string()),
            ("FlyUpdatesParked".to_string(), parked.to_string()),
        ]);
        let mut seen = BTreeMap::new();
        let reached = crate::common::eventually(Duration::from_secs(30), || {
            seen = self.alerts();
            seen == expected
        });
        assert!(reached, "alerts: expected {expected:?}, saw {seen:?}");
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        show_log_file_if_failing("prometheus", &self.log);
    }
}

#[test]
#[ignore = "needs prometheus"]
fn a_prometheus_server_scrapes_fly_and_its_alerts_follow_the_bot() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut service, url) = poll_echo_with_a_parked_update(&emulator, dir.path());
    let target = url
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap();
    let prometheus = PrometheusServer::start(target);

    // The query API answers what fly serves (a parked update is tried
    // again now and then, so both are read anew until they agree).
    let mut queried = BTreeMap::new();
    let mut served = BTreeMap::new();
    let agreed = crate::common::eventually(Duration::from_secs(30), || {
        queried = prometheus.updates_by_outcome();
        served = updates_by_outcome(&get_text(&url));
        !queried.is_empty() && queried == served
    });
    assert!(
        agreed,
        "prometheus has fly_updates_total {queried:?}, fly serves {served:?}"
    );
    assert_eq!(served.get("replied"), Some(&3.0), "{served:?}");

    // A parked update: its alert waits out its 10 minutes; a poller holds
    // the lease, so the other is quiet.
    prometheus.wait_for_alerts("pending (ok)", "inactive (ok)");

    // The poller gone: its series go stale, so nobody polls (absent).
    let _ = service.child.kill();
    let _ = service.child.wait();
    prometheus.wait_for_alerts("inactive (ok)", "pending (ok)");
}

/// The README shows the scrape config and the alert rules exactly as the
/// files the tests above check.
#[test]
fn the_readme_shows_the_prometheus_fixtures_verbatim() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for name in ["prometheus.yml", "fly-alerts.yml"] {
        let text = std::fs::read_to_string(fixture(name)).unwrap();
        assert!(
            readme.contains(&format!("```yaml\n{text}```\n")),
            "the README should show fixtures/prometheus/{name} verbatim in a ```yaml block:\n{text}"
        );
    }
}
