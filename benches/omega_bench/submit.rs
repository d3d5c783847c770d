//! Submitting the workload through the same path as `omctl submit` (whole-or-nothing job writes), with
//! several submissions in flight so that submission is never what limits placement: the bench reports the
//! submission rate on its own.

use crate::workload::Arrival;
use anyhow::{Context, Result};
use omega::model::{now_ms, Job, JobKind};
use omega::store::Store;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Submissions in flight at once.
const IN_FLIGHT: usize = 16;

/// A job as submitted.
#[derive(Clone, Debug)]
pub struct SubmittedJob {
    pub kind: JobKind,
    pub tasks: u32,
    pub scheduler: String,
    pub submitted_ms: u64,
}

#[derive(Default)]
pub struct Submitted {
    pub jobs: HashMap<String, SubmittedJob>,
    pub tasks: u64,
    /// Time from the first submission's start to the last one's end, per phase.
    pub writing: Duration,
    /// How far behind its arrival time a submission started, at worst.
    pub max_lag: Duration,
    pub failed: Vec<String>,
    /// Services stopped at the end of their lifetime.
    pub stopped: u64,
}

impl Submitted {
    pub fn tasks_per_sec(&self) -> f64 {
        if self.writing.is_zero() {
            return 0.0;
        }
        self.tasks as f64 / self.writing.as_secs_f64()
    }
}

/// Submits `job`; true if it landed.
async fn submit_one(store: &Store, mut job: Job, max_txn_ops: usize, into: &Mutex<Submitted>) -> bool {
    job.submitted_at_ms = now_ms();
    let result = store.submit_job(&job, max_txn_ops).await;
    let mut s = into.lock();
    match result {
        Ok(_) => {
            s.tasks += job.tasks as u64;
            s.jobs.insert(
                job.id.clone(),
                SubmittedJob {
                    kind: job.kind,
                    tasks: job.tasks,
                    scheduler: job.scheduler.clone(),
                    submitted_ms: job.submitted_at_ms,
                },
            );
            true
        }
        Err(e) => {
            tracing::warn!(job = job.id, error = %e, "submission failed");
            s.failed.push(format!("{}: {e}", job.id));
            false
        }
    }
}

/// Stops a service at the end of its lifetime, as its user would (`omctl cancel`).
async fn stop_after(store: &Store, job: &str, lifetime: Duration, into: &Mutex<Submitted>) {
    tokio::time::sleep(lifetime).await;
    match omega::ops::cancel::cancel_job(store, job).await {
        Ok(report) if report.not_killed.is_empty() => into.lock().stopped += 1,
        Ok(report) => into.lock().failed.push(format!("{job}: cancel left {} tasks running", report.not_killed.len())),
        Err(e) => into.lock().failed.push(format!("{job}: cancel failed: {e}")),
    }
}

/// Submits `jobs` as fast as etcd takes them.
pub async fn all_at_once(store: &Store, jobs: Vec<Job>, max_txn_ops: usize) -> Result<Submitted> {
    let into = Arc::new(Mutex::new(Submitted::default()));
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let started = Instant::now();
    let mut set = JoinSet::new();
    for job in jobs {
        let permit = slots.clone().acquire_owned().await.context("submission slots closed")?;
        let (store, into) = (store.clone(), into.clone());
        set.spawn(async move {
            submit_one(&store, job, max_txn_ops, &into).await;
            drop(permit);
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("a submission panicked")?;
    }
    let mut out = std::mem::take(&mut *into.lock());
    out.writing = started.elapsed();
    Ok(out)
}

/// Submits each arrival at its time after `start`, and stops each service at the end of its lifetime;
/// returns when all are in (services still running are stopped when `stoppers` is dropped with the run).
/// The shared record fills as they land, so the progress line can show it.
pub async fn on_schedule(
    store: Store,
    arrivals: Vec<Arrival>,
    start: Instant,
    max_txn_ops: usize,
    into: Arc<Mutex<Submitted>>,
    stoppers: Arc<Mutex<JoinSet<()>>>,
) -> Result<()> {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut set = JoinSet::new();
    let mut first: Option<Instant> = None;
    for a in arrivals {
        tokio::time::sleep_until((start + a.at).into()).await;
        let permit = slots.clone().acquire_owned().await.context("submission slots closed")?;
        let now = Instant::now();
        first.get_or_insert(now);
        {
            let mut s = into.lock();
            s.max_lag = s.max_lag.max(now.saturating_duration_since(start + a.at));
        }
        let (store, into, stoppers) = (store.clone(), into.clone(), stoppers.clone());
        set.spawn(async move {
            let id = a.job.id.clone();
            let landed = submit_one(&store, a.job, max_txn_ops, &into).await;
            drop(permit);
            if let (true, Some(lifetime)) = (landed, a.lifetime) {
                stoppers.lock().spawn(async move { stop_after(&store, &id, lifetime, &into).await });
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("a submission panicked")?;
    }
    if let Some(first) = first {
        into.lock().writing = first.elapsed();
    }
    Ok(())
}
