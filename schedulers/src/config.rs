//! Command-line configuration of a scheduler process.

use clap::{Parser, ValueEnum};
use omega::commit::Detection;
use omega::model::JobKind;
pub use omega::units::parse_duration;
use std::net::SocketAddr;
use std::time::Duration;

/// Which of Omega's two schedulers this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Throughput: best-fit bin packing, many jobs per decision, large incremental commits.
    Batch,
    /// Placement quality: every feasible node scored for spread, anti-affinity and balance; preemption.
    Service,
}

impl Kind {
    pub fn job_kind(self) -> JobKind {
        match self {
            Kind::Batch => JobKind::Batch,
            Kind::Service => JobKind::Service,
        }
    }
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
    /// TTL of this instance's lease: its job ownership lapses this long after it dies.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Extra decision time per attempt (the Omega paper's t_job).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub t_job: Duration,
    /// Extra decision time per task still unplaced (the Omega paper's t_task).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub t_task: Duration,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9101).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Allow evicting lower-priority tasks (default: on for service, off for batch).
    #[arg(long)]
    pub preemption: Option<bool>,
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
        self.name.clone().unwrap_or_else(|| self.kind.job_kind().default_scheduler().to_string())
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

    pub fn preemption(&self) -> bool {
        self.preemption.unwrap_or(self.kind == Kind::Service)
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

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }
}
