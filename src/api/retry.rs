//! The retry policy every command shares: which failures are worth another try,
//! and how long to wait before it (capped exponential backoff with jitter,
//! `Retry-After` honoured).
//!
//! The loop itself is here too, so no command writes its own, and so is the
//! one rule for which HTTP failures can succeed later
//! ([`status_is_transient`], [`classify_transport`]): the API client and
//! downloads both ask it.

use std::time::Duration;

/// The longest we are willing to wait because a server said so in `Retry-After`.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How one attempt at a call ended, when it did not succeed.
#[derive(Debug)]
pub enum AttemptError<E> {
    /// Worth another try: connect errors, dropped connections, timeouts, 5xx, 429.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Another try would fail the same way (bad request, token refused, …).
    Fatal(E),
}

/// Why the retry loop gave up.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// An attempt failed in a way retrying cannot fix.
    Fatal(E),
    /// Every allowed attempt failed transiently; `last` says how the last one did.
    Exhausted { attempts: u32, last: String },
    /// The caller asked to stop while we were waiting.
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before giving up; `None` retries for as long as the process runs
    /// (long-running services must never die of a transient failure).
    pub max_attempts: Option<u32>,
    /// Wait after the first failure; doubled after each further one.
    pub initial_delay: Duration,
    /// Upper bound of the doubled wait.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// For one-shot commands (`fly send`, `fly fetch-media`): a handful of tries,
    /// about 10 s of waiting in all before the error is reported.
    pub const ONE_SHOT: RetryPolicy = RetryPolicy {
        max_attempts: Some(6),
        initial_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(5),
    };

    /// For services (`poll-echo`, `forward`): never give up, never hammer.
    pub const FOREVER: RetryPolicy = RetryPolicy {
        max_attempts: None,
        initial_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(30),
    };

    /// The wait before the next attempt, after `failures` failed ones (1-based).
    ///
    /// `jitter` is a number in `[0, 1)`; half of the exponential delay is fixed and
    /// half is scaled by it ("equal jitter"), so many clients that failed together
    /// do not come back together, yet nobody retries immediately.
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        if let Some(asked) = retry_after {
            return asked.min(MAX_RETRY_AFTER);
        }
        let doublings = failures.saturating_sub(1).min(31);
        let exponential = self
            .initial_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay);
        let half = exponential / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// [`RetryPolicy::delay`] with random jitter.
    pub fn next_delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        self.delay(failures, retry_after, random_unit())
    }

    /// Runs `attempt` until it succeeds, fails fatally, runs out of attempts, or
    /// `wait` reports that the caller wants to stop (it returns `false`).
    ///
    /// `on_retry` is told about each transient failure before the wait, so the
    /// caller can log it in its own words.
    pub fn run<T, E>(
        &self,
        mut attempt: impl FnMut(u32) -> Result<T, AttemptError<E>>,
        mut on_retry: impl FnMut(u32, &str, Duration),
        mut wait: impl FnMut(Duration) -> bool,
    ) -> Result<T, GaveUp<E>> {
        let mut failures = 0u32;
        loop {
            match attempt(failures + 1) {
                Ok(value) => return Ok(value),
                Err(AttemptError::Fatal(error)) => return Err(GaveUp::Fatal(error)),
                Err(AttemptError::Transient {
                    reason,
                    retry_after,
                }) => {
                    failures += 1;
                    if self.max_attempts.is_some_and(|max| failures >= max) {
                        return Err(GaveUp::Exhausted {
                            attempts: failures,
                            last: reason,
                        });
                    }
                    let delay = self.next_delay(failures, retry_after);
                    on_retry(failures, &reason, delay);
                    if !wait(delay) {
                        return Err(GaveUp::Cancelled);
                    }
                }
            }
        }
    }
}

/// Whether an HTTP status is worth another try: 429 (slow down) and 5xx,
/// except 501 (the server does not implement what was asked, and will not
/// later). Everything else is the server's final word.
pub fn status_is_transient(status: u16) -> bool {
    status == 429 || ((500..=599).contains(&status) && status != 501)
}

/// What a failure without a usable HTTP answer says about another try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportFailure {
    /// The network: refused or dropped connections, DNS, timeouts, TLS.
    /// Worth another try.
    Transient,
    /// The server answered in HTTP nobody can read (a non-numeric or
    /// conflicting `Content-Length`, too many or too large headers, broken
    /// chunking): it would answer the same way again.
    Malformed,
    /// The request cannot be made at all (a bad URL, an unsupported scheme,
    /// a header that is not valid).
    Unusable,
}

/// Sorts a ureq failure by [`TransportFailure`].
pub fn classify_transport(error: &ureq::Error) -> TransportFailure {
    use ureq::Error;
    match error {
        Error::Protocol(_)
        | Error::LargeResponseHeader(..)
        | Error::BodyExceedsLimit(_)
        | Error::Json(_) => TransportFailure::Malformed,
        Error::BadUri(_)
        | Error::Http(_)
        | Error::InvalidProxyUrl
        | Error::TooManyRedirects
        | Error::RedirectFailed
        | Error::RequireHttpsOnly(_)
        | Error::TlsRequired
        | Error::Pem(_) => TransportFailure::Unusable,
        // Connect and read failures, timeouts, TLS (a handshake cut short
        // looks the same as a bad certificate from here), and whatever a
        // later ureq adds.
        _ => TransportFailure::Transient,
    }
}

/// Parses `Retry-After`: seconds (what the platform sends) or an HTTP date
/// (what a proxy or CDN in front of it may send). A date already past means
/// "now". Anything else is ignored and our own backoff applies.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    parse_retry_after_at(value, std::time::SystemTime::now())
}

fn parse_retry_after_at(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A random number in `[0, 1)` for jitter.
fn random_unit() -> f64 {
    let bits = crate::random::u64() >> 11; // 53 significant bits
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: Some(4),
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(1000),
    };

    #[test]
    fn delay_doubles_and_is_capped() {
        // jitter 0 gives the lower half, jitter 1 the full exponential value.
        let table = [
            (1, 0.0, 50),
            (2, 0.0, 100),
            (3, 0.0, 200),
            (4, 0.0, 400),
            (5, 0.0, 500),
            (40, 0.0, 500),
            (1, 1.0, 100),
            (4, 1.0, 800),
            (9, 1.0, 1000),
        ];
        for (failures, jitter, expected_ms) in table {
            let got = POLICY.delay(failures, None, jitter).as_millis();
            assert_eq!(got, expected_ms, "failures={failures} jitter={jitter}");
        }
    }

    #[test]
    fn retry_after_wins_but_is_bounded() {
        let asked = Some(Duration::from_secs(3));
        assert_eq!(POLICY.delay(1, asked, 0.5), Duration::from_secs(3));
        let absurd = Some(Duration::from_secs(86_400));
        assert_eq!(POLICY.delay(1, absurd, 0.5), MAX_RETRY_AFTER);
    }

    #[test]
    fn only_what_can_succeed_later_is_transient() {
        for status in [429, 500, 502, 503, 504, 599] {
            assert!(status_is_transient(status), "{status}");
        }
        for status in [200, 301, 400, 401, 403, 404, 408, 413, 501] {
            assert!(!status_is_transient(status), "{status}");
        }
        let table = [
            (ureq::Error::ConnectionFailed, TransportFailure::Transient),
            (ureq::Error::HostNotFound, TransportFailure::Transient),
            (
                ureq::Error::Io(std::io::ErrorKind::ConnectionReset.into()),
                TransportFailure::Transient,
            ),
            (
                ureq::Error::LargeResponseHeader(70_000, 65_536),
                TransportFailure::Malformed,
            ),
            (
                ureq::Error::BadUri("unknown scheme: ftp".into()),
                TransportFailure::Unusable,
            ),
            (ureq::Error::TooManyRedirects, TransportFailure::Unusable),
        ];
        for (error, expected) in table {
            assert_eq!(classify_transport(&error), expected, "{error}");
        }
    }

    #[test]
    fn retry_after_header_parsing() {
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after_at("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after_at("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO),
            "a date already past"
        );
        for ignored in ["-1", "soon", "1.5", ""] {
            assert_eq!(parse_retry_after(ignored), None, "{ignored:?}");
        }
    }

    fn transient<E>() -> AttemptError<E> {
        AttemptError::Transient {
            reason: "HTTP 503".into(),
            retry_after: None,
        }
    }

    #[test]
    fn succeeds_after_transient_failures() {
        let waits = RefCell::new(Vec::new());
        let result: Result<u32, GaveUp<()>> = POLICY.run(
            |n| if n < 3 { Err(transient()) } else { Ok(n) },
            |_, _, _| {},
            |d| {
                waits.borrow_mut().push(d);
                true
            },
        );
        assert!(matches!(result, Ok(3)));
        assert_eq!(waits.borrow().len(), 2);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let mut calls = 0;
        let result: Result<(), GaveUp<()>> = POLICY.run(
            |_| {
                calls += 1;
                Err(transient())
            },
            |_, _, _| {},
            |_| true,
        );
        assert_eq!(calls, 4);
        assert!(matches!(result, Err(GaveUp::Exhausted { attempts: 4, .. })));
    }

    #[test]
    fn fatal_errors_are_not_retried() {
        let mut calls = 0;
        let result: Result<(), GaveUp<&str>> = POLICY.run(
            |_| {
                calls += 1;
                Err(AttemptError::Fatal("token refused"))
            },
            |_, _, _| {},
            |_| true,
        );
        assert_eq!(calls, 1);
        assert!(matches!(result, Err(GaveUp::Fatal("token refused"))));
    }

    #[test]
    fn a_stop_request_ends_the_wait() {
        let result: Result<(), GaveUp<()>> =
            RetryPolicy::FOREVER.run(|_| Err(transient()), |_, _, _| {}, |_| false);
        assert!(matches!(result, Err(GaveUp::Cancelled)));
    }
}
