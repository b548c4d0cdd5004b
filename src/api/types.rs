//! The platform's wire types (SPEC section 1) and its paths.

use serde::Serialize;
use serde_json::{Map, Value};

pub const PATH_UPDATES: &str = "/api/v1/s/bot/updates";
pub const PATH_SEND: &str = "/api/v1/s/bot/send";
pub const PATH_BATCH_ACCESS: &str = "/api/v1/s/bot/files/batch_access";

/// Who a message goes to: the platform takes exactly one of `to_user_id` and `group_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    User(String),
    Group(String),
}

/// The body of `POST /api/v1/s/bot/send`.
#[derive(Debug, Clone, Serialize)]
pub struct SendRequest {
    pub msg_type: String,
    pub data: Map<String, Value>,
    pub client_msg_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
}

impl SendRequest {
    pub fn new(
        target: Target,
        msg_type: impl Into<String>,
        data: Map<String, Value>,
        client_msg_id: impl Into<String>,
    ) -> SendRequest {
        let (to_user_id, group_id) = match target {
            Target::User(id) => (Some(id), None),
            Target::Group(id) => (None, Some(id)),
        };
        SendRequest {
            msg_type: msg_type.into(),
            data,
            client_msg_id: client_msg_id.into(),
            to_user_id,
            group_id,
        }
    }

    /// A text message: `{"msg_type":"text","data":{"content":…}}`.
    pub fn text(
        target: Target,
        content: impl Into<String>,
        client_msg_id: impl Into<String>,
    ) -> SendRequest {
        let mut data = Map::new();
        data.insert("content".into(), Value::String(content.into()));
        SendRequest::new(target, "text", data, client_msg_id)
    }
}

/// An update as the bots read it: lenient like the platform's examples (a
/// missing or odd field is an empty value, not an error), strict only about
/// `update_id`, without which an update cannot be confirmed.
#[derive(Debug, Clone)]
pub struct Update {
    pub update_id: i64,
    /// `message`, `callback_query`, …
    pub kind: String,
    pub message: Option<Message>,
    /// The update exactly as received (for `--exec` handlers and forwarding).
    pub raw: Value,
}

#[derive(Debug, Clone)]
pub struct Message {
    pub chat: Option<Chat>,
    /// `text`, `image`, `voice`, `video`, `file`, …
    pub msg_type: String,
    pub data: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chat {
    /// `private` or `group`.
    pub kind: String,
    pub id: String,
}

impl Update {
    /// `None` when `raw` is not an object or has no positive integer `update_id`.
    pub fn from_value(raw: Value) -> Option<Update> {
        let object = raw.as_object()?;
        let update_id = match object.get("update_id")? {
            Value::Number(number) => number.as_i64()?,
            Value::String(text) => text.trim().parse().ok()?,
            _ => return None,
        };
        if update_id <= 0 {
            return None;
        }
        let kind = object.get("type").map(python_str).unwrap_or_default();
        let message = object
            .get("message")
            .and_then(Value::as_object)
            .filter(|_| kind == "message")
            .map(Message::from_object);
        Some(Update {
            update_id,
            kind,
            message,
            raw,
        })
    }

    /// The message's text, if it is a text message.
    pub fn text(&self) -> Option<String> {
        let message = self.message.as_ref()?;
        (message.msg_type == "text").then(|| {
            message
                .data
                .get("content")
                .map(python_str)
                .unwrap_or_default()
        })
    }
}

impl Message {
    fn from_object(object: &Map<String, Value>) -> Message {
        let chat = object
            .get("chat")
            .and_then(Value::as_object)
            .and_then(|chat| {
                let kind = chat.get("type").map(python_str).unwrap_or_default();
                let id = chat.get("id").map(python_str).unwrap_or_default();
                (!kind.is_empty() && !id.is_empty()).then_some(Chat { kind, id })
            });
        Message {
            chat,
            msg_type: object
                .get("msgType")
                .map(python_str)
                .unwrap_or_default()
                .trim()
                .to_string(),
            data: object
                .get("data")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
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
/// prints them (`True`, `1e-05`, `{'a': 1}`). The signature module already
/// implements Python's rules for its own JSON values, so non-strings take
/// that route.
fn python_str(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => {
            let text = other.to_string();
            crate::signature::json::parse(&text)
                .ok()
                .and_then(|parsed| {
                    crate::signature::python::py_str(Some(&parsed), "value")
                        .ok()
                        .map(|printed| printed.into_owned())
                })
                .unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            (r#""héllo""#, "héllo"),
        ];
        for (json, expected) in table {
            let value: Value = serde_json::from_str(json).unwrap();
            assert_eq!(python_str(&value), expected, "{json}");
        }
    }

    #[test]
    fn updates_are_read_leniently() {
        let update = Update::from_value(json!({
            "update_id": 5, "type": "message",
            "message": {"chat": {"type": "group", "id": 42}, "msgType": "text", "data": {"content": "hi"}}
        }))
        .unwrap();
        assert_eq!(update.update_id, 5);
        assert_eq!(update.text().as_deref(), Some("hi"));
        let chat = update.message.as_ref().unwrap().chat.clone().unwrap();
        assert_eq!(chat.reply_target(), Target::Group("42".into()));

        let private = Chat {
            kind: "private".into(),
            id: "u_1".into(),
        };
        assert_eq!(private.reply_target(), Target::User("u_1".into()));

        let callback =
            Update::from_value(json!({"update_id": "6", "type": "callback_query"})).unwrap();
        assert_eq!(callback.update_id, 6);
        assert!(callback.message.is_none());
        assert_eq!(callback.text(), None);

        for bad in [
            json!([]),
            json!({"type": "message"}),
            json!({"update_id": 0}),
            json!({"update_id": "x"}),
        ] {
            assert!(Update::from_value(bad).is_none());
        }
    }

    #[test]
    fn a_message_without_chat_type_or_id_has_no_chat() {
        let update = Update::from_value(json!({
            "update_id": 1, "type": "message", "message": {"chat": {"id": "u"}, "msgType": "text"}
        }))
        .unwrap();
        assert!(update.message.unwrap().chat.is_none());
    }

    #[test]
    fn send_request_has_exactly_one_target_field() {
        let to_user = SendRequest::text(Target::User("u_1".into()), "hi", "c1");
        assert_eq!(
            serde_json::to_value(&to_user).unwrap(),
            json!({"msg_type":"text","data":{"content":"hi"},"client_msg_id":"c1","to_user_id":"u_1"})
        );
        let to_group = SendRequest::text(Target::Group("g_1".into()), "hi", "c2");
        assert_eq!(
            serde_json::to_value(&to_group).unwrap(),
            json!({"msg_type":"text","data":{"content":"hi"},"client_msg_id":"c2","group_id":"g_1"})
        );
    }
}
