//! `--exec CMD`: your own logic, in any language, instead of the echo.
//!
//! CMD runs through `sh -c` once per message update, with the update on stdin
//! byte for byte as the platform sent it, and its key fields in the environment. A non-empty stdout is the
//! reply (text, or a JSON object with `msg_type` and `data`); exit 0 means
//! handled, anything else (or running past the timeout) means failed, and the
//! update is retried. Replies carry `client_msg_id` `reply_{update_id}`, so a
//! handler that is retried after its reply was sent never double-posts.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde_json::{Map, Value};

use super::{HandleError, Handler, Outcome};
use crate::api::{ApiClient, MessageData, SendRequest, Update};
use crate::sync::join_unless;

/// A handler's reply is one message; more than this is a bug in the handler.
const MAX_REPLY_BYTES: u64 = 1024 * 1024;
const WAIT_SLICE: Duration = Duration::from_millis(10);
/// How long the handler's last stderr lines get to reach the log once it is gone.
const LOG_GRACE: Duration = Duration::from_millis(500);
/// A stderr "line" longer than this (binary output, no newlines) is logged in
/// pieces rather than held in memory whole.
const MAX_LOG_LINE: u64 = 16 * 1024;

pub struct ExecHandler {
    command: String,
    timeout: Duration,
    client: ApiClient,
    /// Hand the bot token to the handler as FLY_BOT_TOKEN (off by default).
    pass_token: bool,
    /// Set by [`Handler::abandon`] when fly is exiting without waiting.
    abandoned: AtomicBool,
}

impl ExecHandler {
    pub fn new(command: String, timeout: Duration, client: ApiClient, pass_token: bool) -> Self {
        ExecHandler {
            command,
            timeout,
            client,
            pass_token,
            abandoned: AtomicBool::new(false),
        }
    }

    fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }
}

impl Handler for ExecHandler {
    /// Kills the process group of every handler still running (within
    /// `WAIT_SLICE`) and starts no more: their updates fail, so they are not
    /// marked handled and get delivered again.
    fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }

    fn handle(&self, update: &Update) -> Result<Outcome, HandleError> {
        let Some(message) = update.message.as_ref() else {
            return Ok(Outcome::Ignored);
        };
        let stdout = self.run(update).map_err(|error| {
            HandleError::Retry(error.context(format!("--exec {:?}", self.command)))
        })?;
        let reply = stdout.trim_end_matches(['\n', '\r']);
        if reply.trim().is_empty() {
            return Ok(Outcome::Handled);
        }
        let Some(chat) = message.chat.as_ref() else {
            tracing::warn!(
                update_id = update.update_id,
                "the handler replied, but the message has no chat to reply to"
            );
            return Ok(Outcome::Handled);
        };
        let client_msg_id = format!("reply_{}", update.update_id);
        let request = match reply_message(reply) {
            Some((msg_type, data)) => SendRequest::new(
                chat.reply_target(),
                msg_type,
                MessageData::from_fields(&data),
                client_msg_id,
            ),
            None => SendRequest::text(chat.reply_target(), reply, client_msg_id),
        };
        match self.client.send(&request) {
            Ok(_) => Ok(Outcome::Replied),
            Err(error) => HandleError::from_api(error),
        }
    }
}

/// A reply that is a JSON object with a string `msg_type` and an object
/// `data` is sent as that message; anything else is text.
fn reply_message(reply: &str) -> Option<(String, Map<String, Value>)> {
    let Value::Object(mut object) = serde_json::from_str::<Value>(reply.trim()).ok()? else {
        return None;
    };
    let Some(Value::String(msg_type)) = object.remove("msg_type") else {
        return None;
    };
    let Some(Value::Object(data)) = object.remove("data") else {
        return None;
    };
    Some((msg_type, data))
}

impl ExecHandler {
    /// Runs the handler for one update; returns its stdout if it exited 0 in time.
    fn run(&self, update: &Update) -> anyhow::Result<String> {
        let update_id = update.update_id;
        let message = update.message.as_ref();
        let chat = message.and_then(|message| message.chat.as_ref());
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&self.command)
            .env("FLY_UPDATE_ID", update_id.to_string())
            .env("FLY_UPDATE_TYPE", &update.kind)
            .env("FLY_CHAT_ID", chat.map_or("", |chat| chat.id.as_str()))
            .env("FLY_CHAT_TYPE", chat.map_or("", |chat| chat.kind.as_str()))
            .env(
                "FLY_MSG_TYPE",
                message.map_or("", |message| message.msg_type.as_str()),
            )
            // Secrets stay with fly unless the user says otherwise.
            .env_remove("FLY_BOT_TOKEN")
            .env_remove("FLY_WEBHOOK_SECRET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills everything it started.
            .process_group(0);
        if self.pass_token {
            command.env("FLY_BOT_TOKEN", self.client.token().expose());
        }
        if self.abandoned() {
            return Err(anyhow!("not started: fly is stopping"));
        }
        let deadline = Instant::now() + self.timeout;
        let mut child = command.spawn().context("starting the handler")?;

        // The update byte for byte as the platform sent it.
        let input = update.raw.clone().into_bytes();
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // Written on a thread that is never waited for: a handler that does
        // not read stdin must not block us once the pipe buffer is full. The
        // write ends (done, or a broken pipe) when the handler exits or is killed.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let reader = std::thread::spawn(move || {
            let mut reply = Vec::new();
            let read = (&mut stdout).take(MAX_REPLY_BYTES).read_to_end(&mut reply);
            // Keep draining so the handler never blocks on a full pipe.
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
            read.map(|_| reply)
        });
        let stderr = child.stderr.take().expect("stderr is piped");
        let logger = std::thread::spawn(move || log_stderr(stderr, update_id));

        // The reply is complete once the handler exited and its stdout closed;
        // a background job it started may hold stdout open after the shell
        // exits, so both count against the timeout.
        let give_up = || Instant::now() >= deadline || self.abandoned();
        let status = wait_until(&mut child, give_up);
        let reply = status.and_then(|_| join_unless(reader, give_up));
        let (Some(status), Some(reply)) = (status, reply) else {
            kill_group(&child);
            let _ = child.wait();
            join_logger(logger);
            if self.abandoned() {
                tracing::warn!(
                    update_id,
                    "fly is stopping: handler killed, the update is not marked handled"
                );
                return Err(anyhow!("killed: fly is stopping"));
            }
            return Err(anyhow!("timed out after {:?}; killed", self.timeout));
        };
        join_logger(logger);
        let reply = reply
            .map_err(|_| anyhow!("reading the handler's output failed"))?
            .context("reading the handler's output")?;
        if !status.success() {
            return Err(anyhow!("failed ({status})"));
        }
        String::from_utf8(reply).map_err(|_| anyhow!("its output is not UTF-8"))
    }
}

/// Logs the handler's stderr, one warning per line, until it is closed.
/// Lines are raw bytes shown lossily: a handler printing non-UTF-8 (a Latin-1
/// message, a stray binary byte) must not silence every line after it. A line
/// longer than `MAX_LOG_LINE` is logged in pieces.
fn log_stderr(stderr: impl Read, update_id: i64) {
    let mut stderr = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut stderr)
            .take(MAX_LOG_LINE)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        tracing::warn!(update_id, "[exec] {text}");
    }
}

/// The child's exit status, or `None` once `give_up` says so first.
fn wait_until(child: &mut Child, give_up: impl Fn() -> bool) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if give_up() => return None,
            Ok(None) => std::thread::sleep(WAIT_SLICE),
            Err(_) => return None,
        }
    }
}

/// Lines written before the handler ended still reach the log; a background
/// job that keeps stderr open is not waited for.
fn join_logger(logger: JoinHandle<()>) {
    let deadline = Instant::now() + LOG_GRACE;
    let _ = join_unless(logger, || Instant::now() >= deadline);
}

/// SIGKILL to the handler's whole process group (its shell and children).
fn kill_group(child: &Child) {
    let Ok(group) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals that process group; it has
    // no memory-safety preconditions.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_replies_need_msg_type_and_data() {
        let (msg_type, data) =
            reply_message(r#" {"msg_type":"image","data":{"originalUrl":"u"}} "#).unwrap();
        assert_eq!(msg_type, "image");
        assert_eq!(data["originalUrl"], "u");
        for text in [
            "hello",
            "{\"msg_type\":\"text\"}",
            "[1]",
            "{\"data\":{}}",
            "{\"msg_type\":1,\"data\":{}}",
        ] {
            assert!(reply_message(text).is_none(), "{text}");
        }
    }
}
