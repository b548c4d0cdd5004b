//! What goes to stdout: data only (SPEC section 2), each line flushed at
//! once, since a script may be waiting for it (the URL a server listens on).

use std::io::Write;

use anyhow::Context;

/// Prints one line on stdout and flushes it at once.
pub fn print_line(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("writing to stdout")?;
    stdout.flush().context("writing to stdout")?;
    Ok(())
}

/// Writes `bytes` to stdout and flushes them.
pub fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()
}
