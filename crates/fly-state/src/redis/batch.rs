//! Group commit for serve-webhook's hot path: the admissions and handled
//! marks asked for while a call is on its way go together in the next
//! call, one script ([`BATCH`]) that answers each in turn.
//!
//! A thread of the batcher's own makes the calls: it takes everything
//! queued, sends it in one call, answers each request, and takes what
//! queued meanwhile. Alone, a request is sent at once; under load, one
//! round trip carries the requests of many deliveries (ARCHITECTURE.md,
//! "The Redis state"). A request is answered to a caller that waits for
//! it ([`Batcher::run`], on a blocking thread) or to a callback
//! ([`Batcher::submit`]: serve-webhook's I/O threads, which no thread
//! waits for).
//!
//! Each request is answered only once the server has answered the call
//! that carried it: a mark is in Redis before its delivery is answered,
//! as when it was a call of its own. A request waits at most its
//! [`CALL_TIMEOUT`] in all: the call is given the time left to the
//! earliest of its requests, and one whose time is up before it can be
//! sent fails without being sent.

use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use redis::{Script, Value};

use super::{CALL_TIMEOUT, Core};
use crate::Unavailable;
use fly_base::sync::lock;

/// Requests carried by one call at most.
const MAX_BATCH: usize = 256;

/// Admits deliveries and marks updates handled, each in turn, each atomic
/// (the script is). Per request, in ARGV:
///
/// - `a`, update key, nonce TTL in seconds (`''`: no nonce), claim token,
///   claim lease in ms; KEYS: handled, claim, and the nonce's if any.
///   Answers `duplicate`, `nonce_reused`, `in_progress` or `admitted`
///   (the claim taken), in the order the receiver answers.
/// - `m`, outcome, TTL in seconds; KEYS: handled, claim. Marks the update
///   handled and deletes its claim, whoever holds it: a delivery that
///   finds the mark answers it as a duplicate, so the claim keeps nothing
///   out any more. Answers `marked`.
///
/// A request that fails (a key of another type, put there by something
/// else) is answered `!` and the error, and the others go on.
static BATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local function admit(k, i)
  if redis.call('EXISTS', KEYS[k]) == 1 then return 'duplicate' end
  if ARGV[i + 2] ~= '' then
    local nonce = KEYS[k + 2]
    if not redis.call('SET', nonce, ARGV[i + 1], 'NX', 'EX', ARGV[i + 2]) then
      local seen = redis.call('GET', nonce)
      if seen and seen ~= ARGV[i + 1] then return 'nonce_reused' end
      if not seen then redis.call('SET', nonce, ARGV[i + 1], 'EX', ARGV[i + 2]) end
    end
  end
  if redis.call('SET', KEYS[k + 1], ARGV[i + 3], 'NX', 'PX', ARGV[i + 4]) then
    return 'admitted'
  end
  return 'in_progress'
end
local function mark(k, i)
  redis.call('SET', KEYS[k], ARGV[i + 1], 'EX', ARGV[i + 2])
  redis.call('DEL', KEYS[k + 1])
  return 'marked'
end
local answers, k, i = {}, 1, 1
while i <= #ARGV do
  local ok, answer
  if ARGV[i] == 'a' then
    ok, answer = pcall(admit, k, i)
    if ARGV[i + 2] ~= '' then k = k + 3 else k = k + 2 end
    i = i + 5
  else
    ok, answer = pcall(mark, k, i)
    k, i = k + 2, i + 3
  end
  if not ok then
    if type(answer) == 'table' then answer = answer.err end
    answer = '!' .. tostring(answer)
  end
  answers[#answers + 1] = answer
end
return answers
",
    )
});

/// One request of a batch.
pub(super) enum Op {
    /// A delivery's admission (see [`BATCH`]).
    Admit {
        handled: String,
        claim: String,
        /// The nonce's key and its TTL in seconds, when the delivery has one.
        nonce: Option<(String, i64)>,
        update_key: String,
        token: u64,
        lease_ms: u64,
    },
    /// An update marked handled, its claim deleted.
    Mark {
        handled: String,
        claim: String,
        outcome: String,
        ttl: u64,
    },
}

/// The answer to one request: the script's word, or why it failed.
pub(super) type Answer = anyhow::Result<String>;

/// Where a waiting caller's answer is left.
#[derive(Default)]
struct Slot {
    answer: Mutex<Option<Answer>>,
    changed: Condvar,
}

/// Who is told a request's answer.
enum Reply {
    Wait(Arc<Slot>),
    Then(Box<dyn FnOnce(Answer) + Send>),
}

impl Reply {
    fn send(self, answer: Answer) {
        match self {
            Reply::Wait(slot) => {
                *lock(&slot.answer) = Some(answer);
                slot.changed.notify_one();
            }
            Reply::Then(then) => then(answer),
        }
    }
}

struct Queued {
    op: Op,
    /// When its caller's time is up.
    deadline: Instant,
    reply: Reply,
}

#[derive(Default)]
struct Line {
    queued: Vec<Queued>,
    /// The thread waits for a request (and must be woken).
    idle: bool,
    /// The store is dropped: the thread ends once the line is empty.
    closed: bool,
    /// Requests in the call on its way.
    sending: usize,
}

/// The requests waiting for the next call, and the thread that makes it.
pub(super) struct Batcher {
    core: Arc<Core>,
    line: Mutex<Line>,
    wake: Condvar,
}

impl Batcher {
    /// Starts the batcher's thread; it ends after [`Batcher::close`].
    pub(super) fn start(core: &Arc<Core>) -> anyhow::Result<Arc<Batcher>> {
        let batcher = Arc::new(Batcher {
            core: Arc::clone(core),
            line: Mutex::new(Line::default()),
            wake: Condvar::new(),
        });
        let writer = Arc::clone(&batcher);
        std::thread::Builder::new()
            .name("fly-state-batch".into())
            .spawn(move || writer.write())
            .map_err(|error| anyhow!("starting the state store's batch thread: {error}"))?;
        Ok(batcher)
    }

    /// Ends the thread once what is queued is answered.
    pub(super) fn close(&self) {
        lock(&self.line).closed = true;
        self.wake.notify_one();
    }

    /// Queues `op`; `then` gets its answer, on the batcher's thread.
    pub(super) fn submit(&self, op: Op, then: impl FnOnce(Answer) + Send + 'static) {
        self.queue(op, Reply::Then(Box::new(then)));
    }

    /// Sends `op` with whatever else is queued, and returns its answer.
    pub(super) fn run(&self, op: Op) -> Answer {
        let slot = Arc::new(Slot::default());
        let deadline = self.queue(op, Reply::Wait(Arc::clone(&slot)));
        let mut answer = lock(&slot.answer);
        loop {
            if let Some(answer) = answer.take() {
                return answer;
            }
            // Every call ends by its deadline; this only guards against a
            // thread that never answers (a panic).
            let left = (deadline + CALL_TIMEOUT).saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(anyhow::Error::new(Unavailable(format!(
                    "state store {} did not answer",
                    self.core.shown
                ))));
            }
            answer = slot
                .changed
                .wait_timeout(answer, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn queue(&self, op: Op, reply: Reply) -> Instant {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let mut line = lock(&self.line);
        if line.closed {
            drop(line);
            reply.send(Err(anyhow!("state store {}: closed", self.core.shown)));
            return deadline;
        }
        line.queued.push(Queued {
            op,
            deadline,
            reply,
        });
        if std::mem::take(&mut line.idle) {
            self.wake.notify_one();
        }
        deadline
    }

    /// Requests not answered yet, queued or in the call on its way.
    #[cfg(test)]
    pub(super) fn unanswered(&self) -> usize {
        let line = lock(&self.line);
        line.queued.len() + line.sending
    }

    /// The thread: a call for what is queued, until closed.
    fn write(&self) {
        loop {
            let batch: Vec<Queued> = {
                let mut line = lock(&self.line);
                while line.queued.is_empty() {
                    if line.closed {
                        return;
                    }
                    line.idle = true;
                    line = self
                        .wake
                        .wait(line)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                line.idle = false;
                let count = line.queued.len().min(MAX_BATCH);
                line.sending = count;
                line.queued.drain(..count).collect()
            };
            self.send(batch);
            lock(&self.line).sending = 0;
        }
    }

    /// One call for `batch`, and each request answered.
    fn send(&self, batch: Vec<Queued>) {
        let now = Instant::now();
        let (due, late): (Vec<Queued>, Vec<Queued>) =
            batch.into_iter().partition(|queued| queued.deadline > now);
        for queued in late {
            queued
                .reply
                .send(Err(anyhow::Error::new(Unavailable(format!(
                    "state store {} did not answer: timed out after {} s",
                    self.core.shown,
                    CALL_TIMEOUT.as_secs()
                )))));
        }
        if due.is_empty() {
            return;
        }
        let budget = due
            .iter()
            .map(|queued| queued.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::ZERO);
        let answers = call(&self.core, budget, &due);
        for (queued, answer) in due.into_iter().zip(answers) {
            queued.reply.send(answer);
        }
    }
}

/// One call of [`BATCH`] for `batch`: an answer for each request.
fn call(core: &Core, budget: Duration, batch: &[Queued]) -> Vec<Answer> {
    let mut invocation = BATCH.prepare_invoke();
    for queued in batch {
        match &queued.op {
            Op::Admit {
                handled,
                claim,
                nonce,
                update_key,
                token,
                lease_ms,
            } => {
                invocation.key(handled).key(claim);
                invocation.arg("a").arg(update_key);
                match nonce {
                    Some((key, ttl)) => {
                        invocation.key(key).arg(*ttl);
                    }
                    None => {
                        invocation.arg("");
                    }
                }
                invocation.arg(token.to_string()).arg(*lease_ms);
            }
            Op::Mark {
                handled,
                claim,
                outcome,
                ttl,
            } => {
                invocation.key(handled).key(claim);
                invocation.arg("m").arg(outcome).arg(*ttl);
            }
        }
    }
    let answered = core
        .call_within(budget, |link| invocation.invoke::<Vec<Value>>(link))
        .map_err(|fault| core.failed(fault));
    let values = match answered {
        Ok(values) if values.len() == batch.len() => values,
        Ok(_) => {
            let said = format!(
                "state store {}: unexpected answer to a batch of admissions",
                core.shown
            );
            return batch.iter().map(|_| Err(anyhow!(said.clone()))).collect();
        }
        Err(error) => {
            // One failure for all: each delivery is told it.
            let outage = crate::is_unavailable(&error);
            let said = error.to_string();
            return batch
                .iter()
                .map(|_| {
                    Err(if outage {
                        anyhow::Error::new(Unavailable(said.clone()))
                    } else {
                        anyhow!(said.clone())
                    })
                })
                .collect();
        }
    };
    values
        .into_iter()
        .map(|value| {
            let text = redis::from_redis_value::<String>(value).map_err(|_| {
                anyhow!(
                    "state store {}: unexpected answer to an admission",
                    core.shown
                )
            })?;
            match text.strip_prefix('!') {
                Some(error) => Err(anyhow!("state store {} answered: {error}", core.shown)),
                None => Ok(text),
            }
        })
        .collect()
}
