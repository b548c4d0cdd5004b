//! The store serve-webhook uses: the SQLite store with its hot sets in memory
//! and its writes group-committed, so that a delivery costs no disk wait on
//! the request path and thousands of them share one transaction. How it
//! answers, what a crash or a full disk can lose and why that is safe:
//! ARCHITECTURE.md, "serve-webhook's SQLite store".

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::group_commit::{GroupCommit, Pending};
use super::memory::{Claims, RecentIds, RecentNonces};
use super::sqlite::{FileWatch, SqliteStore, Write};
use super::{
    Admission, Claim, DeadLetter, Delivery, Letters, NonceCheck, Store, Unavailable, WebhookLedger,
};
use fly_base::clock::unix_now;
use fly_base::sync::lock;

/// Handled ids known in memory: at a busy platform's pace, the last few
/// seconds; at an ordinary bot's, days. Older ones are asked of the file.
const RECENT_IDS: usize = 1 << 18;
/// One nonce filter: 1 MiB, wrong about one nonce in ten thousand at capacity.
const NONCE_FILTER_BITS: usize = 1 << 23;
const NONCE_FILTER_CAPACITY: usize = 430_000;
/// At most this many filters (64 MiB) under a flood; past it the newest one
/// fills up and more lookups go to the file.
const NONCE_FILTERS_MAX: usize = 64;
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// Writes queued beyond this make new deliveries wait for the writer's
/// batch in hand: about 50 ms of writes at full speed, where a writer
/// that keeps up is a few hundred behind.
const MAX_BEHIND: usize = 4096;

/// Past this many queued writes, a delivery marked on an I/O thread waits
/// for the writer's batch in hand before it is answered (see
/// `try_mark_handled`).
const INSTANT_MARKS_BEHIND: usize = 512;

pub struct Front {
    store: SqliteStore,
    /// The claimed file: whether it is still there (see `sqlite::FileWatch`).
    watch: Option<Arc<FileWatch>>,
    hot: Mutex<Hot>,
    /// Serialises the nonce checks that need the file.
    nonces_in_file: Mutex<()>,
    /// `None` only while dropping: the writer stops (and drains) first.
    writer: Option<GroupCommit<Write>>,
}

/// Everything memory knows, under one lock so an admission is one step.
struct Hot {
    handled: RecentIds,
    nonces: RecentNonces,
    claims: Claims,
}

impl Front {
    /// Claims `store` for this process, loads what memory needs from it
    /// (the newest handled ids, the nonces of the last two windows) and
    /// starts the writer thread.
    pub fn open(store: SqliteStore, window_secs: i64) -> anyhow::Result<Front> {
        store.claim_exclusive(super::Role::Webhook.doing())?;
        few_allocator_heaps();
        let watch = store.watch();
        store.leave_checkpoints_to_the_writer()?;
        let now = unix_now();
        let nonce_keep_secs = window_secs.max(1).saturating_mul(2);
        let (newest, complete) = store.newest_handled(RECENT_IDS)?;
        let mut nonces = RecentNonces::new(
            window_secs,
            NONCE_FILTER_BITS,
            NONCE_FILTER_CAPACITY,
            NONCE_FILTERS_MAX,
        );
        store.each_nonce_since(now.saturating_sub(nonce_keep_secs), |nonce| {
            nonces.insert(nonce, now)
        })?;
        let batch_writer = store.batch_writer(nonce_keep_secs, CHECKPOINT_EVERY)?;
        let writer = GroupCommit::start("fly-state-writer", batch_writer)?;
        Ok(Front {
            hot: Mutex::new(Hot {
                handled: RecentIds::new(RECENT_IDS, newest, complete),
                nonces,
                claims: Claims::default(),
            }),
            store,
            watch,
            nonces_in_file: Mutex::new(()),
            writer: Some(writer),
        })
    }

    fn writer(&self) -> &GroupCommit<Write> {
        self.writer
            .as_ref()
            .expect("the writer lives as long as the front")
    }

    /// Whether new work may be taken: the file is there, and the writer is
    /// not failing (while it is, new work is refused, so that what waits in
    /// memory does not grow). Memory only: safe on an I/O thread.
    fn writable(&self) -> anyhow::Result<()> {
        if let Some(gone) = self.watch.as_ref().and_then(|watch| watch.is_gone()) {
            return Err(gone.into());
        }
        if self.writer().is_failing() {
            let why = self.writer().failing().unwrap_or_default();
            return Err(Unavailable(format!(
                "the state file {} cannot be written ({why}); new deliveries are refused \
                 until it can",
                self.store.location()
            ))
            .into());
        }
        Ok(())
    }

    /// Completes once the file holds everything memory was told so far.
    fn barrier(&self) -> anyhow::Result<()> {
        self.writer().barrier().wait()
    }

    /// Records a nonce in memory and queues it for the file; returns what a
    /// delivery waits for: nothing, unless the writer is far behind.
    fn remember_nonce(&self, hot: &mut Hot, nonce: &str, update_key: &str, now: i64) -> Pending {
        hot.nonces.insert(nonce, now);
        let (_committed, behind) = self.writer().submit_counted(Write::Nonce {
            nonce: nonce.into(),
            update_key: update_key.into(),
            seen_at: now,
        });
        if behind > MAX_BEHIND {
            self.writer().next_step()
        } else {
            Pending::done()
        }
    }

    /// The nonce check for a nonce memory may have seen: the file knows
    /// which update it came with. One at a time, so that two deliveries with
    /// one nonce cannot both find it new; the file is read after a barrier,
    /// so it holds every nonce memory was told, including the last one
    /// checked here. Reads only: the write is queued like any other, so this
    /// never waits for the writer's lock.
    fn check_nonce_in_file(
        &self,
        nonce: &str,
        update_key: &str,
        now: i64,
        window_secs: i64,
    ) -> anyhow::Result<NonceCheck> {
        let _one_at_a_time = lock(&self.nonces_in_file);
        self.barrier()?;
        let kept_since = now.saturating_sub(window_secs.saturating_mul(2));
        if self.store.nonce_reused(nonce, update_key, kept_since)? {
            return Ok(NonceCheck::Reused);
        }
        let wait = self.remember_nonce(&mut lock(&self.hot), nonce, update_key, now);
        wait.wait().map(|()| NonceCheck::Fresh)
    }

    /// Whether `update_id` is handled, asking the file only when memory cannot say.
    fn handled_anywhere(&self, update_id: i64) -> anyhow::Result<bool> {
        if let Some(known) = lock(&self.hot).handled.lookup(update_id) {
            return Ok(known);
        }
        self.barrier()?;
        self.store.is_handled(update_id)
    }
}

/// Caps glibc's per-thread heaps ("arenas", by default eight per core) at
/// two for the threads started from here on (the blocking pool's): a
/// delivery's memory is taken on one thread and given back on another,
/// and with a heap per pool thread the process grew by about 5 MiB every
/// 200k updates under sustained load (1 MiB with the heaps capped, most
/// of it the nonce filters; `benches/sustained.sh`).
fn few_allocator_heaps() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a setting of the allocator; glibc
    // takes its own lock for it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

impl Store for Front {
    fn location(&self) -> String {
        self.store.location()
    }

    fn is_handled(&self, update_id: i64) -> anyhow::Result<bool> {
        self.handled_anywhere(update_id)
    }

    /// Known in memory at once; committed with the next batch, not waited
    /// for. While the writer fails, the mark is kept all the same (written
    /// once it can) but the call fails as unavailable: the delivery is
    /// answered 503, not 200, since its record is not on its way to disk.
    fn mark_handled(&self, update_id: i64, outcome: &str) -> anyhow::Result<()> {
        let mut hot = lock(&self.hot);
        // Queued before memory knows it: should the id leave memory (the
        // floor rising past it), a barrier then still covers its write.
        drop(self.writer().submit(Write::Handled {
            update_id,
            outcome: outcome.into(),
            at: unix_now(),
        }));
        hot.handled.insert(update_id);
        drop(hot);
        self.writable()
    }

    /// Never waits: the mark is memory and a queued write, made on the I/O
    /// thread (handing it to a blocking thread cost more CPU than the whole
    /// rest of a delivery). While the writer is behind, the returned
    /// [`Pending`] is its batch in hand: the delivery waits for it (as a
    /// future), so that the I/O threads yield the cores to the writer
    /// instead of queueing writes faster than it commits them.
    fn try_mark_handled(&self, update_id: i64, outcome: &str) -> Option<anyhow::Result<Pending>> {
        if let Err(error) = self.mark_handled(update_id, outcome) {
            return Some(Err(error));
        }
        Some(Ok(if self.writer().backlog() > INSTANT_MARKS_BEHIND {
            self.writer().next_step()
        } else {
            Pending::done()
        }))
    }

    /// Tries a failed batch once more at once; says what is not written.
    fn flush(&self) -> anyhow::Result<()> {
        self.writer().flush().map_err(|failed| {
            anyhow::anyhow!(
                "{} could not be written to the state file {}: {:#}",
                failed.unwritten,
                self.store.location(),
                failed.error
            )
        })
    }

    fn is_reachable(&self) -> bool {
        self.writable().is_ok()
    }

    fn gone(&self) -> Option<anyhow::Error> {
        let watch = self.watch.as_ref()?;
        watch.is_gone().map(anyhow::Error::new)
    }
}

impl WebhookLedger for Front {
    fn check_nonce(
        &self,
        nonce: &str,
        update_key: &str,
        now: i64,
        window_secs: i64,
    ) -> anyhow::Result<NonceCheck> {
        self.writable()?;
        let new = {
            let mut hot = lock(&self.hot);
            (!hot.nonces.maybe_seen(nonce))
                .then(|| self.remember_nonce(&mut hot, nonce, update_key, now))
        };
        match new {
            Some(wait) => wait.wait().map(|()| NonceCheck::Fresh),
            None => self.check_nonce_in_file(nonce, update_key, now, window_secs),
        }
    }

    fn claim_update(&self, update_id: i64, lease: Duration) -> anyhow::Result<Option<Claim>> {
        Ok(lock(&self.hot)
            .claims
            .claim(update_id, "", lease)
            .map(|token| Claim { update_id, token }))
    }

    fn release_update(&self, claim: Claim) -> anyhow::Result<()> {
        lock(&self.hot).claims.release(claim.update_id, claim.token);
        Ok(())
    }

    /// The slow path, on a blocking thread: memory first, then the file for
    /// what memory cannot say. The handled check is made again once the
    /// claim is held: a delivery of the same update may have finished
    /// (marked, then released) in between.
    fn admit(&self, delivery: &Delivery) -> anyhow::Result<Admission> {
        self.writable()?;
        if let Some(answer) = self.try_admit(delivery) {
            return answer;
        }
        let update_id = delivery.update_id;
        if self.handled_anywhere(update_id)? {
            return Ok(Admission::Duplicate);
        }
        if !delivery.nonce.is_empty() {
            let key = update_id.to_string();
            let check = self.check_nonce_in_file(
                &delivery.nonce,
                &key,
                delivery.now,
                delivery.window_secs,
            )?;
            if check == NonceCheck::Reused {
                return Ok(Admission::NonceReused);
            }
        }
        let claimed = lock(&self.hot)
            .claims
            .claim(update_id, &delivery.nonce, delivery.lease);
        let Some(token) = claimed else {
            return Ok(Admission::InProgress);
        };
        let claim = Claim { update_id, token };
        match self.handled_anywhere(update_id) {
            Ok(false) => Ok(Admission::Admitted {
                claim,
                wait: Pending::done(),
            }),
            handled_or_failed => {
                self.release_update(claim)?;
                handled_or_failed.map(|_| Admission::Duplicate)
            }
        }
    }

    /// The fast path, in memory, for the I/O threads. Declines (`None`) when
    /// the update id is below the recent set's floor, or the nonce may have
    /// been seen (rare: a redelivery, a replay, or the filter's one in a
    /// ten thousand).
    fn try_admit(&self, delivery: &Delivery) -> Option<anyhow::Result<Admission>> {
        if let Err(refused) = self.writable() {
            return Some(Err(refused));
        }
        let update_id = delivery.update_id;
        let mut hot = lock(&self.hot);
        if hot.handled.lookup(update_id)? {
            return Some(Ok(Admission::Duplicate));
        }
        let mut wait = Pending::done();
        if !delivery.nonce.is_empty() {
            if hot.nonces.maybe_seen(&delivery.nonce) {
                // The same delivery again while it is being handled: its
                // nonce came with this very update, so no store is needed.
                if hot.claims.held_with_nonce(update_id, &delivery.nonce) {
                    return Some(Ok(Admission::InProgress));
                }
                return None;
            }
            let key = update_id.to_string();
            wait = self.remember_nonce(&mut hot, &delivery.nonce, &key, delivery.now);
        }
        let answer = match hot.claims.claim(update_id, &delivery.nonce, delivery.lease) {
            Some(token) => Admission::Admitted {
                claim: Claim { update_id, token },
                wait,
            },
            None => Admission::InProgress,
        };
        Some(Ok(answer))
    }
}

impl Letters for Front {
    fn record_dead_letter(
        &self,
        update_id: Option<i64>,
        raw: &str,
        reason: &str,
    ) -> anyhow::Result<bool> {
        self.writable()?;
        self.store.record_dead_letter(update_id, raw, reason)
    }

    fn dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>> {
        self.store.dead_letters()
    }

    fn purge_dead_letters(&self) -> anyhow::Result<usize> {
        self.store.purge_dead_letters()
    }

    fn park(&self, update_id: i64, raw: &str, reason: &str) -> anyhow::Result<()> {
        self.store.park(update_id, raw, reason)
    }

    fn unpark(&self, update_id: i64) -> anyhow::Result<bool> {
        self.store.unpark(update_id)
    }

    fn forget_dead_letter(&self, update_id: i64) -> anyhow::Result<bool> {
        self.store.forget_dead_letter(update_id)
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        // The writer commits what is queued, empties the log into the
        // database file and stops, before the store's connection closes.
        self.writer = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BotIdentity;
    use std::path::Path;

    fn open(path: &Path) -> Front {
        let identity = BotIdentity::for_tests("t");
        Front::open(SqliteStore::open(path, &identity).unwrap(), 300).unwrap()
    }

    fn delivery(update_id: i64, nonce: &str) -> Delivery {
        Delivery {
            update_id,
            nonce: nonce.to_string(),
            now: unix_now(),
            window_secs: 300,
            lease: Duration::from_secs(60),
        }
    }

    /// Admits through the fast path when it answers, as the receiver does.
    fn admit(front: &Front, delivery: &Delivery) -> Admission {
        match front.try_admit(delivery) {
            Some(answer) => answer.unwrap(),
            None => front.admit(delivery).unwrap(),
        }
    }

    fn admitted(admission: Admission) -> Claim {
        match admission {
            Admission::Admitted { claim, wait } => {
                wait.wait().unwrap();
                claim
            }
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[test]
    fn deliveries_are_answered_as_before_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let front = open(&dir.path().join("s.db"));
        let first = delivery(10, "n-10");
        let claim = admitted(front.try_admit(&first).expect("fast path").unwrap());
        // The same delivery while it is handled.
        assert!(matches!(
            front.try_admit(&first).expect("fast path").unwrap(),
            Admission::InProgress
        ));
        // Another update with that nonce: only the file knows which update
        // the nonce came with, so memory declines and the slow path refuses.
        let replay = delivery(11, "n-10");
        assert!(front.try_admit(&replay).is_none());
        assert!(matches!(
            front.admit(&replay).unwrap(),
            Admission::NonceReused
        ));
        front.mark_handled(10, "replied").unwrap();
        front.release_update(claim).unwrap();
        assert!(matches!(
            front.try_admit(&first).expect("fast path").unwrap(),
            Admission::Duplicate
        ));
        // A delivery without a nonce, and one whose handling failed.
        let claim = admitted(admit(&front, &delivery(12, "")));
        front.release_update(claim).unwrap();
        let claim = admitted(admit(&front, &delivery(12, "")));
        front.release_update(claim).unwrap();
    }

    #[test]
    fn a_redelivery_after_a_failure_takes_the_slow_path_and_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let front = open(&dir.path().join("s.db"));
        let once = delivery(20, "n-20");
        let claim = admitted(admit(&front, &once));
        front.release_update(claim).unwrap(); // the reply failed: 500
        assert!(front.try_admit(&once).is_none(), "the nonce was seen");
        let claim = admitted(front.admit(&once).unwrap());
        assert_eq!(claim.update_id, 20);
    }

    #[test]
    fn marks_and_nonces_survive_a_restart_and_the_file_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let front = open(&path);
            let claim = admitted(admit(&front, &delivery(30, "n-30")));
            front.mark_handled(30, "replied").unwrap();
            front.release_update(claim).unwrap();
            let identity = BotIdentity::for_tests("t");
            let error = Front::open(SqliteStore::open(&path, &identity).unwrap(), 300)
                .err()
                .unwrap();
            assert!(
                format!("{error:#}").contains("already serving webhooks"),
                "{error:#}"
            );
        }
        let wal = path.with_extension("db-wal");
        assert_eq!(
            std::fs::metadata(&wal)
                .map(|found| found.len())
                .unwrap_or(0),
            0,
            "a clean stop empties the log"
        );
        let front = open(&path);
        assert!(matches!(
            front.try_admit(&delivery(30, "n-30")).unwrap().unwrap(),
            Admission::Duplicate
        ));
        assert!(matches!(
            admit(&front, &delivery(31, "n-30")),
            Admission::NonceReused
        ));
    }

    /// Waits (at most 10 s) for `condition`.
    fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(std::time::Instant::now() < deadline, "waited for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn writes_that_fail_are_kept_and_new_deliveries_refused_until_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let front = open(&path);
        // Another connection takes the table the writer logs nonces to away:
        // its batches fail as on a full disk.
        let other = rusqlite::Connection::open(&path).unwrap();
        other.busy_timeout(Duration::from_secs(5)).unwrap();
        other
            .execute_batch("ALTER TABLE nonce_log RENAME TO nonce_log_away")
            .unwrap();
        let claim = admitted(admit(&front, &delivery(40, "n-40")));
        let _maybe_refused = front.mark_handled(40, "replied");
        front.release_update(claim).unwrap();
        until("the writer failing", || front.writer().is_failing());

        assert!(!front.is_reachable());
        let refused = front.try_admit(&delivery(41, "n-41")).unwrap().unwrap_err();
        assert!(crate::is_unavailable(&refused), "{refused:#}");
        let refused = front.admit(&delivery(41, "n-41")).unwrap_err();
        assert!(crate::is_unavailable(&refused), "{refused:#}");
        // A mark made now is kept, but its delivery is not answered 200.
        let refused = front.mark_handled(42, "replied").unwrap_err();
        assert!(crate::is_unavailable(&refused), "{refused:#}");
        let error = front.flush().unwrap_err();
        assert!(
            format!("{error:#}").starts_with(&format!(
                "2 handled ids and 1 nonce could not be written to the state file {}: ",
                path.display()
            )),
            "{error:#}"
        );

        // Writable again: caught up by itself.
        other
            .execute_batch("ALTER TABLE nonce_log_away RENAME TO nonce_log")
            .unwrap();
        until("the writer writing again", || !front.writer().is_failing());
        front.flush().unwrap();
        assert!(front.is_reachable());
        drop(front);
        let front = open(&path);
        for id in [40, 42] {
            assert!(matches!(
                front.try_admit(&delivery(id, "n-again")).unwrap().unwrap(),
                Admission::Duplicate
            ));
        }
        assert!(matches!(
            admit(&front, &delivery(43, "n-40")),
            Admission::NonceReused
        ));
    }

    #[test]
    fn ids_below_the_recent_floor_are_asked_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let front = open(&dir.path().join("s.db"));
        {
            let mut hot = lock(&front.hot);
            hot.handled = RecentIds::new(2, [], true);
        }
        for id in [1, 2, 3] {
            front.mark_handled(id, "replied").unwrap();
        }
        // 1 left memory; its mark may still be queued: the barrier covers it.
        assert_eq!(lock(&front.hot).handled.lookup(1), None);
        assert!(front.try_admit(&delivery(1, "n-a")).is_none());
        assert!(matches!(
            front.admit(&delivery(1, "n-a")).unwrap(),
            Admission::Duplicate
        ));
        assert!(front.is_handled(1).unwrap());
        assert!(!front.is_handled(0).unwrap());
        admitted(front.admit(&delivery(0, "n-b")).unwrap());
    }

    #[test]
    fn concurrent_deliveries_of_one_update_are_admitted_once() {
        let dir = tempfile::tempdir().unwrap();
        let front = std::sync::Arc::new(open(&dir.path().join("s.db")));
        for update_id in 100..150 {
            let admitted_count = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for attempt in 0..4 {
                    let front = &front;
                    let admitted_count = &admitted_count;
                    scope.spawn(move || {
                        // Two nonces: the platform may sign a redelivery anew.
                        let nonce = format!("n-{update_id}-{}", attempt % 2);
                        if let Admission::Admitted { claim, wait } =
                            admit(front, &delivery(update_id, &nonce))
                        {
                            wait.wait().unwrap();
                            admitted_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            front.mark_handled(update_id, "replied").unwrap();
                            front.release_update(claim).unwrap();
                        }
                    });
                }
            });
            assert_eq!(admitted_count.into_inner(), 1, "update {update_id}");
        }
    }
}
