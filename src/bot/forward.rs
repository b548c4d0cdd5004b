//! `fly forward`'s handler: each update, signed (v1) as the platform signs
//! webhook deliveries, is POSTed to a local receiver until it answers 2xx.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;

use anyhow::anyhow;

use super::{HandleError, Handler, Outcome};
use crate::api::retry::{AttemptError, GaveUp, RetryPolicy};
use crate::api::{Update, describe_transport_error, host_and_port};
use crate::shutdown::{Shutdown, Stage};
use crate::signature::sign_update_text;
use crate::state::unix_now;

/// A local receiver that is down is waited for patiently but checked often.
const DELIVERY_RETRIES: RetryPolicy = RetryPolicy {
    max_attempts: None,
    initial_delay: Duration::from_millis(100),
    max_delay: Duration::from_secs(5),
    budget: None,
};

pub struct ForwardHandler {
    pub receiver_url: String,
    pub secret: String,
    pub bot_id: String,
    pub agent: ureq::Agent,
    pub shutdown: Shutdown,
}

impl ForwardHandler {
    pub fn new(
        receiver_url: String,
        secret: String,
        bot_id: String,
        trusted: Option<Vec<CertificateDer<'static>>>,
        shutdown: Shutdown,
    ) -> ForwardHandler {
        let mut config = ureq::Agent::config_builder();
        if let Some(certificates) = trusted {
            let roots = certificates
                .iter()
                .map(|certificate| ureq::tls::Certificate::from_der(certificate).to_owned())
                .collect();
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
                    .build(),
            );
        }
        let agent = config
            .http_status_as_error(false)
            // A 3xx is the receiver's answer, not a place to go: following it
            // would turn the POST into a bodyless GET whose 2xx looks like
            // delivery.
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(DELIVERY_TIMEOUT))
            .build()
            .new_agent();
        ForwardHandler {
            receiver_url,
            secret,
            bot_id,
            agent,
            shutdown,
        }
    }

    fn deliver_once(
        &self,
        update: &Update,
        nonce: &str,
    ) -> Result<u16, AttemptError<anyhow::Error>> {
        let text = &update.raw;
        // Signed afresh for each attempt, so a receiver that was down for a
        // while still sees a timestamp inside its replay window.
        let signed = sign_update_text(text, &self.secret, &self.bot_id, unix_now(), nonce)
            .map_err(|error| {
                AttemptError::Fatal(anyhow!("cannot sign update {}: {error}", update.update_id))
            })?;
        let started = Instant::now();
        let Some(result) = self.post_unless_stopped(signed) else {
            return Err(AttemptError::Transient {
                reason: "stopping before the receiver answered".to_string(),
                retry_after: None,
            });
        };
        let latency_ms = started.elapsed().as_millis() as u64;
        // One log line per attempt: a success here, a failure in the retry
        // loop's line (see `handle`), which says what happened and what next.
        match result {
            Ok(response) => {
                let status = response.status().as_u16();
                if (200..300).contains(&status) {
                    tracing::info!(update_id = update.update_id, status, latency_ms, "delivery");
                    Ok(status)
                } else {
                    Err(AttemptError::Transient {
                        reason: format!("the receiver answered HTTP {status} ({latency_ms} ms)"),
                        retry_after: None,
                    })
                }
            }
            Err(error) => {
                let reason = match error {
                    ureq::Error::Timeout(_) => {
                        format!(
                            "the receiver did not answer within {}s",
                            DELIVERY_TIMEOUT.as_secs()
                        )
                    }
                    other if is_tls_failure(&other) => format!(
                        "TLS with the receiver failed: {} (a self-signed receiver? \
                         trust its certificate with --to-ca FILE)",
                        describe_transport_error(&host_and_port(&self.receiver_url), &other)
                    ),
                    other => format!(
                        "the receiver is unreachable: {}",
                        describe_transport_error(&host_and_port(&self.receiver_url), &other)
                    ),
                };
                Err(AttemptError::Transient {
                    reason,
                    retry_after: None,
                })
            }
        }
    }

    /// POSTs `body` on a thread of its own and waits for the answer unless
    /// the stop's grace period ends first (`None`): a receiver that hangs
    /// must not hold up a stop for the whole delivery timeout. The abandoned
    /// request ends with the process; the update is not confirmed, so it is
    /// delivered again next time.
    fn post_unless_stopped(
        &self,
        body: String,
    ) -> Option<Result<ureq::http::Response<ureq::Body>, ureq::Error>> {
        let agent = self.agent.clone();
        let url = self.receiver_url.clone();
        self.shutdown.unless_reached(Stage::Abandon, move || {
            agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.as_bytes())
        })
    }
}

/// Whether the handshake failed (an untrusted certificate, most often),
/// rather than the connection.
fn is_tls_failure(error: &ureq::Error) -> bool {
    match error {
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) => true,
        ureq::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>()),
        _ => false,
    }
}

/// The longest a receiver gets to answer one delivery.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

impl Handler for ForwardHandler {
    fn handle(&self, update: &Update) -> Result<Outcome, HandleError> {
        // One nonce per update: a redelivery is recognisably the same delivery.
        let nonce = crate::random::hex_id(16);
        let outcome = DELIVERY_RETRIES.run(
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
        );
        match outcome {
            Ok(_) => Ok(Outcome::Delivered),
            // The update cannot be signed as the platform's Python would
            // (a lone surrogate in the message): no retry can change that.
            Err(GaveUp::Fatal(error)) => Err(HandleError::DeadLetter(format!("{error:#}"))),
            Err(GaveUp::Exhausted { last, .. }) => Err(HandleError::Retry(anyhow!(last))),
            Err(GaveUp::Cancelled) => Err(HandleError::Retry(anyhow!(
                "stopped before the receiver answered"
            ))),
        }
    }
}
