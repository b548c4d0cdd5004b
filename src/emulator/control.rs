//! The control API (`/_emulator/*`, no auth): how tests and demos play the
//! users, register media, switch webhook mode, inject faults and inspect
//! what the bot sent. Answers are plain JSON (no envelope); refusals use the
//! same `{"code","msg"}` shape as the bot API.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::{Value, json};

use super::Shared;
use super::faults::FaultConfig;
use super::platform::{Platform, WebhookTarget};
use super::requests::{self, Invalid, MediaRequest, WebhookRequest};
use super::wire::{
    HttpResponse, JsonBody, error_response, invalid_request, json_response, json_text_response,
    method_not_allowed, read_json,
};
use fly_signature::sha256_hex;

/// Control API bodies may carry media as base64.
const MAX_CONTROL_BODY: usize = 64 * 1024 * 1024;
const DEFAULT_WEBHOOK_BOT_ID: &str = "bot_emulator";

#[derive(Debug, Clone, Copy)]
enum Call {
    Messages,
    Updates,
    Sent,
    Media,
    Webhook,
    Faults,
}

impl Call {
    fn from_path(path: &str) -> Option<Call> {
        Some(match path {
            "messages" => Call::Messages,
            "updates" => Call::Updates,
            "sent" => Call::Sent,
            "media" => Call::Media,
            "webhook" => Call::Webhook,
            "faults" => Call::Faults,
            _ => return None,
        })
    }

    /// The value of `Allow` for a 405.
    fn allowed_methods(self) -> &'static str {
        match self {
            Call::Messages | Call::Updates | Call::Media => "POST",
            Call::Sent => "GET",
            Call::Webhook | Call::Faults => "GET, POST",
        }
    }
}

pub async fn handle(shared: &Shared, path: &str, request: Request<Incoming>) -> HttpResponse {
    let Some(call) = Call::from_path(path) else {
        return error_response(StatusCode::NOT_FOUND, 0, "no such control call");
    };
    let method = request.method().clone();
    if method == Method::GET {
        return match call {
            // The bodies as the bot sent them, byte for byte; and how many
            // send requests came, repeats of a client_msg_id included.
            Call::Sent => match SentQuery::parse(request.uri().query()) {
                Ok(query) => sent(shared, query).await,
                Err(invalid) => invalid_request(invalid),
            },
            Call::Webhook => answer(shared.lock().webhook_report()),
            Call::Faults => answer(json!(shared.lock().faults)),
            _ => method_not_allowed(call.allowed_methods()),
        };
    }
    let post: fn(&Shared, JsonBody) -> Result<HttpResponse, Invalid> = match (call, &method) {
        (Call::Messages, &Method::POST) => post_message,
        (Call::Updates, &Method::POST) => post_update,
        (Call::Media, &Method::POST) => post_media,
        (Call::Webhook, &Method::POST) => post_webhook,
        (Call::Faults, &Method::POST) => post_faults,
        _ => return method_not_allowed(call.allowed_methods()),
    };
    match read_json(request, MAX_CONTROL_BODY).await {
        Ok(body) => post(shared, body).unwrap_or_else(invalid_request),
        Err(refused) => refused.into_response(),
    }
}

/// `GET /_emulator/sent`: every send body as the bot sent it, byte for
/// byte, and how many send requests came, repeats of a client_msg_id
/// included. With `after=N`, only the bodies after the first N, and `next`
/// (the count to ask `after` next time); with `wait=SECS` too, the answer
/// waits until there is one, or until SECS pass (a long poll, as the
/// updates call does).
async fn sent(shared: &Shared, query: SentQuery) -> HttpResponse {
    let Some(after) = query.after else {
        let state = shared.lock();
        return json_text_response(
            StatusCode::OK,
            format!(
                "{{\"sent\":[{}],\"attempts\":{}}}",
                state.sent().join(","),
                state.send_attempts()
            ),
        );
    };
    let after = usize::try_from(after).unwrap_or(usize::MAX);
    let deadline = tokio::time::Instant::now() + query.wait;
    // Subscribed before looking, so a send recorded in between still wakes us.
    let mut arrivals = shared.sent_arrivals.subscribe();
    loop {
        {
            let state = shared.lock();
            let sent = state.sent();
            if after < sent.len() || query.wait.is_zero() {
                return sent_after(&state, after);
            }
        }
        match tokio::time::timeout_at(deadline, arrivals.changed()).await {
            Ok(Ok(())) => continue,
            // Timed out (or the emulator is going away): nothing new.
            Ok(Err(_)) | Err(_) => return sent_after(&shared.lock(), after),
        }
    }
}

/// The bodies after the first `after`, and the count to ask after next time.
fn sent_after(state: &Platform, after: usize) -> HttpResponse {
    let sent = state.sent();
    let from = after.min(sent.len());
    json_text_response(
        StatusCode::OK,
        format!(
            "{{\"sent\":[{}],\"attempts\":{},\"next\":{}}}",
            sent[from..].join(","),
            state.send_attempts(),
            sent.len()
        ),
    )
}

/// The query of `GET /_emulator/sent`.
#[derive(Debug, PartialEq)]
struct SentQuery {
    after: Option<u64>,
    wait: Duration,
}

impl SentQuery {
    fn parse(query: Option<&str>) -> Result<SentQuery, Invalid> {
        let mut parsed = SentQuery {
            after: None,
            wait: Duration::ZERO,
        };
        for pair in query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "after" => {
                    let after = value
                        .parse::<u64>()
                        .map_err(|_| "after must be a non-negative integer")?;
                    parsed.after = Some(after);
                }
                "wait" => match value.parse::<f64>() {
                    Ok(seconds) if seconds >= 0.0 && seconds.is_finite() => {
                        parsed.wait = Duration::from_secs_f64(
                            seconds.min(requests::MAX_POLL_TIMEOUT.as_secs_f64()),
                        );
                    }
                    _ => return Err("wait must be a non-negative number of seconds".into()),
                },
                _ => return Err(format!("unknown parameter {name:?}: use after and wait").into()),
            }
        }
        if parsed.after.is_none() && !parsed.wait.is_zero() {
            return Err("wait needs after=N (the bodies already seen)".into());
        }
        Ok(parsed)
    }
}

/// A user sends a message: it becomes `{"update_id","type":"message","message":<body>}`,
/// the body as written.
fn post_message(shared: &Shared, body: JsonBody) -> Result<HttpResponse, Invalid> {
    requests::validate_message(&body.value)?;
    let update = format!("{{\"type\":\"message\",\"message\":{}}}", body.text.trim());
    Ok(answer(json!({"update_id": shared.push_update(&update)})))
}

/// A raw update, queued as written (with `update_id` put first).
fn post_update(shared: &Shared, body: JsonBody) -> Result<HttpResponse, Invalid> {
    requests::validate_raw_update(&body.value)?;
    Ok(answer(json!({"update_id": shared.push_update(&body.text)})))
}

fn post_media(shared: &Shared, body: JsonBody) -> Result<HttpResponse, Invalid> {
    let media = MediaRequest::parse(&body.value)?;
    let size = media.content.size();
    let answer_body = json!({"url": media.url, "size": size});
    shared.lock().register_media(media.url, media.content);
    Ok(answer(answer_body))
}

fn post_webhook(shared: &Shared, body: JsonBody) -> Result<HttpResponse, Invalid> {
    let target = match WebhookRequest::parse(&body.value)? {
        WebhookRequest::Off => None,
        WebhookRequest::On {
            url,
            secret,
            bot_id,
        } => {
            // The platform's default secret, which receivers derive the same way.
            let secret = match (secret, &shared.token) {
                (Some(secret), _) => secret,
                (None, Some(token)) => sha256_hex(token.as_bytes()),
                (None, None) => {
                    return Err(
                        "secret is required: this emulator has no --token to derive \
                                it from"
                            .into(),
                    );
                }
            };
            Some(WebhookTarget {
                url,
                secret,
                bot_id: bot_id.unwrap_or_else(|| DEFAULT_WEBHOOK_BOT_ID.to_string()),
            })
        }
    };
    shared.set_webhook(target);
    Ok(answer(shared.lock().webhook_report()))
}

fn post_faults(shared: &Shared, body: JsonBody) -> Result<HttpResponse, Invalid> {
    let faults = FaultConfig::parse(&body.value)?;
    let answer_body = json!(faults);
    shared.lock().faults = faults;
    Ok(answer(answer_body))
}

fn answer(value: Value) -> HttpResponse {
    json_response(StatusCode::OK, &value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_queries() {
        assert_eq!(
            SentQuery::parse(None).unwrap(),
            SentQuery {
                after: None,
                wait: Duration::ZERO
            }
        );
        assert_eq!(
            SentQuery::parse(Some("after=3&wait=2.5")).unwrap(),
            SentQuery {
                after: Some(3),
                wait: Duration::from_millis(2500)
            }
        );
        assert_eq!(
            SentQuery::parse(Some("after=0&wait=1e9")).unwrap().wait,
            requests::MAX_POLL_TIMEOUT
        );
        for (query, named) in [
            ("after=-1", "after"),
            ("after=x", "after"),
            ("after=1&wait=-1", "wait"),
            ("after=1&wait=NaN", "wait"),
            ("wait=1", "after=N"),
            ("since=1", "unknown"),
        ] {
            let message = SentQuery::parse(Some(query)).unwrap_err().0;
            assert!(message.contains(named), "{query}: {message}");
        }
    }
}
