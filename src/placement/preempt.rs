//! Preemption: the fewest, lowest-priority tasks on one node whose eviction lets a higher-priority task fit.
//!
//! Only strictly lower priorities are evicted, whichever scheduler placed them. Victims are taken lowest
//! priority first (larger ones first within a priority, to evict fewer), then any victim whose eviction
//! turns out unnecessary is spared again, highest priority first. The eviction itself happens in the claim's
//! commit, so a victim that moved in the meantime makes the claim fail rather than evict the wrong task.
//!
//! A namespace's guaranteed share (its quota's `guaranteed_*`) is not taken by another namespace's work: a
//! victim of such a namespace is eligible only while what the decision evicts from it so far leaves it at or
//! above the guarantee (as this scheduler's view shows its use).
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
    namespace: &str,
    taken: &HashSet<String>,
) -> Option<Vec<Versioned<Task>>> {
    let mut guard = Guard::new(snapshot, namespace, taken);
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
        let leaving = gang_of(snapshot, &t.value).map_or(t.value.resources, |g| {
            g.iter().fold(Resources::ZERO, |sum, m| sum.saturating_add(m.value.resources))
        });
        if !guard.take(&t.value.namespace, leaving) {
            continue;
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
/// What each other namespace with a guarantee may still lose to this decision's evictions.
struct Guard<'a> {
    snapshot: &'a CellSnapshot,
    preemptor: &'a str,
    /// namespace -> (cpu, memory) still preemptible (`None`: not guarded in that dimension).
    left: std::collections::HashMap<String, (Option<u64>, Option<u64>)>,
    taken: &'a HashSet<String>,
}

impl<'a> Guard<'a> {
    fn new(snapshot: &'a CellSnapshot, preemptor: &'a str, taken: &'a HashSet<String>) -> Self {
        Guard { snapshot, preemptor, left: Default::default(), taken }
    }

    /// Takes `r` from `namespace`'s preemptible room, if it has that much (always, for the preemptor's own
    /// namespace or one without a guarantee).
    fn take(&mut self, namespace: &str, r: Resources) -> bool {
        if namespace == self.preemptor {
            return true;
        }
        let Some(quota) = self.snapshot.quotas.get(namespace) else { return true };
        let (snapshot, taken) = (self.snapshot, self.taken);
        let left = self.left.entry(namespace.to_string()).or_insert_with(|| {
            // Victims already promised to this decision's other claims count as gone.
            let mut used = snapshot.use_of(namespace);
            for id in taken {
                if let Some(t) = snapshot.tasks.get(id.as_str()).filter(|t| t.value.namespace == namespace) {
                    used.remove(t.value.resources);
                }
            }
            quota.value.preemptible(&used)
        });
        let ok = left.0.is_none_or(|c| r.cpu_millis <= c) && left.1.is_none_or(|m| r.memory_bytes <= m);
        if ok {
            left.0 = left.0.map(|c| c - r.cpu_millis);
            left.1 = left.1.map(|m| m - r.memory_bytes);
        }
        ok
    }
}

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
