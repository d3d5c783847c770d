//! Preemption: the fewest, lowest-priority tasks on one node whose eviction lets a higher-priority task fit.
//!
//! Only strictly lower priorities are evicted, whichever scheduler placed them. Victims are taken lowest
//! priority first (larger ones first within a priority, to evict fewer), then any victim whose eviction
//! turns out unnecessary is spared again, highest priority first. The eviction itself happens in the claim's
//! commit, so a victim that moved in the meantime makes the claim fail rather than evict the wrong task.
//!
//! A task of a gang is never evicted alone: a gang runs whole or not at all, so evicting one of its tasks
//! evicts all of them, wherever they run (and they all go back to pending together). Such a victim costs its
//! whole gang, and only its tasks on this node make room here.

use super::feasible::Candidate;
use crate::cell_state::{CellSnapshot, Versioned};
use crate::model::Task;
use crate::resources::Resources;
use std::collections::HashSet;

/// Victims on `candidate` that make room for `request` at `priority`, or `None` if evicting every eligible
/// task would still not be enough. `taken` holds victims already promised to other claims of this decision.
pub fn victims(
    snapshot: &CellSnapshot,
    candidate: &Candidate<'_>,
    request: Resources,
    priority: i32,
    taken: &HashSet<String>,
) -> Option<Vec<Versioned<Task>>> {
    let mut eligible: Vec<&Versioned<Task>> = snapshot
        .tasks_on(candidate.name)
        .filter(|t| t.value.priority < priority && !taken.contains(&t.value.id))
        .filter(|t| gang_of(snapshot, &t.value).is_none_or(|gang| gang.iter().all(|g| evictable(g, priority, taken))))
        .collect();
    eligible.sort_by(|a, b| {
        a.value
            .priority
            .cmp(&b.value.priority)
            .then(b.value.resources.cpu_millis.cmp(&a.value.resources.cpu_millis))
            .then(b.value.resources.memory_bytes.cmp(&a.value.resources.memory_bytes))
            .then(a.value.id.cmp(&b.value.id))
    });
    let fits = |free: Resources| Resources::fit(free, Resources::ZERO, request).is_ok();
    let mut free = candidate.free;
    let mut chosen = Vec::new();
    for t in eligible {
        if fits(free) {
            break;
        }
        free = free.saturating_add(t.value.resources);
        chosen.push(t);
    }
    if !fits(free) {
        return None;
    }
    // Spare what is not needed, highest priority first.
    let mut i = chosen.len();
    while i > 0 {
        i -= 1;
        let without = free.saturating_sub(chosen[i].value.resources);
        if fits(without) {
            free = without;
            chosen.remove(i);
        }
    }
    // A gang leaves whole: add the rest of every victim gang (their room elsewhere is not counted here).
    let mut out: Vec<Versioned<Task>> = Vec::with_capacity(chosen.len());
    let mut ids: HashSet<&str> = HashSet::new();
    for t in chosen {
        let members = gang_of(snapshot, &t.value).unwrap_or_else(|| vec![t]);
        for m in members {
            if ids.insert(m.value.id.as_str()) {
                out.push(m.clone());
            }
        }
    }
    Some(out)
}

/// The tasks of `task`'s job holding resources, if its job is a gang.
fn gang_of<'a>(snapshot: &'a CellSnapshot, task: &Task) -> Option<Vec<&'a Versioned<Task>>> {
    let job = snapshot.jobs.get(task.job.as_str())?;
    job.value.gang.then(|| snapshot.tasks_of(&job.value).filter(|t| t.value.state.holds_resources()).collect())
}

fn evictable(t: &Versioned<Task>, priority: i32, taken: &HashSet<String>) -> bool {
    t.value.priority < priority && !taken.contains(&t.value.id)
}

/// The room evicting `victims` frees on `node` (victims elsewhere free room elsewhere).
pub fn freed_on(victims: &[Versioned<Task>], node: &str) -> Resources {
    victims.iter().filter(|v| v.value.node.as_deref() == Some(node)).map(|v| v.value.resources).sum()
}

/// How bad a set of victims is, for choosing between nodes: highest priority evicted, then how many, then
/// how much. Lower is better.
pub fn cost(victims: &[Versioned<Task>]) -> (i32, usize, u64) {
    let top = victims.iter().map(|v| v.value.priority).max().unwrap_or(i32::MIN);
    let cpu = victims.iter().map(|v| v.value.resources.cpu_millis).sum();
    (top, victims.len(), cpu)
}
