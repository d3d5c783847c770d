//! Quantities and times, read and shown: CPU in millicores, memory in bytes, durations in milliseconds.
//!
//! Every component speaks these: job files and flags are read with [`parse`], tables, job files printed back
//! and logs are written with [`show`]. One home each, so `1.5Gi` means the same thing everywhere.

pub mod parse;
pub mod show;

pub use parse::{parse_cpu, parse_duration, parse_duration_ms, parse_memory};
pub use show::*;
