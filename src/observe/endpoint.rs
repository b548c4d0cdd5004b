//! `--metrics ADDR`: a small HTTP listener of its own, on a thread of its
//! own (a one-thread tokio runtime), so that a scrape never waits behind
//! the bot's work and the bot never waits behind a scrape:
//!
//! - `GET /metrics`: the metrics, in the Prometheus text format 0.0.4, or
//!   OpenMetrics when the scraper's `Accept` asks for it;
//! - `GET /healthz`: 200 while the process serves;
//! - `GET /readyz`: 200 while the command says it is ready (the poll loop
//!   polls or stands by and its store answers; serve-webhook's store
//!   answers), else 503.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};

use super::metrics::metrics;
use crate::http_server::{self, Limits};

/// Whether the command is ready for work; asked at each `/readyz`, so it
/// answers from memory.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

const OPENMETRICS: &str = "application/openmetrics-text";
const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Starts serving on `address` (port 0 picks one) and returns the address
/// it got, once it listens; a port that cannot be bound is the error.
pub fn serve(address: SocketAddr, ready: Readiness) -> anyhow::Result<SocketAddr> {
    let (listener, local) =
        http_server::bind(address.ip(), address.port()).context("cannot serve --metrics")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the metrics listener")?;
    let limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        max_header_bytes: 16 * 1024,
        max_connections: 64,
        drain_timeout: Duration::from_secs(1),
    };
    let server = runtime.block_on(async { http_server::Server::start(listener, None, limits) })?;
    // Never joined: it serves until the process ends.
    std::thread::Builder::new()
        .name("fly-metrics".into())
        .spawn(move || {
            runtime.block_on(server.serve(
                || {
                    let ready = Arc::clone(&ready);
                    service_fn(move |request| {
                        let answer = answer(&request, ready.as_ref());
                        async move { Ok::<_, Infallible>(answer) }
                    })
                },
                std::future::pending(),
            ));
        })
        .context("starting the metrics thread")?;
    tracing::info!(url = %format!("http://{local}/metrics"), "serving metrics");
    Ok(local)
}

fn answer<B>(
    request: &Request<B>,
    ready: &(dyn Fn() -> bool + Send + Sync),
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            let openmetrics = request
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .any(|value| value.contains(OPENMETRICS));
            let content_type = if openmetrics {
                OPENMETRICS_TYPE
            } else {
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE
            };
            let mut response = Response::new(Full::new(Bytes::from(metrics().encode(openmetrics))));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok"),
        "/readyz" if ready() => text(StatusCode::OK, "ready"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "NOT_READY"),
        _ => text(StatusCode::NOT_FOUND, "NOT_FOUND"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
