//! Small files named on the command line (tokens, secrets, certificates,
//! keys): read whole, but only regular files and only up to a cap. A path
//! mistyped to a FIFO, a device or a log then fails at once with one line,
//! instead of blocking forever (a FIFO with no writer) or filling memory
//! (`/dev/zero`).
//!
//! Errors are typed and name no flag: the command that was given the path
//! says which option it came from (`commands::credentials::read_given`).

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use rustls_pki_types::pem::{self, PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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

/// Why a PEM file (a certificate chain, a private key) cannot be used.
#[derive(Debug)]
pub enum PemError {
    File(SmallFileError),
    /// Certificate `number` (from 1) is not a PEM block.
    CertificateNotPem {
        number: usize,
        error: pem::Error,
    },
    /// Certificate `number` is PEM but not a certificate rustls can use.
    CertificateBroken {
        number: usize,
        error: tokio_rustls::rustls::Error,
    },
    NoCertificate,
    KeyNotPem(pem::Error),
    KeyUnreadable(pem::Error),
    /// The key is protected by a passphrase.
    KeyEncrypted,
    /// The file holds a certificate where a key was expected.
    CertificateInsteadOfKey,
    NoKey,
}

impl PemError {
    /// The one line for the file `path`, given with `flag`.
    pub fn message(&self, flag: &str, path: &Path) -> String {
        let shown = path.display();
        match self {
            PemError::File(error) => error.message(flag, path),
            PemError::CertificateNotPem { number, error } => {
                format!("{flag} {shown}: certificate {number} is not valid PEM: {error}")
            }
            PemError::CertificateBroken { number, error } => {
                format!("{flag} {shown}: certificate {number} is broken: {error}")
            }
            PemError::NoCertificate => {
                format!("{flag} {shown}: no certificate found (PEM, -----BEGIN CERTIFICATE-----)")
            }
            PemError::KeyNotPem(error) => format!("{flag} {shown}: not valid PEM: {error}"),
            PemError::KeyUnreadable(error) => format!("{flag} {shown}: {error}"),
            PemError::KeyEncrypted => format!(
                "{flag} {shown} is encrypted: fly needs the key without a passphrase \
                 (openssl pkey -in {shown} -out key.pem)"
            ),
            PemError::CertificateInsteadOfKey => {
                format!("{flag} {shown} holds a certificate, not a private key")
            }
            PemError::NoKey => {
                format!("{flag} {shown}: no private key found (PEM, -----BEGIN PRIVATE KEY-----)")
            }
        }
    }
}

/// Every certificate of the PEM file at `path`, each one parsed: a broken
/// block is refused at start, not found out by a failed handshake later.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = read_small_file(path, MAX_PEM_FILE_BYTES).map_err(PemError::File)?;
    let mut certificates = Vec::new();
    for (index, block) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let number = index + 1;
        let certificate = block.map_err(|error| PemError::CertificateNotPem { number, error })?;
        tokio_rustls::rustls::server::ParsedCertificate::try_from(&certificate)
            .map_err(|error| PemError::CertificateBroken { number, error })?;
        certificates.push(certificate);
    }
    if certificates.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certificates)
}

/// The private key in the PEM file at `path`; when there is none, what the
/// file holds instead (an encrypted key, a certificate).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = read_small_file(path, MAX_PEM_FILE_BYTES).map_err(PemError::File)?;
    let mut holds_certificate = false;
    for block in <(SectionKind, Vec<u8>)>::pem_slice_iter(&pem) {
        let (kind, _) = block.map_err(PemError::KeyNotPem)?;
        match kind {
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                return PrivateKeyDer::from_pem_slice(&pem).map_err(PemError::KeyUnreadable);
            }
            SectionKind::Certificate => holds_certificate = true,
            _ => {}
        }
    }
    let text = String::from_utf8_lossy(&pem);
    Err(
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            PemError::KeyEncrypted
        } else if holds_certificate {
            PemError::CertificateInsteadOfKey
        } else {
            PemError::NoKey
        },
    )
}

/// Opens for reading without waiting for a FIFO's writer: the type is
/// checked on the open file (no gap between a check and the open), and a
/// regular file reads the same either way.
fn open_without_blocking(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    options.custom_flags(libc::O_NONBLOCK);
    options.open(path)
}

fn describe(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_fifo() {
        return "a FIFO (named pipe)";
    }
    if file_type.is_char_device() || file_type.is_block_device() {
        return "a device";
    }
    if file_type.is_socket() {
        return "a socket";
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
