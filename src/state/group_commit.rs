//! Group commit: many small writes, one transaction. Callers hand writes to
//! a writer thread and go on at once; the thread commits whatever has
//! gathered since its last commit as one batch (so under load a transaction
//! holds the writes of the last few milliseconds, and when idle a lone write
//! is committed at once), and between batches does the sink's upkeep
//! (pruning). Each write comes with a [`Pending`] that completes when its
//! batch is committed, for callers that must not go on before that.
//!
//! Nothing here knows SQLite: the [`Sink`] does the writing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::anyhow;

use crate::sync::lock;

/// Where the batches go: called on the writer thread only.
pub trait Sink<W>: Send + 'static {
    /// Writes the batch as one transaction: all of it, or none.
    fn commit(&mut self, writes: &[W]) -> anyhow::Result<()>;

    /// Upkeep between batches (pruning), done when it is due; returns when
    /// it is due next. Keep each call short: batches wait for it.
    fn maintain(&mut self) -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// The last call, after the last batch (a clean stop).
    fn finish(&mut self) {}
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
}

struct Queue<W> {
    /// The next batch, and what completes when it is committed.
    writes: Vec<W>,
    done: Arc<Completion>,
    /// Someone waits for `done` though `writes` may be empty (a barrier).
    barrier_wanted: bool,
    /// The writer is committing a batch taken from here.
    committing: bool,
    /// Completes when the writer ends the step (a batch, or part of one) it
    /// is on: what a producer that is too far ahead waits for.
    step: Arc<Completion>,
    /// The writer waits for work: a new write must wake it.
    writer_idle: bool,
    stopping: bool,
    /// Why a part of a split batch failed: the completion shared by all its
    /// parts fails with it.
    split_failure: Option<String>,
}

/// Batches larger than this are split, so one transaction stays short.
const MAX_BATCH: usize = 1024;

impl<W: Send + 'static> GroupCommit<W> {
    pub fn start(name: &str, sink: impl Sink<W>) -> anyhow::Result<GroupCommit<W>> {
        let shared = Arc::new(Handoff {
            queue: Mutex::new(Queue {
                writes: Vec::new(),
                done: Arc::new(Completion::default()),
                barrier_wanted: false,
                committing: false,
                step: Arc::new(Completion::default()),
                writer_idle: false,
                stopping: false,
                split_failure: None,
            }),
            wake_writer: Condvar::new(),
        });
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn({
                let shared = Arc::clone(&shared);
                move || write_batches(&shared, sink)
            })
            .map_err(|error| anyhow!("starting the {name} thread: {error}"))?;
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
        queue.writes.push(write);
        let done = Arc::clone(&queue.done);
        if queue.writer_idle {
            queue.writer_idle = false;
            self.shared.wake_writer.notify_one();
        }
        (Pending(Some(done)), queue.writes.len())
    }

    /// Writes queued for the next batch: how far behind the writer is.
    pub fn backlog(&self) -> usize {
        lock(&self.shared.queue).writes.len()
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

    /// Completes once every write submitted before it is committed.
    pub fn barrier(&self) -> Pending {
        let mut queue = lock(&self.shared.queue);
        if queue.writes.is_empty() && !queue.committing {
            return Pending::done();
        }
        queue.barrier_wanted = true;
        let done = Arc::clone(&queue.done);
        if queue.writer_idle {
            queue.writer_idle = false;
            self.shared.wake_writer.notify_one();
        }
        Pending(Some(done))
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

/// The writer thread: batch after batch until stopped with nothing queued.
fn write_batches<W>(shared: &Handoff<W>, mut sink: impl Sink<W>) {
    let mut maintenance_due = Instant::now();
    let mut queue = lock(&shared.queue);
    loop {
        if Instant::now() >= maintenance_due {
            drop(queue);
            maintenance_due =
                catch_unwind(AssertUnwindSafe(|| sink.maintain())).unwrap_or_else(|_| {
                    tracing::error!("the state store's upkeep panicked; tried again in a minute");
                    Instant::now() + Duration::from_secs(60)
                });
            queue = lock(&shared.queue);
            continue;
        }
        if queue.writes.is_empty() && !queue.barrier_wanted {
            if queue.stopping {
                break;
            }
            queue.writer_idle = true;
            let wait = maintenance_due.saturating_duration_since(Instant::now());
            queue = shared
                .wake_writer
                .wait_timeout(queue, wait)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
            queue.writer_idle = false;
            continue;
        }
        let (writes, done) = if queue.writes.len() > MAX_BATCH {
            // The rest stays queued with the same completion, which the
            // batch that empties the queue completes.
            let rest = queue.writes.split_off(MAX_BATCH);
            (std::mem::replace(&mut queue.writes, rest), None)
        } else {
            queue.barrier_wanted = false;
            let done = std::mem::replace(&mut queue.done, Arc::new(Completion::default()));
            (std::mem::take(&mut queue.writes), Some(done))
        };
        queue.committing = true;
        drop(queue);

        // A panic fails the batch like an error (the transaction is rolled
        // back as it unwinds) rather than the thread, whose waiters would
        // then wait forever.
        let result = if writes.is_empty() {
            Ok(())
        } else {
            match catch_unwind(AssertUnwindSafe(|| sink.commit(&writes))) {
                Ok(committed) => committed.map_err(|error| format!("{error:#}")),
                Err(_) => Err("the state store's writer panicked".to_string()),
            }
        };
        if let Err(error) = &result {
            tracing::error!(
                writes = writes.len(),
                "the state store could not save a batch: {error}"
            );
        }
        drop(writes);
        queue = lock(&shared.queue);
        queue.committing = false;
        let step = std::mem::replace(&mut queue.step, Arc::new(Completion::default()));
        drop(queue);
        step.complete(Ok(()));
        queue = lock(&shared.queue);
        match done {
            Some(done) => {
                // The completion of a split batch's first part fails with it.
                let failed = queue.split_failure.take().or(result.err());
                drop(queue);
                done.complete(failed.map_or(Ok(()), Err));
                queue = lock(&shared.queue);
            }
            None => {
                if let Err(error) = result {
                    queue.split_failure.get_or_insert(error);
                }
            }
        }
    }
    drop(queue);
    sink.finish();
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

    /// Blocks until committed: on a blocking thread only.
    pub fn wait(self) -> anyhow::Result<()> {
        let Some(completion) = self.0 else {
            return Ok(());
        };
        let mut state = lock(&completion.state);
        loop {
            if let Some(result) = &state.result {
                return into_anyhow(result.clone());
            }
            state = completion
                .committed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
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
    result: Option<Result<(), String>>,
    callbacks: Vec<Callback>,
}

impl Completion {
    fn complete(&self, result: Result<(), String>) {
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
}

fn into_anyhow(result: Result<(), String>) -> anyhow::Result<()> {
    result.map_err(|error| anyhow!("saving to the state store: {error}"))
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
        fail_next: Arc<Mutex<bool>>,
        finished: Arc<Mutex<bool>>,
    }

    impl Sink<u32> for Recorder {
        fn commit(&mut self, writes: &[u32]) -> anyhow::Result<()> {
            drop(lock(&self.gate));
            if std::mem::take(&mut *lock(&self.fail_next)) {
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
    fn a_failed_batch_fails_its_writes_and_the_next_batch_goes_on() {
        let sink = Recorder::default();
        let writer = GroupCommit::start("test-writer", sink.clone()).unwrap();
        *lock(&sink.fail_next) = true;
        let error = writer.submit(1).wait().unwrap_err();
        assert!(format!("{error:#}").contains("disk full"), "{error:#}");
        writer.submit(2).wait().unwrap();
        assert_eq!(*lock(&sink.batches), [vec![2]]);
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
    fn a_panicking_commit_fails_its_batch_and_the_writer_goes_on() {
        let writer = GroupCommit::start("test-writer", Panicky(false)).unwrap();
        let error = writer.submit(1).wait().unwrap_err();
        assert!(format!("{error:#}").contains("panicked"), "{error:#}");
        writer.submit(2).wait().unwrap();
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
