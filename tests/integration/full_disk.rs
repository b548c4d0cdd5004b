//! The state store on a filesystem that fills up (a small tmpfs mounted
//! here, so these tests need root: CI runs them as root), and a state file
//! deleted while fly runs.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{Emulator, Service, echo, fly_at, stderr_of, wait_until};
use crate::serve_webhook::{
    Answer, SECRET, Server, agent, answer, get, post_with, signed_callback, signed_here,
};

/// A tmpfs of `size` mounted on a new directory; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "mounting a tmpfs failed (these tests need root): {}",
            stderr_of(&output)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills what is left with `filler`, to the last byte it takes.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        for chunk in [64 * 1024, 4096, 512, 1] {
            let bytes = vec![0x5a; chunk];
            while file.write_all(&bytes).is_ok() {}
        }
        assert!(
            std::fs::write(self.path().join("one-more"), b"x").is_err(),
            "the filesystem should be full"
        );
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn signed_text(update_id: i64, text: &str) -> String {
    let message = format!(
        r#"{{"chat":{{"id":"u_disk","type":"private"}},"data":{{"content":"{text}"}},"msgType":"text"}}"#
    );
    signed_here(update_id, "message", &message, &format!("t-{update_id}"))
}

/// Every other update a text (answered on a worker thread), the others
/// callbacks (confirmed on the I/O thread): both ways a delivery is marked.
fn delivery(update_id: i64) -> String {
    if update_id % 2 == 0 {
        signed_text(update_id, &format!("m {update_id}"))
    } else {
        signed_callback(update_id, &format!("c-{update_id}"))
    }
}

fn handled_ids(state: &Path) -> BTreeSet<i64> {
    let connection = rusqlite::Connection::open(state).unwrap();
    let mut statement = connection
        .prepare("SELECT update_id FROM handled_updates")
        .unwrap();
    statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |found| found.len())
}

/// poll-echo on `state`, once it has answered `text` from u_1.
fn poll_echo_answering(emulator: &Emulator, state: &Path, text: &str) -> Service {
    let service = Service::start(emulator, &["poll-echo", "--state", state.to_str().unwrap()]);
    let first = emulator.user_says("private", "u_1", text);
    wait_until(Duration::from_secs(15), "the first reply", || {
        emulator
            .sent()
            .contains(&echo(first, text, ("to_user_id", "u_1")))
    });
    service
}

/// serve-webhook with its state on a new 2 MB tmpfs: the disk (unmounted
/// when dropped), the state file's path, the server.
fn serve_on_a_small_disk(emulator: &Emulator, logs: &Path) -> (Tmpfs, PathBuf, Server) {
    let disk = Tmpfs::mount("2m");
    let state = disk.path().join("s.db");
    let server = Server::start_with_state(
        &emulator.base_url,
        logs,
        state.as_os_str(),
        &["--secret", SECRET],
    );
    (disk, state, server)
}

/// On a full disk serve-webhook answers 503 (the platform delivers again)
/// and /readyz fails; a batch it could not write is kept and written once
/// there is room again, by itself: every delivery answered 200 is on record
/// after a clean stop.
#[test]
#[ignore = "needs root to mount a tmpfs"]
fn serve_webhook_on_a_full_disk_answers_503_and_loses_nothing_it_answered_200() {
    let emulator = Emulator::start();
    let logs = tempfile::tempdir().unwrap();
    let (disk, state, mut server) = serve_on_a_small_disk(&emulator, logs.path());
    let agent = agent();
    let mut answered_200 = BTreeSet::new();
    deliver_answered_200(&agent, &server, 1..=20, &mut answered_200);
    // Writes paused: the log file is emptied, so the next batch needs room.
    wait_until(Duration::from_secs(10), "the log emptied", || {
        file_size(&disk.path().join("s.db-wal")) == 0
    });
    let filler = disk.fill();

    let refused = deliver_while_full(&server, &mut answered_200);
    let readyz = format!("{}/readyz", server.origin);
    assert_eq!(get(&readyz), answer(503, "STATE_STORE_UNAVAILABLE"));
    assert_eq!(
        get(&format!("{}/healthz", server.origin)),
        answer(200, "ok")
    );

    // Room again: it catches up by itself, and deliveries are answered.
    std::fs::remove_file(filler).unwrap();
    wait_until(Duration::from_secs(10), "/readyz answering 200", || {
        get(&readyz).status == 200
    });
    for &update_id in &refused {
        let got = post_with(&agent, &server.url, &delivery(update_id));
        assert!(
            got == answer(200, "OK") || got == answer(200, "DUPLICATE"),
            "update {update_id} delivered again: {got:?}"
        );
        answered_200.insert(update_id);
    }
    deliver_answered_200(&agent, &server, 1000..1020, &mut answered_200);
    server.terminate();
    let status = server.wait_for_exit(Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", server.log());

    let handled = handled_ids(&state);
    let lost: Vec<&i64> = answered_200.difference(&handled).collect();
    assert!(
        lost.is_empty(),
        "answered 200 but not on record: {lost:?}\n{}",
        server.log()
    );
    // Each text update was answered once, whatever was delivered again.
    let sent = emulator.sent();
    for update_id in answered_200.iter().filter(|id| *id % 2 == 0) {
        let expected = echo(
            *update_id,
            &format!("m {update_id}"),
            ("to_user_id", "u_disk"),
        );
        assert!(sent.contains(&expected), "no reply to {update_id}");
    }
}

/// Delivers each of `update_ids`, one after the other, each answered 200.
fn deliver_answered_200(
    agent: &ureq::Agent,
    server: &Server,
    update_ids: impl IntoIterator<Item = i64>,
    answered_200: &mut BTreeSet<i64>,
) {
    for update_id in update_ids {
        assert_eq!(
            post_with(agent, &server.url, &delivery(update_id)),
            answer(200, "OK")
        );
        answered_200.insert(update_id);
    }
}

/// Delivers 300 updates four at a time, as a platform does (some are in hand
/// when the first write fails), to a server whose disk is full: each is
/// answered 200 (kept in `answered_200`) or 503, and most are refused.
/// Returns the refused ones.
fn deliver_while_full(server: &Server, answered_200: &mut BTreeSet<i64>) -> Vec<i64> {
    let answers: Vec<(i64, Answer)> = std::thread::scope(|scope| {
        let senders: Vec<_> = (0..4)
            .map(|sender| {
                let url = &server.url;
                scope.spawn(move || {
                    let own = crate::serve_webhook::agent();
                    (100 + sender..400)
                        .step_by(4)
                        .map(|update_id| (update_id, post_with(&own, url, &delivery(update_id))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        senders
            .into_iter()
            .flat_map(|sender| sender.join().unwrap())
            .collect()
    });
    let mut refused = Vec::new();
    for (update_id, got) in answers {
        match (got.status, got.body.as_str()) {
            (200, "OK") => {
                answered_200.insert(update_id);
            }
            (503, "STATE_STORE_UNAVAILABLE") => refused.push(update_id),
            _ => panic!("update {update_id}: {got:?}\n{}", server.log()),
        }
    }
    assert!(
        refused.len() > 250,
        "deliveries while the disk is full are refused, not answered 200: {} refused\n{}",
        refused.len(),
        server.log()
    );
    refused
}

/// A clean stop while the disk is still full: what could not be written is
/// said, and the exit is 1.
#[test]
#[ignore = "needs root to mount a tmpfs"]
fn a_clean_stop_on_a_full_disk_says_what_could_not_be_written() {
    let emulator = Emulator::start();
    let logs = tempfile::tempdir().unwrap();
    let (disk, state, mut server) = serve_on_a_small_disk(&emulator, logs.path());
    let agent = agent();
    assert_eq!(
        post_with(&agent, &server.url, &delivery(1)),
        answer(200, "OK")
    );
    wait_until(Duration::from_secs(10), "the log emptied", || {
        file_size(&disk.path().join("s.db-wal")) == 0
    });
    disk.fill();
    for update_id in 2..50 {
        post_with(&agent, &server.url, &delivery(update_id));
    }
    let readyz = format!("{}/readyz", server.origin);
    wait_until(Duration::from_secs(10), "/readyz failing", || {
        get(&readyz).status == 503
    });
    server.terminate();
    let status = server.wait_for_exit(Duration::from_secs(20)).unwrap();
    let log = server.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let last = log.lines().last().unwrap_or_default();
    let state = state.display();
    assert!(
        last.contains(" handled id")
            && last.contains(" nonce")
            && last.contains(&format!("could not be written to the state file {state}: "))
            && last.contains("database or disk is full"),
        "{log}"
    );
}

/// poll-echo on a full disk stops (exit 1) rather than confirm what it
/// could not record; with room again, the update is answered.
#[test]
#[ignore = "needs root to mount a tmpfs"]
fn poll_echo_on_a_full_disk_exits_1_and_loses_nothing() {
    let emulator = Emulator::start();
    let disk = Tmpfs::mount("2m");
    let state = disk.path().join("s.db");
    let mut service = poll_echo_answering(&emulator, &state, "before");
    let filler = disk.fill();
    let second = emulator.user_says("private", "u_1", "while full");
    let status = service.wait(Duration::from_secs(15));
    let log = service.log();
    assert_eq!(status.and_then(|status| status.code()), Some(1), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains("database or disk is full"), "{log}");

    std::fs::remove_file(filler).unwrap();
    let polled = fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(polled.status.success(), "{}", stderr_of(&polled));
    assert!(
        handled_ids(&state).contains(&second),
        "{}",
        stderr_of(&polled)
    );
    let again = echo(second, "while full", ("to_user_id", "u_1"));
    assert!(emulator.sent().contains(&again));
}

/// A state file deleted under a running serve-webhook stops it (exit 1,
/// one line saying so), even while no delivery comes.
#[test]
fn serve_webhook_stops_when_its_state_file_is_deleted() {
    let emulator = Emulator::start();
    let logs = tempfile::tempdir().unwrap();
    let states = tempfile::tempdir().unwrap();
    let state_dir = states.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let state = state_dir.join("s.db");
    let mut server = Server::start_with_state(
        &emulator.base_url,
        logs.path(),
        state.as_os_str(),
        &["--secret", SECRET],
    );
    assert_eq!(
        post_with(&agent(), &server.url, &delivery(1)),
        answer(200, "OK")
    );
    std::fs::remove_dir_all(&state_dir).unwrap();
    let status = server.wait_for_exit(Duration::from_secs(10));
    let log = server.log();
    assert_eq!(status.and_then(|status| status.code()), Some(1), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!(
            "the state file {} was deleted (or moved) while fly ran",
            state.display()
        )),
        "{log}"
    );
}

/// A state file deleted under a running poll-echo is noticed at its next
/// write: exit 1, one line saying so, never an update confirmed into a file
/// that is gone.
#[test]
fn poll_echo_stops_when_its_state_file_is_deleted() {
    let emulator = Emulator::start();
    let states = tempfile::tempdir().unwrap();
    let state = states.path().join("s.db");
    let mut service = poll_echo_answering(&emulator, &state, "one");
    std::fs::remove_file(&state).unwrap();
    emulator.user_says("private", "u_1", "two");
    let status = service.wait(Duration::from_secs(15));
    let log = service.log();
    assert_eq!(status.and_then(|status| status.code()), Some(1), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!(
            "the state file {} was deleted (or moved) while fly ran",
            state.display()
        )),
        "{log}"
    );
}
