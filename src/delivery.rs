//! A signed webhook delivery, as the platform makes it: the update signed
//! (v1) afresh for each attempt, with a new timestamp and the update's own
//! nonce, and POSTed to a receiver; anything but a 2xx is a failed attempt,
//! retried by the caller with [`RetryPolicy::run`](crate::retry::RetryPolicy::run).
//! `fly forward` delivers to your receiver this way, and the emulator's
//! webhook mode is the platform doing it.

use std::time::Duration;

use ureq::Agent;

use crate::api::{describe_transport_error, host_and_port};
use crate::http_client::{self, PlainHttp, Profile, ReceiverClient};
use crate::retry::AttemptError;
use fly_base::clock::unix_now;
use fly_signature::sign_update_text;

/// Where deliveries go and how they are signed.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    pub url: String,
    pub secret: String,
    pub bot_id: String,
    /// What to do about a receiver whose certificate is not trusted, in the
    /// words of the command that delivers (its option, if it has one).
    pub untrusted_hint: &'static str,
}

/// Makes signed deliveries; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Deliverer {
    agent: Agent,
    answer_timeout: Duration,
}

impl Deliverer {
    pub fn new(client: ReceiverClient) -> Deliverer {
        Deliverer {
            answer_timeout: client.answer_timeout,
            agent: http_client::agent(Profile::Receiver(client)),
        }
    }

    /// One attempt: `raw` (the update's JSON text) signed now with `nonce`
    /// and POSTed. `Ok(status)` for a 2xx; a transient error, with the reason
    /// in words, for anything else; fatal when the update cannot be signed
    /// the way the platform's Python would, or when an `https://` receiver
    /// answers in plain HTTP ([`PlainHttp`]): no retry can change those.
    pub fn attempt(
        &self,
        receiver: &Destination,
        raw: &str,
        nonce: &str,
    ) -> Result<u16, AttemptError<anyhow::Error>> {
        let signed = sign_update_text(raw, &receiver.secret, &receiver.bot_id, unix_now(), nonce)
            .map_err(|error| {
            AttemptError::Fatal(anyhow::Error::new(error).context("cannot sign the update"))
        })?;
        let failed = |reason: String| AttemptError::Transient {
            reason,
            retry_after: None,
        };
        match self
            .agent
            .post(&receiver.url)
            .header("Content-Type", "application/json")
            .send(signed.as_bytes())
        {
            Ok(response) if response.status().is_success() => Ok(response.status().as_u16()),
            Ok(response) => Err(failed(format!(
                "the receiver answered HTTP {}",
                response.status().as_u16()
            ))),
            Err(ureq::Error::Timeout(_)) => Err(failed(format!(
                "the receiver did not answer within {}s",
                self.answer_timeout.as_secs()
            ))),
            // The receiver answers the same way every time: no retry helps.
            Err(error) if http_client::answered_plain_http(&error) => {
                Err(AttemptError::Fatal(anyhow::Error::new(PlainHttp {
                    url: receiver.url.clone(),
                })))
            }
            Err(error) => {
                let described = describe_transport_error(&host_and_port(&receiver.url), &error);
                Err(failed(if is_tls_failure(&error) {
                    format!(
                        "TLS with the receiver failed: {described} (a self-signed receiver? {})",
                        receiver.untrusted_hint
                    )
                } else {
                    format!("the receiver is unreachable: {described}")
                }))
            }
        }
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
