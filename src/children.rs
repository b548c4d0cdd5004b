//! The process groups of handlers running right now, so that no exit path
//! leaves one behind (SPEC section 2): a forced stop, an error that ends the
//! command, a panic. Each `--exec` handler runs in a process group of its own
//! (its shell and everything it starts) and is registered here while it runs.
//!
//! Why a process-wide registry: the forced stop happens on the signal thread
//! and the final cleanup in `main`, neither of which knows the handlers.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::sync::lock;

static RUNNING: Mutex<BTreeSet<libc::pid_t>> = Mutex::new(BTreeSet::new());

/// A registered process group; unregistered when dropped. Dropped while its
/// leader may still run (a panic unwinding, an early return) it kills the
/// group, so a handler never outlives the code that waits for it.
#[derive(Debug)]
pub struct Group {
    id: libc::pid_t,
    reaped: bool,
}

impl Group {
    /// Registers the group led by the child `pid` (spawned with `process_group(0)`).
    pub fn register(pid: u32) -> Option<Group> {
        let id = libc::pid_t::try_from(pid).ok()?;
        lock(&RUNNING).insert(id);
        Some(Group { id, reaped: false })
    }

    /// SIGKILL to every process of the group.
    pub fn kill(&self) {
        kill_group(self.id);
    }

    pub fn id(&self) -> libc::pid_t {
        self.id
    }

    /// The leader has been waited for: dropping the group no longer kills it
    /// (a background job the handler started on purpose may live on).
    pub fn leader_reaped(&mut self) {
        self.reaped = true;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        lock(&RUNNING).remove(&self.id);
        if !self.reaped {
            kill_group(self.id);
        }
    }
}

/// Kills every registered group: the forced stop and the last step of `main`.
pub fn kill_all() {
    let running: Vec<libc::pid_t> = lock(&RUNNING).iter().copied().collect();
    for id in running {
        kill_group(id);
    }
}

/// Kills every registered group when dropped: held by `main` for its whole run.
pub struct KillAllOnDrop;

impl Drop for KillAllOnDrop {
    fn drop(&mut self) {
        kill_all();
    }
}

/// How many groups are registered (for tests and the stop log).
pub fn running() -> usize {
    lock(&RUNNING).len()
}

/// SIGKILL to the process group `id` (its leader and everything it started).
pub fn kill_group(id: libc::pid_t) {
    // SAFETY: kill(2) with a negative pid signals that process group; it has
    // no memory-safety preconditions.
    unsafe {
        libc::kill(-id, libc::SIGKILL);
    }
}
