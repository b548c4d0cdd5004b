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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::anyhow;

use super::{HandleError, Handler, Outcome, chat_label, record_dead_letter};
use crate::api::{ApiClient, ApiError, Received, Update};
use crate::retry::RetryPolicy;
use crate::shutdown::{Shutdown, Stage};
use crate::state::{PollingLease, Store, is_lease_lost, is_unavailable};
use crate::sync::lock;

/// An update whose handled mark could not reach the store (an outage) is
/// tried again after about this long; the store logs the outage once.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// While updates are in flight the platform answers a poll at once (they are
/// unconfirmed), so a poll that brought nothing new waits this long (or until
/// an update finishes) before the next one, as the examples' bot does.
const REPOLL_INTERVAL: Duration = Duration::from_millis(200);

/// The first wait before a parked update is tried again; it doubles up to
/// `PollSettings::park_retry_max` (5 minutes unless told otherwise).
const PARKED_FIRST_RETRY: Duration = Duration::from_secs(10);

/// Between two polls that do not wait (`--poll-timeout 0`) and found nothing.
const SHORT_POLL_INTERVAL: Duration = Duration::from_secs(1);

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
    store: Arc<dyn Store>,
    handler: Arc<dyn Handler>,
    settings: &PollSettings,
    shutdown: &Shutdown,
) -> anyhow::Result<Summary> {
    let standby = (!settings.once).then_some(shutdown);
    let mut total = Summary::default();
    loop {
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

/// One stretch of polling under `lease`; returns what it handled and
/// whether it ended because the lease was lost.
fn run_holding(
    client: &ApiClient,
    store: &Arc<dyn Store>,
    handler: &Arc<dyn Handler>,
    settings: &PollSettings,
    shutdown: &Shutdown,
    lease: &PollingLease,
) -> anyhow::Result<(Summary, bool)> {
    let offset = store.next_offset()?;
    tracing::info!(offset, state = %store.location(), "polling for updates");
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
        .map_err(|error| anyhow!("starting the poll thread: {error}"))?;

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
            Ok(()) => {}
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
    /// One past the highest id seen: the offset once nothing is unfinished.
    past_last: i64,
    busy_workers: usize,
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
}

impl Queues {
    /// What the next poll confirms with: every update below it is handled.
    fn offset(&self) -> i64 {
        self.unfinished
            .iter()
            .find(|id| !self.parked.contains(id))
            .copied()
            .unwrap_or(self.past_last)
    }

    /// Updates queued or being handled that hold the offset back.
    fn in_flight(&self) -> usize {
        self.unfinished.len() - self.parked.len()
    }

    fn is_idle(&self) -> bool {
        self.busy_workers == 0
    }
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
    fn notify(&self, _state: &mut Queues) {
        self.changed.notify_all();
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
            }
            state = self.wait(state);
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
        store: &dyn Store,
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
                    }
                    continue;
                }
            };
            // The platform only returns ids at or above the offset; anything
            // below was confirmed already.
            if update.update_id < offset {
                continue;
            }
            let known = self.lock().unfinished.contains(&update.update_id);
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
        let mut behind_parked = Vec::new();
        for update in fresh {
            let update_id = update.update_id;
            state.past_last = state.past_last.max(update_id.saturating_add(1));
            if !state.unfinished.insert(update_id) {
                continue;
            }
            let chat = chat_label(&update);
            let queue = state.chats.entry(chat.clone()).or_default();
            if queue.blocked {
                behind_parked.push((update.clone(), queue.updates.front().map(|f| f.update_id)));
            }
            queue.updates.push_back(update);
            let startable = queue.updates.len() == 1 && !queue.busy && queue.retry_at.is_none();
            if startable {
                state.ready.insert((update_id, chat));
            }
        }
        self.notify(&mut state);
        drop(state);
        self.park_waiting(store, behind_parked)?;
        Ok(count)
    }

    /// Records updates that wait behind a parked one of their chat as parked
    /// too (outside the lock: a store write), then lets the offset pass them.
    fn park_waiting(
        &self,
        store: &dyn Store,
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
    /// (in id order, ahead of anything polled) and tried at once.
    fn load_parked(&self, store: &dyn Store) -> anyhow::Result<usize> {
        let mut loaded = Vec::new();
        for letter in store.dead_letters()? {
            let Some(update_id) = letter.update_id.filter(|_| letter.parked) else {
                continue;
            };
            let read = crate::signature::parse(&letter.raw)
                .map_err(|error| anyhow!("{error}"))
                .and_then(|parsed| {
                    Update::read(&parsed, &letter.raw).map_err(|e| anyhow!(e.reason))
                });
            match read {
                Ok(update) if update.update_id == update_id => loaded.push(update),
                Ok(_) | Err(_) => {
                    tracing::warn!(
                        update_id,
                        "a parked update could not be read back; left in the store"
                    );
                }
            }
        }
        loaded.sort_by_key(|update| update.update_id);
        let mut state = self.lock();
        let count = loaded.len();
        for update in loaded {
            let update_id = update.update_id;
            if !state.unfinished.insert(update_id) {
                continue;
            }
            state.parked.insert(update_id);
            let chat = chat_label(&update);
            let queue = state.chats.entry(chat.clone()).or_default();
            queue.updates.push_back(update);
            if queue.updates.len() == 1 {
                state.ready.insert((update_id, chat));
            }
        }
        self.notify(&mut state);
        Ok(count)
    }

    /// A worker: takes the next ready chat's front update, handles it,
    /// records the outcome; until the loop stops.
    fn work(&self, handler: &dyn Handler, store: &dyn Store, lease: &PollingLease) {
        while let Some((chat, update)) = self.next_update() {
            if !lease.is_current() {
                // Not renewed for the lease time: another poller may have
                // this update by now.
                self.finish(&chat, update.update_id, Done::Failed);
                self.lease_lost();
                continue;
            }
            let started = Instant::now();
            let outcome = handler.handle(&update);
            let latency_ms = started.elapsed().as_millis() as u64;
            let was_parked = self.lock().parked.contains(&update.update_id);
            let recorded = match outcome {
                Ok(outcome) => store
                    .mark_handled(update.update_id, outcome.as_str())
                    .and_then(|()| unpark(store, &update, was_parked))
                    .map(|()| {
                        log_handled(&update, &chat, outcome, latency_ms);
                        Done::Finished
                    }),
                Err(HandleError::DeadLetter(reason)) => {
                    // A parked record of it makes way for the dead letter.
                    unpark(store, &update, was_parked)
                        .and_then(|()| record_dead_letter(store, &update, &reason))
                        .map(|()| Done::DeadLetter)
                }
                Err(HandleError::Retry(error)) => {
                    self.failed(store, &chat, &update, &error, false, latency_ms)
                }
                Err(HandleError::Park(error)) => {
                    self.failed(store, &chat, &update, &error, true, latency_ms)
                }
                Err(HandleError::Fatal(error)) => Err(error),
            };
            match recorded {
                Ok(done) => self.finish(&chat, update.update_id, done),
                // Not marked: tried again once the store answers (a repeat
                // of the reply is absorbed by its client_msg_id).
                Err(error) if is_unavailable(&error) => {
                    tracing::debug!(update_id = update.update_id, "not recorded: {error:#}");
                    self.finish(&chat, update.update_id, Done::Deferred);
                }
                Err(error) => {
                    self.finish(&chat, update.update_id, Done::Failed);
                    self.fail(error);
                }
            }
        }
    }

    /// An attempt of the front update of `chat` failed: retried after a
    /// backoff, or parked (recorded) once it has failed `--max-attempts`
    /// times, failed for good, or was parked already; the updates queued
    /// behind it are then parked too.
    fn failed(
        &self,
        store: &dyn Store,
        chat: &str,
        update: &Update,
        error: &anyhow::Error,
        for_good: bool,
        latency_ms: u64,
    ) -> anyhow::Result<Done> {
        let update_id = update.update_id;
        let (attempts, was_parked) = {
            let state = self.lock();
            let failures = state.chats.get(chat).map_or(0, |queue| queue.failures);
            (failures + 1, state.parked.contains(&update_id))
        };
        let park = for_good || was_parked || attempts >= self.settings.max_attempts.max(1);
        if !park || (self.settings.once && !for_good && !was_parked) {
            tracing::warn!(
                update_id,
                chat,
                latency_ms,
                attempts,
                "update not handled, will retry: {error:#}"
            );
            return Ok(Done::Failed);
        }
        store.park(update_id, &update.raw, &format!("{error:#}"))?;
        if was_parked {
            tracing::warn!(
                update_id,
                chat,
                attempts,
                "parked update failed again: {error:#}"
            );
        } else {
            tracing::warn!(
                update_id,
                chat,
                attempts,
                "update parked (see fly dead-letters): {error:#}; \
                 later updates of its chat wait behind it, other chats go on"
            );
        }
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
        Ok(Done::Parked)
    }

    /// Waits for an update that can start now: `None` once the loop stops.
    fn next_update(&self) -> Option<(String, Update)> {
        let mut state = self.lock();
        loop {
            let at_limit = self
                .settings
                .max_updates
                .is_some_and(|max| state.claimed >= max);
            if state.stopping {
                return None;
            }
            if !at_limit && let Some((_, chat)) = state.ready.pop_first() {
                let queue = state.chats.get_mut(&chat)?;
                queue.busy = true;
                let update = queue.updates.front()?.clone();
                state.busy_workers += 1;
                state.claimed += 1;
                return Some((chat, update));
            }
            // Chats waiting out a retry backoff become ready when it ends.
            let now = Instant::now();
            let mut next_retry: Option<Instant> = None;
            let mut due = Vec::new();
            for (name, queue) in &mut state.chats {
                match queue.retry_at {
                    Some(at) if at <= now => {
                        queue.retry_at = None;
                        if let Some(front) = queue.updates.front() {
                            due.push((front.update_id, name.clone()));
                        }
                    }
                    Some(at) => next_retry = Some(next_retry.map_or(at, |next| next.min(at))),
                    None => {}
                }
            }
            if !due.is_empty() {
                state.ready.extend(due);
                continue;
            }
            state = match next_retry {
                Some(at) => self.wait_timeout(state, at.saturating_duration_since(now)),
                None => self.wait(state),
            };
        }
    }

    /// Records how the front update of `chat` ended.
    fn finish(&self, chat: &str, update_id: i64, done: Done) {
        let mut state = self.lock();
        state.busy_workers -= 1;
        let once = self.settings.once;
        let Queues {
            chats,
            ready,
            unfinished,
            parked,
            handled,
            dead_letters,
            claimed,
            failed,
            ..
        } = &mut *state;
        if let Some(queue) = chats.get_mut(chat) {
            queue.busy = false;
            match done {
                Done::Finished | Done::DeadLetter => {
                    queue.updates.pop_front();
                    unfinished.remove(&update_id);
                    parked.remove(&update_id);
                    queue.blocked = false;
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
                        None => {
                            chats.remove(chat);
                        }
                    }
                }
                Done::Deferred => {
                    *claimed -= 1;
                    let jitter = STORE_RETRY.mul_f64(crate::random::unit());
                    queue.retry_at = Some(Instant::now() + STORE_RETRY + jitter);
                }
                Done::Failed | Done::Parked => {
                    *claimed -= 1;
                    queue.failures += 1;
                    if done == Done::Parked {
                        parked.insert(update_id);
                        queue.blocked = true;
                    }
                    if once {
                        // Left for the next run: this chat stops here.
                        *failed = done == Done::Failed;
                        queue.left_for_next_run = true;
                    } else {
                        let policy = if done == Done::Parked {
                            RetryPolicy {
                                max_attempts: None,
                                initial_delay: PARKED_FIRST_RETRY.min(self.settings.park_retry_max),
                                max_delay: self.settings.park_retry_max,
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

/// Forgets the parked record of `update` (handled at last, or dead now).
fn unpark(store: &dyn Store, update: &Update, was_parked: bool) -> anyhow::Result<()> {
    if was_parked && store.unpark(update.update_id)? {
        tracing::info!(
            update_id = update.update_id,
            "parked update handled at last"
        );
    }
    Ok(())
}

/// The poll thread: polls whenever there is room, hands what came to the
/// scheduler, and keeps the stored offset at the lowest unfinished update.
struct Poller {
    client: ApiClient,
    store: Arc<dyn Store>,
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
            let offset = {
                let mut state = self.scheduler.lock();
                while !state.polling_over && state.in_flight() >= self.settings.max_in_flight() {
                    state = self.scheduler.wait(state);
                }
                if state.polling_over {
                    return Ok(());
                }
                state.offset()
            };
            if offset > stored_offset {
                match self.store.advance_offset(offset) {
                    Ok(()) => stored_offset = offset,
                    // No poll while the offset cannot be saved: the store
                    // logs the outage; this waits for it with backoff.
                    Err(error) if is_unavailable(&error) => {
                        store_failures += 1;
                        self.pause(RetryPolicy::FOREVER.next_delay(store_failures, None), None);
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
            let received = match self
                .client
                .get_updates(offset, self.settings.limit, timeout)
            {
                Ok(received) => received,
                Err(ApiError::Cancelled) => return Ok(()),
                Err(error @ ApiError::BadResponse { .. }) => {
                    tracing::error!("{error}");
                    failed_rounds += 1;
                    self.pause(RetryPolicy::FOREVER.next_delay(failed_rounds, None), None);
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            failed_rounds = 0;
            let had_updates = !received.is_empty();
            let fresh = match self
                .scheduler
                .enqueue(received, offset, self.store.as_ref())
            {
                Ok(fresh) => fresh,
                // What came is not queued; being unconfirmed, it comes
                // again with the next poll once the store answers.
                Err(error) if is_unavailable(&error) => {
                    store_failures += 1;
                    self.pause(RetryPolicy::FOREVER.next_delay(store_failures, None), None);
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
                self.pause(SHORT_POLL_INTERVAL, None);
            } else if fresh == 0 && had_updates {
                // Only unfinished (or unusable) updates came back: the
                // platform answers at once while they are unconfirmed.
                let in_flight = !self.scheduler.lock().unfinished.is_empty();
                if in_flight {
                    self.pause(REPOLL_INTERVAL, Some(offset));
                } else {
                    self.pause(RetryPolicy::FOREVER.next_delay(1, None), None);
                }
            }
        }
    }

    /// Waits `duration`, or less if the loop ends or, given the offset of
    /// the last poll, once the queue runs low behind a moved offset (new
    /// updates can then come into the platform's window).
    fn pause(&self, duration: Duration, polled_at: Option<i64>) {
        let deadline = Instant::now() + duration;
        let low_water = self.settings.max_in_flight() / 4;
        let mut state = self.scheduler.lock();
        loop {
            let now = Instant::now();
            let refill = polled_at
                .is_some_and(|offset| state.offset() != offset && state.in_flight() <= low_water);
            if state.polling_over || refill || now >= deadline {
                return;
            }
            state = self.scheduler.wait_timeout(state, deadline - now);
        }
    }
}

fn log_handled(update: &Update, chat: &str, outcome: Outcome, latency_ms: u64) {
    let msg_type = update
        .message
        .as_ref()
        .map_or("", |message| message.msg_type.as_str());
    tracing::info!(
        update_id = update.update_id,
        chat = %chat,
        kind = %update.kind,
        msg_type = %msg_type,
        outcome = %outcome.as_str(),
        latency_ms,
        "update handled"
    );
}
