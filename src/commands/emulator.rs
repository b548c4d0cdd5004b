//! `fly emulator`: the local Fly Bot API in the foreground, and
//! `fly emulator say`, a user writing to a running one.

use std::process::ExitCode;

use anyhow::anyhow;
use serde_json::{Value, json};

use crate::cli::{EmulatorAction, EmulatorArgs, EmulatorSayArgs};
use crate::commands::credentials::token_from;
use crate::commands::input::read_input;
use crate::commands::print_line;
use crate::emulator::{self, ControlClient, EmulatorConfig};
use crate::exit::{self, usage};

pub fn run(args: EmulatorArgs) -> anyhow::Result<ExitCode> {
    if let Some(EmulatorAction::Say(say_args)) = args.action {
        return say(say_args);
    }
    let accepted = token_from(
        args.accepted_token.as_deref(),
        args.accepted_token_file.as_deref(),
    )?;
    let config = EmulatorConfig {
        bind: args.bind,
        port: args.port,
        token: accepted.map(|token| token.expose().to_string()),
        first_update_id: emulator::first_update_id_from_clock(),
    };
    emulator::run_until_signal(config)?;
    Ok(exit::code(exit::SUCCESS))
}

/// Posts the message to the control API and prints the update id it got.
fn say(args: EmulatorSayArgs) -> anyhow::Result<ExitCode> {
    // The control API sits beside the bot API: a base URL with the API
    // path is the same mistake here, with the same fix.
    let base_url = crate::api::check_base_url(&args.base_url)?;
    let chat = match (&args.chat, &args.group) {
        (Some(user), None) => json!({"type": "private", "id": user}),
        (None, Some(group)) => json!({"type": "group", "id": group}),
        // clap's argument group admits exactly one of them.
        _ => return Err(usage("give one of --chat and --group")),
    };
    let message = match (&args.text, &args.image) {
        (Some(text), None) => {
            let text = if text == "-" {
                read_input("-")?.trim_end_matches('\n').to_string()
            } else {
                text.clone()
            };
            json!({"chat": chat, "msgType": "text", "data": {"content": text}})
        }
        (None, Some(url)) => {
            json!({"chat": chat, "msgType": "image", "data": {"originalUrl": url}})
        }
        _ => return Err(usage("give the message TEXT or --image URL, not both")),
    };
    let answer = ControlClient::new(&base_url).post("/_emulator/messages", &message)?;
    match answer.get("update_id").and_then(Value::as_u64) {
        Some(update_id) => {
            print_line(&update_id.to_string())?;
            Ok(exit::code(exit::SUCCESS))
        }
        None => Err(anyhow!(
            "the emulator at {base_url} answered without an update_id: {answer}"
        )),
    }
}
