//! Thread helpers: locking that survives a panic in another thread, and
//! waiting for a thread that may have to be given up on.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often `join_unless` looks again; bounds how late a give-up is noticed.
const JOIN_SLICE: Duration = Duration::from_millis(10);

/// Locks `mutex` even if a thread panicked while holding it. fly's mutexes
/// guard data that stays consistent step by step (queues, sets of update ids
/// in flight, the emulator's state, a SQLite connection whose own
/// transactions keep it whole), so one failed handler is no reason to take
/// the whole service down with it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Joins `thread` if it finishes before `give_up` says so; otherwise leaves it
/// running (it ends with the process) and returns `None`.
pub fn join_unless<T>(
    thread: JoinHandle<T>,
    give_up: impl Fn() -> bool,
) -> Option<std::thread::Result<T>> {
    loop {
        if thread.is_finished() {
            return Some(thread.join());
        }
        if give_up() {
            return None;
        }
        std::thread::sleep(JOIN_SLICE);
    }
}
