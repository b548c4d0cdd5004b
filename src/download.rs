//! Streaming downloads from access URLs, and files that appear atomically.
//!
//! Memory stays flat whatever the size (a fixed buffer), the byte count is
//! checked against `Content-Length`, and a file only ever appears under its
//! final name complete: it is written to a temporary file in the same
//! directory, synced (unless the caller opts out), then renamed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::Context;
use indicatif::ProgressBar;
use ureq::Agent;

use crate::api::retry::{AttemptError, GaveUp, RetryPolicy};
use crate::progress::set_download_length;
use crate::shutdown::Shutdown;

const BUFFER_SIZE: usize = 128 * 1024;

/// Where a download goes. A transfer that breaks is resumed with `Range`
/// where the server allows it; otherwise it starts over, which needs a sink
/// that can be emptied again.
pub trait DownloadSink: Write {
    /// Drops what was written so far. Returns `false` if that is impossible
    /// (bytes already sent down a pipe).
    fn restart(&mut self) -> std::io::Result<bool>;

    /// Called after each `WRITEBACK_STEP` bytes with the range just written,
    /// so a file can start putting it on disk while the transfer goes on.
    fn written(&mut self, _offset: u64, _length: u64) {}
}

/// How often a file download asks the kernel to start writing back.
const WRITEBACK_STEP: u64 = 2 * 1024 * 1024;

/// Whether a saved file is forced onto the disk before it gets its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync, then rename: even after a power cut the file is complete under
    /// its name or not there at all. The default.
    Synced,
    /// Rename without fsync, leaving the bytes to the page cache: as fast as
    /// curl, but a power cut soon after can leave an empty or partial file
    /// under the final name (a crash of fly itself cannot).
    PageCache,
}

/// The temporary file a download is written to before it is renamed.
pub struct PartFile<'a> {
    file: &'a mut File,
    durability: Durability,
}

impl Write for PartFile<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.file.write(bytes)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl DownloadSink for PartFile<'_> {
    fn restart(&mut self) -> std::io::Result<bool> {
        self.file.seek(SeekFrom::Start(0))?;
        self.file.set_len(0)?;
        Ok(true)
    }

    /// Starts writeback of the range without waiting for it: the final
    /// fsync then has little left to do, instead of writing the whole file
    /// after the transfer. Nothing to do when there is no fsync.
    fn written(&mut self, offset: u64, length: u64) {
        use std::os::fd::AsRawFd;
        if self.durability != Durability::Synced {
            return;
        }
        let (Ok(offset), Ok(length)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(length),
        ) else {
            return;
        };
        // SAFETY: sync_file_range only reads its integer arguments; the
        // descriptor is valid for as long as `self` is borrowed. Failure is
        // harmless (the fsync at the end still makes the file durable).
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset,
                length,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
}

/// A sink that cannot be rewound, such as stdout.
pub struct Stream<W: Write>(pub W);

impl<W: Write> Write for Stream<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.write(bytes)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> DownloadSink for Stream<W> {
    fn restart(&mut self) -> std::io::Result<bool> {
        Ok(false)
    }
}

/// Why a download failed for good.
#[derive(Debug)]
pub enum DownloadError {
    /// The server or the network: expired URL, broken transfer, …
    Transfer(String),
    /// Writing to the sink failed (disk full, the reader of a pipe went away).
    Sink(std::io::Error),
}

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownloadError::Transfer(message) => f.write_str(message),
            DownloadError::Sink(_) => f.write_str("writing the download failed"),
        }
    }
}

impl std::error::Error for DownloadError {
    // The I/O error is the source, so a broken pipe is recognised as such.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DownloadError::Transfer(_) => None,
            DownloadError::Sink(error) => Some(error),
        }
    }
}

/// Streams `access_url` into `sink` with a fixed buffer, checking the byte
/// count against `Content-Length`. Dropped connections, short bodies and 5xx
/// are retried under `policy`, resuming with `Range` when the server answers
/// 206. 403/404 mean the access URL expired (or never existed): not retried.
/// A stop requested through `shutdown` ends the transfer between two reads.
pub fn download(
    agent: &Agent,
    access_url: &str,
    sink: &mut dyn DownloadSink,
    policy: RetryPolicy,
    progress: &ProgressBar,
    shutdown: &Shutdown,
) -> Result<u64, DownloadError> {
    let mut done = 0u64;
    let mut buffer = vec![0u8; BUFFER_SIZE];
    let transfer = Transfer {
        agent,
        access_url,
        progress,
        shutdown,
    };
    let outcome = policy.run(
        |_| transfer.attempt(sink, &mut done, &mut buffer),
        |failures, reason, delay| {
            tracing::warn!(
                failures,
                "download: {reason}; retrying in {:.1}s",
                delay.as_secs_f64()
            );
        },
        |delay| shutdown.sleep(delay),
    );
    outcome.map_err(|gave_up| match gave_up {
        GaveUp::Fatal(error) => error,
        GaveUp::Exhausted { attempts, last } => {
            DownloadError::Transfer(format!("failed after {attempts} attempts: {last}"))
        }
        GaveUp::Cancelled => DownloadError::Transfer("interrupted".to_string()),
    })
}

/// What stays the same from one attempt of a download to the next.
struct Transfer<'a> {
    agent: &'a Agent,
    access_url: &'a str,
    progress: &'a ProgressBar,
    shutdown: &'a Shutdown,
}

impl Transfer<'_> {
    fn attempt(
        &self,
        sink: &mut dyn DownloadSink,
        done: &mut u64,
        buffer: &mut [u8],
    ) -> Result<u64, AttemptError<DownloadError>> {
        let Transfer {
            agent,
            access_url,
            progress,
            shutdown,
        } = *self;
        let fatal = |message: String| AttemptError::Fatal(DownloadError::Transfer(message));
        let sink_failed = |error: std::io::Error| AttemptError::Fatal(DownloadError::Sink(error));
        let transient = |reason: String| AttemptError::Transient {
            reason,
            retry_after: None,
        };
        let mut request = agent.get(access_url);
        if *done > 0 {
            request = request.header("Range", &format!("bytes={done}-"));
        }
        let mut response = request
            .call()
            .map_err(|error| transient(format!("connection error: {error}")))?;
        let status = response.status().as_u16();
        match status {
            206 if *done > 0 => {
                let resumes_here = response
                    .headers()
                    .get("content-range")
                    .and_then(|value| value.to_str().ok())
                    .is_some_and(|range| range.starts_with(&format!("bytes {done}-")));
                if !resumes_here {
                    return Err(fatal("the server resumed at the wrong offset".to_string()));
                }
            }
            200 => {
                if *done > 0 {
                    // No resume: start over, if the sink can be emptied.
                    let restarted = sink.restart().map_err(sink_failed)?;
                    if !restarted {
                        return Err(fatal(format!(
                            "the transfer broke after {done} bytes and the server cannot resume it"
                        )));
                    }
                    *done = 0;
                }
            }
            403 | 404 => {
                return Err(fatal(format!(
                    "access URL expired or unknown (HTTP {status})"
                )));
            }
            429 | 500..=599 => return Err(transient(format!("HTTP {status}"))),
            _ => return Err(fatal(format!("HTTP {status}"))),
        }
        let remaining = response
            .headers()
            .get("content-length")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok());
        let total = remaining.map(|remaining| *done + remaining);
        if let Some(total) = total {
            set_download_length(progress, total);
        }
        progress.set_position(*done);
        // No body size limit: the stream is copied, never collected.
        let mut body = response.body_mut().with_config().limit(u64::MAX).reader();
        loop {
            if shutdown.is_requested() {
                return Err(fatal("interrupted".to_string()));
            }
            let read = match body.read(buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(transient(format!(
                        "transfer broke after {done} bytes: {error}"
                    )));
                }
            };
            sink.write_all(&buffer[..read]).map_err(sink_failed)?;
            let before = *done;
            *done += read as u64;
            if before / WRITEBACK_STEP != *done / WRITEBACK_STEP {
                let step_start = (*done / WRITEBACK_STEP - 1) * WRITEBACK_STEP;
                sink.written(step_start, WRITEBACK_STEP);
            }
            progress.set_position(*done);
        }
        if let Some(total) = total
            && *done != total
        {
            return Err(transient(format!(
                "short transfer: got {done} of {total} bytes"
            )));
        }
        sink.flush().map_err(sink_failed)?;
        Ok(*done)
    }
}

/// Creates `destination` atomically from what `write` puts into a temporary
/// file next to it. With `overwrite` false an existing file is an error and is
/// left untouched. On any error no file appears under the final name.
pub fn save_atomically(
    destination: &Path,
    overwrite: bool,
    durability: Durability,
    write: impl FnOnce(&mut PartFile) -> anyhow::Result<u64>,
) -> anyhow::Result<u64> {
    let dir = match destination.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = destination
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    // 0666 less the umask, as any new file gets (tempfile's default 0600
    // would survive the rename and hide the media from a web server).
    let mut temporary = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".part")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let written = write(&mut PartFile {
        file: temporary.as_file_mut(),
        durability,
    })?;
    if durability == Durability::Synced {
        temporary
            .as_file()
            .sync_all()
            .context("syncing the download to disk")?;
    }
    let persisted = if overwrite {
        temporary.persist(destination).map(drop)
    } else {
        temporary.persist_noclobber(destination).map(drop)
    };
    // On failure the temporary file is dropped, which removes it.
    persisted.map_err(|error| match error.error.kind() {
        std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
            "{} already exists (use --force to overwrite)",
            destination.display()
        ),
        _ => anyhow::Error::new(error.error)
            .context(format!("moving the download to {}", destination.display())),
    })?;
    Ok(written)
}

/// A file name derived from a media URL that is safe in any directory: the
/// last path segment, with anything but `[A-Za-z0-9._-]` replaced by `_`, no
/// leading dots (no hidden files, no `..`), at most 100 characters.
pub fn safe_file_name(url: &str) -> String {
    let without_query = url.split(['?', '#']).next().unwrap_or_default();
    let after_scheme = without_query
        .split_once("://")
        .map_or(without_query, |(_, rest)| rest);
    // The host alone is not a file name.
    let path = after_scheme.split_once('/').map_or("", |(_, path)| path);
    let segment = path
        .rsplit('/')
        .find(|segment| !segment.is_empty())
        .unwrap_or_default();
    let cleaned: String = segment
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    let mut name: String = cleaned.chars().take(100).collect();
    if name.is_empty() {
        name = "download".to_string();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_file_names() {
        let table = [
            ("https://cdn.example/a/b/photo.png?sig=1", "photo.png"),
            ("https://cdn.example/a/b/", "b"),
            ("https://cdn.example", "download"),
            ("https://cdn.example/../../etc/passwd", "passwd"),
            ("https://cdn.example/x/..", "download"),
            ("https://cdn.example/%2e%2e%2fsecret", "_2e_2e_2fsecret"),
            ("https://cdn.example/.bashrc", "bashrc"),
            (
                "https://cdn.example/名字 with space.jpg",
                "___with_space.jpg",
            ),
            ("relative/file.bin", "file.bin"),
        ];
        for (url, expected) in table {
            assert_eq!(safe_file_name(url), expected, "{url}");
        }
        assert_eq!(
            safe_file_name(&format!("https://x/{}", "a".repeat(300))).len(),
            100
        );
    }

    #[test]
    fn atomic_save_leaves_nothing_on_failure_and_refuses_to_clobber() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let error = save_atomically(&target, false, Durability::Synced, |file| {
            file.write_all(b"partial")?;
            anyhow::bail!("connection dropped")
        });
        assert!(error.is_err());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temp file left"
        );

        save_atomically(&target, false, Durability::Synced, |file| {
            file.write_all(b"first")?;
            Ok(5)
        })
        .unwrap();
        let clobber = save_atomically(&target, false, Durability::Synced, |file| {
            file.write_all(b"second")?;
            Ok(6)
        });
        assert!(format!("{:#}", clobber.unwrap_err()).contains("already exists"));
        assert_eq!(std::fs::read(&target).unwrap(), b"first");
        save_atomically(&target, true, Durability::PageCache, |file| {
            file.write_all(b"second")?;
            Ok(6)
        })
        .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
