//! How long to wait after failures in a row: the one formula the retry loop
//! (`retry.rs`) and the state store's standby pollers share.

use std::time::Duration;

/// Capped exponential backoff with "equal jitter": after `failures` failed
/// attempts (1-based) the delay doubles from `initial` up to `max`; half of
/// it is fixed and half is scaled by `jitter` (a number in `[0, 1)`), so
/// that many clients that failed together do not all come back at once, and
/// none comes back at once.
pub fn delay(initial: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    let exponential = initial.saturating_mul(1u32 << doublings).min(max);
    let half = exponential / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_half_of_it_jittered() {
        let (initial, max) = (Duration::from_millis(200), Duration::from_secs(30));
        assert_eq!(delay(initial, max, 1, 0.0), Duration::from_millis(100));
        assert_eq!(
            delay(initial, max, 1, 0.999_999),
            Duration::from_nanos(199_999_900)
        );
        assert_eq!(delay(initial, max, 3, 0.5), Duration::from_millis(600));
        assert_eq!(delay(initial, max, 40, 0.0), Duration::from_secs(15));
        assert_eq!(delay(initial, max, u32::MAX, 2.0), Duration::from_secs(30));
    }
}
