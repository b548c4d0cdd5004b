//! The one blocking HTTP client (ureq 3) every command talks to the platform through.
//!
//! One `Agent` per process keeps connections alive between calls. Status codes are
//! not errors at the ureq level (`http_status_as_error(false)`) so that an error
//! response's body (`code`/`msg`) can be read and shown.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use ureq::Agent;
use ureq::http::Response;

use super::types::{PATH_BATCH_ACCESS, PATH_SEND, PATH_UPDATES, SendRequest, Unusable, Update};
use super::{ApiError, Token};
use crate::http_client::PlainHttp;
use crate::observe::metrics;
use crate::retry::{
    AttemptError, GaveUp, RetryPolicy, TransportFailure, attempts_text, classify_transport,
    transient_response,
};
use crate::shutdown::Shutdown;
use fly_signature::json::{self, Value};
use fly_signature::python;
use std::fmt;

/// Where the updates sit in an updates response; their spans are recorded
/// while parsing so each update keeps its exact bytes.
const UPDATES_PATH: &[&str] = &["data", "updates"];

/// One update of an updates response: readable, or a dead letter.
pub type Received = Result<Update, Unusable>;

/// A 2xx answer, parsed by the Python-compatible reader (SPEC section 2:
/// whatever the platform's Python accepts, fly accepts).
struct Envelope<'t> {
    text: &'t str,
    located: json::Located<'t>,
    /// The platform's clock: the answer's `Date` header, when it sent one.
    date: Option<SystemTime>,
    status: u16,
    /// ` (code X: msg)` or the like, for error lines.
    detail: &'t str,
}

impl Envelope<'_> {
    fn data(&self) -> &Value<'_> {
        self.located.value.get("data").unwrap_or(&Value::Null)
    }

    /// The text of `data` as sent (the last `data` member, as Python reads it).
    fn data_text(&self) -> &str {
        self.located
            .members
            .iter()
            .rev()
            .find(|member| member.key.as_ref() == b"data")
            .map_or("null", |member| &self.text[member.value_span.clone()])
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-read timeout for ordinary calls: a silent server for this long is a dead connection.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than its poll timeout a long poll may stay silent before we call it dead.
const LONG_POLL_GRACE: Duration = Duration::from_secs(15);
/// Error bodies are shown in one line; the start of a long HTML error page is enough.
const MAX_DETAIL_CHARS: usize = 200;

/// Cheap to clone: clones share the connection pool and the stop flag.
#[derive(Clone)]
pub struct ApiClient {
    agent: Agent,
    base_url: String,
    token: Token,
    policy: RetryPolicy,
    /// Waits between retries end early when this is set (a service stopping).
    shutdown: Shutdown,
}

impl ApiClient {
    /// A client for `base_url` (`http://` or `https://`, trailing `/` ignored).
    pub fn new(base_url: &str, token: Token, policy: RetryPolicy) -> anyhow::Result<ApiClient> {
        let base_url = check_base_url(base_url)?;
        Ok(ApiClient {
            agent: new_agent(),
            base_url,
            token,
            policy,
            shutdown: Shutdown::new(),
        })
    }

    /// The same client, with retry waits that end when `shutdown` is requested.
    pub fn with_shutdown(mut self, shutdown: Shutdown) -> ApiClient {
        self.shutdown = shutdown;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The shared agent, for downloads from access URLs (which carry no bearer token).
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    pub fn token(&self) -> &Token {
        &self.token
    }

    /// `POST {base}{path}` with a JSON body, with retries; `read` turns the
    /// answer's envelope into the result (an `Err` is a malformed answer).
    /// Every call fly makes answers with data (the sent message, the
    /// updates, the access URLs): a 2xx without it did not do what was asked.
    fn call<T>(
        &self,
        path: &str,
        body: &str,
        read_timeout: Duration,
        read: impl Fn(&Envelope) -> Result<T, BadData>,
    ) -> Result<T, ApiError> {
        self.call_paced(path, body, read_timeout, &|_| {}, read)
    }

    /// [`ApiClient::call`], telling `pace` before each attempt and each wait
    /// the longest it may take (see [`ApiClient::get_updates`]).
    fn call_paced<T>(
        &self,
        path: &str,
        body: &str,
        read_timeout: Duration,
        pace: &dyn Fn(Duration),
        read: impl Fn(&Envelope) -> Result<T, BadData>,
    ) -> Result<T, ApiError> {
        self.call_any(path, body, read_timeout, pace, |envelope| {
            if matches!(envelope.located.value.get("data"), None | Some(Value::Null)) {
                return Err(BadData(format!(
                    "HTTP {} without data{}",
                    envelope.status, envelope.detail
                )));
            }
            read(envelope)
        })
    }

    /// Any path of the bot API (`fly api`): `POST {base}{path}` with `body`,
    /// with the retries of every call. Returns the whole answer (its
    /// envelope: `code`, `msg`, `data`) as one line of JSON; an envelope
    /// that reports a failure is an error, as for every call.
    pub fn call_path(&self, path: &str, body: &str) -> Result<String, ApiError> {
        self.call_any(path, body, READ_TIMEOUT, &|_| {}, |envelope| {
            Ok(json::compact(envelope.text))
        })
    }

    /// [`ApiClient::call`] without its demand for `data`.
    fn call_any<T>(
        &self,
        path: &str,
        body: &str,
        read_timeout: Duration,
        pace: &dyn Fn(Duration),
        read: impl Fn(&Envelope) -> Result<T, BadData>,
    ) -> Result<T, ApiError> {
        let url = format!("{}{}", self.base_url, path);
        // An attempt ends within its connect and read timeouts, unless the
        // server drips its answer (each read is bounded, not the whole).
        let attempt_bound = CONNECT_TIMEOUT + read_timeout;
        let outcome = self.policy.run(
            |attempt| {
                pace(attempt_bound);
                self.attempt(&url, path, body, read_timeout, attempt.time_left, &read)
            },
            |failures, reason, delay| {
                metrics()
                    .api_retries
                    .get_or_create(&[("endpoint", endpoint_label(path))])
                    .inc();
                tracing::warn!(
                    path,
                    failures,
                    "{reason}; retrying in {:.1}s",
                    delay.as_secs_f64()
                );
            },
            |delay| {
                pace(delay + attempt_bound);
                self.shutdown.sleep(delay)
            },
        );
        outcome.map_err(|gave_up| match gave_up {
            GaveUp::Fatal(error) => {
                tracing::debug!("POST {path}: not retried, another try would fail the same way");
                error
            }
            GaveUp::Exhausted {
                attempts,
                last,
                limit,
            } => {
                tracing::debug!("POST {path}: giving up after {}", attempts_text(attempts));
                ApiError::Unavailable {
                    path: path.to_string(),
                    attempts,
                    last,
                    limit,
                }
            }
            GaveUp::Cancelled => ApiError::Cancelled,
        })
    }

    /// One long poll: updates with `update_id >= offset` (confirming every
    /// update below it), each with its exact bytes, or why it is unusable.
    /// `pace` is told, before each attempt and each wait between attempts,
    /// the longest that step should take (a watchdog's bound): its connect
    /// and read timeouts, the wait.
    pub fn get_updates(
        &self,
        offset: i64,
        limit: u32,
        poll_timeout: Duration,
        pace: &dyn Fn(Duration),
    ) -> Result<Vec<Received>, ApiError> {
        let body = json!({"offset": offset, "limit": limit, "timeout": poll_timeout.as_secs()});
        let read_timeout = poll_timeout + LONG_POLL_GRACE;
        self.call_paced(
            PATH_UPDATES,
            &body.to_string(),
            read_timeout,
            pace,
            |envelope| match envelope.data().get("updates") {
                Some(Value::Array(updates)) => Ok(updates
                    .iter()
                    .zip(&envelope.located.items)
                    .map(|(update, span)| Update::read(update, &envelope.text[span.clone()]))
                    .collect()),
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(other) => Err(BadData(format!(
                    "data.updates is a {}, not a list",
                    python::type_name(other)
                ))),
            },
        )
    }

    /// A harmless call to see whether the token is accepted (`fly doctor`):
    /// an updates call with timeout 0, limit 1 and no offset. It must not
    /// carry an offset: asking with one confirms every update below it, and
    /// the bot's own poller would never see them. Without one nothing is
    /// confirmed, so whatever it returns is delivered again to the poller.
    pub fn probe(&self) -> Result<Probe, ApiError> {
        let body = json!({"limit": 1, "timeout": 0});
        self.call(PATH_UPDATES, &body.to_string(), READ_TIMEOUT, |envelope| {
            Ok(Probe {
                server_date: envelope.date,
            })
        })
    }

    /// Sends a message; a retry reuses the request's `client_msg_id`, so the
    /// platform records it once however often it is retried. Returns the
    /// answer's `data` (the sent message) as one line of JSON, as sent.
    pub fn send(&self, request: &SendRequest) -> Result<String, ApiError> {
        self.call(PATH_SEND, &request.to_json(), READ_TIMEOUT, |envelope| {
            Ok(json::compact(envelope.data_text()))
        })
    }

    /// Exchanges media URLs for short-lived download URLs. URLs the platform
    /// returned no access URL for are absent from the map.
    pub fn batch_access(
        &self,
        urls: &[String],
        expire_seconds: u64,
    ) -> Result<BTreeMap<String, String>, ApiError> {
        let files: Vec<serde_json::Value> = urls.iter().map(|url| json!({"url": url})).collect();
        let body = json!({"files": files, "expire_seconds": expire_seconds});
        self.call(
            PATH_BATCH_ACCESS,
            &body.to_string(),
            READ_TIMEOUT,
            |envelope| {
                let mut access = BTreeMap::new();
                if let Some(Value::Object(files)) = envelope.data().get("files") {
                    for (url, access_url) in files {
                        if let (Ok(url), Value::Str(access_url)) =
                            (std::str::from_utf8(url), access_url)
                            && let Ok(access_url) = std::str::from_utf8(access_url)
                            && !access_url.trim().is_empty()
                        {
                            access.insert(url.to_string(), access_url.trim().to_string());
                        }
                    }
                }
                Ok(access)
            },
        )
    }

    /// One request. `time_left` (what the retry budget has left) bounds the
    /// whole exchange, so a server that stops answering cannot stretch a
    /// one-shot command past its budget.
    fn attempt<T>(
        &self,
        url: &str,
        path: &str,
        body: &str,
        read_timeout: Duration,
        time_left: Option<Duration>,
        read: &impl Fn(&Envelope) -> Result<T, BadData>,
    ) -> Result<T, AttemptError<ApiError>> {
        let started = Instant::now();
        let result = self
            .agent
            .post(url)
            .header("Authorization", &format!("Bearer {}", self.token.expose()))
            .config()
            .timeout_per_read(Some(read_timeout))
            .timeout_global(time_left)
            // Following a redirect would turn the POST into a bodyless GET
            // (301-303) whose 2xx looks like success: a 3xx is an answer.
            .max_redirects(0)
            .build()
            .header("Content-Type", "application/json")
            .send(body.as_bytes());
        // fly's own account of each request at -v: method, path (never the
        // URL's credentials or the token), status and latency.
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                metrics().api_request(endpoint_label(path), 0, started.elapsed().as_secs_f64());
                let failure = classify_transport_error(&self.base_url, path, error);
                tracing::debug!(
                    ms = elapsed_ms(started),
                    "POST {path}: {}",
                    failure_text(&failure)
                );
                return Err(failure);
            }
        };
        let status = response.status().as_u16();
        let outcome = self.read_envelope(path, response, read);
        metrics().api_request(
            endpoint_label(path),
            status,
            started.elapsed().as_secs_f64(),
        );
        tracing::debug!(status, ms = elapsed_ms(started), "POST {path}");
        outcome
    }

    /// Turns a response into what `read` makes of its envelope, or into the
    /// right kind of failure.
    fn read_envelope<T>(
        &self,
        path: &str,
        mut response: Response<ureq::Body>,
        read: &impl Fn(&Envelope) -> Result<T, BadData>,
    ) -> Result<T, AttemptError<ApiError>> {
        let status = response.status().as_u16();
        let date = response
            .headers()
            .get("date")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| httpdate::parse_http_date(value).ok());
        // A connection dropped while reading the body is as transient as one
        // dropped before the status line.
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|error| classify_transport_error(&self.base_url, path, error))?;
        let parsed = json::parse_located(&text, UPDATES_PATH).ok();
        let detail = self
            .token
            .redact(&error_detail(parsed.as_ref().map(|p| &p.value), &text));
        if let Some(transient) =
            transient_response(&response, |status| format!("HTTP {status}{detail}"))
        {
            return Err(transient);
        }

        self.check_status(path, &response, &detail)?;
        let Some(located) = parsed.filter(|p| matches!(p.value, Value::Object(_))) else {
            return Err(AttemptError::Fatal(ApiError::BadResponse {
                path: path.to_string(),
                detail: format!("HTTP {status}, not a JSON object{detail}"),
            }));
        };
        // The real service also reports failures inside a 2xx envelope.
        if envelope_code_is_error(located.value.get("code")) {
            return Err(AttemptError::Fatal(ApiError::Rejected {
                path: path.to_string(),
                status,
                detail,
            }));
        }
        let envelope = Envelope {
            text: &text,
            located,
            date,
            status,
            detail: &detail,
        };
        read(&envelope).map_err(|BadData(detail)| {
            AttemptError::Fatal(ApiError::BadResponse {
                path: path.to_string(),
                detail,
            })
        })
    }

    /// Refuses an answer whose status is not a success: the token refused,
    /// a redirect (API calls are not followed), anything else rejected.
    fn check_status(
        &self,
        path: &str,
        response: &Response<ureq::Body>,
        detail: &str,
    ) -> Result<(), AttemptError<ApiError>> {
        let status = response.status().as_u16();
        let error = match status {
            200..=299 => return Ok(()),
            401 | 403 => ApiError::TokenRefused {
                status,
                detail: detail.to_string(),
            },
            300..=399 => {
                let location = response
                    .headers()
                    .get("location")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("nowhere");
                ApiError::Rejected {
                    path: path.to_string(),
                    status,
                    detail: format!(
                        " (a redirect to {}; API calls are not redirected: check the base URL)",
                        self.token.redact(location)
                    ),
                }
            }
            _ => ApiError::Rejected {
                path: path.to_string(),
                status,
                detail: detail.to_string(),
            },
        };
        Err(AttemptError::Fatal(error))
    }
}

/// What is wrong with a 2xx answer's data: the detail of
/// [`ApiError::BadResponse`], which names the call.
struct BadData(String);

/// What [`ApiClient::probe`] learnt besides "the token is accepted".
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// The platform's clock (its `Date` header), when it sent one.
    pub server_date: Option<SystemTime>,
}

/// Where the bot API's paths start: a base URL must stop before it.
const API_PATH_PREFIX: &str = "/api/v1";

/// The base URL without surrounding spaces or trailing `/`, checked: an
/// http(s) URL that does not already hold the API path (the paths are added
/// to it, so `…/api/v1` would be sent to `…/api/v1/api/v1/…` and read as a 404).
pub fn check_base_url(url: &str) -> anyhow::Result<String> {
    let url = url.trim().trim_end_matches('/');
    check_http_url(url, BASE_URL)?;
    let path_start = url
        .find("://")
        .map(|scheme_end| scheme_end + 3)
        .and_then(|host_start| url[host_start..].find('/').map(|slash| host_start + slash));
    if let Some(path_start) = path_start {
        let path = &url[path_start..];
        let api_path = path.match_indices(API_PATH_PREFIX).find(|(at, _)| {
            let rest = &path[at + API_PATH_PREFIX.len()..];
            rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')
        });
        if let Some((at, _)) = api_path {
            let cut = path_start + at;
            let fixed = &url[..cut];
            return Err(BadUrl {
                message: format!(
                    "the base URL {url} includes the API path: drop {} from the base URL \
                     and use {fixed}",
                    &url[cut..]
                ),
                base_url: true,
            }
            .into());
        }
    }
    Ok(url.to_string())
}

/// `host:port` of an http(s) URL (the scheme's port when none is given, no
/// user info), as network errors name it.
pub fn host_and_port(url: &str) -> String {
    let Ok(uri) = url.parse::<ureq::http::Uri>() else {
        return url.to_string();
    };
    let Some(authority) = uri.authority() else {
        return url.to_string();
    };
    let port = authority.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    format!("{}:{port}", authority.host())
}

/// A URL no request can go to: bad input, to be fixed before anything is
/// sent. `base_url` when it is the platform's base URL, which the command
/// layer then names as its option (`--base-url`, `FLY_BASE_URL`).
#[derive(Debug)]
pub struct BadUrl {
    pub message: String,
    pub base_url: bool,
}

impl fmt::Display for BadUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BadUrl {}

/// Checks that `url` is an http(s) URL a request can be made to, so a typo
/// is refused at once rather than a request retried forever. `what` names it.
pub fn check_http_url(url: &str, what: &str) -> Result<(), BadUrl> {
    match http_url_problem(url) {
        Some(why) => Err(BadUrl {
            message: format!("{what} {why} (got {url:?})"),
            base_url: what == BASE_URL,
        }),
        None => Ok(()),
    }
}

/// How errors name the platform's base URL.
const BASE_URL: &str = "the base URL";

/// What makes `url` unusable as an http(s) URL, if anything: the one check
/// behind every URL fly or its emulator is given.
pub fn http_url_problem(url: &str) -> Option<&'static str> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Some("must be an http:// or https:// URL");
    }
    let Ok(uri) = url.parse::<ureq::http::Uri>() else {
        return Some("is not a valid URL");
    };
    match uri.authority() {
        Some(authority) if !authority.host().is_empty() => {
            // The parser accepts any digits as a port; a connection cannot.
            let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
            if let Some((_, port)) = host_port.rsplit_once(':')
                && !port.contains(']')
                && !port.parse::<u16>().is_ok_and(|port| port > 0)
            {
                return Some("has a port outside 1-65535");
            }
            None
        }
        _ => Some("has no host"),
    }
}

fn new_agent() -> Agent {
    crate::http_client::agent(crate::http_client::Profile::Platform {
        connect_timeout: CONNECT_TIMEOUT,
        read_timeout: READ_TIMEOUT,
    })
}

/// The `endpoint` label of an API path, from a fixed set.
fn endpoint_label(path: &str) -> &'static str {
    match path {
        PATH_UPDATES => "updates",
        PATH_SEND => "send",
        PATH_BATCH_ACCESS => "batch_access",
        _ => "other",
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// How an attempt failed, for the request's log line.
fn failure_text(failure: &AttemptError<ApiError>) -> String {
    match failure {
        AttemptError::Transient { reason, .. } => reason.clone(),
        AttemptError::Fatal(error) => error.to_string(),
    }
}

/// Transport failures are transient unless the request itself can never
/// work, the answer can never be read or the server does not speak TLS
/// (see [`classify_transport`]). `base_url` is the server's, which the
/// description names.
fn classify_transport_error(
    base_url: &str,
    path: &str,
    error: ureq::Error,
) -> AttemptError<ApiError> {
    match classify_transport(&error) {
        TransportFailure::PlainHttp => AttemptError::Fatal(ApiError::PlainHttp(PlainHttp {
            url: base_url.to_string(),
        })),
        TransportFailure::Unusable => AttemptError::Fatal(ApiError::Rejected {
            path: path.to_string(),
            status: 0,
            detail: format!(" (request could not be made: {error})"),
        }),
        TransportFailure::Malformed => AttemptError::Fatal(ApiError::BadResponse {
            path: path.to_string(),
            detail: format!("malformed HTTP: {error}"),
        }),
        TransportFailure::Transient => AttemptError::Transient {
            reason: describe_transport_error(&host_and_port(base_url), &error),
            retry_after: None,
        },
    }
}

/// A network failure in words that name the server (`host` is its
/// `host:port`): "connection refused by 127.0.0.1:9" says where to look,
/// "Connection refused" does not.
pub fn describe_transport_error(host: &str, error: &ureq::Error) -> String {
    use std::io::ErrorKind;
    match error {
        ureq::Error::ConnectionFailed => format!("cannot connect to {host}"),
        ureq::Error::HostNotFound => {
            let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
            format!("host not found: {name} (DNS)")
        }
        // Only the retry budget sets a global timeout (see `attempt`).
        ureq::Error::Timeout(ureq::Timeout::Global) => {
            format!("no answer from {host} in the time left")
        }
        ureq::Error::Timeout(kind) => format!("{host} timed out ({kind})"),
        ureq::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => format!("connection refused by {host}"),
            ErrorKind::ConnectionReset => format!("connection reset by {host}"),
            ErrorKind::ConnectionAborted | ErrorKind::UnexpectedEof => {
                format!("{host} closed the connection without an answer")
            }
            ErrorKind::TimedOut => format!("no answer from {host} (timed out)"),
            _ => {
                // The OS's words, without the "(os error N)" that tells nobody anything.
                let text = io.to_string();
                let text = text
                    .rfind(" (os error ")
                    .map_or(&text[..], |at| &text[..at]);
                format!("connection to {host} failed: {text}")
            }
        },
        other => format!("talking to {host}: {other}"),
    }
}

/// ` (code X: msg)` from an envelope, else the start of the body text, for error lines.
fn error_detail(json: Option<&Value>, text: &str) -> String {
    if let Some(envelope @ Value::Object(_)) = json {
        let code = envelope.get("code").filter(|code| **code != Value::Null);
        let msg = envelope
            .get("msg")
            .or_else(|| envelope.get("message"))
            .filter(|msg| matches!(msg, Value::Str(_)));
        return match (code.map(plain), msg.map(plain)) {
            (Some(code), Some(msg)) => format!(" (code {code}: {msg})"),
            (Some(code), None) => format!(" (code {code})"),
            (None, Some(msg)) => format!(" ({msg})"),
            (None, None) => String::new(),
        };
    }
    let one_line: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(MAX_DETAIL_CHARS)
        .collect();
    if one_line.is_empty() {
        String::new()
    } else {
        format!(": {one_line}")
    }
}

/// A value for an error line: strings as their text, anything else as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::Str(text) => String::from_utf8_lossy(text).into_owned(),
        other => fly_signature::canonical::wire_json(other),
    }
}

/// A 2xx envelope whose numeric `code` is not 0 reports a failure.
fn envelope_code_is_error(code: Option<&Value>) -> bool {
    match code {
        Some(Value::Int(digits)) => *digits != "0",
        Some(Value::Float(number)) => *number != 0.0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_usable_http_urls_pass() {
        for good in [
            "http://127.0.0.1:8080/hook",
            "https://api.example",
            "http://[::1]:5000/x",
            "http://user@h:1/",
        ] {
            assert!(check_http_url(good, "--to").is_ok(), "{good}");
        }
        for bad in [
            "notaurl",
            "ftp://h/",
            "http://",
            "http://[::1",
            "http://127.0.0.1:99999/x",
            "http://127.0.0.1:0/x",
            "http://h/x y",
        ] {
            let error = check_http_url(bad, "--to").unwrap_err();
            assert!(!error.base_url, "{bad}");
            assert!(error.message.starts_with("--to "), "{error}");
        }
    }

    fn detail_of(body: &str) -> String {
        error_detail(Some(&json::parse(body).unwrap()), body)
    }

    #[test]
    fn error_detail_prefers_the_envelope() {
        assert_eq!(
            detail_of(r#"{"code": 40001, "msg": "invalid group_id"}"#),
            " (code 40001: invalid group_id)"
        );
        assert_eq!(detail_of(r#"{"msg": "nope"}"#), " (nope)");
        assert_eq!(detail_of(r#"{"data": 1}"#), "");
    }

    #[test]
    fn error_detail_shows_the_start_of_other_bodies_on_one_line() {
        let page = format!("<html>\n<body>Bad Gateway</body>\n{}", "x".repeat(500));
        let detail = error_detail(None, &page);
        assert!(detail.starts_with(": <html> <body>Bad Gateway</body>"));
        assert!(!detail.contains('\n'));
        assert_eq!(detail.chars().count(), 2 + MAX_DETAIL_CHARS);
        assert_eq!(error_detail(None, ""), "");
    }

    #[test]
    fn envelope_codes() {
        let code = |text: &str| envelope_code_is_error(Some(&json::parse(text).unwrap()));
        assert!(!envelope_code_is_error(None));
        assert!(!code("0"));
        assert!(!code("0.0"));
        assert!(code("40001"));
        assert!(!code(r#""ok""#));
    }

    #[test]
    fn transport_errors_are_transient_but_bad_requests_are_not() {
        let transient = classify_transport_error("http://h:1", "/p", ureq::Error::ConnectionFailed);
        assert!(matches!(transient, AttemptError::Transient { .. }));
        let io = ureq::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(matches!(
            classify_transport_error("http://h:1", "/p", io),
            AttemptError::Transient { .. }
        ));
        let fatal = classify_transport_error("http://h:1", "/p", ureq::Error::BadUri("x".into()));
        assert!(matches!(
            fatal,
            AttemptError::Fatal(ApiError::Rejected { .. })
        ));
        let malformed =
            classify_transport_error("http://h:1", "/p", ureq::Error::LargeResponseHeader(1, 1));
        assert!(matches!(
            malformed,
            AttemptError::Fatal(ApiError::BadResponse { .. })
        ));
    }

    #[test]
    fn base_url_must_be_http() {
        let token = Token::new("t").unwrap();
        let error = ApiClient::new("ftp://x", token.clone(), RetryPolicy::ONE_SHOT)
            .err()
            .unwrap();
        assert!(
            error
                .downcast_ref::<BadUrl>()
                .is_some_and(|bad| bad.base_url),
            "{error:#}"
        );
        let client = ApiClient::new("http://127.0.0.1:1/", token, RetryPolicy::ONE_SHOT).unwrap();
        assert_eq!(client.base_url, "http://127.0.0.1:1");
    }

    #[test]
    fn a_base_url_holding_the_api_path_is_refused_with_the_fix() {
        for (given, dropped, fixed) in [
            (
                "http://127.0.0.1:8787/api/v1",
                "/api/v1",
                "http://127.0.0.1:8787",
            ),
            (
                "http://127.0.0.1:8787/api/v1/",
                "/api/v1",
                "http://127.0.0.1:8787",
            ),
            (
                "https://api.example/api/v1/s/bot",
                "/api/v1/s/bot",
                "https://api.example",
            ),
            (
                "https://gw.example/fly/api/v1/s",
                "/api/v1/s",
                "https://gw.example/fly",
            ),
        ] {
            let error = check_base_url(given).unwrap_err();
            assert!(
                error
                    .downcast_ref::<BadUrl>()
                    .is_some_and(|bad| bad.base_url),
                "{given}"
            );
            let message = error.to_string();
            assert!(
                message.contains(&format!("drop {dropped} from the base URL")),
                "{message}"
            );
            assert!(message.contains(&format!("use {fixed}")), "{message}");
        }
        for fine in [
            "https://api.flycrytp.com/",
            "http://127.0.0.1:8787",
            "https://gw.example/fly",
            "https://gw.example/api/v10",
            "https://gw.example/api/v1x",
        ] {
            assert_eq!(
                check_base_url(fine).unwrap(),
                fine.trim_end_matches('/'),
                "{fine}"
            );
        }
    }

    #[test]
    fn network_errors_name_the_host() {
        assert_eq!(host_and_port("http://127.0.0.1:9"), "127.0.0.1:9");
        assert_eq!(
            host_and_port("https://user:pw@api.example/x"),
            "api.example:443"
        );
        assert_eq!(host_and_port("http://[::1]"), "[::1]:80");
        let io = |kind| ureq::Error::Io(std::io::Error::from(kind));
        let describe = |error| describe_transport_error("127.0.0.1:9", &error);
        assert_eq!(
            describe(io(std::io::ErrorKind::ConnectionRefused)),
            "connection refused by 127.0.0.1:9"
        );
        assert_eq!(
            describe(io(std::io::ErrorKind::ConnectionReset)),
            "connection reset by 127.0.0.1:9"
        );
        assert_eq!(
            describe(ureq::Error::HostNotFound),
            "host not found: 127.0.0.1 (DNS)"
        );
        assert_eq!(
            describe(ureq::Error::ConnectionFailed),
            "cannot connect to 127.0.0.1:9"
        );
        let os_error = ureq::Error::Io(std::io::Error::from_raw_os_error(libc::ENETUNREACH));
        assert_eq!(
            describe(os_error),
            "connection to 127.0.0.1:9 failed: Network is unreachable"
        );
    }
}
