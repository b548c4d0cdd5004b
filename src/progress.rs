//! The only place that builds progress bars. They go to stderr and only when
//! stderr is a terminal; anywhere else a hidden bar is returned, so callers
//! never need to ask.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar for one download: bytes, rate and ETA when the size is known, a
/// spinner with bytes and rate when it is not.
pub fn download_bar(label: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(spinner_style());
    bar.set_message(label.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Switches a download bar to the sized style once the length is known.
pub fn set_download_length(bar: &ProgressBar, length: u64) {
    if bar.is_hidden() {
        return;
    }
    bar.set_style(sized_style());
    bar.set_length(length);
}

fn sized_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
    .expect("a valid template")
    .progress_chars("=> ")
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{msg:30!} {spinner} {bytes} {bytes_per_sec}")
        .expect("a valid template")
}
