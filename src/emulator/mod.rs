//! The local Fly Bot API (SPEC section 4). Placeholder until it lands.

use std::net::IpAddr;

pub struct EmulatorConfig {
    pub bind: IpAddr,
    pub port: u16,
    /// The only accepted bearer token; `None` accepts any non-empty token.
    pub token: Option<String>,
}

pub fn run_until_signal(_config: EmulatorConfig) -> anyhow::Result<()> {
    Err(crate::exit::usage("`fly emulator` is not implemented yet"))
}
