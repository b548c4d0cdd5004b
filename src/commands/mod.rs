//! One module per subcommand: each turns its clap `Args` into plain values and runs.
//!
//! This module holds what several commands share: the bot token and the API
//! client built on it, the webhook secrets, credentials read from files.

mod completions;
mod dead_letters;
mod demo;
mod doctor;
mod emulator;
mod fetch_media;
mod forward;
mod man;
mod poll_echo;
mod send;
mod serve_webhook;
mod sign;
mod verify_sig;

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::api::{ApiClient, Token};
use crate::cli::{ApiArgs, Command, SecretArgs, UnixTime};
use crate::exit::usage;
use crate::retry::RetryPolicy;

pub use crate::output::{print_line, write_stdout};

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match dispatch(command) {
        // A stop signal before there was anything to stop: a clean stop, as
        // the first SIGINT/SIGTERM is anywhere else (exit 0).
        Err(error) if cause::<crate::state::Interrupted>(&error).is_some() => {
            tracing::info!("{error:#}: stopped");
            Ok(crate::exit::code(crate::exit::SUCCESS))
        }
        result => result.map_err(in_command_line_words),
    }
}

/// Typed errors from the layers below, said in the words of the command
/// line: which option changes it, and whether it is bad input (exit 2).
/// Those layers name no option; every other error passes as it is.
fn in_command_line_words(error: anyhow::Error) -> anyhow::Error {
    use crate::api::{ApiError, BadUrl};
    use crate::state::StateRefused;
    let said = format!("{error:#}");
    if let Some(bad) = cause::<BadUrl>(&error) {
        return usage(if bad.base_url {
            format!("{said} (--base-url or FLY_BASE_URL)")
        } else {
            said
        });
    }
    if let Some(ApiError::TokenRefused { .. }) = cause::<ApiError>(&error) {
        return anyhow::anyhow!("{said}; {TOKEN_HINT}");
    }
    if cause::<crate::emulator::NoEmulator>(&error).is_some() {
        return anyhow::anyhow!("{said}, or point --base-url / FLY_BASE_URL at it");
    }
    match cause::<StateRefused>(&error) {
        None => error,
        Some(StateRefused::Unusable(_)) => {
            usage(format!("{said} (or choose another with --state PATH)"))
        }
        Some(StateRefused::Foreign(_)) => {
            anyhow::anyhow!("{said}; choose another with --state PATH")
        }
        Some(StateRefused::InUse { shared: false, .. }) => {
            anyhow::anyhow!("{said}; stop it first, or choose another with --state PATH")
        }
        Some(StateRefused::InUse { shared: true, .. }) => {
            anyhow::anyhow!("{said}; stop it first, or run this one without --once to stand by")
        }
    }
}

/// Where to look when the platform refuses the bot token.
pub const TOKEN_HINT: &str = "check FLY_BOT_TOKEN or --token-file";

/// The first error of type `T` in `error`'s chain.
fn cause<T: std::error::Error + Send + Sync + 'static>(error: &anyhow::Error) -> Option<&T> {
    error.chain().find_map(|cause| cause.downcast_ref::<T>())
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Send(args) => send::run(args),
        Command::Emulator(args) => emulator::run(args),
        Command::VerifySig(args) => verify_sig::run(args),
        Command::Sign(args) => sign::run(args),
        Command::PollEcho(args) => poll_echo::run(args),
        Command::ServeWebhook(args) => serve_webhook::run(args),
        Command::FetchMedia(args) => fetch_media::run(args),
        Command::Forward(args) => forward::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::DeadLetters(args) => dead_letters::run(args),
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => man::run(args),
    }
}

/// A token or a secret is a line or two; a file much larger than this was
/// named by mistake (a log, a binary) and is not read whole.
const MAX_CREDENTIAL_FILE_BYTES: u64 = 64 * 1024;

/// The contents of a file holding a credential (`--token-file`,
/// `--secret-file`), surrounding whitespace stripped. A file that cannot be
/// read, is too large or holds only whitespace is a usage error naming `flag`.
pub fn read_credential_file(path: &Path, flag: &str) -> anyhow::Result<String> {
    let shown = path.display();
    let bytes = read_given(path, MAX_CREDENTIAL_FILE_BYTES, flag)?;
    let text =
        String::from_utf8(bytes).map_err(|_| usage(format!("{flag} {shown} is not UTF-8 text")))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(usage(format!("{flag} {shown} is empty")));
    }
    Ok(trimmed.to_string())
}

/// The bytes of the small file given with `flag` (see `small_file`): one
/// that cannot be used is bad input (exit 2), one line naming the flag.
pub fn read_given(path: &Path, cap: u64, flag: &str) -> anyhow::Result<Vec<u8>> {
    crate::small_file::read_small_file(path, cap).map_err(|error| usage(error.message(flag, path)))
}

/// Every certificate of the PEM file given with `flag`, each one parsed.
pub fn read_certificates(
    path: &Path,
    flag: &str,
) -> anyhow::Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    crate::small_file::read_certificates(path).map_err(|error| usage(error.message(flag, path)))
}

/// The bot token of a command that calls the API: `--token-file`, else
/// `--token`/`FLY_BOT_TOKEN`, if any.
pub fn configured_token(api: &ApiArgs) -> anyhow::Result<Option<Token>> {
    token_from(api.token.as_deref(), api.token_file.as_deref())
}

/// The bot token from a `--token-file`, else from a `--token`/`FLY_BOT_TOKEN` value.
pub fn token_from(value: Option<&str>, file: Option<&Path>) -> anyhow::Result<Option<Token>> {
    let (token, source) = if let Some(path) = file {
        let raw = read_credential_file(path, "--token-file")?;
        let token = Token::new(&raw).expect("a credential file is never blank");
        (token, format!("--token-file {}", path.display()))
    } else {
        match value.and_then(Token::new) {
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
    // What an Authorization header can carry; anything else would only be
    // found out, and retried, at the first request.
    if !token
        .expose()
        .chars()
        .all(|c| c.is_ascii_graphic() || c == ' ')
    {
        return Err(usage(format!(
            "the bot token from {source} contains characters an HTTP header cannot carry \
             (only printable ASCII): is it the right token?"
        )));
    }
    Ok(Some(token))
}

/// The bot token, or a usage error naming every way to give one.
pub fn required_token(api: &ApiArgs) -> anyhow::Result<Token> {
    configured_token(api)?.ok_or_else(|| {
        usage("missing bot token: set FLY_BOT_TOKEN, or pass --token-file PATH (or --token)")
    })
}

/// The API client for one-shot commands (a bounded number of retries).
pub fn one_shot_client(api: &ApiArgs) -> anyhow::Result<ApiClient> {
    let token = required_token(api)?;
    ApiClient::new(&api.base_url, token, RetryPolicy::ONE_SHOT)
        .context("configuring the API client")
}

/// A webhook secret and where it came from. The value is never shown: the
/// `source` is what `--explain` and error messages name.
pub struct WebhookSecret {
    pub value: String,
    pub source: String,
}

/// The webhook secrets (SPEC section 1): every `--secret` and `--secret-file`,
/// else `FLY_WEBHOOK_SECRET` (stripped, as the reference does), else the
/// sha256 hex of the bot token (`token`, asked only then); none of them is a
/// usage error.
pub fn webhook_secrets(
    args: &SecretArgs,
    token: impl FnOnce() -> anyhow::Result<Option<Token>>,
) -> anyhow::Result<Vec<WebhookSecret>> {
    if args.secrets.iter().any(String::is_empty) {
        return Err(usage("--secret must not be empty"));
    }
    let mut secrets: Vec<WebhookSecret> = args
        .secrets
        .iter()
        .map(|value| WebhookSecret {
            value: value.clone(),
            source: "--secret".into(),
        })
        .collect();
    for path in &args.secret_files {
        secrets.push(WebhookSecret {
            value: read_credential_file(path, "--secret-file")?,
            source: format!("--secret-file {}", path.display()),
        });
    }
    if secrets.len() > 1 {
        for (index, secret) in secrets.iter_mut().enumerate() {
            secret.source = format!("{} #{}", secret.source, index + 1);
        }
    }
    if !secrets.is_empty() {
        return Ok(secrets);
    }
    if let Some(from_env) = args.from_env.as_deref().map(str::trim)
        && !from_env.is_empty()
    {
        return Ok(vec![WebhookSecret {
            value: from_env.to_string(),
            source: "FLY_WEBHOOK_SECRET".into(),
        }]);
    }
    match token()? {
        Some(token) => Ok(vec![WebhookSecret {
            value: fly_signature::sha256_hex(token.expose().as_bytes()),
            source: "sha256 of the bot token".into(),
        }]),
        None => Err(usage(
            "missing secret: pass --secret-file PATH (or --secret S), set FLY_WEBHOOK_SECRET, \
             or configure the bot token (FLY_BOT_TOKEN or --token-file) to use its sha256",
        )),
    }
}

/// The bot token of an offline command (`verify-sig`, `sign`), whose only
/// use is the default secret: `--token-file`, else `FLY_BOT_TOKEN`.
pub fn offline_token(token_file: Option<&Path>) -> anyhow::Result<Option<Token>> {
    let from_env = std::env::var("FLY_BOT_TOKEN").ok();
    token_from(from_env.as_deref(), token_file)
}

/// The current unix time in seconds: `--now`/`FLY_NOW_TS` (see
/// [`UnixTime`]), else the clock.
pub fn unix_time_now(given: Option<UnixTime>) -> i64 {
    match given {
        Some(UnixTime::At(now)) => now,
        Some(UnixTime::Clock) | None => crate::clock::unix_now(),
    }
}

/// Reads a whole input named on the command line: a path, or `-` for stdin.
pub fn read_input(name: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    if name == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|error| usage(format!("cannot read stdin: {error}")))?;
    } else {
        text = std::fs::read_to_string(name)
            .map_err(|error| usage(format!("cannot read {name}: {error}")))?;
    }
    Ok(text)
}

/// What answers updates: the `--exec` handler or the `--exec-worker`
/// workers (`concurrency` of them) when one is given, else the echo (with
/// the media round trip when `media_dir` is set).
pub fn reply_handler(
    exec: &crate::cli::ExecArgs,
    client: ApiClient,
    media_dir: Option<std::path::PathBuf>,
    concurrency: usize,
) -> std::sync::Arc<dyn crate::bot::Handler> {
    let timeout = std::time::Duration::from_secs(exec.exec_timeout);
    if let Some(command) = &exec.exec {
        return std::sync::Arc::new(crate::bot::exec::ExecHandler::new(
            command.clone(),
            timeout,
            client,
            exec.exec_pass_token,
        ));
    }
    if let Some(command) = &exec.exec_worker {
        return std::sync::Arc::new(crate::bot::worker::WorkerPool::start(
            command.clone(),
            concurrency,
            timeout,
            client,
            exec.exec_pass_token,
        ));
    }
    std::sync::Arc::new(crate::bot::echo::EchoHandler { client, media_dir })
}

/// The one secret a signing command signs with (`fly sign`, `fly forward`),
/// and where it came from.
pub fn signing_secret(
    args: &SecretArgs,
    token: impl FnOnce() -> anyhow::Result<Option<Token>>,
    command: &str,
) -> anyhow::Result<WebhookSecret> {
    let mut secrets = webhook_secrets(args, token)?;
    match secrets.len() {
        1 => Ok(secrets.remove(0)),
        _ => Err(usage(format!(
            "{command} signs with one secret: give one --secret or --secret-file"
        ))),
    }
}

/// The state store of a polling command (poll-echo, forward): the SQLite
/// file, or a Redis server shared with standby pollers (`--lease`).
pub fn polling_store(
    identity: &crate::state::BotIdentity,
    state: Option<std::path::PathBuf>,
    retention: std::time::Duration,
    lease: std::time::Duration,
) -> anyhow::Result<std::sync::Arc<dyn crate::state::Store>> {
    use crate::state::{RedisStore, SqliteStore, StateLocation};
    Ok(match StateLocation::from_arg(state) {
        StateLocation::Redis(url) => std::sync::Arc::new(
            RedisStore::open(&url, identity)?
                .with_retention(retention)
                .with_lease(lease)
                .with_outage_note("polling pauses until the state store is back"),
        ),
        StateLocation::File(path) => {
            std::sync::Arc::new(SqliteStore::open_for(identity, path)?.with_retention(retention))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{self, ExitOutcome, classify};
    use crate::state::StateRefused;
    use anyhow::Context;

    fn said(error: anyhow::Error) -> (ExitOutcome, String) {
        let error = in_command_line_words(error);
        (classify(&error), format!("{error:#}"))
    }

    #[test]
    fn typed_errors_from_below_get_their_option_and_exit_code() {
        let unusable =
            anyhow::Error::from(StateRefused::Unusable("state file x is read-only".into()))
                .context("opening the state");
        let (code, text) = said(unusable);
        assert_eq!(code, ExitOutcome::Report(exit::USAGE));
        assert_eq!(
            text,
            "opening the state: state file x is read-only (or choose another with --state PATH)"
        );

        let foreign = anyhow::Error::from(StateRefused::Foreign("belongs to a bot".into()));
        let (code, text) = said(foreign);
        assert_eq!(code, ExitOutcome::Report(exit::FAILURE));
        assert!(
            text.ends_with("; choose another with --state PATH"),
            "{text}"
        );

        let in_use = |shared| {
            said(anyhow::Error::from(StateRefused::InUse {
                message: "another fly process is already polling".into(),
                shared,
            }))
        };
        assert!(
            in_use(false)
                .1
                .ends_with("or choose another with --state PATH")
        );
        assert!(in_use(true).1.ends_with("without --once to stand by"));

        let base_url = crate::api::check_base_url("https://h/api/v1").unwrap_err();
        let (code, text) = said(base_url);
        assert_eq!(code, ExitOutcome::Report(exit::USAGE));
        assert!(text.ends_with("(--base-url or FLY_BASE_URL)"), "{text}");

        let refused = anyhow::Error::from(crate::api::ApiError::TokenRefused {
            status: 401,
            detail: String::new(),
        });
        assert!(said(refused).1.ends_with(TOKEN_HINT));

        // Anything else passes through untouched, its exit code too.
        let plain = Err::<(), _>(usage("bad input"))
            .context("sending")
            .unwrap_err();
        assert_eq!(
            said(plain),
            (
                ExitOutcome::Report(exit::USAGE),
                "sending: bad input".into()
            )
        );
    }
}
