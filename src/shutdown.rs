//! One staged stop for every command (SPEC section 2), with one owner of the
//! signals and any number of listeners.
//!
//! Stages, in order: [`Stage::Running`]; [`Stage::Requested`] (the first
//! SIGINT/SIGTERM: take no new work, finish the work in hand); past the grace
//! period, [`Stage::Abandon`] (handlers still running are killed, their
//! updates stay unconfirmed and come again); on a second signal,
//! [`Stage::Forced`] (every handler process group is killed and fly exits 130
//! at once). A stage is never left for an earlier one.
//!
//! Waiting is event-driven: threads wait on a Condvar ([`Shutdown::sleep`],
//! [`Shutdown::wait_for`]); anything else (an async server, a scheduler with
//! its own Condvar) subscribes a callback that runs on each stage change.
//! Nothing polls a flag.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};

use fly_base::sync::lock;

/// The grace period when none is configured (`--grace`).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// The status of a forced exit (a second Ctrl-C), as shells report SIGINT.
pub const FORCED_EXIT_STATUS: i32 = 130;

/// A second signal came: the process exits 130 whichever thread gets there
/// first (the signal thread, once it has killed every handler, or the main
/// thread, whose command may end as soon as its handlers are killed).
static FORCED_BY_SIGNAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a second SIGINT/SIGTERM forced the stop: the exit is then 130.
pub fn forced_by_signal() -> bool {
    FORCED_BY_SIGNAL.load(std::sync::atomic::Ordering::SeqCst)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Running,
    /// Take no new work; finish what is in hand.
    Requested,
    /// The grace period is over: end handlers still running.
    Abandon,
    /// A second signal: kill everything and exit now.
    Forced,
}

type Listener = Arc<dyn Fn(Stage) + Send + Sync>;

struct Inner {
    stage: Mutex<Stage>,
    changed: Condvar,
    grace: Duration,
    listeners: Mutex<Vec<(u64, Listener)>>,
    next_listener: AtomicU64,
}

/// The stop every part of a command shares. Cloning shares it.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

impl Default for Shutdown {
    fn default() -> Shutdown {
        Shutdown::with_grace(DEFAULT_GRACE)
    }
}

/// A poller standing by for the polling lease waits on the stop.
impl fly_state::Standby for Shutdown {
    fn sleep(&self, duration: Duration) -> bool {
        Shutdown::sleep(self, duration)
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shutdown({:?})", self.stage())
    }
}

impl Shutdown {
    /// A stop nobody but the program itself requests (in-process runs such as `fly demo`).
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A stop whose requested stage turns into abandon after `grace`.
    pub fn with_grace(grace: Duration) -> Shutdown {
        Shutdown {
            inner: Arc::new(Inner {
                stage: Mutex::new(Stage::Running),
                changed: Condvar::new(),
                grace,
                listeners: Mutex::new(Vec::new()),
                next_listener: AtomicU64::new(0),
            }),
        }
    }

    /// A stop driven by SIGINT/SIGTERM: the first requests it, the second
    /// forces it (handler process groups killed, exit 130 at once).
    pub fn on_signals(grace: Duration) -> anyhow::Result<Shutdown> {
        let shutdown = Shutdown::with_grace(grace);
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("installing the signal handler")?;
        let owner = shutdown.clone();
        std::thread::Builder::new()
            .name("fly-signals".into())
            .spawn(move || {
                for (received, signal) in signals.forever().enumerate() {
                    let name = if signal == SIGINT {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    };
                    if received == 0 {
                        // Each command says what stopping means for it.
                        tracing::debug!("{name} received: stopping");
                        crate::service_manager::stopping();
                        owner.request();
                    } else {
                        tracing::warn!("{name} received again: stopping now");
                        FORCED_BY_SIGNAL.store(true, std::sync::atomic::Ordering::SeqCst);
                        owner.force();
                        crate::children::kill_all();
                        std::process::exit(FORCED_EXIT_STATUS);
                    }
                }
            })
            .context("starting the signal thread")?;
        Ok(shutdown)
    }

    /// How long work in hand may run once the stop is requested.
    pub fn grace(&self) -> Duration {
        self.inner.grace
    }

    pub fn stage(&self) -> Stage {
        *lock(&self.inner.stage)
    }

    pub fn is_requested(&self) -> bool {
        self.stage() >= Stage::Requested
    }

    /// The first stage: take no new work. The grace period starts now.
    pub fn request(&self) {
        if !self.advance(Stage::Requested) {
            return;
        }
        let timer = self.clone();
        // Waits on the Condvar, so it ends as soon as a later stage comes.
        let _ = std::thread::Builder::new()
            .name("fly-grace".into())
            .spawn(move || {
                if timer.wait_for(Stage::Abandon, Some(timer.inner.grace)) {
                    return;
                }
                tracing::warn!(
                    "grace period of {:.0} s is over: ending handlers still running",
                    timer.inner.grace.as_secs_f64()
                );
                timer.advance(Stage::Abandon);
            });
    }

    /// The last stage. The caller exits right after (see `on_signals`).
    pub fn force(&self) {
        self.advance(Stage::Forced);
    }

    /// Moves to `to` if it is later than the current stage; tells the
    /// listeners. Returns whether it moved.
    fn advance(&self, to: Stage) -> bool {
        {
            let mut stage = lock(&self.inner.stage);
            if *stage >= to {
                return false;
            }
            *stage = to;
        }
        // Listeners first, so that whoever waits for a stage finds it acted on.
        let listeners: Vec<Listener> = lock(&self.inner.listeners)
            .iter()
            .map(|(_, listener)| Arc::clone(listener))
            .collect();
        for listener in listeners {
            listener(to);
        }
        self.inner.changed.notify_all();
        true
    }

    /// Waits until `stage` is reached (true) or `timeout` passes (false).
    pub fn wait_for(&self, stage: Stage, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        let mut current = lock(&self.inner.stage);
        while *current < stage {
            current = match deadline {
                None => self
                    .inner
                    .changed
                    .wait(current)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return false;
                    }
                    self.inner
                        .changed
                        .wait_timeout(current, deadline - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
        true
    }

    /// Sleeps for `duration` unless a stop is requested first. Returns `true`
    /// if the whole time passed, `false` if the caller should stop.
    pub fn sleep(&self, duration: Duration) -> bool {
        !self.wait_for(Stage::Requested, Some(duration))
    }

    /// Calls `listener` with every stage reached from now on (and at once
    /// with the current one, if the stop has begun), until the returned
    /// subscription is dropped. It runs on the thread that changes the
    /// stage: keep it short (notify a Condvar, send on a channel).
    pub fn subscribe(&self, listener: impl Fn(Stage) + Send + Sync + 'static) -> Subscription {
        let id = self.inner.next_listener.fetch_add(1, Ordering::Relaxed);
        let listener: Listener = Arc::new(listener);
        lock(&self.inner.listeners).push((id, Arc::clone(&listener)));
        let stage = self.stage();
        if stage > Stage::Running {
            listener(stage);
        }
        Subscription {
            shutdown: self.clone(),
            id,
        }
    }

    /// Runs `work` on a thread of its own and returns its result, unless
    /// the stop reaches `stage` first (`None`): the thread is then left to
    /// finish on its own (or to die with the process). For a blocking call
    /// that may hang (a request to a receiver that does not answer).
    pub fn unless_reached<T: Send + 'static>(
        &self,
        stage: Stage,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (sender, receiver) = std::sync::mpsc::channel();
        let stopped = Mutex::new(Some(sender.clone()));
        let until = stage;
        let _subscription = self.subscribe(move |stage| {
            if stage >= until
                && let Some(sender) = lock(&stopped).take()
            {
                let _ = sender.send(None);
            }
        });
        std::thread::spawn(move || {
            let _ = sender.send(Some(work()));
        });
        receiver.recv().ok().flatten()
    }
}

/// Keeps a listener subscribed (see [`Shutdown::subscribe`]).
pub struct Subscription {
    shutdown: Shutdown,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.shutdown.inner.listeners).retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_is_cut_short_by_a_request() {
        let shutdown = Shutdown::new();
        let other = shutdown.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            other.request();
        });
        let started = Instant::now();
        assert!(!shutdown.sleep(Duration::from_secs(30)));
        assert!(started.elapsed() < Duration::from_secs(5));
        waker.join().unwrap();
    }

    #[test]
    fn sleep_runs_its_course_without_a_request() {
        assert!(Shutdown::new().sleep(Duration::from_millis(10)));
    }

    #[test]
    fn stages_only_move_forward_and_the_grace_period_ends_in_abandon() {
        let shutdown = Shutdown::with_grace(Duration::from_millis(50));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let _subscription = shutdown.subscribe(move |stage| lock(&record).push(stage));
        shutdown.request();
        shutdown.request();
        assert!(shutdown.wait_for(Stage::Abandon, Some(Duration::from_secs(10))));
        shutdown.request();
        assert_eq!(shutdown.stage(), Stage::Abandon);
        // The grace thread may still be telling the listener.
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&seen).len() < 2 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(*lock(&seen), [Stage::Requested, Stage::Abandon]);
    }

    #[test]
    fn a_late_subscriber_hears_the_current_stage_and_a_dropped_one_nothing() {
        let shutdown = Shutdown::with_grace(Duration::from_secs(60));
        shutdown.request();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let subscription = shutdown.subscribe(move |stage| lock(&record).push(stage));
        drop(subscription);
        shutdown.advance(Stage::Abandon);
        assert_eq!(*lock(&seen), [Stage::Requested]);
    }

    #[test]
    fn unless_reached_returns_the_result_or_none_on_a_stop() {
        let shutdown = Shutdown::new();
        assert_eq!(shutdown.unless_reached(Stage::Requested, || 7), Some(7));
        let (_hold, hang) = std::sync::mpsc::channel::<()>();
        let stopper = shutdown.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            stopper.request();
        });
        assert_eq!(
            shutdown.unless_reached(Stage::Requested, move || hang.recv().is_ok()),
            None
        );
    }
}
