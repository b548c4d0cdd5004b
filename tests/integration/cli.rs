//! The command line itself: help and its examples, usage errors and their
//! suggestions, completions, the man page, credentials typed as flags, and
//! what `-v` shows.

use std::path::Path;
use std::process::Command as StdCommand;
use std::time::Duration;

use clap::CommandFactory;

use crate::common::{Emulator, TOKEN, answering_in_turn, fly, fly_at, fly_path, stderr_of};

fn stdout_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `fly ARGS… --help` on stdout.
fn help(args: &[&str]) -> String {
    let output = fly().args(args).arg("--help").output().unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    stdout_of(&output)
}

/// Exit 2 and one `fly: error:` line; returns that line.
fn usage_error(output: &std::process::Output) -> String {
    let stderr = stderr_of(output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("fly: error: "), "{stderr}");
    stderr
}

/// Every subcommand's name, from the definition the binary is built from.
fn command_names() -> Vec<String> {
    fly::cli::Cli::command()
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .filter(|name| name != "help")
        .collect()
}

// ---------------------------------------------------------------------------
// Usage errors

#[test]
fn a_mistyped_command_is_exit_2_and_suggests_the_right_one() {
    let output = fly().arg("snd").output().unwrap();
    assert_eq!(
        usage_error(&output),
        "fly: error: unrecognized subcommand 'snd'; did you mean 'send'? (see 'fly --help')\n"
    );
}

#[test]
fn usage_errors_point_at_the_help_of_their_command() {
    let output = fly().args(["send", "--too", "u_1", "hi"]).output().unwrap();
    assert_eq!(
        usage_error(&output),
        "fly: error: unexpected argument '--too' found; did you mean '--to'? \
         (see 'fly send --help')\n"
    );
    let output = fly()
        .args(["--log-format", "json", "poll-echo", "--limit", "0"])
        .output()
        .unwrap();
    assert!(usage_error(&output).ends_with("(see 'fly poll-echo --help')\n"));
    let output = fly().args(["completions", "bsh"]).output().unwrap();
    let line = usage_error(&output);
    assert!(line.contains("did you mean 'bash'?"), "{line}");
    assert!(line.ends_with("(see 'fly completions --help')\n"), "{line}");
}

// ---------------------------------------------------------------------------
// Help

#[test]
fn every_command_help_has_examples_of_that_command() {
    for name in command_names() {
        let text = help(&[&name]);
        let (_, examples) = text
            .split_once("\nExamples:\n")
            .unwrap_or_else(|| panic!("fly {name} --help has no Examples section:\n{text}"));
        assert!(
            examples.contains(&format!("fly {name}")),
            "fly {name} --help: no example runs it:\n{examples}"
        );
    }
    assert!(help(&[]).contains("\nExamples:\n  "));
}

#[test]
fn commands_offer_only_the_options_they_use() {
    for name in [
        "verify-sig",
        "sign",
        "emulator",
        "demo",
        "completions",
        "man",
    ] {
        let text = help(&[name]);
        assert!(!text.contains("--base-url"), "fly {name}:\n{text}");
        assert!(!text.contains("Bot API:"), "fly {name}:\n{text}");
    }
    for name in ["verify-sig", "sign", "demo", "completions", "man"] {
        let text = help(&[name]);
        assert!(!text.contains("--token <"), "fly {name}:\n{text}");
    }
    // A flag a command does not offer is refused, not ignored.
    let output = fly()
        .args(["verify-sig", "--token", "t", "--base-url", "http://x"])
        .output()
        .unwrap();
    usage_error(&output);
    for name in [
        "send",
        "poll-echo",
        "serve-webhook",
        "fetch-media",
        "forward",
        "dead-letters",
    ] {
        let text = help(&[name]);
        let (_, api) = text
            .split_once("\nBot API:\n")
            .unwrap_or_else(|| panic!("fly {name}: no Bot API heading:\n{text}"));
        for option in ["--base-url <URL>", "--token <TOKEN>", "--token-file <PATH>"] {
            assert!(api.contains(option), "fly {name}: {option}:\n{text}");
        }
    }
    for name in command_names() {
        let text = help(&[&name]);
        let (options, global) = text
            .split_once("\nGlobal options:\n")
            .unwrap_or_else(|| panic!("fly {name}: no Global options heading:\n{text}"));
        for option in ["--log-format", "--verbose", "--quiet"] {
            assert!(global.contains(option), "fly {name}: {option}:\n{text}");
            assert!(!options.contains(option), "fly {name}: {option}:\n{text}");
        }
    }
}

#[test]
fn environment_variables_are_shown_and_secret_values_are_not() {
    let secret = "a-webhook-secret-value";
    let shown = |args: &[&str]| {
        let output = fly()
            .args(args)
            .arg("--help")
            .env("FLY_BOT_TOKEN", TOKEN)
            .env("FLY_WEBHOOK_SECRET", secret)
            .env("FLY_BASE_URL", "http://user:password@127.0.0.1:1")
            .output()
            .unwrap();
        let text = stdout_of(&output);
        for value in [TOKEN, secret, "password"] {
            assert!(!text.contains(value), "{args:?} shows {value}:\n{text}");
        }
        text
    };
    for (command, variables) in [
        ("verify-sig", &["FLY_WEBHOOK_SECRET", "FLY_NOW_TS"][..]),
        ("sign", &["FLY_WEBHOOK_SECRET", "FLY_NOW_TS"]),
        (
            "serve-webhook",
            &[
                "FLY_WEBHOOK_SECRET",
                "FLY_WEBHOOK_PORT",
                "FLY_WEBHOOK_PATH",
                "FLY_BASE_URL",
                "FLY_BOT_TOKEN",
            ],
        ),
        ("forward", &["FLY_WEBHOOK_SECRET", "FLY_BOT_TOKEN"]),
        ("send", &["FLY_BASE_URL", "FLY_BOT_TOKEN"]),
        ("emulator", &["FLY_BOT_TOKEN"]),
    ] {
        let text = shown(&[command]);
        for variable in variables {
            assert!(
                text.contains(&format!("[env: {variable}]")),
                "fly {command}: {variable}:\n{text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Completions and the man page

#[test]
fn bash_loads_the_completions() {
    let script = format!(
        "source <('{}' completions bash) && complete -p fly",
        fly_path().display()
    );
    let output = StdCommand::new("bash")
        .args(["--norc", "-c", &script])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let registered = stdout_of(&output);
    assert!(
        registered.starts_with("complete ") && registered.trim_end().ends_with(" fly"),
        "{registered}"
    );
}

#[test]
fn every_shell_gets_completions_naming_the_commands() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let output = fly().args(["completions", shell]).output().unwrap();
        assert!(output.status.success(), "{shell}: {}", stderr_of(&output));
        let script = stdout_of(&output);
        assert!(script.contains("verify-sig"), "{shell}");
        assert!(script.contains("--secret-file"), "{shell}");
    }
    usage_error(&fly().args(["completions", "tcsh"]).output().unwrap());
}

#[test]
fn man_prints_roff_pages_for_fly_and_each_command() {
    let output = fly().arg("man").output().unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let page = stdout_of(&output);
    assert!(page.starts_with(".TH fly 1 "), "{page}");
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH SUBCOMMANDS",
        ".SH EXAMPLES",
    ] {
        assert!(page.contains(section), "{section}:\n{page}");
    }
    assert!(page.contains("fly\\-send(1)"), "{page}");

    let output = fly().args(["man", "send"]).output().unwrap();
    let page = stdout_of(&output);
    assert!(page.starts_with(".TH fly-send 1 "), "{page}");
    // Examples as written: hyphens and quotes that still work when copied.
    assert!(
        page.contains("fly send \\-\\-to u_123 \"deploy finished\""),
        "{page}"
    );

    let line = usage_error(&fly().args(["man", "snd"]).output().unwrap());
    assert!(line.contains("send"), "{line}");
}

// ---------------------------------------------------------------------------
// Secrets

const UPDATE: &str = r#"{"update_id":7,"type":"message","message":{"chat":{"type":"private","id":"u_1"},"msgType":"text","data":{"content":"hi"}}}"#;
const NOW: &str = "1700000000";

#[test]
fn a_secret_file_signs_and_verifies_like_the_secret_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.secret");
    let wrong = dir.path().join("wrong.secret");
    std::fs::write(&good, "s3cret\n").unwrap();
    std::fs::write(&wrong, "not-it").unwrap();
    let sign = |secret_args: &[&str]| {
        let output = fly()
            .arg("sign")
            .args(secret_args)
            .args(["--now", NOW, "--nonce", "n1"])
            .write_stdin(UPDATE)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr_of(&output));
        output
    };
    let from_file = sign(&["--secret-file", good.to_str().unwrap()]);
    assert!(from_file.stderr.is_empty(), "{}", stderr_of(&from_file));
    assert_eq!(from_file.stdout, sign(&["--secret", "s3cret"]).stdout);

    let verify = |secret_file: &std::path::Path| {
        fly()
            .args(["verify-sig", "--now", NOW, "--secret-file"])
            .arg(secret_file)
            // A flag wins over the environment.
            .env("FLY_WEBHOOK_SECRET", "from-the-environment")
            .write_stdin(from_file.stdout.clone())
            .output()
            .unwrap()
    };
    let output = verify(&good);
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    assert_eq!(stdout_of(&output), "Verify OK\n");
    assert!(output.stderr.is_empty(), "{}", stderr_of(&output));
    let output = verify(&wrong);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr_of(&output), "Verify failed: SIGNATURE_MISMATCH\n");

    // Key rotation: files and flags together, any of them passes.
    let output = fly()
        .args(["verify-sig", "--now", NOW, "--secret-file"])
        .arg(&wrong)
        .arg("--secret-file")
        .arg(&good)
        .write_stdin(from_file.stdout.clone())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
}

/// A token file named by mistake is refused at once: a FIFO with no writer
/// would block forever, a device would be read until memory runs out.
#[test]
fn a_token_file_that_is_not_a_small_regular_file_is_exit_2_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("token.fifo");
    assert!(
        StdCommand::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let large = dir.path().join("large.token");
    std::fs::write(&large, vec![b'x'; 1024 * 1024]).unwrap();
    for (file, says) in [
        (Path::new("/dev/zero"), "is a device, not a regular file"),
        (fifo.as_path(), "is a FIFO (named pipe), not a regular file"),
        (dir.path(), "is a directory, not a regular file"),
        (large.as_path(), "is larger than 64 KiB"),
    ] {
        let output = fly()
            .args(["send", "--to", "u_1", "hi", "--token-file"])
            .arg(file)
            .env("FLY_BASE_URL", "http://127.0.0.1:9")
            .timeout(Duration::from_secs(10))
            .output()
            .unwrap();
        let stderr = usage_error(&output);
        assert!(stderr.contains("--token-file"), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}

#[test]
fn a_missing_or_empty_secret_file_is_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.secret");
    let empty = dir.path().join("empty.secret");
    std::fs::write(&empty, " \n").unwrap();
    let commands: [&[&str]; 4] = [
        &["verify-sig"],
        &["sign"],
        &["serve-webhook", "--bind", "127.0.0.1", "--port", "0"],
        &["forward", "--to", "http://127.0.0.1:9/webhook"],
    ];
    for command in commands {
        for (file, says) in [
            (&missing, "cannot read --secret-file"),
            (&empty, "is empty"),
        ] {
            let output = fly()
                .args(command)
                .arg("--secret-file")
                .arg(file)
                .env("FLY_BASE_URL", "http://127.0.0.1:9")
                .env("FLY_BOT_TOKEN", TOKEN)
                .write_stdin(UPDATE)
                .output()
                .unwrap();
            let line = usage_error(&output);
            assert!(
                line.contains(says) && line.contains(&file.display().to_string()),
                "{command:?}: {line}"
            );
        }
    }
}

#[test]
fn credentials_typed_on_the_command_line_are_warned_about() {
    let emulator = Emulator::start();
    let output = fly()
        .env("FLY_BASE_URL", &emulator.base_url)
        .args(["send", "--token", TOKEN, "--to", "u_1", "hi"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let stderr = stderr_of(&output);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for words in [
        "WARN",
        "--token",
        "process list",
        "FLY_BOT_TOKEN",
        "--token-file",
    ] {
        assert!(stderr.contains(words), "{words}: {stderr}");
    }
    assert!(!stderr.contains(TOKEN), "{stderr}");

    // From the environment: nothing to warn about.
    let output = fly_at(&emulator)
        .args(["send", "--to", "u_1", "hi"])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(output.stderr.is_empty(), "{}", stderr_of(&output));

    let output = fly()
        .args(["sign", "--secret", "s3cret", "--log-format", "json"])
        .write_stdin(UPDATE)
        .output()
        .unwrap();
    assert!(output.status.success());
    let stderr = stderr_of(&output);
    let warning: serde_json::Value = serde_json::from_str(stderr.trim()).unwrap();
    assert_eq!(warning["level"], "WARN");
    let message = warning["message"].as_str().unwrap();
    for words in ["--secret", "FLY_WEBHOOK_SECRET", "--secret-file"] {
        assert!(message.contains(words), "{words}: {message}");
    }
    assert!(!stderr.contains("s3cret"), "{stderr}");

    // -q: errors only.
    let output = fly()
        .args(["sign", "-q", "--secret", "s3cret"])
        .write_stdin(UPDATE)
        .output()
        .unwrap();
    assert!(output.stderr.is_empty(), "{}", stderr_of(&output));
}

// ---------------------------------------------------------------------------
// -v

#[test]
fn verbose_shows_requests_and_only_vvv_the_http_library() {
    let emulator = Emulator::start();
    let send = |verbosity: &[&str]| {
        let output = fly_at(&emulator)
            .arg("send")
            .args(verbosity)
            .args(["--to", "u_1", "hi"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr_of(&output));
        let stderr = stderr_of(&output);
        assert!(!stderr.contains(TOKEN), "{stderr}");
        stderr
    };
    let quiet = send(&[]);
    assert!(!quiet.contains("/api/v1/s/bot/send"), "{quiet}");

    let verbose = send(&["-v"]);
    let request = verbose
        .lines()
        .find(|line| line.contains("POST /api/v1/s/bot/send"))
        .unwrap_or_else(|| panic!("no request line:\n{verbose}"));
    assert!(request.contains("DEBUG"), "{request}");
    assert!(request.contains("status=200"), "{request}");
    assert!(request.contains(" ms="), "{request}");
    assert!(!verbose.contains("Call<"), "{verbose}");

    assert!(!send(&["-vv"]).contains("Call<"));
    let internals = send(&["-vvv"]);
    assert!(internals.contains("Call<"), "{internals}");
}

#[test]
fn verbose_shows_retry_decisions() {
    const UNAVAILABLE: &str =
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let body = r#"{"code":0,"data":{"message_id":"m_1"}}"#;
    let sent: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    const NOT_FOUND: &str =
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

    let (base_url, _) = answering_in_turn(&[UNAVAILABLE, sent]);
    let output = fly()
        .env("FLY_BASE_URL", &base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .args(["send", "-v", "--to", "u_1", "hi"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let stderr = stderr_of(&output);
    let steps: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("status=") || line.contains("retrying"))
        .collect();
    assert_eq!(steps.len(), 3, "{stderr}");
    assert!(steps[0].contains("status=503"), "{stderr}");
    assert!(
        steps[1].contains("WARN") && steps[1].contains("retrying in"),
        "{stderr}"
    );
    assert!(steps[2].contains("status=200"), "{stderr}");

    let (base_url, seen) = answering_in_turn(&[NOT_FOUND]);
    let output = fly()
        .env("FLY_BASE_URL", &base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .args(["send", "-v", "--to", "u_1", "hi"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("status=404"), "{stderr}");
    assert!(stderr.contains("not retried"), "{stderr}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// A 0 or huge value that would be accepted yet mean nothing is exit 2,
/// the flag and its range named; both `--window` flags share one range.
#[test]
fn numeric_flags_out_of_range_are_exit_2_naming_the_flag_and_range() {
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["serve-webhook", "--max-body"],
            "--max-body <BYTES>",
            "1024..=67108864",
        ),
        (
            &["serve-webhook", "--max-connections"],
            "--max-connections <N>",
            "1..=1048576",
        ),
        (
            &["serve-webhook", "--window"],
            "--window <SECS>",
            "1..=31536000",
        ),
        (
            &["verify-sig", "--window"],
            "--window <SECS>",
            "1..=31536000",
        ),
        (
            &[
                "fetch-media",
                "https://cdn.example/a.png",
                "--expire-seconds",
            ],
            "--expire-seconds <SECS>",
            "1..=604800",
        ),
    ];
    for (args, flag, range) in cases {
        for value in ["0", "99999999999"] {
            let output = fly().args(*args).arg(value).output().unwrap();
            let line = usage_error(&output);
            let expected =
                format!("invalid value '{value}' for '{flag}': {value} is not in {range}");
            assert!(line.contains(&expected), "{args:?} {value}: {line}");
        }
        // The bounds themselves are accepted.
        let (low, high) = range.split_once("..=").unwrap();
        for value in [low, high] {
            let mut words = vec!["fly"];
            words.extend(*args);
            words.push(value);
            assert!(fly::cli::Cli::parse_args_from(&words).is_ok(), "{words:?}");
        }
    }
    let output = fly()
        .args(["poll-echo", "--max-updates", "0"])
        .output()
        .unwrap();
    let line = usage_error(&output);
    assert!(
        line.contains(
            "invalid value '0' for '--max-updates <N>': expected a whole number, 1 or more"
        ),
        "{line}"
    );
}

/// An empty `--now` (an unset shell variable) is exit 2, not the clock; an
/// empty FLY_NOW_TS still means the clock, as in the platform's script.
#[test]
fn an_empty_now_is_exit_2_and_an_empty_fly_now_ts_the_clock() {
    for command in ["verify-sig", "sign", "doctor"] {
        for now in [&["--now", ""][..], &["--now="], &["--now", " "]] {
            let output = fly()
                .arg(command)
                .args(now)
                .env("FLY_WEBHOOK_SECRET", "s3cret")
                .write_stdin(r#"{"update_id":1,"type":"message","message":{}}"#)
                .output()
                .unwrap();
            let line = usage_error(&output);
            assert!(
                line.contains(
                    "for '--now <TS>': expected a Unix timestamp in seconds, got an empty value"
                ),
                "{command} {now:?}: {line}"
            );
        }
    }
    let output = fly()
        .arg("sign")
        .env("FLY_WEBHOOK_SECRET", "s3cret")
        .env("FLY_NOW_TS", "")
        .write_stdin(r#"{"update_id":1,"type":"message","message":{}}"#)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
}

/// `fly ARGS… >&-`: fd 1 closed before fly starts.
fn with_stdout_closed(args: &[&str], input: &Path) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut command = StdCommand::new(fly_path());
    command
        .env_clear()
        .env("FLY_WEBHOOK_SECRET", "s3cret")
        .env("FLY_BOT_TOKEN", TOKEN)
        // Nothing listens there: a command that got as far as a request
        // would fail with another message.
        .env("FLY_BASE_URL", "http://127.0.0.1:1")
        .args(args)
        .stdin(std::fs::File::open(input).unwrap());
    // SAFETY: close(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            libc::close(1);
            Ok(())
        });
    }
    command.output().unwrap()
}

/// Output to a closed stdout is exit 1 with one line, as to a full one
/// (/dev/full); a reader that went away (a broken pipe) stays a quiet end.
#[test]
fn a_closed_stdout_is_exit_1_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let update = dir.path().join("update.json");
    std::fs::write(&update, r#"{"update_id":1,"type":"message","message":{}}"#).unwrap();
    let signed = dir.path().join("signed.json");
    let output = fly()
        .args(["sign", "--now", "1700000000"])
        .env("FLY_WEBHOOK_SECRET", "s3cret")
        .write_stdin(std::fs::read(&update).unwrap())
        .output()
        .unwrap();
    std::fs::write(&signed, &output.stdout).unwrap();
    let cases: &[(&[&str], &Path)] = &[
        (&["sign"], &update),
        (&["completions", "bash"], &update),
        (&["man"], &update),
        (&["verify-sig", "--now", "1700000000"], &signed),
        (&["verify-sig", "--lines", "--now", "1700000000"], &signed),
        (&["--version"], &update),
        (
            &["fetch-media", "-o", "-", "https://cdn.example/a.png"],
            &update,
        ),
    ];
    for (args, input) in cases {
        let output = with_stdout_closed(args, input);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(
            stderr, "fly: error: writing to stdout: Bad file descriptor (os error 9)\n",
            "{args:?}"
        );
    }

    let mut child = StdCommand::new(fly_path())
        .env_clear()
        .env("FLY_WEBHOOK_SECRET", "s3cret")
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    assert_eq!(stderr_of(&output), "");
}

/// `fly --version` says which build it is: the version, the commit (or that
/// it was built outside git) and the build date, for every command too.
#[test]
fn version_names_the_commit_and_the_build_date() {
    let head = StdCommand::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string());
    for args in [&["--version"][..], &["send", "--version"]] {
        let output = fly().args(args).output().unwrap();
        assert!(output.status.success(), "{}", stderr_of(&output));
        let line = String::from_utf8(output.stdout).unwrap();
        let name = if args.len() == 1 { "fly" } else { "fly-send" };
        let rest = line
            .strip_prefix(&format!("{name} {} (", env!("CARGO_PKG_VERSION")))
            .unwrap_or_else(|| panic!("{line:?}"));
        let (build, date) = rest
            .trim_end()
            .trim_end_matches(')')
            .rsplit_once(' ')
            .unwrap();
        match &head {
            Some(commit) => assert_eq!(build, commit, "{line:?}"),
            None => assert_eq!(build, "built outside git,", "{line:?}"),
        }
        let parts: Vec<&str> = date.split('-').collect();
        assert!(
            parts.len() == 3
                && [4, 2, 2] == [parts[0].len(), parts[1].len(), parts[2].len()]
                && parts
                    .iter()
                    .all(|part| part.bytes().all(|b| b.is_ascii_digit())),
            "{line:?}"
        );
    }
}
