//! Webhook signature v1 of the Fly Bot API, byte for byte as the platform's
//! Python computes it: the canonical JSON, the signing string, signing and
//! verification. Pure functions: no I/O, no async runtime, no HTTP.
//!
//! A Rust webhook receiver verifies a delivery exactly as the platform does:
//!
//! ```
//! use fly_signature::{Verdict, Verifier, sign_update_text};
//!
//! // What the platform would POST (signed here for the example).
//! let body = sign_update_text(
//!     r#"{"update_id": 7, "type": "message", "message": {"text": "héllo", "n": 1E2}}"#,
//!     "webhook-secret",
//!     "bot_1",
//!     1_700_000_000,
//!     "a-nonce",
//! )?;
//!
//! // The receiver's side: its secrets, its clock, the replay window (300 s).
//! let verifier = Verifier::new(["webhook-secret"], 1_700_000_010, Some(300));
//! assert_eq!(verifier.verify_text(&body)?, Verdict::Ok);
//!
//! // Another secret, or a clock too far off, is a rejection with the
//! // platform's code for it.
//! let wrong = Verifier::new(["another-secret"], 1_700_000_010, Some(300));
//! assert_eq!(wrong.verify_text(&body)?.code(), "SIGNATURE_MISMATCH");
//! let late = Verifier::new(["webhook-secret"], 1_700_001_000, Some(300));
//! assert_eq!(late.verify_text(&body)?, Verdict::ReplayWindowExceeded);
//! # Ok::<(), fly_signature::SignatureInputError>(())
//! ```
//!
//! As a receiver's function (the README shows this one):
//!
//! ```
//! use fly_signature::{Verdict, Verifier};
//!
//! /// Whether `body` (a delivery, as text) is signed with `secret`, now.
//! fn verified(body: &str, secret: &str, now_unix_secs: i64) -> Result<(), String> {
//!     let verifier = Verifier::new([secret], now_unix_secs, Some(300));
//!     match verifier.verify_text(body).map_err(|error| error.to_string())? {
//!         Verdict::Ok => Ok(()),
//!         rejected => Err(rejected.code().to_string()), // SIGNATURE_MISMATCH, …
//!     }
//! }
//!
//! let body = fly_signature::sign_update_text(r#"{"update_id":1}"#, "s", "b", 100, "n").unwrap();
//! assert_eq!(verified(&body, "s", 100), Ok(()));
//! assert_eq!(verified(&body, "t", 100), Err("SIGNATURE_MISMATCH".to_string()));
//! assert!(verified("not json", "s", 100).is_err());
//! ```
//!
//! The canonical JSON is Python's `json.dumps(value, sort_keys=True,
//! ensure_ascii=False, separators=(",", ":"))`, floats in `repr` form and
//! integers of any size:
//!
//! ```
//! use fly_signature::{canonical::canonical_json, parse};
//!
//! let value = parse(r#"{"b": 1E2, "a": [18446744073709551617, "é"]}"#)?;
//! assert_eq!(
//!     canonical_json(&value)?,
//!     r#"{"a":[18446744073709551617,"é"],"b":100.0}"#.as_bytes()
//! );
//! # Ok::<(), fly_signature::SignatureInputError>(())
//! ```
//!
//! - [`json`]: a parser accepting what CPython's `json.loads` accepts
//!   (`NaN`, integers of any size, lone surrogates, duplicate keys: why not
//!   serde_json), keeping the spans that give each update its exact bytes;
//! - [`canonical`]: the canonical JSON above, byte for byte;
//! - [`python`]: truthiness, `int()` and `str()` of parsed values;
//! - [`v1`]: the signing string, signing and verification.
//!
//! Anything Python would crash on, or that cannot be reproduced exactly, is a
//! [`SignatureInputError`], never a verdict.

pub mod canonical;
mod direct;
pub mod json;
#[cfg(test)]
mod properties;
pub mod python;
pub mod v1;
#[cfg(test)]
mod vectors;

use std::fmt;

use sha2::{Digest, Sha256};

pub use json::parse;
pub use v1::{Check, SigningFields, Verdict, Verifier};

/// An input the signature code cannot process exactly as the platform's Python
/// would (malformed JSON, a non-object update, a lone surrogate, ...).
#[derive(Debug, Clone)]
pub struct SignatureInputError(pub String);

impl fmt::Display for SignatureInputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SignatureInputError {}

pub fn sha256_hex(data: &[u8]) -> String {
    lower_hex(&Sha256::digest(data))
}

/// Lowercase hex, as Python's `hexdigest()`. (The `hex` crate's iterator-based
/// encoder showed up at 6% of `verify-sig --lines` time; a table lookup does not.)
pub fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits: Vec<u8> = bytes
        .iter()
        .flat_map(|&byte| {
            [
                DIGITS[usize::from(byte >> 4)],
                DIGITS[usize::from(byte & 0xF)],
            ]
        })
        .collect();
    String::from_utf8(digits).unwrap_or_default()
}

/// Signs an update given as JSON text: returns the signed update as one line
/// of JSON. The input's members keep their order and their exact text (minus
/// insignificant whitespace), so every number and escape re-parses in Python
/// to the same value; `bot.id`, `timestamp`, `nonce` and `signature` replace
/// existing members in place (later duplicates are dropped, since Python
/// would let them win) or are appended. Other members of `bot` are kept:
/// only `bot.id` is signed.
pub fn sign_update_text(
    update_json: &str,
    secret: &str,
    bot_id: &str,
    timestamp: i64,
    nonce: &str,
) -> Result<String, SignatureInputError> {
    let (update, members) = json::parse_with_members(update_json)?;
    let mut fields = SigningFields::of_update_header(&update)?;
    let timestamp_digits = timestamp.to_string();
    fields.bot_id = bot_id.into();
    fields.timestamp = python::PyInt(timestamp_digits.as_str().into());
    fields.nonce = nonce.into();
    let signature = v1::signature_with(&v1::hmac_key(secret), &fields.signing_string());

    let bot_id_json = canonical::json_string(bot_id);
    // The `bot` that Python would read (the last one), if it is an object.
    let old_bot = members
        .iter()
        .rev()
        .find(|member| member.key.as_ref() == b"bot")
        .map(|member| &update_json[member.span.clone()])
        // The key decodes to "bot", so its text holds no '{': the first one
        // opens the value.
        .and_then(|text| text.find('{').map(|start| &text[start..]));
    let bot = match old_bot.map(|text| (text, json::parse_with_members(text))) {
        Some((text, Ok((_, bot_members)))) => {
            with_members_set(text, &bot_members, &[("id", bot_id_json)])
        }
        _ => format!("{{\"id\":{bot_id_json}}}"),
    };
    Ok(with_members_set(
        update_json,
        &members,
        &[
            ("bot", bot),
            ("timestamp", timestamp_digits),
            ("nonce", canonical::json_string(nonce)),
            ("signature", format!("\"{signature}\"")),
        ],
    ))
}

/// The JSON object `object_json` (whose members are `members`) as one line,
/// with each key of `set` given its new value: in place of the first member
/// of that name (later ones dropped), or appended in `set`'s order. Other
/// members are copied as written, minus whitespace.
fn with_members_set(
    object_json: &str,
    members: &[json::MemberSpan],
    set: &[(&str, String)],
) -> String {
    let mut out = String::with_capacity(object_json.len() + 200);
    let mut written = vec![false; set.len()];
    out.push('{');
    for member in members {
        let replaced = set
            .iter()
            .position(|(key, _)| member.key.as_ref() == key.as_bytes());
        match replaced {
            Some(index) if written[index] => continue,
            Some(index) => {
                written[index] = true;
                push_member(&mut out, set[index].0, &set[index].1);
            }
            None => {
                separate(&mut out);
                compact_into(&object_json[member.span.clone()], &mut out);
            }
        }
    }
    for (index, (key, value)) in set.iter().enumerate() {
        if !written[index] {
            push_member(&mut out, key, value);
        }
    }
    out.push('}');
    out
}

fn separate(out: &mut String) {
    if !out.ends_with('{') {
        out.push(',');
    }
}

fn push_member(out: &mut String, key: &str, value_json: &str) {
    separate(out);
    out.push('"');
    out.push_str(key);
    out.push_str("\":");
    out.push_str(value_json);
}

/// Copies valid JSON text without the whitespace between tokens.
fn compact_into(json: &str, out: &mut String) {
    let mut in_string = false;
    let mut escaped = false;
    for character in json.chars() {
        if in_string {
            out.push(character);
            match character {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if !matches!(character, ' ' | '\t' | '\n' | '\r') {
            in_string = character == '"';
            out.push(character);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_update_keeps_fields_and_lexemes_and_verifies() {
        let input = "{\"update_id\": 5, \"timestamp\": 1, \"message\": {\"x\": 1E2, \"t\": \"a b\\u00e9\"},\n \"timestamp\": 2, \"z\": 18446744073709551617}";
        let signed = sign_update_text(input, "s", "bot_9", 1700, "n").unwrap();
        assert!(
            signed.starts_with(
                "{\"update_id\":5,\"timestamp\":1700,\"message\":{\"x\":1E2,\"t\":\"a b\\u00e9\"},\"z\":18446744073709551617,\"bot\":{\"id\":\"bot_9\"},\"nonce\":\"n\",\"signature\":\""
            ),
            "{signed}"
        );
        let verifier = Verifier::new(["s"], 1700, Some(300));
        assert_eq!(verifier.verify_text(&signed).unwrap(), Verdict::Ok);
    }

    #[test]
    fn signing_sets_bot_id_and_refuses_what_python_cannot_sign() {
        let signed =
            sign_update_text(r#"{"bot":"old","message":{"a":1}}"#, "s", "b", 1, "n").unwrap();
        assert!(
            signed.starts_with(r#"{"bot":{"id":"b"},"message""#),
            "{signed}"
        );
        // Other members of an old bot object stay, in place; only id changes.
        let signed = sign_update_text(
            r#"{"bot": {"name": "x", "id": 1, "n": 1E2, "id": 2}, "message": {}}"#,
            "s",
            "b",
            1,
            "n",
        )
        .unwrap();
        assert!(
            signed.starts_with(r#"{"bot":{"name":"x","id":"b","n":1E2},"message""#),
            "{signed}"
        );
        let verifier = Verifier::new(["s"], 1, Some(300));
        assert_eq!(verifier.verify_text(&signed).unwrap(), Verdict::Ok);
        assert!(sign_update_text("[]", "s", "b", 1, "n").is_err());
        assert!(sign_update_text(r#"{"message":{"a":"\ud800"}}"#, "s", "b", 1, "n").is_err());
    }
}
