//! The HTTP clients fly makes (ureq, blocking), from one builder, by the
//! role each plays. Every one reads a non-2xx answer as an answer
//! (`http_status_as_error(false)`): the caller decides what it means.

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
