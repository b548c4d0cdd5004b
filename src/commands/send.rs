//! `fly send`: one message from a shell script, safe to retry.

use std::process::ExitCode;

use anyhow::Context;
use serde_json::{Map, Value};

use crate::api::MessageData;
use crate::api::{SendRequest, Target};
use crate::cli::SendArgs;
use crate::commands::input::read_input;
use crate::commands::print_line;
use crate::commands::wiring::one_shot_client;
use crate::exit::{self, usage, usage_because};
use fly_base::random;

pub fn run(args: SendArgs) -> anyhow::Result<ExitCode> {
    let api = args.api.clone();
    let request = build_request(args)?;
    let client = one_shot_client(&api)?;
    let (Target::User(target) | Target::Group(target)) = &request.target;
    tracing::debug!(client_msg_id = %request.client_msg_id, %target, "sending");
    let sent = client.send(&request).context("sending the message")?;
    print_line(&sent)?;
    Ok(exit::code(exit::SUCCESS))
}

/// Validates the arguments into the request body, before any network traffic.
fn build_request(args: SendArgs) -> anyhow::Result<SendRequest> {
    let target = match (args.to, args.group) {
        (Some(user), None) if !user.trim().is_empty() => Target::User(user),
        (None, Some(group)) if !group.trim().is_empty() => Target::Group(group),
        (Some(_), None) | (None, Some(_)) => {
            return Err(usage("the chat to send to is empty (--to or --group)"));
        }
        _ => return Err(usage("give exactly one of --to USER and --group GROUP")),
    };
    if args.msg_type.trim().is_empty() {
        return Err(usage("--type must not be empty (text, image, …)"));
    }
    if args.client_msg_id.as_deref().is_some_and(str::is_empty) {
        return Err(usage(
            "--client-msg-id must not be empty (leave it out for a random one)",
        ));
    }
    let data = match (args.data, args.text) {
        (Some(json), _) => MessageData::from_fields(&parse_data(&json)?),
        (None, Some(text)) if args.msg_type == "text" => {
            let content = if text == "-" {
                read_stdin_text()?
            } else {
                text
            };
            // Most likely a script whose command printed nothing: say so
            // rather than send a blank message.
            if content.trim().is_empty() {
                return Err(usage("the message text is empty"));
            }
            // Text has none; binary data piped in by mistake has.
            if content.contains('\0') {
                return Err(usage(
                    "the message text contains NUL bytes: is it binary data? \
                     (send files as media with --type and --data)",
                ));
            }
            MessageData::text(content.as_bytes())
        }
        (None, Some(_)) => {
            return Err(usage(format!(
                "a {} message needs --data JSON (TEXT is only for --type text)",
                args.msg_type
            )));
        }
        (None, None) => {
            return Err(usage(
                "missing message: give TEXT (or - to read it from stdin), or --data JSON",
            ));
        }
    };
    // One id per invocation, generated before the first attempt, so every
    // retry of this send carries the same key and the platform records it once.
    let client_msg_id = args
        .client_msg_id
        .unwrap_or_else(|| format!("fly_send_{}", random::hex_id(12)));
    Ok(SendRequest::new(target, args.msg_type, data, client_msg_id))
}

fn parse_data(json: &str) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(data)) => Ok(data),
        Ok(_) => Err(usage(
            "--data must be a JSON object, e.g. '{\"url\":\"...\"}'",
        )),
        Err(error) => Err(usage_because("--data is not valid JSON", error)),
    }
}

/// Message text from stdin; trailing newlines are dropped, as `$(…)` does in a shell.
fn read_stdin_text() -> anyhow::Result<String> {
    let text = read_input("-")?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ApiArgs;

    fn args(text: Option<&str>, data: Option<&str>, msg_type: &str) -> SendArgs {
        SendArgs {
            to: Some("u_1".into()),
            group: None,
            text: text.map(String::from),
            msg_type: msg_type.into(),
            data: data.map(String::from),
            client_msg_id: None,
            api: ApiArgs {
                base_url: crate::cli::DEFAULT_BASE_URL.into(),
                token: None,
                token_file: None,
            },
        }
    }

    #[test]
    fn text_becomes_content() {
        let request = build_request(args(Some("héllo"), None, "text")).unwrap();
        assert_eq!(request.data.as_json(), r#"{"content":"héllo"}"#);
        assert!(request.client_msg_id.starts_with("fly_send_"));
    }

    #[test]
    fn bad_inputs_are_usage_errors() {
        for bad in [
            args(None, None, "text"),
            args(None, Some("[1]"), "image"),
            args(None, Some("{nope"), "image"),
            args(Some("x"), None, "image"),
            args(Some(""), None, "text"),
            args(Some(" \n"), None, "text"),
            args(Some("x"), None, ""),
            SendArgs {
                to: Some(" ".into()),
                ..args(Some("x"), None, "text")
            },
            SendArgs {
                client_msg_id: Some(String::new()),
                ..args(Some("x"), None, "text")
            },
        ] {
            let error = build_request(bad).unwrap_err();
            assert_eq!(
                crate::exit::classify(&error),
                crate::exit::ExitOutcome::Report(2)
            );
        }
    }

    #[test]
    fn each_invocation_gets_its_own_id() {
        let a = build_request(args(Some("x"), None, "text")).unwrap();
        let b = build_request(args(Some("x"), None, "text")).unwrap();
        assert_ne!(a.client_msg_id, b.client_msg_id);
    }
}
