//! What goes to stdout: data only (SPEC section 2), each line flushed at
//! once, since a script may be waiting for it (the URL a server listens on).
//!
//! A closed stdout (`fly sign >&-`) is an error, as a full one is: Rust's
//! runtime reopens a closed fd 1 on /dev/null before `main` (so that a file
//! opened later cannot become fd 1 and receive the output), and from then on
//! every write "succeeds". Only a look at fd 1 before that can tell, so
//! `main.rs` has the loader call [`note_stdout_at_exec`] first, and every
//! writer here refuses with EBADF, the error the write would have had.

use std::io::{self, StdoutLock, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

/// Whether fd 1 was closed when fly was started.
static STDOUT_CLOSED_AT_EXEC: AtomicBool = AtomicBool::new(false);

/// Looks at fd 1 as the process starts, before Rust's runtime reopens it.
/// Runs before `main`: it must not use anything the runtime sets up.
pub fn note_stdout_at_exec() {
    // SAFETY: F_GETFD only asks about a descriptor number; it fails (EBADF)
    // exactly when fd 1 is not open.
    let closed = unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFD) } == -1;
    STDOUT_CLOSED_AT_EXEC.store(closed, Ordering::Relaxed);
}

/// The error a write to the closed fd 1 gets, if fd 1 was closed at start.
pub fn check_stdout() -> io::Result<()> {
    if STDOUT_CLOSED_AT_EXEC.load(Ordering::Relaxed) {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    Ok(())
}

/// stdout, locked; an error if it was closed when fly started.
pub fn stdout() -> io::Result<StdoutLock<'static>> {
    check_stdout()?;
    Ok(io::stdout().lock())
}

/// Prints one line on stdout and flushes it at once.
pub fn print_line(line: &str) -> anyhow::Result<()> {
    let mut stdout = stdout().context("writing to stdout")?;
    writeln!(stdout, "{line}").context("writing to stdout")?;
    stdout.flush().context("writing to stdout")?;
    Ok(())
}

/// Writes `bytes` to stdout and flushes them.
pub fn write_stdout(bytes: &[u8]) -> io::Result<()> {
    let mut stdout = stdout()?;
    stdout.write_all(bytes)?;
    stdout.flush()
}
