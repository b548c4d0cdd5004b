//! Exit codes, decided in one place (SPEC section 2).
//!
//! 0 success; 1 the operation failed (signature rejected, API error after
//! retries, download failed); 2 bad usage or bad input (unknown flag, malformed
//! JSON, missing token or secret). Code that must report bad input returns a
//! [`UsageError`] anywhere in its error chain; everything else is a failure.

use std::fmt;
use std::io;
use std::process::ExitCode;

pub const SUCCESS: u8 = 0;
pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 2;

/// Bad usage or bad input: the user has to change the command or its input.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Shorthand for returning a [`UsageError`] as an `anyhow::Error`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// What the process should do with an error that reached `main`.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitOutcome {
    /// Print `fly: error: …` and exit with this code.
    Report(u8),
    /// The reader of our stdout went away (`fly … | head`): a normal end, exit 0 quietly.
    Quiet,
}

/// Maps an error to its exit code by looking through the whole chain.
pub fn classify(error: &anyhow::Error) -> ExitOutcome {
    for cause in error.chain() {
        if cause.downcast_ref::<UsageError>().is_some() {
            return ExitOutcome::Report(USAGE);
        }
        if let Some(io_error) = cause.downcast_ref::<io::Error>()
            && io_error.kind() == io::ErrorKind::BrokenPipe
        {
            return ExitOutcome::Quiet;
        }
    }
    ExitOutcome::Report(FAILURE)
}

pub fn code(value: u8) -> ExitCode {
    ExitCode::from(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn usage_error_maps_to_2_even_when_wrapped() {
        let error = Err::<(), _>(usage("missing token"))
            .context("sending message")
            .unwrap_err();
        assert_eq!(classify(&error), ExitOutcome::Report(USAGE));
    }

    #[test]
    fn other_errors_map_to_1() {
        let error = anyhow::anyhow!("HTTP 500");
        assert_eq!(classify(&error), ExitOutcome::Report(FAILURE));
    }

    #[test]
    fn broken_pipe_is_a_quiet_end() {
        let error = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe))
            .context("writing to stdout");
        assert_eq!(classify(&error), ExitOutcome::Quiet);
    }

    #[test]
    fn codes_are_the_documented_numbers() {
        assert_eq!((SUCCESS, FAILURE, USAGE), (0, 1, 2));
    }
}
