//! Incremental commits: each node's claims succeed or fail on their own, many nodes per round trip.
//!
//! Round by round: take up to a sub-transaction's worth of each node's queued claims, checked against what we
//! believe the node holds (its ledger from the snapshot, or the fresher one an earlier round wrote or read
//! back); send every node's unit nested in as few transactions as the server takes; settle what landed; for a
//! refused node, coarse detection fails its claims, fine detection re-checks them against the fresh ledger the
//! refusal returned and queues those that still fit for the next round. Claims that evict a gang touch several
//! nodes and go last, one flat transaction each. Claims in a namespace with a quota go after the node rounds,
//! one unit per round over the quota and every node its claims touch (`quota_claims`).

use super::quota::QuotaBase;
use super::unit::{node_conflict, task_moved, Fresh, NodeBase, Unit};
use super::{Claim, ClaimOutcome, CommitReport, Committer, Conflict, Detection};
use crate::cell_state::{CellSnapshot, Versioned};
use crate::model::{Task, TaskState};
use crate::txn::Outcome;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// Ops per claim or victim in a node's group: two writes (task and assignment, or their removal); a claim's
/// compares (its task, perhaps its job's owner) and reads are never more.
const OPS_PER_ITEM: usize = 2;
/// Ops of a node's group beside its items: the ledger and liveness compares (one ledger write).
const OPS_PER_NODE: usize = 2;

struct State<'a> {
    claims: &'a [Claim],
    report: CommitReport,
    decided: Vec<bool>,
    /// Each claim's task as last seen (refreshed from refusals).
    tasks: Vec<Versioned<Task>>,
    bases: BTreeMap<String, NodeBase>,
    /// Victims already promised to a claim of this commit (a key may be written once per transaction).
    evicted: HashSet<String>,
    /// Jobs whose ownership fence failed: their other claims are refused without a round trip.
    lost_jobs: HashSet<String>,
}

impl State<'_> {
    fn settle(&mut self, i: usize, outcome: ClaimOutcome) {
        self.report.outcomes[i] = outcome;
        self.decided[i] = true;
    }

    fn conflict(&mut self, i: usize, c: Conflict) {
        self.settle(i, ClaimOutcome::Conflicted(c));
    }

    fn base(&mut self, snapshot: &CellSnapshot, node: &str) -> NodeBase {
        self.bases.entry(node.to_string()).or_insert_with(|| NodeBase::from_snapshot(snapshot, node)).clone()
    }
}

pub(super) async fn commit(c: &Committer, snapshot: &CellSnapshot, claims: &[Claim]) -> CommitReport {
    let mut st = State {
        claims,
        report: CommitReport::unsettled(claims.len()),
        decided: vec![false; claims.len()],
        tasks: claims.iter().map(|c| c.task.clone()).collect(),
        bases: BTreeMap::new(),
        evicted: HashSet::new(),
        lost_jobs: HashSet::new(),
    };
    // Per node: its claims still to send, in the caller's order. Claims evicting tasks on other nodes (a
    // victim gang) are committed on their own afterwards.
    let mut queues: BTreeMap<String, VecDeque<usize>> = BTreeMap::new();
    let mut spanning = Vec::new();
    // Per namespace with a quota: its claims, committed over the quota after the node rounds.
    let mut quota_queues: BTreeMap<String, VecDeque<usize>> = BTreeMap::new();
    let mut seen_ids = HashSet::new();
    for (i, claim) in claims.iter().enumerate() {
        if !seen_ids.insert(claim.task.value.id.as_str()) {
            st.conflict(i, Conflict::Duplicate);
            continue;
        }
        let ns = claim.task.value.namespace.as_str();
        if snapshot.quotas.contains_key(ns) {
            quota_queues.entry(ns.to_string()).or_default().push_back(i);
        } else if claim.preempts.iter().any(|v| v.value.node.as_deref() != Some(claim.node.as_str())) {
            spanning.push(i);
        } else {
            queues.entry(claim.node.clone()).or_default().push_back(i);
        }
    }
    // A victim that is also being placed in this commit cannot be evicted by it.
    let placing = seen_ids;
    let mut retries: HashMap<String, u32> = HashMap::new();
    // Nodes whose unit the server refused as too large although it fit the op limit (too many bytes): their
    // units are cut to half, then half again, down to one claim.
    let mut caps: HashMap<String, usize> = HashMap::new();

    while queues.values().any(|q| !q.is_empty()) {
        st.report.rounds += 1;
        let per_node = c.sender.items_per_group(OPS_PER_NODE, OPS_PER_ITEM);
        let mut units: Vec<(String, Unit)> = Vec::new();
        for (node, queue) in queues.iter_mut() {
            if queue.is_empty() {
                continue;
            }
            let base = st.base(snapshot, node);
            if let Some(why) = base.refusal() {
                for i in queue.drain(..) {
                    st.conflict(i, why);
                }
                continue;
            }
            let Some(ledger) = base.ledger.as_ref() else { continue };
            let mut unit = Unit::on(node, ledger);
            let cap = caps.get(node).copied().unwrap_or(per_node).min(per_node);
            while unit.claims.len() + unit.victims.len() < cap {
                let Some(i) = queue.pop_front() else { break };
                if let Some(why) = take(&mut st, &mut unit, node, i, &placing) {
                    st.conflict(i, why);
                }
            }
            if !unit.claims.is_empty() {
                units.push((node.clone(), unit));
            }
        }
        if units.is_empty() {
            break;
        }
        let mut groups = Vec::with_capacity(units.len());
        let mut built = Vec::with_capacity(units.len());
        for (node, unit) in units {
            match unit.group(c, claims, &st.tasks) {
                Ok(g) => {
                    groups.push(g);
                    built.push((node, unit));
                }
                Err(e) => {
                    tracing::warn!(node, error = %e, "cannot encode a claim; refusing it");
                    release_victims(&mut st, &unit);
                    for &i in &unit.claims {
                        st.conflict(i, Conflict::Unknown);
                    }
                }
            }
        }
        let sent = c.sender.nested(groups, None).await;
        st.report.transactions += sent.transactions;
        st.report.latencies.extend(sent.latencies);
        for ((node, unit), outcome) in built.into_iter().zip(sent.outcomes) {
            let queue = queues.get_mut(&node).expect("a unit's node has a queue");
            match outcome {
                Outcome::Applied { revision } => {
                    for &i in &unit.claims {
                        st.settle(i, ClaimOutcome::Committed { revision });
                    }
                    let (_, ledger) = unit.ledgers.into_iter().next().expect("a node unit has its ledger").1;
                    let written = Versioned::new(ledger, revision);
                    st.report.ledgers.insert(node.clone(), Some(written.clone()));
                    st.bases.insert(node.clone(), NodeBase { ledger: Some(written), live: true });
                    c.wrote(&node, revision);
                }
                Outcome::Refused { fresh } => {
                    st.report.failed_node_txns += 1;
                    release_victims(&mut st, &unit);
                    match unit.fresh(claims, &st.tasks, fresh) {
                        Ok(fresh) => refused(c, &mut st, &node, unit, fresh, queue, &mut retries),
                        Err(e) => {
                            tracing::warn!(node, error = %e, "cannot decode the fresh state of a refused node");
                            for &i in &unit.claims {
                                st.conflict(i, Conflict::Unknown);
                            }
                        }
                    }
                }
                Outcome::TooLarge { .. } if unit.claims.len() > 1 => {
                    // The server takes less than the unit was cut for: cut it smaller next round.
                    caps.insert(node.clone(), unit.claims.len() / 2);
                    release_victims(&mut st, &unit);
                    for &i in unit.claims.iter().rev() {
                        queue.push_front(i);
                    }
                }
                Outcome::TooLarge { .. } => {
                    release_victims(&mut st, &unit);
                    st.conflict(unit.claims[0], Conflict::TooLarge);
                }
                Outcome::Resend => {
                    // The server's limit is lower than we knew: the next round cuts units to the new one.
                    release_victims(&mut st, &unit);
                    for &i in unit.claims.iter().rev() {
                        queue.push_front(i);
                    }
                }
                Outcome::Fenced | Outcome::Unknown(_) => {
                    for &i in &unit.claims {
                        st.conflict(i, Conflict::Unknown);
                    }
                }
            }
        }
    }
    for (ns, queue) in quota_queues {
        quota_claims(c, snapshot, &mut st, &ns, queue, &placing).await;
    }
    for i in spanning {
        spanning_claim(c, snapshot, &mut st, i, &placing).await;
    }
    debug_assert!(st.decided.iter().all(|d| *d), "every claim gets an outcome");
    st.report
}

/// Adds claim `i` to `node`'s unit if it still fits what we believe; else says why not.
fn take(st: &mut State<'_>, unit: &mut Unit, node: &str, i: usize, placing: &HashSet<&str>) -> Option<Conflict> {
    let claim = &st.claims[i];
    let t = &st.tasks[i].value;
    if st.lost_jobs.contains(&t.job) {
        return Some(Conflict::NotOwner);
    }
    if t.state != TaskState::Pending {
        return Some(Conflict::TaskChanged);
    }
    // Victims must hold resources here now (as far as we know) and be evicted only once.
    let victim_ok = |v: &Versioned<Task>| v.value.state.holds_resources() && v.value.node.as_deref() == Some(node);
    if !claim.preempts.iter().all(victim_ok) {
        return Some(Conflict::VictimChanged);
    }
    if claim.preempts.iter().any(|v| st.evicted.contains(&v.value.id) || placing.contains(v.value.id.as_str())) {
        return Some(Conflict::Duplicate);
    }
    let ledger = &mut unit.ledgers.get_mut(node).expect("the unit's own node").1;
    let mut trial = ledger.clone();
    for v in &claim.preempts {
        trial.remove(v.value.resources);
    }
    if let Err(d) = trial.fits(t.resources) {
        return Some(Conflict::NoRoom(d));
    }
    trial.add(t.resources);
    *ledger = trial;
    unit.claims.push(i);
    for v in &claim.preempts {
        st.evicted.insert(v.value.id.clone());
        unit.victims.push((i, v.clone()));
    }
    None
}

/// Victims of a unit that did not land may be promised again.
fn release_victims(st: &mut State<'_>, unit: &Unit) {
    for (_, v) in &unit.victims {
        st.evicted.remove(&v.value.id);
    }
}

/// Handles a refused node unit: coarse fails its claims; fine re-queues what still fits the fresh state.
fn refused(
    c: &Committer,
    st: &mut State<'_>,
    node: &str,
    unit: Unit,
    fresh: Fresh,
    queue: &mut VecDeque<usize>,
    retries: &mut HashMap<String, u32>,
) {
    let (ledger, live) = fresh.ledgers.get(node).cloned().unwrap_or((None, false));
    if unit.ledgers.get(node).is_some_and(|(base, _)| c.behind_own_write(node, *base)) {
        st.report.self_conflicts += 1;
    }
    st.report.ledgers.insert(node.to_string(), ledger.clone());
    st.bases.insert(node.to_string(), NodeBase { ledger: ledger.clone(), live });
    // Jobs this instance no longer owns: every claim of theirs fails now and later.
    for &i in &unit.claims {
        if fresh.lost_owner(&st.claims[i], &st.tasks[i].value) {
            st.lost_jobs.insert(st.tasks[i].value.job.clone());
        }
    }
    let n_claims = unit.claims.len();
    let victim_moved = |i: usize| {
        unit.victims.iter().enumerate().any(|(k, (owner, v))| *owner == i && task_moved(v, &fresh.victims[k]))
    };
    match c.config.detection {
        Detection::Coarse => {
            let why = node_conflict(&ledger, live);
            for (k, &i) in unit.claims.iter().enumerate() {
                let conflict = if st.lost_jobs.contains(&st.tasks[i].value.job) {
                    Conflict::NotOwner
                } else if task_moved(&st.tasks[i], &fresh.tasks[k]) {
                    Conflict::TaskChanged
                } else if victim_moved(i) {
                    Conflict::VictimChanged
                } else {
                    why
                };
                st.conflict(i, conflict);
            }
            // The rest of this node's claims were decided on the same stale ledger.
            for i in queue.drain(..) {
                st.conflict(i, why);
            }
        }
        Detection::Fine => {
            let tries = retries.entry(node.to_string()).or_default();
            *tries += 1;
            let exhausted = *tries > c.config.max_fine_retries;
            debug_assert_eq!(n_claims, fresh.tasks.len());
            for (k, &i) in unit.claims.iter().enumerate().rev() {
                if st.lost_jobs.contains(&st.tasks[i].value.job) {
                    st.conflict(i, Conflict::NotOwner);
                    continue;
                }
                match &fresh.tasks[k] {
                    Some(_) if victim_moved(i) => st.conflict(i, Conflict::VictimChanged),
                    Some(t) if t.value.state == TaskState::Pending => {
                        st.tasks[i] = t.clone();
                        if exhausted {
                            st.conflict(i, Conflict::Contention);
                        } else {
                            st.report.retried_claims += 1;
                            queue.push_front(i);
                        }
                    }
                    _ => st.conflict(i, Conflict::TaskChanged),
                }
            }
            if exhausted {
                for i in queue.drain(..) {
                    st.conflict(i, Conflict::Contention);
                }
            }
        }
    }
}

/// Commits the claims of namespace `ns`, which has a quota: each round one flat transaction over the quota
/// record and every node the round's claims touch. A claim is taken only if it fits its node and the quota as
/// the committer believes them; one that evicts tasks on other nodes is refused (victim gangs and quotas do
/// not mix in one commit: the scheduler tries it again without a quota race).
async fn quota_claims(
    c: &Committer,
    snapshot: &CellSnapshot,
    st: &mut State<'_>,
    ns: &str,
    mut queue: VecDeque<usize>,
    placing: &HashSet<&str>,
) {
    let Some(mut quota) = QuotaBase::from_snapshot(snapshot, ns) else {
        for i in queue {
            st.conflict(i, Conflict::QuotaChanged);
        }
        return;
    };
    let mut tries = 0u32;
    let mut cap = c.sender.items_per_group(1, OPS_PER_ITEM + OPS_PER_NODE);
    while !queue.is_empty() {
        st.report.rounds += 1;
        let mut unit = Unit { quota: Some(quota.clone()), ..Unit::default() };
        while unit.claims.len() + unit.victims.len() < cap {
            let Some(i) = queue.pop_front() else { break };
            let claim = &st.claims[i];
            let node = claim.node.clone();
            if claim.preempts.iter().any(|v| v.value.node.as_deref() != Some(node.as_str())) {
                st.conflict(i, Conflict::VictimChanged);
                continue;
            }
            if !unit.ledgers.contains_key(&node) {
                let base = st.base(snapshot, &node);
                if let Some(why) = base.refusal() {
                    st.conflict(i, why);
                    continue;
                }
                let Some(ledger) = base.ledger.as_ref() else { continue };
                unit.ledgers.insert(node.clone(), (ledger.mod_revision, (*ledger.value).clone()));
            }
            let mut q = unit.quota.clone().expect("a quota unit");
            if let Err(d) = q.take(&st.tasks[i].value, st.claims[i].preempts.iter().map(|v| v.value.as_ref())) {
                st.conflict(i, Conflict::OverQuota(d));
                continue;
            }
            match take(st, &mut unit, &node, i, placing) {
                Some(why) => st.conflict(i, why),
                None => unit.quota = Some(q),
            }
        }
        // Nodes whose every claim was refused are not rewritten.
        let claimed: HashSet<&str> = unit.claims.iter().map(|&i| st.claims[i].node.as_str()).collect();
        unit.ledgers.retain(|n, _| claimed.contains(n.as_str()));
        if unit.claims.is_empty() {
            continue;
        }
        let group = match unit.group(c, st.claims, &st.tasks) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(namespace = ns, error = %e, "cannot encode a claim; refusing it");
                release_victims(st, &unit);
                for &i in &unit.claims {
                    st.conflict(i, Conflict::Unknown);
                }
                continue;
            }
        };
        let (outcome, latency) = c.sender.flat(group).await;
        st.report.transactions += u32::from(latency.is_some());
        st.report.latencies.extend(latency);
        match outcome {
            Outcome::Applied { revision } => {
                for &i in &unit.claims {
                    st.settle(i, ClaimOutcome::Committed { revision });
                }
                for (node, (_, ledger)) in std::mem::take(&mut unit.ledgers) {
                    let written = Versioned::new(ledger, revision);
                    st.report.ledgers.insert(node.clone(), Some(written.clone()));
                    st.bases.insert(node.clone(), NodeBase { ledger: Some(written), live: true });
                    c.wrote(&node, revision);
                }
                quota = unit.quota.take().expect("a quota unit");
                quota.revision = revision;
            }
            Outcome::Refused { fresh } => {
                st.report.failed_node_txns += 1;
                release_victims(st, &unit);
                let fresh = match unit.fresh(st.claims, &st.tasks, fresh) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(namespace = ns, error = %e, "cannot decode the fresh state of a refused unit");
                        for &i in &unit.claims {
                            st.conflict(i, Conflict::Unknown);
                        }
                        continue;
                    }
                };
                for (node, (ledger, live)) in &fresh.ledgers {
                    st.report.ledgers.insert(node.clone(), ledger.clone());
                    st.bases.insert(node.clone(), NodeBase { ledger: ledger.clone(), live: *live });
                }
                // Someone else claimed in the namespace: its use is no longer known here. Every claim left was
                // decided on the old use, so all of them go back to the scheduler.
                if fresh.quota_changed(&unit) {
                    for &i in unit.claims.iter().chain(queue.iter()) {
                        st.conflict(i, Conflict::QuotaChanged);
                    }
                    return;
                }
                tries += 1;
                let exhausted = tries > c.config.max_fine_retries;
                for (k, &i) in unit.claims.iter().enumerate().rev() {
                    if fresh.lost_owner(&st.claims[i], &st.tasks[i].value) {
                        st.lost_jobs.insert(st.tasks[i].value.job.clone());
                    }
                    let moved = task_moved(&st.tasks[i], &fresh.tasks[k]);
                    match &fresh.tasks[k] {
                        _ if st.lost_jobs.contains(&st.tasks[i].value.job) => st.conflict(i, Conflict::NotOwner),
                        Some(t) if t.value.state == TaskState::Pending => {
                            let node = &st.claims[i].node;
                            let (ledger, live) = fresh.ledgers.get(node).cloned().unwrap_or((None, false));
                            if c.config.detection == Detection::Coarse {
                                let why = if moved { Conflict::TaskChanged } else { node_conflict(&ledger, live) };
                                st.conflict(i, why);
                            } else if exhausted {
                                st.conflict(i, Conflict::Contention);
                            } else {
                                st.tasks[i] = t.clone();
                                st.report.retried_claims += 1;
                                queue.push_front(i);
                            }
                        }
                        _ => st.conflict(i, Conflict::TaskChanged),
                    }
                }
            }
            Outcome::TooLarge { .. } if unit.claims.len() > 1 => {
                cap = unit.claims.len() / 2;
                release_victims(st, &unit);
                for &i in unit.claims.iter().rev() {
                    queue.push_front(i);
                }
            }
            Outcome::TooLarge { .. } => {
                release_victims(st, &unit);
                st.conflict(unit.claims[0], Conflict::TooLarge);
            }
            Outcome::Resend => {
                cap = c.sender.items_per_group(1, OPS_PER_ITEM + OPS_PER_NODE).min(cap);
                release_victims(st, &unit);
                for &i in unit.claims.iter().rev() {
                    queue.push_front(i);
                }
            }
            Outcome::Fenced | Outcome::Unknown(_) => {
                for &i in &unit.claims {
                    st.conflict(i, Conflict::Unknown);
                }
            }
        }
    }
}

/// Commits one claim whose victims run on other nodes (a victim gang), as one flat transaction over every
/// node involved: the claim lands and the whole gang leaves, or nothing happens.
async fn spanning_claim(c: &Committer, snapshot: &CellSnapshot, st: &mut State<'_>, i: usize, placing: &HashSet<&str>) {
    let claim = &st.claims[i];
    let victims = claim.preempts.clone();
    for attempt in 0..=c.config.max_fine_retries {
        st.report.rounds += 1;
        let t = st.tasks[i].value.clone();
        if st.lost_jobs.contains(&t.job) {
            return st.conflict(i, Conflict::NotOwner);
        }
        if t.state != TaskState::Pending {
            return st.conflict(i, Conflict::TaskChanged);
        }
        if victims.iter().any(|v| !v.value.state.holds_resources() || v.value.node.is_none()) {
            return st.conflict(i, Conflict::VictimChanged);
        }
        if victims.iter().any(|v| st.evicted.contains(&v.value.id) || placing.contains(v.value.id.as_str())) {
            return st.conflict(i, Conflict::Duplicate);
        }
        // Every node involved, from what we believe of it.
        let mut unit = Unit::default();
        let mut nodes: Vec<&str> = victims.iter().filter_map(|v| v.value.node.as_deref()).collect();
        nodes.push(claim.node.as_str());
        for node in nodes {
            let base = st.base(snapshot, node);
            let refusal = if node == claim.node { base.refusal() } else { None };
            let Some(ledger) = base.ledger.as_ref() else {
                return st.conflict(i, if node == claim.node { Conflict::NodeGone } else { Conflict::VictimChanged });
            };
            if let Some(why) = refusal {
                return st.conflict(i, why);
            }
            unit.ledgers.entry(node.to_string()).or_insert_with(|| (ledger.mod_revision, (*ledger.value).clone()));
        }
        for v in &victims {
            let node = v.value.node.as_deref().unwrap_or_default();
            if let Some((_, ledger)) = unit.ledgers.get_mut(node) {
                ledger.remove(v.value.resources);
            }
            unit.victims.push((i, v.clone()));
        }
        let ledger = &mut unit.ledgers.get_mut(&claim.node).expect("the claim's node was added").1;
        if let Err(d) = ledger.fits(t.resources) {
            return st.conflict(i, Conflict::NoRoom(d));
        }
        ledger.add(t.resources);
        unit.claims.push(i);
        let group = match unit.group(c, st.claims, &st.tasks) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a gang eviction; refusing it");
                return st.conflict(i, Conflict::Unknown);
            }
        };
        let (outcome, latency) = c.sender.flat(group).await;
        st.report.transactions += u32::from(latency.is_some());
        st.report.latencies.extend(latency);
        match outcome {
            Outcome::Applied { revision } => {
                for v in &victims {
                    st.evicted.insert(v.value.id.clone());
                }
                for (node, (_, ledger)) in unit.ledgers {
                    let written = Versioned::new(ledger, revision);
                    st.report.ledgers.insert(node.clone(), Some(written.clone()));
                    st.bases.insert(node.clone(), NodeBase { ledger: Some(written), live: true });
                    c.wrote(&node, revision);
                }
                return st.settle(i, ClaimOutcome::Committed { revision });
            }
            Outcome::Refused { fresh } => {
                st.report.failed_node_txns += 1;
                let Ok(fresh) = unit.fresh(st.claims, &st.tasks, fresh) else {
                    return st.conflict(i, Conflict::Unknown);
                };
                for (node, (ledger, live)) in &fresh.ledgers {
                    st.report.ledgers.insert(node.clone(), ledger.clone());
                    st.bases.insert(node.clone(), NodeBase { ledger: ledger.clone(), live: *live });
                }
                if fresh.lost_owner(claim, &t) {
                    st.lost_jobs.insert(t.job.clone());
                    return st.conflict(i, Conflict::NotOwner);
                }
                if unit.victims.iter().enumerate().any(|(k, (_, v))| task_moved(v, &fresh.victims[k])) {
                    return st.conflict(i, Conflict::VictimChanged);
                }
                match &fresh.tasks[0] {
                    Some(fresh_task) if fresh_task.value.state == TaskState::Pending => {
                        st.tasks[i] = fresh_task.clone()
                    }
                    _ => return st.conflict(i, Conflict::TaskChanged),
                }
                if c.config.detection == Detection::Coarse {
                    let (ledger, live) = fresh.ledgers.get(&claim.node).cloned().unwrap_or((None, false));
                    return st.conflict(i, node_conflict(&ledger, live));
                }
                if attempt < c.config.max_fine_retries {
                    st.report.retried_claims += 1;
                }
            }
            Outcome::TooLarge { .. } => return st.conflict(i, Conflict::TooLarge),
            Outcome::Resend => {}
            Outcome::Fenced | Outcome::Unknown(_) => return st.conflict(i, Conflict::Unknown),
        }
    }
    st.conflict(i, Conflict::Contention)
}
