//! Validation of request bodies, bot API and control API alike: each parser
//! turns a JSON body into a typed request, or into a message that names the
//! offending field, which the handler answers with 400.
//!
//! JSON `null` counts as "not given" everywhere, as clients often send
//! `"group_id": null` for a field they do not use.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT;
use bytes::Bytes;
use serde_json::{Map, Value};

use super::media_content::MediaContent;

/// Long polls are capped so that a forgotten client cannot pin a connection for hours.
pub const MAX_POLL_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_POLL_LIMIT: usize = 100;
const DEFAULT_ACCESS_LIFETIME: Duration = Duration::from_secs(600);
const MAX_EXPIRE_SECONDS: u64 = 7 * 24 * 3600;

/// Why a body was refused: one line for the `msg` of a 400 answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid(pub String);

impl From<String> for Invalid {
    fn from(message: String) -> Self {
        Invalid(message)
    }
}

impl From<&str> for Invalid {
    fn from(message: &str) -> Self {
        Invalid(message.to_string())
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

/// `POST /api/v1/s/bot/updates`.
#[derive(Debug, PartialEq)]
pub struct UpdatesRequest {
    pub offset: i64,
    pub limit: usize,
    pub timeout: Duration,
}

impl UpdatesRequest {
    pub fn parse(body: &Value) -> Result<UpdatesRequest, Invalid> {
        let object = as_object(body)?;
        let offset = match field(object, "offset") {
            None => 0,
            Some(value) => value.as_i64().ok_or("offset must be an integer")?,
        };
        let limit = match field(object, "limit").map(Value::as_u64) {
            None => DEFAULT_POLL_LIMIT,
            Some(Some(limit @ 1..=100)) => limit as usize,
            Some(_) => return Err("limit must be an integer from 1 to 100".into()),
        };
        let timeout = match field(object, "timeout").map(Value::as_f64) {
            None => Duration::ZERO,
            // Clamped before the conversion, which panics past u64 seconds.
            Some(Some(seconds)) if seconds >= 0.0 && seconds.is_finite() => {
                Duration::from_secs_f64(seconds.min(MAX_POLL_TIMEOUT.as_secs_f64()))
            }
            Some(_) => return Err("timeout must be a non-negative number of seconds".into()),
        };
        Ok(UpdatesRequest {
            offset,
            limit,
            timeout,
        })
    }
}

/// `POST /api/v1/s/bot/send`, validated; the body itself is recorded verbatim.
#[derive(Debug, PartialEq)]
pub struct SendCall {
    pub msg_type: String,
    /// `to_user_id` or `group_id`, whichever was given.
    pub target_field: &'static str,
    /// The target id exactly as given (string or number).
    pub target: Value,
    pub client_msg_id: Option<String>,
}

impl SendCall {
    pub fn parse(body: &Value) -> Result<SendCall, Invalid> {
        let object = as_object(body)?;
        let msg_type = non_empty_string(object, "msg_type")?;
        if !matches!(field(object, "data"), Some(Value::Object(_))) {
            return Err("data must be a JSON object".into());
        }
        let (target_field, target) = match (field(object, "to_user_id"), field(object, "group_id"))
        {
            (Some(user), None) => ("to_user_id", user),
            (None, Some(group)) => ("group_id", group),
            (Some(_), Some(_)) => {
                return Err("give one of to_user_id and group_id, not both".into());
            }
            (None, None) => return Err("one of to_user_id and group_id is required".into()),
        };
        if !is_chat_id(target) {
            return Err(format!("{target_field} must be a non-empty string or a number").into());
        }
        let client_msg_id = match field(object, "client_msg_id") {
            None => None,
            Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
            Some(_) => return Err("client_msg_id must be a non-empty string".into()),
        };
        Ok(SendCall {
            msg_type,
            target_field,
            target: target.clone(),
            client_msg_id,
        })
    }
}

/// `POST /api/v1/s/bot/files/batch_access`.
#[derive(Debug, PartialEq)]
pub struct BatchAccessRequest {
    pub urls: Vec<String>,
    pub lifetime: Duration,
}

impl BatchAccessRequest {
    pub fn parse(body: &Value) -> Result<BatchAccessRequest, Invalid> {
        let object = as_object(body)?;
        let Some(Value::Array(files)) = field(object, "files") else {
            return Err("files must be a list of {\"url\": …} objects".into());
        };
        let urls = files
            .iter()
            .enumerate()
            .map(|(index, file)| match file.get("url") {
                Some(Value::String(url)) => Ok(url.clone()),
                _ => Err(format!("files[{index}].url must be a string").into()),
            })
            .collect::<Result<Vec<_>, Invalid>>()?;
        let lifetime = match field(object, "expire_seconds").map(Value::as_u64) {
            None => DEFAULT_ACCESS_LIFETIME,
            // 0 is allowed on purpose: URLs born expired let a client's
            // handling of expiry be tested without waiting.
            Some(Some(seconds @ 0..=MAX_EXPIRE_SECONDS)) => Duration::from_secs(seconds),
            Some(_) => {
                return Err(format!(
                    "expire_seconds must be an integer from 0 to {MAX_EXPIRE_SECONDS}"
                )
                .into());
            }
        };
        Ok(BatchAccessRequest { urls, lifetime })
    }
}

/// `POST /_emulator/messages`: checks the parts an update consumer relies on;
/// the message is queued exactly as given.
pub fn validate_message(body: &Value) -> Result<(), Invalid> {
    let object = as_object(body)?;
    let Some(Value::Object(chat)) = field(object, "chat") else {
        return Err("chat must be an object with type and id".into());
    };
    non_empty_string(chat, "type").map_err(|_| "chat.type must be a non-empty string")?;
    if !field(chat, "id").is_some_and(is_chat_id) {
        return Err("chat.id must be a non-empty string or a number".into());
    }
    non_empty_string(object, "msgType")?;
    match field(object, "data") {
        None | Some(Value::Object(_)) => Ok(()),
        Some(_) => Err("data must be a JSON object".into()),
    }
}

/// `POST /_emulator/updates`: any JSON object but an empty one (most likely
/// a forgotten body: odd updates are welcome, for testing a bot's leniency);
/// the emulator numbers it.
pub fn validate_raw_update(body: &Value) -> Result<(), Invalid> {
    let object = as_object(body)?;
    if object.is_empty() {
        return Err(
            "the update is empty: give at least its type, e.g. {\"type\":\"callback_query\"}"
                .into(),
        );
    }
    if object.contains_key("update_id") {
        return Err("leave update_id out: the emulator assigns it".into());
    }
    Ok(())
}

/// `POST /_emulator/media`.
#[derive(Debug, PartialEq)]
pub struct MediaRequest {
    pub url: String,
    pub content: MediaContent,
}

impl MediaRequest {
    pub fn parse(body: &Value) -> Result<MediaRequest, Invalid> {
        let object = as_object(body)?;
        let url = non_empty_string(object, "url")?;
        let content = match (field(object, "content_base64"), field(object, "size")) {
            (Some(Value::String(encoded)), None) => {
                let bytes = STANDARD_PAD_INDIFFERENT
                    .decode(encoded.trim())
                    .map_err(|error| format!("content_base64 is not valid base64: {error}"))?;
                MediaContent::Stored(Bytes::from(bytes))
            }
            (Some(_), None) => return Err("content_base64 must be a string".into()),
            (None, Some(size)) => MediaContent::Pattern {
                size: size.as_u64().ok_or("size must be a non-negative integer")?,
            },
            (Some(_), Some(_)) => {
                return Err("give one of content_base64 and size, not both".into());
            }
            (None, None) => return Err("one of content_base64 and size is required".into()),
        };
        Ok(MediaRequest { url, content })
    }
}

/// `POST /_emulator/webhook`.
#[derive(Debug, PartialEq)]
pub enum WebhookRequest {
    Off,
    On {
        url: String,
        secret: Option<String>,
        bot_id: Option<String>,
    },
}

impl WebhookRequest {
    pub fn parse(body: &Value) -> Result<WebhookRequest, Invalid> {
        let object = as_object(body)?;
        let url = match object.get("url") {
            None => return Err("url is required (null turns webhook mode off)".into()),
            Some(Value::Null) => return Ok(WebhookRequest::Off),
            Some(Value::String(url)) if crate::api::http_url_problem(url).is_none() => url.clone(),
            Some(_) => return Err("url must be an http:// or https:// URL, or null".into()),
        };
        let secret = match field(object, "secret") {
            None => None,
            Some(Value::String(secret)) if !secret.is_empty() => Some(secret.clone()),
            Some(_) => return Err("secret must be a non-empty string".into()),
        };
        let bot_id = match field(object, "bot_id") {
            None => None,
            Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
            // A numeric bot id signs as Python's str() of it, which is its JSON text for integers.
            Some(Value::Number(id)) if id.is_i64() || id.is_u64() => Some(id.to_string()),
            Some(_) => return Err("bot_id must be a non-empty string or an integer".into()),
        };
        Ok(WebhookRequest::On {
            url,
            secret,
            bot_id,
        })
    }
}

fn as_object(body: &Value) -> Result<&Map<String, Value>, Invalid> {
    body.as_object()
        .ok_or_else(|| "the body must be a JSON object".into())
}

fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).filter(|value| !value.is_null())
}

fn non_empty_string(object: &Map<String, Value>, name: &str) -> Result<String, Invalid> {
    match field(object, name) {
        Some(Value::String(text)) if !text.trim().is_empty() => Ok(text.clone()),
        _ => Err(format!("{name} must be a non-empty string").into()),
    }
}

/// Chat and user ids are strings on the wire, but numbers occur too.
fn is_chat_id(value: &Value) -> bool {
    match value {
        Value::String(id) => !id.trim().is_empty(),
        Value::Number(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn updates_defaults_and_cap() {
        assert_eq!(
            UpdatesRequest::parse(&json!({})).unwrap(),
            UpdatesRequest {
                offset: 0,
                limit: 100,
                timeout: Duration::ZERO
            }
        );
        let request =
            UpdatesRequest::parse(&json!({"offset": 7, "limit": 50, "timeout": 600})).unwrap();
        assert_eq!((request.offset, request.limit), (7, 50));
        assert_eq!(request.timeout, MAX_POLL_TIMEOUT);
        for huge in ["1e300", "99999999999999999999"] {
            let body: Value = serde_json::from_str(&format!(r#"{{"timeout":{huge}}}"#)).unwrap();
            let request = UpdatesRequest::parse(&body).unwrap();
            assert_eq!(request.timeout, MAX_POLL_TIMEOUT);
        }
        let fractional = UpdatesRequest::parse(&json!({"timeout": 0.5, "offset": null})).unwrap();
        assert_eq!(fractional.timeout, Duration::from_millis(500));
    }

    #[test]
    fn updates_refuses_wrong_types_and_ranges() {
        for (body, field) in [
            (json!({"limit": 0}), "limit"),
            (json!({"limit": 101}), "limit"),
            (json!({"limit": "5"}), "limit"),
            (json!({"offset": 1.5}), "offset"),
            (json!({"offset": "3"}), "offset"),
            (json!({"timeout": -1}), "timeout"),
            (json!({"timeout": true}), "timeout"),
            (json!([1]), "object"),
        ] {
            let message = UpdatesRequest::parse(&body).unwrap_err().0;
            assert!(message.contains(field), "{body}: {message}");
        }
    }

    #[test]
    fn send_accepts_the_documented_shapes() {
        let to_user = SendCall::parse(&json!({
            "msg_type": "text", "data": {"content": "hi"}, "client_msg_id": "c1", "to_user_id": "u_1"
        }))
        .unwrap();
        assert_eq!(to_user.target_field, "to_user_id");
        assert_eq!(to_user.target, json!("u_1"));
        assert_eq!(to_user.client_msg_id.as_deref(), Some("c1"));
        let to_group = SendCall::parse(&json!({
            "msg_type": "image", "data": {}, "group_id": 42, "to_user_id": null
        }))
        .unwrap();
        assert_eq!(
            (to_group.target_field, to_group.target),
            ("group_id", json!(42))
        );
        assert_eq!(to_group.client_msg_id, None);
    }

    #[test]
    fn send_refusals_name_the_field() {
        let valid = json!({"msg_type": "text", "data": {}, "to_user_id": "u"});
        let with = |key: &str, value: Value| {
            let mut body = valid.clone();
            body[key] = value;
            body
        };
        for (body, field) in [
            (with("msg_type", json!("")), "msg_type"),
            (with("msg_type", json!(1)), "msg_type"),
            (with("data", json!("x")), "data"),
            (with("to_user_id", json!("")), "to_user_id"),
            (with("to_user_id", json!(["u"])), "to_user_id"),
            (with("to_user_id", Value::Null), "to_user_id"),
            (with("group_id", json!("g")), "group_id"),
            (with("client_msg_id", json!(5)), "client_msg_id"),
            (json!("text"), "object"),
        ] {
            let message = SendCall::parse(&body).unwrap_err().0;
            assert!(message.contains(field), "{body}: {message}");
        }
    }

    #[test]
    fn batch_access() {
        let request = BatchAccessRequest::parse(&json!({
            "files": [{"url": "a"}, {"url": "b"}], "expire_seconds": 5
        }))
        .unwrap();
        assert_eq!(request.urls, ["a", "b"]);
        assert_eq!(request.lifetime, Duration::from_secs(5));
        let default = BatchAccessRequest::parse(&json!({"files": []})).unwrap();
        assert_eq!(default.lifetime, Duration::from_secs(600));
        for (body, field) in [
            (json!({}), "files"),
            (json!({"files": [{"url": 1}]}), "files[0].url"),
            (json!({"files": [], "expire_seconds": -1}), "expire_seconds"),
            (
                json!({"files": [], "expire_seconds": 1e9}),
                "expire_seconds",
            ),
        ] {
            let message = BatchAccessRequest::parse(&body).unwrap_err().0;
            assert!(message.contains(field), "{body}: {message}");
        }
    }

    #[test]
    fn control_messages_need_chat_and_msg_type() {
        let good = json!({"chat": {"type": "private", "id": "u_1"}, "msgType": "text", "data": {}});
        assert!(validate_message(&good).is_ok());
        for (body, field) in [
            (json!({"msgType": "text"}), "chat"),
            (json!({"chat": {"id": "u"}, "msgType": "text"}), "chat.type"),
            (
                json!({"chat": {"type": "private"}, "msgType": "text"}),
                "chat.id",
            ),
            (json!({"chat": {"type": "private", "id": "u"}}), "msgType"),
            (
                json!({"chat": {"type": "private", "id": "u"}, "msgType": "text", "data": 1}),
                "data",
            ),
        ] {
            let message = validate_message(&body).unwrap_err().0;
            assert!(message.contains(field), "{body}: {message}");
        }
        assert!(validate_raw_update(&json!({"type": "callback_query"})).is_ok());
        assert!(validate_raw_update(&json!({"update_id": 3})).is_err());
        assert!(validate_raw_update(&json!({})).is_err());
        assert!(validate_raw_update(&json!({"odd": 1})).is_ok());
    }

    #[test]
    fn media_registration() {
        let stored = MediaRequest::parse(&json!({"url": "u", "content_base64": "aGk="})).unwrap();
        assert_eq!(
            stored.content,
            MediaContent::Stored(Bytes::from_static(b"hi"))
        );
        let unpadded = MediaRequest::parse(&json!({"url": "u", "content_base64": "aGk"})).unwrap();
        assert_eq!(unpadded.content, stored.content);
        let sized = MediaRequest::parse(&json!({"url": "u", "size": 10})).unwrap();
        assert_eq!(sized.content, MediaContent::Pattern { size: 10 });
        for (body, field) in [
            (json!({"size": 1}), "url"),
            (json!({"url": "u"}), "content_base64"),
            (
                json!({"url": "u", "size": 1, "content_base64": ""}),
                "not both",
            ),
            (json!({"url": "u", "size": -1}), "size"),
            (json!({"url": "u", "content_base64": "!!"}), "base64"),
        ] {
            let message = MediaRequest::parse(&body).unwrap_err().0;
            assert!(message.contains(field), "{body}: {message}");
        }
    }

    #[test]
    fn webhook_configuration() {
        assert_eq!(
            WebhookRequest::parse(&json!({"url": null})).unwrap(),
            WebhookRequest::Off
        );
        assert_eq!(
            WebhookRequest::parse(&json!({"url": "http://127.0.0.1:9/hook", "bot_id": 42}))
                .unwrap(),
            WebhookRequest::On {
                url: "http://127.0.0.1:9/hook".into(),
                secret: None,
                bot_id: Some("42".into())
            }
        );
        for (body, field) in [
            (json!({}), "url"),
            (json!({"url": "ftp://x"}), "url"),
            (json!({"url": "http://"}), "url"),
            (json!({"url": "http://h", "secret": ""}), "secret"),
            (json!({"url": "http://h", "bot_id": 1.5}), "bot_id"),
        ] {
            let message = WebhookRequest::parse(&body).unwrap_err().0;
            assert!(message.contains(field), "{body}: {message}");
        }
    }
}
