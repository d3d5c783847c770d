//! Which instance of a scheduler places which job.
//!
//! Each pending job is owned by one instance at a time, through a lease-bound key written only if absent
//! (`cell/owners/<job>`). Instances share the work by rendezvous hashing: each job has a preferred instance
//! among the live ones (the highest hash of job + instance), which claims it at once; any other instance
//! claims it only after it has stayed unowned for a while (the preferred one is slow, or just died and its
//! record has not lapsed yet). When an instance dies its lease lapses, its owner keys vanish, and the
//! survivors claim its jobs. Different schedulers never wait for each other: they own different jobs.

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use omega::cell_state::CellSnapshot;
use omega::model::{now_ms, Job, JobOwner, JobState};
use omega::store::{encode, Store};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

fn weight(job: &str, instance: &str) -> u64 {
    let mut h = DefaultHasher::new();
    (job, instance).hash(&mut h);
    h.finish()
}

/// Whether a job still has work for a scheduler: it is active and has pending tasks.
pub fn has_pending(snapshot: &CellSnapshot, job: &Job) -> bool {
    matches!(job.state, JobState::Pending | JobState::Running) && snapshot.pending_count(&job.id) > 0
}

/// Claims and releases job ownership for one instance.
pub struct Ownership {
    scheduler: String,
    instance: String,
    steal_after: Duration,
    /// When each unowned job was first seen unowned by this instance.
    unowned_since: HashMap<String, Instant>,
}

impl Ownership {
    pub fn new(scheduler: &str, instance: &str, steal_after: Duration) -> Self {
        Ownership {
            scheduler: scheduler.to_string(),
            instance: instance.to_string(),
            steal_after,
            unowned_since: HashMap::new(),
        }
    }

    /// Jobs this instance owns (as of `snapshot`).
    pub fn owned<'a>(&'a self, snapshot: &'a CellSnapshot) -> impl Iterator<Item = &'a Job> + 'a {
        snapshot
            .owners
            .iter()
            .filter(move |(_, o)| o.value.instance == self.instance && o.value.scheduler == self.scheduler)
            .filter_map(move |(job, _)| snapshot.jobs.get(job).map(|j| &*j.value))
    }

    /// Claims unowned jobs with pending work, as many as this instance will get to soon: up to `budget` more
    /// pending tasks (at least one job while the budget is not spent), highest priority and oldest first. Its
    /// preferred jobs it claims at once; others once they stayed unowned for `steal_after`, or at once when
    /// this instance owns no pending work (`idle`). Owning only what it will attempt soon is what spreads a
    /// backlog: an instance that starts first, before it sees its peers, prefers every job, and claiming them
    /// all left the others idle (one of three batch schedulers placed a 100,000-task backlog alone). Returns
    /// how many jobs it claimed.
    pub async fn claim(
        &mut self,
        store: &Store,
        snapshot: &CellSnapshot,
        lease: i64,
        budget: usize,
        idle: bool,
    ) -> anyhow::Result<usize> {
        let peers: Vec<&str> = snapshot
            .schedulers
            .values()
            .filter(|s| s.value.scheduler == self.scheduler)
            .map(|s| s.value.instance.as_str())
            .collect();
        let now = Instant::now();
        let mut candidates = Vec::new();
        let mut still_unowned = HashMap::new();
        for (id, job) in snapshot.jobs.iter() {
            let job = &job.value;
            if job.scheduler != self.scheduler || snapshot.owners.contains_key(id) || !has_pending(snapshot, job) {
                continue;
            }
            let since = *self.unowned_since.get(&**id).unwrap_or(&now);
            still_unowned.insert(id.to_string(), since);
            let preferred = peers.iter().max_by_key(|p| weight(id, p)).copied().unwrap_or(self.instance.as_str());
            if preferred == self.instance || idle || now.duration_since(since) >= self.steal_after {
                candidates.push(job);
            }
        }
        self.unowned_since = still_unowned;
        candidates.sort_by(|a, b| {
            b.priority.cmp(&a.priority).then(a.submitted_at_ms.cmp(&b.submitted_at_ms)).then(a.id.cmp(&b.id))
        });
        let mut left = budget;
        let mut to_claim = Vec::new();
        for job in candidates {
            if left == 0 {
                break;
            }
            left = left.saturating_sub(snapshot.pending_count(&job.id));
            to_claim.push(job.id.clone());
        }
        // All at once: each claim is its own compare-and-swap, and one after the other they would cost a round
        // trip each (behind large claim transactions, under load) before this instance could place anything.
        let claims = to_claim.into_iter().map(|job| {
            let key = store.keys().owner(&job);
            let owner = JobOwner {
                job: job.clone(),
                scheduler: self.scheduler.clone(),
                instance: self.instance.clone(),
                since_ms: now_ms(),
            };
            async move {
                let txn = Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([
                    TxnOp::put(key.as_str(), encode(&key, &owner)?, Some(PutOptions::new().with_lease(lease))),
                ]);
                anyhow::Ok((job, store.txn_adding_data(txn).await?.succeeded()))
            }
        });
        let mut claimed = 0;
        let mut failed = None;
        for result in futures_util::future::join_all(claims).await {
            match result {
                Ok((job, true)) => {
                    claimed += 1;
                    self.unowned_since.remove(&job);
                    tracing::debug!(job, "claimed job");
                }
                Ok((_, false)) => {}
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(claimed),
        }
    }

    /// Gives up a job that has no pending work left (guarded: only if this instance still owns it).
    pub async fn release(&self, store: &Store, snapshot: &CellSnapshot, job: &str) -> anyhow::Result<()> {
        let key = store.keys().owner(job);
        let Some(owner) = snapshot.owners.get(job) else { return Ok(()) };
        if owner.value.instance != self.instance {
            return Ok(());
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, owner.mod_revision)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        store.client().kv_client().txn(txn).await?;
        Ok(())
    }
}
