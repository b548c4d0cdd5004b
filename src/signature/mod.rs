//! Webhook signature v1 (SPEC section 1): Python-exact canonical JSON and the
//! sign/verify functions built on it. Pure functions, no I/O, no HTTP.
//!
//! Placeholder until the signature issue lands: the public interface below is
//! the contract other modules (the emulator, serve-webhook, forward) build on.

use std::fmt;

/// An input the signature code cannot process exactly as the platform's Python
/// would (malformed JSON, a lone surrogate, a non-object update, ...).
#[derive(Debug)]
pub struct SignatureInputError(pub String);

impl fmt::Display for SignatureInputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SignatureInputError {}

/// Signs an update given as JSON text: returns the signed update as JSON text,
/// the input's fields followed by `bot`, `timestamp`, `nonce` and `signature`.
pub fn sign_update_text(
    _update_json: &str,
    _secret: &str,
    _bot_id: &str,
    _timestamp: i64,
    _nonce: &str,
) -> Result<String, SignatureInputError> {
    Err(SignatureInputError(
        "signature v1 is not implemented yet".into(),
    ))
}
