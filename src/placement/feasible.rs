//! Feasibility: which nodes a job's task may go to, and why the others are out.
//!
//! Filters run in a fixed order (schedulable, constraints, anti-affinity, room) and stop at the first that
//! rejects, so every rejected node has exactly one reason. Static filters (schedulable, constraints) depend
//! only on the node and the job and run once per decision; the rest depend on what this decision has already
//! placed and run per task.

use super::explain::Reason;
use crate::model::{Job, Node};
use crate::resources::Resources;

/// A node that passed the static filters, with what this decision has placed on it so far.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    /// Index in the decision's [`super::NodeTable`].
    pub index: usize,
    pub name: &'a str,
    pub node: &'a Node,
    pub capacity: Resources,
    /// Free room, less what this decision has already put here.
    pub free: Resources,
    /// Tasks of the job on the node (already placed, plus placed by this decision).
    pub job_tasks: u32,
    /// The node's value of the job's spread label (`""` when the node lacks it).
    pub spread_value: &'a str,
}

/// The first constraint of `job` that `node` fails, as a reason.
pub fn constraint_reject(job: &Job, node: &Node) -> Option<Reason> {
    job.constraints.iter().find(|c| !c.matches(&node.labels)).map(|c| Reason::Constraint(c.to_string()))
}

/// The first per-task reason a candidate cannot take one more task asking `request`, if any.
pub fn dynamic_reject(job: &Job, candidate: &Candidate<'_>, request: Resources) -> Option<Reason> {
    if job.anti_affinity && candidate.job_tasks > 0 {
        return Some(Reason::AntiAffinity);
    }
    Resources::fit(candidate.free, Resources::ZERO, request).err().map(Reason::Insufficient)
}
