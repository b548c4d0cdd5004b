//! One module per subcommand: each turns its clap `Args` into plain values and runs.
//!
//! This module holds what several commands need from the global flags: the
//! bot token and the API client built on it.

mod demo;
mod emulator;
mod fetch_media;
mod poll_echo;
mod send;

use std::fs;
use std::process::ExitCode;

use anyhow::Context;

use crate::api::retry::RetryPolicy;
use crate::api::{ApiClient, Token};
use crate::cli::{Cli, Command, GlobalArgs};
use crate::exit::{self, usage};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = &cli.global;
    match cli.command {
        Command::Send(args) => send::run(args, global),
        Command::Emulator(args) => emulator::run(args, global),
        Command::VerifySig(_) => not_implemented("verify-sig"),
        Command::Sign(_) => not_implemented("sign"),
        Command::PollEcho(args) => poll_echo::run(args, global),
        Command::ServeWebhook(_) => not_implemented("serve-webhook"),
        Command::FetchMedia(args) => fetch_media::run(args, global),
        Command::Forward(_) => not_implemented("forward"),
        Command::Demo(args) => demo::run(args, global),
    }
}

fn not_implemented(command: &str) -> anyhow::Result<ExitCode> {
    Err(usage(format!("`fly {command}` is not implemented yet")))
}

/// The bot token from `--token`/`FLY_BOT_TOKEN` or `--token-file`, if any.
pub fn configured_token(global: &GlobalArgs) -> anyhow::Result<Option<Token>> {
    if let Some(path) = &global.token_file {
        let raw = fs::read_to_string(path).map_err(|error| {
            usage(format!(
                "cannot read --token-file {}: {error}",
                path.display()
            ))
        })?;
        return Token::new(&raw)
            .map(Some)
            .ok_or_else(|| usage(format!("--token-file {} is empty", path.display())));
    }
    Ok(global.token.as_deref().and_then(Token::new))
}

/// The bot token, or a usage error naming every way to give one.
pub fn required_token(global: &GlobalArgs) -> anyhow::Result<Token> {
    configured_token(global)?.ok_or_else(|| {
        usage("missing bot token: set FLY_BOT_TOKEN, or pass --token-file PATH (or --token)")
    })
}

/// The API client for one-shot commands (a bounded number of retries).
pub fn one_shot_client(global: &GlobalArgs) -> anyhow::Result<ApiClient> {
    let token = required_token(global)?;
    ApiClient::new(&global.base_url, token, RetryPolicy::ONE_SHOT)
        .context("configuring the API client")
}

/// Reads a whole input named on the command line: a path, or `-` for stdin.
pub fn read_input(name: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    if name == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|error| usage(format!("cannot read stdin: {error}")))?;
    } else {
        text = fs::read_to_string(name)
            .map_err(|error| usage(format!("cannot read {name}: {error}")))?;
    }
    Ok(text)
}

/// Prints one JSON value on stdout, followed by a newline.
pub fn print_json(value: &serde_json::Value) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let mut line = serde_json::to_string(value).context("encoding the result")?;
    line.push('\n');
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(line.as_bytes())
        .context("writing to stdout")?;
    stdout.flush().context("writing to stdout")?;
    Ok(exit::code(exit::SUCCESS))
}
