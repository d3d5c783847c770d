//! Job status (why tasks are pending), written sparingly.
//!
//! A scheduler may retry an unplaceable job every few seconds for hours. Writing a record per attempt would
//! turn that into a stream of etcd writes (Kubernetes events did exactly this). So the status of a job is one
//! key, rewritten when what it says changes, and otherwise only to move its counters and time: after
//! `refresh`, then twice as long each time it has not changed, up to [`MAX_REFRESH`]. A job that cannot fit
//! for an hour costs about twenty writes.

use omega::model::{now_ms, JobStatus};
use omega::store::{encode, Store};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The longest a job's unchanged status goes without a rewrite.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);

pub struct StatusWriter {
    /// Per job: what was written, when, and how long until an unchanged status is rewritten.
    written: HashMap<String, (JobStatus, Instant, Duration)>,
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
        let Some(next) = due(self.written.get(&status.job), &status, self.refresh, Instant::now()) else {
            return Ok(false);
        };
        put(store, &status).await?;
        self.written.insert(status.job.clone(), (status, Instant::now(), next));
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

/// Whether `status` is to be written at `now`, given what was written last: `Some(wait)` until an unchanged
/// status is rewritten next (`refresh` after a change, doubling while nothing changes, up to [`MAX_REFRESH`]).
fn due(
    last: Option<&(JobStatus, Instant, Duration)>,
    status: &JobStatus,
    refresh: Duration,
    now: Instant,
) -> Option<Duration> {
    let Some((last, at, wait)) = last else { return Some(refresh) };
    let same = last.pending == status.pending && last.reason == status.reason && last.reasons == status.reasons;
    match same {
        false => Some(refresh),
        true if now.duration_since(*at) < *wait => None,
        true => Some((*wait * 2).min(MAX_REFRESH.max(refresh))),
    }
}

/// Writes a job's status record as it is (the last word on a job this instance gives up: nothing to compare
/// it with afterwards).
pub async fn put(store: &Store, status: &JobStatus) -> anyhow::Result<()> {
    let key = store.keys().status(&status.job);
    let txn = etcd_client::Txn::new().and_then([etcd_client::TxnOp::put(key.as_str(), encode(&key, status)?, None)]);
    store.txn_adding_data(txn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job retried every second for an hour with the same reason: a handful of writes, and a change of
    /// reason is written at once.
    #[test]
    fn an_unchanged_status_is_rewritten_ever_more_rarely() {
        let refresh = Duration::from_secs(10);
        let stuck = JobStatus {
            job: "j".into(),
            pending: 5,
            reason: "0/3 nodes: insufficient memory".into(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut last: Option<(JobStatus, Instant, Duration)> = None;
        let mut writes = 0;
        for second in 0..3600u64 {
            let now = t0 + Duration::from_secs(second);
            let mut status = stuck.clone();
            status.attempts = second;
            if let Some(wait) = due(last.as_ref(), &status, refresh, now) {
                writes += 1;
                last = Some((status, now, wait));
            }
        }
        assert!(writes <= 20, "{writes} writes in an hour");
        let moved = JobStatus { pending: 4, ..stuck.clone() };
        let now = t0 + Duration::from_secs(3601);
        assert_eq!(due(last.as_ref(), &moved, refresh, now), Some(refresh), "a change is written at once");
    }
}
