//! `fly man [COMMAND]…`: the man page as roff on stdout, fly(1) or one
//! command's fly-COMMAND(1) (the pages fly(1) refers to).

use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use clap_mangen::Man;

use crate::cli::{Cli, ManArgs};
use crate::exit::{self, usage};

pub fn run(args: ManArgs) -> anyhow::Result<ExitCode> {
    let mut command = Cli::command();
    command.build();
    let mut page = command;
    for name in &args.command {
        let names: Vec<&str> = page
            .get_subcommands()
            .map(|sub| sub.get_name())
            .filter(|name| *name != "help")
            .collect();
        let Some(sub) = page
            .find_subcommand(name)
            .filter(|sub| sub.get_name() != "help")
            .cloned()
        else {
            return Err(usage(format!(
                "{} has no command {name:?}; its commands: {}",
                page.get_bin_name().unwrap_or("fly"),
                names.join(", ")
            )));
        };
        page = sub;
    }
    let roff = render(page).context("rendering the man page")?;
    super::write_stdout(roff.as_bytes()).context("writing to stdout")?;
    Ok(exit::code(exit::SUCCESS))
}

/// clap_mangen's sections, with the help's examples as a preformatted
/// EXAMPLES section (its own EXTRA section would fill them into one paragraph).
fn render(command: clap::Command) -> std::io::Result<String> {
    let examples = command
        .get_after_help()
        .map(|text| text.to_string())
        .unwrap_or_default();
    let man = Man::new(command.clone()).source(concat!("fly ", env!("CARGO_PKG_VERSION")));
    type Section = fn(&Man, &mut dyn std::io::Write) -> std::io::Result<()>;
    let mut sections: Vec<Section> = vec![
        Man::render_name_section,
        Man::render_synopsis_section,
        Man::render_description_section,
    ];
    if command.get_arguments().any(|arg| !arg.is_hide_set()) {
        sections.push(Man::render_options_section);
    }
    if command.get_subcommands().any(|sub| !sub.is_hide_set()) {
        sections.push(Man::render_subcommands_section);
    }
    let rendered = |section: Section| -> std::io::Result<String> {
        let mut bytes = Vec::new();
        section(&man, &mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    // Each section comes with the same preamble (it defines the string `Aq`
    // that apostrophes are written as). Once is enough, after the title, so
    // that the page starts with `.TH` as man pages do.
    let title = rendered(Man::render_title)?;
    let (preamble, title) = title.split_at(title.find(".TH").unwrap_or(0));
    let without_preamble = |text: String| match text.strip_prefix(preamble) {
        Some(rest) => rest.to_string(),
        None => text,
    };
    let mut page = format!("{title}{preamble}");
    for section in sections {
        page.push_str(&without_preamble(rendered(section)?));
    }
    page.push_str(&examples_section(&examples));
    page.push_str(&without_preamble(rendered(Man::render_version_section)?));
    Ok(page)
}

/// `.SH EXAMPLES` with the lines of an `Examples:` help section, verbatim.
fn examples_section(after_help: &str) -> String {
    let mut lines = after_help.lines();
    if lines.next().map(str::trim) != Some("Examples:") {
        return String::new();
    }
    let mut section = String::from(".SH EXAMPLES\n.nf\n");
    for line in lines {
        section.push_str(&roff_literal(line));
        section.push('\n');
    }
    section.push_str(".fi\n");
    section
}

/// One line of text as roff prints it: no escapes, requests or typographic
/// quotes and hyphens, so that a copied example still runs.
fn roff_literal(line: &str) -> String {
    let mut out = String::with_capacity(line.len() + 8);
    if line.starts_with(['.', '\'']) {
        out.push_str("\\&");
    }
    for ch in line.chars() {
        match ch {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            '\'' => out.push_str("\\*(Aq"),
            '`' => out.push_str("\\(ga"),
            '^' => out.push_str("\\(ha"),
            '~' => out.push_str("\\(ti"),
            _ => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_copied_literally() {
        assert_eq!(
            roff_literal(r"fly sign --secret-file s | curl -d @- 'x\y'"),
            r"fly sign \-\-secret\-file s | curl \-d @\- \*(Aqx\ey\*(Aq"
        );
        assert_eq!(roff_literal(".hidden"), r"\&.hidden");
        assert_eq!(examples_section("no heading"), "");
        assert_eq!(
            examples_section("Examples:\n  fly demo"),
            ".SH EXAMPLES\n.nf\n  fly demo\n.fi\n"
        );
    }
}
