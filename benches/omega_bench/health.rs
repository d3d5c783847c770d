//! The cell's health over a long run: what a soak is judged by.
//!
//! Every few seconds: tasks placed in the interval, etcd's database size (file and in use: it must level
//! off once the controller collects finished jobs and compacts), the live nodes, and how many liveness keys
//! etcd deleted so far (a lapsed lease: in a run where no node dies, every one is a node wrongly taken for
//! dead). etcd is asked directly, not through a proxy, and the watch on liveness keys is the only load this
//! adds.

use crate::observe::Seen;
use omega::keys::Keys;
use omega::store::{Store, DEFAULT_PAGE_SIZE};
use omega::watcher::{Change, WatchEvent, Watcher};
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How often the health is sampled.
pub const EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since the measurement started.
    pub t: f64,
    /// Tasks placed per second over the interval that ends here.
    pub placed_per_sec: f64,
    pub db_size_bytes: i64,
    pub db_in_use_bytes: i64,
    pub nodes_alive: i64,
    /// Liveness keys deleted since the run started (leases that lapsed or were revoked).
    pub liveness_lost: u64,
}

/// A summary of the samples, for the table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Health {
    pub db_size_max_bytes: i64,
    pub db_size_end_bytes: i64,
    /// The largest database size in the run's second half against its first half's: near 1 when it
    /// levelled off, near 2 when it grew steadily.
    pub db_growth_second_half: f64,
    pub liveness_lost: u64,
    pub nodes_alive_min: i64,
}

pub struct Sampler {
    pub samples: Arc<Mutex<Vec<Sample>>>,
    lost: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sampler {
    pub fn start(direct: &Store, keys: &Keys, seen: Arc<Mutex<Seen>>, start: Instant) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let lost = Arc::new(AtomicU64::new(0));
        let watching = {
            let (store, prefix, lost) = (direct.clone(), keys.live(""), lost.clone());
            tokio::spawn(async move { count_deletes(store, prefix, lost).await })
        };
        let sampling = {
            let (store, keys, samples, lost) = (direct.clone(), keys.clone(), samples.clone(), lost.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut placed_before = 0usize;
                loop {
                    tick.tick().await;
                    let placed = seen.lock().placed_at.len();
                    let status = store.client().maintenance_client().status().await.ok();
                    let nodes_alive = store.count(&keys.live("")).await.unwrap_or(-1);
                    samples.lock().push(Sample {
                        t: start.elapsed().as_secs_f64(),
                        placed_per_sec: placed.saturating_sub(placed_before) as f64 / EVERY.as_secs_f64(),
                        db_size_bytes: status.as_ref().map_or(-1, |s| s.db_size()),
                        db_in_use_bytes: status.as_ref().map_or(-1, |s| s.raft_used_db_size()),
                        nodes_alive,
                        liveness_lost: lost.load(Ordering::Relaxed),
                    });
                    placed_before = placed;
                }
            })
        };
        Sampler { samples, lost, tasks: vec![watching, sampling] }
    }

    pub fn summary(&self) -> Health {
        let samples = self.samples.lock();
        let max = |s: &[Sample]| s.iter().map(|x| x.db_size_bytes).max().unwrap_or(0);
        let half = samples.len() / 2;
        let (first, second) = samples.split_at(half);
        Health {
            db_size_max_bytes: max(&samples),
            db_size_end_bytes: samples.last().map_or(0, |s| s.db_size_bytes),
            db_growth_second_half: if max(first) > 0 { max(second) as f64 / max(first) as f64 } else { 0.0 },
            liveness_lost: self.lost.load(Ordering::Relaxed),
            nodes_alive_min: samples.iter().map(|s| s.nodes_alive).filter(|&n| n >= 0).min().unwrap_or(0),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Counts deletes under `prefix`, with the project's watcher (it resumes a broken stream; after a
/// compaction it re-lists, and deletes in the gap are not counted).
async fn count_deletes(store: Store, prefix: String, lost: Arc<AtomicU64>) {
    let mut watcher = Watcher::new(store, prefix, DEFAULT_PAGE_SIZE);
    loop {
        if let WatchEvent::Changes { changes, .. } = watcher.next().await {
            let deleted = changes.iter().filter(|c| matches!(c, Change::Delete { .. })).count();
            lost.fetch_add(deleted as u64, Ordering::Relaxed);
        }
    }
}
