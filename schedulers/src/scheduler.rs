//! The scheduling loop: take jobs, run attempts on the cached cell, keep what each job needs between them.
//!
//! One pass: snapshot the cache -> claim unowned jobs this instance should take -> pick the owned jobs that
//! are ready (pending work, not backing off) -> one [`attempt`](crate::attempt) over them -> record why what
//! is left is pending and back those jobs off until the cell changes. Per-job state (backoff, counters, the
//! last status written) lives only as long as the instance owns the job.
//!
//! The batch scheduler decides many jobs per attempt and commits their claims together (large incremental
//! batches); the service scheduler decides one job per attempt and scores every feasible node. The monolithic
//! scheduler (the paper's baseline) keeps both kinds in one queue and takes from its head what the kind of the
//! job there calls for: a service job alone, or the run of batch jobs that starts there
//! ([`next_attempt`]). With `--lock` each attempt holds the cell lock ([`crate::lock`]) throughout.

use crate::attempt::{self, Leftover};
use crate::config::{Config, Policy};
use crate::lock::{CellLock, LeaseFn};
use crate::ownership::{self, Ownership};
use crate::status::StatusWriter;
use omega::cell_state::{CellSnapshot, CellState, Versioned};
use omega::commit::{CommitConfig, Committer};
use omega::model::{now_ms, Job, JobKind, JobState, JobStatus, SchedulerStats, Task};
use omega::resources::Resources;
use omega::store::Store;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
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

/// What this instance keeps about one job it owns.
#[derive(Default)]
struct Tracked {
    attempts: u64,
    conflicts: u64,
    backoff: Option<Backoff>,
    /// Refused for good (e.g. a gang too large for one transaction), until the job record changes: the job's
    /// mod_revision then, and why.
    permanent: Option<(i64, String)>,
    /// This instance has started an attempt at the job (its wait till the first attempt is counted once).
    attempted: bool,
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
    /// How attempts under each kind's policy decide (see [`Config::policy_kind`]).
    batch: Policy,
    service: Policy,
    /// The cell lock every attempt holds (`--lock`, the pessimistic baseline).
    lock: Option<CellLock>,
    rng: StdRng,
    jobs: HashMap<String, Tracked>,
    lease: LeaseFn,
    stats: Arc<Mutex<SchedulerStats>>,
    queue_measured: Option<Instant>,
    /// The highest revision this scheduler committed: an attempt decides on a cache that has seen it, so it
    /// never re-decides (or spreads around) tasks it has already placed.
    last_commit: i64,
}

impl Scheduler {
    pub fn new(
        config: Config,
        store: Store,
        cache: CellState,
        lease: Box<dyn Fn() -> i64 + Send + Sync>,
        stats: Arc<Mutex<SchedulerStats>>,
    ) -> Self {
        let name = config.scheduler_name();
        let instance = config.instance_id();
        let committer = Committer::new(
            store.clone(),
            CommitConfig {
                detection: config.detection(),
                max_txn_ops: Some(config.max_txn_ops),
                max_in_flight: config.max_in_flight,
                latency_target: (!config.commit_latency_target.is_zero()).then_some(config.commit_latency_target),
                placed_by: format!("{name}/{instance}"),
                ..Default::default()
            },
        );
        let lease: LeaseFn = Arc::from(lease);
        let lock = config.lock.then(|| CellLock::new(store.clone(), &config.lock_name, lease.clone()));
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Scheduler {
            ownership: Ownership::new(&name, &instance, config.steal_after),
            status: StatusWriter::new(Duration::from_secs(10)),
            batch: config.policy(JobKind::Batch),
            service: config.policy(JobKind::Service),
            lock,
            config,
            name,
            instance,
            store,
            cache,
            committer,
            rng,
            jobs: HashMap::new(),
            lease,
            stats,
            queue_measured: None,
            last_commit: 0,
        }
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut changes = self.cache.subscribe();
        loop {
            let pass = Instant::now();
            let snapshot = self.cache.snapshot();
            // Own about two attempts' worth of work: enough to keep deciding, little enough that the other
            // instances take what this one would only queue.
            let owned: usize = self.ownership.owned(&snapshot).map(|j| snapshot.pending_count(&j.id)).sum();
            let budget = (2 * self.config.batch_claims.max(1)).saturating_sub(owned);
            match self.ownership.claim(&self.store, &snapshot, (self.lease)(), budget, owned == 0).await {
                // The store said it once, with what to do.
                Err(e) if e.downcast_ref::<omega::Error>().is_some_and(omega::Error::is_no_space) => {}
                Err(e) => tracing::warn!(error = %e, "claiming jobs failed; will retry"),
                Ok(_) => {}
            }
            spent(Phase::ClaimJobs, pass.elapsed());
            let readying = Instant::now();
            let work = self.ready_jobs(&snapshot).await;
            spent(Phase::ReadyJobs, readying.elapsed());
            // Counting the queue walks every job: once a second is enough for a gauge.
            if self.queue_measured.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                metrics::gauge!("omega_scheduler_queue_tasks").set(queue_depth(&snapshot, &self.name) as f64);
                metrics::gauge!("omega_scheduler_tracked_jobs").set(self.jobs.len() as f64);
                self.queue_measured = Some(Instant::now());
            }
            if work.is_empty() {
                let idle = Instant::now();
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(IDLE_RECHECK) => {}
                }
                spent(Phase::Idle, idle.elapsed());
                continue;
            }
            let (kind, jobs) = next_attempt(work, |j| self.config.policy_kind(j.kind), self.config.batch_claims);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.attempt(kind, jobs) => {}
            }
        }
    }

    /// How many jobs this instance keeps state for (only those it owns).
    pub fn tracked_jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Owned jobs with pending tasks that are not backing off, highest priority first, oldest first, each with
    /// its pending task count. Jobs owned with nothing pending are released.
    async fn ready_jobs(&mut self, snapshot: &CellSnapshot) -> Vec<(Arc<Job>, usize)> {
        // Summing the free room walks every node: only for a pass that has a backed-off job to wake.
        let mut free_now = None;
        let mut ready = Vec::new();
        let mut finished = Vec::new();
        let owned: Vec<Versioned<Job>> =
            self.ownership.owned(snapshot).filter_map(|j| snapshot.jobs.get(j.id.as_str()).cloned()).collect();
        // Forget what belongs to jobs this instance no longer owns (taken over, cancelled, collected).
        let owned_ids: HashSet<&str> = owned.iter().map(|j| j.value.id.as_str()).collect();
        self.jobs.retain(|id, _| owned_ids.contains(id.as_str()));
        self.status.retain(|id| owned_ids.contains(id));
        for job in &owned {
            if !ownership::has_pending(snapshot, &job.value) {
                finished.push(job.value.clone());
                continue;
            }
            let state = self.jobs.entry(job.value.id.clone()).or_default();
            if let Some((revision, _)) = &state.permanent {
                if *revision == job.mod_revision {
                    continue;
                }
                state.permanent = None;
            }
            if let Some(b) = &state.backoff {
                let free_now = *free_now.get_or_insert_with(|| cell_free(snapshot));
                let more_room =
                    free_now.cpu_millis > b.free_then.cpu_millis || free_now.memory_bytes > b.free_then.memory_bytes;
                if Instant::now() < b.until && !more_room {
                    continue;
                }
            }
            ready.push(job.value.clone());
        }
        self.finish(snapshot, finished).await;
        ready.sort_by(|a, b| {
            b.priority.cmp(&a.priority).then(a.submitted_at_ms.cmp(&b.submitted_at_ms)).then(a.id.cmp(&b.id))
        });
        metrics::gauge!("omega_scheduler_owned_jobs").set(owned.len() as f64);
        ready
            .into_iter()
            .map(|job| {
                let pending = snapshot.pending_count(&job.id);
                (job, pending)
            })
            .collect()
    }

    /// Jobs with nothing pending: each marked running, its status cleared and its ownership given up, every
    /// write of every job at once. Under load each write queues in etcd behind large claim transactions, so
    /// one after the other they cost a round trip each, per job, before the next attempt could start.
    async fn finish(&mut self, snapshot: &CellSnapshot, jobs: Vec<Arc<Job>>) {
        let placed_by = self.placed_by();
        let mut last_words = Vec::with_capacity(jobs.len());
        for job in jobs {
            let state = self.jobs.remove(&job.id).unwrap_or_default();
            let status = self.status.forget(&job.id).then(|| JobStatus {
                job: job.id.clone(),
                attempts: state.attempts,
                conflicts: state.conflicts,
                scheduler_instance: placed_by.clone(),
                ..Default::default()
            });
            last_words.push((job, status));
        }
        let (store, ownership) = (&self.store, &self.ownership);
        let each = last_words.into_iter().map(|(job, status)| async move {
            let clear = async {
                match &status {
                    Some(s) => crate::status::put(store, s).await,
                    None => Ok(()),
                }
            };
            let mark = async {
                match snapshot.jobs.get(job.id.as_str()).filter(|_| job.state == JobState::Pending) {
                    Some(v) => store.set_job_state(&v.value, v.mod_revision, JobState::Running).await.map(|_| ()),
                    None => Ok(()),
                }
            };
            let (cleared, marked, released) = tokio::join!(clear, mark, ownership.release(store, snapshot, &job.id));
            if let Err(e) = cleared {
                tracing::warn!(job = job.id, error = %e, "writing job status failed");
            }
            if let Err(e) = marked {
                tracing::warn!(job = job.id, error = %e, "marking job running failed");
            }
            if let Err(e) = released {
                tracing::warn!(job = job.id, error = %e, "releasing job failed");
            }
        });
        futures_util::future::join_all(each).await;
    }

    fn placed_by(&self) -> String {
        format!("{}/{}", self.name, self.instance)
    }

    /// One attempt over `jobs` under the policy of `kind`: (with `--lock`, the cell lock taken) its rounds
    /// (decide, commit, learn) on a snapshot that has seen this scheduler's own commits (and under the lock,
    /// every commit made before it was granted), then what it counts, then why anything is left pending.
    async fn attempt(&mut self, kind: JobKind, jobs: Vec<Arc<Job>>) {
        let started = Instant::now();
        let lock = match &self.lock {
            Some(lock) => {
                let cache = &self.cache;
                let guard = lock.acquire(|| cache.snapshot().revision).await;
                self.count_lock_wait(started.elapsed());
                Some(guard)
            }
            None => None,
        };
        let settled = self.last_commit.max(lock.as_ref().map(|g| g.settled()).unwrap_or(0));
        // Decide only on a cache that has seen this scheduler's own commits: an older one would have it place
        // again, or claim against ledgers older than its own writes. The next pass tries again.
        let waiting = Instant::now();
        let caught_up = self.cache.wait_for_revision(settled, Duration::from_secs(2)).await;
        spent(Phase::CacheWait, waiting.elapsed());
        let snapshot = match caught_up {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "the cache has not caught up with the commits this attempt must see; waiting");
                if let Some(lock) = lock {
                    lock.release().await;
                }
                return;
            }
        };
        self.count_first_attempts(&jobs, &snapshot);
        let policy = match kind {
            JobKind::Batch => self.batch.clone(),
            JobKind::Service => self.service.clone(),
        };
        let outcome = self.rounds(&jobs, &snapshot, &policy).await;
        if let Some(lock) = lock {
            lock.release().await;
        }
        self.account(&jobs, &outcome);
        let explaining = Instant::now();
        self.explain(&jobs, &outcome).await;
        spent(Phase::Status, explaining.elapsed());
        tracing::debug!(jobs = jobs.len(), took = ?started.elapsed(), "attempt done");
    }

    /// Counts the submission -> first attempt wait of each job this instance attempts for the first time, if
    /// none of its tasks has been placed before (a job re-placed after a task ended is not waiting for its
    /// first attempt). The attempt starts here: with `--lock`, once the lock is held, so the wait includes the
    /// queueing for it, as a job of a pessimistic scheduler waits.
    fn count_first_attempts(&mut self, jobs: &[Arc<Job>], snapshot: &CellSnapshot) {
        let now = now_ms();
        for job in jobs {
            let state = self.jobs.entry(job.id.clone()).or_default();
            if std::mem::replace(&mut state.attempted, true)
                || job.submitted_at_ms == 0
                || snapshot.tasks_of(job).any(|t| t.value.placements > 0)
            {
                continue;
            }
            let wait_ms = now.saturating_sub(job.submitted_at_ms);
            metrics::histogram!(FIRST_ATTEMPT_WAIT).record(wait_ms as f64 / 1000.0);
            let mut s = self.stats.lock();
            s.first_attempt_wait_ms_sum += wait_ms;
            s.first_attempts += 1;
        }
    }

    /// Time spent waiting for the cell lock: queueing, apart from busyness.
    fn count_lock_wait(&self, waited: Duration) {
        self.stats.lock().lock_wait_ms += waited.as_millis() as u64;
        metrics::counter!("omega_scheduler_lock_wait_microseconds_total").increment(waited.as_micros() as u64);
    }

    /// Decides, commits and learns, round after round on the view the earlier rounds learned, until nothing
    /// placeable is left or the rounds allowed are spent.
    async fn rounds(&mut self, jobs: &[Arc<Job>], snapshot: &CellSnapshot, policy: &Policy) -> Outcome {
        let mut out = Outcome::default();
        for job in jobs {
            let tasks: Vec<Versioned<Task>> = snapshot.pending_of(&job.id).into_iter().cloned().collect();
            out.pending.insert(job.id.clone(), tasks);
        }
        let unplaced: usize = out.pending.values().map(Vec::len).sum();
        // The decision-time knob: think while the snapshot ages, as a slow scheduler would.
        let think = policy.decision_time(jobs.len(), unplaced);
        if !think.is_zero() {
            tokio::time::sleep(think).await;
        }
        out.busy = think;
        let mut view = snapshot.clone();
        let mut round = 0;
        loop {
            let decision =
                attempt::decide(&view, jobs, &out.pending, &policy.options, &mut self.rng, &mut out.explanations);
            out.busy += decision.took;
            metrics::histogram!("omega_scheduler_decision_seconds")
                .record((decision.took + if round == 0 { think } else { Duration::ZERO }).as_secs_f64());
            if decision.incremental.is_empty() && decision.gangs.is_empty() {
                break;
            }
            omega::failpoint::hit("scheduler.before_commit").await;
            let commit_started = Instant::now();
            let committed = attempt::commit(&self.committer, &view, decision).await;
            out.committing += commit_started.elapsed();
            let learned = attempt::learn(&mut view, &mut out.pending, &committed);
            self.last_commit = self.last_commit.max(view_max_revision(&committed));
            out.claims += learned.claims;
            out.claims_conflicted += learned.claims_conflicted;
            out.placed += learned.placed;
            out.conflicted.extend(learned.conflicted_jobs);
            out.transactions.extend(learned.claimed_jobs);
            out.permanent.extend(learned.permanent);
            if !learned.lost_jobs.is_empty() {
                tracing::warn!(jobs = ?learned.lost_jobs, "no longer the owner of these jobs; their claims were refused");
            }
            round += 1;
            if learned.retryable == 0 || round > self.config.conflict_retries {
                break;
            }
            metrics::counter!("omega_scheduler_replacement_rounds_total").increment(1);
            // Back off a little (with jitter) before re-placing on the fresh ledgers the commit returned.
            let pause = Duration::from_millis(self.rng.random_range(1..=5) << round.min(6));
            tokio::time::sleep(pause).await;
        }
        out
    }

    /// Counts the attempt: the instance's published counters and its metrics. A job whose decision sent no
    /// claim was attempted but made no transaction; one that conflicted sent the claim that did, so conflicted
    /// transactions are always among the transactions.
    fn account(&self, jobs: &[Arc<Job>], out: &Outcome) {
        let conflicted = jobs.iter().filter(|j| out.conflicted.contains(&j.id)).count() as u64;
        let transactions = jobs.iter().filter(|j| out.transactions.contains(&j.id)).count() as u64;
        {
            let mut s = self.stats.lock();
            s.attempts += jobs.len() as u64;
            s.transactions += transactions;
            s.attempts_conflicted += conflicted;
            s.claims += out.claims;
            s.claims_conflicted += out.claims_conflicted;
            s.placed += out.placed;
            s.busy_ms += out.busy.as_millis() as u64;
            s.commit_ms += out.committing.as_millis() as u64;
        }
        metrics::counter!("omega_scheduler_attempts_total").increment(jobs.len() as u64);
        metrics::counter!("omega_scheduler_transactions_total").increment(transactions);
        metrics::counter!("omega_scheduler_attempts_conflicted_total").increment(conflicted);
        metrics::counter!("omega_scheduler_busy_microseconds_total").increment(out.busy.as_micros() as u64);
        metrics::counter!("omega_scheduler_commit_microseconds_total").increment(out.committing.as_micros() as u64);
    }

    /// For each job with tasks left pending: why, in its status (written only when the reason changes), and
    /// how long it waits before the next attempt (sooner if the cell gains room; never, while nothing about
    /// a job that can never be placed changes).
    async fn explain(&mut self, jobs: &[Arc<Job>], out: &Outcome) {
        let snapshot = self.cache.snapshot();
        let free_now = cell_free(&snapshot);
        let placed_by = self.placed_by();
        for job in jobs {
            let state = self.jobs.entry(job.id.clone()).or_default();
            state.attempts += 1;
            if out.conflicted.contains(&job.id) {
                state.conflicts += 1;
            }
            let left = out.pending.get(&job.id).map(Vec::len).unwrap_or(0);
            let leftover = match (out.permanent.get(&job.id), out.explanations.get(&job.id)) {
                (Some(why), _) => Leftover::Permanent(why.clone()),
                (None, _) if left == 0 => {
                    state.backoff = None;
                    continue;
                }
                (None, Some(e)) => Leftover::Unplaceable(e.clone()),
                (None, None) => Leftover::LostRaces,
            };
            let failures = state.backoff.as_ref().map(|b| b.failures + 1).unwrap_or(1);
            let wait = Duration::from_millis(500u64 << failures.min(5)).min(MAX_BACKOFF);
            state.backoff = Some(Backoff { until: Instant::now() + wait, failures, free_then: free_now });
            let (reason, reasons, pending) = match &leftover {
                Leftover::Unplaceable(e) => (e.to_string(), e.codes(), left),
                Leftover::LostRaces => ("lost placement races; retrying".to_string(), BTreeMap::new(), left),
                Leftover::Permanent(why) => {
                    let revision = snapshot.jobs.get(job.id.as_str()).map(|j| j.mod_revision).unwrap_or(0);
                    state.permanent = Some((revision, why.clone()));
                    tracing::warn!(job = job.id, reason = why, "job cannot be placed as it is; not retrying");
                    let pending = snapshot.pending_count(&job.id);
                    (format!("cannot be placed: {why}"), [("too_large".to_string(), 1)].into(), pending)
                }
            };
            let status = JobStatus {
                job: job.id.clone(),
                pending: pending as u32,
                reason,
                reasons,
                attempts: state.attempts,
                conflicts: state.conflicts,
                last_attempt_ms: 0,
                scheduler_instance: placed_by.clone(),
            };
            if let Err(e) = self.status.update(&self.store, status).await {
                tracing::warn!(job = job.id, error = %e, "writing job status failed");
            }
        }
    }
}

/// What one attempt's rounds did, for counting and explaining.
#[derive(Default)]
struct Outcome {
    /// Each job's tasks still pending.
    pending: BTreeMap<String, Vec<Versioned<Task>>>,
    explanations: HashMap<String, omega::placement::explain::Explanation>,
    /// Jobs any of whose claims conflicted (the paper's conflicted transactions).
    conflicted: HashSet<String>,
    /// Jobs that sent at least one claim (the paper's transactions).
    transactions: HashSet<String>,
    /// Jobs that can never be committed as they are, and why.
    permanent: HashMap<String, String>,
    busy: Duration,
    committing: Duration,
    claims: u64,
    claims_conflicted: u64,
    placed: u64,
}

/// The histogram of waits from submission to a job's first attempt. Its buckets reach ten minutes (the paper's
/// waits run to minutes; its SLO is 30 s), apart from the process's other histograms, which time milliseconds.
pub const FIRST_ATTEMPT_WAIT: &str = "omega_scheduler_job_wait_first_attempt_seconds";

/// The buckets of [`FIRST_ATTEMPT_WAIT`], in seconds.
pub const FIRST_ATTEMPT_WAIT_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// The jobs of the next attempt, from the ready queue (in its order, each with its pending task count), and
/// the kind of policy that decides them (`policy_kind` of each job). A job under the service policy goes alone;
/// under the batch policy, the run of jobs that starts at the head goes together, up to `batch_claims` pending
/// tasks (the head always goes, whatever its size), and ends at the first job under the service policy.
pub fn next_attempt(
    queue: Vec<(Arc<Job>, usize)>,
    policy_kind: impl Fn(&Job) -> JobKind,
    batch_claims: usize,
) -> (JobKind, Vec<Arc<Job>>) {
    let Some(kind) = queue.first().map(|(j, _)| policy_kind(j)) else { return (JobKind::Batch, Vec::new()) };
    let mut budget = batch_claims.max(1);
    let mut out = Vec::new();
    for (job, pending) in queue {
        let joins = match kind {
            JobKind::Service => out.is_empty(),
            JobKind::Batch => policy_kind(&job) == JobKind::Batch && (out.is_empty() || pending <= budget),
        };
        if !joins {
            break;
        }
        budget = budget.saturating_sub(pending);
        out.push(job);
    }
    (kind, out)
}

/// Where a scheduler's wall time goes besides deciding and committing (which have counters of their own):
/// what a throughput measurement needs to tell a scheduler that waits from one that works.
#[derive(Clone, Copy)]
enum Phase {
    /// Nothing ready to attempt: waiting for the cell to change.
    Idle,
    /// Waiting for the cache to show this scheduler's own commits before deciding again.
    CacheWait,
    /// Taking jobs this instance should own.
    ClaimJobs,
    /// Finding the owned jobs ready for an attempt, and finishing (giving up) those with nothing pending.
    ReadyJobs,
    /// Writing why a job's tasks are still pending.
    Status,
}

fn spent(phase: Phase, took: Duration) {
    let label = match phase {
        Phase::Idle => "idle",
        Phase::CacheWait => "cache_wait",
        Phase::ClaimJobs => "claim_jobs",
        Phase::ReadyJobs => "ready_jobs",
        Phase::Status => "status",
    };
    metrics::counter!("omega_scheduler_time_microseconds_total", "phase" => label).increment(took.as_micros() as u64);
}

/// The highest revision any commit of an attempt wrote.
fn view_max_revision(committed: &attempt::Committed) -> i64 {
    committed.iter().filter_map(|(_, r)| r.as_ref().ok()?.max_revision()).max().unwrap_or(0)
}

/// Free room over all schedulable nodes (what wakes backed-off jobs when it grows).
fn cell_free(snapshot: &CellSnapshot) -> Resources {
    snapshot.allocations.iter().filter(|(n, _)| snapshot.is_schedulable(n)).map(|(_, a)| a.value.free()).sum()
}

/// Pending tasks of every job addressed to this scheduler (owned or not).
fn queue_depth(snapshot: &CellSnapshot, scheduler: &str) -> usize {
    snapshot.jobs.values().filter(|j| j.value.scheduler == scheduler).map(|j| snapshot.pending_count(&j.value.id)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega::resources::Resources;

    fn queue(jobs: &[(&str, JobKind, usize)]) -> Vec<(Arc<Job>, usize)> {
        jobs.iter().map(|&(id, kind, n)| (Arc::new(Job::new(id, kind, n as u32, Resources::new(1, 1))), n)).collect()
    }

    fn ids(jobs: &[Arc<Job>]) -> Vec<&str> {
        jobs.iter().map(|j| j.id.as_str()).collect()
    }

    #[test]
    fn a_monolithic_queue_attempts_a_service_job_alone_and_a_run_of_batch_jobs_together() {
        use JobKind::{Batch, Service};
        let own_kind = |j: &Job| j.kind;
        let q = queue(&[("b1", Batch, 3), ("b2", Batch, 3), ("s1", Service, 2), ("b3", Batch, 1)]);
        let (kind, jobs) = next_attempt(q, own_kind, 100);
        assert_eq!((kind, ids(&jobs)), (Batch, vec!["b1", "b2"]), "the run ends at the service job");
        let q = queue(&[("s1", Service, 2), ("s2", Service, 2), ("b1", Batch, 1)]);
        let (kind, jobs) = next_attempt(q, own_kind, 100);
        assert_eq!((kind, ids(&jobs)), (Service, vec!["s1"]));
        let q = queue(&[("b1", Batch, 8), ("b2", Batch, 3), ("b3", Batch, 2)]);
        assert_eq!(ids(&next_attempt(q, own_kind, 4).1), ["b1"], "the head goes whatever its size; then the budget");
        let q = queue(&[("b1", Batch, 2), ("b2", Batch, 3), ("b3", Batch, 2)]);
        assert_eq!(ids(&next_attempt(q, own_kind, 4).1), ["b1"], "the run stops at the first job over the budget");
        assert!(next_attempt(Vec::new(), own_kind, 4).1.is_empty());
    }

    #[test]
    fn a_batch_or_service_scheduler_attempts_every_job_as_its_own_kind() {
        use JobKind::{Batch, Service};
        let q = || queue(&[("s1", Service, 2), ("b1", Batch, 1), ("s2", Service, 1)]);
        let (kind, jobs) = next_attempt(q(), |_| Batch, 100);
        assert_eq!((kind, ids(&jobs)), (Batch, vec!["s1", "b1", "s2"]), "the batch scheduler takes them all");
        let (kind, jobs) = next_attempt(q(), |_| Service, 100);
        assert_eq!((kind, ids(&jobs)), (Service, vec!["s1"]), "the service scheduler one at a time");
    }
}
