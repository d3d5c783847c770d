//! Ending a task's hold on its node: the other half of the commit protocol.
//!
//! When a task finishes, is cancelled, or its node is lost, three things must change together or the cell
//! drifts: the task's state, its node's ledger (minus the task's resources) and its assignment (deleted).
//! [`release`] does that in one sub-transaction per node, compared on the ledger's and every task's
//! mod_revision, many nodes per round trip, exactly like claims. A ledger changed by someone else (a claim
//! landing on the node) is re-read from the else branch and the release re-sent; a task changed by someone
//! else is left alone and reported, so a task is never released twice.
//!
//! Tasks that hold nothing (pending ones being cancelled) only get their state written, guarded the same way.

use crate::cell_state::Versioned;
use crate::error::{Error, Result};
use crate::model::{now_ms, Allocation, RunInfo, Task, TaskState};
use crate::store::{decode, encode, Store, DEFAULT_MAX_TXN_OPS};
use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use std::collections::BTreeMap;

/// A task to move to `state`, which must not hold resources (a terminal state, or `Pending` to be placed again).
#[derive(Clone, Debug)]
pub struct Release {
    /// The task as last seen; its mod_revision is compared.
    pub task: Versioned<Task>,
    pub state: TaskState,
    pub reason: Option<String>,
    /// What the agent learned about the process, if anything (replaces the task's `run`).
    pub run: Option<RunInfo>,
}

/// What became of one release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Written at this revision.
    Done { revision: i64 },
    /// The task changed since it was seen; nothing was written for it.
    TaskChanged,
    /// Its node's ledger kept changing under it (claims landing) for every retry; nothing was written. Try
    /// again.
    Contention,
}

/// Ledger re-reads per node before giving up (each one means a claim landed on the node meanwhile).
const MAX_ROUNDS: usize = 32;

/// A leader's fence: writes apply only while the election key still has this create revision, so a deposed
/// leader (its key gone, or a new leader's key in its place) cannot write.
#[derive(Clone, Debug)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
}

impl Fence {
    pub fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.revision)
    }

    fn refused(&self) -> Error {
        Error::NotLeader(String::from_utf8_lossy(&self.key).into_owned())
    }
}

/// Applies `releases`; returns one outcome per release, in order.
pub async fn release(store: &Store, releases: &[Release]) -> Result<Vec<ReleaseOutcome>> {
    release_fenced(store, releases, None).await
}

/// [`release`], applied only while `fence` holds (else [`Error::NotLeader`], nothing written).
pub async fn release_fenced(store: &Store, releases: &[Release], fence: Option<&Fence>) -> Result<Vec<ReleaseOutcome>> {
    for r in releases {
        if r.state.holds_resources() {
            return Err(Error::InvalidArgument(format!(
                "cannot release task {} into state {}",
                r.task.value.id, r.state
            )));
        }
    }
    let mut outcomes = vec![ReleaseOutcome::TaskChanged; releases.len()];
    let mut kv = store.client().kv_client();
    let keys = store.keys();

    // Group what holds resources by node; the rest is a guarded put each.
    let mut by_node: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in releases.iter().enumerate() {
        match (r.task.value.state.holds_resources(), r.task.value.node.clone()) {
            (true, Some(node)) => by_node.entry(node).or_default().push(i),
            _ => {
                let key = keys.task(&r.task.value.id);
                let put = Txn::new()
                    .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, r.task.mod_revision)])
                    .and_then([TxnOp::put(key.as_str(), encode(&key, &updated(r))?, None)]);
                let resp = kv.txn(fenced(Txn::new(), fence).and_then([TxnOp::txn(put)])).await?;
                if !resp.succeeded() {
                    return Err(fence
                        .map(Fence::refused)
                        .unwrap_or_else(|| Error::InvalidArgument("txn refused".into())));
                }
                if matches!(resp.op_responses().first(), Some(TxnOpResponse::Txn(t)) if t.succeeded()) {
                    outcomes[i] = ReleaseOutcome::Done { revision: resp.header().map(|h| h.revision()).unwrap_or(0) };
                }
            }
        }
    }

    // Per node: one sub-transaction (ledger compare + task compares), chunked to the op budget.
    let per_node = (DEFAULT_MAX_TXN_OPS - 2) / 2;
    let mut work: Vec<(String, Vec<usize>)> = Vec::new();
    for (node, idx) in by_node {
        for chunk in idx.chunks(per_node.max(1)) {
            work.push((node.clone(), chunk.to_vec()));
        }
    }
    // A node may appear in several chunks: chunks of one node go in successive rounds.
    let mut ledgers: BTreeMap<String, Option<Versioned<Allocation>>> = BTreeMap::new();
    for _ in 0..MAX_ROUNDS {
        if work.is_empty() {
            break;
        }
        // Fetch ledgers we do not know yet.
        for (node, _) in &work {
            if !ledgers.contains_key(node) {
                let key = keys.alloc(node);
                let got = store.get_json::<Allocation>(&key).await?.map(|(a, rev)| Versioned::new(a, rev));
                ledgers.insert(node.clone(), got);
            }
        }
        let mut this_round: Vec<(String, Vec<usize>)> = Vec::new();
        let mut later = Vec::new();
        for (node, idx) in work.drain(..) {
            if this_round.iter().any(|(n, _)| *n == node) {
                later.push((node, idx));
            } else {
                this_round.push((node, idx));
            }
        }
        // Pack sub-transactions: n_subs + widest sub <= max ops.
        let mut batches: Vec<Vec<(String, Vec<usize>)>> = Vec::new();
        let mut widest = 0;
        for item in this_round {
            let ops = 1 + 2 * item.1.len();
            let fits = batches.last().is_some_and(|b| b.len() + 1 + widest.max(ops) <= DEFAULT_MAX_TXN_OPS);
            if !fits {
                batches.push(Vec::new());
                widest = 0;
            }
            widest = widest.max(ops);
            batches.last_mut().expect("a batch was just pushed").push(item);
        }
        for batch in batches {
            let mut subs = Vec::with_capacity(batch.len());
            for (node, idx) in &batch {
                subs.push(TxnOp::txn(node_txn(
                    store,
                    node,
                    ledgers.get(node).and_then(Option::as_ref),
                    idx,
                    releases,
                )?));
            }
            let resp = kv.txn(fenced(Txn::new(), fence).and_then(subs)).await?;
            if !resp.succeeded() {
                return Err(fence.map(Fence::refused).unwrap_or_else(|| Error::InvalidArgument("txn refused".into())));
            }
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            for ((node, idx), sub) in batch.into_iter().zip(resp.op_responses()) {
                let TxnOpResponse::Txn(sub) = sub else { continue };
                if sub.succeeded() {
                    for &i in &idx {
                        outcomes[i] = ReleaseOutcome::Done { revision };
                    }
                    ledgers.remove(&node);
                    continue;
                }
                // Fresh state: ledger, then each task. Changed tasks are dropped; the rest retried.
                let mut gets = sub.op_responses().into_iter().map(|r| match r {
                    TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                    _ => None,
                });
                let fresh_ledger = gets
                    .next()
                    .flatten()
                    .map(|kv| decode::<Allocation>(&kv).map(|a| Versioned::new(a, kv.mod_revision())))
                    .transpose()?;
                let mut retry = Vec::new();
                for &i in &idx {
                    let fresh_task = gets.next().flatten();
                    if fresh_task.is_some_and(|kv| kv.mod_revision() == releases[i].task.mod_revision) {
                        retry.push(i);
                    }
                }
                ledgers.insert(node.clone(), fresh_ledger);
                if !retry.is_empty() {
                    later.push((node, retry));
                }
            }
        }
        work = later;
        if !work.is_empty() {
            // Lost a race on a ledger: back off a little, with jitter, so racing writers spread out.
            let pause = rand::random_range(1..=4u64) << ledgers.len().min(4);
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
    }
    if !work.is_empty() {
        tracing::warn!(nodes = work.len(), "releases kept losing races on their nodes' ledgers; left for a retry");
        for (_, idx) in &work {
            for &i in idx {
                outcomes[i] = ReleaseOutcome::Contention;
            }
        }
    }
    Ok(outcomes)
}

/// `txn` guarded by `fence`, if any (an outer transaction whose only compare is the fence).
fn fenced(txn: Txn, fence: Option<&Fence>) -> Txn {
    match fence {
        Some(f) => txn.when([f.compare()]),
        None => txn,
    }
}

/// The new record of a released task.
fn updated(r: &Release) -> Task {
    let mut t = (*r.task.value).clone();
    t.state = r.state;
    t.reason = r.reason.clone();
    if let Some(run) = &r.run {
        t.run = Some(run.clone());
    }
    t.updated_at_ms = now_ms();
    t
}

/// One node's sub-transaction: compare ledger and tasks; put the smaller ledger and the tasks' new states;
/// delete their assignments; else read the ledger and the tasks back.
fn node_txn(
    store: &Store,
    node: &str,
    ledger: Option<&Versioned<Allocation>>,
    idx: &[usize],
    releases: &[Release],
) -> Result<Txn> {
    let keys = store.keys();
    let alloc_key = keys.alloc(node);
    let mut compares = Vec::new();
    let mut writes = Vec::new();
    let mut reads = vec![TxnOp::get(alloc_key.as_str(), None)];
    match ledger {
        Some(l) => {
            compares.push(Compare::mod_revision(alloc_key.as_str(), CompareOp::Equal, l.mod_revision));
            let mut smaller = (*l.value).clone();
            for &i in idx {
                smaller.remove(releases[i].task.value.resources);
            }
            writes.push(TxnOp::put(alloc_key.as_str(), encode(&alloc_key, &smaller)?, None));
        }
        // The node's ledger is gone (node removed): only the tasks change.
        None => compares.push(Compare::create_revision(alloc_key.as_str(), CompareOp::Equal, 0)),
    }
    for &i in idx {
        let r = &releases[i];
        let task_key = keys.task(&r.task.value.id);
        compares.push(Compare::mod_revision(task_key.as_str(), CompareOp::Equal, r.task.mod_revision));
        writes.push(TxnOp::put(task_key.as_str(), encode(&task_key, &updated(r))?, None));
        writes.push(TxnOp::delete(keys.assignment(node, &r.task.value.id), None));
        reads.push(TxnOp::get(task_key.as_str(), None));
    }
    Ok(Txn::new().when(compares).and_then(writes).or_else(reads))
}

/// Writes a task's new record if it has not changed since `seen` (for transitions that keep resources, such as
/// assigned -> running). Returns the new revision, or `None` if the task changed meanwhile.
pub async fn update_task(store: &Store, seen: &Versioned<Task>, new: &Task) -> Result<Option<i64>> {
    if seen.value.state.holds_resources() != new.state.holds_resources() {
        return Err(Error::InvalidArgument(format!(
            "task {}: {} -> {} changes what it holds; use release",
            new.id, seen.value.state, new.state
        )));
    }
    let key = store.keys().task(&new.id);
    let txn = Txn::new()
        .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, seen.mod_revision)])
        .and_then([TxnOp::put(key.as_str(), encode(&key, new)?, None)]);
    let resp = store.client().kv_client().txn(txn).await?;
    Ok(resp.succeeded().then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
}

/// Writes many tasks' new records, each guarded by its own mod_revision compare, in as few round trips as the
/// server allows (one nested sub-transaction per task). For transitions that keep resources; returns, per
/// update in order, the new revision or `None` where the task had changed.
pub async fn update_tasks(store: &Store, updates: &[(Versioned<Task>, Task)]) -> Result<Vec<Option<i64>>> {
    for (seen, new) in updates {
        if seen.value.state.holds_resources() != new.state.holds_resources() {
            return Err(Error::InvalidArgument(format!(
                "task {}: {} -> {} changes what it holds; use release",
                new.id, seen.value.state, new.state
            )));
        }
    }
    let keys = store.keys();
    let mut kv = store.client().kv_client();
    let mut out = Vec::with_capacity(updates.len());
    // One compare and one put per sub-transaction: 125 of them fit in etcd's default 128 ops.
    for chunk in updates.chunks(DEFAULT_MAX_TXN_OPS - 3) {
        let mut subs = Vec::with_capacity(chunk.len());
        for (seen, new) in chunk {
            let key = keys.task(&new.id);
            subs.push(TxnOp::txn(
                Txn::new()
                    .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, seen.mod_revision)])
                    .and_then([TxnOp::put(key.as_str(), encode(&key, new)?, None)]),
            ));
        }
        let resp = kv.txn(Txn::new().and_then(subs)).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        for sub in resp.op_responses() {
            out.push(match sub {
                TxnOpResponse::Txn(t) if t.succeeded() => Some(revision),
                _ => None,
            });
        }
    }
    Ok(out)
}
