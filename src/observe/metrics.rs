//! The process's Prometheus metrics: one registry, counted whether or not
//! `--metrics` serves it (an increment is an atomic add; serving is what
//! `--metrics` turns on), so nothing is passed around to count and the
//! numbers are the same with or without a scraper.
//!
//! Label values come from fixed sets (`&'static str`): never a chat id, an
//! update id or a URL, so the number of series is bounded.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU8, Ordering};

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// Seconds, from a millisecond to a minute: replies, handlers, API calls.
const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

#[derive(Clone)]
pub struct SecondsBuckets;

impl MetricConstructor<Histogram> for SecondsBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(SECONDS_BUCKETS)
    }
}

fn seconds_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

/// Every metric fly serves; see the README's table.
pub struct Metrics {
    pub updates: Family<Labels1, Counter>,
    pub update_failures: Family<Labels1, Counter>,
    pub update_duration: Histogram,
    pub handler_duration: Histogram,
    pub webhook_requests: Family<Labels2, Counter>,
    pub api_requests: Family<Labels2, Counter>,
    api_request_duration: Family<Labels1, Histogram, SecondsBuckets>,
    pub api_retries: Family<Labels1, Counter>,
    pub updates_in_flight: Gauge,
    pub parked_updates: Gauge,
    pub poll_offset: Gauge,
    pub polling_lease_held: Gauge,
    pub handler_restarts: Counter,
    pub state_store_errors: Counter,
    /// Every request serve-webhook answered, whatever its code (not
    /// served: the service manager's status line says it).
    pub webhook_answers: Counter,
    /// What the poll loop is doing, for `/readyz` (see [`Phase`]).
    phase: AtomicU8,
    registry: Registry,
}

/// The poll loop's phase: ready while polling or standing by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    StandingBy = 1,
    Polling = 2,
    Stopping = 3,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let metrics = Metrics {
            updates: Family::default(),
            update_failures: Family::default(),
            update_duration: seconds_histogram(),
            handler_duration: seconds_histogram(),
            webhook_requests: Family::default(),
            api_requests: Family::default(),
            api_request_duration: Family::new_with_constructor(SecondsBuckets),
            api_retries: Family::default(),
            updates_in_flight: Gauge::default(),
            parked_updates: Gauge::default(),
            poll_offset: Gauge::default(),
            polling_lease_held: Gauge::default(),
            handler_restarts: Counter::default(),
            state_store_errors: Counter::default(),
            webhook_answers: Counter::default(),
            phase: AtomicU8::new(Phase::Starting as u8),
            registry: Registry::default(),
        };
        metrics.registered()
    }

    fn registered(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "fly_updates",
            "Updates that reached an end, by outcome",
            self.updates.clone(),
        );
        r.register(
            "fly_update_failures",
            "Attempts at an update that failed and will be retried, by the step that failed",
            self.update_failures.clone(),
        );
        r.register(
            "fly_update_duration_seconds",
            "Time from an update's receipt to its end",
            self.update_duration.clone(),
        );
        r.register(
            "fly_handler_duration_seconds",
            "Time an --exec or --exec-worker handler took for an update",
            self.handler_duration.clone(),
        );
        r.register(
            "fly_webhook_requests",
            "Requests serve-webhook answered, by status code and result",
            self.webhook_requests.clone(),
        );
        r.register(
            "fly_api_requests",
            "Requests to the Fly Bot API, by endpoint and status code (0: no answer)",
            self.api_requests.clone(),
        );
        r.register(
            "fly_api_request_duration_seconds",
            "Time a request to the Fly Bot API took, by endpoint",
            self.api_request_duration.clone(),
        );
        r.register(
            "fly_api_retries",
            "Requests to the Fly Bot API made again after a failure, by endpoint",
            self.api_retries.clone(),
        );
        r.register(
            "fly_updates_in_flight",
            "Updates received and not yet at an end",
            self.updates_in_flight.clone(),
        );
        r.register(
            "fly_parked_updates",
            "Updates parked after failing, waiting for their next try (see fly dead-letters)",
            self.parked_updates.clone(),
        );
        r.register(
            "fly_poll_offset",
            "The offset the poll loop last stored: every update below it is handled",
            self.poll_offset.clone(),
        );
        r.register(
            "fly_polling_lease_held",
            "1 while this poller holds the polling lease, 0 while it stands by",
            self.polling_lease_held.clone(),
        );
        r.register(
            "fly_handler_restarts",
            "--exec-worker workers restarted after they broke",
            self.handler_restarts.clone(),
        );
        r.register(
            "fly_state_store_errors",
            "Calls to the state store that failed",
            self.state_store_errors.clone(),
        );
        r.register_collector(Box::new(BuildInfo));
        r.register_collector(Box::new(super::process::ProcessMetrics));
        self
    }

    /// The text a scraper asked for: OpenMetrics, or Prometheus 0.0.4.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = if openmetrics {
            prometheus_client::encoding::text::encode(&mut text, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
        };
        text
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.polling_lease_held
            .set(i64::from(phase == Phase::Polling));
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            1 => Phase::StandingBy,
            2 => Phase::Polling,
            3 => Phase::Stopping,
            _ => Phase::Starting,
        }
    }

    /// One answer of serve-webhook.
    pub fn webhook_answered(&self, code: u16, result: &'static str) {
        self.webhook_requests
            .get_or_create(&[("code", status_label(code)), ("result", result)])
            .inc();
        self.webhook_answers.inc();
    }

    /// One request to the platform: `code` 0 when none came back.
    pub fn api_request(&self, endpoint: &'static str, code: u16, seconds: f64) {
        self.api_requests
            .get_or_create(&[("endpoint", endpoint), ("code", status_label(code))])
            .inc();
        self.api_request_duration
            .get_or_create(&[("endpoint", endpoint)])
            .observe(seconds);
    }
}

/// A status code as a label value, from a fixed set: the codes fly meets,
/// and their class for any other.
fn status_label(code: u16) -> &'static str {
    match code {
        0 => "0",
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        409 => "409",
        413 => "413",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => match code / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        },
    }
}

/// `fly_build_info{version, commit} 1`.
#[derive(Debug)]
struct BuildInfo;

impl prometheus_client::collector::Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let gauge = ConstGauge::new(1i64);
        let mut family = encoder.encode_descriptor(
            "fly_build_info",
            "The version and commit fly was built from",
            None,
            gauge.metric_type(),
        )?;
        let labels = [
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", env!("FLY_COMMIT")),
        ];
        gauge.encode(family.encode_family(&labels)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_a_fixed_set() {
        assert_eq!(status_label(503), "503");
        assert_eq!(status_label(418), "4xx");
        assert_eq!(status_label(201), "2xx");
        assert_eq!(status_label(999), "5xx");
    }

    #[test]
    fn both_formats_carry_every_family() {
        let metrics = Metrics::new();
        metrics
            .updates
            .get_or_create(&[("outcome", "replied")])
            .inc();
        for openmetrics in [false, true] {
            let text = metrics.encode(openmetrics);
            assert!(
                text.contains("fly_updates_total{outcome=\"replied\"} 1"),
                "{text}"
            );
            assert!(text.contains("fly_build_info{"), "{text}");
            assert!(text.contains("process_start_time_seconds"), "{text}");
            assert_eq!(text.ends_with("# EOF\n"), openmetrics, "{text}");
        }
    }
}
