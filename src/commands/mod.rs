//! One module per subcommand: each turns its clap `Args` into plain values and runs.
//!
//! This module runs them and says the errors from below in the words of the
//! command line. What several commands share: `credentials` (the bot token,
//! the webhook secrets, files named by options), `wiring` (the API client,
//! the handler, the state store), `input` (a file or stdin, the time).

mod api;
mod completions;
mod config;
mod credentials;
mod dead_letters;
mod demo;
mod doctor;
mod emulator;
mod fetch_media;
mod forward;
mod input;
mod man;
mod poll_echo;
mod send;
mod serve_webhook;
mod sign;
mod verify_sig;
mod wiring;

use std::process::ExitCode;

use crate::cli::Command;
use crate::exit::Hinted;

pub use crate::output::{print_line, write_stdout};

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let result = dispatch(command);
    // A second signal: exit 130, however the command ended meanwhile.
    if crate::shutdown::forced_by_signal() {
        return Ok(ExitCode::from(crate::shutdown::FORCED_EXIT_STATUS as u8));
    }
    match result {
        // A stop signal before there was anything to stop: a clean stop, as
        // the first SIGINT/SIGTERM is anywhere else (exit 0).
        Err(error) if cause::<fly_state::Interrupted>(&error).is_some() => {
            tracing::info!("{error:#}: stopped");
            Ok(crate::exit::code(crate::exit::SUCCESS))
        }
        result => result.map_err(in_command_line_words),
    }
}

/// Typed errors from the layers below, said in the words of the command
/// line: which option changes it, and whether it is bad input (exit 2).
/// Those layers name no option; every other error passes as it is. The
/// words are a [`Hinted`] around the error, so its typed chain stays.
fn in_command_line_words(error: anyhow::Error) -> anyhow::Error {
    use crate::api::{ApiError, BadUrl};
    use fly_state::StateRefused;
    let hinted = if let Some(bad) = cause::<BadUrl>(&error) {
        let hint = if bad.base_url {
            " (--base-url or FLY_BASE_URL)"
        } else {
            ""
        };
        Hinted::bad_input(error, hint)
    } else if let Some(ApiError::TokenRefused { .. }) = cause::<ApiError>(&error) {
        Hinted::new(error, format!("; {TOKEN_HINT}"))
    } else if let Some(ApiError::PlainHttp(_)) = cause::<ApiError>(&error) {
        // Known only from the server's answer, as a refused connection is:
        // a failure (exit 1), the option to change named.
        Hinted::new(error, " (--base-url or FLY_BASE_URL)")
    } else if cause::<crate::emulator::NoEmulator>(&error).is_some() {
        Hinted::new(error, ", or point --base-url / FLY_BASE_URL at it")
    } else {
        match cause::<StateRefused>(&error) {
            None => return error,
            Some(StateRefused::Unusable(_)) => {
                Hinted::bad_input(error, " (or choose another with --state PATH)")
            }
            Some(StateRefused::Foreign(_)) => {
                Hinted::new(error, "; choose another with --state PATH")
            }
            Some(StateRefused::InUse { shared: false, .. }) => Hinted::new(
                error,
                "; stop it first, or choose another with --state PATH",
            ),
            Some(StateRefused::InUse { shared: true, .. }) => Hinted::new(
                error,
                "; stop it first, or run this one without --once to stand by",
            ),
        }
    };
    anyhow::Error::new(hinted)
}

/// Where to look when the platform refuses the bot token.
pub const TOKEN_HINT: &str = "check FLY_BOT_TOKEN or --token-file";

/// The first error of type `T` in `error`'s chain.
fn cause<T: std::error::Error + Send + Sync + 'static>(error: &anyhow::Error) -> Option<&T> {
    error.chain().find_map(|cause| cause.downcast_ref::<T>())
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Send(args) => send::run(args),
        Command::Api(args) => api::run(args),
        Command::Emulator(args) => emulator::run(args),
        Command::VerifySig(args) => verify_sig::run(args),
        Command::Sign(args) => sign::run(args),
        Command::PollEcho(args) => poll_echo::run(args),
        Command::ServeWebhook(args) => serve_webhook::run(args),
        Command::FetchMedia(args) => fetch_media::run(args),
        Command::Forward(args) => forward::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::DeadLetters(args) => dead_letters::run(args),
        Command::Completions(args) => completions::run(args),
        Command::Config(args) => config::run(args),
        Command::Man(args) => man::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{self, ExitOutcome, classify, usage};
    use anyhow::Context;
    use fly_state::StateRefused;

    fn said(error: anyhow::Error) -> (ExitOutcome, String) {
        let error = in_command_line_words(error);
        (classify(&error), exit::message(&error))
    }

    #[test]
    fn the_words_keep_the_typed_cause_reachable() {
        let refused = anyhow::Error::from(StateRefused::InUse {
            message: "another fly process is already polling".into(),
            shared: false,
        })
        .context("opening the state");
        let said = in_command_line_words(refused);
        assert_eq!(
            exit::message(&said),
            "opening the state: another fly process is already polling; \
             stop it first, or choose another with --state PATH"
        );
        assert!(matches!(
            cause::<StateRefused>(&said),
            Some(StateRefused::InUse { shared: false, .. })
        ));
        assert!(cause::<Hinted>(&said).is_some());

        let refused = anyhow::Error::from(crate::api::ApiError::TokenRefused {
            status: 401,
            detail: String::new(),
        });
        let said = in_command_line_words(refused);
        assert!(matches!(
            cause::<crate::api::ApiError>(&said),
            Some(crate::api::ApiError::TokenRefused { status: 401, .. })
        ));
    }

    #[test]
    fn typed_errors_from_below_get_their_option_and_exit_code() {
        let unusable =
            anyhow::Error::from(StateRefused::Unusable("state file x is read-only".into()))
                .context("opening the state");
        let (code, text) = said(unusable);
        assert_eq!(code, ExitOutcome::Report(exit::USAGE));
        assert_eq!(
            text,
            "opening the state: state file x is read-only (or choose another with --state PATH)"
        );

        let foreign = anyhow::Error::from(StateRefused::Foreign("belongs to a bot".into()));
        let (code, text) = said(foreign);
        assert_eq!(code, ExitOutcome::Report(exit::FAILURE));
        assert!(
            text.ends_with("; choose another with --state PATH"),
            "{text}"
        );

        let in_use = |shared| {
            said(anyhow::Error::from(StateRefused::InUse {
                message: "another fly process is already polling".into(),
                shared,
            }))
        };
        assert!(
            in_use(false)
                .1
                .ends_with("or choose another with --state PATH")
        );
        assert!(in_use(true).1.ends_with("without --once to stand by"));

        let base_url = crate::api::check_base_url("https://h/api/v1").unwrap_err();
        let (code, text) = said(base_url);
        assert_eq!(code, ExitOutcome::Report(exit::USAGE));
        assert!(text.ends_with("(--base-url or FLY_BASE_URL)"), "{text}");

        let refused = anyhow::Error::from(crate::api::ApiError::TokenRefused {
            status: 401,
            detail: String::new(),
        });
        assert!(said(refused).1.ends_with(TOKEN_HINT));

        // Anything else passes through untouched, its exit code too.
        let plain = Err::<(), _>(usage("bad input"))
            .context("sending")
            .unwrap_err();
        assert_eq!(
            said(plain),
            (
                ExitOutcome::Report(exit::USAGE),
                "sending: bad input".into()
            )
        );
    }
}
