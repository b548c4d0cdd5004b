//! The accept loop every `fly` server shares (the emulator, serve-webhook):
//! hyper's HTTP/1 with a deadline and a size cap for request headers, a bound
//! on open connections, optional TLS (rustls), and a graceful stop that lets
//! requests in flight finish within a bounded time.
//!
//! hyper and tokio live only in server modules; callers hand in a ready
//! listener and a service.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

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

/// Pause after a failed accept (e.g. out of file descriptors) before the next.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

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

/// Serves connections from `listener` until `stop` completes, then stops
/// accepting and waits (at most `limits.drain_timeout`) for open connections
/// to finish their requests.
pub async fn serve<S, B, F>(
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    make_service: F,
    stop: impl Future<Output = ()>,
) where
    F: Fn() -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!("cannot use the listening socket: {error}");
            return;
        }
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
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
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    tracing::warn!("accepting a connection failed: {error}");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    continue;
                }
            },
        };
        // Small answers should not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let service = make_service();
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => run_connection(&builder, stream, service, watcher).await,
                Some(acceptor) => {
                    // The handshake counts against the header deadline.
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                        Ok(Ok(tls_stream)) => {
                            run_connection(&builder, tls_stream, service, watcher).await
                        }
                        Ok(Err(error)) => tracing::debug!("TLS handshake failed: {error}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
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
}
