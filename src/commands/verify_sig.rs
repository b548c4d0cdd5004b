//! `fly verify-sig`: the offline check of a signed update (SPEC section 3),
//! one document, or NDJSON with `--lines`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::{GlobalArgs, VerifySigArgs};
use crate::commands::{WebhookSecret, read_input, unix_time_now, webhook_secrets};
use crate::exit::{self, usage};
use crate::signature::canonical::{canonical_json, json_string};
use crate::signature::json::Value;
use crate::signature::{self, Check, SignatureInputError, Verdict, Verifier};

pub fn run(args: VerifySigArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let secrets = webhook_secrets(&args.secret, global)?;
    let now = unix_time_now(args.now)?;
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
    let invalid = |error: SignatureInputError| usage(format!("invalid signed update: {error}"));
    let update = signature::parse(&text).map_err(invalid)?;
    let check = verifier.check(&update).map_err(invalid)?;
    if args.explain {
        eprint!("{}", explain(&update, &check, &secrets, now, window));
    }
    match check.verdict().map_err(invalid)? {
        Verdict::Ok => {
            println!("Verify OK");
            Ok(exit::code(exit::SUCCESS))
        }
        rejected => {
            eprintln!("Verify failed: {}", rejected.code());
            Ok(exit::code(exit::FAILURE))
        }
    }
}

/// NDJSON: one verdict object per non-blank input line, streamed with
/// constant memory. Exit 1 if any line was not `OK`.
fn verify_lines(input: &str, verifier: &Verifier) -> anyhow::Result<ExitCode> {
    let mut reader: Box<dyn BufRead> = if input == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file =
            File::open(input).map_err(|error| usage(format!("cannot read {input}: {error}")))?;
        Box::new(BufReader::with_capacity(1 << 16, file))
    };
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut line = Vec::new();
    let mut number: u64 = 0;
    let mut all_ok = true;
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .context("reading the input")?
            == 0
        {
            break;
        }
        number += 1;
        if line
            .iter()
            .all(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
        {
            continue;
        }
        let verdict = match std::str::from_utf8(&line) {
            Ok(text) => verifier.verify_text(text),
            Err(_) => Err(SignatureInputError("the line is not valid UTF-8".into())),
        };
        all_ok &= matches!(verdict, Ok(Verdict::Ok));
        let written = match verdict {
            Ok(Verdict::Ok) => writeln!(out, "{{\"line\":{number},\"ok\":true}}"),
            Ok(rejected) => writeln!(
                out,
                "{{\"line\":{number},\"ok\":false,\"error\":\"{}\"}}",
                rejected.code()
            ),
            Err(error) => writeln!(
                out,
                "{{\"line\":{number},\"ok\":false,\"error\":\"INVALID_INPUT\",\"detail\":{}}}",
                json_string(&error.0)
            ),
        };
        written.context("writing to stdout")?;
    }
    out.flush().context("writing to stdout")?;
    Ok(exit::code(if all_ok {
        exit::SUCCESS
    } else {
        exit::FAILURE
    }))
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
