//! Log lines on stderr, as text or as one JSON object per line.

use std::io::IsTerminal;

use std::fmt::Write as _;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::debug_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Text for people: time, level, message, fields.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Default level is `info`; each `-v` adds detail, each `-q` removes it.
///
/// `-v` and `-vv` are about fly's own steps (each API request with its
/// status and latency, retry decisions); the libraries underneath (the HTTP
/// client's state machine, TLS) say only warnings and errors until `-vvv`.
pub fn init(format: LogFormat, verbose: u8, quiet: u8) {
    let levels = Levels::of(verbose, quiet);
    let filter = Targets::new()
        .with_default(levels.libraries)
        .with_target("fly", levels.fly)
        .with_target("ureq", levels.client)
        .with_target("ureq_proto", levels.client);
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // The builder's own filter lets through all that `filter` may keep,
        // which decides, and no more: this is also the `log` crate's max
        // level (the bridge takes the subscriber's hint), so the HTTP and
        // TLS libraries' per-read `log` records below it cost one load of
        // an atomic instead of a trip through the bridge and the filter.
        .with_max_level(levels.most())
        // Colours only for a person at a terminal, never in files or pipes.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        // A log line that cannot be written (stderr piped into `head`, a
        // logger that died) is dropped: the default reports it with
        // `eprintln!`, which panics on that same broken stderr.
        .log_internal_errors(false)
        .with_target(false);
    // A subscriber is only missing if one was set already (never, in the binary).
    let _ = match format {
        // One event, one line: a value from outside (a chat id, a text, a
        // handler's stderr) cannot end the line and forge the next one, nor
        // move the cursor or recolour the terminal.
        LogFormat::Text => builder
            .fmt_fields(
                debug_fn(|writer, field, value| {
                    let raw = format!("{value:?}");
                    let text = escape_controls(&raw);
                    if field.name() == "message" {
                        writer.write_str(&text)
                    } else {
                        write!(writer, "{field}={text}")
                    }
                })
                .delimited(" "),
            )
            .finish()
            .with(filter)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(filter)
            .try_init(),
    };
}

/// A character that must not reach a log line or a terminal as it is: a
/// control character (newline, ESC, NUL, DEL, C1), a line or paragraph
/// separator, or a bidirectional override that reorders what is shown.
pub(crate) fn unsafe_to_show(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every character that could break a log line or drive a
/// terminal written as an escape: control characters (newline, ESC, NUL,
/// DEL, C1), line and paragraph separators, and the bidirectional overrides
/// that reorder what is shown. Everything else, Chinese included, stays
/// as it is.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(unsafe_to_show) {
        return text.into();
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if unsafe_to_show(c) => {
                let _ = write!(escaped, "\\u{{{:x}}}", u32::from(c));
            }
            c => escaped.push(c),
        }
    }
    escaped.into()
}

/// The levels for `-v`/`-q` counts: fly's own, the libraries', and the
/// HTTP client's.
#[derive(Debug, PartialEq, Eq)]
struct Levels {
    fly: LevelFilter,
    libraries: LevelFilter,
    client: LevelFilter,
}

impl Levels {
    /// The most any target may print.
    fn most(&self) -> LevelFilter {
        self.fly.max(self.libraries).max(self.client)
    }

    fn of(verbose: u8, quiet: u8) -> Levels {
        let fly = match i16::from(verbose) - i16::from(quiet) {
            i16::MIN..=-2 => LevelFilter::OFF,
            -1 => LevelFilter::ERROR,
            0 => LevelFilter::INFO,
            1 => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        };
        let libraries = if verbose >= 3 {
            fly
        } else {
            fly.min(LevelFilter::WARN)
        };
        // The HTTP client's own trace level dumps every request in hex, the
        // Authorization header with the bot token included; its debug level
        // redacts it. So the client never logs below debug.
        let client = libraries.min(LevelFilter::DEBUG);
        Levels {
            fly,
            libraries,
            client,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_chinese_is_not() {
        assert_eq!(escape_controls("你好 ok"), "你好 ok");
        assert_eq!(
            escape_controls("a\nINFO stopped\r\u{1b}[2J\0\u{7f}\u{9b}\u{202e}"),
            "a\\nINFO stopped\\r\\u{1b}[2J\\u{0}\\u{7f}\\u{9b}\\u{202e}"
        );
    }

    #[test]
    fn libraries_speak_up_only_at_vvv() {
        use LevelFilter as L;
        let levels = |verbose, quiet| {
            let Levels {
                fly,
                libraries,
                client,
            } = Levels::of(verbose, quiet);
            (fly, libraries, client)
        };
        assert_eq!(levels(0, 0), (L::INFO, L::WARN, L::WARN));
        assert_eq!(levels(1, 0), (L::DEBUG, L::WARN, L::WARN));
        assert_eq!(levels(3, 0), (L::TRACE, L::TRACE, L::DEBUG));
        assert_eq!(levels(0, 1), (L::ERROR, L::ERROR, L::ERROR));
        assert_eq!(levels(0, 2), (L::OFF, L::OFF, L::OFF));
    }

    /// The most any target prints is what the `log` bridge lets through:
    /// at the default level the libraries' debug and trace records are
    /// dropped at their call site.
    #[test]
    fn the_bridge_passes_only_what_may_be_printed() {
        use LevelFilter as L;
        let most = |verbose, quiet| Levels::of(verbose, quiet).most();
        assert_eq!(most(0, 0), L::INFO);
        assert_eq!(most(1, 0), L::DEBUG);
        assert_eq!(most(3, 0), L::TRACE);
        assert_eq!(most(0, 2), L::OFF);
    }
}
