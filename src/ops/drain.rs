//! Draining a node: no new placements there, and its services moved to other nodes; batch tasks are left to
//! finish where they are until the deadline.
//!
//! The node's ledger carries `schedulable`, compared by every claim, so setting it to false (a
//! compare-and-swap, retried: claims rewrite the ledger all the time) stops new placements at once. Then:
//! - by default the drain is **migrate-first**: a [`Drain`] record at `cell/drains/<node>` asks the
//!   controller to start a replacement for each service replica elsewhere and stop the old one only once the
//!   replacement is healthy; at the deadline whatever is left is stopped (see [`Drain`]);
//! - with `force`, the services' tasks are released back to `pending` at once, in the usual guarded groups
//!   (their containers stop before the replacements start: for a node that must go now).

use crate::cell_state::Versioned;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::keys;
use crate::model::{now_ms, Allocation, Drain, DrainState, Job, JobKind, Task, TaskState};
use crate::release::{release, Release, ReleaseOutcome};
use crate::store::{decode, encode, Store, DEFAULT_PAGE_SIZE};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::Serialize;
use std::collections::BTreeMap;

/// Compare-and-swap attempts on a busy ledger.
const ROUNDS: usize = 20;

/// What a drain (or its undoing) did.
#[derive(Clone, Debug, Serialize)]
pub struct DrainReport {
    pub node: String,
    pub schedulable: bool,
    /// Service tasks handed back to their scheduler.
    pub moved: Vec<String>,
    /// Batch tasks left to finish where they are.
    pub left_running: Vec<String>,
    /// The migrate-first drain recorded for the controller (absent with `force` and for an undo).
    pub drain: Option<Drain>,
}

/// Starts a migrate-first drain of `node`, done by the controller by `deadline` from now. Draining a node
/// already draining keeps its progress and sets the new deadline. [`Error::NotFound`] if it has no ledger.
pub async fn start_drain(store: &Store, node: &str, deadline: std::time::Duration) -> Result<DrainReport> {
    keys::validate_name("node", node)?;
    set_schedulable(store, node, false).await?;
    let key = store.keys().drain(node);
    let now = now_ms();
    let deadline_ms = now.saturating_add(deadline.as_millis() as u64);
    for _ in 0..ROUNDS {
        let existing = store.get_json::<Drain>(&key).await?;
        let (drain, compare) = match existing {
            Some((mut d, rev)) if d.state == DrainState::Draining => {
                d.deadline_ms = deadline_ms;
                (d, Compare::mod_revision(key.as_str(), CompareOp::Equal, rev))
            }
            other => (
                Drain {
                    node: node.to_string(),
                    started_ms: now,
                    deadline_ms,
                    state: DrainState::Draining,
                    migrations: BTreeMap::new(),
                    moved: 0,
                    forced: 0,
                    remaining: 0,
                    message: String::new(),
                },
                match other {
                    Some((_, rev)) => Compare::mod_revision(key.as_str(), CompareOp::Equal, rev),
                    None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                },
            ),
        };
        let txn = Txn::new().when([compare]).and_then([TxnOp::put(key.as_str(), encode(&key, &drain)?, None)]);
        if store.txn_adding_data(txn).await?.succeeded() {
            return Ok(DrainReport {
                node: node.to_string(),
                schedulable: false,
                moved: vec![],
                left_running: vec![],
                drain: Some(drain),
            });
        }
    }
    Err(Error::KeptChanging(format!("node {node}'s drain record")))
}

/// Drains `node` at once: its services are stopped and handed back to their schedulers now (no migration
/// first). [`Error::NotFound`] if it has no ledger.
pub async fn drain_node(store: &Store, node: &str) -> Result<DrainReport> {
    keys::validate_name("node", node)?;
    set_schedulable(store, node, false).await?;
    let mut out =
        DrainReport { node: node.to_string(), schedulable: false, moved: vec![], left_running: vec![], drain: None };
    // The node's tasks and their jobs, at one revision.
    let keys = store.keys();
    let (task_kvs, revision) = store.list(&keys.tasks_prefix(), DEFAULT_PAGE_SIZE, None).await?;
    let (job_kvs, _) = store.list(&keys.jobs_prefix(), DEFAULT_PAGE_SIZE, Some(revision)).await?;
    let kinds: BTreeMap<String, JobKind> =
        job_kvs.iter().filter_map(|kv| decode::<Job>(kv).ok()).map(|j| (j.id, j.kind)).collect();
    let mut releases = Vec::new();
    for kv in &task_kvs {
        let Ok(task) = decode::<Task>(kv) else { continue };
        if !task.state.holds_resources() || task.node.as_deref() != Some(node) {
            continue;
        }
        if kinds.get(&task.job) == Some(&JobKind::Service) {
            releases.push(Release {
                task: Versioned::new(task, kv.mod_revision()),
                state: TaskState::Pending,
                reason: Some(format!("node {node} drained; moving")),
                run: None,
                event: Some((EventKind::Stopped, format!("moved off draining node {node}"))),
            });
        } else {
            out.left_running.push(task.id);
        }
    }
    for (r, o) in releases.iter().zip(release(store, &releases).await?) {
        if matches!(o, ReleaseOutcome::Done { .. }) {
            out.moved.push(r.task.value.id.clone());
        }
    }
    Ok(out)
}

/// Makes a drained `node` schedulable again. A migrate-first drain in progress is cancelled: the controller
/// stops the replacements that are not healthy yet and removes the record; a finished one is removed here.
pub async fn undrain_node(store: &Store, node: &str) -> Result<DrainReport> {
    keys::validate_name("node", node)?;
    set_schedulable(store, node, true).await?;
    let key = store.keys().drain(node);
    for _ in 0..ROUNDS {
        let Some((mut d, rev)) = store.get_json::<Drain>(&key).await? else { break };
        let compare = [Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)];
        let op = if d.state == DrainState::Draining && !d.migrations.is_empty() {
            d.state = DrainState::Cancelled;
            d.message = "cancelled by an undo".into();
            TxnOp::put(key.as_str(), encode(&key, &d)?, None)
        } else {
            TxnOp::delete(key.as_str(), None)
        };
        if store.client().kv_client().txn(Txn::new().when(compare).and_then([op])).await?.succeeded() {
            break;
        }
    }
    Ok(DrainReport { node: node.to_string(), schedulable: true, moved: vec![], left_running: vec![], drain: None })
}

/// Compare-and-swap the ledger's `schedulable` flag.
async fn set_schedulable(store: &Store, node: &str, schedulable: bool) -> Result<()> {
    let key = store.keys().alloc(node);
    for _ in 0..ROUNDS {
        let Some((mut ledger, rev)) = store.get_json::<Allocation>(&key).await? else {
            return Err(Error::NotFound(format!("node {node}")));
        };
        if ledger.schedulable == schedulable {
            return Ok(());
        }
        ledger.schedulable = schedulable;
        let txn = Txn::new().when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)]).and_then([TxnOp::put(
            key.as_str(),
            encode(&key, &ledger)?,
            None,
        )]);
        if store.client().kv_client().txn(txn).await?.succeeded() {
            return Ok(());
        }
    }
    Err(Error::KeptChanging(format!("node {node}'s ledger")))
}
