//! This scheduler instance's presence in etcd: a lease, kept alive, with the instance's record bound to it.
//!
//! Everything the instance holds (its record, the jobs it owns) is bound to this one lease, so when the
//! process dies all of it lapses together after the TTL and other instances take over. If the lease is lost
//! while the process lives (etcd unreachable or paused for longer than the TTL), the [`LeaseKeeper`] grants a
//! new one and writes the record again; job ownership is re-taken through the normal claiming path, and the
//! commits of the old ownership fail their fence.
//!
//! The record also carries the instance's counters ([`SchedulerStats`]), rewritten every few seconds while
//! they move, so `omctl schedulers` can show attempts and conflicts without scraping every instance.

use futures_util::FutureExt;
use omega::lease::{LeaseKeeper, Register};
use omega::model::{now_ms, JobKind, SchedulerInstance, SchedulerKind, SchedulerStats};
use omega::store::{encode, Store};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often the counters in the record are brought up to date (when they changed).
const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// The instance's lease and the counters it publishes.
pub struct Presence {
    keeper: LeaseKeeper,
    stats: Arc<Mutex<SchedulerStats>>,
    publisher: JoinHandle<()>,
}

impl Presence {
    /// The lease in force now.
    pub fn lease(&self) -> i64 {
        self.keeper.lease()
    }

    pub fn keeper(&self) -> &LeaseKeeper {
        &self.keeper
    }

    /// The counters the scheduler loop updates and the record publishes.
    pub fn stats(&self) -> Arc<Mutex<SchedulerStats>> {
        self.stats.clone()
    }

    /// Withdraws the instance at once (its record and jobs go now rather than after the TTL).
    pub async fn withdraw(self) {
        self.publisher.abort();
        self.keeper.revoke().await;
    }
}

/// Grants a lease, writes the instance record under it, and keeps both alive (and the counters fresh) in the
/// background.
pub async fn register(store: &Store, record: SchedulerInstance, ttl: Duration) -> omega::Result<Presence> {
    let stats = Arc::new(Mutex::new(SchedulerStats::default()));
    let register: Register = {
        let (record, stats) = (record.clone(), stats.clone());
        Arc::new(move |store: Store, lease: i64| {
            let mut record = record.clone();
            record.stats = *stats.lock();
            async move { put_record(&store, &record, lease).await }.boxed()
        })
    };
    let what = format!("scheduler {}/{}", record.scheduler, record.instance);
    let keeper = LeaseKeeper::start(store.clone(), ttl, what, register).await?;
    let publisher = tokio::spawn(publish(store.clone(), record, stats.clone(), keeper.lease_fn()));
    Ok(Presence { keeper, stats, publisher })
}

async fn put_record(store: &Store, record: &SchedulerInstance, lease: i64) -> omega::Result<()> {
    let key = store.keys().scheduler(&record.scheduler, &record.instance);
    let value = encode(&key, record)?;
    store.client().kv_client().put(key, value, Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
    Ok(())
}

/// Rewrites the record when the counters moved. A write costs every scheduler's cache one event, so only
/// every [`PUBLISH_EVERY`], and not at all while the instance is idle.
async fn publish(
    store: Store,
    mut record: SchedulerInstance,
    stats: Arc<Mutex<SchedulerStats>>,
    lease: impl Fn() -> i64,
) {
    let mut published = SchedulerStats::default();
    loop {
        tokio::time::sleep(PUBLISH_EVERY).await;
        let now = *stats.lock();
        if now == published {
            continue;
        }
        record.stats = SchedulerStats { updated_ms: now_ms(), ..now };
        match put_record(&store, &record, lease()).await {
            Ok(()) => published = now,
            Err(e) => tracing::debug!(error = %e, "publishing the instance's counters failed; will retry"),
        }
    }
}

/// A fresh record for this process: which scheduler, which instance, what it is (`kind` also in the form
/// readers older than the monolithic scheduler decode), the lock it holds around attempts, if any.
pub fn record(
    scheduler: &str,
    instance: &str,
    kind: SchedulerKind,
    lock: Option<String>,
    metrics: Option<String>,
) -> SchedulerInstance {
    SchedulerInstance {
        scheduler: scheduler.to_string(),
        instance: instance.to_string(),
        kind: match kind {
            SchedulerKind::Service => JobKind::Service,
            SchedulerKind::Batch | SchedulerKind::Monolithic => JobKind::Batch,
        },
        scheduler_kind: Some(kind),
        lock,
        started_ms: now_ms(),
        metrics,
        stats: Default::default(),
    }
}
