//! What a bot does with an update, independent of how the update arrived
//! (long poll in `poll-echo`/`forward`, HTTP in `serve-webhook`).
//!
//! A [`Handler`] answers one update; the [`poll_loop`] feeds it from the
//! platform with the offset and handled ids kept in the state store.

pub mod child_io;
pub mod echo;
pub mod exec;
pub mod forward;
pub mod poll_loop;
pub mod worker;

use crate::api::{ApiClient, ApiError, SendRequest, Update};
use crate::observe::{Step, Steps, capped};
use fly_state::Letters;

/// How an update ended when it needs no more work. Logged, and stored with
/// the update id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A reply was accepted by the platform.
    Replied,
    /// Media downloaded and the message forwarded back.
    Forwarded,
    /// An `--exec` handler succeeded without a reply.
    Handled,
    /// Signed and delivered to a webhook receiver (`fly forward`).
    Delivered,
    /// Nothing to answer (a non-message update, a message without a chat, …).
    Ignored,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Replied => "replied",
            Outcome::Forwarded => "forwarded",
            Outcome::Handled => "handled",
            Outcome::Delivered => "delivered",
            Outcome::Ignored => "ignored",
        }
    }
}

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
    /// Sorts an API failure: a refused token stops the service, a stop
    /// request or an unavailable platform means "later", a rejection parks
    /// the update.
    pub fn from_api(error: ApiError) -> Result<Outcome, HandleError> {
        match error {
            ApiError::TokenRefused { .. } => Err(HandleError::Fatal(error.into())),
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
