//! Omega's node agent.
//!
//! - [`agent`]: the agent loop: register the node, keep it alive, follow its assignments with one runner each.
//! - [`runner`]: one task's life on the node, a state machine an agent crash cannot make run a task twice.
//! - [`supervisor`]: starts a failed runner again, with backoff, until its work is done.
//! - [`runners`]: which runners are alive (what preemption waits on).
//! - [`health`]: probing a running task's health checks (http, tcp, exec) and deciding its health from them.
//! - [`endpoints`]: what the node publishes for discovery (its healthy tasks' endpoints, on its lease).
//! - [`fence`]: an agent cut off from etcd stops its tasks before its lease can expire.
//! - [`preemption`]: a preempting task starts only once the tasks it evicted are gone from the node.
//! - [`daemon`]: a private containerd (the local cell's, and the tests').
//! - [`containerd`]: the container runtime, containerd's gRPC API (run, wait, stop, remove, list).
//! - [`image`]: loading images into containerd from OCI tarballs (no registry), and building the tiny
//!   busybox image tests and the local cell use.
//! - [`logs`]: the gRPC log service `omctl logs` streams from.
//! - [`simulated`]: many virtual nodes in one process, running tasks as timers, for scale tests.
//! - [`error`]: the library's error type.

pub mod agent;
pub mod containerd;
pub mod daemon;
pub mod endpoints;
pub mod error;
pub mod fence;
pub mod health;
pub mod image;
pub mod logs;
pub mod preemption;
pub mod runner;
pub mod runners;
pub mod simulated;
pub mod supervisor;
