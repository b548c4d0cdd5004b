//! Small files named on the command line (tokens, secrets, certificates,
//! keys): read whole, but only regular files and only up to a cap. A path
//! mistyped to a FIFO, a device or a log then fails at once with one line,
//! instead of blocking forever (a FIFO with no writer) or filling memory
//! (`/dev/zero`).

use std::fmt;
use std::io::Read;
use std::path::Path;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::exit::usage;

/// A certificate chain or key file is a few KiB; a larger one was named by mistake.
pub const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Debug)]
pub enum SmallFileError {
    /// A FIFO, a device, a directory, a socket: named by mistake.
    NotRegular(&'static str),
    /// Larger than the cap (in bytes).
    TooLarge(u64),
    Io(std::io::Error),
}

impl fmt::Display for SmallFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmallFileError::NotRegular(kind) => write!(f, "is {kind}, not a regular file"),
            SmallFileError::TooLarge(cap) => {
                write!(
                    f,
                    "is larger than {} KiB: is it the right file?",
                    cap / 1024
                )
            }
            SmallFileError::Io(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for SmallFileError {}

impl SmallFileError {
    /// The one line for the file `path`, given with `flag`.
    pub fn message(&self, flag: &str, path: &Path) -> String {
        let shown = path.display();
        match self {
            SmallFileError::Io(error) => format!("cannot read {flag} {shown}: {error}"),
            other => format!("{flag} {shown} {other}"),
        }
    }
}

/// The bytes of the regular file at `path`, at most `cap` of them.
pub fn read_small_file(path: &Path, cap: u64) -> Result<Vec<u8>, SmallFileError> {
    let file = open_without_blocking(path).map_err(SmallFileError::Io)?;
    let file_type = file.metadata().map_err(SmallFileError::Io)?.file_type();
    if !file_type.is_file() {
        return Err(SmallFileError::NotRegular(describe(file_type)));
    }
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(SmallFileError::Io)?;
    if bytes.len() as u64 > cap {
        return Err(SmallFileError::TooLarge(cap));
    }
    Ok(bytes)
}

/// [`read_small_file`] for the file given with `flag`: a file that cannot be
/// used is bad input (exit 2), one line naming the flag and the path.
pub fn read_given(path: &Path, cap: u64, flag: &str) -> anyhow::Result<Vec<u8>> {
    read_small_file(path, cap).map_err(|error| usage(error.message(flag, path)))
}

/// Every certificate of the PEM file given with `flag`, each one parsed: a
/// broken block is refused at start (exit 2, naming it), not found out by a
/// failed handshake later.
pub fn read_certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_given(path, MAX_PEM_FILE_BYTES, flag)?;
    let shown = path.display();
    let mut certificates = Vec::new();
    for (index, block) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let number = index + 1;
        let certificate = block.map_err(|error| {
            usage(format!(
                "{flag} {shown}: certificate {number} is not valid PEM: {error}"
            ))
        })?;
        tokio_rustls::rustls::server::ParsedCertificate::try_from(&certificate).map_err(
            |error| {
                usage(format!(
                    "{flag} {shown}: certificate {number} is broken: {error}"
                ))
            },
        )?;
        certificates.push(certificate);
    }
    if certificates.is_empty() {
        return Err(usage(format!(
            "{flag} {shown}: no certificate found (PEM, -----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(certificates)
}

/// Opens for reading without waiting for a FIFO's writer: the type is
/// checked on the open file (no gap between a check and the open), and a
/// regular file reads the same either way.
fn open_without_blocking(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    options.open(path)
}

fn describe(file_type: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if file_type.is_char_device() || file_type.is_block_device() {
            return "a device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        return "a directory";
    }
    "not a file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_directories_are_refused_and_large_files_capped() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_small_file(Path::new("/dev/zero"), 1024),
            Err(SmallFileError::NotRegular("a device"))
        ));
        assert!(matches!(
            read_small_file(dir.path(), 1024),
            Err(SmallFileError::NotRegular("a directory"))
        ));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 2048]).unwrap();
        assert!(matches!(
            read_small_file(&big, 1024),
            Err(SmallFileError::TooLarge(1024))
        ));
        assert_eq!(read_small_file(&big, 2048).unwrap().len(), 2048);
    }

    #[test]
    fn a_fifo_without_a_writer_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read_small_file(&fifo, 1024),
            Err(SmallFileError::NotRegular("a FIFO (named pipe)"))
        ));
    }
}
