//! Draining a node: no new placements there, and its services handed back to their schedulers to run
//! elsewhere; batch tasks are left to finish where they are.
//!
//! The node's ledger carries `schedulable`, compared by every claim, so setting it to false (a
//! compare-and-swap, retried: claims rewrite the ledger all the time) stops new placements at once. The
//! services' tasks are then released back to `pending` in the usual guarded groups.

use crate::cell_state::Versioned;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::keys;
use crate::model::{Allocation, Job, JobKind, Task, TaskState};
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
}

/// Drains `node`. [`Error::NotFound`] if it has no ledger.
pub async fn drain_node(store: &Store, node: &str) -> Result<DrainReport> {
    keys::validate_name("node", node)?;
    set_schedulable(store, node, false).await?;
    let mut out = DrainReport { node: node.to_string(), schedulable: false, moved: vec![], left_running: vec![] };
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

/// Makes a drained `node` schedulable again.
pub async fn undrain_node(store: &Store, node: &str) -> Result<DrainReport> {
    keys::validate_name("node", node)?;
    set_schedulable(store, node, true).await?;
    Ok(DrainReport { node: node.to_string(), schedulable: true, moved: vec![], left_running: vec![] })
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
