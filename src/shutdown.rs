//! Clean stops for long-running commands: the first SIGINT/SIGTERM asks the
//! work to stop (finish the update in hand, persist state, exit 0); a second
//! one exits at once, for when a stop is taking too long.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};

/// How often a sleeping loop looks at the stop flag; bounds how late a stop is noticed.
const SLICE: Duration = Duration::from_millis(50);

/// A shared stop flag. Cloning shares it.
#[derive(Clone, Default)]
pub struct Shutdown {
    requested: Arc<AtomicBool>,
}

impl Shutdown {
    /// A flag nobody but the program itself sets (in-process runs such as `fly demo`).
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A flag set by SIGINT or SIGTERM. The second signal exits immediately
    /// with the shell's usual status (130 for SIGINT, 143 for SIGTERM).
    pub fn on_signals() -> anyhow::Result<Shutdown> {
        let shutdown = Shutdown::new();
        for (signal, forced_status) in [(SIGINT, 130), (SIGTERM, 143)] {
            // Order matters: the forced exit is armed only once the flag is
            // already set, i.e. from the second signal on.
            signal_hook::flag::register_conditional_shutdown(
                signal,
                forced_status,
                Arc::clone(&shutdown.requested),
            )
            .context("installing the signal handler")?;
            signal_hook::flag::register(signal, Arc::clone(&shutdown.requested))
                .context("installing the signal handler")?;
        }
        Ok(shutdown)
    }

    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Sleeps for `duration` unless a stop is requested first. Returns `true`
    /// if the whole time passed, `false` if the caller should stop.
    pub fn sleep(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        loop {
            if self.is_requested() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            std::thread::sleep(SLICE.min(deadline - now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_is_cut_short_by_a_request() {
        let shutdown = Shutdown::new();
        let other = shutdown.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            other.request();
        });
        let started = Instant::now();
        assert!(!shutdown.sleep(Duration::from_secs(30)));
        assert!(started.elapsed() < Duration::from_secs(5));
        waker.join().unwrap();
    }

    #[test]
    fn sleep_runs_its_course_without_a_request() {
        assert!(Shutdown::new().sleep(Duration::from_millis(10)));
    }
}
