//! The embedded state store: one SQLite file per bot (WAL mode) holding the
//! poll offset, the ids of handled updates, the webhook nonces seen and the
//! dead letters (updates that can never be handled, kept with their bytes).
//! In-flight claims live in this process's memory: the file is used by one
//! fly process at a time (see `claim_exclusive`).
//!
//! Why SQLite: a crash (`kill -9`) at any moment must leave either the old or
//! the new state, never a torn file, and the handled-id set must be queried
//! and pruned without loading it. Committed transactions survive a process
//! crash with `synchronous=NORMAL` in WAL mode (only a power loss may drop the
//! last ones, and the platform's `client_msg_id` absorbs a repeat then).
//!
//! A file is recognised by its SQLite `application_id`; its schema version is
//! `user_version`. A file that is not ours, is corrupt, is of a newer schema or
//! belongs to another bot is reported, never replaced.
//!
//! Besides the [`Store`] calls (each its own transaction), this module gives
//! the [`Front`](super::Front) what it builds on: the newest handled ids and
//! the recent nonces to load, and a [`BatchWriter`] for its group commits.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::group_commit::Sink;
use super::memory::Claims;
use super::{
    BotIdentity, Claim, DEFAULT_RETENTION, DeadLetter, Letters, NonceCheck, PollState, Role,
    StateGone, StateRefused, Store, WebhookLedger,
};
use fly_base::clock::unix_now;
use fly_base::sync::lock;
use fly_signature::sha256_hex;

/// "FLY1" in ASCII: marks a SQLite file as a fly state store.
const APPLICATION_ID: i64 = 0x464C_5931;
const SCHEMA_VERSION: i64 = 4;
/// Handled update ids kept below the current offset; older ones can never be
/// delivered again (the platform only returns ids at or above the offset).
const HANDLED_IDS_KEPT: i64 = 10_000;
/// How long a connection waits for another one's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The `meta` row in which the process that claimed the file (see
/// `SqliteStore::claim_exclusive`) says who it is and what it does:
/// `{"pid":1234,"doing":"serving webhooks"}`. Written over by each claimant.
const HOLDER_KEY: &str = "holder";
/// How long a refused claimant waits for the holder's row (see `in_use`).
const HOLDER_WAIT: Duration = Duration::from_millis(500);

const SCHEMA: &str = "
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE poll_offset (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        next_offset INTEGER NOT NULL
    );
    CREATE TABLE handled_updates (
        update_id INTEGER PRIMARY KEY,
        outcome TEXT NOT NULL,
        handled_at INTEGER NOT NULL
    );
    CREATE TABLE seen_nonces (
        nonce TEXT PRIMARY KEY,
        update_key TEXT NOT NULL,
        seen_at INTEGER NOT NULL
    );
    CREATE INDEX seen_nonces_by_age ON seen_nonces (seen_at);
";

/// Schema 2: dead letters. Also how a schema-1 file is brought up to date.
/// `raw_sha256` keeps an update that comes again (one without an id cannot
/// be confirmed) from being recorded twice.
const DEAD_LETTERS_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        update_id INTEGER,
        reason TEXT NOT NULL,
        raw TEXT NOT NULL,
        raw_sha256 TEXT NOT NULL UNIQUE,
        recorded_at INTEGER NOT NULL
    );
";

/// Schema 4. A dead letter may be parked: an update that kept failing (or
/// failed for good), recorded so the offset can pass it, and retried.
fn upgrade_to_schema_4(transaction: &rusqlite::Transaction) -> rusqlite::Result<()> {
    let has_column: bool = transaction.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('dead_letters') WHERE name = 'parked'",
        [],
        |row| row.get(0),
    )?;
    if !has_column {
        transaction.execute_batch(
            "ALTER TABLE dead_letters ADD COLUMN parked INTEGER NOT NULL DEFAULT 0;",
        )?;
    }
    transaction.execute_batch(
        "CREATE INDEX IF NOT EXISTS dead_letters_by_update ON dead_letters (update_id);",
    )
}

/// Schema 3. Handled ids are pruned by age (`--retention`), which
/// serve-webhook (no offset) needs to keep its file bounded. Nonces are
/// appended to a log and merged, a few thousand at a time, into sorted runs
/// (see [`BatchWriter`]); the nonces of schema 2 go to the log.
const SCHEMA_3: &str = "
    CREATE INDEX IF NOT EXISTS handled_updates_by_age ON handled_updates (handled_at);
    CREATE TABLE IF NOT EXISTS nonce_log (
        nonce TEXT NOT NULL,
        update_key TEXT NOT NULL,
        seen_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS nonce_runs (
        run INTEGER NOT NULL,
        nonce TEXT NOT NULL,
        update_key TEXT NOT NULL,
        seen_at INTEGER NOT NULL,
        PRIMARY KEY (run, nonce)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS nonce_run_ages (
        run INTEGER PRIMARY KEY,
        newest_at INTEGER NOT NULL
    );
    INSERT INTO nonce_log (nonce, update_key, seen_at)
        SELECT nonce, update_key, seen_at FROM seen_nonces;
    DROP TABLE seen_nonces;
";

/// The open store. Methods take `&self` (the connection is behind a mutex) so
/// concurrent workers can share one store.
pub struct SqliteStore {
    connection: Mutex<Connection>,
    path: PathBuf,
    /// Handled ids older than this many seconds are pruned.
    retention_secs: i64,
    claims: Mutex<Claims>,
    /// The file, locked and watched while this process uses the store
    /// alone (see `claim_exclusive`); declared after the connection so it
    /// is closed after it.
    exclusive: Mutex<Option<Arc<FileWatch>>>,
}

/// The state file as this process claimed it: its descriptor (which holds
/// the lock) and what it was. A file deleted while fly runs is still written
/// to by SQLite, through the descriptors it holds, and every write since is
/// lost with the file when the process ends; so after each write the file is
/// checked (one `fstat` and one `stat`: microseconds), and a file that is
/// gone fails the write, once and for all.
pub(super) struct FileWatch {
    file: std::fs::File,
    path: PathBuf,
    /// (device, inode) of the file claimed.
    claimed: (u64, u64),
    gone: AtomicBool,
}

impl FileWatch {
    fn new(file: std::fs::File, path: &Path) -> std::io::Result<FileWatch> {
        let found = file.metadata()?;
        Ok(FileWatch {
            file,
            path: path.to_path_buf(),
            claimed: (found.dev(), found.ino()),
            gone: AtomicBool::new(false),
        })
    }

    /// Whether the file is still there, under its name; remembered once it is not.
    pub(super) fn check(&self) -> Result<(), StateGone> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(self.error());
        }
        // Deleted: no name left (also when its directory was removed).
        let linked = self.file.metadata().map_or(true, |found| found.nlink() > 0);
        // Moved away, or another file put in its place.
        let named = match std::fs::metadata(&self.path) {
            Ok(found) => (found.dev(), found.ino()) == self.claimed,
            Err(error) => !matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ),
        };
        if linked && named {
            return Ok(());
        }
        self.gone.store(true, Ordering::SeqCst);
        Err(self.error())
    }

    /// Whether a check found the file gone (no system call).
    pub(super) fn is_gone(&self) -> Option<StateGone> {
        self.gone.load(Ordering::SeqCst).then(|| self.error())
    }

    fn error(&self) -> StateGone {
        StateGone(format!(
            "the state file {} was deleted (or moved) while fly ran: nothing more can be \
             recorded in it",
            self.path.display()
        ))
    }
}

impl SqliteStore {
    /// Opens (or creates) the store at `path` for `identity`.
    pub fn open(path: &Path, identity: &BotIdentity) -> anyhow::Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            create_private_dir(dir)
                .with_context(|| format!("creating the state directory {}", dir.display()))?;
        }
        create_private_file(path)
            .with_context(|| format!("creating the state file {}", path.display()))?;
        SqliteStore::open_file(path, Some(identity))
    }

    /// Opens an existing store whatever bot it belongs to, for commands that
    /// only inspect it (`fly dead-letters --state PATH`, which needs no token).
    pub fn open_existing(path: &Path) -> anyhow::Result<SqliteStore> {
        if !path.exists() {
            return Err(
                StateRefused::Unusable(format!("no state file at {}", path.display())).into(),
            );
        }
        SqliteStore::open_file(path, None)
    }

    fn open_file(path: &Path, identity: Option<&BotIdentity>) -> anyhow::Result<SqliteStore> {
        let shown = path.display();
        // SQLite would open a device or a FIFO, fail, and leave its journal
        // next to it (in /dev, for `--state /dev/null`).
        if let Ok(found) = std::fs::metadata(path)
            && !found.is_file()
        {
            return Err(StateRefused::Unusable(format!(
                "state file {shown} is not a regular file"
            ))
            .into());
        }
        // SQLite would open it read-only and fail later, less clearly.
        if let Err(error) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            && matches!(
                error.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            )
        {
            return Err(StateRefused::Unusable(format!(
                "state file {shown} is read-only ({error}): fly writes to it; \
                 check its owner and permissions"
            ))
            .into());
        }
        let connection =
            Connection::open(path).with_context(|| format!("opening the state file {shown}"))?;
        let store = SqliteStore {
            connection: Mutex::new(connection),
            path: path.to_path_buf(),
            retention_secs: DEFAULT_RETENTION.as_secs() as i64,
            claims: Mutex::new(Claims::default()),
            exclusive: Mutex::new(None),
        };
        store
            .prepare(identity)
            .with_context(|| format!("state file {shown}"))?;
        Ok(store)
    }

    /// Opens the store at `explicit` (`--state`), else at the identity's
    /// default path for `role`: what every long-running command does.
    pub fn open_for(
        identity: &BotIdentity,
        explicit: Option<PathBuf>,
        role: Role,
    ) -> anyhow::Result<SqliteStore> {
        let path = match explicit {
            Some(path) => {
                // A typo in a path given by hand must not grow directories:
                // only the default location is created.
                if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty())
                    && !dir.is_dir()
                {
                    return Err(StateRefused::Unusable(format!(
                        "the directory {} of the state file {} does not exist: create it first",
                        dir.display(),
                        path.display()
                    ))
                    .into());
                }
                path
            }
            None => identity.default_state_path(role)?,
        };
        SqliteStore::open(&path, identity)
    }

    /// Keeps handled ids for `retention` (`--retention`), not the default 7 days.
    pub fn with_retention(mut self, retention: Duration) -> SqliteStore {
        self.retention_secs = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        self
    }

    /// Claims the file for this process alone, `doing` something (polling,
    /// serving webhooks) until it exits: two pollers would confirm each
    /// other's offsets and answer the same updates, and a webhook server
    /// answers from memory what it has written. An advisory flock on its own
    /// descriptor of the file, which is kept open: SQLite's own locks are
    /// fcntl locks, which flock does not touch. The holder then records who
    /// it is and what it does (see `HOLDER_KEY`), so that a second process
    /// is told what the first one does, not what the second wanted to.
    pub fn claim_exclusive(&self, doing: &str) -> anyhow::Result<()> {
        let file = std::fs::File::open(&self.path)
            .with_context(|| format!("opening the state file {}", self.path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(self.in_use().into()),
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(error)
                    .with_context(|| format!("locking the state file {}", self.path.display()));
            }
        }
        let watch = FileWatch::new(file, &self.path)
            .with_context(|| format!("reading the state file {}", self.path.display()))?;
        *lock(&self.exclusive) = Some(Arc::new(watch));
        self.record_holder(doing);
        Ok(())
    }

    /// Writes this process into the holder row. Only words for a second
    /// process's refusal: a file that cannot take the row now (a full disk)
    /// is still this process's, and says so when written to.
    fn record_holder(&self, doing: &str) {
        let holder = serde_json::json!({"pid": std::process::id(), "doing": doing}).to_string();
        let written = self.lock().execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            params![HOLDER_KEY, holder],
        );
        if let Err(error) = written {
            tracing::debug!(state = %self.path.display(), %error, "the holder row was not written");
        }
    }

    /// The process that holds the file and what it does there, from the
    /// holder row, if that process still runs (a row left by one that
    /// has exited says nothing of the holder now).
    fn holder(&self) -> Option<(u32, String)> {
        let row: String = self
            .lock()
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [HOLDER_KEY],
                |row| row.get(0),
            )
            .optional()
            .ok()??;
        let row: serde_json::Value = serde_json::from_str(&row).ok()?;
        let pid = u32::try_from(row["pid"].as_u64()?).ok()?;
        let doing = row["doing"].as_str()?.to_string();
        is_running(pid).then_some((pid, doing))
    }

    /// The refusal of a claim on a file another process holds, saying what
    /// that process does. It writes its row just after taking the lock: one
    /// that took it a moment ago is given `HOLDER_WAIT` to do so.
    fn in_use(&self) -> StateRefused {
        let deadline = Instant::now() + HOLDER_WAIT;
        let holder = loop {
            if let Some(holder) = self.holder() {
                break Some(holder);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let shown = self.path.display();
        let message = match holder {
            Some((pid, doing)) => {
                format!(
                    "another fly process (pid {pid}) is already {doing} with the state file {shown}"
                )
            }
            // An older fly, or one that could not write its row.
            None => format!("another fly process is already using the state file {shown}"),
        };
        StateRefused::InUse {
            message,
            shared: false,
        }
    }

    /// The claimed file's watch (see `claim_exclusive`).
    pub(super) fn watch(&self) -> Option<Arc<FileWatch>> {
        lock(&self.exclusive).clone()
    }

    /// After a write: fails it if the claimed file is gone (see [`FileWatch`]).
    fn written(&self) -> anyhow::Result<()> {
        match self.watch() {
            Some(watch) => Ok(watch.check()?),
            None => Ok(()),
        }
    }

    /// Checks (or, for a new file and a known identity, creates) the schema,
    /// and that the file belongs to `identity` when one is given.
    fn prepare(&self, identity: Option<&BotIdentity>) -> anyhow::Result<()> {
        let mut connection = self.lock();
        connection.busy_timeout(BUSY_TIMEOUT)?;
        let (application_id, version, table_count) = read_header(&connection)?;
        let is_new = application_id == 0 && version == 0 && table_count == 0;
        if let (true, Some(identity)) = (is_new, identity) {
            create_schema(&mut connection, identity)?;
        } else if is_new {
            bail!("not a fly state file (it is empty)");
        } else if application_id != APPLICATION_ID {
            return Err(StateRefused::Foreign(
                "not a fly state file (another program's SQLite database)".into(),
            )
            .into());
        } else if version > SCHEMA_VERSION {
            bail!(
                "written by a newer fly (schema {version}, this fly knows up to {SCHEMA_VERSION})"
            );
        } else if version < 1 {
            bail!("damaged fly state file (schema version {version})");
        } else if version < SCHEMA_VERSION {
            upgrade_schema(&mut connection, version)?;
        }
        connection.pragma_update(None, "journal_mode", "WAL")?;
        tune(&connection)?;
        match identity {
            Some(identity) => check_owner(&connection, identity),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        lock(&self.connection)
    }
}

/// The file's application id, schema version and number of tables.
fn read_header(connection: &Connection) -> anyhow::Result<(i64, i64, i64)> {
    // Reading the header is the first thing that fails on a file that is not SQLite.
    let application_id: i64 = connection
        .query_row("PRAGMA application_id", [], |row| row.get(0))
        .map_err(|error| match error.sqlite_error_code() {
            // Anything else (a full disk, an I/O error) says nothing of the file.
            Some(rusqlite::ErrorCode::NotADatabase) => {
                anyhow::Error::new(error).context("not a fly state file")
            }
            _ => anyhow::Error::new(error).context("reading the file"),
        })?;
    let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let table_count: i64 =
        connection.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;
    Ok((application_id, version, table_count))
}

/// Makes a new, empty file `identity`'s state file, in WAL mode.
fn create_schema(connection: &mut Connection, identity: &BotIdentity) -> anyhow::Result<()> {
    connection
        .pragma_update(None, "journal_mode", "WAL")
        .context("switching to WAL mode")?;
    let transaction = connection.transaction()?;
    transaction.execute_batch(SCHEMA)?;
    transaction.execute_batch(DEAD_LETTERS_SCHEMA)?;
    transaction.execute_batch(SCHEMA_3)?;
    upgrade_to_schema_4(&transaction)?;
    transaction.pragma_update(None, "application_id", APPLICATION_ID)?;
    transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    for (key, value) in identity_rows(identity) {
        transaction.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
    }
    transaction.execute(
        "INSERT INTO poll_offset (id, next_offset) VALUES (1, 0)",
        [],
    )?;
    transaction.commit()?;
    Ok(())
}

/// Brings a file of schema `version` (1 or more, below this fly's) up to
/// [`SCHEMA_VERSION`], in one transaction.
fn upgrade_schema(connection: &mut Connection, version: i64) -> anyhow::Result<()> {
    let transaction = connection.transaction()?;
    if version < 3 {
        transaction.execute_batch(DEAD_LETTERS_SCHEMA)?;
        transaction.execute_batch(SCHEMA_3)?;
    }
    upgrade_to_schema_4(&transaction)?;
    transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    transaction
        .commit()
        .with_context(|| format!("upgrading from schema {version}"))?;
    Ok(())
}

/// Refuses a file that belongs to another bot than `identity`.
fn check_owner(connection: &Connection, identity: &BotIdentity) -> anyhow::Result<()> {
    let stored = |key: &str| -> rusqlite::Result<Option<String>> {
        connection
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()
    };
    let stored_url = super::without_userinfo(&stored("base_url")?.unwrap_or_default());
    let stored_fingerprint = stored("token_fingerprint")?.unwrap_or_default();
    // The fingerprint itself is not shown (an older fly's is a prefix of
    // the sha256 of the token, and so of the default webhook secret).
    let other = if stored_url != identity.base_url {
        format!("the bot at {stored_url}")
    } else if stored_fingerprint != identity.token_fingerprint
        && !identity.is_legacy_fingerprint(&stored_fingerprint)
    {
        "a bot with another token".to_string()
    } else {
        // This bot's file: what an older fly stored (credentials in the
        // URL, the undivided fingerprint) is written over once.
        for (key, value) in identity_rows(identity) {
            connection.execute(
                "UPDATE meta SET value = ?2 WHERE key = ?1 AND value != ?2",
                params![key, value],
            )?;
        }
        return Ok(());
    };
    Err(StateRefused::Foreign(format!("belongs to {other}")).into())
}

/// The `meta` rows that say which bot a file belongs to: written when the
/// file is made, and written over once in a file an older fly made for
/// this bot.
fn identity_rows(identity: &BotIdentity) -> [(&'static str, &str); 2] {
    [
        ("base_url", identity.base_url.as_str()),
        ("token_fingerprint", identity.token_fingerprint.as_str()),
    ]
}

/// What fly keeps (handled updates with their text, dead letters) is for
/// its user alone: directories it creates are 0700.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates the state file 0600 if it is missing (SQLite would create it
/// with the umask's 0644, and gives its log files the file's mode).
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}

/// Whether process `pid` exists (signal 0 sends nothing: it only checks).
fn is_running(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    // EPERM: it exists, as another user's.
    found || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether `nonce` was seen at or after `since` with another update: in the
/// log (a scan of what is not merged yet: at most `MERGE_ROWS` rows, unless
/// writes pause) or in a run that is not older than `since` (one index
/// lookup per run).
fn nonce_reused(
    connection: &Connection,
    nonce: &str,
    update_key: &str,
    since: i64,
) -> rusqlite::Result<bool> {
    connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM nonce_log \
             WHERE nonce = ?1 AND seen_at >= ?2 AND update_key <> ?3) \
         OR EXISTS (SELECT 1 FROM nonce_runs \
             WHERE run IN (SELECT run FROM nonce_run_ages WHERE newest_at >= ?2) \
             AND nonce = ?1 AND seen_at >= ?2 AND update_key <> ?3)",
        params![nonce, since, update_key],
        |row| row.get(0),
    )
}

/// What every connection to a store file is set to. No `journal_size_limit`:
/// it would cut the log file back each time the log starts over (ten times a
/// second under load), and writing into a file that was just cut short
/// stalls commits for milliseconds. The log file keeps its size instead, and
/// the checkpoint thread empties it once writes pause.
fn tune(connection: &Connection) -> rusqlite::Result<()> {
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

impl Store for SqliteStore {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn is_handled(&self, update_id: i64) -> anyhow::Result<bool> {
        let found: Option<i64> = self
            .lock()
            .query_row(
                "SELECT 1 FROM handled_updates WHERE update_id = ?1",
                [update_id],
                |row| row.get(0),
            )
            .optional()
            .context("reading handled updates")?;
        Ok(found.is_some())
    }

    fn mark_handled(&self, update_id: i64, outcome: &str) -> anyhow::Result<()> {
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO handled_updates (update_id, outcome, handled_at) \
                 VALUES (?1, ?2, ?3)",
                params![update_id, outcome, unix_now()],
            )
            .context("recording a handled update")?;
        self.written()
    }
}

impl PollState for SqliteStore {
    fn next_offset(&self) -> anyhow::Result<i64> {
        let offset = self
            .lock()
            .query_row(
                "SELECT next_offset FROM poll_offset WHERE id = 1",
                [],
                |row| row.get(0),
            )
            .context("reading the poll offset")?;
        Ok(offset)
    }

    fn advance_offset(&self, next_offset: i64) -> anyhow::Result<()> {
        let mut connection = self.lock();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        transaction.execute(
            "UPDATE poll_offset SET next_offset = max(next_offset, ?1) WHERE id = 1",
            [next_offset],
        )?;
        transaction.execute(
            "DELETE FROM handled_updates WHERE update_id < ?1",
            [next_offset.saturating_sub(HANDLED_IDS_KEPT)],
        )?;
        transaction.execute(
            "DELETE FROM handled_updates WHERE handled_at < ?1",
            [unix_now().saturating_sub(self.retention_secs)],
        )?;
        transaction.commit().context("saving the poll offset")?;
        self.written()
    }

    /// The file is locked for this process alone: a second poller is
    /// refused, standby or not (pollers on one machine share nothing a
    /// standby could take over from; a shared store has standbys).
    fn claim_polling(
        &self,
        _standby: Option<&dyn crate::Standby>,
    ) -> anyhow::Result<Option<super::PollingLease>> {
        self.claim_exclusive(Role::Polling.doing())?;
        Ok(Some(super::PollingLease::until_exit()))
    }
}

impl WebhookLedger for SqliteStore {
    fn check_nonce(
        &self,
        nonce: &str,
        update_key: &str,
        now: i64,
        window_secs: i64,
    ) -> anyhow::Result<NonceCheck> {
        let mut connection = self.lock();
        // Immediate: the write lock is taken before the read, so two
        // processes cannot both find the nonce new.
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let kept_since = now.saturating_sub(window_secs.saturating_mul(2));
        // Without a writer to merge and prune it (poll-echo's store), the
        // log is kept short here.
        transaction.execute("DELETE FROM nonce_log WHERE seen_at < ?1", [kept_since])?;
        let check = if nonce_reused(&transaction, nonce, update_key, kept_since)? {
            NonceCheck::Reused
        } else {
            transaction.execute(
                "INSERT INTO nonce_log (nonce, update_key, seen_at) VALUES (?1, ?2, ?3)",
                params![nonce, update_key, now],
            )?;
            NonceCheck::Fresh
        };
        transaction.commit().context("saving a webhook nonce")?;
        self.written()?;
        Ok(check)
    }

    fn claim_update(&self, update_id: i64, lease: Duration) -> anyhow::Result<Option<Claim>> {
        Ok(lock(&self.claims)
            .claim(update_id, "", lease)
            .map(|token| Claim { update_id, token }))
    }

    fn release_update(&self, claim: Claim) -> anyhow::Result<()> {
        lock(&self.claims).release(claim.update_id, claim.token);
        Ok(())
    }
}

impl Letters for SqliteStore {
    fn record_dead_letter(
        &self,
        update_id: Option<i64>,
        raw: &str,
        reason: &str,
    ) -> anyhow::Result<bool> {
        let inserted = self
            .lock()
            .execute(
                "INSERT OR IGNORE INTO dead_letters \
                 (update_id, reason, raw, raw_sha256, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    update_id,
                    reason,
                    raw,
                    sha256_hex(raw.as_bytes()),
                    unix_now()
                ],
            )
            .context("recording a dead letter")?;
        self.written()?;
        Ok(inserted == 1)
    }

    fn dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT update_id, reason, raw, recorded_at, parked FROM dead_letters ORDER BY id",
        )?;
        let letters = statement
            .query_map([], |row| {
                Ok(DeadLetter {
                    update_id: row.get(0)?,
                    reason: row.get(1)?,
                    raw: row.get(2)?,
                    recorded_at: row.get(3)?,
                    parked: row.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()
            .context("reading dead letters")?;
        Ok(letters)
    }

    fn parked_after(&self, after: i64, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT update_id, reason, raw, recorded_at FROM dead_letters \
             WHERE parked = 1 AND update_id > ?1 ORDER BY update_id LIMIT ?2",
        )?;
        let rows = statement.query_map(params![after, limit as i64], |row| {
            Ok(DeadLetter {
                update_id: row.get(0)?,
                reason: row.get(1)?,
                raw: row.get(2)?,
                recorded_at: row.get(3)?,
                parked: true,
            })
        })?;
        let mut letters = Vec::new();
        let mut bytes = 0;
        for letter in rows {
            let letter = letter.context("reading parked updates")?;
            bytes += letter.raw.len().max(1);
            if !letters.is_empty() && bytes > super::PARKED_PAGE_BYTES {
                break;
            }
            letters.push(letter);
        }
        Ok(letters)
    }

    fn purge_dead_letters(&self) -> anyhow::Result<usize> {
        let purged = self
            .lock()
            .execute("DELETE FROM dead_letters WHERE parked = 0", [])
            .context("purging dead letters")?;
        self.written()?;
        Ok(purged)
    }

    fn park(&self, update_id: i64, raw: &str, reason: &str) -> anyhow::Result<()> {
        let connection = self.lock();
        let updated = connection
            .execute(
                "UPDATE dead_letters SET reason = ?2, parked = 1 WHERE update_id = ?1",
                params![update_id, reason],
            )
            .context("parking an update")?;
        if updated == 0 {
            connection
                .execute(
                    "INSERT INTO dead_letters \
                     (update_id, reason, raw, raw_sha256, recorded_at, parked) \
                     VALUES (?1, ?2, ?3, ?4, ?5, 1)",
                    params![
                        update_id,
                        reason,
                        raw,
                        sha256_hex(raw.as_bytes()),
                        unix_now()
                    ],
                )
                .context("parking an update")?;
        }
        drop(connection);
        self.written()
    }

    fn unpark(&self, update_id: i64) -> anyhow::Result<bool> {
        let removed = self
            .lock()
            .execute(
                "DELETE FROM dead_letters WHERE update_id = ?1 AND parked = 1",
                [update_id],
            )
            .context("unparking an update")?;
        self.written()?;
        Ok(removed > 0)
    }

    fn forget_dead_letter(&self, update_id: i64) -> anyhow::Result<bool> {
        let removed = self
            .lock()
            .execute("DELETE FROM dead_letters WHERE update_id = ?1", [update_id])
            .context("removing a dead letter")?;
        self.written()?;
        Ok(removed > 0)
    }
}

// ---------------------------------------------------------------------------
// What the Front builds on

/// One write of a group commit. Its texts are inline: queueing a write
/// allocates nothing, and so frees nothing on the writer thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Write {
    Handled {
        update_id: i64,
        outcome: Text,
        at: i64,
    },
    Nonce {
        nonce: Text,
        update_key: Text,
        seen_at: i64,
    },
}

/// A short text (a nonce, an update key, an outcome: a few dozen bytes)
/// kept inline; a longer one is boxed.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Text {
    Inline { len: u8, bytes: [u8; TEXT_INLINE] },
    Boxed(Box<str>),
}

const TEXT_INLINE: usize = 46;

impl Text {
    pub(super) fn as_str(&self) -> &str {
        match self {
            // Copied from a str at a char boundary: always UTF-8.
            Text::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Text::Boxed(text) => text,
        }
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Text {
        if text.len() > TEXT_INLINE {
            return Text::Boxed(text.into());
        }
        let mut bytes = [0; TEXT_INLINE];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Text::Inline {
            len: text.len() as u8,
            bytes,
        }
    }
}

impl From<String> for Text {
    fn from(text: String) -> Text {
        Text::from(text.as_str())
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(formatter)
    }
}

/// Rows deleted per pruning step: a step stays a few milliseconds long.
const PRUNE_CHUNK: i64 = 2_000;

impl SqliteStore {
    /// A connection of its own, for the writer thread beside this store's
    /// own connection; it checkpoints when it chooses to, never on commit.
    fn second_connection(&self) -> anyhow::Result<Connection> {
        let connection = Connection::open(&self.path)
            .with_context(|| format!("opening the state file {}", self.path.display()))?;
        tune(&connection)?;
        connection.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(connection)
    }

    /// Leaves checkpoints to a [`BatchWriter`]: a commit on this connection
    /// never copies the log into the database file itself.
    pub(super) fn leave_checkpoints_to_the_writer(&self) -> anyhow::Result<()> {
        self.lock().pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(())
    }

    /// The highest `limit` handled ids, and whether they are all there are.
    pub(super) fn newest_handled(&self, limit: usize) -> anyhow::Result<(Vec<i64>, bool)> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT update_id FROM handled_updates ORDER BY update_id DESC LIMIT ?1")?;
        let mut ids = statement
            .query_map([limit as i64 + 1], |row| row.get(0))?
            .collect::<Result<Vec<i64>, _>>()
            .context("reading handled updates")?;
        let complete = ids.len() <= limit;
        ids.truncate(limit);
        Ok((ids, complete))
    }

    /// Whether `nonce` was seen at or after `since` with another update than `update_key`.
    pub(super) fn nonce_reused(
        &self,
        nonce: &str,
        update_key: &str,
        since: i64,
    ) -> anyhow::Result<bool> {
        nonce_reused(&self.lock(), nonce, update_key, since).context("reading webhook nonces")
    }

    /// Calls `each` with every nonce seen at or after `since`.
    pub(super) fn each_nonce_since(
        &self,
        since: i64,
        mut each: impl FnMut(&str),
    ) -> anyhow::Result<()> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT nonce FROM nonce_log WHERE seen_at >= ?1 \
             UNION ALL SELECT nonce FROM nonce_runs \
             WHERE run IN (SELECT run FROM nonce_run_ages WHERE newest_at >= ?1) AND seen_at >= ?1",
        )?;
        let mut rows = statement.query([since])?;
        while let Some(row) = rows.next().context("reading webhook nonces")? {
            each(row.get_ref(0)?.as_str()?);
        }
        Ok(())
    }

    /// The group-commit side of this store: a [`BatchWriter`] on its own
    /// connection, committing batches of [`Write`]s and, between batches,
    /// merging the nonce log into runs, checkpointing every
    /// `checkpoint_every`, and pruning handled ids past the retention and
    /// nonces older than `nonce_keep_secs`.
    pub(super) fn batch_writer(
        &self,
        nonce_keep_secs: i64,
        checkpoint_every: Duration,
    ) -> anyhow::Result<BatchWriter> {
        // Prune often enough that nothing outlives its keep time by more
        // than a quarter of it (a short --retention in tests), at most a minute.
        let shortest = self.retention_secs.min(nonce_keep_secs).max(0) as u64;
        let prune_every = Duration::from_millis(shortest.saturating_mul(250))
            .clamp(Duration::from_millis(100), Duration::from_secs(60));
        let connection = self.second_connection()?;
        let (logged, oldest_logged): (i64, Option<i64>) = connection
            .query_row("SELECT count(*), min(seen_at) FROM nonce_log", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .context("reading the nonce log")?;
        let now = Instant::now();
        Ok(BatchWriter {
            connection,
            watch: self.watch(),
            retention_secs: self.retention_secs,
            nonce_keep_secs,
            prune_every,
            next_prune: now,
            checkpoint_every,
            next_checkpoint: now + checkpoint_every,
            committed_since_checkpoint: false,
            wal_is_empty: false,
            logged: logged as usize,
            oldest_logged,
            merge_after: None,
        })
    }
}

/// Commits batches of writes on a connection of its own (group commit's
/// sink), and keeps the file in shape between batches: nonces logged then
/// merged into runs, checkpoints between batches (why: ARCHITECTURE.md,
/// "The SQLite writer").
pub(super) struct BatchWriter {
    connection: Connection,
    /// The claimed file, checked after each batch (see [`FileWatch`]).
    watch: Option<Arc<FileWatch>>,
    retention_secs: i64,
    nonce_keep_secs: i64,
    prune_every: Duration,
    next_prune: Instant,
    checkpoint_every: Duration,
    next_checkpoint: Instant,
    committed_since_checkpoint: bool,
    wal_is_empty: bool,
    /// Rows in `nonce_log`, and the oldest one's time.
    logged: usize,
    oldest_logged: Option<i64>,
    /// A merge that failed (a full disk) is tried again after this.
    merge_after: Option<Instant>,
}

/// Nonces logged before they are merged into a run: the log a lookup scans
/// stays under a millisecond, and a merge (sorting them into a run) takes a
/// few.
const MERGE_ROWS: usize = 16_384;
/// How long after a failed merge (a full disk) the next one is tried.
const MERGE_RETRY: Duration = Duration::from_secs(1);

impl BatchWriter {
    /// Sorts the nonce log into a new run and empties it.
    fn merge_nonce_log(&mut self) -> anyhow::Result<()> {
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let run: i64 = transaction.query_row(
            "SELECT coalesce(max(run), 0) + 1 FROM nonce_run_ages",
            [],
            |row| row.get(0),
        )?;
        // One row per nonce (a redelivery may have logged it twice): the latest.
        transaction.execute(
            "INSERT INTO nonce_runs (run, nonce, update_key, seen_at) \
             SELECT ?1, nonce, update_key, max(seen_at) FROM nonce_log \
             GROUP BY nonce ORDER BY nonce",
            [run],
        )?;
        transaction.execute(
            "INSERT INTO nonce_run_ages (run, newest_at) SELECT ?1, max(seen_at) FROM nonce_log",
            [run],
        )?;
        transaction.execute("DELETE FROM nonce_log", [])?;
        transaction.commit()?;
        self.logged = 0;
        self.oldest_logged = None;
        self.committed_since_checkpoint = true;
        Ok(())
    }

    /// Whether the nonce log is due to be merged: full, or holding a nonce
    /// for half its keep time (so runs expire about when their nonces do).
    fn merge_due(&self) -> bool {
        if self.merge_after.is_some_and(|after| Instant::now() < after) {
            return false;
        }
        self.logged >= MERGE_ROWS
            || self
                .oldest_logged
                .is_some_and(|oldest| unix_now() - oldest >= self.nonce_keep_secs / 2)
    }

    /// Deletes at most `PRUNE_CHUNK` expired rows of each kind; returns how many went.
    fn prune_step(&mut self) -> anyhow::Result<usize> {
        let now = unix_now();
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let handled = transaction.execute(
            "DELETE FROM handled_updates WHERE update_id IN \
             (SELECT update_id FROM handled_updates WHERE handled_at < ?1 LIMIT ?2)",
            params![now.saturating_sub(self.retention_secs), PRUNE_CHUNK],
        )?;
        // A run goes once its newest nonce is past the keep time, from its
        // first rows on (contiguous pages), its age row last.
        let expired: Option<i64> = transaction
            .query_row(
                "SELECT run FROM nonce_run_ages WHERE newest_at < ?1 ORDER BY run LIMIT 1",
                [now.saturating_sub(self.nonce_keep_secs)],
                |row| row.get(0),
            )
            .optional()?;
        let mut nonces = 0;
        if let Some(run) = expired {
            nonces = transaction.execute(
                "DELETE FROM nonce_runs WHERE run = ?1 AND nonce IN \
                 (SELECT nonce FROM nonce_runs WHERE run = ?1 LIMIT ?2)",
                params![run, PRUNE_CHUNK],
            )?;
            if (nonces as i64) < PRUNE_CHUNK {
                transaction.execute("DELETE FROM nonce_run_ages WHERE run = ?1", [run])?;
                nonces += 1;
            }
        }
        transaction.commit()?;
        if handled + nonces > 0 {
            self.committed_since_checkpoint = true;
        }
        Ok(handled + nonces)
    }

    /// Copies the write-ahead log into the database file; empties the log
    /// file when nothing was committed since the last time (writes paused).
    fn checkpoint(&mut self) {
        let idle = !self.committed_since_checkpoint;
        if idle && self.wal_is_empty {
            return;
        }
        let mode = if idle { "TRUNCATE" } else { "PASSIVE" };
        let result = self.connection.query_row(
            &format!("PRAGMA wal_checkpoint({mode})"),
            [],
            // (blocked, frames in the log, frames copied)
            |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            },
        );
        match result {
            Ok((0, frames, _)) => {
                self.committed_since_checkpoint = false;
                self.wal_is_empty = idle || frames <= 0;
            }
            Ok(_) => tracing::debug!("checkpoint blocked by a reader; tried again later"),
            Err(error) => tracing::debug!("checkpoint skipped: {error}"),
        }
    }
}

impl BatchWriter {
    /// One batch, one transaction; then the file is checked (see [`FileWatch`]).
    fn commit_batch(&mut self, writes: &[Write]) -> anyhow::Result<()> {
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut logged = 0;
        let mut oldest = None;
        {
            let mut handled = transaction.prepare_cached(
                "INSERT OR REPLACE INTO handled_updates (update_id, outcome, handled_at) \
                 VALUES (?1, ?2, ?3)",
            )?;
            let mut nonces = transaction.prepare_cached(
                "INSERT INTO nonce_log (nonce, update_key, seen_at) VALUES (?1, ?2, ?3)",
            )?;
            for write in writes {
                match write {
                    Write::Handled {
                        update_id,
                        outcome,
                        at,
                    } => handled.execute(params![update_id, outcome.as_str(), at])?,
                    Write::Nonce {
                        nonce,
                        update_key,
                        seen_at,
                    } => {
                        logged += 1;
                        oldest = Some(oldest.map_or(*seen_at, |known: i64| known.min(*seen_at)));
                        nonces.execute(params![nonce.as_str(), update_key.as_str(), seen_at])?
                    }
                };
            }
        }
        transaction.commit()?;
        // Committed into a file that is gone is not written.
        if let Some(watch) = &self.watch {
            watch.check()?;
        }
        self.logged += logged;
        if let Some(oldest) = oldest {
            self.oldest_logged = Some(self.oldest_logged.map_or(oldest, |known| known.min(oldest)));
        }
        self.committed_since_checkpoint = true;
        self.wal_is_empty = false;
        Ok(())
    }
}

impl Sink<Write> for BatchWriter {
    /// SQLite's error as one phrase ("database or disk is full"), not
    /// followed by its code's text, which says the same again.
    fn commit(&mut self, writes: &[Write]) -> anyhow::Result<()> {
        self.commit_batch(writes)
            .map_err(|error| match error.downcast::<rusqlite::Error>() {
                Ok(sqlite) => anyhow::anyhow!("{sqlite}"),
                Err(other) => other,
            })
    }

    fn maintain(&mut self) -> Instant {
        let now = Instant::now();
        // Noticed while idle too, not only at the next batch.
        if let Some(watch) = &self.watch
            && watch.check().is_err()
        {
            return now + self.checkpoint_every;
        }
        if self.merge_due() {
            match self.merge_nonce_log() {
                Ok(()) => self.merge_after = None,
                Err(error) => {
                    tracing::warn!("merging webhook nonces failed (tried again later): {error:#}");
                    self.merge_after = Some(now + MERGE_RETRY);
                }
            }
        }
        if now >= self.next_checkpoint {
            self.checkpoint();
            self.next_checkpoint = now + self.checkpoint_every;
        }
        if now >= self.next_prune {
            self.next_prune = match self.prune_step() {
                // More to go: again after the next batch, not before it.
                Ok(deleted) if deleted as i64 >= PRUNE_CHUNK => now + Duration::from_millis(5),
                Ok(_) => now + self.prune_every,
                Err(error) => {
                    tracing::warn!("pruning the state store failed (tried again later): {error:#}");
                    now + self.prune_every
                }
            };
        }
        // A full log is merged after the next batch, not a checkpoint later.
        let next = self.next_prune.min(self.next_checkpoint);
        if self.merge_due() {
            next.min(now + Duration::from_millis(1))
        } else {
            next
        }
    }

    fn finish(&mut self) {
        self.committed_since_checkpoint = false;
        self.checkpoint();
    }

    /// "3 handled ids and 5 nonces".
    fn describe(&self, writes: &[Write]) -> String {
        let handled = writes
            .iter()
            .filter(|write| matches!(write, Write::Handled { .. }))
            .count();
        let nonces = writes.len() - handled;
        let plural = |count: usize, one: &str, many: &str| {
            format!("{count} {}", if count == 1 { one } else { many })
        };
        format!(
            "{} and {}",
            plural(handled, "handled id", "handled ids"),
            plural(nonces, "nonce", "nonces")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_and_handled_ids_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/state.db");
        {
            let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap();
            assert_eq!(store.next_offset().unwrap(), 0);
            store.mark_handled(7, "replied").unwrap();
            store.advance_offset(8).unwrap();
            store.advance_offset(3).unwrap(); // never backwards
        }
        let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap();
        assert_eq!(store.next_offset().unwrap(), 8);
        assert!(store.is_handled(7).unwrap());
        assert!(!store.is_handled(8).unwrap());
    }

    #[test]
    fn handled_ids_far_below_the_offset_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("s.db"), &BotIdentity::for_tests("t1")).unwrap();
        store.mark_handled(1, "replied").unwrap();
        store.mark_handled(HANDLED_IDS_KEPT + 5, "replied").unwrap();
        store.advance_offset(HANDLED_IDS_KEPT + 6).unwrap();
        assert!(!store.is_handled(1).unwrap());
        assert!(store.is_handled(HANDLED_IDS_KEPT + 5).unwrap());
    }

    #[test]
    fn only_a_regular_file_can_be_a_store() {
        let dir = tempfile::tempdir().unwrap();
        for path in [dir.path(), Path::new("/dev/null")] {
            let error = SqliteStore::open(path, &BotIdentity::for_tests("t1"))
                .err()
                .unwrap();
            assert!(
                matches!(
                    error.downcast_ref::<StateRefused>(),
                    Some(StateRefused::Unusable(_))
                ),
                "{error:#}"
            );
            assert!(format!("{error:#}").contains("not a regular file"));
        }
        assert!(!Path::new("/dev/null-journal").exists());
    }

    #[test]
    fn another_bots_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap());
        let error = SqliteStore::open(&path, &BotIdentity::for_tests("t2"))
            .err()
            .unwrap();
        let message = format!("{error:#}");
        assert!(message.contains("a bot with another token"), "{message}");
        assert!(!message.contains("t2"), "{message}");
        // Nor any part of the token's sha256 (the default webhook secret).
        for token in ["t1", "t2"] {
            let prefix = &sha256_hex(token.as_bytes())[..8];
            assert!(!message.contains(prefix), "{message}");
        }
    }

    /// A file an older fly wrote (the URL's credentials and the undivided
    /// fingerprint stored) is this bot's still, and is rewritten without them.
    #[test]
    fn an_older_flys_file_is_recognised_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap());
        let meta = |connection: &Connection, key: &str| -> String {
            connection
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
                    row.get(0)
                })
                .unwrap()
        };
        {
            let connection = Connection::open(&path).unwrap();
            connection
                .execute_batch(&format!(
                    "UPDATE meta SET value = 'http://user:PASS@127.0.0.1:8787' WHERE key = 'base_url';
                     UPDATE meta SET value = '{}' WHERE key = 'token_fingerprint';",
                    &sha256_hex(b"t1")[..16]
                ))
                .unwrap();
        }
        let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap();
        store.mark_handled(1, "replied").unwrap();
        drop(store);
        let connection = Connection::open(&path).unwrap();
        assert_eq!(meta(&connection, "base_url"), "http://127.0.0.1:8787");
        assert_eq!(
            meta(&connection, "token_fingerprint"),
            BotIdentity::for_tests("t1").token_fingerprint
        );
        assert!(SqliteStore::open(&path, &BotIdentity::for_tests("t2")).is_err());
    }

    #[test]
    fn new_state_directories_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/dir/s.db");
        let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap();
        store.mark_handled(1, "replied").unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("new")), 0o700);
        assert_eq!(mode(&dir.path().join("new/dir")), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("new/dir/s.db-wal")), 0o600);
    }

    #[test]
    fn garbage_and_foreign_databases_are_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.db");
        std::fs::write(
            &garbage,
            b"this is not a database, it is a shopping list\n".repeat(100),
        )
        .unwrap();
        let error = SqliteStore::open(&garbage, &BotIdentity::for_tests("t1"))
            .err()
            .unwrap();
        assert!(
            format!("{error:#}").contains("not a fly state file"),
            "{error:#}"
        );
        assert!(
            std::fs::read(&garbage)
                .unwrap()
                .starts_with(b"this is not a database")
        );

        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let error = SqliteStore::open(&foreign, &BotIdentity::for_tests("t1"))
            .err()
            .unwrap();
        assert!(
            format!("{error:#}").contains("another program"),
            "{error:#}"
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let error = SqliteStore::open(&path, &BotIdentity::for_tests("t1"))
            .err()
            .unwrap();
        assert!(format!("{error:#}").contains("newer fly"), "{error:#}");
    }

    #[test]
    fn nonces_are_refused_with_another_update_inside_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("s.db"), &BotIdentity::for_tests("t1")).unwrap();
        assert_eq!(
            store.check_nonce("n1", "7", 1000, 300).unwrap(),
            NonceCheck::Fresh
        );
        assert_eq!(
            store.check_nonce("n1", "7", 1010, 300).unwrap(),
            NonceCheck::Fresh
        );
        assert_eq!(
            store.check_nonce("n1", "8", 1020, 300).unwrap(),
            NonceCheck::Reused
        );
        // Long after, the nonce has been pruned and may come back.
        assert_eq!(
            store.check_nonce("n1", "9", 1700, 300).unwrap(),
            NonceCheck::Fresh
        );
    }

    #[test]
    fn dead_letters_are_kept_once_with_their_bytes_and_purged() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("s.db"), &BotIdentity::for_tests("t1")).unwrap();
        assert!(
            store
                .record_dead_letter(None, "[1]", "not an object")
                .unwrap()
        );
        assert!(
            !store
                .record_dead_letter(None, "[1]", "not an object")
                .unwrap()
        );
        assert!(
            store
                .record_dead_letter(Some(4), "{\"update_id\":4}", "no chat")
                .unwrap()
        );
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 2);
        assert_eq!(
            (letters[0].update_id, letters[0].raw.as_str()),
            (None, "[1]")
        );
        assert_eq!(
            (letters[1].update_id, letters[1].reason.as_str()),
            (Some(4), "no chat")
        );
        assert_eq!(store.purge_dead_letters().unwrap(), 2);
        assert!(store.dead_letters().unwrap().is_empty());
    }

    #[test]
    fn parked_updates_are_read_back_by_id_a_bounded_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("s.db"), &BotIdentity::for_tests("t1")).unwrap();
        crate::check_parked_pages(&store);
    }

    #[test]
    fn a_schema_1_file_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap();
            store.advance_offset(9).unwrap();
        }
        {
            let connection = Connection::open(&path).unwrap();
            // What schema 1 had: no dead letters, no age index, nonces keyed by nonce.
            connection
                .execute_batch(
                    "DROP TABLE dead_letters; DROP INDEX handled_updates_by_age; \
                     DROP TABLE nonce_log; DROP TABLE nonce_runs; DROP TABLE nonce_run_ages; \
                     CREATE TABLE seen_nonces (nonce TEXT PRIMARY KEY, update_key TEXT NOT NULL, \
                         seen_at INTEGER NOT NULL); \
                     CREATE INDEX seen_nonces_by_age ON seen_nonces (seen_at);",
                )
                .unwrap();
            connection.pragma_update(None, "user_version", 1).unwrap();
        }
        let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap();
        assert_eq!(store.next_offset().unwrap(), 9);
        assert!(store.record_dead_letter(Some(1), "{}", "why").unwrap());
        let indexed: i64 = store
            .lock()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'handled_updates_by_age'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(indexed, 1, "schema 3 prunes handled ids by age");
    }

    #[test]
    fn pollers_prune_handled_ids_older_than_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1"))
            .unwrap()
            .with_retention(Duration::from_secs(3600));
        store.mark_handled(1, "replied").unwrap();
        store.mark_handled(2, "replied").unwrap();
        // Handled two hours ago, by the clock of the rows.
        let old = unix_now() - 7200;
        store
            .lock()
            .execute(
                "UPDATE handled_updates SET handled_at = ?1 WHERE update_id = 1",
                [old],
            )
            .unwrap();
        store.advance_offset(3).unwrap();
        assert!(!store.is_handled(1).unwrap());
        assert!(store.is_handled(2).unwrap());
    }

    #[test]
    fn the_batch_writer_commits_batches_and_prunes_what_expired() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db"), &BotIdentity::for_tests("t1"))
            .unwrap()
            .with_retention(Duration::from_secs(60));
        let mut writer = store.batch_writer(600, Duration::from_secs(1)).unwrap();
        let now = unix_now();
        let nonce = |nonce: &str, key: &str, seen_at: i64| Write::Nonce {
            nonce: nonce.into(),
            update_key: key.into(),
            seen_at,
        };
        let handled = |update_id: i64, at: i64| Write::Handled {
            update_id,
            outcome: "replied".into(),
            at,
        };
        writer
            .commit(&[handled(1, now - 120), nonce("old", "1", now - 601)])
            .unwrap();
        writer.merge_nonce_log().unwrap(); // run 1: expired
        writer
            .commit(&[handled(2, now), nonce("new", "2", now)])
            .unwrap();
        assert!(store.is_handled(1).unwrap() && store.is_handled(2).unwrap());
        // Seen in the log (not merged yet) by the store's own connection.
        assert!(store.nonce_reused("new", "3", now - 600).unwrap());
        assert!(!store.nonce_reused("new", "2", now - 600).unwrap());
        writer.merge_nonce_log().unwrap(); // run 2
        assert!(
            store.nonce_reused("new", "3", now - 600).unwrap(),
            "and in a run"
        );
        assert!(store.nonce_reused("old", "3", now - 700).unwrap());
        assert!(
            !store.nonce_reused("old", "3", now - 600).unwrap(),
            "too old"
        );

        writer.maintain();
        assert!(!store.is_handled(1).unwrap(), "past the retention");
        assert!(store.is_handled(2).unwrap());
        let mut left = Vec::new();
        store
            .each_nonce_since(0, |nonce| left.push(nonce.to_string()))
            .unwrap();
        assert_eq!(left, ["new"], "the expired run is gone");

        // A batch is all or nothing.
        store.lock().execute_batch("DROP TABLE nonce_log").unwrap();
        assert!(
            writer
                .commit(&[handled(3, now), nonce("x", "3", now)])
                .is_err()
        );
        assert!(!store.is_handled(3).unwrap());
    }

    #[test]
    fn a_full_nonce_log_is_merged_into_a_sorted_run_between_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("s.db"), &BotIdentity::for_tests("t1")).unwrap();
        let mut writer = store.batch_writer(600, Duration::from_secs(1)).unwrap();
        let now = unix_now();
        let writes: Vec<Write> = (0..MERGE_ROWS as i64)
            .map(|n| Write::Nonce {
                nonce: format!("{:016x}", (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).into(),
                update_key: n.to_string().into(),
                seen_at: now,
            })
            .collect();
        writer.commit(&writes).unwrap();
        writer.maintain();
        let count = |table: &str| -> i64 {
            store
                .lock()
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                    row.get(0)
                })
                .unwrap()
        };
        assert_eq!(count("nonce_log"), 0);
        assert_eq!(count("nonce_runs"), MERGE_ROWS as i64);
        let probe = format!("{:016x}", 7u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        assert!(store.nonce_reused(&probe, "8", now - 1).unwrap());
        assert!(!store.nonce_reused(&probe, "7", now - 1).unwrap());
        // One index lookup per run, not a scan of the runs.
        let plan: Vec<String> = store
            .lock()
            .prepare(
                "EXPLAIN QUERY PLAN SELECT 1 FROM nonce_runs WHERE run IN \
                 (SELECT run FROM nonce_run_ages WHERE newest_at >= 0) AND nonce = 'x'",
            )
            .unwrap()
            .query_map([], |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("PRIMARY KEY (run=? AND nonce=?)")),
            "{plan:?}"
        );
    }

    #[test]
    fn schema_2_nonces_move_to_the_log_and_are_still_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap());
        let now = unix_now();
        {
            // Back to schema 2, with a nonce as schema 2 kept it.
            let connection = Connection::open(&path).unwrap();
            connection
                .execute_batch(
                    "DROP TABLE nonce_log; DROP TABLE nonce_runs; DROP TABLE nonce_run_ages; \
                     DROP INDEX handled_updates_by_age; \
                     CREATE TABLE seen_nonces (nonce TEXT PRIMARY KEY, update_key TEXT NOT NULL, \
                         seen_at INTEGER NOT NULL); \
                     CREATE INDEX seen_nonces_by_age ON seen_nonces (seen_at);",
                )
                .unwrap();
            connection
                .execute("INSERT INTO seen_nonces VALUES ('n1', '7', ?1)", [now])
                .unwrap();
            connection.pragma_update(None, "user_version", 2).unwrap();
        }
        let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap();
        assert_eq!(
            store.check_nonce("n1", "8", now, 300).unwrap(),
            NonceCheck::Reused
        );
        assert_eq!(
            store.check_nonce("n1", "7", now, 300).unwrap(),
            NonceCheck::Fresh
        );
    }

    #[test]
    fn a_refused_claim_says_what_the_holder_does_not_what_it_wanted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let identity = BotIdentity::for_tests("t1");
        let holder = SqliteStore::open(&path, &identity).unwrap();
        holder.claim_exclusive("serving webhooks").unwrap();
        let second = SqliteStore::open(&path, &identity).unwrap();
        let refused = |store: &SqliteStore| match store.claim_exclusive("polling") {
            Err(error) => match error.downcast_ref::<StateRefused>() {
                Some(StateRefused::InUse {
                    message,
                    shared: false,
                }) => message.clone(),
                _ => panic!("{error:#}"),
            },
            Ok(()) => panic!("claimed twice"),
        };
        assert_eq!(
            refused(&second),
            format!(
                "another fly process (pid {}) is already serving webhooks with the state \
                 file {}",
                std::process::id(),
                path.display()
            )
        );
        // A row left by a process that is gone says nothing of the holder.
        second
            .lock()
            .execute(
                "UPDATE meta SET value = '{\"pid\":2147483647,\"doing\":\"polling\"}' \
                 WHERE key = 'holder'",
                [],
            )
            .unwrap();
        assert_eq!(
            refused(&second),
            format!(
                "another fly process is already using the state file {}",
                path.display()
            )
        );
    }

    #[test]
    fn a_claimed_file_deleted_or_replaced_fails_every_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap();
        store.claim_exclusive("polling").unwrap();
        store.mark_handled(1, "replied").unwrap();
        std::fs::remove_file(&path).unwrap();
        let error = store.mark_handled(2, "replied").unwrap_err();
        assert!(super::super::is_gone(&error), "{error:#}");
        assert!(
            format!("{error:#}").contains(&format!(
                "the state file {} was deleted (or moved) while fly ran",
                path.display()
            )),
            "{error:#}"
        );
        // Once and for all, whatever the next write.
        assert!(super::super::is_gone(&store.advance_offset(3).unwrap_err()));

        // Another file put in its place.
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap();
        store.claim_exclusive("polling").unwrap();
        std::fs::copy(&path, dir.path().join("copy.db")).unwrap();
        std::fs::rename(dir.path().join("copy.db"), &path).unwrap();
        let error = store.mark_handled(1, "replied").unwrap_err();
        assert!(super::super::is_gone(&error), "{error:#}");

        // A store not claimed (fly dead-letters) watches nothing.
        let path = dir.path().join("u.db");
        let store = SqliteStore::open(&path, &BotIdentity::for_tests("t1")).unwrap();
        std::fs::remove_file(&path).unwrap();
        store.mark_handled(1, "replied").unwrap();
    }

    #[test]
    fn the_newest_handled_ids_say_whether_they_are_all() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("s.db"), &BotIdentity::for_tests("t1")).unwrap();
        for id in [5, 1, 9, 7] {
            store.mark_handled(id, "replied").unwrap();
        }
        assert_eq!(store.newest_handled(2).unwrap(), (vec![9, 7], false));
        assert_eq!(store.newest_handled(4).unwrap(), (vec![9, 7, 5, 1], true));
    }
}
