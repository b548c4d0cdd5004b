//! The Fly Bot API as the rest of `fly` sees it: message types, the one
//! blocking HTTP client every command shares (its retries: `crate::retry`).

mod client;
pub mod media;
pub mod types;

use std::fmt;

pub use client::{
    ApiClient, BadUrl, Probe, Received, check_base_url, check_http_url, describe_transport_error,
    host_and_port, http_url_problem,
};
pub use types::{Chat, Message, MessageData, SendRequest, Target, Update};

use crate::retry::{Limit, attempts_text};

/// The bot token. It has no `Display` and a redacted `Debug`, so it cannot end
/// up in a log line or an error message by accident; the only way to the raw
/// value is [`Token::expose`], used to build the `Authorization` header.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Wraps a token read from a flag, the environment or a file. Returns
    /// `None` for an empty (or all-whitespace) value.
    pub fn new(raw: &str) -> Option<Token> {
        let trimmed = raw.trim();
        (!trimmed.is_empty()).then(|| Token(trimmed.to_string()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the token replaced by `***`, for text
    /// that came from elsewhere (a server's error page) and is about to be shown.
    /// Tokens shorter than 6 characters are not secrets worth mangling every
    /// word that happens to contain them.
    pub fn redact(&self, text: &str) -> String {
        if self.0.chars().count() < 6 {
            return text.to_string();
        }
        text.replace(&self.0, "***")
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// A call to the platform that did not succeed. A named type because callers
/// act on the kind: a service stops on [`ApiError::TokenRefused`] but never on
/// [`ApiError::Unavailable`].
#[derive(Debug)]
pub enum ApiError {
    /// 401/403: the token is wrong, revoked or lacks permission. Never retried.
    TokenRefused { status: u16, detail: String },
    /// Any other 4xx, or an envelope with a non-zero `code`: the request is wrong.
    Rejected {
        path: String,
        status: u16,
        detail: String,
    },
    /// Transient failures until the retry policy gave up: out of attempts,
    /// out of time, or asked (`Retry-After`) to wait longer than it has left.
    Unavailable {
        path: String,
        attempts: u32,
        last: String,
        limit: Limit,
    },
    /// The server answered 2xx with something that is not the documented JSON,
    /// or with HTTP that cannot be read (never retried: it would answer the same).
    BadResponse { path: String, detail: String },
    /// The base URL is `https://` but its server speaks plain HTTP. Never
    /// retried: it answers the same way every time.
    PlainHttp(crate::http_client::PlainHttp),
    /// The caller asked to stop while a retry was pending.
    Cancelled,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::TokenRefused { status, detail } => write!(
                f,
                "the platform refused the bot token (HTTP {status}{detail})"
            ),
            ApiError::Rejected {
                path,
                status,
                detail,
            } => write!(f, "{path} was rejected: HTTP {status}{detail}"),
            ApiError::Unavailable {
                path,
                last,
                limit: Limit::RetryAfter(wait),
                ..
            } => write!(f, "{path} failed: {last}; the platform {wait}"),
            ApiError::Unavailable {
                path,
                attempts,
                last,
                limit,
            } => write!(
                f,
                "{path} failed after {}{}: {last}",
                attempts_text(*attempts),
                limit.spent()
            ),
            ApiError::BadResponse { path, detail } => {
                write!(f, "{path} answered with an unexpected body: {detail}")
            }
            ApiError::PlainHttp(plain) => plain.fmt(f),
            ApiError::Cancelled => f.write_str("interrupted"),
        }
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_never_formatted() {
        let token = Token::new("  s3cr3t-token \n").unwrap();
        assert_eq!(token.expose(), "s3cr3t-token");
        assert_eq!(format!("{token:?}"), "Token(***)");
        assert_eq!(
            token.redact("bad token s3cr3t-token!"),
            "bad token ***!".to_string()
        );
        assert!(Token::new(" \t").is_none());
    }

    #[test]
    fn errors_read_as_one_line() {
        let refused = ApiError::TokenRefused {
            status: 401,
            detail: " (code 40100: invalid token)".into(),
        };
        assert_eq!(
            refused.to_string(),
            "the platform refused the bot token (HTTP 401 (code 40100: invalid token))"
        );
        let gave_up = |attempts, limit| ApiError::Unavailable {
            path: "/api/v1/s/bot/send".into(),
            attempts,
            last: "HTTP 503".into(),
            limit,
        };
        assert_eq!(
            gave_up(6, Limit::Attempts).to_string(),
            "/api/v1/s/bot/send failed after 6 attempts: HTTP 503"
        );
        let budget = std::time::Duration::from_secs(30);
        assert_eq!(
            gave_up(1, Limit::Time { budget }).to_string(),
            "/api/v1/s/bot/send failed after 1 attempt in about 30 s \
             (as long as this command retries): HTTP 503"
        );
        let throttled = ApiError::Unavailable {
            path: "/api/v1/s/bot/send".into(),
            attempts: 1,
            last: "HTTP 429 (code 42900: slow down)".into(),
            limit: Limit::RetryAfter(crate::retry::WaitTooLong {
                asked: std::time::Duration::from_secs(300),
                left: std::time::Duration::from_secs(29),
                budget,
            }),
        };
        assert_eq!(
            throttled.to_string(),
            "/api/v1/s/bot/send failed: HTTP 429 (code 42900: slow down); the platform \
             asked to wait 300 s (Retry-After), more than the ~30 s this command retries for"
        );
    }
}
