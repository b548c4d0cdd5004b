//! Injected failures on the bot API, so clients can be tested against the
//! ways the real platform fails: slow answers, 5xx/429 with `Retry-After`,
//! responses lost after the request took effect, and downloads cut short.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;

use super::requests::Invalid;

const MAX_LATENCY_MS: u64 = 60_000;
const MAX_RETRY_AFTER: u64 = 3600;

/// The fault configuration set through `POST /_emulator/faults`.
#[derive(Debug, Clone, Serialize)]
pub struct FaultConfig {
    /// Fraction of bot API requests answered 500 or 429 without being processed.
    pub error_rate: f64,
    /// Fraction of bot API requests processed and then left without any answer.
    pub drop_rate: f64,
    /// Delay before every bot API answer.
    pub latency_ms: u64,
    /// `Retry-After` seconds on injected errors.
    pub retry_after: u64,
    /// Fraction of downloads that stop after half the announced body.
    pub download_cut_rate: f64,
    /// Makes the rolls a fixed sequence, so a test that sends its requests one
    /// at a time meets the same faults on every run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The seeded sequence's state, shared by every clone of this config.
    #[serde(skip)]
    sequence: Option<Arc<Mutex<u64>>>,
}

impl PartialEq for FaultConfig {
    fn eq(&self, other: &FaultConfig) -> bool {
        (
            self.error_rate,
            self.drop_rate,
            self.latency_ms,
            self.retry_after,
        ) == (
            other.error_rate,
            other.drop_rate,
            other.latency_ms,
            other.retry_after,
        ) && (self.download_cut_rate, self.seed) == (other.download_cut_rate, other.seed)
    }
}

impl Default for FaultConfig {
    fn default() -> FaultConfig {
        FaultConfig {
            error_rate: 0.0,
            drop_rate: 0.0,
            latency_ms: 0,
            retry_after: 1,
            download_cut_rate: 0.0,
            seed: None,
            sequence: None,
        }
    }
}

/// The answer that replaces a request picked by `error_rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedError {
    Internal,
    RateLimited,
}

impl FaultConfig {
    /// A whole new configuration: missing fields take their defaults, unknown
    /// ones are refused (a misspelt rate would otherwise silently be 0).
    pub fn parse(body: &Value) -> Result<FaultConfig, Invalid> {
        let object = body.as_object().ok_or("the body must be a JSON object")?;
        let mut config = FaultConfig::default();
        for (name, value) in object {
            match name.as_str() {
                "error_rate" => config.error_rate = rate(name, value)?,
                "drop_rate" => config.drop_rate = rate(name, value)?,
                "download_cut_rate" => config.download_cut_rate = rate(name, value)?,
                "latency_ms" => config.latency_ms = bounded_integer(name, value, MAX_LATENCY_MS)?,
                "retry_after" => {
                    config.retry_after = bounded_integer(name, value, MAX_RETRY_AFTER)?
                }
                "seed" => {
                    let seed = bounded_integer(name, value, u64::MAX)?;
                    config.seed = Some(seed);
                    config.sequence = Some(Arc::new(Mutex::new(seed)));
                }
                other => {
                    return Err(format!(
                        "unknown fault {other:?}; known: error_rate, drop_rate, latency_ms, \
                         retry_after, download_cut_rate, seed"
                    )
                    .into());
                }
            }
        }
        Ok(config)
    }

    /// Whether this request gets an injected error instead of being processed, and which.
    pub fn roll_error(&self) -> Option<InjectedError> {
        self.chance(self.error_rate).then(|| {
            if self.next_random() & 1 == 0 {
                InjectedError::Internal
            } else {
                InjectedError::RateLimited
            }
        })
    }

    /// Whether this processed request loses its response.
    pub fn roll_drop(&self) -> bool {
        self.chance(self.drop_rate)
    }

    /// Whether this download is cut after half its body.
    pub fn roll_download_cut(&self) -> bool {
        self.chance(self.download_cut_rate)
    }

    /// True with probability `rate`; exactly never at 0 and always at 1.
    fn chance(&self, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        // 53 random bits give a uniform float in [0, 1).
        let unit = (self.next_random() >> 11) as f64 / (1u64 << 53) as f64;
        unit < rate
    }

    /// The next number of the seeded sequence (splitmix64), else OS randomness.
    fn next_random(&self) -> u64 {
        let Some(sequence) = &self.sequence else {
            return fly_base::random::u64();
        };
        let mut state = sequence
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn rate(name: &str, value: &Value) -> Result<f64, Invalid> {
    match value.as_f64() {
        Some(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("{name} must be a number from 0 to 1").into()),
    }
}

fn bounded_integer(name: &str, value: &Value, max: u64) -> Result<u64, Invalid> {
    match value.as_u64() {
        Some(number) if number <= max => Ok(number),
        _ => Err(format!("{name} must be an integer from 0 to {max}").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_fields_take_defaults() {
        let config = FaultConfig::parse(&json!({"error_rate": 0.3, "latency_ms": 20})).unwrap();
        assert_eq!(
            config,
            FaultConfig {
                error_rate: 0.3,
                latency_ms: 20,
                ..FaultConfig::default()
            }
        );
        assert_eq!(FaultConfig::parse(&json!({})).unwrap().retry_after, 1);
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            (json!({"error_rate": 1.5}), "error_rate"),
            (json!({"drop_rate": "0.1"}), "drop_rate"),
            (json!({"latency_ms": -1}), "latency_ms"),
            (json!({"retry_after": 2.5}), "retry_after"),
            (json!({"errorRate": 0.1}), "errorRate"),
            (json!([]), "object"),
        ];
        for (body, field) in cases {
            let message = FaultConfig::parse(&body).unwrap_err().0;
            assert!(message.contains(field), "{message}");
        }
    }

    #[test]
    fn rates_zero_and_one_are_certain() {
        let never = FaultConfig::default();
        let always = FaultConfig {
            error_rate: 1.0,
            drop_rate: 1.0,
            download_cut_rate: 1.0,
            ..FaultConfig::default()
        };
        for _ in 0..200 {
            assert!(never.roll_error().is_none() && !never.roll_drop());
            assert!(always.roll_error().is_some() && always.roll_drop());
            assert!(always.roll_download_cut() && !never.roll_download_cut());
        }
    }

    #[test]
    fn a_seed_gives_the_same_rolls_every_time() {
        let rolls = || {
            let config = FaultConfig::parse(&json!({"error_rate": 0.5, "seed": 42})).unwrap();
            (0..64)
                .map(|_| config.roll_error().is_some())
                .collect::<Vec<bool>>()
        };
        let first = rolls();
        assert_eq!(first, rolls());
        assert!(first.contains(&true) && first.contains(&false));
    }

    #[test]
    fn injected_errors_are_both_kinds() {
        let always = FaultConfig {
            error_rate: 1.0,
            ..FaultConfig::default()
        };
        let kinds: Vec<_> = (0..200).filter_map(|_| always.roll_error()).collect();
        assert!(kinds.contains(&InjectedError::Internal));
        assert!(kinds.contains(&InjectedError::RateLimited));
    }
}
