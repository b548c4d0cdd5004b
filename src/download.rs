//! Streaming downloads from access URLs, and files that appear atomically.
//!
//! Memory stays flat whatever the size (a fixed buffer), the byte count is
//! checked against `Content-Length`, and a file only ever appears under its
//! final name complete: it is written to a temporary file in the same
//! directory, synced, then renamed.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, bail};
use ureq::Agent;

const BUFFER_SIZE: usize = 128 * 1024;

/// Streams `access_url` into `sink`; `on_progress(done, total)` is called as
/// bytes arrive. Returns the number of bytes written.
pub fn fetch_into(
    agent: &Agent,
    access_url: &str,
    sink: &mut dyn Write,
    mut on_progress: impl FnMut(u64, Option<u64>),
) -> anyhow::Result<u64> {
    let mut response = agent
        .get(access_url)
        .call()
        .map_err(|error| anyhow::anyhow!("download failed: {error}"))?;
    let status = response.status().as_u16();
    match status {
        200..=299 => {}
        403 | 404 => bail!("access URL expired or unknown (HTTP {status})"),
        _ => bail!("download failed: HTTP {status}"),
    }
    let total = response
        .headers()
        .get("content-length")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    // No body size limit: the stream is copied, never collected.
    let mut body = response.body_mut().with_config().limit(u64::MAX).reader();
    let mut buffer = vec![0u8; BUFFER_SIZE];
    let mut done = 0u64;
    on_progress(0, total);
    loop {
        let read = match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                bail!("download interrupted after {done} bytes: {error}")
            }
        };
        sink.write_all(&buffer[..read])
            .context("writing the download")?;
        done += read as u64;
        on_progress(done, total);
    }
    if let Some(expected) = total
        && done != expected
    {
        bail!("short download: got {done} of {expected} bytes");
    }
    sink.flush().context("writing the download")?;
    Ok(done)
}

/// Creates `destination` atomically from what `write` puts into a temporary
/// file next to it. With `overwrite` false an existing file is an error and is
/// left untouched. On any error no file appears under the final name.
pub fn save_atomically(
    destination: &Path,
    overwrite: bool,
    write: impl FnOnce(&mut File) -> anyhow::Result<u64>,
) -> anyhow::Result<u64> {
    let dir = match destination.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = destination
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut temporary = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".part")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let written = write(temporary.as_file_mut())?;
    temporary
        .as_file()
        .sync_all()
        .context("syncing the download to disk")?;
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
        let error = save_atomically(&target, false, |file| {
            file.write_all(b"partial")?;
            bail!("connection dropped")
        });
        assert!(error.is_err());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temp file left"
        );

        save_atomically(&target, false, |file| {
            file.write_all(b"first")?;
            Ok(5)
        })
        .unwrap();
        let clobber = save_atomically(&target, false, |file| {
            file.write_all(b"second")?;
            Ok(6)
        });
        assert!(format!("{:#}", clobber.unwrap_err()).contains("already exists"));
        assert_eq!(std::fs::read(&target).unwrap(), b"first");
        save_atomically(&target, true, |file| {
            file.write_all(b"second")?;
            Ok(6)
        })
        .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
