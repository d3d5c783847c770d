//! The optimistic commit protocol: how a scheduler's placement decisions become claims in etcd.
//!
//! A scheduler decides on a [`CellSnapshot`] that may already be stale, then hands its claims (task -> node)
//! to a [`Committer`]. Every claim is written together with a check that the decision still holds, inside one
//! etcd transaction, so a node can never be over-committed and a task never placed twice, whatever other
//! schedulers do at the same moment. There is no lock and no central arbiter.
//!
//! What one claim writes, guarded by compares, in one transaction:
//!
//! ```text
//! compare  alloc/<node>.mod_revision == seen      the node's ledger is the one we decided on
//!          live/<node>.create_revision > 0        the node is alive
//!          tasks/<task>.mod_revision == seen      nobody else placed or changed the task
//! then     put alloc/<node>    ledger + this task's resources
//!          put tasks/<task>    state = assigned, node = <node>
//!          put assign/<node>/<task>               what the node's agent runs
//! else     get alloc/<node>, live/<node>, tasks/<task>   the fresh state, in the same round trip
//! ```
//!
//! **Incremental** commits ([`CommitKind::Incremental`]) put all claims for one node into one sub-transaction
//! and many nodes' sub-transactions into one outer transaction with no compare of its own (etcd's nested
//! transactions). Each node's claims then succeed or fail on their own, and a failed node returns its fresh
//! state in the same response. **Gang** commits ([`CommitKind::Gang`]) put every compare of every claim in one
//! flat transaction: all claims land or none does.
//!
//! Conflict detection ([`Detection`]) follows the Omega paper. **Coarse**: any change to a node since the
//! snapshot fails its claims. **Fine**: a changed node fails a claim only if the claim no longer fits the
//! node's fresh state; claims that still fit are re-sent at once against the fresh ledger, without asking the
//! scheduler to decide again. Fit is [`Resources::fit`], the same function placement uses.
//!
//! Batches are split to the server's `--max-txn-ops` (a nested sub-transaction gets the outer transaction's
//! leftover budget) and to a request-size budget; if the server refuses a batch as too large anyway, the
//! committer lowers its limit and re-sends.

use crate::cell_state::{CellSnapshot, Versioned};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::model::{now_ms, Allocation, Assignment, Task, TaskState};
use crate::resources::Dimension;
use crate::store::{decode, encode, Store, DEFAULT_MAX_TXN_OPS};
use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse};
use futures_util::future::join_all;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The smallest op limit the committer works with: one node's sub-transaction with one claim (3 ops) in an
/// outer transaction.
const MIN_TXN_OPS: usize = 8;

/// How a conflict is decided (the Omega paper's two kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detection {
    /// Any change to the node since the snapshot is a conflict.
    Coarse,
    /// A change is a conflict only if the claim no longer fits the node's fresh state.
    Fine,
}

/// Whether claims stand alone or as one gang.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitKind {
    /// Each node's claims succeed or fail on their own.
    Incremental,
    /// All claims succeed together or none does.
    Gang,
}

/// A decision to put one task on one node. `task` is the task as the scheduler saw it: its mod_revision is
/// compared, and the committed record is derived from it.
#[derive(Clone, Debug)]
pub struct Claim {
    pub task: Versioned<Task>,
    pub node: String,
    /// Lower-priority tasks on `node` to evict so this one fits (preemption). They are evicted in the same
    /// sub-transaction as the claim: both happen or neither does. Each goes back to `pending` for its own
    /// scheduler with the reason recorded; the claimed task records whom it preempted.
    pub preempts: Vec<Versioned<Task>>,
}

impl Claim {
    pub fn new(task: Versioned<Task>, node: impl Into<String>) -> Self {
        Claim { task, node: node.into(), preempts: Vec::new() }
    }

    /// A claim that evicts `victims` from `node` to make room.
    pub fn preempting(task: Versioned<Task>, node: impl Into<String>, victims: Vec<Versioned<Task>>) -> Self {
        Claim { task, node: node.into(), preempts: victims }
    }
}

/// Why a claim was not committed. Stable names, for metrics and for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conflict {
    /// Coarse detection: the node's ledger changed since the snapshot.
    NodeChanged,
    /// The claim does not fit the node's (fresh) state in this dimension.
    NoRoom(Dimension),
    /// The node is drained, down, or its liveness key is gone.
    NotSchedulable,
    /// The node has no ledger (never registered, or removed).
    NodeGone,
    /// The task changed since the snapshot and is no longer pending (placed by someone else, cancelled).
    TaskChanged,
    /// Fine detection: the claim still fit, but lost the race on its node more times than allowed.
    Contention,
    /// Gang commits: this claim was fine, another claim of the gang was not.
    GangAborted,
    /// The same task appears more than once in one commit; only its first claim is tried.
    Duplicate,
    /// A task this claim meant to preempt changed (finished, moved, or was preempted by someone else).
    VictimChanged,
    /// The request failed in transport; it may or may not have been applied. Re-read the cell.
    Unknown,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::NodeChanged => f.write_str("node changed since the snapshot"),
            Conflict::NoRoom(d) => write!(f, "insufficient {d}"),
            Conflict::NotSchedulable => f.write_str("node not schedulable"),
            Conflict::NodeGone => f.write_str("node not registered"),
            Conflict::TaskChanged => f.write_str("task changed by someone else"),
            Conflict::Contention => f.write_str("lost the race on the node too many times"),
            Conflict::GangAborted => f.write_str("another claim of the gang conflicted"),
            Conflict::Duplicate => f.write_str("task claimed twice in one commit"),
            Conflict::VictimChanged => f.write_str("a task to preempt changed"),
            Conflict::Unknown => f.write_str("outcome unknown (request failed)"),
        }
    }
}

/// The fate of one claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Written at this etcd revision.
    Committed {
        revision: i64,
    },
    Conflicted(Conflict),
}

impl ClaimOutcome {
    pub fn is_committed(&self) -> bool {
        matches!(self, ClaimOutcome::Committed { .. })
    }
}

/// What a commit did, claim by claim (same order as the claims given) and in round trips.
#[derive(Clone, Debug, Default)]
pub struct CommitReport {
    pub outcomes: Vec<ClaimOutcome>,
    /// Transactions sent (every round, every batch).
    pub transactions: u32,
    /// Rounds: the first send plus each fine-detection retry round.
    pub rounds: u32,
    /// Node sub-transactions (or gang transactions) whose compares failed.
    pub failed_node_txns: u32,
    /// Claims re-sent after a fine check found they still fit.
    pub retried_claims: u32,
    /// Latency of each transaction.
    pub latencies: Vec<Duration>,
    /// The newest ledger known for each node the commit touched: the one it wrote, or the fresh one a failed
    /// compare returned (`None`: the ledger is gone). A scheduler can decide its next placements on these
    /// without waiting for its cache to catch up.
    pub ledgers: HashMap<String, Option<Versioned<Allocation>>>,
}

impl CommitReport {
    pub fn committed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.is_committed()).count()
    }
    pub fn conflicted(&self) -> usize {
        self.outcomes.len() - self.committed()
    }
    /// The highest revision written, for waiting until one's cache has seen its own commit.
    pub fn max_revision(&self) -> Option<i64> {
        self.outcomes
            .iter()
            .filter_map(|o| match o {
                ClaimOutcome::Committed { revision } => Some(*revision),
                _ => None,
            })
            .max()
    }
}

/// Process-wide counters, shared by every commit of one [`Committer`].
#[derive(Debug, Default)]
pub struct CommitStats {
    pub transactions: AtomicU64,
    pub claims: AtomicU64,
    pub committed: AtomicU64,
    pub conflicted: AtomicU64,
    pub failed_node_txns: AtomicU64,
    pub retried_claims: AtomicU64,
    by_conflict: parking_lot::Mutex<BTreeMap<String, u64>>,
}

impl CommitStats {
    fn record(&self, report: &CommitReport) {
        self.transactions.fetch_add(report.transactions as u64, Ordering::Relaxed);
        self.claims.fetch_add(report.outcomes.len() as u64, Ordering::Relaxed);
        self.committed.fetch_add(report.committed() as u64, Ordering::Relaxed);
        self.conflicted.fetch_add(report.conflicted() as u64, Ordering::Relaxed);
        self.failed_node_txns.fetch_add(report.failed_node_txns as u64, Ordering::Relaxed);
        self.retried_claims.fetch_add(report.retried_claims as u64, Ordering::Relaxed);
        let mut by = self.by_conflict.lock();
        for o in &report.outcomes {
            if let ClaimOutcome::Conflicted(c) = o {
                *by.entry(conflict_label(*c)).or_default() += 1;
            }
        }
    }

    /// Conflicted claims by reason (`node_changed`, `no_room_cpu`, ...).
    pub fn conflicts_by_reason(&self) -> BTreeMap<String, u64> {
        self.by_conflict.lock().clone()
    }
}

/// A stable label for a conflict, for metrics.
pub fn conflict_label(c: Conflict) -> String {
    match c {
        Conflict::NoRoom(d) => format!("no_room_{d}"),
        other => serde_json::to_value(other).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
    }
}

/// How a [`Committer`] behaves.
#[derive(Clone, Debug)]
pub struct CommitConfig {
    pub detection: Detection,
    /// The server's `--max-txn-ops`. The committer lowers its own copy if the server refuses a batch.
    pub max_txn_ops: usize,
    /// Budget for one request's keys and values (etcd's default limit is 1.5 MiB).
    pub max_request_bytes: usize,
    /// Fine detection: how many times a claim that still fits is re-sent before it is reported as
    /// [`Conflict::Contention`].
    pub max_fine_retries: u32,
    /// Transactions in flight at once from this committer (all its commits together). Bounds the load one
    /// scheduler puts on etcd, so lease renewals and other schedulers keep getting through.
    pub max_in_flight: usize,
    /// Who is committing (written into the tasks it places).
    pub placed_by: String,
}

impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            detection: Detection::Fine,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            max_request_bytes: 1 << 20,
            max_fine_retries: 8,
            max_in_flight: 8,
            placed_by: "omega".into(),
        }
    }
}

/// Commits claims. Cheap to share (`Arc`); all its commits share one in-flight budget and one set of stats.
pub struct Committer {
    store: Store,
    config: CommitConfig,
    max_ops: AtomicUsize,
    in_flight: Arc<Semaphore>,
    stats: Arc<CommitStats>,
}

/// A node's state as the committer currently believes it.
#[derive(Clone)]
struct NodeBase {
    ledger: Option<Versioned<Allocation>>,
    live: bool,
}

impl NodeBase {
    fn from_snapshot(snapshot: &CellSnapshot, node: &str) -> Self {
        NodeBase { ledger: snapshot.allocations.get(node).cloned(), live: snapshot.live.contains_key(node) }
    }

    /// Why nothing at all can be claimed on this node now, if so.
    fn refusal(&self) -> Option<Conflict> {
        match &self.ledger {
            None => Some(Conflict::NodeGone),
            Some(l) if !l.value.schedulable || !self.live => Some(Conflict::NotSchedulable),
            Some(_) => None,
        }
    }
}

/// The claims for one node that go into one sub-transaction (or one part of a gang).
struct NodeChunk {
    node: String,
    base_rev: i64,
    new_ledger: Allocation,
    /// Indices into the commit's claims.
    claims: Vec<usize>,
    /// Tasks evicted by this chunk's claims: (index of the claim, the victim as seen).
    victims: Vec<(usize, Versioned<Task>)>,
}

impl NodeChunk {
    /// Ops this chunk needs in its sub-transaction: the ledger, then two per claim and two per victim.
    fn ops(&self) -> usize {
        1 + 2 * (self.claims.len() + self.victims.len())
    }
}

/// Fresh state read back from a failed compare.
struct Fresh {
    ledger: Option<Versioned<Allocation>>,
    live: bool,
    tasks: Vec<Option<Versioned<Task>>>,
}

impl Committer {
    pub fn new(store: Store, config: CommitConfig) -> Self {
        Committer {
            max_ops: AtomicUsize::new(config.max_txn_ops.max(MIN_TXN_OPS)),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            store,
            config,
            stats: Arc::new(CommitStats::default()),
        }
    }

    pub fn config(&self) -> &CommitConfig {
        &self.config
    }

    pub fn stats(&self) -> &Arc<CommitStats> {
        &self.stats
    }

    /// The op limit in force (the configured one, or lower if the server refused a batch).
    pub fn max_txn_ops(&self) -> usize {
        self.max_ops.load(Ordering::Relaxed)
    }

    /// Commits `claims`, decided on `snapshot`. Returns every claim's fate. Errors only for what no claim
    /// outcome can express (a gang too large for one transaction, an undecodable fresh value).
    pub async fn commit(&self, snapshot: &CellSnapshot, claims: &[Claim], kind: CommitKind) -> Result<CommitReport> {
        let report = match kind {
            CommitKind::Incremental => self.commit_incremental(snapshot, claims).await?,
            CommitKind::Gang => self.commit_gang(snapshot, claims).await?,
        };
        self.stats.record(&report);
        Ok(report)
    }

    fn keys(&self) -> &Keys {
        self.store.keys()
    }

    async fn commit_incremental(&self, snapshot: &CellSnapshot, claims: &[Claim]) -> Result<CommitReport> {
        let mut report = CommitReport {
            outcomes: vec![ClaimOutcome::Conflicted(Conflict::Unknown); claims.len()],
            ..Default::default()
        };
        let mut decided = vec![false; claims.len()];
        let mut tasks: Vec<Versioned<Task>> = claims.iter().map(|c| c.task.clone()).collect();

        // Per node: what we believe it holds, and its claims still to send, in the caller's order.
        let mut bases: BTreeMap<String, NodeBase> = BTreeMap::new();
        let mut queues: BTreeMap<String, VecDeque<usize>> = BTreeMap::new();
        let mut retries: HashMap<String, u32> = HashMap::new();
        let mut seen_ids = HashSet::new();
        // Victims already taken by an earlier claim of this commit (a key may be written once per txn).
        let mut evicted: HashSet<String> = HashSet::new();
        for (i, c) in claims.iter().enumerate() {
            if !seen_ids.insert(c.task.value.id.as_str()) {
                report.outcomes[i] = ClaimOutcome::Conflicted(Conflict::Duplicate);
                decided[i] = true;
                continue;
            }
            bases.entry(c.node.clone()).or_insert_with(|| NodeBase::from_snapshot(snapshot, &c.node));
            queues.entry(c.node.clone()).or_default().push_back(i);
        }

        let settle = |i: usize, outcome: ClaimOutcome, decided: &mut Vec<bool>, report: &mut CommitReport| {
            report.outcomes[i] = outcome;
            decided[i] = true;
        };

        while queues.values().any(|q| !q.is_empty()) {
            report.rounds += 1;
            let limit = self.max_txn_ops();
            // A node's chunk of t claims needs 1 + 2t ops; with at least one sibling in the outer txn it gets
            // `limit - 1` at most.
            let per_node = ((limit.saturating_sub(2)) / 2).max(1);

            // Build this round's chunks: at most one per node (a key may appear once per transaction).
            let mut chunks = Vec::new();
            for (node, queue) in queues.iter_mut() {
                if queue.is_empty() {
                    continue;
                }
                let base = &bases[node];
                if let Some(why) = base.refusal() {
                    for i in queue.drain(..) {
                        settle(i, ClaimOutcome::Conflicted(why), &mut decided, &mut report);
                    }
                    continue;
                }
                let ledger = base.ledger.as_ref().expect("refusal() checked the ledger");
                let mut new_ledger = (*ledger.value).clone();
                let (mut taken, mut victims) = (Vec::new(), Vec::new());
                while taken.len() + victims.len() < per_node {
                    let Some(i) = queue.pop_front() else { break };
                    let t = &tasks[i].value;
                    if t.state != TaskState::Pending {
                        settle(i, ClaimOutcome::Conflicted(Conflict::TaskChanged), &mut decided, &mut report);
                        continue;
                    }
                    // Victims must hold resources here now (as far as we know) and be evicted only once.
                    let preempts = &claims[i].preempts;
                    let victim_ok = |v: &Versioned<Task>| {
                        v.value.state.holds_resources() && v.value.node.as_deref() == Some(node.as_str())
                    };
                    if !preempts.iter().all(victim_ok) {
                        settle(i, ClaimOutcome::Conflicted(Conflict::VictimChanged), &mut decided, &mut report);
                        continue;
                    }
                    if preempts
                        .iter()
                        .any(|v| !evicted.insert(v.value.id.clone()) || seen_ids.contains(v.value.id.as_str()))
                    {
                        settle(i, ClaimOutcome::Conflicted(Conflict::Duplicate), &mut decided, &mut report);
                        continue;
                    }
                    let mut trial = new_ledger.clone();
                    for v in preempts {
                        trial.remove(v.value.resources);
                    }
                    match trial.fits(t.resources) {
                        Ok(()) => {
                            trial.add(t.resources);
                            new_ledger = trial;
                            taken.push(i);
                            victims.extend(preempts.iter().map(|v| (i, v.clone())));
                        }
                        Err(d) => {
                            for v in preempts {
                                evicted.remove(&v.value.id);
                            }
                            settle(i, ClaimOutcome::Conflicted(Conflict::NoRoom(d)), &mut decided, &mut report)
                        }
                    }
                }
                if !taken.is_empty() {
                    chunks.push(NodeChunk {
                        node: node.clone(),
                        base_rev: ledger.mod_revision,
                        new_ledger,
                        claims: taken,
                        victims,
                    });
                }
            }
            if chunks.is_empty() {
                break;
            }

            // Pack chunks into outer transactions and send them concurrently.
            let batches = self.pack(chunks, &tasks, limit);
            let sends = batches.into_iter().map(|batch| self.send_nested(batch, &tasks));
            let results = join_all(sends).await;
            for (batch, result) in results {
                report.transactions += 1;
                let (resp, latency) = match result {
                    Ok(ok) => ok,
                    Err(e) if e.is_too_many_ops() || e.is_request_too_large() => {
                        if !self.shrink_limits(&e) {
                            return Err(e);
                        }
                        for chunk in batch.into_iter().rev() {
                            for (_, v) in &chunk.victims {
                                evicted.remove(&v.value.id);
                            }
                            let q = queues.get_mut(&chunk.node).expect("queue of a chunk's node");
                            for &i in chunk.claims.iter().rev() {
                                q.push_front(i);
                            }
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "commit transaction failed; its claims' outcome is unknown");
                        for chunk in batch {
                            for i in chunk.claims {
                                settle(i, ClaimOutcome::Conflicted(Conflict::Unknown), &mut decided, &mut report);
                            }
                        }
                        continue;
                    }
                };
                report.latencies.push(latency);
                let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                let subs = resp.op_responses();
                for (chunk, sub) in batch.into_iter().zip(subs) {
                    let TxnOpResponse::Txn(sub) = sub else {
                        return Err(Error::InvalidArgument(
                            "etcd answered a nested transaction with a non-txn response".into(),
                        ));
                    };
                    if sub.succeeded() {
                        for &i in &chunk.claims {
                            settle(i, ClaimOutcome::Committed { revision }, &mut decided, &mut report);
                        }
                        let written = Versioned::new(chunk.new_ledger, revision);
                        report.ledgers.insert(chunk.node.clone(), Some(written.clone()));
                        bases.insert(chunk.node.clone(), NodeBase { ledger: Some(written), live: true });
                        continue;
                    }
                    report.failed_node_txns += 1;
                    let fresh = Fresh::read(&mut else_gets(&sub), chunk.claims.len() + chunk.victims.len())?;
                    for (_, v) in &chunk.victims {
                        evicted.remove(&v.value.id);
                    }
                    report.ledgers.insert(chunk.node.clone(), fresh.ledger.clone());
                    let queue = queues.get_mut(&chunk.node).expect("queue of a chunk's node");
                    match self.config.detection {
                        Detection::Coarse => {
                            let why = node_conflict(&fresh);
                            for (k, &i) in chunk.claims.iter().enumerate() {
                                let c =
                                    if task_moved(&tasks[i], &fresh.tasks[k]) { Conflict::TaskChanged } else { why };
                                settle(i, ClaimOutcome::Conflicted(c), &mut decided, &mut report);
                            }
                            // The rest of this node's claims were decided on the same stale ledger.
                            for i in queue.drain(..) {
                                settle(i, ClaimOutcome::Conflicted(why), &mut decided, &mut report);
                            }
                        }
                        Detection::Fine => {
                            let tries = retries.entry(chunk.node.clone()).or_default();
                            *tries += 1;
                            let exhausted = *tries > self.config.max_fine_retries;
                            let n_claims = chunk.claims.len();
                            let victim_moved = |i: usize| {
                                chunk
                                    .victims
                                    .iter()
                                    .enumerate()
                                    .any(|(k, (owner, v))| *owner == i && task_moved(v, &fresh.tasks[n_claims + k]))
                            };
                            for (k, &i) in chunk.claims.iter().enumerate().rev() {
                                match &fresh.tasks[k] {
                                    Some(_) if victim_moved(i) => settle(
                                        i,
                                        ClaimOutcome::Conflicted(Conflict::VictimChanged),
                                        &mut decided,
                                        &mut report,
                                    ),
                                    Some(t) if t.value.state == TaskState::Pending => {
                                        tasks[i] = t.clone();
                                        if exhausted {
                                            settle(
                                                i,
                                                ClaimOutcome::Conflicted(Conflict::Contention),
                                                &mut decided,
                                                &mut report,
                                            );
                                        } else {
                                            report.retried_claims += 1;
                                            queue.push_front(i);
                                        }
                                    }
                                    _ => settle(
                                        i,
                                        ClaimOutcome::Conflicted(Conflict::TaskChanged),
                                        &mut decided,
                                        &mut report,
                                    ),
                                }
                            }
                            if exhausted {
                                for i in queue.drain(..) {
                                    settle(
                                        i,
                                        ClaimOutcome::Conflicted(Conflict::Contention),
                                        &mut decided,
                                        &mut report,
                                    );
                                }
                            }
                            bases.insert(chunk.node.clone(), NodeBase { ledger: fresh.ledger, live: fresh.live });
                        }
                    }
                }
            }
        }
        debug_assert!(decided.iter().all(|d| *d), "every claim gets an outcome");
        Ok(report)
    }

    /// Groups chunks into outer transactions within the op and byte budgets.
    fn pack(&self, chunks: Vec<NodeChunk>, tasks: &[Versioned<Task>], limit: usize) -> Vec<Vec<NodeChunk>> {
        let byte_budget = self.config.max_request_bytes;
        let mut batches = Vec::new();
        let mut batch: Vec<NodeChunk> = Vec::new();
        let (mut widest, mut bytes) = (0usize, 0usize);
        for chunk in chunks {
            let ops = chunk.ops();
            let size = self.estimate_bytes(&chunk, tasks);
            let fits = batch.len() + 1 + widest.max(ops) <= limit && bytes + size <= byte_budget;
            if !batch.is_empty() && !fits {
                batches.push(std::mem::take(&mut batch));
                widest = 0;
                bytes = 0;
            }
            widest = widest.max(ops);
            bytes += size;
            batch.push(chunk);
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        batches
    }

    /// A generous estimate of what a chunk adds to a request: keys twice (compare and write), values once,
    /// the ledger's key and value.
    fn estimate_bytes(&self, chunk: &NodeChunk, tasks: &[Versioned<Task>]) -> usize {
        let per_task: usize =
            chunk.claims.iter().map(|&i| 3 * (self.keys().task(&tasks[i].value.id).len() + 64) + 512).sum();
        per_task + 512
    }

    /// Halves the op limit after etcd refused a batch as too many operations or too large. Returns false if
    /// the limit is already at its floor (a server this small cannot take even one node's claims).
    fn shrink_limits(&self, e: &Error) -> bool {
        let now = self.max_ops.load(Ordering::Relaxed);
        if now <= MIN_TXN_OPS {
            return false;
        }
        let lower = (now / 2).max(MIN_TXN_OPS);
        self.max_ops.store(lower, Ordering::Relaxed);
        tracing::warn!(from = now, to = lower, error = %e, "etcd refused a batch; lowering the op limit and re-sending");
        true
    }

    /// The compares, writes and fresh-state reads of one node's chunk.
    fn chunk_ops(
        &self,
        chunk: &NodeChunk,
        tasks: &[Versioned<Task>],
    ) -> Result<(Vec<Compare>, Vec<TxnOp>, Vec<TxnOp>)> {
        let keys = self.keys();
        let alloc_key = keys.alloc(&chunk.node);
        let live_key = keys.live(&chunk.node);
        let mut compares = vec![
            Compare::mod_revision(alloc_key.as_str(), CompareOp::Equal, chunk.base_rev),
            Compare::create_revision(live_key.as_str(), CompareOp::Greater, 0),
        ];
        let mut writes = vec![TxnOp::put(alloc_key.as_str(), encode(&alloc_key, &chunk.new_ledger)?, None)];
        let mut reads = vec![TxnOp::get(alloc_key.as_str(), None), TxnOp::get(live_key.as_str(), None)];
        let now = now_ms();
        for &i in &chunk.claims {
            let seen = &tasks[i];
            let task_key = keys.task(&seen.value.id);
            compares.push(Compare::mod_revision(task_key.as_str(), CompareOp::Equal, seen.mod_revision));
            let mut placed = (*seen.value).clone();
            placed.state = TaskState::Assigned;
            placed.node = Some(chunk.node.clone());
            placed.placed_by = Some(self.config.placed_by.clone());
            placed.placements += 1;
            placed.reason = None;
            placed.updated_at_ms = now;
            placed.preempted =
                chunk.victims.iter().filter(|(owner, _)| *owner == i).map(|(_, v)| v.value.id.clone()).collect();
            let assignment = Assignment {
                task: placed.id.clone(),
                job: placed.job.clone(),
                node: chunk.node.clone(),
                resources: placed.resources,
                placement: placed.placements,
                placed_by: self.config.placed_by.clone(),
                assigned_at_ms: now,
            };
            let assign_key = keys.assignment(&chunk.node, &placed.id);
            writes.push(TxnOp::put(task_key.as_str(), encode(&task_key, &placed)?, None));
            writes.push(TxnOp::put(assign_key.as_str(), encode(&assign_key, &assignment)?, None));
            reads.push(TxnOp::get(task_key.as_str(), None));
        }
        for (owner, victim) in &chunk.victims {
            let by = &tasks[*owner].value;
            let task_key = keys.task(&victim.value.id);
            compares.push(Compare::mod_revision(task_key.as_str(), CompareOp::Equal, victim.mod_revision));
            let mut evicted = (*victim.value).clone();
            evicted.state = TaskState::Pending;
            evicted.reason = Some(format!(
                "preempted by {} (priority {} over {}) on {}",
                by.id, by.priority, evicted.priority, chunk.node
            ));
            evicted.updated_at_ms = now;
            writes.push(TxnOp::put(task_key.as_str(), encode(&task_key, &evicted)?, None));
            writes.push(TxnOp::delete(keys.assignment(&chunk.node, &victim.value.id), None));
            reads.push(TxnOp::get(task_key.as_str(), None));
        }
        Ok((compares, writes, reads))
    }

    /// Sends one outer transaction of per-node sub-transactions. Returns the batch back with the result so
    /// the caller can match sub-responses to chunks.
    async fn send_nested(
        &self,
        batch: Vec<NodeChunk>,
        tasks: &[Versioned<Task>],
    ) -> (Vec<NodeChunk>, Result<(TxnResponse, Duration)>) {
        let mut subs = Vec::with_capacity(batch.len());
        for chunk in &batch {
            match self.chunk_ops(chunk, tasks) {
                Ok((compares, writes, reads)) => {
                    subs.push(TxnOp::txn(Txn::new().when(compares).and_then(writes).or_else(reads)))
                }
                Err(e) => return (batch, Err(e)),
            }
        }
        let result = self.send(Txn::new().and_then(subs)).await;
        (batch, result)
    }

    async fn send(&self, txn: Txn) -> Result<(TxnResponse, Duration)> {
        let _permit = self.in_flight.acquire().await.map_err(|_| Error::CacheStopped)?;
        let started = Instant::now();
        let resp = self.store.client().kv_client().txn(txn).await?;
        Ok((resp, started.elapsed()))
    }

    async fn commit_gang(&self, snapshot: &CellSnapshot, claims: &[Claim]) -> Result<CommitReport> {
        let mut report = CommitReport::default();
        let n = claims.len();
        let mut seen = HashSet::new();
        if let Some(dup) = claims.iter().position(|c| !seen.insert(c.task.value.id.as_str())) {
            report.outcomes = vec![ClaimOutcome::Conflicted(Conflict::GangAborted); n];
            report.outcomes[dup] = ClaimOutcome::Conflicted(Conflict::Duplicate);
            return Ok(report);
        }
        if claims.iter().any(|c| !c.preempts.is_empty()) {
            return Err(Error::InvalidArgument("gang commits do not preempt; commit evictions incrementally".into()));
        }
        let mut tasks: Vec<Versioned<Task>> = claims.iter().map(|c| c.task.clone()).collect();
        let mut bases: BTreeMap<String, NodeBase> = BTreeMap::new();
        for c in claims {
            bases.entry(c.node.clone()).or_insert_with(|| NodeBase::from_snapshot(snapshot, &c.node));
        }
        let abort = |culprits: Vec<(usize, Conflict)>, mut report: CommitReport| {
            report.outcomes = vec![ClaimOutcome::Conflicted(Conflict::GangAborted); n];
            for (i, c) in culprits {
                report.outcomes[i] = ClaimOutcome::Conflicted(c);
            }
            report
        };
        loop {
            report.rounds += 1;
            // Check the whole gang against what we believe; any refusal aborts it before sending.
            let mut chunks: BTreeMap<String, NodeChunk> = BTreeMap::new();
            let mut culprits = Vec::new();
            for (i, c) in claims.iter().enumerate() {
                let base = &bases[&c.node];
                if let Some(why) = base.refusal() {
                    culprits.push((i, why));
                    continue;
                }
                let ledger = base.ledger.as_ref().expect("refusal() checked the ledger");
                let chunk = chunks.entry(c.node.clone()).or_insert_with(|| NodeChunk {
                    node: c.node.clone(),
                    base_rev: ledger.mod_revision,
                    new_ledger: (*ledger.value).clone(),
                    claims: Vec::new(),
                    victims: Vec::new(),
                });
                let t = &tasks[i].value;
                if t.state != TaskState::Pending {
                    culprits.push((i, Conflict::TaskChanged));
                    continue;
                }
                match chunk.new_ledger.fits(t.resources) {
                    Ok(()) => {
                        chunk.new_ledger.add(t.resources);
                        chunk.claims.push(i);
                    }
                    Err(d) => culprits.push((i, Conflict::NoRoom(d))),
                }
            }
            if !culprits.is_empty() {
                return Ok(abort(culprits, report));
            }
            let chunks: Vec<NodeChunk> = chunks.into_values().collect();
            let txn = self.gang_txn(&chunks, &tasks)?;
            report.transactions += 1;
            let (resp, latency) = match self.send(txn).await {
                Ok(ok) => ok,
                Err(e) if e.is_too_many_ops() || e.is_request_too_large() => {
                    // The server's limit is below what we were told; the gang cannot shrink.
                    self.shrink_limits(&e);
                    return Err(self.gang_too_large(&chunks));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gang transaction failed; its outcome is unknown");
                    report.outcomes = vec![ClaimOutcome::Conflicted(Conflict::Unknown); n];
                    return Ok(report);
                }
            };
            report.latencies.push(latency);
            if resp.succeeded() {
                let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                report.outcomes = vec![ClaimOutcome::Committed { revision }; n];
                for chunk in chunks {
                    report.ledgers.insert(chunk.node, Some(Versioned::new(chunk.new_ledger, revision)));
                }
                return Ok(report);
            }
            report.failed_node_txns += 1;
            // The else branch holds, per chunk: ledger, liveness, then each of its tasks.
            let mut gets = else_gets(&resp);
            let mut culprits = Vec::new();
            for chunk in &chunks {
                let fresh = Fresh::read(&mut gets, chunk.claims.len())?;
                let node_changed = fresh.ledger.as_ref().map(|l| l.mod_revision) != Some(chunk.base_rev) || !fresh.live;
                for (k, &i) in chunk.claims.iter().enumerate() {
                    let coarse = self.config.detection == Detection::Coarse;
                    if let Some(c) = task_conflict(&tasks[i], &fresh.tasks[k]) {
                        culprits.push((i, c));
                    } else if coarse && task_moved(&tasks[i], &fresh.tasks[k]) {
                        culprits.push((i, Conflict::TaskChanged));
                    } else if coarse && node_changed {
                        culprits.push((i, node_conflict(&fresh)));
                    }
                    if let Some(t) = &fresh.tasks[k] {
                        tasks[i] = t.clone();
                    }
                }
                report.ledgers.insert(chunk.node.clone(), fresh.ledger.clone());
                bases.insert(chunk.node.clone(), NodeBase { ledger: fresh.ledger, live: fresh.live });
            }
            if !culprits.is_empty() {
                return Ok(abort(culprits, report));
            }
            if report.rounds > self.config.max_fine_retries {
                report.outcomes = vec![ClaimOutcome::Conflicted(Conflict::Contention); n];
                return Ok(report);
            }
            // Fine detection: re-check the whole gang against the fresh state at the top of the loop.
            report.retried_claims += n as u32;
        }
    }

    /// One flat transaction for a gang. Writes that do not fit beside the compares are split into nested
    /// sub-transactions without compares of their own (they all run only if the outer compares hold).
    fn gang_txn(&self, chunks: &[NodeChunk], tasks: &[Versioned<Task>]) -> Result<Txn> {
        let limit = self.max_txn_ops();
        let (mut compares, mut writes, mut reads) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in chunks {
            let (c, w, r) = self.chunk_ops(chunk, tasks)?;
            compares.extend(c);
            writes.extend(w);
            reads.extend(r);
        }
        let bytes: usize = chunks.iter().map(|c| self.estimate_bytes(c, tasks)).sum();
        if compares.len() > limit || bytes > self.config.max_request_bytes {
            return Err(self.gang_too_large(chunks));
        }
        if writes.len() <= limit {
            return Ok(Txn::new().when(compares).and_then(writes).or_else(reads));
        }
        // opc = max(compares, reads, sub-txns); each sub-txn may hold `limit - opc` ops.
        let opc_base = compares.len().max(reads.len());
        let mut n_subs = 1;
        loop {
            let opc = opc_base.max(n_subs);
            let budget = limit.saturating_sub(opc);
            if budget == 0 || n_subs > limit {
                return Err(self.gang_too_large(chunks));
            }
            if n_subs * budget >= writes.len() {
                let mut nested = Vec::with_capacity(n_subs);
                let mut rest = writes.into_iter().peekable();
                while rest.peek().is_some() {
                    let part: Vec<TxnOp> = rest.by_ref().take(budget).collect();
                    nested.push(TxnOp::txn(Txn::new().and_then(part)));
                }
                return Ok(Txn::new().when(compares).and_then(nested).or_else(reads));
            }
            n_subs += 1;
        }
    }

    fn gang_too_large(&self, chunks: &[NodeChunk]) -> Error {
        let claims: usize = chunks.iter().map(|c| c.claims.len()).sum();
        Error::GangTooLarge {
            claims,
            nodes: chunks.len(),
            compares: 2 * chunks.len() + claims,
            writes: chunks.len() + 2 * claims,
            max_txn_ops: self.max_txn_ops(),
        }
    }
}

/// The values of a failed transaction's `get`s, in order (`None` for an absent key).
fn else_gets(resp: &TxnResponse) -> impl Iterator<Item = Option<KeyValue>> {
    resp.op_responses().into_iter().map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}

impl Fresh {
    /// Decodes one node's part of an `else` branch: ledger, liveness, then each of `n_tasks` tasks.
    fn read(gets: &mut impl Iterator<Item = Option<KeyValue>>, n_tasks: usize) -> Result<Fresh> {
        let ledger = gets.next().flatten().map(|kv| versioned::<Allocation>(&kv)).transpose()?;
        let live = gets.next().flatten().is_some();
        let mut tasks = Vec::with_capacity(n_tasks);
        for _ in 0..n_tasks {
            tasks.push(gets.next().flatten().map(|kv| versioned::<Task>(&kv)).transpose()?);
        }
        Ok(Fresh { ledger, live, tasks })
    }
}

/// Why a node's compare failed, from its fresh state (coarse detection's answer).
fn node_conflict(fresh: &Fresh) -> Conflict {
    match &fresh.ledger {
        None => Conflict::NodeGone,
        Some(l) if !l.value.schedulable || !fresh.live => Conflict::NotSchedulable,
        Some(_) => Conflict::NodeChanged,
    }
}

/// Whether a task's own compare failed for a reason that no retry can fix.
fn task_conflict(seen: &Versioned<Task>, fresh: &Option<Versioned<Task>>) -> Option<Conflict> {
    match fresh {
        None => Some(Conflict::TaskChanged),
        Some(t) if t.mod_revision != seen.mod_revision && t.value.state != TaskState::Pending => {
            Some(Conflict::TaskChanged)
        }
        Some(_) => None,
    }
}

/// Whether a task changed at all since it was seen (coarse detection's view of a task).
fn task_moved(seen: &Versioned<Task>, fresh: &Option<Versioned<Task>>) -> bool {
    fresh.as_ref().map(|t| t.mod_revision) != Some(seen.mod_revision)
}

fn versioned<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<Versioned<T>> {
    Ok(Versioned::new(decode(kv)?, kv.mod_revision()))
}
