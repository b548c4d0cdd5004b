//! `fly`: every tool of the Fly Bot API examples page in one binary.
//!
//! The binary (`main.rs`) is a thin shell around this library; benchmarks and
//! tests reach the pure parts (canonical JSON, signatures, retry policy) here.
//! Data flows one way: `cli` → `commands` → `api` / `signature` / `emulator`.

pub mod api;
pub mod bot;
pub mod children;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod delivery;
pub mod download;
pub mod emulator;
pub mod exit;
pub mod http_client;
pub mod http_server;
pub mod logging;
pub mod output;
pub mod progress;
pub mod random;
pub mod retry;
pub mod shutdown;
pub mod signature;
pub mod small_file;
pub mod state;
pub mod sync;
pub mod webhook;
