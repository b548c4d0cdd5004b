//! `fly doctor` against the emulator, and the set-up errors it is there to
//! explain: a refused token, an unreachable platform, a base URL that holds
//! the API path, a clock off by more than the replay window.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use assert_cmd::Command;

use crate::common::{Emulator, RefusedPort, TOKEN, fly, fly_at, stderr_of};

/// `fly doctor` at the emulator with the test token, `home` as HOME (where
/// the default state file would be); flags may follow.
fn doctor_at(emulator: &Emulator, home: &Path) -> Command {
    let mut command = fly_at(emulator);
    command.env("HOME", home).arg("doctor");
    command
}

/// Runs a doctor `command` and checks its exit code; returns its report
/// (stdout, a line per check) and its stderr.
fn report_of(command: &mut Command, code: i32) -> (String, String) {
    let output = command.output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(code), "{report}{stderr}");
    (report, stderr)
}

/// The line of the check list for `check`.
fn check_line<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some(check.split(' ').next().unwrap()))
        .unwrap_or_else(|| panic!("no {check} line in:\n{report}"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn doctor_with_a_good_token_says_where_it_came_from_and_never_shows_it() {
    let emulator = Emulator::start_strict();
    let home = tempfile::tempdir().unwrap();
    let (report, stderr) = report_of(&mut doctor_at(&emulator, home.path()), 0);
    assert_eq!(report.lines().count(), 5, "{report}");
    for check in ["base URL", "token", "API", "clock", "state"] {
        assert!(
            check_line(&report, check).starts_with("ok "),
            "{check}:\n{report}"
        );
    }
    assert!(check_line(&report, "base URL").contains(&emulator.base_url));
    assert!(
        check_line(&report, "token").contains("FLY_BOT_TOKEN"),
        "{report}"
    );
    assert!(check_line(&report, "API").contains("accepted"), "{report}");
    assert!(
        check_line(&report, "state").contains("not created yet"),
        "{report}"
    );
    assert!(!report.contains(TOKEN) && !stderr.contains(TOKEN));
    // Looking created nothing: no state file, no state directory.
    assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 0);

    // From a file: the file is named, the token still never shown.
    let token_file = home.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (report, stderr) = report_of(
        doctor_at(&emulator, home.path())
            .env_remove("FLY_BOT_TOKEN")
            .arg("--token-file")
            .arg(&token_file),
        0,
    );
    let token_line = check_line(&report, "token");
    assert!(token_line.starts_with("ok "), "{report}");
    assert!(
        token_line.contains(&format!("--token-file {}", token_file.display())),
        "{report}"
    );
    assert!(!report.contains(TOKEN) && !stderr.contains(TOKEN));
}

#[test]
fn doctor_with_a_refused_token_exits_1() {
    let emulator = Emulator::start_strict();
    let home = tempfile::tempdir().unwrap();
    let wrong = "wrong-token-5d1e8b";
    let (report, stderr) = report_of(
        doctor_at(&emulator, home.path()).env("FLY_BOT_TOKEN", wrong),
        1,
    );
    let api = check_line(&report, "API");
    assert!(
        api.starts_with("FAIL ") && api.contains("refused the bot token"),
        "{report}"
    );
    assert!(
        check_line(&report, "clock").starts_with("skip "),
        "{report}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("fly: error: API check failed: the platform refused the bot token"),
        "{stderr}"
    );
    assert!(!report.contains(wrong) && !stderr.contains(wrong));
}

#[test]
fn doctor_against_an_unreachable_port_names_the_host() {
    let home = tempfile::tempdir().unwrap();
    let nothing_listens = RefusedPort::new();
    let port = nothing_listens.port;
    let (report, stderr) = report_of(
        fly()
            .env("HOME", home.path())
            .env("FLY_BASE_URL", nothing_listens.url())
            .env("FLY_BOT_TOKEN", TOKEN)
            .arg("doctor"),
        1,
    );
    let refused = format!("connection refused by 127.0.0.1:{port}");
    assert!(check_line(&report, "API").contains(&refused), "{report}");
    let error_line = stderr.lines().last().unwrap();
    assert!(
        error_line.starts_with("fly: error: API check failed: the platform is unreachable")
            && error_line.contains(&refused),
        "{stderr}"
    );
    assert!(!report.contains(TOKEN) && !stderr.contains(TOKEN));
}

#[test]
fn doctor_compares_the_clock_with_the_platforms_date() {
    let emulator = Emulator::start();
    let home = tempfile::tempdir().unwrap();
    let doctor_now = |now: u64, code: i32| {
        report_of(
            doctor_at(&emulator, home.path()).env("FLY_NOW_TS", now.to_string()),
            code,
        )
    };
    // Near the replay window: a warning, still exit 0.
    let (report, _) = doctor_now(unix_now() + 120, 0);
    let clock = check_line(&report, "clock");
    assert!(
        clock.starts_with("warn ") && clock.contains("ahead"),
        "{report}"
    );

    // Past it: every signed webhook would be refused.
    let (report, stderr) = doctor_now(unix_now() - 1000, 1);
    let clock = check_line(&report, "clock");
    assert!(
        clock.starts_with("FAIL ") && clock.contains("behind") && clock.contains("300 s"),
        "{report}"
    );
    assert!(
        stderr.starts_with("fly: error: clock check failed: "),
        "{stderr}"
    );
}

#[test]
fn doctor_opens_an_existing_state_store_and_reports_one_that_is_not() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("bot.db");
    let update_id = emulator.user_says("private", "u_1", "hi");
    let polled = fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(polled.status.success(), "{}", stderr_of(&polled));

    let (report, _) = report_of(
        doctor_at(&emulator, dir.path()).arg("--state").arg(&state),
        0,
    );
    let line = check_line(&report, "state");
    assert!(
        line.contains(&format!(
            "{} opens (poll offset {})",
            state.display(),
            update_id + 1
        )),
        "{report}"
    );

    let not_ours = dir.path().join("notes.txt");
    std::fs::write(&not_ours, "not a database").unwrap();
    let (report, stderr) = report_of(
        doctor_at(&emulator, dir.path())
            .arg("--state")
            .arg(&not_ours),
        1,
    );
    assert!(
        check_line(&report, "state").starts_with("FAIL "),
        "{report}"
    );
    assert!(
        stderr.starts_with("fly: error: state check failed: "),
        "{stderr}"
    );
}

#[test]
fn doctor_says_when_polling_is_refused_because_a_webhook_is_set() {
    let emulator = Emulator::start();
    let home = tempfile::tempdir().unwrap();
    emulator.post(
        "/_emulator/webhook",
        serde_json::json!({"url": "http://127.0.0.1:9/webhook", "secret": "s"}),
    );
    let (report, _) = report_of(&mut doctor_at(&emulator, home.path()), 0);
    let api = check_line(&report, "API");
    assert!(
        api.starts_with("warn ") && api.contains("409") && api.contains("webhook"),
        "{report}"
    );
}

#[test]
fn a_base_url_with_the_api_path_is_exit_2_with_the_fix() {
    let emulator = Emulator::start();
    let home = tempfile::tempdir().unwrap();
    for suffix in ["/api/v1", "/api/v1/s/bot/"] {
        let base_url = format!("{}{suffix}", emulator.base_url);
        for args in [
            &["send", "--to", "u_1", "hello"][..],
            &["poll-echo", "--once"],
            &["doctor"],
        ] {
            let output = fly()
                .env("HOME", home.path())
                .env("FLY_BASE_URL", &base_url)
                .env("FLY_BOT_TOKEN", TOKEN)
                .args(args)
                .output()
                .unwrap();
            let stderr = stderr_of(&output);
            assert_eq!(output.status.code(), Some(2), "{args:?} {suffix}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
            let dropped = suffix.trim_end_matches('/');
            assert!(
                stderr.starts_with("fly: error: ")
                    && stderr.contains(&format!("drop {dropped} from the base URL"))
                    && stderr.contains(&format!("use {}", emulator.base_url)),
                "{args:?}: {stderr}"
            );
        }
    }
    // Nothing reached the platform.
    assert!(emulator.sent().is_empty());
}

#[test]
fn network_errors_name_the_host() {
    let nothing_listens = RefusedPort::new();
    let port = nothing_listens.port;
    let output = fly()
        .env("FLY_BASE_URL", nothing_listens.url())
        .env("FLY_BOT_TOKEN", TOKEN)
        .args(["send", "--to", "u_1", "hello"])
        .output()
        .unwrap();
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let error_line = stderr.lines().last().unwrap();
    assert!(
        error_line.starts_with("fly: error: ")
            && error_line.contains(&format!("connection refused by 127.0.0.1:{port}")),
        "{stderr}"
    );
}
