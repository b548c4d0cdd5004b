//! The platform's wire types (SPEC section 1) and its paths.

use std::time::Instant;

use serde_json::{Map, Value};

use super::media::{MediaUrl, media_urls};
use fly_signature::{canonical, json, python};

/// Where every bot API path starts (`fly api` adds the rest).
pub const BOT_API_PREFIX: &str = "/api/v1/s/bot/";
pub const PATH_UPDATES: &str = "/api/v1/s/bot/updates";
pub const PATH_SEND: &str = "/api/v1/s/bot/send";
pub const PATH_BATCH_ACCESS: &str = "/api/v1/s/bot/files/batch_access";

/// Who a message goes to: the platform takes exactly one of `to_user_id` and `group_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    User(String),
    Group(String),
}

/// A message's `data` object as JSON text, ready for the wire. Text, so that
/// what came from the platform (a forwarded media message, an echo of text
/// with a lone surrogate) goes back exactly as Python would send it, which a
/// `serde_json::Value` cannot hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageData(String);

impl MessageData {
    /// `{"content": TEXT}` from WTF-8 text (see [`Message::text`]).
    pub fn text(content: &[u8]) -> MessageData {
        let mut out = b"{\"content\":".to_vec();
        canonical::write_wire_string(content, &mut out);
        out.push(b'}');
        MessageData(String::from_utf8(out).unwrap_or_default())
    }

    /// A `data` object given as JSON fields (`fly send --data`, a handler's reply).
    pub fn from_fields(fields: &Map<String, Value>) -> MessageData {
        MessageData(Value::Object(fields.clone()).to_string())
    }

    pub fn as_json(&self) -> &str {
        &self.0
    }
}

/// The body of `POST /api/v1/s/bot/send`.
#[derive(Debug, Clone)]
pub struct SendRequest {
    pub msg_type: String,
    pub data: MessageData,
    pub client_msg_id: String,
    pub target: Target,
}

impl SendRequest {
    pub fn new(
        target: Target,
        msg_type: impl Into<String>,
        data: MessageData,
        client_msg_id: impl Into<String>,
    ) -> SendRequest {
        SendRequest {
            msg_type: msg_type.into(),
            data,
            client_msg_id: client_msg_id.into(),
            target,
        }
    }

    /// A text message: `{"msg_type":"text","data":{"content":…}}`, from
    /// WTF-8 text (any `&str` is).
    pub fn text(
        target: Target,
        content: impl AsRef<[u8]>,
        client_msg_id: impl Into<String>,
    ) -> SendRequest {
        SendRequest::new(
            target,
            "text",
            MessageData::text(content.as_ref()),
            client_msg_id,
        )
    }

    /// The JSON body: `msg_type`, `data`, `client_msg_id`, then exactly one
    /// of `to_user_id` and `group_id`.
    pub fn to_json(&self) -> String {
        let string = |text: &str| Value::String(text.to_string()).to_string();
        let (field, id) = match &self.target {
            Target::User(id) => ("to_user_id", id),
            Target::Group(id) => ("group_id", id),
        };
        format!(
            "{{\"msg_type\":{},\"data\":{},\"client_msg_id\":{},\"{field}\":{}}}",
            string(&self.msg_type),
            self.data.as_json(),
            string(&self.client_msg_id),
            string(id),
        )
    }
}

/// An update as the bots read it: the few typed fields routing needs, read
/// leniently as the platform's Python examples read them (`str(x or "")`),
/// next to the update's exact bytes.
#[derive(Debug, Clone)]
pub struct Update {
    pub update_id: i64,
    /// `message`, `callback_query`, …
    pub kind: String,
    /// For `message` updates whose `message` is an object.
    pub message: Option<Message>,
    /// The update exactly as the platform sent it: its slice of the updates
    /// response, or the webhook request body. `--exec` handlers get these
    /// bytes and `fly forward` signs them.
    pub raw: String,
    /// When it was read from the poll's answer or the delivery: the start
    /// of its record's time (`fly_update_duration_seconds`).
    pub received: Instant,
}

#[derive(Debug, Clone)]
pub struct Message {
    pub chat: Option<Chat>,
    /// `text`, `image`, `voice`, `video`, `file`, …
    pub msg_type: String,
    /// `str(data.content or "")` for text messages, as WTF-8 bytes: a lone
    /// surrogate the platform sent (`"\ud83d"`, an emoji cut in half) is kept,
    /// so that the echo carries it back as Python's does.
    pub text: Option<Vec<u8>>,
    /// The media URLs of `data` (see [`media_urls`]).
    pub media: Vec<MediaUrl>,
    /// `data` as JSON for the wire, for forwarding the message back.
    pub data: MessageData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chat {
    /// `private` or `group`.
    pub kind: String,
    pub id: String,
}

/// An update that can never be handled (not an object, no usable
/// `update_id`): a dead letter, recorded and never retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    pub reason: String,
    /// The update exactly as received.
    pub raw: String,
}

impl Update {
    /// Reads an update parsed by the Python-compatible reader; `raw` is its text.
    pub fn read(value: &json::Value, raw: &str) -> Result<Update, Unusable> {
        let unusable = |reason: String| Unusable {
            reason,
            raw: raw.to_string(),
        };
        if !matches!(value, json::Value::Object(_)) {
            return Err(unusable(format!(
                "the update is a JSON {}, not an object",
                python::type_name(value)
            )));
        }
        // `int(update.get("update_id") or 0)`, as the examples read it.
        let digits = python::py_int(value.get("update_id"), "update_id")
            .map_err(|error| unusable(format!("no usable update_id ({error})")))?;
        let update_id = match digits.0.parse::<i64>() {
            Ok(id) if id > 0 => id,
            Ok(_) => {
                return Err(unusable(
                    "no usable update_id (missing, 0 or negative)".into(),
                ));
            }
            Err(_) => {
                return Err(unusable(format!("update_id {} is out of range", digits.0)));
            }
        };
        let kind = python_str(value.get("type")).unwrap_or_default();
        let message = match value.get("message") {
            Some(message @ json::Value::Object(_)) if kind == "message" => {
                Some(Message::read(message))
            }
            _ => None,
        };
        Ok(Update {
            update_id,
            kind,
            message,
            raw: raw.to_string(),
            received: Instant::now(),
        })
    }

    /// The message's text, if it is a text message (WTF-8, see [`Message::text`]).
    pub fn text(&self) -> Option<&[u8]> {
        self.message.as_ref()?.text.as_deref()
    }
}

impl Message {
    fn read(message: &json::Value) -> Message {
        let chat = message
            .get("chat")
            .filter(|chat| matches!(chat, json::Value::Object(_)))
            .and_then(|chat| {
                let kind = python_str(chat.get("type")).unwrap_or_default();
                let id = python_str(chat.get("id")).unwrap_or_default();
                (!kind.is_empty() && !id.is_empty()).then_some(Chat { kind, id })
            });
        let msg_type = python_str(message.get("msgType"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let data = message
            .get("data")
            .filter(|data| matches!(data, json::Value::Object(_)));
        let text = (msg_type == "text").then(|| {
            data.and_then(|data| data.get("content"))
                .map(python_text)
                .unwrap_or_default()
        });
        Message {
            chat,
            media: data
                .map(|data| media_urls(&msg_type, data))
                .unwrap_or_default(),
            data: MessageData(data.map_or_else(|| "{}".to_string(), canonical::wire_json)),
            msg_type,
            text,
        }
    }
}

impl Chat {
    /// Where a reply to this chat goes: the group for group chats, else the
    /// user (SPEC section 1). The one place this rule lives.
    pub fn reply_target(&self) -> Target {
        if self.kind == "group" {
            Target::Group(self.id.clone())
        } else {
            Target::User(self.id.clone())
        }
    }
}

/// Python's `str(value or "")`, as the examples read every field: falsy
/// values (null, false, 0, 0.0, "", [], {}) give "", others print as Python
/// prints them (`True`, `1e-05`, `{'a': 1}`). `None` where Python's result
/// cannot be a UTF-8 string (a lone surrogate) or reproduced exactly.
fn python_str(value: Option<&json::Value>) -> Option<String> {
    python::py_str(value, "field")
        .ok()
        .map(|printed| printed.into_owned())
}

/// `str(value or "")` as WTF-8 bytes: a string is kept as it is, lone
/// surrogates included. Another value Python would print in a way this
/// cannot reproduce (a container holding non-ASCII text) gives its JSON.
fn python_text(value: &json::Value) -> Vec<u8> {
    match value {
        json::Value::Str(text) if python::truthy(value) => text.to_vec(),
        other => match python::py_str(Some(other), "content") {
            Ok(printed) => printed.into_owned().into_bytes(),
            Err(_) => canonical::wire_json(other).into_bytes(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Update, Unusable> {
        Update::read(&json::parse(text).unwrap(), text)
    }

    /// Expected values printed by CPython: `str(json.loads(text) or "")`.
    #[test]
    fn fields_read_as_python_str_would() {
        let table = [
            ("5", "5"),
            ("0", ""),
            ("1.5", "1.5"),
            ("1e-05", "1e-05"),
            ("0.0", ""),
            ("true", "True"),
            ("false", ""),
            ("null", ""),
            ("[]", ""),
            ("{}", ""),
            (r#"[1, "a"]"#, "[1, 'a']"),
            (r#"{"a": 1}"#, "{'a': 1}"),
            ("-3", "-3"),
            ("1e16", "1e+16"),
            ("123456789012345678", "123456789012345678"),
            ("18446744073709551617", "18446744073709551617"),
            ("NaN", "nan"),
            ("-Infinity", "-inf"),
            (r#""héllo""#, "héllo"),
        ];
        for (text, expected) in table {
            let value = json::parse(text).unwrap();
            assert_eq!(
                python_str(Some(&value)).as_deref(),
                Some(expected),
                "{text}"
            );
        }
        assert_eq!(python_str(Some(&json::parse(r#""\ud83d""#).unwrap())), None);
    }

    #[test]
    fn updates_are_read_leniently_and_keep_their_bytes() {
        let text = r#"{"update_id": 5, "type": "message",
            "message": {"chat": {"type": "group", "id": 42}, "msgType": "text", "data": {"content": "hi", "n": 1E2}}}"#;
        let update = read(text).unwrap();
        assert_eq!(update.update_id, 5);
        assert_eq!(update.raw, text);
        assert_eq!(update.text(), Some(&b"hi"[..]));
        let message = update.message.as_ref().unwrap();
        assert_eq!(message.data.as_json(), r#"{"content":"hi","n":100.0}"#);
        let chat = message.chat.clone().unwrap();
        assert_eq!(chat.reply_target(), Target::Group("42".into()));

        let private = Chat {
            kind: "private".into(),
            id: "u_1".into(),
        };
        assert_eq!(private.reply_target(), Target::User("u_1".into()));

        let callback = read(r#"{"update_id": "6", "type": "callback_query"}"#).unwrap();
        assert_eq!(callback.update_id, 6);
        assert!(callback.message.is_none());
        assert_eq!(callback.text(), None);
        // int(7.9) is 7, as in the examples.
        assert_eq!(read(r#"{"update_id": 7.9}"#).unwrap().update_id, 7);
    }

    #[test]
    fn updates_without_a_usable_id_are_unusable_with_a_reason() {
        let table = [
            ("[]", "not an object"),
            (r#"{"type": "message"}"#, "no usable update_id"),
            (r#"{"update_id": 0}"#, "no usable update_id"),
            (r#"{"update_id": -4}"#, "no usable update_id"),
            (r#"{"update_id": "x"}"#, "invalid literal for int()"),
            (r#"{"update_id": NaN}"#, "NaN"),
            (r#"{"update_id": [1]}"#, "TypeError"),
            (r#"{"update_id": 99999999999999999999}"#, "out of range"),
        ];
        for (text, reason) in table {
            let unusable = read(text).unwrap_err();
            assert!(
                unusable.reason.contains(reason),
                "{text}: {}",
                unusable.reason
            );
            assert_eq!(unusable.raw, text);
        }
    }

    #[test]
    fn text_with_a_lone_surrogate_is_kept_and_sent_back_escaped() {
        let update = read(
            r#"{"update_id":1,"type":"message","message":{"chat":{"type":"private","id":"u"},"msgType":"text","data":{"content":"a\ud83d"}}}"#,
        )
        .unwrap();
        let mut reply = b"echo: ".to_vec();
        reply.extend_from_slice(update.text().unwrap());
        let request = SendRequest::text(Target::User("u".into()), reply, "echo_1");
        assert_eq!(
            request.to_json(),
            r#"{"msg_type":"text","data":{"content":"echo: a\ud83d"},"client_msg_id":"echo_1","to_user_id":"u"}"#
        );
    }

    #[test]
    fn a_message_without_chat_type_or_id_has_no_chat() {
        let update =
            read(r#"{"update_id": 1, "type": "message", "message": {"chat": {"id": "u"}, "msgType": "text"}}"#)
                .unwrap();
        let message = update.message.unwrap();
        assert!(message.chat.is_none());
        assert_eq!(message.text, Some(Vec::new()));
    }

    #[test]
    fn send_request_has_exactly_one_target_field() {
        let to_user = SendRequest::text(Target::User("u_1".into()), "hi", "c1");
        assert_eq!(
            to_user.to_json(),
            r#"{"msg_type":"text","data":{"content":"hi"},"client_msg_id":"c1","to_user_id":"u_1"}"#
        );
        let to_group = SendRequest::text(Target::Group("g_1".into()), "hi", "c2");
        assert_eq!(
            to_group.to_json(),
            r#"{"msg_type":"text","data":{"content":"hi"},"client_msg_id":"c2","group_id":"g_1"}"#
        );
    }
}
