//! The node reconciler: what happens to a node whose liveness key is gone.
//!
//! A node is alive while its agent's lease keeps its liveness key. Once the key is gone the node gets a grace
//! period (on top of the lease TTL, which already is most of the grace); after it the node's tasks are
//! released (ledger freed, assignments removed) and go back to `pending` for their schedulers, or, for batch
//! tasks that never restart, end `lost`. The release is compared on the key still being absent, so an agent
//! that re-registers in that window keeps its tasks. A node that stays down and empty for `node_gc_after` is
//! forgotten (record and ledger deleted), so caches do not keep every node that ever existed.

use super::{queue::WorkQueue, ControllerConfig, Reconciled};
use etcd_client::{Compare, CompareOp};
use omega::cell_state::CellSnapshot;
use omega::model::{Task, TaskState};
use omega::release::{release_guarded, Fence, Guard, Release, ReleaseOutcome};
use omega::store::Store;
use omega::txn::Group;
use std::collections::HashMap;
use std::time::Instant;

/// When this leader first saw each node down (a new leader starts counting afresh: the grace then runs
/// from its election, never shorter).
#[derive(Default)]
pub struct NodeReconciler {
    down_since: HashMap<String, Instant>,
}

impl NodeReconciler {
    /// Looks at `nodes`; asks the queue to look again when a grace period will have run out. Returns what it
    /// did; an error leaves every node of the batch to be retried with backoff.
    pub async fn reconcile(
        &mut self,
        store: &Store,
        snapshot: &CellSnapshot,
        config: &ControllerConfig,
        fence: &Fence,
        nodes: &[String],
        queue: &mut WorkQueue<super::Object>,
    ) -> anyhow::Result<Reconciled> {
        let mut done = Reconciled::default();
        let now = Instant::now();
        let mut lost: Vec<Release> = Vec::new();
        let mut forget: Vec<String> = Vec::new();
        for node in nodes {
            let registered =
                snapshot.allocations.contains_key(node.as_str()) || snapshot.nodes.contains_key(node.as_str());
            if snapshot.live.contains_key(node.as_str()) || !registered {
                self.down_since.remove(node);
                continue;
            }
            let since = *self.down_since.entry(node.clone()).or_insert(now);
            let down_for = now.duration_since(since);
            if down_for < config.grace {
                queue.add_after(super::Object::Node(node.clone()), config.grace - down_for);
                continue;
            }
            let held: Vec<Release> = snapshot
                .tasks_on(node)
                .map(|task| Release {
                    task: task.clone(),
                    state: after_loss(snapshot, &task.value),
                    reason: Some(format!("node {node} lost (its agent stopped renewing its lease)")),
                    run: None,
                })
                .collect();
            if !held.is_empty() {
                lost.extend(held);
                continue;
            }
            match config.node_gc_after {
                Some(after) if down_for >= after => forget.push(node.clone()),
                Some(after) => queue.add_after(super::Object::Node(node.clone()), after - down_for),
                None => {}
            }
        }
        if !lost.is_empty() {
            omega::failpoint::hit("controller.before_lost_release").await;
            // Compared on the node still being down: an agent that re-registered meanwhile keeps its tasks.
            let outcomes = release_guarded(store, &lost, Guard { fence: Some(fence), nodes_down: true }).await?;
            done.lost_tasks = outcomes.iter().filter(|o| matches!(o, ReleaseOutcome::Done { .. })).count();
            let kept = outcomes.iter().filter(|o| **o == ReleaseOutcome::NodeAlive).count();
            if kept > 0 {
                tracing::info!(tasks = kept, "nodes came back before their tasks were given up; they keep them");
            }
            if outcomes.iter().any(|o| matches!(o, ReleaseOutcome::Contention | ReleaseOutcome::Unknown)) {
                anyhow::bail!("some lost tasks could not be released yet");
            }
        }
        if !forget.is_empty() {
            done.collected_nodes = collect(store, snapshot, &forget, fence).await?;
            for node in &forget {
                self.down_since.remove(node);
            }
        }
        Ok(done)
    }

    /// Forgets nodes the cell no longer has.
    pub fn retain(&mut self, snapshot: &CellSnapshot) {
        self.down_since
            .retain(|n, _| snapshot.allocations.contains_key(n.as_str()) || snapshot.nodes.contains_key(n.as_str()));
    }
}

/// What a task becomes when its node is lost ([`omega::model::Job::state_after_node_loss`], the rule a
/// fencing agent follows too); a task whose job record is gone goes back to pending.
fn after_loss(snapshot: &CellSnapshot, task: &Task) -> TaskState {
    snapshot.jobs.get(task.job.as_str()).map_or(TaskState::Pending, |j| j.value.state_after_node_loss())
}

/// Deletes the record and ledger of `nodes` (down and empty long enough), each in one group compared on
/// both, on the node still being down, and on the fence.
async fn collect(store: &Store, snapshot: &CellSnapshot, nodes: &[String], fence: &Fence) -> anyhow::Result<usize> {
    let keys = store.keys();
    let mut groups = Vec::new();
    let mut names = Vec::new();
    for node in nodes {
        let (node_key, alloc_key, live_key) = (keys.node(node), keys.alloc(node), keys.live(node));
        let mut g = Group::new();
        match snapshot.allocations.get(node.as_str()) {
            Some(ledger) if ledger.value.tasks == 0 => {
                g.compare(&alloc_key, Compare::mod_revision(alloc_key.as_str(), CompareOp::Equal, ledger.mod_revision))
            }
            Some(_) => continue,
            None => g.compare(&alloc_key, Compare::create_revision(alloc_key.as_str(), CompareOp::Equal, 0)),
        };
        g.compare(&live_key, Compare::create_revision(live_key.as_str(), CompareOp::Equal, 0));
        if let Some(record) = snapshot.nodes.get(node.as_str()) {
            g.compare(&node_key, Compare::mod_revision(node_key.as_str(), CompareOp::Equal, record.mod_revision));
        }
        g.delete(&alloc_key).delete(&node_key);
        groups.push(g);
        names.push(node);
    }
    let applied = super::apply_fenced(store, groups, fence).await?;
    for (node, _) in names.iter().zip(&applied).filter(|(_, done)| **done) {
        tracing::info!(node, "node down and empty for long enough; forgotten");
    }
    Ok(applied.iter().filter(|d| **d).count())
}
