//! The seeded synthetic workload: long-running prefill, a backlog, and two Poisson streams of arriving jobs.
//!
//! Everything is drawn from one seeded generator before the run starts, so two runs with the same seed
//! submit the same jobs at the same offsets whatever the schedulers do.

use crate::cli::Range;
use crate::spec::{JobClass, RunSpec};
use omega::model::{Job, JobKind, RestartMode, RestartPolicy};
use omega::resources::Resources;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Prefill tasks per job: large jobs keep the prefill quick to submit and place.
const PREFILL_TASKS_PER_JOB: u32 = 200;
/// How long prefill work runs: longer than any run.
const PREFILL_RUNTIME: Duration = Duration::from_secs(24 * 3600);

/// Backlog jobs' ids start with this (results report the backlog on its own).
pub const BACKLOG_PREFIX: &str = "backlog-";

/// Which scheduler name each kind of job is addressed to.
#[derive(Clone, Debug)]
pub struct Addressees {
    pub batch: String,
    pub service: String,
}

/// A job and when (after the measurement starts) it is submitted.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub at: Duration,
    pub job: Job,
    /// A service runs until it is stopped (the controller replaces a replica that exits, as a Deployment
    /// would): the bench cancels it this long after submitting it, as its user would.
    pub lifetime: Option<Duration>,
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Long-running work placed (by the batch scheduler, which is fast) before measuring.
    pub prefill: Vec<Job>,
    /// Batch jobs written before the schedulers start.
    pub backlog: Vec<Job>,
    pub arrivals: Vec<Arrival>,
}

impl Plan {
    pub fn tasks(jobs: impl IntoIterator<Item = impl std::borrow::Borrow<Job>>) -> u64 {
        jobs.into_iter().map(|j| j.borrow().tasks as u64).sum()
    }
}

pub fn plan(spec: &RunSpec, to: &Addressees) -> Plan {
    let w = &spec.workload;
    let mut rng = StdRng::seed_from_u64(w.seed);
    let mut plan = Plan::default();

    let cell_cpu = spec.cell.nodes as u64 * spec.cell.node_cpu_millis;
    // Whole tasks per node, so the prefill fraction is what the nodes really hold.
    let per_node = spec.cell.node_cpu_millis / w.task_cpu_millis;
    let prefill_tasks = ((cell_cpu as f64 * spec.cell.prefill) / w.task_cpu_millis as f64) as u64;
    let prefill_tasks = prefill_tasks.min(per_node * spec.cell.nodes as u64);
    let mut left = prefill_tasks;
    let mut i = 0;
    while left > 0 {
        let n = left.min(PREFILL_TASKS_PER_JOB as u64) as u32;
        let mut job = job(&format!("prefill-{i:04}"), JobKind::Batch, n, w.task_cpu_millis, w.task_memory_bytes.min);
        job.scheduler = to.batch.clone();
        job.duration_ms = Some(PREFILL_RUNTIME.as_millis() as u64);
        plan.prefill.push(job);
        left -= n as u64;
        i += 1;
    }

    for i in 0..w.backlog_jobs {
        let memory = uniform(&mut rng, w.task_memory_bytes);
        let mut job =
            job(&format!("{BACKLOG_PREFIX}{i:04}"), JobKind::Batch, w.backlog_tasks, w.task_cpu_millis, memory);
        job.scheduler = to.batch.clone();
        job.gang = w.gang;
        job.duration_ms = Some(uniform_duration(&mut rng, w.batch.runtime).as_millis() as u64);
        plan.backlog.push(job);
    }

    for (kind, class, prefix, scheduler) in
        [(JobKind::Batch, &w.batch, "batch", &to.batch), (JobKind::Service, &w.service, "service", &to.service)]
    {
        let mut at = Duration::ZERO;
        let mut n = 0;
        while let Some(gap) = exponential(&mut rng, class) {
            at += gap;
            if at >= spec.duration {
                break;
            }
            let tasks = uniform(&mut rng, class.tasks.map(u64::from)) as u32;
            let memory = uniform(&mut rng, w.task_memory_bytes);
            let mut job = job(&format!("{prefix}-{n:05}"), kind, tasks, w.task_cpu_millis, memory);
            job.scheduler = scheduler.clone();
            job.gang = kind == JobKind::Batch && w.gang;
            let runtime = uniform_duration(&mut rng, class.runtime);
            let lifetime = match kind {
                JobKind::Batch => {
                    job.duration_ms = Some(runtime.as_millis() as u64);
                    None
                }
                JobKind::Service => Some(runtime),
            };
            plan.arrivals.push(Arrival { at, job, lifetime });
            n += 1;
        }
    }
    plan.arrivals.sort_by_key(|a| a.at);
    plan
}

/// A job whose tasks are not restarted in place: a batch task that ends is done.
fn job(id: &str, kind: JobKind, tasks: u32, cpu_millis: u64, memory_bytes: u64) -> Job {
    let mut job = Job::new(id, kind, tasks, Resources::new(cpu_millis, memory_bytes));
    job.restart = RestartPolicy { mode: RestartMode::Never, ..RestartPolicy::default() };
    job
}

fn exponential(rng: &mut StdRng, class: &JobClass) -> Option<Duration> {
    if class.interval.is_zero() {
        return None;
    }
    let u: f64 = rng.random();
    Some(class.interval.mul_f64(-(1.0 - u).ln()))
}

fn uniform(rng: &mut StdRng, r: Range<u64>) -> u64 {
    rng.random_range(r.min..=r.max)
}

fn uniform_duration(rng: &mut StdRng, r: Range<Duration>) -> Duration {
    let ms = Range { min: r.min.as_millis() as u64, max: r.max.as_millis() as u64 };
    Duration::from_millis(uniform(rng, ms))
}

impl<T: Copy> Range<T> {
    pub fn map<U>(self, f: impl Fn(T) -> U) -> Range<U> {
        Range { min: f(self.min), max: f(self.max) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Preset};
    use clap::Parser;

    fn smoke() -> RunSpec {
        let cli = Cli::parse_from(["omega-bench", "--preset", "smoke"]);
        assert_eq!(cli.preset, Preset::Smoke);
        crate::spec::runs(&cli).remove(0)
    }

    fn to() -> Addressees {
        Addressees { batch: "batch".into(), service: "service".into() }
    }

    #[test]
    fn the_same_seed_gives_the_same_jobs() {
        let spec = smoke();
        let (a, b) = (plan(&spec, &to()), plan(&spec, &to()));
        let ids = |p: &Plan| p.arrivals.iter().map(|a| (a.at, a.job.id.clone(), a.job.tasks)).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        assert!(!a.arrivals.is_empty());
        let mut other = spec.clone();
        other.workload.seed += 1;
        assert_ne!(ids(&a), ids(&plan(&other, &to())));
    }

    #[test]
    fn prefill_holds_the_asked_fraction_and_arrivals_stay_in_the_window() {
        let spec = smoke();
        let p = plan(&spec, &to());
        let cpu: u64 = p.prefill.iter().map(|j| j.tasks as u64 * j.resources.cpu_millis).sum();
        let cell = spec.cell.nodes as u64 * spec.cell.node_cpu_millis;
        assert_eq!(cpu, (cell as f64 * spec.cell.prefill) as u64);
        assert!(p.arrivals.iter().all(|a| a.at < spec.duration));
        assert!(p.arrivals.iter().any(|a| a.job.kind == JobKind::Service));
        assert!(p.arrivals.iter().all(|a| (5..=20).contains(&a.job.tasks) || a.job.kind == JobKind::Service));
        assert_eq!(p.backlog.len(), spec.workload.backlog_jobs);
    }
}
