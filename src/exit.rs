//! Exit codes, decided in one place (SPEC section 2).
//!
//! 0 success; 1 the operation failed (signature rejected, API error after
//! retries, download failed); 2 bad usage or bad input (unknown flag, malformed
//! JSON, missing token or secret). Code that must report bad input returns a
//! [`UsageError`] anywhere in its error chain, or a [`Hinted`] error marked as
//! bad input; everything else is a failure.

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

/// An error said again with the words of the command line appended (which
/// option changes it). Its text is the whole line, the chain as [`message`]
/// says it and then the hint; its source is the error itself, so the typed chain
/// stays reachable by downcasting. Being said whole, it is printed with `{}`
/// (see [`message`]), not as one link of a `{:#}` chain.
#[derive(Debug)]
pub struct Hinted {
    error: anyhow::Error,
    hint: String,
    bad_input: bool,
}

impl Hinted {
    /// `error`, then `hint` (with its own separator, e.g. `" (use --force)"`);
    /// its exit code is the one its chain has.
    pub fn new(error: anyhow::Error, hint: impl Into<String>) -> Self {
        Self {
            error,
            hint: hint.into(),
            bad_input: false,
        }
    }

    /// The same, and bad input (exit 2) whatever the chain says.
    pub fn bad_input(error: anyhow::Error, hint: impl Into<String>) -> Self {
        Self {
            bad_input: true,
            ..Self::new(error, hint)
        }
    }
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", message(&self.error), self.hint)
    }
}

impl std::error::Error for Hinted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.error.as_ref())
    }
}

/// The text of the `fly: error:` line: the chain joined by `": "` as `{:#}`
/// joins it, up to a [`Hinted`] error, which says the rest itself.
pub fn message(error: &anyhow::Error) -> String {
    let mut said = Vec::new();
    for cause in error.chain() {
        said.push(cause.to_string());
        if cause.is::<Hinted>() {
            break;
        }
    }
    said.join(": ")
}

/// Bad input (exit 2) said as `what: error`, the typed `error` kept as its
/// source: `usage` for a cause from below.
pub fn usage_because(
    what: impl fmt::Display + Send + Sync + 'static,
    error: impl Into<anyhow::Error>,
) -> anyhow::Error {
    anyhow::Error::new(Hinted::bad_input(error.into().context(what), ""))
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
        if cause.is::<UsageError>() || cause.downcast_ref::<Hinted>().is_some_and(|h| h.bad_input) {
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
    fn hinted_errors_keep_their_chain_and_say_it_once() {
        let base = Err::<(), _>(anyhow::Error::new(io::Error::from(io::ErrorKind::NotFound)))
            .context("opening x")
            .unwrap_err();
        let said = |hinted: Hinted| {
            let error = anyhow::Error::new(hinted).context("running");
            (classify(&error), message(&error), error)
        };
        let (outcome, text, error) = said(Hinted::new(base, "; try --y"));
        assert_eq!(outcome, ExitOutcome::Report(FAILURE));
        assert_eq!(text, "running: opening x: entity not found; try --y");
        let typed = error
            .chain()
            .find_map(|cause| cause.downcast_ref::<io::Error>());
        assert_eq!(typed.map(io::Error::kind), Some(io::ErrorKind::NotFound));

        let (outcome, text, _) = said(Hinted::bad_input(anyhow::anyhow!("no"), ""));
        assert_eq!(
            (outcome, text.as_str()),
            (ExitOutcome::Report(USAGE), "running: no")
        );

        // Said again around an error already said: each part once.
        let inner = anyhow::Error::new(Hinted::new(anyhow::anyhow!("a"), " (b)")).context("c");
        let (_, text, _) = said(Hinted::new(inner, "; d"));
        assert_eq!(text, "running: c: a (b); d");

        let unreadable = usage_because("cannot read x", io::Error::other("denied"));
        assert_eq!(classify(&unreadable), ExitOutcome::Report(USAGE));
        assert_eq!(message(&unreadable), "cannot read x: denied");
        assert!(unreadable.chain().any(|cause| cause.is::<io::Error>()));

        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(message(&plain), format!("{plain:#}"));
    }

    #[test]
    fn codes_are_the_documented_numbers() {
        assert_eq!((SUCCESS, FAILURE, USAGE), (0, 1, 2));
    }
}
