//! Telling a service manager how fly is doing (systemd's `Type=notify`, see
//! sd_notify(3)): `READY=1`, `STOPPING=1`, `STATUS=…` and `WATCHDOG=1`, each
//! a datagram to the unix socket `NOTIFY_SOCKET` names (a path, or `@name`
//! in Linux's abstract namespace). Without that variable every call here
//! does nothing, at the cost of one load.
//!
//! - **Status** lines are throttled: a caller says the current state as
//!   often as it likes (from memory, never blocking); the latest one goes
//!   out at most [`STATUS_SPACING`] after the one before, and only when it
//!   changed.
//! - **Watchdog**: with `WATCHDOG_USEC` set (and `WATCHDOG_PID` unset or
//!   ours), `WATCHDOG=1` goes out every half of it, but only while the
//!   loop is alive: the loop says, each turn, how long it will take at most
//!   before its next turn ([`alive_for`]); once that passes unrenewed, the
//!   pings stop and the service manager ends the process as hung.
//!
//! Handler processes never see these variables (`bot::child_io`), so a
//! handler cannot speak for fly.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

use fly_base::sync::lock;

/// The variables a service manager hands its service, kept from the
/// processes fly starts.
pub const VARIABLES: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// The least time between two status lines.
const STATUS_SPACING: Duration = Duration::from_millis(250);

/// How long a datagram may wait for room in the manager's queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
    /// Half of `WATCHDOG_USEC`, when the manager asked for pings.
    ping_every: Option<Duration>,
    ready: AtomicBool,
    stopping: AtomicBool,
    state: Mutex<Pending>,
    changed: Condvar,
}

#[derive(Default)]
struct Pending {
    /// The status to say, and the last one said.
    wanted: Option<String>,
    said: Option<String>,
    /// The loop is alive until then (`None`: not started, no pings).
    alive_until: Option<Instant>,
    /// The notifier thread runs.
    started: bool,
}

static NOTIFIER: LazyLock<Option<Notifier>> = LazyLock::new(Notifier::from_environment);

impl Notifier {
    fn from_environment() -> Option<Notifier> {
        let named = std::env::var_os("NOTIFY_SOCKET")?;
        let address = match socket_address(named.as_encoded_bytes()) {
            Ok(address) => address,
            Err(why) => {
                tracing::warn!("NOTIFY_SOCKET is ignored: {why}");
                return None;
            }
        };
        let socket = match UnixDatagram::unbound() {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!("NOTIFY_SOCKET is ignored: no socket to send with: {error}");
                return None;
            }
        };
        let _ = socket.set_write_timeout(Some(SEND_TIMEOUT));
        let ping_every = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Some(Notifier {
            socket,
            address,
            ping_every,
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            state: Mutex::new(Pending::default()),
            changed: Condvar::new(),
        })
    }

    fn send(&self, message: &str) {
        if let Err(error) = self.socket.send_to_addr(message.as_bytes(), &self.address) {
            tracing::debug!("the service manager was not told {message:?}: {error}");
        }
    }

    /// Starts the thread that says the status and pings, once.
    fn start(&'static self, pending: &mut Pending) {
        if pending.started {
            return;
        }
        pending.started = true;
        let spawned = std::thread::Builder::new()
            .name("fly-notify".into())
            .spawn(move || self.run());
        if let Err(error) = spawned {
            tracing::warn!("the service manager will not be told the status: {error}");
        }
    }

    /// Says each new status (throttled) and pings while the loop is alive;
    /// sends outside the lock, so a slow manager never holds up a caller.
    fn run(&self) {
        let mut next_ping = Instant::now();
        let mut next_status = Instant::now();
        let mut state = lock(&self.state);
        loop {
            let now = Instant::now();
            let mut messages = Vec::new();
            if now >= next_status && state.wanted != state.said {
                let line = state.wanted.clone().unwrap_or_default();
                messages.push(format!("STATUS={line}"));
                state.said = Some(line);
                next_status = now + STATUS_SPACING;
            }
            if let Some(every) = self.ping_every
                && now >= next_ping
            {
                if state.alive_until.is_some_and(|until| now < until) {
                    messages.push("WATCHDOG=1".to_string());
                }
                next_ping = now + every;
            }
            if !messages.is_empty() {
                drop(state);
                for message in &messages {
                    self.send(message);
                }
                state = lock(&self.state);
                continue;
            }
            let mut wake = self.ping_every.map(|_| next_ping);
            if state.wanted != state.said {
                wake = Some(wake.map_or(next_status, |at| at.min(next_status)));
            }
            state = match wake {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    self.changed
                        .wait_timeout(state, wait)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            };
        }
    }
}

/// Where `NOTIFY_SOCKET` points: an absolute path, or `@name` in the
/// abstract namespace.
fn socket_address(named: &[u8]) -> Result<SocketAddr, String> {
    if let Some(name) = named.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        return SocketAddr::from_abstract_name(name).map_err(|error| error.to_string());
    }
    if !named.starts_with(b"/") {
        return Err(format!(
            "{:?} is neither an absolute path nor an @abstract name",
            String::from_utf8_lossy(named)
        ));
    }
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(named));
    SocketAddr::from_pathname(path).map_err(|error| error.to_string())
}

/// Half of `WATCHDOG_USEC`, if the manager asked this process for pings:
/// `WATCHDOG_PID` unset or ours, the time a positive number of microseconds.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, ours: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(ours)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec) / 2)
}

fn notifier() -> Option<&'static Notifier> {
    NOTIFIER.as_ref()
}

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    notifier().is_some()
}

/// `READY=1`, once: the service is doing its work (polling, standing by,
/// listening).
pub fn ready() {
    if let Some(notifier) = notifier()
        && !notifier.ready.swap(true, Ordering::SeqCst)
    {
        notifier.send("READY=1");
    }
}

/// `STOPPING=1`, once: the stop was requested.
pub fn stopping() {
    if let Some(notifier) = notifier()
        && !notifier.stopping.swap(true, Ordering::SeqCst)
    {
        notifier.send("STOPPING=1");
    }
}

/// The current state in a few words (`STATUS=`), made only when a manager
/// listens; said when it changed, at most every [`STATUS_SPACING`].
pub fn status_with(line: impl FnOnce() -> String) {
    let Some(notifier) = notifier() else {
        return;
    };
    let line = line();
    let mut state = lock(&notifier.state);
    if state.wanted.as_deref() == Some(line.as_str()) {
        return;
    }
    // With a line already waiting its turn, the thread wakes for it anyway:
    // the scheduler says its state at every change, and waking the thread
    // each time would cost a switch per update.
    let waiting = state.wanted != state.said;
    state.wanted = Some(line);
    notifier.start(&mut state);
    if !waiting {
        notifier.changed.notify_all();
    }
}

/// The loop is alive, and turns again within `bound` (the longest its next
/// step may take): watchdog pings go on until then.
pub fn alive_for(bound: Duration) {
    let Some(notifier) = notifier() else {
        return;
    };
    if notifier.ping_every.is_none() {
        return;
    }
    let mut state = lock(&notifier.state);
    // The loop's latest word: one turn at a time says how long the next is.
    // The thread reads it at its next ping, which it always wakes for.
    state.alive_until = Some(Instant::now() + bound);
    notifier.start(&mut state);
}

/// How often a loop that waits on something else (a condition, a timer)
/// should wake to say it is alive: `None` when no pings are asked for.
pub fn beat_every() -> Option<Duration> {
    notifier().and_then(|notifier| notifier.ping_every)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_interval_is_half_the_time_and_only_for_our_pid() {
        let table: &[(Option<&str>, Option<&str>, Option<Duration>)] = &[
            (Some("400000"), None, Some(Duration::from_millis(200))),
            (Some("400000"), Some("42"), Some(Duration::from_millis(200))),
            (Some("400000"), Some("43"), None),
            (Some("400000"), Some("x"), None),
            (Some("0"), None, None),
            (Some("-5"), None, None),
            (Some("soon"), None, None),
            (None, Some("42"), None),
        ];
        for &(usec, pid, expected) in table {
            assert_eq!(
                watchdog_interval(usec, pid, 42),
                expected,
                "{usec:?} {pid:?}"
            );
        }
    }

    #[test]
    fn a_socket_is_a_path_or_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let path = socket_address(b"/run/systemd/notify").unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let abstract_name = socket_address(b"@fly/notify").unwrap();
        assert_eq!(abstract_name.as_abstract_name(), Some(&b"fly/notify"[..]));
        assert!(socket_address(b"relative/notify").is_err());
        assert!(socket_address(b"").is_err());
    }
}
