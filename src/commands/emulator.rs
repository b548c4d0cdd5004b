//! `fly emulator`: the local Fly Bot API in the foreground.

use std::process::ExitCode;

use crate::cli::EmulatorArgs;
use crate::commands::token_from;
use crate::emulator::{self, EmulatorConfig};
use crate::exit;

pub fn run(args: EmulatorArgs) -> anyhow::Result<ExitCode> {
    let accepted = token_from(
        args.accepted_token.as_deref(),
        args.accepted_token_file.as_deref(),
    )?;
    let config = EmulatorConfig {
        bind: args.bind,
        port: args.port,
        token: accepted.map(|token| token.expose().to_string()),
    };
    emulator::run_until_signal(config)?;
    Ok(exit::code(exit::SUCCESS))
}
