//! `fly demo`: the whole loop on one machine, with no token and no network.
//! An in-process emulator receives a short conversation (a private text, a
//! group text, an image), the real poll-echo loop answers it, and the
//! transcript is printed.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde_json::{Value, json};

use crate::api::{ApiClient, Token};
use crate::bot::echo::EchoHandler;
use crate::bot::poll_loop::{self, PollSettings};
use crate::cli::DemoArgs;
use crate::emulator::{ControlClient, Emulator, EmulatorConfig};
use crate::exit;
use crate::output::print_line;
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use fly_state::{BotIdentity, SqliteStore};

const DEMO_TOKEN: &str = "demo-token-not-secret";
const IMAGE_URL: &str = "https://cdn.example/demo/cat.png";
const THUMBNAIL_URL: &str = "https://cdn.example/demo/thumbs/cat.png";

/// Who says what in the demo: (chat type, chat id, speaker, msgType, data).
fn conversation() -> Vec<(
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Value,
)> {
    vec![
        (
            "private",
            "u_alice",
            "alice",
            "text",
            json!({"content": "hello fly 👋"}),
        ),
        (
            "group",
            "g_team",
            "team",
            "text",
            json!({"content": "大家好，部署完成了吗？"}),
        ),
        (
            "private",
            "u_alice",
            "alice",
            "image",
            json!({"originalUrl": IMAGE_URL, "thumbnailUrl": THUMBNAIL_URL, "width": 640, "height": 480}),
        ),
    ]
}

/// One message of the conversation, as the emulator numbered it.
struct Incoming {
    update_id: i64,
    chat_type: &'static str,
    chat_id: &'static str,
    speaker: &'static str,
    msg_type: &'static str,
    data: Value,
}

pub fn run(_args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let emulator = Emulator::start(EmulatorConfig {
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 0,
        token: Some(DEMO_TOKEN.to_string()),
        // The demo's state is a temporary file no earlier run shares, so
        // small ids (and short media file names in the transcript) are safe.
        first_update_id: 1,
    })?;
    let control = ControlClient::new(emulator.base_url());
    let incoming = say_the_conversation(&control)?;

    let work = tempfile::tempdir().context("creating a temporary directory")?;
    let media_dir = work.path().join("media");
    let handled = answer_with_poll_echo(&emulator, work.path(), &media_dir, incoming.len())?;
    let sent = control.get("/_emulator/sent")?;
    let sent = sent["sent"].as_array().cloned().unwrap_or_default();

    print_line(&format!(
        "fly demo: a local Fly Bot API at {}, answered by poll-echo\n",
        emulator.base_url()
    ))?;
    print_transcript(&incoming, &sent, &media_dir)?;
    print_line(&format!(
        "\n{handled} updates handled in {:.2} s; offset and handled ids kept in a SQLite state file.",
        started.elapsed().as_secs_f64()
    ))?;
    print_line(
        "Try it yourself, in three terminals:\n  \
         fly emulator\n  \
         FLY_BASE_URL=http://127.0.0.1:8787 FLY_BOT_TOKEN=dev fly poll-echo\n  \
         fly emulator say --chat u_me \"hello bot\"\n  \
         fly emulator sent --follow\n\
         The last prints each answer as the bot sends it; the emulator logs every API call.",
    )?;
    emulator.shutdown();
    if handled as usize == incoming.len() {
        Ok(exit::code(exit::SUCCESS))
    } else {
        Err(anyhow!(
            "only {handled} of {} updates were answered",
            incoming.len()
        ))
    }
}

/// Gives the emulator the demo's media, then posts the conversation.
fn say_the_conversation(control: &ControlClient) -> anyhow::Result<Vec<Incoming>> {
    control.post(
        "/_emulator/media",
        &json!({"url": IMAGE_URL, "size": 48_000}),
    )?;
    control.post(
        "/_emulator/media",
        &json!({"url": THUMBNAIL_URL, "size": 4_000}),
    )?;
    let mut incoming = Vec::new();
    for (chat_type, chat_id, speaker, msg_type, data) in conversation() {
        let answer = control.post(
            "/_emulator/messages",
            &json!({"chat": {"type": chat_type, "id": chat_id}, "msgType": msg_type, "data": data}),
        )?;
        let update_id = answer["update_id"]
            .as_i64()
            .ok_or_else(|| anyhow!("emulator gave no update_id"))?;
        incoming.push(Incoming {
            update_id,
            chat_type,
            chat_id,
            speaker,
            msg_type,
            data,
        });
    }
    Ok(incoming)
}

/// Runs the real poll-echo loop against the emulator until it has handled
/// `updates` updates; returns how many it handled.
fn answer_with_poll_echo(
    emulator: &Emulator,
    work: &Path,
    media_dir: &Path,
    updates: usize,
) -> anyhow::Result<u64> {
    let token = Token::new(DEMO_TOKEN).expect("the demo token is not empty");
    let client = ApiClient::new(emulator.base_url(), token.clone(), RetryPolicy::ONE_SHOT)?;
    let identity = BotIdentity::new(emulator.base_url(), token.expose());
    let store = std::sync::Arc::new(SqliteStore::open(&work.join("state.db"), &identity)?);
    std::fs::create_dir_all(media_dir)?;
    let handler = EchoHandler {
        client: client.clone(),
        media_dir: Some(media_dir.to_path_buf()),
    };
    let settings = PollSettings {
        source: crate::observe::Source::Poll,
        max_attempts: 5,
        park_retry_max: Duration::from_secs(300),
        limit: 50,
        poll_timeout: Duration::from_secs(1),
        concurrency: 1,
        max_updates: Some(updates as u64),
        once: false,
    };
    let summary = poll_loop::run(
        &client,
        store,
        std::sync::Arc::new(handler),
        &settings,
        &Shutdown::new(),
    )?;
    Ok(summary.handled)
}

/// Each message of the conversation, then the bot's reply to it.
fn print_transcript(incoming: &[Incoming], sent: &[Value], media_dir: &Path) -> anyhow::Result<()> {
    for message in incoming {
        let Incoming {
            update_id,
            chat_type,
            chat_id,
            speaker,
            msg_type,
            data,
        } = message;
        print_line(&format!(
            "  {:<24} › {}",
            format!("{speaker} ({chat_type} {chat_id})"),
            describe(msg_type, data)
        ))?;
        let reply = sent.iter().find(|request| {
            let id = request["client_msg_id"].as_str().unwrap_or_default();
            id == format!("echo_{update_id}") || id == format!("fwd_{update_id}")
        });
        let line = match reply {
            Some(request) => describe_reply(request, media_dir, *update_id),
            None => "(no reply)".to_string(),
        };
        print_line(&format!("  {:<24} ‹ {line}", format!("bot → {chat_id}")))?;
    }
    Ok(())
}

fn describe(msg_type: &str, data: &Value) -> String {
    match msg_type {
        "text" => data["content"].as_str().unwrap_or_default().to_string(),
        _ => format!(
            "[{msg_type}] {}",
            data["originalUrl"].as_str().unwrap_or_default()
        ),
    }
}

fn describe_reply(request: &Value, media_dir: &Path, update_id: i64) -> String {
    let msg_type = request["msg_type"].as_str().unwrap_or_default();
    if msg_type == "text" {
        return request["data"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
    }
    let mut saved: Vec<String> = std::fs::read_dir(media_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let size = entry.metadata().ok()?.len();
            name.starts_with(&format!("{update_id}-"))
                .then(|| format!("{name} ({size} bytes)"))
        })
        .collect();
    saved.sort();
    format!(
        "[{msg_type}] forwarded back after saving {}",
        saved.join(", ")
    )
}
