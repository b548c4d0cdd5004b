//! Streaming downloads from access URLs, and files that appear atomically.
//!
//! Memory stays flat whatever the size (a fixed buffer), the bytes saved are
//! the bytes sent (no decompression: `Accept-Encoding: identity`), their
//! count is checked against `Content-Length`, and a file only ever appears
//! under its final name complete: it is written to a temporary file
//! `.NAME.XXXXXX.part` in the same directory, synced (unless the caller opts
//! out), then renamed. One that a killed process left behind is removed by
//! the next fetch of the same name.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::ProgressBar;
use ureq::Agent;
use ureq::http::{Response, Uri};

use crate::http_client::PlainHttp;
use crate::progress::set_download_length;
use crate::retry::{
    AttemptError, GaveUp, Limit, RetryPolicy, TransportFailure, attempts_text, classify_transport,
    transient_response,
};
use crate::shutdown::Shutdown;

const BUFFER_SIZE: usize = 128 * 1024;

/// Redirects followed from an access URL before giving up (ureq's default).
const MAX_REDIRECTS: usize = 10;

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
    #[cfg(target_os = "linux")]
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

    /// Elsewhere the final fsync does all the writing.
    #[cfg(not(target_os = "linux"))]
    fn written(&mut self, _offset: u64, _length: u64) {}
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
    /// The server or the network: broken transfer, unexpected status, …
    Transfer(String),
    /// 403/404: the URL expired or never existed. Asking again for the same
    /// URL cannot help (a new access URL might).
    Gone(String),
    /// Writing to the sink failed (disk full, the reader of a pipe went away).
    Sink(std::io::Error),
    /// A redirect to something other than an http(s) URL.
    Redirect(RefusedRedirect),
}

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownloadError::Transfer(message) | DownloadError::Gone(message) => f.write_str(message),
            DownloadError::Sink(_) => f.write_str("writing the download failed"),
            DownloadError::Redirect(refused) => refused.fmt(f),
        }
    }
}

impl std::error::Error for DownloadError {
    // The I/O error is the source, so a broken pipe is recognised as such.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // A refused redirect says itself: its text is this one's.
            DownloadError::Transfer(_) | DownloadError::Gone(_) | DownloadError::Redirect(_) => {
                None
            }
            DownloadError::Sink(error) => Some(error),
        }
    }
}

/// Streams `access_url` into `sink` with a fixed buffer, checking the byte
/// count against `Content-Length`. What can succeed later (dropped
/// connections, short bodies, 429, 5xx but 501) is retried under `policy`
/// (`Retry-After` honoured within its budget; a transfer that got further
/// than ever before starts the budget again), resuming with `Range` when the
/// server answers 206; anything else fails at
/// once: 403/404 (the access URL expired, or never existed), other statuses,
/// HTTP that cannot be read, a redirect to anything but http(s). A stop
/// requested through `shutdown` ends the transfer between two reads.
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
    // The furthest any attempt got: a retry that gets past it made progress.
    let mut furthest = 0u64;
    let outcome = policy.run(
        |attempt| {
            let result = transfer.attempt(sink, &mut done, &mut buffer, attempt.time_left);
            if done > furthest {
                furthest = done;
                attempt.made_progress();
            }
            result
        },
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
        GaveUp::Exhausted {
            last,
            limit: Limit::RetryAfter(wait),
            ..
        } => DownloadError::Transfer(format!("{last}; the server {wait}")),
        GaveUp::Exhausted {
            attempts,
            last,
            limit,
        } => DownloadError::Transfer(format!(
            "failed after {}{}: {last}",
            attempts_text(attempts),
            limit.spent()
        )),
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
        time_left: Option<Duration>,
    ) -> Result<u64, AttemptError<DownloadError>> {
        let mut response = self.get(*done, time_left)?;
        if let Some(transient) = transient_response(&response, |status| format!("HTTP {status}")) {
            return Err(transient);
        }
        check_status(&response, sink, done)?;
        // As ureq read it: a Content-Length that is not a number, or two
        // that disagree, never get this far (they are malformed HTTP).
        let total = response
            .body()
            .content_length()
            .map(|remaining| *done + remaining);
        if let Some(total) = total {
            set_download_length(self.progress, total);
        }
        self.progress.set_position(*done);
        // No body size limit: the stream is copied, never collected.
        let mut body = response.body_mut().with_config().limit(u64::MAX).reader();
        self.copy_body(&mut body, sink, done, buffer)?;
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

    /// Copies the body into the sink until it ends, counting the bytes in
    /// `done` and asking the sink to write back after each `WRITEBACK_STEP`.
    fn copy_body(
        &self,
        body: &mut impl Read,
        sink: &mut dyn DownloadSink,
        done: &mut u64,
        buffer: &mut [u8],
    ) -> Result<(), AttemptError<DownloadError>> {
        loop {
            if self.shutdown.is_requested() {
                return Err(fatal("interrupted".to_string()));
            }
            let read = match body.read(buffer) {
                Ok(0) => return Ok(()),
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                // ureq's own errors (a broken chunk) travel inside the I/O error.
                Err(error) => {
                    return Err(failed_transfer(
                        self.access_url,
                        ureq::Error::from(error),
                        &format!("transfer broke after {done} bytes"),
                    ));
                }
            };
            sink.write_all(&buffer[..read]).map_err(sink_failed)?;
            let before = *done;
            *done += read as u64;
            if before / WRITEBACK_STEP != *done / WRITEBACK_STEP {
                let step_start = (*done / WRITEBACK_STEP - 1) * WRITEBACK_STEP;
                sink.written(step_start, WRITEBACK_STEP);
            }
            self.progress.set_position(*done);
        }
    }

    /// GETs the access URL from byte `offset` on, following redirects here
    /// rather than in ureq, which would take `Location: file:///etc/passwd`
    /// for a path on the same host and fetch that: each hop must be http(s).
    ///
    /// `time_left` (what the retry budget has left) bounds each wait on the
    /// server (connecting, the answer, any one read), so a silent server
    /// cannot keep a one-shot fetch past its budget. The transfer as a whole
    /// is not bounded: one that moves starts the budget again.
    fn get(
        &self,
        offset: u64,
        time_left: Option<Duration>,
    ) -> Result<Response<ureq::Body>, AttemptError<DownloadError>> {
        let config = self.agent.config();
        let within = |timeout: Option<Duration>| match (timeout, time_left) {
            (Some(timeout), Some(left)) => Some(timeout.min(left)),
            (timeout, left) => timeout.or(left),
        };
        let timeouts = config.timeouts();
        let mut url = self.access_url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut request = self
                .agent
                .get(&url)
                // The bytes as stored, never a compressed rendering of them:
                // what lands on disk is what the server holds (a .gz stays
                // gzipped, as with curl), and Content-Length and Range
                // offsets count exactly those bytes.
                .header("Accept-Encoding", "identity");
            if offset > 0 {
                request = request.header("Range", &format!("bytes={offset}-"));
            }
            let started = Instant::now();
            let response = request
                .config()
                .max_redirects(0)
                .timeout_connect(within(timeouts.connect))
                .timeout_recv_response(within(timeouts.recv_response))
                .timeout_per_read(within(config.timeout_per_read()))
                .build()
                .call();
            let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let shown = url_for_log(&url);
            let response = match response {
                Ok(response) => {
                    let status = response.status().as_u16();
                    tracing::debug!(status, ms, offset, "GET {shown}");
                    response
                }
                Err(error) => {
                    tracing::debug!(ms, offset, "GET {shown}: {error}");
                    return Err(failed_transfer(&url, error, "connection error"));
                }
            };
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let Some(location) = response.headers().get("location") else {
                // 304 and friends: not a place to go, and not the file.
                return Ok(response);
            };
            let location = location.to_str().map_err(|_| {
                fatal(format!(
                    "HTTP {} with a Location that is not text",
                    response.status().as_u16()
                ))
            })?;
            url = redirect_target(&url, location)
                .map_err(|refused| AttemptError::Fatal(DownloadError::Redirect(refused)))?;
        }
        Err(fatal(format!(
            "more than {MAX_REDIRECTS} redirects from the access URL"
        )))
    }
}

/// Whether this answer carries the file from where the last attempt stopped
/// (`done` bytes): a resume at that offset, or the whole file again, which
/// empties the sink first (and sets `done` back to 0).
fn check_status(
    response: &Response<ureq::Body>,
    sink: &mut dyn DownloadSink,
    done: &mut u64,
) -> Result<(), AttemptError<DownloadError>> {
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
            return Err(AttemptError::Fatal(DownloadError::Gone(format!(
                "access URL expired or unknown (HTTP {status})"
            ))));
        }
        _ => {
            let reason = response.status().canonical_reason().unwrap_or_default();
            return Err(fatal(
                format!("HTTP {status} {reason}").trim_end().to_string(),
            ));
        }
    }
    Ok(())
}

fn sink_failed(error: std::io::Error) -> AttemptError<DownloadError> {
    AttemptError::Fatal(DownloadError::Sink(error))
}

/// An access URL for a log line: scheme, host and path. The query is left
/// out: it is where a signed URL keeps its signature.
fn url_for_log(url: &str) -> String {
    match url.parse::<ureq::http::Uri>() {
        Ok(uri) => format!("{}{}", origin(url), uri.path()),
        Err(_) => "(unreadable URL)".to_string(),
    }
}

/// `scheme://host[:port]` of a URL, without its credentials, path or query.
fn origin(url: &str) -> String {
    match url.parse::<ureq::http::Uri>() {
        Ok(uri) => format!(
            "{}://{}{}",
            uri.scheme_str().unwrap_or("?"),
            uri.host().unwrap_or("?"),
            uri.port_u16()
                .map(|port| format!(":{port}"))
                .unwrap_or_default(),
        ),
        Err(_) => "(unreadable URL)".to_string(),
    }
}

fn fatal(message: String) -> AttemptError<DownloadError> {
    AttemptError::Fatal(DownloadError::Transfer(message))
}

fn transient(reason: String) -> AttemptError<DownloadError> {
    AttemptError::Transient {
        reason,
        retry_after: None,
    }
}

/// A request or read of `url` that got no usable answer: retried only if
/// the network may do better next time ([`classify_transport`]).
fn failed_transfer(url: &str, error: ureq::Error, what: &str) -> AttemptError<DownloadError> {
    match classify_transport(&error) {
        TransportFailure::PlainHttp => fatal(PlainHttp { url: origin(url) }.to_string()),
        TransportFailure::Transient => transient(format!("{what}: {error}")),
        TransportFailure::Malformed => {
            let detail = match &error {
                ureq::Error::Protocol(protocol) => protocol.to_string(),
                other => other.to_string(),
            };
            fatal(format!("the server sent malformed HTTP: {detail}"))
        }
        TransportFailure::Unusable => fatal(format!("the request cannot be made: {error}")),
    }
}

/// A redirect that is not followed, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct RefusedRedirect {
    location: String,
    why: RedirectProblem,
}

#[derive(Debug, PartialEq, Eq)]
enum RedirectProblem {
    /// Another scheme (`file:`, `ftp:`, `data:`).
    NotHttp(String),
    /// The URL the redirect comes from does not parse, or is not absolute.
    BaseInvalid,
    BaseNotAbsolute,
    /// What it leads to is not a URL.
    NotAUrl,
}

impl std::fmt::Display for RefusedRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused a redirect to {:?}: ", self.location)?;
        match &self.why {
            RedirectProblem::NotHttp(scheme) => write!(
                f,
                "the scheme {scheme}: is not HTTP (only http and https URLs are fetched)"
            ),
            RedirectProblem::BaseInvalid => f.write_str("the URL it comes from is not valid"),
            RedirectProblem::BaseNotAbsolute => {
                f.write_str("the URL it comes from is not absolute")
            }
            RedirectProblem::NotAUrl => f.write_str("not a valid URL"),
        }
    }
}

impl std::error::Error for RefusedRedirect {}

/// The absolute URL a redirect from `base` leads to. Only http(s) is
/// followed: any other scheme (`file:`, `ftp:`, `data:`) is refused, naming
/// the URL, and so is anything that is not a URL.
fn redirect_target(base: &str, location: &str) -> Result<String, RefusedRedirect> {
    let location = location.trim();
    let refuse = |why| RefusedRedirect {
        location: location.to_string(),
        why,
    };
    // RFC 3986 section 3.1: a letter, then letters, digits, `+`, `-` or `.`,
    // then a colon. Without one, the location is relative to `base`.
    let scheme = location
        .split_once(':')
        .map(|(scheme, _)| scheme)
        .filter(|scheme| {
            let mut chars = scheme.chars();
            chars
                .next()
                .is_some_and(|first| first.is_ascii_alphabetic())
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        });
    let target = match scheme {
        Some(scheme)
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            // Schemes are case-insensitive; the request needs lower case.
            let rest = &location[scheme.len()..];
            format!("{}{rest}", scheme.to_ascii_lowercase())
        }
        Some(scheme) => {
            return Err(refuse(RedirectProblem::NotHttp(scheme.to_string())));
        }
        None => {
            let base: Uri = base
                .parse()
                .map_err(|_| refuse(RedirectProblem::BaseInvalid))?;
            let (Some(base_scheme), Some(authority)) = (base.scheme_str(), base.authority()) else {
                return Err(refuse(RedirectProblem::BaseNotAbsolute));
            };
            let origin = format!("{base_scheme}://{authority}");
            let path = base.path();
            if location.starts_with("//") {
                format!("{base_scheme}:{location}")
            } else if location.starts_with('/') {
                format!("{origin}{location}")
            } else if location.starts_with('?') {
                format!("{origin}{path}{location}")
            } else {
                let directory = &path[..path.rfind('/').map_or(0, |slash| slash + 1)];
                format!("{origin}{directory}{location}")
            }
        }
    };
    // A fragment is for the browser; it is never sent.
    let target = target.split('#').next().unwrap_or_default().to_string();
    match target.parse::<Uri>() {
        Ok(uri) if uri.host().is_some_and(|host| !host.is_empty()) => Ok(target),
        _ => Err(refuse(RedirectProblem::NotAUrl)),
    }
}

/// Creates `destination` atomically from what `write` puts into a temporary
/// file next to it. With `overwrite` false an existing file is an error and is
/// left untouched. On any error no file appears under the final name.
///
/// Temporary files of the same name that a killed fly left behind are
/// removed first (see [`create_part_file`]).
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
    let name = destination.file_name().unwrap_or_default();
    remove_stale_part_files(dir, name);
    let already_exists = || anyhow::Error::new(AlreadyExists(destination.to_path_buf()));
    // Checked before the transfer too, so a file that is there is not
    // downloaded for nothing; the rename below is what guarantees it.
    if !overwrite && destination.exists() {
        return Err(already_exists());
    }
    let mut temporary = create_part_file(dir, name)?;
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
        std::io::ErrorKind::AlreadyExists => already_exists(),
        _ => anyhow::Error::new(error.error)
            .context(format!("moving the download to {}", destination.display())),
    })?;
    Ok(written)
}

/// The destination exists and was not to be overwritten.
#[derive(Debug)]
pub struct AlreadyExists(pub PathBuf);

impl std::fmt::Display for AlreadyExists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} already exists", self.0.display())
    }
}

impl std::error::Error for AlreadyExists {}

/// Random characters in a temporary file's name, `.NAME.XXXXXX.part`.
const PART_RANDOM_CHARS: usize = 6;

/// `.NAME.`: how the temporary files of `name` begin.
fn part_prefix(name: &OsStr) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    prefix
}

/// Whether `file_name` is one of fly's temporary files for `name`: exactly
/// `.NAME.` + six letters or digits + `.part` (so `.NAME.x.XXXXXX.part`,
/// which belongs to `NAME.x`, is not).
fn is_part_file_of(file_name: &OsStr, name: &OsStr) -> bool {
    let prefix = part_prefix(name);
    let Some(rest) = file_name.as_bytes().strip_prefix(prefix.as_bytes()) else {
        return false;
    };
    rest.strip_suffix(b".part").is_some_and(|random| {
        random.len() == PART_RANDOM_CHARS && random.iter().all(u8::is_ascii_alphanumeric)
    })
}

/// Creates the temporary file `.NAME.XXXXXX.part` in `dir`, holding an
/// exclusive flock on it until it is closed: after the rename, or when the
/// process dies, however it dies.
///
/// Why a lock: `kill -9` or a power cut leaves the part file behind, and
/// only a later fetch of the same name can clean it up; but another fly
/// process may be fetching that name right now, and its part file looks
/// just the same. The kernel drops a flock when its holder dies, so "nobody
/// holds its lock" is exactly "no live process is writing it": no pid files
/// (pids are reused, and mean nothing across machines sharing a disk), no
/// guessing by age (a slow download is not a dead one). [`remove_stale_part_files`]
/// removes only files whose lock it took. A cleaner can take the lock in the
/// instant between our creating the file and locking it, and then removes
/// it: so once locked, the name must still lead to our file, or we start
/// over with a new one.
fn create_part_file(dir: &Path, name: &OsStr) -> anyhow::Result<tempfile::NamedTempFile> {
    const TRIES: usize = 3;
    for _ in 0..TRIES {
        // 0666 less the umask, as any new file gets (tempfile's default 0600
        // would survive the rename and hide the media from a web server).
        let temporary = tempfile::Builder::new()
            .prefix(&part_prefix(name))
            .suffix(".part")
            .rand_bytes(PART_RANDOM_CHARS)
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        match try_lock_exclusive(temporary.as_file()) {
            Ok(true) if still_named(temporary.path(), temporary.as_file()) => {
                return Ok(temporary);
            }
            // A cleaner has it, or has already removed it: dropping ours
            // removes whatever is left, and the next name is another one.
            Ok(_) => continue,
            // No flock on this file system: nobody else can take the lock
            // either, so no cleaner ever removes this file.
            Err(error) => {
                tracing::debug!("no lock on {}: {error}", temporary.path().display());
                return Ok(temporary);
            }
        }
    }
    anyhow::bail!(
        "creating a temporary file in {}: removed as soon as it was made, {TRIES} times",
        dir.display()
    )
}

/// Removes the temporary files of `name` in `dir` that no live process holds
/// locked: the leftovers of a fly killed mid-download (see
/// [`create_part_file`]). Best effort: one that cannot be opened, locked or
/// removed stays.
fn remove_stale_part_files(dir: &Path, name: &OsStr) {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_file = entry.file_type().is_ok_and(|kind| kind.is_file());
        if !is_file || !is_part_file_of(&entry.file_name(), name) {
            continue;
        }
        let path = entry.path();
        // Opened for writing, as an exclusive lock needs on NFS; never
        // through a symlink, and never blocking on something that turned
        // into a FIFO since the directory was read.
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        // Skipped: held by a live writer, or no longer this regular file
        // under this name (renamed into place, or removed, meanwhile).
        let is_regular = file.metadata().is_ok_and(|found| found.is_file());
        if !is_regular
            || !matches!(try_lock_exclusive(&file), Ok(true))
            || !still_named(&path, &file)
        {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!(
                "removed {}, left by an interrupted download",
                path.display()
            );
        }
    }
}

/// Takes an exclusive flock on `file` without waiting: `Ok(false)` when
/// another open file holds one.
fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(error)) => Err(error),
    }
}

/// Whether `path` still names the open `file` (same device and inode).
fn still_named(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(named), Ok(open)) => named.dev() == open.dev() && named.ino() == open.ino(),
        _ => false,
    }
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
    fn redirects_lead_only_to_http_urls() {
        let base = "http://cdn.example:8080/files/a/photo.jpg?sig=1";
        let followed = [
            ("https://other.example/x.jpg", "https://other.example/x.jpg"),
            ("HTTP://other.example/x", "http://other.example/x"),
            ("//mirror.example/x", "http://mirror.example/x"),
            (
                "/elsewhere?sig=2",
                "http://cdn.example:8080/elsewhere?sig=2",
            ),
            ("b.jpg", "http://cdn.example:8080/files/a/b.jpg"),
            ("?sig=3", "http://cdn.example:8080/files/a/photo.jpg?sig=3"),
            (" /x#fragment ", "http://cdn.example:8080/x"),
        ];
        for (location, expected) in followed {
            assert_eq!(
                redirect_target(base, location).as_deref(),
                Ok(expected),
                "{location}"
            );
        }
        let refused = [
            ("file:///etc/passwd", "scheme file:"),
            ("ftp://h/x", "scheme ftp:"),
            ("data:text/plain,hi", "scheme data:"),
            ("javascript:alert(1)", "scheme javascript:"),
            ("http://", "not a valid URL"),
        ];
        for (location, why) in refused {
            let error = redirect_target(base, location).unwrap_err().to_string();
            assert!(error.contains(location), "{error}");
            assert!(error.contains(why), "{error}");
        }
    }

    #[test]
    fn part_files_are_recognised_by_their_exact_pattern() {
        let name = OsStr::new("a.jpg");
        for yes in [".a.jpg.Ab12Cd.part", ".a.jpg.000000.part"] {
            assert!(is_part_file_of(OsStr::new(yes), name), "{yes}");
        }
        for no in [
            "a.jpg",
            ".a.jpg.part",
            ".a.jpg.Ab12C.part",
            ".a.jpg.Ab12Cde.part",
            ".a.jpg.Ab-2Cd.part",
            ".a.jpg.x.Ab12Cd.part",
            ".b.jpg.Ab12Cd.part",
            ".a.jpg.Ab12Cd.part.bak",
        ] {
            assert!(!is_part_file_of(OsStr::new(no), name), "{no}");
        }
    }

    #[test]
    fn stale_part_files_go_and_locked_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"partial").unwrap();
            path
        };
        let stale = make(".out.bin.Stale1.part");
        let live = make(".out.bin.Live12.part");
        let other = make(".out.bin.x.Stale2.part");
        // Another open file description, as another process would have.
        let writer = File::options().write(true).open(&live).unwrap();
        assert!(try_lock_exclusive(&writer).unwrap());

        save_atomically(
            &dir.path().join("out.bin"),
            false,
            Durability::PageCache,
            |file| {
                file.write_all(b"done")?;
                Ok(4)
            },
        )
        .unwrap();
        assert!(!stale.exists(), "a part file nobody holds is removed");
        assert!(live.exists(), "a part file being written is left alone");
        assert!(other.exists(), "another name's part file is left alone");
        drop(writer);
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
