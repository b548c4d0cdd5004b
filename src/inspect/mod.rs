//! `--inspect`: every update in a browser, as ngrok's inspector shows
//! requests. The inspector is the update records' [`Sink`]: it keeps the
//! last ones ([`entries`]), explains a webhook's signature with the steps
//! of `fly verify-sig --explain`, replays an update through the same
//! handler with a `client_msg_id` of its own, and serves its page and JSON
//! API ([`server`]) on loopback.

mod entries;
mod server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::api::Update;
use crate::bot::{HandleError, Handler, record_of};
use crate::explain::{SecretNote, explain};
use crate::observe::{End, Sink, Source, UpdateRecord, set_sink};
use entries::Entries;
use fly_base::sync::lock;
use fly_signature::Verifier;

/// What the inspector keeps, at most, in bytes (the oldest entries go first).
pub const MAX_BYTES: usize = 64 * 1024 * 1024;

/// Of [`MAX_BYTES`], what the records on their way to the inspector's
/// thread may hold; the entries keep the rest.
const IN_FLIGHT_BYTES: usize = 8 * 1024 * 1024;

/// What the command tells the inspector.
pub struct InspectConfig {
    /// Entries kept (`--inspect-keep`).
    pub keep: usize,
    pub source: Source,
    /// What a replay runs.
    pub handler: Arc<dyn Handler>,
    /// serve-webhook: the secrets deliveries are verified with (their
    /// values never leave this process), and the replay window.
    pub secrets: Vec<(String, SecretNote)>,
    pub window: Option<u64>,
    /// serve-webhook: where deliveries go, for "Copy as curl".
    pub delivery_url: Option<String>,
}

pub struct Inspector {
    entries: Mutex<Entries>,
    /// Each changed entry's summary, for the page's live list.
    events: broadcast::Sender<Event>,
    config: InspectConfig,
}

/// Starts the inspector on `address` and makes it the records' sink: from
/// now on records keep bodies and handler output. Returns the address it
/// listens on.
pub fn start(address: SocketAddr, config: InspectConfig) -> anyhow::Result<SocketAddr> {
    // A tick's worth of changes at tens of thousands a second; a page that
    // falls further behind is told to reload the list.
    let (events, _) = broadcast::channel(8192);
    let inspector = Arc::new(Inspector {
        entries: Mutex::new(Entries::new(config.keep, MAX_BYTES - IN_FLIGHT_BYTES)),
        events,
        config,
    });
    let local = server::serve(address, Arc::clone(&inspector))?;
    let (notes, received) = mpsc::sync_channel(NOTES_WAITING);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let taken = Arc::clone(&in_flight);
    std::thread::Builder::new()
        .name("fly-inspect".into())
        .spawn(move || keep_notes(&inspector, &received, &taken))
        .context("starting the inspector's thread")?;
    if !set_sink(Box::new(Looking { notes, in_flight })) {
        anyhow::bail!("an inspector is already running in this process");
    }
    tracing::info!(url = %format!("http://{local}/"), "inspector");
    Ok(local)
}

/// The inspector as the records' sink: what it is told goes through a
/// channel to a thread of its own, which takes it in a few times a second.
/// So the threads that answer deliveries never wait for the inspector's
/// lock (held while a page lists the entries) nor wake another thread
/// per update: a send to a receiver that is not waiting is a few atomic
/// operations. Should the thread fall behind by [`NOTES_WAITING`] notes,
/// the newest are not kept (the bot goes on; the inspector shows less).
struct Looking {
    notes: SyncSender<Note>,
    /// Bytes of the notes on their way: past [`IN_FLIGHT_BYTES`], new
    /// notes are not kept.
    in_flight: Arc<AtomicUsize>,
}

#[allow(
    clippy::large_enum_variant,
    reason = "a record per update: a box would be an allocation per update, the slots are a few MiB"
)]
enum Note {
    Finished(UpdateRecord, End),
    Said(i64, String),
}

/// Notes waiting for the inspector's thread, at most.
const NOTES_WAITING: usize = 4096;

/// Rows sent one by one to open pages from one batch, at most.
const ROWS_PER_BATCH: usize = 100;

/// What the open pages are told.
#[derive(Clone)]
pub enum Event {
    /// An entry is new or changed: its row as JSON.
    Row(Arc<str>),
    /// Many changed at once: read the list again.
    Reload,
}

/// How often the inspector's thread takes in what it was told.
const NOTES_EVERY: Duration = Duration::from_millis(20);

impl Sink for Looking {
    fn finished(&self, record: UpdateRecord, end: End) {
        self.send(Note::Finished(record, end));
    }

    fn handler_said(&self, update_id: i64, line: &str) {
        self.send(Note::Said(update_id, line.to_string()));
    }
}

impl Looking {
    fn send(&self, note: Note) {
        let bytes = note.bytes();
        if self.in_flight.fetch_add(bytes, Ordering::Relaxed) + bytes > IN_FLIGHT_BYTES
            || self.notes.try_send(note).is_err()
        {
            self.in_flight.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

impl Note {
    /// What it holds, roughly, for [`IN_FLIGHT_BYTES`].
    fn bytes(&self) -> usize {
        match self {
            Note::Finished(record, _) => {
                512 + record.raw.as_ref().map_or(0, |raw| raw.len()) + record.headers.len()
            }
            Note::Said(_, line) => 64 + line.len(),
        }
    }
}

/// The inspector's thread: takes in what came, in order, under one lock,
/// then tells the open pages (a row as JSON only when a page is open).
fn keep_notes(inspector: &Inspector, notes: &Receiver<Note>, in_flight: &AtomicUsize) {
    loop {
        // A pause between two takes, busy or not: what came meanwhile is
        // taken in one go, under one lock.
        std::thread::sleep(NOTES_EVERY);
        let first = match notes.try_recv() {
            Ok(note) => note,
            Err(TryRecvError::Empty) => continue,
            Err(TryRecvError::Disconnected) => return,
        };
        let batch: Vec<Note> = std::iter::once(first)
            .chain(notes.try_iter().take(NOTES_WAITING))
            .collect();
        let bytes: usize = batch.iter().map(Note::bytes).sum();
        in_flight.fetch_sub(bytes, Ordering::Relaxed);
        // More rows than a person can read: the pages read the list again
        // instead (one event, no JSON per update).
        let open = inspector.events.receiver_count() > 0;
        let wanted = open && batch.len() <= ROWS_PER_BATCH;
        let mut rows = Vec::new();
        {
            let mut entries = lock(&inspector.entries);
            for note in batch {
                match note {
                    Note::Finished(record, end) => {
                        rows.extend(entries.record(record, &end, wanted));
                    }
                    Note::Said(update_id, line) => entries.handler_said(update_id, &line),
                }
            }
        }
        // No page open any more: nobody to tell.
        if open && !wanted {
            let _ = inspector.events.send(Event::Reload);
        }
        for row in rows {
            let _ = inspector.events.send(Event::Row(Arc::from(row)));
        }
    }
}

/// Why an entry cannot be replayed.
#[derive(Debug)]
pub enum NoReplay {
    NotFound,
    Refused(&'static str),
}

impl Inspector {
    /// The list, newest first, filtered.
    fn list(&self, text: Option<&str>, chat: Option<&str>, outcome: Option<&str>) -> Value {
        let entries = lock(&self.entries);
        let rows: Vec<Value> = entries
            .newest_first()
            .filter(|entry| text.is_none_or(|text| entry.matches(text)))
            .filter(|entry| chat.is_none_or(|chat| entry.chat() == chat))
            .filter(|entry| outcome.is_none_or(|outcome| entry.outcome() == outcome))
            .map(entries::Entry::summary)
            .collect();
        json!({ "updates": rows })
    }

    /// One entry with everything known of it, `None` if gone.
    fn detail(&self, id: u64) -> Option<Value> {
        let (mut detail, body, time_ms, source) = {
            let entries = lock(&self.entries);
            let entry = entries.get(id)?;
            (
                entry.detail(),
                entry.body.clone(),
                entry.time_ms,
                entry.source,
            )
        };
        let webhook = source == Source::Webhook;
        let body = body.filter(|_| webhook);
        detail["explain"] = json!(body.as_deref().and_then(|body| self.explain(body, time_ms)));
        detail["curl"] = json!(body.as_deref().and_then(|body| self.curl(body)));
        detail["verify_sig"] = json!(
            body.as_deref()
                .map(|body| verify_sig_command(body, time_ms))
        );
        Some(detail)
    }

    /// `fly verify-sig --explain`'s steps for a delivery's body, with the
    /// server's secrets and its clock when the delivery came.
    fn explain(&self, body: &str, time_ms: i64) -> Option<String> {
        let update = fly_signature::parse(body).ok()?;
        let now = time_ms / 1000;
        let secrets = &self.config.secrets;
        let verifier = Verifier::new(
            secrets.iter().map(|(value, _)| value.as_str()),
            now,
            self.config.window,
        );
        let check = verifier.check(&update).ok()?;
        let notes: Vec<SecretNote> = secrets.iter().map(|(_, note)| note.clone()).collect();
        Some(explain(&update, &check, &notes, now, self.config.window))
    }

    /// The delivery POSTed again, as a shell command.
    fn curl(&self, body: &str) -> Option<String> {
        let url = self.config.delivery_url.as_deref()?;
        Some(format!(
            "curl -sS -X POST '{url}' -H 'Content-Type: application/json' \
             --data-binary @- <<'FLY_BODY'\n{}\nFLY_BODY",
            body.trim_end_matches('\n')
        ))
    }

    /// Starts a replay of entry `id`: the id of the entry it fills.
    fn replay(self: &Arc<Self>, id: u64) -> Result<u64, NoReplay> {
        let (update, reserved, n) = {
            let mut entries = lock(&self.entries);
            let entry = entries.get(id).ok_or(NoReplay::NotFound)?;
            if entry.signature.is_some_and(|verdict| verdict != "OK") {
                return Err(NoReplay::Refused(
                    "a delivery whose signature did not verify is not replayed",
                ));
            }
            let body = entry.body.clone().ok_or(NoReplay::Refused(
                "its body is not kept (an update the inspector did not see arrive)",
            ))?;
            let update = read_update(&body).ok_or(NoReplay::Refused(
                "its body is not an update with a usable update_id",
            ))?;
            let source = entry.source;
            let reserved = entries.reserve(source, id);
            let n = entries.next_replay(update.update_id);
            (update, reserved, n)
        };
        let inspector = Arc::clone(self);
        std::thread::Builder::new()
            .name("fly-replay".into())
            .spawn(move || inspector.run_replay(&update, reserved, n))
            .map_err(|_| NoReplay::Refused("no thread to run it on"))?;
        Ok(reserved)
    }

    /// Runs the update through the handler again; the record fills the
    /// reserved entry. The state store is not told: a replay is not a
    /// delivery, and the update stays as handled (or not) as it was.
    fn run_replay(&self, update: &Update, reserved: u64, n: u32) {
        let mut record = record_of(self.config.source, update, 1);
        record.inspect_entry = Some(reserved);
        record.steps.replay = Some(n);
        let end = match self.config.handler.handle(update, &mut record.steps) {
            Ok(outcome) => End::Done(outcome),
            Err(HandleError::DeadLetter(reason)) => End::Failed(reason),
            Err(
                HandleError::Retry(error) | HandleError::Park(error) | HandleError::Fatal(error),
            ) => End::Failed(format!("{error:#}")),
        };
        record.finish(end);
    }
}

/// The update in `body`, if it is one.
fn read_update(body: &str) -> Option<Update> {
    let parsed = fly_signature::parse(body).ok()?;
    Update::read(&parsed, body).ok()
}

/// `fly verify-sig --explain` on a delivery's body, at the time it came.
fn verify_sig_command(body: &str, time_ms: i64) -> String {
    format!(
        "fly verify-sig --explain --now {} <<'FLY_BODY'\n{}\nFLY_BODY",
        time_ms / 1000,
        body.trim_end_matches('\n')
    )
}
