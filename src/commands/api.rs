//! `fly api PATH`: any Bot API call, as `gh api` makes GitHub's: an
//! authenticated POST through the one client (its retries, budget and
//! errors), the answer's JSON on stdout.

use std::process::ExitCode;

use serde_json::Value;

use crate::api::types::BOT_API_PREFIX;
use crate::cli::ApiCallArgs;
use crate::commands::input::read_input;
use crate::commands::print_line;
use crate::commands::wiring::one_shot_client;
use crate::exit::{self, usage, usage_because};

pub fn run(args: ApiCallArgs) -> anyhow::Result<ExitCode> {
    let path = bot_api_path(&args.path)?;
    let body = request_body(args.data.as_deref())?;
    let client = one_shot_client(&args.api)?;
    // One line whatever the terminal: the same output for a script and a
    // person, and `| jq` pretty-prints it.
    print_line(&client.call_path(&path, &body)?)?;
    Ok(exit::code(exit::SUCCESS))
}

/// The bot API path PATH names: `send`, `/send` and `/api/v1/s/bot/send` are
/// one path. Only a path under the bot API's prefix is sent the token: a URL
/// or a path that climbs out of the prefix is refused.
fn bot_api_path(given: &str) -> anyhow::Result<String> {
    let prefix = BOT_API_PREFIX.trim_start_matches('/');
    let trimmed = given.trim();
    if trimmed.contains("://") || trimmed.starts_with("//") {
        return Err(usage(format!(
            "PATH {given:?} is a URL: give the path under {BOT_API_PREFIX} (e.g. send); \
             the server is --base-url"
        )));
    }
    let relative = trimmed.trim_start_matches('/');
    let rest = if relative.starts_with("api/") {
        relative.strip_prefix(prefix).ok_or_else(|| {
            usage(format!(
                "PATH {given:?} is outside the Bot API: it must be under {BOT_API_PREFIX}"
            ))
        })?
    } else {
        relative
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(usage(
            "PATH is empty: name a Bot API call, e.g. send or updates",
        ));
    }
    if let Some(bad) = rest
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.~/".contains(*c)))
    {
        return Err(usage(format!(
            "PATH {given:?} contains {bad:?}: a Bot API path has letters, digits, - _ . ~ and /"
        )));
    }
    if rest
        .split('/')
        .any(|segment| matches!(segment, "" | "." | ".."))
    {
        return Err(usage(format!(
            "PATH {given:?} is not a plain path under {BOT_API_PREFIX} (an empty, . or .. part)"
        )));
    }
    Ok(format!("{BOT_API_PREFIX}{rest}"))
}

/// The request body: `--data` as given, or stdin for `-`, or `{}`; a JSON
/// object, sent as written.
fn request_body(data: Option<&str>) -> anyhow::Result<String> {
    let (text, what) = match data {
        None => return Ok("{}".to_string()),
        Some("-") => (read_input("-")?, "the body on stdin (--data -)"),
        Some(text) => (text.to_string(), "--data"),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(_)) => Ok(text.trim().to_string()),
        Ok(_) => Err(usage(format!(
            "{what} must be a JSON object, e.g. '{{\"limit\":1}}'"
        ))),
        Err(error) => Err(usage_because(format!("{what} is not valid JSON"), error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{ExitOutcome, classify};

    #[test]
    fn paths_name_a_call_under_the_prefix() {
        for (given, path) in [
            ("send", "/api/v1/s/bot/send"),
            ("/send", "/api/v1/s/bot/send"),
            ("updates/", "/api/v1/s/bot/updates"),
            ("files/batch_access", "/api/v1/s/bot/files/batch_access"),
            ("/api/v1/s/bot/send", "/api/v1/s/bot/send"),
            (
                "api/v1/s/bot/files/batch_access",
                "/api/v1/s/bot/files/batch_access",
            ),
            ("getMe", "/api/v1/s/bot/getMe"),
        ] {
            assert_eq!(bot_api_path(given).unwrap(), path, "{given}");
        }
    }

    #[test]
    fn urls_and_escapes_are_usage_errors() {
        for bad in [
            "https://evil.example/api/v1/s/bot/send",
            "http://127.0.0.1:1/x",
            "//evil.example/x",
            "../../_emulator/sent",
            "send/../../x",
            "/api/v1/other",
            "/api/v1/s/bot/",
            "/api/v1/s/botx/send",
            "",
            "/",
            "send?x=1",
            "send#x",
            "%2e%2e/x",
            "a//b",
            "send me",
            "./send",
        ] {
            let error = bot_api_path(bad).unwrap_err();
            assert_eq!(classify(&error), ExitOutcome::Report(2), "{bad}");
            assert!(!error.to_string().contains('\n'), "{error}");
        }
    }

    #[test]
    fn bodies_are_json_objects() {
        assert_eq!(request_body(None).unwrap(), "{}");
        assert_eq!(
            request_body(Some(" {\"limit\": 1}\n")).unwrap(),
            "{\"limit\": 1}"
        );
        for bad in ["{nope", "[1]", "1", "", "{\"a\":1} x"] {
            let error = request_body(Some(bad)).unwrap_err();
            assert_eq!(classify(&error), ExitOutcome::Report(2), "{bad}");
        }
    }
}
