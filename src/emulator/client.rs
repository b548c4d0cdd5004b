//! The control API (`/_emulator/*`) from the client side, over real HTTP as
//! any script would use it: `fly emulator say` and `fly demo` play the users
//! through it.
//!
//! No retries: the emulator is a local process that either runs or does not,
//! and "is it started?" is the answer a user needs at once.

use std::time::Duration;

use anyhow::{Context, anyhow};
use serde_json::Value;

/// A local emulator answers at once; a long wait means something else listens.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Nothing listens at the emulator's address: it is not started, or it
/// listens elsewhere.
#[derive(Debug)]
pub struct NoEmulator(pub String);

impl std::fmt::Display for NoEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no emulator at {} (connection refused); start one with `fly emulator`",
            self.0
        )
    }
}

impl std::error::Error for NoEmulator {}

pub struct ControlClient {
    agent: ureq::Agent,
    base_url: String,
}

impl ControlClient {
    /// A client for the emulator at `base_url` (`http://HOST:PORT`).
    pub fn new(base_url: &str) -> ControlClient {
        // The emulator is local: never reached through a proxy from the environment.
        let agent =
            crate::http_client::agent(crate::http_client::Profile::Local { timeout: TIMEOUT });
        ControlClient {
            agent,
            base_url: base_url.trim_end_matches('/').to_string(),
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base_url);
        let answer = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body.to_string());
        self.read(path, answer)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base_url);
        let answer = self.agent.get(&url).call();
        self.read(path, answer)
    }

    /// The JSON answer of a 2xx, else one line saying what went wrong and where.
    fn read(
        &self,
        path: &str,
        answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<Value> {
        let base = &self.base_url;
        let mut response = answer.map_err(|error| match error {
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                anyhow::Error::new(NoEmulator(base.clone()))
            }
            other => {
                anyhow::Error::new(other).context(format!("calling the emulator at {base}{path}"))
            }
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer of {base}{path}"))?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if !(200..300).contains(&status) {
            let why = json
                .as_ref()
                .and_then(|value| value["msg"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(anyhow!(
                "the emulator at {base} refused {path}: HTTP {status} ({why})"
            ));
        }
        json.ok_or_else(|| anyhow!("{base}{path} did not answer with JSON: is it a fly emulator?"))
    }
}
