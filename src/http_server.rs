//! The accept loop every `fly` server shares (the emulator, serve-webhook):
//! hyper's HTTP/1 with a deadline and a size cap for request headers, a bound
//! on open connections, optional TLS (rustls), and a graceful stop that lets
//! requests in flight finish within a bounded time.
//!
//! hyper and tokio live only in server modules; callers hand in a ready
//! listener and a service.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// Pause after the first failed accept (e.g. out of file descriptors)
/// before the next; it doubles with each failure in a row, up to the max.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);
const ACCEPT_RETRY_MAX_DELAY: Duration = Duration::from_secs(1);
/// A burst of failed accepts is over when none failed for this long.
const ACCEPT_BURST_QUIET: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A client that has not sent complete request headers (or finished the
    /// TLS handshake) by then is disconnected: slowloris protection.
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// Connections open at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// How long a graceful stop waits for requests in flight.
    pub drain_timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connections the kernel queues before they are accepted. std listens with
/// 128, so a burst of a few hundred clients (a platform redelivering after an
/// outage, a load test) had SYNs dropped and retried a second later; the
/// kernel caps this at net.core.somaxconn.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds a non-blocking listener (ready for tokio) and returns it with the
/// address it got (`port` 0 picks a free one). Binding happens before any
/// runtime starts, so "address in use" is reported as a plain error.
pub fn bind(ip: IpAddr, port: u16) -> anyhow::Result<(std::net::TcpListener, SocketAddr)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let address = SocketAddr::new(ip, port);
    let cannot_listen =
        |error: std::io::Error| anyhow!("cannot listen on {address}: {}", describe_io(&error));
    // As std's TcpListener::bind, with a longer backlog (socket2 is already
    // built for tokio).
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(cannot_listen)?;
    socket.set_reuse_address(true).map_err(cannot_listen)?;
    socket.bind(&address.into()).map_err(cannot_listen)?;
    socket.listen(LISTEN_BACKLOG).map_err(cannot_listen)?;
    socket
        .set_nonblocking(true)
        .context("configuring the listening socket")?;
    let listener = std::net::TcpListener::from(socket);
    let local = listener
        .local_addr()
        .context("reading the listening address")?;
    Ok((listener, local))
}

/// An I/O error without the "(os error N)" suffix, for one-line messages.
fn describe_io(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(index) => text[..index].to_string(),
        None => text,
    }
}

/// The listening socket could not be handed to the async runtime: the
/// server never started (the command fails, exit 1).
#[derive(Debug)]
pub struct StartError {
    address: Option<SocketAddr>,
    error: std::io::Error,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            Some(address) => write!(f, "cannot serve on {address}: ")?,
            None => f.write_str("cannot serve on the listening socket: ")?,
        }
        f.write_str(&describe_io(&self.error))
    }
}

impl std::error::Error for StartError {}

/// A listener handed to the runtime, ready to serve.
pub struct Server {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    builder: Arc<http1::Builder>,
}

impl Server {
    /// Hands `listener` to the tokio runtime this is called within (inside
    /// `block_on` or `Runtime::enter`), so that a failure is the caller's
    /// before it announces the server.
    pub fn start(
        listener: std::net::TcpListener,
        tls: Option<TlsAcceptor>,
        limits: Limits,
    ) -> Result<Server, StartError> {
        let address = listener.local_addr().ok();
        let listener =
            TcpListener::from_std(listener).map_err(|error| StartError { address, error })?;
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_bytes)
            .keep_alive(true);
        Ok(Server {
            listener,
            tls,
            limits,
            builder: Arc::new(builder),
        })
    }

    /// Serves connections until `stop` completes, then stops accepting and
    /// waits (at most `limits.drain_timeout`) for open connections to finish
    /// their requests.
    pub async fn serve<S, B, F>(self, make_service: F, stop: impl Future<Output = ()>)
    where
        F: Fn() -> S,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let permits = Arc::new(Semaphore::new(self.limits.max_connections.max(1)));
        let graceful = GracefulShutdown::new();
        let mut errors = AcceptErrors::default();
        tokio::pin!(stop);
        loop {
            let permit = tokio::select! {
                _ = &mut stop => break,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                _ = &mut stop => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        let pause = errors.failed(&error, Instant::now());
                        tokio::select! {
                            _ = &mut stop => break,
                            () = tokio::time::sleep(pause) => continue,
                        }
                    }
                },
            };
            errors.succeeded(Instant::now());
            // Small answers should not wait for Nagle's algorithm.
            let _ = stream.set_nodelay(true);
            let connection = self.connection(stream, make_service(), graceful.watcher());
            tokio::spawn(async move {
                let _permit = permit;
                connection.await;
            });
        }
        errors.stopped();
        let Server {
            listener, limits, ..
        } = self;
        drop(listener);
        if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "stopped with requests still in flight after {:?}",
                limits.drain_timeout
            );
        }
    }

    /// One accepted connection, served (after the TLS handshake, if any)
    /// until it closes or the graceful stop ends it.
    fn connection<S, B>(
        &self,
        stream: tokio::net::TcpStream,
        service: S,
        watcher: hyper_util::server::graceful::Watcher,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let builder = Arc::clone(&self.builder);
        let tls = self.tls.clone();
        let header_read_timeout = self.limits.header_read_timeout;
        async move {
            match tls {
                None => run_connection(&builder, stream, service, watcher).await,
                Some(acceptor) => {
                    // The handshake counts against the header deadline.
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(header_read_timeout, handshake).await {
                        Ok(Ok(tls_stream)) => {
                            run_connection(&builder, tls_stream, service, watcher).await
                        }
                        Ok(Err(error)) => tracing::debug!("TLS handshake failed: {error}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        }
    }
}

/// Failed accepts come in bursts (out of file descriptors, EMFILE, fails
/// every accept until a connection closes, and again as soon as the next
/// one is accepted): the first failure of a burst is logged and the rest
/// counted, and the pause before the next try doubles, from
/// [`ACCEPT_RETRY_DELAY`] to [`ACCEPT_RETRY_MAX_DELAY`]. The burst is over
/// once [`ACCEPT_BURST_QUIET`] passed without a failure.
#[derive(Debug, Default)]
struct AcceptErrors {
    /// Failed accepts in this burst.
    in_burst: u64,
    /// The pause after the last failure.
    pause: Duration,
    last_failure: Option<Instant>,
}

impl AcceptErrors {
    /// Notes a failed accept; returns how long to wait before the next.
    fn failed(&mut self, error: &std::io::Error, now: Instant) -> Duration {
        self.end_if_quiet(now);
        if self.in_burst == 0 {
            tracing::warn!(
                "accepting a connection failed: {}; retrying, at most once a second \
                 (further failures are counted until accepting works again)",
                describe_io(error)
            );
        }
        self.in_burst += 1;
        self.last_failure = Some(now);
        self.pause = if self.pause.is_zero() {
            ACCEPT_RETRY_DELAY
        } else {
            (self.pause * 2).min(ACCEPT_RETRY_MAX_DELAY)
        };
        tracing::debug!(
            "{} failed accepts in this burst; next try in {} ms",
            self.in_burst,
            self.pause.as_millis()
        );
        self.pause
    }

    /// An accept succeeded: the burst, if any, may be over.
    fn succeeded(&mut self, now: Instant) {
        self.end_if_quiet(now);
    }

    fn end_if_quiet(&mut self, now: Instant) {
        if let Some(last) = self.last_failure
            && now.saturating_duration_since(last) >= ACCEPT_BURST_QUIET
        {
            tracing::info!(
                "accepting connections again after {} failed attempts",
                self.in_burst
            );
            *self = AcceptErrors::default();
        }
    }

    /// The server stops: a burst still going is said once more.
    fn stopped(&mut self) {
        if self.in_burst > 0 {
            tracing::info!(
                "stopped accepting connections after {} failed attempts",
                self.in_burst
            );
            *self = AcceptErrors::default();
        }
    }
}

async fn run_connection<I, S, B>(
    builder: &http1::Builder,
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let connection = watcher.watch(builder.serve_connection(TokioIo::new(io), service));
    if let Err(error) = connection.await {
        tracing::debug!("connection ended: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of clients beyond std's backlog of 128 is queued by the
    /// kernel at once, not left retrying SYNs while nothing accepts yet.
    #[test]
    fn a_burst_of_connections_waits_in_the_backlog() {
        // The kernel caps the backlog at somaxconn (4096 on current kernels).
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(4096);
        let burst = somaxconn.min(400);
        let (listener, address) = bind(IpAddr::from([127, 0, 0, 1]), 0).unwrap();
        let clients: Vec<std::net::TcpStream> = (0..burst)
            .map(|n| {
                std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500))
                    .unwrap_or_else(|error| panic!("connection {n} was not queued: {error}"))
            })
            .collect();
        assert_eq!(clients.len(), burst);
        drop(listener);
    }

    #[test]
    fn failed_accepts_back_off_doubling_to_a_second_within_a_burst() {
        let mut errors = AcceptErrors::default();
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let start = Instant::now();
        let mut now = start;
        let mut pauses = Vec::new();
        for _ in 0..8 {
            let pause = errors.failed(&emfile, now);
            pauses.push(pause.as_millis() as u64);
            now += pause;
            // One connection closed, one accepted: still the same burst.
            errors.succeeded(now);
        }
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(errors.in_burst, 8);
        // Quiet long enough: the burst is over, the next failure starts anew.
        now += ACCEPT_BURST_QUIET;
        errors.succeeded(now);
        assert_eq!(errors.in_burst, 0);
        assert_eq!(errors.failed(&emfile, now), ACCEPT_RETRY_DELAY);
        // Also when the next failure comes first.
        now += ACCEPT_BURST_QUIET;
        assert_eq!(errors.failed(&emfile, now), ACCEPT_RETRY_DELAY);
        assert_eq!(errors.in_burst, 1);
    }

    /// A start-up failure is an error for the caller (exit 1, one line), not
    /// a log line and a server that never serves. Made real: the socket is
    /// already registered with the runtime, so registering it again fails
    /// (EEXIST), as any refusal of the runtime to take the listener would.
    #[test]
    fn a_listener_the_runtime_refuses_is_a_start_error() {
        use std::os::fd::{AsRawFd, FromRawFd};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let (listener, address) = bind(IpAddr::from([127, 0, 0, 1]), 0).unwrap();
        let fd = listener.as_raw_fd();
        // Never dropped: the failed start below closes the descriptor.
        let _registered = std::mem::ManuallyDrop::new(TcpListener::from_std(listener).unwrap());
        // SAFETY: the descriptor is open; the first owner above never closes it.
        let same_socket = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        let limits = Limits {
            header_read_timeout: Duration::from_secs(1),
            max_header_bytes: 1024,
            max_connections: 1,
            drain_timeout: Duration::ZERO,
        };
        let Err(error) = Server::start(same_socket, None, limits) else {
            panic!("the server started")
        };
        let message = error.to_string();
        assert_eq!(message, format!("cannot serve on {address}: File exists"));
        let error = anyhow::Error::new(error);
        assert_eq!(
            crate::exit::classify(&error),
            crate::exit::ExitOutcome::Report(crate::exit::FAILURE)
        );
    }
}
