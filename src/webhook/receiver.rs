//! One delivery, from request to status code. See the module above for the
//! order of the checks.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use super::{FatalStop, WebhookConfig};
use crate::api::Update;
use crate::bot::{HandleError, Handler, record_dead_letter};
use bytes::Bytes;
use fly_base::clock::unix_now;
use fly_signature::{Verdict, Verifier, json, python};
use fly_state::{Admission, Claim, Delivery, Pending, WebhookStore, is_gone, is_unavailable};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};

/// A client that has sent its headers gets this long for the body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
            return reply(StatusCode::NOT_FOUND, "NOT_FOUND");
        }
        if method != Method::POST {
            let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        let (status, body) = self.receive(request).await;
        tracing::info!(
            status = status.as_u16(),
            outcome = body,
            "delivery answered"
        );
        reply(status, body)
    }

    async fn receive(&self, request: Request<Incoming>) -> (StatusCode, &'static str) {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes) {
            return (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");
        }
        // The limit is enforced while reading: a body without (or lying
        // about) Content-Length is cut off at max_body_bytes too.
        let limited = Limited::new(request.into_body(), self.max_body_bytes as usize);
        let body = match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
            Err(_) => return (StatusCode::REQUEST_TIMEOUT, "BODY_READ_TIMEOUT"),
            Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
                return (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");
            }
            Ok(Err(_)) => return (StatusCode::BAD_REQUEST, "BODY_READ_FAILED"),
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        let Ok(text) = std::str::from_utf8(&body) else {
            return (StatusCode::BAD_REQUEST, "MALFORMED_JSON");
        };

        let Ok(parsed) = fly_signature::parse(text) else {
            return (StatusCode::BAD_REQUEST, "MALFORMED_JSON");
        };
        let now = unix_now();
        match self.verify(&parsed, now) {
            Ok(Verdict::Ok) => {}
            Ok(rejected) => return (StatusCode::UNAUTHORIZED, rejected.code()),
            Err(status_and_reason) => return status_and_reason,
        }
        // Verified: the update's fields can be trusted from here on. One
        // without a usable id is recorded and accepted: a 4xx would only make
        // the platform drop it, a 5xx deliver it again for nothing.
        let update = match Update::read(&parsed, text) {
            Ok(update) => update,
            Err(unusable) => return self.record_unusable(text, unusable.reason).await,
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
        let admission = match self.store.try_admit(&delivery) {
            Some(answer) => answer.map(|admission| self.guard(admission)),
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
        match admission {
            Ok(Guarded::Admitted { claim, wait }) => self.handle(update, claim, wait).await,
            Ok(Guarded::Duplicate) => (StatusCode::OK, "DUPLICATE"),
            Ok(Guarded::NonceReused) => (StatusCode::UNAUTHORIZED, "NONCE_REUSED"),
            Ok(Guarded::InProgress) => (StatusCode::CONFLICT, "IN_PROGRESS"),
            Err(error) => self.store_failed(error),
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

    /// Runs the handler on the blocking pool (once the store lets it: see
    /// `Admission::Admitted`); marks the update handled only once its reply
    /// was accepted, then releases its claim. A fatal error stops the
    /// server; its update is not handled, so the platform delivers it again.
    async fn handle(
        &self,
        update: Update,
        claim: ClaimGuard,
        wait: Pending,
    ) -> (StatusCode, &'static str) {
        if let Err(error) = committed(wait).await {
            return self.store_failed(error);
        }
        // Nothing to answer, and a store that marks in memory: done here.
        // Should either say otherwise, the update takes the worker pool
        // like any other (an instant handler has no side effect to repeat).
        if self.handler.is_instant(&update)
            && let Ok(outcome) = self.handler.handle(&update)
            && let Some(marked) = self
                .store
                .try_mark_handled(update.update_id, outcome.as_str())
        {
            drop(claim);
            return match marked {
                Ok(()) => (StatusCode::OK, "OK"),
                Err(error) => self.store_failed(error),
            };
        }
        let handler = Arc::clone(&self.handler);
        let store = Arc::clone(&self.store);
        let joined = tokio::task::spawn_blocking(move || {
            // Released when this closure ends, after the mark: a redelivery
            // then finds the update handled, never unclaimed and unmarked.
            let _claim = claim;
            reply_and_mark(handler.as_ref(), store.as_ref(), &update)
        })
        .await;
        self.answer_handled(joined)
    }

    /// The answer to a delivery whose handler ran on the blocking pool.
    fn answer_handled(
        &self,
        joined: Result<Result<&'static str, HandleError>, tokio::task::JoinError>,
    ) -> (StatusCode, &'static str) {
        match joined {
            Ok(Ok(answer)) => (StatusCode::OK, answer),
            // Replied, but not recorded: the platform delivers again, and
            // the repeated reply is absorbed by its client_msg_id.
            Ok(Err(HandleError::Retry(error))) if is_unavailable(&error) || is_gone(&error) => {
                self.store_failed(error)
            }
            Ok(Err(HandleError::Retry(error))) => {
                tracing::error!("reply not sent, the platform will deliver again: {error:#}");
                (StatusCode::INTERNAL_SERVER_ERROR, "REPLY_FAILED")
            }
            Ok(Err(HandleError::Park(error))) => {
                // Made a dead letter in `reply_and_mark`; never returned from it.
                tracing::error!("dead letter not recorded: {error:#}");
                (StatusCode::INTERNAL_SERVER_ERROR, "REPLY_FAILED")
            }
            Ok(Err(HandleError::DeadLetter(reason))) => {
                // Recorded in `reply_and_mark`; never returned from it.
                tracing::error!("dead letter not recorded: {reason}");
                (StatusCode::INTERNAL_SERVER_ERROR, "REPLY_FAILED")
            }
            Ok(Err(HandleError::Fatal(error))) => {
                self.fatal.raise(error);
                (StatusCode::INTERNAL_SERVER_ERROR, "FATAL_ERROR")
            }
            Err(error) => {
                tracing::error!("handler crashed: {error}");
                (StatusCode::INTERNAL_SERVER_ERROR, "REPLY_FAILED")
            }
        }
    }
}

/// Runs the handler and records what came of it: the update handled, or a
/// dead letter.
fn reply_and_mark(
    handler: &dyn Handler,
    store: &dyn WebhookStore,
    update: &Update,
) -> Result<&'static str, HandleError> {
    // This server cannot retry later by itself: what poll-echo would
    // park (a rejected reply, media gone for good) is a dead letter
    // here, since the platform's redeliveries would only meet the
    // same refusal.
    let handled = handler.handle(update).map_err(|error| match error {
        HandleError::Park(error) => HandleError::DeadLetter(format!("{error:#}")),
        other => other,
    });
    match handled {
        Ok(outcome) => {
            store
                .mark_handled(update.update_id, outcome.as_str())
                .map_err(HandleError::Retry)?;
            Ok("OK")
        }
        // Accepted (200): delivering it again could not help.
        Err(HandleError::DeadLetter(reason)) => {
            record_dead_letter(store, update, &reason).map_err(HandleError::Retry)?;
            Ok("DEAD_LETTER")
        }
        Err(other) => Err(other),
    }
}

/// A group-committed write as a future: the writer thread completes it, so
/// no thread is parked while the disk catches up.
async fn committed(pending: Pending) -> anyhow::Result<()> {
    if let Some(result) = pending.try_result() {
        return result;
    }
    let (sender, receiver) = tokio::sync::oneshot::channel();
    pending.on_done(move |result| {
        let _ = sender.send(result);
    });
    receiver
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the state store's writer stopped")))
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

fn reply(status: StatusCode, body: &'static str) -> DeliveryAnswer {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
