//! Shared test helpers: the scrubbed `fly` command and a running emulator.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command as StdCommand, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use serde_json::{Value, json};

pub const TOKEN: &str = "test-token-7f3a9c";

/// Path of the `fly` binary under test.
pub fn fly_path() -> std::path::PathBuf {
    assert_cmd::cargo::cargo_bin("fly")
}

/// `fly` with an environment scrubbed of every FLY_* variable (and anything else
/// from the developer's shell), so tests never depend on who runs them.
pub fn fly() -> Command {
    let mut command = Command::new(fly_path());
    command.env_clear().envs(kept_environment());
    command.timeout(Duration::from_secs(120));
    command
}

/// The variables of the developer's shell a test run keeps, and a config
/// directory that does not exist: the developer's own profiles
/// (~/.config/fly/config.toml) must not reach the tests.
fn kept_environment() -> Vec<(&'static str, String)> {
    ["PATH", "HOME", "TMPDIR", "LANG"]
        .into_iter()
        .filter_map(|name| Some((name, std::env::var(name).ok()?)))
        .chain([("XDG_CONFIG_HOME", NO_CONFIG_HOME.to_string())])
        .collect()
}

/// `XDG_CONFIG_HOME` of every test: no config file there.
pub const NO_CONFIG_HOME: &str = "/nonexistent/fly-tests-have-no-config";

/// `fly` as a std Command, for tests that need the running child (signals,
/// pipes, /proc): the environment scrubbed as for `fly()`, pointed at
/// `base_url` with the test token.
pub fn fly_child(base_url: &str) -> StdCommand {
    let mut command = StdCommand::new(fly_path());
    command
        .env_clear()
        .envs(kept_environment())
        .env("FLY_BASE_URL", base_url)
        .env("FLY_BOT_TOKEN", TOKEN);
    command
}

/// `fly` pointed at an emulator with the test token.
pub fn fly_at(emulator: &Emulator) -> Command {
    let mut command = fly();
    command
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", TOKEN);
    command
}

/// A `fly emulator --port 0` child process, killed when dropped. Its log
/// (stderr) is collected as it comes and shown if the test fails.
pub struct Emulator {
    child: Child,
    pub base_url: String,
    agent: ureq::Agent,
    log: ChildLog,
}

impl Emulator {
    /// An emulator that accepts any non-empty token.
    pub fn start() -> Emulator {
        Emulator::start_with(0, &[])
    }

    /// An emulator that accepts only [`TOKEN`].
    pub fn start_strict() -> Emulator {
        Emulator::start_with(0, &["--token", TOKEN])
    }

    /// An emulator on `port`: only a restart where an earlier run listened
    /// (its [`Emulator::port`]), never a port chosen beforehand.
    pub fn start_on_port(port: u16) -> Emulator {
        Emulator::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[&str]) -> Emulator {
        let mut child = StdCommand::new(fly_path())
            .args(["emulator", "--port", &port.to_string()])
            .args(extra)
            .env_clear()
            .envs(kept_environment())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fly emulator");
        let log = ChildLog::collect("fly emulator", &mut child);
        let stdout = child.stdout.take().expect("emulator stdout");
        let mut first_line = String::new();
        BufReader::new(stdout)
            .read_line(&mut first_line)
            .expect("read emulator base URL");
        let base_url = first_line.trim().to_string();
        assert!(
            base_url.starts_with("http://127.0.0.1:"),
            "emulator's first line should be its base URL, got {base_url:?}"
        );
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Emulator {
            child,
            base_url,
            agent,
            log,
        }
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        port_of(&self.base_url)
    }

    /// Its log (stderr) so far: one line per request, once answered.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Stops it (SIGKILL) and waits for the end of its log: then `log()`
    /// is all it will ever say.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.finish();
    }

    /// POST to the control API (or any path), returning the JSON answer.
    pub fn post(&self, path: &str, body: Value) -> Value {
        self.post_text(path, &body.to_string())
    }

    /// POST a body given as text (what serde cannot write: `NaN`, a lone
    /// surrogate escape, a 30-digit integer), returning the JSON answer.
    pub fn post_text(&self, path: &str, body: &str) -> Value {
        let mut response = self
            .agent
            .post(&format!("{}{}", self.base_url, path))
            .header("Content-Type", "application/json")
            .send(body)
            .unwrap_or_else(|error| panic!("POST {path}: {error}"));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        assert!(status < 300, "POST {path} answered {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Queues a raw update given as text; returns its update_id.
    pub fn raw_update(&self, update: &str) -> i64 {
        self.post_text("/_emulator/updates", update)["update_id"]
            .as_i64()
            .expect("update_id")
    }

    /// `GET /_emulator/sent` as text: the send bodies exactly as the bot
    /// sent them (serde cannot read a lone surrogate escape).
    pub fn sent_text(&self) -> String {
        let mut response = self
            .agent
            .get(&format!("{}/_emulator/sent", self.base_url))
            .call()
            .unwrap_or_else(|error| panic!("GET /_emulator/sent: {error}"));
        response.body_mut().read_to_string().unwrap()
    }

    pub fn get(&self, path: &str) -> Value {
        let mut response = self
            .agent
            .get(&format!("{}{}", self.base_url, path))
            .call()
            .unwrap_or_else(|error| panic!("GET {path}: {error}"));
        response.body_mut().read_json().unwrap()
    }

    /// A user sends a text message; returns its update_id.
    pub fn user_says(&self, chat_type: &str, chat_id: &str, text: &str) -> i64 {
        let answer = self.post(
            "/_emulator/messages",
            json!({"chat": {"type": chat_type, "id": chat_id}, "msgType": "text", "data": {"content": text}}),
        );
        answer["update_id"].as_i64().expect("update_id")
    }

    /// Every send request the emulator accepted, in order.
    pub fn sent(&self) -> Vec<Value> {
        match self.get("/_emulator/sent")["sent"].take() {
            Value::Array(sent) => sent,
            other => panic!("unexpected /_emulator/sent: {other}"),
        }
    }

    /// How many send requests arrived, repeats of a client_msg_id and
    /// refused ones included (`GET /_emulator/sent`'s `attempts`).
    pub fn send_attempts(&self) -> u64 {
        self.get("/_emulator/sent")["attempts"]
            .as_u64()
            .expect("attempts")
    }

    pub fn faults(&self, faults: Value) {
        self.post("/_emulator/faults", faults);
    }

    /// The emulator's process id, e.g. to read its memory use from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the emulator to exit by itself (after a signal).
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = wait_for_exit(&mut self.child, limit)?;
        self.log.finish();
        Some(status)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port of a `http://127.0.0.1:PORT…` URL.
pub fn port_of(url: &str) -> u16 {
    let authority = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("not a URL: {url:?}"));
    authority
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url:?}"))
}

/// The lines of a command's stderr, for checks on error messages.
pub fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Polls `condition` until it holds (true) or `limit` passes (false).
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // The polling interval.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`eventually`], failing the test with `what` on a timeout.
pub fn wait_until(limit: Duration, what: &str, condition: impl FnMut() -> bool) {
    assert!(eventually(limit, condition), "timed out waiting for {what}");
}

/// Sends `signal` (`libc::SIGTERM`, …) to process `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) takes no memory from us.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        sent,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

/// The exit status of `child` if it ends within `limit`.
pub fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let mut status = None;
    eventually(limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status
}

/// A loopback port where nothing listens, for as long as this lives: a
/// socket bound to it and never listening, so no other process can take the
/// port (a port only looked up as free could be taken before it is used)
/// and a connection to it is refused at once (ECONNREFUSED, checked by
/// `a_refused_port_refuses_connections_and_cannot_be_taken`). No
/// SO_REUSEADDR: another socket that sets it could otherwise bind and listen
/// here too.
pub struct RefusedPort {
    socket: socket2::Socket,
    pub port: u16,
}

impl RefusedPort {
    pub fn new() -> RefusedPort {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        socket.bind(&any_port.into()).unwrap();
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        RefusedPort { socket, port }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Gives the port up for a server that is about to listen on it (the
    /// receiver that comes up where a client was refused): from here until
    /// it binds, another process could take the port, a gap of one spawn.
    pub fn hand_over(self) -> u16 {
        let port = self.port;
        drop(self.socket);
        port
    }
}

#[test]
fn a_refused_port_refuses_connections_and_cannot_be_taken() {
    let refused = RefusedPort::new();
    let address = ("127.0.0.1", refused.port);
    let error = std::net::TcpStream::connect(address).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    let error = std::net::TcpListener::bind(address).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    let port = refused.hand_over();
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

/// One line of /proc/net/tcp (IPv4): a TCP socket of this network namespace.
struct TcpSocket {
    local: (u32, u16),
    remote: (u32, u16),
    /// The kernel's TCP state: 0x01 established, 0x0A listening.
    state: u8,
    /// Bytes received and not yet read by the socket's owner.
    unread: u64,
    inode: u64,
}

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;

fn tcp_sockets() -> Vec<TcpSocket> {
    let address = |field: &str| -> (u32, u16) {
        let (ip, port) = field.split_once(':').unwrap();
        (
            u32::from_str_radix(ip, 16).unwrap(),
            u16::from_str_radix(port, 16).unwrap(),
        )
    };
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (_queued, unread) = fields[4].split_once(':').unwrap();
            TcpSocket {
                local: address(fields[1]),
                remote: address(fields[2]),
                state: u8::from_str_radix(fields[3], 16).unwrap(),
                unread: u64::from_str_radix(unread, 16).unwrap(),
                inode: fields[9].parse().unwrap(),
            }
        })
        .collect()
}

/// The socket inode behind file descriptor `fd` of process `pid`.
fn socket_inode(pid: u32, fd: &str) -> Option<u64> {
    let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The inodes of every socket process `pid` has open.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    fds.filter_map(|fd| socket_inode(pid, fd.ok()?.file_name().to_str()?))
        .collect()
}

/// The TCP port process `pid` listens on, if it listens (read back from
/// /proc, for a program that takes port 0 and does not say which port it
/// got).
pub fn listening_port(pid: u32) -> Option<u16> {
    let inodes = socket_inodes(pid);
    tcp_sockets()
        .into_iter()
        .find(|socket| socket.state == TCP_LISTEN && inodes.contains(&socket.inode))
        .map(|socket| socket.local.1)
}

/// Whether a thread of process `pid` (this test process too) is blocked
/// reading the answer to a request it sent to the loopback server on
/// `port`, and the server has read that request whole: a long poll or a
/// slow call in flight. From /proc: the thread's current system call (a
/// read from a socket), the socket's connection, and the server's side of
/// it, which holds no unread bytes.
pub fn awaits_an_answer_from(pid: u32, port: u16) -> bool {
    let sockets = tcp_sockets();
    reading_from(pid, port, &sockets).iter().any(|client| {
        sockets.iter().any(|server| {
            server.local == client.remote && server.remote == client.local && server.unread == 0
        })
    })
}

/// The connections to the loopback server on `port` that a thread of `pid`
/// is blocked reading from.
fn reading_from(pid: u32, port: u16, sockets: &[TcpSocket]) -> Vec<&TcpSocket> {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let reads = [libc::SYS_read, libc::SYS_recvfrom, libc::SYS_recvmsg];
    threads
        .filter_map(|thread| {
            // `NR ARG1 …` while blocked in a system call, `running` otherwise.
            let call = std::fs::read_to_string(thread.ok()?.path().join("syscall")).ok()?;
            let mut fields = call.split_whitespace();
            let number: libc::c_long = fields.next()?.parse().ok()?;
            let fd = u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
            if !reads.contains(&number) {
                return None;
            }
            let inode = socket_inode(pid, &fd.to_string())?;
            sockets.iter().find(|socket| {
                socket.inode == inode
                    && socket.state == TCP_ESTABLISHED
                    && socket.remote == (LOOPBACK, port)
            })
        })
        .collect()
}

/// 127.0.0.1 as /proc/net/tcp writes it (in host order on a little-endian
/// machine: 0100007F).
const LOOPBACK: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[test]
fn awaits_an_answer_from_sees_a_request_read_whole_and_not_answered() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let me = std::process::id();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let request = "POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
    client.write_all(request.as_bytes()).unwrap();
    let waiting = std::thread::spawn(move || {
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        answer
    });
    wait_until(
        Duration::from_secs(10),
        "the client to block reading",
        || !reading_from(me, port, &tcp_sockets()).is_empty(),
    );
    // Sent, but not read yet by the server.
    assert!(!awaits_an_answer_from(me, port));
    let mut head = vec![0u8; request.len() - 5];
    server.read_exact(&mut head).unwrap();
    assert!(!awaits_an_answer_from(me, port), "the body is not read yet");
    let mut body = [0u8; 5];
    server.read_exact(&mut body).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the request to be seen in flight",
        || awaits_an_answer_from(me, port),
    );
    server.write_all(b"done").unwrap();
    drop(server);
    assert_eq!(waiting.join().unwrap(), "done");
    assert!(!awaits_an_answer_from(me, port));
}

/// Waits until a thread of `pid` awaits the answer to a request the server
/// on `port` has read ([`awaits_an_answer_from`]).
pub fn wait_for_a_request_in_flight(pid: u32, port: u16, what: &str) {
    wait_until(Duration::from_secs(20), what, || {
        awaits_an_answer_from(pid, port)
    });
}

/// The echo poll-echo and serve-webhook send for a text update; `target` is
/// `("to_user_id" | "group_id", chat id)`.
pub fn echo(update_id: i64, content: &str, target: (&str, &str)) -> Value {
    let mut expected = json!({
        "msg_type": "text",
        "data": {"content": format!("echo: {content}")},
        "client_msg_id": format!("echo_{update_id}"),
    });
    expected[target.0] = json!(target.1);
    expected
}

/// `fly sign --secret SECRET EXTRA…` of `update`: the signed update, one line.
pub fn sign_update(update: &str, secret: &str, extra: &[&str]) -> String {
    let output = fly()
        .args(["sign", "--secret", secret])
        .args(extra)
        .write_stdin(update.to_string())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    String::from_utf8(output.stdout)
        .unwrap()
        .trim_end()
        .to_string()
}

/// The live (not zombie) processes in process group `group`, one per line.
pub fn live_members_of_group(group: &str) -> String {
    let output = StdCommand::new("ps")
        .args(["-A", "-o", "pgid=,stat=,pid=,args="])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| {
            let mut fields = line.split_whitespace();
            fields.next() == Some(group) && !fields.next().unwrap_or("Z").starts_with('Z')
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

/// The text of an update the emulator serves for a raw update posted as
/// `posted`: `"update_id":N` put first, the rest as written.
pub fn served_update(update_id: i64, posted: &str) -> String {
    let members = posted.trim().strip_prefix('{').expect("an object");
    let separator = if members.trim_start().starts_with('}') {
        ""
    } else {
        ","
    };
    format!("{{\"update_id\":{update_id}{separator}{members}")
}

/// The emulator's deterministic content for `{"size": n}` files: byte i is i % 251.
pub fn media_pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// The answer of `misbehaving_server` to every POST: a redirect to `/landing`.
pub const REDIRECT: &str =
    "HTTP/1.1 302 Found\r\nLocation: /landing\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// A server that answers every POST with `post_answer` (raw HTTP), and a GET
/// of `/landing` with a 2xx envelope, so a client that followed a redirect
/// would think it succeeded. Returns its base URL and the request lines it
/// has seen.
pub fn misbehaving_server(
    post_answer: &'static str,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = std::sync::Arc::clone(&seen);
    let base_url = raw_http_server(move |request_line| {
        recorded.lock().unwrap().push(request_line.to_string());
        if request_line.starts_with("GET /landing") {
            let body = r#"{"code":0,"msg":"ok","data":{"message_id":"m_1"}}"#;
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        } else {
            post_answer.to_string()
        }
    });
    (base_url, seen)
}

/// Each request line a test server has seen, with the time it arrived.
pub type SeenWithTimes = std::sync::Arc<std::sync::Mutex<Vec<(String, Instant)>>>;

/// A server that answers the requests it gets with `answers` in turn (raw
/// HTTP), the last one again for every request after them. Returns its base
/// URL and what it has seen.
pub fn answering_in_turn(answers: &[&'static str]) -> (String, SeenWithTimes) {
    let answers = answers.to_vec();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = std::sync::Arc::clone(&seen);
    let base_url = raw_http_server(move |request_line| {
        let mut seen = recorded.lock().unwrap();
        let answer = answers[seen.len().min(answers.len() - 1)];
        seen.push((request_line.to_string(), Instant::now()));
        answer.to_string()
    });
    (base_url, seen)
}

/// A loopback server (port 0) that reads each request whole and writes back
/// `answer(request line)` as it is, one connection at a time. Returns its
/// base URL. (Fixed answers from a raw socket: nothing here needs real HTTP
/// parsing, and no library server does a wrong thing on purpose.)
fn raw_http_server(mut answer: impl FnMut(&str) -> String + Send + 'static) -> String {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            // Read whole: unread bytes would make the close a reset, which
            // the client would see instead of the answer.
            let Some(request_line) = read_request(&stream) else {
                continue;
            };
            let answer = answer(&request_line);
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    base_url
}

/// Reads one HTTP/1.1 request from `stream` whole (head, then a body of
/// its Content-Length); returns its request line.
pub fn read_request(stream: &std::net::TcpStream) -> Option<String> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut body_length = 0usize;
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|read| read > 2) {
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            body_length = value.trim().parse().unwrap_or(0);
        }
        line.clear();
    }
    let mut body = vec![0u8; body_length];
    std::io::Read::read_exact(&mut reader, &mut body).ok()?;
    Some(request_line.trim().to_string())
}

/// A receiver that takes one connection, reads the request on it whole and
/// never answers. Returns its URL (`/hook`) and a thread that ends, giving
/// the connection (to be held open), once the request is read: the sender
/// is then waiting for an answer.
pub fn silent_receiver() -> (String, JoinHandle<std::net::TcpStream>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        read_request(&stream).expect("a whole request");
        stream
    });
    (url, held)
}

/// A long-running `fly` child (poll-echo, serve-webhook, forward) pointed at
/// the emulator. Its stderr is collected as it comes (and shown if the test
/// fails); killed when dropped.
pub struct Service {
    pub child: Child,
    stdout: BufReader<ChildStdout>,
    log: ChildLog,
}

impl Service {
    pub fn start(emulator: &Emulator, args: &[&str]) -> Service {
        Service::spawn(fly_child(&emulator.base_url), args)
    }

    /// `command` (a [`fly_child`] with more set) run with `args`.
    pub fn spawn(mut command: StdCommand, args: &[&str]) -> Service {
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = ChildLog::collect(&format!("fly {}", args.join(" ")), &mut child);
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Service { child, stdout, log }
    }

    /// The first stdout line (serve-webhook's URL).
    pub fn first_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// stderr so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child to exit by itself; then its whole stderr is in `log`.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = wait_for_exit(&mut self.child, limit)?;
        self.log.finish();
        Some(status)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A program other than fly (a reference example), killed when dropped, so
/// a failing assertion leaves nothing running; its stderr is shown if the
/// test fails.
pub struct Background {
    pub child: Child,
    /// Held for its drop, which shows the log if the test fails.
    _log: ChildLog,
}

impl Background {
    /// Spawns `command` (its stderr piped here); `name` says whose log it is.
    pub fn spawn(name: &str, command: &mut StdCommand) -> Background {
        let mut child = command
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("start {name}: {error}"));
        let log = ChildLog::collect(name, &mut child);
        Background { child, _log: log }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child's stderr, read as it comes into a buffer by a thread of its own
/// (so the child never blocks on a full pipe), and printed on the test's
/// stderr when dropped while the test fails.
pub struct ChildLog {
    name: String,
    text: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl ChildLog {
    /// Takes `child`'s piped stderr.
    pub fn collect(name: &str, child: &mut Child) -> ChildLog {
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr piped"));
        let text = Arc::new(Mutex::new(String::new()));
        let reader = std::thread::spawn({
            let text = Arc::clone(&text);
            move || {
                let mut line = Vec::new();
                while stderr
                    .read_until(b'\n', &mut line)
                    .is_ok_and(|read| read > 0)
                {
                    text.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&line));
                    line.clear();
                }
            }
        });
        ChildLog {
            name: name.to_string(),
            text,
            reader: Some(reader),
        }
    }

    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Waits for the end of the stream: the child has exited, and so has
    /// every process that inherited its stderr.
    pub fn finish(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
    }
}

impl Drop for ChildLog {
    /// While a test is failing (unwinding), prints what the child said. An
    /// owner kills its child first (fields drop after the owner's `drop`);
    /// the stream is given a moment to end (a handler left behind may hold
    /// the pipe open).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if let Some(reader) = &self.reader {
            eventually(Duration::from_secs(1), || reader.is_finished());
        }
        show_log(&self.name, &self.text());
    }
}

/// Prints a child's log on the test's stderr, framed, for a failing test.
pub fn show_log(name: &str, text: &str) {
    eprintln!("----- {name}: its log -----\n{text}----- end of {name}'s log -----");
}

/// A new file `PREFIX<random>.log` in `dir` that outlives its handle, for a
/// child's stderr.
pub fn new_log_file(dir: &Path, prefix: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(prefix)
        .suffix(".log")
        .tempfile_in(dir)
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap()
}

/// From a `Drop`: prints the log file of `name` when the test is failing.
pub fn show_log_file_if_failing(name: &str, path: &Path) {
    if std::thread::panicking() {
        show_log(name, &std::fs::read_to_string(path).unwrap_or_default());
    }
}

/// A self-signed certificate for localhost and 127.0.0.1 written to `dir`:
/// (certificate path, key path, certificate PEM).
pub fn write_certificate(dir: &Path) -> (PathBuf, PathBuf, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_pem = certified.cert.pem();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key, cert_pem)
}

/// A number no other test of this run uses, for `sleep` durations that
/// `pgrep -f` can find (and for names of their own). One counter for the
/// whole test binary: two would hand out the same numbers.
pub fn unique_number() -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{}{:03}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    )
}

/// `pgrep -a -f PATTERN`: the processes whose command line matches, one per line.
pub fn processes_matching(pattern: &str) -> String {
    let output = std::process::Command::new("pgrep")
        .args(["-a", "-f", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}
