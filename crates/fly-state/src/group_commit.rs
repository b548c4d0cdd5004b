//! Group commit: many small writes, one transaction. Callers hand writes to
//! a writer thread and go on at once; the thread commits whatever has
//! gathered since its last commit as one batch (so under load a transaction
//! holds the writes of the last few milliseconds, and when idle a lone write
//! is committed at once), and between batches does the sink's upkeep
//! (pruning). Each write comes with a [`Pending`] that completes when its
//! batch is committed, for callers that must not go on before that.
//!
//! **A batch that fails is kept and written again**, in order, before
//! anything queued after it, with a backoff (a full disk, a file that cannot
//! be written): nothing is dropped. While it fails, [`GroupCommit::failing`]
//! says why, and every [`Pending`] waiting then completes with an
//! [`Unavailable`] error at once rather than for the length of the outage;
//! the writes stay queued, and are committed when the sink can write again.
//! The caller bounds the queue by refusing new work meanwhile.
//! [`GroupCommit::flush`] (a clean stop) tries once more at once and says
//! what could not be written.
//!
//! Nothing here knows SQLite: the [`Sink`] does the writing.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use super::Unavailable;
use fly_base::sync::lock;

/// Where the batches go: called on the writer thread only.
pub trait Sink<W>: Send + 'static {
    /// Writes the batch as one transaction: all of it, or none.
    fn commit(&mut self, writes: &[W]) -> anyhow::Result<()>;

    /// Upkeep between batches (pruning), done when it is due; returns when
    /// it is due next. Keep each call short: batches wait for it. Not
    /// called while batches fail.
    fn maintain(&mut self) -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// The last call, after the last batch (a clean stop).
    fn finish(&mut self) {}

    /// `writes` in words, for the line that says they are not written yet.
    fn describe(&self, writes: &[W]) -> String {
        match writes.len() {
            1 => "1 write".to_string(),
            count => format!("{count} writes"),
        }
    }
}

/// Writes that could not be committed: why, and what they are (see
/// [`Sink::describe`]).
#[derive(Debug, Clone)]
pub struct NotWritten {
    /// Shared by everyone who waited for the batch.
    pub error: Arc<anyhow::Error>,
    pub unwritten: String,
}

/// The writer thread and its queue. Dropping it commits what is queued,
/// finishes the sink and joins the thread.
pub struct GroupCommit<W: Send + 'static> {
    shared: Arc<Handoff<W>>,
    thread: Option<JoinHandle<()>>,
}

/// Where requests hand their writes to the writer thread.
struct Handoff<W> {
    queue: Mutex<Queue<W>>,
    wake_writer: Condvar,
    /// `queue.failing.is_some()`, read without the lock.
    failing: AtomicBool,
}

struct Queue<W> {
    /// The next batch, and what completes when it is committed. A batch
    /// that failed is put back at the front. A ring that keeps its size:
    /// under a steady load, queueing a write allocates nothing (memory
    /// freed on another thread than the one that took it is what made the
    /// allocator's heaps grow with the updates seen).
    writes: VecDeque<W>,
    done: Arc<Completion>,
    /// Someone waits for `done` though `writes` may be empty (a barrier).
    barrier_wanted: bool,
    /// The writer is committing a batch taken from here.
    committing: bool,
    /// Completes when the writer ends the step (a batch, or part of one) it
    /// is on: what a producer that is too far ahead waits for.
    step: Arc<Completion>,
    /// The writer waits for work (or for its next try): a new write must wake it.
    writer_idle: bool,
    stopping: bool,
    /// Why the last try failed, while its writes wait here to be tried again.
    failing: Option<String>,
    /// Try again now rather than after the backoff (a flush wants an answer).
    retry_now: bool,
    /// A flush said what could not be written: the stop need not say it again.
    reported: bool,
}

/// Batches larger than this are split, so one transaction stays short.
const MAX_BATCH: usize = 1024;

/// The first wait before a failed batch is tried again; it doubles up to
/// [`RETRY_AT_MOST`], so a disk that has room again is used within a second.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_AT_MOST: Duration = Duration::from_secs(1);

impl<W: Send + 'static> GroupCommit<W> {
    pub fn start(name: &str, sink: impl Sink<W>) -> anyhow::Result<GroupCommit<W>> {
        let shared = Arc::new(Handoff {
            queue: Mutex::new(Queue {
                writes: VecDeque::new(),
                done: Arc::new(Completion::default()),
                barrier_wanted: false,
                committing: false,
                step: Arc::new(Completion::default()),
                writer_idle: false,
                stopping: false,
                failing: None,
                retry_now: false,
                reported: false,
            }),
            wake_writer: Condvar::new(),
            failing: AtomicBool::new(false),
        });
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn({
                let shared = Arc::clone(&shared);
                move || write_batches(&shared, sink)
            })
            .with_context(|| format!("starting the {name} thread"))?;
        Ok(GroupCommit {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `write` for the next batch; never waits for the disk.
    pub fn submit(&self, write: W) -> Pending {
        self.submit_counted(write).0
    }

    /// [`GroupCommit::submit`], also saying how many writes wait in the
    /// queue with it: how far behind the writer is.
    pub fn submit_counted(&self, write: W) -> (Pending, usize) {
        let mut queue = lock(&self.shared.queue);
        queue.writes.push_back(write);
        let done = Arc::clone(&queue.done);
        // A failing writer waits for its next try, not for new writes.
        if queue.writer_idle && queue.failing.is_none() {
            queue.writer_idle = false;
            self.shared.wake_writer.notify_one();
        }
        (Pending(Some(done)), queue.writes.len())
    }

    /// Writes queued for the next batch: how far behind the writer is.
    pub fn backlog(&self) -> usize {
        lock(&self.shared.queue).writes.len()
    }

    /// Whether the last batch failed and its writes wait to be tried again.
    pub fn is_failing(&self) -> bool {
        self.shared.failing.load(Ordering::SeqCst)
    }

    /// Why the last batch failed, while its writes wait to be tried again.
    pub fn failing(&self) -> Option<String> {
        if !self.is_failing() {
            return None;
        }
        lock(&self.shared.queue).failing.clone()
    }

    /// Completes when the writer has finished the step it is on (at once
    /// when it is idle): a producer far ahead waits for this, one batch,
    /// rather than for its own write at the end of the queue.
    pub fn next_step(&self) -> Pending {
        let queue = lock(&self.shared.queue);
        if queue.committing {
            Pending(Some(Arc::clone(&queue.step)))
        } else {
            Pending::done()
        }
    }

    /// Completes once every write submitted before it is committed, or (an
    /// error) once a try to commit them failed.
    pub fn barrier(&self) -> Pending {
        let mut queue = lock(&self.shared.queue);
        if queue.writes.is_empty() && !queue.committing {
            return Pending::done();
        }
        queue.barrier_wanted = true;
        let done = Arc::clone(&queue.done);
        if queue.writer_idle && queue.failing.is_none() {
            queue.writer_idle = false;
            self.shared.wake_writer.notify_one();
        }
        Pending(Some(done))
    }

    /// Commits everything submitted so far, trying a failed batch again at
    /// once (a clean stop); on failure, says what is not written.
    pub fn flush(&self) -> Result<(), NotWritten> {
        let done = {
            let mut queue = lock(&self.shared.queue);
            if queue.writes.is_empty() && !queue.committing {
                return Ok(());
            }
            queue.barrier_wanted = true;
            queue.retry_now = true;
            if queue.writer_idle {
                queue.writer_idle = false;
                self.shared.wake_writer.notify_one();
            }
            Arc::clone(&queue.done)
        };
        let result = done.wait();
        if result.is_err() {
            lock(&self.shared.queue).reported = true;
        }
        result
    }
}

impl<W: Send + 'static> Drop for GroupCommit<W> {
    fn drop(&mut self) {
        lock(&self.shared.queue).stopping = true;
        self.shared.wake_writer.notify_one();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the state store's writer thread panicked");
        }
    }
}

/// The writer thread: batch after batch until stopped with nothing queued
/// (or, stopping, with a batch that failed once more).
fn write_batches<W>(shared: &Handoff<W>, mut sink: impl Sink<W>) {
    let mut maintenance_due = Instant::now();
    let mut failures: u32 = 0;
    let mut retry_at: Option<Instant> = None;
    // The batch in hand, its buffer used again batch after batch.
    let mut batch: Vec<W> = Vec::with_capacity(MAX_BATCH);
    let mut queue = lock(&shared.queue);
    loop {
        if queue.failing.is_none() && Instant::now() >= maintenance_due {
            drop(queue);
            maintenance_due = maintain(&mut sink);
            queue = lock(&shared.queue);
            continue;
        }
        if queue.writes.is_empty() && !queue.barrier_wanted {
            if queue.stopping {
                break;
            }
            queue = wait_idle(shared, queue, maintenance_due);
            continue;
        }
        // A failed batch waits for its next try, unless a flush or the
        // stop wants an answer now.
        if let Some(at) = retry_at
            && !queue.retry_now
            && !queue.stopping
            && Instant::now() < at
        {
            queue = wait_idle(shared, queue, at);
            continue;
        }
        queue.retry_now = false;
        let done = take_batch(&mut queue, &mut batch);
        queue.committing = true;
        drop(queue);

        let result = commit(&mut sink, &batch);
        queue = lock(&shared.queue);
        queue.committing = false;
        let step = std::mem::replace(&mut queue.step, Arc::new(Completion::default()));
        let outcome = match result {
            Ok(()) => {
                batch.clear();
                say_writing_again(shared, &mut queue);
                failures = 0;
                retry_at = None;
                Ok(())
            }
            Err(error) => {
                let kept = keep_failed(shared, &mut queue, &sink, &mut batch, error);
                failures = failures.saturating_add(1);
                let backoff = RETRY_FIRST
                    .saturating_mul(1 << failures.min(8).saturating_sub(1))
                    .min(RETRY_AT_MOST);
                retry_at = Some(Instant::now() + backoff);
                Err(kept)
            }
        };
        let stop_here = outcome.is_err() && queue.stopping;
        let reported = queue.reported;
        drop(queue);
        complete_batch(step, done, outcome, stop_here && !reported);
        queue = lock(&shared.queue);
        if stop_here {
            break;
        }
    }
    drop(queue);
    sink.finish();
}

/// The sink's upkeep; when it is due next. A panic is logged and the
/// upkeep tried again in a minute.
fn maintain<W>(sink: &mut impl Sink<W>) -> Instant {
    catch_unwind(AssertUnwindSafe(|| sink.maintain())).unwrap_or_else(|_| {
        tracing::error!("the state store's upkeep panicked; tried again in a minute");
        Instant::now() + Duration::from_secs(60)
    })
}

/// Waits, idle, until `until` or until woken (a new write, a flush, the stop).
fn wait_idle<'a, W>(
    shared: &'a Handoff<W>,
    mut queue: MutexGuard<'a, Queue<W>>,
    until: Instant,
) -> MutexGuard<'a, Queue<W>> {
    queue.writer_idle = true;
    let wait = until.saturating_duration_since(Instant::now());
    queue = shared
        .wake_writer
        .wait_timeout(queue, wait)
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .0;
    queue.writer_idle = false;
    queue
}

/// Moves the next batch into `batch` (empty); returns what completes when
/// it is committed: `None` when the batch is split and the rest stays
/// queued with the same completion, which the batch that empties the queue
/// completes.
fn take_batch<W>(queue: &mut Queue<W>, batch: &mut Vec<W>) -> Option<Arc<Completion>> {
    if queue.writes.len() > MAX_BATCH {
        batch.extend(queue.writes.drain(..MAX_BATCH));
        None
    } else {
        queue.barrier_wanted = false;
        batch.extend(queue.writes.drain(..));
        Some(std::mem::replace(
            &mut queue.done,
            Arc::new(Completion::default()),
        ))
    }
}

/// Commits `writes` (nothing to do when there are none). A panic fails the
/// batch like an error (the transaction is rolled back as it unwinds)
/// rather than the thread, whose waiters would then wait forever.
fn commit<W>(sink: &mut impl Sink<W>, writes: &[W]) -> Result<(), Arc<anyhow::Error>> {
    if writes.is_empty() {
        return Ok(());
    }
    match catch_unwind(AssertUnwindSafe(|| sink.commit(writes))) {
        Ok(committed) => committed.map_err(Arc::new),
        Err(_) => Err(Arc::new(anyhow!("the state store's writer panicked"))),
    }
}

/// A batch was committed: if batches failed before, that is over, and said.
fn say_writing_again<W>(shared: &Handoff<W>, queue: &mut Queue<W>) {
    if queue.failing.take().is_some() {
        shared.failing.store(false, Ordering::SeqCst);
        match queue.writes.len() {
            0 => tracing::info!("the state store writes again: what it kept is saved"),
            queued => tracing::info!(
                "the state store writes again: what it kept is being saved \
                 ({queued} writes queued)"
            ),
        }
    }
}

/// The batch `writes` failed with `error`: it is put back, in order, ahead
/// of what came since (leaving `writes` empty), and the writer is failing. Returns what is not
/// written, and the completion of everyone else waiting, who hears it now
/// rather than after the outage.
fn keep_failed<W>(
    shared: &Handoff<W>,
    queue: &mut Queue<W>,
    sink: &impl Sink<W>,
    writes: &mut Vec<W>,
    error: Arc<anyhow::Error>,
) -> (NotWritten, Arc<Completion>) {
    while let Some(write) = writes.pop() {
        queue.writes.push_front(write);
    }
    let failed = NotWritten {
        error: error.clone(),
        unwritten: sink.describe(queue.writes.make_contiguous()),
    };
    if queue.failing.is_none() {
        tracing::error!(
            "the state store could not save a batch: {error:#}; {} kept in \
             memory and written again once it can",
            failed.unwritten
        );
    } else {
        tracing::debug!("the state store could not save a batch again: {error:#}");
    }
    // What the store says while it cannot write (`/readyz`, new deliveries).
    queue.failing = Some(format!("{error:#}"));
    shared.failing.store(true, Ordering::SeqCst);
    queue.barrier_wanted = false;
    let waiting = std::mem::replace(&mut queue.done, Arc::new(Completion::default()));
    (failed, waiting)
}

/// Completes the writer's step, the batch's own completion and, when it
/// failed, everyone else waiting; `say_unwritten`: the writer stops with
/// writes that no flush has reported, which is said.
fn complete_batch(
    step: Arc<Completion>,
    done: Option<Arc<Completion>>,
    outcome: Result<(), (NotWritten, Arc<Completion>)>,
    say_unwritten: bool,
) {
    step.complete(match &outcome {
        Ok(()) => Ok(()),
        Err((failed, _)) => Err(failed.clone()),
    });
    match outcome {
        Ok(()) => {
            if let Some(done) = done {
                done.complete(Ok(()));
            }
        }
        Err((failed, waiting)) => {
            if let Some(done) = done {
                done.complete(Err(failed.clone()));
            }
            waiting.complete(Err(failed.clone()));
            if say_unwritten {
                tracing::error!(
                    "{} could not be written to the state store: {:#}",
                    failed.unwritten,
                    failed.error
                );
            }
        }
    }
}

/// Completes when a batch is committed, with its result. Waited on by a
/// thread (`wait`) or by a callback (`on_done`, which a server turns into a
/// future); already complete when nothing was to be written.
#[must_use = "a write is durable only once its Pending completes"]
pub struct Pending(Option<Arc<Completion>>);

impl std::fmt::Debug for Pending {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(if self.0.is_none() {
            "Pending(done)"
        } else {
            "Pending(queued)"
        })
    }
}

impl Pending {
    /// Nothing to wait for: durable already.
    pub fn done() -> Pending {
        Pending(None)
    }

    /// The result, if it is known without waiting.
    pub fn try_result(&self) -> Option<anyhow::Result<()>> {
        match &self.0 {
            None => Some(Ok(())),
            Some(completion) => lock(&completion.state).result.clone().map(into_anyhow),
        }
    }

    /// Blocks until committed (or a try failed): on a blocking thread only.
    pub fn wait(self) -> anyhow::Result<()> {
        match self.0 {
            None => Ok(()),
            Some(completion) => into_anyhow(completion.wait()),
        }
    }

    /// Calls `then` with the result once committed: at once if it is known,
    /// else on the writer thread (so `then` must be quick, e.g. wake a task).
    pub fn on_done(self, then: impl FnOnce(anyhow::Result<()>) + Send + 'static) {
        let Some(completion) = self.0 else {
            return then(Ok(()));
        };
        let mut state = lock(&completion.state);
        match state.result.clone() {
            Some(result) => {
                drop(state);
                then(into_anyhow(result));
            }
            None => state.callbacks.push(Box::new(then)),
        }
    }
}

type Callback = Box<dyn FnOnce(anyhow::Result<()>) + Send>;

#[derive(Default)]
struct Completion {
    state: Mutex<CompletionState>,
    committed: Condvar,
}

#[derive(Default)]
struct CompletionState {
    result: Option<Result<(), NotWritten>>,
    callbacks: Vec<Callback>,
}

impl Completion {
    fn complete(&self, result: Result<(), NotWritten>) {
        let callbacks = {
            let mut state = lock(&self.state);
            state.result = Some(result.clone());
            std::mem::take(&mut state.callbacks)
        };
        self.committed.notify_all();
        for callback in callbacks {
            callback(into_anyhow(result.clone()));
        }
    }

    fn wait(&self) -> Result<(), NotWritten> {
        let mut state = lock(&self.state);
        loop {
            if let Some(result) = &state.result {
                return result.clone();
            }
            state = self
                .committed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// A failed try is an outage: the writes are kept and tried again, so the
/// waiter is told "not now" (a delivery is answered 503), not "lost".
fn into_anyhow(result: Result<(), NotWritten>) -> anyhow::Result<()> {
    result.map_err(|failed| {
        anyhow::Error::new(Unavailable(format!(
            "the state store cannot save its writes: {:#} ({} kept, written again once it can)",
            failed.error, failed.unwritten
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that records its batches, and can be held up or made to fail.
    #[derive(Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        /// While locked by a test, commits wait.
        gate: Arc<Mutex<()>>,
        /// This many commits fail (`usize::MAX`: all of them) before one works.
        failures_left: Arc<Mutex<usize>>,
        finished: Arc<Mutex<bool>>,
    }

    impl Sink<u32> for Recorder {
        fn commit(&mut self, writes: &[u32]) -> anyhow::Result<()> {
            drop(lock(&self.gate));
            let mut failures_left = lock(&self.failures_left);
            if *failures_left > 0 {
                if *failures_left != usize::MAX {
                    *failures_left -= 1;
                }
                anyhow::bail!("disk full");
            }
            lock(&self.batches).push(writes.to_vec());
            Ok(())
        }

        fn finish(&mut self) {
            *lock(&self.finished) = true;
        }
    }

    #[test]
    fn queueing_reuses_the_queue_and_the_batch_buffers() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        let gate = lock(&sink.gate);
        let _first = writer.submit(0);
        while !lock(&writer.shared.queue).committing {
            std::thread::yield_now();
        }
        let pendings: Vec<Pending> = (1..=3000).map(|n| writer.submit(n)).collect();
        let capacity = lock(&writer.shared.queue).writes.capacity();
        drop(gate);
        for pending in pendings {
            pending.wait().unwrap();
        }
        assert_eq!(
            lock(&writer.shared.queue).writes.capacity(),
            capacity,
            "kept, not given away with each batch"
        );
    }

    #[test]
    fn a_lone_write_is_committed_at_once_and_its_pending_completes() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        writer.submit(1).wait().unwrap();
        assert_eq!(*lock(&sink.batches), [vec![1]]);
        assert!(writer.barrier().wait().is_ok());
    }

    #[test]
    fn writes_made_during_a_commit_go_out_together_in_the_next_one() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        let gate = lock(&sink.gate);
        let first = writer.submit(1);
        // Wait until the writer has taken the first batch (and is held at the gate).
        while lock(&writer.shared.queue).writes.len() == 1 {
            std::thread::yield_now();
        }
        let later: Vec<Pending> = (2..=50).map(|n| writer.submit(n)).collect();
        assert!(first.try_result().is_none(), "not committed yet");
        drop(gate);
        first.wait().unwrap();
        for pending in later {
            pending.wait().unwrap();
        }
        assert_eq!(
            *lock(&sink.batches),
            [vec![1], (2..=50).collect::<Vec<_>>()]
        );
    }

    #[test]
    fn a_failed_batch_is_kept_and_written_again_in_order() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        *lock(&sink.failures_left) = 3;
        let error = writer.submit(1).wait().unwrap_err();
        assert!(crate::is_unavailable(&error), "{error:#}");
        assert!(format!("{error:#}").contains("disk full"), "{error:#}");
        assert!(format!("{error:#}").contains("1 write kept"), "{error:#}");
        assert!(writer.is_failing());
        assert_eq!(writer.failing().as_deref(), Some("disk full"));
        // Queued behind the failed one, written after it once the sink can.
        let later: Vec<Pending> = (2..=5).map(|n| writer.submit(n)).collect();
        while *lock(&sink.failures_left) > 0 || writer.is_failing() {
            std::thread::yield_now();
        }
        writer.barrier().wait().unwrap();
        drop(later);
        assert_eq!(lock(&sink.batches).concat(), [1, 2, 3, 4, 5]);
        assert!(writer.failing().is_none());
    }

    #[test]
    fn a_flush_tries_again_at_once_and_says_what_is_not_written() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        *lock(&sink.failures_left) = usize::MAX;
        assert!(writer.submit(1).wait().is_err());
        let _second = writer.submit(2);
        let started = Instant::now();
        let failed = writer.flush().unwrap_err();
        assert_eq!(
            (format!("{:#}", failed.error), failed.unwritten.as_str()),
            ("disk full".to_string(), "2 writes")
        );
        assert!(started.elapsed() < RETRY_AT_MOST, "no backoff for a flush");
        // Room again: a flush writes everything.
        *lock(&sink.failures_left) = 0;
        writer.flush().unwrap();
        assert_eq!(lock(&sink.batches).concat(), [1, 2]);
        assert!(!writer.is_failing());
    }

    #[test]
    fn a_stop_while_failing_tries_once_more_and_ends() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        *lock(&sink.failures_left) = usize::MAX;
        assert!(writer.submit(1).wait().is_err());
        drop(writer);
        assert!(lock(&sink.batches).is_empty());
        assert!(*lock(&sink.finished));

        // The stop's try works: written.
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        *lock(&sink.failures_left) = 1;
        assert!(writer.submit(1).wait().is_err());
        drop(writer);
        assert_eq!(*lock(&sink.batches), [vec![1]]);
    }

    /// A sink that panics on its first batch.
    struct Panicky(bool);

    impl Sink<u32> for Panicky {
        fn commit(&mut self, _writes: &[u32]) -> anyhow::Result<()> {
            if !std::mem::replace(&mut self.0, true) {
                panic!("a bug");
            }
            Ok(())
        }
    }

    #[test]
    fn a_panicking_commit_fails_its_try_and_the_writer_goes_on() {
        let writer = GroupCommit::start("test-writer", Panicky(false)).unwrap();
        let error = writer.submit(1).wait().unwrap_err();
        assert!(format!("{error:#}").contains("panicked"), "{error:#}");
        drop(writer.submit(2));
        writer.barrier().wait().unwrap();
    }

    #[test]
    fn a_barrier_waits_for_the_batch_being_committed() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        assert!(
            writer.barrier().try_result().is_some(),
            "nothing queued: no wait"
        );
        let gate = lock(&sink.gate);
        let _first = writer.submit(1);
        while !lock(&writer.shared.queue).committing {
            std::thread::yield_now();
        }
        let barrier = writer.barrier();
        assert!(barrier.try_result().is_none());
        drop(gate);
        barrier.wait().unwrap();
        assert_eq!(*lock(&sink.batches), [vec![1]]);
    }

    #[test]
    fn callbacks_run_once_committed_and_a_drop_commits_what_is_queued() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        let (sender, receiver) = mpsc::channel();
        let gate = lock(&sink.gate);
        for n in 0..10 {
            let sender = sender.clone();
            writer
                .submit(n)
                .on_done(move |result| sender.send((n, result.is_ok())).unwrap());
        }
        assert!(receiver.try_recv().is_err(), "nothing committed yet");
        drop(gate);
        drop(writer);
        let mut heard: Vec<(u32, bool)> = receiver.try_iter().collect();
        heard.sort();
        assert_eq!(heard, (0..10).map(|n| (n, true)).collect::<Vec<_>>());
        let committed: Vec<u32> = lock(&sink.batches).concat();
        assert_eq!(committed, (0..10).collect::<Vec<_>>());
        assert!(*lock(&sink.finished));
    }

    #[test]
    fn next_step_waits_for_the_batch_being_committed_only() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        assert!(writer.next_step().try_result().is_some(), "idle: no wait");
        let gate = lock(&sink.gate);
        let first = writer.submit(1);
        while !lock(&writer.shared.queue).committing {
            std::thread::yield_now();
        }
        let later = writer.submit(2);
        let step = writer.next_step();
        assert!(step.try_result().is_none());
        drop(gate);
        step.wait().unwrap();
        first.wait().unwrap();
        later.wait().unwrap();
    }

    #[test]
    fn a_flood_is_split_into_bounded_batches_that_all_complete() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        let gate = lock(&sink.gate);
        let _held = writer.submit(0);
        let count = MAX_BATCH as u32 * 2 + 10;
        let pendings: Vec<Pending> = (1..=count).map(|n| writer.submit(n)).collect();
        drop(gate);
        for pending in pendings {
            pending.wait().unwrap();
        }
        let batches = lock(&sink.batches);
        assert!(batches.iter().all(|batch| batch.len() <= MAX_BATCH));
        assert_eq!(batches.concat(), (0..=count).collect::<Vec<_>>());
    }
}
