//! Inputs named on the command line: a file or stdin, and the time.

use std::io::Read;

use crate::cli::UnixTime;
use crate::exit::usage_because;

/// The current unix time in seconds: `--now`/`FLY_NOW_TS` (see
/// [`UnixTime`]), else the clock.
pub fn unix_time_now(given: Option<UnixTime>) -> i64 {
    match given {
        Some(UnixTime::At(now)) => now,
        Some(UnixTime::Clock) | None => fly_base::clock::unix_now(),
    }
}

/// Reads a whole input named on the command line: a path, or `-` for stdin.
pub fn read_input(name: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    if name == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|error| usage_because("cannot read stdin", error))?;
    } else {
        text = std::fs::read_to_string(name)
            .map_err(|error| usage_because(format!("cannot read {name}"), error))?;
    }
    Ok(text)
}
