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
    show_log_file_if_failing, wait_for_a_request_in_flight, wait_until,
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
pub(crate) struct RedisServer {
    child: Option<Child>,
    endpoint: Endpoint,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// On a unix socket in a temp directory: no port to race for, and a
    /// restart listens at the same address.
    pub(crate) fn unix() -> RedisServer {
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
    pub(crate) fn url(&self) -> String {
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
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn restart(&mut self) {
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
pub(crate) struct Poller {
    child: Child,
    log: PathBuf,
}

impl Poller {
    pub(crate) fn start(
        emulator: &Emulator,
        redis: &RedisServer,
        dir: &Path,
        extra: &[&str],
    ) -> Poller {
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
    pub(crate) fn standby(
        emulator: &Emulator,
        redis: &RedisServer,
        dir: &Path,
        extra: &[&str],
    ) -> Poller {
        let poller = Poller::start(emulator, redis, dir, extra);
        wait_until(Duration::from_secs(10), "a poller to stand by", || {
            poller.log().contains("standing by")
        });
        poller
    }

    pub(crate) fn log(&self) -> String {
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
    let outcomes = deliver_each_to_two_at_once(&replicas, UPDATES);
    let second_answers = second_answers_of_each_answered_once(&outcomes);
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
            replica.log().contains("result=\"OK\""),
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

/// The answers two replicas gave to one update delivered to both at once.
type TwoAnswers = Vec<(u16, String)>;

/// Delivers updates 1 to `updates`, each to two of the three replicas at
/// the same moment, ten chats (lanes) at a time.
fn deliver_each_to_two_at_once(replicas: &[Server], updates: i64) -> Vec<(i64, TwoAnswers)> {
    const LANES: i64 = 10;
    let outcomes = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for lane in 0..LANES {
            let outcomes = &outcomes;
            scope.spawn(move || {
                let agent = agent();
                for update_id in (1..=updates).filter(|id| id % LANES == lane) {
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
                    let answers = deliver_together(&agent, targets, &body);
                    outcomes.lock().unwrap().push((update_id, answers));
                }
            });
        }
    });
    outcomes.into_inner().unwrap()
}

/// Posts `body` to both `targets` at the same moment.
fn deliver_together(agent: &ureq::Agent, targets: [&Server; 2], body: &str) -> TwoAnswers {
    let together = std::sync::Barrier::new(2);
    std::thread::scope(|pair| {
        let deliveries: Vec<_> = targets
            .iter()
            .map(|target| {
                let together = &together;
                pair.spawn(move || {
                    together.wait();
                    let got = post_with(agent, &target.url, body);
                    (got.status, got.body)
                })
            })
            .collect();
        deliveries.into_iter().map(|d| d.join().unwrap()).collect()
    })
}

/// Checks that one of each update's two deliveries was handled (200 OK) and
/// the other answered 409 (in hand) or 200 DUPLICATE; returns the kinds of
/// second answers seen.
fn second_answers_of_each_answered_once(outcomes: &[(i64, TwoAnswers)]) -> BTreeSet<String> {
    let mut second_answers = BTreeSet::new();
    for (update_id, answers) in outcomes {
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
    second_answers
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
    assert_eq!(log.matches("did not answer: timed out").count(), 1, "{log}");
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

// ---------------------------------------------------------------------------
// A peer that misbehaves: fake servers on the Redis port, a proxy that drips

/// A fake "Redis" on a loopback port (port 0): on each connection it reads
/// the first request, then `answer` has the connection (until it returns).
fn fake_redis(answer: impl Fn(&mut std::net::TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let answer = std::sync::Arc::clone(&answer);
            std::thread::spawn(move || {
                let mut request = [0u8; 64 * 1024];
                if matches!(stream.read(&mut request), Ok(read) if read > 0) {
                    answer(&mut stream);
                }
            });
        }
    });
    port
}

/// Answers any command with a bulk string of about 1 TB, and sends bytes
/// for as long as the client reads them.
fn sends_a_huge_reply(stream: &mut std::net::TcpStream) {
    if stream.write_all(b"$999999999999\r\n").is_err() {
        return;
    }
    let chunk = vec![b'x'; 64 * 1024];
    while stream.write_all(&chunk).is_ok() {}
}

/// Answers one byte a second, forever: each read gets something, the
/// answer never ends.
fn drips(stream: &mut std::net::TcpStream) {
    while stream.write_all(b"+").is_ok() {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Reads the request and never answers, until the client goes.
fn stays_silent(stream: &mut std::net::TcpStream) {
    let mut rest = [0u8; 1024];
    while matches!(stream.read(&mut rest), Ok(read) if read > 0) {}
}

/// What a `fly` run against a misbehaving peer did: its exit status (None:
/// still running after the limit, then killed), stderr, how long it ran
/// and the most memory it held (VmRSS, in MB) while watched.
struct Run {
    status: Option<std::process::ExitStatus>,
    stderr: String,
    took: Duration,
    max_rss_mb: u64,
}

/// A run holding more is killed at once, so that a fly that grows without
/// bound cannot take the machine down with it.
const MAX_RSS_MB: u64 = 200;

fn run_watched(command: &mut Command, limit: Duration) -> Run {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reading = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut max_rss_mb = 0;
    let mut status = None;
    eventually(limit, || {
        max_rss_mb = max_rss_mb.max(rss_mb(child.id()));
        status = child.try_wait().unwrap();
        status.is_some() || max_rss_mb > MAX_RSS_MB
    });
    let took = started.elapsed();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    Run {
        status,
        stderr: reading.join().unwrap(),
        took,
        max_rss_mb,
    }
}

/// VmRSS of a running process in MB (0 once it is gone).
fn rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb / 1024)
}

/// `fly poll-echo --once`, `fly serve-webhook` and `fly dead-letters` with
/// their state at `url`.
fn starting_commands(url: &str) -> Vec<(&'static str, Command)> {
    let mut poll_echo = fly_child("http://127.0.0.1:9");
    poll_echo.args(["poll-echo", "--once", "--state", url]);
    let mut serve_webhook = fly_child("http://127.0.0.1:9");
    serve_webhook.env("FLY_WEBHOOK_SECRET", SECRET).args([
        "serve-webhook",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--state",
        url,
    ]);
    let mut dead_letters = fly_child("http://127.0.0.1:9");
    dead_letters.args(["dead-letters", "--state", url]);
    vec![
        ("poll-echo --once", poll_echo),
        ("serve-webhook", serve_webhook),
        ("dead-letters", dead_letters),
    ]
}

/// A peer on the Redis port that answers `$999999999999` and then bytes
/// without end: fly reads no more than a few MiB of it, and exits 1 at
/// once saying it is not a Redis server (it used to grow until memory ran
/// out, then abort).
#[test]
fn a_peer_sending_a_huge_reply_is_refused_with_bounded_memory() {
    let url = format!("redis://127.0.0.1:{}", fake_redis(sends_a_huge_reply));
    for (name, mut command) in starting_commands(&url) {
        let run = run_watched(&mut command, Duration::from_secs(10));
        assert!(
            run.max_rss_mb <= MAX_RSS_MB,
            "{name} grew to {} MB",
            run.max_rss_mb
        );
        assert_failed_at_start_up(name, &run, "not a Redis server, or a corrupt reply");
        assert!(run.stderr.contains(&url), "{name}: {}", run.stderr);
    }
}

/// A peer that answers one byte a second: each call as a whole ends within
/// its 2 s, so fly exits 1 at start-up within about 2 s, saying it timed
/// out (it used to wait forever: the timeout was per read).
#[test]
fn a_peer_that_drips_makes_start_up_fail_within_two_seconds() {
    let url = format!("redis://127.0.0.1:{}", fake_redis(drips));
    for (name, mut command) in starting_commands(&url) {
        let run = run_watched(&mut command, Duration::from_secs(10));
        assert_failed_at_start_up(name, &run, "did not answer: timed out after 2 s");
    }
}

/// `run` exited 1 within about 2 s (the rest is room for a loaded machine)
/// with one error line that says `why`.
fn assert_failed_at_start_up(name: &str, run: &Run, why: &str) {
    let code = run.status.and_then(|status| status.code());
    assert_eq!(code, Some(1), "{name}: {}", run.stderr);
    assert!(
        run.took < Duration::from_secs(5),
        "{name} took {:?}",
        run.took
    );
    assert_eq!(run.stderr.lines().count(), 1, "{name}: {}", run.stderr);
    assert!(run.stderr.contains(why), "{name}: {}", run.stderr);
}

/// What went wrong is said as it is: refused, timed out, or plain text
/// where `rediss://` expects TLS — not the socket's "Resource temporarily
/// unavailable" for the last two.
#[test]
#[ignore = "needs redis-server"]
fn a_redis_that_cannot_be_used_says_why() {
    let said = |url: &str| {
        let output = dead_letters_at(url);
        assert_eq!(output.status.code(), Some(1), "{url}");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!stderr.contains("os error 11"), "{stderr}");
        stderr
    };
    let refused = RefusedPort::new();
    let stderr = said(&format!("redis://127.0.0.1:{}", refused.port));
    assert!(
        stderr.contains("unreachable: connection refused"),
        "{stderr}"
    );
    let silent = fake_redis(stays_silent);
    let stderr = said(&format!("redis://127.0.0.1:{silent}"));
    assert!(
        stderr.contains("did not answer: timed out after 2 s"),
        "{stderr}"
    );
    let plain = RedisServer::tcp();
    let Endpoint::Tcp(port) = plain.endpoint else {
        unreachable!("a TCP redis-server")
    };
    let stderr = said(&format!("rediss://127.0.0.1:{port}"));
    assert!(
        stderr.contains("is not a TLS server (rediss:// against a plain server?)"),
        "{stderr}"
    );
}

/// SIGTERM (a service manager stopping fly) while fly waits for Redis at
/// start-up: a clean stop, exit 0, saying so — not "Interrupted system
/// call" and exit 1.
#[test]
fn a_stop_signal_while_connecting_to_redis_is_a_clean_stop() {
    let port = fake_redis(stays_silent);
    let mut child = fly_child("http://127.0.0.1:9")
        .args(["poll-echo", "--state", &format!("redis://127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_a_request_in_flight(child.id(), port, "fly to wait for the fake Redis");
    crate::common::signal(child.id(), libc::SIGTERM);
    let status = crate::common::wait_for_exit(&mut child, Duration::from_secs(3));
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(status.and_then(|status| status.code()), Some(0), "{stderr}");
    assert!(stderr.contains("interrupted by a signal"), "{stderr}");
    assert!(!stderr.contains("Interrupted system call"), "{stderr}");
}

/// A proxy in front of a redis-server that can be switched to pass the
/// server's answers on one byte a second.
struct DripProxy {
    port: u16,
    dripping: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DripProxy {
    fn new(redis: &RedisServer) -> DripProxy {
        use std::sync::atomic::Ordering;
        let Endpoint::Tcp(upstream) = redis.endpoint else {
            unreachable!("a TCP redis-server")
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dripping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drip = std::sync::Arc::clone(&dripping);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut to_server, mut from_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut from_client, &mut to_server));
                let drip = std::sync::Arc::clone(&drip);
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 16 * 1024];
                    while let Ok(read) = server.read(&mut buffer) {
                        if read == 0 {
                            return;
                        }
                        for byte in &buffer[..read] {
                            if drip.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_secs(1));
                            }
                            if client.write_all(&[*byte]).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        DripProxy { port, dripping }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn drip(&self, on: bool) {
        self.dripping.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Mid-run, the Redis connection starts dripping (a byte a second): the
/// delivery in hand is answered 503 within the 2 s a call has (the platform
/// delivers again), not held for as long as the drip lasts; once Redis
/// answers normally again, so does serve-webhook, and the update is handled
/// when the platform delivers it again (the admission whose answer was lost
/// took its claim at the server; it is given back, not left to lapse).
#[test]
#[ignore = "needs redis-server"]
fn a_redis_that_starts_dripping_mid_run_gives_503_not_a_hang() {
    let redis = RedisServer::tcp();
    let proxy = DripProxy::new(&redis);
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_state(
        &emulator.base_url,
        dir.path(),
        std::ffi::OsStr::new(&proxy.url()),
        &["--secret", SECRET],
    );
    let agent = agent();
    let first = signed_text(701, "u_1", "first", "n-701");
    assert_eq!(post_with(&agent, &server.url, &first), answer(200, "OK"));

    proxy.drip(true);
    let during = signed_text(702, "u_1", "during", "n-702");
    let started = Instant::now();
    assert_eq!(
        post_with(&agent, &server.url, &during),
        answer(503, "STATE_STORE_UNAVAILABLE")
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        started.elapsed()
    );
    proxy.drip(false);
    let readyz = format!("{}/readyz", server.origin);
    wait_until(Duration::from_secs(20), "/readyz to pass again", || {
        get(&readyz).status == 200
    });
    let mut redelivered = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            redelivered = Some(post_with(&agent, &server.url, &during));
            redelivered == Some(answer(200, "OK"))
        }),
        "{redelivered:?}"
    );
    assert_eq!(echoed_ids(&emulator), [701, 702]);
}

/// The prefix of the test bot's keys in `redis`, once fly has used it.
fn bot_prefix(redis: &RedisServer) -> String {
    let keys = redis.command(&["KEYS", "*:meta"]);
    let meta = keys[0].as_str().expect("a meta key").to_string();
    meta.trim_end_matches("meta").to_string()
}

/// `fly dead-letters` for the test bot at `http://127.0.0.1:9` against `url`.
fn dead_letters_at(url: &str) -> std::process::Output {
    dead_letters_of("http://127.0.0.1:9", url)
}

/// `fly dead-letters` for the test bot at `base_url` against `url`.
fn dead_letters_of(base_url: &str, url: &str) -> std::process::Output {
    fly()
        .env("FLY_BASE_URL", base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .args(["dead-letters", "--state", url])
        .output()
        .unwrap()
}

/// A database number below 0 is bad input (exit 2), said before connecting.
#[test]
fn a_negative_database_number_is_bad_input() {
    let nothing_listens = RefusedPort::new();
    let output = dead_letters_at(&format!("redis://127.0.0.1:{}/-1", nothing_listens.port));
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("database -1: a database number is 0 or more"),
        "{stderr}"
    );
}

/// A stored offset that fly could not have written (`-5`, text) is refused
/// with a clear error, not polled from.
#[test]
#[ignore = "needs redis-server"]
fn a_corrupt_stored_offset_is_refused() {
    let redis = RedisServer::unix();
    let emulator = Emulator::start();
    emulator.user_says("private", "u_1", "hello");
    assert!(
        dead_letters_of(&emulator.base_url, &redis.url())
            .status
            .success()
    );
    let offset = format!("{}offset", bot_prefix(&redis));
    for corrupt in ["-5", "twelve"] {
        redis.command(&["SET", &offset, corrupt]);
        let output = fly_at(&emulator)
            .args(["poll-echo", "--once", "--state", &redis.url()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("holds a poll offset that is not one")
                && stderr.contains(&format!("{corrupt:?}")),
            "{stderr}"
        );
        assert!(emulator.sent().is_empty(), "nothing is polled from it");
    }
}

/// A `meta` naming another base URL than the one in use is refused, as a
/// state file of another bot is (exit 1), and left as it is.
#[test]
#[ignore = "needs redis-server"]
fn a_redis_meta_of_another_base_url_is_refused() {
    let redis = RedisServer::unix();
    assert!(dead_letters_at(&redis.url()).status.success());
    let meta = format!("{}meta", bot_prefix(&redis));
    redis.command(&["HSET", &meta, "base_url", "https://elsewhere.example"]);
    let output = dead_letters_at(&redis.url());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("of the bot at https://elsewhere.example"),
        "{stderr}"
    );
    assert_eq!(
        redis.command(&["HGET", &meta, "base_url"]),
        json!("https://elsewhere.example")
    );
}

/// Dead letters are read in pages, and one larger than the reply cap in
/// pieces: everything stored comes back whole, however large. (A guard for
/// the cap, not a finding: this worked before it.)
#[test]
#[ignore = "needs redis-server"]
fn dead_letters_larger_than_the_reply_cap_are_listed_whole() {
    let redis = RedisServer::unix();
    assert!(dead_letters_at(&redis.url()).status.success());
    let prefix = bot_prefix(&redis);
    let sizes = [
        10usize,
        5 * 1024 * 1024 + 7,
        3,
        1024 * 1024,
        2 * 1024 * 1024,
    ];
    for (n, size) in sizes.iter().enumerate() {
        let raw = format!("{{\"n\":{n},\"pad\":\"{}\"}}", "é".repeat(size / 2));
        let letter = json!({"update_id": n, "reason": "test", "raw": raw, "recorded_at": 1});
        let sha = format!("sha{n}");
        redis.command(&["HSET", &format!("{prefix}dead"), &sha, &letter.to_string()]);
        redis.command(&["RPUSH", &format!("{prefix}dead:order"), &sha]);
    }
    let output = dead_letters_at(&redis.url());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(listed.len(), sizes.len());
    for (n, size) in sizes.iter().enumerate() {
        assert_eq!(listed[n]["update_id"], json!(n));
        let raw = listed[n]["raw"].as_str().unwrap();
        assert_eq!(
            raw.chars().filter(|c| *c == 'é').count(),
            size / 2,
            "letter {n}"
        );
    }
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
    // The outage warning, not an earlier line that also says unreachable
    // (a lease renewal that failed).
    let warning = |log: &str| {
        log.lines()
            .find(|line| {
                line.contains("WARN")
                    && line.contains("state store")
                    && line.contains("unreachable: ")
            })
            .map(str::to_string)
    };
    wait_until(Duration::from_secs(10), "the outage warning", || {
        warning(&poller.log()).is_some()
    });
    let log = poller.log();
    let line = warning(&log).unwrap();
    assert!(
        line.contains("polling pauses until the state store is back"),
        "{line}\n{log}"
    );
    // The webhook's words, not any "503" (a timestamp may hold one).
    assert!(!log.contains("answered 503"), "{log}");
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
