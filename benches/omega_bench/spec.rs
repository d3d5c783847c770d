//! What one run is (the cell, the workload, the schedulers), and how each preset expands into runs.

use crate::cli::{Cli, DetectionArg, Preset, Range};
use serde::Serialize;
use std::time::Duration;

const GI: u64 = 1 << 30;

/// The cell a run builds: simulated nodes on etcd.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub nodes: usize,
    pub node_cpu_millis: u64,
    pub node_memory_bytes: u64,
    /// Fraction of the cell's cpu held by long-running work before the measurement starts.
    pub prefill: f64,
    pub max_txn_ops: usize,
    /// etcd members (1, or 3 on loopback).
    pub members: usize,
    /// etcd's `--quota-backend-bytes` (`None`: etcd's default, 2 GiB).
    pub etcd_quota_bytes: Option<u64>,
    /// etcd compacts itself, keeping this many revisions (`None`: only the controller compacts).
    pub etcd_auto_compaction: Option<u64>,
    /// The schedulers and the controller reach etcd through `etcd grpc-proxy`.
    pub proxy: bool,
    /// Extra flags for the controller.
    pub controller_args: Vec<String>,
}

/// One kind of arriving job.
#[derive(Clone, Debug, Serialize)]
pub struct JobClass {
    /// Mean time between arrivals (exponential); zero means none arrive.
    #[serde(with = "secs")]
    pub interval: Duration,
    pub tasks: Range<u32>,
    #[serde(with = "secs_range")]
    pub runtime: Range<Duration>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub batch: JobClass,
    pub service: JobClass,
    pub task_cpu_millis: u64,
    pub task_memory_bytes: Range<u64>,
    /// Batch jobs written before any scheduler starts, and their size.
    pub backlog_jobs: usize,
    pub backlog_tasks: u32,
    /// Batch jobs are gangs (placed all-or-nothing).
    pub gang: bool,
    pub seed: u64,
}

/// How the placement work is split between scheduler processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Omega: batch and service schedulers side by side, optimistic commits.
    Omega,
    /// One scheduler process places every job (the paper's monolithic baseline).
    Monolithic,
    /// Omega's processes, but each attempt runs under one etcd lock (pessimistic concurrency).
    Pessimistic,
}

#[derive(Clone, Debug, Serialize)]
pub struct Schedulers {
    pub architecture: Architecture,
    pub batch: usize,
    pub service: usize,
    #[serde(with = "secs")]
    pub batch_t_job: Duration,
    #[serde(with = "secs")]
    pub service_t_job: Duration,
    #[serde(with = "secs")]
    pub t_task: Duration,
    pub detection: DetectionArg,
    /// Extra flags passed to every scheduler process as they are.
    pub extra_args: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSpec {
    /// What distinguishes this run within its preset (e.g. `t_job=10s`).
    pub label: String,
    /// The swept value, for plots (t_job in seconds, scheduler count, ...).
    pub x: f64,
    pub cell: Cell,
    pub workload: Workload,
    pub schedulers: Schedulers,
    /// Arrivals stop after this; the run then drains for at most `drain`.
    #[serde(with = "secs")]
    pub duration: Duration,
    #[serde(with = "secs")]
    pub drain: Duration,
    /// How long the raw-ceiling measurement runs, if at all.
    #[serde(with = "opt_secs")]
    pub raw_ceiling: Option<Duration>,
}

/// The preset's defaults before the command line overrides them.
fn base(preset: Preset) -> RunSpec {
    let mut spec = RunSpec {
        label: String::new(),
        x: 0.0,
        cell: Cell {
            nodes: 1000,
            node_cpu_millis: 4000,
            node_memory_bytes: 16 * GI,
            prefill: 0.6,
            max_txn_ops: 1024,
            members: 1,
            // Room for a run's history without depending on the controller's compaction (the soak tests that).
            etcd_quota_bytes: Some(8 << 30),
            etcd_auto_compaction: Some(200_000),
            proxy: false,
            controller_args: Vec::new(),
        },
        workload: Workload {
            batch: JobClass {
                interval: Duration::from_secs(1),
                tasks: Range { min: 10, max: 100 },
                runtime: Range { min: Duration::from_secs(5), max: Duration::from_secs(30) },
            },
            service: JobClass {
                interval: Duration::from_secs(10),
                tasks: Range { min: 10, max: 50 },
                runtime: Range { min: Duration::from_secs(30), max: Duration::from_secs(120) },
            },
            task_cpu_millis: 1000,
            task_memory_bytes: Range { min: 3 * GI / 2, max: 2 * GI },
            backlog_jobs: 0,
            backlog_tasks: 0,
            gang: false,
            seed: 1,
        },
        schedulers: Schedulers {
            architecture: Architecture::Omega,
            batch: 1,
            service: 1,
            batch_t_job: Duration::from_millis(100),
            service_t_job: Duration::from_millis(100),
            t_task: Duration::from_millis(5),
            detection: DetectionArg::Fine,
            extra_args: Vec::new(),
        },
        duration: Duration::from_secs(60),
        drain: Duration::from_secs(120),
        raw_ceiling: Some(Duration::from_secs(5)),
    };
    match preset {
        Preset::TjobSweep => {
            // The paper's simulator's cell and synthetic workload (notes/omega-paper.md): 10,000 machines of
            // 4 cpu / 16 GB, 60% pre-filled; a batch job every ~6.5 s with ~100 tasks of 10-100 s; a service
            // job every ~12.5 s with 10-100 tasks of 10-500 s. Sparse arrivals: five minutes per point.
            spec.cell.nodes = 10_000;
            spec.workload.batch = JobClass {
                interval: Duration::from_millis(6500),
                tasks: Range { min: 50, max: 150 },
                runtime: Range { min: Duration::from_secs(10), max: Duration::from_secs(100) },
            };
            spec.workload.service = JobClass {
                interval: Duration::from_millis(12_500),
                tasks: Range { min: 10, max: 100 },
                runtime: Range { min: Duration::from_secs(10), max: Duration::from_secs(500) },
            };
            spec.duration = Duration::from_secs(300);
        }
        Preset::Modes => {}
        Preset::Baselines => spec.schedulers.service_t_job = Duration::from_secs(1),
        Preset::ScaleBatch => {
            spec.cell.nodes = 2000;
            spec.workload.batch.interval = Duration::from_millis(250);
            spec.workload.batch.runtime = Range { min: Duration::from_secs(5), max: Duration::from_secs(20) };
        }
        Preset::Throughput => {
            spec.cell.nodes = 10_000;
            spec.cell.node_cpu_millis = 16_000;
            spec.cell.node_memory_bytes = 64 * GI;
            spec.cell.prefill = 0.0;
            spec.workload.batch.interval = Duration::ZERO;
            spec.workload.service.interval = Duration::from_secs(2);
            spec.workload.service.runtime = Range { min: Duration::from_secs(600), max: Duration::from_secs(600) };
            spec.workload.backlog_jobs = 100;
            spec.workload.backlog_tasks = 1000;
            spec.schedulers.batch = 3;
            spec.schedulers.batch_t_job = Duration::ZERO;
            spec.schedulers.service_t_job = Duration::ZERO;
            spec.schedulers.t_task = Duration::ZERO;
            spec.duration = Duration::from_secs(30);
            spec.drain = Duration::from_secs(300);
            spec.raw_ceiling = Some(Duration::from_secs(10));
        }
        Preset::Soak | Preset::Proxy => {
            spec.cell.nodes = 10_000;
            spec.cell.node_cpu_millis = 16_000;
            spec.cell.node_memory_bytes = 64 * GI;
            spec.cell.prefill = 0.0;
            // etcd as shipped: its default quota, no compaction of its own; finished jobs are collected a
            // minute after they end.
            spec.cell.etcd_quota_bytes = None;
            spec.cell.etcd_auto_compaction = None;
            spec.cell.controller_args = vec!["--gc-after=1m".into()];
            // ~3,000 tasks/s offered, about what this 2-core machine sustains once every placed task also
            // starts, ends and is collected (6,000/s built a backlog that grew without bound); tasks run
            // 5-30 s: ~50,000 running, a third of the cell's cpu.
            spec.workload.batch = JobClass {
                interval: Duration::from_millis(200),
                tasks: Range { min: 200, max: 1000 },
                runtime: Range { min: Duration::from_secs(5), max: Duration::from_secs(30) },
            };
            spec.workload.service = JobClass {
                interval: Duration::from_secs(10),
                tasks: Range { min: 10, max: 50 },
                runtime: Range { min: Duration::from_secs(60), max: Duration::from_secs(120) },
            };
            spec.workload.task_memory_bytes = Range { min: GI, max: 2 * GI };
            spec.schedulers.batch = 3;
            spec.schedulers.batch_t_job = Duration::ZERO;
            spec.schedulers.service_t_job = Duration::ZERO;
            spec.schedulers.t_task = Duration::ZERO;
            spec.duration = Duration::from_secs(600);
            spec.drain = Duration::from_secs(120);
            spec.raw_ceiling = None;
            if preset == Preset::Proxy {
                spec.schedulers.batch = 5;
                spec.duration = Duration::from_secs(120);
            }
        }
        Preset::Smoke => {
            spec.cell.nodes = 100;
            spec.cell.prefill = 0.3;
            spec.workload.batch = JobClass {
                interval: Duration::from_millis(400),
                tasks: Range { min: 5, max: 20 },
                runtime: Range { min: Duration::from_secs(2), max: Duration::from_secs(5) },
            };
            spec.workload.service = JobClass {
                interval: Duration::from_secs(2),
                tasks: Range { min: 2, max: 6 },
                runtime: Range { min: Duration::from_secs(5), max: Duration::from_secs(10) },
            };
            spec.duration = Duration::from_secs(8);
            spec.drain = Duration::from_secs(60);
            spec.raw_ceiling = Some(Duration::from_secs(1));
        }
    }
    spec
}

/// The runs a preset makes, with the command line's overrides applied.
pub fn runs(cli: &Cli) -> Vec<RunSpec> {
    let mut spec = base(cli.preset);
    apply_overrides(cli, &mut spec);
    let mut variants: Vec<RunSpec> = Vec::new();
    let t_jobs = cli.t_job.clone().unwrap_or_else(|| match cli.preset {
        Preset::TjobSweep => vec![Duration::from_millis(100), Duration::from_secs(1), Duration::from_secs(10)],
        _ => vec![spec.schedulers.service_t_job],
    });
    let batch_counts = cli.batch_schedulers.clone().unwrap_or_else(|| match cli.preset {
        Preset::ScaleBatch => vec![1, 2, 4, 8, 16],
        _ => vec![spec.schedulers.batch],
    });
    match cli.preset {
        Preset::Smoke => {
            // Both ways a run can start: arrivals on a pre-filled cell, and a backlog on an empty one.
            let mut arrivals = spec.clone();
            arrivals.label = "smoke/arrivals".into();
            variants.push(arrivals);
            let mut backlog = spec.clone();
            backlog.label = "smoke/backlog".into();
            backlog.cell.prefill = 0.0;
            backlog.workload.backlog_jobs = cli.backlog_jobs.unwrap_or(4);
            backlog.workload.backlog_tasks = cli.backlog_tasks.unwrap_or(50);
            variants.push(backlog);
        }
        Preset::Proxy => {
            for proxy in [false, true] {
                let mut s = spec.clone();
                s.cell.proxy = proxy;
                s.label = if proxy { "through grpc-proxy".into() } else { "direct".into() };
                s.x = f64::from(u8::from(proxy));
                variants.push(s);
            }
        }
        Preset::Modes => {
            for detection in [DetectionArg::Fine, DetectionArg::Coarse] {
                for gang in [false, true] {
                    let mut s = spec.clone();
                    s.schedulers.detection = detection;
                    s.workload.gang = gang;
                    s.label = format!("{}/{}", detection.flag(), if gang { "gang" } else { "incremental" });
                    variants.push(s);
                }
            }
        }
        Preset::Baselines => {
            for architecture in [Architecture::Omega, Architecture::Monolithic, Architecture::Pessimistic] {
                let mut s = spec.clone();
                s.schedulers.architecture = architecture;
                s.label = format!("{architecture:?}").to_lowercase();
                variants.push(s);
            }
        }
        _ => {
            for &t_job in &t_jobs {
                for &batch in &batch_counts {
                    let mut s = spec.clone();
                    s.schedulers.service_t_job = t_job;
                    s.schedulers.batch = batch;
                    if cli.preset == Preset::TjobSweep && cli.duration.is_none() {
                        // Enough attempts at the slowest decision time to measure anything.
                        s.duration = s.duration.max(t_job * 6);
                    }
                    s.label = match cli.preset {
                        Preset::ScaleBatch => format!("batch x{batch}"),
                        _ if t_jobs.len() > 1 => format!("t_job={}", secs_label(t_job)),
                        _ if batch_counts.len() > 1 => format!("batch x{batch}"),
                        _ => format!("{:?}", cli.preset).to_lowercase(),
                    };
                    s.x = if batch_counts.len() > 1 { batch as f64 } else { t_job.as_secs_f64() };
                    variants.push(s);
                }
            }
        }
    }
    let members = cli.members.clone().unwrap_or_else(|| vec![spec.cell.members]);
    let mut out = Vec::new();
    for s in variants {
        for &m in &members {
            let mut s = s.clone();
            s.cell.members = m;
            if members.len() > 1 {
                s.label = format!("{} etcd x{m}", s.label);
            }
            out.push(s);
        }
    }
    out
}

fn apply_overrides(cli: &Cli, s: &mut RunSpec) {
    fn set<T: Clone>(to: &mut T, from: &Option<T>) {
        if let Some(v) = from {
            *to = v.clone();
        }
    }
    s.workload.seed = cli.seed;
    set(&mut s.duration, &cli.duration);
    set(&mut s.drain, &cli.drain);
    set(&mut s.cell.nodes, &cli.nodes);
    set(&mut s.cell.node_cpu_millis, &cli.node_cpu);
    set(&mut s.cell.node_memory_bytes, &cli.node_memory);
    set(&mut s.cell.prefill, &cli.prefill);
    set(&mut s.cell.max_txn_ops, &cli.max_txn_ops);
    s.cell.proxy |= cli.proxy;
    set(&mut s.workload.batch.interval, &cli.batch_interval);
    set(&mut s.workload.batch.tasks, &cli.batch_tasks);
    set(&mut s.workload.batch.runtime, &cli.batch_runtime);
    set(&mut s.workload.service.interval, &cli.service_interval);
    set(&mut s.workload.service.tasks, &cli.service_tasks);
    set(&mut s.workload.service.runtime, &cli.service_runtime);
    set(&mut s.workload.task_cpu_millis, &cli.task_cpu);
    set(&mut s.workload.task_memory_bytes, &cli.task_memory);
    set(&mut s.workload.backlog_jobs, &cli.backlog_jobs);
    set(&mut s.workload.backlog_tasks, &cli.backlog_tasks);
    set(&mut s.workload.gang, &cli.gang);
    set(&mut s.schedulers.service, &cli.service_schedulers);
    set(&mut s.schedulers.batch_t_job, &cli.batch_t_job);
    set(&mut s.schedulers.t_task, &cli.t_task);
    set(&mut s.schedulers.detection, &cli.detection);
    s.schedulers.extra_args = cli.scheduler_args.clone();
    if cli.no_raw_ceiling {
        s.raw_ceiling = None;
    } else if let Some(d) = cli.raw_duration {
        s.raw_ceiling = Some(d);
    }
}

/// `0.1s`, `10s`, `2m`: how a duration reads in a label.
pub fn secs_label(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 && s % 60.0 == 0.0 {
        format!("{}m", s / 60.0)
    } else {
        format!("{s}s")
    }
}

/// Checks that a run can be built at all, so a bad combination fails before anything starts.
pub fn validate(s: &RunSpec) -> Result<(), String> {
    let c = &s.cell;
    let w = &s.workload;
    if c.nodes == 0 {
        return Err("a cell needs at least one node".into());
    }
    if w.task_cpu_millis == 0 || w.task_cpu_millis > c.node_cpu_millis {
        return Err(format!(
            "a task's cpu ({}m) must be above 0 and fit a node ({}m)",
            w.task_cpu_millis, c.node_cpu_millis
        ));
    }
    if w.task_memory_bytes.max > c.node_memory_bytes {
        return Err("a task's memory must fit a node".into());
    }
    if s.schedulers.architecture == Architecture::Omega || s.schedulers.architecture == Architecture::Pessimistic {
        if s.schedulers.batch == 0 && (w.batch.interval > Duration::ZERO || w.backlog_jobs > 0 || c.prefill > 0.0) {
            return Err("batch work (arrivals, backlog or prefill) needs at least one batch scheduler".into());
        }
        if s.schedulers.service == 0 && w.service.interval > Duration::ZERO {
            return Err("service arrivals need at least one service scheduler".into());
        }
    }
    if w.backlog_jobs > 0 && c.prefill > 0.0 {
        return Err("a backlog run starts on an empty cell: use --prefill 0 with --backlog-jobs".into());
    }
    if w.backlog_jobs > 0 && w.backlog_tasks == 0 {
        return Err("backlog jobs need at least one task (--backlog-tasks)".into());
    }
    if w.gang {
        // A gang commits in one flat transaction: up to six operations per claim (compares and puts of the
        // task, its node's ledger and liveness, the assignment) plus the ownership fence.
        let largest = w.batch.tasks.max.max(if w.backlog_jobs > 0 { w.backlog_tasks } else { 0 });
        if (largest as usize) * 6 + 8 > c.max_txn_ops {
            return Err(format!(
                "gang jobs of up to {largest} tasks cannot commit in one transaction of {} operations",
                c.max_txn_ops
            ));
        }
    }
    Ok(())
}

mod secs {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

mod opt_secs {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

mod secs_range {
    use crate::cli::Range;
    use serde::ser::{SerializeStruct, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(r: &Range<Duration>, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Range", 2)?;
        st.serialize_field("min", &r.min.as_secs_f64())?;
        st.serialize_field("max", &r.max.as_secs_f64())?;
        st.end()
    }
}

/// Every preset's values for every parameter, as `--help` shows them (the flags' defaults depend on the preset).
pub fn defaults_table() -> String {
    use clap::ValueEnum;
    use std::fmt::Write as _;
    let mut out = String::from("Preset defaults (a flag given on the command line overrides them):\n");
    for preset in Preset::value_variants() {
        let name = preset.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
        let cli = <Cli as clap::Parser>::parse_from(["omega-bench", "--preset", &name]);
        let runs = runs(&cli);
        let s = &runs[0];
        let (c, w, k) = (&s.cell, &s.workload, &s.schedulers);
        let class = |j: &JobClass| {
            if j.interval.is_zero() {
                "none".to_string()
            } else {
                format!(
                    "every {} ({}..{} tasks, {}..{})",
                    secs_label(j.interval),
                    j.tasks.min,
                    j.tasks.max,
                    secs_label(j.runtime.min),
                    secs_label(j.runtime.max)
                )
            }
        };
        let _ = writeln!(
            out,
            "\n  {name}: {} run(s): {}",
            runs.len(),
            runs.iter().map(|r| r.label.as_str()).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(
            out,
            "    --nodes {} --node-cpu {}m --node-memory {} --prefill {} --max-txn-ops {} --members {} --duration {} --drain {}",
            c.nodes,
            c.node_cpu_millis,
            omega::units::memory_exact(c.node_memory_bytes),
            c.prefill,
            c.max_txn_ops,
            c.members,
            secs_label(s.duration),
            secs_label(s.drain)
        );
        let _ = writeln!(out, "    batch arrivals: {}; service arrivals: {}", class(&w.batch), class(&w.service));
        let _ = writeln!(
            out,
            "    --task-cpu {}m --task-memory {}..{} --backlog-jobs {} --backlog-tasks {} --gang {}",
            w.task_cpu_millis,
            omega::units::memory_exact(w.task_memory_bytes.min),
            omega::units::memory_exact(w.task_memory_bytes.max),
            w.backlog_jobs,
            w.backlog_tasks,
            w.gang
        );
        let _ = writeln!(
            out,
            "    --batch-schedulers {} --service-schedulers {} --t-job {} --batch-t-job {} --t-task {} --detection {} --raw-duration {}",
            runs.iter().map(|r| r.schedulers.batch.to_string()).collect::<Vec<_>>().join(","),
            k.service,
            runs.iter().map(|r| secs_label(r.schedulers.service_t_job)).collect::<Vec<_>>().join(","),
            secs_label(k.batch_t_job),
            secs_label(k.t_task),
            k.detection.flag(),
            s.raw_ceiling.map(secs_label).unwrap_or_else(|| "off".into())
        );
    }
    out
}
