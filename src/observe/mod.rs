//! Seeing what a running bot does: the one record of each update
//! ([`record`]), the process's Prometheus metrics ([`metrics`]) that the
//! records and the API client count into, and `--metrics` ([`endpoint`]),
//! which serves them with `/healthz` and `/readyz`.

pub mod endpoint;
pub mod metrics;
mod process;
pub mod record;

pub use metrics::{Phase, metrics};
pub use record::{
    End, Outcome, Sink, Source, Step, Steps, UpdateRecord, capped, capturing, handler_said,
    set_sink,
};
