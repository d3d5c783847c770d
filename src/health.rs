//! Health checks: what a job asks its agent to probe, and the health a task record carries.
//!
//! A running process is not a working service: a replica can hang, deadlock or lose its backend while its
//! container stays up. Rolling updates, drains and (later) discovery all need to tell a healthy replica from a
//! hung one, so the agent that runs the task probes it and writes the result into the task record, one write
//! per transition (never one per probe).
//!
//! What an unhealthy replica leads to, in order (Nomad's `check_restart` followed by `reschedule`, which
//! Kubernetes' liveness probes lack): the agent restarts it in place under the job's restart policy; once the
//! restarts are spent the task ends `failed` with the check's message, and the controller hands it back to its
//! scheduler, which prefers another node than the one it failed on.

use serde::{Deserialize, Serialize};

/// One probe of a job's tasks. A task is healthy when every one of its checks passes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Shown in messages and events (`http`, `tcp`, `exec`, or the name the job file gives).
    pub name: String,
    pub probe: Probe,
    /// Time between two probes.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// A probe that takes longer than this failed.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive passes that make a starting or unhealthy task healthy.
    #[serde(default = "one")]
    pub healthy_threshold: u32,
    /// Consecutive failures that make a task unhealthy.
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
    /// After a run starts, failures count only once this has passed (a slow start is not a failure).
    #[serde(default)]
    pub grace_ms: u64,
    /// Whether turning unhealthy restarts the task (under its restart policy). When false, the health is only
    /// reported: updates and discovery still treat the task as unhealthy.
    #[serde(default = "yes")]
    pub restart: bool,
}

fn default_interval_ms() -> u64 {
    10_000
}
fn default_timeout_ms() -> u64 {
    2_000
}
fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}
fn yes() -> bool {
    true
}

impl HealthCheck {
    /// A check with the defaults (10 s interval, 2 s timeout, healthy after 1 pass, unhealthy after 3 failures,
    /// no grace, restarts on unhealthy).
    pub fn new(name: &str, probe: Probe) -> Self {
        HealthCheck {
            name: name.to_string(),
            probe,
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            healthy_threshold: 1,
            unhealthy_threshold: 3,
            grace_ms: 0,
            restart: true,
        }
    }
}

/// What a check does. Ports are the task's, on the node (tasks share the node's network namespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Probe {
    /// `GET http://127.0.0.1:<port><path>`; passes on `expect_status`, or on any 2xx/3xx when none is given.
    Http {
        port: u16,
        #[serde(default = "root")]
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect_status: Option<u16>,
    },
    /// A TCP connection to `127.0.0.1:<port>` is accepted.
    Tcp { port: u16 },
    /// The command, run inside the task's container, exits 0.
    Exec { command: Vec<String> },
}

fn root() -> String {
    "/".to_string()
}

/// A task's health as its agent last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Running, but not yet passed its checks `healthy_threshold` times.
    Starting,
    Healthy,
    Unhealthy,
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HealthStatus::Starting => "starting",
            HealthStatus::Healthy => "healthy",
            HealthStatus::Unhealthy => "unhealthy",
        })
    }
}

/// The health field of a task record. Written by the agent on each transition only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    /// When it last changed (what `min_healthy_time` counts from).
    pub since_ms: u64,
    /// The failing check's output or error, in words; empty while healthy.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}
