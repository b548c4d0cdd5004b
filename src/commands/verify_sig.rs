//! `fly verify-sig`: the offline check of a signed update (SPEC section 3),
//! one document, or NDJSON with `--lines`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::process::ExitCode;
use std::sync::{Mutex, mpsc};
use std::thread;

use anyhow::Context;

use crate::cli::VerifySigArgs;
use crate::commands::credentials::{WebhookSecret, offline_token, webhook_secrets};
use crate::commands::input::{read_input, unix_time_now};
use crate::commands::print_line;
use crate::exit::{self, usage_because};
use fly_signature::canonical::{canonical_json, json_string};
use fly_signature::json::Value;
use fly_signature::{Check, SignatureInputError, Verdict, Verifier};

pub fn run(args: VerifySigArgs) -> anyhow::Result<ExitCode> {
    let secrets = webhook_secrets(&args.secret, || offline_token(args.token_file.as_deref()))?;
    let now = unix_time_now(args.now);
    let window = (!args.ignore_timestamp).then_some(args.window);
    let verifier = Verifier::new(
        secrets.iter().map(|secret| secret.value.as_str()),
        now,
        window,
    );
    if args.lines {
        return verify_lines(&args.input, &verifier);
    }
    let text = read_input(&args.input)?;
    let invalid = |error: SignatureInputError| usage_because("invalid signed update", error);
    let update = fly_signature::parse(&text).map_err(invalid)?;
    let check = verifier.check(&update).map_err(invalid)?;
    // A stderr that cannot be written to (2>/dev/full) changes nothing: the
    // exit code still carries the verdict.
    if args.explain {
        let _ = write!(
            std::io::stderr(),
            "{}",
            explain(&update, &check, &secrets, now, window)
        );
    }
    match check.verdict().map_err(invalid)? {
        Verdict::Ok => {
            print_line("Verify OK")?;
            Ok(exit::code(exit::SUCCESS))
        }
        rejected => {
            let _ = writeln!(std::io::stderr(), "Verify failed: {}", rejected.code());
            Ok(exit::code(exit::FAILURE))
        }
    }
}

/// Lines per batch handed to a worker: large enough that channel traffic is
/// noise, small enough that memory stays a few megabytes.
const BATCH_LINES: usize = 512;

/// A run of input lines; `first_line` numbers the first one.
struct LineBatch {
    sequence: u64,
    first_line: u64,
    bytes: Vec<u8>,
}

/// The verdict lines of one batch, ready to print.
struct Verdicts {
    sequence: u64,
    text: Vec<u8>,
    all_ok: bool,
}

/// NDJSON: one verdict object per non-blank input line, in input order.
/// Batches of lines are verified on every core; a fixed number of batches is
/// in flight at once (the reader waits for a free slot), so memory stays
/// constant whatever the input size. Exit 1 if any line was not `OK`.
fn verify_lines(input: &str, verifier: &Verifier) -> anyhow::Result<ExitCode> {
    let reader: Box<dyn BufRead + Send> = if input == "-" {
        Box::new(BufReader::with_capacity(1 << 16, std::io::stdin()))
    } else {
        let file = File::open(input)
            .map_err(|error| usage_because(format!("cannot read {input}"), error))?;
        Box::new(BufReader::with_capacity(1 << 16, file))
    };
    let stdout = crate::output::stdout().context("writing to stdout")?;
    let workers = thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let slots = workers * 2;
    let (batch_sender, batch_receiver) = mpsc::sync_channel::<LineBatch>(slots);
    let batch_receiver = Mutex::new(batch_receiver);
    thread::scope(|scope| {
        // Everything below is dropped if printing fails, which unblocks the
        // reader (no slot will come back) and so the workers.
        let (verdict_sender, verdict_receiver) = mpsc::channel::<Verdicts>();
        let (slot_sender, slot_receiver) = mpsc::sync_channel::<()>(slots);
        for _ in 0..slots {
            let _ = slot_sender.send(());
        }
        for _ in 0..workers {
            let (batches, verdicts) = (&batch_receiver, verdict_sender.clone());
            scope.spawn(move || {
                // Ends when the reader is done (or the printer gave up).
                while let Some(batch) = batches.lock().ok().and_then(|batches| batches.recv().ok())
                {
                    if verdicts.send(verify_batch(&batch, verifier)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(verdict_sender);
        let reading = scope.spawn(move || read_batches(reader, &batch_sender, &slot_receiver));

        // Not print_line: a flush per verdict would be a write(2) per line of
        // a stream of millions; the buffer goes out when full and at the end.
        let mut out = BufWriter::with_capacity(1 << 16, stdout);
        let mut waiting = BTreeMap::new();
        let mut next = 0;
        let mut all_ok = true;
        for verdicts in verdict_receiver {
            waiting.insert(verdicts.sequence, verdicts);
            while let Some(verdicts) = waiting.remove(&next) {
                out.write_all(&verdicts.text).context("writing to stdout")?;
                all_ok &= verdicts.all_ok;
                next += 1;
                let _ = slot_sender.send(());
            }
        }
        out.flush().context("writing to stdout")?;
        match reading.join() {
            Ok(result) => {
                result.map_err(|error| usage_because(format!("cannot read {input}"), error))?
            }
            Err(_) => anyhow::bail!("the input reader stopped unexpectedly"),
        }
        Ok(exit::code(if all_ok {
            exit::SUCCESS
        } else {
            exit::FAILURE
        }))
    })
}

/// Cuts the input into batches of whole lines, taking a slot for each.
fn read_batches(
    mut reader: Box<dyn BufRead + Send>,
    batches: &mpsc::SyncSender<LineBatch>,
    slots: &mpsc::Receiver<()>,
) -> std::io::Result<()> {
    let mut next_line = 1;
    for sequence in 0.. {
        let mut bytes = Vec::new();
        let mut lines = 0;
        while lines < BATCH_LINES && reader.read_until(b'\n', &mut bytes)? > 0 {
            lines += 1;
        }
        // No slot: the printer stopped (stdout closed); no batch taker: likewise.
        if lines == 0 || slots.recv().is_err() {
            break;
        }
        let batch = LineBatch {
            sequence,
            first_line: next_line,
            bytes,
        };
        if batches.send(batch).is_err() {
            break;
        }
        next_line += lines as u64;
    }
    Ok(())
}

fn verify_batch(batch: &LineBatch, verifier: &Verifier) -> Verdicts {
    let mut text = Vec::with_capacity(BATCH_LINES * 24);
    let mut all_ok = true;
    let lines = batch.bytes.split_inclusive(|&byte| byte == b'\n');
    for (number, line) in (batch.first_line..).zip(lines) {
        if line
            .iter()
            .all(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
        {
            continue;
        }
        let verdict = match std::str::from_utf8(line) {
            Ok(line) => verifier.verify_text(line),
            Err(_) => Err(SignatureInputError("the line is not valid UTF-8".into())),
        };
        all_ok &= matches!(verdict, Ok(Verdict::Ok));
        // Writing to a Vec cannot fail.
        let _ = match verdict {
            Ok(Verdict::Ok) => writeln!(text, "{{\"line\":{number},\"ok\":true}}"),
            Ok(rejected) => writeln!(
                text,
                "{{\"line\":{number},\"ok\":false,\"error\":\"{}\"}}",
                rejected.code()
            ),
            Err(error) => writeln!(
                text,
                "{{\"line\":{number},\"ok\":false,\"error\":\"INVALID_INPUT\",\"detail\":{}}}",
                json_string(&error.0)
            ),
        };
    }
    Verdicts {
        sequence: batch.sequence,
        text,
        all_ok,
    }
}

/// Every step of the computation, for finding where another implementation
/// differs. Secrets are named by source and length, never shown.
fn explain(
    update: &Value,
    check: &Check,
    secrets: &[WebhookSecret],
    now: i64,
    window: Option<u64>,
) -> String {
    let fields = &check.fields;
    let mut text = String::new();
    let payload_source = match fields.payload_key {
        Some(key) => format!("update.{key}"),
        None => "{} (message and callback_query are both missing or falsy)".into(),
    };
    text.push_str(&format!(
        "1. payload = {payload_source}, canonical JSON ({} bytes):\n   {}\n",
        fields.canonical_payload.len(),
        String::from_utf8_lossy(&fields.canonical_payload)
    ));
    text.push_str(&format!(
        "2. sha256(canonical payload) = {}\n",
        fields.payload_sha256
    ));
    explain_signing_string(update, check, &mut text);
    explain_signature(check, secrets, &mut text);
    let skew = match check.skew {
        Some(skew) => format!("now {now} - timestamp {} = {skew:+} s", fields.timestamp.0),
        None => format!("timestamp {} is far outside any clock", fields.timestamp.0),
    };
    let judgement = match window {
        None => "not checked (--ignore-timestamp)".to_string(),
        Some(window) if check.replay_exceeded => format!("outside the {window} s replay window"),
        Some(window) => format!("within the {window} s replay window"),
    };
    text.push_str(&format!("5. clock: {skew}: {judgement}\n"));
    text
}

/// Step 3 of [`explain`]: the six fields of the signing string, each with
/// where its text came from.
fn explain_signing_string(update: &Value, check: &Check, text: &mut String) {
    let fields = &check.fields;
    text.push_str("3. signing string: six fields joined by \"\\n\" (shown as ⏎):\n");
    let sources = [
        update.get("update_id"),
        update.get("type"),
        update.get("bot").and_then(|bot| bot.get("id")),
        update.get("timestamp"),
        update.get("nonce"),
        None,
    ];
    for (index, ((label, value), source)) in fields.labelled().into_iter().zip(sources).enumerate()
    {
        let shown = if value.chars().any(char::is_control) {
            json_string(value)
        } else {
            value.to_string()
        };
        let separator = if index < 5 { "⏎" } else { "" };
        let origin = if index < 5 {
            origin_note(label, value, source)
        } else {
            String::new()
        };
        text.push_str(&format!("   {label:<16}{shown}{separator}{origin}\n"));
    }
    text.push_str(&format!(
        "   as a string literal: {}\n",
        json_string(&check.signing_string)
    ));
}

/// Step 4 of [`explain`]: the signature given, and the one each secret gives.
fn explain_signature(check: &Check, secrets: &[WebhookSecret], text: &mut String) {
    text.push_str("4. signature = hex(hmac_sha256(secret, signing string)):\n");
    let given = match &check.given {
        Ok(given) if given.is_empty() => "(none)".to_string(),
        Ok(given) => given.to_string(),
        Err(error) => format!("(unusable: {error})"),
    };
    text.push_str(&format!("   given                {given}\n"));
    for (secret, expected) in secrets.iter().zip(&check.expected) {
        let matches = check
            .given
            .as_ref()
            .is_ok_and(|given| given.as_ref() == expected);
        text.push_str(&format!(
            "   expected             {expected}  {} [secret from {}, {} bytes]\n",
            if matches {
                "✓ matches"
            } else {
                "✗ differs"
            },
            secret.source,
            secret.value.len()
        ));
    }
}

/// Says where a field's text came from when it is not simply the JSON string
/// or integer in the update (`int("42")`, a missing field, `str(True)`…).
fn origin_note(label: &str, value: &str, source: Option<&Value>) -> String {
    match source {
        None => format!("   ({label} missing)"),
        Some(Value::Str(text)) if text.as_ref() == value.as_bytes() => String::new(),
        Some(Value::Int(digits)) if *digits == value => String::new(),
        Some(source) => {
            let json = canonical_json(source)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_else(|_| "a value".into());
            let json = if json.chars().count() > 60 {
                format!("{}…", json.chars().take(60).collect::<String>())
            } else {
                json
            };
            format!("   (Python str/int of JSON {json})")
        }
    }
}
