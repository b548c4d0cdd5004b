//! One delivery, from request to status code. See the module above for the
//! order of the checks.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{FatalStop, WebhookConfig};
use crate::api::Update;
use crate::bot::{HandleError, Handler, describe, record_dead_letter};
use crate::observe::{End, Source, Step, Steps, UpdateRecord, capturing, metrics};
use bytes::Bytes;
use fly_base::clock::unix_now;
use fly_base::sync::lock;
use fly_signature::{Verdict, Verifier, json, python};
use fly_state::{
    Admission, Claim, Delivery, Later, Pending, WebhookStore, is_gone, is_unavailable,
};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};

/// A client that has sent its headers gets this long for the body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// At most one warning of refused deliveries this often.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(1);

pub struct Receiver {
    path: String,
    secrets: Vec<String>,
    replay_window_secs: u64,
    max_body_bytes: u64,
    /// Handled ids, nonces and the claims on updates being handled: a
    /// second delivery of an update in hand waits for the platform's next
    /// retry (409) instead of replying twice.
    store: Arc<dyn WebhookStore>,
    claim_lease: Duration,
    handler: Arc<dyn Handler>,
    /// Raised by a delivery whose handling failed fatally: stops the server.
    fatal: Arc<FatalStop>,
    refusals: Refusals,
}

type DeliveryAnswer = Response<Full<Bytes>>;

impl Receiver {
    pub fn new(
        config: &WebhookConfig,
        store: Arc<dyn WebhookStore>,
        handler: Arc<dyn Handler>,
        fatal: Arc<FatalStop>,
    ) -> Receiver {
        Receiver {
            path: config.path.clone(),
            secrets: config.secrets.clone(),
            replay_window_secs: config.replay_window_secs,
            max_body_bytes: config.max_body_bytes,
            store,
            claim_lease: config.claim_lease,
            handler,
            fatal,
            refusals: Refusals::default(),
        }
    }
}

/// The hyper service for one connection.
pub fn service(
    receiver: Arc<Receiver>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = DeliveryAnswer,
    Error = Infallible,
    Future = impl Future<Output = Result<DeliveryAnswer, Infallible>> + Send,
> + Send {
    service_fn(move |request| {
        let receiver = Arc::clone(&receiver);
        async move { Ok::<_, Infallible>(receiver.answer(request).await) }
    })
}

impl Receiver {
    async fn answer(&self, request: Request<Incoming>) -> DeliveryAnswer {
        let path = request.uri().path();
        let method = request.method();
        if path == "/healthz" && (method == Method::GET || method == Method::HEAD) {
            return reply(StatusCode::OK, "ok");
        }
        // Ready to take deliveries: the state store answers (a shared
        // store's health is watched in the background; never waited for here).
        if path == "/readyz" && (method == Method::GET || method == Method::HEAD) {
            return if self.store.is_reachable() {
                reply(StatusCode::OK, "ready")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "STATE_STORE_UNAVAILABLE")
            };
        }
        if path != self.path {
            metrics().webhook_answered(404, "NOT_FOUND");
            return reply(StatusCode::NOT_FOUND, "NOT_FOUND");
        }
        if method != Method::POST {
            metrics().webhook_answered(405, "METHOD_NOT_ALLOWED");
            let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        let mut record = UpdateRecord::new(Source::Webhook, Instant::now());
        if capturing() {
            record.headers = shown_headers(request.headers());
        }
        let in_flight = &metrics().updates_in_flight;
        in_flight.inc();
        let (status, body, end) = match self.receive(request, &mut record).await {
            (status, body, Some(end)) => (status, body, end),
            (status, body, None) => (status, body, End::Refused),
        };
        in_flight.dec();
        if status == StatusCode::UNAUTHORIZED {
            self.refusals.warn(body, record.update_id);
        }
        record.finish_delivery(end, status.as_u16(), body);
        reply(status, body)
    }

    /// The answer to a delivery, and how its update ended if it got as far
    /// as one (`None`: refused before, a 4xx or a 409).
    async fn receive(
        &self,
        request: Request<Incoming>,
        record: &mut UpdateRecord,
    ) -> (StatusCode, &'static str, Option<End>) {
        let (status, body) = match self.admit(request, record).await {
            Ok(admitted) => return self.handle(admitted, record).await,
            Err(answer) => answer,
        };
        let end = match body {
            "DUPLICATE" => Some(End::Duplicate),
            "DEAD_LETTER" => Some(End::DeadLetter),
            "STATE_STORE_UNAVAILABLE" | "STATE_STORE_FAILED" => {
                metrics().state_store_errors.inc();
                record.steps.add(Step::Store, Duration::ZERO);
                Some(End::Failed(body.to_string()))
            }
            _ => None,
        };
        (status, body, end)
    }

    /// Reads, verifies and admits a delivery: the update to handle, with
    /// its claim, or the answer that ends the delivery here.
    async fn admit(
        &self,
        request: Request<Incoming>,
        record: &mut UpdateRecord,
    ) -> Result<Admitted, (StatusCode, &'static str)> {
        let body = self.read_body(request).await?;
        let Ok(text) = std::str::from_utf8(&body) else {
            return Err((StatusCode::BAD_REQUEST, "MALFORMED_JSON"));
        };

        if capturing() {
            record.raw = Some(Arc::from(text));
        }
        let Ok(parsed) = fly_signature::parse(text) else {
            return Err((StatusCode::BAD_REQUEST, "MALFORMED_JSON"));
        };
        // Which update it says it is, trusted or not: the log line says
        // the signature verdict beside it.
        let update = Update::read(&parsed, text);
        if let Ok(update) = &update {
            describe(record, update);
        }
        let now = unix_now();
        let verdict = record
            .steps
            .time(Step::Verify, || self.verify(&parsed, now));
        match verdict {
            Ok(Verdict::Ok) => record.signature = Some(Verdict::Ok.code()),
            Ok(rejected) => {
                record.signature = Some(rejected.code());
                return Err((StatusCode::UNAUTHORIZED, rejected.code()));
            }
            Err(status_and_reason) => return Err(status_and_reason),
        }
        // Verified: the update's fields can be trusted from here on. One
        // without a usable id is recorded and accepted: a 4xx would only make
        // the platform drop it, a 5xx deliver it again for nothing.
        let update = match update {
            Ok(update) => update,
            Err(unusable) => return Err(self.record_unusable(text, unusable.reason).await),
        };
        // As the platform's Python reads it: `str(nonce or "")`.
        let nonce = python::py_str(parsed.get("nonce"), "nonce")
            .map(|nonce| nonce.into_owned())
            .unwrap_or_default();
        let delivery = Delivery {
            update_id: update.update_id,
            nonce,
            now,
            window_secs: self.replay_window_secs as i64,
            lease: self.claim_lease,
        };
        let asked = Instant::now();
        let admission = match self.store.try_admit(&delivery) {
            Some(answer) => answer.map(|admission| self.guard(admission)),
            None if let Some(later) = self.store.admit_later(&delivery) => {
                admitted_later(&self.store, later).await
            }
            // Only the store's disk or server can say: on a blocking thread,
            // where the claim is also guarded at once, so a client that
            // disconnects meanwhile cannot leave it held.
            None => {
                let store = Arc::clone(&self.store);
                tokio::task::spawn_blocking(move || {
                    store
                        .admit(&delivery)
                        .map(|admission| guard(&store, admission))
                })
                .await
                .unwrap_or_else(store_task_failed)
            }
        };
        let admission = match admission {
            Ok(Guarded::Admitted { claim, wait }) => match committed(wait).await {
                Ok(()) => Ok(Admitted { update, claim }),
                Err(error) => Err(self.store_failed(error)),
            },
            Ok(Guarded::Duplicate) => Err((StatusCode::OK, "DUPLICATE")),
            Ok(Guarded::NonceReused) => Err((StatusCode::UNAUTHORIZED, "NONCE_REUSED")),
            Ok(Guarded::InProgress) => Err((StatusCode::CONFLICT, "IN_PROGRESS")),
            Err(error) => Err(self.store_failed(error)),
        };
        record.steps.add(Step::Store, asked.elapsed());
        admission
    }

    /// The body, read within the size limit and the time a client gets.
    async fn read_body(
        &self,
        request: Request<Incoming>,
    ) -> Result<Bytes, (StatusCode, &'static str)> {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes) {
            return Err((StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"));
        }
        // The limit is enforced while reading: a body without (or lying
        // about) Content-Length is cut off at max_body_bytes too.
        let limited = Limited::new(request.into_body(), self.max_body_bytes as usize);
        match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
            Err(_) => Err((StatusCode::REQUEST_TIMEOUT, "BODY_READ_TIMEOUT")),
            Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
                Err((StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"))
            }
            Ok(Err(_)) => Err((StatusCode::BAD_REQUEST, "BODY_READ_FAILED")),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    /// [`store_failed`], and a state file deleted while fly ran stops the
    /// server (nothing more can be recorded): answered 503, so the platform
    /// delivers it again, to the next server.
    fn store_failed(&self, error: anyhow::Error) -> (StatusCode, &'static str) {
        if is_gone(&error) {
            self.fatal.raise(error);
            return (StatusCode::SERVICE_UNAVAILABLE, "STATE_STORE_UNAVAILABLE");
        }
        store_failed(error)
    }

    fn guard(&self, admission: Admission) -> Guarded {
        guard(&self.store, admission)
    }

    /// A verified update without a usable id: recorded as a dead letter (a
    /// write to disk, so on a blocking thread) and accepted.
    async fn record_unusable(&self, text: &str, reason: String) -> (StatusCode, &'static str) {
        let store = Arc::clone(&self.store);
        let raw = text.to_string();
        let recorded = tokio::task::spawn_blocking(move || {
            store
                .record_dead_letter(None, &raw, &reason)
                .map(|_| reason)
        })
        .await
        .unwrap_or_else(store_task_failed);
        match recorded {
            Ok(reason) => {
                tracing::warn!(
                    "delivery recorded as a dead letter (see fly dead-letters): {reason}"
                );
                (StatusCode::OK, "DEAD_LETTER")
            }
            Err(error) => self.store_failed(error),
        }
    }

    /// Signature v1 and the replay window, exactly as the platform's Python.
    fn verify(
        &self,
        parsed: &json::Value,
        now: i64,
    ) -> Result<Verdict, (StatusCode, &'static str)> {
        let verifier = Verifier::new(
            self.secrets.iter().map(String::as_str),
            now,
            Some(self.replay_window_secs),
        );
        verifier
            .check(parsed)
            .and_then(|check| check.verdict())
            .map_err(|error| {
                tracing::debug!("unverifiable delivery: {error}");
                (StatusCode::BAD_REQUEST, "INVALID_UPDATE")
            })
    }

    /// Runs the handler on the blocking pool (once the store let it: see
    /// `Admission::Admitted`); marks the update handled only once its reply
    /// was accepted, then releases its claim. A fatal error stops the
    /// server; its update is not handled, so the platform delivers it again.
    async fn handle(
        &self,
        admitted: Admitted,
        record: &mut UpdateRecord,
    ) -> (StatusCode, &'static str, Option<End>) {
        let Admitted { update, claim } = admitted;
        // Nothing to answer, and a store that marks in memory: done here,
        // on this thread (a hand-off to the pool costs more than the rest
        // of the delivery). Should either say otherwise, the update takes
        // the worker pool like any other (an instant handler has no side
        // effect to repeat).
        if self.handler.is_instant(&update)
            && let Ok(outcome) = self.handler.handle(&update, &mut record.steps)
        {
            let marked = match self
                .store
                .try_mark_handled(update.update_id, outcome.as_str())
            {
                // Marked in memory: a writer far behind makes the answer
                // wait for its batch in hand (without a thread), which holds
                // the I/O threads back for it.
                Some(marked) => Some(match marked {
                    Ok(behind) => committed(behind).await,
                    Err(error) => Err(error),
                }),
                // A store on a server: the mark is answered by its own thread.
                None => match self.store.mark_later(update.update_id, outcome.as_str()) {
                    Some(later) => {
                        let asked = Instant::now();
                        let marked = answered(later).await;
                        record.steps.add(Step::Store, asked.elapsed());
                        Some(marked)
                    }
                    None => None,
                },
            };
            if let Some(marked) = marked {
                drop(claim);
                return match marked {
                    Ok(()) => (StatusCode::OK, "OK", Some(End::Done(outcome))),
                    Err(error) => self.failed_in_store(error),
                };
            }
        }
        let handler = Arc::clone(&self.handler);
        let store = Arc::clone(&self.store);
        let mut steps = std::mem::take(&mut record.steps);
        let joined = tokio::task::spawn_blocking(move || {
            // Released when this closure ends, after the mark: a redelivery
            // then finds the update handled, never unclaimed and unmarked.
            let _claim = claim;
            let handled = reply_and_mark(handler.as_ref(), store.as_ref(), &update, &mut steps);
            (handled, steps)
        })
        .await;
        match joined {
            Ok((handled, steps)) => {
                record.steps = steps;
                self.answer_handled(handled)
            }
            Err(error) => {
                tracing::error!("handler crashed: {error}");
                let failed = End::Failed(format!("handler crashed: {error}"));
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "REPLY_FAILED",
                    Some(failed),
                )
            }
        }
    }

    /// The answer to a delivery whose handler ran on the blocking pool.
    fn answer_handled(
        &self,
        handled: Result<End, HandleError>,
    ) -> (StatusCode, &'static str, Option<End>) {
        let failed = |error: String| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "REPLY_FAILED",
                Some(End::Failed(error)),
            )
        };
        match handled {
            Ok(End::DeadLetter) => (StatusCode::OK, "DEAD_LETTER", Some(End::DeadLetter)),
            Ok(end) => (StatusCode::OK, "OK", Some(end)),
            // Replied, but not recorded: the platform delivers again, and
            // the repeated reply is absorbed by its client_msg_id.
            Err(HandleError::Retry(error)) if is_unavailable(&error) || is_gone(&error) => {
                self.failed_in_store(error)
            }
            Err(HandleError::Retry(error)) => {
                tracing::error!("reply not sent, the platform will deliver again: {error:#}");
                failed(format!("{error:#}"))
            }
            // Made dead letters in `reply_and_mark`; never returned from it.
            Err(HandleError::Park(error)) => {
                tracing::error!("dead letter not recorded: {error:#}");
                failed(format!("{error:#}"))
            }
            Err(HandleError::DeadLetter(reason)) => {
                tracing::error!("dead letter not recorded: {reason}");
                failed(reason)
            }
            Err(HandleError::Fatal(error)) => {
                let text = format!("{error:#}");
                self.fatal.raise(error);
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "FATAL_ERROR",
                    Some(End::Failed(text)),
                )
            }
        }
    }

    /// [`store_failed`] for an update in hand: a failure of its store step.
    fn failed_in_store(&self, error: anyhow::Error) -> (StatusCode, &'static str, Option<End>) {
        let text = format!("{error:#}");
        let (status, body) = self.store_failed(error);
        metrics().state_store_errors.inc();
        (status, body, Some(End::Failed(text)))
    }
}

/// A verified, admitted update, and the claim that keeps other deliveries
/// of it waiting while it is handled.
struct Admitted {
    update: Update,
    claim: ClaimGuard,
}

/// Runs the handler and records what came of it: the update handled, or a
/// dead letter.
fn reply_and_mark(
    handler: &dyn Handler,
    store: &dyn WebhookStore,
    update: &Update,
    steps: &mut Steps,
) -> Result<End, HandleError> {
    // This server cannot retry later by itself: what poll-echo would
    // park (a rejected reply, media gone for good) is a dead letter
    // here, since the platform's redeliveries would only meet the
    // same refusal.
    let handled = handler.handle(update, steps).map_err(|error| match error {
        HandleError::Park(error) => HandleError::DeadLetter(format!("{error:#}")),
        other => other,
    });
    match handled {
        Ok(outcome) => {
            steps
                .time(Step::Store, || {
                    store.mark_handled(update.update_id, outcome.as_str())
                })
                .map_err(HandleError::Retry)?;
            Ok(End::Done(outcome))
        }
        // Accepted (200): delivering it again could not help.
        Err(HandleError::DeadLetter(reason)) => {
            steps
                .time(Step::Store, || record_dead_letter(store, update, &reason))
                .map_err(HandleError::Retry)?;
            Ok(End::DeadLetter)
        }
        Err(other) => Err(other),
    }
}

/// Deliveries refused 401 (a signature, the replay window, a nonce) are
/// warned of at most once a second, with the count of the others since: a
/// wrong secret shows at once, without a line per delivery at the
/// platform's rate (each delivery's own line is INFO).
#[derive(Default)]
struct Refusals {
    state: Mutex<RefusalsSaid>,
}

#[derive(Default)]
struct RefusalsSaid {
    last: Option<Instant>,
    unsaid: u64,
}

impl Refusals {
    fn warn(&self, code: &'static str, update_id: Option<i64>) {
        let unsaid = {
            let mut said = lock(&self.state);
            let now = Instant::now();
            if said
                .last
                .is_some_and(|last| now.duration_since(last) < REFUSAL_WARNING_EVERY)
            {
                said.unsaid += 1;
                return;
            }
            said.last = Some(now);
            std::mem::take(&mut said.unsaid)
        };
        let why = match code {
            "SIGNATURE_MISMATCH" => {
                "is it signed with the secret this server verifies with (see its start line)?"
            }
            "REPLAY_WINDOW_EXCEEDED" => "is this machine's clock right, and --window wide enough?",
            _ => "a nonce already seen with another update",
        };
        let update_id = update_id.map_or_else(|| "-".to_string(), |id| id.to_string());
        tracing::warn!(
            update_id = %update_id,
            refused_since_last_warning = unsaid,
            "delivery refused (401 {code}): {why} `fly verify-sig --explain` on the \
             delivery's body shows each step of the check"
        );
    }
}

/// A group-committed write as a future: the writer thread completes it, so
/// no thread is parked while the disk catches up.
async fn committed(pending: Pending) -> anyhow::Result<()> {
    match pending.try_result() {
        Some(result) => result,
        None => answered(Later::new(move |then| pending.on_done(then))).await,
    }
}

/// A store's answer from a thread of its own, as a future.
async fn answered<T: Send + 'static>(later: Later<anyhow::Result<T>>) -> anyhow::Result<T> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    later.on_done(move |answer| {
        let _ = sender.send(answer);
    });
    receiver
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the state store's call did not finish")))
}

/// An admission answered by the store's own thread, its claim guarded as
/// soon as it comes: one that comes after the client left is released.
async fn admitted_later(
    store: &Arc<dyn WebhookStore>,
    later: Later<anyhow::Result<Admission>>,
) -> anyhow::Result<Guarded> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let guarding = Arc::clone(store);
    later.on_done(move |answer| {
        let _ = sender.send(answer.map(|admission| guard(&guarding, admission)));
    });
    receiver
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the state store's call did not finish")))
}

/// An [`Admission`] whose claim is released when dropped.
enum Guarded {
    Duplicate,
    NonceReused,
    InProgress,
    Admitted { claim: ClaimGuard, wait: Pending },
}

fn guard(store: &Arc<dyn WebhookStore>, admission: Admission) -> Guarded {
    match admission {
        Admission::Duplicate => Guarded::Duplicate,
        Admission::NonceReused => Guarded::NonceReused,
        Admission::InProgress => Guarded::InProgress,
        Admission::Admitted { claim, wait } => Guarded::Admitted {
            claim: ClaimGuard {
                store: Arc::clone(store),
                claim: Some(claim),
            },
            wait,
        },
    }
}

/// A claim on an update being handled; released when dropped, even if the
/// client disconnects and hyper drops the request half-way.
struct ClaimGuard {
    store: Arc<dyn WebhookStore>,
    claim: Option<Claim>,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take()
            && let Err(error) = self.store.release_update(claim)
        {
            tracing::error!("releasing an update's claim: {error:#}");
        }
    }
}

/// A store call on the blocking pool that panicked (or was cancelled): the
/// delivery fails as on a store error, the task's error kept as the cause.
fn store_task_failed<T>(error: tokio::task::JoinError) -> anyhow::Result<T> {
    Err(anyhow::Error::new(error).context("the state store's call did not finish"))
}

/// 503 while the store is out of reach or cannot write (the outage is
/// logged once, by the store), else 500: either way the platform delivers
/// again.
fn store_failed(error: anyhow::Error) -> (StatusCode, &'static str) {
    if is_unavailable(&error) {
        tracing::debug!("{error:#}");
        return (StatusCode::SERVICE_UNAVAILABLE, "STATE_STORE_UNAVAILABLE");
    }
    tracing::error!("state store: {error:#}");
    (StatusCode::INTERNAL_SERVER_ERROR, "STATE_STORE_FAILED")
}

/// A request's headers as the inspector shows them, `name: value` lines:
/// credentials redacted.
fn shown_headers(headers: &hyper::HeaderMap) -> String {
    let mut lines = String::with_capacity(256);
    for (name, value) in headers {
        let secret = name == header::AUTHORIZATION
            || name == header::COOKIE
            || name.as_str().contains("token")
            || name.as_str().contains("secret");
        lines.push_str(name.as_str());
        lines.push_str(": ");
        if secret {
            lines.push_str("(redacted)");
        } else {
            // hyper refuses a value with a line break: one per line holds.
            lines.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
        lines.push('\n');
    }
    lines
}

fn reply(status: StatusCode, body: &'static str) -> DeliveryAnswer {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
