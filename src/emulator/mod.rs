//! The local Fly Bot API (SPEC section 4): a real HTTP server, on loopback by
//! default, that behaves like the platform for development, demos and tests,
//! plus a control API (`/_emulator/*`) through which tests play the users and
//! inject faults.
//!
//! It runs beside blocking code: [`Emulator::start`] binds at once (so a busy
//! port is an error for the caller) and serves on its own thread with a
//! single-threaded tokio runtime; webhook deliveries go out from a second
//! thread with the blocking HTTP client. `fly emulator` and `fly demo` both
//! start it this way.
//!
//! Modules: `state` is all the bookkeeping as pure data, `requests` validates
//! bodies, `server` routes and answers the bot API, `control` the control API,
//! `media` streams downloads, `faults` decides injected failures, `webhook`
//! delivers signed updates, and `client` is the control API's client side
//! (`fly emulator say`, `sent`, `webhook`, `media`, and `fly demo`).

mod client;
mod control;
mod faults;
mod media_content;
mod platform;
mod requests;
mod server;
mod webhook_worker;
mod wire;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;

use anyhow::Context;

use crate::shutdown::{Shutdown, Stage};
use tokio::sync::{oneshot, watch};

pub use client::{ControlClient, NoEmulator, SentMessage};
use platform::{Platform, Routed, WebhookTarget};

/// Where `fly emulator` listens unless told otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8787";

pub struct EmulatorConfig {
    pub bind: IpAddr,
    pub port: u16,
    /// The only accepted bearer token; `None` accepts any non-empty token.
    pub token: Option<String>,
    /// The id of the first update; see [`first_update_id_from_clock`].
    pub first_update_id: u64,
}

/// The first update id of a new run: the current unix time in milliseconds.
///
/// A poller keeps its offset (in its state file) across emulator restarts,
/// and the platform only returns updates at or above the offset: ids that
/// started at 1 again would hide every new message from it. Persisting the
/// last id would need a state file of the emulator's own; the clock needs
/// nothing, and a new run starts above an earlier one's last id as long as
/// that run averaged fewer than 1000 updates a second. Ids stay below 2^53,
/// so JavaScript clients read them exactly.
pub fn first_update_id_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |elapsed| elapsed.as_millis() as u64)
        .max(1)
}

/// A running emulator; it stops when shut down or dropped.
pub struct Emulator {
    base_url: String,
    shared: Arc<Shared>,
    stop_server: Option<oneshot::Sender<()>>,
    server_thread: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Binds the listening socket, then serves on a thread of its own.
    pub fn start(config: EmulatorConfig) -> anyhow::Result<Emulator> {
        let (listener, local) = crate::http_server::bind(config.bind, config.port)?;
        let base_url = base_url_for(local);

        let (webhook_wake, webhook_wakeups) = mpsc::channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(Platform::new(config.first_update_id)),
            token: config.token,
            base_url: base_url.clone(),
            update_arrivals: watch::channel(0).0,
            sent_arrivals: watch::channel(0).0,
            webhook_wake,
            stopping: AtomicBool::new(false),
        });
        webhook_worker::spawn_worker(Arc::clone(&shared), webhook_wakeups)
            .context("starting the webhook delivery thread")?;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the emulator's runtime")?;
        // Started here, so that a listener the runtime cannot take is the
        // caller's error, before any URL is printed.
        let server = {
            let _runtime = runtime.enter();
            server::start(listener)?
        };
        let (stop_server, stop_requested) = oneshot::channel();
        let server_shared = Arc::clone(&shared);
        let server_thread = std::thread::Builder::new()
            .name("fly-emulator".into())
            .spawn(move || {
                runtime.block_on(server::serve(server, server_shared, stop_requested));
            })
            .context("starting the emulator thread")?;
        Ok(Emulator {
            base_url,
            shared,
            stop_server: Some(stop_server),
            server_thread: Some(server_thread),
        })
    }

    /// `http://ADDRESS:PORT`, with no trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Stops serving: open connections, long polls included, are closed.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake_webhook_worker();
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.server_thread.take() {
            let _ = thread.join();
        }
        // The webhook thread is not joined: it may be inside an HTTP call to a
        // slow receiver, and it exits on its own at its next step.
    }
}

/// `fly emulator`: serves until SIGINT or SIGTERM. The base URL is the first
/// line on stdout, so that a script can read it.
pub fn run_until_signal(config: EmulatorConfig) -> anyhow::Result<()> {
    // Signal handlers are in place before the URL is printed, so a script that
    // stops the emulator right after reading it is not killed outright.
    let shutdown = Shutdown::on_signals(crate::shutdown::DEFAULT_GRACE)?;
    let config_first_id = config.first_update_id;
    let emulator = Emulator::start(config)?;
    crate::output::print_line(emulator.base_url()).context("writing the base URL")?;
    // How to play a user from another terminal, ready to copy.
    let say = if emulator.base_url() == DEFAULT_URL {
        "fly emulator say --chat u_1 hello".to_string()
    } else {
        format!(
            "fly emulator say --base-url {} --chat u_1 hello",
            emulator.base_url()
        )
    };
    tracing::info!(
        first_update_id = config_first_id,
        "emulator listening on {}; a user writes to the bot with: {say}",
        emulator.base_url()
    );

    shutdown.wait_for(Stage::Requested, None);
    let sent = emulator.shared.lock().sent().len();
    emulator.shutdown();
    tracing::info!(sent, "stopped");
    Ok(())
}

/// What the server, the control API and the webhook worker share.
struct Shared {
    state: Mutex<Platform>,
    token: Option<String>,
    base_url: String,
    /// Bumped whenever updates become available for polling; long polls wait on it.
    update_arrivals: watch::Sender<u64>,
    /// Bumped whenever the bot's send is recorded; `GET /_emulator/sent?wait=`
    /// waits on it.
    sent_arrivals: watch::Sender<u64>,
    /// Tells the webhook worker to look at the state again.
    webhook_wake: mpsc::Sender<()>,
    stopping: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Platform> {
        fly_base::sync::lock(&self.state)
    }

    /// Queues a new update for polling or for the webhook; returns its id.
    fn push_update(&self, update: &str) -> u64 {
        let nonce = fly_base::random::hex_id(16);
        let (update_id, routed) = self.lock().push_update(update, nonce);
        match routed {
            Routed::Polling => self.wake_pollers(),
            Routed::Webhook => self.wake_webhook_worker(),
        }
        update_id
    }

    fn set_webhook(&self, target: Option<WebhookTarget>) {
        let pollers_concerned = self
            .lock()
            .set_webhook(target, || fly_base::random::hex_id(16));
        self.wake_webhook_worker();
        if pollers_concerned {
            self.wake_pollers();
        }
    }

    /// The bot's send was recorded: `GET /_emulator/sent?wait=` answers.
    fn wake_sent_followers(&self) {
        self.sent_arrivals
            .send_modify(|arrivals| *arrivals = arrivals.wrapping_add(1));
    }

    fn wake_pollers(&self) {
        self.update_arrivals
            .send_modify(|arrivals| *arrivals = arrivals.wrapping_add(1));
    }

    fn wake_webhook_worker(&self) {
        // Fails only once the worker has exited, when there is nothing to wake.
        let _ = self.webhook_wake.send(());
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// The URL clients use: an unspecified bind address (0.0.0.0, ::) is reached
/// through loopback from this machine.
fn base_url_for(local: SocketAddr) -> String {
    let host = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(host, local.port()))
}

/// The OS's description of an I/O error without the "(os error N)" suffix,
/// which tells a user nothing.
#[cfg(test)]
mod tests {
    use super::*;

    fn config(port: u16) -> EmulatorConfig {
        EmulatorConfig {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            token: None,
            first_update_id: 1,
        }
    }

    #[test]
    fn base_urls() {
        let url = |text: &str| base_url_for(text.parse().unwrap());
        assert_eq!(url("127.0.0.1:8787"), "http://127.0.0.1:8787");
        assert_eq!(url("0.0.0.0:80"), "http://127.0.0.1:80");
        assert_eq!(url("[::]:9"), "http://[::1]:9");
        assert_eq!(url("[::1]:9"), "http://[::1]:9");
    }

    #[test]
    fn a_busy_port_is_a_clear_error() {
        let first = Emulator::start(config(0)).unwrap();
        let port: u16 = first
            .base_url()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let error = Emulator::start(config(port)).err().unwrap().to_string();
        assert_eq!(
            error,
            format!("cannot listen on 127.0.0.1:{port}: Address already in use")
        );
        first.shutdown();
    }

    #[test]
    fn starts_serves_and_stops_in_process() {
        let emulator = Emulator::start(config(0)).unwrap();
        let url = format!("{}/_emulator/sent", emulator.base_url());
        let mut response = ureq::get(&url).call().unwrap();
        assert_eq!(
            response.body_mut().read_to_string().unwrap(),
            r#"{"sent":[],"attempts":0}"#
        );
        emulator.shutdown();
        assert!(ureq::get(&url).call().is_err());
    }
}
