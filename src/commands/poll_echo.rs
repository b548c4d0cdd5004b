//! `fly poll-echo`: the examples' polling echo bot, fit to run as a service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::api::ApiClient;
use crate::bot::poll_loop::PollSettings;
use crate::cli::PollEchoArgs;
use crate::commands::credentials::required_token;
use crate::commands::wiring::{PollingService, reply_handler, run_polling};
use crate::exit;
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use fly_state::BotIdentity;

pub fn run(args: PollEchoArgs) -> anyhow::Result<ExitCode> {
    let token = required_token(&args.api)?;
    let shutdown = Shutdown::on_signals(args.stop.grace)?;
    // --once is for CI: a bounded number of retries, then a clear failure.
    let policy = if args.once {
        RetryPolicy::ONE_SHOT
    } else {
        RetryPolicy::FOREVER
    };
    let client =
        ApiClient::new(&args.api.base_url, token.clone(), policy)?.with_shutdown(shutdown.clone());
    let identity = BotIdentity::new(client.base_url(), token.expose());
    let media_dir = args.media_dir.map(prepare_media_dir).transpose()?;
    let settings = PollSettings {
        source: crate::observe::Source::Poll,
        max_attempts: args.park.max_attempts,
        park_retry_max: args.park.park_retry_max,
        limit: args.limit,
        poll_timeout: Duration::from_secs(args.poll_timeout),
        concurrency: args.concurrency as usize,
        max_updates: args.max_updates,
        once: args.once,
    };
    let handler = reply_handler(&args.exec, client.clone(), media_dir, settings.concurrency);
    let service = PollingService {
        state: args.state.location(),
        retention: args.retention.retention,
        lease: args.lease.lease,
        metrics: &args.metrics,
        inspect: &args.inspect,
    };
    let summary = run_polling(&client, &identity, service, handler, &settings, &shutdown)?;
    tracing::info!(
        handled = summary.handled,
        dead_letters = summary.dead_letters,
        "stopped"
    );
    Ok(exit::code(exit::SUCCESS))
}

fn prepare_media_dir(dir: PathBuf) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the media directory {}", dir.display()))?;
    Ok(dir)
}
