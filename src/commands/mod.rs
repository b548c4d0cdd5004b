//! One module per subcommand: each turns its clap `Args` into plain values and runs.
//!
//! This module holds what several commands need from the global flags: the
//! bot token and the API client built on it.

mod dead_letters;
mod demo;
mod emulator;
mod fetch_media;
mod forward;
mod poll_echo;
mod send;
mod serve_webhook;
mod sign;
mod verify_sig;

use std::fs;
use std::process::ExitCode;

use anyhow::Context;

use crate::api::retry::RetryPolicy;
use crate::api::{ApiClient, Token};
use crate::cli::{Cli, Command, GlobalArgs, SecretArgs};
use crate::exit::usage;

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = &cli.global;
    match cli.command {
        Command::Send(args) => send::run(args, global),
        Command::Emulator(args) => emulator::run(args, global),
        Command::VerifySig(args) => verify_sig::run(args, global),
        Command::Sign(args) => sign::run(args, global),
        Command::PollEcho(args) => poll_echo::run(args, global),
        Command::ServeWebhook(args) => serve_webhook::run(args, global),
        Command::FetchMedia(args) => fetch_media::run(args, global),
        Command::Forward(args) => forward::run(args, global),
        Command::Demo(args) => demo::run(args, global),
        Command::DeadLetters(args) => dead_letters::run(args, global),
    }
}

/// The bot token from `--token`/`FLY_BOT_TOKEN` or `--token-file`, if any.
pub fn configured_token(global: &GlobalArgs) -> anyhow::Result<Option<Token>> {
    let (token, source) = if let Some(path) = &global.token_file {
        let raw = fs::read_to_string(path).map_err(|error| {
            usage(format!(
                "cannot read --token-file {}: {error}",
                path.display()
            ))
        })?;
        let token = Token::new(&raw)
            .ok_or_else(|| usage(format!("--token-file {} is empty", path.display())))?;
        (token, format!("--token-file {}", path.display()))
    } else {
        match global.token.as_deref().and_then(Token::new) {
            Some(token) => (token, "--token / FLY_BOT_TOKEN".to_string()),
            None => return Ok(None),
        }
    };
    // A header value cannot hold them: caught here, the message can say where
    // the token came from instead of "request could not be made".
    if token.expose().chars().any(char::is_control) {
        return Err(usage(format!(
            "the bot token from {source} contains a line break or another control character"
        )));
    }
    Ok(Some(token))
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

/// A webhook secret and where it came from. The value is never shown: the
/// `source` is what `--explain` and error messages name.
pub struct WebhookSecret {
    pub value: String,
    pub source: String,
}

/// The webhook secrets (SPEC section 1): every `--secret`, else
/// `FLY_WEBHOOK_SECRET` (stripped, as the reference does), else the sha256 hex
/// of the bot token; none of them is a usage error.
pub fn webhook_secrets(
    args: &SecretArgs,
    global: &GlobalArgs,
) -> anyhow::Result<Vec<WebhookSecret>> {
    if !args.secrets.is_empty() {
        if args.secrets.iter().any(String::is_empty) {
            return Err(usage("--secret must not be empty"));
        }
        let count = args.secrets.len();
        return Ok(args
            .secrets
            .iter()
            .enumerate()
            .map(|(index, value)| WebhookSecret {
                value: value.clone(),
                source: if count == 1 {
                    "--secret".into()
                } else {
                    format!("--secret #{}", index + 1)
                },
            })
            .collect());
    }
    let from_env = std::env::var("FLY_WEBHOOK_SECRET").unwrap_or_default();
    if !from_env.trim().is_empty() {
        return Ok(vec![WebhookSecret {
            value: from_env.trim().to_string(),
            source: "FLY_WEBHOOK_SECRET".into(),
        }]);
    }
    match configured_token(global)? {
        Some(token) => Ok(vec![WebhookSecret {
            value: crate::signature::sha256_hex(token.expose().as_bytes()),
            source: "sha256 of the bot token".into(),
        }]),
        None => Err(usage(
            "missing secret: pass --secret S, set FLY_WEBHOOK_SECRET, or configure the bot token \
             (FLY_BOT_TOKEN or --token-file) to use its sha256",
        )),
    }
}

/// The current unix time in seconds: `--now`, else `FLY_NOW_TS` read as the
/// platform's script reads it (`int(value.strip() or time.time())`: spaces
/// around it are fine and an empty value means the clock), else the clock.
pub fn unix_time_now(flag: Option<i64>) -> anyhow::Result<i64> {
    if let Some(now) = flag {
        return Ok(now);
    }
    let from_env = std::env::var("FLY_NOW_TS").unwrap_or_default();
    if from_env.trim().is_empty() {
        return Ok(crate::state::unix_now());
    }
    crate::signature::python::int_from_str(&from_env)
        .ok()
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| usage(format!("FLY_NOW_TS is not a unix time: {from_env:?}")))
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

/// Prints one line on stdout and flushes it at once (a script may be waiting
/// for it, e.g. the URL a server listens on).
pub fn print_line(line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("writing to stdout")?;
    stdout.flush().context("writing to stdout")?;
    Ok(())
}

/// What answers updates: the `--exec` handler when one is given, else the echo
/// (with the media round trip when `media_dir` is set).
pub fn reply_handler(
    exec: &crate::cli::ExecArgs,
    client: ApiClient,
    media_dir: Option<std::path::PathBuf>,
) -> std::sync::Arc<dyn crate::bot::Handler> {
    match &exec.exec {
        Some(command) => std::sync::Arc::new(crate::bot::exec::ExecHandler::new(
            command.clone(),
            std::time::Duration::from_secs(exec.exec_timeout),
            client,
            exec.exec_pass_token,
        )),
        None => std::sync::Arc::new(crate::bot::echo::EchoHandler { client, media_dir }),
    }
}

/// The one secret a signing command signs with (`fly sign`, `fly forward`).
pub fn signing_secret(
    args: &SecretArgs,
    global: &GlobalArgs,
    command: &str,
) -> anyhow::Result<String> {
    match webhook_secrets(args, global)?.as_mut_slice() {
        [only] => Ok(std::mem::take(&mut only.value)),
        _ => Err(usage(format!(
            "{command} signs with one secret: give --secret once"
        ))),
    }
}
