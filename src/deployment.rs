//! How a service moves from one version to the next: the job file's `update` policy, and the deployment record
//! the controller keeps in the job while it rolls a version out.
//!
//! The semantics are Nomad's `update` block, with two of its users' complaints fixed by construction:
//! - new replicas are started **beside** the old ones and an old replica is stopped only once a new one has
//!   been healthy for `min_healthy_time`, so a failed update never costs a healthy old replica (nomad #6864)
//!   and the job never has fewer healthy replicas than `count - max_parallel`;
//! - an automatic revert goes straight back to the last stable version, without a canary phase (nomad #10882).

use serde::{Deserialize, Serialize};

/// A job file's `update:` block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatePolicy {
    /// New replicas started at once (beside the old ones), and the most old replicas that may be away at once.
    #[serde(default = "one")]
    pub max_parallel: u32,
    /// How long a new replica must stay healthy before it counts (and an old one is stopped for it).
    #[serde(default = "ten_seconds")]
    pub min_healthy_time_ms: u64,
    /// A new replica not healthy this long after it was placed fails the deployment.
    #[serde(default = "five_minutes")]
    pub healthy_deadline_ms: u64,
    /// The deployment fails when no replica turned healthy for this long.
    #[serde(default = "ten_minutes")]
    pub progress_deadline_ms: u64,
    /// Replicas of the new version started beside all old ones first; the update waits for `omctl promote`
    /// (or `auto_promote`) once they are healthy. `canary` = count is a blue/green deployment.
    #[serde(default)]
    pub canary: u32,
    /// Promote the canaries by itself once they are all healthy.
    #[serde(default)]
    pub auto_promote: bool,
    /// When the deployment fails, go back to the last stable version (without a canary phase).
    #[serde(default)]
    pub auto_revert: bool,
}

fn one() -> u32 {
    1
}
fn ten_seconds() -> u64 {
    10_000
}
fn five_minutes() -> u64 {
    300_000
}
fn ten_minutes() -> u64 {
    600_000
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            max_parallel: 1,
            min_healthy_time_ms: ten_seconds(),
            healthy_deadline_ms: five_minutes(),
            progress_deadline_ms: ten_minutes(),
            canary: 0,
            auto_promote: false,
            auto_revert: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Replacing old replicas (or placing canaries).
    Running,
    /// Canaries are healthy; waiting for `omctl promote`.
    AwaitingPromotion,
    /// Every replica runs the new version and was healthy; the version is now stable.
    Succeeded,
    /// A deadline passed or a new replica stayed unhealthy; nothing more is replaced. With `auto_revert`, a
    /// revert deployment follows.
    Failed,
    /// A newer version was submitted before this one finished.
    Superseded,
    /// Cancelled with the job.
    Cancelled,
}

impl DeploymentState {
    pub fn is_active(self) -> bool {
        matches!(self, DeploymentState::Running | DeploymentState::AwaitingPromotion)
    }
}

impl std::fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeploymentState::Running => "running",
            DeploymentState::AwaitingPromotion => "awaiting promotion",
            DeploymentState::Succeeded => "succeeded",
            DeploymentState::Failed => "failed",
            DeploymentState::Superseded => "superseded",
            DeploymentState::Cancelled => "cancelled",
        })
    }
}

/// The rollout of one version, kept in the job record (so every reader of the job sees its progress).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// The version being rolled out (the job's current version).
    pub version: u32,
    pub state: DeploymentState,
    pub started_ms: u64,
    /// When a replica last turned healthy (or the deployment started): `progress_deadline` counts from here.
    pub progress_ms: u64,
    /// Canaries to run before promotion (0: none, or a revert, which skips the canary phase).
    #[serde(default)]
    pub canaries: u32,
    /// The canaries were promoted (by `omctl promote` or `auto_promote`).
    #[serde(default)]
    pub promoted: bool,
    /// New-version replicas that have counted as healthy.
    #[serde(default)]
    pub healthy: u32,
    /// New-version replicas that failed (unhealthy past the deadline, or ended).
    #[serde(default)]
    pub unhealthy: u32,
    /// This deployment reverts a failed one, to this version's spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<u32>,
    /// What happened last, in words (why it failed, what it waits for).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}
