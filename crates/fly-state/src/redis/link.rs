//! One connection to the Redis server, bounded against a peer that
//! misbehaves: every call ends by its deadline whatever the peer drips, and
//! no reply is read past [`MAX_REPLY_BYTES`].
//!
//! Why not the `redis` crate's own blocking `Connection`: it reads with a
//! timeout per `read` (a peer sending one byte a second never times out)
//! and buffers a reply of whatever length its header announces (after
//! `$999999999999` it grows until memory runs out); it has no setting for
//! either, and no way to be handed a stream of ours. So fly keeps the crate
//! for what it does well — URLs, commands, scripts, the RESP parser, typed
//! replies — and implements its [`ConnectionLike`] over a socket of its
//! own: each read and write gets the time left before the call's deadline
//! (and a read past it fails), and the parser reads through a counter that
//! fails past the cap, so the buffer it fills stays bounded too.
//!
//! What went wrong is kept as a [`Fault`], worded for the one error line:
//! refused, timed out, not a TLS server, not a Redis server.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{
    ConnectionAddr, ConnectionInfo, ConnectionLike, Parser, RedisError, RedisResult, Value,
};

/// The largest reply fly reads. Its own are far smaller: a short string or
/// a number per call, and dead letters (each an update's raw bytes, up to
/// serve-webhook's `--max-body`) are read in pages of [`super::DEAD_PAGE_BYTES`],
/// a letter larger than a page in pieces. A reply past this is not from a
/// Redis server fly talks to, or is corrupt.
pub(super) const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// After a reply this large the parser's buffer is let go, so that an idle
/// connection does not hold a few MiB each.
const KEEP_BUFFER_BYTES: usize = 64 * 1024;

/// Where and how to connect, from a parsed Redis URL.
pub(super) struct Target {
    address: Address,
    /// For `rediss://`: the server's certificate is checked against the
    /// system's roots (`SSL_CERT_FILE` names another bundle).
    tls: Option<Arc<rustls::ClientConfig>>,
    db: i64,
    username: Option<String>,
    password: Option<String>,
    resp3: bool,
}

enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl Target {
    /// The target a URL names; why it cannot be used otherwise (bad input).
    pub(super) fn new(info: &ConnectionInfo) -> Result<Target, BadTarget> {
        let (address, tls) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => (
                Address::Tcp {
                    host: host.clone(),
                    port: *port,
                },
                None,
            ),
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => {
                if *insecure {
                    return Err(BadTarget::Insecure);
                }
                (
                    Address::Tcp {
                        host: host.clone(),
                        port: *port,
                    },
                    Some(tls_config()?),
                )
            }
            ConnectionAddr::Unix(path) => (Address::Unix(path.clone()), None),
            _ => return Err(BadTarget::Address),
        };
        let settings = info.redis_settings();
        let db = settings.db();
        if db < 0 {
            return Err(BadTarget::Database(db));
        }
        Ok(Target {
            address,
            tls,
            db,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            resp3: settings.protocol().supports_resp3(),
        })
    }
}

/// Why a Redis URL names nothing fly can connect to (bad input).
#[derive(Debug)]
pub(super) enum BadTarget {
    /// `#insecure`: fly always checks the server's certificate.
    Insecure,
    /// A kind of address the crate knows and fly does not connect to.
    Address,
    /// A database number below 0.
    Database(i64),
    /// No TLS configuration could be built.
    Tls(rustls::Error),
}

impl fmt::Display for BadTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadTarget::Insecure => f.write_str(
                "#insecure is not supported: the server's certificate is always checked \
                 (SSL_CERT_FILE names the roots to trust)",
            ),
            BadTarget::Address => f.write_str("not an address fly can connect to"),
            BadTarget::Database(db) => write!(f, "database {db}: a database number is 0 or more"),
            BadTarget::Tls(error) => write!(f, "TLS: {error}"),
        }
    }
}

impl std::error::Error for BadTarget {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BadTarget::Tls(error) => Some(error),
            _ => None,
        }
    }
}

/// TLS with the system's roots, as the `redis` crate would have it; with
/// no usable root the handshake fails, saying the certificate is unknown.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, BadTarget> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(BadTarget::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Why a call (or a connection) failed, in words for the one error line:
/// `state store redis://host:port {fault}`.
#[derive(Debug)]
pub(super) enum Fault {
    Refused,
    Unreachable(String),
    /// The call's whole time passed (the duration is that time).
    TimedOut(Duration),
    /// The connection ended under the call (EOF, reset).
    Closed(String),
    /// `rediss://` to a peer that does not answer in TLS; how it answered.
    NotTls(String),
    Tls(String),
    /// A reply over the cap, or bytes that are not RESP.
    Corrupt(String),
    /// A signal (SIGINT/SIGTERM) while the store was being opened.
    Interrupted,
    /// The server's own answer: an error reply, or a reply of another type.
    Redis(RedisError),
}

impl Fault {
    /// Whether it says the server is out of reach for now (a delivery is
    /// answered 503, a poller pauses) rather than that the call was wrong.
    pub(super) fn is_outage(&self) -> bool {
        match self {
            Fault::Redis(error) => super::is_outage(error),
            Fault::Interrupted => false,
            _ => true,
        }
    }

    /// Whether a connection kept idle was found closed before it could
    /// answer: the call is made again on a new one.
    pub(super) fn is_stale(&self) -> bool {
        matches!(self, Fault::Closed(_))
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Refused => f.write_str("unreachable: connection refused"),
            Fault::Unreachable(why) => write!(f, "unreachable: {why}"),
            Fault::TimedOut(after) => {
                write!(f, "did not answer: timed out after {}", seconds(*after))
            }
            Fault::Closed(why) => write!(f, "unreachable: the connection was closed ({why})"),
            Fault::NotTls(how) => write!(
                f,
                "is not a TLS server (rediss:// against a plain server?): {how}"
            ),
            Fault::Tls(why) => write!(f, "failed the TLS handshake: {why}"),
            Fault::Corrupt(what) => {
                write!(f, "sent {what}: not a Redis server, or a corrupt reply")
            }
            Fault::Interrupted => f.write_str("connection interrupted by a signal"),
            Fault::Redis(error) => write!(f, "answered: {error}"),
        }
    }
}

/// `2 s`, `0.5 s`.
fn seconds(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{secs:.0} s")
    } else {
        format!("{secs:.1} s")
    }
}

/// A TCP or unix socket whose reads and writes end by a deadline.
struct Socket {
    /// socket2's socket: one type for both kinds, reads, writes and timeouts.
    inner: socket2::Socket,
    deadline: Instant,
    /// The time the deadline was set for, to say how long was waited.
    budget: Duration,
    /// Whether a signal ends the call (while the store is opened) or the
    /// interrupted read or write is made again (later: a stop lets the
    /// work in hand finish, and it needs its calls).
    interruptible: bool,
    /// Why the last read or write failed, when it was the deadline or a signal.
    stopped: Option<Fault>,
}

impl Socket {
    fn connect(
        address: &Address,
        deadline: Instant,
        budget: Duration,
        interruptible: bool,
    ) -> Result<Socket, Fault> {
        let left = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(Fault::TimedOut(budget))
            } else {
                Ok(left)
            }
        };
        let connect_fault = |error: io::Error| match error.kind() {
            io::ErrorKind::ConnectionRefused => Fault::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Fault::TimedOut(budget),
            io::ErrorKind::Interrupted if interruptible => Fault::Interrupted,
            _ => Fault::Unreachable(error.to_string()),
        };
        let inner = match address {
            Address::Tcp { host, port } => {
                // Name resolution has no timeout of its own (getaddrinfo).
                let addresses = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|error| Fault::Unreachable(format!("{host}: {error}")))?;
                let mut last = Fault::Unreachable(format!("{host} has no address"));
                let mut connected = None;
                for address in addresses {
                    match TcpStream::connect_timeout(&address, left()?) {
                        Ok(stream) => {
                            connected = Some(stream);
                            break;
                        }
                        Err(error) => last = connect_fault(error),
                    }
                }
                let stream = connected.ok_or(last)?;
                // A request is written whole; no need to wait for more.
                let _ = stream.set_nodelay(true);
                socket2::Socket::from(stream)
            }
            Address::Unix(path) => {
                use socket2::{Domain, SockAddr, Socket, Type};
                let to =
                    SockAddr::unix(path).map_err(|error| Fault::Unreachable(error.to_string()))?;
                let socket = Socket::new(Domain::UNIX, Type::STREAM, None)
                    .map_err(|error| Fault::Unreachable(error.to_string()))?;
                // A listener whose backlog is full makes connect wait: as
                // long as the send timeout, on Linux.
                socket
                    .set_write_timeout(Some(left()?))
                    .map_err(|error| Fault::Unreachable(error.to_string()))?;
                socket.connect(&to).map_err(|error| match error.kind() {
                    io::ErrorKind::NotFound => {
                        Fault::Unreachable(format!("no socket at {} ({error})", path.display()))
                    }
                    _ => connect_fault(error),
                })?;
                socket
            }
        };
        Ok(Socket {
            inner,
            deadline,
            budget,
            interruptible,
            stopped: None,
        })
    }

    /// Runs one read or write with the time left; past the deadline, or on
    /// a signal while that ends the call, fails and says why in `stopped`.
    fn bounded<T>(
        &mut self,
        writing: bool,
        mut operation: impl FnMut(&mut socket2::Socket) -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.stopped = Some(Fault::TimedOut(self.budget));
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the call's time is up",
                ));
            }
            if writing {
                self.inner.set_write_timeout(Some(left))?;
            } else {
                self.inner.set_read_timeout(Some(left))?;
            }
            match operation(&mut self.inner) {
                // The socket's timeout: the deadline is looked at again.
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {
                    if self.interruptible {
                        self.stopped = Some(Fault::Interrupted);
                        // Not `Interrupted`: that kind is retried by callers.
                        return Err(io::Error::other("interrupted by a signal"));
                    }
                }
                result => return result,
            }
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.bounded(false, |inner| inner.read(buf))
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bounded(true, |inner| inner.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Stream {
    Plain(Socket),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Socket>>),
}

impl Stream {
    fn socket(&mut self) -> &mut Socket {
        match self {
            Stream::Plain(socket) => socket,
            Stream::Tls(tls) => &mut tls.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(socket) => socket.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// The TLS handshake, done before anything is sent, so that a peer that is
/// not a TLS server is told apart from one that does not answer.
fn handshake(
    config: &Arc<rustls::ClientConfig>,
    host: &str,
    mut socket: Socket,
) -> Result<Stream, Fault> {
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|error| Fault::Tls(format!("{host} cannot be checked ({error})")))?;
    let mut connection = rustls::ClientConnection::new(Arc::clone(config), name)
        .map_err(|error| Fault::Tls(error.to_string()))?;
    while connection.is_handshaking() {
        if let Err(error) = connection.complete_io(&mut socket) {
            return Err(match socket.stopped.take() {
                Some(Fault::TimedOut(after)) => {
                    Fault::NotTls(format!("no TLS answer within {}", seconds(after)))
                }
                Some(other) => other,
                None => match error
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    Some(rustls::Error::InvalidMessage(_)) => {
                        Fault::NotTls("it answered with something else".into())
                    }
                    Some(other) => Fault::Tls(other.to_string()),
                    None if error.kind() == io::ErrorKind::UnexpectedEof => {
                        Fault::NotTls("it closed the connection".into())
                    }
                    None => Fault::Closed(error.to_string()),
                },
            });
        }
    }
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(
        connection, socket,
    ))))
}

/// Reads through to the stream, failing past the reply cap.
struct Capped<'a> {
    stream: &'a mut Stream,
    left: usize,
    over: bool,
    failed: Option<io::Error>,
}

impl Read for Capped<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            self.over = true;
            return Err(io::Error::other("a reply over the cap"));
        }
        let wanted = buf.len().min(self.left);
        match self.stream.read(&mut buf[..wanted]) {
            Ok(read) => {
                self.left -= read;
                Ok(read)
            }
            Err(error) => {
                let kind = error.kind();
                let said = error.to_string();
                self.failed = Some(error);
                Err(io::Error::new(kind, said))
            }
        }
    }
}

/// One connection, for one call at a time.
pub(super) struct Link {
    stream: Stream,
    parser: Parser,
    db: i64,
    /// Why the connection failed, until the caller takes it.
    fault: Option<Fault>,
    /// A link whose connection failed is never used again.
    broken: bool,
}

impl Link {
    /// Connects, and authenticates and selects the database as the URL
    /// says, all by `deadline`; `budget` is the time that deadline allows.
    /// With `interruptible`, a signal ends it ([`Fault::Interrupted`]);
    /// see [`Link::begin`] for what follows.
    pub(super) fn open(
        target: &Target,
        deadline: Instant,
        budget: Duration,
        interruptible: bool,
    ) -> Result<Link, Fault> {
        let socket = Socket::connect(&target.address, deadline, budget, interruptible)?;
        let stream = match (&target.tls, &target.address) {
            (Some(config), Address::Tcp { host, .. }) => handshake(config, host, socket)?,
            _ => Stream::Plain(socket),
        };
        let mut link = Link {
            stream,
            parser: Parser::new(),
            db: target.db,
            fault: None,
            broken: false,
        };
        link.set_up(target)?;
        Ok(link)
    }

    fn set_up(&mut self, target: &Target) -> Result<(), Fault> {
        if target.resp3 {
            let mut hello = redis::cmd("HELLO");
            hello.arg(3);
            if let Some(password) = &target.password {
                hello
                    .arg("AUTH")
                    .arg(target.username.as_deref().unwrap_or("default"))
                    .arg(password);
            }
            hello
                .query::<Value>(self)
                .map_err(|error| self.fault_of(error))?;
        } else if let Some(password) = &target.password {
            let auth = |username: Option<&str>| {
                let mut auth = redis::cmd("AUTH");
                if let Some(username) = username {
                    auth.arg(username);
                }
                auth.arg(password);
                auth
            };
            match auth(target.username.as_deref()).query::<()>(self) {
                Ok(()) => {}
                // A server older than 6 knows no user names.
                Err(error)
                    if !self.broken
                        && target.username.is_some()
                        && error
                            .to_string()
                            .contains("wrong number of arguments for 'auth'") =>
                {
                    auth(None)
                        .query::<()>(self)
                        .map_err(|error| self.fault_of(error))?;
                }
                Err(error) => return Err(self.fault_of(error)),
            }
        }
        if target.db != 0 {
            redis::cmd("SELECT")
                .arg(target.db)
                .query::<()>(self)
                .map_err(|error| self.fault_of(error))?;
        }
        Ok(())
    }

    /// Starts a call: it must end by `deadline` (`budget` from now), and a
    /// signal no longer ends it.
    pub(super) fn begin(&mut self, deadline: Instant, budget: Duration) {
        let socket = self.stream.socket();
        socket.deadline = deadline;
        socket.budget = budget;
        socket.interruptible = false;
    }

    /// What made a call on this link fail: a fault of the connection, or
    /// else the server's own answer (`error`).
    pub(super) fn fault_of(&mut self, error: RedisError) -> Fault {
        self.fault.take().unwrap_or(Fault::Redis(error))
    }

    /// Whether the connection is still in step (every call answered, if
    /// only with an error): it can be used again.
    pub(super) fn is_usable(&self) -> bool {
        !self.broken
    }

    fn fail(&mut self, fault: Fault) {
        self.fault = Some(fault);
        self.broken = true;
    }

    /// Sends `packed` (`replies` commands) and reads their replies.
    fn exchange(&mut self, packed: &[u8], replies: usize) -> RedisResult<Vec<Value>> {
        if self.broken {
            return Err(
                io::Error::new(io::ErrorKind::NotConnected, "connection failed before").into(),
            );
        }
        let written = self
            .stream
            .write_all(packed)
            .and_then(|()| self.stream.flush());
        if let Err(error) = written {
            let fault = self.stream.socket().stopped.take();
            self.fail(fault.unwrap_or_else(|| Fault::Closed(error.to_string())));
            return Err(error.into());
        }
        let mut values = Vec::with_capacity(replies);
        while values.len() < replies {
            match self.read_reply()? {
                Value::Push { .. } => {}
                value => values.push(value),
            }
        }
        Ok(values)
    }

    fn read_reply(&mut self) -> RedisResult<Value> {
        let mut capped = Capped {
            stream: &mut self.stream,
            left: MAX_REPLY_BYTES,
            over: false,
            failed: None,
        };
        let parsed = self.parser.parse_value(&mut capped);
        let (read, over, failed) = (MAX_REPLY_BYTES - capped.left, capped.over, capped.failed);
        let error = match parsed {
            Ok(value) => {
                if read > KEEP_BUFFER_BYTES {
                    self.parser = Parser::new();
                }
                return Ok(value);
            }
            Err(error) => error,
        };
        let stopped = self.stream.socket().stopped.take();
        self.fail(if let Some(stopped) = stopped {
            stopped
        } else if over {
            Fault::Corrupt(format!("a reply over {} MiB", MAX_REPLY_BYTES >> 20))
        } else if let Some(failed) = failed {
            Fault::Closed(failed.to_string())
        } else if error.is_connection_dropped() {
            Fault::Closed("end of stream".into())
        } else {
            Fault::Corrupt(format!("a reply fly cannot read ({error})"))
        });
        Err(error)
    }
}

impl ConnectionLike for Link {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        let mut values = self.exchange(cmd, 1)?;
        Ok(values.pop().unwrap_or(Value::Nil))
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let values = self.exchange(cmd, offset + count)?;
        Ok(values.into_iter().skip(offset).collect())
    }

    fn get_db(&self) -> i64 {
        self.db
    }

    fn check_connection(&mut self) -> bool {
        redis::cmd("PING").query::<String>(self).is_ok()
    }

    fn is_open(&self) -> bool {
        !self.broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::IntoConnectionInfo;

    #[test]
    fn durations_are_said_in_seconds() {
        assert_eq!(seconds(Duration::from_secs(2)), "2 s");
        assert_eq!(seconds(Duration::from_millis(500)), "0.5 s");
    }

    #[test]
    fn a_database_below_zero_is_no_target() {
        for url in ["redis://h:6379/-1", "redis+unix:///run/r.sock?db=-2"] {
            let info = url.into_connection_info().unwrap();
            let why = Target::new(&info).err().expect(url);
            assert!(matches!(why, BadTarget::Database(db) if db < 0), "{why}");
            assert!(why.to_string().contains("0 or more"), "{why}");
        }
        let info = "redis://h:6379/3".into_connection_info().unwrap();
        assert_eq!(Target::new(&info).unwrap().db, 3);
    }

    /// A reply is read only up to the cap, however much the peer sends.
    #[test]
    fn a_reply_over_the_cap_fails_the_call() {
        let (mine, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            let _ = peer.write_all(b"$999999999999\r\n");
            let chunk = vec![b'x'; 64 * 1024];
            while peer.write_all(&chunk).is_ok() {}
        });
        let budget = Duration::from_secs(5);
        let mut link = Link {
            stream: Stream::Plain(Socket {
                inner: socket2::Socket::from(mine),
                deadline: Instant::now() + budget,
                budget,
                interruptible: false,
                stopped: None,
            }),
            parser: Parser::new(),
            db: 0,
            fault: None,
            broken: false,
        };
        let error = redis::cmd("GET")
            .arg("k")
            .query::<String>(&mut link)
            .unwrap_err();
        let fault = link.fault_of(error);
        assert!(matches!(fault, Fault::Corrupt(_)), "{fault:?}");
        assert!(!link.is_usable());
        drop(link);
        sender.join().unwrap();
    }
}
