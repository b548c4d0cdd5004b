//! `fly fetch-media`: exchange media URLs through batch_access (one call for
//! all of them) and stream the files to disk or stdout.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::output::print_line;
use anyhow::{Context, anyhow};
use fly_signature::json::Value as PyValue;

use crate::api::media::media_urls;
use crate::cli::FetchMediaArgs;
use crate::commands::input::read_input;
use crate::commands::wiring::one_shot_client;
use crate::download::{
    AlreadyExists, Durability, Stream, download, safe_file_name, save_atomically,
};
use crate::exit::{self, Hinted, usage, usage_because};
use crate::progress;
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;

/// Where the downloaded bytes go.
enum Output {
    Stdout,
    /// A regular file, created atomically.
    File(PathBuf),
    /// Something that exists and is not a regular file (`/dev/null`, a FIFO):
    /// written into as it is, like stdout, never replaced.
    Special(PathBuf),
    Directory(PathBuf),
}

impl Output {
    fn choose(args: &FetchMediaArgs, url_count: usize) -> anyhow::Result<Output> {
        let Some(path) = args.output.as_deref() else {
            return Ok(Output::Directory(args.dir.clone()));
        };
        if url_count != 1 {
            return Err(usage(match path {
                "-" => "-o - takes exactly one URL",
                _ => "-o PATH takes exactly one URL; use --dir for several",
            }));
        }
        match path {
            // Before any request: the file would have nowhere to go.
            "-" => {
                crate::output::check_stdout().context("writing to stdout")?;
                Ok(Output::Stdout)
            }
            "" => Err(usage("-o needs a path, or - for stdout")),
            path => {
                let path = PathBuf::from(path);
                match std::fs::metadata(&path) {
                    Ok(found) if found.is_dir() => Err(usage(format!(
                        "-o {} is a directory; use --dir DIR to save into it",
                        path.display()
                    ))),
                    Ok(found) if !found.is_file() => Ok(Output::Special(path)),
                    _ => Ok(Output::File(path)),
                }
            }
        }
    }
}

/// How every file of one run is fetched.
struct Fetcher<'a> {
    agent: &'a ureq::Agent,
    force: bool,
    durability: Durability,
    shutdown: Shutdown,
}

pub fn run(args: FetchMediaArgs) -> anyhow::Result<ExitCode> {
    let urls = wanted_urls(&args)?;
    let output = Output::choose(&args, urls.len())?;
    let client = one_shot_client(&args.api)?;
    if let Output::Directory(dir) = &output {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Ctrl-C ends the transfer between two reads, so the temporary file is
    // removed instead of being left behind by a killed process.
    let fetcher = Fetcher {
        agent: client.agent(),
        force: args.force,
        durability: if args.no_fsync {
            Durability::PageCache
        } else {
            Durability::Synced
        },
        shutdown: Shutdown::on_signals(crate::shutdown::DEFAULT_GRACE)?,
    };

    let access = client
        .batch_access(&urls, args.expire_seconds)
        .context("exchanging the media URLs")?;
    let mut names_taken = HashSet::new();
    let mut failures = Vec::new();
    for url in &urls {
        if fetcher.shutdown.is_requested() {
            failures.push(anyhow!("{url}: not fetched (interrupted)"));
            continue;
        }
        let Some(access_url) = access.get(url) else {
            failures.push(anyhow!("{url}: the platform returned no access URL"));
            continue;
        };
        let fetched = match &output {
            Output::Stdout => {
                fetcher.to_stream(url, access_url, "stdout", std::io::stdout().lock())
            }
            Output::Special(path) => std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))
                .and_then(|file| {
                    fetcher.to_stream(url, access_url, &path.display().to_string(), file)
                }),
            Output::File(path) => fetcher.to_file(url, access_url, path),
            Output::Directory(dir) => {
                let path = dir.join(unique_name(url, &mut names_taken));
                fetcher.to_file(url, access_url, &path)
            }
        };
        if let Err(error) = fetched {
            // The reader of stdout went away: stop quietly, like any filter.
            if exit::classify(&error) == exit::ExitOutcome::Quiet {
                return Err(error);
            }
            failures.push(error.context(url.clone()));
        }
    }
    match failures.len() {
        0 => Ok(exit::code(exit::SUCCESS)),
        // One failure is returned as it is, its typed chain with it.
        1 => Err(failures.remove(0)),
        n => {
            let said: Vec<String> = failures.iter().map(exit::message).collect();
            Err(anyhow!(
                "{n} of {} downloads failed: {}",
                urls.len(),
                said.join("; ")
            ))
        }
    }
}

/// The URLs from the command line and `--update`, in order, without repeats.
fn wanted_urls(args: &FetchMediaArgs) -> anyhow::Result<Vec<String>> {
    let mut urls: Vec<String> = args
        .urls
        .iter()
        .map(|url| url.trim().to_string())
        .filter(|url| !url.is_empty())
        .collect();
    if let Some(input) = &args.update {
        urls.extend(urls_in_update(&read_input(input)?, args.original_only)?);
    }
    let mut seen = HashSet::new();
    urls.retain(|url| seen.insert(url.clone()));
    if urls.is_empty() {
        return Err(usage("no media URLs: give URL arguments or --update FILE"));
    }
    Ok(urls)
}

/// Media URLs of an update (`{"message":{…}}`) or of a bare message, read
/// as the platform's Python reads updates (see `fly_signature::json`).
fn urls_in_update(json: &str, original_only: bool) -> anyhow::Result<Vec<String>> {
    let value = fly_signature::parse(json.trim_end())
        .map_err(|error| usage_because("--update is not valid JSON", error))?;
    let message = match value.get("message") {
        Some(message @ PyValue::Object(_)) => message,
        _ => &value,
    };
    let msg_type = match message.get("msgType") {
        Some(PyValue::Str(msg_type)) => String::from_utf8_lossy(msg_type).into_owned(),
        _ => String::new(),
    };
    let Some(data @ PyValue::Object(_)) = message.get("data") else {
        return Err(usage(
            "--update has no message data (expected msgType and data)",
        ));
    };
    let urls: Vec<String> = media_urls(&msg_type, data)
        .into_iter()
        .filter(|media| !(original_only && media.is_thumbnail))
        .map(|media| media.url)
        .collect();
    if urls.is_empty() {
        return Err(usage(format!(
            "--update has no media URLs (msgType {msg_type:?})"
        )));
    }
    Ok(urls)
}

/// A safe file name for `url`, made unique within this run (`a.jpg`, `a-2.jpg`).
fn unique_name(url: &str, taken: &mut HashSet<String>) -> String {
    let base = safe_file_name(url);
    let (stem, extension) = match base.rfind('.') {
        Some(dot) if dot > 0 => (&base[..dot], &base[dot..]),
        _ => (base.as_str(), ""),
    };
    let mut candidate = base.clone();
    let mut n = 2;
    while !taken.insert(candidate.clone()) {
        candidate = format!("{stem}-{n}{extension}");
        n += 1;
    }
    candidate
}

impl Fetcher<'_> {
    /// Downloads into a temporary file next to `path`, then renames it, and
    /// prints the path. An existing file is an error unless `--force`.
    fn to_file(&self, url: &str, access_url: &str, path: &Path) -> anyhow::Result<()> {
        let bar = progress::download_bar(&path.display().to_string());
        let bytes = save_atomically(path, self.force, self.durability, |file| {
            Ok(download(
                self.agent,
                access_url,
                file,
                RetryPolicy::ONE_SHOT,
                &bar,
                &self.shutdown,
            )?)
        });
        bar.finish_and_clear();
        let bytes = bytes.map_err(|error| match error.downcast_ref::<AlreadyExists>() {
            Some(_) => Hinted::new(error, " (use --force to overwrite)").into(),
            None => error,
        })?;
        tracing::debug!(url, bytes, path = %path.display(), "saved");
        print_line(&path.display().to_string())
    }

    /// Downloads straight into `writer` (stdout, a device, a FIFO), which
    /// cannot be rewound: a transfer that breaks can only be resumed.
    fn to_stream(
        &self,
        url: &str,
        access_url: &str,
        label: &str,
        writer: impl Write,
    ) -> anyhow::Result<()> {
        let bar = progress::download_bar(url);
        let mut sink = Stream(writer);
        let bytes = download(
            self.agent,
            access_url,
            &mut sink,
            RetryPolicy::ONE_SHOT,
            &bar,
            &self.shutdown,
        );
        bar.finish_and_clear();
        // A reader that went away (`| head -c 10`) surfaces as a broken pipe,
        // which `exit::classify` treats as a normal end.
        let bytes = bytes?;
        tracing::debug!(url, bytes, "written to {label}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_made_unique_within_a_run() {
        let mut taken = HashSet::new();
        let names: Vec<String> = [
            "https://a/x/p.jpg",
            "https://b/y/p.jpg",
            "https://c/p.jpg",
            "https://d/README",
        ]
        .iter()
        .map(|url| unique_name(url, &mut taken))
        .collect();
        assert_eq!(names, ["p.jpg", "p-2.jpg", "p-3.jpg", "README"]);
    }

    #[test]
    fn urls_come_from_updates_or_bare_messages() {
        let update = r#"{"update_id":1,"message":{"msgType":"video","data":{"videoUrl":"v","thumbnailUrl":"t"}}}"#;
        assert_eq!(urls_in_update(update, false).unwrap(), ["v", "t"]);
        assert_eq!(urls_in_update(update, true).unwrap(), ["v"]);
        let message = r#"{"msgType":"image","data":{"originalUrl":"o"}}"#;
        assert_eq!(urls_in_update(message, false).unwrap(), ["o"]);
        for bad in ["{", r#"{"msgType":"text","data":{"content":"x"}}"#, "[]"] {
            let error = urls_in_update(bad, false).unwrap_err();
            assert_eq!(
                crate::exit::classify(&error),
                crate::exit::ExitOutcome::Report(2),
                "{bad}"
            );
        }
    }
}
