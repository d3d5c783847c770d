//! Placement: deciding, on a snapshot, where a job's pending tasks go.
//!
//! The path reads top to bottom: the job's pending tasks -> [`feasible`] nodes (static filters once per
//! decision, per-task filters as tasks are placed) -> [`score`] -> a random pick among the few best (so
//! identical schedulers deciding on the same snapshot do not all pick the same node) -> claims for the
//! [`crate::commit`] protocol. A task that fits nowhere gets an [`explain::Explanation`], and, where the
//! job's priority allows, a [`preempt`] plan evicting lower-priority tasks from one node.
//!
//! Placement never writes: it proposes. Whether the proposal still holds is decided at commit time, with the
//! same fit function.

pub mod explain;
pub mod feasible;
pub mod preempt;
pub mod score;

use crate::cell_state::{CellSnapshot, Versioned};
use crate::commit::Claim;
use crate::model::{Job, Task};
use explain::{Explanation, Reason};
use feasible::Candidate;
use rand::Rng;
pub use score::Strategy;
use std::collections::{HashMap, HashSet};

/// How to place.
#[derive(Clone, Debug)]
pub struct PlacementOptions {
    pub strategy: Strategy,
    /// Pick at random among this many best-scoring nodes.
    pub top_k: usize,
    /// Try evicting lower-priority tasks when a task fits nowhere.
    pub preemption: bool,
}

impl PlacementOptions {
    pub fn batch() -> Self {
        PlacementOptions { strategy: Strategy::BinPack, top_k: 4, preemption: false }
    }
    pub fn service() -> Self {
        PlacementOptions { strategy: Strategy::Spread, top_k: 2, preemption: true }
    }
}

/// The outcome of one decision.
#[derive(Debug, Default)]
pub struct Placement {
    pub claims: Vec<Claim>,
    /// Tasks that fit nowhere (for a gang: every task, if any one does not fit).
    pub unplaced: Vec<Versioned<Task>>,
    /// Why the first unplaced task fits nowhere (the others of a job ask the same).
    pub explanation: Option<Explanation>,
}

/// Places `pending` (tasks of `job`, as seen in `snapshot`) on `snapshot`.
pub fn place(
    snapshot: &CellSnapshot,
    job: &Job,
    pending: &[Versioned<Task>],
    options: &PlacementOptions,
    rng: &mut impl Rng,
) -> Placement {
    let mut placement = Placement::default();
    if pending.is_empty() {
        return placement;
    }
    // Static filters once: nodes the job may use at all.
    let mut job_on_node: HashMap<&str, u32> = HashMap::new();
    let mut group_tasks: HashMap<&str, u32> = HashMap::new();
    for t in snapshot.tasks_of(job) {
        if let (true, Some(node)) = (t.value.state.holds_resources(), t.value.node.as_deref()) {
            *job_on_node.entry(node).or_default() += 1;
        }
    }
    let spread_label = job.spread.as_deref();
    let mut statically_rejected = Explanation::default();
    let mut candidates: Vec<Candidate<'_>> = Vec::with_capacity(snapshot.nodes.len());
    for (name, node) in snapshot.nodes.iter() {
        statically_rejected.nodes += 1;
        if let Some(reason) = feasible::static_reject(snapshot, job, name, &node.value) {
            statically_rejected.reject(reason);
            continue;
        }
        let Some(ledger) = snapshot.allocations.get(name) else {
            statically_rejected.reject(Reason::NotSchedulable);
            continue;
        };
        let spread_value = spread_label.and_then(|l| node.value.labels.get(l)).map(String::as_str).unwrap_or("");
        let job_tasks = job_on_node.get(name.as_str()).copied().unwrap_or(0);
        if spread_label.is_some() {
            *group_tasks.entry(spread_value).or_default() += job_tasks;
        }
        candidates.push(Candidate {
            name,
            node: &node.value,
            capacity: ledger.value.capacity,
            free: ledger.value.free(),
            job_tasks,
            spread_value,
        });
    }
    // A stable order, so a seeded decision is repeatable.
    candidates.sort_unstable_by(|a, b| a.name.cmp(b.name));

    let mut victims_taken: HashSet<String> = HashSet::new();
    // Batch packing: keep filling the node chosen last while the task still fits there (it stays the best
    // fit as it fills), so a large job costs one scan per node filled, not one per task.
    let mut last: Option<usize> = None;
    for task in pending {
        let request = task.value.resources;
        let reusable = last.filter(|&i| {
            options.strategy == Strategy::BinPack && feasible::dynamic_reject(job, &candidates[i], request).is_none()
        });
        let chosen = reusable.or_else(|| best(&candidates, job, request, options, &group_tasks, rng));
        match chosen {
            Some(i) => {
                let c = &mut candidates[i];
                c.free = c.free.saturating_sub(request);
                c.job_tasks += 1;
                *group_tasks.entry(c.spread_value).or_default() += 1;
                placement.claims.push(Claim::new(task.clone(), c.name));
                last = Some(i);
            }
            None => {
                let preempted = (options.preemption && !job.gang)
                    .then(|| preemption(snapshot, &candidates, job, task, &victims_taken))
                    .flatten();
                if let Some((i, victims)) = preempted {
                    let c = &mut candidates[i];
                    let freed: crate::resources::Resources = victims.iter().map(|v| v.value.resources).sum();
                    c.free = c.free.saturating_add(freed).saturating_sub(request);
                    c.job_tasks += 1;
                    *group_tasks.entry(c.spread_value).or_default() += 1;
                    victims_taken.extend(victims.iter().map(|v| v.value.id.clone()));
                    placement.claims.push(Claim::preempting(task.clone(), c.name, victims));
                    continue;
                }
                if placement.explanation.is_none() {
                    placement.explanation = Some(explain(&statically_rejected, &candidates, job, request));
                }
                placement.unplaced.push(task.clone());
            }
        }
    }
    if job.gang && !placement.unplaced.is_empty() {
        // All or nothing: a gang that does not fit whole proposes nothing.
        placement.unplaced = pending.to_vec();
        placement.claims.clear();
    }
    placement
}

/// The index of a node chosen at random among the `top_k` best-scoring feasible candidates.
fn best(
    candidates: &[Candidate<'_>],
    job: &Job,
    request: crate::resources::Resources,
    options: &PlacementOptions,
    group_tasks: &HashMap<&str, u32>,
    rng: &mut impl Rng,
) -> Option<usize> {
    let k = options.top_k.max(1);
    // The k best so far, best first.
    let mut top: Vec<(f64, usize)> = Vec::with_capacity(k + 1);
    for (i, c) in candidates.iter().enumerate() {
        if feasible::dynamic_reject(job, c, request).is_some() {
            continue;
        }
        let s = match options.strategy {
            Strategy::BinPack => score::bin_pack(c, request),
            Strategy::Spread => score::spread(c, request, group_tasks, job.spread.is_some()),
        };
        if top.len() == k && s <= top[k - 1].0 {
            continue;
        }
        let at = top.iter().position(|(t, _)| s > *t).unwrap_or(top.len());
        top.insert(at, (s, i));
        top.truncate(k);
    }
    if top.is_empty() {
        None
    } else {
        Some(top[rng.random_range(0..top.len())].1)
    }
}

/// The node where evicting lower-priority tasks costs least, with those victims.
fn preemption(
    snapshot: &CellSnapshot,
    candidates: &[Candidate<'_>],
    job: &Job,
    task: &Versioned<Task>,
    taken: &HashSet<String>,
) -> Option<(usize, Vec<Versioned<Task>>)> {
    let request = task.value.resources;
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| !(job.anti_affinity && c.job_tasks > 0) && request.exceeds(c.capacity).is_none())
        .filter_map(|(i, c)| preempt::victims(snapshot, c, request, task.value.priority, taken).map(|v| (i, v)))
        .filter(|(_, v)| !v.is_empty())
        .min_by_key(|(i, v)| (preempt::cost(v), *i))
}

/// Every node's first reason for refusing one more task asking `request`.
fn explain(
    statically_rejected: &Explanation,
    candidates: &[Candidate<'_>],
    job: &Job,
    request: crate::resources::Resources,
) -> Explanation {
    let mut e = statically_rejected.clone();
    for c in candidates {
        if let Some(reason) = feasible::dynamic_reject(job, c, request) {
            e.reject(reason);
        }
    }
    e
}

#[cfg(test)]
mod tests;
