//! `fly serve-webhook`: a webhook receiver safe to expose.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::api::ApiClient;
use crate::cli::ServeWebhookArgs;
use crate::commands::credentials::{configured_token, required_token, webhook_secrets};
use crate::commands::wiring::reply_handler;
use crate::exit::{self, usage, usage_because};
use crate::explain::SecretNote;
use crate::inspect::InspectConfig;
use crate::observe::Source;
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::webhook::{self, WebhookConfig};
use fly_state::{BotIdentity, Front, RedisStore, Role, SqliteStore, StateLocation, WebhookStore};

/// Replies are retried briefly: on failure the platform delivers the update
/// again, so holding the request open longer helps nobody. The budget keeps
/// a long `Retry-After` (or a silent platform) from holding it for minutes.
const REPLY_RETRIES: RetryPolicy = RetryPolicy {
    max_attempts: Some(3),
    initial_delay: Duration::from_millis(100),
    max_delay: Duration::from_secs(1),
    budget: Some(Duration::from_secs(10)),
};

pub fn run(args: ServeWebhookArgs) -> anyhow::Result<ExitCode> {
    // Compared with the request path as it arrives (percent-encoded, query
    // apart), so anything else could never match and every delivery would be 404.
    let path_ok = args.path.starts_with('/')
        && args
            .path
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'?' && byte != b'#');
    if !path_ok {
        return Err(usage(format!(
            "--path must start with / and hold only URL path characters: \
             no spaces, ?, # or non-ASCII (got {:?})",
            args.path
        )));
    }
    let token = required_token(&args.api)?;
    // Before the URL is printed: a script that stops the server right after
    // reading it gets a clean stop.
    let shutdown = Shutdown::on_signals(args.stop.grace)?;
    let secrets = webhook_secrets(&args.secret, || configured_token(&args.api))?;
    let secret_sources = secrets
        .iter()
        .map(|secret| secret.source.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    // The inspector explains each delivery's signature with them; their
    // values never leave the process.
    let noted: Vec<(String, SecretNote)> = secrets
        .iter()
        .map(|secret| (secret.value.clone(), secret.note()))
        .collect();
    let secrets = secrets.into_iter().map(|secret| secret.value).collect();
    let client = ApiClient::new(&args.api.base_url, token.clone(), REPLY_RETRIES)?;
    let identity = BotIdentity::new(client.base_url(), token.expose());
    let state = args.state.location();
    let retention = args.retention.retention;
    let window = i64::try_from(args.window).unwrap_or(i64::MAX);
    // A file: deliveries are answered from memory in front of it, written
    // by group commit (see state::front). A Redis server: shared by every
    // replica, asked on each delivery.
    let open_store = move || -> anyhow::Result<Arc<dyn WebhookStore>> {
        match state {
            StateLocation::Redis(url) => Ok(Arc::new(
                RedisStore::open(&url, &identity)?
                    .with_retention(retention)
                    .with_outage_note(
                        "webhook deliveries are answered 503 until the state store is back",
                    ),
            )),
            StateLocation::File(path) => {
                let file = SqliteStore::open_for(&identity, path, Role::Webhook)?
                    .with_retention(retention);
                Ok(Arc::new(Front::open(file, window)?))
            }
        }
    };
    let handler = reply_handler(&args.exec, client, None, args.concurrency as usize);
    let config = WebhookConfig {
        bind: args.bind,
        port: args.port,
        path: args.path,
        secrets,
        secret_sources,
        metrics: args.metrics.address,
        inspect: args.inspect.address.map(|address| {
            let config = InspectConfig {
                keep: args.inspect.inspect_keep as usize,
                source: Source::Webhook,
                handler: Arc::clone(&handler),
                secrets: noted,
                window: Some(args.window),
                delivery_url: None,
            };
            (address, config)
        }),
        replay_window_secs: args.window,
        max_body_bytes: args.max_body,
        max_connections: args.max_connections as usize,
        header_read_timeout: Duration::from_secs(args.header_timeout),
        concurrency: args.concurrency as usize,
        // A claim outlives any handler (which --exec-timeout ends) and its
        // reply's retries; it lapses only if its holder vanished.
        claim_lease: Duration::from_secs(args.exec.exec_timeout + 120),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert_chain), Some(private_key)) => Some(tls_acceptor(cert_chain, private_key)?),
            _ => None,
        },
    };
    webhook::run_until_signal(config, open_store, handler, shutdown)?;
    Ok(exit::code(exit::SUCCESS))
}

/// HTTPS from `--tls-cert` and `--tls-key`: a file that cannot be used, or
/// a key that does not belong to the certificate, is bad input (exit 2).
fn tls_acceptor(
    cert_chain: &std::path::Path,
    private_key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use crate::small_file::PemError;
    let chain = super::credentials::read_certificates(cert_chain, "--tls-cert")?;
    let key = crate::small_file::read_private_key(private_key).map_err(|error| {
        let message = error.message("--tls-key", private_key);
        match error {
            PemError::CertificateInsteadOfKey => usage(format!(
                "{message}: give the certificate as --tls-cert and its key as --tls-key"
            )),
            _ => usage(message),
        }
    })?;
    webhook::tls_acceptor(chain, key)
        .map_err(|error| usage_because("--tls-cert/--tls-key do not fit together", error))
}
