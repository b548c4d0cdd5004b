//! The process groups of handlers running right now, so that no exit path
//! leaves one behind (SPEC section 2): a forced stop, an error that ends the
//! command, a panic. Each `--exec` handler runs in a process group of its own
//! (its shell and everything it starts) and is registered here while it runs.
//!
//! Why a process-wide registry: the forced stop happens on the signal thread
//! and the final cleanup in `main`, neither of which knows the handlers.
//!
//! A process that leaves its group (`setsid cmd &`, a daemon) is not reached
//! by a group kill. On Linux `main` makes fly a child subreaper: such a
//! process, once its parent has exited, becomes fly's child instead of
//! init's, so it is still among fly's descendants when fly stops, and is
//! killed then. While fly runs they may live on (a background job started
//! on purpose); those that end are reaped here, never a child fly waits for
//! itself (a registered leader, or one too young to be registered yet).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fly_base::sync::lock;

static RUNNING: Mutex<BTreeSet<libc::pid_t>> = Mutex::new(BTreeSet::new());

/// fly is the subreaper of its descendants (see [`become_subreaper`]).
static SUBREAPER: AtomicBool = AtomicBool::new(false);

/// A handler was started: only then can fly have descendants to stop (it
/// starts no other process).
static HAD_HANDLERS: AtomicBool = AtomicBool::new(false);

/// Whether fly, as the subreaper, has descendants of handlers to look for.
fn reaping() -> bool {
    SUBREAPER.load(Ordering::SeqCst) && HAD_HANDLERS.load(Ordering::SeqCst)
}

/// How often orphans that ended are reaped while fly runs.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// A child younger than this is left alone by the reaper: it may be a
/// handler whose registration is still to come, waited for by its spawner.
const REAP_MIN_AGE: Duration = Duration::from_secs(10);

/// How long the last cleanup waits for killed descendants to be reaped.
const FINAL_REAP_WAIT: Duration = Duration::from_secs(1);

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
        HAD_HANDLERS.store(true, Ordering::SeqCst);
        start_reaping();
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

/// Kills every registered group, and (as the subreaper) every other
/// descendant of fly: the abandon and forced stop stages and the last step
/// of `main`.
pub fn kill_all() {
    let running: Vec<libc::pid_t> = lock(&RUNNING).iter().copied().collect();
    for id in running {
        kill_group(id);
    }
    if reaping() {
        kill_descendants();
    }
}

/// Kills every registered group when dropped, then every other descendant,
/// and reaps those that became fly's children: held by `main` for its whole
/// run.
pub struct KillAllOnDrop;

impl Drop for KillAllOnDrop {
    fn drop(&mut self) {
        kill_all();
        if reaping() {
            reap_killed(Instant::now() + FINAL_REAP_WAIT);
        }
    }
}

/// Makes fly the child subreaper of its descendants (Linux; elsewhere
/// nothing changes, and a process that leaves its group outlives fly).
pub fn become_subreaper() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl(2) with PR_SET_CHILD_SUBREAPER takes integers only.
        let set = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if set == 0 {
            SUBREAPER.store(true, Ordering::SeqCst);
        } else {
            tracing::debug!("not a child subreaper: {}", std::io::Error::last_os_error());
        }
    }
}

/// Starts the thread that reaps orphans that ended, once, when the first
/// handler is registered (commands without handlers need none).
fn start_reaping() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    if !reaping() {
        return;
    }
    STARTED.call_once(|| {
        let started = std::thread::Builder::new()
            .name("fly-reaper".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(REAP_EVERY);
                    reap_ended_orphans();
                }
            });
        if let Err(error) = started {
            tracing::debug!("no reaper thread: {error}");
        }
    });
}

/// One process as /proc/PID/stat tells it.
struct ProcStat {
    pid: libc::pid_t,
    parent: libc::pid_t,
    zombie: bool,
    /// Clock ticks after boot.
    started: u64,
}

/// Every process this one can see, from /proc (empty where there is none).
fn processes() -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: libc::pid_t = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces and parentheses: the fields
            // that follow it start after the last ')'.
            let fields: Vec<&str> = stat
                .get(stat.rfind(')')? + 1..)?
                .split_whitespace()
                .collect();
            Some(ProcStat {
                pid,
                zombie: *fields.first()? == "Z",
                parent: fields.get(1)?.parse().ok()?,
                started: fields.get(19)?.parse().ok()?,
            })
        })
        .collect()
}

fn own_pid() -> libc::pid_t {
    libc::pid_t::try_from(std::process::id()).unwrap_or(libc::pid_t::MAX)
}

/// SIGKILL to every descendant of fly (a few rounds: one may fork while
/// the tree is read).
fn kill_descendants() {
    let me = own_pid();
    for _ in 0..3 {
        let mut children: HashMap<libc::pid_t, Vec<libc::pid_t>> = HashMap::new();
        for process in processes() {
            if !process.zombie {
                children
                    .entry(process.parent)
                    .or_default()
                    .push(process.pid);
            }
        }
        let mut next = children.remove(&me).unwrap_or_default();
        if next.is_empty() {
            return;
        }
        while let Some(pid) = next.pop() {
            // SAFETY: kill(2) on a pid read from /proc as our descendant.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            next.extend(children.remove(&pid).unwrap_or_default());
        }
    }
}

/// The children of fly that no code of fly waits for: not a registered
/// group's leader.
fn unregistered_children() -> Vec<ProcStat> {
    let me = own_pid();
    let running = lock(&RUNNING).clone();
    processes()
        .into_iter()
        .filter(|process| process.parent == me && !running.contains(&process.pid))
        .collect()
}

/// Reaps `pid` if it has ended; whether it is gone.
fn reap(pid: libc::pid_t) -> bool {
    let mut status = 0;
    // SAFETY: waitpid(2) on one pid, not blocking; `status` is ours.
    let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    reaped == pid || reaped < 0
}

/// While fly runs: reaps the orphans that became its children and ended.
fn reap_ended_orphans() {
    // SAFETY: sysconf(3) takes an integer.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Some(uptime) = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok())
    else {
        return;
    };
    for child in unregistered_children() {
        let age = uptime - child.started as f64 / ticks;
        if child.zombie && age >= REAP_MIN_AGE.as_secs_f64() {
            reap(child.pid);
        }
    }
}

/// The last cleanup: reaps the killed descendants that became fly's
/// children (their own children come to fly as they die), until none is
/// left or `deadline`.
fn reap_killed(deadline: Instant) {
    loop {
        let mut left = false;
        for child in unregistered_children() {
            if !reap(child.pid) {
                left = true;
            }
        }
        if !left || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILL to the process group `id` (its leader and everything it started).
/// Returns false, and signals nothing, for an id that names no group of a
/// handler: `kill(-0)` would signal fly's own group, and `kill(1)` (from a
/// negative id) a process rather than a group.
pub fn kill_group(id: libc::pid_t) -> bool {
    if id <= 0 {
        return false;
    }
    // SAFETY: kill(2) with a negative pid signals that process group; it has
    // no memory-safety preconditions.
    unsafe {
        libc::kill(-id, libc::SIGKILL);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::{CommandExt, ExitStatusExt};

    /// 0 would be fly's own process group, a negative id a single process.
    #[test]
    fn kill_group_refuses_ids_that_name_no_group() {
        for id in [0, -1, -2, libc::pid_t::MIN] {
            assert!(!kill_group(id), "kill_group({id}) signalled");
        }
    }

    #[test]
    fn kill_group_kills_a_real_group() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let id = libc::pid_t::try_from(child.id()).unwrap();
        assert!(kill_group(id));
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
