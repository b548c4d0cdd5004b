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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
