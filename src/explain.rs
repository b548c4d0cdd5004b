//! `fly verify-sig --explain`'s account of a signature check, step by
//! step, for finding where another implementation differs; the inspector
//! shows the same steps for each delivery. Secrets are named by where they
//! came from and their length, never shown.

use fly_signature::Check;
use fly_signature::canonical::{canonical_json, json_string};
use fly_signature::json::Value;

/// What an explanation says of a secret: where it came from, its length.
#[derive(Debug, Clone)]
pub struct SecretNote {
    pub source: String,
    pub bytes: usize,
}

/// Every step of the computation, for finding where another implementation
/// differs. Secrets are named by source and length, never shown.
pub fn explain(
    update: &Value,
    check: &Check,
    secrets: &[SecretNote],
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
fn explain_signature(check: &Check, secrets: &[SecretNote], text: &mut String) {
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
            secret.bytes
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
