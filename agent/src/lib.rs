//! Omega's node agent.
//!
//! - [`agent`]: the agent loop: register the node, keep it alive, run its assignments, report their states.
//! - [`daemon`]: a private containerd (the local cell's, and the tests').
//! - [`containerd`]: the container runtime, containerd's gRPC API (run, wait, stop, remove, list).
//! - [`image`]: loading images into containerd from OCI tarballs (no registry), and building the tiny
//!   busybox image tests and the local cell use.
//! - [`logs`]: the gRPC log service `omctl logs` streams from.
//! - [`simulated`]: many virtual nodes in one process, running tasks as timers, for scale tests.

pub mod agent;
pub mod containerd;
pub mod daemon;
pub mod image;
pub mod logs;
pub mod simulated;
