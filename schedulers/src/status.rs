//! Job status (why tasks are pending), written sparingly.
//!
//! A scheduler may retry an unplaceable job every few seconds for hours. Writing a record per attempt would
//! turn that into a stream of etcd writes (Kubernetes events did exactly this). So the status of a job is one
//! key, rewritten only when what it says changes, or at most every `refresh` to move its counters and time.

use omega::model::{now_ms, JobStatus};
use omega::store::{encode, Store};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub struct StatusWriter {
    written: HashMap<String, (JobStatus, Instant)>,
    refresh: Duration,
}

impl StatusWriter {
    pub fn new(refresh: Duration) -> Self {
        StatusWriter { written: HashMap::new(), refresh }
    }

    /// Records `status` if it differs in substance from what was written last, or the last write is older
    /// than the refresh period. Returns whether it wrote.
    pub async fn update(&mut self, store: &Store, mut status: JobStatus) -> anyhow::Result<bool> {
        status.last_attempt_ms = now_ms();
        if let Some((last, at)) = self.written.get(&status.job) {
            let same = last.pending == status.pending && last.reason == status.reason && last.reasons == status.reasons;
            if same && at.elapsed() < self.refresh {
                return Ok(false);
            }
        }
        put(store, &status).await?;
        self.written.insert(status.job.clone(), (status, Instant::now()));
        Ok(true)
    }

    /// Keeps only the jobs `keep` says yes to (the ones this instance still owns).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.written.retain(|job, _| keep(job));
    }

    /// Forgets a job (placed completely, or gone).
    pub fn forget(&mut self, job: &str) -> bool {
        self.written.remove(job).is_some()
    }
}

/// Writes a job's status record as it is (the last word on a job this instance gives up: nothing to compare
/// it with afterwards).
pub async fn put(store: &Store, status: &JobStatus) -> anyhow::Result<()> {
    let key = store.keys().status(&status.job);
    store.client().kv_client().put(key.as_str(), encode(&key, status)?, None).await?;
    Ok(())
}
