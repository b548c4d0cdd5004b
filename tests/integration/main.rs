//! The one integration test crate: every test runs the real `fly` binary,
//! usually against a real `fly emulator` on a loopback port it chose
//! itself (port 0, read back from its first line).

mod api_command;
mod browser;
mod cli;
mod common;
mod demo;
mod doctor;
mod emulator;
mod emulator_cli;
mod exec;
mod exec_answers;
mod fetch_media;
mod forward;
mod full_disk;
mod handler_bounds;
mod inspect;
mod intake;
mod metrics;
mod notify;
mod parking;
mod poll_echo;
mod profiles;
mod prometheus;
mod readme;
mod redis;
mod reference;
mod send;
mod serve_webhook;
mod signature;
mod state_roles;
mod systemd_units;
mod worker;
