//! Each role's default state file: `fly forward` and `fly serve-webhook` for
//! one bot run side by side with default settings; on a file they are both
//! given, the refusal names what the holder does; `fly dead-letters` and
//! `fly doctor` without `--state` look into both default files.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::common::{Emulator, Service, TOKEN, fly, fly_child, stderr_of, wait_until};
use crate::serve_webhook::{SECRET, post, signed_here};

/// Long-running `fly` children with HOME and XDG_STATE_HOME in `home` (so
/// their default state files are there), killed when dropped.
struct Running;

impl Running {
    fn start(emulator: &Emulator, home: &Path, args: &[&str]) -> Service {
        let mut command = fly_child(&emulator.base_url);
        command
            .env("HOME", home)
            .env("XDG_STATE_HOME", home.join("state"));
        Service::spawn(command, args)
    }

    /// serve-webhook (a message without `--exec`: the echo) and its URL,
    /// printed once its state store is open.
    fn serve(emulator: &Emulator, home: &Path, extra: &[&str]) -> (Service, String) {
        let mut args = vec![
            "serve-webhook",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--secret",
            SECRET,
        ];
        args.extend_from_slice(extra);
        let mut server = Running::start(emulator, home, &args);
        let url = server.first_line();
        assert!(url.starts_with("http://"), "{url:?}: {}", server.log());
        (server, url)
    }

    /// A poller (poll-echo, forward) once it polls: its state is claimed.
    fn polling(emulator: &Emulator, home: &Path, args: &[&str]) -> Service {
        let poller = Running::start(emulator, home, args);
        wait_until(Duration::from_secs(20), "the poller to poll", || {
            poller.log().contains("polling for updates")
        });
        poller
    }
}

/// `fly ARGS` to its end, with the test bot and `home` as in [`Running`].
fn run_in(emulator: &Emulator, home: &Path, args: &[&str]) -> Output {
    fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .env("HOME", home)
        .env("XDG_STATE_HOME", home.join("state"))
        .args(args)
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap()
}

/// The files in the default state directory, by name.
fn default_files(home: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.join("state/fly"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".db"))
        .collect();
    names.sort();
    names
}

#[test]
fn forward_and_serve_webhook_run_side_by_side_with_default_state() {
    let emulator = Emulator::start();
    let home = tempfile::tempdir().unwrap();
    let (server, url) = Running::serve(&emulator, home.path(), &[]);
    let forward = Running::polling(
        &emulator,
        home.path(),
        &["forward", "--to", &url, "--secret", SECRET, "--grace", "1"],
    );

    let update_id = emulator.user_says("private", "u_side", "side by side");
    wait_until(Duration::from_secs(20), "the echo sent", || {
        emulator.sent().len() == 1
    });
    assert_eq!(
        emulator.sent()[0]["client_msg_id"],
        format!("echo_{update_id}"),
        "{}{}",
        forward.log(),
        server.log()
    );
    // A file each: the pollers' and serve-webhook's.
    let files = default_files(home.path());
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files.iter().any(|name| name.ends_with("-webhook.db")),
        "{files:?}"
    );
}

/// `fly forward` refused on a state file another process holds: its error line.
fn forward_refused(emulator: &Emulator, home: &Path, state: &Path) -> String {
    let output = run_in(
        emulator,
        home,
        &[
            "forward",
            "--to",
            "http://127.0.0.1:9/webhook",
            "--secret",
            SECRET,
            "--state",
            state.to_str().unwrap(),
        ],
    );
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    // One error line, after the start line.
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("fly: error: "), "{stderr}");
    last.to_string()
}

#[test]
fn on_a_shared_state_file_the_refusal_names_what_the_holder_does() {
    let emulator = Emulator::start();
    let home = tempfile::tempdir().unwrap();
    let state = home.path().join("shared.db");

    let (server, _url) = Running::serve(
        &emulator,
        home.path(),
        &["--state", state.to_str().unwrap()],
    );
    let stderr = forward_refused(&emulator, home.path(), &state);
    let expected = format!(
        "another fly process (pid {}) is already serving webhooks with the state file {}",
        server.pid(),
        state.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(!stderr.contains("polling"), "{stderr}");
    drop(server);

    let poller = Running::polling(
        &emulator,
        home.path(),
        &["poll-echo", "--state", state.to_str().unwrap()],
    );
    let stderr = forward_refused(&emulator, home.path(), &state);
    let expected = format!(
        "another fly process (pid {}) is already polling with the state file {}",
        poller.pid(),
        state.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    drop(poller);

    // And the other way round: a poller holding it refuses serve-webhook.
    let forward = Running::polling(
        &emulator,
        home.path(),
        &[
            "forward",
            "--to",
            "http://127.0.0.1:9/webhook",
            "--secret",
            SECRET,
            "--state",
            state.to_str().unwrap(),
        ],
    );
    let output = run_in(
        &emulator,
        home.path(),
        &[
            "serve-webhook",
            "--port",
            "0",
            "--secret",
            SECRET,
            "--state",
            state.to_str().unwrap(),
        ],
    );
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let expected = format!(
        "another fly process (pid {}) is already polling with the state file",
        forward.pid()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

/// `fly dead-letters ARGS` without `--state`: its NDJSON lines.
fn letters(emulator: &Emulator, home: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["dead-letters"];
    all.extend_from_slice(args);
    let output = run_in(emulator, home, &all);
    assert!(output.status.success(), "{}", stderr_of(&output));
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn webhook_file(home: &Path) -> PathBuf {
    let name = default_files(home)
        .into_iter()
        .find(|name| name.ends_with("-webhook.db"))
        .expect("serve-webhook's default file");
    home.join("state/fly").join(name)
}

#[test]
fn dead_letters_without_state_finds_serve_webhooks_and_moves_a_retried_one() {
    let emulator = Emulator::start();
    let home = tempfile::tempdir().unwrap();
    let (server, url) = Running::serve(&emulator, home.path(), &[]);
    // A message with no chat to answer: a dead letter.
    let dead = signed_here(41, "message", r#"{"msgType":"text"}"#, "n-41");
    let answer = post(&url, &dead);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.body.contains("DEAD_LETTER"), "{}", answer.body);

    let listed = letters(&emulator, home.path(), &[]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["update_id"], 41);
    assert_eq!(listed[0]["state"], "dead");
    let webhook = webhook_file(home.path());
    assert_eq!(listed[0]["store"], webhook.display().to_string());

    // Changing it waits for the server to stop, and says what it does.
    let refused = run_in(&emulator, home.path(), &["dead-letters", "--retry", "41"]);
    let stderr = stderr_of(&refused);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "(pid {}) is already serving webhooks",
            server.pid()
        )),
        "{stderr}"
    );
    drop(server);

    // Retried: parked where poll-echo and forward look, gone from the server's.
    let retried = run_in(&emulator, home.path(), &["dead-letters", "--retry", "41"]);
    assert!(retried.status.success(), "{}", stderr_of(&retried));
    let listed = letters(&emulator, home.path(), &[]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "parked");
    let store = listed[0]["store"].as_str().unwrap();
    assert!(
        store.ends_with(".db") && !store.ends_with("-webhook.db"),
        "{store}"
    );

    let dropped = run_in(&emulator, home.path(), &["dead-letters", "--drop", "41"]);
    assert!(dropped.status.success(), "{}", stderr_of(&dropped));
    assert!(letters(&emulator, home.path(), &[]).is_empty());
}

#[test]
fn doctor_without_state_checks_each_default_file_that_exists() {
    let emulator = Emulator::start();
    let home = tempfile::tempdir().unwrap();
    drop(Running::serve(&emulator, home.path(), &[]));
    let output = run_in(&emulator, home.path(), &["doctor"]);
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{report}{}", stderr_of(&output));
    let states: Vec<&str> = report
        .lines()
        .filter(|line| line.split_whitespace().nth(1) == Some("state"))
        .collect();
    assert_eq!(states.len(), 1, "{report}");
    let webhook = webhook_file(home.path());
    assert!(
        states[0].starts_with("ok ")
            && states[0].contains(&format!("{} (serve-webhook) opens", webhook.display())),
        "{report}"
    );

    let once = run_in(&emulator, home.path(), &["poll-echo", "--once"]);
    assert!(once.status.success(), "{}", stderr_of(&once));
    let output = run_in(&emulator, home.path(), &["doctor"]);
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let states: Vec<&str> = report
        .lines()
        .filter(|line| line.split_whitespace().nth(1) == Some("state"))
        .collect();
    assert_eq!(states.len(), 2, "{report}");
    assert!(
        states[0].contains("(poll-echo and forward) opens (poll offset"),
        "{report}"
    );
}
