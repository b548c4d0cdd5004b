//! `fly`: every tool of the Fly Bot API examples page in one binary.
//!
//! `main` only parses the command line, runs the command and turns an error
//! into the one `fly: error: …` line and its exit code (see `exit.rs`).

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use fly::{children, cli, commands, exit, logging};

fn main() -> ExitCode {
    // Whatever way main ends (a result, an error, a panic unwinding), no
    // handler process outlives fly.
    let _handlers = children::KillAllOnDrop;
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return report_usage_error(error),
    };
    // The demo's output is its transcript; its service logs would only be noise.
    let quiet_by_default = u8::from(matches!(cli.command, cli::Command::Demo(_)));
    logging::init(
        cli.global.log_format,
        cli.global.verbose,
        cli.global.quiet.saturating_add(quiet_by_default),
    );
    match commands::run(cli) {
        Ok(code) => code,
        Err(error) => match exit::classify(&error) {
            exit::Outcome::Quiet => exit::code(exit::SUCCESS),
            exit::Outcome::Report(code) => {
                print_error_line(&one_line(&format!("{error:#}")));
                exit::code(code)
            }
        },
    }
}

/// The one error line. If stderr cannot be written to (`2>/dev/full`) there
/// is nobody to tell; the exit code still says it.
fn print_error_line(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "fly: error: {message}");
}

/// `--help` and `--version` go to stdout with exit 0; everything clap rejects
/// becomes one `fly: error:` line with exit 2.
fn report_usage_error(error: clap::Error) -> ExitCode {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            exit::code(exit::SUCCESS)
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
            let message = joined.strip_prefix("error: ").unwrap_or(&joined);
            print_error_line(&format!("{message} (see 'fly --help')"));
            exit::code(exit::USAGE)
        }
    }
}

fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
