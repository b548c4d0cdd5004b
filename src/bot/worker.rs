//! `--exec-worker CMD`: long-lived handlers, for programs whose start costs
//! more than their work (an interpreter, a model, a database connection):
//! one update per line on a worker's stdin, one answer per line on its
//! stdout, naming the update it answers. The protocol, and why an answer
//! names its update: ARCHITECTURE.md, "`--exec-worker`"; the user's side:
//! the README.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, ChildStdout};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde_json::Value;

use super::answer::{self, Answer, NotAnAnswer, shown};
use super::child_io::{self, Chunk, ExitWatch};
use super::exec::{MAX_REPLY_BYTES, SetupError, SetupProblem, settle};
use super::{HandleError, Handler, Outcome, chat_label};
use crate::api::{ApiClient, Update};
use crate::children::Group;
use crate::observe::{Step, Steps, capped};
use fly_base::sync::lock;

/// How long workers get to exit by themselves once their stdin is closed.
const EXIT_WAIT: Duration = Duration::from_secs(1);
/// How long a worker's last stderr lines get to reach the log once it is gone.
const LOG_GRACE: Duration = Duration::from_millis(500);
/// The first restart after a failure waits this long; each failure in a
/// row doubles it, up to `MAX_RESTART_DELAY`.
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(100);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(5);
/// Said in the log line of a worker that breaks the protocol.
const PROTOCOL: &str = r#"one JSON object per line naming the update it answers: {"update_id":N,"reply":"text"}, {"update_id":N,"reply":{"msg_type":…,"data":{…}}}, {"update_id":N} or {"update_id":N,"error":"why"}"#;
/// How long a worker that closed its stdout gets to show it is exiting,
/// before it is said to have closed stdout and kept running.
const EXIT_AFTER_STDOUT: Duration = Duration::from_millis(200);

pub struct WorkerPool {
    /// How the command layer names the workers in messages (the option
    /// they came from): this layer names no option itself.
    named: &'static str,
    command: String,
    timeout: Duration,
    client: ApiClient,
    pass_token: bool,
    /// A worker of this pool announced `{"ready":true}`: fresh workers
    /// are handed nothing before they have too.
    announces: AtomicBool,
    state: Mutex<PoolState>,
    changed: Condvar,
}

struct PoolState {
    slots: Vec<Slot>,
    /// Turns of the chats with an update in hand (see [`WorkerPool::take_turn`]).
    chats: HashMap<String, Turns>,
    /// fly is stopping: nothing new starts.
    closed: bool,
    /// Workers told to end (their stdin closed), not yet waited for.
    ending: Vec<Worker>,
}

enum Slot {
    /// Running and waiting for an update.
    Idle(Worker),
    /// Taken by a thread that is starting its worker: no process group yet.
    Starting,
    /// Lent to a thread handling an update, with the worker's process group.
    Busy { group: libc::pid_t },
    /// Not running: (re)started when needed, not before `at`.
    Down { failures: u32, at: Instant },
}

#[derive(Default)]
struct Turns {
    /// The ticket the next update of the chat gets.
    next: u64,
    /// The ticket whose turn it is.
    serving: u64,
}

struct Worker {
    index: usize,
    child: Child,
    group: Group,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    /// Read from stdout and not yet taken as an answer.
    pending: Vec<u8>,
    /// The update it was given last, for the stderr log (0: none yet).
    /// Not reset when the answer comes: the log thread may read a line the
    /// worker wrote before its answer only after the answer was read.
    current: Arc<AtomicI64>,
    /// Closed when the log thread has read stderr to its end.
    logged: mpsc::Receiver<()>,
    /// Failures in a row before this worker started: the backoff goes on
    /// growing until one answers.
    failures: u32,
    /// It said `{"ready":true}`, or answered an update: no announcement is
    /// to come any more.
    ready: bool,
}

/// Why a worker is no good any more.
enum Broken {
    /// It exited (its stdout closed, or its stdin did).
    Exited,
    /// Its stdout closed, but it kept running.
    ClosedStdout,
    /// It did not answer in time. `silent`: waiting for its answer, it
    /// had written nothing of it (its output may be sitting in a buffer).
    TimedOut {
        silent: bool,
    },
    /// It wrote something that is not an answer.
    Garbage(NotProtocol),
    /// It answered another update than the one in hand.
    NotItsUpdate {
        expected: i64,
        got: i64,
    },
    /// Output came while it had no update.
    Unasked(String),
    /// The pool's workers announce readiness; this one wrote something else first.
    NotReady(String),
    Io(std::io::Error),
}

/// A line a worker may write.
#[derive(Debug, PartialEq)]
enum WorkerLine {
    /// `{"ready":true}`: it is ready for its first update.
    Ready,
    /// The answer to the update with this id.
    Answer { update_id: i64, answer: Answer },
}

impl WorkerPool {
    /// Starts `workers` workers at once, so the first updates do not wait
    /// for an interpreter to start.
    pub fn start(
        named: &'static str,
        command: String,
        workers: usize,
        timeout: Duration,
        client: ApiClient,
        pass_token: bool,
    ) -> WorkerPool {
        let now = Instant::now();
        let pool = WorkerPool {
            named,
            command,
            timeout,
            client,
            pass_token,
            announces: AtomicBool::new(false),
            state: Mutex::new(PoolState {
                slots: (0..workers.max(1))
                    .map(|_| Slot::Down {
                        failures: 0,
                        at: now,
                    })
                    .collect(),
                chats: HashMap::new(),
                closed: false,
                ending: Vec::new(),
            }),
            changed: Condvar::new(),
        };
        let mut state = pool.lock();
        for index in 0..state.slots.len() {
            state.slots[index] = match pool.spawn(index, 0) {
                Ok(worker) => Slot::Idle(worker),
                Err(error) => {
                    tracing::warn!(worker = index, "{}: {error:#}", pool.named);
                    Slot::Down {
                        failures: 1,
                        at: now + restart_delay(1),
                    }
                }
            };
        }
        drop(state);
        tracing::info!(
            workers = workers.max(1),
            command = %pool.command,
            "{}: workers started",
            pool.named
        );
        pool
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    fn wait<'a>(
        &self,
        guard: MutexGuard<'a, PoolState>,
        until: Option<Instant>,
    ) -> MutexGuard<'a, PoolState> {
        match until {
            None => self
                .changed
                .wait(guard)
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            Some(at) => {
                self.changed
                    .wait_timeout(guard, at.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0
            }
        }
    }

    /// Starts worker `index`: `sh -c CMD` in a process group of its own,
    /// registered so that no exit path of fly leaves it behind; its stderr
    /// logged by a thread of its own for the worker's whole life.
    fn spawn(&self, index: usize, failures: u32) -> anyhow::Result<Worker> {
        let token = self.pass_token.then(|| self.client.token().expose());
        let mut command = child_io::handler_command(&self.command, token);
        let mut child = command.spawn().context("starting a worker")?;
        let group = Group::register(child.id()).context("registering a worker")?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        child_io::set_nonblocking(&stdin).context("setting up a worker's stdin")?;
        child_io::set_nonblocking(&stdout).context("setting up a worker's stdout")?;
        let current = Arc::new(AtomicI64::new(0));
        let shown = Arc::clone(&current);
        let (done, logged) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(format!("fly-worker-{index}-log"))
            .spawn(move || {
                child_io::log_lines_until_end(
                    stderr,
                    || shown.load(Ordering::Relaxed),
                    |update_id, text| match update_id {
                        0 => tracing::info!(worker = index, "[exec] {text}"),
                        update_id => {
                            tracing::info!(update_id, worker = index, "[exec] {text}");
                            crate::observe::handler_said(update_id, text);
                        }
                    },
                );
                drop(done);
            })
            .context("starting a worker's log thread")?;
        tracing::debug!(worker = index, pid = child.id(), "worker started");
        Ok(Worker {
            index,
            child,
            group,
            stdin: Some(stdin),
            stdout,
            pending: Vec::new(),
            current,
            logged,
            failures,
            ready: false,
        })
    }

    /// Waits until no earlier update of `chat` is in hand: serve-webhook may
    /// be given a chat's updates at the same time, and they go to the
    /// workers one at a time, in the order they came. (poll-echo's
    /// scheduler already hands over one update per chat at a time.)
    fn take_turn(&self, chat: &str) -> Turn<'_> {
        let mut state = self.lock();
        let turns = state.chats.entry(chat.to_string()).or_default();
        let ticket = turns.next;
        turns.next += 1;
        while state
            .chats
            .get(chat)
            .is_some_and(|turns| turns.serving != ticket)
        {
            state = self.wait(state, None);
        }
        Turn {
            pool: self,
            chat: chat.to_string(),
        }
    }

    /// A worker to send an update to: an idle one, else one (re)started
    /// now, else the first to become free or due for a restart.
    fn check_out(&self) -> Result<Worker, HandleError> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return Err(HandleError::Retry(anyhow!(
                    "not sent to a worker: fly is stopping"
                )));
            }
            if let Some(index) = state
                .slots
                .iter()
                .position(|slot| matches!(slot, Slot::Idle(_)))
            {
                let Slot::Idle(idle) = &state.slots[index] else {
                    unreachable!("the slot was idle")
                };
                let busy = Slot::Busy {
                    group: idle.group.id(),
                };
                let Slot::Idle(worker) = std::mem::replace(&mut state.slots[index], busy) else {
                    unreachable!("the slot was idle")
                };
                return Ok(worker);
            }
            let now = Instant::now();
            let due = state.slots.iter().position(|slot| match slot {
                Slot::Down { at, .. } => *at <= now,
                _ => false,
            });
            if let Some(index) = due {
                let Slot::Down { failures, .. } =
                    std::mem::replace(&mut state.slots[index], Slot::Starting)
                else {
                    unreachable!("the slot was down")
                };
                drop(state);
                let started = self.spawn(index, failures);
                state = self.lock();
                match started {
                    Ok(worker) if !state.closed => {
                        state.slots[index] = Slot::Busy {
                            group: worker.group.id(),
                        };
                        return Ok(worker);
                    }
                    Ok(worker) => {
                        // fly began stopping while it started.
                        state.slots[index] = Slot::Down { failures, at: now };
                        drop(state);
                        worker.group.kill();
                        self.changed.notify_all();
                        return Err(HandleError::Retry(anyhow!(
                            "not sent to a worker: fly is stopping"
                        )));
                    }
                    Err(error) => {
                        let failures = failures + 1;
                        state.slots[index] = Slot::Down {
                            failures,
                            at: Instant::now() + restart_delay(failures),
                        };
                        self.changed.notify_all();
                        return Err(HandleError::Retry(error));
                    }
                }
            }
            let next_restart = state
                .slots
                .iter()
                .filter_map(|slot| match slot {
                    Slot::Down { at, .. } => Some(*at),
                    _ => None,
                })
                .min();
            state = self.wait(state, next_restart);
        }
    }

    /// Gives back a worker that answered.
    fn check_in(&self, mut worker: Worker) {
        worker.failures = 0;
        let index = worker.index;
        let mut state = self.lock();
        if state.closed {
            // fly began stopping while it worked: told to end at once.
            worker.stdin = None;
            state.ending.push(worker);
            return;
        }
        state.slots[index] = Slot::Idle(worker);
        drop(state);
        self.changed.notify_all();
    }

    /// Kills a broken worker's group and schedules its restart. An exit
    /// status of 126 or 127 (the command cannot be run at all) is a
    /// set-up error, as for `--exec`.
    fn retire(&self, mut worker: Worker, why: &Broken) -> Option<SetupError> {
        let closed_stdout = matches!(why, Broken::Exited) && worker.still_running();
        let why = if closed_stdout {
            &Broken::ClosedStdout
        } else {
            why
        };
        worker.group.kill();
        let status = worker.child.wait().ok();
        worker.group.leader_reaped();
        worker.log_the_rest(Instant::now() + LOG_GRACE);
        let failures = worker.failures + 1;
        let delay = restart_delay(failures);
        let index = worker.index;
        let setup = status
            .and_then(SetupProblem::from_status)
            .map(|problem| SetupError::new(self.named, &self.command, problem));
        let exit = status.map_or_else(|| "unknown".to_string(), |status| status.to_string());
        let mut state = self.lock();
        if !state.closed && setup.is_none() {
            crate::observe::metrics().handler_restarts.inc();
            tracing::warn!(
                worker = index,
                failures,
                "worker {}; killed ({exit}), restarting in {:.1} s",
                describe(why, self.timeout),
                delay.as_secs_f64()
            );
        }
        state.slots[index] = Slot::Down {
            failures,
            at: Instant::now() + delay,
        };
        drop(state);
        self.changed.notify_all();
        setup
    }

    /// Sends `update` to a worker and waits for its answer.
    fn ask(&self, update: &Update) -> Result<Answer, HandleError> {
        let line = one_line(&update.raw);
        // A worker found dead (or talking out of turn) before the update was
        // sent costs the update nothing: another one takes it. Bounded, for
        // a command whose every worker dies at once.
        for _ in 0..3 {
            let mut worker = self.check_out()?;
            let deadline = Instant::now() + self.timeout;
            let result = match self.get_ready(&mut worker, deadline) {
                Err(broken) => Err((broken, false)),
                Ok(()) => {
                    worker.current.store(update.update_id, Ordering::Relaxed);
                    let exchanged = worker
                        .write_line(&line, deadline)
                        .and_then(|()| self.read_answer(&mut worker, update.update_id, deadline));
                    exchanged.map_err(|broken| (broken, true))
                }
            };
            match result {
                Ok(answer) => {
                    self.check_in(worker);
                    return Ok(answer);
                }
                Err((broken, sent)) => {
                    let index = worker.index;
                    if let Some(setup) = self.retire(worker, &broken) {
                        return Err(HandleError::Fatal(setup.into()));
                    }
                    if sent {
                        return Err(HandleError::Retry(anyhow!(
                            "{} {:?}: worker {index} {}",
                            self.named,
                            self.command,
                            describe(&broken, self.timeout)
                        )));
                    }
                }
            }
        }
        Err(HandleError::Retry(anyhow!(
            "{} {:?}: the workers keep exiting",
            self.named,
            self.command
        )))
    }

    /// Before an update is handed over: the worker must still run and have
    /// said nothing but, at most, its announcement; if the pool's workers
    /// announce, a fresh one must have done so (waited for until `deadline`).
    fn get_ready(&self, worker: &mut Worker, deadline: Instant) -> Result<(), Broken> {
        worker.check_quiet()?;
        // Its announcement began, or one is to come (the pool's workers announce).
        if !worker.ready && (!worker.pending.is_empty() || self.announces.load(Ordering::Relaxed)) {
            return self.take_announcement(worker, deadline);
        }
        Ok(())
    }

    /// Reads the worker's first line, which must be `{"ready":true}`.
    fn take_announcement(&self, worker: &mut Worker, deadline: Instant) -> Result<(), Broken> {
        let line = worker.read_line(deadline)?;
        match parse_line(&line) {
            Ok(WorkerLine::Ready) => {
                self.announced(worker);
                // Anything after the announcement, before an update, is unasked.
                worker.check_quiet()
            }
            _ => Err(Broken::NotReady(shown(&line))),
        }
    }

    fn announced(&self, worker: &mut Worker) {
        worker.ready = true;
        if !self.announces.swap(true, Ordering::Relaxed) {
            tracing::debug!(
                worker = worker.index,
                "the workers announce {{\"ready\":true}}: fresh ones get no update before"
            );
        }
    }

    /// The worker's answer to update `update_id`: the next line, which must
    /// name that update (a fresh worker's announcement may come first).
    fn read_answer(
        &self,
        worker: &mut Worker,
        update_id: i64,
        deadline: Instant,
    ) -> Result<Answer, Broken> {
        loop {
            let line = worker.read_line(deadline)?;
            match parse_line(&line).map_err(Broken::Garbage)? {
                WorkerLine::Ready if !worker.ready => self.announced(worker),
                WorkerLine::Ready => {
                    return Err(Broken::Garbage(
                        format!("{} again, while it had update {update_id}", shown(&line)).into(),
                    ));
                }
                WorkerLine::Answer {
                    update_id: answered,
                    answer,
                } if answered == update_id => {
                    worker.ready = true;
                    return Ok(answer);
                }
                WorkerLine::Answer {
                    update_id: answered,
                    ..
                } => {
                    return Err(Broken::NotItsUpdate {
                        expected: update_id,
                        got: answered,
                    });
                }
            }
        }
    }

    /// Starts nothing more; kills the groups of workers with an update in
    /// hand (their updates fail and come again) and closes the stdin of
    /// the idle ones, which are kept in `ending` to be waited for.
    fn close_slots(&self) {
        let mut state = self.lock();
        state.closed = true;
        let mut idle = Vec::new();
        for slot in &mut state.slots {
            match slot {
                Slot::Busy { group } => {
                    crate::children::kill_group(*group);
                }
                Slot::Idle(_) => {
                    let Slot::Idle(mut worker) = std::mem::replace(
                        slot,
                        Slot::Down {
                            failures: 0,
                            at: Instant::now(),
                        },
                    ) else {
                        unreachable!("the slot was idle")
                    };
                    worker.stdin = None;
                    idle.push(worker);
                }
                // The starting thread sees `closed` and kills what it started.
                Slot::Starting | Slot::Down { .. } => {}
            }
        }
        state.ending.extend(idle);
        drop(state);
        self.changed.notify_all();
    }

    /// Every worker told to end, given what is left of its moment to exit,
    /// then killed with its group.
    fn end_all(&self) {
        self.close_slots();
        let ending = std::mem::take(&mut self.lock().ending);
        end_gracefully(ending);
    }
}

/// The turn of one update of a chat; the next update's turn when dropped.
struct Turn<'a> {
    pool: &'a WorkerPool,
    chat: String,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        if let Some(turns) = state.chats.get_mut(&self.chat) {
            turns.serving += 1;
            if turns.serving == turns.next {
                state.chats.remove(&self.chat);
            }
        }
        drop(state);
        self.pool.changed.notify_all();
    }
}

impl Handler for WorkerPool {
    /// Only message updates go to a worker.
    fn is_instant(&self, update: &Update) -> bool {
        update.message.is_none()
    }

    fn handle(&self, update: &Update, steps: &mut Steps) -> Result<Outcome, HandleError> {
        let Some(message) = update.message.as_ref() else {
            // Not a message: confirmed without a reply, as with --exec.
            return Ok(Outcome::Ignored);
        };
        steps.note(|capture| capture.handler = Some(format!("{} {}", self.named, self.command)));
        let answer = steps.time(Step::Handler, || {
            let _turn = self.take_turn(&chat_label(update));
            self.ask(update)
        })?;
        if let Answer::Reply(reply) = &answer {
            steps.note(|capture| capture.stdout = Some(capped(&reply.as_text())));
        }
        let who = format!("{} {:?}", self.named, self.command);
        settle(answer, &self.client, update, message, steps, &who)
    }

    /// The grace period is over: workers with an update in hand are killed
    /// (their updates come again), the others get the end of their stdin
    /// (and get killed by `close`, or by the last step of `main`, if they
    /// do not exit). Nothing starts any more.
    fn abandon(&self) {
        self.close_slots();
    }

    fn close(&self) {
        self.end_all();
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.end_all();
    }
}

/// The end of stdin for every worker, up to [`EXIT_WAIT`] to exit, then
/// SIGKILL to each group (anything they started included) and the reaping.
fn end_gracefully(mut workers: Vec<Worker>) {
    if workers.is_empty() {
        return;
    }
    for worker in &mut workers {
        worker.stdin = None;
    }
    let deadline = Instant::now() + EXIT_WAIT;
    for worker in &mut workers {
        if let Ok(exit) = ExitWatch::new(worker.child.id()) {
            let _ = exit.wait_until(deadline);
        }
        worker.group.kill();
        let _ = worker.child.wait();
        worker.group.leader_reaped();
        worker.log_the_rest(deadline + LOG_GRACE);
    }
}

/// After `failures` failures in a row: 0.1 s, 0.2 s, 0.4 s, … up to 5 s.
fn restart_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_RESTART_DELAY * 2u32.pow(doublings)).min(MAX_RESTART_DELAY)
}

fn describe(broken: &Broken, timeout: Duration) -> String {
    match broken {
        Broken::Exited => "exited".to_string(),
        Broken::ClosedStdout => "closed its stdout but kept running".to_string(),
        Broken::TimedOut { silent: false } => {
            format!("did not answer within {timeout:?} (the handler timeout)")
        }
        Broken::TimedOut { silent: true } => format!(
            "did not answer within {timeout:?} (the handler timeout) and wrote nothing: if \
             its output is buffered, the answer never left it; flush each answer (Python: \
             print(…, flush=True), or run python3 -u; Node's process.stdout.write is already \
             unbuffered on a pipe)"
        ),
        Broken::Garbage(why) => format!("broke the protocol ({PROTOCOL}): {why}"),
        Broken::NotItsUpdate { expected, got } => format!(
            "answered update {got} while it had update {expected} (a late or extra answer?); \
             each answer names the update it answers, and only the one in hand is taken"
        ),
        Broken::Unasked(what) => format!(
            "wrote to stdout while it had no update ({what}); stdout is for answers only \
             (and a first {{\"ready\":true}}), log to stderr"
        ),
        Broken::NotReady(what) => format!(
            "wrote {what} before its first update, where the other workers announce \
             {{\"ready\":true}}"
        ),
        Broken::Io(error) => format!("could not be talked to: {error}"),
    }
}

impl Worker {
    /// Once the worker is gone: its last stderr lines reach the log (until
    /// `deadline`, for a process that escaped its group and holds stderr).
    fn log_the_rest(&self, deadline: Instant) {
        let _ = self
            .logged
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }

    /// Whether the worker still runs a moment after its stdout closed:
    /// then it closed stdout itself rather than exiting.
    fn still_running(&self) -> bool {
        ExitWatch::new(self.child.id())
            .and_then(|exit| exit.wait_until(Instant::now() + EXIT_AFTER_STDOUT))
            .is_ok_and(|exited| !exited)
    }

    /// Before an update is sent: the worker must still run and have said
    /// nothing since its last answer but, before its first update, its
    /// announcement (kept in `pending` for [`WorkerPool::get_ready`]).
    fn check_quiet(&mut self) -> Result<(), Broken> {
        let mut fds = [child_io::want(self.stdout.as_raw_fd(), libc::POLLIN)];
        if child_io::wait(&mut fds, Some(Instant::now())).map_err(Broken::Io)? {
            let mut buffer = [0u8; 4096];
            match child_io::read_some(&mut self.stdout, &mut buffer) {
                Chunk::End => return Err(Broken::Exited),
                Chunk::Data(read) => self.pending.extend_from_slice(&buffer[..read]),
                Chunk::Empty => {}
            }
        }
        if !self.pending.is_empty() && (self.ready || !could_be_announcement(&self.pending)) {
            return Err(Broken::Unasked(shown(&self.pending)));
        }
        Ok(())
    }

    fn write_line(&mut self, line: &[u8], deadline: Instant) -> Result<(), Broken> {
        let stdin = self.stdin.as_mut().ok_or(Broken::Exited)?;
        let mut rest = line;
        while !rest.is_empty() {
            match stdin.write(rest) {
                Ok(written) => rest = &rest[written..],
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    // A worker busy with something else, or not reading.
                    let mut fds = [child_io::want(stdin.as_raw_fd(), libc::POLLOUT)];
                    if !child_io::wait(&mut fds, Some(deadline)).map_err(Broken::Io)? {
                        return Err(Broken::TimedOut { silent: false });
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Err(Broken::Exited);
                }
                Err(error) => return Err(Broken::Io(error)),
            }
        }
        Ok(())
    }

    /// The next line of stdout, without its line ending.
    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, Broken> {
        let mut buffer = [0u8; 8192];
        let mut searched = 0;
        loop {
            if let Some(line) = take_line(&mut self.pending, searched).map_err(Broken::Garbage)? {
                return Ok(line);
            }
            searched = self.pending.len();
            let mut fds = [child_io::want(self.stdout.as_raw_fd(), libc::POLLIN)];
            if !child_io::wait(&mut fds, Some(deadline)).map_err(Broken::Io)? {
                return Err(Broken::TimedOut {
                    silent: self.pending.is_empty(),
                });
            }
            match child_io::read_some(&mut self.stdout, &mut buffer) {
                Chunk::Data(read) => self.pending.extend_from_slice(&buffer[..read]),
                Chunk::End if self.pending.is_empty() => return Err(Broken::Exited),
                Chunk::End => {
                    return Err(Broken::Garbage(
                        format!("{} and no newline before it exited", shown(&self.pending)).into(),
                    ));
                }
                Chunk::Empty => {}
            }
        }
    }
}

/// The first whole line of `pending` (taken out of it, without its line
/// ending), `None` while it has no newline; an error for a line over the
/// cap, however it arrived (whole in one read, or a piece at a time).
/// `searched`: how much of `pending` is known to hold no newline.
fn take_line(pending: &mut Vec<u8>, searched: usize) -> Result<Option<Vec<u8>>, NotProtocol> {
    let newline = pending[searched..].iter().position(|&b| b == b'\n');
    if newline.map_or(pending.len(), |at| searched + at) > MAX_REPLY_BYTES {
        return Err(format!("a line longer than {} KiB", MAX_REPLY_BYTES / 1024).into());
    }
    let Some(at) = newline else {
        return Ok(None);
    };
    let end = searched + at;
    let rest = pending.split_off(end + 1);
    let mut line = std::mem::replace(pending, rest);
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

/// Whether what a worker wrote before its first update may be (the start
/// of) its `{"ready":true}` line: anything else is unasked output.
fn could_be_announcement(pending: &[u8]) -> bool {
    match pending.iter().position(|&byte| byte == b'\n') {
        Some(end) => matches!(parse_line(&pending[..end]), Ok(WorkerLine::Ready)),
        None => pending.len() < 64 && pending.trim_ascii_start().first() == Some(&b'{'),
    }
}

/// Why a line of a worker is not one of the protocol's (see [`PROTOCOL`]).
type NotProtocol = NotAnAnswer;

/// One line of a worker, or why it is not one of the protocol's: the
/// announcement, or an answer (the one answer language, [`answer`]) that
/// names its update.
fn parse_line(line: &[u8]) -> Result<WorkerLine, NotProtocol> {
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(line) else {
        return Err(NotAnAnswer(format!("got {}", shown(line))));
    };
    if object.len() == 1 && object.get("ready") == Some(&Value::Bool(true)) {
        return Ok(WorkerLine::Ready);
    }
    let answered = answer::from_object(object, line)?;
    let Some(update_id) = answered.update_id else {
        return Err(format!(
            "no update_id in {}: each answer names the update it answers",
            shown(line)
        )
        .into());
    };
    Ok(WorkerLine::Answer {
        update_id,
        answer: answered.answer,
    })
}

/// The update on one line, for a worker's stdin: the whitespace between
/// tokens dropped, every token kept byte for byte.
///
/// Why a lexer and not a JSON parser and writer: the worker is to see the
/// update as the platform sent it, and re-serialising would change it (big
/// integers, `1E2`, `\u00e9` escapes, key order, duplicate keys). And why
/// this is enough: the text already parsed as JSON (it is an update), so
/// outside strings, whitespace only ever separates tokens, and two tokens
/// of a valid document always have a structural character (`{}[],:`)
/// between them, so dropping it can never join two into one; strings are
/// copied as they are, from the opening quote to the closing one, with
/// escapes (`\"`, `\\`) skipped over. A string cannot hold a raw line break
/// (strict JSON, as the platform's Python reads it, refuses control
/// characters in strings), so the line has no newline but its last; a raw
/// control character that got through anyway is written as its `\u00XX`
/// escape, the same string, so that the line stays one line.
pub fn one_line(raw: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(raw.len() + 1);
    let mut in_string = false;
    let mut escaped = false;
    for &byte in raw.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            } else if byte < 0x20 {
                line.extend_from_slice(format!("\\u{byte:04x}").as_bytes());
                continue;
            }
            line.push(byte);
        } else if !matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = byte == b'"';
            line.push(byte);
        }
    }
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bot::answer::Reply;

    fn compact(raw: &str) -> String {
        String::from_utf8(one_line(raw)).unwrap()
    }

    #[test]
    fn the_update_is_one_line_with_every_token_kept() {
        let raw = "{\n  \"update_id\" : 18446744073709551617,\r\n\t\"type\": \"message\",\n  \
                   \"message\": {\"data\": {\"content\": \"a  b\\n \\\" { , \\\\\", \
                   \"n\": [1E2, -0.5e-3, true, null, NaN, -Infinity], \"x\": \"\\u00e9\\/\"}}\n}\n";
        assert_eq!(
            compact(raw),
            "{\"update_id\":18446744073709551617,\"type\":\"message\",\"message\":{\"data\":\
             {\"content\":\"a  b\\n \\\" { , \\\\\",\"n\":[1E2,-0.5e-3,true,null,NaN,-Infinity],\
             \"x\":\"\\u00e9\\/\"}}}\n"
        );
        // Already compact: unchanged.
        let tight = r#"{"a":"b c","d":[1,2]}"#;
        assert_eq!(compact(tight), format!("{tight}\n"));
        // Multi-byte text stays as it is.
        assert_eq!(
            compact("{ \"t\" : \"héllo 🌍\" }"),
            "{\"t\":\"héllo 🌍\"}\n"
        );
    }

    #[test]
    fn a_raw_control_character_in_a_string_is_escaped_so_the_line_stays_one() {
        assert_eq!(compact("{\"a\":\"x\ny\"}"), "{\"a\":\"x\\u000ay\"}\n");
    }

    fn answer(line: &[u8]) -> Result<Answer, NotProtocol> {
        match parse_line(line)? {
            WorkerLine::Answer {
                update_id: 7,
                answer,
            } => Ok(answer),
            other => Err(NotAnAnswer(format!("not an answer to 7: {other:?}"))),
        }
    }

    #[test]
    fn answers_are_the_four_shapes_naming_their_update_and_nothing_else() {
        assert_eq!(answer(br#"{"update_id":7}"#), Ok(Answer::Nothing));
        assert_eq!(answer(br#" { "update_id" : 7 } "#), Ok(Answer::Nothing));
        assert_eq!(
            answer(br#"{"update_id":7,"reply":"hi"}"#),
            Ok(Answer::Reply(Reply::Text("hi".into())))
        );
        assert_eq!(
            answer(br#"{"reply":"hi","update_id":7}"#),
            Ok(Answer::Reply(Reply::Text("hi".into())))
        );
        assert_eq!(
            answer(br#"{"update_id":7,"reply":"  "}"#),
            Ok(Answer::Nothing)
        );
        let Ok(Answer::Reply(Reply::Message { msg_type, data })) =
            answer(br#"{"update_id":7,"reply":{"msg_type":"image","data":{"originalUrl":"u"}}}"#)
        else {
            panic!("a message reply");
        };
        assert_eq!(msg_type, "image");
        assert_eq!(data["originalUrl"], "u");
        assert_eq!(
            answer(br#"{"update_id":7,"error":"db down"}"#),
            Ok(Answer::Error("db down".into()))
        );
        assert_eq!(
            parse_line(br#"{"update_id":8,"reply":"late"}"#),
            Ok(WorkerLine::Answer {
                update_id: 8,
                answer: Answer::Reply(Reply::Text("late".into()))
            })
        );
        assert_eq!(parse_line(br#"{"ready":true}"#), Ok(WorkerLine::Ready));
        for garbage in [
            &b"hello"[..],
            b"",
            b"[]",
            b"\"reply\"",
            b"{}",
            br#"{"reply":"hi"}"#,
            br#"{"error":"why"}"#,
            br#"{"update_id":"7"}"#,
            br#"{"update_id":7.5}"#,
            br#"{"update_id":null,"reply":"x"}"#,
            br#"{"update_id":7,"reply":"a","error":"b"}"#,
            br#"{"update_id":7,"replay":"typo"}"#,
            br#"{"update_id":7,"reply":3}"#,
            br#"{"update_id":7,"reply":null}"#,
            br#"{"update_id":7,"error":{}}"#,
            br#"{"update_id":7,"reply":{"msg_type":"text"}}"#,
            br#"{"update_id":7,"reply":{"msg_type":"text","data":{},"x":1}}"#,
            br#"{"ready":false}"#,
            br#"{"ready":true,"update_id":7}"#,
            br#"{"update_id":7} {}"#,
        ] {
            assert!(
                answer(garbage).is_err(),
                "{}",
                String::from_utf8_lossy(garbage)
            );
        }
        let no_id = parse_line(br#"{"reply":"hi"}"#).unwrap_err().0;
        assert!(no_id.contains("no update_id"), "{no_id}");
    }

    #[test]
    fn only_a_ready_line_may_come_before_the_first_update() {
        assert!(could_be_announcement(b"{\"ready\":true}\n"));
        assert!(could_be_announcement(b"{\"rea"));
        assert!(!could_be_announcement(b"{}\n"));
        assert!(!could_be_announcement(b"{\"reply\":\"banner\"}\n"));
        assert!(!could_be_announcement(b"starting up"));
        assert!(!could_be_announcement(&[b'{'; 100]));
    }

    #[test]
    fn a_line_over_the_cap_is_refused_even_when_it_came_whole() {
        let mut pending = b"{\"a\":1}\r\nnext".to_vec();
        assert_eq!(
            take_line(&mut pending, 0).unwrap(),
            Some(b"{\"a\":1}".to_vec())
        );
        assert_eq!(pending, b"next");
        assert_eq!(take_line(&mut pending, 0).unwrap(), None);
        // Over the cap: in one piece with its newline, or still unfinished.
        let mut whole = vec![b'a'; MAX_REPLY_BYTES + 1];
        whole.push(b'\n');
        assert!(take_line(&mut whole, 0).is_err());
        let mut unfinished = vec![b'a'; MAX_REPLY_BYTES + 1];
        assert!(take_line(&mut unfinished, 0).is_err());
        let mut at_the_cap = vec![b'a'; MAX_REPLY_BYTES];
        at_the_cap.push(b'\n');
        assert_eq!(
            take_line(&mut at_the_cap, 0).unwrap().unwrap().len(),
            MAX_REPLY_BYTES
        );
    }

    #[test]
    fn restarts_back_off_up_to_five_seconds() {
        assert_eq!(restart_delay(1), Duration::from_millis(100));
        assert_eq!(restart_delay(2), Duration::from_millis(200));
        assert_eq!(restart_delay(4), Duration::from_millis(800));
        assert_eq!(restart_delay(7), Duration::from_secs(5));
        assert_eq!(restart_delay(u32::MAX), Duration::from_secs(5));
    }
}
