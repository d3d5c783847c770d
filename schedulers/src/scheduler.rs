//! The scheduling loop: take jobs, decide on the cached cell, commit, handle conflicts, explain what is left.
//!
//! One attempt reads top to bottom: snapshot the cache -> think (the decision-time knob) -> place each job's
//! pending tasks on a private view of the snapshot (one node table per decision, so jobs decided together
//! do not double-book) -> commit all claims (incremental; gangs on their own, all-or-nothing) -> re-place only what
//! conflicted, on the fresh ledgers the commit returned, a bounded number of times -> record why what is
//! left is pending, and back the job off until the cell changes.
//!
//! The batch scheduler decides many jobs per attempt and commits their claims together (large incremental
//! batches); the service scheduler decides one job per attempt and scores every feasible node.

use crate::config::{Config, Kind};
use crate::ownership::{self, Ownership};
use crate::status::StatusWriter;
use omega::cell_state::{CellSnapshot, CellState, Versioned};
use omega::commit::{conflict_label, Claim, ClaimOutcome, CommitConfig, CommitKind, CommitReport, Committer, Conflict};
use omega::model::{Job, JobState, JobStatus, Task, TaskState};
use omega::placement::{self, PlacementOptions};
use omega::resources::Resources;
use omega::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an unplaceable job waits before the next attempt, at most (sooner if the cell gains room).
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often to look again even if nothing seems to have changed (a missed wake-up costs at most this).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// A job waiting before its next attempt.
struct Backoff {
    until: Instant,
    failures: u32,
    /// Free room in the cell when the job last failed; more room wakes it early.
    free_then: Resources,
}

/// Per-job counters shown in the job's status.
#[derive(Default)]
struct JobCounters {
    attempts: u64,
    conflicts: u64,
}

pub struct Scheduler {
    config: Config,
    name: String,
    instance: String,
    store: Store,
    cache: CellState,
    committer: Committer,
    ownership: Ownership,
    status: StatusWriter,
    options: PlacementOptions,
    rng: StdRng,
    backoff: HashMap<String, Backoff>,
    counters: HashMap<String, JobCounters>,
    lease: Box<dyn Fn() -> i64 + Send + Sync>,
    queue_measured: Option<Instant>,
    /// The highest revision this scheduler committed: an attempt decides on a cache that has seen it, so it
    /// never re-decides (or spreads around) tasks it has already placed.
    last_commit: i64,
}

impl Scheduler {
    pub fn new(config: Config, store: Store, cache: CellState, lease: Box<dyn Fn() -> i64 + Send + Sync>) -> Self {
        let name = config.scheduler_name();
        let instance = config.instance_id();
        let committer = Committer::new(
            store.clone(),
            CommitConfig {
                detection: config.detection(),
                max_txn_ops: Some(config.max_txn_ops),
                max_in_flight: config.max_in_flight,
                placed_by: format!("{name}/{instance}"),
                ..Default::default()
            },
        );
        let mut options = match config.kind {
            Kind::Batch => PlacementOptions::batch(),
            Kind::Service => PlacementOptions::service(),
        };
        options.preemption = config.preemption();
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Scheduler {
            ownership: Ownership::new(&name, &instance, config.steal_after),
            status: StatusWriter::new(Duration::from_secs(10)),
            config,
            name,
            instance,
            store,
            cache,
            committer,
            options,
            rng,
            backoff: HashMap::new(),
            counters: HashMap::new(),
            lease,
            queue_measured: None,
            last_commit: 0,
        }
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut changes = self.cache.subscribe();
        loop {
            let snapshot = self.cache.snapshot();
            if let Err(e) = self.ownership.claim(&self.store, &snapshot, (self.lease)()).await {
                tracing::warn!(error = %e, "claiming jobs failed; will retry");
            }
            let work = self.ready_jobs(&snapshot).await;
            // Counting the queue walks every job: once a second is enough for a gauge.
            if self.queue_measured.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                metrics::gauge!("omega_scheduler_queue_tasks").set(queue_depth(&snapshot, &self.name) as f64);
                self.queue_measured = Some(Instant::now());
            }
            if work.is_empty() {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(IDLE_RECHECK) => {}
                }
                continue;
            }
            let batch = match self.config.kind {
                Kind::Batch => work,
                Kind::Service => work.into_iter().take(1).collect(),
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.attempt(batch) => {}
            }
        }
    }

    /// Owned jobs with pending tasks that are not backing off, highest priority first, oldest first. Jobs
    /// owned with nothing pending are released; the batch scheduler takes jobs until `batch_claims` tasks.
    async fn ready_jobs(&mut self, snapshot: &CellSnapshot) -> Vec<Arc<Job>> {
        let free_now = cell_free(snapshot);
        let mut ready = Vec::new();
        let mut finished = Vec::new();
        for job in self.ownership.owned(snapshot) {
            if !ownership::has_pending(snapshot, job) {
                finished.push(job.clone());
                continue;
            }
            if let Some(b) = self.backoff.get(&job.id) {
                let more_room =
                    free_now.cpu_millis > b.free_then.cpu_millis || free_now.memory_bytes > b.free_then.memory_bytes;
                if Instant::now() < b.until && !more_room {
                    continue;
                }
            }
            ready.push(snapshot.jobs.get(&job.id).map(|j| j.value.clone()).expect("owned job exists"));
        }
        for job in finished {
            self.finish(snapshot, &job).await;
        }
        ready.sort_by(|a, b| {
            b.priority.cmp(&a.priority).then(a.submitted_at_ms.cmp(&b.submitted_at_ms)).then(a.id.cmp(&b.id))
        });
        let mut budget = self.config.batch_claims.max(1);
        let mut out = Vec::new();
        for job in ready {
            let n = snapshot.tasks_of(&job).filter(|t| t.value.state == TaskState::Pending).count();
            if !out.is_empty() && n > budget {
                break;
            }
            budget = budget.saturating_sub(n);
            out.push(job);
        }
        metrics::gauge!("omega_scheduler_owned_jobs").set(self.ownership.owned(snapshot).count() as f64);
        out
    }

    /// A job with nothing pending: mark it running, clear its status, give it up.
    async fn finish(&mut self, snapshot: &CellSnapshot, job: &Job) {
        self.backoff.remove(&job.id);
        let counters = self.counters.remove(&job.id).unwrap_or_default();
        if self.status.forget(&job.id) {
            let status = JobStatus {
                job: job.id.clone(),
                attempts: counters.attempts,
                conflicts: counters.conflicts,
                scheduler_instance: format!("{}/{}", self.name, self.instance),
                ..Default::default()
            };
            if let Err(e) = self.status.update(&self.store, status).await {
                tracing::warn!(job = job.id, error = %e, "writing job status failed");
            }
            self.status.forget(&job.id);
        }
        if job.state == JobState::Pending {
            if let Some(v) = snapshot.jobs.get(&job.id) {
                if let Err(e) = self.store.set_job_state(&v.value, v.mod_revision, JobState::Running).await {
                    tracing::warn!(job = job.id, error = %e, "marking job running failed");
                }
            }
        }
        if let Err(e) = self.ownership.release(&self.store, snapshot, &job.id).await {
            tracing::warn!(job = job.id, error = %e, "releasing job failed");
        }
    }

    /// One decision over `jobs`, its commit, and the re-placement of what conflicted.
    async fn attempt(&mut self, jobs: Vec<Arc<Job>>) {
        let started = Instant::now();
        let snapshot = match self.cache.wait_for_revision(self.last_commit, Duration::from_secs(2)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "the cache has not caught up with our own commits; deciding on what it has");
                self.cache.snapshot()
            }
        };
        let mut pending: BTreeMap<String, Vec<Versioned<Task>>> = BTreeMap::new();
        for job in &jobs {
            let tasks: Vec<Versioned<Task>> =
                snapshot.tasks_of(job).filter(|t| t.value.state == TaskState::Pending).cloned().collect();
            pending.insert(job.id.clone(), tasks);
        }
        let unplaced_count: usize = pending.values().map(Vec::len).sum();
        // The decision-time knob: think while the snapshot ages, as a slow scheduler would.
        let think = self.config.t_job * jobs.len() as u32 + self.config.t_task * unplaced_count as u32;
        if !think.is_zero() {
            tokio::time::sleep(think).await;
        }

        let mut view = (*snapshot).clone();
        let mut explanations = HashMap::new();
        let mut any_conflict: HashMap<String, bool> = HashMap::new();
        let mut round = 0;
        loop {
            // Decide.
            let decided = Instant::now();
            let (mut incremental, mut gangs) = (Vec::new(), Vec::new());
            // One node table for every job of this decision: what one job takes, the next sees taken.
            let mut table = placement::NodeTable::new(&view);
            for job in &jobs {
                let tasks = pending.get(&job.id).map(Vec::as_slice).unwrap_or(&[]);
                if tasks.is_empty() {
                    continue;
                }
                let p = placement::place_in(&mut table, &view, job, tasks, &self.options, &mut self.rng);
                if let Some(e) = p.explanation {
                    explanations.insert(job.id.clone(), e);
                }
                if job.gang {
                    if !p.claims.is_empty() {
                        gangs.push(p.claims);
                    }
                } else {
                    incremental.extend(p.claims);
                }
            }
            let decision = decided.elapsed() + if round == 0 { think } else { Duration::ZERO };
            metrics::histogram!("omega_scheduler_decision_seconds").record(decision.as_secs_f64());
            metrics::counter!("omega_scheduler_busy_microseconds_total").increment(decision.as_micros() as u64);
            if incremental.is_empty() && gangs.is_empty() {
                break;
            }

            // Commit.
            let commit_started = Instant::now();
            let mut results: Vec<(Vec<Claim>, CommitReport)> = Vec::new();
            if !incremental.is_empty() {
                match self.committer.commit(&snapshot, &incremental, CommitKind::Incremental).await {
                    Ok(r) => results.push((incremental, r)),
                    Err(e) => tracing::warn!(error = %e, "commit failed"),
                }
            }
            for gang in gangs {
                match self.committer.commit(&snapshot, &gang, CommitKind::Gang).await {
                    Ok(r) => results.push((gang, r)),
                    Err(e) => tracing::warn!(error = %e, "gang commit failed"),
                }
            }
            metrics::counter!("omega_scheduler_commit_microseconds_total")
                .increment(commit_started.elapsed().as_micros() as u64);

            // Learn from the outcome: placed tasks leave `pending`; conflicted ones stay for re-placement
            // unless someone else changed them. The view keeps everything learned in earlier rounds too.
            let mut conflicted_tasks = 0;
            for (claims, report) in &results {
                if let Some(rev) = report.max_revision() {
                    self.last_commit = self.last_commit.max(rev);
                }
                for l in &report.latencies {
                    metrics::histogram!("omega_scheduler_commit_txn_seconds").record(l.as_secs_f64());
                }
                apply_report(&mut view, claims, report);
                for (claim, outcome) in claims.iter().zip(&report.outcomes) {
                    let job = claim.task.value.job.clone();
                    let list = pending.entry(job.clone()).or_default();
                    match outcome {
                        ClaimOutcome::Committed { .. } => {
                            metrics::counter!("omega_scheduler_placements_total").increment(1);
                            list.retain(|t| t.value.id != claim.task.value.id);
                        }
                        ClaimOutcome::Conflicted(c) => {
                            metrics::counter!("omega_scheduler_conflicts_total", "reason" => conflict_label(*c))
                                .increment(1);
                            any_conflict.insert(job, true);
                            if matches!(c, Conflict::TaskChanged | Conflict::Duplicate) {
                                list.retain(|t| t.value.id != claim.task.value.id);
                            } else {
                                conflicted_tasks += 1;
                            }
                        }
                    }
                }
            }
            round += 1;
            if conflicted_tasks == 0 || round > self.config.conflict_retries {
                break;
            }
            // Back off a little (with jitter) before re-placing on the fresh ledgers the commit returned.
            let pause = Duration::from_millis(self.rng.random_range(1..=5) << round.min(6));
            tokio::time::sleep(pause).await;
        }

        // Account and explain.
        let free_now = cell_free(&self.cache.snapshot());
        for job in &jobs {
            let counters = self.counters.entry(job.id.clone()).or_default();
            counters.attempts += 1;
            metrics::counter!("omega_scheduler_attempts_total").increment(1);
            if any_conflict.contains_key(&job.id) {
                counters.conflicts += 1;
                metrics::counter!("omega_scheduler_attempts_conflicted_total").increment(1);
            }
            let left = pending.get(&job.id).map(Vec::len).unwrap_or(0);
            if left == 0 {
                self.backoff.remove(&job.id);
                continue;
            }
            let failures = self.backoff.get(&job.id).map(|b| b.failures + 1).unwrap_or(1);
            let wait = Duration::from_millis(500u64 << failures.min(5)).min(MAX_BACKOFF);
            self.backoff
                .insert(job.id.clone(), Backoff { until: Instant::now() + wait, failures, free_then: free_now });
            let (reason, reasons) = match explanations.get(&job.id) {
                Some(e) => (e.to_string(), e.codes()),
                None => ("lost placement races; retrying".to_string(), BTreeMap::new()),
            };
            let status = JobStatus {
                job: job.id.clone(),
                pending: left as u32,
                reason,
                reasons,
                attempts: counters.attempts,
                conflicts: counters.conflicts,
                last_attempt_ms: 0,
                scheduler_instance: format!("{}/{}", self.name, self.instance),
            };
            if let Err(e) = self.status.update(&self.store, status).await {
                tracing::warn!(job = job.id, error = %e, "writing job status failed");
            }
        }
        tracing::debug!(jobs = jobs.len(), took = ?started.elapsed(), "attempt done");
    }
}

/// Brings a view up to what a commit learned: the ledgers it wrote or read back, and its placed tasks.
fn apply_report(view: &mut CellSnapshot, claims: &[Claim], report: &CommitReport) {
    for (node, ledger) in &report.ledgers {
        match ledger {
            Some(l) => drop(view.allocations.insert(node.clone(), l.clone())),
            None => drop(view.allocations.remove(node)),
        }
    }
    for (claim, outcome) in claims.iter().zip(&report.outcomes) {
        if let ClaimOutcome::Committed { revision } = outcome {
            let mut t = (*claim.task.value).clone();
            t.state = TaskState::Assigned;
            t.node = Some(claim.node.clone());
            view.put_task(Versioned::new(t, *revision));
            for v in &claim.preempts {
                let mut e = (*v.value).clone();
                e.state = TaskState::Pending;
                view.put_task(Versioned::new(e, *revision));
            }
        }
    }
}

/// Free room over all schedulable nodes (what wakes backed-off jobs when it grows).
fn cell_free(snapshot: &CellSnapshot) -> Resources {
    snapshot.allocations.iter().filter(|(n, _)| snapshot.is_schedulable(n)).map(|(_, a)| a.value.free()).sum()
}

/// Pending tasks of every job addressed to this scheduler (owned or not).
fn queue_depth(snapshot: &CellSnapshot, scheduler: &str) -> usize {
    snapshot
        .jobs
        .values()
        .filter(|j| j.value.scheduler == scheduler)
        .map(|j| snapshot.tasks_of(&j.value).filter(|t| t.value.state == TaskState::Pending).count())
        .sum()
}
