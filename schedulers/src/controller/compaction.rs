//! Compacting etcd's history, which etcd 3.4 does not do unless started with `--auto-compaction-*`.
//!
//! Every write keeps the previous value as history until a compaction drops it, so a cell placing thousands
//! of tasks a second grows etcd's database by tens of MB a second and fills the default 2 GiB quota in
//! minutes. The controller leader compacts on a period, to the revision it saw one period earlier: history
//! of between one and two periods is kept, so a watcher that reconnects within a period resumes where it
//! was, and one that was away longer re-lists (every watcher in Omega does so by itself). Compaction frees
//! pages inside the database for reuse, so the file stops growing; it does not shrink it. Shrinking is
//! `etcdctl defrag`, which blocks the member while it runs: an operator's call (README, "Operating etcd").
//!
//! Compacting is idempotent and harmless from a replica that just lost the leadership (a revision already
//! compacted is refused and ignored), so it needs no fence.

use etcd_client::StatusResponse;
use omega::store::Store;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Compacts every `every` until dropped with its task (the leader runs one while it leads).
pub async fn run(store: Store, every: Duration) {
    let mut seen: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        match store.revision().await {
            Ok(revision) => seen.push_back((now, revision)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read etcd's revision to compact; trying again next period");
                continue;
            }
        }
        // The newest revision seen at least one period ago; older samples are no longer needed.
        let Some(target) = due(&mut seen, now, every) else { continue };
        compact(&store, target).await;
    }
}

/// The revision to compact to at `now`: the newest sample taken at least `every` earlier (dropping the
/// samples before it).
fn due(seen: &mut VecDeque<(Instant, i64)>, now: Instant, every: Duration) -> Option<i64> {
    let cutoff = now.checked_sub(every)?;
    let mut target = None;
    while let Some(&(at, revision)) = seen.front() {
        if at > cutoff {
            break;
        }
        target = Some(revision);
        seen.pop_front();
    }
    target
}

async fn compact(store: &Store, revision: i64) {
    let started = Instant::now();
    match store.client().compact(revision, None).await {
        Ok(_) => {
            metrics::counter!("omega_controller_compactions_total").increment(1);
            metrics::gauge!("omega_controller_compacted_revision").set(revision as f64);
            let status = db_status(store).await;
            if let Some(s) = &status {
                metrics::gauge!("omega_etcd_db_size_bytes").set(s.db_size() as f64);
                metrics::gauge!("omega_etcd_db_size_in_use_bytes").set(s.raft_used_db_size() as f64);
            }
            tracing::info!(
                revision,
                took = ?started.elapsed(),
                db_mb = status.as_ref().map(|s| s.db_size() >> 20),
                in_use_mb = status.as_ref().map(|s| s.raft_used_db_size() >> 20),
                "compacted etcd's history"
            );
        }
        Err(e) if e.to_string().contains("required revision has been compacted") => {}
        Err(e) => {
            metrics::counter!("omega_controller_compaction_failures_total").increment(1);
            tracing::warn!(revision, error = %e, "compacting etcd failed; trying again next period");
        }
    }
}

/// The first endpoint's database size (the members of a cluster hold the same data).
async fn db_status(store: &Store) -> Option<StatusResponse> {
    store.client().maintenance_client().status().await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacts_to_the_newest_revision_one_period_old() {
        let t0 = Instant::now();
        let every = Duration::from_secs(30);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut seen: VecDeque<(Instant, i64)> = [(at(0), 10), (at(30), 500)].into();
        assert_eq!(due(&mut seen, at(30), every), Some(10), "one period after the first sample");
        assert_eq!(seen.len(), 1);
        seen.push_back((at(60), 900));
        assert_eq!(due(&mut seen, at(60), every), Some(500));
        seen.push_back((at(75), 950));
        assert_eq!(due(&mut seen, at(75), every), None, "nothing new is a period old");
        assert_eq!(due(&mut seen, at(105), every), Some(950), "a late tick compacts to the newest old enough");
        assert!(seen.is_empty());
    }
}
