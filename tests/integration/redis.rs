//! Several fly processes on one Redis state (SPEC 4b), against a real
//! `redis-server` that each test starts for itself (a unix socket in a temp
//! directory, or a free loopback port), with no persistence, killed when
//! the test ends. `.ci/run` installs redis-server; without it these tests
//! fail, they do not skip.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{
    Emulator, RefusedPort, TOKEN, eventually, fly, fly_at, fly_child, new_log_file,
    show_log_file_if_failing, wait_until,
};
use crate::serve_webhook::{SECRET, Server, agent, answer, get, post_with, signed_here};

/// Where a test's redis-server listens.
enum Endpoint {
    Unix(PathBuf),
    Tcp(u16),
    /// TLS only (no plain TCP), with this certificate and key.
    Tls {
        port: u16,
        cert: PathBuf,
        key: PathBuf,
    },
}

/// A `redis-server` of this test's own, killed when dropped; its log is
/// shown if the test fails.
struct RedisServer {
    child: Option<Child>,
    endpoint: Endpoint,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// On a unix socket in a temp directory: no port to race for, and a
    /// restart listens at the same address.
    fn unix() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("redis.sock");
        let mut server = RedisServer {
            child: None,
            endpoint: Endpoint::Unix(socket),
            dir,
        };
        server.spawn().unwrap_or_else(|why| panic!("{why}"));
        server
    }

    /// On a loopback port (the URL has a host and port, for a password).
    fn tcp() -> RedisServer {
        RedisServer::on_a_loopback_port(Endpoint::Tcp)
    }

    /// TLS on a loopback port with a certificate and its key.
    fn tls(cert: &Path, key: &Path) -> RedisServer {
        RedisServer::on_a_loopback_port(|port| Endpoint::Tls {
            port,
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    /// redis-server cannot take port 0 and say which port it got (`--port
    /// 0` means no TCP at all), so this is the one place in the tests that
    /// picks a port first: one the system handed out a moment ago. If
    /// another process took it in between, redis-server cannot bind it and
    /// exits (it never says it is ready), and another port is tried.
    fn on_a_loopback_port(endpoint: impl Fn(u16) -> Endpoint) -> RedisServer {
        let mut why = String::new();
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut server = RedisServer {
                child: None,
                endpoint: endpoint(port),
                dir: tempfile::tempdir().unwrap(),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(error) => why = error,
            }
        }
        panic!("no redis-server could listen on a free port: {why}");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts redis-server and waits until it says it is ready (after it
    /// bound every address it was given; it exits if one is taken).
    fn spawn(&mut self) -> Result<(), String> {
        let mut command = Command::new("redis-server");
        command
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .args(["--logfile", ""]);
        match &self.endpoint {
            Endpoint::Unix(socket) => {
                let _ = std::fs::remove_file(socket);
                command
                    .args(["--port", "0", "--unixsocket"])
                    .arg(socket)
                    .args(["--unixsocketperm", "700"]);
            }
            Endpoint::Tcp(port) => {
                command.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
            }
            Endpoint::Tls { port, cert, key } => {
                command
                    .args(["--port", "0", "--bind", "127.0.0.1"])
                    .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key);
            }
        }
        let log = std::fs::File::create(self.log_path()).unwrap();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|error| {
                format!(
                    "cannot run redis-server ({error}): install it \
                     (apt-get install redis-server; .ci/run does)"
                )
            })
            .unwrap_or_else(|why: String| panic!("{why}"));
        // "Ready to accept connections" (TCP, TLS), "The server is now ready
        // to accept connections at PATH" (a unix socket).
        let ready = eventually(Duration::from_secs(10), || {
            self.log()
                .to_lowercase()
                .contains("ready to accept connections")
                || child.try_wait().unwrap().is_some()
        });
        if ready && child.try_wait().unwrap().is_none() {
            self.child = Some(child);
            return Ok(());
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        Err(format!(
            "redis-server did not get ready ({status}): {}",
            self.log()
        ))
    }

    /// The `--state` URL.
    fn url(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(socket) => format!("redis+unix://{}", socket.display()),
            Endpoint::Tcp(port) => format!("redis://127.0.0.1:{port}"),
            Endpoint::Tls { port, .. } => format!("rediss://127.0.0.1:{port}"),
        }
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    /// Stops it at once (`kill -9`): with no persistence, it forgets everything.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.spawn().unwrap_or_else(|why| panic!("{why}"));
    }

    /// Freezes it (SIGSTOP): connections open, nothing answered.
    fn freeze(&self) {
        signal(&self.pid(), "-STOP");
    }

    fn thaw(&self) {
        signal(&self.pid(), "-CONT");
    }

    /// The poll offset stored in this Redis, if any.
    fn stored_offset(&self) -> Option<i64> {
        let keys = self.command(&["KEYS", "*:offset"]);
        let key = keys[0].as_str()?.to_string();
        self.command(&["GET", &key]).as_str()?.parse().ok()
    }

    /// One command (RESP), its answer as JSON: strings, integers, arrays.
    fn command(&self, args: &[&str]) -> Value {
        self.try_value(args).expect("redis-server answers")
    }

    fn try_value(&self, args: &[&str]) -> Option<Value> {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        let stream: Box<dyn ReadWrite> = match &self.endpoint {
            Endpoint::Unix(socket) => Box::new(UnixStream::connect(socket).ok()?),
            Endpoint::Tcp(port) => {
                Box::new(std::net::TcpStream::connect(("127.0.0.1", *port)).ok()?)
            }
            Endpoint::Tls { .. } => panic!("the tests speak plain RESP only"),
        };
        let mut reader = BufReader::new(stream);
        reader.get_mut().write_all(request.as_bytes()).ok()?;
        read_resp(&mut reader)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        show_log_file_if_failing("redis-server", &self.log_path());
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn read_resp(reader: &mut impl BufRead) -> Option<Value> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let line = line.trim_end();
    let (kind, rest) = line.split_at(1.min(line.len()));
    match kind {
        "+" => Some(json!(rest)),
        "-" => Some(json!({ "error": rest })),
        ":" => Some(json!(rest.parse::<i64>().ok()?)),
        "$" => {
            let length: i64 = rest.parse().ok()?;
            if length < 0 {
                return Some(Value::Null);
            }
            let mut bytes = vec![0u8; length as usize + 2];
            reader.read_exact(&mut bytes).ok()?;
            bytes.truncate(length as usize);
            Some(json!(String::from_utf8_lossy(&bytes)))
        }
        "*" => {
            let count: i64 = rest.parse().ok()?;
            let mut items = Vec::new();
            for _ in 0..count.max(0) {
                items.push(read_resp(reader)?);
            }
            Some(Value::Array(items))
        }
        _ => None,
    }
}

fn signal(pid: &str, which: &str) {
    let sent = Command::new("kill").args([which, pid]).status().unwrap();
    assert!(sent.success(), "kill {which} {pid}");
}

/// A `fly poll-echo` child on the Redis state, its log in a file (shown if
/// the test fails).
struct Poller {
    child: Child,
    log: PathBuf,
}

impl Poller {
    fn start(emulator: &Emulator, redis: &RedisServer, dir: &Path, extra: &[&str]) -> Poller {
        let log = new_log_file(dir, "poll-echo-");
        let child = fly_child(&emulator.base_url)
            .args(["poll-echo", "--poll-timeout", "1", "--state"])
            .arg(redis.url())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn fly poll-echo");
        Poller { child, log }
    }

    /// A poller started while another holds the lease: once it says it
    /// stands by.
    fn standby(emulator: &Emulator, redis: &RedisServer, dir: &Path, extra: &[&str]) -> Poller {
        let poller = Poller::start(emulator, redis, dir, extra);
        wait_until(Duration::from_secs(10), "a poller to stand by", || {
            poller.log().contains("standing by")
        });
        poller
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        show_log_file_if_failing("fly poll-echo", &self.log);
    }
}

/// `count` text messages `m 0`, `m 1`, … from `users` private chats in
/// turn; their update ids.
fn messages(emulator: &Emulator, count: usize, users: usize) -> Vec<i64> {
    (0..count)
        .map(|n| emulator.user_says("private", &format!("u_{}", n % users), &format!("m {n}")))
        .collect()
}

/// The update ids of the echoes the emulator recorded, each once.
fn echoed_ids(emulator: &Emulator) -> Vec<i64> {
    emulator
        .sent()
        .iter()
        .map(|sent| {
            sent["client_msg_id"].as_str().unwrap()["echo_".len()..]
                .parse()
                .unwrap()
        })
        .collect()
}

fn replica(emulator: &Emulator, redis: &RedisServer, dir: &Path) -> Server {
    Server::start_with_state(
        &emulator.base_url,
        dir,
        std::ffi::OsStr::new(&redis.url()),
        &["--secret", SECRET],
    )
}

fn signed_text(update_id: i64, chat: &str, text: &str, nonce: &str) -> String {
    let message = format!(
        r#"{{"chat":{{"id":"{chat}","type":"private"}},"data":{{"content":"{text}"}},"msgType":"text"}}"#
    );
    signed_here(update_id, "message", &message, nonce)
}

// ---------------------------------------------------------------------------
// Webhook replicas

/// Three replicas behind a pretend load balancer; each update is delivered
/// to two of them at the same moment (a platform retry racing the first
/// delivery). Each is answered once: one replica handles it, the other
/// answers 409 while it is in hand or 200 DUPLICATE once it is done, and
/// the platform sees exactly one send attempt per update.
#[test]
#[ignore = "needs redis-server"]
fn three_replicas_answer_each_update_once_when_two_get_it_at_once() {
    let redis = RedisServer::tcp();
    let emulator = Emulator::start_strict();
    // Replies take a moment, so the second delivery finds the first in hand.
    emulator.faults(json!({"latency_ms": 20}));
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Server> = (0..3)
        .map(|_| replica(&emulator, &redis, dir.path()))
        .collect();
    const UPDATES: i64 = 150;
    const LANES: i64 = 10;
    let outcomes = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for lane in 0..LANES {
            let (replicas, outcomes) = (&replicas, &outcomes);
            scope.spawn(move || {
                let agent = agent();
                for update_id in (1..=UPDATES).filter(|id| id % LANES == lane) {
                    let body = signed_text(
                        update_id,
                        &format!("u_{lane}"),
                        "hi",
                        &format!("n-{update_id}"),
                    );
                    let targets = [
                        &replicas[update_id as usize % 3],
                        &replicas[(update_id as usize + 1) % 3],
                    ];
                    let together = std::sync::Barrier::new(2);
                    let answers: Vec<(u16, String)> = std::thread::scope(|pair| {
                        let deliveries: Vec<_> = targets
                            .iter()
                            .map(|target| {
                                let (agent, body, together) = (&agent, &body, &together);
                                pair.spawn(move || {
                                    together.wait();
                                    let got = post_with(agent, &target.url, body);
                                    (got.status, got.body)
                                })
                            })
                            .collect();
                        deliveries.into_iter().map(|d| d.join().unwrap()).collect()
                    });
                    outcomes.lock().unwrap().push((update_id, answers));
                }
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap();
    let mut second_answers = BTreeSet::new();
    for (update_id, answers) in &outcomes {
        let handled = answers
            .iter()
            .filter(|(status, body)| *status == 200 && body == "OK")
            .count();
        assert_eq!(handled, 1, "update {update_id}: {answers:?}");
        let other = answers
            .iter()
            .find(|(status, body)| !(*status == 200 && body == "OK"))
            .unwrap();
        assert!(
            *other == (409, "IN_PROGRESS".into()) || *other == (200, "DUPLICATE".into()),
            "update {update_id}: {answers:?}"
        );
        second_answers.insert(other.1.clone());
    }
    assert_eq!(outcomes.len(), UPDATES as usize);
    let in_progress = outcomes
        .iter()
        .filter(|(_, answers)| answers.iter().any(|(status, _)| *status == 409))
        .count();
    eprintln!("{in_progress} of {UPDATES} second deliveries found the first in hand (409)");
    let mut echoed = echoed_ids(&emulator);
    echoed.sort_unstable();
    assert_eq!(echoed, (1..=UPDATES).collect::<Vec<_>>());
    assert_eq!(
        emulator.send_attempts(),
        UPDATES as u64,
        "a second send attempt was made (second answers: {second_answers:?})"
    );
    // Each replica handled some, and the keys are the bot's own.
    for (n, replica) in replicas.iter().enumerate() {
        assert!(
            replica.log().contains("outcome=\"OK\""),
            "replica {n} handled nothing:\n{}",
            replica.log()
        );
    }
    let keys = redis.command(&["KEYS", "*"]);
    let keys = keys.as_array().unwrap();
    assert!(
        keys.iter()
            .all(|key| key.as_str().unwrap().starts_with("fly:{bot-")),
        "{keys:?}"
    );
    assert!(!keys.iter().any(|key| key.as_str().unwrap().contains(TOKEN)));
}

/// A nonce remembered by one replica is remembered by all: the same nonce
/// with another update is refused everywhere, while a redelivery of its
/// own update is a duplicate everywhere.
#[test]
#[ignore = "needs redis-server"]
fn a_nonce_seen_by_one_replica_is_refused_with_another_update_by_all() {
    let redis = RedisServer::unix();
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Server> = (0..3)
        .map(|_| replica(&emulator, &redis, dir.path()))
        .collect();
    let agent = agent();
    let first = signed_text(501, "u_1", "first", "shared-nonce");
    assert_eq!(
        post_with(&agent, &replicas[0].url, &first),
        answer(200, "OK")
    );
    let replay = signed_text(502, "u_1", "replayed", "shared-nonce");
    for replica in &replicas {
        assert_eq!(
            post_with(&agent, &replica.url, &replay),
            answer(401, "NONCE_REUSED")
        );
        assert_eq!(
            post_with(&agent, &replica.url, &first),
            answer(200, "DUPLICATE")
        );
    }
    assert_eq!(echoed_ids(&emulator), [501]);
    assert_eq!(emulator.send_attempts(), 1);
}

/// A frozen Redis (SIGSTOP: it accepts connections and answers nothing):
/// `/readyz` fails while `/healthz` answers, deliveries are 503 (the
/// platform delivers again) and nothing is marked handled; thawed, it all
/// comes back by itself.
#[test]
#[ignore = "needs redis-server"]
fn a_hung_redis_is_503_and_not_ready_then_recovers_by_itself() {
    let redis = RedisServer::unix();
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = replica(&emulator, &redis, dir.path());
    let agent = agent();
    let readyz = format!("{}/readyz", server.origin);
    let healthz = format!("{}/healthz", server.origin);
    assert_eq!(get(&readyz), answer(200, "ready"));
    let before = signed_text(601, "u_1", "before", "n-601");
    assert_eq!(post_with(&agent, &server.url, &before), answer(200, "OK"));

    redis.freeze();
    wait_until(Duration::from_secs(10), "/readyz to fail", || {
        get(&readyz).status == 503
    });
    assert_eq!(get(&healthz), answer(200, "ok"));
    let during = signed_text(602, "u_1", "during", "n-602");
    let started = Instant::now();
    assert_eq!(
        post_with(&agent, &server.url, &during),
        answer(503, "STATE_STORE_UNAVAILABLE")
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a known outage is answered at once"
    );
    redis.thaw();
    wait_until(Duration::from_secs(10), "/readyz to pass again", || {
        get(&readyz).status == 200
    });
    assert_eq!(post_with(&agent, &server.url, &during), answer(200, "OK"));
    assert_eq!(
        post_with(&agent, &server.url, &before),
        answer(200, "DUPLICATE")
    );
    assert_eq!(echoed_ids(&emulator), [601, 602]);
    let log = server.log();
    assert_eq!(log.matches("unreachable").count(), 1, "{log}");
    assert_eq!(log.matches("answers again").count(), 1, "{log}");
}

/// The emulator delivers to a replica (retrying until 2xx, as the platform
/// does) while Redis is killed and started again, empty: deliveries are
/// 503 meanwhile, `/readyz` fails, and once Redis is back every update is
/// answered, each reply recorded once.
#[test]
#[ignore = "needs redis-server"]
fn redis_killed_and_restarted_under_load_gives_503s_then_every_update_is_answered() {
    let mut redis = RedisServer::unix();
    let emulator = Emulator::start_strict();
    let dir = tempfile::tempdir().unwrap();
    let server = replica(&emulator, &redis, dir.path());
    emulator.post(
        "/_emulator/webhook",
        json!({"url": server.url, "secret": SECRET, "bot_id": "bot_test"}),
    );
    const MESSAGES: usize = 80;
    let readyz = format!("{}/readyz", server.origin);
    let ids = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            (0..MESSAGES)
                .map(|n| {
                    // Paced, not a wait: messages keep coming before, during
                    // and after the outage.
                    std::thread::sleep(Duration::from_millis(25));
                    emulator.user_says("private", &format!("u_{}", n % 4), &format!("m {n}"))
                })
                .collect::<Vec<i64>>()
        });
        wait_until(Duration::from_secs(20), "the first replies", || {
            emulator.sent().len() >= 15
        });
        redis.kill();
        wait_until(Duration::from_secs(10), "/readyz to fail", || {
            get(&readyz).status == 503
        });
        assert_eq!(get(&format!("{}/healthz", server.origin)).status, 200);
        // The outage lasts until a delivery has been refused for it.
        wait_until(Duration::from_secs(10), "a delivery answered 503", || {
            server.log().contains("status=503")
        });
        redis.restart();
        load.join().unwrap()
    });
    wait_until(Duration::from_secs(60), "every update answered", || {
        emulator.sent().len() >= MESSAGES
    });
    let mut echoed = echoed_ids(&emulator);
    echoed.sort_unstable();
    assert_eq!(
        echoed, ids,
        "each update answered, each reply recorded once"
    );
    assert_eq!(get(&readyz), answer(200, "ready"));
    let log = server.log();
    assert!(log.contains("status=503"), "{log}");
    assert_eq!(log.matches("unreachable").count(), 1, "{log}");
    assert_eq!(log.matches("answers again").count(), 1, "{log}");
    let report = emulator.get("/_emulator/webhook");
    let retried = report["delivered"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|delivery| delivery["attempts"].as_u64().unwrap() > 1)
        .count();
    assert!(
        retried > 0,
        "some deliveries were refused and retried: {report}"
    );
}

// ---------------------------------------------------------------------------
// Standby pollers

/// Two pollers on one Redis state: one polls, the other stands by (and says
/// so once). `kill -9` of the active one in the middle of a backlog: the
/// standby takes over within the lease and answers the rest; every message
/// is answered, each reply recorded once, and the stored offset is past
/// the last update.
#[test]
#[ignore = "needs redis-server"]
fn a_standby_poller_takes_over_within_the_lease_after_kill_9() {
    let redis = RedisServer::unix();
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    const MESSAGES: usize = 60;
    let ids = messages(&emulator, MESSAGES, 3);
    // One reply at a time, each taking a moment: a backlog of a few seconds.
    emulator.faults(json!({"latency_ms": 40}));
    let lease = ["--lease", "2", "--concurrency", "1"];
    let mut active = Poller::start(&emulator, &redis, dir.path(), &lease);
    wait_until(
        Duration::from_secs(20),
        "the first poller to answer",
        || !emulator.sent().is_empty(),
    );
    let standby = Poller::standby(&emulator, &redis, dir.path(), &lease);
    wait_until(Duration::from_secs(20), "a part of the backlog", || {
        emulator.sent().len() >= 15
    });
    active.child.kill().unwrap();
    let killed = Instant::now();
    active.child.wait().unwrap();
    let answered_at_kill = emulator.sent().len();
    assert!(answered_at_kill < MESSAGES, "the backlog was over too soon");
    wait_until(Duration::from_secs(10), "the standby to take over", || {
        standby.log().contains("took over the polling lease")
    });
    let takeover = killed.elapsed();
    // About one lease; two and a half leave room for a loaded machine and
    // still tell it from waiting for the default 10 s lease.
    assert!(
        takeover < Duration::from_millis(5000),
        "took over after {takeover:?} (lease 2 s)"
    );
    wait_until(Duration::from_secs(30), "every message answered", || {
        emulator.sent().len() >= MESSAGES
    });
    let mut echoed = echoed_ids(&emulator);
    echoed.sort_unstable();
    assert_eq!(echoed, ids);
    let log = standby.log();
    assert_eq!(log.matches("standing by").count(), 1, "{log}");
    let next = *ids.last().unwrap() + 1;
    wait_until(
        Duration::from_secs(10),
        "the offset past the last update",
        || redis.stored_offset() == Some(next),
    );
    eprintln!("takeover after {takeover:?}, {answered_at_kill} of {MESSAGES} answered at the kill");
}

/// The active poller frozen (SIGSTOP: a long GC pause, a suspended VM) for
/// longer than its lease: the standby takes over; thawed, the old one finds
/// its lease gone, writes nothing (the offset does not go back) and stands
/// by. Every message is answered, each reply recorded once.
#[test]
#[ignore = "needs redis-server"]
fn a_poller_frozen_past_its_lease_writes_nothing_when_it_wakes() {
    let redis = RedisServer::unix();
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    const MESSAGES: usize = 40;
    let mut ids = messages(&emulator, MESSAGES, 2);
    emulator.faults(json!({"latency_ms": 40}));
    let lease = ["--lease", "1.5", "--concurrency", "1"];
    let frozen = Poller::start(&emulator, &redis, dir.path(), &lease);
    wait_until(Duration::from_secs(20), "the first answers", || {
        emulator.sent().len() >= 5
    });
    let standby = Poller::standby(&emulator, &redis, dir.path(), &lease);
    let pid = frozen.child.id().to_string();
    signal(&pid, "-STOP");
    wait_until(Duration::from_secs(10), "the standby to take over", || {
        standby.log().contains("took over the polling lease")
    });
    wait_until(Duration::from_secs(30), "the backlog answered", || {
        emulator.sent().len() >= MESSAGES
    });
    let next = *ids.last().unwrap() + 1;
    wait_until(
        Duration::from_secs(10),
        "the offset past the backlog",
        || redis.stored_offset() == Some(next),
    );
    signal(&pid, "-CONT");
    wait_until(
        Duration::from_secs(10),
        "the thawed poller to stand down",
        || frozen.log().contains("lost the polling lease"),
    );
    wait_until(
        Duration::from_secs(10),
        "the thawed poller to stand by",
        || frozen.log().contains("standing by"),
    );
    assert_eq!(redis.stored_offset(), Some(next), "the offset went back");
    ids.push(emulator.user_says("private", "u_9", "after"));
    wait_until(Duration::from_secs(10), "the new message answered", || {
        emulator.sent().len() > MESSAGES
    });
    let mut echoed = echoed_ids(&emulator);
    echoed.sort_unstable();
    assert_eq!(echoed, ids);
    assert!(!frozen.log().contains("ERROR"), "{}", frozen.log());
}

/// A poller stopped cleanly gives the lease back: the standby takes over at
/// once, not after the lease.
#[test]
#[ignore = "needs redis-server"]
fn a_clean_stop_hands_the_lease_over_at_once() {
    let redis = RedisServer::unix();
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let lease = ["--lease", "6"];
    let mut active = Poller::start(&emulator, &redis, dir.path(), &lease);
    wait_until(Duration::from_secs(10), "the first to poll", || {
        active.log().contains("polling for updates")
    });
    let standby = Poller::standby(&emulator, &redis, dir.path(), &lease);
    signal(&active.child.id().to_string(), "-TERM");
    let stopped = Instant::now();
    assert!(active.child.wait().unwrap().success(), "{}", active.log());
    wait_until(Duration::from_secs(10), "the standby to take over", || {
        standby.log().contains("took over the polling lease")
    });
    // Not handed over, it would have taken the 6 s lease to run out.
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "took over after {:?} (lease 6 s, looked at every 2 s)",
        stopped.elapsed()
    );
    // A standby stops at once on SIGTERM.
    let mut third = Poller::standby(&emulator, &redis, dir.path(), &lease);
    signal(&third.child.id().to_string(), "-TERM");
    let status = crate::common::wait_for_exit(&mut third.child, Duration::from_secs(3));
    assert!(
        status.is_some_and(|status| status.success()),
        "{}",
        third.log()
    );
    assert!(
        third.log().contains("stopped while standing by"),
        "{}",
        third.log()
    );
    let update_id = emulator.user_says("private", "u_1", "after the handover");
    wait_until(Duration::from_secs(10), "the new poller's answer", || {
        echoed_ids(&emulator) == [update_id]
    });
    // A poller with --once is refused rather than made to wait.
    let once = fly_at(&emulator)
        .args(["poll-echo", "--once", "--state", &redis.url()])
        .output()
        .unwrap();
    assert_eq!(once.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&once.stderr);
    assert!(stderr.contains("holds the polling lease"), "{stderr}");
}

/// Redis killed and started again (empty) under a poller: it pauses, says
/// so once, and answers everything once Redis is back, with no restart.
#[test]
#[ignore = "needs redis-server"]
fn a_poller_pauses_while_redis_is_down_and_goes_on_by_itself() {
    let mut redis = RedisServer::unix();
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let poller = Poller::start(&emulator, &redis, dir.path(), &["--lease", "2"]);
    let mut ids: Vec<i64> = (0..10)
        .map(|n| emulator.user_says("private", "u_1", &format!("before {n}")))
        .collect();
    wait_until(Duration::from_secs(20), "the first answers", || {
        emulator.sent().len() >= 10
    });
    redis.kill();
    ids.extend((0..10).map(|n| emulator.user_says("private", "u_2", &format!("during {n}"))));
    wait_until(Duration::from_secs(10), "the outage noticed", || {
        poller.log().contains("unreachable")
    });
    // Deliberately more time, not a wait for an event: the outage outlasts
    // the poller's first retries, so it has to keep pausing (no log line
    // marks a retry).
    std::thread::sleep(Duration::from_millis(1500));
    redis.restart();
    ids.extend((0..10).map(|n| emulator.user_says("private", "u_3", &format!("after {n}"))));
    wait_until(Duration::from_secs(40), "every message answered", || {
        emulator.sent().len() >= ids.len()
    });
    let mut echoed = echoed_ids(&emulator);
    echoed.sort_unstable();
    assert_eq!(echoed, ids);
    let log = poller.log();
    assert_eq!(log.matches("unreachable").count(), 1, "{log}");
    assert!(eventually(Duration::from_secs(5), || poller
        .log()
        .contains("answers again")));
    eprintln!("{}", poller.log());
}

// ---------------------------------------------------------------------------
// TLS, dead letters, usage

/// `rediss://`: TLS with the server's certificate checked against the
/// system's roots, which `SSL_CERT_FILE` replaces here.
#[test]
#[ignore = "needs redis-server"]
fn rediss_checks_the_servers_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let redis = RedisServer::tls(&cert, &key);
    let url = redis.url();
    let dead_letters = |trust: Option<&Path>| {
        let mut command = fly();
        command
            .env("FLY_BASE_URL", "http://127.0.0.1:9")
            .env("FLY_BOT_TOKEN", TOKEN)
            .env("FLY_STATE", &url)
            .arg("dead-letters");
        if let Some(file) = trust {
            command.env("SSL_CERT_FILE", file);
        }
        command.output().unwrap()
    };
    let trusted = dead_letters(Some(&cert));
    let untrusted = dead_letters(Some(Path::new("/dev/null")));
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert_eq!(untrusted.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(stderr.contains(&url), "{stderr}");
}

/// Dead letters recorded by a poller on Redis are listed and purged by
/// `fly dead-letters --state redis://…` (with the token: the bot's keys are
/// found from it); a password in the URL never shows.
#[test]
#[ignore = "needs redis-server"]
fn dead_letters_live_in_redis_too_and_passwords_never_show() {
    let redis = RedisServer::tcp();
    let emulator = Emulator::start();
    let no_chat = r#"{"type":"message","message":{"msgType":"text","data":{"content":"no chat"}}}"#;
    let dead = emulator.raw_update(no_chat);
    let run = |args: &[&str]| {
        fly_at(&emulator)
            .env("FLY_STATE", redis.url())
            .args(args)
            .output()
            .unwrap()
    };
    let polled = run(&["poll-echo", "--once"]);
    assert!(
        polled.status.success(),
        "{}",
        String::from_utf8_lossy(&polled.stderr)
    );
    let listed = run(&["dead-letters"]);
    assert!(listed.status.success());
    let line: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(line["update_id"], json!(dead));
    assert!(line["raw"].as_str().unwrap().contains("no chat"));
    assert!(run(&["dead-letters", "--purge"]).status.success());
    assert!(run(&["dead-letters"]).stdout.is_empty());

    // A wrong password: refused, with the URL shown without it.
    let Endpoint::Tcp(port) = redis.endpoint else {
        unreachable!("a TCP redis-server")
    };
    let wrong = fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(format!("redis://someone:hunter2@127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !stderr.contains("hunter2") && !stderr.contains("someone"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("redis://127.0.0.1:{port}")),
        "{stderr}"
    );
    // Nothing listens: one clear line, exit 1.
    let nothing_listens = RefusedPort::new();
    let down = fly_at(&emulator)
        .args(["poll-echo", "--once", "--state"])
        .arg(format!("redis://:pw@127.0.0.1:{}", nothing_listens.port))
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("unreachable") && !stderr.contains("pw@"),
        "{stderr}"
    );
}

/// Parking with a Redis state: the failing update is recorded there (the
/// offset passes it), the other chat is answered, and the parked update is
/// answered and forgotten once its handler recovers; `--purge` keeps it.
#[test]
#[ignore = "needs redis-server"]
fn parked_updates_live_in_redis_and_are_answered_once_fixed() {
    let redis = RedisServer::unix();
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed");
    let handler = format!(
        "cat >/dev/null; if [ \"$FLY_CHAT_ID\" = u_bad ] && [ ! -e '{}' ]; then exit 1; fi; echo ok",
        fixed.display()
    );
    let bad = emulator.user_says("private", "u_bad", "one");
    let good = emulator.user_says("private", "u_1", "two");
    let poller = Poller::start(
        &emulator,
        &redis,
        dir.path(),
        &[
            "--exec",
            &handler,
            "--max-attempts",
            "1",
            "--park-retry-max",
            "0.3",
        ],
    );
    let listed = || -> Vec<Value> {
        let output = fly_at(&emulator)
            .args(["dead-letters", "--state", &redis.url()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let replied = |id: i64| {
        emulator
            .sent()
            .iter()
            .any(|sent| sent["client_msg_id"] == format!("reply_{id}"))
    };
    assert!(
        eventually(Duration::from_secs(30), || replied(good)
            && listed().len() == 1),
        "{}",
        poller.log()
    );
    let letter = &listed()[0];
    assert_eq!(letter["update_id"], json!(bad));
    assert_eq!(letter["state"], "parked");
    let purge = fly_at(&emulator)
        .args(["dead-letters", "--purge", "--state", &redis.url()])
        .output()
        .unwrap();
    assert!(purge.status.success());
    assert_eq!(listed().len(), 1, "a parked update is not purged");
    std::fs::write(&fixed, "").unwrap();
    assert!(
        eventually(Duration::from_secs(30), || replied(bad)
            && listed().is_empty()),
        "{}",
        poller.log()
    );
}

/// A poller's outage warning says what a poller does (it pauses), not what
/// serve-webhook does (503).
#[test]
#[ignore = "needs redis-server"]
fn a_pollers_outage_warning_speaks_of_polling_not_of_503() {
    let mut redis = RedisServer::unix();
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let poller = Poller::start(&emulator, &redis, dir.path(), &["--lease", "2"]);
    let id = emulator.user_says("private", "u_1", "before");
    wait_until(Duration::from_secs(20), "the first answer", || {
        echoed_ids(&emulator) == [id]
    });
    redis.kill();
    wait_until(Duration::from_secs(10), "the outage noticed", || {
        poller.log().contains("unreachable")
    });
    let log = poller.log();
    assert!(
        log.contains("polling pauses until the state store is back"),
        "{log}"
    );
    assert!(!log.contains("503"), "{log}");
}

/// Whether this Redis holds the polling lease of a poller.
fn lease_is_held(redis: &RedisServer) -> bool {
    redis
        .command(&["KEYS", "*:poller"])
        .as_array()
        .is_some_and(|keys| !keys.is_empty())
}

/// A poller paused (SIGSTOP) for longer than its lease, with nobody else
/// on the state: thawed, it says its lease lapsed while it was paused and
/// polls again at once (not a whole lease later, not calling itself
/// "another fly process"). Paused again while a second poller stands by,
/// the second takes over, and the first says so, naming it.
#[test]
#[ignore = "needs redis-server"]
fn a_poller_whose_lease_lapsed_in_a_pause_says_so_and_takes_it_again_at_once() {
    let redis = RedisServer::unix();
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    // Long enough that answering "within a lease" is told from "at once".
    let lease = ["--lease", "4", "--concurrency", "1"];
    let first = Poller::start(&emulator, &redis, dir.path(), &lease);
    let before = emulator.user_says("private", "u_1", "before");
    wait_until(Duration::from_secs(20), "the first answer", || {
        echoed_ids(&emulator) == [before]
    });
    let pid = first.child.id().to_string();
    signal(&pid, "-STOP");
    wait_until(Duration::from_secs(10), "the lease to lapse", || {
        !lease_is_held(&redis)
    });
    signal(&pid, "-CONT");
    let thawed = Instant::now();
    let after = emulator.user_says("private", "u_1", "after");
    wait_until(
        Duration::from_secs(10),
        "the message after the pause answered",
        || echoed_ids(&emulator).contains(&after),
    );
    assert!(
        thawed.elapsed() < Duration::from_secs(3),
        "answered {:?} after the thaw (lease 4 s)\n{}",
        thawed.elapsed(),
        first.log()
    );
    let log = first.log();
    assert!(
        log.contains("lapsed while this process was paused")
            && log.contains("no other poller took it: polling again"),
        "{log}"
    );
    assert!(!log.contains("another fly process"), "{log}");

    let second = Poller::standby(&emulator, &redis, dir.path(), &lease);
    signal(&pid, "-STOP");
    wait_until(Duration::from_secs(15), "the standby to take over", || {
        second.log().contains("took over the polling lease")
    });
    signal(&pid, "-CONT");
    let named = format!("another fly process (pid {} on ", second.child.id());
    wait_until(Duration::from_secs(10), "the first to stand by", || {
        first
            .log()
            .matches("lapsed while this process was paused")
            .count()
            == 2
            && first.log().contains(&named)
            && first.log().contains("standing by")
    });
}
