//! Webhook signature v1 (SPEC section 1): canonical JSON and the sign/verify
//! functions built on it. Pure functions, no I/O, no HTTP.
//!
//! INTERIM: canonical JSON here is serde_json's compact, key-sorted output, which
//! equals Python's `json.dumps(..., sort_keys=True, ensure_ascii=False,
//! separators=(",",":"))` only for documents without floats. The signature issue
//! replaces it with a Python-exact implementation behind the same interface.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// An input the signature code cannot process exactly as the platform's Python
/// would (malformed JSON, a non-object update, ...).
#[derive(Debug)]
pub struct SignatureInputError(pub String);

impl fmt::Display for SignatureInputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SignatureInputError {}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Signs an update given as JSON text: returns the signed update as JSON text,
/// the input's fields followed by `bot`, `timestamp`, `nonce` and `signature`.
pub fn sign_update_text(
    update_json: &str,
    secret: &str,
    bot_id: &str,
    timestamp: i64,
    nonce: &str,
) -> Result<String, SignatureInputError> {
    let mut update: Map<String, Value> = serde_json::from_str(update_json)
        .map_err(|error| SignatureInputError(format!("update is not a JSON object: {error}")))?;
    let payload = ["message", "callback_query"]
        .iter()
        .filter_map(|key| update.get(*key))
        .find(|value| is_truthy(value))
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    let canonical = serde_json::to_string(&payload).expect("a Value always serializes");
    let update_id = match update.get("update_id") {
        Some(Value::Number(number)) => number.to_string(),
        _ => "0".to_string(),
    };
    let update_type = update.get("type").and_then(Value::as_str).unwrap_or("");
    let signing = [
        update_id.as_str(),
        update_type,
        bot_id,
        &timestamp.to_string(),
        nonce,
        &sha256_hex(canonical.as_bytes()),
    ]
    .join("\n");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(signing.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    update.insert("bot".into(), serde_json::json!({"id": bot_id}));
    update.insert("timestamp".into(), timestamp.into());
    update.insert("nonce".into(), nonce.into());
    update.insert("signature".into(), signature.into());
    Ok(Value::Object(update).to_string())
}

fn is_truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(flag) => *flag,
        Value::Number(number) => number.as_f64() != Some(0.0),
        Value::String(text) => !text.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}
