//! Downloadable media: what a registered URL holds, the `Range` header, and
//! the streaming response body that serves it.
//!
//! A file registered by size is never materialised: its content is a fixed
//! pattern, **byte `i` is `(i % 251) as u8`**, so tests in any language can
//! recompute what they should have received, and a 1 GiB file costs the
//! emulator no more memory than a 1 KiB one. 251 is prime, so a chunk or an
//! off-by-one shift never lines up with the pattern by accident.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Size of the chunks a download is streamed in.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Period of the deterministic content of files registered by size.
const PATTERN_PERIOD: u64 = 251;

/// What a registered media URL downloads as.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaContent {
    /// Bytes given as `content_base64`.
    Stored(Bytes),
    /// `size` bytes of the deterministic pattern (see the module header).
    Pattern { size: u64 },
}

impl MediaContent {
    pub fn size(&self) -> u64 {
        match self {
            MediaContent::Stored(bytes) => bytes.len() as u64,
            MediaContent::Pattern { size } => *size,
        }
    }

    /// The `len` bytes starting at `position` (`len <= CHUNK_BYTES`), without copying.
    fn chunk(&self, position: u64, len: usize) -> Bytes {
        match self {
            MediaContent::Stored(bytes) => {
                // Positions come from `MediaBody`, which stays within `size()`.
                let start = position as usize;
                bytes.slice(start..start + len)
            }
            MediaContent::Pattern { .. } => {
                let start = (position % PATTERN_PERIOD) as usize;
                pattern_source().slice(start..start + len)
            }
        }
    }
}

/// One chunk's worth of the pattern plus one period, so every chunk of a
/// pattern file is a slice of it whatever its starting offset.
fn pattern_source() -> &'static Bytes {
    static SOURCE: OnceLock<Bytes> = OnceLock::new();
    SOURCE.get_or_init(|| {
        (0..CHUNK_BYTES as u64 + PATTERN_PERIOD)
            .map(|index| (index % PATTERN_PERIOD) as u8)
            .collect::<Vec<u8>>()
            .into()
    })
}

/// What a download request's `Range` header asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: serve the whole file with 200 (RFC 9110 lets a server
    /// ignore a range it does not support, e.g. several ranges).
    Whole,
    /// Bytes `start..=end` with 206.
    Part { start: u64, end: u64 },
    /// A range that starts past the end: 416.
    Unsatisfiable,
}

/// Interprets a `Range` header value against a file of `size` bytes. Supports
/// one range in the forms `bytes=N-`, `bytes=N-M` and `bytes=-K`.
pub fn parse_range(header: &str, size: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |text: &str| text.parse::<u64>().ok();
    match (first.is_empty(), last.is_empty()) {
        // bytes=-K: the last K bytes.
        (true, false) => match number(last) {
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if size == 0 => RangeRequest::Unsatisfiable,
            Some(suffix) => RangeRequest::Part {
                start: size.saturating_sub(suffix),
                end: size - 1,
            },
            None => RangeRequest::Whole,
        },
        (false, _) => {
            let Some(start) = number(first) else {
                return RangeRequest::Whole;
            };
            let end = if last.is_empty() {
                None
            } else {
                match number(last) {
                    Some(end) if end >= start => Some(end),
                    _ => return RangeRequest::Whole,
                }
            };
            if start >= size {
                return RangeRequest::Unsatisfiable;
            }
            RangeRequest::Part {
                start,
                end: end.map_or(size - 1, |end| end.min(size - 1)),
            }
        }
        (true, true) => RangeRequest::Whole,
    }
}

/// A response body that produces a file's bytes chunk by chunk as the
/// connection can take them, so memory stays flat whatever the file size.
pub struct MediaBody {
    content: MediaContent,
    position: u64,
    /// One past the last byte to send.
    end: u64,
    /// Fault injection: fail the body once this position is reached, after
    /// the full `Content-Length` was announced.
    cut_at: Option<u64>,
}

impl MediaBody {
    /// Bytes `start..end` of `content`; `cut_at` (within that span) ends the
    /// stream early with an error, which makes hyper close the connection.
    pub fn new(content: MediaContent, start: u64, end: u64, cut_at: Option<u64>) -> MediaBody {
        let end = end.min(content.size());
        MediaBody {
            content,
            position: start.min(end),
            end,
            cut_at,
        }
    }

    fn stop_at(&self) -> u64 {
        self.cut_at.map_or(self.end, |cut| cut.min(self.end))
    }
}

impl Body for MediaBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let body = self.get_mut();
        let stop_at = body.stop_at();
        if body.position >= stop_at {
            if body.position < body.end {
                // Report the cut once; the connection is gone after this.
                body.end = body.position;
                return Poll::Ready(Some(Err(io::Error::other(
                    "download cut short by fault injection (download_cut_rate)",
                ))));
            }
            return Poll::Ready(None);
        }
        let len = (stop_at - body.position).min(CHUNK_BYTES as u64) as usize;
        let chunk = body.content.chunk(body.position, len);
        body.position += len as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.position >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn pattern_byte(index: u64) -> u8 {
        (index % 251) as u8
    }

    /// Drives a body to its end on the current thread; `Err` if it failed.
    fn collect(body: MediaBody) -> Result<Vec<u8>, io::Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut body = body;
            let mut out = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                if let Ok(data) = frame.into_data() {
                    assert!(data.len() <= CHUNK_BYTES);
                    out.extend_from_slice(&data);
                }
            }
            Ok(out)
        })
    }

    #[test]
    fn pattern_files_stream_the_documented_bytes() {
        let size = 3 * CHUNK_BYTES as u64 + 17;
        let bytes = collect(MediaBody::new(
            MediaContent::Pattern { size },
            0,
            size,
            None,
        ))
        .unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert!(
            bytes
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern_byte(i as u64))
        );
    }

    #[test]
    fn a_part_of_a_pattern_file_keeps_absolute_positions() {
        let content = MediaContent::Pattern { size: 1_000_000 };
        let bytes = collect(MediaBody::new(content, 999_000, 1_000_000, None)).unwrap();
        assert_eq!(bytes.len(), 1000);
        assert!(
            bytes
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern_byte(999_000 + i as u64))
        );
    }

    #[test]
    fn stored_files_stream_their_bytes() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let content = MediaContent::Stored(Bytes::from(data.clone()));
        assert_eq!(
            collect(MediaBody::new(content.clone(), 0, 200_000, None)).unwrap(),
            data
        );
        assert_eq!(
            collect(MediaBody::new(content, 150_000, 200_000, None)).unwrap(),
            data[150_000..]
        );
        let empty = MediaBody::new(MediaContent::Stored(Bytes::new()), 0, 0, None);
        assert!(collect(empty).unwrap().is_empty());
    }

    #[test]
    fn a_cut_body_fails_after_the_cut() {
        let content = MediaContent::Pattern { size: 1000 };
        let body = MediaBody::new(content, 0, 1000, Some(500));
        assert_eq!(body.size_hint().exact(), Some(1000));
        assert!(collect(body).is_err());
    }

    #[test]
    fn ranges() {
        use RangeRequest::*;
        let cases: &[(&str, u64, RangeRequest)] = &[
            (
                "bytes=100-",
                1000,
                Part {
                    start: 100,
                    end: 999,
                },
            ),
            ("bytes=0-", 1000, Part { start: 0, end: 999 }),
            ("bytes=10-19", 1000, Part { start: 10, end: 19 }),
            (
                "bytes=990-2000",
                1000,
                Part {
                    start: 990,
                    end: 999,
                },
            ),
            (
                "bytes=-10",
                1000,
                Part {
                    start: 990,
                    end: 999,
                },
            ),
            ("bytes=-5000", 1000, Part { start: 0, end: 999 }),
            ("bytes=1000-", 1000, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=-0", 1000, Unsatisfiable),
            ("bytes=5-1", 1000, Whole),
            ("bytes=0-1,5-6", 1000, Whole),
            ("items=0-", 1000, Whole),
            ("bytes=abc-", 1000, Whole),
            ("bytes=-", 1000, Whole),
        ];
        for (header, size, expected) in cases {
            assert_eq!(&parse_range(header, *size), expected, "{header} of {size}");
        }
    }
}
