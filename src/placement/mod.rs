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
use crate::model::{Job, Node, Task};
use crate::resources::Resources;
use explain::{Explanation, Reason};
use feasible::Candidate;
use rand::Rng;
pub use score::Strategy;
use std::collections::{HashMap, HashSet};

/// How to place.
#[derive(Clone, Debug)]
pub struct PlacementOptions {
    pub strategy: Strategy,
    /// Pick at random among up to this many best-scoring nodes whose scores are within the strategy's
    /// tolerance of the best.
    pub top_k: usize,
    /// Try evicting lower-priority tasks when a task fits nowhere.
    pub preemption: bool,
    /// Score at most this many feasible nodes, from a random starting point (`None`: all). Like Borg's and
    /// kube-scheduler's sampling: past a few hundred candidates a better fit is rarely worth the scan, and
    /// the random start spreads identical schedulers over different nodes. A task that fits none of the
    /// sample is tried against every node before it is declared unplaceable.
    pub sample: Option<usize>,
}

impl PlacementOptions {
    pub fn batch() -> Self {
        PlacementOptions { strategy: Strategy::BinPack, top_k: 4, preemption: false, sample: Some(256) }
    }
    pub fn service() -> Self {
        PlacementOptions { strategy: Strategy::Spread, top_k: 2, preemption: true, sample: None }
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

/// One entry of a [`NodeTable`].
#[derive(Clone, Debug)]
pub struct NodeEntry<'a> {
    pub name: &'a str,
    pub node: &'a Node,
    pub capacity: Resources,
    /// Free room, less what this decision has placed here so far.
    pub free: Resources,
}

/// The schedulable nodes of a snapshot in a flat table, built once per decision and shared by every job
/// decided in it: walking persistent maps and hashing names is the expensive part of a decision, so it is
/// done once, not once per job. Placing a job updates the table's free room, so the next job of the same
/// decision sees it taken.
pub struct NodeTable<'a> {
    pub entries: Vec<NodeEntry<'a>>,
    index: HashMap<&'a str, usize>,
    /// Namespace -> its use with what this decision placed so far (for namespaces with a quota).
    quota_used: HashMap<String, crate::model::NamespaceUse>,
    /// Nodes in the snapshot that cannot take anything (down, drained, no ledger).
    unschedulable: usize,
}

impl<'a> NodeTable<'a> {
    pub fn new(snapshot: &'a CellSnapshot) -> Self {
        let mut entries = Vec::with_capacity(snapshot.nodes.len());
        let mut unschedulable = 0;
        for (name, node) in snapshot.nodes.iter() {
            match snapshot.allocations.get(name) {
                Some(ledger) if ledger.value.schedulable && snapshot.live.contains_key(name) => {
                    entries.push(NodeEntry {
                        name,
                        node: &node.value,
                        capacity: ledger.value.capacity,
                        free: ledger.value.free(),
                    })
                }
                _ => unschedulable += 1,
            }
        }
        let index = entries.iter().enumerate().map(|(i, e)| (e.name, i)).collect();
        NodeTable { entries, index, quota_used: HashMap::new(), unschedulable }
    }

    /// Nodes in the snapshot, schedulable or not.
    pub fn nodes(&self) -> usize {
        self.entries.len() + self.unschedulable
    }
}

/// Places `pending` (tasks of `job`, as seen in `snapshot`) on `snapshot`.
pub fn place(
    snapshot: &CellSnapshot,
    job: &Job,
    pending: &[Versioned<Task>],
    options: &PlacementOptions,
    rng: &mut impl Rng,
) -> Placement {
    place_in(&mut NodeTable::new(snapshot), snapshot, job, pending, options, rng)
}

/// Places `pending` using a table built from `snapshot` (shared by the jobs of one decision).
pub fn place_in<'a>(
    table: &mut NodeTable<'a>,
    snapshot: &'a CellSnapshot,
    job: &Job,
    pending: &[Versioned<Task>],
    options: &PlacementOptions,
    rng: &mut impl Rng,
) -> Placement {
    let mut placement = Placement::default();
    if pending.is_empty() || table.nodes() == 0 {
        if !pending.is_empty() {
            placement.unplaced = pending.to_vec();
            placement.explanation = Some(Explanation::default());
        }
        return placement;
    }
    // Where the job's tasks already are (by table index), and per spread group.
    let mut job_on_node: HashMap<usize, u32> = HashMap::new();
    for t in snapshot.tasks_of(job) {
        if let (true, Some(node)) = (t.value.state.holds_resources(), t.value.node.as_deref()) {
            if let Some(&i) = table.index.get(node) {
                *job_on_node.entry(i).or_default() += 1;
            }
        }
    }
    let sampled = options.sample.filter(|&n| n < table.entries.len());
    // First fit takes the first nodes with room from where it starts: a random start, sampled or not.
    let random_start = sampled.is_some() || options.strategy == Strategy::FirstFit;
    let start = if random_start && !table.entries.is_empty() { rng.random_range(0..table.entries.len()) } else { 0 };
    let mut candidates = candidates(table, job, &job_on_node, start, sampled);
    let mut group_tasks: HashMap<&str, u32> = HashMap::new();
    if job.spread.is_some() {
        for c in &candidates {
            *group_tasks.entry(c.spread_value).or_default() += c.job_tasks;
        }
    }
    let mut full_scan = sampled.is_none();

    // The namespace's quota, if it has one: what is left of it bounds how many tasks this job may place.
    let quota = snapshot.quotas.get(job.namespace.as_str()).map(|q| q.value.clone());
    let mut quota_used = quota
        .as_ref()
        .map(|_| *table.quota_used.entry(job.namespace.clone()).or_insert_with(|| snapshot.use_of(&job.namespace)));
    let mut victims_taken: HashSet<String> = HashSet::new();
    // Batch packing: keep filling the node chosen last while the task still fits there (it stays the best
    // fit as it fills), so a large job costs one scan per node filled, not one per task.
    let mut last: Option<usize> = None;
    for task in pending {
        let request = task.value.resources;
        if let (Some(q), Some(used)) = (quota.as_ref(), quota_used.as_mut()) {
            if let Err(d) = q.fits(used, request) {
                if placement.explanation.is_none() {
                    placement.explanation = Some(quota_shortfall(&job.namespace, q, used, request, d));
                }
                placement.unplaced.push(task.clone());
                continue;
            }
        }
        let avoid = score::last_node(&task.value);
        let reusable = last.filter(|&i| {
            matches!(options.strategy, Strategy::BinPack | Strategy::FirstFit)
                && avoid != Some(candidates[i].name)
                && feasible::dynamic_reject(job, &candidates[i], request).is_none()
        });
        let mut chosen = reusable.or_else(|| best(&candidates, job, request, avoid, options, &group_tasks, rng));
        if chosen.is_none() && !full_scan {
            // Nothing in the sample: look at every node before giving up.
            sync_back(table, &candidates);
            candidates = candidates_all(table, job, &job_on_node);
            full_scan = true;
            last = None;
            chosen = best(&candidates, job, request, avoid, options, &group_tasks, rng);
        }
        match chosen {
            Some(i) => {
                let c = &mut candidates[i];
                c.free = c.free.saturating_sub(request);
                c.job_tasks += 1;
                *job_on_node.entry(c.index).or_default() += 1;
                *group_tasks.entry(c.spread_value).or_default() += 1;
                placement.claims.push(Claim::new(task.clone(), c.name));
                last = Some(i);
                if let Some(u) = quota_used.as_mut() {
                    u.add(request);
                }
            }
            None => {
                let preempted = (options.preemption && !job.gang)
                    .then(|| preemption(snapshot, &candidates, job, task, &victims_taken, &group_tasks))
                    .flatten();
                if let Some((i, victims)) = preempted {
                    let c = &mut candidates[i];
                    let freed = preempt::freed_on(&victims, c.name);
                    c.free = c.free.saturating_add(freed).saturating_sub(request);
                    c.job_tasks += 1;
                    *job_on_node.entry(c.index).or_default() += 1;
                    *group_tasks.entry(c.spread_value).or_default() += 1;
                    victims_taken.extend(victims.iter().map(|v| v.value.id.clone()));
                    placement.claims.push(Claim::preempting(task.clone(), c.name, victims));
                    if let Some(u) = quota_used.as_mut() {
                        u.add(request);
                    }
                    continue;
                }
                if placement.explanation.is_none() {
                    placement.explanation = Some(explain(table, &candidates, job, request));
                }
                placement.unplaced.push(task.clone());
            }
        }
    }
    if job.gang && !placement.unplaced.is_empty() {
        // All or nothing: a gang that does not fit whole proposes nothing, and takes no room.
        placement.unplaced = pending.to_vec();
        placement.claims.clear();
        return placement;
    }
    if let Some(u) = quota_used {
        table.quota_used.insert(job.namespace.clone(), u);
    }
    sync_back(table, &candidates);
    placement
}

/// The best preemption so far: (spread rank, victims' cost, score, candidate index, victims).
type PreemptionChoice = ((u32, u32), (i32, usize, u64), f64, usize, Vec<Versioned<Task>>);

/// The explanation of a task the namespace's quota stops.
fn quota_shortfall(
    namespace: &str,
    quota: &crate::model::Quota,
    used: &crate::model::NamespaceUse,
    request: Resources,
    dimension: crate::model::QuotaDimension,
) -> Explanation {
    use crate::model::QuotaDimension as D;
    let (used, limit, asks) = match dimension {
        D::Cpu => (used.resources.cpu_millis, quota.cpu_millis.unwrap_or(0), request.cpu_millis),
        D::Memory => (used.resources.memory_bytes, quota.memory_bytes.unwrap_or(0), request.memory_bytes),
        D::Tasks => (used.tasks, quota.tasks.unwrap_or(0), 1),
    };
    Explanation {
        quota: Some(explain::QuotaShortfall { namespace: namespace.to_string(), dimension, used, limit, asks }),
        ..Explanation::default()
    }
}

/// Candidates for `job`: table entries passing its constraints, starting at `start` and wrapping, at most
/// `limit` of them (all with `None`).
fn candidates<'a>(
    table: &NodeTable<'a>,
    job: &Job,
    job_on_node: &HashMap<usize, u32>,
    start: usize,
    limit: Option<usize>,
) -> Vec<Candidate<'a>> {
    let n = table.entries.len();
    let limit = limit.unwrap_or(n);
    let spread_label = job.spread.as_deref();
    let mut out = Vec::with_capacity(limit.min(n));
    for k in 0..n {
        if out.len() >= limit {
            break;
        }
        let index = (start + k) % n;
        let e = &table.entries[index];
        if feasible::constraint_reject(job, e.node).is_some() {
            continue;
        }
        out.push(Candidate {
            index,
            name: e.name,
            node: e.node,
            capacity: e.capacity,
            free: e.free,
            job_tasks: job_on_node.get(&index).copied().unwrap_or(0),
            spread_value: spread_label.and_then(|l| e.node.labels.get(l)).map(String::as_str).unwrap_or(""),
        });
    }
    out
}

fn candidates_all<'a>(table: &NodeTable<'a>, job: &Job, job_on_node: &HashMap<usize, u32>) -> Vec<Candidate<'a>> {
    candidates(table, job, job_on_node, 0, None)
}

/// Writes what this job took back into the decision's table.
fn sync_back(table: &mut NodeTable<'_>, candidates: &[Candidate<'_>]) {
    for c in candidates {
        table.entries[c.index].free = c.free;
    }
}

/// The index of a node chosen at random among the `top_k` best-scoring feasible candidates; `avoid` (the node
/// the task last ran on) scores last.
fn best(
    candidates: &[Candidate<'_>],
    job: &Job,
    request: Resources,
    avoid: Option<&str>,
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
        let mut s = match options.strategy {
            Strategy::BinPack => score::bin_pack(c, request),
            Strategy::Spread => score::spread(c, request, group_tasks, job.spread.is_some()),
            // Every node with room is as good: the first `top_k` from the sample's random start, one at random.
            Strategy::FirstFit => 0.0,
        };
        if avoid == Some(c.name) {
            s -= score::LAST_NODE_PENALTY;
        }
        if top.len() == k && s <= top[k - 1].0 {
            continue;
        }
        let at = top.iter().position(|(t, _)| s > *t).unwrap_or(top.len());
        top.insert(at, (s, i));
        top.truncate(k);
    }
    // Randomise only among near-equals: the point is that identical schedulers do not all pick the same node,
    // never to pick a worse one (a node in a fuller spread group, a much emptier node when packing).
    let best_score = top.first()?.0;
    let near = top.iter().take_while(|(s, _)| *s >= best_score - score::tolerance(options.strategy)).count();
    Some(top[rng.random_range(0..near.max(1))].1)
}

/// Where to preempt, with the victims. The job's placement rules come first, as in normal placement: a node in
/// the spread group holding fewest of the job's tasks, then one holding fewest of them itself (anti-affinity
/// rules nodes holding any out); among those, the cheapest victims; then the strategy's score.
fn preemption(
    snapshot: &CellSnapshot,
    candidates: &[Candidate<'_>],
    job: &Job,
    task: &Versioned<Task>,
    taken: &HashSet<String>,
    group_tasks: &HashMap<&str, u32>,
) -> Option<(usize, Vec<Versioned<Task>>)> {
    let request = task.value.resources;
    let spread = |c: &Candidate<'_>| {
        let group = if job.spread.is_some() { group_tasks.get(c.spread_value).copied().unwrap_or(0) } else { 0 };
        (group, c.job_tasks)
    };
    let mut best: Option<PreemptionChoice> = None;
    for (i, c) in candidates.iter().enumerate() {
        if (job.anti_affinity && c.job_tasks > 0) || request.exceeds(c.capacity).is_some() {
            continue;
        }
        let Some(victims) = preempt::victims(snapshot, c, request, task.value.priority, &job.namespace, taken) else {
            continue;
        };
        if victims.is_empty() {
            continue;
        }
        let mut after = c.clone();
        after.free = after.free.saturating_add(preempt::freed_on(&victims, c.name));
        let score = score::spread(&after, request, group_tasks, job.spread.is_some());
        let key = (spread(c), preempt::cost(&victims));
        let better = match &best {
            None => true,
            Some((s, cost, sc, _, _)) => (key.0, key.1) < (*s, *cost) || ((key.0, key.1) == (*s, *cost) && score > *sc),
        };
        if better {
            best = Some((key.0, key.1, score, i, victims));
        }
    }
    best.map(|(_, _, _, i, victims)| (i, victims))
}

/// Every node's first reason for refusing one more task asking `request`.
fn explain(table: &NodeTable<'_>, candidates: &[Candidate<'_>], job: &Job, request: Resources) -> Explanation {
    let mut e = Explanation { nodes: table.nodes(), ..Default::default() };
    for _ in 0..table.unschedulable {
        e.reject(Reason::NotSchedulable);
    }
    // `candidates` is the full scan here: every schedulable node passing the constraints.
    let passing: HashSet<usize> = candidates.iter().map(|c| c.index).collect();
    for (i, entry) in table.entries.iter().enumerate() {
        if !passing.contains(&i) {
            if let Some(reason) = feasible::constraint_reject(job, entry.node) {
                e.reject(reason);
            }
        }
    }
    for c in candidates {
        if let Some(reason) = feasible::dynamic_reject(job, c, request) {
            e.reject(reason);
        }
    }
    e
}

#[cfg(test)]
mod tests;
