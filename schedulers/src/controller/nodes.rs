//! The node reconciler: what happens to a node whose liveness key is gone.
//!
//! A node is alive while its agent's lease keeps its liveness key. Once the key is gone the node gets a grace
//! period (on top of the lease TTL, which already is most of the grace); after it the node's tasks are
//! released (ledger freed, assignments removed) and go back to `pending` for their schedulers, or, for batch
//! tasks that never restart, end `lost`. The release is compared on the key still being absent, so an agent
//! that re-registers in that window keeps its tasks. A node that stays down and empty for `node_gc_after` is
//! forgotten (record and ledger deleted), so caches do not keep every node that ever existed.
//!
//! Before any node's tasks are released, the [`super::disruption`] rules look at the whole cell: when many
//! nodes lapsed at once (etcd paused or overloaded, a network split), releases slow down or stop until the
//! nodes come back.

use super::disruption::{Change, Decision, Disruption, Health, NodeView, Scope};
use super::{metrics, queue::WorkQueue, ControllerConfig, Reconciled};
use etcd_client::{Compare, CompareOp};
use omega::cell_state::CellSnapshot;
use omega::events::EventKind;
use omega::model::{Task, TaskState};
use omega::release::{release_guarded, Fence, Guard, Release, ReleaseOutcome};
use omega::store::Store;
use omega::txn::Group;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// The node label that groups nodes into zones (the one the simulated nodes and the examples use).
pub const ZONE_LABEL: &str = "zone";

/// A node this leader has seen down.
#[derive(Clone, Copy, Debug)]
struct DownMark {
    /// When this leader first saw it down: a new leader starts counting afresh, so the grace then runs from
    /// its election, never shorter.
    since: Instant,
    /// Whether it went down while this replica led (false: it was down when this leader first looked).
    witnessed: bool,
}

/// The nodes this leader has seen down, and the disruption rules' memory.
pub struct NodeReconciler {
    down: HashMap<String, DownMark>,
    disruption: Disruption,
    /// Whether the first pass (the whole cell, at election) is done: nodes found down then were not seen going.
    looked: bool,
    /// Nodes this leader has seen alive: a node without a liveness key that was never alive is registering
    /// (its record is written before its liveness key), not lapsing, and must not count toward a disruption.
    seen_alive: HashSet<String>,
}

impl NodeReconciler {
    pub fn new(config: &ControllerConfig) -> NodeReconciler {
        NodeReconciler {
            down: HashMap::new(),
            disruption: Disruption::new(config.disruption.clone(), config.grace),
            looked: false,
            seen_alive: HashSet::new(),
        }
    }

    /// Looks at `nodes`; asks the queue to look again when a grace period will have run out or a held node
    /// may be released. Returns what it did; an error leaves every node of the batch to be retried with
    /// backoff.
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
        let witnessed = std::mem::replace(&mut self.looked, true);
        let mut forget: Vec<String> = Vec::new();
        // Whether a node went down or came back (or stays down): only then can the rules' answer change, so
        // only then is the whole cell counted (changes to live nodes' ledgers come with every claim).
        let mut look_at_cell = false;
        for node in nodes {
            let registered =
                snapshot.allocations.contains_key(node.as_str()) || snapshot.nodes.contains_key(node.as_str());
            if snapshot.live.contains_key(node.as_str()) || !registered {
                if registered {
                    self.seen_alive.insert(node.clone());
                }
                look_at_cell |= self.down.remove(node).is_some();
                continue;
            }
            look_at_cell = true;
            let seen_going = witnessed && self.seen_alive.contains(node);
            let since = self.down.entry(node.clone()).or_insert(DownMark { since: now, witnessed: seen_going }).since;
            let down_for = now.duration_since(since);
            if snapshot.tasks_on(node).next().is_some() {
                // Released (or held back) by the rules below, once its grace has run out.
                if down_for < config.grace {
                    queue.add_after(super::Object::Node(node.clone()), config.grace - down_for);
                }
                continue;
            }
            match config.node_gc_after {
                Some(after) if down_for >= after => forget.push(node.clone()),
                Some(after) => queue.add_after(super::Object::Node(node.clone()), after - down_for),
                None => {}
            }
        }
        let mut lost: Vec<Release> = Vec::new();
        // Which node each release in `lost` belongs to, to count evicted nodes.
        let mut owner: Vec<usize> = Vec::new();
        let mut releasing: Vec<String> = Vec::new();
        if look_at_cell {
            let decision = self.decide(snapshot, now, witnessed, queue);
            report(&decision, self.disruption.policy());
            if let Some(wake) = &decision.look_again {
                queue.add_after(super::Object::Node(wake.node.clone()), wake.after);
            }
            for node in decision.release {
                let tasks = snapshot.tasks_on(&node).map(|task| Release {
                    task: task.clone(),
                    state: after_loss(snapshot, &task.value),
                    reason: Some(format!("node {node} lost (its agent stopped renewing its lease)")),
                    run: None,
                    event: Some((EventKind::Lost, format!("node {node} lost"))),
                });
                for release in tasks {
                    lost.push(release);
                    owner.push(releasing.len());
                }
                releasing.push(node);
            }
        }
        metrics::nodes(snapshot.nodes.len().max(snapshot.allocations.len()), self.down.len());
        if !lost.is_empty() {
            omega::failpoint::hit("controller.before_lost_release").await;
            // Compared on the node still being down: an agent that re-registered meanwhile keeps its tasks.
            let outcomes = release_guarded(store, &lost, Guard { fence: Some(fence), nodes_down: true }).await?;
            done.lost_tasks = outcomes.iter().filter(|o| matches!(o, ReleaseOutcome::Done { .. })).count();
            let mut evicted = vec![false; releasing.len()];
            for (o, node) in outcomes.iter().zip(&owner) {
                evicted[*node] |= matches!(o, ReleaseOutcome::Done { .. });
            }
            metrics::evicted(evicted.iter().filter(|e| **e).count());
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
                self.down.remove(node);
            }
        }
        Ok(done)
    }

    /// Counts the whole cell and asks the rules which down nodes may be released now. A down node not looked
    /// at yet (its notice still queued) is marked now and queued, so the count is never short of it.
    fn decide(
        &mut self,
        snapshot: &CellSnapshot,
        now: Instant,
        witnessed: bool,
        queue: &mut WorkQueue<super::Object>,
    ) -> Decision {
        let mut views = Vec::with_capacity(snapshot.nodes.len().max(snapshot.allocations.len()));
        let unrecorded = snapshot.allocations.keys().filter(|n| !snapshot.nodes.contains_key(&**n));
        for name in snapshot.nodes.keys().chain(unrecorded) {
            let zone = snapshot
                .nodes
                .get(&**name)
                .and_then(|n| n.value.labels.get(ZONE_LABEL))
                .map(String::as_str)
                .unwrap_or("");
            let health = if snapshot.live.contains_key(&**name) {
                if !self.seen_alive.contains(&**name) {
                    self.seen_alive.insert(name.to_string());
                }
                Health::Alive
            } else {
                let seen_going = witnessed && self.seen_alive.contains(&**name);
                let mark = *self.down.entry(name.to_string()).or_insert_with(|| {
                    queue.add(super::Object::Node(name.to_string()));
                    DownMark { since: now, witnessed: seen_going }
                });
                let holds_tasks = snapshot.tasks_on(name).next().is_some();
                Health::Down { since: mark.since, witnessed: mark.witnessed, holds_tasks }
            };
            views.push(NodeView { name, zone, health });
        }
        self.disruption.decide(views, now)
    }

    /// Forgets nodes the cell no longer has.
    pub fn retain(&mut self, snapshot: &CellSnapshot) {
        self.seen_alive
            .retain(|n| snapshot.allocations.contains_key(n.as_str()) || snapshot.nodes.contains_key(n.as_str()));
        self.down
            .retain(|n, _| snapshot.allocations.contains_key(n.as_str()) || snapshot.nodes.contains_key(n.as_str()));
    }
}

impl Drop for NodeReconciler {
    /// Leadership ended (this reconciler lives as long as it): the cell's gauges are the next leader's.
    fn drop(&mut self) {
        metrics::stood_down(self.disruption.zones());
    }
}

/// Logs each change of a zone's or the cell's state, once (not per node, not per pass).
fn report(decision: &Decision, policy: &super::disruption::DisruptionPolicy) {
    metrics::decided(decision);
    for change in &decision.changes {
        match change {
            Change::Disrupted(Scope::Cell, c) => tracing::warn!(
                lapsed = c.lapsed,
                of = c.considered(),
                window = ?policy.window,
                "cell disrupted: more than {:.0}% of its nodes lapsed at once, which looks like etcd or the network \
                 failing rather than the nodes; holding back every eviction until enough nodes come back",
                policy.threshold * 100.0
            ),
            Change::Recovered(Scope::Cell, c) => tracing::info!(
                lapsed = c.lapsed,
                of = c.considered(),
                "cell disruption over: enough nodes are back; nodes still down lose their tasks as usual"
            ),
            Change::Disrupted(Scope::Zone(zone), c) => tracing::warn!(
                zone,
                lapsed = c.lapsed,
                of = c.considered(),
                rate = policy.zone_rate,
                "zone disrupted: more than {:.0}% of its nodes lapsed at once; releasing their tasks at most {} \
                 nodes/s (none while the whole cell is disrupted)",
                policy.threshold * 100.0,
                policy.zone_rate
            ),
            Change::Recovered(Scope::Zone(zone), c) => tracing::info!(
                zone,
                lapsed = c.lapsed,
                of = c.considered(),
                "zone disruption over: nodes still down there lose their tasks as usual"
            ),
        }
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
