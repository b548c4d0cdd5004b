//! `fly serve-webhook`'s server: receives signed updates and answers them
//! like poll-echo does, safe to expose to the internet.
//!
//! Each delivery is checked in this order, and the status code says where it
//! stopped (SPEC section 3): path and method (404/405), size (413, enforced
//! while reading), JSON (400), signature v1 and replay window (401), the
//! update id already handled (200, not handled twice), the nonce already seen
//! with another update (401), then the reply (200, or 500 so the platform
//! delivers again). A fatal error (an `--exec` handler that cannot run, a
//! refused token) is answered 500 too, and stops the server as a signal does,
//! with the error as the process's one error line. A shared state store
//! (Redis) that is out of reach, or a state file that cannot be written (a
//! full disk), makes a delivery 503, and `GET /readyz` 503 while `GET
//! /healthz` stays 200. A state file deleted under the server stops it, as a
//! fatal error does.
//!
//! **The rule: no blocking call on the async I/O threads.** They parse,
//! verify (microseconds of CPU) and ask the store only what it answers
//! without waiting ([`Store::try_admit`]: memory, in front of SQLite; for
//! Redis, only "it is down"; [`Store::is_reachable`] for `/readyz`).
//! Everything that may wait on a disk, a network or a process (a store
//! lookup memory cannot answer, the handler and its reply through the
//! shared blocking HTTP client, a dead letter) runs on the bounded pool of
//! blocking threads, and waiting for a group commit is a future, not a
//! parked thread. So a slow platform, disk or handler never stalls
//! verification, duplicates or `/healthz`.

mod receiver;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::bot::Handler;
use crate::http_server::{self, Limits};
use crate::shutdown::{Shutdown, Stage, Subscription};
use fly_base::sync::lock;
use fly_state::WebhookStore;

pub struct WebhookConfig {
    pub bind: IpAddr,
    pub port: u16,
    pub path: String,
    /// Any of these verifies a delivery (key rotation).
    pub secrets: Vec<String>,
    /// Where the secrets came from, for the start line (never a secret).
    pub secret_sources: String,
    /// `--metrics`: where to serve metrics, `/healthz` and `/readyz`.
    pub metrics: Option<std::net::SocketAddr>,
    /// `--inspect`: where to serve the inspector, and what it needs.
    pub inspect: Option<(std::net::SocketAddr, crate::inspect::InspectConfig)>,
    pub replay_window_secs: u64,
    pub max_body_bytes: u64,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// Replies (handler calls) running at once.
    pub concurrency: usize,
    /// How long a claim on an update being handled lasts if never released.
    pub claim_lease: Duration,
    /// HTTPS with this certificate and key (see [`tls_acceptor`]), else HTTP.
    pub tls: Option<TlsAcceptor>,
}

/// Serves until the stop is requested (SIGINT/SIGTERM) or a delivery runs
/// into a fatal error, then finishes the requests in flight: at the end of
/// the grace period `--exec` handlers still running are killed, so their
/// requests are answered 500 (the platform delivers again) rather than cut
/// off. Returns the fatal error, if any. The first stdout line is the URL
/// deliveries go to.
///
/// The state store is opened (and created) only once the port is bound, so
/// a mistake there leaves no file behind.
pub fn run_until_signal(
    mut config: WebhookConfig,
    open_store: impl FnOnce() -> anyhow::Result<Arc<dyn WebhookStore>>,
    handler: Arc<dyn Handler>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let tls = config.tls.clone();
    let (listener, local) = http_server::bind(config.bind, config.port)?;
    // Ready as its own /readyz is: while the store answers. Served before
    // the store is opened, so a taken port leaves no state file behind.
    let opened: Arc<OnceLock<Arc<dyn WebhookStore>>> = Arc::default();
    if let Some(address) = config.metrics {
        let asked = Arc::clone(&opened);
        crate::observe::endpoint::serve(
            address,
            Arc::new(move || asked.get().is_some_and(|store| store.is_reachable())),
        )?;
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{local}{}", config.path);
    if let Some((address, mut inspect)) = config.inspect.take() {
        inspect.delivery_url = Some(url.clone());
        crate::inspect::start(address, inspect)?;
    }
    let store = open_store()?;
    let _ = opened.set(Arc::clone(&store));

    let runtime = server_runtime(config.concurrency)?;
    let limits = Limits {
        header_read_timeout: config.header_read_timeout,
        max_header_bytes: 64 * 1024,
        max_connections: config.max_connections,
        drain_timeout: shutdown.grace() + ANSWER_TIME,
    };
    let fatal = Arc::new(FatalStop::new(shutdown.clone()));
    let receiver = Arc::new(receiver::Receiver::new(
        &config,
        Arc::clone(&store),
        Arc::clone(&handler),
        Arc::clone(&fatal),
    ));
    let (_subscription, stop_received) = follow_the_stop(&shutdown, Arc::clone(&handler));
    let grace = shutdown.grace();
    let secret_sources = config.secret_sources.clone();
    let watched = Arc::clone(&store);
    let raising = Arc::clone(&fatal);
    let served = runtime.block_on(async move {
        let stop = async move {
            let _ = stop_received.await;
            tracing::info!(
                "stopping: finishing requests in flight (at most {:.0} s; \
                 a second Ctrl-C stops at once)",
                grace.as_secs_f64()
            );
        };
        let server = http_server::Server::start(listener, tls, limits)?;
        crate::output::print_line(&url)?;
        crate::service_manager::ready();
        tracing::info!(
            %url,
            state = %watched.location(),
            "receiving webhook deliveries, verified with {}",
            secret_sources
        );
        let reporting = tokio::spawn(tell_the_service_manager(local, Arc::clone(&watched)));
        let watching = tokio::spawn(watch_for_a_gone_store(watched, raising));
        server
            .serve(|| receiver::service(Arc::clone(&receiver)), stop)
            .await;
        watching.abort();
        reporting.abort();
        anyhow::Ok(())
    });
    let flushed = wind_down(runtime, handler.as_ref(), store);
    served?;
    if let Some(error) = fatal.take() {
        if let Err(unwritten) = flushed {
            tracing::error!("{unwritten:#}");
        }
        return Err(error);
    }
    flushed?;
    tracing::info!("stopped");
    Ok(())
}

/// Two I/O threads; the blocking pool runs the replies, `concurrency` at once.
fn server_runtime(concurrency: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(concurrency.max(1))
        .thread_name("fly-webhook")
        .enable_all()
        .build()
        .context("starting the server runtime")
}

/// The stop stages reach the server (a drain, when the returned receiver
/// fires) and the handlers (ended when the grace period is over) from here,
/// for as long as the returned subscription is kept.
fn follow_the_stop(
    shutdown: &Shutdown,
    handler: Arc<dyn Handler>,
) -> (Subscription, tokio::sync::oneshot::Receiver<()>) {
    let (stop_sender, stop_received) = tokio::sync::oneshot::channel::<()>();
    let stop_sender = Mutex::new(Some(stop_sender));
    let subscription = shutdown.subscribe(move |stage| {
        if stage >= Stage::Requested
            && let Some(sender) = lock(&stop_sender).take()
        {
            let _ = sender.send(());
        }
        if stage >= Stage::Abandon {
            handler.abandon();
        }
    });
    (subscription, stop_received)
}

/// A state file deleted under the server stops it even while no delivery
/// comes (the store notices; this asks it, from memory).
async fn watch_for_a_gone_store(store: Arc<dyn WebhookStore>, fatal: Arc<FatalStop>) {
    let mut every = tokio::time::interval(GONE_CHECK_EVERY);
    loop {
        every.tick().await;
        if let Some(error) = store.gone() {
            fatal.raise(error);
            return;
        }
    }
}

/// While the server runs, and a service manager listens: the status (what
/// was answered, what is in flight, a store out of reach) and, from a task
/// on the server's runtime, that it is alive (a stuck runtime stops the
/// watchdog's pings).
async fn tell_the_service_manager(local: std::net::SocketAddr, store: Arc<dyn WebhookStore>) {
    use crate::service_manager;
    if !service_manager::enabled() {
        return;
    }
    let every = service_manager::beat_every()
        .map_or(STATUS_EVERY, |beat| beat.min(STATUS_EVERY))
        .max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        service_manager::alive_for(every * 3);
        service_manager::status_with(|| {
            let metrics = crate::observe::metrics();
            let unreachable = if store.is_reachable() {
                ""
            } else {
                "; state store unreachable"
            };
            format!(
                "serving on {local}: {} requests answered, {} in flight{unreachable}",
                metrics.webhook_answers.get(),
                metrics.updates_in_flight.get()
            )
        });
    }
}

/// How often serve-webhook looks at what to tell a service manager.
const STATUS_EVERY: Duration = Duration::from_millis(500);

/// After the drain: ends the handlers and the runtime, then writes what was
/// answered to the store, returning whether that worked.
fn wind_down(
    runtime: tokio::runtime::Runtime,
    handler: &dyn Handler,
    store: Arc<dyn WebhookStore>,
) -> anyhow::Result<()> {
    // Requests still in flight after the drain are given up on (handlers
    // that ignored the abandon above, or were started after it). Their
    // handlers run on the blocking pool, which dropping the runtime would
    // wait for without limit (up to --exec-timeout for a hanging --exec
    // handler): kill the handlers' process groups instead, and wait for the
    // blocking threads only briefly. Their updates are not marked handled,
    // so the platform delivers them again.
    handler.abandon();
    runtime.shutdown_timeout(ABANDON_GRACE);
    // No delivery is in hand any more: long-lived workers can go.
    handler.close();
    // What was answered is on disk before the process ends, or the exit
    // says what is not (a full disk: exit 1).
    store.flush()
}

/// The first fatal error a delivery ran into: every later delivery would
/// fail the same way, so raising it requests the stop, as a signal does, and
/// `run_until_signal` returns it.
struct FatalStop {
    error: Mutex<Option<anyhow::Error>>,
    shutdown: Shutdown,
}

impl FatalStop {
    fn new(shutdown: Shutdown) -> FatalStop {
        FatalStop {
            error: Mutex::new(None),
            shutdown,
        }
    }

    /// Keeps the first error (the one the user sees) and starts the stop.
    fn raise(&self, error: anyhow::Error) {
        {
            let mut first = lock(&self.error);
            match first.as_ref() {
                None => {
                    tracing::warn!("stopping on a fatal error: {error:#}");
                    *first = Some(error);
                }
                Some(_) => tracing::debug!("another fatal error while stopping: {error:#}"),
            }
        }
        self.shutdown.request();
    }

    fn take(&self) -> Option<anyhow::Error> {
        lock(&self.error).take()
    }
}

/// How often the server asks whether its state file is gone.
const GONE_CHECK_EVERY: Duration = Duration::from_millis(200);

/// Time left, after handlers are abandoned, for their requests to be answered.
const ANSWER_TIME: Duration = Duration::from_secs(1);

/// How long, after the drain, the requests given up on get to end: enough for
/// a killed handler to be reaped and its last stderr lines logged.
const ABANDON_GRACE: Duration = Duration::from_secs(2);

/// The certificate chain and its private key do not make a TLS server
/// configuration (a key of another certificate, an unsupported key type).
#[derive(Debug)]
pub struct TlsMismatch(tokio_rustls::rustls::Error);

impl std::fmt::Display for TlsMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Says the rustls error itself (its text is this one's), so it is no source.
impl std::error::Error for TlsMismatch {}

/// The TLS side of the server, from a certificate chain and its key (read
/// by the caller, which knows where they came from).
pub fn tls_acceptor(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsAcceptor, TlsMismatch> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsMismatch)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsMismatch)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
