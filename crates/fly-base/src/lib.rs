//! The smallest pieces every layer of fly uses: the wall clock in the
//! platform's unit, randomness from the operating system, and locking that
//! survives a panic. No I/O beyond the clock and the OS random source.

pub mod backoff;
pub mod clock;
pub mod random;
pub mod sync;
