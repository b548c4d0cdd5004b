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

use super::Shared;
use super::platform::DeliveryJob;
use crate::delivery::{self, Deliverer};
use crate::http_client::ReceiverClient;
use crate::retry::{GaveUp, RetryPolicy};

/// The platform redelivers quickly at first: 50 ms after the first failure,
/// doubling (with jitter) up to 2 s, until the receiver answers 2xx.
const REDELIVERY: RetryPolicy = RetryPolicy {
    max_attempts: None,
    initial_delay: Duration::from_millis(50),
    max_delay: Duration::from_secs(2),
    budget: None,
};
/// The status recorded for an update that could not be signed and was given up.
const UNSIGNABLE_STATUS: u16 = 0;

pub fn spawn_worker(shared: Arc<Shared>, wakeups: Receiver<()>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("fly-emulator-webhook".into())
        .spawn(move || deliver_until_stopped(&shared, &wakeups))
        .map(drop)
}

fn deliver_until_stopped(shared: &Shared, wakeups: &Receiver<()>) {
    let deliverer = Deliverer::new(ReceiverClient {
        connect_timeout: Duration::from_secs(2),
        // A receiver that takes longer than this to answer counts as failed.
        answer_timeout: Duration::from_secs(10),
        trusted: None,
        user_agent: concat!("fly-emulator/", env!("CARGO_PKG_VERSION")),
    });
    while !shared.is_stopping() {
        let Some(job) = shared.lock().next_delivery() else {
            // Nothing to deliver: sleep until a new update or a new configuration.
            match wakeups.recv() {
                Ok(()) => continue,
                Err(_) => return,
            }
        };
        deliver(shared, wakeups, &deliverer, &job);
    }
}

/// Delivers `job` until a 2xx, the update proves unsignable, the webhook
/// configuration changes (the caller takes the job again under the new
/// one) or the emulator stops.
fn deliver(shared: &Shared, wakeups: &Receiver<()>, deliverer: &Deliverer, job: &DeliveryJob) {
    let update_id = job.delivery.update_id;
    let receiver = delivery::Destination {
        url: job.target.url.clone(),
        secret: job.target.secret.clone(),
        bot_id: job.target.bot_id.clone(),
        untrusted_hint: "the emulator trusts the system's certificate authorities only",
    };
    let outcome = REDELIVERY.run(
        |_| deliverer.attempt(&receiver, &job.delivery.update, &job.delivery.nonce),
        |_, reason, _| {
            let failures = shared.lock().note_failed_delivery(update_id, reason);
            if failures == 1 {
                tracing::warn!(
                    update_id,
                    "webhook delivery to {} failed: {reason}; retrying until it answers 2xx",
                    receiver.url
                );
            } else {
                tracing::debug!(update_id, failures, "webhook delivery failed: {reason}");
            }
        },
        |delay| wait_before_retry(shared, wakeups, delay, job.generation),
    );
    match outcome {
        Ok(status) => {
            tracing::debug!(update_id, status, "webhook delivered");
            shared.lock().finish_delivery(update_id, status, None);
        }
        Err(GaveUp::Fatal(reason)) => {
            // Retrying cannot help, and the updates behind it must not wait forever.
            tracing::error!(update_id, "webhook delivery abandoned: {reason:#}");
            shared.lock().finish_delivery(
                update_id,
                UNSIGNABLE_STATUS,
                Some(format!("{reason:#}")),
            );
        }
        // Stopping, or a new configuration: the caller's loop decides.
        Err(GaveUp::Cancelled | GaveUp::Exhausted { .. }) => {}
    }
}

/// Waits `delay`; `false` (stop retrying this job) when the emulator stops
/// or the webhook configuration changes (the job is taken again under it).
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
            Ok(()) if shared.lock().webhook_generation() != generation => return false,
            // A new update: it queues behind the one being retried.
            Ok(()) => continue,
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}
