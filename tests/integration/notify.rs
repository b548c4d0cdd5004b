//! Readiness for a service manager (systemd's `Type=notify`): the real
//! `fly` told of a datagram socket in `NOTIFY_SOCKET`, as systemd does, and
//! what it says there: `READY=1`, `STATUS=…`, `STOPPING=1`, `WATCHDOG=1`.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{
    Emulator, Service, answering_in_turn, fly_child, read_request, sign_update, signal,
    unique_number, wait_until,
};
use crate::redis::{Poller, RedisServer};
use crate::serve_webhook::{SECRET, Server, post, text_update};

/// The service manager's end: a datagram socket fly is pointed at.
struct Manager {
    socket: UnixDatagram,
    /// What `NOTIFY_SOCKET` says: a path, or `@name`.
    address: String,
    /// Everything received so far, in order.
    said: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Manager {
    /// A socket at a path in a directory of its own.
    fn at_a_path() -> Manager {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        Manager {
            socket,
            address: path.to_str().unwrap().to_string(),
            said: Vec::new(),
            _dir: Some(dir),
        }
    }

    /// A socket in Linux's abstract namespace (`@name`), as systemd's own.
    fn abstract_name() -> Manager {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("fly-test-notify-{}", unique_number());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&address).unwrap();
        Manager {
            socket,
            address: format!("@{name}"),
            said: Vec::new(),
            _dir: None,
        }
    }

    /// The next message, if one comes within `limit`.
    fn next(&mut self, limit: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(limit.max(Duration::from_millis(1))))
            .unwrap();
        let mut buffer = [0u8; 4096];
        let read = self.socket.recv(&mut buffer).ok()?;
        let message = String::from_utf8_lossy(&buffer[..read]).into_owned();
        self.said.push(message.clone());
        Some(message)
    }

    /// Reads until a message satisfies `wanted` (and returns it), failing
    /// the test after `limit`.
    fn wait_for(&mut self, limit: Duration, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} within {limit:?}: {:?}",
                self.said
            );
            if let Some(message) = self.next(left)
                && wanted(&message)
            {
                return message;
            }
        }
    }

    /// Every message that comes within `window`, from now.
    fn during(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return seen;
            }
            if let Some(message) = self.next(left) {
                seen.push(message);
            }
        }
    }

    /// Waits until `quiet` passes without a `WATCHDOG=1` (true), or `limit`
    /// without such a silence (false).
    fn pings_stop(&mut self, quiet: Duration, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut last_ping = Instant::now();
        while Instant::now() < deadline {
            let wait = (last_ping + quiet).saturating_duration_since(Instant::now());
            if wait.is_zero() {
                return true;
            }
            if self
                .next(wait)
                .is_some_and(|message| message == "WATCHDOG=1")
            {
                last_ping = Instant::now();
            }
        }
        false
    }

    /// Whatever is queued now, without waiting.
    fn queued(&mut self) -> Vec<String> {
        self.socket.set_nonblocking(true).unwrap();
        let mut buffer = [0u8; 4096];
        let mut seen = Vec::new();
        while let Ok(read) = self.socket.recv(&mut buffer) {
            seen.push(String::from_utf8_lossy(&buffer[..read]).into_owned());
        }
        self.socket.set_nonblocking(false).unwrap();
        seen
    }
}

fn pings(messages: &[String]) -> usize {
    messages
        .iter()
        .filter(|message| *message == "WATCHDOG=1")
        .count()
}

/// `fly poll-echo` told of `manager` (and `env`), with its state in `dir`.
fn poll_echo(
    base_url: &str,
    manager: &Manager,
    dir: &Path,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Service {
    let mut command = fly_child(base_url);
    command
        .env("NOTIFY_SOCKET", &manager.address)
        .envs(env.iter().copied());
    let state = dir.join("state.db");
    let mut args = vec!["poll-echo", "--state", state.to_str().unwrap()];
    args.extend_from_slice(extra);
    Service::spawn(command, &args)
}

const READY_WITHIN: Duration = Duration::from_secs(30);

/// A stand-in platform's answer to a poll: no updates.
const NO_UPDATES: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
    content-length: 43\r\nconnection: close\r\n\r\n\
    {\"code\":0,\"msg\":\"ok\",\"data\":{\"updates\":[]}}";

/// `fly poll-echo` on `base_url` under a watchdog (`WATCHDOG_USEC` 0.4 s),
/// polling with a 1 s timeout, once it said `READY=1`; its state directory
/// lives as long as the returned one (dropped last, after the service).
fn watched_poller(base_url: &str) -> (tempfile::TempDir, Manager, Service) {
    let dir = tempfile::tempdir().unwrap();
    let mut manager = Manager::at_a_path();
    let service = poll_echo(
        base_url,
        &manager,
        dir.path(),
        &[("WATCHDOG_USEC", "400000")],
        &["--poll-timeout", "1"],
    );
    manager.wait_for(READY_WITHIN, "READY=1", |message| message == "READY=1");
    (dir, manager, service)
}

#[test]
fn poll_echo_is_ready_once_it_polls_says_its_status_and_stopping_on_sigterm() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut manager = Manager::at_a_path();
    let mut service = poll_echo(
        &emulator.base_url,
        &manager,
        dir.path(),
        &[],
        &["--poll-timeout", "1"],
    );
    manager.wait_for(READY_WITHIN, "READY=1", |message| message == "READY=1");
    let update_id = emulator.user_says("private", "u_1", "hello");
    wait_until(Duration::from_secs(30), "the echo", || {
        !emulator.sent().is_empty()
    });
    let past = format!(
        "STATUS=polling: offset {}, 0 updates in flight",
        update_id + 1
    );
    manager.wait_for(Duration::from_secs(30), &past, |message| message == past);
    signal(service.pid(), libc::SIGTERM);
    manager.wait_for(Duration::from_secs(30), "STOPPING=1", |message| {
        message == "STOPPING=1"
    });
    let status = service.wait(Duration::from_secs(30)).expect("fly stops");
    assert!(status.success(), "{status}: {}", service.log());
    let statuses: Vec<&String> = manager
        .said
        .iter()
        .filter(|message| message.starts_with("STATUS="))
        .collect();
    assert!(
        statuses.len() < 20,
        "status lines are throttled: {statuses:?}"
    );
    assert_eq!(pings(&manager.said), 0, "no watchdog was asked for");
}

/// A poller that stands by for the polling lease (a Redis state another
/// poller holds) is up: ready, and says so; and says when the store is out
/// of reach.
#[test]
#[ignore = "needs redis-server"]
fn a_poller_standing_by_is_ready_and_says_what_it_waits_for() {
    let emulator = Emulator::start();
    let mut redis = RedisServer::unix();
    let dir = tempfile::tempdir().unwrap();
    let holder = Poller::start(&emulator, &redis, dir.path(), &[]);
    wait_until(Duration::from_secs(30), "the first poller to poll", || {
        holder.log().contains("polling for updates")
    });
    let mut manager = Manager::at_a_path();
    let mut command = fly_child(&emulator.base_url);
    command.env("NOTIFY_SOCKET", &manager.address);
    let url = redis.url();
    let _standby = Service::spawn(
        command,
        &["poll-echo", "--poll-timeout", "1", "--state", &url],
    );
    manager.wait_for(READY_WITHIN, "READY=1", |message| message == "READY=1");
    let standing_by = "STATUS=standing by: another poller holds the polling lease";
    manager.wait_for(Duration::from_secs(10), standing_by, |message| {
        message == standing_by
    });
    redis.kill();
    manager.wait_for(
        Duration::from_secs(30),
        "the store out of reach",
        |message| message.starts_with("STATUS=state store unreachable"),
    );
}

#[test]
fn an_abstract_socket_is_told_too() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut manager = Manager::abstract_name();
    let _service = poll_echo(
        &emulator.base_url,
        &manager,
        dir.path(),
        &[],
        &["--poll-timeout", "1"],
    );
    manager.wait_for(READY_WITHIN, "READY=1", |message| message == "READY=1");
    manager.wait_for(Duration::from_secs(10), "a polling status", |message| {
        message.starts_with("STATUS=polling: offset ")
    });
}

#[test]
fn serve_webhook_is_ready_once_it_listens_and_says_what_it_answered() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut manager = Manager::at_a_path();
    let mut command = fly_child(&emulator.base_url);
    command
        .env("NOTIFY_SOCKET", &manager.address)
        .env("WATCHDOG_USEC", "400000");
    let state = dir.path().join("s.db");
    let mut server = Server::start_from(
        command,
        dir.path(),
        state.as_os_str(),
        &["--secret", SECRET],
    );
    // The URL is printed: it listens, and says so.
    manager.wait_for(READY_WITHIN, "READY=1", |message| message == "READY=1");
    let port = server
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let serving = format!("STATUS=serving on 127.0.0.1:{port}: 0 requests answered, 0 in flight");
    manager.wait_for(Duration::from_secs(10), &serving, |message| {
        message == serving
    });
    let signed = sign_update(&text_update(7, ("private", "u_1"), "hi"), SECRET, &[]);
    assert_eq!(post(&server.url, &signed).status, 200);
    let answered = format!("STATUS=serving on 127.0.0.1:{port}: 1 requests answered, 0 in flight");
    manager.wait_for(Duration::from_secs(10), &answered, |message| {
        message == answered
    });
    // Pinged from its runtime, at half the asked time.
    let seen = manager.during(Duration::from_secs(2));
    assert!(pings(&seen) >= 4, "few pings in 2 s: {seen:?}");
    server.terminate();
    manager.wait_for(Duration::from_secs(30), "STOPPING=1", |message| {
        message == "STOPPING=1"
    });
    let status = server
        .wait_for_exit(Duration::from_secs(30))
        .expect("fly stops");
    assert!(status.success(), "{status}: {}", server.log());
}

/// A handler that never returns is no hung loop: the loop goes on (it
/// polls again and again while the update stays unconfirmed), and so do
/// the pings. The handler does not see the socket.
#[test]
fn watchdog_pings_go_on_while_a_handler_hangs() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut manager = Manager::at_a_path();
    let seen_env = dir.path().join("handler-env");
    let handler = format!("env > '{}'; exec sleep 1000", seen_env.display());
    let mut service = poll_echo(
        &emulator.base_url,
        &manager,
        dir.path(),
        &[("WATCHDOG_USEC", "400000")],
        &[
            "--poll-timeout",
            "1",
            "--exec",
            &handler,
            "--exec-timeout",
            "3600",
        ],
    );
    manager.wait_for(READY_WITHIN, "READY=1", |message| message == "READY=1");
    emulator.user_says("private", "u_1", "hang");
    wait_until(Duration::from_secs(30), "the handler to start", || {
        std::fs::read_to_string(&seen_env).is_ok_and(|env| env.contains("PATH="))
    });
    manager.wait_for(Duration::from_secs(10), "one update in flight", |message| {
        message.ends_with(", 1 updates in flight")
    });
    // Pings every 200 ms: about 15 in 3 s, whatever the handler does.
    let seen = manager.during(Duration::from_secs(3));
    assert!(pings(&seen) >= 6, "few pings in 3 s: {seen:?}");
    let env = std::fs::read_to_string(&seen_env).unwrap();
    for variable in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        assert!(!env.contains(variable), "the handler saw {variable}: {env}");
    }
    // A second signal ends the handler's process group with fly.
    signal(service.pid(), libc::SIGTERM);
    manager.wait_for(Duration::from_secs(30), "STOPPING=1", |message| {
        message == "STOPPING=1"
    });
    signal(service.pid(), libc::SIGTERM);
    service.wait(Duration::from_secs(30)).expect("fly stops");
}

/// A stand-in platform that answers the first updates request with no
/// updates, then begins every later answer and drips it, a byte a second,
/// never finishing it: each read is within the read timeout, the poll as a
/// whole never ends. Returns its base URL.
fn platform_that_drips_its_answers() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for (served, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { return };
            if read_request(&stream).is_none() {
                continue;
            }
            if served == 0 {
                let _ = stream.write_all(NO_UPDATES.as_bytes());
                continue;
            }
            std::thread::spawn(move || {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nx-drip: ");
                // Ends when fly is gone (the write fails).
                while stream.write_all(b"a").is_ok() {
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
    });
    base_url
}

/// A poll loop that stopped turning (its poll outlived its bound: connect
/// and read timeouts) stops the pings, so the service manager ends it; the
/// process itself still runs.
#[test]
fn watchdog_pings_stop_when_the_poll_loop_stops_turning() {
    let base_url = platform_that_drips_its_answers();
    let (_dir, mut manager, mut service) = watched_poller(&base_url);
    let seen = manager.during(Duration::from_secs(2));
    assert!(pings(&seen) >= 4, "few pings while polling: {seen:?}");
    // The second poll never ends: past its connect and read timeouts
    // (10 + 1 + 15 s, and a little), the pings stop.
    assert!(
        manager.pings_stop(Duration::from_secs(3), Duration::from_secs(60)),
        "the pings went on: {:?}",
        &manager.said[manager.said.len().saturating_sub(5)..]
    );
    assert!(
        service.child.try_wait().unwrap().is_none(),
        "fly exited: {}",
        service.log()
    );
}

/// A platform that is down is no hung loop: the poll is retried, each
/// attempt and each wait within its bound, and the pings go on past the
/// bound of one poll (10 + 1 + 15 s).
#[test]
fn watchdog_pings_go_on_while_the_platform_is_down() {
    // The first poll gets no updates; every later connection is closed
    // once its request is read, unanswered: the platform is down.
    let (base_url, _seen) = answering_in_turn(&[NO_UPDATES, ""]);
    let (_dir, mut manager, _service) = watched_poller(&base_url);
    let past_one_poll = Instant::now() + Duration::from_secs(30);
    let seen = manager.during(past_one_poll.saturating_duration_since(Instant::now()));
    let last = manager.during(Duration::from_secs(3));
    assert!(
        pings(&seen) >= 60,
        "pings stopped: {} in 30 s",
        pings(&seen)
    );
    assert!(pings(&last) >= 6, "pings stopped: {last:?}");
}

/// Only a process told of a socket speaks: without `NOTIFY_SOCKET` the
/// same run sends nothing, and a `WATCHDOG_PID` of another process is not
/// pinged for.
#[test]
fn only_a_process_given_notify_socket_speaks() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let mut manager = Manager::at_a_path();
    let run = |notify: Option<&str>| {
        let mut command: Command = fly_child(&emulator.base_url);
        if let Some(address) = notify {
            command.env("NOTIFY_SOCKET", address);
        }
        let output = command
            .env("WATCHDOG_USEC", "400000")
            .env("WATCHDOG_PID", "1")
            .args(["poll-echo", "--once", "--state"])
            .arg(dir.path().join("state.db"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(None);
    // fly has exited: whatever it sent is queued here already.
    assert_eq!(manager.queued(), Vec::<String>::new());
    run(Some(&manager.address.clone()));
    let said = manager.queued();
    assert!(said.contains(&"READY=1".to_string()), "{said:?}");
    assert_eq!(pings(&said), 0, "pinged for another process: {said:?}");
}
