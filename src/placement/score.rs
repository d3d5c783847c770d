//! Scoring: among feasible nodes, which is best for one more task. Higher is better.
//!
//! Two strategies, one per scheduler. The batch scheduler packs (best fit: the fullest node that still
//! fits), which keeps whole nodes free for large tasks and costs little to compute. The service scheduler
//! spreads: first over the values of the job's spread label, then away from nodes already holding the job,
//! then towards balanced and less-used nodes, so a node or zone failure takes few replicas with it.

use super::feasible::Candidate;
use crate::model::{Task, TaskState};
use crate::resources::Resources;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Best fit: prefer the node left fullest.
    BinPack,
    /// Spread and balance.
    Spread,
    /// Randomized first fit, as the Omega paper's schedulers place: any node with room, from a random place in
    /// the cell, filled while the job's tasks fit. Concurrent schedulers then rarely pick the same nodes, where
    /// best fit draws them all to the fullest ones.
    FirstFit,
}

/// Fraction of capacity used after adding `request`, per dimension.
fn fractions(c: &Candidate<'_>, request: Resources) -> (f64, f64) {
    let frac = |cap: u64, free: u64, req: u64| {
        if cap == 0 {
            1.0
        } else {
            (cap.saturating_sub(free).saturating_add(req)) as f64 / cap as f64
        }
    };
    (
        frac(c.capacity.cpu_millis, c.free.cpu_millis, request.cpu_millis),
        frac(c.capacity.memory_bytes, c.free.memory_bytes, request.memory_bytes),
    )
}

/// Best fit: the mean utilisation after placing, in [0, 1].
pub fn bin_pack(c: &Candidate<'_>, request: Resources) -> f64 {
    let (cpu, mem) = fractions(c, request);
    (cpu + mem) / 2.0
}

/// Spread: tasks of the job in the node's spread group weigh most (each costs 1000), then tasks of the job
/// on the node itself (100 each), then balance between cpu and memory and free room (0-200).
pub fn spread(c: &Candidate<'_>, request: Resources, group_tasks: &HashMap<&str, u32>, spread_label: bool) -> f64 {
    let (cpu, mem) = fractions(c, request);
    let balance = 100.0 * (1.0 - (cpu - mem).abs());
    let least_used = 100.0 * (1.0 - (cpu + mem) / 2.0);
    let group = if spread_label { group_tasks.get(c.spread_value).copied().unwrap_or(0) } else { 0 };
    -1000.0 * group as f64 - 100.0 * c.job_tasks as f64 + balance + least_used
}

/// What the node a task last ran on loses from its score: more than any two packing or spread scores can
/// differ by, so it is chosen only when no other node fits.
pub const LAST_NODE_PENALTY: f64 = 1e12;

/// The node a pending task was last placed on, which it should leave alone if it can.
///
/// A task handed back to `pending` keeps the `node` of its last placement (a release changes only its state),
/// and `placements > 0` says it had one. Whatever sent it back (it failed there, turned unhealthy until its
/// restarts were spent, was evicted, or its node was lost), trying the same node first would mostly repeat
/// it: a bad disk, a port someone else holds, a node that keeps dropping out. Like Nomad's rescheduling
/// penalty, the node is not forbidden, only last: a cell with nowhere else to go still runs the task.
pub fn last_node(task: &Task) -> Option<&str> {
    if task.state == TaskState::Pending && task.placements > 0 {
        task.node.as_deref()
    } else {
        None
    }
}

/// How far below the best score a node still counts as "as good" (for the random pick among near-equals).
/// Bin packing: 5 points of utilisation. Spread: less than one task of the job on a node (100) or in a spread
/// group (1000), so a random pick never trades the spread for a better balance.
pub fn tolerance(strategy: Strategy) -> f64 {
    match strategy {
        Strategy::BinPack => 0.05,
        Strategy::Spread => 50.0,
        Strategy::FirstFit => 0.0,
    }
}
