//! `fly forward`: the local-development bridge. Long-polls the platform with
//! poll-echo's loop and state store, and delivers each update, signed, to a
//! local webhook receiver; the offset moves only after the receiver's 2xx.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{ApiClient, check_http_url};
use crate::bot::forward::ForwardHandler;
use crate::bot::poll_loop::PollSettings;
use crate::cli::ForwardArgs;
use crate::commands::credentials::{configured_token, required_token, signing_secret};
use crate::commands::wiring::{PollingService, run_polling};
use crate::delivery::Destination;
use crate::exit;
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use fly_state::BotIdentity;

pub fn run(args: ForwardArgs) -> anyhow::Result<ExitCode> {
    check_http_url(&args.to, "--to")?;
    if args.to_ca.is_some() && !args.to.starts_with("https://") {
        return Err(crate::exit::usage(
            "--to-ca is for an https:// receiver; --to is plain http",
        ));
    }
    let token = required_token(&args.api)?;
    let secret = signing_secret(&args.secret, || configured_token(&args.api), "fly forward")?;
    let shutdown = Shutdown::on_signals(args.stop.grace)?;
    let client = ApiClient::new(&args.api.base_url, token.clone(), RetryPolicy::FOREVER)?
        .with_shutdown(shutdown.clone());
    let identity = BotIdentity::new(client.base_url(), token.expose());
    // What it does, before it does it: a developer sees at once which
    // receiver, which platform, and which secret to verify with.
    tracing::info!(
        "forwarding updates from {} to {}, signed with {} (bot.id {}); Ctrl-C to stop",
        client.base_url(),
        args.to,
        secret.source,
        args.bot_id
    );
    let trusted = match &args.to_ca {
        Some(path) => Some(super::credentials::read_certificates(path, "--to-ca")?),
        None => None,
    };
    let handler: Arc<dyn crate::bot::Handler> = Arc::new(ForwardHandler::new(
        Destination {
            url: args.to,
            secret: secret.value,
            bot_id: args.bot_id,
            untrusted_hint: "trust its certificate with --to-ca FILE",
        },
        trusted,
        shutdown.clone(),
    ));
    let settings = PollSettings {
        source: crate::observe::Source::Forward,
        max_attempts: args.park.max_attempts,
        park_retry_max: args.park.park_retry_max,
        limit: 50,
        poll_timeout: Duration::from_secs(args.poll_timeout),
        // 1: the receiver gets updates in the platform's order.
        concurrency: args.concurrency as usize,
        max_updates: None,
        once: false,
    };
    let service = PollingService {
        state: args.state.location(),
        retention: args.retention.retention,
        lease: args.lease.lease,
        metrics: &args.metrics,
        inspect: &args.inspect,
    };
    let summary = run_polling(&client, &identity, service, handler, &settings, &shutdown)?;
    // Only 2xx answers end as handled; an update that could not be signed
    // is a dead letter.
    tracing::info!(
        delivered = summary.handled,
        dead_letters = summary.dead_letters,
        "stopped"
    );
    Ok(exit::code(exit::SUCCESS))
}
