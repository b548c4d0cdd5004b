//! Names the build: the commit fly is built from (`fly_build_info{commit}`,
//! `fly --version`) — `git rev-parse` when built in a clone, `unknown`
//! otherwise (a source archive) — and the date of the build, so a bug
//! report says which binary it is about: `fly 0.1.0 (1a2b3c4d5e6f 2026-12-07)`.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty());
    let date = build_date();
    let version = env!("CARGO_PKG_VERSION");
    let line = match &commit {
        Some(commit) => format!("{version} ({commit} {date})"),
        None => format!("{version} (built outside git, {date})"),
    };
    println!(
        "cargo:rustc-env=FLY_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
    println!("cargo:rustc-env=FLY_VERSION_LINE={line}");
    // A new commit moves the branch HEAD points at: rebuild to name it.
    // Only files that exist are named: cargo reruns a build script at every
    // build while a named file is missing (a worktree, whose `.git` is a
    // file; a source archive, with no git at all).
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let git_dir = |which: &str| {
        Command::new("git")
            .args(["rev-parse", "--path-format=absolute", which])
            .output()
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .map(|text| std::path::PathBuf::from(text.trim()))
    };
    let (Some(head_dir), Some(common_dir)) = (git_dir("--git-dir"), git_dir("--git-common-dir"))
    else {
        return;
    };
    let mut watched = vec![head_dir.join("HEAD"), common_dir.join("packed-refs")];
    if let Ok(head) = std::fs::read_to_string(head_dir.join("HEAD"))
        && let Some(branch) = head.trim().strip_prefix("ref: ")
    {
        watched.push(common_dir.join(branch));
    }
    for path in watched.iter().filter(|path| path.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// The UTC date of the build, `YYYY-MM-DD`: `SOURCE_DATE_EPOCH` when set
/// (reproducible builds), else the clock.
fn build_date() -> String {
    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|text| text.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs() as i64)
        });
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    format!("{year:04}-{month:02}-{day:02}")
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
