//! The long-poll loop shared by `poll-echo` and `forward`: poll, hand each
//! update to a [`Handler`], remember what was handled, move the offset.
//!
//! At-least-once, never lost: the offset only moves past an update once it is
//! handled, and handled ids are stored so an update delivered again (after a
//! crash between the reply and the offset) is not answered twice. Updates of
//! one chat are handled in order; different chats run concurrently on a
//! bounded number of threads.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::bail;

use super::{HandleError, Handler, Outcome, chat_label, record_dead_letter};
use crate::api::retry::RetryPolicy;
use crate::api::{ApiClient, ApiError, Received, Update};
use crate::shutdown::Shutdown;
use crate::state::Store;
use crate::sync::lock;

/// How often a waiting loop checks whether a stop was requested.
const STOP_CHECK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct PollSettings {
    pub limit: u32,
    pub poll_timeout: Duration,
    /// Chats handled at the same time.
    pub concurrency: usize,
    /// Stop after this many handled updates.
    pub max_updates: Option<u64>,
    /// One poll with timeout 0, then stop.
    pub once: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub handled: u64,
}

/// Runs until stopped, `max_updates` is reached, or (with `once`) after one
/// poll. Returns an error for a refused token, a handler that cannot run at
/// all (any [`HandleError::Fatal`]: its update stays unconfirmed) or a store
/// that cannot be written.
pub fn run(
    client: &ApiClient,
    store: &dyn Store,
    handler: &dyn Handler,
    settings: &PollSettings,
    shutdown: &Shutdown,
) -> anyhow::Result<Summary> {
    store.claim_polling()?;
    let mut offset = store.next_offset()?;
    let handled = AtomicU64::new(0);
    let mut failed_rounds = 0u32;
    tracing::info!(offset, state = %store.location(), "polling for updates");

    while !shutdown.is_requested() && !limit_reached(&handled, settings) {
        let timeout = if settings.once {
            Duration::ZERO
        } else {
            settings.poll_timeout
        };
        let received = match poll(client, offset, settings.limit, timeout, shutdown)? {
            Polled::Updates(updates) => updates,
            Polled::Stopped => break,
            Polled::Garbled => {
                failed_rounds += 1;
                shutdown.sleep(RetryPolicy::FOREVER.next_delay(failed_rounds, None));
                continue;
            }
        };
        let batch = Batch::read(received, offset, store)?;
        let result = handle_batch(&batch.pending, handler, store, settings, &handled, shutdown);
        let next_offset = result.first_unfinished.unwrap_or(batch.past_last);
        if next_offset > offset {
            store.advance_offset(next_offset)?;
            offset = next_offset;
        }
        if let Some(fatal) = result.fatal {
            return Err(fatal);
        }
        let unfinished = result.first_unfinished.is_some() && !limit_reached(&handled, settings);
        if settings.once {
            if unfinished && !shutdown.is_requested() {
                bail!("some updates could not be handled; they are retried on the next run");
            }
            break;
        }
        // A poll that brings back only updates without a usable id cannot
        // move the offset past them: the next poll would bring them at once.
        let stuck_on_unusable = batch.unusable_seen && next_offset == offset;
        if unfinished || stuck_on_unusable {
            // Something failed (the platform is down, a download broke): wait
            // before the next try instead of spinning on the same update.
            failed_rounds += 1;
            shutdown.sleep(RetryPolicy::FOREVER.next_delay(failed_rounds, None));
        } else {
            failed_rounds = 0;
        }
    }
    Ok(Summary {
        handled: handled.load(Ordering::SeqCst),
    })
}

fn limit_reached(handled: &AtomicU64, settings: &PollSettings) -> bool {
    settings
        .max_updates
        .is_some_and(|max| handled.load(Ordering::SeqCst) >= max)
}

enum Polled {
    Updates(Vec<Received>),
    /// A stop was requested while the poll was in flight.
    Stopped,
    /// The platform answered something that is not an update list.
    Garbled,
}

/// One long poll, on its own thread so that a stop request does not have to
/// wait for an idle poll to time out: the abandoned poll holds no state (the
/// offset it confirms is already persisted) and dies with the process.
fn poll(
    client: &ApiClient,
    offset: i64,
    limit: u32,
    timeout: Duration,
    shutdown: &Shutdown,
) -> anyhow::Result<Polled> {
    let (sender, receiver) = mpsc::channel();
    let poller = client.clone();
    std::thread::spawn(move || {
        let _ = sender.send(poller.get_updates(offset, limit, timeout));
    });
    let result = loop {
        match receiver.recv_timeout(STOP_CHECK) {
            Ok(result) => break result,
            Err(RecvTimeoutError::Timeout) if shutdown.is_requested() => {
                return Ok(Polled::Stopped);
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => bail!("the polling thread died"),
        }
    };
    match result {
        Ok(updates) => Ok(Polled::Updates(updates)),
        Err(ApiError::Cancelled) => Ok(Polled::Stopped),
        Err(error @ ApiError::BadResponse { .. }) => {
            tracing::error!("{error}");
            Ok(Polled::Garbled)
        }
        Err(error) => Err(error.into()),
    }
}

/// The updates of one poll that still need work.
struct Batch {
    /// Unhandled updates, ascending by id.
    pending: Vec<Update>,
    /// One past the highest id seen: the offset once everything is handled.
    past_last: i64,
    /// The poll brought updates without a usable id (recorded as dead letters).
    unusable_seen: bool,
}

impl Batch {
    fn read(received: Vec<Received>, offset: i64, store: &dyn Store) -> anyhow::Result<Batch> {
        let mut past_last = offset;
        let mut pending = Vec::new();
        let mut unusable_seen = false;
        for update in received {
            let update = match update {
                Ok(update) => update,
                Err(unusable) => {
                    // No id, so nothing to confirm it by: recorded once (by
                    // its bytes), and the updates after it go on.
                    unusable_seen = true;
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
            past_last = past_last.max(update.update_id.saturating_add(1));
            if store.is_handled(update.update_id)? {
                tracing::debug!(
                    update_id = update.update_id,
                    "already handled; not answered again"
                );
                continue;
            }
            pending.push(update);
        }
        pending.sort_by_key(|update| update.update_id);
        pending.dedup_by_key(|update| update.update_id);
        Ok(Batch {
            pending,
            past_last,
            unusable_seen,
        })
    }
}

#[derive(Default)]
struct BatchResult {
    /// The lowest id that is not handled yet; the offset must stay at or below it.
    first_unfinished: Option<i64>,
    fatal: Option<anyhow::Error>,
}

/// Handles a batch: one queue per chat, in order, `concurrency` chats at a time.
fn handle_batch(
    updates: &[Update],
    handler: &dyn Handler,
    store: &dyn Store,
    settings: &PollSettings,
    handled: &AtomicU64,
    shutdown: &Shutdown,
) -> BatchResult {
    let queue = Mutex::new(group_by_chat(updates));
    let result = Mutex::new(BatchResult::default());
    let workers = settings.concurrency.max(1).min(queue_len(&queue));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                // The queue's lock is released before the chat is handled
                // (a `while let` would hold it for the whole loop body).
                loop {
                    let next = lock(&queue).pop_front();
                    let Some(chat_updates) = next else { break };
                    let stopped_at = handle_chat(
                        &chat_updates,
                        handler,
                        store,
                        settings,
                        handled,
                        shutdown,
                        &result,
                    );
                    if let Some(update_id) = stopped_at {
                        let mut result = lock(&result);
                        result.first_unfinished = Some(
                            result
                                .first_unfinished
                                .map_or(update_id, |first| first.min(update_id)),
                        );
                    }
                }
            });
        }
    });
    result
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Handles one chat's updates in order. Returns the id it stopped at, if it
/// did not get through them all.
fn handle_chat(
    updates: &[&Update],
    handler: &dyn Handler,
    store: &dyn Store,
    settings: &PollSettings,
    handled: &AtomicU64,
    shutdown: &Shutdown,
    result: &Mutex<BatchResult>,
) -> Option<i64> {
    for update in updates {
        let update_id = update.update_id;
        if shutdown.is_requested() || lock(result).fatal.is_some() {
            return Some(update_id);
        }
        // Claim a slot under --max-updates before starting, so that
        // concurrent chats never handle more than asked.
        let claimed = handled.fetch_add(1, Ordering::SeqCst);
        if settings.max_updates.is_some_and(|max| claimed >= max) {
            handled.fetch_sub(1, Ordering::SeqCst);
            return Some(update_id);
        }
        let started = Instant::now();
        let outcome = handler.handle(update);
        let latency_ms = started.elapsed().as_millis() as u64;
        let chat = chat_label(update);
        match outcome {
            Ok(outcome) => {
                if let Err(error) = store.mark_handled(update_id, outcome.as_str()) {
                    lock(result).fatal = Some(error);
                    return Some(update_id);
                }
                log_handled(update, &chat, outcome, latency_ms);
            }
            Err(HandleError::Retry(error)) => {
                handled.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(
                    update_id,
                    chat,
                    latency_ms,
                    "update not handled, will retry: {error:#}"
                );
                return Some(update_id);
            }
            Err(HandleError::Fatal(error)) => {
                handled.fetch_sub(1, Ordering::SeqCst);
                lock(result).fatal = Some(error);
                return Some(update_id);
            }
            Err(HandleError::DeadLetter(reason)) => {
                if let Err(error) = record_dead_letter(store, update, &reason) {
                    lock(result).fatal = Some(error);
                    return Some(update_id);
                }
            }
        }
    }
    None
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

/// One queue per chat, in order of first appearance; updates without a chat
/// (callbacks, …) share one queue.
fn group_by_chat(updates: &[Update]) -> VecDeque<Vec<&Update>> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<Vec<&Update>> = Vec::new();
    for update in updates {
        let key = chat_label(update);
        let slot = *index.entry(key).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[slot].push(update);
    }
    groups.into()
}

fn queue_len<T>(queue: &Mutex<VecDeque<T>>) -> usize {
    lock(queue).len()
}
