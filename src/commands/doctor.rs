//! `fly doctor`: checks a set-up, one line per check: the base URL, where
//! the token comes from (never the token), a harmless API call, the clock
//! against the platform's, the state store.
//!
//! The check list goes to stdout: it is the result the command was asked
//! for, as `verify-sig` prints its verdict there, so it can be piped, grepped
//! or pasted into a bug report; the retry warnings and the final
//! `fly: error:` line stay on stderr. Doctor changes nothing: its API call
//! confirms no update, and the state file is opened only if it exists.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;

use crate::api::{ApiClient, ApiError, Probe, check_base_url};
use crate::cli::{DoctorArgs, UnixTime};
use crate::commands::credentials::configured_token;
use crate::commands::input::unix_time_now;
use crate::commands::print_line;
use crate::exit::{self, usage};
use crate::profiles::{Origin, group_can_change, readable_by_others};
use crate::retry::RetryPolicy;
use fly_state::{BotIdentity, PollState, RedisStore, Role, SqliteStore, StateLocation, Store};

/// Signed updates further than this from the receiver's clock are refused
/// (SPEC section 1, REPLAY_WINDOW_EXCEEDED).
const REPLAY_WINDOW_SECS: i64 = 300;
/// A skew past this is worth a warning: it is a clock that drifts, and one
/// that drifts on reaches the replay window.
const SKEW_WARNING_SECS: i64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Warn,
    Fail,
    /// Not checked: an earlier check failed.
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// The check list as it is printed, and the failures for the error line.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
}

impl Report {
    fn line(&mut self, status: Status, check: &str, detail: &str) -> anyhow::Result<()> {
        if status == Status::Fail {
            self.failures
                .push(format!("{check} check failed: {detail}"));
        }
        print_line(&format!("{:<5} {check:<9} {detail}", status.label()))
    }
}

pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let api = &args.api;
    let mut report = Report::default();
    if let Some(profile) = &args.origins.profile {
        let detail = format!("{} (from {})", profile.name, profile.path.display());
        match group_can_change(&profile.path) {
            Some(warning) => {
                report.line(Status::Warn, "profile", &format!("{detail}: {warning}"))?
            }
            None => report.line(Status::Ok, "profile", &detail)?,
        }
    }

    let base_url = match check_base_url(&api.base_url) {
        Ok(url) => {
            let detail = format!("{url} ({})", base_url_source(&args));
            report.line(Status::Ok, "base URL", &detail)?;
            url
        }
        Err(error) => {
            report.line(Status::Fail, "base URL", &format!("{error:#}"))?;
            return Err(error);
        }
    };

    let token = match configured_token(api) {
        Ok(Some(token)) => {
            let (status, detail) = token_source(&args);
            report.line(status, "token", &detail)?;
            token
        }
        Ok(None) => {
            let missing = "missing bot token: set FLY_BOT_TOKEN, or pass --token-file PATH";
            report.line(Status::Fail, "token", missing)?;
            return Err(usage(missing));
        }
        Err(error) => {
            report.line(Status::Fail, "token", &format!("{error:#}"))?;
            return Err(error);
        }
    };

    let client = ApiClient::new(&base_url, token.clone(), RetryPolicy::ONE_SHOT)?;
    let started = Instant::now();
    let probe = client.probe();
    let latency_ms = started.elapsed().as_millis();
    let (status, detail) = describe_probe(&probe, latency_ms);
    report.line(status, "API", &detail)?;

    let (status, detail) = match &probe {
        Ok(Probe {
            server_date: Some(server_date),
        }) => check_clock(*server_date, args.now),
        Ok(Probe { server_date: None }) => (
            Status::Warn,
            "not checked: the platform's answer had no Date header".to_string(),
        ),
        Err(_) => (
            Status::Skip,
            "not checked: needs an answer from the platform".to_string(),
        ),
    };
    report.line(status, "clock", &detail)?;

    let identity = BotIdentity::new(&base_url, token.expose());
    for (status, detail) in check_state(&identity, args.state.location()) {
        report.line(status, "state", &detail)?;
    }

    match report.failures.as_slice() {
        [] => Ok(exit::code(exit::SUCCESS)),
        [only] => Err(anyhow!("{only}")),
        [first, others @ ..] => Err(anyhow!(
            "{first} (and {} more failed {} above)",
            others.len(),
            if others.len() == 1 { "check" } else { "checks" }
        )),
    }
}

/// Where the base URL came from: the flag, the environment, a profile
/// or the default, as the command line decided it.
fn base_url_source(args: &DoctorArgs) -> String {
    args.origins
        .base_url
        .as_ref()
        .map_or_else(|| "the default".to_string(), ToString::to_string)
}

/// Where the token came from, never the token: a file (which others should
/// not be able to read), the environment, a profile, or the command line
/// (which other users see in the process list).
fn token_source(args: &DoctorArgs) -> (Status, String) {
    let origin = args.origins.token.as_ref();
    if let Some(path) = &args.api.token_file {
        let shown = path.display();
        let from = match origin {
            Some(origin @ Origin::Profile { .. }) => format!("{shown}, {origin}"),
            _ => format!("from --token-file {shown}"),
        };
        return if readable_by_others(path) {
            (
                Status::Warn,
                format!("{from}, which other users can read: chmod 600 it"),
            )
        } else {
            (Status::Ok, from)
        };
    }
    match origin {
        Some(Origin::Env(variable)) => (Status::Ok, format!("from {variable} (the environment)")),
        _ => (
            Status::Warn,
            "from --token, which other users can see in the process list: \
             prefer FLY_BOT_TOKEN or --token-file"
                .into(),
        ),
    }
}

fn describe_probe(probe: &Result<Probe, ApiError>, latency_ms: u128) -> (Status, String) {
    match probe {
        Ok(_) => (
            Status::Ok,
            format!(
                "the token is accepted (an updates call that confirms nothing, \
                 answered in {latency_ms} ms)"
            ),
        ),
        Err(error @ ApiError::TokenRefused { .. }) => {
            (Status::Fail, format!("{error}; {}", super::TOKEN_HINT))
        }
        Err(error @ ApiError::PlainHttp(_)) => (Status::Fail, error.to_string()),
        Err(error @ ApiError::Unavailable { .. }) => (
            Status::Fail,
            format!("the platform is unreachable: {error}"),
        ),
        // The token got past the check; polling is what is refused, e.g.
        // while a webhook is set (the emulator answers 409 then, as real
        // bot platforms do).
        Err(error @ ApiError::Rejected { status: 409, .. }) => (
            Status::Warn,
            format!(
                "the token is accepted, but polling is refused: {error}; \
                 poll-echo and forward get no updates while this lasts"
            ),
        ),
        Err(error) => (
            Status::Fail,
            format!("unexpected answer: {error}; is the base URL the Fly Bot API?"),
        ),
    }
}

/// This machine's clock against the platform's `Date`: a receiver refuses
/// signed updates more than the replay window away from its clock. The
/// local time is `--now`/`FLY_NOW_TS` when given (the clock `verify-sig` and
/// `sign` use), else the system clock.
fn check_clock(server_date: SystemTime, now: Option<UnixTime>) -> (Status, String) {
    let overridden = matches!(now, Some(UnixTime::At(_)));
    let local = unix_time_now(now);
    let server = server_date
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64);
    let skew = local - server;
    let whose = if overridden {
        "the given time (--now / FLY_NOW_TS) is"
    } else {
        "this machine's clock is"
    };
    let apart = match skew {
        0 => format!("{whose} in step with the platform's (its Date header)"),
        ahead if ahead > 0 => {
            format!("{whose} {ahead} s ahead of the platform's (its Date header)")
        }
        behind => format!(
            "{whose} {} s behind the platform's (its Date header)",
            -behind
        ),
    };
    let window = REPLAY_WINDOW_SECS;
    match skew.abs() {
        secs if secs > window => (
            Status::Fail,
            format!(
                "{apart}: past the {window} s replay window, every signed webhook is refused \
                 (REPLAY_WINDOW_EXCEEDED); set the clock right (NTP)"
            ),
        ),
        secs if secs > SKEW_WARNING_SECS => (
            Status::Warn,
            format!(
                "{apart}: near the {window} s replay window past which signed webhooks \
                 are refused; set the clock right (NTP)"
            ),
        ),
        _ => (
            Status::Ok,
            format!("{apart}; signed webhooks allow {window} s"),
        ),
    }
}

/// A Redis state store answers, and where its poll offset is.
fn check_redis_state(identity: &BotIdentity, url: &str) -> (Status, String) {
    match RedisStore::open(url, identity).and_then(|store| {
        let offset = store.next_offset()?;
        Ok((store.location(), offset))
    }) {
        Ok((shown, offset)) => (
            Status::Ok,
            format!("{shown} answers (poll offset {offset})"),
        ),
        Err(error) => (Status::Fail, format!("{error:#}")),
    }
}

/// Where the state store is and whether it opens: the one given, else the
/// bot's default files, a line for each that exists (the pollers' and
/// serve-webhook's: see `fly_state::Role`), one line when none does. A
/// store that does not exist yet is fine (the polling and webhook commands
/// create it) and is not created here.
fn check_state(identity: &BotIdentity, location: StateLocation) -> Vec<(Status, String)> {
    let explicit = match location {
        StateLocation::File(explicit) => explicit,
        StateLocation::Redis(url) => return vec![check_redis_state(identity, &url)],
    };
    if let Some(path) = explicit {
        return vec![check_state_file(identity, &path, None)];
    }
    let mut defaults = Vec::new();
    for role in Role::ALL {
        match identity.default_state_path(role) {
            Ok(path) => defaults.push((role, path)),
            Err(error) => return vec![(Status::Fail, format!("{error:#}"))],
        }
    }
    let existing: Vec<(Status, String)> = defaults
        .iter()
        .filter(|(_, path)| path.exists())
        .map(|(role, path)| check_state_file(identity, path, Some(*role)))
        .collect();
    if !existing.is_empty() {
        return existing;
    }
    let shown: Vec<String> = defaults
        .iter()
        .map(|(role, path)| format!("{} ({})", path.display(), role.commands()))
        .collect();
    vec![(
        Status::Ok,
        format!(
            "{}: not created yet (each is created by its commands)",
            shown.join(", ")
        ),
    )]
}

/// One state file: whether it opens (with its poll offset, for a file
/// pollers use). `role` names a default file's commands.
fn check_state_file(identity: &BotIdentity, path: &Path, role: Option<Role>) -> (Status, String) {
    let shown = match role {
        Some(role) => format!("{} ({})", path.display(), role.commands()),
        None => path.display().to_string(),
    };
    if !path.exists() {
        let directory = path.parent().filter(|dir| !dir.as_os_str().is_empty());
        if directory.is_some_and(|dir| !dir.is_dir()) {
            return (
                Status::Warn,
                format!("{shown}: not created yet, and its directory does not exist"),
            );
        }
        return (
            Status::Ok,
            format!("{shown}: not created yet (poll-echo, forward and serve-webhook create it)"),
        );
    }
    match SqliteStore::open(path, identity).and_then(|store| store.next_offset()) {
        Ok(_) if role == Some(Role::Webhook) => (Status::Ok, format!("{shown} opens")),
        Ok(offset) => (Status::Ok, format!("{shown} opens (poll offset {offset})")),
        Err(error) => (Status::Fail, format!("{error:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn clock_skew_is_fine_then_a_warning_then_a_failure() {
        let now = SystemTime::now();
        let status_at = |offset: i64| {
            let server = if offset >= 0 {
                now - Duration::from_secs(offset as u64)
            } else {
                now + Duration::from_secs(offset.unsigned_abs())
            };
            check_clock(server, None)
        };
        assert_eq!(status_at(0).0, Status::Ok);
        assert_eq!(status_at(30).0, Status::Ok);
        let (status, detail) = status_at(120);
        assert_eq!(status, Status::Warn);
        assert!(detail.contains("ahead"), "{detail}");
        let (status, detail) = status_at(-1000);
        assert_eq!(status, Status::Fail);
        assert!(detail.contains("behind"), "{detail}");
        assert!(detail.contains("REPLAY_WINDOW_EXCEEDED"), "{detail}");
        let (status, detail) = check_clock(now, Some(UnixTime::At(0)));
        assert_eq!(status, Status::Fail);
        assert!(detail.starts_with("the given time"), "{detail}");
    }

    #[test]
    fn a_refused_token_and_an_unreachable_platform_fail() {
        let refused = Err(ApiError::TokenRefused {
            status: 401,
            detail: String::new(),
        });
        assert_eq!(describe_probe(&refused, 1).0, Status::Fail);
        let polling_refused = Err(ApiError::Rejected {
            path: "/api/v1/s/bot/updates".into(),
            status: 409,
            detail: String::new(),
        });
        assert_eq!(describe_probe(&polling_refused, 1).0, Status::Warn);
        let not_found = Err(ApiError::Rejected {
            path: "/api/v1/s/bot/updates".into(),
            status: 404,
            detail: String::new(),
        });
        assert_eq!(describe_probe(&not_found, 1).0, Status::Fail);
    }
}
