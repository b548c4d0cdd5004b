//! Webhook mode's delivery worker: a plain thread with the blocking HTTP
//! client, woken through a channel whenever there is something to deliver.
//!
//! Deliveries are one at a time and in update order. Each attempt is signed
//! afresh (signature v1, a new timestamp, the update's nonce kept), and
//! anything but a 2xx answer is retried with backoff until it succeeds, the
//! webhook is turned off, or the emulator stops, the way the platform
//! redelivers to a receiver that is down.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use ureq::Agent;

use super::Shared;
use super::state::DeliveryJob;
use crate::signature::sign_update_text;

const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A receiver that takes longer than this to answer counts as failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The status recorded for an update that could not be signed and was given up.
const UNSIGNABLE_STATUS: u16 = 0;

pub fn spawn_worker(shared: Arc<Shared>, wakeups: Receiver<()>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("fly-emulator-webhook".into())
        .spawn(move || deliver_until_stopped(&shared, &wakeups))
        .map(drop)
}

fn deliver_until_stopped(shared: &Shared, wakeups: &Receiver<()>) {
    let agent = new_agent();
    while !shared.is_stopping() {
        let Some(job) = shared.lock().next_delivery() else {
            // Nothing to deliver: sleep until a new update or a new configuration.
            match wakeups.recv() {
                Ok(()) => continue,
                Err(_) => return,
            }
        };
        let update_id = job.delivery.update_id;
        match attempt(&agent, &job) {
            Attempt::Delivered(status) => {
                let attempts = job.delivery.failed_attempts + 1;
                tracing::debug!(update_id, status, attempts, "webhook delivered");
                shared.lock().finish_delivery(update_id, status, attempts);
            }
            Attempt::Unsignable(reason) => {
                // Retrying cannot help, and the updates behind it must not wait forever.
                tracing::error!(update_id, "webhook delivery abandoned: {reason}");
                let attempts = job.delivery.failed_attempts + 1;
                shared
                    .lock()
                    .finish_delivery(update_id, UNSIGNABLE_STATUS, attempts);
            }
            Attempt::Failed(reason) => {
                let failures = shared.lock().note_failed_delivery(update_id);
                let delay = retry_delay(failures);
                if failures == 1 {
                    tracing::warn!(
                        update_id,
                        "webhook delivery to {} failed: {reason}; retrying until it answers 2xx",
                        job.target.url
                    );
                } else {
                    tracing::debug!(update_id, failures, "webhook delivery failed: {reason}");
                }
                if !wait_before_retry(shared, wakeups, delay, job.generation) {
                    return;
                }
            }
        }
    }
}

enum Attempt {
    /// The receiver answered with this 2xx status.
    Delivered(u16),
    /// A connection error or a non-2xx answer: try again later.
    Failed(String),
    /// The update cannot be signed exactly; it is given up.
    Unsignable(String),
}

/// One signed POST.
fn attempt(agent: &Agent, job: &DeliveryJob) -> Attempt {
    let now = crate::state::unix_now();
    let signed = match sign_update_text(
        &job.delivery.update,
        &job.target.secret,
        &job.target.bot_id,
        now,
        &job.delivery.nonce,
    ) {
        Ok(signed) => signed,
        Err(error) => return Attempt::Unsignable(format!("cannot sign the update: {error}")),
    };
    let response = agent
        .post(&job.target.url)
        .header("Content-Type", "application/json")
        .send(signed);
    match response {
        Ok(response) if response.status().is_success() => {
            Attempt::Delivered(response.status().as_u16())
        }
        Ok(response) => Attempt::Failed(format!("HTTP {}", response.status().as_u16())),
        Err(error) => Attempt::Failed(error.to_string()),
    }
}

/// 50 ms after the first failure, doubling up to 2 s.
fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_RETRY_DELAY * 2u32.pow(doublings)).min(MAX_RETRY_DELAY)
}

/// Waits `delay`, cut short by a new webhook configuration (try it at once);
/// returns `false` when the emulator stops.
fn wait_before_retry(
    shared: &Shared,
    wakeups: &Receiver<()>,
    delay: Duration,
    generation: u64,
) -> bool {
    let deadline = Instant::now() + delay;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match wakeups.recv_timeout(remaining) {
            Ok(()) if shared.is_stopping() => return false,
            Ok(()) if shared.lock().webhook_generation() != generation => return true,
            // A new update: it queues behind the one being retried.
            Ok(()) => continue,
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

fn new_agent() -> Agent {
    Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(ATTEMPT_TIMEOUT))
        // A local receiver is never reached through a proxy from the environment,
        // and a redirect is not a delivery.
        .proxy(None)
        .max_redirects(0)
        .user_agent(concat!("fly-emulator/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_two_seconds() {
        let delays: Vec<u128> = (1..=8).map(|n| retry_delay(n).as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY_DELAY);
    }
}
