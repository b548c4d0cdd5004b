//! `fly`: every tool of the Fly Bot API examples page in one binary.
//!
//! The binary (`main.rs`) is a thin shell around this library. Only what
//! `main` needs is public: the command line (`cli`, which the tests also read
//! for `--help`), the commands, exit codes, logging and the handler reaper.
//! Everything else is internal (`pub(crate)`), so the compiler reports code
//! nothing uses. Layers and where each idea lives: ARCHITECTURE.md.

pub(crate) mod api;
pub(crate) mod bot;
pub mod children;
pub mod cli;
pub mod commands;
pub(crate) mod delivery;
pub(crate) mod download;
pub(crate) mod emulator;
pub mod exit;
pub(crate) mod explain;
pub(crate) mod http_client;
pub(crate) mod http_server;
pub(crate) mod inspect;
pub mod logging;
pub(crate) mod observe;
pub mod output;
pub mod profiles;
pub(crate) mod progress;
pub(crate) mod retry;
pub(crate) mod service_manager;
pub(crate) mod shutdown;
pub(crate) mod small_file;
pub(crate) mod webhook;
