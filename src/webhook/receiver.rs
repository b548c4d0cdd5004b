//! One delivery, from request to status code. See the module above for the
//! order of the checks.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{FatalStop, WebhookConfig};
use crate::api::Update;
use crate::bot::{HandleError, Handler, record_dead_letter};
use crate::signature::{Verdict, Verifier, json, python};
use crate::state::{NonceCheck, StateStore, unix_now};
use crate::sync::lock;
use bytes::Bytes;
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
    store: Arc<StateStore>,
    handler: Arc<dyn Handler>,
    /// Update ids being handled right now: a second delivery of one of them
    /// waits for the platform's next retry instead of replying twice.
    in_flight: Mutex<HashSet<i64>>,
    /// Raised by a delivery whose handling failed fatally: stops the server.
    fatal: Arc<FatalStop>,
}

type HttpResponse = Response<Full<Bytes>>;

impl Receiver {
    pub fn new(
        config: &WebhookConfig,
        store: StateStore,
        handler: Arc<dyn Handler>,
        fatal: Arc<FatalStop>,
    ) -> Receiver {
        Receiver {
            path: config.path.clone(),
            secrets: config.secrets.clone(),
            replay_window_secs: config.replay_window_secs,
            max_body_bytes: config.max_body_bytes,
            store: Arc::new(store),
            handler,
            in_flight: Mutex::new(HashSet::new()),
            fatal,
        }
    }
}

/// The hyper service for one connection.
pub fn service(
    receiver: Arc<Receiver>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = HttpResponse,
    Error = Infallible,
    Future = impl Future<Output = Result<HttpResponse, Infallible>> + Send,
> + Send {
    service_fn(move |request| {
        let receiver = Arc::clone(&receiver);
        async move { Ok::<_, Infallible>(receiver.answer(request).await) }
    })
}

impl Receiver {
    async fn answer(&self, request: Request<Incoming>) -> HttpResponse {
        let path = request.uri().path();
        let method = request.method();
        if path == "/healthz" && (method == Method::GET || method == Method::HEAD) {
            return reply(StatusCode::OK, "ok");
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

        let Ok(parsed) = crate::signature::parse(text) else {
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
            Err(unusable) => {
                return match self.store.record_dead_letter(None, text, &unusable.reason) {
                    Ok(_) => {
                        tracing::warn!(
                            "delivery recorded as a dead letter (see fly dead-letters): {}",
                            unusable.reason
                        );
                        (StatusCode::OK, "DEAD_LETTER")
                    }
                    Err(error) => store_failed(error),
                };
            }
        };
        // As the platform's Python reads it: `str(nonce or "")`.
        let nonce = python::py_str(parsed.get("nonce"), "nonce")
            .map(|nonce| nonce.into_owned())
            .unwrap_or_default();
        let update_id = update.update_id;
        match self.store.is_handled(update_id) {
            Ok(true) => return (StatusCode::OK, "DUPLICATE"),
            Ok(false) => {}
            Err(error) => return store_failed(error),
        }
        if !nonce.is_empty() {
            let window = self.replay_window_secs as i64;
            match self
                .store
                .check_nonce(&nonce, &update_id.to_string(), now, window)
            {
                Ok(NonceCheck::Fresh) => {}
                Ok(NonceCheck::Reused) => return (StatusCode::UNAUTHORIZED, "NONCE_REUSED"),
                Err(error) => return store_failed(error),
            }
        }
        let Some(_claim) = InFlight::claim(&self.in_flight, update_id) else {
            return (StatusCode::CONFLICT, "IN_PROGRESS");
        };
        self.handle(update).await
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

    /// Runs the handler on the blocking pool; marks the update handled only
    /// once its reply was accepted. A fatal error stops the server; its
    /// update is not handled, so the platform delivers it again.
    async fn handle(&self, update: Update) -> (StatusCode, &'static str) {
        let handler = Arc::clone(&self.handler);
        let store = Arc::clone(&self.store);
        let joined = tokio::task::spawn_blocking(move || -> Result<&'static str, HandleError> {
            match handler.handle(&update) {
                Ok(outcome) => {
                    store
                        .mark_handled(update.update_id, outcome.as_str())
                        .map_err(HandleError::Retry)?;
                    Ok("OK")
                }
                // Accepted (200): delivering it again could not help.
                Err(HandleError::DeadLetter(reason)) => {
                    record_dead_letter(&store, &update, &reason).map_err(HandleError::Retry)?;
                    Ok("DEAD_LETTER")
                }
                Err(other) => Err(other),
            }
        })
        .await;
        match joined {
            Ok(Ok(answer)) => (StatusCode::OK, answer),
            Ok(Err(HandleError::Retry(error))) => {
                tracing::error!("reply not sent, the platform will deliver again: {error:#}");
                (StatusCode::INTERNAL_SERVER_ERROR, "REPLY_FAILED")
            }
            Ok(Err(HandleError::DeadLetter(reason))) => {
                // Recorded in the closure above; never returned from it.
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

fn store_failed(error: anyhow::Error) -> (StatusCode, &'static str) {
    tracing::error!("state store: {error:#}");
    (StatusCode::INTERNAL_SERVER_ERROR, "STATE_STORE_FAILED")
}

fn reply(status: StatusCode, body: &'static str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An update id marked as being handled; unmarked when dropped, even if the
/// client disconnects and hyper drops the request half-way.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<i64>>,
    update_id: i64,
}

impl<'a> InFlight<'a> {
    fn claim(set: &'a Mutex<HashSet<i64>>, update_id: i64) -> Option<InFlight<'a>> {
        // The guard must be gone, and no InFlight built, when the id is
        // taken: dropping one would lock the set again (a deadlock) and
        // release the other delivery's claim.
        let claimed = lock(set).insert(update_id);
        claimed.then(|| InFlight { set, update_id })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.update_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_on_an_update_in_flight_fails_and_keeps_the_first() {
        // On a thread: the bug this guards against was a deadlock.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let set = Mutex::new(HashSet::new());
            let first = InFlight::claim(&set, 7).expect("first claim");
            assert!(InFlight::claim(&set, 7).is_none());
            assert!(lock(&set).contains(&7));
            drop(first);
            assert!(lock(&set).is_empty());
            assert!(InFlight::claim(&set, 7).is_some());
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(Duration::from_secs(5))
            .expect("claims finish without deadlock");
    }
}
