//! The retry policy every command shares: which failures are worth another try,
//! how long to wait before it (capped exponential backoff with jitter,
//! `Retry-After` honoured), and how long a call may go on failing in all.
//!
//! The loop itself is here too, so no command writes its own, and so is the
//! one rule for which HTTP failures can succeed later
//! ([`status_is_transient`], [`classify_transport`]): the API client and
//! downloads both ask it.
//!
//! A policy's budget (SPEC section 2) is wall-clock time from the first
//! attempt, the attempts themselves included, not only the waits: a one-shot
//! command gives up within about 30 s, and a `Retry-After` longer than what is
//! left of that fails at once rather than after a wait that cannot help.
//! Policies without a budget (services) honour `Retry-After` up to 5 minutes.

use std::fmt;
use std::time::{Duration, Instant};

/// The longest we are willing to wait because a server said so in `Retry-After`.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A wait is only worth taking if at least this much of the budget is left
/// after it for the attempt that follows.
const LAST_ATTEMPT_TIME: Duration = Duration::from_secs(1);

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

/// What the loop tells an attempt, and what the attempt can tell the loop.
#[derive(Debug)]
pub struct Attempt {
    /// 1 for the first attempt: what the tests script outcomes by.
    #[cfg(test)]
    pub number: u32,
    /// What is left of the policy's budget: an attempt that can bound its own
    /// duration (a request timeout) should, so the budget holds in all.
    /// `None` when the policy has no budget.
    pub time_left: Option<Duration>,
    progressed: bool,
}

impl Attempt {
    /// This attempt got somewhere before it failed (a download received bytes
    /// the next attempt resumes from, beyond any earlier attempt): the budget
    /// starts again when it ends. Failing is what the budget bounds, not a
    /// transfer that keeps moving.
    pub fn made_progress(&mut self) {
        self.progressed = true;
    }
}

/// Why the retry loop gave up.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// An attempt failed in a way retrying cannot fix.
    Fatal(E),
    /// Attempts failed transiently until `limit` ran out; `last` says how the
    /// last one did.
    Exhausted {
        attempts: u32,
        last: String,
        limit: Limit,
    },
    /// The caller asked to stop while we were waiting.
    Cancelled,
}

/// What ran out when the loop stopped retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The policy's `max_attempts`.
    Attempts,
    /// The policy's budget: no time left for another wait and attempt.
    Time { budget: Duration },
    /// The server asked (`Retry-After`) for a longer wait than the budget has
    /// left, so the loop gave up at once instead of waiting.
    RetryAfter(WaitTooLong),
}

/// A `Retry-After` the budget cannot honour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitTooLong {
    /// What the server asked for.
    pub asked: Duration,
    /// The longest wait the budget had left (room for one more attempt kept).
    pub left: Duration,
    /// The policy's whole budget.
    pub budget: Duration,
}

impl fmt::Display for WaitTooLong {
    /// `asked to wait 300 s (Retry-After), more than the ~30 s this command
    /// retries for`; the caller says who asked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let asked = whole_seconds_up(self.asked);
        let budget = self.budget.as_secs();
        write!(f, "asked to wait {asked} s (Retry-After), more than the ")?;
        if self.asked + LAST_ATTEMPT_TIME > self.budget {
            // It could never have fitted, whenever it was asked.
            write!(f, "~{budget} s this command retries for")
        } else {
            let left = self.left.as_secs();
            write!(
                f,
                "{left} s left of the ~{budget} s this command retries for"
            )
        }
    }
}

impl Limit {
    /// ` in about 30 s` for a spent budget, for "failed after N attempts…".
    pub fn spent(&self) -> String {
        match self {
            Limit::Time { budget } => format!(
                " in about {} s (as long as this command retries)",
                budget.as_secs()
            ),
            Limit::Attempts | Limit::RetryAfter(_) => String::new(),
        }
    }
}

/// `1 attempt`, `3 attempts`.
pub fn attempts_text(attempts: u32) -> String {
    if attempts == 1 {
        "1 attempt".to_string()
    } else {
        format!("{attempts} attempts")
    }
}

fn whole_seconds_up(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
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
    /// How long a call may go on failing, attempts and waits included, counted
    /// from the first attempt (or from the end of the last one that made
    /// progress). `None`: no limit but `max_attempts`, and `Retry-After` is
    /// honoured up to 5 minutes.
    pub budget: Option<Duration>,
}

impl RetryPolicy {
    /// For one-shot commands (`fly send`, `fly fetch-media`, `poll-echo
    /// --once`): a handful of tries, and within about 30 s in all the error is
    /// reported.
    pub const ONE_SHOT: RetryPolicy = RetryPolicy {
        max_attempts: Some(6),
        initial_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(5),
        budget: Some(Duration::from_secs(30)),
    };

    /// For services (`poll-echo`, `forward`): never give up, never hammer.
    pub const FOREVER: RetryPolicy = RetryPolicy {
        max_attempts: None,
        initial_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(30),
        budget: None,
    };

    /// The wait before the next attempt, after `failures` failed ones
    /// (1-based), leaving the budget aside (in [`RetryPolicy::run`] a budget
    /// may shorten the wait or refuse it).
    ///
    /// `jitter` is a number in `[0, 1)`; half of the exponential delay is fixed and
    /// half is scaled by it ("equal jitter"), so many clients that failed together
    /// do not come back together, yet nobody retries immediately.
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        match retry_after {
            Some(asked) => asked.min(MAX_RETRY_AFTER),
            None => self.backoff(failures, jitter),
        }
    }

    /// [`RetryPolicy::delay`] with random jitter.
    pub fn next_delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        self.delay(failures, retry_after, random_unit())
    }

    /// Capped exponential backoff with equal jitter.
    fn backoff(&self, failures: u32, jitter: f64) -> Duration {
        fly_base::backoff::delay(self.initial_delay, self.max_delay, failures, jitter)
    }

    /// The wait before the next attempt, or why there is none: `elapsed` is
    /// the time spent failing so far (see [`RetryPolicy::budget`]).
    fn wait_before_retry(
        &self,
        failures: u32,
        retry_after: Option<Duration>,
        elapsed: Duration,
        jitter: f64,
    ) -> Result<Duration, Limit> {
        let Some(budget) = self.budget else {
            return Ok(self.delay(failures, retry_after, jitter));
        };
        let left = budget
            .saturating_sub(elapsed)
            .saturating_sub(LAST_ATTEMPT_TIME);
        match retry_after {
            Some(asked) if asked > left => Err(Limit::RetryAfter(WaitTooLong {
                asked,
                left,
                budget,
            })),
            Some(asked) => Ok(asked.min(MAX_RETRY_AFTER)),
            // Our own backoff is only a suggestion: the last wait is cut to fit.
            None if left.is_zero() => Err(Limit::Time { budget }),
            None => Ok(self.backoff(failures, jitter).min(left)),
        }
    }

    /// Runs `attempt` until it succeeds, fails fatally, runs out of attempts
    /// or budget, or `wait` reports that the caller wants to stop (it returns
    /// `false`).
    ///
    /// `on_retry` is told about each transient failure before the wait, so the
    /// caller can log it in its own words.
    pub fn run<T, E>(
        &self,
        attempt: impl FnMut(&mut Attempt) -> Result<T, AttemptError<E>>,
        on_retry: impl FnMut(u32, &str, Duration),
        wait: impl FnMut(Duration) -> bool,
    ) -> Result<T, GaveUp<E>> {
        self.run_timed(Instant::now, random_unit, attempt, on_retry, wait)
    }

    /// [`RetryPolicy::run`] with the clock and the jitter passed in, so tests
    /// can drive time (`wait` is the sleeper) without sleeping.
    fn run_timed<T, E>(
        &self,
        now: impl Fn() -> Instant,
        mut jitter: impl FnMut() -> f64,
        mut attempt: impl FnMut(&mut Attempt) -> Result<T, AttemptError<E>>,
        mut on_retry: impl FnMut(u32, &str, Duration),
        mut wait: impl FnMut(Duration) -> bool,
    ) -> Result<T, GaveUp<E>> {
        let mut failing_since = now();
        let mut failures = 0u32;
        loop {
            let mut this = Attempt {
                #[cfg(test)]
                number: failures + 1,
                time_left: self
                    .budget
                    .map(|budget| budget.saturating_sub(now() - failing_since)),
                progressed: false,
            };
            let (reason, retry_after) = match attempt(&mut this) {
                Ok(value) => return Ok(value),
                Err(AttemptError::Fatal(error)) => return Err(GaveUp::Fatal(error)),
                Err(AttemptError::Transient {
                    reason,
                    retry_after,
                }) => (reason, retry_after),
            };
            failures += 1;
            if this.progressed {
                failing_since = now();
            }
            let gave_up = |limit| GaveUp::Exhausted {
                attempts: failures,
                last: reason.clone(),
                limit,
            };
            if self.max_attempts.is_some_and(|max| failures >= max) {
                return Err(gave_up(Limit::Attempts));
            }
            let elapsed = now() - failing_since;
            let delay = self
                .wait_before_retry(failures, retry_after, elapsed, jitter())
                .map_err(gave_up)?;
            on_retry(failures, &reason, delay);
            if !wait(delay) {
                return Err(GaveUp::Cancelled);
            }
        }
    }
}

/// A response whose status is worth another try ([`status_is_transient`]),
/// as the failure the retry loop waits on: for as long as its `Retry-After`
/// asks, if it says. `None` for any other status. `reason(status)` says it.
pub fn transient_response<B, E>(
    response: &ureq::http::Response<B>,
    reason: impl FnOnce(u16) -> String,
) -> Option<AttemptError<E>> {
    let status = response.status().as_u16();
    if !status_is_transient(status) {
        return None;
    }
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_retry_after);
    Some(AttemptError::Transient {
        reason: reason(status),
        retry_after,
    })
}

/// Whether an HTTP status is worth another try: 429 (slow down) and 5xx,
/// except 501 (the server does not implement what was asked, and will not
/// later). Everything else is the server's final word.
fn status_is_transient(status: u16) -> bool {
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
    /// An `https://` URL whose server speaks plain HTTP
    /// ([`answered_plain_http`](crate::http_client::answered_plain_http)):
    /// it answers the same way every time.
    PlainHttp,
}

/// Sorts a ureq failure by [`TransportFailure`].
pub fn classify_transport(error: &ureq::Error) -> TransportFailure {
    use ureq::Error;
    if crate::http_client::answered_plain_http(error) {
        return TransportFailure::PlainHttp;
    }
    match error {
        Error::Protocol(_) | Error::LargeResponseHeader(..) | Error::BodyExceedsLimit(_) => {
            TransportFailure::Malformed
        }
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
fn parse_retry_after(value: &str) -> Option<Duration> {
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
    fly_base::random::unit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: Some(4),
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(1000),
        budget: None,
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

    /// The one reading of a response the API client and downloads share:
    /// which statuses are retried, and the wait `Retry-After` asks.
    #[test]
    fn a_retried_response_carries_its_retry_after() {
        let response = |status: u16, retry_after: Option<&str>| {
            let mut builder = ureq::http::Response::builder().status(status);
            if let Some(value) = retry_after {
                builder = builder.header("Retry-After", value);
            }
            builder.body(()).unwrap()
        };
        let said = |status: u16, retry_after: Option<&str>| {
            transient_response::<_, ()>(&response(status, retry_after), |status| {
                format!("HTTP {status}")
            })
            .map(|failure| match failure {
                AttemptError::Transient {
                    reason,
                    retry_after,
                } => (reason, retry_after),
                AttemptError::Fatal(()) => unreachable!("only transient failures"),
            })
        };
        assert_eq!(
            said(503, Some("7")),
            Some(("HTTP 503".into(), Some(Duration::from_secs(7))))
        );
        assert_eq!(said(429, None), Some(("HTTP 429".into(), None)));
        assert_eq!(said(502, Some("soon")), Some(("HTTP 502".into(), None)));
        for status in [200, 206, 404, 501] {
            assert_eq!(said(status, Some("7")), None, "{status}");
        }
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
            (
                ureq::Error::Rustls(tokio_rustls::rustls::Error::InvalidMessage(
                    tokio_rustls::rustls::InvalidMessage::InvalidContentType,
                )),
                TransportFailure::PlainHttp,
            ),
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

    fn asked_to_wait<E>(seconds: u64) -> AttemptError<E> {
        AttemptError::Transient {
            reason: "HTTP 429".into(),
            retry_after: Some(Duration::from_secs(seconds)),
        }
    }

    /// A clock that moves only when told: attempts advance it by how long
    /// they take, the sleeper by how long it was asked to wait.
    struct FakeClock {
        start: Instant,
        elapsed: Cell<Duration>,
    }

    impl FakeClock {
        fn new() -> FakeClock {
            FakeClock {
                start: Instant::now(),
                elapsed: Cell::new(Duration::ZERO),
            }
        }
        fn now(&self) -> Instant {
            self.start + self.elapsed.get()
        }
        fn advance(&self, by: Duration) {
            self.elapsed.set(self.elapsed.get() + by);
        }
        fn elapsed(&self) -> Duration {
            self.elapsed.get()
        }
    }

    /// What one run did: its result, the waits asked for, the time left
    /// each attempt was told, and the fake time it took in all.
    struct Run<T, E> {
        result: Result<T, GaveUp<E>>,
        waits: Vec<Duration>,
        time_left: Vec<Option<Duration>>,
        elapsed: Duration,
    }

    /// Runs `policy` on a fake clock with jitter 1 (the full backoff): each
    /// attempt takes `attempt_takes` or the time it is told is left, if
    /// less (as a request bounded by a timeout), then `outcome(attempt)`
    /// decides how it ended.
    fn run_on_fake_clock<T, E>(
        policy: RetryPolicy,
        attempt_takes: Duration,
        mut outcome: impl FnMut(&mut Attempt) -> Result<T, AttemptError<E>>,
    ) -> Run<T, E> {
        let clock = FakeClock::new();
        let waits = RefCell::new(Vec::new());
        let time_left = RefCell::new(Vec::new());
        let result = policy.run_timed(
            || clock.now(),
            || 1.0,
            |attempt| {
                time_left.borrow_mut().push(attempt.time_left);
                clock.advance(attempt_takes.min(attempt.time_left.unwrap_or(Duration::MAX)));
                outcome(attempt)
            },
            |_, _, _| {},
            |delay| {
                waits.borrow_mut().push(delay);
                clock.advance(delay);
                true
            },
        );
        Run {
            result,
            waits: waits.into_inner(),
            time_left: time_left.into_inner(),
            elapsed: clock.elapsed(),
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn succeeds_after_transient_failures() {
        let run = run_on_fake_clock(POLICY, Duration::ZERO, |attempt| {
            if attempt.number < 3 {
                Err(transient::<()>())
            } else {
                Ok(attempt.number)
            }
        });
        assert!(matches!(run.result, Ok(3)));
        assert_eq!(run.waits.len(), 2);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let mut calls = 0;
        let run = run_on_fake_clock(POLICY, Duration::ZERO, |_| {
            calls += 1;
            Err::<(), _>(transient::<()>())
        });
        assert_eq!(calls, 4);
        assert!(matches!(
            run.result,
            Err(GaveUp::Exhausted {
                attempts: 4,
                limit: Limit::Attempts,
                ..
            })
        ));
    }

    #[test]
    fn fatal_errors_are_not_retried() {
        let mut calls = 0;
        let run = run_on_fake_clock(POLICY, Duration::ZERO, |_| {
            calls += 1;
            Err::<(), _>(AttemptError::Fatal("token refused"))
        });
        assert_eq!(calls, 1);
        assert!(matches!(run.result, Err(GaveUp::Fatal("token refused"))));
        assert!(run.waits.is_empty());
    }

    #[test]
    fn a_stop_request_ends_the_wait() {
        let result: Result<(), GaveUp<()>> =
            RetryPolicy::FOREVER.run(|_| Err(transient()), |_, _, _| {}, |_| false);
        assert!(matches!(result, Err(GaveUp::Cancelled)));
    }

    /// The issue this budget fixes: 429 with `Retry-After: 300` made `fly
    /// send` wait 5 minutes, up to 5 times. Now it fails at once, saying how
    /// long the platform asked for.
    #[test]
    fn one_shot_fails_at_once_when_retry_after_exceeds_the_budget() {
        let mut calls = 0;
        let run = run_on_fake_clock(RetryPolicy::ONE_SHOT, 100 * MS, |_| {
            calls += 1;
            Err::<(), _>(asked_to_wait::<()>(300))
        });
        assert_eq!(calls, 1);
        assert!(run.waits.is_empty(), "no wait at all: {:?}", run.waits);
        let Err(GaveUp::Exhausted {
            attempts: 1,
            last,
            limit: Limit::RetryAfter(wait),
        }) = run.result
        else {
            panic!("expected a Retry-After refusal, got {:?}", run.result);
        };
        assert_eq!(last, "HTTP 429");
        assert_eq!(wait.asked, 300 * SECOND);
        assert_eq!(wait.budget, 30 * SECOND);
        assert_eq!(
            wait.to_string(),
            "asked to wait 300 s (Retry-After), more than the ~30 s this command retries for"
        );
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_retry_after_that_fits_is_honoured_exactly() {
        let run = run_on_fake_clock(RetryPolicy::ONE_SHOT, 100 * MS, |attempt| {
            if attempt.number == 1 {
                Err(asked_to_wait::<()>(2))
            } else {
                Ok(())
            }
        });
        assert!(run.result.is_ok());
        assert_eq!(run.waits, [2 * SECOND]);
    }

    /// Each 10 s wait fits at first; the third would end past the budget,
    /// counting the time the requests took, so the loop stops there.
    #[test]
    fn retry_after_is_weighed_against_what_is_left() {
        let run = run_on_fake_clock(RetryPolicy::ONE_SHOT, 500 * MS, |_| {
            Err::<(), _>(asked_to_wait::<()>(10))
        });
        assert_eq!(run.waits, [10 * SECOND, 10 * SECOND]);
        let Err(GaveUp::Exhausted {
            attempts: 3,
            limit: Limit::RetryAfter(wait),
            ..
        }) = run.result
        else {
            panic!("expected a Retry-After refusal, got {:?}", run.result);
        };
        // 21.5 s spent, 1 s kept for an attempt after the wait.
        assert_eq!(wait.left, Duration::from_millis(7_500));
        assert_eq!(
            wait.to_string(),
            "asked to wait 10 s (Retry-After), more than the 7 s left of the ~30 s \
             this command retries for"
        );
        assert!(run.elapsed <= 30 * SECOND);
    }

    /// Slow failures (each attempt takes 6 s, as a timeout would) count:
    /// with attempts to spare, the budget ends the loop, the last backoff
    /// wait is cut so that one more attempt fits, and each attempt is told
    /// what is left so it can bound its own request.
    #[test]
    fn the_budget_counts_the_attempts_and_cuts_the_last_wait() {
        let policy = RetryPolicy {
            max_attempts: None,
            initial_delay: 2 * SECOND,
            max_delay: 8 * SECOND,
            budget: Some(30 * SECOND),
        };
        let run = run_on_fake_clock(policy, 6 * SECOND, |_| Err::<(), _>(transient::<()>()));
        // 6 + 2 + 6 + 4 + 6 = 24 s: an 8 s wait would leave nothing for
        // the attempt after it, so it is cut to 5 s, leaving 1 s.
        assert_eq!(run.waits, [2 * SECOND, 4 * SECOND, 5 * SECOND]);
        assert_eq!(
            run.time_left,
            [
                Some(30 * SECOND),
                Some(22 * SECOND),
                Some(12 * SECOND),
                Some(SECOND)
            ]
        );
        assert!(matches!(
            run.result,
            Err(GaveUp::Exhausted {
                attempts: 4,
                limit: Limit::Time { .. },
                ..
            })
        ));
        assert_eq!(run.elapsed, 30 * SECOND);
    }

    /// A server that never answers: each request runs into its timeout,
    /// and the whole run still ends within the budget.
    #[test]
    fn a_silent_server_is_given_up_on_within_the_budget() {
        let run = run_on_fake_clock(RetryPolicy::ONE_SHOT, 20 * SECOND, |_| {
            Err::<(), _>(transient::<()>())
        });
        assert!(matches!(
            run.result,
            Err(GaveUp::Exhausted {
                attempts: 2,
                limit: Limit::Time { .. },
                ..
            })
        ));
        assert!(run.elapsed <= 30 * SECOND, "{:?}", run.elapsed);
    }

    #[test]
    fn services_honour_retry_after_up_to_5_minutes() {
        let run = run_on_fake_clock(RetryPolicy::FOREVER, 100 * MS, |attempt| {
            match attempt.number {
                1 => Err(asked_to_wait::<()>(240)),
                2 => Err(asked_to_wait(86_400)),
                _ => Ok(()),
            }
        });
        assert!(run.result.is_ok());
        assert_eq!(run.waits, [240 * SECOND, MAX_RETRY_AFTER]);
        assert_eq!(run.time_left, [None, None, None]);
    }

    /// A transfer that keeps moving is not failing: each attempt that made
    /// progress starts the budget again, so a long download that breaks now
    /// and then is resumed to the end, while one that stalls gives up.
    #[test]
    fn progress_starts_the_budget_again() {
        let policy = RetryPolicy {
            max_attempts: None,
            ..RetryPolicy::ONE_SHOT
        };
        let run = run_on_fake_clock(policy, 20 * SECOND, |attempt| {
            if attempt.number < 5 {
                attempt.made_progress();
                Err(transient::<()>())
            } else {
                Ok(())
            }
        });
        assert!(run.result.is_ok(), "{:?}", run.result.err());
        assert!(run.elapsed > 90 * SECOND);

        let stalled = run_on_fake_clock(policy, 20 * SECOND, |_| Err::<(), _>(transient::<()>()));
        assert!(matches!(
            stalled.result,
            Err(GaveUp::Exhausted {
                attempts: 2,
                limit: Limit::Time { .. },
                ..
            })
        ));
    }

    #[test]
    fn gave_up_texts() {
        assert_eq!(attempts_text(1), "1 attempt");
        assert_eq!(attempts_text(6), "6 attempts");
        let budget = 30 * SECOND;
        assert_eq!(
            Limit::Time { budget }.spent(),
            " in about 30 s (as long as this command retries)"
        );
        assert_eq!(Limit::Attempts.spent(), "");
        // A date-form Retry-After is rarely whole seconds: rounded up.
        let wait = WaitTooLong {
            asked: Duration::from_millis(45_200),
            left: 20 * SECOND,
            budget,
        };
        assert_eq!(
            wait.to_string(),
            "asked to wait 46 s (Retry-After), more than the ~30 s this command retries for"
        );
    }
}
