//! What a command is built from: the API client, the handler that answers
//! updates, and the state store.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;

use crate::api::ApiClient;
use crate::bot::Handler;
use crate::bot::poll_loop::{self, PollSettings, Summary};
use crate::cli::{ApiArgs, ExecArgs, InspectArgs, MetricsArgs};
use crate::inspect::InspectConfig;
use crate::observe::endpoint::{self, Readiness};
use crate::observe::{Phase, Source, metrics};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use fly_state::{BotIdentity, PollStore, RedisStore, Role, SqliteStore, StateLocation};

/// The API client for one-shot commands (a bounded number of retries).
pub fn one_shot_client(api: &ApiArgs) -> anyhow::Result<ApiClient> {
    let token = super::credentials::required_token(api)?;
    ApiClient::new(&api.base_url, token, RetryPolicy::ONE_SHOT)
        .context("configuring the API client")
}

/// What answers updates: the `--exec` handler or the `--exec-worker`
/// workers (`concurrency` of them) when one is given, else the echo (with
/// the media round trip when `media_dir` is set).
pub fn reply_handler(
    exec: &ExecArgs,
    client: ApiClient,
    media_dir: Option<PathBuf>,
    concurrency: usize,
) -> Arc<dyn Handler> {
    let timeout = Duration::from_secs(exec.exec_timeout);
    if let Some(command) = &exec.exec {
        return Arc::new(crate::bot::exec::ExecHandler::new(
            "--exec",
            command.clone(),
            timeout,
            client,
            exec.exec_pass_token,
        ));
    }
    if let Some(command) = &exec.exec_worker {
        return Arc::new(crate::bot::worker::WorkerPool::start(
            "--exec-worker",
            command.clone(),
            concurrency,
            timeout,
            client,
            exec.exec_pass_token,
        ));
    }
    Arc::new(crate::bot::echo::EchoHandler { client, media_dir })
}

/// Where a polling command (poll-echo, forward) keeps its state, and the
/// listeners it serves beside its loop.
pub struct PollingService<'a> {
    pub state: StateLocation,
    pub retention: Duration,
    pub lease: Duration,
    pub metrics: &'a MetricsArgs,
    pub inspect: &'a InspectArgs,
}

/// Runs a polling command's loop with `handler`: its listeners first
/// (`--metrics`, `--inspect`), so that a taken port leaves no state file
/// behind, then its state store, then the poll loop until it ends.
pub fn run_polling(
    client: &ApiClient,
    identity: &BotIdentity,
    service: PollingService<'_>,
    handler: Arc<dyn Handler>,
    settings: &PollSettings,
    shutdown: &Shutdown,
) -> anyhow::Result<Summary> {
    let watched = serve_polling_metrics(service.metrics)?;
    start_polling_inspector(service.inspect, settings.source, &handler)?;
    let store = polling_store(identity, service.state, service.retention, service.lease)?;
    let _ = watched.set(Arc::clone(&store));
    poll_loop::run(client, store, handler, settings, shutdown)
}

/// `--metrics` of a polling command (poll-echo, forward), if given,
/// served before the state store is opened (a taken port leaves no state
/// file behind): `/readyz` says whether the loop polls or stands by and the
/// store, once given to the returned slot, answers.
fn serve_polling_metrics(args: &MetricsArgs) -> anyhow::Result<Arc<OnceLock<Arc<dyn PollStore>>>> {
    let slot: Arc<OnceLock<Arc<dyn PollStore>>> = Arc::default();
    let Some(address) = args.address else {
        return Ok(slot);
    };
    let store = Arc::clone(&slot);
    let ready: Readiness = Arc::new(move || {
        matches!(metrics().phase(), Phase::Polling | Phase::StandingBy)
            && store.get().is_some_and(|store| store.is_reachable())
    });
    endpoint::serve(address, ready)?;
    Ok(slot)
}

/// `--inspect` of a polling command (poll-echo, forward), if given: its
/// updates in a browser; a replay runs `handler` again.
fn start_polling_inspector(
    args: &InspectArgs,
    source: Source,
    handler: &Arc<dyn Handler>,
) -> anyhow::Result<()> {
    let Some(address) = args.address else {
        return Ok(());
    };
    let config = InspectConfig {
        keep: args.inspect_keep as usize,
        source,
        handler: Arc::clone(handler),
        secrets: Vec::new(),
        window: None,
        delivery_url: None,
    };
    crate::inspect::start(address, config)?;
    Ok(())
}

/// The state store of a polling command (poll-echo, forward): the SQLite
/// file, or a Redis server shared with standby pollers (`--lease`).
fn polling_store(
    identity: &BotIdentity,
    state: StateLocation,
    retention: Duration,
    lease: Duration,
) -> anyhow::Result<Arc<dyn PollStore>> {
    Ok(match state {
        StateLocation::Redis(url) => Arc::new(
            RedisStore::open(&url, identity)?
                .with_retention(retention)
                .with_lease(lease)
                .with_outage_note("polling pauses until the state store is back"),
        ),
        StateLocation::File(path) => Arc::new(
            SqliteStore::open_for(identity, path, Role::Polling)?.with_retention(retention),
        ),
    })
}
