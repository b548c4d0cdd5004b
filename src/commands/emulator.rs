//! `fly emulator`: the local Fly Bot API in the foreground, and the
//! commands that talk to a running one through its control API: `say` (a
//! user writes, or presses a button), `sent` (what the bot sent), `webhook`
//! (deliveries instead of polling) and `media` (files to download).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::cli::{
    EmulatorAction, EmulatorArgs, EmulatorClientArgs, EmulatorMediaAction, EmulatorMediaAddArgs,
    EmulatorSayArgs, EmulatorSentArgs, EmulatorWebhookAction, EmulatorWebhookSetArgs,
};
use crate::commands::credentials::{read_credential_file, read_given, token_from};
use crate::commands::input::read_input;
use crate::commands::print_line;
use crate::emulator::{self, ControlClient, EmulatorConfig, SentMessage};
use crate::exit::{self, usage};
use crate::logging::unsafe_to_show;
use crate::shutdown::{Shutdown, Stage};

/// How long one long poll of `sent --follow` waits for a new message.
const FOLLOW_WAIT: Duration = Duration::from_secs(25);
/// The largest file `media add --file` sends: base64 makes it 4/3 larger,
/// and the control API takes bodies up to 64 MiB.
const MAX_MEDIA_FILE_BYTES: u64 = 48 * 1024 * 1024;

pub fn run(args: EmulatorArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        Some(EmulatorAction::Say(say_args)) => return say(say_args),
        Some(EmulatorAction::Sent(sent_args)) => return sent(sent_args),
        Some(EmulatorAction::Webhook(webhook_args)) => return webhook(webhook_args.action),
        Some(EmulatorAction::Media(media_args)) => {
            let EmulatorMediaAction::Add(add_args) = media_args.action;
            return media_add(add_args);
        }
        None => {}
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

/// The running emulator's control API, at the checked base URL.
fn control(client: &EmulatorClientArgs) -> anyhow::Result<(String, ControlClient)> {
    // The control API sits beside the bot API: a base URL with the API
    // path is the same mistake here, with the same fix.
    let base_url = crate::api::check_base_url(&client.base_url)?;
    let control = ControlClient::new(&base_url);
    Ok((base_url, control))
}

fn success() -> anyhow::Result<ExitCode> {
    Ok(exit::code(exit::SUCCESS))
}

/// Posts the message (or callback query) to the control API and prints the
/// update id it got.
fn say(args: EmulatorSayArgs) -> anyhow::Result<ExitCode> {
    let (base_url, control) = control(&args.client)?;
    let chat = match (&args.chat, &args.group) {
        (Some(user), None) => json!({"type": "private", "id": user}),
        (None, Some(group)) => json!({"type": "group", "id": group}),
        // clap's argument group admits exactly one of them.
        _ => return Err(usage("give one of --chat and --group")),
    };
    let (path, body) = match (&args.text, &args.image, &args.callback) {
        (Some(text), None, None) => {
            let text = if text == "-" {
                read_input("-")?.trim_end_matches('\n').to_string()
            } else {
                text.clone()
            };
            let message = json!({"chat": chat, "msgType": "text", "data": {"content": text}});
            ("/_emulator/messages", message)
        }
        (None, Some(url), None) => {
            let message = json!({"chat": chat, "msgType": "image", "data": {"originalUrl": url}});
            ("/_emulator/messages", message)
        }
        (None, None, Some(data)) => {
            // A button pressed: its id (unique per press), the chat it was
            // pressed in, and the button's data.
            let query = json!({
                "id": format!("cb_{}", fly_base::random::hex_id(8)),
                "chat": chat,
                "data": data,
            });
            let update = json!({"type": "callback_query", "callback_query": query});
            ("/_emulator/updates", update)
        }
        _ => return Err(usage("give one of TEXT, --image URL and --callback DATA")),
    };
    let answer = control.post(path, &body)?;
    let Some(update_id) = answer.get("update_id").and_then(Value::as_u64) else {
        return Err(anyhow!(
            "the emulator at {base_url} answered without an update_id: {answer}"
        ));
    };
    if args.client.json {
        print_line(&json!({"update_id": update_id}).to_string())?;
    } else {
        print_line(&update_id.to_string())?;
    }
    success()
}

/// What the bot sent; with `--follow`, then each new message as it comes.
fn sent(args: EmulatorSentArgs) -> anyhow::Result<ExitCode> {
    let (base_url, control) = control(&args.client)?;
    let json = args.client.json;
    if !args.follow {
        for message in control.sent(0, Duration::ZERO)?.messages {
            print_line(&sent_line(&message, json))?;
        }
        return success();
    }
    // Signals (and a closed pipe) end the wait however long the poll in
    // hand still runs: the polling thread is left to die with the process.
    let shutdown = Shutdown::on_signals(crate::shutdown::DEFAULT_GRACE)?;
    end_when_stdout_closes(&shutdown);
    let follower = ControlClient::waiting(&base_url, FOLLOW_WAIT);
    let followed = shutdown.unless_reached(Stage::Requested, move || -> anyhow::Result<()> {
        let mut after = 0;
        let mut wait = Duration::ZERO;
        loop {
            let page = follower.sent(after, wait)?;
            for message in &page.messages {
                print_line(&sent_line(message, json))?;
            }
            after = page.next;
            wait = FOLLOW_WAIT;
        }
    });
    match followed {
        // Stopped by a signal, or nobody reads any more: a normal end.
        None => success(),
        Some(result) => result.map(|()| exit::code(exit::SUCCESS)),
    }
}

/// One sent message: the request body on one line (`--json`), or
/// `user:ID TYPE "text"|URL client_msg_id=ID` for people.
fn sent_line(message: &SentMessage, json: bool) -> String {
    if json {
        return message.body.clone();
    }
    let chat = match message.chat_field {
        "group_id" => "group",
        _ => "user",
    };
    let content = if message.msg_type == "text" {
        quoted(&message.content)
    } else {
        word(&message.content)
    };
    format!(
        "{chat}:{} {} {content} client_msg_id={}",
        word(&message.chat),
        word(&message.msg_type),
        word(message.client_msg_id.as_deref().unwrap_or("-"))
    )
}

/// `text` as a JSON string on one line, with nothing that drives a terminal.
fn quoted(text: &str) -> String {
    let mut shown = String::with_capacity(text.len() + 2);
    for c in fly_signature::canonical::json_string(text).chars() {
        if unsafe_to_show(c) {
            shown.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            shown.push(c);
        }
    }
    shown
}

/// `text` as it is when it is one plain word, else [`quoted`].
fn word(text: &str) -> String {
    if text.is_empty()
        || text
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || unsafe_to_show(c))
    {
        quoted(text)
    } else {
        text.to_string()
    }
}

/// Requests the stop once stdout is a pipe (or socket) whose reader has
/// gone (`fly emulator sent --follow | head -1`), so a follower waiting for
/// the next message does not linger until then.
fn end_when_stdout_closes(shutdown: &Shutdown) {
    // SAFETY: fstat only writes into the zeroed struct we own.
    let is_pipe = unsafe {
        let mut status: libc::stat = std::mem::zeroed();
        libc::fstat(libc::STDOUT_FILENO, &mut status) == 0
            && matches!(
                status.st_mode & libc::S_IFMT,
                libc::S_IFIFO | libc::S_IFSOCK
            )
    };
    if !is_pipe {
        return;
    }
    let shutdown = shutdown.clone();
    let _ = std::thread::Builder::new()
        .name("fly-stdout-watch".into())
        .spawn(move || {
            let mut watched = libc::pollfd {
                fd: libc::STDOUT_FILENO,
                events: 0,
                revents: 0,
            };
            loop {
                // SAFETY: one pollfd we own, for the duration of the call.
                let ready = unsafe { libc::poll(&mut watched, 1, -1) };
                if ready > 0 && watched.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    shutdown.request();
                    return;
                }
                if ready < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    return;
                }
            }
        });
}

fn webhook(action: EmulatorWebhookAction) -> anyhow::Result<ExitCode> {
    match action {
        EmulatorWebhookAction::Set(args) => webhook_set(args),
        EmulatorWebhookAction::Unset(args) => {
            let (_, control) = control(&args.client)?;
            let report = control.post("/_emulator/webhook", &json!({"url": null}))?;
            if args.client.json {
                print_line(&report.to_string())?;
            } else {
                print_line("webhook unset: updates are queued for polling again")?;
            }
            success()
        }
        EmulatorWebhookAction::Status(args) => {
            let (_, control) = control(&args.client)?;
            let report = control.get("/_emulator/webhook")?;
            if args.client.json {
                print_line(&report.to_string())?;
            } else {
                for line in status_lines(&report) {
                    print_line(&line)?;
                }
            }
            success()
        }
    }
}

fn webhook_set(args: EmulatorWebhookSetArgs) -> anyhow::Result<ExitCode> {
    let (_, control) = control(&args.client)?;
    let url = args.url.trim();
    if let Some(problem) = crate::api::http_url_problem(url) {
        return Err(usage(format!("the webhook URL {url:?} {problem}")));
    }
    let (secret, source) = match &args.secret_file {
        Some(path) => (
            Some(read_credential_file(path, "--secret-file")?),
            format!("the secret in --secret-file {}", path.display()),
        ),
        None => match std::env::var("FLY_WEBHOOK_SECRET")
            .ok()
            .map(|secret| secret.trim().to_string())
            .filter(|secret| !secret.is_empty())
        {
            Some(secret) => (Some(secret), "FLY_WEBHOOK_SECRET".to_string()),
            None => (None, "the sha256 of the emulator's --token".to_string()),
        },
    };
    let mut body = json!({"url": url});
    if let Some(secret) = secret {
        body["secret"] = secret.into();
    }
    if let Some(bot_id) = &args.bot_id {
        if bot_id.trim().is_empty() {
            return Err(usage("--bot-id must not be empty"));
        }
        body["bot_id"] = bot_id.as_str().into();
    }
    let report = control.post("/_emulator/webhook", &body)?;
    if args.client.json {
        print_line(&report.to_string())?;
    } else {
        let bot_id = report["bot_id"].as_str().unwrap_or("-");
        print_line(&format!(
            "webhook set: each update goes to {url} as bot {bot_id}, signed with {source}"
        ))?;
    }
    success()
}

/// `GET /_emulator/webhook` for people: where deliveries go, then one line
/// per delivery.
fn status_lines(report: &Value) -> Vec<String> {
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let attempts = |count: u64| match count {
        1 => "1 attempt".to_string(),
        count => format!("{count} attempts"),
    };
    let mut lines = Vec::new();
    match report["url"].as_str() {
        Some(url) => {
            lines.push(format!("url: {url}"));
            lines.push(format!("bot_id: {}", text(&report["bot_id"])));
        }
        None => lines.push("url: none (updates are queued for polling)".into()),
    }
    lines.push(format!("pending: {}", text(&report["pending"])));
    for delivery in report["delivered"].as_array().into_iter().flatten() {
        let update_id = text(&delivery["update_id"]);
        let tries = attempts(delivery["attempts"].as_u64().unwrap_or(0));
        let outcome = match delivery.get("error") {
            Some(error) => format!("given up: {}", text(error)),
            None => format!("HTTP {}", text(&delivery["status"])),
        };
        lines.push(format!("update {update_id}: {outcome}, {tries}"));
    }
    if let Some(retrying) = report.get("retrying").filter(|value| !value.is_null()) {
        lines.push(format!(
            "update {}: retrying, {} failed so far (last: {})",
            text(&retrying["update_id"]),
            attempts(retrying["attempts"].as_u64().unwrap_or(0)),
            text(&retrying["error"])
        ));
    }
    lines
}

fn media_add(args: EmulatorMediaAddArgs) -> anyhow::Result<ExitCode> {
    let (_, control) = control(&args.client)?;
    let url = args.url.as_str();
    if url.trim().is_empty() {
        return Err(usage("the media URL must not be empty"));
    }
    let body = match (args.size, &args.file) {
        (Some(size), None) => json!({"url": url, "size": size}),
        (None, Some(path)) => {
            let bytes = read_given(path, MAX_MEDIA_FILE_BYTES, "--file")?;
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            json!({"url": url, "content_base64": encoded})
        }
        // clap's argument group admits exactly one of them.
        _ => return Err(usage("give one of --size and --file")),
    };
    let answer = control.post("/_emulator/media", &body)?;
    if args.client.json {
        print_line(&answer.to_string())?;
    } else {
        let size = answer["size"].as_u64().unwrap_or_default();
        print_line(&format!(
            "{url}: {size} bytes, downloadable through batch_access"
        ))?;
    }
    success()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(chat_field: &'static str, msg_type: &str, content: &str) -> SentMessage {
        SentMessage {
            body: "{}".into(),
            chat_field,
            chat: "u_1".into(),
            msg_type: msg_type.into(),
            content: content.into(),
            client_msg_id: Some("echo_7".into()),
        }
    }

    #[test]
    fn sent_lines_for_people() {
        assert_eq!(
            sent_line(&message("to_user_id", "text", "echo: hi\n你好"), false),
            "user:u_1 text \"echo: hi\\n你好\" client_msg_id=echo_7"
        );
        assert_eq!(
            sent_line(&message("group_id", "image", "https://x/a.png"), false),
            "group:u_1 image https://x/a.png client_msg_id=echo_7"
        );
        assert_eq!(
            sent_line(&message("group_id", "file", "a b"), false),
            "group:u_1 file \"a b\" client_msg_id=echo_7"
        );
        assert_eq!(sent_line(&message("group_id", "file", "x"), true), "{}");
        assert_eq!(
            sent_line(&message("to_user_id", "text", "a\u{202e}b\u{9b}"), false),
            "user:u_1 text \"a\\u202eb\\u009b\" client_msg_id=echo_7"
        );
    }

    #[test]
    fn webhook_status_for_people() {
        let report = json!({
            "url": "http://127.0.0.1:9/webhook",
            "bot_id": "bot_emulator",
            "pending": 1,
            "delivered": [
                {"update_id": 5, "status": 200, "attempts": 1},
                {"update_id": 6, "status": 0, "attempts": 2, "error": "unsignable"}
            ],
            "retrying": {"update_id": 7, "attempts": 3, "error": "HTTP 500"}
        });
        assert_eq!(
            status_lines(&report),
            [
                "url: http://127.0.0.1:9/webhook",
                "bot_id: bot_emulator",
                "pending: 1",
                "update 5: HTTP 200, 1 attempt",
                "update 6: given up: unsignable, 2 attempts",
                "update 7: retrying, 3 attempts failed so far (last: HTTP 500)",
            ]
        );
        let off =
            json!({"url": null, "bot_id": null, "pending": 0, "delivered": [], "retrying": null});
        assert_eq!(
            status_lines(&off),
            ["url: none (updates are queued for polling)", "pending: 0"]
        );
    }
}
