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
//!          owners/<job>.mod_revision == seen      the committing instance still owns the job
//! then     put alloc/<node>    ledger + this task's resources
//!          put tasks/<task>    state = assigned, node = <node>
//!          put assign/<node>/<task>               what the node's agent runs
//! else     get alloc/<node>, live/<node>, tasks/<task>, owners/<job>   the fresh state, same round trip
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
//! scheduler to decide again. Fit is [`Resources::fit`](crate::resources::Resources::fit), the same function
//! placement uses.
//!
//! The files of this module follow one claim: [`unit`] turns claims on nodes into guarded transaction
//! groups and reads their fresh state back; [`incremental`] and [`gang`] drive the two commit kinds. Packing
//! groups into round trips, op and size limits, and in-flight bounds belong to [`crate::txn`].

mod gang;
mod incremental;
mod quota;
mod unit;

use crate::cell_state::{CellSnapshot, Versioned};
use crate::error::Result;
use crate::model::{Allocation, Task};
use crate::resources::Dimension;
use crate::store::Store;
use crate::txn::Sender;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    /// Lower-priority tasks to evict so this one fits (preemption). They are evicted in the same transaction
    /// as the claim: both happen or neither does. Each goes back to `pending` for its own scheduler with the
    /// reason recorded; the claimed task records whom it preempted. Victims are on `node`, except the other
    /// tasks of a victim gang, which are evicted with it wherever they run (a gang is never left in part).
    pub preempts: Vec<Versioned<Task>>,
    /// The mod_revision of the job's ownership key (`cell/owners/<job>`) as the committing instance saw it
    /// when it took the job. Compared in the claim's transaction, so an instance that lost the job (its
    /// lease lapsed while it was frozen, another instance took over) cannot place its tasks any more.
    pub owner: Option<i64>,
}

impl Claim {
    pub fn new(task: Versioned<Task>, node: impl Into<String>) -> Self {
        Claim { task, node: node.into(), preempts: Vec::new(), owner: None }
    }

    /// A claim that evicts `victims` to make room on `node`.
    pub fn preempting(task: Versioned<Task>, node: impl Into<String>, victims: Vec<Versioned<Task>>) -> Self {
        Claim { task, node: node.into(), preempts: victims, owner: None }
    }

    /// Fences the claim on the job's ownership key having this mod_revision.
    pub fn owned_at(mut self, owner_mod_revision: i64) -> Self {
        self.owner = Some(owner_mod_revision);
        self
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
    /// The committing instance no longer owns the job (its ownership key is gone or was taken over).
    NotOwner,
    /// The claims need more operations or bytes in one transaction than the server accepts: they can never
    /// commit as they are (permanent, not a race).
    TooLarge,
    /// The request failed in transport; it may or may not have been applied. Re-read the cell.
    Unknown,
    /// The claim would take its namespace past its quota in this dimension (as far as the committer knows).
    OverQuota(crate::model::QuotaDimension),
    /// Another claim in the same namespace rewrote its quota since the snapshot: decide again on fresh use.
    QuotaChanged,
}

impl Conflict {
    /// Whether trying again (with any amount of fresh state) cannot help.
    pub fn is_permanent(self) -> bool {
        matches!(self, Conflict::TooLarge)
    }
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
            Conflict::NotOwner => f.write_str("the job is no longer owned by this scheduler instance"),
            Conflict::TooLarge => f.write_str("more than the server accepts in one transaction"),
            Conflict::Unknown => f.write_str("outcome unknown (request failed)"),
            Conflict::OverQuota(d) => write!(f, "over its namespace's {d} quota"),
            Conflict::QuotaChanged => f.write_str("its namespace's quota changed since the snapshot"),
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
    /// Of those, the ones that compared against a ledger older than this committer's own last write of it.
    /// A scheduler that decides and commits on what it learned from its commits never does.
    pub self_conflicts: u32,
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
    fn unsettled(n: usize) -> Self {
        CommitReport { outcomes: vec![ClaimOutcome::Conflicted(Conflict::Unknown); n], ..Default::default() }
    }

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
    pub self_conflicts: AtomicU64,
    pub retried_claims: AtomicU64,
    by_conflict: Mutex<BTreeMap<String, u64>>,
}

impl CommitStats {
    fn record(&self, report: &CommitReport) {
        self.transactions.fetch_add(report.transactions as u64, Ordering::Relaxed);
        self.claims.fetch_add(report.outcomes.len() as u64, Ordering::Relaxed);
        self.committed.fetch_add(report.committed() as u64, Ordering::Relaxed);
        self.conflicted.fetch_add(report.conflicted() as u64, Ordering::Relaxed);
        self.failed_node_txns.fetch_add(report.failed_node_txns as u64, Ordering::Relaxed);
        self.self_conflicts.fetch_add(report.self_conflicts as u64, Ordering::Relaxed);
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
        Conflict::OverQuota(d) => format!("over_quota_{d}"),
        other => serde_json::to_value(other).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
    }
}

/// How a [`Committer`] behaves.
#[derive(Clone, Debug)]
pub struct CommitConfig {
    pub detection: Detection,
    /// The server's `--max-txn-ops`, if known better than the store's setting (`None`: the store's). The
    /// limit is shared with every user of the store and lowered if the server refuses a batch.
    pub max_txn_ops: Option<usize>,
    /// Fine detection: how many times a claim that still fits is re-sent before it is reported as
    /// [`Conflict::Contention`].
    pub max_fine_retries: u32,
    /// Transactions in flight at once from this committer (all its commits together). Bounds the load one
    /// scheduler puts on etcd, so lease renewals and other schedulers keep getting through.
    pub max_in_flight: usize,
    /// Keep commit latency under this by shrinking the in-flight window (`None`: a fixed `max_in_flight`).
    /// See [`crate::backpressure`]: a long etcd apply queue makes lease renewals fail.
    pub latency_target: Option<Duration>,
    /// Who is committing (written into the tasks it places).
    pub placed_by: String,
}

impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            detection: Detection::Fine,
            max_txn_ops: None,
            max_fine_retries: 8,
            max_in_flight: 8,
            latency_target: None,
            placed_by: "omega".into(),
        }
    }
}

/// Commits claims. Cheap to share (`Arc`); all its commits share one in-flight budget and one set of stats.
pub struct Committer {
    store: Store,
    sender: Sender,
    config: CommitConfig,
    stats: Arc<CommitStats>,
    /// The revision at which this committer last wrote each node's ledger (to recognise self-conflicts).
    own_writes: Mutex<HashMap<String, i64>>,
}

impl Committer {
    pub fn new(store: Store, config: CommitConfig) -> Self {
        if let Some(n) = config.max_txn_ops {
            store.set_max_txn_ops(n);
        }
        Committer {
            sender: match config.latency_target {
                Some(target) => Sender::adaptive(store.clone(), config.max_in_flight, target),
                None => Sender::new(store.clone(), config.max_in_flight),
            },
            store,
            config,
            stats: Arc::new(CommitStats::default()),
            own_writes: Mutex::new(HashMap::new()),
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
        self.sender.max_ops()
    }

    /// Commits `claims`, decided on `snapshot` (or on a scheduler's private view of it, holding what its own
    /// earlier commits wrote). Returns every claim's fate, including what landed before anything failed.
    /// Errors only for what is the caller's mistake (a gang with evictions) or can never commit (a gang larger
    /// than one transaction: [`crate::Error::GangTooLarge`], nothing written).
    pub async fn commit(&self, snapshot: &CellSnapshot, claims: &[Claim], kind: CommitKind) -> Result<CommitReport> {
        let report = match kind {
            CommitKind::Incremental => incremental::commit(self, snapshot, claims).await,
            CommitKind::Gang => gang::commit(self, snapshot, claims).await?,
        };
        self.stats.record(&report);
        Ok(report)
    }

    /// Notes ledgers this committer wrote.
    fn wrote(&self, node: &str, revision: i64) {
        let mut own = self.own_writes.lock();
        match own.get_mut(node) {
            Some(r) => *r = (*r).max(revision),
            None => drop(own.insert(node.to_string(), revision)),
        }
    }

    /// Whether a claim compared against `base_revision` of a node's ledger although this committer had
    /// already written a newer one: a conflict with itself.
    fn behind_own_write(&self, node: &str, base_revision: i64) -> bool {
        self.own_writes.lock().get(node).is_some_and(|own| *own > base_revision)
    }
}
