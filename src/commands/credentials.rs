//! Credentials named on the command line: the bot token (`--token-file`,
//! `--token`, `FLY_BOT_TOKEN`) and its checks, the webhook secrets
//! (`--secret`, `--secret-file`, `FLY_WEBHOOK_SECRET`), and the small files
//! they and the PEM options are read from.

use std::path::Path;

use crate::api::Token;
use crate::cli::{ApiArgs, SecretArgs};
use crate::exit::usage;

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

/// A webhook secret and where it came from. The value is never shown: the
/// `source` is what `--explain` and error messages name.
pub struct WebhookSecret {
    pub value: String,
    pub source: String,
}

impl WebhookSecret {
    /// What `--explain` and the inspector say of it: its source and length.
    pub fn note(&self) -> crate::explain::SecretNote {
        crate::explain::SecretNote {
            source: self.source.clone(),
            bytes: self.value.len(),
        }
    }
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
