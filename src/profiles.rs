//! Profiles: several bots (or the emulator beside the platform) from one
//! config file. A `[profiles.NAME]` table holds settings that stand in for
//! flags; a setting given by flag or environment variable wins over the
//! profile, which wins over the built-in default (the command line applies
//! them, `cli::Cli::parse_args`). This module reads and checks the file and
//! says where a value came from; it knows no flag parser.
//!
//! ```toml
//! [profiles.dev]
//! base_url = "http://127.0.0.1:8787"
//! token_file = "dev.token"          # relative to this file's directory
//!
//! [profiles.prod]
//! token_file = "~/.secrets/fly.token"
//! secret_file = "~/.secrets/fly.secret"
//! state = "redis://10.0.0.5:6379/0"
//! bot_id = "bot_123"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// The profile used when none is named (`--profile`, `FLY_PROFILE`).
pub const DEFAULT_PROFILE: &str = "default";

/// A config file is a few lines; anything much larger was named by mistake.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// A setting a profile may hold, in the order they are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    BaseUrl,
    TokenFile,
    SecretFile,
    State,
    BotId,
}

impl Key {
    pub const ALL: [Key; 5] = [
        Key::BaseUrl,
        Key::TokenFile,
        Key::SecretFile,
        Key::State,
        Key::BotId,
    ];

    /// The key as written in the file.
    pub fn name(self) -> &'static str {
        match self {
            Key::BaseUrl => "base_url",
            Key::TokenFile => "token_file",
            Key::SecretFile => "secret_file",
            Key::State => "state",
            Key::BotId => "bot_id",
        }
    }
}

/// One `key = "value"` of a profile, as it will be used (paths resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: Key,
    pub value: String,
    /// Its line in the file, 1-based.
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    /// The file it was read from.
    pub path: PathBuf,
    /// In [`Key::ALL`] order; a key the table does not set is absent.
    pub settings: Vec<Setting>,
}

impl Profile {
    pub fn get(&self, key: Key) -> Option<&Setting> {
        self.settings.iter().find(|setting| setting.key == key)
    }

    /// Where `setting` of this profile came from.
    pub fn origin_of(&self, setting: &Setting) -> Origin {
        Origin::Profile {
            name: self.name.clone(),
            path: self.path.clone(),
            line: setting.line,
        }
    }
}

/// A config file, read and checked.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// By name.
    pub profiles: Vec<Profile>,
}

impl ConfigFile {
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.iter().find(|profile| profile.name == name)
    }
}

/// Why the config file (or a profile named) cannot be used: bad input,
/// exit 2. The message names the file, and the line where there is one.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Where a value a command uses came from, for `fly config show` and
/// `fly doctor` (never the value itself when it is a credential).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Typed on the command line (the flag, and its value when it is a path).
    Flag(String),
    /// An environment variable.
    Env(&'static str),
    Profile {
        name: String,
        path: PathBuf,
        line: usize,
    },
    /// Nothing set it.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "from {flag}"),
            Origin::Env(variable) => write!(f, "from {variable}"),
            Origin::Profile { name, path, line } => {
                write!(f, "from profile {name}, {} line {line}", path.display())
            }
            Origin::Default => f.write_str("the default"),
        }
    }
}

/// Where each setting of a command came from (`None`: the command has no
/// such option, or nothing set it and it has no default), and the profile
/// in use.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    pub profile: Option<Profile>,
    pub base_url: Option<Origin>,
    pub token: Option<Origin>,
    pub secret: Option<Origin>,
    pub state: Option<Origin>,
    pub bot_id: Option<Origin>,
}

/// Where the config file is looked for when `--config` is not given:
/// `$XDG_CONFIG_HOME/fly/config.toml`, else `~/.config/fly/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    let non_empty = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    let base = match non_empty("XDG_CONFIG_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(non_empty("HOME")?).join(".config"),
    };
    Some(base.join("fly").join("config.toml"))
}

/// The profile to use: the one named (`--profile`, `FLY_PROFILE`), which
/// must exist, else `default` if the file has it, else none. `config` is
/// the file given (`--config`), which must exist, else the default path,
/// which may be absent.
pub fn select(config: Option<&Path>, named: Option<&str>) -> Result<Option<Profile>, ConfigError> {
    let file = match config {
        Some(path) => Some(load(path)?),
        None => match default_path() {
            Some(path) if path.exists() => Some(load(&path)?),
            _ => None,
        },
    };
    match (file, named) {
        (Some(file), Some(name)) => match file.profile(name) {
            Some(profile) => Ok(Some(profile.clone())),
            None => Err(no_such_profile(&file, name)),
        },
        (None, Some(name)) => Err(ConfigError(format!(
            "profile {name} is named, but there is no config file{}: create it with a \
             [profiles.{name}] table, or pass --config PATH",
            default_path()
                .map(|path| format!(" at {}", path.display()))
                .unwrap_or_default()
        ))),
        (Some(file), None) => Ok(file.profile(DEFAULT_PROFILE).cloned()),
        (None, None) => Ok(None),
    }
}

fn no_such_profile(file: &ConfigFile, name: &str) -> ConfigError {
    let known: Vec<&str> = file.profiles.iter().map(|p| p.name.as_str()).collect();
    let has = if known.is_empty() {
        "it has none".to_string()
    } else {
        format!("it has {}", known.join(", "))
    };
    ConfigError(format!(
        "no profile {name} in the config file {} ({has})",
        file.path.display()
    ))
}

/// Reads and checks the whole file: every profile, so a mistake is found
/// the first time the file is used, not the day that profile is.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    // Absolute, so the file's directory (where its relative paths start) is
    // the same from any working directory; symlinks are kept, as written.
    let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let shown = path.display();
    let text = read_config(path)?;
    let shape: FileShape = toml::from_str(&text).map_err(|error| {
        let at = error
            .span()
            .map(|span| format!(" line {}", line_of(&text, span.start)))
            .unwrap_or_default();
        ConfigError(format!(
            "config file {shown}{at}: {}",
            error.message().trim_end()
        ))
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut profiles = Vec::new();
    for (name, table) in shape.profiles {
        let raw = [
            (Key::BaseUrl, table.base_url),
            (Key::TokenFile, table.token_file),
            (Key::SecretFile, table.secret_file),
            (Key::State, table.state),
            (Key::BotId, table.bot_id),
        ];
        let mut settings = Vec::new();
        for (key, value) in raw {
            let Some(value) = value else { continue };
            let line = line_of(&text, value.span().start);
            let value = checked_value(key, value.into_inner(), dir).map_err(|why| {
                ConfigError(format!(
                    "config file {shown} line {line}: {} of profile {name} {why}",
                    key.name()
                ))
            })?;
            settings.push(Setting { key, value, line });
        }
        profiles.push(Profile {
            name,
            path: path.to_path_buf(),
            settings,
        });
    }
    Ok(ConfigFile {
        path: path.to_path_buf(),
        profiles,
    })
}

/// The file's text, if it is a file others cannot change: it decides
/// where the token is read from and which server it is sent to.
fn read_config(path: &Path) -> Result<String, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let cannot = |error: std::io::Error| {
        ConfigError(format!("cannot read the config file {shown}: {error}"))
    };
    let metadata = std::fs::metadata(path).map_err(cannot)?;
    if !metadata.is_file() {
        return Err(ConfigError(format!(
            "the config file {shown} is not a regular file"
        )));
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o002 != 0 {
        return Err(ConfigError(format!(
            "the config file {shown} can be changed by any user (mode {mode:04o}): \
             it says where the token is sent; chmod go-w {shown}"
        )));
    }
    if metadata.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError(format!(
            "the config file {shown} is larger than {} KiB: is it the right file?",
            MAX_CONFIG_BYTES / 1024
        )));
    }
    let bytes = std::fs::read(path).map_err(cannot)?;
    String::from_utf8(bytes)
        .map_err(|_| ConfigError(format!("the config file {shown} is not UTF-8 text")))
}

/// What `fly doctor` and `fly config show` say of a config file its group
/// can change (a world-writable one is refused when read). Group-writable
/// is common where each user has a group of their own (umask 002), so it is
/// a warning rather than a refusal.
pub fn group_can_change(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o020 != 0).then(|| {
        format!(
            "its group can change it (mode {mode:04o}), and it says where the token is sent: \
             chmod g-w {}",
            path.display()
        )
    })
}

/// Whether users other than the owner can read `path` (a token file):
/// `fly doctor` and `fly config show` warn of it.
pub fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|found| found.permissions().mode() & 0o077 != 0)
}

/// The value as commands will take it, or why it cannot be one. Paths are
/// taken relative to the config file's directory (`~/` is the home
/// directory), so a profile means the same from any working directory.
fn checked_value(key: Key, value: String, dir: &Path) -> Result<String, String> {
    let value = value.trim().to_string();
    if value.is_empty() {
        return Err("is empty".into());
    }
    match key {
        Key::BaseUrl => {
            crate::api::check_base_url(&value).map_err(|error| format!("is not usable: {error:#}"))
        }
        Key::TokenFile | Key::SecretFile => Ok(resolve_path(&value, dir)),
        Key::State if is_server_url(&value) => Ok(value),
        Key::State => Ok(resolve_path(&value, dir)),
        Key::BotId if value.chars().any(char::is_control) => {
            Err("contains a control character".into())
        }
        Key::BotId => Ok(value),
    }
}

fn is_server_url(value: &str) -> bool {
    matches!(
        fly_state::StateLocation::given(PathBuf::from(value)),
        fly_state::StateLocation::Redis(_)
    )
}

fn resolve_path(value: &str, dir: &Path) -> String {
    let home = std::env::var_os("HOME").filter(|home| !home.is_empty());
    let path = match (value.strip_prefix("~/"), home) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => dir.join(value),
    };
    path.to_string_lossy().into_owned()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The file as written: only `[profiles.NAME]` tables, only known keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(default)]
    profiles: BTreeMap<String, ProfileShape>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileShape {
    base_url: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    state: Option<Spanned<String>>,
    bot_id: Option<Spanned<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn written(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (dir, path)
    }

    fn error_of(text: &str) -> String {
        let (_dir, path) = written(text);
        load(&path).unwrap_err().to_string()
    }

    #[test]
    fn profiles_are_read_with_their_lines_and_paths_resolved() {
        let (dir, path) = written(
            "# bots\n[profiles.dev]\nbase_url = \"http://127.0.0.1:8787/\"\n\
             token_file = \"dev.token\"\n\n[profiles.prod]\nstate = \"redis://h:6379/1\"\n\
             bot_id = \"bot_9\"\n",
        );
        let file = load(&path).unwrap();
        let names: Vec<&str> = file.profiles.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["dev", "prod"]);
        let dev = file.profile("dev").unwrap();
        assert_eq!(
            dev.get(Key::BaseUrl),
            Some(&Setting {
                key: Key::BaseUrl,
                value: "http://127.0.0.1:8787".into(),
                line: 3
            })
        );
        let token = dev.get(Key::TokenFile).unwrap();
        assert_eq!(token.value, dir.path().join("dev.token").to_string_lossy());
        assert_eq!(token.line, 4);
        let prod = file.profile("prod").unwrap();
        assert_eq!(prod.get(Key::State).unwrap().value, "redis://h:6379/1");
        assert_eq!(prod.get(Key::BotId).unwrap().line, 8);
        assert!(prod.get(Key::BaseUrl).is_none());
    }

    #[test]
    fn mistakes_name_the_file_and_line() {
        let cases = [
            (
                "[profiles.dev]\nbase_url = \"x\"\ntokn = \"a\"\n",
                "line 3",
                "tokn",
            ),
            ("[profiles.dev]\nbot_id = 42\n", "line 2", "string"),
            (
                "[profiles.dev]\n\nbase_url = \"ftp://h\"\n",
                "line 3",
                "base_url",
            ),
            (
                "[profiles.dev]\nstate = \"  \"\n",
                "line 2",
                "state of profile dev is empty",
            ),
            ("[profile.dev]\nstate = \"x\"\n", "line 1", "profile"),
            ("[profiles.dev\n", "line 1", ""),
        ];
        for (text, line, word) in cases {
            let error = error_of(text);
            assert!(error.starts_with("config file "), "{error}");
            assert!(error.contains(line), "{text:?}: {error}");
            assert!(error.contains(word), "{text:?}: {error}");
        }
    }

    #[test]
    fn a_file_others_can_change_is_refused() {
        let (_dir, path) = written("[profiles.dev]\n");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let error = load(&path).unwrap_err().to_string();
        assert!(
            error.contains("can be changed by any user (mode 0666)"),
            "{error}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(load(&path).is_ok());
        assert!(group_can_change(&path).unwrap().contains("chmod g-w"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(group_can_change(&path), None);
    }

    #[test]
    fn a_named_profile_must_exist() {
        let (_dir, path) = written("[profiles.dev]\n[profiles.default]\nbot_id = \"b\"\n");
        let error = select(Some(&path), Some("prd")).unwrap_err().to_string();
        assert!(error.contains("no profile prd"), "{error}");
        assert!(error.contains("it has default, dev"), "{error}");
        assert_eq!(
            select(Some(&path), Some("dev")).unwrap().unwrap().name,
            "dev"
        );
        assert_eq!(select(Some(&path), None).unwrap().unwrap().name, "default");
        let missing = path.with_file_name("absent.toml");
        let error = select(Some(&missing), None).unwrap_err().to_string();
        assert!(error.contains("cannot read the config file"), "{error}");
    }

    #[test]
    fn origins_read_as_words() {
        let origin = Origin::Profile {
            name: "dev".into(),
            path: PathBuf::from("/c/config.toml"),
            line: 3,
        };
        assert_eq!(
            origin.to_string(),
            "from profile dev, /c/config.toml line 3"
        );
        assert_eq!(Origin::Env("FLY_BASE_URL").to_string(), "from FLY_BASE_URL");
        assert_eq!(Origin::Flag("--state".into()).to_string(), "from --state");
        assert_eq!(Origin::Default.to_string(), "the default");
    }
}
