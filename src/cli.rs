//! The command line as the user sees it: clap derive types only.
//!
//! Nothing outside `main.rs` and `commands/` touches these types; each command
//! turns its `Args` into a plain config before doing any work.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::styling::Style;
use clap::builder::{PathBufValueParser, StyledStr, TypedValueParser};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::profiles::{self, ConfigError, Key, Origin, Origins, Profile};

pub const DEFAULT_BASE_URL: &str = "https://api.flycrytp.com";
pub use crate::emulator::DEFAULT_URL as DEFAULT_EMULATOR_URL;
pub use fly_state::StateLocation;

/// Every tool of the Fly Bot API examples page in one binary.
///
/// Configuration comes from flags, else environment variables, else the
/// profile in use (`fly config --help`), else defaults.
/// Data goes to stdout; logs, progress and errors go to stderr.
/// Exit codes: 0 success, 1 the operation failed, 2 bad usage or bad input.
#[derive(Debug, Parser)]
#[command(
    name = "fly",
    version = env!("FLY_VERSION_LINE"),
    propagate_version = true,
    after_help = examples(&[
        "# See the whole loop work: no token, no network",
        "fly demo",
        "# A local Fly Bot API, and the echo bot answering it (two terminals)",
        "fly emulator",
        "FLY_BASE_URL=http://127.0.0.1:8787 FLY_BOT_TOKEN=dev fly poll-echo",
        "# One command's options and examples",
        "fly send --help",
    ])
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,

    /// The flags carrying a credential that were typed on the command line
    /// (`--token`, `--secret`): other users can read them in the process list.
    #[arg(skip)]
    pub credentials_on_command_line: Vec<&'static str>,
}

/// Why the command line cannot be run: clap refuses it, or the config
/// file (or the profile it names) cannot be used. Both are exit 2.
#[derive(Debug)]
pub enum CliError {
    Usage(clap::Error),
    Config(ConfigError),
}

impl From<clap::Error> for CliError {
    fn from(error: clap::Error) -> Self {
        CliError::Usage(error)
    }
}

impl Cli {
    /// Parses the command line (and the environment variables of its
    /// options) with the settings of the profile in use, or says why it
    /// cannot be parsed.
    pub fn parse_args() -> Result<Cli, CliError> {
        use clap::CommandFactory;
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        let matches = Cli::command().try_get_matches_from(&args)?;
        let (global, _) = leaf_of(&matches);
        // `fly config show NAME` names the profile it shows.
        let named = global
            .try_get_one::<String>("profile_name")
            .ok()
            .flatten()
            .or_else(|| global.get_one::<String>("profile"));
        let config = global.get_one::<PathBuf>("config");
        let Some(profile) =
            profiles::select(config.map(PathBuf::as_path), named.map(String::as_str))
                .map_err(CliError::Config)?
        else {
            return Ok(Cli::from_matches(&matches, None)?);
        };
        // The profile's settings become the defaults of the options the
        // command line and the environment left unset: clap then applies
        // flag > environment > default as for any option.
        let command =
            with_profile_defaults(Cli::command(), &matches, &profile).map_err(CliError::Config)?;
        let matches = command.try_get_matches_from(&args)?;
        Ok(Cli::from_matches(&matches, Some(&profile))?)
    }

    /// Parses `args` without any profile (the tests' entry).
    pub fn parse_args_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::CommandFactory;
        let matches = Cli::command().try_get_matches_from(args)?;
        Cli::from_matches(&matches, None)
    }

    fn from_matches(matches: &ArgMatches, profile: Option<&Profile>) -> Result<Cli, clap::Error> {
        let mut cli = Cli::from_arg_matches(matches)?;
        let (leaf, _) = leaf_of(matches);
        refuse_empty_now(leaf)?;
        cli.credentials_on_command_line = [("token", "--token"), ("secrets", "--secret")]
            .into_iter()
            .filter(|(id, _)| {
                leaf.ids().any(|present| present.as_str() == *id)
                    && leaf.value_source(id) == Some(ValueSource::CommandLine)
            })
            .map(|(_, flag)| flag)
            .collect();
        // Only the commands that report where values came from pay for
        // reading the command's definition again.
        let origins = || origins_of(&Leaf::of(matches), profile);
        match &mut cli.command {
            Command::Doctor(args) => args.origins = origins(),
            Command::Config(ConfigArgs {
                action: ConfigAction::Show(args),
            }) => args.origins = origins(),
            Command::Config(ConfigArgs {
                action: ConfigAction::List(args),
            }) => {
                args.origins = origins();
                args.config = cli.global.config.clone();
            }
            _ => {}
        }
        Ok(cli)
    }
}

/// The matches of the deepest subcommand, and the names leading to it.
fn leaf_of(matches: &ArgMatches) -> (&ArgMatches, Vec<String>) {
    let mut leaf = matches;
    let mut path = Vec::new();
    while let Some((name, sub)) = leaf.subcommand() {
        path.push(name.to_string());
        leaf = sub;
    }
    (leaf, path)
}

/// The deepest subcommand's matches and the options it defines. Whether a
/// command has an option is asked of its definition: a release build of
/// clap answers an undefined id as merely absent (a debug build panics).
struct Leaf<'a> {
    matches: &'a ArgMatches,
    path: Vec<String>,
    options: Vec<String>,
}

impl<'a> Leaf<'a> {
    fn of(matches: &'a ArgMatches) -> Leaf<'a> {
        use clap::CommandFactory;
        let (leaf, path) = leaf_of(matches);
        let root = Cli::command();
        let mut command = &root;
        for name in &path {
            match command.find_subcommand(name) {
                Some(sub) => command = sub,
                None => break,
            }
        }
        let options = command
            .get_arguments()
            .map(|arg| arg.get_id().to_string())
            .collect();
        Leaf {
            matches: leaf,
            path,
            options,
        }
    }

    /// Whether the command has option `id` (not every command has every one).
    fn has(&self, id: &str) -> bool {
        self.options.iter().any(|option| option == id)
    }

    fn source(&self, id: &str) -> Option<ValueSource> {
        if self.has(id) {
            self.matches.value_source(id)
        } else {
            None
        }
    }

    /// Set on the command line or by its environment variable.
    fn given(&self, id: &str) -> bool {
        matches!(
            self.source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }
}

/// What a profile key stands in for: the option (its clap id), the ids
/// that, given on the command line or in the environment, mean the setting
/// is already chosen (a --token sets `token_file` aside), and the variable
/// that does the same where a command reads it itself (`fly sign` and
/// `fly emulator webhook set` read FLY_BOT_TOKEN / FLY_WEBHOOK_SECRET
/// without an option of their own).
struct Stands {
    id: &'static str,
    deciding: &'static [&'static str],
    variable: Option<&'static str>,
}

fn option_of(key: Key) -> Stands {
    let (id, deciding, variable): (_, &'static [&'static str], _) = match key {
        Key::BaseUrl => ("base_url", &["base_url"], None),
        Key::TokenFile => (
            "token_file",
            &["token", "token_file"],
            Some("FLY_BOT_TOKEN"),
        ),
        Key::SecretFile => (
            "secret_files",
            &["secrets", "secret_files"],
            Some("FLY_WEBHOOK_SECRET"),
        ),
        Key::State => ("state", &["state"], None),
        Key::BotId => ("bot_id", &["bot_id"], None),
    };
    Stands {
        id,
        deciding,
        variable,
    }
}

impl Stands {
    fn already_chosen(&self, leaf: &Leaf) -> bool {
        self.deciding.iter().any(|id| leaf.given(id))
            || self
                .variable
                .and_then(std::env::var_os)
                .is_some_and(|value| !value.is_empty())
    }
}

/// `command` with the profile's settings as the defaults of the options the
/// first parse (`matches`) found unset. A token or secret file the profile
/// names must be there (its line is the one to fix).
fn with_profile_defaults(
    command: clap::Command,
    matches: &ArgMatches,
    profile: &Profile,
) -> Result<clap::Command, ConfigError> {
    let leaf = Leaf::of(matches);
    let mut defaults = Vec::new();
    for setting in &profile.settings {
        let stands = option_of(setting.key);
        if !leaf.has(stands.id) || stands.already_chosen(&leaf) {
            continue;
        }
        if matches!(setting.key, Key::TokenFile | Key::SecretFile)
            && !Path::new(&setting.value).is_file()
        {
            return Err(ConfigError(format!(
                "config file {} line {}: {} {} of profile {} is not a file",
                profile.path.display(),
                setting.line,
                setting.key.name(),
                setting.value,
                profile.name
            )));
        }
        defaults.push((stands.id, setting.value.clone()));
    }
    Ok(on_leaf(command, &leaf.path, move |mut leaf| {
        for (id, value) in defaults {
            // clap takes a default as a `&'static str` (owned ones need its
            // `string` feature); the command line is parsed once per process.
            let value: &'static str = Box::leak(value.into_boxed_str());
            leaf = leaf.mut_arg(id, |arg| arg.default_value(value));
        }
        leaf
    }))
}

/// `change` applied to the subcommand at `path` below `command`.
fn on_leaf(
    command: clap::Command,
    path: &[String],
    change: impl FnOnce(clap::Command) -> clap::Command,
) -> clap::Command {
    match path.split_first() {
        None => change(command),
        Some((name, rest)) => command.mut_subcommand(name, |sub| on_leaf(sub, rest, change)),
    }
}

/// Where each setting the command has came from. A default value of an
/// option the profile sets is the profile's (it was applied only where
/// nothing else set the option).
fn origins_of(leaf: &Leaf, profile: Option<&Profile>) -> Origins {
    let from_profile = |key: Key| {
        profile.and_then(|profile| profile.get(key).map(|setting| profile.origin_of(setting)))
    };
    let source = |id: &str| leaf.source(id);
    let plain = |id: &str, flag: &str, variable: &'static str, key: Key| {
        leaf.has(id).then(|| match leaf.source(id) {
            Some(ValueSource::CommandLine) => Origin::Flag(flag.to_string()),
            Some(ValueSource::EnvVariable) => Origin::Env(variable),
            _ => from_profile(key).unwrap_or(Origin::Default),
        })
    };
    let token = match (source("token_file"), source("token")) {
        (Some(ValueSource::CommandLine), _) => Some(Origin::Flag("--token-file".into())),
        (Some(ValueSource::DefaultValue), _) => from_profile(Key::TokenFile),
        (_, Some(ValueSource::CommandLine)) => Some(Origin::Flag("--token".into())),
        (_, Some(ValueSource::EnvVariable)) => Some(Origin::Env("FLY_BOT_TOKEN")),
        _ => None,
    };
    let secret = match (source("secret_files"), source("secrets")) {
        (Some(ValueSource::CommandLine), _) => Some(Origin::Flag("--secret-file".into())),
        (_, Some(ValueSource::CommandLine)) => Some(Origin::Flag("--secret".into())),
        (_, Some(ValueSource::EnvVariable)) => Some(Origin::Env("FLY_WEBHOOK_SECRET")),
        (Some(ValueSource::DefaultValue), _) => from_profile(Key::SecretFile),
        _ => leaf.has("secrets").then_some(Origin::Default),
    };
    Origins {
        profile: profile.cloned(),
        base_url: plain("base_url", "--base-url", "FLY_BASE_URL", Key::BaseUrl),
        token,
        secret,
        state: plain("state", "--state", "FLY_STATE", Key::State),
        bot_id: plain("bot_id", "--bot-id", "FLY_BOT_ID", Key::BotId),
    }
}

/// `--now ''` is refused: only an empty FLY_NOW_TS means the clock (as in
/// the platform's script); on the command line it is a mistake, such as an
/// unset shell variable (`--now "$TS"`).
fn refuse_empty_now(leaf: &ArgMatches) -> Result<(), clap::Error> {
    if !leaf.ids().any(|id| id.as_str() == "now")
        || leaf.value_source("now") != Some(ValueSource::CommandLine)
    {
        return Ok(());
    }
    let typed = leaf
        .get_raw("now")
        .and_then(|mut values| values.next())
        .map(|value| value.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !typed.trim().is_empty() {
        return Ok(());
    }
    Err(clap::Error::raw(
        clap::error::ErrorKind::InvalidValue,
        format!(
            "invalid value '{typed}' for '--now <TS>': expected a Unix timestamp in seconds, got an empty value\n"
        ),
    ))
}

/// An `Examples:` section for a command's help, its heading styled as clap
/// styles its own (the styling is dropped when stdout is not a terminal).
fn examples(lines: &[&str]) -> StyledStr {
    let heading = Style::new().bold().underline();
    StyledStr::from(format!(
        "{}Examples:{}\n  {}",
        heading.render(),
        heading.render_reset(),
        lines.join("\n  ")
    ))
}

// Bounds of numeric flags whose 0 or huge values would be accepted yet mean
// nothing; clap refuses a value outside them (exit 2, naming the flag and
// the range).

/// The replay window of `verify-sig --window` and `serve-webhook --window`:
/// one range, so a delivery one accepts the other does too. At most a year
/// (nonces are kept for twice the window).
fn replay_window_secs() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=31_536_000)
}

/// `serve-webhook --max-body`: below 1 KiB even a bare signed update (about
/// 200 bytes before any message content) hardly fits, so every delivery would
/// be 413; a body is held in memory whole, for each of up to
/// `--max-connections` connections, so 64 MiB (an update is a few KiB) is
/// the most that makes sense.
const MIN_BODY_BYTES: u64 = 1024;
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;

/// `serve-webhook --max-connections`: each connection is a file descriptor,
/// and Linux allows a process at most 1048576 of them by default (fs.nr_open).
const MAX_CONNECTIONS: i64 = 1 << 20;

/// `fetch-media --expire-seconds`: the platform documents only the default
/// (600, SPEC); the access URLs are meant to be short-lived and fetch-media
/// downloads at once, so a week (what the emulator accepts) is plenty. 0
/// would ask for URLs born expired.
const MAX_EXPIRE_SECONDS: u64 = 7 * 24 * 3600;

/// A count with no upper bound that matters (`poll-echo --max-updates`):
/// clap's own range would print its upper end as 18446744073709551615.
fn parse_at_least_one(text: &str) -> Result<u64, BadValue> {
    match text.trim().parse::<u64>() {
        Ok(count) if count >= 1 => Ok(count),
        _ => Err("expected a whole number, 1 or more".into()),
    }
}

/// Options every command takes: how much to log, and in which format.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Format of log lines on stderr.
    #[arg(long, value_enum, default_value_t = LogFormatArg::Text, global = true)]
    pub log_format: LogFormatArg,

    /// More log output: -v fly's own steps (each API request, its status and
    /// latency, retry decisions), -vv everything fly traces, -vvv the HTTP and
    /// TLS libraries' own logs too.
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Less log output (-q errors only, -qq nothing but the final error line).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub quiet: u8,

    /// Take settings from this profile of the config file (see `fly config
    /// --help`); flags and environment variables still win. Without it, the
    /// profile named `default` is used if the file has one.
    #[arg(long, env = "FLY_PROFILE", global = true, value_name = "NAME")]
    pub profile: Option<String>,

    /// The config file of profiles (default: $XDG_CONFIG_HOME/fly/config.toml,
    /// else ~/.config/fly/config.toml).
    #[arg(long, env = "FLY_CONFIG", global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// How a command that calls the Bot API reaches it: the base URL and the bot token.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Bot API")]
pub struct ApiArgs {
    /// Base URL of the Fly Bot API (or of a local `fly emulator`).
    #[arg(
        long,
        env = "FLY_BASE_URL",
        hide_env_values = true,
        default_value = DEFAULT_BASE_URL,
        value_name = "URL"
    )]
    pub base_url: String,

    /// Bot token. Prefer the environment variable or --token-file: a flag is
    /// visible to other users in the process list.
    #[arg(
        long,
        env = "FLY_BOT_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// Read the bot token from this file (surrounding whitespace is ignored);
    /// takes precedence over --token and FLY_BOT_TOKEN.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

/// `--log-format` as clap reads it; `logging::LogFormat` is what the logger
/// takes (the layers below the command line do not know clap's types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for crate::logging::LogFormat {
    fn from(format: LogFormatArg) -> Self {
        match format {
            LogFormatArg::Text => crate::logging::LogFormat::Text,
            LogFormatArg::Json => crate::logging::LogFormat::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the v1 signature of a signed update (offline).
    VerifySig(VerifySigArgs),
    /// Add bot.id, timestamp, nonce and a v1 signature to an update.
    Sign(SignArgs),
    /// Send a message to a user or a group.
    Send(SendArgs),
    /// Call any Bot API path (an authenticated POST) and print the answer's JSON.
    ///
    /// PATH is under /api/v1/s/bot/ (`send`, `updates`, `files/batch_access`;
    /// the whole `/api/v1/s/bot/send` works too). The call has the retries of
    /// every other one; the answer, its envelope (code, msg, data) included,
    /// is printed as one line of JSON. Exit 1 when the platform refuses the
    /// call (its code and message said), 2 for a bad PATH or body.
    Api(ApiCallArgs),
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
    /// otherwise any non-empty bearer token is. Update ids start at the unix
    /// time in milliseconds, so a restarted emulator's ids are above the last
    /// run's and a poller's saved offset never hides new messages. While a
    /// webhook is set, the updates call answers 409 (polling is refused).
    /// From another terminal, `fly emulator say` sends it a user message,
    /// `fly emulator sent` shows what the bot sent, `fly emulator webhook`
    /// and `fly emulator media` set it up.
    Emulator(EmulatorArgs),
    /// Play a short conversation through poll-echo against an in-process emulator.
    Demo(DemoArgs),
    /// Check a set-up: base URL, token, a harmless API call, the clock, the state store.
    ///
    /// One line per check on stdout (the report is what was asked for);
    /// the token itself is never shown. Exit 0 when all is well, 1 when a
    /// check failed (the token refused, the platform unreachable, the clock
    /// off by more than the 300 s replay window, a state file that does not
    /// open), 2 when the set-up is unusable as given (no token, a bad base URL).
    Doctor(DoctorArgs),
    /// List the updates that could never be handled, one JSON object per line.
    ///
    /// poll-echo, forward and serve-webhook record an update they cannot handle
    /// at all (no usable update_id, a message with no chat to answer, …) with
    /// its exact bytes and the reason, and go on with the others.
    DeadLetters(DeadLettersArgs),
    /// List the profiles of the config file, or show the settings a command would use
    ///
    /// A profile holds settings for one bot, so several bots (or the
    /// emulator beside the platform) need no juggling of environment
    /// variables. The config file is $XDG_CONFIG_HOME/fly/config.toml, else
    /// ~/.config/fly/config.toml, or --config PATH (FLY_CONFIG):
    ///
    ///   [profiles.dev]
    ///   base_url = "http://127.0.0.1:8787"
    ///   token_file = "dev.token"
    ///
    ///   [profiles.prod]
    ///   token_file = "~/.secrets/fly.token"
    ///   secret_file = "~/.secrets/fly.secret"
    ///   state = "redis://10.0.0.5:6379/0"
    ///   bot_id = "bot_123"
    ///
    /// Keys: base_url, token_file, secret_file, state, bot_id (the options
    /// of those names); relative paths are taken from the file's directory.
    /// Choose a profile with --profile NAME or FLY_PROFILE; without one, the
    /// profile named `default` is used if the file has it. A flag or an
    /// environment variable wins over the profile, which wins over the
    /// built-in default. The file must not be writable by every user: it
    /// says where the token is sent.
    #[command(verbatim_doc_comment)]
    Config(ConfigArgs),
    /// Print the shell completion script for SHELL on stdout.
    Completions(CompletionsArgs),
    /// Print the man page (roff) on stdout: fly(1), or fly-COMMAND(1).
    Man(ManArgs),
}

/// Where a signed-update secret comes from, shared by every command that
/// signs or verifies: the flags, else FLY_WEBHOOK_SECRET (each command says
/// what comes after that).
#[derive(Debug, Clone, Default)]
pub struct SecretArgs {
    /// Every `--secret`, as typed.
    pub secrets: Vec<String>,
    /// Every `--secret-file`.
    pub secret_files: Vec<PathBuf>,
    /// FLY_WEBHOOK_SECRET as set, when neither flag was given.
    pub from_env: Option<String>,
}

/// The flags behind [`SecretArgs`], as clap sees them.
#[derive(Debug, Args)]
#[command(next_help_heading = "Webhook secret")]
struct SecretFlags {
    /// Webhook secret; repeat the flag to accept any of several (key rotation;
    /// commands that sign use the first). Prefer the environment variable or
    /// --secret-file: a flag is visible to other users in the process list.
    #[arg(
        long = "secret",
        env = "FLY_WEBHOOK_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    secrets: Vec<String>,

    /// Read a webhook secret from this file (surrounding whitespace is
    /// ignored); repeatable like --secret, and used together with it.
    #[arg(long = "secret-file", value_name = "PATH")]
    secret_files: Vec<PathBuf>,
}

impl FromArgMatches for SecretArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let flags = SecretFlags::from_arg_matches(matches)?;
        // clap fills --secret from the variable when the flag is absent; the
        // variable is only a default, so a --secret-file alone sets it aside.
        if matches.value_source("secrets") == Some(ValueSource::EnvVariable) {
            let from_env = flags.secrets.into_iter().next();
            return Ok(SecretArgs {
                secrets: Vec::new(),
                from_env: from_env.filter(|_| flags.secret_files.is_empty()),
                secret_files: flags.secret_files,
            });
        }
        Ok(SecretArgs {
            secrets: flags.secrets,
            secret_files: flags.secret_files,
            from_env: None,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = SecretArgs::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for SecretArgs {
    fn augment_args(command: clap::Command) -> clap::Command {
        SecretFlags::augment_args(command)
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        SecretFlags::augment_args_for_update(command)
    }
}

/// A unix time in seconds from `--now` or FLY_NOW_TS, read as the platform's
/// script reads FLY_NOW_TS (`int(value.strip() or time.time())`): spaces
/// around the number are fine, and an empty FLY_NOW_TS means the clock (an
/// empty `--now` is refused: see `refuse_empty_now`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnixTime {
    Clock,
    At(i64),
}

fn parse_unix_time(text: &str) -> Result<UnixTime, BadValue> {
    if text.trim().is_empty() {
        return Ok(UnixTime::Clock);
    }
    fly_signature::python::int_from_str(text)
        .ok()
        .and_then(|digits| digits.parse().ok())
        .map(UnixTime::At)
        .ok_or_else(|| "expected a unix time in seconds (from --now or FLY_NOW_TS)".into())
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# Sign an update and check it, the secret from the environment",
    "export FLY_WEBHOOK_SECRET=s3cret",
    r#"echo '{"update_id":1,"type":"message","message":{}}' | fly sign | fly verify-sig"#,
    "# A delivery saved earlier: no replay window, every step of the check shown",
    "fly verify-sig --ignore-timestamp --explain delivery.json",
    "# Key rotation: either secret passes",
    "fly verify-sig --secret-file old.secret --secret-file new.secret delivery.json",
    "# Many deliveries, one per line: one JSON verdict per line",
    "fly verify-sig --lines --ignore-timestamp captured.ndjson",
]))]
pub struct VerifySigArgs {
    /// Signed update JSON file, or - for stdin.
    #[arg(value_name = "FILE", default_value = "-")]
    pub input: String,

    /// Current unix time for the replay-window check (default: the clock).
    #[arg(
        long,
        env = "FLY_NOW_TS",
        hide_env_values = true,
        value_name = "TS",
        allow_negative_numbers = true,
        value_parser = parse_unix_time
    )]
    pub now: Option<UnixTime>,

    /// Replay window in seconds (1..=31536000, a year).
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = replay_window_secs())]
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

    #[command(flatten)]
    pub secret: SecretArgs,

    /// Without a secret: use the sha256 hex of the bot token in this file
    /// (else of FLY_BOT_TOKEN), as the platform does.
    #[arg(long, value_name = "PATH", help_heading = "Webhook secret")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# bot.id, timestamp, nonce and signature added; the secret from a file",
    "fly sign --secret-file webhook.secret --bot-id bot_1 update.json",
    "# A fixed timestamp and nonce: the same bytes every time, for fixtures",
    "fly sign --secret-file webhook.secret --now 1700000000 --nonce n1 < update.json",
    "# A signed delivery for your webhook receiver",
    "fly sign --secret-file webhook.secret update.json | curl -d @- http://127.0.0.1:8080/webhook",
]))]
pub struct SignArgs {
    /// Update JSON file, or - for stdin.
    #[arg(value_name = "FILE", default_value = "-")]
    pub input: String,

    /// bot.id to sign with.
    #[arg(long, default_value = "bot_local", value_name = "ID")]
    pub bot_id: String,

    /// Timestamp to sign with (default: the clock).
    #[arg(
        long,
        env = "FLY_NOW_TS",
        hide_env_values = true,
        value_name = "TS",
        allow_negative_numbers = true,
        value_parser = parse_unix_time
    )]
    pub now: Option<UnixTime>,

    /// Nonce to sign with (default: random).
    #[arg(long, value_name = "NONCE")]
    pub nonce: Option<String>,

    #[command(flatten)]
    pub secret: SecretArgs,

    /// Without a secret: use the sha256 hex of the bot token in this file
    /// (else of FLY_BOT_TOKEN), as the platform does.
    #[arg(long, value_name = "PATH", help_heading = "Webhook secret")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    group(clap::ArgGroup::new("target").required(true).args(["to", "group"])),
    after_help = examples(&[
        "# With FLY_BOT_TOKEN set (or --token-file PATH)",
        r#"fly send --to u_123 "deploy finished""#,
        "# The text from stdin, to a group",
        "git log -1 --format=%s | fly send --group g_42 -",
        "# Other message types: their data object as JSON",
        r#"fly send --to u_123 --type image --data '{"originalUrl":"https://cdn.example/a.png"}'"#,
        "# Your own idempotency key: a re-run of this step is delivered once",
        r#"fly send --to u_123 --client-msg-id "deploy-$BUILD_ID" "deploy finished""#,
    ])
)]
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

    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# With FLY_BOT_TOKEN set (or --token-file PATH): the answer as one line of JSON",
    r#"fly api send --data '{"msg_type":"text","data":{"content":"hi"},"client_msg_id":"c1","to_user_id":"u_123"}'"#,
    "# The body from stdin",
    r#"echo '{"limit":10,"timeout":0}' | fly api updates --data -"#,
    "# One field of the answer, with jq",
    r#"fly api files/batch_access --data '{"files":[{"url":"https://cdn.example/a.png"}]}' | jq .data.files"#,
]))]
pub struct ApiCallArgs {
    /// The Bot API path: `send`, `/send` or `/api/v1/s/bot/send`.
    #[arg(value_name = "PATH")]
    pub path: String,

    /// The request body: a JSON object, or - to read it from stdin (default {}).
    #[arg(long, value_name = "JSON")]
    pub data: Option<String>,

    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# Against a local emulator (`fly emulator` in another terminal)",
    "FLY_BASE_URL=http://127.0.0.1:8787 FLY_BOT_TOKEN=dev fly poll-echo",
    "# Media messages too: downloaded into ./media and forwarded back",
    "fly poll-echo --media-dir media",
    "# Your program answers: the update on its stdin, the reply from its stdout",
    "fly poll-echo --exec 'python3 bot.py' --concurrency 4",
    "# The same program kept running: one update per line in, one JSON answer per line out",
    "fly poll-echo --exec-worker 'python3 worker.py' --concurrency 4",
    "# In CI: one poll, answer what came, exit",
    "fly poll-echo --once",
]))]
#[command(mut_arg("state", |arg| arg.help(
    "State store: a file (default: per bot, under the user's state \
     directory), or redis://[user:pass@]host:port[/db] (also rediss://), \
     shared with standby pollers"
)))]
pub struct PollEchoArgs {
    #[command(flatten)]
    pub state: StateArgs,

    #[command(flatten)]
    pub lease: LeaseArgs,

    /// Download media messages into DIR and forward them back.
    #[arg(long, value_name = "DIR")]
    pub media_dir: Option<PathBuf>,

    /// Updates per poll (1..100).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub limit: u32,

    /// Long-poll timeout in seconds (0..=3600).
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub poll_timeout: u64,

    /// Exit after this many handled updates (1 or more).
    #[arg(long, value_name = "N", value_parser = parse_at_least_one)]
    pub max_updates: Option<u64>,

    /// Poll once with timeout 0, handle what came, exit.
    #[arg(long)]
    pub once: bool,

    /// Chats answered at the same time (updates of one chat stay in order);
    /// with --exec-worker, the number of workers.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,

    #[command(flatten)]
    pub retention: RetentionArgs,

    #[command(flatten)]
    pub park: ParkArgs,

    #[command(flatten)]
    pub exec: ExecArgs,

    #[command(flatten)]
    pub inspect: InspectArgs,

    #[command(flatten)]
    pub metrics: MetricsArgs,

    #[command(flatten)]
    pub stop: StopArgs,

    #[command(flatten)]
    pub api: ApiArgs,
}

/// `--metrics ADDR`, shared by the commands that run as a service.
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics, with /healthz and
    /// /readyz (for example 127.0.0.1:9464; port 0 picks a free one, named
    /// in the start line). Off unless given.
    #[arg(
        id = "metrics",
        long = "metrics",
        value_name = "ADDR",
        env = "FLY_METRICS"
    )]
    pub address: Option<std::net::SocketAddr>,
}

/// `--inspect [ADDR]`, shared by the commands that handle updates.
#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// See every update in a browser at http://ADDR/ (default
    /// 127.0.0.1:4040; port 0 picks a free one, named in the start line):
    /// its body, signature check, handler output and reply, and Replay.
    /// Off unless given; give an address other than loopback only on a
    /// network you trust, as the one people will type.
    #[arg(
        id = "inspect",
        long = "inspect",
        value_name = "ADDR",
        num_args = 0..=1,
        default_missing_value = "127.0.0.1:4040",
        env = "FLY_INSPECT"
    )]
    pub address: Option<std::net::SocketAddr>,

    /// Updates the inspector keeps, the oldest dropped first (at most 64 MiB in all).
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub inspect_keep: u32,
}

#[derive(Debug, Args)]
pub struct LeaseArgs {
    /// With a Redis state: the polling lease, in seconds. One poller holds
    /// it (renewed every third of it) and polls; the others stand by and
    /// take over within this time after it dies.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_lease)]
    pub lease: Duration,
}

/// A lease: seconds, fractions allowed, from 0.3 s to an hour.
fn parse_lease(text: &str) -> Result<Duration, BadValue> {
    parse_seconds(text, "0.3", 0.3)
}

/// `--state` (`FLY_STATE`), declared once and parsed once: a file path or
/// a Redis URL. Each command gives it its own help (`mut_arg("state", …)`).
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// State store: a file, or a redis:// URL.
    #[arg(
        id = "state",
        long = "state",
        value_name = "PATH|URL",
        env = "FLY_STATE",
        hide_env_values = true,
        value_hint = clap::ValueHint::AnyPath,
        value_parser = PathBufValueParser::new().map(StateLocation::given)
    )]
    pub given: Option<StateLocation>,
}

impl StateArgs {
    /// The location given, else the bot's default state file.
    pub fn location(self) -> StateLocation {
        self.given.unwrap_or(StateLocation::File(None))
    }
}

#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// How long handled update ids are kept in the state store, to answer a
    /// redelivery as a duplicate: seconds, or a number with a unit (30s, 90m,
    /// 12h, 7d). Older ones are pruned, so the state file stays bounded.
    #[arg(long, default_value = "7d", value_name = "DURATION", value_parser = parse_duration)]
    pub retention: Duration,
}

/// Why a value of an option is refused; clap says it after the option.
#[derive(Debug, PartialEq, Eq)]
pub struct BadValue(String);

impl From<String> for BadValue {
    fn from(why: String) -> Self {
        BadValue(why)
    }
}

impl From<&str> for BadValue {
    fn from(why: &str) -> Self {
        BadValue(why.to_string())
    }
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadValue {}

/// `604800`, `30s`, `90m`, `12h` or `7d`: at least a second, at most 100 years.
pub fn parse_duration(text: &str) -> Result<Duration, BadValue> {
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
            return Err(
                format!("unknown unit {unit:?}: use s, m, h or d (e.g. 7d, 12h, 30s)").into(),
            );
        }
    };
    let count: u64 = digits.parse().map_err(|_| {
        BadValue::from("expected a number of seconds, or a number with s, m, h or d (e.g. 7d)")
    })?;
    const MAX_SECS: u64 = 100 * 365 * 86_400;
    match count.checked_mul(scale) {
        Some(0) => Err("must be at least 1s".into()),
        Some(secs) if secs <= MAX_SECS => Ok(Duration::from_secs(secs)),
        _ => Err("must be at most 100 years".into()),
    }
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("handler").args(["exec", "exec_worker"])))]
pub struct ExecArgs {
    /// Run CMD (through sh -c) per update instead of the echo; its stdout is the
    /// answer: plain text, or a JSON answer as --exec-worker writes ({"reply":…}, {}, {"error":…}).
    #[arg(long, value_name = "CMD", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub exec: Option<String>,

    /// Keep --concurrency long-lived workers (sh -c CMD): one update per line
    /// on a worker's stdin, one JSON answer per line on its stdout.
    #[arg(long, value_name = "CMD", value_parser = clap::builder::NonEmptyStringValueParser::new(), conflicts_with = "exec")]
    pub exec_worker: Option<String>,

    /// Kill a handler (or a worker) that takes longer than this many seconds for an update (1..=86400).
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub exec_timeout: u64,

    /// Give the handler the bot token as FLY_BOT_TOKEN (withheld by default).
    #[arg(long, requires = "handler")]
    pub exec_pass_token: bool,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# http://0.0.0.0:8080/webhook, with FLY_BOT_TOKEN set",
    "fly serve-webhook --secret-file webhook.secret",
    "# HTTPS on port 8443, your program answering each message",
    "fly serve-webhook --port 8443 --tls-cert fullchain.pem --tls-key privkey.pem --exec ./bot.sh",
    "# Long-lived workers instead of a process per message",
    "fly serve-webhook --exec-worker 'node worker.js'",
    "# A signed delivery to it, from another terminal",
    "fly sign --secret-file webhook.secret update.json | curl -d @- http://127.0.0.1:8080/webhook",
]))]
#[command(mut_arg("state", |arg| arg.help(
    "State store for dedupe and nonces: a file (default: per bot, under the \
     user's state directory, apart from the pollers' file; used by this \
     process alone while it serves), or redis://[user:pass@]host:port[/db] (also \
     rediss://), shared by replicas behind a load balancer"
)))]
pub struct ServeWebhookArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0", value_name = "ADDR")]
    pub bind: IpAddr,

    /// Port to listen on.
    #[arg(
        long,
        env = "FLY_WEBHOOK_PORT",
        hide_env_values = true,
        default_value_t = 8080
    )]
    pub port: u16,

    /// Path that receives deliveries.
    #[arg(
        long,
        env = "FLY_WEBHOOK_PATH",
        hide_env_values = true,
        default_value = "/webhook"
    )]
    pub path: String,

    /// Largest accepted body in bytes (1024..=67108864, 64 MiB).
    #[arg(long, default_value_t = 1024 * 1024, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(MIN_BODY_BYTES..=MAX_BODY_BYTES))]
    pub max_body: u64,

    /// Replay window in seconds (timestamps further from now are refused;
    /// nonces are kept for twice as long): 1..=31536000, a year.
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = replay_window_secs())]
    pub window: u64,

    /// Connections open at once; more wait in the listen backlog (1..=1048576).
    #[arg(long, default_value_t = 1024, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_CONNECTIONS))]
    pub max_connections: u32,

    /// Seconds a client gets to send its request headers (slowloris protection).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300), value_name = "SECS")]
    pub header_timeout: u64,

    /// Replies sent at the same time (a bounded pool of blocking threads);
    /// with --exec-worker, the number of workers.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub concurrency: u32,

    #[command(flatten)]
    pub state: StateArgs,

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

    #[command(flatten)]
    pub inspect: InspectArgs,

    #[command(flatten)]
    pub metrics: MetricsArgs,

    #[command(flatten)]
    pub stop: StopArgs,

    #[command(flatten)]
    pub secret: SecretArgs,

    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# The media of a message (image, thumbnail, …) saved into ./media",
    "fly fetch-media --update update.json --dir media",
    "# URLs as they appear in messages; one file to stdout",
    "fly fetch-media https://cdn.example/a.png -o - | sha256sum",
]))]
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

    /// Lifetime requested for the access URLs (1..=604800, a week).
    #[arg(long, default_value_t = 600, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=MAX_EXPIRE_SECONDS))]
    pub expire_seconds: u64,

    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# Each update, signed, to a receiver on this machine (FLY_BOT_TOKEN set)",
    "FLY_WEBHOOK_SECRET=s3cret fly forward --to http://127.0.0.1:8080/webhook",
    "# fly serve-webhook as that receiver, in another terminal",
    "FLY_WEBHOOK_SECRET=s3cret fly serve-webhook --bind 127.0.0.1 --exec ./bot.sh",
]))]
#[command(mut_arg("state", |arg| arg.help(
    "State store: a file, or redis://[user:pass@]host:port[/db] (also \
     rediss://), shared with standby forwarders"
)))]
pub struct ForwardArgs {
    /// The local webhook receiver to deliver signed updates to.
    #[arg(long, value_name = "URL")]
    pub to: String,

    /// bot.id to sign with.
    #[arg(long, default_value = "bot_local", value_name = "ID")]
    pub bot_id: String,

    /// Trust this certificate (PEM) for an https:// receiver, such as a
    /// local one with a self-signed certificate.
    #[arg(long, value_name = "PEM")]
    pub to_ca: Option<PathBuf>,

    /// Deliveries in flight at once, each of another chat. 1 keeps the
    /// platform's order; more delivers different chats in parallel, so the
    /// receiver sees chats interleaved out of order (each chat stays in order).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,

    /// Long-poll timeout in seconds (0..=3600).
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub poll_timeout: u64,

    #[command(flatten)]
    pub state: StateArgs,

    #[command(flatten)]
    pub lease: LeaseArgs,

    #[command(flatten)]
    pub inspect: InspectArgs,

    #[command(flatten)]
    pub metrics: MetricsArgs,

    #[command(flatten)]
    pub stop: StopArgs,

    #[command(flatten)]
    pub secret: SecretArgs,

    #[command(flatten)]
    pub api: ApiArgs,

    #[command(flatten)]
    pub retention: RetentionArgs,

    #[command(flatten)]
    pub park: ParkArgs,
}

/// When an update that keeps failing is parked (SPEC section 3).
#[derive(Debug, Clone, Args)]
pub struct ParkArgs {
    /// Failed attempts of one update before it is parked: recorded (see
    /// `fly dead-letters`) and retried every few minutes, its chat waiting
    /// behind it while the other chats go on.
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,

    /// The longest wait between two tries of a parked update, in seconds
    /// (for tests).
    #[arg(long, hide = true, value_name = "SECS", default_value = "300", value_parser = parse_grace)]
    pub park_retry_max: Duration,
}

/// How a long-running command stops (SPEC section 2).
#[derive(Debug, Args)]
pub struct StopArgs {
    /// After SIGINT/SIGTERM, how long work in hand may still run (seconds);
    /// handlers still running then are killed and their updates come again.
    /// A second signal stops at once (exit 130).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_grace)]
    pub grace: Duration,
}

/// A grace period: seconds, fractions allowed, up to an hour.
fn parse_grace(text: &str) -> Result<Duration, BadValue> {
    parse_seconds(text, "0", 0.0)
}

/// Seconds, fractions allowed, from `least` (written `least_text` in the
/// message) up to an hour.
fn parse_seconds(text: &str, least_text: &str, least: f64) -> Result<Duration, BadValue> {
    match text.trim().parse::<f64>() {
        Ok(seconds) if (least..=3600.0).contains(&seconds) => Ok(Duration::from_secs_f64(seconds)),
        _ => Err(format!("expected seconds from {least_text} to 3600, e.g. 10 or 2.5").into()),
    }
}

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = examples(&[
        "# http://127.0.0.1:8787, any non-empty token accepted",
        "fly emulator",
        "# A free port (the first stdout line is the base URL); only this token accepted",
        "fly emulator --port 0 --token dev",
        "# A user says hi, for the bot to answer (from another terminal)",
        "fly emulator say --chat u_1 hi",
        "# What the bot sent, as it sends it",
        "fly emulator sent --follow",
    ])
)]
pub struct EmulatorArgs {
    #[command(subcommand)]
    pub action: Option<EmulatorAction>,

    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub bind: IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8787)]
    pub port: u16,

    /// Accept only this bot token (default: any non-empty one).
    #[arg(
        long = "token",
        env = "FLY_BOT_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub accepted_token: Option<String>,

    /// Accept only the bot token in this file (surrounding whitespace is
    /// ignored); takes precedence over --token and FLY_BOT_TOKEN.
    #[arg(long = "token-file", value_name = "PATH")]
    pub accepted_token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum EmulatorAction {
    /// Send a user message (or a callback query) to a running emulator; prints its update id.
    Say(EmulatorSayArgs),
    /// What the bot sent to a running emulator, one message a line.
    Sent(EmulatorSentArgs),
    /// Deliver updates to a webhook receiver instead of queueing them for polling.
    Webhook(EmulatorWebhookArgs),
    /// Media files the bot can download through batch_access.
    Media(EmulatorMediaArgs),
}

/// How the `fly emulator` subcommands reach a running emulator, and how they answer.
#[derive(Debug, Clone, Args)]
pub struct EmulatorClientArgs {
    /// Base URL of the running emulator.
    #[arg(
        long,
        env = "FLY_BASE_URL",
        hide_env_values = true,
        default_value = DEFAULT_EMULATOR_URL,
        value_name = "URL"
    )]
    pub base_url: String,

    /// Answer in JSON (one object per line) for scripts, instead of text for people.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("chat_target").required(true).args(["chat", "group"])))]
#[command(group(clap::ArgGroup::new("content").required(true).args(["text", "image", "callback"])))]
#[command(after_help = examples(&[
    "# A user writes to the bot in a private chat, then in a group",
    "fly emulator say --chat u_1 hello",
    "fly emulator say --group g_1 hi",
    "# An image message, to an emulator on another port",
    "fly emulator say --chat u_1 --image https://cdn.example/cat.png --base-url http://127.0.0.1:9000",
    "# The user presses a button: a callback_query update with this data",
    "fly emulator say --chat u_1 --callback vote:yes",
]))]
pub struct EmulatorSayArgs {
    #[command(flatten)]
    pub client: EmulatorClientArgs,

    /// The user who writes, in a private chat with the bot (the chat id).
    #[arg(long, value_name = "ID")]
    pub chat: Option<String>,

    /// The group chat the message is written in.
    #[arg(long, value_name = "ID")]
    pub group: Option<String>,

    /// Message text, or - to read it from stdin.
    #[arg(value_name = "TEXT")]
    pub text: Option<String>,

    /// Send an image message with this URL (originalUrl) instead of text.
    #[arg(long, value_name = "URL")]
    pub image: Option<String>,

    /// Send a callback_query update (a button pressed) carrying DATA instead of a message.
    #[arg(long, value_name = "DATA")]
    pub callback: Option<String>,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# Everything the bot sent so far: chat, type, text or media URL, client_msg_id",
    "fly emulator sent",
    "# The same, then each new message as the bot sends it, until Ctrl-C",
    "fly emulator sent --follow",
    "# The send request bodies, one JSON object a line, for jq",
    "fly emulator sent --json | jq -r .data.content",
]))]
pub struct EmulatorSentArgs {
    #[command(flatten)]
    pub client: EmulatorClientArgs,

    /// Keep printing new messages as the bot sends them, until SIGINT/SIGTERM.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# Deliver updates to a receiver (fly serve-webhook), signed with the secret in a file",
    "fly emulator webhook set http://127.0.0.1:8080/webhook --secret-file secret.txt",
    "# Where deliveries go and how each one went",
    "fly emulator webhook status",
    "# Back to polling",
    "fly emulator webhook unset",
]))]
pub struct EmulatorWebhookArgs {
    #[command(subcommand)]
    pub action: EmulatorWebhookAction,
}

#[derive(Debug, Subcommand)]
pub enum EmulatorWebhookAction {
    /// Deliver each update to URL as a signed update, retrying until it answers 2xx.
    ///
    /// The secret comes from --secret-file, else FLY_WEBHOOK_SECRET, else the
    /// emulator derives it from its --token (sha256 hex), as the platform does.
    /// Updates waiting for a poller go to the webhook too; polling is refused
    /// (409) while it is set.
    Set(EmulatorWebhookSetArgs),
    /// Stop delivering: undelivered updates go back to polling.
    Unset(EmulatorWebhookStatusArgs),
    /// Where deliveries go, and each delivery's update id, HTTP status (or error) and attempts.
    ///
    /// The secret is never shown. The last 1000 deliveries are kept.
    Status(EmulatorWebhookStatusArgs),
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# Signed with the sha256 of the emulator's --token (the platform's default)",
    "fly emulator webhook set http://127.0.0.1:8080/webhook",
    "# A secret of your own, and the bot id the receiver expects",
    "fly emulator webhook set http://127.0.0.1:8080/webhook --secret-file secret.txt --bot-id 42",
]))]
pub struct EmulatorWebhookSetArgs {
    #[command(flatten)]
    pub client: EmulatorClientArgs,

    /// The receiver's URL (http:// or https://).
    #[arg(value_name = "URL")]
    pub url: String,

    /// Sign deliveries with the secret in this file (surrounding whitespace
    /// is ignored); else FLY_WEBHOOK_SECRET, else the profile's secret_file,
    /// else the emulator's default.
    #[arg(id = "secret_files", long = "secret-file", value_name = "PATH")]
    pub secret_file: Option<PathBuf>,

    /// The bot id the deliveries carry and are signed with (default: bot_emulator).
    #[arg(long, value_name = "ID")]
    pub bot_id: Option<String>,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "fly emulator webhook status",
    "fly emulator webhook unset",
    "# For a script",
    "fly emulator webhook status --json",
]))]
pub struct EmulatorWebhookStatusArgs {
    #[command(flatten)]
    pub client: EmulatorClientArgs,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# 48000 bytes the bot can download from this URL (byte i is i % 251)",
    "fly emulator media add https://cdn.example/a/photo.jpg --size 48000",
    "# A real file's bytes",
    "fly emulator media add https://cdn.example/a/cat.png --file cat.png",
]))]
pub struct EmulatorMediaArgs {
    #[command(subcommand)]
    pub action: EmulatorMediaAction,
}

#[derive(Debug, Subcommand)]
pub enum EmulatorMediaAction {
    /// Make URL downloadable through batch_access (files up to 48 MiB).
    Add(EmulatorMediaAddArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("media_content").required(true).args(["size", "file"])))]
#[command(after_help = examples(&[
    "fly emulator media add https://cdn.example/a/photo.jpg --size 48000",
    "fly emulator media add https://cdn.example/a/cat.png --file cat.png",
]))]
pub struct EmulatorMediaAddArgs {
    #[command(flatten)]
    pub client: EmulatorClientArgs,

    /// The media URL, as it appears in a message's data (originalUrl, url, videoUrl).
    #[arg(value_name = "URL")]
    pub url: String,

    /// Serve this many bytes of a fixed pattern (byte i is i % 251), never held in memory.
    #[arg(long, value_name = "BYTES")]
    pub size: Option<u64>,

    /// Serve the bytes of this file.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&["fly demo"]))]
pub struct DemoArgs {}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# The set-up in the environment: FLY_BASE_URL, FLY_BOT_TOKEN",
    "fly doctor",
    "# A local emulator, and a given state file",
    "FLY_BASE_URL=http://127.0.0.1:8787 FLY_BOT_TOKEN=dev fly doctor --state bot.db",
]))]
#[command(mut_arg("state", |arg| arg.help(
    "State store to check (default: the bot's files, found from the base URL \
     and token: the pollers' and serve-webhook's): a file, opened if it exists, never created; or a redis:// \
     URL, which must answer"
)))]
pub struct DoctorArgs {
    #[command(flatten)]
    pub state: StateArgs,

    /// Where the base URL, the token and the state came from (filled in while parsing).
    #[arg(skip)]
    pub origins: Origins,

    /// The local time to compare with the platform's clock (default: the clock).
    #[arg(
        long,
        env = "FLY_NOW_TS",
        hide_env_values = true,
        value_name = "TS",
        allow_negative_numbers = true,
        value_parser = parse_unix_time
    )]
    pub now: Option<UnixTime>,

    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# The bot's own state file, found from FLY_BASE_URL and the token",
    "fly dead-letters",
    "# A state file given by path needs no token",
    "fly dead-letters --state bot.db",
    "fly dead-letters --state bot.db --purge",
]))]
#[command(mut_arg("state", |arg| arg.help(
    "State store file (default: the bot's files, found from the base URL and \
     token: the pollers' and serve-webhook's), or a redis:// URL (which needs the token: a bot's keys are \
     found from it)"
)))]
pub struct DeadLettersArgs {
    #[command(flatten)]
    pub state: StateArgs,

    /// Remove every dead letter instead of listing them (parked updates,
    /// which are not handled, stay: drop them one by one with --drop).
    #[arg(long, conflicts_with_all = ["retry", "drop"])]
    pub purge: bool,

    /// Try this update again: a dead letter becomes parked, and poll-echo
    /// or forward retry it at their next start (stop them first).
    #[arg(long, value_name = "UPDATE_ID", conflicts_with = "drop")]
    pub retry: Option<i64>,

    /// Give up on this dead or parked update for good: forgotten, and a
    /// parked one is marked handled so it is never answered (stop poll-echo
    /// or forward first).
    #[arg(long, value_name = "UPDATE_ID")]
    pub drop: Option<i64>,

    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# Which profiles there are, and which one is in use",
    "fly config list",
    "# What `fly --profile prod …` would use, and where each value comes from",
    "fly config show prod",
    "# Any command, with a profile's settings",
    "fly --profile dev doctor",
]))]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub action: ConfigAction,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// List the profiles of the config file, the one in use marked `*`.
    List(ConfigListArgs),
    /// Show each setting a command would use and where it came from (never a token or secret).
    Show(ConfigShowArgs),
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "fly config list",
    "fly --config ./fly.toml config list",
]))]
pub struct ConfigListArgs {
    /// The config file, and the profile in use (filled in from the global options).
    #[arg(skip)]
    pub origins: Origins,
    #[arg(skip)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# The profile in use (--profile, FLY_PROFILE, else `default`)",
    "fly config show",
    "# Another profile",
    "fly config show prod",
    "# With an environment variable that overrides it",
    "FLY_BASE_URL=http://127.0.0.1:8787 fly config show prod",
]))]
pub struct ConfigShowArgs {
    /// The profile to show (default: the one in use).
    #[arg(id = "profile_name", value_name = "NAME")]
    pub name: Option<String>,

    #[command(flatten)]
    pub state: StateArgs,

    /// bot.id to sign with (forward, sign, serve-webhook).
    #[arg(long, default_value = "bot_local", value_name = "ID")]
    pub bot_id: String,

    #[command(flatten)]
    pub secret: SecretArgs,

    #[command(flatten)]
    pub api: ApiArgs,

    /// Where each value came from (filled in while parsing).
    #[arg(skip)]
    pub origins: Origins,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "# bash, for this session",
    "source <(fly completions bash)",
    "# bash, for every session",
    "fly completions bash > ~/.local/share/bash-completion/completions/fly",
    "# zsh (into a directory on $fpath) and fish",
    "fly completions zsh > ~/.zfunc/_fly",
    "fly completions fish > ~/.config/fish/completions/fly.fish",
]))]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
#[command(after_help = examples(&[
    "fly man | man -l -",
    "fly man send | man -l -",
    "# Installed for man(1) to find (as root)",
    "fly man > /usr/local/share/man/man1/fly.1",
    "fly man send > /usr/local/share/man/man1/fly-send.1",
]))]
pub struct ManArgs {
    /// The command whose page to print (default: fly's own, which lists them all).
    #[arg(value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `--state` is parsed once, into a file or a server, for every command
    /// that has it; absent, it is the bot's default file.
    #[test]
    fn state_is_parsed_into_a_file_or_a_server() {
        let location = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            match cli.command {
                Command::PollEcho(args) => args.state.location(),
                Command::ServeWebhook(args) => args.state.location(),
                Command::Forward(args) => args.state.location(),
                Command::Doctor(args) => args.state.location(),
                Command::DeadLetters(args) => args.state.location(),
                _ => unreachable!("a command with --state"),
            }
        };
        let file = StateLocation::File(Some(PathBuf::from("bot.db")));
        for command in ["poll-echo", "serve-webhook", "doctor", "dead-letters"] {
            assert_eq!(location(&["fly", command, "--state", "bot.db"]), file);
            assert_eq!(location(&["fly", command]), StateLocation::File(None));
        }
        assert_eq!(
            location(&[
                "fly",
                "forward",
                "--to",
                "http://h/",
                "--state",
                "Redis://h:6379/2"
            ]),
            StateLocation::Redis("Redis://h:6379/2".into())
        );
        assert_eq!(
            location(&["fly", "doctor", "--state", "valkeys://h"]),
            StateLocation::Redis("valkeys://h".into())
        );
        assert_eq!(
            location(&["fly", "doctor", "--state", "redis.db"]),
            StateLocation::File(Some(PathBuf::from("redis.db")))
        );
    }

    /// The words of a simple shell command, quotes removed.
    fn shell_words(command: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut word = String::new();
        let mut in_word = false;
        let mut chars = command.chars();
        while let Some(ch) = chars.next() {
            match ch {
                '\'' | '"' => {
                    in_word = true;
                    for quoted in chars.by_ref() {
                        if quoted == ch {
                            break;
                        }
                        word.push(quoted);
                    }
                }
                ' ' => {
                    if in_word {
                        words.push(std::mem::take(&mut word));
                        in_word = false;
                    }
                }
                _ => {
                    in_word = true;
                    word.push(ch);
                }
            }
        }
        if in_word {
            words.push(word);
        }
        words
    }

    /// Every `fly …` in the examples of every command's help parses, and
    /// each command's examples run that command.
    #[test]
    fn help_examples_parse() {
        let root = Cli::command();
        // Every command and the words naming it after `fly`, nested ones included.
        let mut pages: Vec<(String, &clap::Command)> = vec![(String::new(), &root)];
        let mut index = 0;
        while index < pages.len() {
            let (path, page) = pages[index].clone();
            pages.extend(
                page.get_subcommands()
                    .filter(|sub| sub.get_name() != "help")
                    .map(|sub| (format!("{path} {}", sub.get_name()).trim().to_string(), sub)),
            );
            index += 1;
        }
        for (name, page) in pages {
            let examples = page
                .get_after_help()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(
                examples.starts_with("Examples:\n"),
                "fly {name}: no examples"
            );
            let mut runs_itself = name.is_empty();
            for line in examples.lines().skip(1).map(str::trim) {
                if line.starts_with('#') {
                    continue;
                }
                for segment in line.split(" | ") {
                    let segment = segment.trim();
                    let segment = segment
                        .strip_prefix("source <(")
                        .and_then(|rest| rest.strip_suffix(')'))
                        .unwrap_or(segment);
                    let words: Vec<String> = shell_words(segment)
                        .into_iter()
                        .skip_while(|word| word.contains('=') && !word.starts_with('-'))
                        .take_while(|word| !word.starts_with(['<', '>']))
                        .collect();
                    if words.first().map(String::as_str) != Some("fly") {
                        continue;
                    }
                    runs_itself |=
                        format!("{} ", words[1..].join(" ")).starts_with(&format!("{name} "));
                    if let Err(error) = Cli::parse_args_from(&words) {
                        assert!(
                            matches!(error.kind(), clap::error::ErrorKind::DisplayHelp),
                            "fly {name}: example {line:?} does not parse: {error}"
                        );
                    }
                }
            }
            assert!(runs_itself, "fly {name}: no example runs it");
        }
    }

    /// Which options a command has is read from its definition: a release
    /// build of clap answers an undefined id as absent, so asking the
    /// matches would apply a profile's base_url to `fly sign` (and panic).
    #[test]
    fn a_commands_options_come_from_its_definition() {
        let matches = |args: &[&str]| Cli::command().try_get_matches_from(args).unwrap();
        let sign = matches(&["fly", "sign", "--secret", "s"]);
        let leaf = Leaf::of(&sign);
        assert!(!leaf.has("base_url") && leaf.has("bot_id") && leaf.has("token_file"));
        assert!(leaf.given("secrets") && !leaf.given("bot_id"));
        let set = matches(&["fly", "emulator", "webhook", "set", "http://h/"]);
        let leaf = Leaf::of(&set);
        assert_eq!(leaf.path, ["emulator", "webhook", "set"]);
        assert!(leaf.has("base_url") && leaf.has("secret_files") && !leaf.has("state"));
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
