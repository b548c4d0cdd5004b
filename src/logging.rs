//! Log lines on stderr, as text or as one JSON object per line.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Default level is `info`; each `-v` adds detail, each `-q` removes it.
pub fn init(format: LogFormat, verbose: u8, quiet: u8) {
    let level = match i16::from(verbose) - i16::from(quiet) {
        i16::MIN..=-2 => LevelFilter::OFF,
        -1 => LevelFilter::ERROR,
        0 => LevelFilter::INFO,
        1 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    // The HTTP client's own trace level dumps every request in hex, the
    // Authorization header with the bot token included; its debug level
    // redacts it. So the client never logs below debug.
    let client_level = level.min(LevelFilter::DEBUG);
    let filter = EnvFilter::builder().parse_lossy(format!(
        "{level},ureq={client_level},ureq_proto={client_level}"
    ));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never in files or pipes.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_env_filter(filter)
        // A log line that cannot be written (stderr piped into `head`, a
        // logger that died) is dropped: the default reports it with
        // `eprintln!`, which panics on that same broken stderr.
        .log_internal_errors(false)
        .with_target(false);
    // A subscriber is only missing if one was set already (never, in the binary).
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
