//! Command-line configuration of a scheduler process, and what it decides per attempt ([`Policy`]).

use clap::{Parser, ValueEnum};
use omega::commit::Detection;
use omega::model::{JobKind, SchedulerKind};
use omega::placement::PlacementOptions;
pub use omega::units::parse_duration;
use std::net::SocketAddr;
use std::time::Duration;

/// Which scheduler this process is: one of Omega's two, or the paper's monolithic baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Throughput: best-fit bin packing, many jobs per decision, large incremental commits.
    Batch,
    /// Placement quality: every feasible node scored for spread, anti-affinity and balance; preemption.
    Service,
    /// The paper's monolithic baseline: one scheduler for the jobs of both kinds in one queue, each job decided
    /// as its kind's scheduler would (a service job alone, consecutive batch jobs together).
    Monolithic,
}

impl Kind {
    /// What the instance record says it is.
    pub fn scheduler_kind(self) -> SchedulerKind {
        match self {
            Kind::Batch => SchedulerKind::Batch,
            Kind::Service => SchedulerKind::Service,
            Kind::Monolithic => SchedulerKind::Monolithic,
        }
    }
}

/// A flag given where it means nothing: refused rather than silently ignored, so an experiment never runs with a
/// setting its author believes is in force.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--{flag} is the decision time of service jobs in a monolithic scheduler (--kind monolithic); a {kind:?} \
         scheduler's decision time is --t-job and --t-task"
    )]
    ServiceTimeOutsideMonolithic { flag: &'static str, kind: Kind },
    #[error("--lock-name: {0}")]
    LockName(omega::Error),
}

/// How an attempt decides: where tasks go (placement options) and how long it thinks first (the Omega paper's
/// decision time, `t_job + t_task * tasks still unplaced`, per job of the attempt).
#[derive(Clone, Debug)]
pub struct Policy {
    pub options: PlacementOptions,
    pub t_job: Duration,
    pub t_task: Duration,
}

impl Policy {
    /// The decision time of an attempt over `jobs` jobs with `unplaced` pending tasks between them.
    pub fn decision_time(&self, jobs: usize, unplaced: usize) -> Duration {
        let times = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        self.t_job.saturating_mul(times(jobs)).saturating_add(self.t_task.saturating_mul(times(unplaced)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BatchFit {
    Best,
    First,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DetectionArg {
    Fine,
    Coarse,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "omega-scheduler",
    version,
    about = "An Omega scheduler: places the jobs addressed to it by committing claims optimistically to etcd",
    long_about = "An Omega scheduler process. It keeps a local copy of the cell (fed by an etcd watch), takes \
ownership of pending jobs whose `scheduler` is its name (sharing them with other instances of the same name), \
decides placements on its copy and commits them with compare-and-swap transactions. Run several instances, and \
several schedulers, side by side: there is no leader."
)]
pub struct Config {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "OMEGA_ETCD", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd: Vec<String>,
    /// Key prefix of the cell in etcd.
    #[arg(long, env = "OMEGA_PREFIX", default_value = omega::keys::DEFAULT_PREFIX)]
    pub prefix: String,
    #[command(flatten)]
    pub tls: omega::tls::TlsArgs,
    /// Which scheduler this is.
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// The scheduler name jobs address (their `scheduler:` field); default: the kind (`batch`, `service`).
    #[arg(long)]
    pub name: Option<String>,
    /// This instance's id (unique among instances of the same scheduler); default: host-pid.
    #[arg(long)]
    pub instance: Option<String>,
    /// Conflict detection: fine (a changed node conflicts only if the claim no longer fits) or coarse.
    #[arg(long, value_enum, default_value = "fine")]
    pub detection: DetectionArg,
    /// The etcd server's --max-txn-ops.
    #[arg(long, default_value_t = 128)]
    pub max_txn_ops: usize,
    /// Commit transactions in flight at once from this process.
    #[arg(long, default_value_t = 8)]
    pub max_in_flight: usize,
    /// Keep commit latency under this by shrinking the in-flight window below --max-in-flight while etcd is
    /// slow or overloaded (it grows back when answers are fast), so scheduling never starves node
    /// heartbeats; `0`: always --max-in-flight. The window is the metric `omega_commit_window`.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub commit_latency_target: Duration,
    /// TTL of this instance's lease: its job ownership lapses this long after it dies.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Extra decision time per job of an attempt (the Omega paper's t_job); in a monolithic scheduler, of
    /// batch jobs.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub t_job: Duration,
    /// Extra decision time per task still unplaced (the Omega paper's t_task); in a monolithic scheduler, of
    /// batch jobs.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub t_task: Duration,
    /// Monolithic only: t_job of service jobs (default: --t-job). Refused with the other kinds.
    #[arg(long, value_parser = parse_duration)]
    pub service_t_job: Option<Duration>,
    /// Monolithic only: t_task of service jobs (default: --t-task). Refused with the other kinds.
    #[arg(long, value_parser = parse_duration)]
    pub service_t_task: Option<Duration>,
    /// Pessimistic concurrency, the paper's other baseline: hold an etcd lock (shared with every `--lock`
    /// scheduler of the cell) around each attempt, so attempts never overlap and cannot conflict.
    #[arg(long)]
    pub lock: bool,
    /// The lock `--lock` takes (`<prefix>locks/<name>`): schedulers sharing a name exclude each other.
    #[arg(long, default_value = "cell")]
    pub lock_name: String,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9101).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Allow evicting lower-priority tasks (default: on for service jobs, off for batch jobs; given, it applies to
    /// both kinds of a monolithic scheduler).
    #[arg(long)]
    pub preemption: Option<bool>,
    /// How batch jobs are packed: best fit (the fullest node that fits) or randomized first fit (any node
    /// with room, from a random place in the cell: what the Omega paper's schedulers do, and what keeps
    /// several batch instances off each other's nodes).
    #[arg(long, value_enum, default_value = "best")]
    pub batch_fit: BatchFit,
    /// Batch: the most claims one decision (over several jobs) commits together.
    #[arg(long, default_value_t = 1024)]
    pub batch_claims: usize,
    /// Take an unowned job that hashes to another instance after it stayed unowned this long.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub steal_after: Duration,
    /// Re-placements of conflicted tasks within one attempt before backing off.
    #[arg(long, default_value_t = 5)]
    pub conflict_retries: u32,
    /// Seed of the random choices (for repeatable experiments).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl Config {
    pub fn scheduler_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.kind.scheduler_kind().default_name().to_string())
    }

    /// Refuses flags that mean nothing for this kind, and a lock name that cannot be a key segment.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kind != Kind::Monolithic {
            let kind = self.kind;
            if self.service_t_job.is_some() {
                return Err(ConfigError::ServiceTimeOutsideMonolithic { flag: "service-t-job", kind });
            }
            if self.service_t_task.is_some() {
                return Err(ConfigError::ServiceTimeOutsideMonolithic { flag: "service-t-task", kind });
            }
        }
        omega::keys::validate_name("lock", &self.lock_name).map_err(ConfigError::LockName)
    }

    /// Which policy an attempt at a job of kind `job` uses: the scheduler's own kind's (a batch or service
    /// scheduler decides every job it is sent alike), or in a monolithic scheduler the job's.
    pub fn policy_kind(&self, job: JobKind) -> JobKind {
        match self.kind {
            Kind::Batch => JobKind::Batch,
            Kind::Service => JobKind::Service,
            Kind::Monolithic => job,
        }
    }

    /// The placement options and decision time of attempts under policy `kind`.
    pub fn policy(&self, kind: JobKind) -> Policy {
        let mut options = match kind {
            JobKind::Batch => PlacementOptions::batch(),
            JobKind::Service => PlacementOptions::service(),
        };
        options.preemption = self.preemption.unwrap_or(kind == JobKind::Service);
        if kind == JobKind::Batch && self.batch_fit == BatchFit::First {
            options.strategy = omega::placement::Strategy::FirstFit;
        }
        let (t_job, t_task) = match (self.kind, kind) {
            (Kind::Monolithic, JobKind::Service) => {
                (self.service_t_job.unwrap_or(self.t_job), self.service_t_task.unwrap_or(self.t_task))
            }
            _ => (self.t_job, self.t_task),
        };
        Policy { options, t_job, t_task }
    }

    pub fn instance_id(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim().replace('.', "-"), std::process::id())
        })
    }

    pub fn detection(&self) -> Detection {
        match self.detection {
            DetectionArg::Fine => Detection::Fine,
            DetectionArg::Coarse => Detection::Coarse,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("40"), Ok(Duration::from_millis(40)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(["omega-scheduler"].iter().chain(args)).expect("flags parse")
    }

    #[test]
    fn a_monolithic_scheduler_decides_each_job_as_its_kind_would() {
        let c = parse(&["--kind", "monolithic", "--t-job", "1s", "--t-task", "10ms", "--service-t-job", "5s"]);
        c.validate().unwrap();
        assert_eq!(c.scheduler_name(), "monolithic");
        assert_eq!(
            (c.policy_kind(JobKind::Batch), c.policy_kind(JobKind::Service)),
            (JobKind::Batch, JobKind::Service)
        );
        let (batch, service) = (c.policy(JobKind::Batch), c.policy(JobKind::Service));
        assert_eq!((batch.t_job, batch.t_task), (Duration::from_secs(1), Duration::from_millis(10)));
        assert_eq!(
            (service.t_job, service.t_task),
            (Duration::from_secs(5), Duration::from_millis(10)),
            "t_task defaults"
        );
        assert_eq!(batch.options.strategy, omega::placement::Strategy::BinPack);
        assert_eq!(service.options.strategy, omega::placement::Strategy::Spread);
        assert!(!batch.options.preemption && service.options.preemption);
        assert_eq!(service.decision_time(1, 3), Duration::from_millis(5030));
        // --preemption given applies to both kinds.
        let c = parse(&["--kind", "monolithic", "--preemption", "false"]);
        assert!(!c.policy(JobKind::Service).options.preemption);
    }

    #[test]
    fn a_batch_or_service_scheduler_decides_every_job_alike_and_refuses_service_times() {
        let c = parse(&["--kind", "service", "--t-job", "2s"]);
        assert_eq!(c.policy_kind(JobKind::Batch), JobKind::Service, "a batch job sent to a service scheduler");
        assert_eq!(c.policy(JobKind::Service).t_job, Duration::from_secs(2));
        for kind in ["batch", "service"] {
            let e = parse(&["--kind", kind, "--service-t-job", "1s"]).validate().unwrap_err();
            assert!(e.to_string().contains("--kind monolithic"), "{e}");
            assert!(parse(&["--kind", kind, "--service-t-task", "1s"]).validate().is_err());
        }
        assert!(parse(&["--kind", "batch", "--lock", "--lock-name", "a/b"]).validate().is_err());
        assert_eq!(Kind::Monolithic.scheduler_kind().default_name(), "monolithic");
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }
}
