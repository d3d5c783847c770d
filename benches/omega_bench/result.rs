//! What a run measured, in the paper's terms and ours, ready for the table, the files and the plots.

use crate::scrape::{Histogram, SchedulerCounters};
use crate::spec::RunSpec;
use serde::Serialize;

/// Mean and tail of a set of samples (seconds).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Spread {
    pub n: usize,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Spread {
    pub fn of(mut samples: Vec<f64>) -> Spread {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let at = |q: f64| (n > 0).then(|| samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1]);
        Spread {
            n,
            mean: (n > 0).then(|| samples.iter().sum::<f64>() / n as f64),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

impl Spread {
    /// From a histogram: the mean exact, the tails interpolated in its buckets.
    pub fn of_histogram(h: &Histogram) -> Spread {
        Spread {
            n: h.count as usize,
            mean: h.mean(),
            p50: h.quantile(0.5),
            p90: h.quantile(0.9),
            p99: h.quantile(0.99),
        }
    }
}

/// One scheduler process (or the sum over a scheduler's instances) over the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct SchedulerResult {
    /// The scheduler's name (`batch`, `service`, `monolithic`); `instance` is `*` for the sum of instances.
    pub scheduler: String,
    pub instance: String,
    pub counters: SchedulerCounters,
    /// The paper's conflict fraction: conflicted transactions / successful transactions (may exceed 1).
    pub conflict_fraction: Option<f64>,
    /// Conflicted claims / claims sent.
    pub task_conflict_fraction: Option<f64>,
    /// Attempts per job this scheduler placed or tried (1.0 = every job in one attempt).
    pub attempts_per_job: Option<f64>,
    /// Decision time (useful + wasted) / wall time; commit time and lock waits beside it.
    pub busyness: f64,
    pub commit_share: f64,
    pub lock_wait_share: f64,
    /// The rest of the wall time: nothing ready, waiting for the cache, bookkeeping.
    pub idle_share: f64,
    pub cache_wait_share: f64,
    pub bookkeeping_share: f64,
    pub commit_latency_p50_ms: Option<f64>,
    pub commit_latency_p99_ms: Option<f64>,
    pub claims_per_txn: Option<f64>,
    /// Submit -> first attempt (mean exact, tails from the histogram's buckets).
    pub wait_first_attempt: Spread,
}

impl SchedulerResult {
    pub fn new(scheduler: &str, instance: &str, c: SchedulerCounters, window_secs: f64, jobs: usize) -> Self {
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        let (conflicted, transactions) = (c.transactions_conflicted as u64, c.transactions as u64);
        let wait_first_attempt = Spread::of_histogram(&c.first_attempt_wait);
        SchedulerResult {
            scheduler: scheduler.to_string(),
            instance: instance.to_string(),
            // Every transaction conflicted: the paper's ratio is unbounded, shown as such rather than missing.
            conflict_fraction: omega::model::conflict_fraction(conflicted, transactions)
                .or((conflicted > 0).then_some(f64::INFINITY)),
            task_conflict_fraction: ratio(c.claims_conflicted, c.claims()),
            attempts_per_job: ratio(c.attempts, jobs as f64),
            busyness: c.busy_secs / window_secs,
            commit_share: c.commit_secs / window_secs,
            lock_wait_share: c.lock_wait_secs / window_secs,
            idle_share: c.idle_secs / window_secs,
            cache_wait_share: c.cache_wait_secs / window_secs,
            bookkeeping_share: c.bookkeeping_secs / window_secs,
            commit_latency_p50_ms: c.commit_txn.quantile(0.5).map(|s| s * 1e3),
            commit_latency_p99_ms: c.commit_txn.quantile(0.99).map(|s| s * 1e3),
            claims_per_txn: ratio(c.claims(), c.commit_txn.count),
            wait_first_attempt,
            counters: c,
        }
    }
}

/// A consistency check and whether it held.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub spec: RunSpec,
    /// From the first measured submission (or the schedulers' start, for a backlog) to the end of the run.
    pub window_secs: f64,
    pub jobs_submitted: usize,
    pub tasks_submitted: u64,
    /// Tasks per second while writing the backlog or prefill (etcd speed), if there was one.
    pub submission_tasks_per_sec: Option<f64>,
    /// How late an arrival's submission started, at worst.
    pub submission_max_lag_secs: f64,
    pub tasks_placed: u64,
    pub tasks_unplaced: u64,
    /// Placed tasks / window, the best one-second window, and the rate per second over the run.
    pub placement_rate: f64,
    pub placement_rate_best_second: f64,
    pub placement_series: Vec<u64>,
    /// A backlog (written before the schedulers start): its tasks, the time from the schedulers' start until
    /// its last task was placed, and the rate that makes (what the throughput preset is about).
    pub backlog_tasks: u64,
    pub backlog_secs: Option<f64>,
    pub backlog_rate: Option<f64>,
    /// Submit -> all of a job's tasks placed, per job kind.
    pub wait_all_placed_batch: Spread,
    pub wait_all_placed_service: Spread,
    /// Per instance, then the sum per scheduler.
    pub instances: Vec<SchedulerResult>,
    pub schedulers: Vec<SchedulerResult>,
    /// etcd's CPU in the window, in cores (1.0 = one core busy all the time), and ours.
    pub etcd_cpu_cores: Option<f64>,
    pub scheduler_cpu_cores: Option<f64>,
    pub agent_cpu_cores: Option<f64>,
    pub controller_cpu_cores: Option<f64>,
    /// etcd's raw ceiling for the claim shape, measured after the run on the same etcd.
    pub raw_ceiling_claims_per_sec: Option<f64>,
    pub raw_ceiling_latency_p99_ms: Option<f64>,
    /// Placement rate (the backlog's, when there is one) / raw ceiling; the best second's too.
    pub ceiling_ratio: Option<f64>,
    pub ceiling_ratio_best_second: Option<f64>,
    /// The cell's health over the run (etcd's database size, live nodes, lapsed leases), sampled every 5 s.
    pub health: Option<crate::health::Health>,
    pub health_samples: Vec<crate::health::Sample>,
    /// Keep-alive failures and lapsed leases the simulated nodes' host logged.
    pub lease_renewal_failures: u64,
    pub leases_lost: u64,
    pub checks: Vec<Check>,
}

impl RunResult {
    pub fn failed_checks(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }

    /// The sum over instances of the scheduler named `name`.
    pub fn scheduler(&self, name: &str) -> Option<&SchedulerResult> {
        self.schedulers.iter().find(|s| s.scheduler == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Spread::of((1..=100).map(f64::from).collect());
        assert_eq!((s.n, s.mean, s.p50, s.p90, s.p99), (100, Some(50.5), Some(50.0), Some(90.0), Some(99.0)));
        let one = Spread::of(vec![3.0]);
        assert_eq!((one.p50, one.p99), (Some(3.0), Some(3.0)));
        assert_eq!(Spread::of(vec![]).mean, None);
    }

    #[test]
    fn the_papers_conflict_fraction_can_exceed_one() {
        let c = SchedulerCounters {
            transactions: 30.0,
            transactions_conflicted: 20.0,
            placed: 90.0,
            claims_conflicted: 10.0,
            ..Default::default()
        };
        let r = SchedulerResult::new("service", "s0", c, 10.0, 10);
        assert_eq!(r.conflict_fraction, Some(2.0));
        assert_eq!(r.task_conflict_fraction, Some(0.1));
        let none = SchedulerResult::new("batch", "b0", SchedulerCounters::default(), 10.0, 0);
        assert_eq!(none.conflict_fraction, None);
    }
}
