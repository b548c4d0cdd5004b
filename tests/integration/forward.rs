//! `fly forward` on its own terms: trusting a local TLS receiver, polling
//! without a long poll, what its summary counts. (Delivery into a receiver
//! with `--exec`, order and stops are in exec.rs.)

use std::path::Path;
use std::time::Duration;

use crate::common::{Emulator, Service, eventually, wait_until, write_certificate};
use crate::exec::start_receiver_with;

const SECRET: &str = "forward-test-secret";

fn start_tls_receiver(emulator: &Emulator, dir: &Path) -> (Service, String) {
    let (cert, key, _) = write_certificate(dir);
    let mut receiver = Service::start(
        emulator,
        &[
            "serve-webhook",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--secret",
            SECRET,
            "--state",
            dir.join("receiver.db").to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = receiver.first_line();
    assert!(
        url.starts_with("https://127.0.0.1:"),
        "{url:?}: {}",
        receiver.log()
    );
    (receiver, url)
}

fn start_forward(emulator: &Emulator, dir: &Path, extra: &[&str]) -> Service {
    let mut args = vec![
        "forward",
        "--secret",
        SECRET,
        "--state",
        dir.to_str().unwrap(),
        "--grace",
        "1",
    ];
    args.extend_from_slice(extra);
    Service::start(emulator, &args)
}

/// A receiver with a self-signed certificate: refused until trusted, and the
/// refusal says how to trust it; delivered once `--to-ca` names it.
#[test]
fn to_ca_trusts_a_self_signed_receiver_and_the_tls_error_says_so() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (_receiver, url) = start_tls_receiver(&emulator, dir.path());
    let update_id = emulator.user_says("private", "u_tls", "over tls");

    let untrusting = start_forward(
        &emulator,
        &dir.path().join("f1.db"),
        &["--to", &url, "--poll-timeout", "1"],
    );
    assert!(
        eventually(Duration::from_secs(20), || untrusting
            .log()
            .contains("trust its certificate with --to-ca FILE")),
        "{}",
        untrusting.log()
    );
    drop(untrusting);
    assert!(emulator.sent().is_empty());

    let cert = dir.path().join("cert.pem");
    let trusting = start_forward(
        &emulator,
        &dir.path().join("f2.db"),
        &[
            "--to",
            &url,
            "--poll-timeout",
            "1",
            "--to-ca",
            cert.to_str().unwrap(),
        ],
    );
    assert!(
        eventually(Duration::from_secs(20), || emulator.sent().len() == 1),
        "{}",
        trusting.log()
    );
    assert_eq!(
        emulator.sent()[0]["client_msg_id"],
        format!("echo_{update_id}")
    );
}

/// `--poll-timeout 0` asks without waiting; when nothing came, the next poll
/// waits a moment (1 s) instead of spinning. The gap between two polls is
/// read from the emulator's log (when it answered each), a lower bound that
/// a slow machine only makes larger.
#[test]
fn a_zero_poll_timeout_does_not_spin() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let polls = || answer_times(&emulator.log(), "/bot/updates");
    let forward = start_forward(
        &emulator,
        &dir.path().join("f.db"),
        &["--to", "http://127.0.0.1:9/webhook", "--poll-timeout", "0"],
    );
    wait_until(Duration::from_secs(10), "two polls", || polls().len() >= 2);
    let times = polls();
    let gap = times[1] - times[0];
    assert!(
        gap >= 0.9,
        "the second poll came {gap:.3} s after the first:\n{}",
        forward.log()
    );
}

/// When the emulator answered each request to a path containing `path`, in
/// seconds of the day, from the times its log lines begin with
/// (`2026-01-31T12:34:56.789012Z  INFO request …`); a day turning in the
/// middle of a test adds a day rather than going back.
fn answer_times(log: &str, path: &str) -> Vec<f64> {
    let mut day = 0.0;
    let mut times: Vec<f64> = Vec::new();
    for line in log
        .lines()
        .filter(|line| line.contains(" request ") && line.contains(path))
    {
        let clock = line
            .split_whitespace()
            .next()
            .and_then(|stamp| stamp.split_once('T'))
            .map(|(_, clock)| clock.trim_end_matches('Z'))
            .unwrap_or_else(|| panic!("no time at the start of {line:?}"));
        let seconds: f64 = clock
            .split(':')
            .map(|part| part.parse::<f64>().unwrap())
            .fold(0.0, |total, part| total * 60.0 + part);
        if times.last().is_some_and(|last| seconds + day < *last) {
            day += 86_400.0;
        }
        times.push(seconds + day);
    }
    times
}

/// The summary counts what the receiver accepted (2xx) as delivered; an
/// update that could not be signed is a dead letter, not a delivery.
#[test]
fn the_summary_counts_only_accepted_deliveries() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let (_receiver, url) = start_receiver_with(&emulator, 0, &dir.path().join("receiver.db"), &[]);
    // Python cannot encode a lone surrogate as UTF-8: the platform could
    // never have signed this one.
    emulator.raw_update(
        r#"{"type":"message","message":{"chat":{"type":"private","id":"u_1"},"msgType":"text","data":{"content":"cut \ud83d"}}}"#,
    );
    emulator.user_says("private", "u_1", "after");
    let mut forward = start_forward(
        &emulator,
        &dir.path().join("f.db"),
        &["--to", &url, "--poll-timeout", "1"],
    );
    wait_until(Duration::from_secs(20), "the echo of the second", || {
        emulator.sent().len() == 1
    });
    let status = std::process::Command::new("kill")
        .args(["-TERM", &forward.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        forward
            .wait(Duration::from_secs(20))
            .is_some_and(|status| status.success())
    );
    let log = forward.log();
    assert!(log.contains("stopped delivered=1 dead_letters=1"), "{log}");
}
