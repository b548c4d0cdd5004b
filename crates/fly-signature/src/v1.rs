//! Signature v1 as the platform's reference verify script computes it:
//!
//! ```text
//! payload = update.message or update.callback_query or {}
//! signing = "\n".join([str(int(update_id or 0)), str(type or ""), str((bot or {}).get("id") or ""),
//!                      str(int(timestamp or 0)), str(nonce or ""), sha256hex(canonical_json(payload))])
//! signature = hmac_sha256(secret, signing).hexdigest()
//! ```
//!
//! and its checks in the script's order: every input error first (Python
//! would crash before deciding), then `|now - timestamp| > window`
//! (REPLAY_WINDOW_EXCEEDED), then the constant-time signature comparison
//! (SIGNATURE_MISMATCH).

use std::borrow::Cow;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::SignatureInputError;
use super::canonical::canonical_json;
use super::direct;
use super::json::Value;
use super::python::{PyInt, py_int, py_str, truthy, type_name};
use super::sha256_hex;

type HmacSha256 = Hmac<Sha256>;

/// The six fields of the signing string, each as Python's `str()` prints it,
/// and where the payload came from.
#[derive(Debug, Clone)]
pub struct SigningFields<'a> {
    /// `"message"`, `"callback_query"`, or `None` when both were falsy and
    /// the payload is `{}`.
    pub payload_key: Option<&'static str>,
    pub canonical_payload: Vec<u8>,
    pub payload_sha256: String,
    pub update_id: PyInt<'a>,
    pub update_type: Cow<'a, str>,
    pub bot_id: Cow<'a, str>,
    pub timestamp: PyInt<'a>,
    pub nonce: Cow<'a, str>,
}

impl<'a> SigningFields<'a> {
    /// All six fields as the reference reads them from a signed update.
    pub fn of_update(update: &'a Value<'a>) -> Result<Self, SignatureInputError> {
        let (payload_key, canonical_payload) = payload_of(update)?;
        let members = SignedMembers::of(|key| update.get(key))?;
        Ok(SigningFields {
            payload_key,
            payload_sha256: sha256_hex(&canonical_payload),
            canonical_payload,
            update_id: members.update_id,
            update_type: members.update_type,
            bot_id: members.bot_id,
            timestamp: members.timestamp,
            nonce: members.nonce,
        })
    }

    /// The fields that come from the update itself (payload, `update_id`,
    /// `type`), with an empty bot id and nonce and a zero timestamp for the
    /// signer to fill in.
    pub fn of_update_header(update: &'a Value<'a>) -> Result<Self, SignatureInputError> {
        let (payload_key, canonical_payload) = payload_of(update)?;
        Ok(SigningFields {
            payload_key,
            payload_sha256: sha256_hex(&canonical_payload),
            canonical_payload,
            update_id: py_int(update.get("update_id"), "update_id")?,
            update_type: py_str(update.get("type"), "type")?,
            bot_id: Cow::Borrowed(""),
            timestamp: PyInt(Cow::Borrowed("0")),
            nonce: Cow::Borrowed(""),
        })
    }

    /// The six fields in signing order, for display.
    pub fn labelled(&self) -> [(&'static str, &str); 6] {
        [
            ("update_id", &self.update_id.0),
            ("type", &self.update_type),
            ("bot.id", &self.bot_id),
            ("timestamp", &self.timestamp.0),
            ("nonce", &self.nonce),
            ("sha256(payload)", &self.payload_sha256),
        ]
    }

    /// `"\n".join([...])` of the six fields.
    pub fn signing_string(&self) -> String {
        self.labelled().map(|(_, field)| field).join("\n")
    }
}

static EMPTY_OBJECT: Value<'static> = Value::Object(Vec::new());

/// The payload's key and canonical JSON (`message or callback_query or {}`);
/// an update that is not an object is refused first, as Python's first
/// `.get` would.
pub(crate) fn payload_of(
    update: &Value,
) -> Result<(Option<&'static str>, Vec<u8>), SignatureInputError> {
    if !matches!(update, Value::Object(_)) {
        return Err(SignatureInputError(format!(
            "the signed update must be a JSON object, not a {} (Python: AttributeError)",
            type_name(update)
        )));
    }
    let (payload_key, payload) = ["message", "callback_query"]
        .into_iter()
        .find_map(|key| {
            let value = update.get(key).filter(|value| truthy(value))?;
            Some((Some(key), value))
        })
        .unwrap_or((None, &EMPTY_OBJECT));
    let canonical_payload = canonical_json(payload).map_err(|error| {
        let key = payload_key.unwrap_or("payload");
        SignatureInputError(format!("in update.{key}: {error}"))
    })?;
    Ok((payload_key, canonical_payload))
}

/// The five members of the signing string that are not the payload's hash,
/// as Python's `str()` prints them.
pub(crate) struct SignedMembers<'a> {
    pub(crate) update_id: PyInt<'a>,
    pub(crate) update_type: Cow<'a, str>,
    pub(crate) bot_id: Cow<'a, str>,
    pub(crate) timestamp: PyInt<'a>,
    pub(crate) nonce: Cow<'a, str>,
}

impl<'a> SignedMembers<'a> {
    /// Read in the reference's order, so the first error is the one Python
    /// would raise. `member` is the update's `.get`.
    pub(crate) fn of(
        member: impl Fn(&str) -> Option<&'a Value<'a>>,
    ) -> Result<Self, SignatureInputError> {
        let update_id = py_int(member("update_id"), "update_id")?;
        let update_type = py_str(member("type"), "type")?;
        let bot_id = match member("bot").filter(|bot| truthy(bot)) {
            None => None,
            Some(bot @ Value::Object(_)) => bot.get("id"),
            Some(other) => {
                return Err(SignatureInputError(format!(
                    "bot is a {}, not an object (Python: AttributeError on .get)",
                    type_name(other)
                )));
            }
        };
        Ok(SignedMembers {
            update_id,
            update_type,
            bot_id: py_str(bot_id, "bot.id")?,
            timestamp: py_int(member("timestamp"), "timestamp")?,
            nonce: py_str(member("nonce"), "nonce")?,
        })
    }
}

/// The hex HMAC-SHA256 of the signing string under one secret.
pub fn signature_with(key: &HmacSha256, signing_string: &str) -> String {
    let mut mac = key.clone();
    mac.update(signing_string.as_bytes());
    super::lower_hex(&mac.finalize().into_bytes())
}

/// An HMAC key prepared once per secret, so checking many updates does not
/// hash the key pads again for each.
pub fn hmac_key(secret: &str) -> HmacSha256 {
    HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length")
}

/// A verification verdict that is not an input error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    ReplayWindowExceeded,
    SignatureMismatch,
}

impl Verdict {
    /// The platform's name for a rejection (`Verify failed: …`).
    pub fn code(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::ReplayWindowExceeded => "REPLAY_WINDOW_EXCEEDED",
            Verdict::SignatureMismatch => "SIGNATURE_MISMATCH",
        }
    }
}

/// Checks signed updates against a set of secrets (any match passes), a
/// clock and a replay window (`None`: signature only).
pub struct Verifier {
    keys: Vec<HmacSha256>,
    now: i64,
    window: Option<u64>,
}

/// Everything one verification computed, for `--explain`.
pub struct Check<'a> {
    pub fields: SigningFields<'a>,
    pub signing_string: String,
    /// The expected signature under each secret, in the order given.
    pub expected: Vec<String>,
    /// `str(signature or "")`, or why Python could not compare it.
    pub given: Result<Cow<'a, str>, SignatureInputError>,
    /// `now - timestamp`, when it fits.
    pub skew: Option<i128>,
    pub replay_exceeded: bool,
}

impl Check<'_> {
    /// The decision, in the reference script's order.
    pub fn verdict(&self) -> Result<Verdict, SignatureInputError> {
        decide(
            self.replay_exceeded,
            &self.given,
            self.expected.iter().map(String::as_bytes),
        )
    }
}

/// The reference's decision once every input error is behind: the replay
/// window first, then whether `given` is a signature any secret makes
/// (`expected` is asked only then).
fn decide<E: AsRef<[u8]>>(
    replay_exceeded: bool,
    given: &Result<Cow<str>, SignatureInputError>,
    expected: impl Iterator<Item = E>,
) -> Result<Verdict, SignatureInputError> {
    if replay_exceeded {
        return Ok(Verdict::ReplayWindowExceeded);
    }
    let given = given
        .as_ref()
        .map_err(|error| SignatureInputError(error.0.clone()))?;
    let any_match = expected.fold(false, |found, expected| {
        found | constant_time_eq(expected.as_ref(), given.as_bytes())
    });
    Ok(if any_match {
        Verdict::Ok
    } else {
        Verdict::SignatureMismatch
    })
}

/// `str(signature or "")` as `hmac.compare_digest` can take it.
fn given_signature<'a>(
    signature: Option<&'a Value<'a>>,
) -> Result<Cow<'a, str>, SignatureInputError> {
    py_str(signature, "signature").and_then(|given| {
        // hmac.compare_digest raises TypeError for non-ASCII strings.
        if given.is_ascii() {
            Ok(given)
        } else {
            Err(SignatureInputError(
                "signature has non-ASCII characters (Python's hmac.compare_digest raises TypeError)"
                    .into(),
            ))
        }
    })
}

impl Verifier {
    pub fn new<'s>(
        secrets: impl IntoIterator<Item = &'s str>,
        now: i64,
        window: Option<u64>,
    ) -> Self {
        Verifier {
            keys: secrets.into_iter().map(hmac_key).collect(),
            now,
            window,
        }
    }

    /// Parses and checks one signed update given as JSON text.
    pub fn verify_text(&self, text: &str) -> Result<Verdict, SignatureInputError> {
        if let Some(verdict) = direct::with_scratch(|scratch| self.verify_direct(text, scratch)) {
            return Ok(verdict);
        }
        let update = super::json::parse(text)?;
        self.check(&update)?.verdict()
    }

    /// The verdict by the direct route ([`direct`]), or `None` when the
    /// update must take the tree route: every input error does.
    pub(crate) fn verify_direct(
        &self,
        text: &str,
        scratch: &mut direct::Scratch,
    ) -> Option<Verdict> {
        let parts = direct::read_signed_parts(text, scratch)?;
        let members = SignedMembers::of(|key| parts.member(key)).ok()?;
        let payload_sha256 = hex_digest(&Sha256::digest(parts.canonical_payload(scratch)));
        let (_, replay_exceeded) = self.skew(&members.timestamp);
        let signing_string = [
            members.update_id.0.as_bytes(),
            members.update_type.as_bytes(),
            members.bot_id.as_bytes(),
            members.timestamp.0.as_bytes(),
            members.nonce.as_bytes(),
            &payload_sha256,
        ];
        let expected = self.keys.iter().map(|key| {
            let mut mac = key.clone();
            for (position, field) in signing_string.iter().enumerate() {
                if position > 0 {
                    mac.update(b"\n");
                }
                mac.update(field);
            }
            hex_digest(&mac.finalize().into_bytes())
        });
        decide(
            replay_exceeded,
            &given_signature(parts.member("signature")),
            expected,
        )
        .ok()
    }

    /// Computes every step of the verification of a parsed signed update.
    pub fn check<'a>(&self, update: &'a Value<'a>) -> Result<Check<'a>, SignatureInputError> {
        let fields = SigningFields::of_update(update)?;
        let signing_string = fields.signing_string();
        let expected = self
            .keys
            .iter()
            .map(|key| signature_with(key, &signing_string))
            .collect();
        let (skew, replay_exceeded) = self.skew(&fields.timestamp);
        Ok(Check {
            fields,
            signing_string,
            expected,
            given: given_signature(update.get("signature")),
            skew,
            replay_exceeded,
        })
    }

    /// `now - timestamp` when it fits, and whether it is outside the window.
    fn skew(&self, timestamp: &PyInt) -> (Option<i128>, bool) {
        let skew = timestamp
            .as_i128()
            .and_then(|timestamp| i128::from(self.now).checked_sub(timestamp));
        let replay_exceeded = match (self.window, skew) {
            (None, _) => false,
            (Some(window), Some(skew)) => skew.unsigned_abs() > u128::from(window),
            (Some(_), None) => true,
        };
        (skew, replay_exceeded)
    }
}

/// A SHA-256 digest in lowercase hex, as Python's `hexdigest()`, on the stack.
fn hex_digest(digest: &[u8]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0; 64];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(digest) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xF)];
    }
    hex
}

/// Compares without an early exit, so the time taken does not tell an
/// attacker how many leading characters of a forged signature were right.
/// (Lengths may differ visibly, as with Python's `hmac.compare_digest`.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;

    const UPDATE: &str = r#"{"update_id":7,"type":"message","message":{"text":"hi","n":1.0},"bot":{"id":"b"},"timestamp":1000,"nonce":"n1"}"#;

    #[test]
    fn signing_string_follows_the_reference() {
        let update = parse(UPDATE).unwrap();
        let fields = SigningFields::of_update(&update).unwrap();
        assert_eq!(fields.canonical_payload, br#"{"n":1.0,"text":"hi"}"#);
        assert_eq!(
            fields.signing_string(),
            format!(
                "7\nmessage\nb\n1000\nn1\n{}",
                sha256_hex(br#"{"n":1.0,"text":"hi"}"#)
            )
        );
    }

    #[test]
    fn falsy_message_falls_through_to_callback_query_then_empty_object() {
        for (json, key, canonical) in [
            (
                r#"{"message":{},"callback_query":{"a":1}}"#,
                Some("callback_query"),
                "{\"a\":1}",
            ),
            (r#"{"message":0.0,"callback_query":""}"#, None, "{}"),
            (r#"{"message":"x"}"#, Some("message"), "\"x\""),
        ] {
            let update = parse(json).unwrap();
            let fields = SigningFields::of_update(&update).unwrap();
            assert_eq!(fields.payload_key, key, "{json}");
            assert_eq!(fields.canonical_payload, canonical.as_bytes(), "{json}");
        }
    }

    #[test]
    fn verdicts_in_reference_order() {
        let update = parse(UPDATE).unwrap();
        let signing = SigningFields::of_update(&update).unwrap().signing_string();
        let good = signature_with(&hmac_key("s"), &signing);
        let signed = UPDATE.replace("\"nonce\"", &format!("\"signature\":\"{good}\",\"nonce\""));
        let verify = |secrets: &[&str], now, window| {
            Verifier::new(secrets.iter().copied(), now, window).verify_text(&signed)
        };
        assert_eq!(verify(&["s"], 1300, Some(300)).unwrap(), Verdict::Ok);
        assert_eq!(verify(&["x", "s"], 1000, Some(300)).unwrap(), Verdict::Ok);
        assert_eq!(
            verify(&["x"], 1000, Some(300)).unwrap(),
            Verdict::SignatureMismatch
        );
        assert_eq!(
            verify(&["x"], 1301, Some(300)).unwrap(),
            Verdict::ReplayWindowExceeded
        );
        assert_eq!(verify(&["s"], 1301, None).unwrap(), Verdict::Ok);
    }

    #[test]
    fn non_ascii_signature_is_an_input_error_unless_replay_comes_first() {
        let update = r#"{"timestamp":1000,"signature":"é"}"#;
        assert!(
            Verifier::new(["s"], 1000, Some(300))
                .verify_text(update)
                .is_err()
        );
        assert_eq!(
            Verifier::new(["s"], 5000, Some(300))
                .verify_text(update)
                .unwrap(),
            Verdict::ReplayWindowExceeded
        );
    }

    #[test]
    fn python_crashes_are_input_errors() {
        for json in [
            "[1]",
            r#"{"bot":"b"}"#,
            r#"{"update_id":"4.5"}"#,
            r#"{"timestamp":[1]}"#,
            r#"{"message":{"a":"\ud800"}}"#,
            r#"{"nonce":"\udc00"}"#,
            r#"{"timestamp":NaN}"#,
        ] {
            assert!(
                Verifier::new(["s"], 0, None).verify_text(json).is_err(),
                "{json}"
            );
        }
        // A lone surrogate outside the signed fields is harmless, as in Python.
        let harmless = r#"{"other":"\ud800","message":{"a":{"b":"\ud800","b":1}}}"#;
        assert!(Verifier::new(["s"], 0, None).verify_text(harmless).is_ok());
    }
}
