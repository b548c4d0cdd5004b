//! `fly emulator`: the local Fly Bot API in the foreground.

use std::process::ExitCode;

use crate::cli::{EmulatorArgs, GlobalArgs};
use crate::commands::configured_token;
use crate::emulator::{self, EmulatorConfig};
use crate::exit;

pub fn run(args: EmulatorArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let config = EmulatorConfig {
        bind: args.bind,
        port: args.port,
        token: configured_token(global)?.map(|token| token.expose().to_string()),
    };
    emulator::run_until_signal(config)?;
    Ok(exit::code(exit::SUCCESS))
}
