//! The command line: a preset names the experiment, every workload and cell parameter can be overridden.
//!
//! Defaults come from the Omega paper (EuroSys 2013) and its public simulator: machines of 4 cpu and
//! 16 GiB, tasks of 1 cpu and 1.5-2 GiB, batch jobs of ~100 short tasks arriving every few seconds, service
//! jobs of 10-100 longer tasks, 60% of the cell pre-filled with long-running work. The arrival rates are
//! compressed (a real run lasts minutes, not simulated days), so a preset sets them to load the cell.

use clap::{Parser, ValueEnum};
use omega::units::{parse_cpu, parse_duration, parse_memory};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Conflict fraction and busyness vs the service scheduler's decision time t_job (the paper's figure).
    TjobSweep,
    /// 1, 2, 4, 8, 16 batch schedulers at a fixed heavy batch load.
    ScaleBatch,
    /// Coarse vs fine conflict detection x incremental vs gang commits, on one workload.
    Modes,
    /// Omega beside a monolithic scheduler and a pessimistic (etcd-lock) one, on one workload.
    Baselines,
    /// The largest cell this machine holds, 3 batch + 1 service schedulers, as fast as it goes.
    Throughput,
    /// The same machinery in well under a minute, with its consistency checks (for CI).
    Smoke,
    /// Ten minutes at full rate on etcd's default 2 GiB quota, the controller collecting finished jobs and
    /// compacting: placements/s, etcd's database size, lease lapses and nodes marked down over time.
    Soak,
    /// Six schedulers on one workload, straight to etcd and through `etcd grpc-proxy`, side by side.
    Proxy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectionArg {
    Fine,
    Coarse,
}

impl DetectionArg {
    pub fn flag(self) -> &'static str {
        match self {
            DetectionArg::Fine => "fine",
            DetectionArg::Coarse => "coarse",
        }
    }
}

/// A `MIN..MAX` range (or one value), of durations or quantities.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Range<T> {
    pub min: T,
    pub max: T,
}

fn range<T: Copy + PartialOrd>(s: &str, one: impl Fn(&str) -> Result<T, String>) -> Result<Range<T>, String> {
    let (a, b) = s.split_once("..").unwrap_or((s, s));
    let (min, max) = (one(a.trim())?, one(b.trim())?);
    if min > max {
        return Err(format!("range {s:?} has its minimum above its maximum"));
    }
    Ok(Range { min, max })
}

fn duration_range(s: &str) -> Result<Range<Duration>, String> {
    range(s, parse_duration)
}

fn memory_range(s: &str) -> Result<Range<u64>, String> {
    range(s, parse_memory)
}

fn count_range(s: &str) -> Result<Range<u32>, String> {
    range(s, |v| {
        v.parse::<u32>().map_err(|e| format!("{v:?}: {e}")).and_then(|n| match n {
            0 => Err("task counts start at 1".to_string()),
            n => Ok(n),
        })
    })
}

fn fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(0.0..=0.95).contains(&f) {
        return Err(format!("{f} is outside 0 .. 0.95"));
    }
    Ok(f)
}

fn members(s: &str) -> Result<usize, String> {
    match s {
        "1" => Ok(1),
        "3" => Ok(3),
        _ => Err(format!("{s:?}: etcd runs as 1 or 3 members")),
    }
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "omega-bench",
    version,
    about = "Reruns the Omega paper's experiments on a real cell: etcd, scheduler processes, simulated nodes, the controller",
    long_about = "Starts etcd (one member or three on loopback), simulated nodes, the controller and the chosen \
scheduler processes, drives a seeded synthetic workload and reports, per scheduler and in total: the paper's \
conflict fraction (conflicted transactions / successful ones) beside the task-level one, placement throughput, \
job wait times, scheduler busyness and commit latency, and etcd's raw ceiling for the same write shape measured \
in the same run. Writes a table to stdout, and results.json, results.csv, table.md and SVG plots to --out. \
Every parameter below overrides the preset's value; unset ones take the preset's."
)]
pub struct Cli {
    /// The experiment.
    #[arg(long, value_enum, default_value = "smoke")]
    pub preset: Preset,
    /// Where results, plots and process logs go (default: target/omega-bench/<preset>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where omega-scheduler, omega-agent and omega-controller are (default: beside this binary).
    #[arg(long, env = "OMEGA_BENCH_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// etcd members for each run: `1`, `3`, or both (`1,3`), each run repeated per value.
    #[arg(long, value_delimiter = ',', value_parser = members)]
    pub members: Option<Vec<usize>>,
    /// Seed of the workload and of every scheduler's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Measured seconds per run (arrivals stop then; the run drains until its work is placed).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Longest wait, after arrivals stop, for the submitted work to be placed.
    #[arg(long, value_parser = parse_duration)]
    pub drain: Option<Duration>,

    // The cell.
    /// Simulated nodes.
    #[arg(long)]
    pub nodes: Option<usize>,
    /// CPU per node, e.g. 4 or 3500m.
    #[arg(long, value_parser = parse_cpu)]
    pub node_cpu: Option<u64>,
    /// Memory per node, e.g. 16Gi.
    #[arg(long, value_parser = parse_memory)]
    pub node_memory: Option<u64>,
    /// Fraction of the cell's cpu pre-filled with long-running work before measuring.
    #[arg(long, value_parser = fraction)]
    pub prefill: Option<f64>,
    /// etcd's --max-txn-ops (the schedulers are told the same).
    #[arg(long)]
    pub max_txn_ops: Option<usize>,
    /// The schedulers and the controller reach etcd through `etcd grpc-proxy` (the simulated nodes go direct).
    #[arg(long)]
    pub proxy: bool,

    // The workload.
    /// Mean time between batch job arrivals (exponential); 0 = none.
    #[arg(long, value_parser = parse_duration)]
    pub batch_interval: Option<Duration>,
    /// Tasks per batch job, MIN..MAX.
    #[arg(long, value_parser = count_range)]
    pub batch_tasks: Option<Range<u32>>,
    /// How long a batch task runs, MIN..MAX.
    #[arg(long, value_parser = duration_range)]
    pub batch_runtime: Option<Range<Duration>>,
    /// Mean time between service job arrivals (exponential); 0 = none.
    #[arg(long, value_parser = parse_duration)]
    pub service_interval: Option<Duration>,
    /// Tasks per service job, MIN..MAX.
    #[arg(long, value_parser = count_range)]
    pub service_tasks: Option<Range<u32>>,
    /// How long a service task runs, MIN..MAX.
    #[arg(long, value_parser = duration_range)]
    pub service_runtime: Option<Range<Duration>>,
    /// CPU per task, e.g. 1 or 500m.
    #[arg(long, value_parser = parse_cpu)]
    pub task_cpu: Option<u64>,
    /// Memory per task, MIN..MAX.
    #[arg(long, value_parser = memory_range)]
    pub task_memory: Option<Range<u64>>,
    /// Batch jobs submitted before the schedulers start (a backlog placed as fast as it goes).
    #[arg(long)]
    pub backlog_jobs: Option<usize>,
    /// Tasks per backlog job.
    #[arg(long)]
    pub backlog_tasks: Option<u32>,

    // The schedulers.
    /// Batch scheduler processes, one value per run (e.g. `1,2,4`).
    #[arg(long, value_delimiter = ',')]
    pub batch_schedulers: Option<Vec<usize>>,
    /// Service scheduler processes.
    #[arg(long)]
    pub service_schedulers: Option<usize>,
    /// The service scheduler's decision time per job, one value per run (e.g. `0.1s,1s,10s`).
    #[arg(long, value_delimiter = ',', value_parser = parse_duration)]
    pub t_job: Option<Vec<Duration>>,
    /// The batch scheduler's decision time per job.
    #[arg(long, value_parser = parse_duration)]
    pub batch_t_job: Option<Duration>,
    /// Decision time per unplaced task (both schedulers).
    #[arg(long, value_parser = parse_duration)]
    pub t_task: Option<Duration>,
    /// Conflict detection.
    #[arg(long, value_enum)]
    pub detection: Option<DetectionArg>,
    /// Batch jobs are gangs (all-or-nothing commits).
    #[arg(long)]
    pub gang: Option<bool>,
    /// An extra flag for every scheduler process, e.g. `--scheduler-arg=--batch-claims=4096` (repeatable).
    #[arg(long = "scheduler-arg", allow_hyphen_values = true)]
    pub scheduler_args: Vec<String>,
    /// Skip the raw-ceiling measurement.
    #[arg(long)]
    pub no_raw_ceiling: bool,
    /// Seconds the raw-ceiling measurement runs.
    #[arg(long, value_parser = parse_duration)]
    pub raw_duration: Option<Duration>,
}
