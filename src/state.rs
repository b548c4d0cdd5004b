//! The embedded state store: one SQLite file per bot (WAL mode) holding the
//! poll offset, the ids of handled updates, the webhook nonces seen and the
//! dead letters (updates that can never be handled, kept with their bytes).
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

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension, params};

use crate::api::Token;
use crate::signature::sha256_hex;

/// "FLY1" in ASCII: marks a SQLite file as a fly state store.
const APPLICATION_ID: i64 = 0x464C_5931;
const SCHEMA_VERSION: i64 = 2;
/// Handled update ids kept below the current offset; older ones can never be
/// delivered again (the platform only returns ids at or above the offset).
const HANDLED_IDS_KEPT: i64 = 10_000;

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

/// An update that could not be handled at all, as `fly dead-letters` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub update_id: Option<i64>,
    pub reason: String,
    /// The update exactly as received.
    pub raw: String,
    pub recorded_at: i64,
}

/// Which bot a state file belongs to: the base URL and a fingerprint of the
/// token (a prefix of its sha256, never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotIdentity {
    pub base_url: String,
    pub token_fingerprint: String,
}

impl BotIdentity {
    pub fn new(base_url: &str, token: &Token) -> BotIdentity {
        BotIdentity {
            base_url: base_url.trim().trim_end_matches('/').to_string(),
            token_fingerprint: sha256_hex(token.expose().as_bytes())[..16].to_string(),
        }
    }

    /// A short stable key for file names.
    pub fn key(&self) -> String {
        let joined = format!("{}\n{}", self.base_url, self.token_fingerprint);
        sha256_hex(joined.as_bytes())[..16].to_string()
    }

    /// `$XDG_STATE_HOME/fly/bot-<key>.db`, else `~/.local/state/fly/bot-<key>.db`.
    pub fn default_state_path(&self) -> anyhow::Result<PathBuf> {
        let base = match std::env::var_os("XDG_STATE_HOME").filter(|dir| !dir.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => match std::env::var_os("HOME").filter(|dir| !dir.is_empty()) {
                Some(home) => PathBuf::from(home).join(".local/state"),
                None => {
                    bail!("no state directory: set HOME or XDG_STATE_HOME, or pass --state PATH")
                }
            },
        };
        Ok(base.join("fly").join(format!("bot-{}.db", self.key())))
    }
}

/// The open store. Methods take `&self` (the connection is behind a mutex) so
/// concurrent workers can share one store.
pub struct StateStore {
    connection: Mutex<Connection>,
    path: PathBuf,
    /// Held while this process polls with the store (see `claim_polling`);
    /// declared after the connection so it is closed after it.
    polling_lock: Mutex<Option<std::fs::File>>,
}

impl StateStore {
    /// Opens (or creates) the store at `path` for `identity`.
    pub fn open(path: &Path, identity: &BotIdentity) -> anyhow::Result<StateStore> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the state directory {}", dir.display()))?;
        }
        StateStore::open_file(path, Some(identity))
    }

    /// Opens an existing store whatever bot it belongs to, for commands that
    /// only inspect it (`fly dead-letters --state PATH`, which needs no token).
    pub fn open_existing(path: &Path) -> anyhow::Result<StateStore> {
        if !path.exists() {
            return Err(crate::exit::usage(format!(
                "no state file at {}",
                path.display()
            )));
        }
        StateStore::open_file(path, None)
    }

    fn open_file(path: &Path, identity: Option<&BotIdentity>) -> anyhow::Result<StateStore> {
        let shown = path.display();
        // SQLite would open a device or a FIFO, fail, and leave its journal
        // next to it (in /dev, for `--state /dev/null`).
        if let Ok(found) = std::fs::metadata(path)
            && !found.is_file()
        {
            return Err(crate::exit::usage(format!(
                "state file {shown} is not a regular file"
            )));
        }
        let connection =
            Connection::open(path).with_context(|| format!("opening the state file {shown}"))?;
        let store = StateStore {
            connection: Mutex::new(connection),
            path: path.to_path_buf(),
            polling_lock: Mutex::new(None),
        };
        store
            .prepare(identity)
            .with_context(|| format!("state file {shown}"))?;
        Ok(store)
    }

    /// Opens the store at `explicit` (`--state`), else at the identity's
    /// default path: what every long-running command does.
    pub fn open_for(
        identity: &BotIdentity,
        explicit: Option<PathBuf>,
    ) -> anyhow::Result<StateStore> {
        let path = match explicit {
            Some(path) => path,
            None => identity.default_state_path()?,
        };
        StateStore::open(&path, identity)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Claims the store for polling, until this process exits: two pollers
    /// on one state file would confirm each other's offsets and answer the
    /// same updates. (Webhook receivers may share a store: they only record
    /// handled ids and nonces.) An advisory flock on its own descriptor of
    /// the file, which is kept open: SQLite's own locks are fcntl locks,
    /// which flock does not touch.
    pub fn claim_polling(&self) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&self.path)
            .with_context(|| format!("opening the state file {}", self.path.display()))?;
        // SAFETY: flock only reads its integer arguments; the descriptor is
        // valid while `file` lives.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "another fly process is already polling with the state file {}; \
                 stop it first, or pass another --state PATH",
                self.path.display()
            );
        }
        *crate::sync::lock(&self.polling_lock) = Some(file);
        Ok(())
    }

    /// Checks (or, for a new file and a known identity, creates) the schema,
    /// and that the file belongs to `identity` when one is given.
    fn prepare(&self, identity: Option<&BotIdentity>) -> anyhow::Result<()> {
        let mut connection = self.lock();
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        // Reading the header is the first thing that fails on a file that is not SQLite.
        let application_id: i64 = connection
            .query_row("PRAGMA application_id", [], |row| row.get(0))
            .map_err(|error| anyhow::anyhow!("not a fly state file ({error})"))?;
        let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        let table_count: i64 =
            connection.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;

        let is_new = application_id == 0 && version == 0 && table_count == 0;
        if let (true, Some(identity)) = (is_new, identity) {
            connection
                .pragma_update(None, "journal_mode", "WAL")
                .context("switching to WAL mode")?;
            let transaction = connection.transaction()?;
            transaction.execute_batch(SCHEMA)?;
            transaction.execute_batch(DEAD_LETTERS_SCHEMA)?;
            transaction.pragma_update(None, "application_id", APPLICATION_ID)?;
            transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            for (key, value) in [
                ("base_url", identity.base_url.as_str()),
                ("token_fingerprint", identity.token_fingerprint.as_str()),
            ] {
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
        } else if is_new {
            bail!("not a fly state file (it is empty)");
        } else if application_id != APPLICATION_ID {
            bail!(
                "not a fly state file (another program's SQLite database); pass another --state PATH"
            );
        } else if version > SCHEMA_VERSION {
            bail!(
                "written by a newer fly (schema {version}, this fly knows up to {SCHEMA_VERSION})"
            );
        } else if version < 1 {
            bail!("damaged fly state file (schema version {version})");
        } else if version < SCHEMA_VERSION {
            let transaction = connection.transaction()?;
            transaction.execute_batch(DEAD_LETTERS_SCHEMA)?;
            transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            transaction
                .commit()
                .with_context(|| format!("upgrading from schema {version}"))?;
        }
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        let Some(identity) = identity else {
            return Ok(());
        };

        let stored = |key: &str| -> rusqlite::Result<Option<String>> {
            connection
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
                    row.get(0)
                })
                .optional()
        };
        let stored_url = stored("base_url")?.unwrap_or_default();
        let stored_fingerprint = stored("token_fingerprint")?.unwrap_or_default();
        // The fingerprint itself is not shown: it is a prefix of the sha256
        // of the token, and so of the default webhook secret.
        let other = if stored_url != identity.base_url {
            format!("the bot at {stored_url}")
        } else if stored_fingerprint != identity.token_fingerprint {
            "a bot with another token".to_string()
        } else {
            return Ok(());
        };
        bail!("belongs to {other}; pass another --state PATH")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        crate::sync::lock(&self.connection)
    }

    /// The offset to poll with: every update below it has been handled.
    pub fn next_offset(&self) -> anyhow::Result<i64> {
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

    /// Moves the offset forward (never back) and prunes handled ids far below it.
    pub fn advance_offset(&self, next_offset: i64) -> anyhow::Result<()> {
        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        transaction.execute(
            "UPDATE poll_offset SET next_offset = max(next_offset, ?1) WHERE id = 1",
            [next_offset],
        )?;
        transaction.execute(
            "DELETE FROM handled_updates WHERE update_id < ?1",
            [next_offset.saturating_sub(HANDLED_IDS_KEPT)],
        )?;
        transaction.commit().context("saving the poll offset")?;
        Ok(())
    }

    pub fn is_handled(&self, update_id: i64) -> anyhow::Result<bool> {
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

    /// Records that `update_id` needs no more work (`outcome` says how it ended).
    pub fn mark_handled(&self, update_id: i64, outcome: &str) -> anyhow::Result<()> {
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO handled_updates (update_id, outcome, handled_at) \
                 VALUES (?1, ?2, ?3)",
                params![update_id, outcome, unix_now()],
            )
            .context("recording a handled update")?;
        Ok(())
    }
}

impl StateStore {
    /// Records an update that can never be handled, with its bytes and why.
    /// Returns whether it is new (an update recorded before is not again).
    pub fn record_dead_letter(
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
        Ok(inserted == 1)
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT update_id, reason, raw, recorded_at FROM dead_letters ORDER BY id")?;
        let letters = statement
            .query_map([], |row| {
                Ok(DeadLetter {
                    update_id: row.get(0)?,
                    reason: row.get(1)?,
                    raw: row.get(2)?,
                    recorded_at: row.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()
            .context("reading dead letters")?;
        Ok(letters)
    }

    /// Forgets every dead letter; returns how many there were.
    pub fn purge_dead_letters(&self) -> anyhow::Result<usize> {
        self.lock()
            .execute("DELETE FROM dead_letters", [])
            .context("purging dead letters")
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

impl StateStore {
    /// Checks `nonce` against the ones seen in the last `window_secs` and
    /// remembers it for `update_key`; nonces older than twice the window
    /// (the replay window reaches that far either side of now) are pruned.
    pub fn check_nonce(
        &self,
        nonce: &str,
        update_key: &str,
        now: i64,
        window_secs: i64,
    ) -> anyhow::Result<NonceCheck> {
        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        let oldest_kept = now.saturating_sub(window_secs.saturating_mul(2));
        transaction.execute("DELETE FROM seen_nonces WHERE seen_at < ?1", [oldest_kept])?;
        let seen: Option<String> = transaction
            .query_row(
                "SELECT update_key FROM seen_nonces WHERE nonce = ?1",
                [nonce],
                |row| row.get(0),
            )
            .optional()?;
        let check = match seen {
            Some(key) if key != update_key => NonceCheck::Reused,
            _ => {
                transaction.execute(
                    "INSERT OR REPLACE INTO seen_nonces (nonce, update_key, seen_at) VALUES (?1, ?2, ?3)",
                    params![nonce, update_key, now],
                )?;
                NonceCheck::Fresh
            }
        };
        transaction.commit().context("saving a webhook nonce")?;
        Ok(check)
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(token: &str) -> BotIdentity {
        BotIdentity::new("http://127.0.0.1:8787/", &Token::new(token).unwrap())
    }

    #[test]
    fn offset_and_handled_ids_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/state.db");
        {
            let store = StateStore::open(&path, &identity("t1")).unwrap();
            assert_eq!(store.next_offset().unwrap(), 0);
            store.mark_handled(7, "replied").unwrap();
            store.advance_offset(8).unwrap();
            store.advance_offset(3).unwrap(); // never backwards
        }
        let store = StateStore::open(&path, &identity("t1")).unwrap();
        assert_eq!(store.next_offset().unwrap(), 8);
        assert!(store.is_handled(7).unwrap());
        assert!(!store.is_handled(8).unwrap());
    }

    #[test]
    fn handled_ids_far_below_the_offset_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("s.db"), &identity("t1")).unwrap();
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
            let error = StateStore::open(path, &identity("t1")).err().unwrap();
            assert_eq!(
                crate::exit::classify(&error),
                crate::exit::Outcome::Report(2),
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
        drop(StateStore::open(&path, &identity("t1")).unwrap());
        let error = StateStore::open(&path, &identity("t2")).err().unwrap();
        let message = format!("{error:#}");
        assert!(message.contains("a bot with another token"), "{message}");
        assert!(!message.contains("t2"), "{message}");
        // Nor any part of the token's sha256 (the default webhook secret).
        for token in ["t1", "t2"] {
            let prefix = &sha256_hex(token.as_bytes())[..8];
            assert!(!message.contains(prefix), "{message}");
        }
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
        let error = StateStore::open(&garbage, &identity("t1")).err().unwrap();
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
        let error = StateStore::open(&foreign, &identity("t1")).err().unwrap();
        assert!(
            format!("{error:#}").contains("another program"),
            "{error:#}"
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(StateStore::open(&path, &identity("t1")).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let error = StateStore::open(&path, &identity("t1")).err().unwrap();
        assert!(format!("{error:#}").contains("newer fly"), "{error:#}");
    }

    #[test]
    fn nonces_are_refused_with_another_update_inside_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("s.db"), &identity("t1")).unwrap();
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
        let store = StateStore::open(&dir.path().join("s.db"), &identity("t1")).unwrap();
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
    fn a_schema_1_file_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let store = StateStore::open(&path, &identity("t1")).unwrap();
            store.advance_offset(9).unwrap();
        }
        {
            let connection = Connection::open(&path).unwrap();
            connection.execute_batch("DROP TABLE dead_letters").unwrap();
            connection.pragma_update(None, "user_version", 1).unwrap();
        }
        let store = StateStore::open(&path, &identity("t1")).unwrap();
        assert_eq!(store.next_offset().unwrap(), 9);
        assert!(store.record_dead_letter(Some(1), "{}", "why").unwrap());
    }

    #[test]
    fn default_path_never_contains_the_token() {
        let id = identity("super-secret-token");
        assert_eq!(id.key().len(), 16);
        assert!(!id.key().contains("super"));
        assert_ne!(identity("a").key(), identity("b").key());
    }
}
