//! Parking (SPEC section 3, `fly dead-letters`): one update that keeps
//! failing never stops the other chats, and is answered once it can be.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::{Emulator, Service, eventually, fly};

/// A handler that fails for chat `u_bad` until `fixed` exists, and answers
/// everyone else (and `u_bad` after the fix) with `re: TEXT`.
fn flaky_handler(fixed: &Path) -> String {
    format!(
        r#"cat >/dev/null
        if [ "$FLY_CHAT_ID" = u_bad ] && [ ! -e '{}' ]; then echo "not today" >&2; exit 1; fi
        echo "re: $FLY_UPDATE_ID""#,
        fixed.display()
    )
}

fn letters(state: &Path) -> Vec<Value> {
    let output = fly()
        .args(["dead-letters", "--state"])
        .arg(state)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn answered(emulator: &Emulator) -> Vec<String> {
    emulator
        .sent()
        .iter()
        .map(|sent| {
            sent["data"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// Without parking, the failing update holds the offset and the platform's
/// window of 50 fills with handled updates: 49 answered, then nothing.
#[test]
fn one_failing_chat_never_stops_the_others_and_is_answered_once_fixed() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let fixed = dir.path().join("fixed");
    let first_bad = emulator.user_says("private", "u_bad", "first");
    let mut others = Vec::new();
    for round in 0..20 {
        for user in ["u_1", "u_2", "u_3", "u_4", "u_5"] {
            others.push(emulator.user_says("private", user, &format!("m{round}")));
        }
    }
    let second_bad = emulator.user_says("private", "u_bad", "second");
    let handler = flaky_handler(&fixed);
    let service = Service::start(
        &emulator,
        &[
            "poll-echo",
            "--state",
            state.to_str().unwrap(),
            "--exec",
            &handler,
            "--max-attempts",
            "2",
            "--park-retry-max",
            "0.3",
            "--poll-timeout",
            "1",
        ],
    );
    let expected_others: Vec<String> = others.iter().map(|id| format!("re: {id}")).collect();
    assert!(
        eventually(Duration::from_secs(60), || {
            let sent = answered(&emulator);
            expected_others.iter().all(|reply| sent.contains(reply))
        }),
        "answered {} of 100 others\n{}",
        answered(&emulator).len(),
        service.log()
    );
    assert!(!answered(&emulator).contains(&format!("re: {first_bad}")));
    // Both of u_bad's updates are recorded: the first with its error, the
    // second waiting behind it.
    let listed = letters(&state);
    let ids: Vec<i64> = listed
        .iter()
        .map(|l| l["update_id"].as_i64().unwrap())
        .collect();
    assert!(
        ids.contains(&first_bad) && ids.contains(&second_bad),
        "{listed:?}"
    );
    assert!(listed.iter().all(|l| l["state"] == "parked"), "{listed:?}");
    assert!(service.log().contains("update parked"), "{}", service.log());

    std::fs::write(&fixed, "").unwrap();
    assert!(
        eventually(Duration::from_secs(30), || {
            let sent = answered(&emulator);
            sent.contains(&format!("re: {second_bad}"))
        }),
        "{}",
        service.log()
    );
    let sent = answered(&emulator);
    let position = |reply: String| sent.iter().position(|s| *s == reply).unwrap();
    assert!(
        position(format!("re: {first_bad}")) < position(format!("re: {second_bad}")),
        "u_bad's updates in order: {sent:?}"
    );
    assert_eq!(sent.len(), 102, "each answered once: {sent:?}");
    assert!(
        eventually(Duration::from_secs(10), || letters(&state).is_empty()),
        "{:?}",
        letters(&state)
    );
}

/// A parked update outlives the process: a restart tries it again (here,
/// after the fix), and `--drop` gives one up for good.
#[test]
fn parked_updates_survive_a_restart_and_can_be_dropped() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let fixed = dir.path().join("fixed");
    let bad = emulator.user_says("private", "u_bad", "one");
    let good = emulator.user_says("private", "u_1", "two");
    let handler = flaky_handler(&fixed);
    {
        let service = poll_echo_failing_once(&emulator, &state, &handler);
        assert!(
            eventually(Duration::from_secs(30), || answered(&emulator)
                .contains(&format!("re: {good}"))
                && letters(&state).len() == 1),
            "{}",
            service.log()
        );
    }
    // The offset passed it; only the store remembers it.
    std::fs::write(&fixed, "").unwrap();
    let service = poll_echo_failing_once(&emulator, &state, &handler);
    assert!(
        eventually(Duration::from_secs(30), || answered(&emulator)
            .contains(&format!("re: {bad}"))),
        "{}",
        service.log()
    );
    // Forgotten once marked handled (just after the reply).
    assert!(
        eventually(Duration::from_secs(10), || letters(&state).is_empty()),
        "{}",
        service.log()
    );
    drop(service);

    std::fs::remove_file(&fixed).unwrap();
    a_dropped_update_stays_dropped(&emulator, &state, &fixed, &handler);
}

/// poll-echo with `handler`, which parks an update the first time it fails.
fn poll_echo_failing_once(emulator: &Emulator, state: &Path, handler: &str) -> Service {
    Service::start(
        emulator,
        &[
            "poll-echo",
            "--state",
            state.to_str().unwrap(),
            "--exec",
            handler,
            "--max-attempts",
            "1",
            "--poll-timeout",
            "1",
        ],
    )
}

/// `fly dead-letters --state STATE ACTION...`.
fn dead_letters(state: &Path, action: &[&str]) -> std::process::Output {
    fly()
        .args(["dead-letters", "--state"])
        .arg(state)
        .args(action)
        .output()
        .unwrap()
}

/// --drop: a parked update is marked handled and forgotten, and not answered
/// after the fix; --retry of an unknown id is exit 2.
fn a_dropped_update_stays_dropped(emulator: &Emulator, state: &Path, fixed: &Path, handler: &str) {
    let doomed = emulator.user_says("private", "u_bad", "three");
    {
        let service = poll_echo_failing_once(emulator, state, handler);
        assert!(
            eventually(Duration::from_secs(30), || letters(state).len() == 1),
            "{}",
            service.log()
        );
    }
    let dropped = dead_letters(state, &["--drop", &doomed.to_string()]);
    assert!(
        dropped.status.success(),
        "{}",
        String::from_utf8_lossy(&dropped.stderr)
    );
    assert!(letters(state).is_empty());
    let unknown = dead_letters(state, &["--retry", "12345"]);
    assert_eq!(unknown.status.code(), Some(2));
    std::fs::write(fixed, "").unwrap();
    let output = fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", crate::common::TOKEN)
        .args([
            "poll-echo",
            "--once",
            "--state",
            state.to_str().unwrap(),
            "--exec",
            handler,
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(
        !answered(emulator).contains(&format!("re: {doomed}")),
        "a dropped update stays dropped"
    );
}

/// VmRSS of a process in KiB, from /proc (Linux).
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends `count` updates of 200 KB to the parked chat `u_bad`: each is
/// recorded in the store, and the process barely grows. Returns their ids.
fn park_later_updates(
    emulator: &Emulator,
    service: &Service,
    state: &Path,
    count: usize,
) -> Vec<i64> {
    let before = resident_kib(service.child.id());
    let filler = "x".repeat(200 * 1024);
    let later: Vec<i64> = (0..count)
        .map(|n| emulator.user_says("private", "u_bad", &format!("{n} {filler}")))
        .collect();
    // All recorded in the store, and the offset past them: confirmed, so
    // the platform no longer holds them.
    assert!(
        eventually(Duration::from_secs(60), || letters(state).len()
            == count + 1),
        "{} letters\n{}",
        letters(state).len(),
        service.log()
    );
    let listed = letters(state);
    assert!(listed.iter().all(|l| l["state"] == "parked"));
    let after = resident_kib(service.child.id());
    eprintln!("resident: {before} KiB before, {after} KiB with {count} updates parked");
    assert!(
        after < before + 20 * 1024,
        "fly grew from {before} KiB to {after} KiB while {count} updates of 200 KB waited"
    );
    later
}

/// A parked chat that keeps receiving messages: what comes for it is
/// recorded in the store, behind the parked update, and not held in memory
/// (150 updates of 200 KB each would be 30 MB of bytes, and more parsed);
/// once the chat recovers (here after a restart), every one is answered,
/// in order.
#[test]
fn a_parked_chats_later_updates_wait_in_the_store_not_in_memory() {
    const LATER: usize = 150;
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let fixed = dir.path().join("fixed");
    let first_bad = emulator.user_says("private", "u_bad", "first");
    let handler = flaky_handler(&fixed);
    let args = [
        "poll-echo",
        "--state",
        state.to_str().unwrap(),
        "--exec",
        &handler,
        "--max-attempts",
        "1",
        "--park-retry-max",
        "0.5",
        "--poll-timeout",
        "1",
        "--limit",
        "10",
    ];
    let service = Service::start(&emulator, &args);
    assert!(
        eventually(Duration::from_secs(30), || service
            .log()
            .contains("update parked")),
        "{}",
        service.log()
    );
    let later = park_later_updates(&emulator, &service, &state, LATER);
    let probe = emulator.user_says("private", "u_1", "still here");
    assert!(
        eventually(Duration::from_secs(30), || answered(&emulator)
            .contains(&format!("re: {probe}"))),
        "{}",
        service.log()
    );

    // A restart reads them back a batch at a time, still in order.
    drop(service);
    let service = Service::start(&emulator, &args);
    assert!(
        eventually(Duration::from_secs(30), || service
            .log()
            .contains("parked updates from an earlier run")),
        "{}",
        service.log()
    );
    std::fs::write(&fixed, "").unwrap();
    let mut expected: Vec<String> = vec![format!("re: {first_bad}")];
    expected.extend(later.iter().map(|id| format!("re: {id}")));
    assert!(
        eventually(Duration::from_secs(120), || {
            let sent = answered(&emulator);
            expected.iter().all(|reply| sent.contains(reply))
        }),
        "answered {} of {}\n{}",
        answered(&emulator).len(),
        expected.len() + 1,
        service.log()
    );
    let in_order: Vec<String> = answered(&emulator)
        .into_iter()
        .filter(|reply| expected.contains(reply))
        .collect();
    assert_eq!(in_order, expected, "u_bad's updates in order, each once");
    assert!(
        eventually(Duration::from_secs(10), || letters(&state).is_empty()),
        "{:?}",
        letters(&state).len()
    );
}
