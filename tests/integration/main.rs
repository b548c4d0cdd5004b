//! The one integration test crate: every test runs the real `fly` binary,
//! usually against a real `fly emulator` on a free loopback port.

mod common;
mod send;
mod signature;
