//! The command line as the user sees it: clap derive types only.
//!
//! Nothing outside `main.rs` and `commands/` touches these types; each command
//! turns its `Args` into a plain config before doing any work.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_BASE_URL: &str = "https://api.flycrytp.com";

/// Every tool of the Fly Bot API examples page in one binary.
///
/// Configuration comes from flags, else environment variables, else defaults.
/// Data goes to stdout; logs, progress and errors go to stderr.
/// Exit codes: 0 success, 1 the operation failed, 2 bad usage or bad input.
#[derive(Debug, Parser)]
#[command(name = "fly", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Base URL of the Fly Bot API (or of a local `fly emulator`).
    #[arg(
        long,
        env = "FLY_BASE_URL",
        default_value = DEFAULT_BASE_URL,
        global = true,
        value_name = "URL"
    )]
    pub base_url: String,

    /// Bot token. Prefer the environment variable or --token-file: a flag is
    /// visible to other users in the process list.
    #[arg(
        long,
        env = "FLY_BOT_TOKEN",
        hide_env_values = true,
        global = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// Read the bot token from this file (surrounding whitespace is ignored);
    /// takes precedence over --token and FLY_BOT_TOKEN.
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Format of log lines on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Less log output (-q errors only, -qq nothing but the final error line).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub quiet: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the v1 signature of a signed update (offline).
    VerifySig(VerifySigArgs),
    /// Add bot.id, timestamp, nonce and a v1 signature to an update.
    Sign(SignArgs),
    /// Send a message to a user or a group.
    Send(SendArgs),
    /// Run the long-polling echo bot as a service.
    PollEcho(PollEchoArgs),
    /// Receive signed webhook deliveries and answer them.
    ServeWebhook(ServeWebhookArgs),
    /// Exchange media URLs through batch_access and download the files.
    FetchMedia(FetchMediaArgs),
    /// Long-poll the platform and deliver each update, signed, to a local webhook receiver.
    Forward(ForwardArgs),
    /// Run a local Fly Bot API on loopback for development and tests.
    ///
    /// With --token (or FLY_BOT_TOKEN, --token-file) only that token is accepted;
    /// otherwise any non-empty bearer token is.
    Emulator(EmulatorArgs),
    /// Play a short conversation through poll-echo against an in-process emulator.
    Demo(DemoArgs),
    /// List the updates that could never be handled, one JSON object per line.
    ///
    /// poll-echo, forward and serve-webhook record an update they cannot handle
    /// at all (no usable update_id, a message with no chat to answer, …) with
    /// its exact bytes and the reason, and go on with the others.
    DeadLetters(DeadLettersArgs),
}

/// Where a signed-update secret comes from, shared by every command that signs or verifies.
#[derive(Debug, Args)]
pub struct SecretArgs {
    /// Webhook secret; repeat the flag to accept any of several (key rotation;
    /// commands that sign use the first).
    /// Default: FLY_WEBHOOK_SECRET, else the sha256 hex of the bot token.
    #[arg(long = "secret", value_name = "SECRET")]
    pub secrets: Vec<String>,
}

#[derive(Debug, Args)]
pub struct VerifySigArgs {
    /// Signed update JSON file, or - for stdin.
    #[arg(value_name = "FILE", default_value = "-")]
    pub input: String,

    #[command(flatten)]
    pub secret: SecretArgs,

    /// Current unix time for the replay-window check.
    /// Default: FLY_NOW_TS (read as the platform's script reads it), else the clock.
    #[arg(long, value_name = "TS", allow_negative_numbers = true)]
    pub now: Option<i64>,

    /// Replay window in seconds.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub window: u64,

    /// Check only the signature, not the timestamp (for old captures).
    #[arg(long)]
    pub ignore_timestamp: bool,

    /// Print every step of the computation to stderr.
    #[arg(long)]
    pub explain: bool,

    /// Input is NDJSON: one signed update per line, one JSON verdict per line on stdout.
    #[arg(long, conflicts_with = "explain")]
    pub lines: bool,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// Update JSON file, or - for stdin.
    #[arg(value_name = "FILE", default_value = "-")]
    pub input: String,

    #[command(flatten)]
    pub secret: SecretArgs,

    /// bot.id to sign with.
    #[arg(long, default_value = "bot_local", value_name = "ID")]
    pub bot_id: String,

    /// Timestamp to sign with. Default: FLY_NOW_TS, else the clock.
    #[arg(long, value_name = "TS", allow_negative_numbers = true)]
    pub now: Option<i64>,

    /// Nonce to sign with (default: random).
    #[arg(long, value_name = "NONCE")]
    pub nonce: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to", "group"])))]
pub struct SendArgs {
    /// Send to this user id.
    #[arg(long, value_name = "USER")]
    pub to: Option<String>,

    /// Send to this group id.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Message text, or - to read it from stdin. Not used with --data.
    #[arg(value_name = "TEXT")]
    pub text: Option<String>,

    /// Message type (text, image, voice, video, file, ...).
    #[arg(long = "type", default_value = "text", value_name = "TYPE")]
    pub msg_type: String,

    /// The message's data object as JSON, for types other than text.
    #[arg(long, value_name = "JSON", conflicts_with = "text")]
    pub data: Option<String>,

    /// Idempotency key (default: one random id per invocation, reused by its retries).
    #[arg(long, value_name = "ID")]
    pub client_msg_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct PollEchoArgs {
    /// State store file (default: per bot, under the user's state directory).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,

    /// Download media messages into DIR and forward them back.
    #[arg(long, value_name = "DIR")]
    pub media_dir: Option<PathBuf>,

    /// Updates per poll (1..100).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub limit: u32,

    /// Long-poll timeout in seconds (0..=3600).
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub poll_timeout: u64,

    /// Exit after this many handled updates.
    #[arg(long, value_name = "N")]
    pub max_updates: Option<u64>,

    /// Poll once with timeout 0, handle what came, exit.
    #[arg(long)]
    pub once: bool,

    /// Chats answered at the same time (updates of one chat stay in order).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,

    #[command(flatten)]
    pub retention: RetentionArgs,

    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// How long handled update ids are kept in the state store, to answer a
    /// redelivery as a duplicate: seconds, or a number with a unit (30s, 90m,
    /// 12h, 7d). Older ones are pruned, so the state file stays bounded.
    #[arg(long, default_value = "7d", value_name = "DURATION", value_parser = parse_duration)]
    pub retention: Duration,
}

/// `604800`, `30s`, `90m`, `12h` or `7d`: at least a second, at most 100 years.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => trimmed.split_at(at),
        None => (trimmed, "s"),
    };
    let scale: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit {unit:?}: use s, m, h or d (e.g. 7d, 12h, 30s)"
            ));
        }
    };
    let count: u64 = digits.parse().map_err(|_| {
        "expected a number of seconds, or a number with s, m, h or d (e.g. 7d)".to_string()
    })?;
    const MAX_SECS: u64 = 100 * 365 * 86_400;
    match count.checked_mul(scale) {
        Some(0) => Err("must be at least 1s".into()),
        Some(secs) if secs <= MAX_SECS => Ok(Duration::from_secs(secs)),
        _ => Err("must be at most 100 years".into()),
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Run CMD (through sh -c) per update instead of the echo; its stdout is the reply.
    #[arg(long, value_name = "CMD", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub exec: Option<String>,

    /// Kill a handler that runs longer than this many seconds (1..=86400).
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub exec_timeout: u64,

    /// Give the handler the bot token as FLY_BOT_TOKEN (withheld by default).
    #[arg(long, requires = "exec")]
    pub exec_pass_token: bool,
}

#[derive(Debug, Args)]
pub struct ServeWebhookArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0", value_name = "ADDR")]
    pub bind: IpAddr,

    /// Port to listen on.
    #[arg(long, env = "FLY_WEBHOOK_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Path that receives deliveries.
    #[arg(long, env = "FLY_WEBHOOK_PATH", default_value = "/webhook")]
    pub path: String,

    #[command(flatten)]
    pub secret: SecretArgs,

    /// Largest accepted body in bytes.
    #[arg(long, default_value_t = 1024 * 1024, value_name = "BYTES")]
    pub max_body: u64,

    /// Replay window in seconds (timestamps further from now are refused;
    /// nonces are kept for twice as long). At most a year.
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub window: u64,

    /// Connections open at once; more wait in the listen backlog.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Seconds a client gets to send its request headers (slowloris protection).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300), value_name = "SECS")]
    pub header_timeout: u64,

    /// Replies sent at the same time (a bounded pool of blocking threads).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub concurrency: u32,

    /// State store file for dedupe and nonces (used by this process alone
    /// while it serves).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,

    #[command(flatten)]
    pub retention: RetentionArgs,

    /// Serve HTTPS with this certificate chain (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key for --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(Debug, Args)]
pub struct FetchMediaArgs {
    /// Media URLs as they appear in messages.
    #[arg(value_name = "URL")]
    pub urls: Vec<String>,

    /// Write the single file here, or - for stdout.
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<String>,

    /// Directory for downloaded files (named after the URL).
    #[arg(
        long,
        default_value = ".",
        value_name = "DIR",
        conflicts_with = "output"
    )]
    pub dir: PathBuf,

    /// Take the media URLs from an update or message JSON (FILE or -).
    #[arg(long, value_name = "FILE")]
    pub update: Option<String>,

    /// With --update: skip thumbnails, fetch only the media itself.
    #[arg(long, requires = "update")]
    pub original_only: bool,

    /// Overwrite files that already exist.
    #[arg(long)]
    pub force: bool,

    /// Skip the fsync before a file gets its name: faster where the disk is
    /// slower than the network, but a power cut soon after can leave an empty
    /// or partial file under the final name.
    #[arg(long)]
    pub no_fsync: bool,

    /// Lifetime requested for the access URLs.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub expire_seconds: u64,
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// The local webhook receiver to deliver signed updates to.
    #[arg(long, value_name = "URL")]
    pub to: String,

    #[command(flatten)]
    pub secret: SecretArgs,

    /// bot.id to sign with.
    #[arg(long, default_value = "bot_local", value_name = "ID")]
    pub bot_id: String,

    /// Long-poll timeout in seconds (0..=3600).
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub poll_timeout: u64,

    /// State store file.
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,

    #[command(flatten)]
    pub retention: RetentionArgs,
}

#[derive(Debug, Args)]
pub struct EmulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub bind: IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    // The accepted bot token is the global --token / FLY_BOT_TOKEN / --token-file:
    // when one is configured only it is accepted, otherwise any non-empty token is.
}

#[derive(Debug, Args)]
pub struct DemoArgs {}

#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    /// State store file (default: the bot's, found from the base URL and token).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,

    /// Remove every dead letter instead of listing them.
    #[arg(long)]
    pub purge: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_take_seconds_or_a_unit() {
        for (text, secs) in [
            ("604800", 604_800),
            ("30s", 30),
            ("90m", 5_400),
            ("12h", 43_200),
            ("7d", 604_800),
            (" 1d ", 86_400),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for bad in [
            "",
            "0",
            "0s",
            "7x",
            "d",
            "-1",
            "1.5h",
            "7 d",
            "36501d",
            "99999999999999999999",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
