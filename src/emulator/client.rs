//! The control API (`/_emulator/*`) from the client side, over real HTTP as
//! any script would use it: `fly emulator say` and `fly demo` play the users
//! through it, `fly emulator sent` reads what the bot sent, `webhook` and
//! `media` set the emulator up.
//!
//! No retries: the emulator is a local process that either runs or does not,
//! and "is it started?" is the answer a user needs at once.

use std::time::Duration;

use anyhow::{Context, anyhow};
use serde_json::Value;

/// A local emulator answers at once; a long wait means something else listens.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Nothing listens at the emulator's address: it is not started, or it
/// listens elsewhere.
#[derive(Debug)]
pub struct NoEmulator(pub String);

impl std::fmt::Display for NoEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no emulator at {} (connection refused); start one with `fly emulator`",
            self.0
        )
    }
}

impl std::error::Error for NoEmulator {}

pub struct ControlClient {
    agent: ureq::Agent,
    base_url: String,
}

impl ControlClient {
    /// A client for the emulator at `base_url` (`http://HOST:PORT`).
    pub fn new(base_url: &str) -> ControlClient {
        ControlClient::waiting(base_url, Duration::ZERO)
    }

    /// A client whose calls may take `wait` more than usual: long polls.
    pub fn waiting(base_url: &str, wait: Duration) -> ControlClient {
        // The emulator is local: never reached through a proxy from the environment.
        let agent = crate::http_client::agent(crate::http_client::Profile::Local {
            timeout: TIMEOUT + wait,
        });
        ControlClient {
            agent,
            base_url: base_url.trim_end_matches('/').to_string(),
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base_url);
        let answer = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body.to_string());
        self.read(path, answer)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base_url);
        let answer = self.agent.get(&url).call();
        self.read(path, answer)
    }

    /// What the bot sent after the first `after` sends (all of them with
    /// 0), waiting up to `wait` for one if there is none yet.
    pub fn sent(&self, after: usize, wait: Duration) -> anyhow::Result<SentPage> {
        let path = format!("/_emulator/sent?after={after}&wait={}", wait.as_secs_f64());
        let url = format!("{}{path}", self.base_url);
        let answer = self.agent.get(&url).call();
        let text = self.read_text(&path, answer)?;
        SentPage::read(&text).with_context(|| {
            format!(
                "{}{path} answered with something else than what the bot sent: \
                 is it a fly emulator?",
                self.base_url
            )
        })
    }

    /// The JSON answer of a 2xx, else one line saying what went wrong and where.
    fn read(
        &self,
        path: &str,
        answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<Value> {
        let base = &self.base_url;
        let text = self.read_text(path, answer)?;
        serde_json::from_str(&text)
            .map_err(|_| anyhow!("{base}{path} did not answer with JSON: is it a fly emulator?"))
    }

    /// The text of a 2xx answer, else one line saying what went wrong and where.
    fn read_text(
        &self,
        path: &str,
        answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<String> {
        let base = &self.base_url;
        let mut response = answer.map_err(|error| match error {
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                anyhow::Error::new(NoEmulator(base.clone()))
            }
            other => {
                anyhow::Error::new(other).context(format!("calling the emulator at {base}{path}"))
            }
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer of {base}{path}"))?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if !(200..300).contains(&status) {
            let why = json
                .as_ref()
                .and_then(|value| value["msg"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(anyhow!(
                "the emulator at {base} refused {path}: HTTP {status} ({why})"
            ));
        }
        Ok(text)
    }
}

/// An answer of `GET /_emulator/sent?after=N`.
#[derive(Debug)]
pub struct SentPage {
    pub messages: Vec<SentMessage>,
    /// What to ask `after` next time.
    pub next: usize,
}

/// One message the bot sent, as the emulator recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct SentMessage {
    /// The send request body, on one line: every lexeme as the bot wrote it.
    pub body: String,
    /// `to_user_id` or `group_id`, whichever it was sent to.
    pub chat_field: &'static str,
    pub chat: String,
    pub msg_type: String,
    /// The text of a text message, else the media URL of `data` (its
    /// field as `api::media_fields` names it), else `data` itself as JSON.
    pub content: String,
    pub client_msg_id: Option<String>,
}

impl SentPage {
    /// Reads the answer with the Python-compatible reader, as the emulator
    /// took the bodies in (a lone surrogate, `NaN`, a 30-digit number pass).
    fn read(text: &str) -> anyhow::Result<SentPage> {
        use fly_signature::json::{Value as PyValue, compact, parse_located};
        let located = parse_located(text, &["sent"]).map_err(|error| anyhow!("{error}"))?;
        let bodies = match located.value.get("sent") {
            Some(PyValue::Array(bodies)) => bodies,
            _ => return Err(anyhow!("no sent list")),
        };
        let next = match located.value.get("next") {
            Some(PyValue::Int(digits)) => digits.parse().map_err(|_| anyhow!("a bad next"))?,
            _ => return Err(anyhow!("no next")),
        };
        let messages = bodies
            .iter()
            .zip(&located.items)
            .map(|(body, span)| SentMessage::read(body, compact(&text[span.clone()])))
            .collect();
        Ok(SentPage { messages, next })
    }
}

impl SentMessage {
    fn read(body: &fly_signature::json::Value, raw: String) -> SentMessage {
        use fly_signature::json::Value as PyValue;
        let shown = |value: Option<&PyValue>| -> Option<String> {
            match value? {
                PyValue::Null => None,
                PyValue::Str(text) => Some(wtf8_lossy(text)),
                PyValue::Int(digits) => Some((*digits).to_string()),
                other => Some(fly_signature::canonical::wire_json(other)),
            }
        };
        let (chat_field, chat) = match shown(body.get("group_id")) {
            Some(group) => ("group_id", group),
            None => (
                "to_user_id",
                shown(body.get("to_user_id")).unwrap_or_default(),
            ),
        };
        let msg_type = shown(body.get("msg_type")).unwrap_or_default();
        let data = body.get("data");
        let content = if msg_type == "text" {
            shown(data.and_then(|data| data.get("content")))
        } else {
            // The media's own field (not its preview), as fly reads it.
            crate::api::media::media_fields(&msg_type)
                .first()
                .and_then(|field| shown(data.and_then(|data| data.get(field))))
        };
        let content = content
            .or_else(|| data.map(fly_signature::canonical::wire_json))
            .unwrap_or_default();
        SentMessage {
            body: raw,
            chat_field,
            chat,
            msg_type,
            content,
            client_msg_id: shown(body.get("client_msg_id")),
        }
    }
}

/// WTF-8 as text: each lone surrogate (3 bytes, `ED A0..BF xx`) becomes
/// one U+FFFD, as a UTF-8 decoder would show one broken character.
fn wtf8_lossy(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some(at) = rest
        .windows(2)
        .position(|pair| pair[0] == 0xED && (0xA0..=0xBF).contains(&pair[1]))
    {
        text.push_str(&String::from_utf8_lossy(&rest[..at]));
        text.push(char::REPLACEMENT_CHARACTER);
        rest = rest.get(at + 3..).unwrap_or_default();
    }
    text.push_str(&String::from_utf8_lossy(rest));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_pages_keep_each_body_as_sent_on_one_line() {
        let text = "{\"sent\":[{\"msg_type\":\"text\", \"data\":{\"content\":\"a\\ud83d\\n\"},\n \
                    \"client_msg_id\":\"c1\",\"to_user_id\":\"u_1\",\"n\":1E2},\
                    {\"msg_type\":\"image\",\"data\":{\"originalUrl\":\"https://x/a.png\"},\
                    \"group_id\":42}],\"attempts\":3,\"next\":7}";
        let page = SentPage::read(text).unwrap();
        assert_eq!(page.next, 7);
        let [text_message, image] = &page.messages[..] else {
            panic!("{page:?}");
        };
        assert_eq!(
            text_message.body,
            "{\"msg_type\":\"text\",\"data\":{\"content\":\"a\\ud83d\\n\"},\
             \"client_msg_id\":\"c1\",\"to_user_id\":\"u_1\",\"n\":1E2}"
        );
        assert_eq!(
            (text_message.chat_field, text_message.chat.as_str()),
            ("to_user_id", "u_1")
        );
        assert_eq!(text_message.content, "a\u{fffd}\n");
        assert_eq!(text_message.client_msg_id.as_deref(), Some("c1"));
        assert_eq!((image.chat_field, image.chat.as_str()), ("group_id", "42"));
        assert_eq!(image.msg_type, "image");
        assert_eq!(image.content, "https://x/a.png");
        assert_eq!(image.client_msg_id, None);
        assert!(SentPage::read("{\"sent\":[]}").is_err());
        assert!(SentPage::read("[]").is_err());
    }
}
