//! One unit of a commit: the claims (and evictions) that stand or fall together, as one guarded group.
//!
//! An incremental commit makes one unit per node per round: the node's claims in one sub-transaction. A gang
//! is one unit over all its nodes. A claim that evicts a gang makes a unit over its own node and every node the
//! victim gang runs on, so the gang leaves whole or not at all.

use super::{Claim, Committer};
use crate::cell_state::{CellSnapshot, Versioned};
use crate::error::Result;
use crate::events::EventKind;
use crate::model::{now_ms, Allocation, Assignment, Task, TaskState};
use crate::store::{decode, encode};
use crate::txn::Group;
use etcd_client::{Compare, CompareOp, KeyValue};
use std::collections::BTreeMap;

/// A node's state as the committer currently believes it.
#[derive(Clone)]
pub(super) struct NodeBase {
    pub ledger: Option<Versioned<Allocation>>,
    pub live: bool,
}

impl NodeBase {
    pub fn from_snapshot(snapshot: &CellSnapshot, node: &str) -> Self {
        NodeBase { ledger: snapshot.allocations.get(node).cloned(), live: snapshot.live.contains_key(node) }
    }

    /// Why nothing at all can be claimed on this node now, if so.
    pub fn refusal(&self) -> Option<super::Conflict> {
        match &self.ledger {
            None => Some(super::Conflict::NodeGone),
            Some(l) if !l.value.schedulable || !self.live => Some(super::Conflict::NotSchedulable),
            Some(_) => None,
        }
    }
}

/// Claims and evictions written together.
#[derive(Default)]
pub(super) struct Unit {
    /// Every ledger the unit rewrites: node -> (the mod_revision compared, the ledger written).
    pub ledgers: BTreeMap<String, (i64, Allocation)>,
    /// Indices of the commit's claims placed by this unit.
    pub claims: Vec<usize>,
    /// Tasks evicted: (index of the claim evicting it, the victim as seen).
    pub victims: Vec<(usize, Versioned<Task>)>,
    /// The namespace quota the claims count against, compared and rewritten with the ledgers.
    pub quota: Option<super::quota::QuotaBase>,
}

/// The fresh state a refused unit read back.
pub(super) struct Fresh {
    /// node -> (its ledger, whether its liveness key exists).
    pub ledgers: BTreeMap<String, (Option<Versioned<Allocation>>, bool)>,
    /// The unit's claimed tasks, in the order of `Unit::claims`.
    pub tasks: Vec<Option<Versioned<Task>>>,
    /// The unit's victims, in order.
    pub victims: Vec<Option<Versioned<Task>>>,
    /// job -> the ownership key's mod_revision now (`None`: gone).
    pub owners: BTreeMap<String, Option<i64>>,
    /// The quota record's mod_revision now (`None`: gone, or the unit had no quota).
    pub quota: Option<i64>,
}

impl Unit {
    /// The unit for `node` starting from its ledger as believed.
    pub fn on(node: &str, ledger: &Versioned<Allocation>) -> Unit {
        let mut u = Unit::default();
        u.ledgers.insert(node.to_string(), (ledger.mod_revision, (*ledger.value).clone()));
        u
    }

    /// The ownership fences of the unit's claims: job -> owner mod_revision, one per job.
    fn owners(&self, claims: &[Claim], tasks: &[Versioned<Task>]) -> BTreeMap<String, i64> {
        self.claims.iter().filter_map(|&i| claims[i].owner.map(|rev| (tasks[i].value.job.clone(), rev))).collect()
    }

    /// The guarded group: compare every ledger, the claim nodes' liveness, every claimed and evicted task and
    /// the owners; write the ledgers, the placed tasks and their assignments, the evicted tasks and the
    /// removal of their assignments; else read all of it back.
    pub fn group(&self, committer: &Committer, claims: &[Claim], tasks: &[Versioned<Task>]) -> Result<Group> {
        let keys = committer.store.keys();
        let placed_by = &committer.config.placed_by;
        let mut g = Group::new();
        for (node, (base_rev, ledger)) in &self.ledgers {
            let alloc_key = keys.alloc(node);
            let live_key = keys.live(node);
            g.compare(&alloc_key, Compare::mod_revision(alloc_key.as_str(), CompareOp::Equal, *base_rev));
            if self.claims.iter().any(|&i| claims[i].node == *node) {
                g.compare(&live_key, Compare::create_revision(live_key.as_str(), CompareOp::Greater, 0));
            }
            g.put(&alloc_key, encode(&alloc_key, ledger)?);
            g.read(&alloc_key).read(&live_key);
        }
        let now = now_ms();
        for &i in &self.claims {
            let seen = &tasks[i];
            let node = &claims[i].node;
            let task_key = keys.task(&seen.value.id);
            g.compare(&task_key, Compare::mod_revision(task_key.as_str(), CompareOp::Equal, seen.mod_revision));
            let mut placed = seen.value.assigned(node, placed_by, now);
            // Only the victims on this node hold room it needs; a victim gang's other tasks are listed too, so
            // both sides of the preemption show it.
            placed.preempted =
                self.victims.iter().filter(|(owner, _)| *owner == i).map(|(_, v)| v.value.id.clone()).collect();
            let after = self
                .victims
                .iter()
                .filter(|(owner, v)| *owner == i && v.value.node.as_deref() == Some(node.as_str()))
                .map(|(_, v)| v.value.id.clone())
                .collect();
            let assignment = Assignment::of(&placed, node, placed_by, now, after);
            let assign_key = keys.assignment(node, &placed.id);
            g.put(&task_key, encode(&task_key, &placed)?);
            g.put(&assign_key, encode(&assign_key, &assignment)?);
            g.read(&task_key);
        }
        for (owner, victim) in &self.victims {
            let by = &tasks[*owner].value;
            let task_key = keys.task(&victim.value.id);
            g.compare(&task_key, Compare::mod_revision(task_key.as_str(), CompareOp::Equal, victim.mod_revision));
            let mut evicted = (*victim.value).clone();
            let on = evicted.node.clone().unwrap_or_default();
            evicted.state = TaskState::Pending;
            evicted.reason = Some(if on == claims[*owner].node {
                format!("preempted by {} (priority {} over {}) on {on}", by.id, by.priority, evicted.priority)
            } else {
                format!(
                    "preempted with its gang by {} (priority {} over {}) on {}",
                    by.id, by.priority, evicted.priority, claims[*owner].node
                )
            });
            evicted.updated_at_ms = now;
            // The victim's timeline says it in the eviction's own write.
            let with_gang = if on == claims[*owner].node { "" } else { "with its gang " };
            evicted.record_event(
                EventKind::Preempted,
                format!("{with_gang}by {} (priority {})", by.id, by.priority),
                now,
            );
            g.put(&task_key, encode(&task_key, &evicted)?);
            g.delete(&keys.assignment(&on, &victim.value.id));
            g.read(&task_key);
        }
        for (job, rev) in self.owners(claims, tasks) {
            let owner_key = keys.owner(&job);
            g.compare(&owner_key, Compare::mod_revision(owner_key.as_str(), CompareOp::Equal, rev));
            g.read(&owner_key);
        }
        if let Some(q) = &self.quota {
            let quota_key = keys.quota(&q.namespace);
            g.compare(&quota_key, Compare::mod_revision(quota_key.as_str(), CompareOp::Equal, q.revision));
            g.put(&quota_key, encode(&quota_key, &q.written(placed_by, now))?);
            g.read(&quota_key);
        }
        Ok(g)
    }

    /// Decodes what a refused group read back, in the order [`group`](Self::group) asked for it.
    pub fn fresh(&self, claims: &[Claim], tasks: &[Versioned<Task>], reads: Vec<Option<KeyValue>>) -> Result<Fresh> {
        let mut reads = reads.into_iter();
        let mut next = || reads.next().flatten();
        let mut ledgers = BTreeMap::new();
        for node in self.ledgers.keys() {
            let ledger = next().map(|kv| versioned::<Allocation>(&kv)).transpose()?;
            let live = next().is_some();
            ledgers.insert(node.clone(), (ledger, live));
        }
        let mut fresh_tasks = Vec::with_capacity(self.claims.len());
        for _ in &self.claims {
            fresh_tasks.push(next().map(|kv| versioned::<Task>(&kv)).transpose()?);
        }
        let mut victims = Vec::with_capacity(self.victims.len());
        for _ in &self.victims {
            victims.push(next().map(|kv| versioned::<Task>(&kv)).transpose()?);
        }
        let mut owners = BTreeMap::new();
        for job in self.owners(claims, tasks).into_keys() {
            owners.insert(job, next().map(|kv| kv.mod_revision()));
        }
        let quota = if self.quota.is_some() { next().map(|kv| kv.mod_revision()) } else { None };
        Ok(Fresh { ledgers, tasks: fresh_tasks, victims, owners, quota })
    }
}

impl Fresh {
    /// Whether the quota the unit compared was rewritten (another claim in its namespace) or removed.
    pub fn quota_changed(&self, unit: &Unit) -> bool {
        unit.quota.as_ref().is_some_and(|q| self.quota != Some(q.revision))
    }

    /// Whether the ownership fence of the claim's job failed.
    pub fn lost_owner(&self, claim: &Claim, task: &Task) -> bool {
        match claim.owner {
            Some(rev) => self.owners.get(&task.job).is_some_and(|now| *now != Some(rev)),
            None => false,
        }
    }
}

fn versioned<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<Versioned<T>> {
    Ok(Versioned::new(decode(kv)?, kv.mod_revision()))
}

/// Why a node's compare failed, from its fresh state (coarse detection's answer).
pub(super) fn node_conflict(ledger: &Option<Versioned<Allocation>>, live: bool) -> super::Conflict {
    match ledger {
        None => super::Conflict::NodeGone,
        Some(l) if !l.value.schedulable || !live => super::Conflict::NotSchedulable,
        Some(_) => super::Conflict::NodeChanged,
    }
}

/// Whether a task's own compare failed for a reason that no retry can fix.
pub(super) fn task_conflict(seen: &Versioned<Task>, fresh: &Option<Versioned<Task>>) -> Option<super::Conflict> {
    match fresh {
        None => Some(super::Conflict::TaskChanged),
        Some(t) if t.mod_revision != seen.mod_revision && t.value.state != TaskState::Pending => {
            Some(super::Conflict::TaskChanged)
        }
        Some(_) => None,
    }
}

/// Whether a task changed at all since it was seen (coarse detection's view of a task).
pub(super) fn task_moved(seen: &Versioned<Task>, fresh: &Option<Versioned<Task>>) -> bool {
    fresh.as_ref().map(|t| t.mod_revision) != Some(seen.mod_revision)
}
