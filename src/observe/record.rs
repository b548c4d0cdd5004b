//! The one record of what happened to an update: where it came from, which
//! update and chat it is, the signature verdict (webhooks), how it ended,
//! its attempt, and the time each step took. The poll loop and the webhook
//! receiver fill it in as they go; [`UpdateRecord::finish`] is the only
//! place that turns it into a log line and metrics, so the two always agree.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::metrics::metrics;

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

/// Where an update came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `poll-echo`'s long poll.
    Poll,
    /// A delivery to `serve-webhook`.
    Webhook,
    /// `fly forward`'s long poll, delivered to a receiver.
    Forward,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Poll => "poll",
            Source::Webhook => "webhook",
            Source::Forward => "forward",
        }
    }
}

/// A step of handling an update whose time is recorded; the step that was
/// running when an attempt failed names the failure (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Signature v1 and the replay window (webhooks).
    Verify,
    /// Asking and telling the state store (admission, the handled mark).
    Store,
    /// Exchanging media URLs and downloading (`--media-dir`).
    Media,
    /// The `--exec` or `--exec-worker` handler.
    Handler,
    /// Sending the reply to the platform.
    Reply,
    /// Delivering to a webhook receiver (`fly forward`).
    Delivery,
}

const STEPS: [Step; 6] = [
    Step::Verify,
    Step::Store,
    Step::Media,
    Step::Handler,
    Step::Reply,
    Step::Delivery,
];

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Verify => "verify",
            Step::Store => "store",
            Step::Media => "media",
            Step::Handler => "handler",
            Step::Reply => "reply",
            Step::Delivery => "delivery",
        }
    }
}

/// The time each step took, and the last one started. Handed to
/// the handler of the update, which times its own steps and, while a
/// [`Sink`] looks on (the inspector), notes what its handler read and
/// wrote and the reply it sent.
#[derive(Debug, Default, Clone)]
pub struct Steps {
    spent: [Option<Duration>; 6],
    last: Option<Step>,
    /// Whether a sink looks on, so that [`Steps::note`] keeps anything.
    pub capturing: bool,
    /// What the handler and the reply did, once one of them noted it.
    pub capture: Option<Box<Capture>>,
    /// This run is the `n`th replay of the update (the inspector's
    /// `Replay`): its reply gets a `client_msg_id` of its own.
    pub replay: Option<u32>,
}

/// What a handler did with an update, for the inspector.
#[derive(Debug, Default, Clone)]
pub struct Capture {
    /// `--exec CMD` or `--exec-worker CMD`.
    pub handler: Option<String>,
    pub stdout: Option<String>,
    /// The request sent to the platform (or the receiver, for forward),
    /// and what came back.
    pub request: Option<String>,
    pub answer: Option<String>,
}

/// What is kept of a handler's stdout or a reply, per update.
pub const CAPTURE_BYTES: usize = 64 * 1024;

/// `text` cut to [`CAPTURE_BYTES`] at a character boundary.
pub fn capped(text: &str) -> String {
    if text.len() <= CAPTURE_BYTES {
        return text.to_string();
    }
    let mut end = CAPTURE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &text[..end], text.len() - end)
}

impl Steps {
    /// Runs `work` as `step`, adding its time to the step's.
    pub fn time<T>(&mut self, step: Step, work: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        self.last = Some(step);
        let result = work();
        self.add(step, started.elapsed());
        result
    }

    /// Adds `spent` to `step`'s time, as the last step started (for work
    /// that is not one closure: an `await`, another thread).
    pub fn add(&mut self, step: Step, spent: Duration) {
        self.last = Some(step);
        let slot = &mut self.spent[step as usize];
        *slot = Some(slot.unwrap_or_default() + spent);
    }

    /// The time `step` took, if it ran.
    pub fn spent(&self, step: Step) -> Option<Duration> {
        self.spent[step as usize]
    }

    /// The `client_msg_id` of a reply to `update_id`: `{kind}_{update_id}`,
    /// the same however often the update is handled, so the platform
    /// records one reply; `replay_{update_id}_{n}` for a replay, which the
    /// platform really sends again.
    pub fn client_msg_id(&self, kind: &str, update_id: i64) -> String {
        match self.replay {
            Some(n) => format!("replay_{update_id}_{n}"),
            None => format!("{kind}_{update_id}"),
        }
    }

    /// Notes, while a sink looks on, what the handler did (see [`Capture`]).
    pub fn note(&mut self, note: impl FnOnce(&mut Capture)) {
        if self.capturing {
            note(self.capture.get_or_insert_default());
        }
    }

    /// The step an attempt failed in: the last one started.
    pub fn failed_step(&self) -> Step {
        self.last.unwrap_or(Step::Handler)
    }

    /// `{"verify_us": 12, "handler_ms": 3}`: the steps that ran, for the inspector.
    pub fn as_json(&self) -> serde_json::Value {
        let mut steps = serde_json::Map::new();
        for step in STEPS {
            if let Some(spent) = self.spent(step) {
                let (key, value) = if step == Step::Verify {
                    ("verify_us".to_string(), spent.as_micros() as u64)
                } else {
                    (format!("{}_ms", step.as_str()), spent.as_millis() as u64)
                };
                steps.insert(key, value.into());
            }
        }
        steps.into()
    }

    /// `verify=12us handler=3ms reply=1ms` for the log line: the steps that ran.
    fn describe(&self) -> String {
        let mut text = String::new();
        for step in STEPS {
            if let Some(spent) = self.spent(step) {
                if !text.is_empty() {
                    text.push(' ');
                }
                if step == Step::Verify {
                    text += &format!("verify={}us", spent.as_micros());
                } else {
                    text += &format!("{}={}ms", step.as_str(), spent.as_millis());
                }
            }
        }
        text
    }
}

/// How an attempt at an update ended.
#[derive(Debug)]
pub enum End {
    /// Handled: replied, forwarded, delivered, or nothing to answer.
    Done(Outcome),
    /// Handled before (a redelivery): not handled again.
    Duplicate,
    /// Can never be handled; recorded (see `fly dead-letters`).
    DeadLetter,
    /// Failed for good or too often: parked, tried again later. `again`
    /// when it was parked already (a later try failed too).
    Parked { again: bool, error: String },
    /// Failed; tried again soon (the poll loop) or delivered again by the
    /// platform (a webhook answered 5xx).
    Failed(String),
    /// A webhook delivery answered without handling an update (a bad
    /// signature, an update in hand elsewhere, a bad request).
    Refused,
}

impl End {
    /// The `outcome` label of `fly_updates_total`, for ends of an update.
    fn outcome_label(&self) -> Option<&'static str> {
        match self {
            End::Done(Outcome::Replied | Outcome::Forwarded) => Some("replied"),
            End::Done(Outcome::Delivered) => Some("delivered"),
            End::Done(Outcome::Handled | Outcome::Ignored) => Some("no_reply"),
            End::Duplicate => Some("duplicate"),
            End::DeadLetter => Some("dead_letter"),
            End::Parked { again: false, .. } => Some("parked"),
            End::Parked { again: true, .. } | End::Failed(_) | End::Refused => None,
        }
    }

    /// The word in the log line.
    pub fn word(&self) -> &'static str {
        match self {
            End::Done(outcome) => outcome.as_str(),
            End::Duplicate => "duplicate",
            End::DeadLetter => "dead_letter",
            End::Parked { .. } => "parked",
            End::Failed(_) => "failed",
            End::Refused => "refused",
        }
    }
}

/// What happened to one update (one attempt at it, for the poll loop; one
/// delivery, for the webhook receiver).
#[derive(Debug)]
pub struct UpdateRecord {
    pub source: Source,
    pub update_id: Option<i64>,
    /// `chat_type:chat_id`, or `-`.
    pub chat: String,
    pub kind: String,
    pub msg_type: String,
    /// The signature verdict of a webhook delivery (`OK`, `SIGNATURE_MISMATCH`, …).
    pub signature: Option<&'static str>,
    /// This attempt's number, 1 for the first.
    pub attempt: u32,
    pub steps: Steps,
    /// When the update was received (for webhooks, the request).
    pub received: Instant,
    /// The update's bytes as received, while a sink looks on.
    pub raw: Option<Arc<str>>,
    /// A webhook delivery's request headers as `name: value` lines (one
    /// string: one allocation per delivery), while a sink looks on.
    pub headers: String,
    /// The sink's entry this run fills (a replay's, made when it was asked for).
    pub inspect_entry: Option<u64>,
    /// A webhook delivery's answer: its status and body (`OK`, …).
    pub answer: Option<(u16, &'static str)>,
}

/// Who looks on as records finish, besides the log and the metrics: the
/// inspector. Set once, before any update is taken up.
pub trait Sink: Send + Sync {
    /// An attempt at an update ended: the record is the sink's now.
    fn finished(&self, record: UpdateRecord, end: End);
    /// A handler wrote `line` to its stderr while handling `update_id`.
    fn handler_said(&self, update_id: i64, line: &str);
}

static SINK: OnceLock<Box<dyn Sink>> = OnceLock::new();

/// Sets the sink; a second one is refused (one inspector per process).
pub fn set_sink(sink: Box<dyn Sink>) -> bool {
    SINK.set(sink).is_ok()
}

/// Whether a sink looks on: only then are bodies and handler output kept.
pub fn capturing() -> bool {
    SINK.get().is_some()
}

/// A handler's stderr line, for the sink (the log has it already).
pub fn handler_said(update_id: i64, line: &str) {
    if let Some(sink) = SINK.get() {
        sink.handler_said(update_id, line);
    }
}

impl UpdateRecord {
    /// A record of an update received at `received`, nothing known yet.
    pub fn new(source: Source, received: Instant) -> UpdateRecord {
        UpdateRecord {
            source,
            update_id: None,
            chat: "-".to_string(),
            kind: String::new(),
            msg_type: String::new(),
            signature: None,
            attempt: 1,
            steps: Steps {
                capturing: capturing(),
                ..Steps::default()
            },
            received,
            raw: None,
            headers: String::new(),
            inspect_entry: None,
            answer: None,
        }
    }

    /// The attempt ended: counted, and logged as the poll loop logs an update.
    pub fn finish(self, end: End) {
        self.count(&end);
        self.log_update(&end);
        if let Some(sink) = SINK.get() {
            sink.finished(self, end);
        }
    }

    /// A webhook delivery was answered `status` with `result`: counted,
    /// and logged in one line with what the record knows.
    pub fn finish_delivery(mut self, end: End, status: u16, result: &'static str) {
        metrics().webhook_answered(status, result);
        self.answer = Some((status, result));
        self.count(&end);
        let update_id = self
            .update_id
            .map_or_else(|| "-".to_string(), |id| id.to_string());
        tracing::info!(
            status,
            result,
            update_id = %update_id,
            chat = %self.chat,
            outcome = %end.word(),
            signature = self.signature.unwrap_or("-"),
            ms = self.received.elapsed().as_millis() as u64,
            steps = self.steps.describe(),
            "delivery answered"
        );
        if let Some(sink) = SINK.get() {
            sink.finished(self, end);
        }
    }

    fn count(&self, end: &End) {
        let metrics = metrics();
        if let Some(outcome) = end.outcome_label() {
            metrics.updates.get_or_create(&[("outcome", outcome)]).inc();
            metrics
                .update_duration
                .observe(self.received.elapsed().as_secs_f64());
        }
        if let End::Failed(_) | End::Parked { .. } = end {
            metrics
                .update_failures
                .get_or_create(&[("reason", self.steps.failed_step().as_str())])
                .inc();
        }
        if let Some(spent) = self.steps.spent(Step::Handler) {
            metrics.handler_duration.observe(spent.as_secs_f64());
        }
    }

    fn log_update(&self, end: &End) {
        let update_id = self.update_id.unwrap_or_default();
        let chat = &self.chat;
        let attempts = self.attempt;
        let steps = self.steps.describe();
        match end {
            End::Done(outcome) => tracing::info!(
                source = self.source.as_str(),
                update_id,
                chat = %chat,
                kind = %self.kind,
                msg_type = %self.msg_type,
                outcome = %outcome.as_str(),
                latency_ms = self.received.elapsed().as_millis() as u64,
                steps,
                "update handled"
            ),
            End::Duplicate => tracing::debug!(
                update_id,
                chat = %chat,
                "update handled before (a redelivery): not handled again"
            ),
            // Logged where it is recorded, with its reason.
            End::DeadLetter | End::Refused => {}
            End::Failed(error) => tracing::warn!(
                update_id,
                chat = %chat,
                attempts,
                step = self.steps.failed_step().as_str(),
                "update not handled, will retry: {error}"
            ),
            End::Parked { again: true, error } => tracing::warn!(
                update_id,
                chat = %chat,
                attempts,
                "parked update failed again: {error}"
            ),
            End::Parked {
                again: false,
                error,
            } => tracing::warn!(
                update_id,
                chat = %chat,
                attempts,
                "update parked (see fly dead-letters): {error}; \
                 later updates of its chat wait behind it in the store, other chats go on"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_named_by_the_step_that_was_running() {
        let mut steps = Steps::default();
        assert_eq!(steps.failed_step(), Step::Handler);
        steps.time(Step::Handler, || ());
        let failed: Result<(), ()> = steps.time(Step::Reply, || Err(()));
        assert!(failed.is_err());
        assert_eq!(steps.failed_step(), Step::Reply);
        assert!(steps.spent(Step::Handler).is_some());
        assert!(steps.spent(Step::Media).is_none());
        let described = steps.describe();
        assert!(described.starts_with("handler=") && described.contains(" reply="));
        assert!(!described.contains("media"), "{described}");
    }

    #[test]
    fn outcomes_map_to_the_fixed_label_set() {
        let error = || "x".to_string();
        let cases = [
            (End::Done(Outcome::Replied), Some("replied")),
            (End::Done(Outcome::Forwarded), Some("replied")),
            (End::Done(Outcome::Delivered), Some("delivered")),
            (End::Done(Outcome::Handled), Some("no_reply")),
            (End::Done(Outcome::Ignored), Some("no_reply")),
            (End::Duplicate, Some("duplicate")),
            (End::DeadLetter, Some("dead_letter")),
            (
                End::Parked {
                    again: false,
                    error: error(),
                },
                Some("parked"),
            ),
            (
                End::Parked {
                    again: true,
                    error: error(),
                },
                None,
            ),
            (End::Failed(error()), None),
            (End::Refused, None),
        ];
        for (end, label) in cases {
            assert_eq!(end.outcome_label(), label, "{end:?}");
        }
    }
}
