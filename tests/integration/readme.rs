//! The README is a promise: every ```console block in it runs here, verbatim,
//! in a scratch directory holding a copy of `fixtures/`, with the `fly` under
//! test first on PATH, and each command's output (stdout and stderr) must be
//! what the README shows below it.
//!
//! Expected output may use `...` alone on a line for any number of lines and
//! `[..]` inside a line for any text (the conventions of trycmd/snapbox).
//! Commands of a block share one shell, so `export` carries over; the
//! block runs in a process group of its own, killed when it ends, so its
//! background jobs do not outlive it.

use std::os::unix::process::CommandExt;
use std::path::Path;

/// One `$ command` of a console block and the lines the README shows for it.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

fn console_blocks(readme: &str) -> Vec<(usize, Vec<Step>)> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines().enumerate();
    while let Some((number, line)) = lines.next() {
        if line.trim() != "```console" {
            continue;
        }
        let mut steps: Vec<Step> = Vec::new();
        let mut continued = false;
        for (_, line) in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            if let Some(command) = line.strip_prefix("$ ") {
                steps.push(Step {
                    command: command.to_string(),
                    expected: Vec::new(),
                });
                continued = command.ends_with('\\');
            } else if continued && let Some(step) = steps.last_mut() {
                step.command.push('\n');
                step.command.push_str(line);
                continued = line.ends_with('\\');
            } else if let Some(step) = steps.last_mut() {
                step.expected.push(line.to_string());
            }
        }
        blocks.push((number + 1, steps));
    }
    blocks
}

const MARKER: &str = "@@fly-readme-step@@";

/// The block as one shell script printing a marker before each command.
fn script(steps: &[Step]) -> String {
    let mut script = String::from("status=0\n");
    for step in steps {
        // `(exit $status)` hands the previous command's status on to `$?`
        // past the marker; the newline before `}` ends any comment on the
        // command's last line.
        script.push_str(&format!(
            "printf '\\n%s\\n' '{MARKER}'\n(exit $status)\n{{ {}\n}} 2>&1\nstatus=$?\n",
            step.command
        ));
    }
    script
}

fn line_matches(expected: &str, actual: &str) -> bool {
    let mut parts = expected.split("[..]");
    let Some(first) = parts.next() else {
        return true;
    };
    let Some(mut rest) = actual.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (index, part) in parts.iter().enumerate() {
        if index == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

fn lines_match(expected: &[String], actual: &[&str]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first == "..." => {
            (0..=actual.len()).any(|skip| lines_match(rest, &actual[skip..]))
        }
        Some((first, rest)) => actual
            .split_first()
            .is_some_and(|(line, others)| line_matches(first, line) && lines_match(rest, others)),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn every_console_example_in_the_readme_runs_as_shown() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = console_blocks(&readme);
    assert!(
        blocks.len() >= 5,
        "found only {} console blocks",
        blocks.len()
    );
    let fly_dir = crate::common::fly_path().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        fly_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut failures = Vec::new();
    for (line, steps) in &blocks {
        let scratch = tempfile::tempdir().unwrap();
        copy_dir(&root.join("fixtures"), &scratch.path().join("fixtures"));
        // Its own process group, killed afterwards: background jobs of the
        // block (`fly emulator … &`) must not outlive it.
        let mut shell = std::process::Command::new("sh");
        shell
            .arg("-c")
            .arg(script(steps))
            .current_dir(scratch.path())
            .env_clear()
            .env("PATH", &path)
            .env("HOME", scratch.path())
            .env("LANG", "C.UTF-8")
            .process_group(0);
        let child = shell
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let group = libc::pid_t::try_from(child.id()).unwrap();
        let output = child.wait_with_output().unwrap();
        // SAFETY: kill(2) on a process group; no memory is involved. ESRCH
        // (the block left nothing running) is fine.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let sections: Vec<&str> = text.split(MARKER).skip(1).collect();
        for (index, step) in steps.iter().enumerate() {
            let actual: Vec<&str> = sections
                .get(index)
                .copied()
                .unwrap_or("<not run>")
                .trim_matches('\n')
                .lines()
                .map(str::trim_end)
                .collect();
            let actual: Vec<&str> = if actual == [""] { Vec::new() } else { actual };
            let expected: Vec<String> = step
                .expected
                .iter()
                .map(|line| line.trim_end().to_string())
                .collect();
            if !lines_match(&expected, &actual) {
                failures.push(format!(
                    "README line {line}: $ {}\n--- expected\n{}\n--- got\n{}\n",
                    step.command,
                    expected.join("\n"),
                    actual.join("\n")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_file_the_readme_names_in_fixtures_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut missing = Vec::new();
    let path_char = |c: char| c.is_ascii_alphanumeric() || "/._-".contains(c);
    for (at, _) in readme.match_indices("fixtures/") {
        // The whole path the match is part of (`tests/fixtures/…` too).
        let start = readme[..at]
            .char_indices()
            .rev()
            .take_while(|(_, c)| path_char(*c))
            .last()
            .map_or(at, |(index, _)| index);
        let name: String = readme[start..]
            .chars()
            .take_while(|c| path_char(*c))
            .collect();
        let name = name.trim_end_matches('.');
        if name != "fixtures/" && !root.join(name).exists() {
            missing.push(name.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "the README names missing files: {missing:?}"
    );
    assert!(
        !readme.contains("../shared"),
        "the README needs ../shared, which a clone does not have"
    );
}

#[test]
fn the_matcher_understands_wildcards() {
    let expected: Vec<String> = ["a", "...", "x[..]z"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(lines_match(&expected, &["a", "b", "c", "xyz"]));
    assert!(lines_match(&expected, &["a", "x-z"]));
    assert!(!lines_match(&expected, &["a", "b"]));
    assert!(!line_matches("x[..]z", "xy"));
    assert!(line_matches("[..]", "anything"));
}

/// The README's Rust example is the crate's doc test, line for line, so it
/// is compiled and run: from its `use` line to the end of `fn verified`.
#[test]
fn the_readmes_rust_receiver_is_the_crates_doc_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let snippet = |text: &str, prefix: &str| -> Vec<String> {
        let lines: Vec<String> = text
            .lines()
            .filter_map(|line| line.strip_prefix(prefix))
            .map(|line| line.trim_end().to_string())
            .collect();
        let start = lines
            .iter()
            .position(|line| line == "use fly_signature::{Verdict, Verifier};")
            .expect("the use line");
        let end = start
            + lines[start..]
                .iter()
                .position(|line| line == "}")
                .expect("the end of fn verified");
        lines[start..=end].to_vec()
    };
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let crate_doc = std::fs::read_to_string(root.join("crates/fly-signature/src/lib.rs")).unwrap();
    let shown = snippet(&readme, "    ");
    assert!(
        shown.iter().any(|line| line.starts_with("fn verified(")),
        "{shown:?}"
    );
    assert_eq!(shown, snippet(&crate_doc, "//! "));
}
