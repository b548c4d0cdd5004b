//! The inspector's page and JSON API, on a thread and runtime of its own
//! (like `--metrics`), so a browser never slows the bot down.
//!
//! Safe by default (the page shows what the internet sent the bot, and can
//! make it reply): it answers only requests whose `Host` is the address it
//! listens on (a DNS-rebinding page elsewhere cannot reach it through the
//! browser), a POST needs the `X-Fly-Inspector` header the page sends (a
//! cross-site form cannot set one), every answer carries a strict
//! `Content-Security-Policy`, and no answer holds a token or a secret.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::channel::Channel;
use http_body_util::{Either, Full};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::{Event, Inspector, NoReplay};
use crate::http_server::{self, Limits};

type Body = Either<Full<Bytes>, Channel<Bytes>>;

/// The header a POST must carry: the page sets it, a form cannot.
pub const CSRF_HEADER: &str = "x-fly-inspector";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");

/// How often the event stream sends what changed.
const EVENTS_EVERY: Duration = Duration::from_millis(100);

/// A comment on a quiet event stream every this many ticks (15 s) keeps
/// proxies and the browser from taking it for a dead one.
const KEEPALIVE_TICKS: u32 = 150;

pub fn serve(address: SocketAddr, inspector: Arc<Inspector>) -> anyhow::Result<SocketAddr> {
    let (listener, local) =
        http_server::bind(address.ip(), address.port()).context("cannot serve --inspect")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the inspector")?;
    let limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        max_header_bytes: 32 * 1024,
        max_connections: 64,
        drain_timeout: Duration::from_secs(1),
    };
    let server = runtime.block_on(async { http_server::Server::start(listener, None, limits) })?;
    let hosts = Arc::new(allowed_hosts(local));
    std::thread::Builder::new()
        .name("fly-inspector".into())
        .spawn(move || {
            runtime.block_on(server.serve(
                || {
                    let inspector = Arc::clone(&inspector);
                    let hosts = Arc::clone(&hosts);
                    service_fn(move |request| {
                        let answer = answer(&inspector, &hosts, &request);
                        async move { Ok::<_, Infallible>(answer) }
                    })
                },
                std::future::pending(),
            ));
        })
        .context("starting the inspector's thread")?;
    Ok(local)
}

/// The `Host` values a browser sends for `local`: the address itself, and
/// `localhost` for a loopback one.
fn allowed_hosts(local: SocketAddr) -> Vec<String> {
    let mut hosts = vec![local.to_string()];
    if local.ip().is_loopback() {
        hosts.push(format!("localhost:{}", local.port()));
    }
    hosts
}

fn answer<B>(inspector: &Arc<Inspector>, hosts: &[String], request: &Request<B>) -> Response<Body> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok());
    let mut response = if !host.is_some_and(|host| hosts.iter().any(|allowed| allowed == host)) {
        error(StatusCode::FORBIDDEN, "FOREIGN_HOST")
    } else if request.method() == Method::POST && !request.headers().contains_key(CSRF_HEADER) {
        error(StatusCode::FORBIDDEN, "CSRF_HEADER_MISSING")
    } else {
        route(inspector, request)
    };
    let headers = response.headers_mut();
    headers.insert("content-security-policy", HeaderValue::from_static(CSP));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn route<B>(inspector: &Arc<Inspector>, request: &Request<B>) -> Response<Body> {
    let path = request.uri().path();
    let get = request.method() == Method::GET || request.method() == Method::HEAD;
    match (get, path) {
        (true, "/") => file(INDEX_HTML, "text/html; charset=utf-8"),
        (true, "/app.js") => file(APP_JS, "text/javascript; charset=utf-8"),
        (true, "/app.css") => file(APP_CSS, "text/css; charset=utf-8"),
        (true, "/api/updates") => {
            let query = Query::of(request.uri().query());
            let list = inspector.list(query.get("q"), query.get("chat"), query.get("outcome"));
            json_answer(StatusCode::OK, &list)
        }
        (true, "/api/events") => events(inspector),
        _ => match (request.method(), path.strip_prefix("/api/updates/")) {
            (method, Some(rest)) if method == Method::GET || method == Method::HEAD => {
                match rest.parse::<u64>().ok().and_then(|id| inspector.detail(id)) {
                    Some(detail) => json_answer(StatusCode::OK, &detail),
                    None => error(StatusCode::NOT_FOUND, "NOT_FOUND"),
                }
            }
            (&Method::POST, Some(rest)) => match rest.strip_suffix("/replay") {
                Some(id) => replay(inspector, id),
                None => error(StatusCode::NOT_FOUND, "NOT_FOUND"),
            },
            _ if get => error(StatusCode::NOT_FOUND, "NOT_FOUND"),
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
        },
    }
}

fn replay(inspector: &Arc<Inspector>, id: &str) -> Response<Body> {
    let Ok(id) = id.parse::<u64>() else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND");
    };
    match inspector.replay(id) {
        Ok(new_id) => json_answer(StatusCode::ACCEPTED, &json!({ "id": new_id })),
        Err(NoReplay::NotFound) => error(StatusCode::NOT_FOUND, "NOT_FOUND"),
        Err(NoReplay::Refused(why)) => json_answer(StatusCode::CONFLICT, &json!({ "error": why })),
    }
}

/// Server-Sent Events: each changed entry's summary as it happens.
fn events(inspector: &Arc<Inspector>) -> Response<Body> {
    let (mut sender, body) = Channel::<Bytes>::new(16);
    let mut changes = inspector.events.subscribe();
    tokio::spawn(async move {
        if sender
            .send_data(Bytes::from_static(b": live\n\n"))
            .await
            .is_err()
        {
            return;
        }
        // Read on a tick, not woken per event: a wake-up per update (tens
        // of thousands a second) cost the bot a third of its throughput.
        // What came in a tick goes out in one write.
        let mut tick = tokio::time::interval(EVENTS_EVERY);
        let mut quiet = 0u32;
        loop {
            tick.tick().await;
            let mut events = String::new();
            while events.len() < MAX_EVENTS_BYTES {
                let change = match changes.try_recv() {
                    Err(TryRecvError::Empty) => break,
                    Ok(summary) => Ok(summary),
                    Err(TryRecvError::Lagged(missed)) => Err(RecvError::Lagged(missed)),
                    Err(TryRecvError::Closed) => Err(RecvError::Closed),
                };
                if !add_event(&mut events, change) {
                    return;
                }
            }
            if events.is_empty() {
                quiet += 1;
                if quiet < KEEPALIVE_TICKS {
                    continue;
                }
                events.push_str(": keepalive\n\n");
            }
            quiet = 0;
            if sender.send_data(Bytes::from(events)).await.is_err() {
                return; // the page went away
            }
        }
    });
    let mut response = Response::new(Either::Right(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

const RELOAD: &str = "event: reload\ndata: {}\n\n";

/// The most event text gathered into one write.
const MAX_EVENTS_BYTES: usize = 64 * 1024;

/// Appends the event for `change`; false once the stream is over.
fn add_event(events: &mut String, change: Result<Event, RecvError>) -> bool {
    match change {
        Ok(Event::Row(summary)) => {
            events.push_str("event: update\ndata: ");
            events.push_str(&summary);
            events.push_str("\n\n");
        }
        // One is enough per write.
        Ok(Event::Reload) if events.ends_with(RELOAD) => {}
        Ok(Event::Reload) => events.push_str(RELOAD),
        // Too slow a reader: it missed some; the page reloads the list.
        Err(RecvError::Lagged(_)) => events.push_str("event: lagged\ndata: {}\n\n"),
        Err(RecvError::Closed) => return false,
    }
    true
}

fn file(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from_static(text.as_bytes()))));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_answer(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(value.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: &'static str) -> Response<Body> {
    json_answer(status, &json!({ "error": code }))
}

/// The query string's parameters, percent-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn of(query: Option<&str>) -> Query {
        let pairs = query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key), percent_decode(value))
            })
            .collect();
        Query(pairs)
    }

    /// A non-empty value of `key`.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, value)| name == key && !value.is_empty())
            .map(|(_, value)| value.as_str())
    }
}

/// `+` and `%XX` decoded; a malformed escape is kept as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'+' => decoded.push(b' '),
            b'%' if at + 2 < bytes.len() => {
                let digit = |byte: u8| (byte as char).to_digit(16);
                match (digit(bytes[at + 1]), digit(bytes[at + 2])) {
                    (Some(high), Some(low)) => {
                        decoded.push((high * 16 + low) as u8);
                        at += 2;
                    }
                    _ => decoded.push(b'%'),
                }
            }
            byte => decoded.push(byte),
        }
        at += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        let query = Query::of(Some(
            "q=hello+w%C3%B6rld&chat=private%3Au_1&outcome=&bad=%zz",
        ));
        assert_eq!(query.get("q"), Some("hello wörld"));
        assert_eq!(query.get("chat"), Some("private:u_1"));
        assert_eq!(query.get("outcome"), None);
        assert_eq!(query.get("bad"), Some("%zz"));
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[test]
    fn loopback_answers_to_localhost_too() {
        let hosts = allowed_hosts("127.0.0.1:4040".parse().unwrap());
        assert_eq!(hosts, ["127.0.0.1:4040", "localhost:4040"]);
        let hosts = allowed_hosts("0.0.0.0:4040".parse().unwrap());
        assert_eq!(hosts, ["0.0.0.0:4040"]);
    }
}
