//! `fly send` against the emulator.
