//! What the bots keep between updates and between runs, behind role traits:
//! [`Store`] (where it lives, its health, the ids of handled updates),
//! [`PollState`] (the poll offset and the polling lease), [`WebhookLedger`]
//! (the webhook nonces seen, the updates in hand, admission) and [`Letters`]
//! (dead and parked updates). Each store provides the roles it serves.
//!
//! - [`SqliteStore`] (`sqlite.rs`): the embedded default, one SQLite file per
//!   bot; every call is its own transaction. poll-echo and forward use it as is.
//! - [`Front`] (`front.rs`): what serve-webhook puts in front of it, so that
//!   the store keeps up with a busy platform: handled ids and nonces are
//!   answered from memory (`memory.rs`), writes are group-committed by a
//!   writer thread (`group_commit.rs`), checkpoints and pruning happen off
//!   the request path.
//! - [`RedisStore`] (`redis.rs`): a Redis (or Valkey) server shared by
//!   several fly processes on one bot (SPEC 4b). Its atomic claims and
//!   expiring leases are what keep two webhook replicas from handling one
//!   update twice, and two pollers from polling at once.

mod front;
mod group_commit;
mod memory;
mod redis;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fly_base::sync::lock;
use fly_signature::sha256_hex;

pub use self::redis::RedisStore;
pub use front::Front;
pub use group_commit::Pending;
pub use sqlite::SqliteStore;

/// Where `--state` (`FLY_STATE`) says the state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateLocation {
    /// A SQLite file: the one given, else the bot's default path.
    File(Option<PathBuf>),
    /// A Redis or Valkey server, as a URL (which may hold a password: never
    /// shown; see [`RedisStore::location`]).
    Redis(String),
}

impl StateLocation {
    /// A location given by hand (`--state`): `redis://`, `rediss://`,
    /// `redis+unix://` (and the `valkey` forms) name a server; anything else
    /// is a file path.
    pub fn given(path: PathBuf) -> StateLocation {
        if is_server_url(&path) {
            StateLocation::Redis(path.to_string_lossy().into_owned())
        } else {
            StateLocation::File(Some(path))
        }
    }
}

fn is_server_url(path: &Path) -> bool {
    let Some(text) = path.to_str() else {
        return false;
    };
    let lower = text.trim_start().to_ascii_lowercase();
    [
        "redis://",
        "rediss://",
        "redis+unix://",
        "valkey://",
        "valkeys://",
        "valkey+unix://",
    ]
    .iter()
    .any(|scheme| lower.starts_with(scheme))
}

/// Why fly cannot use a state location as it is. The message names the
/// file or the server, never an option: the command layer says how to
/// choose another (`--state`) and decides the exit code.
#[derive(Debug)]
pub enum StateRefused {
    /// Bad input: a directory that does not exist, something that is not a
    /// regular file, a read-only file, a URL that does not parse.
    Unusable(String),
    /// A file fly will not touch: another program's, or another bot's.
    Foreign(String),
    /// Another fly process uses it now; the message says what it does
    /// there (polling, serving webhooks) when that is known. `shared` for a
    /// Redis store, where a second poller can stand by.
    InUse { message: String, shared: bool },
}

impl std::fmt::Display for StateRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateRefused::Unusable(message)
            | StateRefused::Foreign(message)
            | StateRefused::InUse { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for StateRefused {}

/// The error of a store that could not be reached, or did not answer in
/// time: nothing was decided, try again later (a webhook delivery is
/// answered 503, a poller pauses). Find it with `error.downcast_ref`.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// A stop signal (SIGINT, SIGTERM) came while the store was being opened:
/// nothing was done, and the command stops as it would have a moment later.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// The error of a fenced write by a poller that no longer holds the
/// polling lease: another poller may have taken over, so nothing is written.
#[derive(Debug)]
pub struct LeaseLost;

impl std::fmt::Display for LeaseLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this fly no longer holds the polling lease")
    }
}

impl std::error::Error for LeaseLost {}

/// The error of a store whose file was deleted (or moved, or replaced)
/// while fly ran: SQLite goes on writing into the unlinked file, so every
/// write since would be lost without a word. Nothing later can be recorded:
/// the process stops (exit 1). Find it with [`is_gone`].
#[derive(Debug)]
pub struct StateGone(pub String);

impl std::fmt::Display for StateGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StateGone {}

/// Whether `error` says the state file is gone (see [`StateGone`]).
pub fn is_gone(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<StateGone>())
}

/// Whether `error` says the store is unreachable for now.
pub fn is_unavailable(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Unavailable>().is_some()
}

/// Whether `error` says the polling lease is lost.
pub fn is_lease_lost(error: &anyhow::Error) -> bool {
    error.downcast_ref::<LeaseLost>().is_some()
}

/// The bytes of parked updates one [`Letters::parked_after`] call returns at
/// most (one update larger than this comes alone).
pub const PARKED_PAGE_BYTES: usize = 1024 * 1024;

/// How long handled update ids are kept when nothing else is said
/// (`--retention`): far longer than any platform redelivers an update.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How a poller that stands by for the polling lease waits: the caller's
/// stop (fly's staged stop), so that a stop request ends the wait at once.
pub trait Standby: Sync {
    /// Sleeps for `duration`; false when the stop was requested meanwhile.
    fn sleep(&self, duration: Duration) -> bool;
}

/// What every store is, whatever role it serves: where it lives, whether it
/// can be used, and the handled update ids, which both roles read and
/// write (so "mark handled" is decided in one place per store). Every
/// method may block (disk, network): callers on an async I/O thread use
/// only the `try_` methods and the health checks, which never do, and run
/// the others on a blocking thread.
///
/// The roles build on it: [`PollState`] (the poller: the offset and the
/// polling lease), [`WebhookLedger`] (the webhook receiver: nonces, claims,
/// admission) and [`Letters`] (dead and parked updates). A store provides
/// the roles it serves; [`PollStore`] and [`WebhookStore`] are what the
/// poll loop and the receiver need. Update ids and offsets are the
/// platform's integers.
pub trait Store: Send + Sync {
    /// Where the state lives, for log lines: a file path, or a server address
    /// without credentials.
    fn location(&self) -> String;

    fn is_handled(&self, update_id: i64) -> anyhow::Result<bool>;

    /// Records that `update_id` needs no more work (`outcome` says how it
    /// ended). Called only once its reply was accepted, or it was recorded
    /// as a dead letter. Durable when it returns, or (a [`Front`]) with the
    /// writer's next batch, milliseconds later: see there what a crash in
    /// between can lose.
    fn mark_handled(&self, update_id: i64, outcome: &str) -> anyhow::Result<()>;

    /// [`Store::mark_handled`] if it can be done without waiting on disk or
    /// network (in memory, the write queued), else `None`. Safe on an async
    /// I/O thread. The [`Pending`] completes once the caller may go on: at
    /// once, or (a writer far behind) when the writer has finished the batch
    /// in hand, so that a caller that waits for it yields the cores to the
    /// writer rather than queueing writes faster than they are committed.
    fn try_mark_handled(&self, _update_id: i64, _outcome: &str) -> Option<anyhow::Result<Pending>> {
        None
    }

    /// [`Store::mark_handled`] answered later, by a thread of the store's
    /// own (no thread waits for it), when the store can (a server's store),
    /// else `None`. Safe on an async I/O thread.
    fn mark_later(&self, _update_id: i64, _outcome: &str) -> Option<Later<anyhow::Result<()>>> {
        None
    }

    /// Makes everything accepted so far durable (a clean stop).
    fn flush(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Whether the store answered lately (`GET /readyz`), known without
    /// waiting: a store on a server watches it in the background. Safe on
    /// an async I/O thread.
    fn is_reachable(&self) -> bool {
        true
    }

    /// Why nothing can be recorded any more (the state file was deleted
    /// while fly ran: see [`StateGone`]), known without waiting: a server
    /// stops on it. Safe on an async I/O thread.
    fn gone(&self) -> Option<anyhow::Error> {
        None
    }
}

/// The poller's role: the offset, and the lease that keeps two pollers of
/// one bot from polling at once.
pub trait PollState: Store {
    /// The offset to poll with: every update below it has been handled.
    fn next_offset(&self) -> anyhow::Result<i64>;

    /// Moves the offset forward, never back, and prunes handled ids that
    /// cannot come again (far below the offset, or older than the retention).
    /// Where the polling lease can be lost (it expires), the write is fenced
    /// by it: a poller that lost its lease gets an error, not a write.
    fn advance_offset(&self, next_offset: i64) -> anyhow::Result<()>;

    /// Takes the polling lease: two pollers on one state would confirm each
    /// other's offsets and answer the same updates. The SQLite file is
    /// locked until this process exits, and a second poller is refused with
    /// an error that says so. A shared store's lease expires: it is renewed
    /// while the [`PollingLease`] lives and given back when it is dropped,
    /// and `advance_offset` and `mark_handled` are fenced by it. With
    /// `standby`, a poller that finds the lease held waits (logging once that
    /// it stands by) until it can take it over, or until the stop is
    /// requested (`None`); without, it is refused.
    fn claim_polling(&self, standby: Option<&dyn Standby>) -> anyhow::Result<Option<PollingLease>>;
}

/// The webhook receiver's role: the nonces seen, the updates in hand
/// (claims), and the decision for each verified delivery. A nonce is
/// remembered with the update it came with (`update_key`, the id as text).
pub trait WebhookLedger: Store {
    /// Checks `nonce` against the ones seen in the last `window_secs` and
    /// remembers it for `update_key`, atomically: of two deliveries with one
    /// nonce and different updates, only the first is [`NonceCheck::Fresh`].
    /// Nonces are kept for twice the window (the replay window reaches that
    /// far either side of now). Durable as `mark_handled` is.
    fn check_nonce(
        &self,
        nonce: &str,
        update_key: &str,
        now: i64,
        window_secs: i64,
    ) -> anyhow::Result<NonceCheck>;

    /// Claims `update_id` for handling: `None` while someone else holds an
    /// unexpired claim on it. A claim is a lease: after `lease` it lapses by
    /// itself, so a holder that died does not keep the update forever.
    fn claim_update(&self, update_id: i64, lease: Duration) -> anyhow::Result<Option<Claim>>;

    /// Gives a claim up (after `mark_handled`, or without it when handling
    /// failed and the update is to come again). Releasing a claim that has
    /// lapsed and been taken by another holder leaves theirs alone. May be
    /// called from a drop on an async I/O thread (a client that disconnected):
    /// a backend that needs I/O to release hands it to a thread of its own.
    fn release_update(&self, claim: Claim) -> anyhow::Result<()>;

    /// Decides what a verified delivery may do, in the order the receiver
    /// answers (handled → nonce → claim), and claims its update when it may
    /// be handled. Provided from the calls above, with the handled check
    /// made again once the claim is held (a delivery of the same update may
    /// have finished in between); a backend may do it in one atomic step.
    fn admit(&self, delivery: &Delivery) -> anyhow::Result<Admission> {
        if self.is_handled(delivery.update_id)? {
            return Ok(Admission::Duplicate);
        }
        if !delivery.nonce.is_empty() {
            let key = delivery.update_id.to_string();
            let check =
                self.check_nonce(&delivery.nonce, &key, delivery.now, delivery.window_secs)?;
            if check == NonceCheck::Reused {
                return Ok(Admission::NonceReused);
            }
        }
        let Some(claim) = self.claim_update(delivery.update_id, delivery.lease)? else {
            return Ok(Admission::InProgress);
        };
        if self.is_handled(delivery.update_id)? {
            self.release_update(claim)?;
            return Ok(Admission::Duplicate);
        }
        Ok(Admission::Admitted {
            claim,
            wait: Pending::done(),
        })
    }

    /// [`WebhookLedger::admit`] if it can be answered without waiting on disk or
    /// network (from memory), else `None`: the caller then runs `admit` on a
    /// blocking thread. Safe on an async I/O thread.
    fn try_admit(&self, _delivery: &Delivery) -> Option<anyhow::Result<Admission>> {
        None
    }

    /// [`WebhookLedger::admit`] answered later, by a thread of the store's
    /// own (no thread waits for it), when the store can (a server's store),
    /// else `None`. Safe on an async I/O thread. An admission nobody takes
    /// must have its claim released.
    fn admit_later(&self, _delivery: &Delivery) -> Option<Later<anyhow::Result<Admission>>> {
        None
    }
}

/// A store's answer that comes later: [`Later::on_done`] sends the request
/// and hands the answer to its callback, on a thread of the store's own
/// (so the callback must be quick: a channel's send), exactly once.
pub struct Later<T>(Box<dyn FnOnce(Then<T>) + Send>);

/// The callback a [`Later`] answer is handed to.
pub type Then<T> = Box<dyn FnOnce(T) + Send>;

impl<T> Later<T> {
    /// A request that `send` sends, with the callback for its answer.
    pub fn new(send: impl FnOnce(Then<T>) + Send + 'static) -> Later<T> {
        Later(Box::new(send))
    }

    pub fn on_done(self, then: impl FnOnce(T) + Send + 'static) {
        (self.0)(Box::new(then));
    }
}

/// Updates that could not be handled: dead letters (never will be) and
/// parked updates (keep failing; retried, their chat waiting behind them).
pub trait Letters: Store {
    /// Records an update that can never be handled, with its bytes and why.
    /// Returns whether it is new (an update recorded before is not again).
    fn record_dead_letter(
        &self,
        update_id: Option<i64>,
        raw: &str,
        reason: &str,
    ) -> anyhow::Result<bool>;

    /// Every dead letter, oldest first.
    fn dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>>;

    /// Forgets every dead letter, parked updates excepted (they are not
    /// handled: dropping one is `forget_dead_letter`); returns how many.
    fn purge_dead_letters(&self) -> anyhow::Result<usize>;

    /// Records `update_id` as parked, with its bytes and why (the last
    /// error), or updates the reason of one parked already (a dead letter
    /// of that id becomes parked: retried again). A parked update is not
    /// handled; it is kept here so the offset may pass it, and retried.
    /// Listed with the dead letters.
    fn park(&self, update_id: i64, raw: &str, reason: &str) -> anyhow::Result<()>;

    /// Forgets a parked update (handled at last); whether there was one.
    fn unpark(&self, update_id: i64) -> anyhow::Result<bool>;

    /// The first parked updates with an id above `after`, by id: at most
    /// `limit`, and no more than [`PARKED_PAGE_BYTES`] of them (but at least
    /// one); empty when there are none. A parked chat's later updates wait
    /// here, not in the poller's memory, and are read back a page at a time.
    /// Provided from `dead_letters`; a backend may read only the page.
    fn parked_after(&self, after: i64, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
        let mut parked: Vec<DeadLetter> = self
            .dead_letters()?
            .into_iter()
            .filter(|letter| letter.parked && letter.update_id.is_some_and(|id| id > after))
            .collect();
        parked.sort_by_key(|letter| letter.update_id);
        let mut bytes = 0;
        let fits = parked
            .iter()
            .take(limit)
            .take_while(|letter| {
                let first = bytes == 0;
                bytes += letter.raw.len().max(1);
                first || bytes <= PARKED_PAGE_BYTES
            })
            .count();
        parked.truncate(fits);
        Ok(parked)
    }

    /// Forgets the dead or parked update `update_id`; whether there was one.
    fn forget_dead_letter(&self, update_id: i64) -> anyhow::Result<bool>;
}

/// What the poll loop (poll-echo, forward) needs of a store.
pub trait PollStore: PollState + Letters {}
impl<T: PollState + Letters + ?Sized> PollStore for T {}

/// What the webhook receiver (serve-webhook) needs of a store.
pub trait WebhookStore: WebhookLedger + Letters {}
impl<T: WebhookLedger + Letters + ?Sized> WebhookStore for T {}

/// The right to poll, from [`PollState::claim_polling`]. A lease that can expire
/// (a shared store's) says when it is lost, and is given back when dropped,
/// so that a standby takes over at once after a clean stop.
pub struct PollingLease {
    watch: Arc<LeaseWatch>,
    give_back: Option<Box<dyn FnOnce() + Send + Sync>>,
}

/// What a [`PollingLease`] knows of itself; shared with whoever renews it.
pub struct LeaseWatch {
    state: Mutex<LeaseState>,
}

type LostListener = Box<dyn FnOnce() + Send>;

struct LeaseState {
    lost: bool,
    /// Confirmed held at this moment, for this long after it (`None`: held
    /// until the process exits).
    confirmed: Option<(Instant, Duration)>,
    listeners: Vec<LostListener>,
    /// The last renewal failed (the store did not answer): a lapse then
    /// says the store was away, not that this process was paused.
    renewal_failed: bool,
}

impl LeaseWatch {
    fn new(confirmed: Option<(Instant, Duration)>) -> Arc<LeaseWatch> {
        Arc::new(LeaseWatch {
            state: Mutex::new(LeaseState {
                lost: false,
                confirmed,
                listeners: Vec::new(),
                renewal_failed: false,
            }),
        })
    }

    /// The lease was renewed by a call that started at `at`.
    pub fn confirmed_at(&self, at: Instant) {
        let mut state = lock(&self.state);
        state.renewal_failed = false;
        if let Some((last, _)) = state.confirmed.as_mut() {
            *last = (*last).max(at);
        }
    }

    /// A renewal failed for want of the store.
    pub fn renewal_failed(&self) {
        lock(&self.state).renewal_failed = true;
    }

    /// How long the lease went without a renewal, when it ran out with
    /// every renewal answered: the process (or its renewal thread) did not
    /// run for that long, paused (SIGSTOP, a suspended machine). `None`
    /// while it is current, or when the store did not answer.
    pub fn lapsed_in_a_pause(&self) -> Option<Duration> {
        let state = lock(&self.state);
        let (at, valid_for) = state.confirmed?;
        let unrenewed = at.elapsed();
        (unrenewed >= valid_for && !state.renewal_failed).then_some(unrenewed)
    }

    /// Whether the lease has run out since its last confirmation.
    pub fn expired(&self) -> bool {
        let state = lock(&self.state);
        state.lost
            || state
                .confirmed
                .is_some_and(|(at, valid_for)| at.elapsed() >= valid_for)
    }

    /// The lease is gone: tells every listener, once.
    pub fn lose(&self) {
        let listeners = {
            let mut state = lock(&self.state);
            if state.lost {
                return;
            }
            state.lost = true;
            std::mem::take(&mut state.listeners)
        };
        for listener in listeners {
            listener();
        }
    }
}

impl PollingLease {
    /// A lease held until the process exits (a locked file).
    pub fn until_exit() -> PollingLease {
        PollingLease {
            watch: LeaseWatch::new(None),
            give_back: None,
        }
    }

    /// A lease confirmed now for `valid_for`, renewed through `watch`;
    /// `give_back` runs when it is dropped.
    pub fn expiring(
        valid_for: Duration,
        confirmed_at: Instant,
        give_back: impl FnOnce() + Send + Sync + 'static,
    ) -> (PollingLease, Arc<LeaseWatch>) {
        let watch = LeaseWatch::new(Some((confirmed_at, valid_for)));
        let lease = PollingLease {
            watch: Arc::clone(&watch),
            give_back: Some(Box::new(give_back)),
        };
        (lease, watch)
    }

    /// Whether work may still be started under it: not lost, and confirmed
    /// within the lease time.
    pub fn is_current(&self) -> bool {
        !self.watch.expired()
    }

    /// Calls `listener` once when the lease is lost (at once if it is).
    pub fn when_lost(&self, listener: impl FnOnce() + Send + 'static) {
        let mut state = lock(&self.watch.state);
        if state.lost {
            drop(state);
            listener();
        } else {
            state.listeners.push(Box::new(listener));
        }
    }
}

impl Drop for PollingLease {
    fn drop(&mut self) {
        if let Some(give_back) = self.give_back.take() {
            give_back();
        }
    }
}

/// What the nonce cache says about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Not seen inside the window, or seen with this same update (a redelivery).
    Fresh,
    /// Seen with another update inside the window: a replayed signature.
    Reused,
}

/// A verified webhook delivery, as [`WebhookLedger::admit`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub update_id: i64,
    /// Empty when the delivery has none (nothing to check or remember).
    pub nonce: String,
    pub now: i64,
    pub window_secs: i64,
    /// How long the claim lasts if its holder never releases it.
    pub lease: Duration,
}

/// What a delivery may do.
#[derive(Debug)]
pub enum Admission {
    /// Handled before: answered, not handled twice.
    Duplicate,
    /// Its nonce came with another update inside the window.
    NonceReused,
    /// Another delivery of this update is being handled right now.
    InProgress,
    /// Handle it, holding `claim`, once `wait` completes: at once, unless
    /// the store is behind with its writes and holds deliveries back until
    /// it has caught up (backpressure).
    Admitted { claim: Claim, wait: Pending },
}

/// A claim on an update being handled, from [`WebhookLedger::claim_update`]; give it
/// back with [`WebhookLedger::release_update`].
#[derive(Debug, PartialEq, Eq)]
pub struct Claim {
    pub update_id: i64,
    /// Tells this holder's claim from a later one on the same update.
    pub token: u64,
}

/// An update that could not be handled at all, as `fly dead-letters` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub update_id: Option<i64>,
    pub reason: String,
    /// The update exactly as received.
    pub raw: String,
    pub recorded_at: i64,
    /// Parked (still retried, not confirmed as handled) rather than dead.
    pub parked: bool,
}

/// Which bot a state belongs to: the base URL (without credentials) and a
/// fingerprint of the token, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotIdentity {
    pub base_url: String,
    pub token_fingerprint: String,
    /// The fingerprint fly wrote before 0.2 (a prefix of sha256(token), and
    /// so of the default webhook secret): recognised in older state files,
    /// which are then rewritten with `token_fingerprint`. Never stored anew.
    legacy_fingerprint: String,
}

/// Keeps the fingerprint apart from every other hash of the token (the
/// default webhook secret is sha256(token)): knowing it says nothing of them.
const FINGERPRINT_DOMAIN: &str = "fly state: token fingerprint v2\n";

impl BotIdentity {
    /// The identity of the bot with `token` on `base_url`. The token is
    /// only hashed (with a domain of its own): never kept, stored or shown.
    pub fn new(base_url: &str, token: &str) -> BotIdentity {
        BotIdentity {
            base_url: without_userinfo(base_url.trim().trim_end_matches('/')),
            token_fingerprint: sha256_hex(format!("{FINGERPRINT_DOMAIN}{token}").as_bytes())[..16]
                .to_string(),
            legacy_fingerprint: sha256_hex(token.as_bytes())[..16].to_string(),
        }
    }

    /// Whether `stored` is this bot's fingerprint as an older fly wrote it.
    pub fn is_legacy_fingerprint(&self, stored: &str) -> bool {
        stored == self.legacy_fingerprint
    }

    /// A short stable key for file names.
    pub fn key(&self) -> String {
        Self::key_of(&self.base_url, &self.token_fingerprint)
    }

    fn key_of(base_url: &str, fingerprint: &str) -> String {
        sha256_hex(format!("{base_url}\n{fingerprint}").as_bytes())[..16].to_string()
    }

    /// The default state file of `role` for this bot, in
    /// `$XDG_STATE_HOME/fly/`, else `~/.local/state/fly/`: the pollers'
    /// `bot-<key>.db` (or the file an older fly named there for this bot, if
    /// it exists), serve-webhook's `bot-<key>-webhook.db`.
    pub fn default_state_path(&self, role: Role) -> anyhow::Result<PathBuf> {
        let dir = state_dir()?;
        if role == Role::Webhook {
            return Ok(dir.join(format!("bot-{}-webhook.db", self.key())));
        }
        let legacy = dir.join(format!(
            "bot-{}.db",
            Self::key_of(&self.base_url, &self.legacy_fingerprint)
        ));
        if legacy.is_file() {
            return Ok(legacy);
        }
        Ok(dir.join(format!("bot-{}.db", self.key())))
    }
}

/// Which default state file a process uses, and what it is said to be
/// doing when another finds the file taken. Pollers share one (and exclude
/// each other: two would fight over the offset); serve-webhook keeps its
/// handled ids and nonces in a file of its own, so a poller (`fly forward`)
/// and a receiver of the same bot run side by side, neither waiting on the
/// other's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// poll-echo and forward.
    Polling,
    /// serve-webhook.
    Webhook,
}

impl Role {
    /// Every role, the pollers' first.
    pub const ALL: [Role; 2] = [Role::Polling, Role::Webhook];

    /// What a process of this role does with its file, as a refusal says it.
    pub fn doing(self) -> &'static str {
        match self {
            Role::Polling => "polling",
            Role::Webhook => "serving webhooks",
        }
    }

    /// The commands whose default file this is.
    pub fn commands(self) -> &'static str {
        match self {
            Role::Polling => "poll-echo and forward",
            Role::Webhook => "serve-webhook",
        }
    }
}

/// `$XDG_STATE_HOME/fly`, else `~/.local/state/fly`.
fn state_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|dir| !dir.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local/state"),
            None => {
                return Err(StateRefused::Unusable(
                    "no state directory: set HOME or XDG_STATE_HOME".into(),
                )
                .into());
            }
        },
    };
    Ok(base.join("fly"))
}

#[cfg(test)]
impl BotIdentity {
    /// The identity of a bot with `token` on a local emulator, for the stores' tests.
    pub fn for_tests(token: &str) -> BotIdentity {
        BotIdentity::new("http://127.0.0.1:8787/", token)
    }
}

/// `url` without `user:password@`: what may be stored, logged and shown.
pub fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://{}{path}", &authority[at + 1..]),
        None => url.to_string(),
    }
}

/// What every store's `parked_after` must do, for the stores' tests: pages
/// by id (not by when they were parked), parked ones only, bounded by count
/// and by bytes, one large update alone.
#[cfg(test)]
pub fn check_parked_pages(store: &dyn Letters) {
    let big = format!(
        "{{\"update_id\":0,\"pad\":\"{}\"}}",
        "x".repeat(PARKED_PAGE_BYTES)
    );
    store.park(30, "{\"update_id\":30}", "why").unwrap();
    store.park(10, "{\"update_id\":10}", "why").unwrap();
    store
        .record_dead_letter(Some(15), "{\"update_id\":15}", "dead")
        .unwrap();
    store.park(20, &big, "why").unwrap();
    store.park(40, "{\"update_id\":40}", "why").unwrap();
    let ids = |after: i64, limit: usize| -> Vec<Option<i64>> {
        let page = store.parked_after(after, limit).unwrap();
        assert!(page.iter().all(|letter| letter.parked));
        page.iter().map(|letter| letter.update_id).collect()
    };
    assert_eq!(ids(i64::MIN, 1), [Some(10)]);
    // 10, then the large one would pass the byte bound: it comes alone next.
    assert_eq!(ids(i64::MIN, 10), [Some(10)]);
    assert_eq!(ids(10, 10), [Some(20)]);
    assert_eq!(ids(20, 10), [Some(30), Some(40)]);
    assert!(ids(40, 10).is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_base_url_are_not_kept() {
        let id = BotIdentity::new("https://user:PASS@api.example.com:8443/", "t");
        assert_eq!(id.base_url, "https://api.example.com:8443");
        assert_eq!(without_userinfo("http://a@b/c@d?e@f"), "http://b/c@d?e@f");
        assert_eq!(without_userinfo("http://host/p"), "http://host/p");
        assert_eq!(without_userinfo("not a url"), "not a url");
    }

    #[test]
    fn the_fingerprint_is_no_prefix_of_the_default_secret() {
        let id = BotIdentity::new("http://h", "a-token");
        let default_secret = sha256_hex(b"a-token");
        assert_eq!(id.token_fingerprint.len(), 16);
        assert!(!default_secret.starts_with(&id.token_fingerprint));
        assert!(id.is_legacy_fingerprint(&default_secret[..16]));
    }

    #[test]
    fn default_path_never_contains_the_token() {
        let id = BotIdentity::for_tests("super-secret-token");
        assert_eq!(id.key().len(), 16);
        assert!(!id.key().contains("super"));
        assert_ne!(
            BotIdentity::for_tests("a").key(),
            BotIdentity::for_tests("b").key()
        );
    }
}
