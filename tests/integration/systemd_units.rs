//! The systemd units of packaging/systemd/ (shipped in the .deb): systemd
//! accepts them, and the command lines they run are ones fly accepts, with
//! the token and the secret from credential files as `LoadCredential=`
//! hands them over.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{
    Emulator, NO_CONFIG_HOME, TOKEN, fly_path, signal, stderr_of, wait_for_exit, wait_until,
};

const UNITS: [&str; 2] = ["fly-poll-echo@.service", "fly-serve-webhook@.service"];

fn unit_text(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/systemd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The values of `Key=` lines, in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
#[ignore = "needs systemd-analyze"]
fn systemd_analyze_verify_accepts_the_units() {
    // A root as after installing the .deb: /usr/bin/fly, the units, and the
    // system's own units they depend on (sysinit.target, …).
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("usr/lib/systemd/system");
    copy_tree(Path::new("/usr/lib/systemd/system"), &units);
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fly = bin.join("fly");
    let launcher = format!("#!/bin/sh\nexec '{}' \"$@\"\n", fly_path().display());
    std::fs::write(&fly, launcher).unwrap();
    std::fs::set_permissions(&fly, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut verify = Command::new("systemd-analyze");
    verify
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", root.path().display()));
    for name in UNITS {
        std::fs::write(units.join(name), unit_text(name)).unwrap();
        verify.arg(units.join(name));
    }
    let output = verify.output().expect("run systemd-analyze");
    // A misspelt setting is only a warning (exit 0): none is allowed.
    assert!(
        output.status.success() && output.stderr.is_empty() && output.stdout.is_empty(),
        "systemd-analyze verify: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        stderr_of(&output)
    );
}

/// `from` into `to`, symbolic links as links.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_tree(&source, &target);
        } else {
            std::fs::copy(&source, &target).unwrap();
        }
    }
}

#[test]
fn the_units_hand_over_the_token_as_a_credential_and_are_hardened() {
    for name in UNITS {
        let unit = unit_text(name);
        for setting in [
            "Type=notify",
            "NotifyAccess=main",
            "Restart=on-failure",
            "LoadCredential=token:/etc/fly/%i.token",
            "EnvironmentFile=-/etc/fly/%i.env",
            "StateDirectory=fly/%i",
            "KillMode=mixed",
            "DynamicUser=yes",
            "CapabilityBoundingSet=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "SystemCallFilter=@system-service",
            "MemoryDenyWriteExecute=yes",
        ] {
            assert!(
                unit.lines().any(|line| line == setting),
                "{name} lacks {setting}"
            );
        }
        assert!(
            !values(&unit, "WatchdogSec").is_empty(),
            "{name}: no watchdog"
        );
        let [exec] = values(&unit, "ExecStart")[..] else {
            panic!("{name}: not one ExecStart");
        };
        assert!(
            exec.contains("--token-file ${CREDENTIALS_DIRECTORY}/token"),
            "{name}: {exec}"
        );
        assert!(
            !unit.contains("FLY_BOT_TOKEN"),
            "{name}: a token in the environment"
        );
        // The stop timeout leaves room for the grace period.
        let grace: u64 = exec
            .split_whitespace()
            .skip_while(|word| *word != "--grace")
            .nth(1)
            .and_then(|secs| secs.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no --grace in {exec}"));
        let [stop] = values(&unit, "TimeoutStopSec")[..] else {
            panic!("{name}: not one TimeoutStopSec");
        };
        assert!(stop.parse::<u64>().unwrap() > grace + 5, "{name}");
    }
    let webhook = unit_text("fly-serve-webhook@.service");
    assert!(webhook.contains("LoadCredential=secret:/etc/fly/%i.secret"));
    assert!(webhook.contains("--secret-file ${CREDENTIALS_DIRECTORY}/secret"));
}

/// A unit's command line as systemd would run instance `mybot`: the
/// credentials in `credentials`, the state directory `state`, fly the one
/// under test, NOTIFY_SOCKET unset; then `extra`.
fn service_command(
    name: &str,
    credentials: &Path,
    state: &Path,
    base_url: &str,
    extra: &[&str],
) -> Command {
    let unit = unit_text(name);
    let [exec] = values(&unit, "ExecStart")[..] else {
        panic!("{name}: not one ExecStart");
    };
    let credentials = credentials.to_str().unwrap();
    let mut words = exec
        .split_whitespace()
        .map(|word| word.replace("${CREDENTIALS_DIRECTORY}", credentials));
    assert_eq!(words.next().as_deref(), Some("/usr/bin/fly"), "{name}");
    let mut command = Command::new(fly_path());
    command
        .args(words)
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", "/")
        .env("XDG_CONFIG_HOME", NO_CONFIG_HOME)
        .env("FLY_BASE_URL", base_url)
        .env("CREDENTIALS_DIRECTORY", credentials);
    for assignment in values(&unit, "Environment") {
        let (key, value) = assignment.split_once('=').unwrap();
        let value = value.replace("%S/fly/%i", state.to_str().unwrap());
        assert!(!value.contains('%'), "{name}: {assignment}");
        command.env(key, value);
    }
    command
}

#[test]
fn poll_echo_runs_as_its_unit_says_with_the_token_credential() {
    // Only the test token is accepted: the one in the credential file.
    let emulator = Emulator::start_strict();
    let dir = tempfile::tempdir().unwrap();
    let (credentials, state) = (dir.path().join("credentials"), dir.path().join("state"));
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(credentials.join("token"), format!("{TOKEN}\n")).unwrap();
    let output = service_command(
        "fly-poll-echo@.service",
        &credentials,
        &state,
        &emulator.base_url,
        &["--once"],
    )
    .output()
    .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(
        state.join("poll-echo.db").is_file(),
        "no state file in the state directory"
    );
}

#[test]
fn serve_webhook_runs_as_its_unit_says_with_its_credentials() {
    let emulator = Emulator::start_strict();
    let dir = tempfile::tempdir().unwrap();
    let (credentials, state) = (dir.path().join("credentials"), dir.path().join("state"));
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(credentials.join("token"), TOKEN).unwrap();
    std::fs::write(credentials.join("secret"), "webhook-secret").unwrap();
    let mut child = service_command(
        "fly-serve-webhook@.service",
        &credentials,
        &state,
        &emulator.base_url,
        &["--bind", "127.0.0.1", "--port", "0"],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut first_line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    assert!(
        first_line.starts_with("http://127.0.0.1:"),
        "{first_line:?}"
    );
    wait_until(
        Duration::from_secs(30),
        "the state file in the state directory",
        || state.join("serve-webhook.db").is_file(),
    );
    signal(child.id(), libc::SIGTERM);
    let status = wait_for_exit(&mut child, Duration::from_secs(30)).expect("exits on SIGTERM");
    assert!(status.success(), "{status}");
}
