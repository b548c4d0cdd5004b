//! The long-poll loop shared by `poll-echo` and `forward`: one poll thread
//! feeds a queue per chat, a long-lived pool of `concurrency` workers handles
//! them, and the offset follows the lowest unfinished update.
//!
//! At-least-once, never lost: the offset (what the next poll confirms, and
//! what the state store keeps) never passes an update that is queued or being
//! handled, and handled ids are stored so an update delivered again (after a
//! crash between the reply and the offset) is not answered twice.
//!
//! Per-chat order with shared workers (the Kafka-partition shape): the
//! updates of one chat run one at a time, in id order; different chats never
//! wait for each other, and the poller keeps polling while workers work, up
//! to a bound of updates in flight. An update that fails is retried after a
//! backoff of its own chat's; the other chats go on.
//!
//! Parking: an update that failed `--max-attempts` times (or failed for
//! good: a refused reply, media gone) is parked: recorded in the store with
//! its bytes and last error, and so are the updates of its chat queued
//! behind it (they wait, in order). A parked update is not handled, but it is
//! recorded, so the offset may pass it: the platform's window of 50 updates
//! then moves on for the other chats. Parked updates are retried with a long
//! backoff, also after a restart (they are loaded from the store), and
//! unparked when handled. So the rule is: the offset never passes an update
//! that is neither finished nor recorded in the store.
//!
//! Memory stays bounded while a chat is parked: only its front update is
//! held; the ones behind it, and every later one that comes while it is
//! parked, are in the store alone, and are read back a batch at a time, in
//! id order, once the chat moves again.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{HandleError, Handler, chat_label, record_dead_letter, record_of};
use crate::api::{ApiClient, ApiError, Received, Update};
use crate::observe::{End, Phase, Source, Step, UpdateRecord, metrics};
use crate::retry::RetryPolicy;
use crate::service_manager;
use crate::shutdown::{Shutdown, Stage};
use fly_base::sync::lock;
use fly_state::{PollStore, PollingLease, is_lease_lost, is_unavailable};

/// An update whose handled mark could not reach the store (an outage) is
/// tried again after about this long; the store logs the outage once.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// While updates are in flight the platform answers a poll at once (they are
/// unconfirmed). After a poll that brought nothing new, the next one waits
/// for something that can change the answer (see [`Queues::after_nothing_new`]);
/// only when that may happen unseen (a worker is free and the platform's
/// window was not full: an update may have arrived; or nothing is in hand)
/// does it poll again after this long at the latest, as the examples' bot does.
const REPOLL_INTERVAL: Duration = Duration::from_millis(200);

/// The first wait before a parked update is tried again; it doubles up to
/// `PollSettings::park_retry_max` (5 minutes unless told otherwise).
const PARKED_FIRST_RETRY: Duration = Duration::from_secs(10);

/// Between two polls that do not wait (`--poll-timeout 0`) and found nothing.
const SHORT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The parked updates of one chat held in memory at most, and their bytes
/// (one larger update is held alone): the rest wait in the store and are
/// read back when these are done.
const PARKED_IN_MEMORY: usize = 64;
const PARKED_IN_MEMORY_BYTES: usize = 4 * 1024 * 1024;

/// Parked updates read from the store in one call, looking for a chat's.
const PARKED_PAGE: usize = 256;

/// The longest a step of the loop other than the long poll takes (a state
/// store call, with its own bounds): a service manager's watchdog waits
/// this long for the next turn before it takes the loop for hung.
const STEP_BOUND: Duration = Duration::from_secs(30);

/// Added to every bound the loop gives the watchdog: a turn just late is
/// not a hung loop.
const BOUND_SLACK: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct PollSettings {
    pub limit: u32,
    /// Failed attempts of one update before it is parked.
    pub max_attempts: u32,
    /// The longest wait between two tries of a parked update.
    pub park_retry_max: Duration,
    pub poll_timeout: Duration,
    /// Workers, i.e. chats handled at the same time.
    pub concurrency: usize,
    /// Stop after this many handled updates.
    pub max_updates: Option<u64>,
    /// One poll with timeout 0, handle what came, then stop.
    pub once: bool,
    /// What the updates' records say they came from (poll or forward).
    pub source: Source,
}

impl PollSettings {
    /// Updates queued or being handled at most; the poller waits for room.
    fn max_in_flight(&self) -> usize {
        (self.limit as usize * 2).max(self.concurrency * 2)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Updates that ended with an [`Outcome`] (replied, delivered, …).
    pub handled: u64,
    /// Updates recorded as dead letters instead (see `fly dead-letters`).
    pub dead_letters: u64,
}

/// Runs until stopped, `max_updates` is reached, or (with `once`) after one
/// poll. Returns an error for a refused token or a store that cannot be written.
///
/// Polls only while holding the store's polling lease. A poller that finds
/// it held by another stands by until it can take it over (not with
/// `once`: that is refused); one that loses it (a shared store's lease
/// lapses when renewals fail for its whole time) finishes the updates in
/// hand, whose marks are then refused, and stands by again.
pub fn run(
    client: &ApiClient,
    store: Arc<dyn PollStore>,
    handler: Arc<dyn Handler>,
    settings: &PollSettings,
    shutdown: &Shutdown,
) -> anyhow::Result<Summary> {
    let standing_by = StandingBy {
        shutdown,
        store: store.as_ref(),
    };
    let standby = (!settings.once).then_some(&standing_by as &dyn fly_state::Standby);
    let mut total = Summary::default();
    loop {
        metrics().set_phase(Phase::StandingBy);
        service_manager::alive_for(STEP_BOUND);
        let Some(lease) = store.claim_polling(standby)? else {
            tracing::info!("stopped while standing by");
            return Ok(total);
        };
        let mut session = settings.clone();
        session.max_updates = settings
            .max_updates
            .map(|max| max.saturating_sub(total.handled + total.dead_letters));
        let (summary, lost) =
            match run_holding(client, &store, &handler, &session, shutdown, &lease) {
                // The store went away before polling began: the lease
                // lapses or is given back, and is taken again once it answers.
                Err(error) if is_unavailable(&error) && !settings.once => {
                    tracing::debug!("not polling: {error:#}");
                    (Summary::default(), true)
                }
                other => other?,
            };
        total.handled += summary.handled;
        total.dead_letters += summary.dead_letters;
        drop(lease);
        if !lost || shutdown.is_requested() || settings.once {
            return Ok(total);
        }
    }
}

/// A poller waiting for the polling lease (another holds it) or for the
/// state store to answer: it waits on the stop, and tells the service
/// manager it is up (standing by) or what it waits for.
struct StandingBy<'a> {
    shutdown: &'a Shutdown,
    store: &'a dyn PollStore,
}

impl fly_state::Standby for StandingBy<'_> {
    fn sleep(&self, duration: Duration) -> bool {
        if self.store.is_reachable() {
            service_manager::ready();
            service_manager::status_with(|| {
                "standing by: another poller holds the polling lease".to_string()
            });
        } else {
            service_manager::status_with(|| {
                "state store unreachable: waiting for it before polling".to_string()
            });
        }
        service_manager::alive_for(duration + STEP_BOUND);
        self.shutdown.sleep(duration)
    }
}

/// One stretch of polling under `lease`; returns what it handled and
/// whether it ended because the lease was lost.
fn run_holding(
    client: &ApiClient,
    store: &Arc<dyn PollStore>,
    handler: &Arc<dyn Handler>,
    settings: &PollSettings,
    shutdown: &Shutdown,
    lease: &PollingLease,
) -> anyhow::Result<(Summary, bool)> {
    let offset = store.next_offset()?;
    tracing::info!(offset, state = %store.location(), "polling for updates");
    metrics().set_phase(Phase::Polling);
    let scheduler = Arc::new(Scheduler::new(offset, settings.clone()));
    let parked = scheduler.load_parked(store.as_ref())?;
    if parked > 0 {
        tracing::info!(parked, "parked updates from an earlier run are tried again");
    }
    let losing = Arc::clone(&scheduler);
    lease.when_lost(move || losing.lease_lost());

    // The stop stages reach the scheduler and the handler from here.
    let listening = Arc::clone(&scheduler);
    let abandoning = Arc::clone(handler);
    let grace = shutdown.grace().as_secs_f64();
    let _subscription = shutdown.subscribe(move |stage| {
        if stage == Stage::Requested {
            tracing::info!(
                "stopping: finishing the updates in hand (at most {grace:.0} s; \
                 a second Ctrl-C stops at once)"
            );
        }
        if stage >= Stage::Requested {
            metrics().set_phase(Phase::Stopping);
            listening.stop_taking_work();
        }
        if stage >= Stage::Abandon {
            abandoning.abandon();
        }
    });

    // The poll thread is not joined: it may be inside a long poll when the
    // loop ends, holding nothing that needs saving (the offset it confirms is
    // already stored); it sees the loop is over when the poll returns.
    let poller = Poller {
        client: client.clone(),
        store: Arc::clone(store),
        scheduler: Arc::clone(&scheduler),
        settings: settings.clone(),
    };
    std::thread::Builder::new()
        .name("fly-poll".into())
        .spawn(move || poller.run())
        .context("starting the poll thread")?;

    std::thread::scope(|scope| {
        for _ in 0..settings.concurrency.max(1) {
            scope.spawn(|| scheduler.work(handler.as_ref(), store.as_ref(), lease));
        }
        scheduler.wait_until_done();
    });
    // No update is in hand any more: long-lived workers can go.
    handler.close();

    let state = scheduler.lock();
    let lost = scheduler.lost.load(Ordering::SeqCst);
    if !lost {
        match store.advance_offset(state.offset()) {
            Ok(()) => {
                metrics().poll_offset.set(state.offset());
            }
            // Every update below the stored offset is handled; the ones
            // above come again.
            Err(error) if is_unavailable(&error) || is_lease_lost(&error) => {
                tracing::warn!("the last offset was not saved: {error:#}");
            }
            Err(error) => return Err(error),
        }
    }
    if let Some(fatal) = lock(&scheduler.fatal).take() {
        return Err(fatal);
    }
    if settings.once && state.failed && !shutdown.is_requested() {
        anyhow::bail!("some updates could not be handled; they are retried on the next run");
    }
    Ok((
        Summary {
            handled: state.handled,
            dead_letters: state.dead_letters,
        },
        lost,
    ))
}

/// The queues and their bookkeeping, under one mutex; the Condvar wakes the
/// poller, the workers and the caller whenever any of it changes.
struct Scheduler {
    state: Mutex<Queues>,
    changed: Condvar,
    /// The error that ends the loop (a refused token, a store that fails).
    fatal: Mutex<Option<anyhow::Error>>,
    /// The polling lease was lost: the loop ends, and stands by again.
    lost: AtomicBool,
    settings: PollSettings,
}

#[derive(Default)]
struct Queues {
    chats: HashMap<String, ChatQueue>,
    /// Chats whose next update can start now, by the id of that update: the
    /// oldest update goes first, so one worker (`fly forward`) keeps the
    /// platform's order across chats.
    ready: BTreeSet<(i64, String)>,
    /// Ids queued or being handled: the offset stays at or below the lowest
    /// that is not parked.
    unfinished: BTreeSet<i64>,
    /// The unfinished ids recorded as parked in the store (a subset).
    parked: BTreeSet<i64>,
    /// Ids of updates that wait behind a parked one of their chat, polled
    /// but not yet (or not successfully) written to the store: the offset
    /// stays at or below them until they are recorded.
    spilling: BTreeSet<i64>,
    /// One past the highest id seen: the offset once nothing is unfinished.
    past_last: i64,
    busy_workers: usize,
    /// Pieces of work that ended (handled, failed, read back): a worker is
    /// free, so a poll may bring it something.
    ended: u64,
    /// Updates started or done, counted against `--max-updates`.
    claimed: u64,
    handled: u64,
    dead_letters: u64,
    /// No more polls (stop requested, `--once` polled, a fatal error, the limit).
    polling_over: bool,
    /// Workers start nothing new.
    stopping: bool,
    /// `--once`: an update failed and was left for the next run.
    failed: bool,
}

#[derive(Default)]
struct ChatQueue {
    updates: VecDeque<Update>,
    /// Consecutive failures of the update at the front.
    failures: u32,
    /// When the front update may be tried again after a failure.
    retry_at: Option<Instant>,
    busy: bool,
    /// `--once`: the front update failed; this chat waits for the next run.
    left_for_next_run: bool,
    /// The front update is parked and failed again: updates that join the
    /// queue are recorded as parked too, so they cannot hold the offset.
    blocked: bool,
    /// The highest id of this chat recorded in the store (parked) and not
    /// held here: later updates go to the store too, behind it, and the
    /// queue is refilled from the store when it runs empty.
    spilled: Option<i64>,
    /// Writes of this chat's updates to the store under way.
    spill_writes: usize,
    /// Updates of this chat sent to the store so far: a refill that began
    /// before one was sent may not have seen it.
    spill_count: u64,
    /// The id of the last update of this chat that was done: a refill reads
    /// the store from there.
    last_done: i64,
}

impl ChatQueue {
    /// Later updates of this chat go to the store, not to memory.
    fn spills(&self) -> bool {
        self.blocked || self.spilled.is_some()
    }

    /// `update_id` of this chat is in the store already (it came again).
    fn has_spilled(&self, update_id: i64, spilling: &BTreeSet<i64>) -> bool {
        self.spilled.is_some_and(|through| update_id <= through) && !spilling.contains(&update_id)
    }

    /// The front update is parked: when the updates behind it are all
    /// recorded as parked too, only the front stays in memory.
    fn forget_parked_behind(&mut self, unfinished: &mut BTreeSet<i64>, parked: &mut BTreeSet<i64>) {
        let behind = self.updates.iter().skip(1);
        if self.updates.len() > 1
            && behind
                .clone()
                .all(|update| parked.contains(&update.update_id))
        {
            for update in self.updates.drain(1..) {
                unfinished.remove(&update.update_id);
                parked.remove(&update.update_id);
                self.spilled = Some(
                    self.spilled
                        .map_or(update.update_id, |s| s.max(update.update_id)),
                );
            }
        }
    }
}

/// What a worker does next.
enum Work {
    /// Handle the front update of the chat.
    Handle(String, Box<Update>),
    /// Read the chat's next parked updates back from the store.
    Refill(String),
}

impl Queues {
    /// What the next poll confirms with: every update below it is handled.
    fn offset(&self) -> i64 {
        let queued = self
            .unfinished
            .iter()
            .find(|id| !self.parked.contains(id))
            .copied()
            .unwrap_or(self.past_last);
        self.spilling
            .first()
            .map_or(queued, |&spilling| spilling.min(queued))
    }

    /// Updates queued or being handled that hold the offset back.
    fn in_flight(&self) -> usize {
        self.unfinished.len() - self.parked.len()
    }

    /// What the poller does after a poll made with `polled_at` brought
    /// nothing new, `ended_before` pieces of work having ended then. The
    /// platform answers from the offset on, `limit` updates at most, so its
    /// answer changes when the offset moves. With a `full_window` that is
    /// the only change: the poll waits for it, and then polls at once when
    /// the workers would go idle (no update of theirs is ready), or once the
    /// updates in flight are down to a quarter of the bound (one poll per
    /// batch, not one per update). Without a full window an update may have
    /// arrived since the poll: a worker that is free gets a poll when work
    /// ends or the offset moves, or at most [`REPOLL_INTERVAL`] after the
    /// poll. So no fixed wait while work moves, and no poll in a row that
    /// nothing could change.
    fn after_nothing_new(
        &self,
        polled_at: i64,
        full_window: bool,
        ended_before: u64,
        settings: &PollSettings,
    ) -> Next {
        let workers = settings.concurrency.max(1);
        let starving = self.busy_workers < workers && self.ready.is_empty();
        let moved = self.offset() != polled_at;
        let news = if full_window {
            moved && (starving || self.in_flight() <= settings.max_in_flight() / 4)
        } else {
            (moved || self.ended != ended_before) && starving
        };
        if news {
            Next::Poll
        } else if self.in_flight() == 0 || (!full_window && self.busy_workers < workers) {
            // Nothing in hand can move the offset (only unusable updates
            // came back), or a free worker waits for an update that may be
            // new.
            Next::WaitAtMostRepoll
        } else {
            Next::WaitForChange
        }
    }

    fn is_idle(&self) -> bool {
        self.busy_workers == 0
    }

    /// Takes the work that can start at `now`: the front update of the
    /// oldest ready chat (unless `max_updates` are claimed), after moving
    /// the chats whose retry backoff is over to the ready ones.
    fn start_next(&mut self, max_updates: Option<u64>, now: Instant) -> Result<Work, Idle> {
        loop {
            let at_limit = max_updates.is_some_and(|max| self.claimed >= max);
            if !at_limit && let Some((_, chat)) = self.ready.pop_first() {
                let Some(queue) = self.chats.get_mut(&chat) else {
                    return Err(Idle::Gone);
                };
                queue.busy = true;
                let front = queue.updates.front().cloned();
                self.busy_workers += 1;
                let Some(update) = front else {
                    return Ok(Work::Refill(chat));
                };
                self.claimed += 1;
                return Ok(Work::Handle(chat, Box::new(update)));
            }
            // Chats waiting out a retry backoff become ready when it ends.
            let mut next_retry: Option<Instant> = None;
            let mut due = Vec::new();
            for (name, queue) in &mut self.chats {
                match queue.retry_at {
                    Some(at) if at <= now => {
                        queue.retry_at = None;
                        match queue.updates.front() {
                            Some(front) => due.push((front.update_id, name.clone())),
                            None if queue.spilled.is_some() => {
                                due.push((queue.last_done, name.clone()));
                            }
                            None => {}
                        }
                    }
                    Some(at) => next_retry = Some(next_retry.map_or(at, |next| next.min(at))),
                    None => {}
                }
            }
            if due.is_empty() {
                return Err(Idle::Until(next_retry));
            }
            self.ready.extend(due);
        }
    }

    /// The front update of `chat` (there is one) was confirmed, handled or
    /// a dead letter: the next one of the chat becomes ready.
    fn confirm_front(&mut self, chat: &str, update_id: i64, done: Done) {
        let Queues {
            chats,
            ready,
            unfinished,
            parked,
            handled,
            dead_letters,
            ..
        } = self;
        let Some(queue) = chats.get_mut(chat) else {
            return;
        };
        queue.updates.pop_front();
        unfinished.remove(&update_id);
        parked.remove(&update_id);
        queue.blocked = false;
        queue.last_done = update_id;
        if done == Done::Finished {
            *handled += 1;
        } else {
            *dead_letters += 1;
        }
        queue.failures = 0;
        match queue.updates.front() {
            Some(next) => {
                ready.insert((next.update_id, chat.to_string()));
            }
            // The next ones wait in the store: read back first.
            None if queue.spilled.is_some() => {
                ready.insert((update_id, chat.to_string()));
            }
            None => {
                chats.remove(chat);
            }
        }
    }

    /// The front update of `chat` was handled but could not be recorded:
    /// tried again shortly.
    fn defer_front(&mut self, chat: &str) {
        let Some(queue) = self.chats.get_mut(chat) else {
            return;
        };
        self.claimed -= 1;
        let jitter = STORE_RETRY.mul_f64(fly_base::random::unit());
        queue.retry_at = Some(Instant::now() + STORE_RETRY + jitter);
    }

    /// The front update of `chat` failed, or was parked: tried again after
    /// a backoff, or (`--once`) left for the next run.
    fn retry_front(&mut self, chat: &str, update_id: i64, done: Done, settings: &PollSettings) {
        let Queues {
            chats,
            unfinished,
            parked,
            claimed,
            failed,
            ..
        } = self;
        let Some(queue) = chats.get_mut(chat) else {
            return;
        };
        *claimed -= 1;
        queue.failures += 1;
        if done == Done::Parked {
            parked.insert(update_id);
            queue.blocked = true;
            queue.forget_parked_behind(unfinished, parked);
        }
        if settings.once {
            // Left for the next run: this chat stops here.
            *failed = done == Done::Failed;
            queue.left_for_next_run = true;
        } else {
            let policy = if done == Done::Parked {
                RetryPolicy {
                    max_attempts: None,
                    initial_delay: PARKED_FIRST_RETRY.min(settings.park_retry_max),
                    max_delay: settings.park_retry_max,
                    budget: None,
                }
            } else {
                RetryPolicy::FOREVER
            };
            let delay = policy.next_delay(queue.failures, None);
            queue.retry_at = Some(Instant::now() + delay);
        }
    }
}

/// What [`Queues::after_nothing_new`] tells the poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Poll again now: the answer can have changed.
    Poll,
    /// Wait until the queues change (work ends, the offset moves).
    WaitForChange,
    /// The same, but poll again [`REPOLL_INTERVAL`] after the last poll at
    /// the latest.
    WaitAtMostRepoll,
}

/// Why [`Queues::start_next`] started nothing.
enum Idle {
    /// Nothing can start before this moment (`None`: before a change).
    Until(Option<Instant>),
    /// A ready chat has no queue: the worker stops.
    Gone,
}

impl Scheduler {
    fn new(offset: i64, settings: PollSettings) -> Scheduler {
        Scheduler {
            state: Mutex::new(Queues {
                past_last: offset,
                ..Queues::default()
            }),
            changed: Condvar::new(),
            fatal: Mutex::new(None),
            lost: AtomicBool::new(false),
            settings,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        lock(&self.state)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Queues>) -> MutexGuard<'a, Queues> {
        self.changed
            .wait(guard)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, Queues>,
        timeout: Duration,
    ) -> MutexGuard<'a, Queues> {
        self.changed
            .wait_timeout(guard, timeout)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    /// Wakes everyone waiting; takes the guard to show the change was made under it.
    /// The gauges follow every change from here.
    fn notify(&self, state: &mut Queues) {
        let metrics = metrics();
        metrics.updates_in_flight.set(state.in_flight() as i64);
        metrics.parked_updates.set(state.parked.len() as i64);
        service_manager::status_with(|| {
            if state.stopping {
                format!("stopping: {} updates in hand", state.busy_workers)
            } else {
                format!(
                    "polling: offset {}, {} updates in flight",
                    state.offset(),
                    state.in_flight()
                )
            }
        });
        self.changed.notify_all();
    }

    /// Waits for a change, waking to tell the watchdog the loop is alive
    /// (waiting on the workers is no hang: handlers have bounds of their own).
    fn wait_alive<'a>(&self, guard: MutexGuard<'a, Queues>) -> MutexGuard<'a, Queues> {
        let Some(every) = service_manager::beat_every() else {
            return self.wait(guard);
        };
        let guard = self.wait_timeout(guard, every);
        service_manager::alive_for(every + BOUND_SLACK);
        guard
    }

    /// A stop was requested: nothing new starts, no more polls.
    fn stop_taking_work(&self) {
        let mut state = self.lock();
        state.stopping = true;
        state.polling_over = true;
        self.notify(&mut state);
    }

    fn fail(&self, error: anyhow::Error) {
        if is_lease_lost(&error) {
            return self.lease_lost();
        }
        lock(&self.fatal).get_or_insert(error);
        self.stop_taking_work();
    }

    /// Another poller may poll now: nothing new starts here, and what is in
    /// hand finishes (its marks are refused, so it comes again to the other).
    fn lease_lost(&self) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            metrics().set_phase(Phase::StandingBy);
            tracing::warn!(
                "lost the polling lease: finishing the updates in hand, then taking it \
                 again or standing by"
            );
        }
        self.stop_taking_work();
    }

    fn limit_reached(&self, state: &Queues) -> bool {
        self.settings
            .max_updates
            .is_some_and(|max| state.handled + state.dead_letters >= max)
    }

    /// Waits until fewer updates than the bound are in flight: the offset
    /// to poll with then, or `None` once polling is over.
    fn room_to_poll(&self) -> Option<i64> {
        let mut state = self.lock();
        while !state.polling_over && state.in_flight() >= self.settings.max_in_flight() {
            state = self.wait_alive(state);
        }
        (!state.polling_over).then(|| state.offset())
    }

    /// After a poll made with `polled_at` that brought nothing new (only
    /// updates in hand, handled ones not yet confirmed, unusable ones):
    /// waits until the next poll can bring something (see
    /// [`Queues::after_nothing_new`]), or polling is over.
    fn wait_for_news(&self, polled_at: i64, full_window: bool) {
        let started = Instant::now();
        let mut state = self.lock();
        let ended_before = state.ended;
        loop {
            if state.polling_over {
                return;
            }
            let left =
                match state.after_nothing_new(polled_at, full_window, ended_before, &self.settings)
                {
                    Next::Poll => return,
                    Next::WaitForChange => None,
                    Next::WaitAtMostRepoll => {
                        match REPOLL_INTERVAL.checked_sub(started.elapsed()) {
                            Some(left) if !left.is_zero() => Some(left),
                            _ => return,
                        }
                    }
                };
            // Waiting on the workers is no hang (handlers have bounds of
            // their own), but the watchdog hears from this loop in time.
            let bound = match (left, service_manager::beat_every()) {
                (Some(left), Some(every)) => Some(left.min(every)),
                (left, every) => left.or(every),
            };
            state = match bound {
                Some(bound) => {
                    service_manager::alive_for(bound + BOUND_SLACK);
                    self.wait_timeout(state, bound)
                }
                None => self.wait(state),
            };
        }
    }

    /// Blocks the caller until the loop is over and no worker is busy.
    fn wait_until_done(&self) {
        let mut state = self.lock();
        loop {
            let once_done = self.settings.once
                && state.polling_over
                && state.chats.values().all(|chat| chat.left_for_next_run);
            let over = state.stopping || self.limit_reached(&state) || once_done;
            if over && state.is_idle() {
                break;
            }
            if over {
                // Let the updates in hand finish; start nothing new.
                state.stopping = true;
                // The poll thread has stopped turning: the loop is this wait.
                state = self.wait_alive(state);
            } else {
                state = self.wait(state);
            }
        }
        state.stopping = true;
        state.polling_over = true;
        self.notify(&mut state);
    }

    /// Queues the new updates of a poll: ids at or above the offset the
    /// poll was made with, neither unfinished nor handled already.
    fn enqueue(
        &self,
        received: Vec<Received>,
        offset: i64,
        store: &dyn PollStore,
    ) -> anyhow::Result<usize> {
        let mut fresh = Vec::new();
        for update in received {
            let update = match update {
                Ok(update) => update,
                Err(unusable) => {
                    // No id, so nothing to confirm it by: recorded once (by
                    // its bytes), and the updates after it go on.
                    if store.record_dead_letter(None, &unusable.raw, &unusable.reason)? {
                        tracing::warn!(
                            "update recorded as a dead letter (see fly dead-letters): {}",
                            unusable.reason
                        );
                        UpdateRecord::new(self.settings.source, Instant::now())
                            .finish(End::DeadLetter);
                    }
                    continue;
                }
            };
            // The platform only returns ids at or above the offset; anything
            // below was confirmed already.
            if update.update_id < offset {
                continue;
            }
            let known = {
                let state = self.lock();
                state.unfinished.contains(&update.update_id)
                    || state
                        .chats
                        .get(&chat_label(&update))
                        .is_some_and(|queue| queue.has_spilled(update.update_id, &state.spilling))
            };
            // Handled, and not yet confirmed: it comes back until the
            // offset passes it (not a redelivery worth counting).
            if !known && !store.is_handled(update.update_id)? {
                fresh.push(update);
            } else {
                let mut state = self.lock();
                state.past_last = state.past_last.max(update.update_id.saturating_add(1));
            }
        }
        fresh.sort_by_key(|update| update.update_id);
        fresh.dedup_by_key(|update| update.update_id);
        let mut state = self.lock();
        let count = fresh.len();
        let mut to_store = Vec::new();
        for update in fresh {
            let update_id = update.update_id;
            state.past_last = state.past_last.max(update_id.saturating_add(1));
            // Written before and failed: decided again here.
            state.spilling.remove(&update_id);
            let chat = chat_label(&update);
            if let Some(queue) = state.chats.get_mut(&chat)
                && queue.spills()
            {
                // Behind a parked update of its chat: into the store, not
                // memory; the offset waits for the write.
                let front = queue.updates.front().map(|front| front.update_id);
                queue.spilled = Some(queue.spilled.map_or(update_id, |s| s.max(update_id)));
                queue.spill_writes += 1;
                queue.spill_count += 1;
                state.spilling.insert(update_id);
                to_store.push((chat, update, front));
                continue;
            }
            if !state.unfinished.insert(update_id) {
                continue;
            }
            let queue = state.chats.entry(chat.clone()).or_default();
            queue.updates.push_back(update);
            let startable = queue.updates.len() == 1 && !queue.busy && queue.retry_at.is_none();
            if startable {
                state.ready.insert((update_id, chat));
            }
        }
        self.notify(&mut state);
        drop(state);
        self.store_behind_parked(store, to_store)?;
        Ok(count)
    }

    /// Records the updates that came for a parked chat as parked, in id
    /// order, and lets the offset pass each once it is. The first write
    /// that fails stops the rest: they stay below the offset and come again.
    fn store_behind_parked(
        &self,
        store: &dyn PollStore,
        updates: Vec<(String, Update, Option<i64>)>,
    ) -> anyhow::Result<()> {
        let mut updates = updates.into_iter();
        let mut result = Ok(());
        for (chat, update, front) in updates.by_ref() {
            let reason = match front {
                Some(front) => format!("waiting behind parked update {front} of its chat"),
                None => "waiting behind a parked update of its chat".to_string(),
            };
            let written = store.park(update.update_id, &update.raw, &reason);
            let mut state = self.lock();
            if let Some(queue) = state.chats.get_mut(&chat) {
                queue.spill_writes = queue.spill_writes.saturating_sub(1);
            }
            if written.is_ok() {
                state.spilling.remove(&update.update_id);
            }
            self.notify(&mut state);
            if let Err(error) = written {
                result = Err(error);
                break;
            }
        }
        // Not written: they come again with the next poll.
        let mut state = self.lock();
        for (chat, _, _) in updates {
            if let Some(queue) = state.chats.get_mut(&chat) {
                queue.spill_writes = queue.spill_writes.saturating_sub(1);
            }
        }
        self.notify(&mut state);
        result
    }

    /// Records updates that wait behind a parked one of their chat as parked
    /// too (outside the lock: a store write), then lets the offset pass them.
    fn park_waiting(
        &self,
        store: &dyn PollStore,
        waiting: Vec<(Update, Option<i64>)>,
    ) -> anyhow::Result<()> {
        if waiting.is_empty() {
            return Ok(());
        }
        for (update, front) in &waiting {
            let reason = match front {
                Some(front) => format!("waiting behind parked update {front} of its chat"),
                None => "waiting behind a parked update of its chat".to_string(),
            };
            store.park(update.update_id, &update.raw, &reason)?;
        }
        let mut state = self.lock();
        for (update, _) in waiting {
            if state.unfinished.contains(&update.update_id) {
                state.parked.insert(update.update_id);
            }
        }
        self.notify(&mut state);
        Ok(())
    }

    /// The updates parked by an earlier run, back in their chats' queues
    /// (in id order, ahead of anything polled) and tried at once: the first
    /// [`PARKED_IN_MEMORY`] of each chat; the rest are read back later.
    fn load_parked(&self, store: &dyn PollStore) -> anyhow::Result<usize> {
        let mut count = 0;
        let mut after = i64::MIN;
        let mut held_bytes: HashMap<String, usize> = HashMap::new();
        loop {
            let page = store.parked_after(after, PARKED_PAGE)?;
            if page.is_empty() {
                return Ok(count);
            }
            let mut state = self.lock();
            for letter in page {
                let Some(update_id) = letter.update_id else {
                    continue;
                };
                after = update_id;
                let Some(update) = read_parked(&letter, update_id) else {
                    tracing::warn!(
                        update_id,
                        "a parked update could not be read back; left in the store"
                    );
                    continue;
                };
                count += 1;
                let chat = chat_label(&update);
                let held = held_bytes.entry(chat.clone()).or_default();
                let queue = state.chats.entry(chat.clone()).or_default();
                let full = queue.updates.len() >= PARKED_IN_MEMORY
                    || (*held > 0 && *held + update.raw.len() > PARKED_IN_MEMORY_BYTES);
                if queue.spilled.is_some() || full {
                    queue.spilled = Some(update_id);
                    continue;
                }
                *held += update.raw.len();
                if queue.updates.is_empty() {
                    state.ready.insert((update_id, chat.clone()));
                }
                if let Some(queue) = state.chats.get_mut(&chat) {
                    queue.updates.push_back(update);
                }
                state.unfinished.insert(update_id);
                state.parked.insert(update_id);
            }
            self.notify(&mut state);
        }
    }

    /// Reads the next parked updates of `chat` (after its last done one)
    /// back from the store into its empty queue.
    fn refill(&self, store: &dyn PollStore, chat: &str) {
        // Whether every update of the chat sent to the store was written
        // before the read began, and none was sent while it ran.
        let (after, written_before) =
            self.lock()
                .chats
                .get(chat)
                .map_or((i64::MIN, None), |queue| {
                    let settled = (queue.spill_writes == 0).then_some(queue.spill_count);
                    (queue.last_done, settled)
                });
        let read = parked_of_chat(store, chat, after);
        let mut state = self.lock();
        state.busy_workers -= 1;
        state.ended += 1;
        let Queues {
            chats,
            ready,
            unfinished,
            parked,
            ..
        } = &mut *state;
        let Some(queue) = chats.get_mut(chat) else {
            self.notify(&mut state);
            return;
        };
        queue.busy = false;
        match read {
            Ok((loaded, complete)) => {
                if !loaded.is_empty() {
                    tracing::debug!(
                        chat,
                        count = loaded.len(),
                        "parked updates read back from the store"
                    );
                }
                for update in loaded {
                    if unfinished.insert(update.update_id) {
                        parked.insert(update.update_id);
                        queue.updates.push_back(update);
                    }
                }
                if complete && written_before == Some(queue.spill_count) {
                    queue.spilled = None;
                }
                match queue.updates.front() {
                    Some(front) => {
                        ready.insert((front.update_id, chat.to_string()));
                    }
                    None if !queue.spills() => {
                        chats.remove(chat);
                    }
                    // A write of this chat's was under way: read again soon.
                    None => queue.retry_at = Some(Instant::now() + REPOLL_INTERVAL),
                }
                self.notify(&mut state);
            }
            Err(error) if is_unavailable(&error) => {
                tracing::debug!(chat, "parked updates not read back: {error:#}");
                let jitter = STORE_RETRY.mul_f64(fly_base::random::unit());
                queue.retry_at = Some(Instant::now() + STORE_RETRY + jitter);
                self.notify(&mut state);
            }
            Err(error) => {
                self.notify(&mut state);
                drop(state);
                self.fail(error);
            }
        }
    }

    /// A worker: takes the next ready chat's front update, handles it,
    /// records the outcome; until the loop stops.
    fn work(&self, handler: &dyn Handler, store: &dyn PollStore, lease: &PollingLease) {
        while let Some(work) = self.next_update() {
            self.perform(work, handler, store, lease);
        }
    }

    /// Does one piece of work and records how it ended.
    fn perform(
        &self,
        work: Work,
        handler: &dyn Handler,
        store: &dyn PollStore,
        lease: &PollingLease,
    ) {
        let (chat, update) = match work {
            Work::Handle(chat, update) => (chat, update),
            Work::Refill(chat) => {
                self.refill(store, &chat);
                return;
            }
        };
        if !lease.is_current() {
            // Not renewed for the lease time: another poller may have
            // this update by now.
            self.finish(&chat, update.update_id, Done::Failed);
            self.lease_lost();
            return;
        }
        let (attempt, was_parked) = {
            let state = self.lock();
            let failures = state.chats.get(&chat).map_or(0, |queue| queue.failures);
            (failures + 1, state.parked.contains(&update.update_id))
        };
        let mut record = record_of(self.settings.source, &update, attempt);
        let outcome = handler.handle(&update, &mut record.steps);
        let recorded = match outcome {
            Ok(outcome) => record
                .steps
                .time(Step::Store, || {
                    store
                        .mark_handled(update.update_id, outcome.as_str())
                        .and_then(|()| unpark(store, &update, was_parked))
                })
                .map(|()| (Done::Finished, End::Done(outcome))),
            Err(HandleError::DeadLetter(reason)) => record
                .steps
                .time(Step::Store, || {
                    // A parked record of it makes way for the dead letter.
                    unpark(store, &update, was_parked)
                        .and_then(|()| record_dead_letter(store, &update, &reason))
                })
                .map(|()| (Done::DeadLetter, End::DeadLetter)),
            Err(HandleError::Retry(error)) => {
                self.failed(store, &chat, &update, &error, false, &record)
            }
            Err(HandleError::Park(error)) => {
                self.failed(store, &chat, &update, &error, true, &record)
            }
            Err(HandleError::Fatal(error)) => Err(error),
        };
        match recorded {
            Ok((done, end)) => {
                record.finish(end);
                self.finish(&chat, update.update_id, done);
            }
            // Not marked: tried again once the store answers (a repeat
            // of the reply is absorbed by its client_msg_id).
            Err(error) if is_unavailable(&error) => {
                metrics().state_store_errors.inc();
                record.finish(End::Failed(format!("not recorded: {error:#}")));
                self.finish(&chat, update.update_id, Done::Deferred);
            }
            Err(error) => {
                if !is_lease_lost(&error) {
                    metrics().state_store_errors.inc();
                }
                self.finish(&chat, update.update_id, Done::Failed);
                self.fail(error);
            }
        }
    }

    /// An attempt of the front update of `chat` failed: retried after a
    /// backoff, or parked (recorded) once it has failed `--max-attempts`
    /// times, failed for good, or was parked already; the updates queued
    /// behind it are then parked too.
    fn failed(
        &self,
        store: &dyn PollStore,
        chat: &str,
        update: &Update,
        error: &anyhow::Error,
        for_good: bool,
        record: &UpdateRecord,
    ) -> anyhow::Result<(Done, End)> {
        let update_id = update.update_id;
        let attempts = record.attempt;
        let was_parked = self.lock().parked.contains(&update_id);
        let park = for_good || was_parked || attempts >= self.settings.max_attempts.max(1);
        if !park || (self.settings.once && !for_good && !was_parked) {
            return Ok((Done::Failed, End::Failed(format!("{error:#}"))));
        }
        store.park(update_id, &update.raw, &format!("{error:#}"))?;
        let parked = End::Parked {
            again: was_parked,
            error: format!("{error:#}"),
        };
        let waiting: Vec<(Update, Option<i64>)> = {
            let state = self.lock();
            state.chats.get(chat).map_or_else(Vec::new, |queue| {
                queue
                    .updates
                    .iter()
                    .skip(1)
                    .filter(|waiting| !state.parked.contains(&waiting.update_id))
                    .map(|waiting| (waiting.clone(), Some(update_id)))
                    .collect()
            })
        };
        self.park_waiting(store, waiting)?;
        Ok((Done::Parked, parked))
    }

    /// Waits for an update that can start now (or a parked chat to read
    /// back): `None` once the loop stops.
    fn next_update(&self) -> Option<Work> {
        let mut state = self.lock();
        loop {
            if state.stopping {
                return None;
            }
            state = match state.start_next(self.settings.max_updates, Instant::now()) {
                Ok(work) => return Some(work),
                Err(Idle::Gone) => return None,
                Err(Idle::Until(Some(at))) => {
                    self.wait_timeout(state, at.saturating_duration_since(Instant::now()))
                }
                Err(Idle::Until(None)) => self.wait(state),
            };
        }
    }

    /// Records how the front update of `chat` ended.
    fn finish(&self, chat: &str, update_id: i64, done: Done) {
        let mut state = self.lock();
        state.busy_workers -= 1;
        state.ended += 1;
        if let Some(queue) = state.chats.get_mut(chat) {
            queue.busy = false;
            match done {
                Done::Finished | Done::DeadLetter => state.confirm_front(chat, update_id, done),
                Done::Deferred => state.defer_front(chat),
                Done::Failed | Done::Parked => {
                    state.retry_front(chat, update_id, done, &self.settings);
                }
            }
        }
        self.notify(&mut state);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    /// Handled or ignored: confirmed.
    Finished,
    /// Recorded as a dead letter: confirmed too.
    DeadLetter,
    /// Not handled; stays unfinished and is tried again.
    Failed,
    /// Not handled and recorded as parked: tried again after a long backoff,
    /// while the offset may pass it.
    Parked,
    /// Handled, but the store could not record it (an outage): tried again
    /// shortly, not counted as a failure of the update.
    Deferred,
}

/// The update a parked record holds, if it reads as one with its id.
fn read_parked(letter: &fly_state::DeadLetter, update_id: i64) -> Option<Update> {
    let parsed = fly_signature::parse(&letter.raw).ok()?;
    let update = Update::read(&parsed, &letter.raw).ok()?;
    (update.update_id == update_id).then_some(update)
}

/// The first parked updates of `chat` with an id above `after` (at most
/// [`PARKED_IN_MEMORY`] and [`PARKED_IN_MEMORY_BYTES`]), in id order, and
/// whether they are all it has.
fn parked_of_chat(
    store: &dyn PollStore,
    chat: &str,
    after: i64,
) -> anyhow::Result<(Vec<Update>, bool)> {
    let mut loaded: Vec<Update> = Vec::new();
    let mut bytes = 0;
    let mut after = after;
    loop {
        let page = store.parked_after(after, PARKED_PAGE)?;
        if page.is_empty() {
            return Ok((loaded, true));
        }
        for letter in page {
            let Some(update_id) = letter.update_id else {
                continue;
            };
            after = update_id;
            // One that cannot be read was warned of when loaded at start.
            let Some(update) = read_parked(&letter, update_id) else {
                continue;
            };
            if chat_label(&update) == chat {
                if !loaded.is_empty() && bytes + update.raw.len() > PARKED_IN_MEMORY_BYTES {
                    return Ok((loaded, false));
                }
                bytes += update.raw.len();
                loaded.push(update);
                if loaded.len() == PARKED_IN_MEMORY {
                    return Ok((loaded, false));
                }
            }
        }
    }
}

/// Forgets the parked record of `update` (handled at last, or dead now).
fn unpark(store: &dyn PollStore, update: &Update, was_parked: bool) -> anyhow::Result<()> {
    if was_parked && store.unpark(update.update_id)? {
        tracing::info!(
            update_id = update.update_id,
            "parked update handled at last"
        );
    }
    Ok(())
}

/// Tells the service manager why polling pauses.
fn store_unreachable() {
    service_manager::status_with(|| "state store unreachable: polling paused".to_string());
}

/// The poll thread: polls whenever there is room, hands what came to the
/// scheduler, and keeps the stored offset at the lowest unfinished update.
struct Poller {
    client: ApiClient,
    store: Arc<dyn PollStore>,
    scheduler: Arc<Scheduler>,
    settings: PollSettings,
}

impl Poller {
    fn run(self) {
        if let Err(error) = self.poll_until_over() {
            self.scheduler.fail(error);
        }
    }

    fn poll_until_over(&self) -> anyhow::Result<()> {
        let mut stored_offset = i64::MIN;
        let mut failed_rounds = 0u32;
        // Consecutive rounds the state store could not be reached in.
        let mut store_failures = 0u32;
        loop {
            service_manager::alive_for(STEP_BOUND);
            let Some(offset) = self.scheduler.room_to_poll() else {
                return Ok(());
            };
            if offset > stored_offset {
                match self.store.advance_offset(offset) {
                    Ok(()) => {
                        stored_offset = offset;
                        metrics().poll_offset.set(offset);
                    }
                    // No poll while the offset cannot be saved: the store
                    // logs the outage; this waits for it with backoff.
                    Err(error) if is_unavailable(&error) => {
                        store_failures += 1;
                        store_unreachable();
                        self.pause(RetryPolicy::FOREVER.next_delay(store_failures, None));
                        continue;
                    }
                    Err(error) => return Err(error),
                }
            }
            let timeout = if self.settings.once {
                Duration::ZERO
            } else {
                self.settings.poll_timeout
            };
            // READY as /readyz is: the lease is held, the store answers,
            // and the loop polls.
            service_manager::ready();
            // Each attempt of the poll, and each wait between two, says how
            // long it may take: one that outlives it (a platform that drips
            // its answer) is a loop that stopped turning.
            let alive = |bound: Duration| service_manager::alive_for(bound + BOUND_SLACK);
            let polled = self
                .client
                .get_updates(offset, self.settings.limit, timeout, &alive);
            let received = match polled {
                Ok(received) => received,
                Err(ApiError::Cancelled) => return Ok(()),
                Err(error @ ApiError::BadResponse { .. }) => {
                    tracing::error!("{error}");
                    failed_rounds += 1;
                    self.pause(RetryPolicy::FOREVER.next_delay(failed_rounds, None));
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            failed_rounds = 0;
            let had_updates = !received.is_empty();
            let full_window = received.len() >= self.settings.limit as usize;
            let fresh = match self
                .scheduler
                .enqueue(received, offset, self.store.as_ref())
            {
                Ok(fresh) => fresh,
                // What came is not queued; being unconfirmed, it comes
                // again with the next poll once the store answers.
                Err(error) if is_unavailable(&error) => {
                    store_failures += 1;
                    store_unreachable();
                    self.pause(RetryPolicy::FOREVER.next_delay(store_failures, None));
                    continue;
                }
                Err(error) => return Err(error),
            };
            store_failures = 0;
            if self.settings.once {
                let mut state = self.scheduler.lock();
                state.polling_over = true;
                self.scheduler.notify(&mut state);
                return Ok(());
            }
            if !had_updates && timeout.is_zero() {
                // A poll that does not wait (`--poll-timeout 0`) and found
                // nothing: the next one waits a moment rather than spin.
                self.pause(SHORT_POLL_INTERVAL);
            } else if fresh == 0 && had_updates {
                // Only unfinished (or unusable) updates came back: the
                // platform answers at once while they are unconfirmed, so
                // the next poll waits for a change that can bring more.
                self.scheduler.wait_for_news(offset, full_window);
            }
        }
    }

    /// Waits `duration` (a backoff after an error, or between two polls
    /// that do not wait), or less if the loop ends.
    fn pause(&self, duration: Duration) {
        service_manager::alive_for(duration + BOUND_SLACK);
        let deadline = Instant::now() + duration;
        let mut state = self.scheduler.lock();
        loop {
            let now = Instant::now();
            if state.polling_over || now >= deadline {
                return;
            }
            state = self.scheduler.wait_timeout(state, deadline - now);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The scheduler driven by hand, a step at a time, as its workers and
    //! poll thread would drive it, against a real SQLite store: no network,
    //! no clock but `start_next`'s. After every step the invariants of
    //! ARCHITECTURE.md are checked against what the store holds.

    use std::sync::mpsc;

    use super::*;
    use crate::bot::Outcome;
    use crate::observe::Steps;
    use fly_state::{BotIdentity, Letters, SqliteStore, Store};

    /// Long enough for any backoff to be over.
    const LATER: Duration = Duration::from_secs(3600);

    fn update(update_id: i64, chat: &str) -> Update {
        let raw = format!(
            r#"{{"update_id":{update_id},"type":"message","message":{{"chat":{{"type":"private","id":"{chat}"}},"msgType":"text","data":{{"content":"hi"}}}}}}"#
        );
        Update::read(&fly_signature::parse(&raw).unwrap(), &raw).unwrap()
    }

    /// How the handler answers one attempt.
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Reply,
        Retry,
        Park,
        Dead,
    }

    /// Answers each update as scripted (a reply once its script runs out)
    /// and remembers every call and every reply.
    #[derive(Default)]
    struct Scripted {
        script: Mutex<HashMap<i64, VecDeque<Answer>>>,
        calls: Mutex<Vec<i64>>,
        replied: Mutex<BTreeSet<i64>>,
    }

    impl Scripted {
        fn answer(&self, update_id: i64, answers: &[Answer]) {
            lock(&self.script).insert(update_id, answers.iter().copied().collect());
        }
    }

    impl Handler for Scripted {
        fn handle(&self, update: &Update, _steps: &mut Steps) -> Result<Outcome, HandleError> {
            let id = update.update_id;
            assert!(
                !lock(&self.replied).contains(&id),
                "update {id} handled again after its reply"
            );
            lock(&self.calls).push(id);
            let answer = lock(&self.script)
                .get_mut(&id)
                .and_then(VecDeque::pop_front)
                .unwrap_or(Answer::Reply);
            match answer {
                Answer::Reply => {
                    lock(&self.replied).insert(id);
                    Ok(Outcome::Replied)
                }
                Answer::Retry => Err(HandleError::Retry(anyhow::anyhow!("the platform is away"))),
                Answer::Park => Err(HandleError::Park(anyhow::anyhow!("the reply was refused"))),
                Answer::Dead => Err(HandleError::DeadLetter("nothing to answer".into())),
            }
        }
    }

    /// `limit` 2 and one worker: at most 4 updates in flight.
    fn settings() -> PollSettings {
        PollSettings {
            limit: 2,
            max_attempts: 2,
            park_retry_max: Duration::from_secs(60),
            poll_timeout: Duration::ZERO,
            concurrency: 1,
            max_updates: None,
            once: false,
            source: Source::Poll,
        }
    }

    struct Harness {
        store: SqliteStore,
        scheduler: Scheduler,
        handler: Scripted,
        lease: PollingLease,
        /// Every update polled at or above the offset of its poll.
        polled: BTreeSet<i64>,
        dir: tempfile::TempDir,
    }

    impl Harness {
        fn new(offset: i64) -> Harness {
            Harness::with_lease(offset, PollingLease::until_exit())
        }

        fn with_lease(offset: i64, lease: PollingLease) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(
                &dir.path().join("state.db"),
                &BotIdentity::new("http://127.0.0.1:8787/", "t"),
            )
            .unwrap();
            Harness {
                store,
                scheduler: Scheduler::new(offset, settings()),
                handler: Scripted::default(),
                lease,
                polled: BTreeSet::new(),
                dir,
            }
        }

        fn offset(&self) -> i64 {
            self.scheduler.lock().offset()
        }

        /// A poll, made with the current offset, brought these (id, chat).
        fn poll(&mut self, updates: &[(i64, &str)]) {
            let offset = self.offset();
            let received = updates
                .iter()
                .map(|&(id, chat)| Ok(update(id, chat)))
                .collect();
            self.polled
                .extend(updates.iter().map(|&(id, _)| id).filter(|&id| id >= offset));
            self.scheduler
                .enqueue(received, offset, &self.store)
                .unwrap();
            self.check();
        }

        /// Takes all the work idle workers would start `after` from now
        /// (in the order they take it); no chat twice.
        fn take(&self, after: Duration) -> Vec<Work> {
            let mut state = self.scheduler.lock();
            let mut taken = Vec::new();
            while let Ok(work) = state.start_next(None, Instant::now() + after) {
                taken.push(work);
            }
            let mut chats: Vec<&str> = taken.iter().map(chat_of).collect();
            chats.sort_unstable();
            let count = chats.len();
            chats.dedup();
            assert_eq!(chats.len(), count, "one chat started twice at once");
            taken
        }

        /// Does each piece of work, as a worker would, checking after each.
        fn perform(&self, work: Vec<Work>) {
            for work in work {
                self.scheduler
                    .perform(work, &self.handler, &self.store, &self.lease);
                self.check();
            }
        }

        /// Takes and does work, waiting out every backoff, until nothing is
        /// left to do.
        fn settle(&self) {
            for _ in 0..100 {
                let work = self.take(LATER);
                if work.is_empty() {
                    return;
                }
                self.perform(work);
            }
            panic!("the scheduler never settled");
        }

        fn parked(&self) -> Vec<i64> {
            let letters = self.store.dead_letters().unwrap();
            let mut parked: Vec<i64> = letters
                .iter()
                .filter(|letter| letter.parked)
                .filter_map(|letter| letter.update_id)
                .collect();
            parked.sort_unstable();
            parked
        }

        fn calls(&self) -> Vec<i64> {
            lock(&self.handler.calls).clone()
        }

        /// The invariants of ARCHITECTURE.md: the offset never passes an
        /// update that is neither finished nor recorded in the store
        /// (handled, dead or parked); an update is marked handled only
        /// after its reply was accepted (or it was recorded dead).
        fn check(&self) {
            let offset = self.offset();
            let letters = self.store.dead_letters().unwrap();
            let recorded = |id: i64| letters.iter().any(|letter| letter.update_id == Some(id));
            let dead = |id: i64| {
                letters
                    .iter()
                    .any(|letter| letter.update_id == Some(id) && !letter.parked)
            };
            let replied = lock(&self.handler.replied);
            for &id in &self.polled {
                let handled = self.store.is_handled(id).unwrap();
                if id < offset {
                    assert!(
                        handled || recorded(id),
                        "the offset {offset} passed update {id}, neither handled nor recorded"
                    );
                }
                if handled {
                    assert!(
                        replied.contains(&id) || dead(id),
                        "update {id} marked handled, but its reply was not accepted"
                    );
                }
            }
        }
    }

    fn chat_of(work: &Work) -> &str {
        match work {
            Work::Handle(chat, _) | Work::Refill(chat) => chat,
        }
    }

    /// The id of the update to handle (a read-back from the store is 0).
    fn id_of(work: &Work) -> i64 {
        match work {
            Work::Handle(_, update) => update.update_id,
            Work::Refill(_) => 0,
        }
    }

    fn ids(work: &[Work]) -> Vec<i64> {
        work.iter().map(id_of).collect()
    }

    use Answer::{Dead, Park, Reply, Retry};

    /// A case: its name, how the handler answers, the ids still in hand,
    /// the offset once the others are done.
    type Row = (&'static str, &'static [(i64, Answer)], &'static [i64], i64);

    /// Three chats, one update each, all started at once: the offset after
    /// the attempts (ids `in_hand` are still being handled).
    #[test]
    fn the_offset_is_the_lowest_update_neither_finished_nor_recorded() {
        let table: &[Row] = &[
            ("all replied", &[], &[], 13),
            ("all in hand", &[], &[10, 11, 12], 10),
            ("the last in hand", &[], &[12], 12),
            ("the first in hand", &[], &[10], 10),
            ("the first failed", &[(10, Retry)], &[], 10),
            ("the middle failed", &[(11, Retry)], &[], 11),
            ("the last failed", &[(12, Retry)], &[], 12),
            ("the first dead", &[(10, Dead)], &[], 13),
            ("the first parked", &[(10, Park)], &[], 13),
            (
                "parked, then one failed",
                &[(10, Park), (11, Retry)],
                &[],
                11,
            ),
            (
                "failed below a parked one",
                &[(10, Retry), (11, Park)],
                &[],
                10,
            ),
        ];
        for &(name, answers, in_hand, expected) in table {
            let mut h = Harness::new(10);
            for &(id, answer) in answers {
                h.handler.answer(id, &[answer]);
            }
            h.poll(&[(10, "a"), (11, "b"), (12, "c")]);
            assert_eq!(h.offset(), 10, "{name}: nothing finished yet");
            let work = h.take(Duration::ZERO);
            assert_eq!(ids(&work), [10, 11, 12], "{name}: other chats go on");
            let (held, done): (Vec<Work>, Vec<Work>) = work
                .into_iter()
                .partition(|work| in_hand.contains(&id_of(work)));
            h.perform(done);
            assert_eq!(h.offset(), expected, "{name}");
            h.perform(held);
        }
    }

    /// An update handled before (delivered again after a crash between the
    /// reply and the offset) is not handled again, and the offset passes
    /// it; ids below the offset of the poll and repeats are left alone.
    #[test]
    fn an_update_handled_before_is_passed_not_handled_again() {
        let mut h = Harness::new(10);
        h.store.mark_handled(11, "replied").unwrap();
        lock(&h.handler.replied).insert(11);
        h.poll(&[(9, "a"), (10, "a"), (11, "b"), (12, "c"), (12, "c")]);
        let work = h.take(Duration::ZERO);
        assert_eq!(ids(&work), [10, 12]);
        h.perform(work);
        assert_eq!(h.offset(), 13);
        h.poll(&[(10, "a"), (11, "b"), (12, "c")]);
        assert!(
            h.take(LATER).is_empty(),
            "handled ones come again: not queued"
        );
        assert_eq!(h.calls(), [10, 12]);
        assert_eq!(h.offset(), 13);
    }

    /// One chat's updates run one at a time, in id order, a failed one
    /// holding the ones behind it; other chats go on meanwhile.
    #[test]
    fn a_chat_runs_one_update_at_a_time_in_order_other_chats_meanwhile() {
        let mut h = Harness::new(1);
        h.handler.answer(3, &[Retry]);
        h.poll(&[(1, "a"), (2, "b"), (3, "a"), (4, "a"), (5, "b")]);
        let first = h.take(Duration::ZERO);
        assert_eq!(ids(&first), [1, 2], "each chat's first, oldest first");
        let mut first = first.into_iter();
        h.perform(first.next().into_iter().collect());
        assert_eq!(h.offset(), 2, "2 is in hand");
        // a goes on while b's 2 is in hand.
        let next = h.take(Duration::ZERO);
        assert_eq!(ids(&next), [3]);
        h.perform(next);
        assert!(
            h.take(Duration::ZERO).is_empty(),
            "3 failed: 4 waits behind it, 2 is in hand"
        );
        assert_eq!(h.offset(), 2);
        h.perform(first.collect());
        assert_eq!(h.offset(), 3, "3 failed: the offset waits for it");
        assert_eq!(ids(&h.take(Duration::ZERO)), [5], "b goes on");
        assert_eq!(h.offset(), 3);
        let retried = h.take(LATER);
        assert_eq!(ids(&retried), [3], "after its backoff, 3 again, not 4");
        h.perform(retried);
        assert_eq!(ids(&h.take(Duration::ZERO)), [4]);
    }

    /// A parked chat's later updates wait (in the store), other chats go
    /// on, and the offset passes the parked and recorded ones; once the
    /// parked update is handled its chat goes on, in order.
    #[test]
    fn a_parked_chat_waits_in_the_store_while_the_others_go_on() {
        let mut h = Harness::new(1);
        h.handler.answer(1, &[Retry, Retry, Retry, Reply]);
        h.poll(&[(1, "a"), (2, "a"), (3, "b")]);
        let work = h.take(Duration::ZERO);
        assert_eq!(ids(&work), [1, 3]);
        h.perform(work);
        assert_eq!(h.offset(), 1, "1 failed once: not parked yet");
        assert!(h.parked().is_empty());
        // The second failure (max_attempts 2) parks it, and 2 behind it.
        let work = h.take(LATER);
        assert_eq!(ids(&work), [1]);
        h.perform(work);
        assert_eq!(h.parked(), [1, 2]);
        assert_eq!(h.offset(), 4, "parked and recorded: passed");
        assert!(h.take(Duration::ZERO).is_empty(), "2 waits behind 1");
        // Later updates of the parked chat go to the store; others run.
        h.poll(&[(4, "a"), (5, "c")]);
        assert_eq!(h.parked(), [1, 2, 4]);
        let work = h.take(Duration::ZERO);
        assert_eq!(ids(&work), [5]);
        h.perform(work);
        assert_eq!(h.offset(), 6);
        assert_eq!(
            h.scheduler.lock().in_flight(),
            0,
            "parked ones hold no room"
        );
        // Parked, it fails again: still parked, its chat still waits.
        let work = h.take(LATER);
        assert_eq!(ids(&work), [1]);
        h.perform(work);
        assert_eq!(h.parked(), [1, 2, 4]);
        assert!(h.take(Duration::ZERO).is_empty());
        // Handled at last: its chat goes on, read back from the store.
        h.settle();
        assert_eq!(h.calls(), [1, 3, 1, 5, 1, 1, 2, 4]);
        assert!(h.parked().is_empty());
        assert_eq!(h.offset(), 6);
        for id in 1..=5 {
            assert!(h.store.is_handled(id).unwrap(), "{id}");
        }
    }

    /// An update that comes for a parked chat goes to the store, and the
    /// offset waits at it until the write is done (here another connection
    /// holds the file's write lock meanwhile).
    #[test]
    fn the_offset_waits_for_a_parked_chats_update_to_be_written() {
        let mut h = Harness::new(1);
        h.handler.answer(1, &[Park]);
        h.poll(&[(1, "a")]);
        h.perform(h.take(Duration::ZERO));
        assert_eq!((h.parked(), h.offset()), (vec![1], 2));
        let blocker = rusqlite::Connection::open(h.dir.path().join("state.db")).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        h.polled.extend([2, 3]);
        let h = &h;
        std::thread::scope(|scope| {
            let polling = scope.spawn(|| {
                let received = vec![Ok(update(2, "a")), Ok(update(3, "b"))];
                h.scheduler.enqueue(received, 2, &h.store).unwrap();
            });
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut state = h.scheduler.lock();
            while !state.spilling.contains(&2) {
                assert!(Instant::now() < deadline, "2 never went to the store");
                state = h.scheduler.wait_timeout(state, Duration::from_millis(100));
            }
            let offset = state.offset();
            drop(state);
            blocker.execute_batch("ROLLBACK").unwrap();
            polling.join().unwrap();
            assert_eq!(offset, 2, "passed 2 before it was written");
        });
        h.check();
        assert_eq!((h.parked(), h.offset()), (vec![1, 2], 3));
    }

    /// Parked and dead ones never block a chat for good; a dead letter is
    /// confirmed, and the chat's next update goes on at once.
    #[test]
    fn a_dead_letter_is_confirmed_and_its_chat_goes_on() {
        let mut h = Harness::new(1);
        h.handler.answer(1, &[Dead]);
        h.poll(&[(1, "a"), (2, "a")]);
        h.perform(h.take(Duration::ZERO));
        assert_eq!(h.offset(), 2);
        assert_eq!(ids(&h.take(Duration::ZERO)), [2]);
    }

    /// `room_to_poll` on a thread of its own: whether it answered within
    /// 100 ms, and its answer once `unblock` has run. A wait that does not
    /// end within 5 s more is ended by stopping the loop: a test fails,
    /// never hangs.
    fn room_to_poll(h: &Harness, unblock: impl FnOnce()) -> (bool, Option<i64>) {
        /// Ends the wait unless it answered (also when a step panics).
        struct EndWait<'a>(&'a Scheduler, std::cell::Cell<bool>);
        impl Drop for EndWait<'_> {
            fn drop(&mut self) {
                if !self.1.get() {
                    self.0.stop_taking_work();
                }
            }
        }
        std::thread::scope(|scope| {
            let (sender, answer) = mpsc::channel();
            scope.spawn(move || {
                let _ = sender.send(h.scheduler.room_to_poll());
            });
            let ending = EndWait(&h.scheduler, std::cell::Cell::new(false));
            // Waiting for something not to happen needs a time.
            let at_once = answer.recv_timeout(Duration::from_millis(100));
            unblock();
            let answer = at_once
                .or_else(|_| answer.recv_timeout(Duration::from_secs(5)))
                .expect("the poller still waits for room");
            ending.1.set(true);
            (at_once.is_ok(), answer)
        })
    }

    /// After a poll that brought nothing new, the poller polls again when
    /// the answer can have changed, and only then (issue 28): with a full
    /// window, once the offset moves; without one, once work ends and a
    /// worker is free (or after REPOLL_INTERVAL while one is free); on a
    /// timer only while nothing in hand can move.
    #[test]
    fn after_a_poll_with_nothing_new_the_poller_waits_for_a_change() {
        let mut h = Harness::new(1);
        let next = |h: &Harness, polled_at: i64, full_window: bool, ended_before: u64| {
            h.scheduler.lock().after_nothing_new(
                polled_at,
                full_window,
                ended_before,
                &h.scheduler.settings,
            )
        };
        // A full window (limit 2), both updates in hand.
        h.poll(&[(1, "a"), (2, "b")]);
        let ended = h.scheduler.lock().ended;
        let work = h.take(Duration::ZERO);
        assert_eq!(ids(&work), [1, 2]);
        assert_eq!(next(&h, 1, true, ended), Next::WaitForChange);
        let mut work = work.into_iter();
        let (first, second) = (work.next(), work.next());
        // 2 ends: the platform would answer the same.
        h.perform(second.into_iter().collect());
        assert_eq!(next(&h, 1, true, ended), Next::WaitForChange);
        // 1 ends: the offset moved, the workers are free.
        h.perform(first.into_iter().collect());
        assert_eq!(h.offset(), 3);
        assert_eq!(next(&h, 1, true, ended), Next::Poll);
        // Every update it brought ended while the poll was on its way.
        assert_eq!(next(&h, 1, false, ended), Next::Poll);
        // Only unusable updates came back: nothing in hand can change it.
        let ended = h.scheduler.lock().ended;
        assert_eq!(next(&h, 3, true, ended), Next::WaitAtMostRepoll);
        // Not a full window, and the one worker busy: only its end counts.
        h.poll(&[(3, "c")]);
        let ended = h.scheduler.lock().ended;
        assert_eq!(
            next(&h, 3, false, ended),
            Next::WaitAtMostRepoll,
            "a worker is free"
        );
        let work = h.take(Duration::ZERO);
        assert_eq!(next(&h, 3, false, ended), Next::WaitForChange);
        h.handler.answer(3, &[Retry]);
        h.perform(work);
        assert_eq!(h.offset(), 3, "3 failed and waits for its retry");
        assert_eq!(next(&h, 3, false, ended), Next::Poll, "work ended");
        // A full window of one failed update: nothing to poll for.
        let ended = h.scheduler.lock().ended;
        assert_eq!(next(&h, 3, true, ended), Next::WaitForChange);
    }

    /// The poller polls only while fewer than the bound of updates are in
    /// flight (parked ones do not count), and not once polling is over.
    #[test]
    fn the_poller_waits_for_room_below_the_in_flight_bound() {
        let mut h = Harness::new(1);
        assert_eq!(h.scheduler.settings.max_in_flight(), 4);
        h.handler.answer(1, &[Park]);
        h.poll(&[(1, "a"), (2, "a"), (3, "a")]);
        assert_eq!(room_to_poll(&h, || {}), (true, Some(1)), "3 in flight");
        h.poll(&[(4, "b")]);
        let work = h.take(Duration::ZERO);
        assert_eq!(ids(&work), [1, 4]);
        let mut work = work.into_iter();
        let (first, fourth) = (work.next(), work.next());
        let (at_once, room) = room_to_poll(&h, || h.perform(fourth.into_iter().collect()));
        assert!(!at_once, "polled with 4 in flight");
        assert_eq!(room, Some(1), "one finished: room; 1 is in hand");
        // 1 is parked, and 2 and 3 behind it: they hold no room.
        h.perform(first.into_iter().collect());
        h.poll(&[(5, "c"), (6, "d"), (7, "e")]);
        assert_eq!(room_to_poll(&h, || {}), (true, Some(5)), "3 in flight");
        h.poll(&[(8, "f")]);
        let (at_once, room) = room_to_poll(&h, || h.scheduler.stop_taking_work());
        assert!(!at_once, "polled with 4 in flight");
        assert_eq!(room, None, "polling is over");
    }

    /// A worker whose lease is no longer current handles nothing: the
    /// update stays unfinished (another poller may have it) and the loop
    /// stops taking work.
    #[test]
    fn without_the_lease_nothing_is_handled() {
        let (lease, _watch) = PollingLease::expiring(Duration::ZERO, Instant::now(), || {});
        let mut h = Harness::with_lease(1, lease);
        h.poll(&[(1, "a")]);
        h.perform(h.take(Duration::ZERO));
        assert!(h.calls().is_empty());
        assert_eq!(h.offset(), 1);
        assert!(h.scheduler.lost.load(Ordering::SeqCst));
        assert!(h.scheduler.next_update().is_none());
    }

    /// Real workers on threads: two chats are handled at the same time
    /// (chat a's update waits until chat b's has been handled), and no
    /// chat ever has two updates in a handler at once.
    #[test]
    fn workers_run_chats_in_parallel_and_each_chat_alone() {
        struct Gate {
            in_handler: Mutex<HashMap<String, usize>>,
            done: Mutex<Vec<i64>>,
            changed: Condvar,
        }
        impl Handler for Gate {
            fn handle(&self, update: &Update, _steps: &mut Steps) -> Result<Outcome, HandleError> {
                let chat = chat_label(update);
                {
                    let mut busy = lock(&self.in_handler);
                    let count = busy.entry(chat.clone()).or_default();
                    *count += 1;
                    assert_eq!(*count, 1, "two updates of {chat} at once");
                }
                if update.update_id == 1 {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let mut done = lock(&self.done);
                    while !done.contains(&2) {
                        let left = deadline.saturating_duration_since(Instant::now());
                        assert!(!left.is_zero(), "chat b waited for chat a");
                        done = self.changed.wait_timeout(done, left).unwrap().0;
                    }
                }
                *lock(&self.in_handler).get_mut(&chat).unwrap() -= 1;
                lock(&self.done).push(update.update_id);
                self.changed.notify_all();
                Ok(Outcome::Replied)
            }
        }
        let mut h = Harness::new(1);
        h.poll(&[(1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, "a"), (6, "b")]);
        let gate = Gate {
            in_handler: Mutex::new(HashMap::new()),
            done: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        };
        let h = &h;
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| h.scheduler.work(&gate, &h.store, &h.lease));
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut state = h.scheduler.lock();
            while state.offset() < 7 {
                assert!(Instant::now() < deadline, "not all handled");
                state = h.scheduler.wait_timeout(state, Duration::from_millis(100));
            }
            drop(state);
            h.scheduler.stop_taking_work();
        });
        let done = lock(&gate.done).clone();
        let of = |chat: &[i64]| -> Vec<i64> {
            done.iter()
                .copied()
                .filter(|id| chat.contains(id))
                .collect()
        };
        assert_eq!(of(&[1, 3, 5]), [1, 3, 5], "chat a in order");
        assert_eq!(of(&[2, 4, 6]), [2, 4, 6], "chat b in order");
        assert!(
            done.iter().position(|&id| id == 2) < done.iter().position(|&id| id == 1),
            "{done:?}"
        );
    }
}
