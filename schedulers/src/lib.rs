//! Omega's scheduler processes. One binary, two schedulers (`--kind batch|service`), as many instances of
//! each as wanted, side by side on one cell with no leader: only optimistic commits in etcd. For comparison it
//! also runs the Omega paper's baselines: a monolithic scheduler (`--kind monolithic`) and pessimistic
//! concurrency (`--lock`).
//!
//! - [`attempt`] - one attempt: decide -> commit -> learn -> explain.
//! - [`config`] - flags.
//! - [`controller`] - the cell controller (lost nodes, service replicas, batch completion), leader-elected.
//! - [`instance`] - this process's lease and record in etcd.
//! - [`lock`] - the cell lock `--lock` holds around each attempt (the pessimistic baseline).
//! - [`metrics`] - what the scheduler's Prometheus metrics mean (their help text).
//! - [`ownership`] - which instance places which job (lease-bound claims, rendezvous hashing).
//! - [`scheduler`] - the loop: decide on the cached cell, commit, re-place conflicts, explain what is left.
//! - [`status`] - pending reasons, written only when they change.

pub mod attempt;
pub mod config;
pub mod controller;
pub mod instance;
pub mod lock;
pub mod metrics;
pub mod ownership;
pub mod scheduler;
pub mod status;
