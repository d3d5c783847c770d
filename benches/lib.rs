//! What Omega's benchmark programs share: the cell they build ([`cell`]), the measurement window and what it
//! counts ([`window`]), and the ceiling etcd itself offers for a claim's write shape ([`raw_ceiling`]).
//!
//! A library rather than code inside each benchmark, so that every program that sets Omega's commit rate next
//! to etcd's (the `commit_throughput` bench, the `omega-bench` program) measures that ceiling one way, with
//! the core library's own key layout and records.

pub mod cell;
pub mod raw_ceiling;
pub mod window;
