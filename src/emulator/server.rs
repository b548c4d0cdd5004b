//! The HTTP side: accepting connections, routing, the bot API endpoints, and
//! the response envelope.
//!
//! Every bot API answer is the platform's envelope: `{"code":0,"msg":"ok","data":…}`
//! on success, `{"code":STATUS*100+N,"msg":…}` with the matching HTTP status
//! on failure. hyper does all HTTP parsing, with a deadline for request
//! headers and a cap on their size; bodies are read with a size limit.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::Shared;
use super::faults::InjectedError;
use super::media_content::{self, MediaBody};
use super::requests::{BatchAccessRequest, SendCall, UpdatesRequest};
use super::wire::{
    HttpResponse, JsonBody, error_response, invalid_request, method_not_allowed, ok_envelope,
    ok_envelope_text, parse_json, read_body,
};
use crate::api::types::{PATH_BATCH_ACCESS, PATH_SEND, PATH_UPDATES};
use crate::http_server::{self, Limits, StartError};

const BOT_API_PREFIX: &str = "/api/v1/s/bot/";
const CONTROL_PREFIX: &str = "/_emulator/";
pub const FILES_PREFIX: &str = "/_emulator/files/";

/// A client that has not sent its request headers by then is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Bot API bodies are small JSON documents.
const MAX_BOT_API_BODY: usize = 1024 * 1024;
/// Far more than tests and demos open; a bound all the same.
const MAX_CONNECTIONS: usize = 4096;

/// Returned by the service to make hyper close the connection without
/// writing any response: the `drop_rate` fault, a response lost in transit.
#[derive(Debug)]
pub struct ResponseDropped;

impl fmt::Display for ResponseDropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("response dropped by fault injection (drop_rate)")
    }
}

impl StdError for ResponseDropped {}

/// Hands the listener to the runtime this is called within; see
/// [`http_server::Server::start`].
pub fn start(listener: std::net::TcpListener) -> Result<http_server::Server, StartError> {
    let limits = Limits {
        header_read_timeout: HEADER_READ_TIMEOUT,
        max_header_bytes: MAX_HEADER_BYTES,
        max_connections: MAX_CONNECTIONS,
        // Long polls may be in flight; a stopping emulator does not wait for them.
        drain_timeout: Duration::ZERO,
    };
    http_server::Server::start(listener, None, limits)
}

/// Accepts connections until `stop` fires; each connection is served by its own task.
pub async fn serve(server: http_server::Server, shared: Arc<Shared>, stop: oneshot::Receiver<()>) {
    let make_service = || {
        let shared = Arc::clone(&shared);
        service_fn(move |request| handle(Arc::clone(&shared), request))
    };
    server
        .serve(make_service, async {
            let _ = stop.await;
        })
        .await;
}

/// One info line per request: method, path, status, latency. Only the path
/// is logged, never headers or query (the `Authorization` header carries the
/// bot token), and an access URL's token is left out.
async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<HttpResponse, ResponseDropped> {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let outcome = route(&shared, &path, request).await;
    let shown = if path.starts_with(FILES_PREFIX) {
        format!("{FILES_PREFIX}…")
    } else {
        path
    };
    let latency_ms = started.elapsed().as_millis() as u64;
    match &outcome {
        Ok(response) => {
            let status = response.status().as_u16();
            tracing::info!(%method, path = %shown, status, latency_ms, "request");
        }
        Err(dropped) => {
            tracing::info!(%method, path = %shown, latency_ms, "request not answered: {dropped}");
        }
    }
    outcome
}

async fn route(
    shared: &Shared,
    path: &str,
    request: Request<Incoming>,
) -> Result<HttpResponse, ResponseDropped> {
    if path.starts_with(BOT_API_PREFIX) {
        return bot_api(shared, path, request).await;
    }
    if let Some(token) = path.strip_prefix(FILES_PREFIX) {
        return Ok(media_download(shared, token, &request));
    }
    if let Some(call) = path.strip_prefix(CONTROL_PREFIX) {
        return Ok(super::control::handle(shared, call, request).await);
    }
    Ok(error_response(StatusCode::NOT_FOUND, 0, "no such path"))
}

#[derive(Debug, Clone, Copy)]
enum BotEndpoint {
    Updates,
    Send,
    BatchAccess,
}

async fn bot_api(
    shared: &Shared,
    path: &str,
    request: Request<Incoming>,
) -> Result<HttpResponse, ResponseDropped> {
    let endpoint = match path {
        PATH_UPDATES => BotEndpoint::Updates,
        PATH_SEND => BotEndpoint::Send,
        PATH_BATCH_ACCESS => BotEndpoint::BatchAccess,
        _ => {
            return Ok(error_response(
                StatusCode::NOT_FOUND,
                0,
                "no such bot API method",
            ));
        }
    };
    if request.method() != Method::POST {
        return Ok(method_not_allowed("POST"));
    }

    // The body is read even for requests refused below: answering with part
    // of a request unread would make the connection close with a reset.
    let public_base = public_base_url(shared, &request);
    let authorized = token_accepted(shared, &request);
    let body = read_body(request, MAX_BOT_API_BODY).await;

    let faults = {
        let mut state = shared.lock();
        if matches!(endpoint, BotEndpoint::Send) {
            state.count_send_attempt();
        }
        state.faults.clone()
    };
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if let Some(injected) = faults.roll_error() {
        return Ok(injected_error(injected, faults.retry_after));
    }
    if !authorized {
        return Ok(error_response(StatusCode::UNAUTHORIZED, 0, "invalid token"));
    }
    let body = match body.and_then(|bytes| parse_json(&bytes)) {
        Ok(body) => body,
        Err(refused) => return Ok(refused.into_response()),
    };
    let response = match endpoint {
        BotEndpoint::Updates => updates(shared, &body.value).await,
        BotEndpoint::Send => send(shared, &body),
        BotEndpoint::BatchAccess => batch_access(shared, &body.value, &public_base),
    };
    // The request took effect; only its answer is lost.
    if faults.roll_drop() {
        return Err(ResponseDropped);
    }
    Ok(response)
}

/// `Authorization: Bearer <token>`: the configured token, or any non-empty one.
fn token_accepted(shared: &Shared, request: &Request<Incoming>) -> bool {
    let Some(value) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return false;
    }
    shared
        .token
        .as_deref()
        .is_none_or(|expected| expected == token)
}

/// The updates call while a webhook is set: 409 Conflict, envelope code
/// 40901, as real bot platforms refuse polling then (Telegram answers 409
/// too). Polling on would starve: every new update goes to the webhook.
fn polling_refused() -> HttpResponse {
    error_response(
        StatusCode::CONFLICT,
        1,
        "polling is refused while a webhook is set: updates go to the webhook; \
         turn it off with `fly emulator webhook unset`",
    )
}

/// Long poll: answers at once if updates are queued, else when one arrives
/// or when the timeout passes; refused while a webhook is set.
async fn updates(shared: &Shared, body: &Value) -> HttpResponse {
    let request = match UpdatesRequest::parse(body) {
        Ok(request) => request,
        Err(invalid) => return invalid_request(invalid),
    };
    let deadline = tokio::time::Instant::now() + request.timeout;
    // Subscribed before looking, so an update pushed in between still wakes us.
    let mut arrivals = shared.update_arrivals.subscribe();
    loop {
        let updates = {
            let mut state = shared.lock();
            if state.webhook_is_set() {
                return polling_refused();
            }
            state.take_updates(request.offset, request.limit)
        };
        if !updates.is_empty() {
            // Served as stored, byte for byte.
            let data = format!("{{\"updates\":[{}]}}", updates.join(","));
            return ok_envelope_text(&data);
        }
        match tokio::time::timeout_at(deadline, arrivals.changed()).await {
            Ok(Ok(())) => continue,
            // Timed out (or the emulator is going away): an empty answer.
            Ok(Err(_)) | Err(_) => return ok_envelope(json!({"updates": []})),
        }
    }
}

fn send(shared: &Shared, body: &JsonBody) -> HttpResponse {
    let request = match SendCall::parse(&body.value) {
        Ok(request) => request,
        Err(invalid) => return invalid_request(invalid),
    };
    let (result, recorded) = {
        let mut state = shared.lock();
        let before = state.sent().len();
        let result = state.record_send(&request, &body.text);
        (result, state.sent().len() > before)
    };
    if recorded {
        log_sent(&request, &body.value);
        shared.wake_sent_followers();
    } else {
        tracing::debug!(
            client_msg_id = request.client_msg_id.as_deref().unwrap_or("-"),
            "a repeated client_msg_id: answered with the first result, not recorded again"
        );
    }
    ok_envelope(result)
}

/// One INFO line per message the bot sent: where it went, its type, its
/// text (or media URL) and its `client_msg_id`, the values escaped as every
/// logged value is (the text is quoted).
fn log_sent(request: &SendCall, body: &Value) {
    let chat = match &request.target {
        Value::String(id) => id.clone(),
        other => other.to_string(),
    };
    let data = &body["data"];
    let content = match request.msg_type.as_str() {
        "text" => data.get("content"),
        // The media's own field (not its preview), as fly reads it.
        media_type => crate::api::media::media_fields(media_type)
            .first()
            .and_then(|field| data.get(*field)),
    };
    let content = match content {
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
        None => data.to_string(),
    };
    let content = cut_for_the_log(content);
    let chat_field = request.target_field;
    let msg_type = request.msg_type.as_str();
    let client_msg_id = request.client_msg_id.as_deref().unwrap_or("-");
    if msg_type == "text" {
        tracing::info!(
            chat = chat.as_str(),
            chat_field,
            msg_type,
            client_msg_id,
            text = content.as_str(),
            "bot sent"
        );
    } else {
        tracing::info!(
            chat = chat.as_str(),
            chat_field,
            msg_type,
            client_msg_id,
            url = content.as_str(),
            "bot sent"
        );
    }
}

/// A sent text may be up to a megabyte: the log keeps its start.
const MAX_LOGGED_TEXT_BYTES: usize = 2048;

fn cut_for_the_log(mut text: String) -> String {
    if text.len() <= MAX_LOGGED_TEXT_BYTES {
        return text;
    }
    let mut end = MAX_LOGGED_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let more = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("… ({more} more bytes)"));
    text
}

fn batch_access(shared: &Shared, body: &Value, public_base: &str) -> HttpResponse {
    let request = match BatchAccessRequest::parse(body) {
        Ok(request) => request,
        Err(invalid) => return invalid_request(invalid),
    };
    let granted = shared.lock().grant_access(
        &request.urls,
        std::time::Instant::now(),
        request.lifetime,
        || fly_base::random::hex_id(16),
    );
    let files: serde_json::Map<String, Value> = granted
        .into_iter()
        .map(|(url, token)| (url, format!("{public_base}{FILES_PREFIX}{token}").into()))
        .collect();
    ok_envelope(json!({"files": files}))
}

/// The base URL as the client reached us (its `Host` header), so that access
/// URLs work through whatever address it used; else our own.
fn public_base_url(shared: &Shared, request: &Request<Incoming>) -> String {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .filter(|host| {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        });
    match host {
        Some(host) => format!("http://{host}"),
        None => shared.base_url.clone(),
    }
}

/// `GET /_emulator/files/<token>`: streams the file, honouring a single `Range`.
fn media_download(shared: &Shared, token: &str, request: &Request<Incoming>) -> HttpResponse {
    // HEAD answers as GET would, without the body (hyper drops it).
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return method_not_allowed("GET, HEAD");
    }
    let (access, faults) = {
        let state = shared.lock();
        (
            state.open_access(token, std::time::Instant::now()),
            state.faults.clone(),
        )
    };
    let content = match access {
        Ok(content) => content,
        Err(super::platform::AccessRefused::Unknown) => {
            return error_response(StatusCode::NOT_FOUND, 0, "unknown access URL");
        }
        Err(super::platform::AccessRefused::Expired) => {
            return error_response(StatusCode::FORBIDDEN, 0, "access URL expired");
        }
    };
    let size = content.size();
    let range = request
        .headers()
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok())
        .map_or(media_content::RangeRequest::Whole, |value| {
            media_content::parse_range(value, size)
        });
    let (status, start, end) = match range {
        media_content::RangeRequest::Whole => (StatusCode::OK, 0, size),
        media_content::RangeRequest::Part { start, end } => {
            (StatusCode::PARTIAL_CONTENT, start, end + 1)
        }
        media_content::RangeRequest::Unsatisfiable => {
            let mut response = error_response(
                StatusCode::RANGE_NOT_SATISFIABLE,
                0,
                "range not satisfiable",
            );
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                numeric_header(&format!("bytes */{size}")),
            );
            return response;
        }
    };
    let length = end - start;
    let cut_at = faults.roll_download_cut().then_some(start + length / 2);
    let mut response = Response::new(Either::Right(MediaBody::new(content, start, end, cut_at)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        headers.insert(
            header::CONTENT_RANGE,
            numeric_header(&format!("bytes {start}-{}/{size}", end - 1)),
        );
    }
    response
}

/// A header value made of digits and ASCII punctuation we formatted ourselves.
fn numeric_header(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn injected_error(injected: InjectedError, retry_after: u64) -> HttpResponse {
    let mut response = match injected {
        InjectedError::Internal => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            0,
            "injected fault: internal error",
        ),
        InjectedError::RateLimited => error_response(
            StatusCode::TOO_MANY_REQUESTS,
            0,
            "injected fault: too many requests",
        ),
    };
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_cut_for_the_log() {
        assert_eq!(cut_for_the_log("short".into()), "short");
        let long = "é".repeat(MAX_LOGGED_TEXT_BYTES);
        let cut = cut_for_the_log(long);
        assert!(cut.starts_with(&"é".repeat(MAX_LOGGED_TEXT_BYTES / 2)));
        assert!(
            cut.ends_with(&format!("… ({} more bytes)", MAX_LOGGED_TEXT_BYTES)),
            "{cut}"
        );
    }
}
