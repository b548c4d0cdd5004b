//! `fly forward`'s handler: each update, signed (v1) as the platform signs
//! webhook deliveries, is POSTed to a local receiver until it answers 2xx
//! (the delivery itself is `crate::delivery`, shared with the emulator).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use rustls_pki_types::CertificateDer;

use super::{HandleError, Handler, Outcome};
use crate::api::Update;
use crate::delivery::{Deliverer, Destination};
use crate::http_client::{PlainHttp, ReceiverClient};
use crate::observe::{Step, Steps};
use crate::retry::{AttemptError, GaveUp, RetryPolicy};
use crate::shutdown::{Shutdown, Stage};

/// A local receiver that is down is waited for patiently but checked often.
const DELIVERY_RETRIES: RetryPolicy = RetryPolicy {
    max_attempts: None,
    initial_delay: Duration::from_millis(100),
    max_delay: Duration::from_secs(5),
    budget: None,
};

/// The longest a receiver gets to answer one delivery.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ForwardHandler {
    receiver: Arc<Destination>,
    deliverer: Deliverer,
    shutdown: Shutdown,
}

impl ForwardHandler {
    pub fn new(
        receiver: Destination,
        trusted: Option<Vec<CertificateDer<'static>>>,
        shutdown: Shutdown,
    ) -> ForwardHandler {
        let deliverer = Deliverer::new(ReceiverClient {
            connect_timeout: Duration::from_secs(5),
            answer_timeout: DELIVERY_TIMEOUT,
            trusted: trusted.as_deref(),
            user_agent: crate::http_client::USER_AGENT,
        });
        ForwardHandler {
            receiver: Arc::new(receiver),
            deliverer,
            shutdown,
        }
    }

    /// One attempt, on a thread of its own, unless the stop's grace period
    /// ends first: a receiver that hangs must not hold up a stop for the
    /// whole delivery timeout. The abandoned request ends with the process;
    /// the update is not confirmed, so it is delivered again next time.
    fn deliver_once(
        &self,
        update: &Update,
        nonce: &str,
    ) -> Result<u16, AttemptError<anyhow::Error>> {
        let started = Instant::now();
        let deliverer = self.deliverer.clone();
        let receiver = Arc::clone(&self.receiver);
        let raw = update.raw.clone();
        let nonce = nonce.to_string();
        let attempt = self
            .shutdown
            .unless_reached(Stage::Abandon, move || {
                deliverer.attempt(&receiver, &raw, &nonce)
            })
            .ok_or_else(|| AttemptError::Transient {
                reason: "stopping before the receiver answered".to_string(),
                retry_after: None,
            })?;
        // One log line per attempt: a success here, a failure in the retry
        // loop's line (see `handle`), which says what happened and what next.
        let status = attempt.map_err(|error| match error {
            AttemptError::Transient {
                reason,
                retry_after,
            } => AttemptError::Transient {
                reason: format!("{reason} ({} ms)", started.elapsed().as_millis()),
                retry_after,
            },
            fatal => fatal,
        })?;
        let latency_ms = started.elapsed().as_millis() as u64;
        tracing::info!(update_id = update.update_id, status, latency_ms, "delivery");
        Ok(status)
    }
}

impl Handler for ForwardHandler {
    fn handle(&self, update: &Update, steps: &mut Steps) -> Result<Outcome, HandleError> {
        // One nonce per update: a redelivery is recognisably the same delivery.
        let nonce = fly_base::random::hex_id(16);
        let outcome = steps.time(Step::Delivery, || {
            DELIVERY_RETRIES.run(
                |_| self.deliver_once(update, &nonce),
                |failures, reason, delay| {
                    tracing::warn!(
                        update_id = update.update_id,
                        failures,
                        "delivery failed: {reason}; retrying in {:.1}s",
                        delay.as_secs_f64()
                    );
                },
                |delay| self.shutdown.sleep(delay),
            )
        });
        steps.note(|capture| {
            capture.request = Some(format!(
                "POST {} (signed, nonce {nonce})",
                self.receiver.url
            ));
            capture.answer = Some(match &outcome {
                Ok(status) => format!("HTTP {status}"),
                Err(GaveUp::Exhausted { last, .. }) => last.clone(),
                Err(other) => format!("{other:?}"),
            });
        });
        match outcome {
            Ok(_) => Ok(Outcome::Delivered),
            // The receiver's URL is wrong for every update: stop, so the
            // fix can be made; the update comes again after it.
            Err(GaveUp::Fatal(error)) if error.is::<PlainHttp>() => Err(HandleError::Fatal(error)),
            // The update cannot be signed as the platform's Python would
            // (a lone surrogate in the message): no retry can change that.
            Err(GaveUp::Fatal(error)) => Err(HandleError::DeadLetter(format!(
                "update {}: {error:#}",
                update.update_id
            ))),
            Err(GaveUp::Exhausted { last, .. }) => Err(HandleError::Retry(anyhow!(last))),
            Err(GaveUp::Cancelled) => Err(HandleError::Retry(anyhow!(
                "stopped before the receiver answered"
            ))),
        }
    }
}
