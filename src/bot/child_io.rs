//! Talking to handler processes without a thread per pipe and without
//! sleep-and-check: nonblocking pipes waited on with poll(2), and a child's
//! exit seen as a file descriptor (a pidfd) so it can be waited on in the
//! same poll. Shared by `--exec` (a process per update) and `--exec-worker`
//! (long-lived workers).

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// A stderr line longer than this (binary output, no newlines) is cut: the
/// log gets its start, not megabytes of it.
pub const MAX_LOG_LINE: usize = 4 * 1024;
/// The stderr logged for one update; the rest is counted, not logged.
pub const STDERR_BUDGET: usize = 64 * 1024;

/// A handler command as fly starts it, for `--exec` and `--exec-worker`
/// alike: run by /bin/sh (as system(3) runs commands: the POSIX shell, found
/// without trying every directory of PATH), all three pipes, its own process
/// group (so a kill reaches everything it started), and the secrets kept
/// from it unless the user passes the token (`--pass-token`). A service
/// manager's socket is kept from it too: a handler cannot speak for fly.
pub fn handler_command(command: &str, token: Option<&str>) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut built = std::process::Command::new("/bin/sh");
    built
        .arg("-c")
        .arg(command)
        .env_remove("FLY_BOT_TOKEN")
        .env_remove("FLY_WEBHOOK_SECRET")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    for variable in crate::service_manager::VARIABLES {
        built.env_remove(variable);
    }
    if let Some(token) = token {
        built.env("FLY_BOT_TOKEN", token);
    }
    built
}

/// Makes reads and writes on `fd` return `WouldBlock` instead of waiting.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor the caller owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One descriptor to wait on.
pub fn want(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Whether a descriptor polled for reading is ready: data, end of file, or an error.
pub fn readable(fd: &libc::pollfd) -> bool {
    fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// poll(2) until one of `fds` is ready or `deadline` passes (`None`: no
/// limit). Returns false on the deadline. A signal interrupting the wait is
/// not an event: the wait goes on with the time left.
pub fn wait(fds: &mut [libc::pollfd], deadline: Option<Instant>) -> io::Result<bool> {
    loop {
        let timeout_ms = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Rounded up: a wait that ends a little early would only
                // come back for the last fraction of a millisecond.
                let ms = left.as_nanos().div_ceil(1_000_000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        };
        for fd in fds.iter_mut() {
            fd.revents = 0;
        }
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of
        // the length given.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if ready > 0 {
            return Ok(true);
        }
        if ready == 0 {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Ok(false);
            }
            continue;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// What one nonblocking read brought.
pub enum Chunk {
    Data(usize),
    /// The other end is closed (or the pipe failed: nothing more will come).
    End,
    /// Nothing to read right now.
    Empty,
}

/// Reads once from a nonblocking pipe.
pub fn read_some(pipe: &mut impl Read, buffer: &mut [u8]) -> Chunk {
    loop {
        return match pipe.read(buffer) {
            Ok(0) => Chunk::End,
            Ok(read) => Chunk::Data(read),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Chunk::Empty,
            Err(_) => Chunk::End,
        };
    }
}

/// A child's exit as a descriptor that becomes readable when the child has
/// exited (it is not reaped: `Child::wait` does that, at once, afterwards).
///
/// A pidfd (Linux 5.3) where the kernel has one; elsewhere a thread waits
/// for the exit with `waitid(WNOWAIT)` (which leaves the child for
/// `Child::wait` to reap) and then closes the write end of a pipe.
pub struct ExitWatch {
    fd: OwnedFd,
}

impl ExitWatch {
    pub fn new(pid: u32) -> io::Result<ExitWatch> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
        // descriptor (close-on-exec) or -1; the pid is our unreaped child,
        // so it cannot name another process.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd >= 0 {
            // SAFETY: a descriptor just returned to us and owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
            return Ok(ExitWatch { fd });
        }
        ExitWatch::on_a_thread(pid)
    }

    /// Without a pidfd: a thread waits for the exit, leaving the child to be
    /// reaped, then closes the write end of a pipe whose read end is watched.
    fn on_a_thread(pid: libc::pid_t) -> io::Result<ExitWatch> {
        let mut ends = [0 as RawFd; 2];
        // SAFETY: pipe2(2) writes two descriptors into the array.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here alone.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        std::thread::Builder::new()
            .name("fly-exit-watch".into())
            .spawn(move || {
                // SAFETY: waitid(2) fills the zeroed siginfo_t it is given.
                unsafe {
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    libc::waitid(
                        libc::P_PID,
                        pid as libc::id_t,
                        &mut info,
                        libc::WEXITED | libc::WNOWAIT,
                    );
                }
                drop(write_end);
            })?;
        Ok(ExitWatch { fd: read_end })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Waits until the child has exited or `deadline` passes (false).
    pub fn wait_until(&self, deadline: Instant) -> io::Result<bool> {
        let mut fds = [want(self.fd(), libc::POLLIN)];
        wait(&mut fds, Some(deadline))
    }
}

/// Splits a stream of bytes (a handler's stderr) into lines for the log,
/// within bounds: a handler that prints in a loop must neither fill the
/// disk with fly's log nor slow the other chats down.
///
/// A line is handed on without its `\n` (and `\r`), shown lossily (a
/// handler printing non-UTF-8 must not silence the lines after it). A line
/// longer than [`MAX_LOG_LINE`] is cut there (marked `…`); once
/// [`STDERR_BUDGET`] bytes were logged for one update, its further lines are
/// counted, not logged, and [`LogLines::end_update`] says how many bytes
/// that was. Memory stays at one line whatever comes.
pub struct LogLines {
    partial: Vec<u8>,
    /// Bytes of the current line beyond [`MAX_LOG_LINE`], dropped.
    dropped: usize,
    /// Bytes logged for the current update.
    logged: usize,
    /// Bytes of the current update's stderr that did not reach the log.
    unlogged: u64,
}

impl Default for LogLines {
    fn default() -> Self {
        LogLines {
            partial: Vec::with_capacity(256),
            dropped: 0,
            logged: 0,
            unlogged: 0,
        }
    }
}

impl LogLines {
    pub fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&str)) {
        while !bytes.is_empty() {
            let (line, rest, ended) = match bytes.iter().position(|&byte| byte == b'\n') {
                Some(at) => (&bytes[..at], &bytes[at + 1..], true),
                None => (bytes, &[][..], false),
            };
            let kept = line.len().min(MAX_LOG_LINE - self.partial.len());
            self.partial.extend_from_slice(&line[..kept]);
            self.dropped += line.len() - kept;
            if ended {
                self.emit(emit, true);
            }
            bytes = rest;
        }
    }

    /// The last line, if it had no newline.
    pub fn finish(&mut self, emit: &mut impl FnMut(&str)) {
        if !self.partial.is_empty() || self.dropped > 0 {
            self.emit(emit, false);
        }
    }

    /// The update whose stderr this was is over (or its process is): says
    /// how much of it was not logged, if anything, and starts a new budget.
    pub fn end_update(&mut self, emit: &mut impl FnMut(&str)) {
        self.finish(emit);
        if self.unlogged > 0 {
            emit(&format!(
                "… {} bytes of stderr not logged (the log takes {} KiB per update)",
                self.unlogged,
                STDERR_BUDGET / 1024,
            ));
        }
        self.logged = 0;
        self.unlogged = 0;
    }

    fn emit(&mut self, emit: &mut impl FnMut(&str), newline: bool) {
        if self.logged + self.partial.len() > STDERR_BUDGET {
            self.unlogged += (self.partial.len() + self.dropped + usize::from(newline)) as u64;
        } else {
            self.logged += self.partial.len();
            let text = String::from_utf8_lossy(&self.partial);
            let text = text.trim_end_matches('\r');
            if self.dropped > 0 {
                emit(&format!("{text}… (line cut, {} more bytes)", self.dropped));
            } else {
                emit(text);
            }
        }
        self.partial.clear();
        self.dropped = 0;
    }
}

/// Reads `pipe` (blocking) to its end, handing each line to `emit` with the
/// update in hand when it was read (`update_in_hand`, 0 for none): a
/// worker's stderr, on a thread of its own for the worker's whole life.
/// Each update gets a budget of its own (see [`LogLines`]).
pub fn log_lines_until_end(
    mut pipe: impl Read,
    update_in_hand: impl Fn() -> i64,
    mut emit: impl FnMut(i64, &str),
) {
    let mut lines = LogLines::default();
    let mut update_id = update_in_hand();
    let mut buffer = [0u8; 8192];
    loop {
        match pipe.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => {
                let now = update_in_hand();
                if now != update_id {
                    lines.end_update(&mut |text| emit(update_id, text));
                    update_id = now;
                }
                lines.push(&buffer[..read], &mut |text| emit(update_id, text));
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    lines.end_update(&mut |text| emit(update_id, text));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lines_of(chunks: &[&[u8]]) -> Vec<String> {
        let mut lines = LogLines::default();
        let mut seen = Vec::new();
        let mut emit = |line: &str| seen.push(line.to_string());
        for chunk in chunks {
            lines.push(chunk, &mut emit);
        }
        lines.finish(&mut emit);
        seen
    }

    #[test]
    fn lines_are_split_across_chunks_and_long_ones_cut() {
        assert_eq!(
            lines_of(&[b"one\ntw", b"o\r\n\xff three", b"\nlast"]),
            ["one", "two", "\u{fffd} three", "last"]
        );
        let long = vec![b'x'; MAX_LOG_LINE * 2 + 10];
        let lines = lines_of(&[&long[..100], &long[100..], b"\nnext\n"]);
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            format!(
                "{}… (line cut, {} more bytes)",
                "x".repeat(MAX_LOG_LINE),
                MAX_LOG_LINE + 10
            )
        );
        assert_eq!(lines[1], "next");
    }

    #[test]
    fn each_update_logs_its_budget_and_counts_the_rest() {
        let mut lines = LogLines::default();
        let mut seen = Vec::new();
        let line = vec![b'y'; 1023];
        let mut flood = Vec::new();
        for _ in 0..1000 {
            flood.extend_from_slice(&line);
            flood.push(b'\n');
        }
        lines.push(&flood, &mut |text: &str| seen.push(text.to_string()));
        lines.end_update(&mut |text: &str| seen.push(text.to_string()));
        let logged = STDERR_BUDGET / 1023;
        assert_eq!(seen.len(), logged + 1);
        assert_eq!(
            seen[logged],
            format!(
                "… {} bytes of stderr not logged (the log takes 64 KiB per update)",
                (1000 - logged) * 1024
            )
        );
        // The next update starts a budget of its own.
        seen.clear();
        lines.push(b"again\n", &mut |text: &str| seen.push(text.to_string()));
        lines.end_update(&mut |text: &str| seen.push(text.to_string()));
        assert_eq!(seen, ["again"]);
    }

    #[test]
    fn an_exit_is_seen_without_reaping_the_child_with_a_pidfd_or_a_thread() {
        for pidfd in [true, false] {
            let mut child = std::process::Command::new("sh")
                .args(["-c", "read line; exit 3"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let watch = if pidfd {
                ExitWatch::new(child.id())
            } else {
                ExitWatch::on_a_thread(child.id() as libc::pid_t)
            }
            .unwrap();
            // Still running: the watch says so when its deadline passes.
            assert!(
                !watch
                    .wait_until(Instant::now() + Duration::from_millis(50))
                    .unwrap()
            );
            drop(child.stdin.take());
            assert!(
                watch
                    .wait_until(Instant::now() + Duration::from_secs(10))
                    .unwrap()
            );
            assert_eq!(child.wait().unwrap().code(), Some(3), "pidfd: {pidfd}");
        }
    }
}
