//! Locking that survives a panic in another thread.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex` even if a thread panicked while holding it. fly's mutexes
/// guard data that stays consistent step by step (queues, sets of update ids
/// in flight, the emulator's state, a SQLite connection whose own
/// transactions keep it whole), so one failed handler is no reason to take
/// the whole service down with it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
