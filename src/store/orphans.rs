//! Tasks without a job record: what a multi-transaction submission writes before its record, and what one
//! that died half way leaves. No scheduler places them (schedulers work job by job) and a retry of the
//! submission replaces them, but left alone they take space and puzzle whoever reads the cell; these helpers
//! let an operator list them and the controller collect them once they are older than a grace period.

use super::submission::{deleted, marker_key, revision, SubmissionMarker};
use super::Store;
use crate::error::{Error, Result};
use crate::keys::{self, prefix_end};
use crate::model::{now_ms, Task};
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Tasks under a job id that has no job record: what a multi-transaction submission writes before its
/// record, and what one that died half way leaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OrphanTasks {
    pub job: String,
    pub tasks: u64,
    /// The submission that wrote them, if its marker is still there.
    pub marker: Option<SubmissionMarker>,
    /// When they were last written: the marker's start, else the newest task's update.
    pub written_ms: u64,
}

impl Store {
    /// Every job id with tasks (or a submission marker) but no job record, read at one revision.
    pub async fn orphan_tasks(&self) -> Result<Vec<OrphanTasks>> {
        let page = super::DEFAULT_PAGE_SIZE;
        let (jobs, rev) = self.list(&self.keys.jobs_prefix(), page, None).await?;
        let (tasks, _) = self.list(&self.keys.tasks_prefix(), page, Some(rev)).await?;
        let (markers, _) = self.list(&self.keys.submissions_prefix(), page, Some(rev)).await?;
        let jobs: BTreeSet<Vec<u8>> = jobs.iter().map(|kv| kv.key().to_vec()).collect();
        let mut out: BTreeMap<String, OrphanTasks> = BTreeMap::new();
        let tasks_prefix = self.keys.tasks_prefix();
        for kv in &tasks {
            let Ok(key) = std::str::from_utf8(kv.key()) else { continue };
            let Some((job, _)) = key.strip_prefix(tasks_prefix.as_str()).and_then(|r| r.split_once('/')) else {
                continue;
            };
            if jobs.contains(self.keys.job(job).as_bytes()) {
                continue;
            }
            let written = serde_json::from_slice::<Task>(kv.value()).map(|t| t.updated_at_ms).unwrap_or(0);
            let entry = out.entry(job.to_string()).or_insert_with(|| OrphanTasks {
                job: job.to_string(),
                tasks: 0,
                marker: None,
                written_ms: 0,
            });
            entry.tasks += 1;
            entry.written_ms = entry.written_ms.max(written);
        }
        for kv in &markers {
            let Ok(marker) = serde_json::from_slice::<SubmissionMarker>(kv.value()) else { continue };
            if jobs.contains(self.keys.job(&marker.job).as_bytes()) {
                continue;
            }
            let entry = out.entry(marker.job.clone()).or_insert_with(|| OrphanTasks {
                job: marker.job.clone(),
                tasks: 0,
                marker: None,
                written_ms: 0,
            });
            entry.written_ms = marker.started_ms;
            entry.marker = Some(marker);
        }
        Ok(out.into_values().collect())
    }

    /// Deletes the tasks (and submission marker) of `job` if it has no job record and nothing of it was
    /// written for `grace`. Guarded, so that a submission that resumed meanwhile, or completed, loses nothing;
    /// `fence` (a leader's) must hold too. Returns how many tasks were deleted, `None` if there was nothing
    /// to collect (a job record, or too young, or changed while looking).
    pub async fn delete_orphan_tasks(&self, job: &str, grace: Duration, fence: Option<Compare>) -> Result<Option<u64>> {
        keys::validate_name("job", job)?;
        let job_key = self.keys.job(job);
        let marker_key = marker_key(&self.keys, job);
        let tasks = self.keys.tasks_of_job(job);
        let tasks_end = prefix_end(tasks.as_bytes());
        // One read-only transaction: the three reads see one revision.
        let look = Txn::new().and_then([
            TxnOp::get(job_key.as_str(), Some(GetOptions::new().with_keys_only())),
            TxnOp::get(marker_key.as_str(), None),
            TxnOp::get(tasks.as_str(), Some(GetOptions::new().with_range(tasks_end.clone()))),
        ]);
        let resp = self.client.kv_client().txn(look).await?;
        let read = revision(&resp);
        let gets: Vec<Vec<KeyValue>> = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let [job_kvs, marker_kvs, task_kvs] = <[Vec<KeyValue>; 3]>::try_from(gets)
            .map_err(|_| Error::InvalidArgument("etcd answered three reads with another count".into()))?;
        if !job_kvs.is_empty() || (marker_kvs.is_empty() && task_kvs.is_empty()) {
            return Ok(None);
        }
        let marker = marker_kvs.first();
        let written = match marker.and_then(|kv| serde_json::from_slice::<SubmissionMarker>(kv.value()).ok()) {
            Some(m) => m.started_ms,
            None => task_kvs
                .iter()
                .filter_map(|kv| serde_json::from_slice::<Task>(kv.value()).ok())
                .map(|t| t.updated_at_ms)
                .max()
                .unwrap_or(0),
        };
        if now_ms().saturating_sub(written) < grace.as_millis() as u64 {
            return Ok(None);
        }
        let mut guards = vec![
            Compare::create_revision(job_key.as_str(), CompareOp::Equal, 0),
            Compare::mod_revision(tasks.as_str(), CompareOp::Less, read + 1).with_range(tasks_end.clone()),
            match marker {
                Some(kv) => Compare::mod_revision(marker_key.as_str(), CompareOp::Equal, kv.mod_revision()),
                None => Compare::create_revision(marker_key.as_str(), CompareOp::Equal, 0),
            },
        ];
        guards.extend(fence);
        let txn = Txn::new().when(guards).and_then([
            TxnOp::delete(tasks.as_str(), Some(DeleteOptions::new().with_range(tasks_end))),
            TxnOp::delete(marker_key.as_str(), None),
        ]);
        let resp = self.client.kv_client().txn(txn).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        let n = deleted(&resp);
        tracing::info!(job, tasks = n, "deleted tasks an incomplete submission left");
        Ok(Some(n))
    }
}
