//! `fly verify-sig` and `fly sign`: exit codes and messages, and a
//! differential test against the platform's own Python verify script.

use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};

use serde_json::Value;

use crate::common::{TOKEN, fly, fly_path, stderr_of};

const SECRET: &str = "s3cret";
const NOW: i64 = 1_700_000_000;
const UPDATE: &str = r#"{"update_id":42,"type":"message","message":{"chat":{"type":"private","id":"u_1"},"msgType":"text","data":{"content":"héllo 😀","score":1e-5}}}"#;

/// `UPDATE` signed with `secret` at `NOW` by `fly sign`.
fn signed(secret: &str) -> String {
    let output = fly()
        .args([
            "sign",
            "--secret",
            secret,
            "--now",
            &NOW.to_string(),
            "--nonce",
            "n1",
            "--bot-id",
            "bot_1",
        ])
        .write_stdin(UPDATE)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    String::from_utf8(output.stdout).unwrap()
}

fn verify(input: &str, args: &[&str]) -> std::process::Output {
    fly()
        .arg("verify-sig")
        .args(args)
        .write_stdin(input.to_string())
        .output()
        .unwrap()
}

/// `verify` with the secret in FLY_WEBHOOK_SECRET, for checks of everything
/// on stderr (a `--secret` flag adds a warning there).
fn verify_with_secret(input: &str, secret: &str, args: &[&str]) -> std::process::Output {
    fly()
        .arg("verify-sig")
        .args(args)
        .env("FLY_WEBHOOK_SECRET", secret)
        .write_stdin(input.to_string())
        .output()
        .unwrap()
}

fn now_arg(now: i64) -> String {
    format!("--now={now}")
}

#[test]
fn a_signed_update_verifies() {
    let output = verify_with_secret(&signed(SECRET), SECRET, &[&now_arg(NOW + 300)]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "Verify OK\n");
    assert!(output.stderr.is_empty());
}

#[test]
fn a_wrong_secret_is_a_mismatch() {
    let output = verify_with_secret(&signed(SECRET), "other", &[&now_arg(NOW)]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr_of(&output), "Verify failed: SIGNATURE_MISMATCH\n");
    assert!(output.stdout.is_empty());
}

#[test]
fn a_stale_timestamp_is_a_replay_even_with_a_wrong_secret() {
    let output = verify_with_secret(&signed(SECRET), "other", &[&now_arg(NOW + 301)]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr_of(&output),
        "Verify failed: REPLAY_WINDOW_EXCEEDED\n"
    );
    let early = verify_with_secret(&signed(SECRET), SECRET, &[&now_arg(NOW - 301)]);
    assert_eq!(stderr_of(&early), "Verify failed: REPLAY_WINDOW_EXCEEDED\n");
}

#[test]
fn window_and_ignore_timestamp() {
    let late = now_arg(NOW + 1000);
    let output = verify(
        &signed(SECRET),
        &["--secret", SECRET, &late, "--window", "1000"],
    );
    assert_eq!(output.status.code(), Some(0));
    let output = verify(
        &signed(SECRET),
        &[
            "--secret",
            SECRET,
            &now_arg(NOW + 10_000_000),
            "--ignore-timestamp",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
}

#[test]
fn now_comes_from_fly_now_ts() {
    let output = fly()
        .arg("verify-sig")
        .env("FLY_WEBHOOK_SECRET", SECRET)
        .env("FLY_NOW_TS", (NOW + 5000).to_string())
        .write_stdin(signed(SECRET))
        .output()
        .unwrap();
    assert_eq!(
        stderr_of(&output),
        "Verify failed: REPLAY_WINDOW_EXCEEDED\n"
    );
    // Read as the reference reads it: spaces are fine, empty means the clock.
    for (value, code) in [(" 1700000100 ", 0), ("", 1), ("soon", 2)] {
        let output = fly()
            .arg("verify-sig")
            .env("FLY_WEBHOOK_SECRET", SECRET)
            .env("FLY_NOW_TS", value)
            .write_stdin(signed(SECRET))
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(code),
            "{value:?}: {}",
            stderr_of(&output)
        );
    }
}

#[test]
fn any_of_several_secrets_passes() {
    let input = signed("new");
    let output = verify(
        &input,
        &["--secret", "old", "--secret", "new", &now_arg(NOW)],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
}

#[test]
fn secret_from_the_environment_is_stripped_like_the_reference() {
    let output = fly()
        .args(["verify-sig", &now_arg(NOW)])
        .env("FLY_WEBHOOK_SECRET", format!("  {SECRET}\n"))
        .write_stdin(signed(SECRET))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
}

#[test]
fn secret_derived_from_the_token_and_never_shown() {
    let token_secret = fly_sha256_hex(TOKEN);
    let input = signed(&token_secret);
    let output = fly()
        .args(["verify-sig", "--explain", &now_arg(NOW)])
        .env("FLY_BOT_TOKEN", TOKEN)
        .write_stdin(input.clone())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let everything = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr_of(&output)
    );
    assert!(
        !everything.contains(TOKEN),
        "the token leaked:\n{everything}"
    );
    assert!(
        !everything.contains(&token_secret),
        "the derived secret leaked:\n{everything}"
    );
    assert!(everything.contains("sha256 of the bot token"));

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{TOKEN}\n")).unwrap();
    let output = fly()
        .args(["verify-sig", "--explain", "--token-file"])
        .arg(file.path())
        .arg(now_arg(NOW))
        .write_stdin(input.replace("\"n1\"", "\"n2\""))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let everything = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr_of(&output)
    );
    assert!(
        !everything.contains(TOKEN) && !everything.contains(&token_secret),
        "{everything}"
    );
}

/// sha256 hex through `fly` itself is not exposed, so compute it with the same
/// crate the binary uses.
fn fly_sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[test]
fn missing_secret_is_a_usage_error() {
    let output = verify(&signed(SECRET), &[&now_arg(NOW)]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = stderr_of(&output);
    assert!(stderr.starts_with("fly: error: missing secret"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
}

#[test]
fn malformed_json_is_a_usage_error_with_python_position() {
    let output = verify_with_secret("{\"update_id\": 1,}", SECRET, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr_of(&output),
        "fly: error: invalid signed update: malformed JSON: Expecting property name enclosed in double quotes: line 1 column 17 (char 16)\n"
    );
}

#[test]
fn a_lone_surrogate_in_the_payload_is_an_input_error_not_a_verdict() {
    let output = verify_with_secret(
        r#"{"message":{"text":"\ud800"},"timestamp":1700000000}"#,
        SECRET,
        &[&now_arg(NOW)],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("lone surrogate \\ud800"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
}

#[test]
fn input_python_cannot_handle_is_an_input_error() {
    for input in [
        "[]",
        r#"{"bot":"b"}"#,
        r#"{"update_id":"4.5"}"#,
        r#"{"timestamp":NaN}"#,
    ] {
        let output = verify(input, &["--secret", SECRET, &now_arg(NOW)]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{input}: {}",
            stderr_of(&output)
        );
    }
}

#[test]
fn explain_shows_every_step() {
    let output = verify(
        &signed(SECRET),
        &[
            "--explain",
            "--secret",
            "wrong",
            "--secret",
            SECRET,
            &now_arg(NOW + 7),
        ],
    );
    assert_eq!(output.status.code(), Some(0));
    let stderr = stderr_of(&output);
    for expected in [
        "payload = update.message",
        r#"{"chat":{"id":"u_1","type":"private"},"data":{"content":"héllo 😀","score":1e-05},"msgType":"text"}"#,
        "sha256(canonical payload) = ",
        "update_id       42⏎",
        "type            message⏎",
        "bot.id          bot_1⏎",
        "timestamp       1700000000⏎",
        "nonce           n1⏎",
        r#"as a string literal: "42\nmessage\nbot_1\n1700000000\nn1\n"#,
        "✗ differs [secret from --secret #1, 5 bytes]",
        "✓ matches [secret from --secret #2, 6 bytes]",
        "now 1700000007 - timestamp 1700000000 = +7 s: within the 300 s replay window",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains(SECRET), "the secret leaked:\n{stderr}");
}

#[test]
fn lines_gives_one_verdict_per_line() {
    let good = signed(SECRET);
    let input = format!(
        "{}\n{}\n\n{}\nnot json\n{}",
        good.trim(),
        good.trim().replace("\"n1\"", "\"n2\""),
        good.trim().replace("1700000000", "1600000000"),
        good.trim()
    );
    let output = verify(&input, &["--lines", "--secret", SECRET, &now_arg(NOW)]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], r#"{"line":1,"ok":true}"#);
    assert_eq!(
        lines[1],
        r#"{"line":2,"ok":false,"error":"SIGNATURE_MISMATCH"}"#
    );
    assert_eq!(
        lines[2],
        r#"{"line":4,"ok":false,"error":"REPLAY_WINDOW_EXCEEDED"}"#
    );
    assert!(lines[3].starts_with(r#"{"line":5,"ok":false,"error":"INVALID_INPUT","detail":"malformed JSON: Expecting value"#), "{}", lines[3]);
    assert_eq!(lines[4], r#"{"line":6,"ok":true}"#);
    assert_eq!(lines.len(), 5);
    for line in lines {
        serde_json::from_str::<Value>(line).expect("each verdict is JSON");
    }
    let all_good = verify(
        &format!("{good}{good}"),
        &["--lines", "--secret", SECRET, &now_arg(NOW)],
    );
    assert_eq!(all_good.status.code(), Some(0));
}

#[test]
fn lines_keeps_input_order_and_numbers_across_batches() {
    let good = signed(SECRET);
    let bad = good.replace("\"n1\"", "\"n2\"");
    let mut input = String::new();
    let mut expected = Vec::new();
    for number in 1..=3000 {
        match number % 7 {
            0 => input.push('\n'),
            3 => {
                input.push_str(&bad);
                expected.push(format!(
                    r#"{{"line":{number},"ok":false,"error":"SIGNATURE_MISMATCH"}}"#
                ));
            }
            _ => {
                input.push_str(&good);
                expected.push(format!(r#"{{"line":{number},"ok":true}}"#));
            }
        }
    }
    let output = verify(&input, &["--lines", "--secret", SECRET, &now_arg(NOW)]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected);
}

/// The reader cuts the input into chunks of lines: a line longer than a
/// chunk, lines that are not UTF-8, blank lines and a last line without a
/// newline keep their verdicts and numbers.
#[test]
fn lines_verdicts_survive_long_lines_and_bytes_that_are_not_utf8() {
    let sign = |update: &str| {
        let output = fly()
            .args(["sign", "--secret", SECRET, "--now", &NOW.to_string()])
            .args(["--nonce", "n1", "--bot-id", "bot_1"])
            .write_stdin(update.to_string())
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr_of(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    let good = signed(SECRET);
    // Over a megabyte on one line, escapes and all, signed as one update.
    let long = sign(&UPDATE.replace("héllo 😀", &"a\\u00e9 b\\\"".repeat(100_000)));
    assert!(long.len() > 1_000_000);
    let mut input: Vec<u8> = Vec::new();
    for (index, line) in [&good, &long, "\n", &good].into_iter().enumerate() {
        input.extend_from_slice(line.as_bytes());
        if index == 1 {
            input.extend_from_slice(b"{\"update_id\": \"\xff\"}\n");
        }
    }
    input.extend_from_slice(long.trim_end().as_bytes());
    let output = fly()
        .args(["verify-sig", "--lines", "--secret", SECRET, &now_arg(NOW)])
        .write_stdin(input)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            r#"{"line":1,"ok":true}"#,
            r#"{"line":2,"ok":true}"#,
            r#"{"line":3,"ok":false,"error":"INVALID_INPUT","detail":"the line is not valid UTF-8"}"#,
            r#"{"line":5,"ok":true}"#,
            r#"{"line":6,"ok":true}"#,
        ]
    );
}

#[test]
fn sign_replaces_signed_fields_in_place_and_keeps_lexemes() {
    let input = r#"{"update_id": 1, "nonce": "old", "message": {"n": 1E2, "big": 18446744073709551617}, "nonce": "older"}"#;
    let output = fly()
        .args([
            "sign", "--secret", SECRET, "--now", "5", "--nonce", "fresh", "--bot-id", "b",
        ])
        .write_stdin(input)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.starts_with(r#"{"update_id":1,"nonce":"fresh","message":{"n":1E2,"big":18446744073709551617},"bot":{"id":"b"},"timestamp":5,"signature":""#),
        "{stdout}"
    );
    let random_nonce = fly()
        .args(["sign", "--secret", SECRET])
        .write_stdin(UPDATE)
        .output()
        .unwrap();
    let signed: Value = serde_json::from_slice(&random_nonce.stdout).unwrap();
    assert_eq!(signed["nonce"].as_str().map(str::len), Some(32));
}

#[test]
fn sign_refuses_what_it_cannot_sign() {
    let output = fly()
        .args(["sign", "--secret", SECRET])
        .write_stdin("[1]")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = fly()
        .args(["sign", "--secret", "a", "--secret", "b"])
        .write_stdin(UPDATE)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

// ---------------------------------------------------------------------------
// Differential test against the platform's Python.

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The reference script, and a python3 to run it, or why the test is skipped.
fn python_and_reference() -> Result<PathBuf, String> {
    let reference = repo_root().join("../shared/reference/verify_webhook_signature_v1.py");
    if !reference.exists() {
        return Err(format!("{} not found", reference.display()));
    }
    match StdCommand::new("python3").arg("--version").output() {
        Ok(output) if output.status.success() => Ok(reference),
        _ => Err("python3 not found".into()),
    }
}

#[derive(Debug)]
struct Case {
    text: String,
    verdict: String,
    about: String,
}

fn generate_cases(reference: &Path, seed: u64, count: usize) -> Vec<Case> {
    let output = StdCommand::new("python3")
        .arg(repo_root().join("scripts/signature_differential.py"))
        .args(["--reference".as_ref(), reference.as_os_str()])
        .args(["--seed", &seed.to_string(), "--count", &count.to_string()])
        .args(["--secret", SECRET, "--now", &NOW.to_string()])
        .output()
        .expect("run the case generator");
    assert!(
        output.status.success(),
        "generator failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let case: Value = serde_json::from_str(line).unwrap();
            Case {
                text: case["text"].as_str().unwrap().to_string(),
                verdict: case["verdict"].as_str().unwrap().to_string(),
                about: case["about"].as_str().unwrap().to_string(),
            }
        })
        .collect()
}

/// What `fly` says when Python's result would need Unicode tables it does
/// not carry (`str(["é"])` keeps printable non-ASCII characters): a refusal
/// with exit 2, never a verdict. The one accepted difference.
const CANNOT_REPRODUCE: &str = "cannot reproduce";
const REFUSED: &str = "REFUSED (cannot reproduce)";

/// `fly verify-sig` on one document, as a verdict name.
fn fly_verdict(text: &str) -> String {
    let output = verify_with_secret(text, SECRET, &[&now_arg(NOW)]);
    match output.status.code() {
        Some(0) => "OK".into(),
        Some(1) => stderr_of(&output)
            .trim()
            .trim_start_matches("Verify failed: ")
            .to_string(),
        Some(2) if stderr_of(&output).contains(CANNOT_REPRODUCE) => REFUSED.into(),
        Some(2) => "INVALID_INPUT".into(),
        other => format!("exit {other:?}: {}", stderr_of(&output)),
    }
}

#[test]
#[ignore = "needs ../shared/reference and python3 (bash .ci/run)"]
fn fly_agrees_with_the_reference_script_on_random_signed_updates() {
    let reference =
        python_and_reference().unwrap_or_else(|why| panic!("{why} (run this test in CI)"));
    let cases = generate_cases(&reference, 20_240_603, 500);
    let fly_verdicts = fly_verdicts_of(&cases);

    let mut disagreements = Vec::new();
    let mut refused = 0;
    let mut seen = std::collections::BTreeMap::new();
    for (case, fly) in cases.iter().zip(&fly_verdicts) {
        let fly = fly.as_deref().unwrap_or("no verdict");
        *seen.entry(case.verdict.as_str()).or_insert(0) += 1;
        if fly == REFUSED {
            refused += 1;
        } else if fly != case.verdict {
            disagreements.push(format!(
                "python {} / fly {fly} ({}): {}",
                case.verdict, case.about, case.text
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} disagreements:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    assert!(
        refused * 50 < cases.len(),
        "fly refused {refused} of {} cases",
        cases.len()
    );
    eprintln!(
        "{} cases agree ({seen:?}); fly refused {refused} it cannot reproduce",
        cases.len() - refused
    );
    for verdict in [
        "OK",
        "SIGNATURE_MISMATCH",
        "REPLAY_WINDOW_EXCEEDED",
        "INVALID_INPUT",
    ] {
        assert!(
            seen.get(verdict).copied().unwrap_or(0) >= 10,
            "too few {verdict} cases: {seen:?}"
        );
    }

    // The generator runs the script's main() in-process; confirm on a sample
    // that the script as a real process says the same.
    for case in cases.iter().step_by(cases.len() / 20) {
        assert_eq!(
            reference_process_verdict(&reference, &case.text),
            case.verdict,
            "{}",
            case.text
        );
    }
}

/// fly's verdict on each case (`REFUSED` where it cannot reproduce the
/// platform's reading).
fn fly_verdicts_of(cases: &[Case]) -> Vec<Option<String>> {
    let mut fly_verdicts: Vec<Option<String>> = vec![None; cases.len()];
    // Single-line documents go through one `--lines` run, the pretty-printed
    // ones (and an empty one: `--lines` skips blank lines) one process each.
    let one_line = |text: &str| !text.contains('\n') && !text.trim().is_empty();
    let single: Vec<usize> = (0..cases.len())
        .filter(|&i| one_line(&cases[i].text))
        .collect();
    let ndjson: String = single
        .iter()
        .map(|&i| format!("{}\n", cases[i].text))
        .collect();
    let output = verify(&ndjson, &["--lines", "--secret", SECRET, &now_arg(NOW)]);
    let verdict_lines = String::from_utf8(output.stdout).unwrap();
    for line in verdict_lines.lines() {
        let verdict: Value = serde_json::from_str(line).unwrap();
        let index = single[verdict["line"].as_u64().unwrap() as usize - 1];
        let detail = verdict["detail"].as_str().unwrap_or_default();
        fly_verdicts[index] = Some(match verdict["error"].as_str() {
            None => "OK".into(),
            Some(_) if detail.contains(CANNOT_REPRODUCE) => REFUSED.into(),
            Some(error) => error.to_string(),
        });
    }
    for (index, case) in cases.iter().enumerate() {
        if !one_line(&case.text) {
            fly_verdicts[index] = Some(fly_verdict(&case.text));
        }
    }
    fly_verdicts
}

fn reference_process_verdict(reference: &Path, text: &str) -> String {
    let mut child = StdCommand::new("python3")
        .arg(reference)
        .env("FLY_WEBHOOK_SECRET", SECRET)
        .env("FLY_NOW_TS", NOW.to_string())
        .env("PYTHONIOENCODING", "utf-8")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    match last.strip_prefix("Verify failed: ") {
        _ if output.status.success() => "OK".into(),
        Some(code) => code.to_string(),
        None => "INVALID_INPUT".into(),
    }
}

#[test]
#[ignore = "needs ../shared/reference and python3 (bash .ci/run)"]
fn fly_sign_output_verifies_with_the_reference_script() {
    let reference =
        python_and_reference().unwrap_or_else(|why| panic!("{why} (run this test in CI)"));
    let tricky = r#"{"update_id":"7","type":"message","message":{"f":[1e-5,1E16,-0.0,NaN,1e400,0.1],"i":-0,"big":123456789012345678901234567890,"s":"\u0000\ud83d\ude00é\n","dup":1,"dup":2},"other":"\udc00"}"#;
    for update in [UPDATE, tricky] {
        let output = fly()
            .args([
                "sign",
                "--secret",
                SECRET,
                "--now",
                &NOW.to_string(),
                "--bot-id",
                "99",
            ])
            .write_stdin(update)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr_of(&output));
        let signed = String::from_utf8(output.stdout).unwrap();
        assert_eq!(
            reference_process_verdict(&reference, &signed),
            "OK",
            "{signed}"
        );
        assert_eq!(fly_verdict(&signed), "OK", "{signed}");
    }
}

/// Output that cannot be written (a full disk: /dev/full) is exit 1 with one
/// line, never a panic; the verdict is still in the exit code when only
/// stderr is lost.
#[test]
fn a_full_stdout_or_stderr_is_exit_1_not_a_panic() {
    let full = || {
        std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("signed.json");
    std::fs::write(&input, signed(SECRET)).unwrap();
    let verify_sig = |extra: &[&str]| {
        let mut command = StdCommand::new(fly_path());
        command
            .env_clear()
            .env("FLY_WEBHOOK_SECRET", SECRET)
            .arg("verify-sig")
            .args(extra)
            .arg(&input);
        command
    };
    let output = verify_sig(&[&now_arg(NOW)])
        .stdout(full())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(
        stderr.starts_with("fly: error: writing to stdout"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    for (now, code) in [(now_arg(NOW), 0), (now_arg(1), 1)] {
        let status = verify_sig(&["--explain", &now])
            .stdout(Stdio::null())
            .stderr(full())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(code), "{now}");
    }
}
