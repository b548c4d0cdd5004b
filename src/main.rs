//! `fly`: every tool of the Fly Bot API examples page in one binary.
//!
//! `main` only parses the command line, runs the command and turns an error
//! into the one `fly: error: …` line and its exit code (see `exit.rs`).

use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use fly::{children, cli, commands, exit, logging};

/// Run by the loader before Rust's runtime starts, which would replace a
/// closed fd 1 with /dev/null and so hide it (see `fly::output`). An ELF
/// `.init_array` entry, as std itself uses on Linux to capture the
/// arguments; elsewhere a closed stdout stays unnoticed.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static NOTE_STDOUT_AT_EXEC: extern "C" fn() = {
    extern "C" fn note() {
        fly::output::note_stdout_at_exec();
    }
    note
};

fn main() -> ExitCode {
    // Whatever way main ends (a result, an error, a panic unwinding), no
    // handler process outlives fly.
    let _handlers = children::KillAllOnDrop;
    // And a process a handler started outside its group (`setsid cmd &`)
    // is still fly's to stop: it comes to fly when its parent exits.
    children::become_subreaper();
    let cli = match cli::Cli::parse_args() {
        Ok(cli) => cli,
        Err(cli::CliError::Usage(error)) => return report_usage_error(error),
        Err(cli::CliError::Config(error)) => {
            print_error_line(&one_line(&error.to_string()));
            return exit::code(exit::USAGE);
        }
    };
    // The demo's output is its transcript; its service logs would only be noise.
    let quiet_by_default = u8::from(matches!(cli.command, cli::Command::Demo(_)));
    logging::init(
        cli.global.log_format.into(),
        cli.global.verbose,
        cli.global.quiet.saturating_add(quiet_by_default),
    );
    warn_about_credentials_on_command_line(&cli.credentials_on_command_line);
    match commands::run(cli.command) {
        Ok(code) => code,
        Err(error) => match exit::classify(&error) {
            exit::ExitOutcome::Quiet => exit::code(exit::SUCCESS),
            exit::ExitOutcome::Report(code) => {
                print_error_line(&one_line(&exit::message(&error)));
                exit::code(code)
            }
        },
    }
}

/// One warning line for credentials typed as flags: any user of the machine
/// can read a command line (`ps`), and shells keep it in their history.
fn warn_about_credentials_on_command_line(flags: &[&str]) {
    let better: Vec<&str> = flags
        .iter()
        .map(|flag| match *flag {
            "--token" => "FLY_BOT_TOKEN or --token-file PATH",
            _ => "FLY_WEBHOOK_SECRET or --secret-file PATH",
        })
        .collect();
    if !flags.is_empty() {
        tracing::warn!(
            "{} on the command line can be read by other users in the process list; use {} instead",
            flags.join(" and "),
            better.join(", and ")
        );
    }
}

/// The one error line. If stderr cannot be written to (`2>/dev/full`) there
/// is nobody to tell; the exit code still says it.
fn print_error_line(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "fly: error: {message}");
}

/// `--help` and `--version` go to stdout with exit 0; everything clap rejects
/// becomes one `fly: error:` line with exit 2: clap's message, its
/// suggestion (`did you mean 'send'?`) and where to read more.
fn report_usage_error(error: clap::Error) -> ExitCode {
    match error.kind() {
        // Written like any output: a closed or full stdout is exit 1, a
        // reader that went away (`fly --help | head -1`) a normal end.
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            match fly::output::check_stdout().and_then(|()| error.print()) {
                Err(write_error) if write_error.kind() != std::io::ErrorKind::BrokenPipe => {
                    print_error_line(&format!("writing to stdout: {write_error}"));
                    exit::code(exit::FAILURE)
                }
                _ => exit::code(exit::SUCCESS),
            }
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            exit::code(exit::USAGE)
        }
        _ => {
            // clap's message is its first paragraph; tips and usage follow a blank line.
            let rendered = error.render().to_string();
            let paragraph: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            let joined = paragraph.join(" ");
            let mut message = joined
                .strip_prefix("error: ")
                .unwrap_or(&joined)
                .to_string();
            for hint in suggestions(&error) {
                message.push_str("; ");
                message.push_str(&hint);
            }
            let help = help_command(std::env::args_os().skip(1));
            print_error_line(&format!("{message} (see '{help}')"));
            exit::code(exit::USAGE)
        }
    }
}

/// clap's suggestions for a usage error, in words for the one error line.
fn suggestions(error: &clap::Error) -> Vec<String> {
    let quoted = |values: &[String]| {
        values
            .iter()
            .map(|value| format!("'{value}'"))
            .collect::<Vec<_>>()
            .join(" or ")
    };
    let mut hints = Vec::new();
    for (kind, value) in error.context() {
        match (kind, value) {
            (
                ContextKind::SuggestedSubcommand
                | ContextKind::SuggestedArg
                | ContextKind::SuggestedValue,
                ContextValue::String(one),
            ) => hints.push(format!("did you mean '{one}'?")),
            (
                ContextKind::SuggestedSubcommand
                | ContextKind::SuggestedArg
                | ContextKind::SuggestedValue,
                ContextValue::Strings(many),
            ) if !many.is_empty() => hints.push(format!("did you mean {}?", quoted(many))),
            (ContextKind::Suggested, ContextValue::StyledStrs(tips)) => {
                hints.extend(tips.iter().map(|tip| one_line(&tip.to_string())));
            }
            _ => {}
        }
    }
    hints
}

/// `fly SUBCOMMAND… --help` for the deepest subcommand named on the command
/// line, so the pointer leads to the options of the command that was meant.
fn help_command(args: impl Iterator<Item = std::ffi::OsString>) -> String {
    use clap::CommandFactory;
    let root = cli::Cli::command();
    let mut current = &root;
    let mut path = vec!["fly".to_string()];
    for arg in args {
        let Some(arg) = arg.to_str() else { continue };
        if arg == "--" {
            break;
        }
        if arg.starts_with('-') {
            continue;
        }
        match current.find_subcommand(arg) {
            Some(sub) => {
                path.push(sub.get_name().to_string());
                current = sub;
            }
            // An argument of a command without subcommands: its own words.
            None if current.has_subcommands() => continue,
            None => break,
        }
    }
    path.push("--help".into());
    path.join(" ")
}

fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
