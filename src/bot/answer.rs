//! The one answer language of handlers: what an `--exec` handler (a
//! process per update: its whole stdout) and an `--exec-worker` worker (one
//! line per update) may answer, read in this one place into a reply, no
//! reply, or a failure, so a bot moves between the two unchanged.
//!
//! | answer | means |
//! |---|---|
//! | `{"reply":"text"}` | send this text (blank: nothing) |
//! | `{"reply":{"msg_type":…,"data":{…}}}` | send that message |
//! | `{}` | handled, no reply |
//! | `{"error":"why"}` | the update failed, for this reason |
//!
//! Each may name its update (`"update_id":N`): a worker's answer must (see
//! `worker.rs`), an `--exec` one may, and then it must be its own. `--exec`
//! also keeps its older forms: output that is not a JSON object is plain
//! text, and a bare `{"msg_type":…,"data":{…}}` is that message. A JSON
//! object that is none of these fails the update, quoted; it is never sent
//! as text.

use serde_json::{Map, Value};

/// What a handler asked to be sent back to the chat of its update.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Text(String),
    Message {
        msg_type: String,
        data: Map<String, Value>,
    },
}

impl Reply {
    /// The reply as the handler gave it: its text, or the message as JSON.
    pub fn as_text(&self) -> String {
        match self {
            Reply::Text(text) => text.clone(),
            Reply::Message { msg_type, data } => {
                serde_json::json!({"msg_type": msg_type, "data": data}).to_string()
            }
        }
    }
}

/// What an answer asks for.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Nothing,
    Reply(Reply),
    /// The update failed; the handler's reason.
    Error(String),
}

/// An answer and the update it names, if it names one.
#[derive(Debug, PartialEq)]
pub struct Answered {
    pub update_id: Option<i64>,
    pub answer: Answer,
}

/// Why output is not an answer, with the output quoted (cut short).
#[derive(Debug, PartialEq, Eq)]
pub struct NotAnAnswer(pub String);

impl From<String> for NotAnAnswer {
    fn from(why: String) -> Self {
        NotAnAnswer(why)
    }
}

impl std::fmt::Display for NotAnAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The answer objects, for messages about output that is none of them.
pub const FORMS: &str =
    r#"{"reply":"text"}, {"reply":{"msg_type":…,"data":{…}}}, {} or {"error":"why"}"#;

/// An answer object (a worker's line, or an `--exec` handler's stdout
/// that is a JSON object): the four forms, `update_id` allowed in each.
/// `line` is the output it was read from, quoted in errors.
pub fn from_object(mut object: Map<String, Value>, line: &[u8]) -> Result<Answered, NotAnAnswer> {
    let update_id = take_update_id(&mut object, line)?;
    let reply = object.remove("reply");
    let error = object.remove("error");
    if let Some(key) = object.keys().next() {
        let hint = if key == "msg_type" || key == "data" {
            r#" (a message goes in "reply": {"reply":{"msg_type":…,"data":{…}}})"#
        } else {
            ""
        };
        return Err(format!("unknown key {key:?} in {}{hint}", shown(line)).into());
    }
    let answer = match (reply, error) {
        (None, None) => Answer::Nothing,
        (None, Some(Value::String(why))) => Answer::Error(why),
        (None, Some(_)) => {
            return Err(format!(
                "\"error\" must be a string (the reason), in {}",
                shown(line)
            )
            .into());
        }
        (Some(Value::String(text)), None) if text.trim().is_empty() => Answer::Nothing,
        (Some(Value::String(text)), None) => Answer::Reply(Reply::Text(text)),
        (Some(Value::Object(message)), None) => Answer::Reply(from_message(message, line)?),
        (Some(_), None) => {
            return Err(format!(
                "\"reply\" must be a text or a {{\"msg_type\":…,\"data\":{{…}}}} object, in {}",
                shown(line)
            )
            .into());
        }
        (Some(_), Some(_)) => {
            return Err(format!("both \"reply\" and \"error\" in {}", shown(line)).into());
        }
    };
    Ok(Answered { update_id, answer })
}

/// What an `--exec` handler's stdout answers: blank is nothing; a JSON
/// object is an answer object or a bare message, or fails; anything else
/// (text, or a JSON string, number or array) is the text of the reply,
/// trailing line endings dropped. Text that looks like a JSON object (`{"`
/// or `{'` … `}`) but does not parse fails too: it is a broken answer (two
/// objects, Python's `print(dict)`) far more often than a reply; `{a}` is
/// text.
pub fn from_output(stdout: &str) -> Result<Answered, NotAnAnswer> {
    let trimmed = stdout.trim();
    let text = || Answered {
        update_id: None,
        answer: Answer::Reply(Reply::Text(
            stdout.trim_end_matches(['\n', '\r']).to_string(),
        )),
    };
    if trimmed.is_empty() {
        return Ok(Answered {
            update_id: None,
            answer: Answer::Nothing,
        });
    }
    match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::Object(mut object)) if object.contains_key("msg_type") => {
            let update_id = take_update_id(&mut object, trimmed.as_bytes())?;
            let message = from_message(object, trimmed.as_bytes())?;
            Ok(Answered {
                update_id,
                answer: Answer::Reply(message),
            })
        }
        Ok(Value::Object(object)) => from_object(object, trimmed.as_bytes()),
        Ok(_) => Ok(text()),
        Err(error) if looks_like_an_object(trimmed) => Err(format!(
            "{} looks like a JSON object but is not JSON ({error}); to send such text, \
             answer {{\"reply\":\"…\"}}",
            shown(trimmed.as_bytes())
        )
        .into()),
        Err(_) => Ok(text()),
    }
}

/// Whether text that is not JSON was meant as an object: braces around a
/// quoted key.
fn looks_like_an_object(text: &str) -> bool {
    let Some(inside) = text.strip_prefix('{') else {
        return false;
    };
    text.ends_with('}') && matches!(inside.trim_start().chars().next(), Some('"' | '\''))
}

/// `"update_id"`, taken out of an answer object: the update's number as it
/// came, if there.
fn take_update_id(
    object: &mut Map<String, Value>,
    line: &[u8],
) -> Result<Option<i64>, NotAnAnswer> {
    match object.remove("update_id") {
        None => Ok(None),
        Some(Value::Number(number)) => number.as_i64().map(Some).ok_or_else(|| {
            NotAnAnswer(format!(
                "update_id {number} is not an update id, in {}",
                shown(line)
            ))
        }),
        Some(other) => Err(format!(
            "update_id must be the update's number as it came, not {other}, in {}",
            shown(line)
        )
        .into()),
    }
}

/// A message object: a string `msg_type`, an object `data`, nothing else.
fn from_message(mut message: Map<String, Value>, line: &[u8]) -> Result<Reply, NotAnAnswer> {
    let msg_type = message.remove("msg_type");
    let data = message.remove("data");
    match (msg_type, data) {
        (Some(Value::String(msg_type)), Some(Value::Object(data))) if message.is_empty() => {
            Ok(Reply::Message { msg_type, data })
        }
        _ => Err(format!(
            "a message needs a string msg_type and an object data, and nothing else: {}",
            shown(line)
        )
        .into()),
    }
}

/// Output for a message: lossy, quoted, and cut short.
pub fn shown(bytes: &[u8]) -> String {
    const SHOWN: usize = 200;
    let mut end = bytes.len().min(SHOWN);
    // Not in the middle of a character.
    while end < bytes.len() && end > 0 && (bytes[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    let text = String::from_utf8_lossy(&bytes[..end]);
    let text = text.trim_end_matches(['\n', '\r']);
    if end < bytes.len() {
        format!("{text:?}…")
    } else {
        format!("{text:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(stdout: &str) -> Result<Answered, NotAnAnswer> {
        from_output(stdout)
    }

    fn text(text: &str) -> Answered {
        Answered {
            update_id: None,
            answer: Answer::Reply(Reply::Text(text.into())),
        }
    }

    #[test]
    fn exec_output_is_an_answer_object_a_bare_message_or_text() {
        assert_eq!(output("hello\n"), Ok(text("hello")));
        assert_eq!(output("  two\nlines\r\n\n"), Ok(text("  two\nlines")));
        // JSON that is not an object: text, as it always was.
        assert_eq!(output("\"hi\"\n"), Ok(text("\"hi\"")));
        assert_eq!(output("42"), Ok(text("42")));
        assert_eq!(output("[1, 2]"), Ok(text("[1, 2]")));
        // Braces that are not one JSON object's: text.
        assert_eq!(output("{a} and {b"), Ok(text("{a} and {b")));
        assert_eq!(output("{HI THERE}\n"), Ok(text("{HI THERE}")));
        assert_eq!(output("{sic} \"yes\" {}"), Ok(text("{sic} \"yes\" {}")));
        for blank in ["", "\n", "  \n\t"] {
            assert_eq!(
                output(blank).map(|answered| answered.answer),
                Ok(Answer::Nothing)
            );
        }
        assert_eq!(
            output("{\"reply\":\"hi\"}\n"),
            Ok(text("hi")),
            "the worker's text answer"
        );
        assert_eq!(
            output(" {\"update_id\":7,\"reply\":\"hi\"} "),
            Ok(Answered {
                update_id: Some(7),
                answer: Answer::Reply(Reply::Text("hi".into()))
            })
        );
        assert_eq!(
            output("{}").map(|answered| answered.answer),
            Ok(Answer::Nothing)
        );
        assert_eq!(
            output("{\"error\":\"db down\"}").map(|answered| answered.answer),
            Ok(Answer::Error("db down".into()))
        );
        for message in [
            r#"{"msg_type":"image","data":{"originalUrl":"u"}}"#,
            r#"{"reply":{"msg_type":"image","data":{"originalUrl":"u"}}}"#,
            r#"{"update_id":3,"msg_type":"image","data":{"originalUrl":"u"}}"#,
        ] {
            let Ok(Answered {
                answer: Answer::Reply(Reply::Message { msg_type, data }),
                ..
            }) = output(message)
            else {
                panic!("a message: {message}");
            };
            assert_eq!(msg_type, "image");
            assert_eq!(data["originalUrl"], "u");
        }
    }

    #[test]
    fn a_json_object_that_is_no_answer_fails_quoted_and_is_never_text() {
        for (stdout, says) in [
            (
                r#"{"text":"hi"}"#,
                r#"unknown key "text" in "{\"text\":\"hi\"}""#,
            ),
            (
                r#"{"msg_type":"text"}"#,
                "a message needs a string msg_type",
            ),
            (
                r#"{"msg_type":"text","data":{},"x":1}"#,
                "a message needs a string msg_type",
            ),
            (r#"{"data":{}}"#, r#"(a message goes in "reply""#),
            (r#"{"reply":3}"#, "\"reply\" must be a text"),
            (r#"{"reply":null}"#, "\"reply\" must be a text"),
            (r#"{"error":{}}"#, "\"error\" must be a string"),
            (
                r#"{"reply":"a","error":"b"}"#,
                "both \"reply\" and \"error\"",
            ),
            (
                r#"{"update_id":"7"}"#,
                "update_id must be the update's number",
            ),
            (r#"{"update_id":7.5}"#, "update_id 7.5 is not an update id"),
            (
                "{'reply': 'hi'}",
                r#""{'reply': 'hi'}" looks like a JSON object but is not JSON"#,
            ),
            (
                "{ \"reply\": hi }",
                "looks like a JSON object but is not JSON",
            ),
            (
                "{\"reply\":\"a\"}\n{\"reply\":\"b\"}\n",
                "looks like a JSON object but is not JSON",
            ),
        ] {
            let why = output(stdout).expect_err(stdout).0;
            assert!(why.contains(says), "{stdout}: {why}");
        }
    }

    #[test]
    fn output_is_shown_quoted_and_cut_short_on_a_character_boundary() {
        assert_eq!(shown(b"{\"a\":1}\n"), r#""{\"a\":1}""#);
        let long = format!("{{\"text\":\"{}\"}}", "é".repeat(300));
        let quoted = shown(long.as_bytes());
        assert!(quoted.ends_with('…'), "{quoted}");
        assert!(quoted.len() < 260, "{quoted}");
        assert!(!quoted.contains('\u{fffd}'), "{quoted}");
    }
}
