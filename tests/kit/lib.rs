//! Omega's test kit: what every integration test needs to run against real parts, and nothing that ships.
//!
//! - [`etcd`]: a real etcd per test, a seeded cell, a TCP proxy that cuts a client off, a convergence check;
//! - [`procs`]: the workspace's binaries as child processes (signals, logs, SIGKILL on drop);
//! - [`space`]: filling etcd's space quota and freeing it again;
//! - [`tls`]: an etcd that requires client certificates, its roles made by `deploy/tls/`'s scripts;
//! - [`metrics`]: scraping a process's Prometheus metrics;
//! - [`wait`]: polling a condition with a bound, instead of sleeping and hoping.
//!
//! The core library's own integration tests live beside this kit (`tests/*.rs`); the other crates use it as
//! a dev-dependency.

pub mod etcd;
pub mod metrics;
pub mod procs;
pub mod space;
pub mod tls;
pub mod wait;

pub use etcd::*;
pub use space::{fill_until_no_space, free_space};
pub use wait::wait_for;
