//! What the inspector remembers: the last updates, one entry per update
//! (its attempts, or a webhook's deliveries of it, gathered), a replay
//! being an entry of its own. Bounded by count and by bytes; the oldest
//! entry goes first.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};

use crate::observe::{End, Source, Steps, UpdateRecord};
use fly_base::clock::unix_now_ms;

/// A handler's stderr kept per update.
const STDERR_BYTES: usize = 16 * 1024;
/// What [`Entry::size`] counts for an entry and each of its attempts
/// besides their text (measured: 100k deliveries through a server with
/// `--inspect` stay within the cap of the same server without it).
const ENTRY_COST: usize = 1024;
const ATTEMPT_COST: usize = 512;
/// Updates whose handler's stderr waits for their record.
const PENDING_UPDATES: usize = 256;

pub struct Entry {
    pub id: u64,
    pub time_ms: i64,
    pub source: Source,
    pub update_id: Option<i64>,
    chat: String,
    kind: String,
    msg_type: String,
    pub signature: Option<&'static str>,
    outcome: &'static str,
    answer: Option<(u16, &'static str)>,
    latency_ms: u64,
    pub replay_of: Option<u64>,
    /// The update's bytes as last received.
    pub body: Option<Arc<str>>,
    /// `name: value` lines, as [`UpdateRecord::headers`] keeps them.
    headers: String,
    handler: Option<String>,
    stdout: Option<String>,
    stderr: String,
    request: Option<String>,
    reply_answer: Option<String>,
    attempts: Vec<Attempt>,
    bytes: usize,
}

/// One attempt at an entry's update, kept as data: JSON is made only when
/// a page asks for the detail, not for each update that passes.
struct Attempt {
    attempt: u32,
    time_ms: i64,
    outcome: &'static str,
    error: Option<String>,
    answer: Option<(u16, &'static str)>,
    steps: Steps,
}

impl Attempt {
    fn to_json(&self) -> Value {
        json!({
            "attempt": self.attempt,
            "time_ms": self.time_ms,
            "outcome": self.outcome,
            "error": self.error,
            "status": self.answer.map(|(status, _)| status),
            "result": self.answer.map(|(_, result)| result),
            "steps": self.steps.as_json(),
        })
    }
}

/// A row of the list, as the page and each event get it.
#[derive(Serialize)]
pub struct Row<'a> {
    id: u64,
    time_ms: i64,
    source: &'static str,
    update_id: Option<i64>,
    chat: &'a str,
    kind: &'a str,
    msg_type: &'a str,
    signature: Option<&'static str>,
    outcome: &'static str,
    status: Option<u16>,
    result: Option<&'static str>,
    latency_ms: u64,
    attempts: usize,
    replay_of: Option<u64>,
}

impl Entry {
    fn new(id: u64, source: Source) -> Entry {
        Entry {
            id,
            time_ms: unix_now_ms(),
            source,
            update_id: None,
            chat: "-".into(),
            kind: String::new(),
            msg_type: String::new(),
            signature: None,
            outcome: "running",
            answer: None,
            latency_ms: 0,
            replay_of: None,
            body: None,
            headers: String::new(),
            handler: None,
            stdout: None,
            stderr: String::new(),
            request: None,
            reply_answer: None,
            attempts: Vec::new(),
            bytes: ENTRY_COST,
        }
    }

    /// The row of the list (and of each event).
    pub fn row(&self) -> Row<'_> {
        Row {
            id: self.id,
            time_ms: self.time_ms,
            source: self.source.as_str(),
            update_id: self.update_id,
            chat: &self.chat,
            kind: &self.kind,
            msg_type: &self.msg_type,
            signature: self.signature,
            outcome: self.outcome,
            status: self.answer.map(|(status, _)| status),
            result: self.answer.map(|(_, result)| result),
            latency_ms: self.latency_ms,
            attempts: self.attempts.len(),
            replay_of: self.replay_of,
        }
    }

    /// The row as JSON.
    pub fn summary(&self) -> Value {
        json!(self.row())
    }

    /// Everything the inspector knows of it, but what the caller adds
    /// (the signature's explanation, the commands to copy).
    pub fn detail(&self) -> Value {
        let mut detail = self.summary();
        let handler = (self.handler.is_some() || !self.stderr.is_empty()).then(|| {
            json!({
                "command": self.handler,
                "stdin": self.body.as_deref(),
                "stdout": self.stdout,
                "stderr": self.stderr,
            })
        });
        let reply = self
            .request
            .as_ref()
            .map(|request| json!({"request": request, "answer": self.reply_answer}));
        let fields = [
            ("body", json!(self.body.as_deref())),
            ("headers", json!(header_pairs(&self.headers))),
            ("handler", json!(handler)),
            ("reply", json!(reply)),
            (
                "attempts",
                Value::Array(self.attempts.iter().map(Attempt::to_json).collect()),
            ),
        ];
        for (key, value) in fields {
            detail[key] = value;
        }
        detail
    }

    /// True if `text` is in any of its fields shown in the list, or its body.
    pub fn matches(&self, text: &str) -> bool {
        let text = text.to_lowercase();
        let id = self.update_id.map(|id| id.to_string()).unwrap_or_default();
        [
            id.as_str(),
            &self.chat,
            &self.kind,
            &self.msg_type,
            self.outcome,
            self.answer.map_or("", |(_, result)| result),
            self.body.as_deref().unwrap_or(""),
        ]
        .iter()
        .any(|field| field.to_lowercase().contains(&text))
    }

    pub fn chat(&self) -> &str {
        &self.chat
    }

    pub fn outcome(&self) -> &str {
        self.outcome
    }

    /// Takes what `record` says of its attempt (moved, not copied: this
    /// runs for every update that passes).
    fn take(&mut self, mut record: UpdateRecord, end: &End) {
        self.update_id = record.update_id.or(self.update_id);
        self.chat = std::mem::take(&mut record.chat);
        self.kind = std::mem::take(&mut record.kind);
        self.msg_type = std::mem::take(&mut record.msg_type);
        self.signature = record.signature.or(self.signature);
        self.outcome = end.word();
        self.answer = record.answer;
        self.latency_ms = record.received.elapsed().as_millis() as u64;
        if record.raw.is_some() {
            self.body = record.raw.take();
        }
        if !record.headers.is_empty() {
            self.headers = std::mem::take(&mut record.headers);
        }
        if let Some(capture) = record.steps.capture.take() {
            let capture = *capture;
            self.handler = capture.handler.or(self.handler.take());
            self.stdout = capture.stdout.or(self.stdout.take());
            self.request = capture.request.or(self.request.take());
            self.reply_answer = capture.answer.or(self.reply_answer.take());
        }
        let error = match end {
            End::Failed(error) | End::Parked { error, .. } => Some(error.clone()),
            _ => None,
        };
        self.attempts.push(Attempt {
            attempt: record.attempt,
            time_ms: unix_now_ms(),
            outcome: end.word(),
            error,
            answer: record.answer,
            steps: record.steps,
        });
        self.bytes = self.size();
    }

    /// Bytes it holds, as the allocator sees them, roughly: what the
    /// memory cap counts.
    fn size(&self) -> usize {
        let strings = [
            &self.handler,
            &self.stdout,
            &self.request,
            &self.reply_answer,
        ];
        ENTRY_COST
            + self.body.as_ref().map_or(0, |body| body.len())
            + self.headers.len()
            + self.chat.len()
            + strings
                .iter()
                .map(|text| text.as_ref().map_or(0, String::len))
                .sum::<usize>()
            + self.stderr.len()
            + self
                .attempts
                .iter()
                .map(|attempt| ATTEMPT_COST + attempt.error.as_ref().map_or(0, String::len))
                .sum::<usize>()
    }
}

/// `name: value` lines as `[name, value]` pairs, for the detail.
fn header_pairs(lines: &str) -> Vec<(&str, &str)> {
    lines
        .lines()
        .filter_map(|line| line.split_once(": "))
        .collect()
}

/// The entries, oldest first, and what finds them.
pub struct Entries {
    entries: VecDeque<Entry>,
    next_id: u64,
    bytes: usize,
    keep: usize,
    max_bytes: usize,
    /// The entry of each update (not its replays).
    by_update: HashMap<i64, u64>,
    /// A handler's stderr lines, by update, until its attempt's record comes.
    pending_stderr: HashMap<i64, String>,
    /// Replays asked for, by update: the `n` of `replay_{id}_{n}`.
    replays: HashMap<i64, u32>,
}

impl Entries {
    pub fn new(keep: usize, max_bytes: usize) -> Entries {
        Entries {
            entries: VecDeque::new(),
            next_id: 1,
            bytes: 0,
            keep: keep.max(1),
            max_bytes,
            by_update: HashMap::new(),
            pending_stderr: HashMap::new(),
            replays: HashMap::new(),
        }
    }

    pub fn get(&self, id: u64) -> Option<&Entry> {
        // Ids grow with position: a binary search finds it.
        let first = self.entries.front()?.id;
        let index = usize::try_from(id.checked_sub(first)?).ok()?;
        self.entries.get(index).filter(|entry| entry.id == id)
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Entry> {
        let first = self.entries.front()?.id;
        let index = usize::try_from(id.checked_sub(first)?).ok()?;
        self.entries.get_mut(index).filter(|entry| entry.id == id)
    }

    /// Newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().rev()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A new, empty entry (a replay asked for): its id.
    pub fn reserve(&mut self, source: Source, replay_of: u64) -> u64 {
        let id = self.push(Entry::new(0, source));
        if let Some(entry) = self.get_mut(id) {
            entry.replay_of = Some(replay_of);
        }
        id
    }

    /// The next replay's number for `update_id`: 1, 2, …
    pub fn next_replay(&mut self, update_id: i64) -> u32 {
        let n = self.replays.entry(update_id).or_insert(0);
        *n += 1;
        *n
    }

    /// An attempt ended: into its update's entry (a new one if none, or
    /// the reserved one of a replay). Returns the entry's summary.
    pub fn record(&mut self, record: UpdateRecord, end: &End, wanted: bool) -> Option<String> {
        // A delivery whose signature failed may claim any update's id: it
        // gets an entry of its own, never mixed into that update's.
        let trusted = record.signature.is_none_or(|verdict| verdict == "OK");
        let update_id = record.update_id.filter(|_| trusted);
        let existing = match (record.inspect_entry, update_id) {
            (Some(reserved), _) => Some(reserved),
            (None, Some(update_id)) => self.by_update.get(&update_id).copied(),
            (None, None) => None,
        };
        let id = match existing.filter(|id| self.get(*id).is_some()) {
            Some(id) => id,
            None => self.push(Entry::new(0, record.source)),
        };
        if let (Some(update_id), None) = (update_id, record.inspect_entry) {
            self.by_update.insert(update_id, id);
        }
        let stderr = update_id.and_then(|update_id| self.pending_stderr.remove(&update_id));
        let entry = self.get_mut(id)?;
        let before = entry.bytes;
        entry.take(record, end);
        if let Some(stderr) = stderr {
            append_capped(&mut entry.stderr, &stderr);
            entry.bytes = entry.size();
        }
        let after = entry.bytes;
        let summary = wanted.then(|| serde_json::to_string(&entry.row()).unwrap_or_default());
        self.bytes = self.bytes + after - before;
        self.trim();
        summary
    }

    /// A handler's stderr line: kept until its attempt's record comes.
    pub fn handler_said(&mut self, update_id: i64, line: &str) {
        if !self.pending_stderr.contains_key(&update_id)
            && self.pending_stderr.len() >= PENDING_UPDATES
        {
            // An update whose record never came (fly stopping): forget one.
            if let Some(&any) = self.pending_stderr.keys().next() {
                self.pending_stderr.remove(&any);
            }
        }
        let pending = self.pending_stderr.entry(update_id).or_default();
        append_capped(pending, line);
        append_capped(pending, "\n");
    }

    fn push(&mut self, mut entry: Entry) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        entry.id = id;
        self.bytes += entry.bytes;
        self.entries.push_back(entry);
        self.trim();
        id
    }

    /// Drops the oldest entries while over the count or the bytes.
    fn trim(&mut self) {
        while self.entries.len() > self.keep
            || (self.bytes > self.max_bytes && self.entries.len() > 1)
        {
            let Some(old) = self.entries.pop_front() else {
                return;
            };
            self.bytes -= old.bytes;
            if let Some(update_id) = old.update_id
                && self.by_update.get(&update_id) == Some(&old.id)
            {
                self.by_update.remove(&update_id);
            }
        }
    }
}

fn append_capped(kept: &mut String, text: &str) {
    let room = STDERR_BYTES.saturating_sub(kept.len());
    if text.len() <= room {
        kept.push_str(text);
    } else if room > 0 {
        let mut end = room;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        kept.push_str(&text[..end]);
        kept.push_str("… (cut)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn record(update_id: i64, body_bytes: usize) -> UpdateRecord {
        let mut record = UpdateRecord::new(Source::Webhook, Instant::now());
        record.update_id = Some(update_id);
        record.raw = Some(Arc::from("x".repeat(body_bytes).as_str()));
        record
    }

    #[test]
    fn attempts_of_one_update_gather_in_one_entry() {
        let mut entries = Entries::new(10, 1 << 20);
        entries.handler_said(7, "a note");
        entries.record(record(7, 10), &End::Failed("boom".into()), true);
        let summary = entries
            .record(record(7, 10), &End::Duplicate, true)
            .unwrap();
        let summary: Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(summary["attempts"], 2);
        assert_eq!(summary["outcome"], "duplicate");
        let detail = entries.get(1).unwrap().detail();
        assert_eq!(detail["attempts"][0]["error"], "boom");
        assert_eq!(detail["handler"]["stderr"], "a note\n");
    }

    #[test]
    fn the_oldest_go_first_past_the_count_or_the_bytes() {
        let mut entries = Entries::new(3, 1 << 20);
        for id in 1..=5 {
            entries.record(record(id, 10), &End::Duplicate, true);
        }
        let ids: Vec<i64> = entries.newest_first().filter_map(|e| e.update_id).collect();
        assert_eq!(ids, [5, 4, 3]);

        let mut entries = Entries::new(1000, 100_000);
        for id in 1..=1000 {
            entries.record(record(id, 10_000), &End::Duplicate, true);
        }
        assert!(entries.bytes() <= 100_000, "{}", entries.bytes());
        assert!(entries.len() < 10 && entries.len() > 0);
        // Dropped entries are no longer found by their update.
        entries.record(record(1, 10), &End::Duplicate, true);
        assert_eq!(entries.newest_first().next().unwrap().update_id, Some(1));
        assert_eq!(entries.newest_first().next().unwrap().attempts.len(), 1);
    }

    #[test]
    fn a_replay_fills_its_reserved_entry() {
        let mut entries = Entries::new(10, 1 << 20);
        entries.record(record(7, 10), &End::Duplicate, true);
        let reserved = entries.reserve(Source::Webhook, 1);
        assert_eq!(entries.next_replay(7), 1);
        assert_eq!(entries.next_replay(7), 2);
        let mut replay = record(7, 10);
        replay.inspect_entry = Some(reserved);
        entries.record(replay, &End::Duplicate, false);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries.get(reserved).unwrap().replay_of, Some(1));
        assert_eq!(entries.get(1).unwrap().attempts.len(), 1);
    }
}
