//! Profiles: a config file with `[profiles.NAME]` tables stands in for
//! flags; flag > environment > profile > default; `fly config list|show`;
//! every mistake in the file is exit 2 naming the file and line.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use assert_cmd::Command;

use crate::common::{Emulator, RefusedPort, TOKEN, fly, stderr_of};

/// A config directory (`XDG_CONFIG_HOME`) holding `fly/config.toml` with
/// `text`, private as it should be, and a private token file beside it.
struct ConfigHome {
    dir: tempfile::TempDir,
}

impl ConfigHome {
    fn with(text: &str) -> ConfigHome {
        let dir = tempfile::tempdir().unwrap();
        let home = ConfigHome { dir };
        std::fs::create_dir_all(home.fly_dir()).unwrap();
        home.write("config.toml", text);
        home.write("bot.token", &format!("{TOKEN}\n"));
        home.write("webhook.secret", "profile-secret\n");
        home
    }

    fn fly_dir(&self) -> PathBuf {
        self.dir.path().join("fly")
    }

    fn path(&self) -> PathBuf {
        self.fly_dir().join("config.toml")
    }

    fn write(&self, name: &str, text: &str) {
        let path = self.fly_dir().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// `fly` reading this config home (HOME too, so no default state
    /// lands in the developer's), with nothing else set.
    fn fly(&self) -> Command {
        let mut command = fly();
        command
            .env("XDG_CONFIG_HOME", self.dir.path())
            .env("HOME", self.dir.path());
        command
    }
}

fn run(command: &mut Command) -> (Option<i32>, String, String) {
    let output = command.output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr_of(&output),
    )
}

/// The line of `fly config show` for `name`.
fn shown<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} line in:\n{report}"))
}

fn dev_profile(emulator: &Emulator) -> String {
    format!(
        "# the local emulator\n[profiles.dev]\nbase_url = \"{}\"\ntoken_file = \"bot.token\"\n\n\
         [profiles.other]\nbase_url = \"http://127.0.0.1:9\"\n",
        emulator.base_url
    )
}

#[test]
fn a_profile_gives_a_command_its_base_url_and_token() {
    let emulator = Emulator::start_strict();
    let config = ConfigHome::with(&dev_profile(&emulator));
    let (code, _, stderr) =
        run(config
            .fly()
            .args(["--profile", "dev", "send", "--to", "u_1", "from a profile"]));
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = run(config.fly().env("FLY_PROFILE", "dev").args([
        "send",
        "--to",
        "u_2",
        "from FLY_PROFILE",
    ]));
    assert_eq!(code, Some(0), "{stderr}");
    let sent = emulator.sent_text();
    assert!(
        sent.contains("from a profile") && sent.contains("from FLY_PROFILE"),
        "{sent}"
    );
    assert!(!stderr.contains(TOKEN));
}

#[test]
fn flag_beats_environment_beats_profile_beats_default() {
    let refused = RefusedPort::new();
    let config = ConfigHome::with(
        "[profiles.p]\nbase_url = \"http://127.0.0.1:1\"\nstate = \"p.db\"\nbot_id = \"bot_p\"\n",
    );
    let show = |extra: &[&str], env: &[(&str, &str)]| {
        let mut command = config.fly();
        command.args(["config", "show", "p"]).args(extra);
        for (name, value) in env {
            command.env(name, value);
        }
        let (code, report, stderr) = run(&mut command);
        assert_eq!(code, Some(0), "{stderr}");
        report
    };
    let profile_line =
        |line: usize| format!("from profile p, {} line {line}", config.path().display());

    let report = show(&[], &[]);
    assert!(
        shown(&report, "base_url").contains(&profile_line(2)),
        "{report}"
    );
    let state = config.fly_dir().join("p.db");
    assert!(
        shown(&report, "state").contains(&state.display().to_string()),
        "{report}"
    );
    assert!(
        shown(&report, "bot_id").contains(&profile_line(4)),
        "{report}"
    );
    assert!(shown(&report, "secret").contains("the default"), "{report}");

    let report = show(
        &[],
        &[("FLY_BASE_URL", &refused.url()), ("FLY_STATE", "env.db")],
    );
    assert!(
        shown(&report, "base_url").contains("from FLY_BASE_URL"),
        "{report}"
    );
    assert!(
        shown(&report, "base_url").contains(&refused.url()),
        "{report}"
    );
    assert!(
        shown(&report, "state").ends_with("from FLY_STATE"),
        "{report}"
    );

    let report = show(
        &["--base-url", "http://127.0.0.1:2", "--bot-id", "bot_flag"],
        &[("FLY_BASE_URL", &refused.url())],
    );
    assert!(
        shown(&report, "base_url").contains("http://127.0.0.1:2"),
        "{report}"
    );
    assert!(
        shown(&report, "base_url").contains("from --base-url"),
        "{report}"
    );
    assert!(shown(&report, "bot_id").contains("bot_flag"), "{report}");

    // Without the profile: the built-in defaults.
    let (code, report, stderr) = run(config.fly().args(["config", "show"]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        shown(&report, "base_url").ends_with("the default"),
        "{report}"
    );
    assert!(!report.contains("profile "), "{report}");
}

#[test]
fn the_environment_token_sets_the_profiles_token_file_aside() {
    let emulator = Emulator::start_strict();
    let config = ConfigHome::with(&format!(
        "[profiles.dev]\nbase_url = \"{}\"\ntoken_file = \"missing.token\"\n",
        emulator.base_url
    ));
    // The profile's token file is not there, but FLY_BOT_TOKEN wins over it,
    // so it is never looked at.
    let (code, _, stderr) = run(config.fly().env("FLY_BOT_TOKEN", TOKEN).args([
        "--profile",
        "dev",
        "send",
        "--to",
        "u_1",
        "env token",
    ]));
    assert_eq!(code, Some(0), "{stderr}");
    // Without it, the missing file is the profile's line to fix.
    let (code, _, stderr) =
        run(config
            .fly()
            .args(["--profile", "dev", "send", "--to", "u_1", "x"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "config file {} line 3: token_file",
            config.path().display()
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn the_default_profile_is_used_when_none_is_named() {
    let emulator = Emulator::start_strict();
    let config = ConfigHome::with(&format!(
        "[profiles.default]\nbase_url = \"{}\"\ntoken_file = \"bot.token\"\n",
        emulator.base_url
    ));
    let (code, _, stderr) = run(config.fly().args(["send", "--to", "u_1", "by default"]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(emulator.sent_text().contains("by default"));
}

#[test]
fn a_profiles_secret_file_and_bot_id_sign_and_its_state_path_is_beside_the_file() {
    let emulator = Emulator::start_strict();
    let config = ConfigHome::with(&format!(
        "[profiles.p]\nbase_url = \"{}\"\ntoken_file = \"bot.token\"\nsecret_file = \"webhook.secret\"\n\
         bot_id = \"bot_from_profile\"\nstate = \"p.db\"\n",
        emulator.base_url
    ));
    let update = r#"{"update_id":7,"type":"message","message":{"chat":{"type":"private","id":"u_1"},"msgType":"text","data":{"content":"hi"}}}"#;
    let output = config
        .fly()
        .args(["--profile", "p", "sign", "--now", "1700000000"])
        .write_stdin(update)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let signed = String::from_utf8(output.stdout).unwrap();
    assert!(signed.contains("\"bot_from_profile\""), "{signed}");
    let verified = fly()
        .args([
            "verify-sig",
            "--secret",
            "profile-secret",
            "--now",
            "1700000000",
        ])
        .write_stdin(signed)
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", stderr_of(&verified));

    emulator.user_says("private", "u_1", "hello");
    let elsewhere = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(config.fly().current_dir(elsewhere.path()).args([
        "--profile",
        "p",
        "poll-echo",
        "--once",
    ]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(config.fly_dir().join("p.db").is_file(), "{stderr}");
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}

#[test]
fn config_list_marks_the_profile_in_use_and_show_never_prints_credentials() {
    let emulator = Emulator::start_strict();
    let config = ConfigHome::with(&dev_profile(&emulator));
    let (code, list, stderr) = run(config.fly().args(["--profile", "dev", "config", "list"]));
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(
        lines[0].starts_with("* dev") && lines[0].ends_with(&emulator.base_url),
        "{list}"
    );
    assert!(lines[1].starts_with("  other"), "{list}");

    let (code, report, stderr) = run(config
        .fly()
        .env("FLY_WEBHOOK_SECRET", "env-secret-value")
        .args(["config", "show", "dev"]));
    assert_eq!(code, Some(0), "{stderr}");
    let token = shown(&report, "token");
    assert!(
        token.contains(&config.fly_dir().join("bot.token").display().to_string()),
        "{report}"
    );
    assert!(token.contains("line 4"), "{report}");
    assert!(
        shown(&report, "secret").contains("from FLY_WEBHOOK_SECRET"),
        "{report}"
    );
    for secret in [TOKEN, "env-secret-value", "profile-secret"] {
        assert!(
            !report.contains(secret) && !stderr.contains(secret),
            "{report}{stderr}"
        );
    }
    // A token file others can read is said so.
    std::fs::set_permissions(
        config.fly_dir().join("bot.token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (_, report, _) = run(config.fly().args(["config", "show", "dev"]));
    assert!(shown(&report, "token").contains("chmod 600"), "{report}");

    // No config file: nothing listed, said on stderr, exit 0.
    let empty = tempfile::tempdir().unwrap();
    let (code, list, stderr) = run(fly()
        .env("XDG_CONFIG_HOME", empty.path())
        .args(["config", "list"]));
    assert_eq!((code, list.as_str()), (Some(0), ""), "{stderr}");
    assert!(stderr.contains("no config file at"), "{stderr}");
}

#[test]
fn doctor_names_the_source_that_wins() {
    let emulator = Emulator::start_strict();
    let config = ConfigHome::with(&dev_profile(&emulator));
    let (code, report, stderr) = run(config.fly().args(["--profile", "dev", "doctor"]));
    assert_eq!(code, Some(0), "{report}{stderr}");
    let line = |name: &str| {
        report
            .lines()
            .find(|line| line.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} in {report}"))
            .to_string()
    };
    assert!(line("profile").contains("dev"), "{report}");
    assert!(line("base").contains("from profile dev"), "{report}");
    assert!(line("token").contains("from profile dev"), "{report}");

    // The flag wins over the environment even when both hold the same token.
    let (code, report, stderr) = run(config
        .fly()
        .env("FLY_BOT_TOKEN", TOKEN)
        .env("FLY_BASE_URL", &emulator.base_url)
        .args(["doctor", "--token", TOKEN]));
    assert_eq!(code, Some(0), "{report}{stderr}");
    let token = report
        .lines()
        .find(|line| line.contains(" token "))
        .unwrap();
    assert!(
        token.starts_with("warn") && token.contains("from --token,"),
        "{report}"
    );
    assert!(!report.contains(TOKEN));
}

/// Each mistake: exit 2, one line naming the file (and the line).
#[test]
fn mistakes_in_the_config_file_are_exit_2_naming_the_file_and_line() {
    let cases: [(&str, &[&str], &str); 6] = [
        (
            "[profiles.dev]\nbase_url = \"http://127.0.0.1:1\"\n",
            &["--profile", "prod", "doctor"],
            "no profile prod in the config file",
        ),
        (
            "[profiles.dev]\nbase_url = \"http://127.0.0.1:1\"\ntoken = \"abc\"\n",
            &["doctor"],
            "line 3: unknown field `token`",
        ),
        (
            "[profiles.dev]\n\nbase_url = \"ftp://example\"\n",
            &["doctor"],
            "line 3: base_url of profile dev is not usable",
        ),
        (
            "[profiles.dev]\nbot_id = 7\n",
            &["config", "list"],
            "line 2: invalid type",
        ),
        (
            "[profiles.dev]\nbot_id = \"a\"\n[profiles.dev]\n",
            &["config", "list"],
            "line 3",
        ),
        (
            "[profiles.dev]\nsecret_file = \"absent\"\n",
            &["--profile", "dev", "sign"],
            "line 2: secret_file",
        ),
    ];
    for (text, args, expected) in cases {
        let config = ConfigHome::with(text);
        let (code, stdout, stderr) = run(config.fly().args(args));
        assert_eq!(code, Some(2), "{text:?}: {stdout}{stderr}");
        assert!(
            stderr.contains(&config.path().display().to_string()),
            "{text:?}: {stderr}"
        );
        assert!(stderr.contains(expected), "{text:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{text:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // A file given with --config must be there.
    let (code, _, stderr) =
        run(fly().args(["--config", "/nonexistent/fly.toml", "config", "list"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot read the config file /nonexistent/fly.toml"),
        "{stderr}"
    );
}

#[test]
fn a_config_file_others_can_change_is_refused_and_a_group_writable_one_warned_of() {
    let config = ConfigHome::with("[profiles.dev]\nbase_url = \"http://127.0.0.1:1\"\n");
    std::fs::set_permissions(config.path(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, _, stderr) = run(config.fly().args(["config", "list"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("can be changed by any user (mode 0666)"),
        "{stderr}"
    );
    assert!(stderr.contains("chmod go-w"), "{stderr}");
    // Group-writable (umask 002, a group per user): used, with a warning
    // where the set-up is looked at.
    std::fs::set_permissions(config.path(), std::fs::Permissions::from_mode(0o664)).unwrap();
    let (code, report, stderr) = run(config.fly().args(["config", "show", "dev"]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(shown(&report, "profile").contains("chmod g-w"), "{report}");
    // Readable by others is fine: it holds paths, not secrets.
    std::fs::set_permissions(config.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, report, stderr) = run(config.fly().args(["config", "show", "dev"]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!report.contains("chmod"), "{report}");
}

/// A profile holding every key is used by commands that have only some of
/// the options (sign has no --base-url, verify-sig no --state): each takes
/// what it has and ignores the rest.
#[test]
fn commands_take_the_keys_they_have_and_ignore_the_rest() {
    let config = ConfigHome::with(
        "[profiles.default]\nbase_url = \"http://127.0.0.1:9\"\ntoken_file = \"bot.token\"\n\
         secret_file = \"webhook.secret\"\nstate = \"p.db\"\nbot_id = \"bot_all\"\n",
    );
    let update = r#"{"update_id":1,"type":"message","message":{"chat":{"type":"private","id":"u_1"},"msgType":"text","data":{"content":"hi"}}}"#;
    let output = config
        .fly()
        .args(["sign", "--now", "1700000000"])
        .write_stdin(update)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let output = config
        .fly()
        .args(["verify-sig", "--now", "1700000000"])
        .write_stdin(output.stdout)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    for args in [&["man"][..], &["completions", "bash"], &["config", "list"]] {
        let (code, _, stderr) = run(config.fly().args(args));
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    }
    // The emulator's own commands take the profile's base URL.
    let (code, _, stderr) = run(config.fly().args(["emulator", "sent"]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("127.0.0.1:9"), "{stderr}");
}
