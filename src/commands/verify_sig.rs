//! `fly verify-sig`: the offline check of a signed update (SPEC section 3),
//! one document, or NDJSON with `--lines`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::num::NonZeroUsize;
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

/// The input is cut into chunks of whole lines of about this size: large
/// enough that handing a chunk from thread to thread is noise (a few hundred
/// updates each), small enough that the chunks in flight, two per worker,
/// are a few megabytes.
const CHUNK_BYTES: usize = 256 * 1024;

/// A run of whole input lines and, once a worker is done with it, their
/// verdict lines. Its buffers go round (reader, worker, printer, reader) and
/// are reused, so steady state allocates nothing.
#[derive(Default)]
struct Chunk {
    sequence: u64,
    /// The number of its first line.
    first_line: u64,
    lines: Vec<u8>,
    verdicts: Vec<u8>,
    all_ok: bool,
}

/// NDJSON: one verdict object per non-blank input line, in input order.
/// A reader cuts the input into chunks of lines, one worker per core
/// verifies them, and this thread prints each chunk's verdicts in input
/// order with one write. A fixed number of chunks exist (the reader waits
/// for one to come back), so memory stays constant whatever the input size.
/// Exit 1 if any line was not `OK`.
fn verify_lines(input: &str, verifier: &Verifier) -> anyhow::Result<ExitCode> {
    let reader: Box<dyn Read + Send> = if input == "-" {
        Box::new(std::io::stdin())
    } else {
        let file = File::open(input)
            .map_err(|error| usage_because(format!("cannot read {input}"), error))?;
        Box::new(file)
    };
    let mut stdout = crate::output::stdout().context("writing to stdout")?;
    let workers = thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let in_flight = workers * 2;
    let (chunk_sender, chunk_receiver) = mpsc::sync_channel::<Chunk>(in_flight);
    let chunk_receiver = Mutex::new(chunk_receiver);
    thread::scope(|scope| {
        // Everything below is dropped if printing fails: the reader then
        // runs out of chunks, and the workers out of work.
        let (verified_sender, verified_receiver) = mpsc::channel::<Chunk>();
        let (free_sender, free_receiver) = mpsc::sync_channel::<Chunk>(in_flight);
        for _ in 0..in_flight {
            let _ = free_sender.send(Chunk::default());
        }
        for _ in 0..workers {
            let (chunks, verified) = (&chunk_receiver, verified_sender.clone());
            scope.spawn(move || {
                // Ends when the reader is done (or the printer gave up).
                while let Some(mut chunk) = chunks.lock().ok().and_then(|chunks| chunks.recv().ok())
                {
                    verify_chunk(&mut chunk, verifier);
                    if verified.send(chunk).is_err() {
                        break;
                    }
                }
            });
        }
        drop(verified_sender);
        let reading = scope.spawn(move || read_chunks(reader, &chunk_sender, &free_receiver));

        let mut waiting = BTreeMap::new();
        let mut next = 0;
        let mut all_ok = true;
        for chunk in verified_receiver {
            waiting.insert(chunk.sequence, chunk);
            while let Some(chunk) = waiting.remove(&next) {
                stdout
                    .write_all(&chunk.verdicts)
                    .context("writing to stdout")?;
                all_ok &= chunk.all_ok;
                next += 1;
                let _ = free_sender.send(chunk);
            }
        }
        stdout.flush().context("writing to stdout")?;
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

/// Cuts the input into chunks of whole lines, each in a free chunk's buffer:
/// large reads, and the cut after the last newline read (a line longer
/// than a chunk makes its chunk longer).
fn read_chunks(
    mut reader: Box<dyn Read + Send>,
    chunks: &mpsc::SyncSender<Chunk>,
    free: &mpsc::Receiver<Chunk>,
) -> std::io::Result<()> {
    // The start of the line the last chunk's cut went through.
    let mut carried = Vec::new();
    let mut next_line = 1;
    for sequence in 0.. {
        // None: the printer stopped (stdout closed).
        let Ok(mut chunk) = free.recv() else {
            break;
        };
        chunk.lines.clear();
        chunk.lines.reserve(CHUNK_BYTES);
        chunk.lines.append(&mut carried);
        let mut searched = 0;
        let mut ended = false;
        let cut = loop {
            let wanted = (searched + CHUNK_BYTES).saturating_sub(chunk.lines.len());
            let read = (&mut reader)
                .take(wanted as u64)
                .read_to_end(&mut chunk.lines)?;
            if read < wanted {
                ended = true;
                break chunk.lines.len();
            }
            if let Some(last) = chunk.lines[searched..].iter().rposition(|&b| b == b'\n') {
                break searched + last + 1;
            }
            searched = chunk.lines.len();
        };
        carried.extend_from_slice(&chunk.lines[cut..]);
        chunk.lines.truncate(cut);
        if chunk.lines.is_empty() {
            break;
        }
        let newlines = count_newlines(&chunk.lines);
        let unterminated = u64::from(chunk.lines.last() != Some(&b'\n'));
        chunk.sequence = sequence;
        chunk.first_line = next_line;
        next_line += newlines + unterminated;
        // None: no worker takes chunks any more (the printer stopped).
        if chunks.send(chunk).is_err() || ended {
            break;
        }
    }
    Ok(())
}

/// How many `\n` are in `bytes`: counted in blocks of 255 into a byte,
/// which the compiler turns into vector instructions (a plain filter and
/// count was most of the reader's own time).
fn count_newlines(bytes: &[u8]) -> u64 {
    bytes
        .chunks(255)
        .map(|block| {
            let count = block
                .iter()
                .fold(0u8, |count, &byte| count + u8::from(byte == b'\n'));
            u64::from(count)
        })
        .sum()
}

fn verify_chunk(chunk: &mut Chunk, verifier: &Verifier) {
    let Chunk {
        first_line,
        lines,
        verdicts,
        all_ok,
        ..
    } = chunk;
    verdicts.clear();
    *all_ok = true;
    let mut verify_line = |number: u64, line: Result<&str, &[u8]>| {
        let bytes = line.map_or_else(|bytes| bytes, str::as_bytes);
        if bytes
            .iter()
            .all(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
        {
            return;
        }
        let verdict = match line {
            Ok(line) => verifier.verify_text(line),
            Err(_) => Err(SignatureInputError("the line is not valid UTF-8".into())),
        };
        *all_ok &= matches!(verdict, Ok(Verdict::Ok));
        push_verdict(verdicts, number, &verdict);
    };
    // A chunk of valid UTF-8 is cut into lines of valid UTF-8: one check for
    // the whole chunk, and each line's only when the chunk fails it.
    match std::str::from_utf8(lines) {
        Ok(text) => {
            for (number, line) in (*first_line..).zip(text.split_inclusive('\n')) {
                verify_line(number, Ok(line));
            }
        }
        Err(_) => {
            let lines = lines.split_inclusive(|&byte| byte == b'\n');
            for (number, line) in (*first_line..).zip(lines) {
                verify_line(number, std::str::from_utf8(line).map_err(|_| line));
            }
        }
    }
}

/// One verdict line: `{"line":N,"ok":true}`, or the rejection's code, or
/// `INVALID_INPUT` with what is wrong.
fn push_verdict(out: &mut Vec<u8>, number: u64, verdict: &Result<Verdict, SignatureInputError>) {
    out.extend_from_slice(b"{\"line\":");
    let mut digits = [0; 20];
    let mut start = digits.len();
    let mut rest = number;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
    match verdict {
        Ok(Verdict::Ok) => out.extend_from_slice(b",\"ok\":true}\n"),
        Ok(rejected) => {
            out.extend_from_slice(b",\"ok\":false,\"error\":\"");
            out.extend_from_slice(rejected.code().as_bytes());
            out.extend_from_slice(b"\"}\n");
        }
        Err(error) => {
            out.extend_from_slice(b",\"ok\":false,\"error\":\"INVALID_INPUT\",\"detail\":");
            out.extend_from_slice(json_string(&error.0).as_bytes());
            out.extend_from_slice(b"}\n");
        }
    }
}
