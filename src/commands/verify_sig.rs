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
use crate::explain::{SecretNote, explain};
use fly_signature::canonical::json_string;
use fly_signature::{SignatureInputError, Verdict, Verifier};

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
        let notes: Vec<SecretNote> = secrets.iter().map(WebhookSecret::note).collect();
        let _ = write!(
            std::io::stderr(),
            "{}",
            explain(&update, &check, &notes, now, window)
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
