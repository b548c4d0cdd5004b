//! The HTTP clients fly makes (ureq, blocking), from one builder, by the
//! role each plays. Every one reads a non-2xx answer as an answer
//! (`http_status_as_error(false)`): the caller decides what it means.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use ureq::Agent;

pub enum Profile<'a> {
    /// The Bot API and its downloads: proxies from the environment
    /// honoured (a platform is reached the way the machine reaches the
    /// internet), redirects followed (download URLs may move).
    Platform {
        connect_timeout: Duration,
        /// Between two reads; a long poll sets its own per call.
        read_timeout: Duration,
    },
    /// A webhook receiver: reached directly, never through a proxy (most
    /// are on this machine or network), and a redirect is its answer, not
    /// a place to go (following it would turn the POST into a bodyless GET
    /// whose 2xx looks like a delivery).
    Receiver(ReceiverClient<'a>),
    /// The local emulator's control API: no proxy.
    Local { timeout: Duration },
}

/// How a client of webhook receivers behaves.
pub struct ReceiverClient<'a> {
    pub connect_timeout: Duration,
    /// The longest a receiver gets to answer one delivery.
    pub answer_timeout: Duration,
    /// Trusted instead of the system's roots (`fly forward --to-ca`).
    pub trusted: Option<&'a [CertificateDer<'static>]>,
    pub user_agent: &'static str,
}

/// fly's own name and version, as every profile but the emulator's sends it.
pub const USER_AGENT: &str = concat!("fly/", env!("CARGO_PKG_VERSION"));

pub fn agent(profile: Profile) -> Agent {
    let config = Agent::config_builder().http_status_as_error(false);
    match profile {
        Profile::Platform {
            connect_timeout,
            read_timeout,
        } => config
            .timeout_connect(Some(connect_timeout))
            .timeout_per_read(Some(read_timeout))
            .user_agent(USER_AGENT)
            .build()
            .new_agent(),
        Profile::Receiver(ReceiverClient {
            connect_timeout,
            answer_timeout,
            trusted,
            user_agent,
        }) => {
            let mut config = config
                .max_redirects(0)
                .proxy(None)
                .timeout_connect(Some(connect_timeout))
                .timeout_global(Some(answer_timeout))
                .user_agent(user_agent);
            if let Some(certificates) = trusted {
                let roots = certificates
                    .iter()
                    .map(|certificate| ureq::tls::Certificate::from_der(certificate).to_owned())
                    .collect();
                config = config.tls_config(
                    ureq::tls::TlsConfig::builder()
                        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
                        .build(),
                );
            }
            config.build().new_agent()
        }
        Profile::Local { timeout } => config
            .proxy(None)
            .timeout_global(Some(timeout))
            .user_agent(USER_AGENT)
            .build()
            .new_agent(),
    }
}

/// Whether a request to an `https://` URL failed because the server does not
/// speak TLS: rustls reads a plain-HTTP answer to its handshake
/// (`HTTP/1.1 400 …`) as a record of an unknown content type. Not transient:
/// the server answers the same way every time. The one place this is
/// recognised; every client's retry classification asks here.
pub fn answered_plain_http(error: &ureq::Error) -> bool {
    use tokio_rustls::rustls;
    let tls = match error {
        ureq::Error::Rustls(tls) => Some(tls),
        ureq::Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    matches!(
        tls,
        Some(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
        ))
    )
}

/// An `https://` URL whose server answered in plain HTTP; says which URL to
/// use instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainHttp {
    /// The `https://` URL as it was given.
    pub url: String,
}

impl fmt::Display for PlainHttp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rest = self.url.strip_prefix("https://").unwrap_or(&self.url);
        write!(
            f,
            "the server at {} answered plain HTTP: use http://{rest}",
            self.url
        )
    }
}

impl std::error::Error for PlainHttp {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_says_which_url_to_use() {
        let said = PlainHttp {
            url: "https://127.0.0.1:8787".into(),
        };
        assert_eq!(
            said.to_string(),
            "the server at https://127.0.0.1:8787 answered plain HTTP: use http://127.0.0.1:8787"
        );
    }

    #[test]
    fn only_a_record_of_unknown_type_is_plain_http() {
        use tokio_rustls::rustls;
        let wrapped = |error: rustls::Error| ureq::Error::Io(std::io::Error::other(error));
        let unknown_type =
            || rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType);
        assert!(answered_plain_http(&wrapped(unknown_type())));
        assert!(answered_plain_http(&ureq::Error::Rustls(unknown_type())));
        assert!(!answered_plain_http(&wrapped(rustls::Error::DecryptError)));
        assert!(!answered_plain_http(&ureq::Error::ConnectionFailed));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!answered_plain_http(&ureq::Error::Io(refused)));
    }
}
