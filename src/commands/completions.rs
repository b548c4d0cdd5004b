//! `fly completions SHELL`: the shell completion script, for packagers and
//! for `source <(fly completions bash)`.

use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};
use crate::exit;

pub fn run(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    // Rendered into memory first: clap_complete panics on a write error,
    // and a closed pipe is a normal end here (see `exit::classify`).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "fly", &mut script);
    super::write_stdout(&script).context("writing to stdout")?;
    Ok(exit::code(exit::SUCCESS))
}
