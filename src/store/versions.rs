//! A job's versions: the job record is the current one; each earlier one is kept, as it was, at
//! `<prefix>versions/<job>/<version>` (a bounded number of them), so that a task still running an older
//! version can be restarted as that version, `omctl job history` can show what changed, and a revert can
//! submit an old spec again.

use super::Store;
use crate::deployment::DeploymentState;
use crate::error::Result;
use crate::keys::prefix_end;
use crate::model::{Job, Task};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

/// Earlier versions kept per job (Nomad keeps 6, Kubernetes 10).
pub const KEEP_VERSIONS: u32 = 10;

impl Store {
    /// Version `version` of `job`: the job record if it is that version, else the kept copy.
    pub async fn job_version(&self, job: &str, version: u32) -> Result<Option<Job>> {
        if let Some((current, _)) = self.get_json::<Job>(&self.keys().job(job)).await? {
            if current.version == version {
                return Ok(Some(current));
            }
        }
        Ok(self.get_json::<Job>(&self.keys().version(job, version)).await?.map(|(j, _)| j))
    }

    /// The spec `task` runs: its job at the task's version.
    pub async fn spec_for(&self, task: &Task) -> Result<Option<Job>> {
        self.job_version(&task.job, task.version).await
    }

    /// Replaces the job record `current` (as read at `mod_revision`) by `next`, its next version, keeping
    /// `current` as an earlier version and dropping the one that falls out of the kept window: one
    /// transaction, compared on the record (and on `extra`, a leader's fence), so two racing submissions
    /// cannot both become version N+1. `None`: the record changed since it was read.
    pub async fn put_next_version(
        &self,
        current: &Job,
        mod_revision: i64,
        next: &Job,
        extra: Option<Compare>,
    ) -> Result<Option<i64>> {
        let keys = self.keys();
        let job_key = keys.job(&current.id);
        let mut kept = current.clone();
        if let Some(d) = kept.deployment.as_mut().filter(|d| d.state.is_active()) {
            d.state = DeploymentState::Superseded;
            d.message = format!("superseded by version {}", next.version);
        }
        let kept_key = keys.version(&current.id, current.version);
        let mut ops = vec![
            TxnOp::put(job_key.as_str(), super::encode(&job_key, next)?, None),
            TxnOp::put(kept_key.as_str(), super::encode(&kept_key, &kept)?, None),
        ];
        if let Some(old) = current.version.checked_sub(KEEP_VERSIONS) {
            ops.push(TxnOp::delete(keys.version(&current.id, old), None));
        }
        let mut compares = vec![Compare::mod_revision(job_key.as_str(), CompareOp::Equal, mod_revision)];
        compares.extend(extra);
        let resp = self.txn_adding_data(Txn::new().when(compares).and_then(ops)).await?;
        Ok(resp.succeeded().then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
    }

    /// The kept earlier versions of `job`, oldest first (the current one is the job record).
    pub async fn earlier_versions(&self, job: &str) -> Result<Vec<Job>> {
        let prefix = self.keys().versions_of(job);
        let opts = GetOptions::new().with_range(prefix_end(prefix.as_bytes()));
        let resp = self.client().kv_client().get(prefix.as_str(), Some(opts)).await?;
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            out.push(super::decode::<Job>(kv)?);
        }
        out.sort_by_key(|j| j.version);
        Ok(out)
    }
}
