//! `fly config list` and `fly config show`: the profiles of the config
//! file, and the settings a command would use with where each came from.
//! A token or a secret is never shown: only the file it is read from, or
//! the variable that holds it.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::{ConfigAction, ConfigArgs, ConfigListArgs, ConfigShowArgs};
use crate::commands::credentials::configured_token;
use crate::commands::print_line;
use crate::exit;
use crate::profiles::{self, Origin, Origins, readable_by_others};
use fly_state::{BotIdentity, Role, StateLocation};

pub fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        ConfigAction::List(args) => list(args),
        ConfigAction::Show(args) => show(args),
    }
}

fn list(args: ConfigListArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = args.config.or_else(profiles::default_path) else {
        tracing::info!("no config file: set HOME or XDG_CONFIG_HOME, or pass --config PATH");
        return Ok(exit::code(exit::SUCCESS));
    };
    if !path.exists() {
        // Nothing to list is not a failure: `fly config list | wc -l` says 0.
        tracing::info!(
            "no config file at {}: see `fly config --help` for its form",
            path.display()
        );
        return Ok(exit::code(exit::SUCCESS));
    }
    let file = profiles::load(&path)?;
    let in_use = args
        .origins
        .profile
        .as_ref()
        .map(|profile| profile.name.as_str());
    let width = file
        .profiles
        .iter()
        .map(|profile| profile.name.len())
        .max()
        .unwrap_or(0);
    for profile in &file.profiles {
        let mark = if Some(profile.name.as_str()) == in_use {
            '*'
        } else {
            ' '
        };
        let base_url = profile
            .get(profiles::Key::BaseUrl)
            .map_or(crate::cli::DEFAULT_BASE_URL, |setting| {
                setting.value.as_str()
            });
        print_line(&format!("{mark} {:<width$}  {base_url}", profile.name))?;
    }
    Ok(exit::code(exit::SUCCESS))
}

/// One line per setting: its name, the value as used (a credential's file or
/// variable instead of the credential), and where it came from.
fn show(args: ConfigShowArgs) -> anyhow::Result<ExitCode> {
    let origins = &args.origins;
    let mut lines: Vec<(&str, String, String)> = Vec::new();
    if let Some(profile) = &origins.profile {
        let mut from = format!("from {}", profile.path.display());
        if let Some(warning) = profiles::group_can_change(&profile.path) {
            from = format!("{from}; {warning}");
        }
        lines.push(("profile", profile.name.clone(), from));
    }
    lines.push((
        "base_url",
        args.api.base_url.clone(),
        origin_words(origins.base_url.as_ref()),
    ));
    lines.push(token_line(&args, origins));
    lines.push(secret_line(&args, origins));
    lines.extend(state_lines(&args, origins));
    lines.push((
        "bot_id",
        args.bot_id.clone(),
        origin_words(origins.bot_id.as_ref()),
    ));
    let width = lines
        .iter()
        .map(|(_, value, _)| value.len())
        .max()
        .unwrap_or(0);
    for (name, value, origin) in lines {
        print_line(&format!("{name:<9} {value:<width$}  {origin}"))?;
    }
    Ok(exit::code(exit::SUCCESS))
}

fn origin_words(origin: Option<&Origin>) -> String {
    origin.map_or_else(|| "not set".to_string(), ToString::to_string)
}

fn token_line(args: &ConfigShowArgs, origins: &Origins) -> (&'static str, String, String) {
    let value = match (&args.api.token_file, &origins.token) {
        (Some(path), _) => file_shown(path),
        (None, Some(_)) => "(set)".to_string(),
        (None, None) => "(none)".to_string(),
    };
    let origin = match &origins.token {
        Some(Origin::Flag(flag)) if flag == "--token" => {
            "from --token, which other users can see in the process list".to_string()
        }
        Some(origin) => origin.to_string(),
        None => "not set: set FLY_BOT_TOKEN, or token_file in a profile".to_string(),
    };
    ("token", value, origin)
}

fn secret_line(args: &ConfigShowArgs, origins: &Origins) -> (&'static str, String, String) {
    let value = match (args.secret.secret_files.as_slice(), &origins.secret) {
        ([first, ..], _) => file_shown(first),
        ([], Some(Origin::Default)) => "(the sha256 hex of the bot token)".to_string(),
        ([], _) => "(set)".to_string(),
    };
    ("secret", value, origin_words(origins.secret.as_ref()))
}

/// A credential file's path, with a warning when others can read it.
fn file_shown(path: &Path) -> String {
    if readable_by_others(path) {
        format!("{} (other users can read it: chmod 600 it)", path.display())
    } else {
        path.display().to_string()
    }
}

/// The state store as a command would open it. The default is a file per
/// role (the pollers', serve-webhook's), named from the base URL and the
/// token, so it is shown only when both are known.
fn state_lines(args: &ConfigShowArgs, origins: &Origins) -> Vec<(&'static str, String, String)> {
    let origin = origin_words(origins.state.as_ref());
    let given = args
        .state
        .given
        .clone()
        .unwrap_or(StateLocation::File(None));
    let shown = match given {
        StateLocation::File(Some(path)) => path.display().to_string(),
        StateLocation::Redis(url) => fly_state::without_userinfo(&url),
        StateLocation::File(None) => {
            let identity = crate::api::check_base_url(&args.api.base_url)
                .ok()
                .zip(configured_token(&args.api).ok().flatten())
                .map(|(base_url, token)| BotIdentity::new(&base_url, token.expose()));
            let Some(identity) = identity else {
                let unknown = "(the bot's own files, named once the token is known)";
                return vec![("state", unknown.to_string(), origin)];
            };
            return Role::ALL
                .into_iter()
                .filter_map(|role| {
                    let path = identity.default_state_path(role).ok()?;
                    Some((
                        "state",
                        path.display().to_string(),
                        format!("{origin} for {}", role.commands()),
                    ))
                })
                .collect();
        }
    };
    vec![("state", shown, origin)]
}
