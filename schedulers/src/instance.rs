//! This scheduler instance's presence in etcd: a lease, kept alive, with the instance's record bound to it.
//!
//! Everything the instance holds (its record, the jobs it owns) is bound to this one lease, so when the
//! process dies all of it lapses together after the TTL and other instances take over. If the lease is lost
//! while the process lives (etcd unreachable for longer than the TTL), the keep-alive loop grants a new one,
//! re-registers, and says so in the log; job ownership is re-taken through the normal claiming path.

use etcd_client::PutOptions;
use omega::lease::Renewer;
use omega::model::{now_ms, SchedulerInstance};
use omega::store::{encode, Store};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// The instance's current lease (it changes if the old one is lost).
#[derive(Clone)]
pub struct Presence {
    lease: Arc<AtomicI64>,
    pub record: SchedulerInstance,
}

impl Presence {
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }
}

/// Grants a lease, writes the instance record, and keeps both alive in the background.
pub async fn register(
    store: &Store,
    record: SchedulerInstance,
    ttl: Duration,
) -> anyhow::Result<(Presence, JoinHandle<()>)> {
    let ttl_secs = ttl.as_secs().max(2) as i64;
    let lease = grant_and_put(store, &record, ttl_secs).await?;
    let presence = Presence { lease: Arc::new(AtomicI64::new(lease)), record };
    let keeper = tokio::spawn(keep_alive(store.clone(), presence.clone(), ttl_secs));
    Ok((presence, keeper))
}

async fn grant_and_put(store: &Store, record: &SchedulerInstance, ttl_secs: i64) -> anyhow::Result<i64> {
    let lease = store.grant_lease(ttl_secs).await?;
    let key = store.keys().scheduler(&record.scheduler, &record.instance);
    let value = encode(&key, record)?;
    store.client().kv_client().put(key, value, Some(PutOptions::new().with_lease(lease))).await?;
    Ok(lease)
}

async fn keep_alive(store: Store, presence: Presence, ttl_secs: i64) {
    let period = Duration::from_millis((ttl_secs as u64 * 1000) / 3);
    let mut renewer = Renewer::new(store.clone(), presence.lease());
    loop {
        tokio::time::sleep(period).await;
        match renewer.renew().await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    lease = format!("{:x}", renewer.lease()),
                    "lease expired; this instance lost its jobs; re-registering"
                );
                match grant_and_put(&store, &presence.record, ttl_secs).await {
                    Ok(new) => {
                        presence.lease.store(new, Ordering::Relaxed);
                        renewer.set_lease(new);
                    }
                    Err(e) => tracing::warn!(error = %e, "re-registering failed; will retry"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "lease keep-alive failed; will retry"),
        }
    }
}

/// A fresh record for this process.
pub fn record(
    scheduler: &str,
    instance: &str,
    kind: omega::model::JobKind,
    metrics: Option<String>,
) -> SchedulerInstance {
    SchedulerInstance {
        scheduler: scheduler.to_string(),
        instance: instance.to_string(),
        kind,
        started_ms: now_ms(),
        metrics,
        stats: Default::default(),
    }
}
