//! What both of the emulator's APIs (the bot API and the control API)
//! read and write: request bodies read as the platform's Python reads JSON,
//! within a size limit, and the response envelopes (`{"code", "msg",
//! "data"}`) with their status codes.

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use super::media_content::MediaBody;
use super::requests::Invalid;
use fly_signature::json::Value as PyValue;

pub type ResponseBody = Either<Full<Bytes>, MediaBody>;
pub type HttpResponse = Response<ResponseBody>;

/// A body refused before it reached its handler (400 or 413).
pub struct BodyRefused {
    status: StatusCode,
    msg: String,
}

impl BodyRefused {
    pub fn into_response(self) -> HttpResponse {
        error_response(self.status, 0, self.msg)
    }
}

/// A request body read as the platform's Python reads JSON (SPEC section 2:
/// `NaN`, deep nesting, lone surrogates, big integers all pass): its text as
/// sent, kept where it is stored or served again, and a plain view of it
/// for validation (odd values approximated: `NaN` as null, a lone surrogate
/// as U+FFFD, an integer past 64 bits as a float).
pub struct JsonBody {
    pub text: String,
    pub value: Value,
}

/// Reads a JSON body of at most `limit` bytes; an empty body reads as `{}`.
pub async fn read_json(request: Request<Incoming>, limit: usize) -> Result<JsonBody, BodyRefused> {
    parse_json(&read_body(request, limit).await?)
}

/// How much of a body over the limit is still read (and dropped) before the
/// 413 goes out. A client is still sending when the limit is reached; were
/// the connection closed then, it would see a reset instead of the answer
/// and retry in vain. Front-end servers do the same ("lingering close").
const DRAINED_BEYOND_LIMIT: usize = 64 * 1024 * 1024;

pub async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, BodyRefused> {
    let unreadable = || BodyRefused {
        status: StatusCode::BAD_REQUEST,
        msg: "could not read the body".into(),
    };
    let mut body = request.into_body();
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| unreadable())?.into_data() else {
            continue; // trailers
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            kept.extend_from_slice(&data);
        } else if seen > limit.saturating_add(DRAINED_BEYOND_LIMIT) {
            break;
        }
    }
    if seen > limit {
        return Err(BodyRefused {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            msg: format!("body larger than {limit} bytes"),
        });
    }
    Ok(Bytes::from(kept))
}

pub fn parse_json(bytes: &[u8]) -> Result<JsonBody, BodyRefused> {
    let malformed = |why: String| BodyRefused {
        status: StatusCode::BAD_REQUEST,
        msg: format!("malformed JSON: {why}"),
    };
    let text = std::str::from_utf8(bytes).map_err(|error| malformed(error.to_string()))?;
    if text.trim().is_empty() {
        return Ok(JsonBody {
            text: "{}".into(),
            value: Value::Object(serde_json::Map::new()),
        });
    }
    let parsed = fly_signature::parse(text).map_err(|error| {
        let why = error.to_string();
        malformed(
            why.strip_prefix("malformed JSON: ")
                .unwrap_or(&why)
                .to_string(),
        )
    })?;
    Ok(JsonBody {
        value: plain_view(&parsed),
        text: text.to_string(),
    })
}

/// The serde view of a value from the Python-compatible reader (see [`JsonBody`]).
fn plain_view(value: &PyValue) -> Value {
    match value {
        PyValue::Null => Value::Null,
        PyValue::Bool(flag) => Value::Bool(*flag),
        PyValue::Int(digits) => serde_json::from_str(digits)
            .ok()
            .filter(Value::is_i64)
            .or_else(|| digits.parse::<u64>().ok().map(Value::from))
            .unwrap_or_else(|| digits.parse::<f64>().map_or(Value::Null, Value::from)),
        PyValue::Float(number) => {
            serde_json::Number::from_f64(*number).map_or(Value::Null, Value::Number)
        }
        PyValue::Str(text) => Value::String(String::from_utf8_lossy(text).into_owned()),
        PyValue::Array(items) => Value::Array(items.iter().map(plain_view).collect()),
        PyValue::Object(members) => Value::Object(
            members
                .iter()
                .map(|(key, item)| (String::from_utf8_lossy(key).into_owned(), plain_view(item)))
                .collect(),
        ),
    }
}

pub fn ok_envelope(data: Value) -> HttpResponse {
    ok_envelope_text(&data.to_string())
}

/// The success envelope around `data` given as JSON text.
pub fn ok_envelope_text(data: &str) -> HttpResponse {
    json_text_response(
        StatusCode::OK,
        format!("{{\"code\":0,\"msg\":\"ok\",\"data\":{data}}}"),
    )
}

/// An error envelope; its `code` is the HTTP status times 100 plus `detail`.
pub fn error_response(status: StatusCode, detail: u16, msg: impl Into<String>) -> HttpResponse {
    let code = u32::from(status.as_u16()) * 100 + u32::from(detail);
    json_response(status, &json!({"code": code, "msg": msg.into()}))
}

/// 400 for a body that parsed but does not fit the call (code `…01`, as
/// opposed to `…00` for malformed JSON).
pub fn invalid_request(invalid: Invalid) -> HttpResponse {
    error_response(StatusCode::BAD_REQUEST, 1, invalid.0)
}

pub fn method_not_allowed(allowed: &'static str) -> HttpResponse {
    let mut response = error_response(StatusCode::METHOD_NOT_ALLOWED, 0, "method not allowed");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

pub fn json_response(status: StatusCode, value: &Value) -> HttpResponse {
    json_text_response(status, value.to_string())
}

pub fn json_text_response(status: StatusCode, text: String) -> HttpResponse {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(text))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
