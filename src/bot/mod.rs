//! What a bot does with an update, independent of how the update arrived
//! (long poll in `poll-echo`/`forward`, HTTP in `serve-webhook`).
//!
//! A [`Handler`] answers one update; the [`poll_loop`] feeds it from the
//! platform with the offset and handled ids kept in the state store.

pub mod answer;
pub mod child_io;
pub mod echo;
pub mod exec;
pub mod forward;
pub mod poll_loop;
pub mod worker;

use crate::api::{ApiClient, ApiError, SendRequest, Update};
pub use crate::observe::Outcome;
use crate::observe::{Source, Step, Steps, UpdateRecord, capped, capturing};
use fly_state::Letters;

/// Why an update could not be handled now.
#[derive(Debug)]
pub enum HandleError {
    /// Try this update again later (platform unavailable, download cut, …).
    Retry(anyhow::Error),
    /// Stop the service: retrying any update would fail the same way (a
    /// refused token, an `--exec` handler that cannot run). The update is
    /// not handled, so the run after the fix gets it again.
    Fatal(anyhow::Error),
    /// This update failed in a way that retrying soon cannot fix (the
    /// platform refused its reply with a 4xx, its media URL is gone): it is
    /// parked at once (recorded, retried with a long backoff, its chat
    /// waiting behind it) rather than retried in a tight loop. The webhook
    /// receiver, which cannot retry by itself, records it as a dead letter.
    Park(anyhow::Error),
    /// This update can never be handled (a message with no chat to answer):
    /// record it as a dead letter with this reason and confirm it, so it
    /// never blocks the updates after it.
    DeadLetter(String),
}

impl HandleError {
    /// Sorts an API failure: a refused token or a base URL whose server
    /// speaks plain HTTP stops the service, a stop request or an
    /// unavailable platform means "later", a rejection parks the update.
    pub fn from_api(error: ApiError) -> Result<Outcome, HandleError> {
        match error {
            ApiError::TokenRefused { .. } | ApiError::PlainHttp(_) => {
                Err(HandleError::Fatal(error.into()))
            }
            ApiError::Rejected { .. } => Err(HandleError::Park(
                anyhow::Error::from(error).context("the platform refused the reply"),
            )),
            ApiError::Unavailable { .. } | ApiError::BadResponse { .. } | ApiError::Cancelled => {
                Err(HandleError::Retry(error.into()))
            }
        }
    }
}

/// Answers one update. Called from several threads at once (for different chats).
pub trait Handler: Send + Sync {
    /// Answers `update`, timing its steps (the handler, the reply, …) in
    /// `steps`, the update's record: the step running when it fails names
    /// the failure.
    fn handle(&self, update: &Update, steps: &mut Steps) -> Result<Outcome, HandleError>;

    /// Handling `update` needs no I/O and starts no process (there is
    /// nothing to answer), so it cannot block and has no side effect: the
    /// webhook receiver then handles it on its I/O thread rather than pay
    /// the worker pool's two thread wake-ups, which cost more than the work.
    fn is_instant(&self, _update: &Update) -> bool {
        false
    }

    /// fly is exiting and will not wait for handlers still running: end them
    /// now (failing their updates, so they are delivered again) and start no
    /// more. Only handlers that can hang for long need to do anything.
    fn abandon(&self) {}

    /// fly is done with the handler (every update in hand has finished or
    /// been abandoned): end whatever it keeps running (`--exec-worker`'s
    /// workers). Called once, at the end of every run.
    fn close(&self) {}
}

/// Sends `request` as the reply step of an update: timed, noted for the
/// inspector (the request and the platform's answer), its failure sorted
/// by [`HandleError::from_api`]. The echo and the handlers' replies share it.
pub fn send_reply_step(
    client: &ApiClient,
    request: &SendRequest,
    steps: &mut Steps,
    done: Outcome,
) -> Result<Outcome, HandleError> {
    let sent = steps.time(Step::Reply, || client.send(request));
    steps.note(|capture| {
        capture.request = Some(capped(&request.to_json()));
        capture.answer = Some(match &sent {
            Ok(answer) => capped(answer),
            Err(error) => format!("{error:#}"),
        });
    });
    match sent {
        Ok(_) => Ok(done),
        Err(error) => HandleError::from_api(error),
    }
}

/// Records an update that can never be handled and marks it handled, so it
/// is confirmed and never blocks its chat. The poll loop and the webhook receiver share it.
pub fn record_dead_letter(
    store: &dyn Letters,
    update: &Update,
    reason: &str,
) -> anyhow::Result<()> {
    let update_id = update.update_id;
    if store.record_dead_letter(Some(update_id), &update.raw, reason)? {
        tracing::warn!(
            update_id,
            chat = %chat_label(update),
            "update recorded as a dead letter (see fly dead-letters): {reason}"
        );
    }
    store.mark_handled(update_id, "dead_letter")
}

/// A record of `update`'s attempt number `attempt` (see [`UpdateRecord`]).
pub fn record_of(source: Source, update: &Update, attempt: u32) -> UpdateRecord {
    let mut record = UpdateRecord::new(source, update.received);
    describe(&mut record, update);
    record.attempt = attempt;
    record
}

/// Fills in which update `record` is about.
pub fn describe(record: &mut UpdateRecord, update: &Update) {
    if capturing() && record.raw.is_none() {
        record.raw = Some(std::sync::Arc::from(update.raw.as_str()));
    }
    record.update_id = Some(update.update_id);
    record.chat = chat_label(update);
    record.kind.clone_from(&update.kind);
    record.msg_type = update
        .message
        .as_ref()
        .map_or_else(String::new, |message| message.msg_type.clone());
}

/// `chat_type:chat_id` for log lines, or `-` for updates without a chat.
pub fn chat_label(update: &Update) -> String {
    match update
        .message
        .as_ref()
        .and_then(|message| message.chat.as_ref())
    {
        Some(chat) => format!("{}:{}", chat.kind, chat.id),
        None => "-".to_string(),
    }
}
