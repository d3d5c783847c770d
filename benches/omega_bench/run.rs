//! One run, top to bottom: etcd -> simulated nodes and the controller -> schedulers -> prefill (or backlog)
//! -> measured arrivals -> drain -> counters, waits, audit -> etcd's raw ceiling on the same server.

use crate::cell::{self, Etcd, Proc, SchedulerArgs, SchedulerProc};
use crate::health::Sampler;
use crate::observe::Observer;
use crate::result::{Check, RunResult, SchedulerResult, Spread};
use crate::scrape::{self, SchedulerCounters};
use crate::spec::{Architecture, RunSpec};
use crate::submit::{self, Submitted};
use crate::workload::{self, Addressees, Plan};
use anyhow::{bail, Context, Result};
use omega::keys::Keys;
use omega::model::{now_ms, JobKind, Task};
use omega::store::{decode, Store, DEFAULT_PAGE_SIZE};
use omega_benches::raw_ceiling::{self, RawOptions};
use omega_benches::window::cpu_seconds;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PREFIX: &str = "/omega/";
const RAW_PREFIX: &str = "/omega-raw-ceiling/";

/// Where a run finds its binaries and writes its logs, and how it reports progress.
pub struct RunContext {
    pub bin_dir: PathBuf,
    pub logs: PathBuf,
    /// `[2/5 t_job=1s]`: what the progress line starts with.
    pub title: String,
}

/// The processes of a run; dropping it kills them all.
struct Processes {
    proxy: Option<omega::etcd_process::EtcdProxy>,
    agent: Proc,
    controller: Proc,
    schedulers: Vec<SchedulerProc>,
}

impl Processes {
    fn check_alive(&mut self) -> Result<()> {
        if let Some(p) = &mut self.proxy {
            p.check_alive()?;
        }
        self.agent.check_alive()?;
        self.controller.check_alive()?;
        for s in &mut self.schedulers {
            s.proc.check_alive()?;
        }
        Ok(())
    }
}

/// CPU seconds used so far by a set of processes.
fn cpu_of(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

pub async fn run(spec: &RunSpec, ctx: &RunContext) -> Result<RunResult> {
    crate::spec::validate(spec).map_err(anyhow::Error::msg)?;
    let etcd = Etcd::start(&spec.cell).await?;
    let direct = etcd.endpoints();
    // The schedulers and the controller reach etcd through the proxy if there is one; the bench itself and
    // the simulated nodes go direct.
    let (proxy, endpoints) = match spec.cell.proxy {
        true => {
            std::fs::create_dir_all(&ctx.logs)?;
            let p = omega::etcd_process::EtcdProxy::start(&direct, None, &ctx.logs.join("grpc-proxy.log")).await?;
            let endpoint = p.endpoint().to_string();
            (Some(p), vec![endpoint])
        }
        false => (None, direct.clone()),
    };
    let keys = Keys::new(PREFIX)?;
    let store = Store::connect(&direct, keys.clone()).await.context("connecting to etcd")?;
    store.set_max_txn_ops(spec.cell.max_txn_ops);

    let to = match spec.schedulers.architecture {
        Architecture::Monolithic => Addressees { batch: "monolithic".into(), service: "monolithic".into() },
        _ => Addressees { batch: "batch".into(), service: "service".into() },
    };
    let plan = workload::plan(spec, &to);
    let observer = Observer::start(&store, &keys);

    // The nodes' host goes straight to etcd even with a proxy: a node's liveness should not hang on a proxy
    // (deploy/etcd/README.md), and the proxy is for the many identical scheduler watches.
    let agent = start_agent(spec, ctx, &direct)?;
    let mut controller_args =
        vec![format!("--etcd={}", endpoints.join(",")), format!("--prefix={PREFIX}"), "--instance=controller".into()];
    controller_args.extend(spec.cell.controller_args.iter().cloned());
    let controller = Proc::start(&ctx.bin_dir, "omega-controller", "controller", &controller_args, &ctx.logs)?;
    let mut procs = Processes { proxy, agent, controller, schedulers: Vec::new() };
    wait_until(&mut procs, "the simulated nodes to register", Duration::from_secs(120), || async {
        Ok((store.count(&keys.live("")).await? >= spec.cell.nodes as i64).then_some(()))
    })
    .await?;

    let backlog_mode = !plan.backlog.is_empty();
    let mut burst: Option<Submitted> = None;
    if backlog_mode {
        progress(
            ctx,
            &format!("writing the backlog: {} jobs, {} tasks", plan.backlog.len(), Plan::tasks(&plan.backlog)),
        );
        burst = Some(submit::all_at_once(&store, plan.backlog.clone(), spec.cell.max_txn_ops).await?);
    }
    let schedulers_started = Instant::now();
    let schedulers_started_ms = now_ms();
    procs.schedulers = start_schedulers(spec, ctx, &endpoints)?;
    let expected = procs.schedulers.len() as i64;
    wait_until(&mut procs, "the schedulers to register", Duration::from_secs(120), || async {
        Ok((store.count(&keys.schedulers_prefix()).await? >= expected).then_some(()))
    })
    .await?;

    if !plan.prefill.is_empty() {
        let tasks = Plan::tasks(&plan.prefill);
        progress(ctx, &format!("prefill: placing {tasks} long-running tasks"));
        let submitted = submit::all_at_once(&store, plan.prefill.clone(), spec.cell.max_txn_ops).await?;
        if !submitted.failed.is_empty() {
            bail!("prefill submissions failed: {}", submitted.failed.join("; "));
        }
        burst.get_or_insert(submitted);
        let ids: Vec<String> = plan.prefill.iter().map(|j| j.id.clone()).collect();
        // The batch scheduler pays t_task per unplaced task (the paper's decision-time model), so a large
        // prefill takes that long to decide on top of placing it.
        let limit = Duration::from_secs(120) + (spec.schedulers.t_task + Duration::from_millis(1)) * tasks as u32;
        wait_until(&mut procs, "the prefill to be placed", limit, || async {
            let seen = observer.seen.lock();
            let placed: u64 = ids.iter().map(|id| seen.jobs.get(id).map_or(0, |j| j.0 as u64)).sum();
            Ok((placed >= tasks).then_some(()))
        })
        .await?;
        // The watch can show a commit before the scheduler that made it has counted it: wait until the
        // schedulers' counters hold the whole prefill, so none of it is counted inside the measurement.
        let addrs: Vec<String> = procs.schedulers.iter().map(|s| s.metrics.clone()).collect();
        wait_until(&mut procs, "the schedulers to count the prefill", Duration::from_secs(60), || {
            let addrs = addrs.clone();
            async move {
                let mut counted = 0.0;
                for a in &addrs {
                    counted += SchedulerCounters::parse(&scrape::scrape(a).await?).placed;
                }
                Ok((counted >= tasks as f64).then_some(()))
            }
        })
        .await?;
    }

    // The measurement starts now (or, for a backlog, when the schedulers started: their counters were zero).
    let before: Vec<SchedulerCounters> = if backlog_mode {
        vec![SchedulerCounters::default(); procs.schedulers.len()]
    } else {
        scrape_all(&procs.schedulers, None).await?
    };
    let (start, start_ms) =
        if backlog_mode { (schedulers_started, schedulers_started_ms) } else { (Instant::now(), now_ms()) };
    let etcd_pids = etcd.pids();
    let scheduler_pids: Vec<u32> = procs.schedulers.iter().map(|s| s.proc.pid()).collect();
    let controller_pid = procs.controller.pid();
    let cpu_before =
        (cpu_of(&etcd_pids), cpu_of(&scheduler_pids), cpu_of(&[procs.agent.pid()]), cpu_of(&[controller_pid]));

    let sampler = Sampler::start(&store, &keys, observer.seen.clone(), start);
    let submitted = Arc::new(Mutex::new(Submitted::default()));
    if let Some(b) = &burst {
        if backlog_mode {
            let mut s = submitted.lock();
            s.jobs.extend(b.jobs.clone());
            s.tasks = b.tasks;
            s.failed.extend(b.failed.iter().cloned());
        }
    }
    let stoppers = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
    let arrivals = tokio::spawn(submit::on_schedule(
        store.clone(),
        plan.arrivals.clone(),
        start,
        spec.cell.max_txn_ops,
        submitted.clone(),
        stoppers.clone(),
    ));
    let arrivals_end = start + spec.duration;
    let mut arrivals = Some(arrivals);
    let mut last_line = Instant::now();
    let end = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        procs.check_alive()?;
        if arrivals.as_ref().is_some_and(|a| a.is_finished()) {
            if let Some(a) = arrivals.take() {
                a.await.context("the submitter panicked")??;
            }
        }
        let (jobs_in, tasks_in) = {
            let s = submitted.lock();
            (s.jobs.keys().cloned().collect::<Vec<_>>(), s.tasks)
        };
        let placed: u64 = {
            let seen = observer.seen.lock();
            jobs_in.iter().map(|id| seen.jobs.get(id).map_or(0, |j| j.0 as u64)).sum()
        };
        let now = Instant::now();
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = now;
            let secs = now.duration_since(start).as_secs_f64();
            progress(
                ctx,
                &format!(
                    "{secs:.0}s: {tasks_in} tasks submitted, {placed} placed ({:.0}/s), {} pending",
                    placed as f64 / secs.max(0.001),
                    tasks_in - placed.min(tasks_in)
                ),
            );
        }
        let all_in = arrivals.is_none() && now >= arrivals_end;
        if all_in && placed >= tasks_in {
            break now;
        }
        if now >= arrivals_end + spec.drain {
            break now;
        }
    };
    let end_ms = now_ms();
    // Services still within their lifetime keep running until the cell goes; no more cancels from here.
    stoppers.lock().abort_all();
    let after = scrape_all(&procs.schedulers, Some(&ctx.logs)).await?;
    let window = end.duration_since(start).as_secs_f64().max(0.001);
    let cpu_after =
        (cpu_of(&etcd_pids), cpu_of(&scheduler_pids), cpu_of(&[procs.agent.pid()]), cpu_of(&[controller_pid]));
    let cores = |b: Option<f64>, a: Option<f64>| Some((a? - b?) / window);
    eprintln!();

    let submitted = std::mem::take(&mut *submitted.lock());
    let mut result = measure(spec, &submitted, &observer, &procs.schedulers, &before, &after, start_ms, end_ms, window);
    result.submission_tasks_per_sec = burst.as_ref().map(Submitted::tasks_per_sec);
    result.etcd_cpu_cores = cores(cpu_before.0, cpu_after.0);
    result.scheduler_cpu_cores = cores(cpu_before.1, cpu_after.1);
    result.agent_cpu_cores = cores(cpu_before.2, cpu_after.2);
    result.controller_cpu_cores = cores(cpu_before.3, cpu_after.3);
    result.health = Some(sampler.summary());
    result.health_samples = std::mem::take(&mut *sampler.samples.lock());
    drop(sampler);
    let agent_log = procs.agent.log();
    result.lease_renewal_failures = agent_log.matches("lease keep-alive failed").count() as u64;
    result.leases_lost = agent_log.matches("the lease is gone").count() as u64;

    // Stop placing before auditing and before measuring etcd alone.
    for s in procs.schedulers.drain(..) {
        s.proc.stop();
    }
    result.checks = check(&store, &submitted, &result, &observer).await?;
    drop(observer);
    drop(procs);

    if let Some(measure) = spec.raw_ceiling {
        progress(ctx, "measuring etcd's raw ceiling for the claim shape");
        let opts = raw_options(spec, measure, etcd_pids.first().copied().filter(|_| etcd_pids.len() == 1));
        let raw = raw_ceiling::measure(&endpoints, RAW_PREFIX, &opts).await.context("measuring the raw ceiling")?;
        let ceiling = raw.claims_per_sec();
        result.raw_ceiling_claims_per_sec = Some(ceiling);
        result.raw_ceiling_latency_p99_ms = Some(raw.tally.percentiles_ms().1);
        if ceiling > 0.0 {
            result.ceiling_ratio = Some(result.backlog_rate.unwrap_or(result.placement_rate) / ceiling);
            result.ceiling_ratio_best_second = Some(result.placement_rate_best_second / ceiling);
        }
        eprintln!();
    }
    drop(etcd);
    Ok(result)
}

/// The raw ceiling as the schedulers would commit at best: full transactions (max_txn_ops - 3 claims),
/// 8 in flight (a scheduler's default), over as many nodes as the cell has (up to what the workers need).
fn raw_options(spec: &RunSpec, measure: Duration, etcd_pid: Option<u32>) -> RawOptions {
    let workers = 8;
    let defaults = RawOptions::default();
    let batch = defaults.max_txn_ops.max(spec.cell.max_txn_ops).saturating_sub(3).min(125);
    RawOptions {
        workers,
        nodes: spec.cell.nodes.max(workers * batch),
        batch,
        warmup: (measure / 5).min(Duration::from_secs(1)),
        measure,
        tasks_per_worker: 4096,
        max_txn_ops: spec.cell.max_txn_ops,
        etcd_pid,
        clean: true,
        ..defaults
    }
}

#[allow(clippy::too_many_arguments)]
fn measure(
    spec: &RunSpec,
    submitted: &Submitted,
    observer: &Observer,
    schedulers: &[SchedulerProc],
    before: &[SchedulerCounters],
    after: &[SchedulerCounters],
    start_ms: u64,
    end_ms: u64,
    window: f64,
) -> RunResult {
    let seen = observer.seen.lock();
    let (mut waits_batch, mut waits_service) = (Vec::new(), Vec::new());
    let mut placed = 0u64;
    let mut jobs_of: HashMap<&str, usize> = HashMap::new();
    for (id, job) in &submitted.jobs {
        *jobs_of.entry(job.scheduler.as_str()).or_default() += 1;
        let (n, last) = seen.jobs.get(id).copied().unwrap_or((0, 0));
        placed += n.min(job.tasks) as u64;
        if n >= job.tasks {
            let wait = last.saturating_sub(job.submitted_ms) as f64 / 1e3;
            match job.kind {
                JobKind::Batch => waits_batch.push(wait),
                JobKind::Service => waits_service.push(wait),
            }
        }
    }
    let (_, series) = seen.placed_between(start_ms, end_ms.max(start_ms + 1));
    // A backlog's own figure: from the schedulers' start to its last task placed, if all were.
    let backlog: Vec<&str> =
        submitted.jobs.keys().filter(|id| id.starts_with(workload::BACKLOG_PREFIX)).map(String::as_str).collect();
    let backlog_tasks: u64 = backlog.iter().filter_map(|id| submitted.jobs.get(*id)).map(|j| j.tasks as u64).sum();
    let backlog_done = backlog.iter().try_fold(0u64, |last, id| {
        let job = submitted.jobs.get(*id)?;
        let (n, at) = seen.jobs.get(*id).copied()?;
        (n >= job.tasks).then_some(last.max(at))
    });
    let backlog_secs = match (backlog.is_empty(), backlog_done) {
        (false, Some(last)) => Some(last.saturating_sub(start_ms) as f64 / 1e3),
        _ => None,
    };
    drop(seen);
    let best = series.iter().copied().max().unwrap_or(0);

    let mut instances = Vec::new();
    let mut sums: BTreeMap<String, SchedulerCounters> = BTreeMap::new();
    for ((s, b), a) in schedulers.iter().zip(before).zip(after) {
        let delta = a.since(b);
        sums.entry(s.scheduler.clone()).or_default().add(&delta);
        let jobs = jobs_of.get(s.scheduler.as_str()).copied().unwrap_or(0);
        instances.push(SchedulerResult::new(&s.scheduler, &s.instance, delta, window, jobs));
    }
    let schedulers = sums
        .into_iter()
        .map(|(name, c)| {
            let jobs = jobs_of.get(name.as_str()).copied().unwrap_or(0);
            SchedulerResult::new(&name, "*", c, window, jobs)
        })
        .collect();
    RunResult {
        spec: spec.clone(),
        window_secs: window,
        jobs_submitted: submitted.jobs.len(),
        tasks_submitted: submitted.tasks,
        submission_tasks_per_sec: None,
        submission_max_lag_secs: submitted.max_lag.as_secs_f64(),
        tasks_placed: placed,
        tasks_unplaced: submitted.tasks.saturating_sub(placed),
        placement_rate: placed as f64 / window,
        placement_rate_best_second: best as f64,
        placement_series: series,
        backlog_tasks,
        backlog_secs,
        backlog_rate: backlog_secs.filter(|&s| s > 0.0).map(|s| backlog_tasks as f64 / s),
        wait_all_placed_batch: Spread::of(waits_batch),
        wait_all_placed_service: Spread::of(waits_service),
        instances,
        schedulers,
        etcd_cpu_cores: None,
        scheduler_cpu_cores: None,
        agent_cpu_cores: None,
        controller_cpu_cores: None,
        raw_ceiling_claims_per_sec: None,
        raw_ceiling_latency_p99_ms: None,
        ceiling_ratio: None,
        ceiling_ratio_best_second: None,
        health: None,
        health_samples: Vec::new(),
        lease_renewal_failures: 0,
        leases_lost: 0,
        checks: Vec::new(),
    }
}

/// What must hold after any run, whatever the numbers: read back from etcd, not from our own bookkeeping.
async fn check(store: &Store, submitted: &Submitted, r: &RunResult, observer: &Observer) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut add = |name: &str, ok: bool, detail: String| checks.push(Check { name: name.into(), ok, detail });

    add(
        "every submission landed",
        submitted.failed.is_empty(),
        if submitted.failed.is_empty() { "0 failed".into() } else { submitted.failed.join("; ") },
    );

    // Every submitted task is in etcd, once, in a state; count the placed ones ourselves.
    let (kvs, _) = store.list(&store.keys().tasks_prefix(), DEFAULT_PAGE_SIZE, None).await?;
    // Job -> (tasks present, tasks placed, placements committed in all).
    let mut by_job: HashMap<String, (u32, u32, u64)> = HashMap::new();
    let mut replaced = Vec::new();
    let mut undecodable = 0;
    for kv in &kvs {
        match decode::<Task>(kv) {
            Ok(t) => {
                let e = by_job.entry(t.job.clone()).or_default();
                e.0 += 1;
                if t.placements > 0 {
                    e.1 += 1;
                }
                e.2 += t.placements as u64;
                if t.placements > 1 && submitted.jobs.contains_key(&t.job) {
                    replaced.push(format!(
                        "{} ({} placements, {:?}: {})",
                        t.id,
                        t.placements,
                        t.state,
                        t.reason.as_deref().unwrap_or("")
                    ));
                }
            }
            Err(_) => undecodable += 1,
        }
    }
    // A job the controller collected after it finished is gone whole: its tasks count as placed if the
    // observer saw every one of them placed (its first placements; a re-placement of a collected job's task
    // cannot be told apart any more).
    let (kvs, _) = store.list(&store.keys().jobs_prefix(), DEFAULT_PAGE_SIZE, None).await?;
    let job_records: std::collections::HashSet<String> = kvs
        .iter()
        .filter_map(|kv| match store.keys().parse(&String::from_utf8_lossy(kv.key())) {
            Some(omega::keys::Key::Job(id)) => Some(id.to_string()),
            _ => None,
        })
        .collect();
    let mut missing = Vec::new();
    let mut placed_in_etcd = 0u64;
    let mut placements_in_etcd = 0u64;
    let mut collected = 0usize;
    {
        let seen = observer.seen.lock();
        for (id, job) in &submitted.jobs {
            let (present, placed, placements) = by_job.get(id).copied().unwrap_or((0, 0, 0));
            if present == 0 && !job_records.contains(id) {
                let observed = seen.jobs.get(id).map_or(0, |j| j.0);
                if observed >= job.tasks {
                    collected += 1;
                    placed_in_etcd += job.tasks as u64;
                    placements_in_etcd += job.tasks as u64;
                    continue;
                }
            }
            placements_in_etcd += placements;
            if present != job.tasks {
                missing.push(format!("{id}: {present}/{} tasks", job.tasks));
            }
            placed_in_etcd += placed as u64;
        }
    }
    add(
        "every submitted task is in etcd",
        missing.is_empty() && undecodable == 0,
        format!(
            "{} jobs, {} tasks; {collected} jobs finished and collected; {} incomplete, {undecodable} undecodable",
            submitted.jobs.len(),
            submitted.tasks,
            missing.len()
        ),
    );
    add(
        "every submitted task was placed",
        r.tasks_unplaced == 0 && placed_in_etcd == submitted.tasks,
        format!("{placed_in_etcd} of {} placed in etcd ({} seen by the watch)", submitted.tasks, r.tasks_placed),
    );

    // The schedulers' own count of committed claims against the placements etcd's task records count (a
    // re-placement counts twice in both).
    let committed: f64 = r.schedulers.iter().map(|s| s.counters.placed).sum();
    replaced.truncate(5);
    add(
        "claims committed = placements in etcd",
        committed as u64 == placements_in_etcd,
        format!(
            "schedulers committed {committed} claims; the task records count {placements_in_etcd} placements of {} tasks{}",
            r.tasks_placed,
            if replaced.is_empty() { String::new() } else { format!("; placed more than once: {}", replaced.join(", ")) }
        ),
    );
    let bad: Vec<String> = r
        .schedulers
        .iter()
        .filter(|s| {
            let c = &s.counters;
            c.transactions_conflicted > c.transactions
                || c.transactions > c.attempts
                || c.claims_conflicted > c.claims()
        })
        .map(|s| s.scheduler.clone())
        .collect();
    add(
        "conflicted <= attempted (transactions and claims)",
        bad.is_empty(),
        if bad.is_empty() { "holds for every scheduler".into() } else { format!("broken for {}", bad.join(", ")) },
    );

    let audit = omega::audit::audit(store).await?;
    add(
        "audit clean",
        audit.is_ok(),
        if audit.is_ok() {
            format!("{} nodes, {} tasks, {} placed, 0 violations", audit.nodes, audit.tasks, audit.placed_tasks)
        } else {
            audit.violations.iter().take(5).map(|v| v.to_string()).collect::<Vec<_>>().join("; ")
        },
    );
    Ok(checks)
}

fn start_agent(spec: &RunSpec, ctx: &RunContext, endpoints: &[String]) -> Result<Proc> {
    let port = omega::etcd_process::free_port()?;
    Proc::start(
        &ctx.bin_dir,
        "omega-agent",
        "agent",
        &[
            format!("--etcd={}", endpoints.join(",")),
            format!("--prefix={PREFIX}"),
            format!("--simulate={}", spec.cell.nodes),
            format!("--sim-cpu={}m", spec.cell.node_cpu_millis),
            format!("--sim-memory={}", spec.cell.node_memory_bytes),
            format!("--listen=127.0.0.1:{port}"),
        ],
        &ctx.logs,
    )
}

fn start_schedulers(spec: &RunSpec, ctx: &RunContext, endpoints: &[String]) -> Result<Vec<SchedulerProc>> {
    let s = &spec.schedulers;
    let seed = spec.workload.seed;
    let common = |kind: &'static str, name: &'static str, instance: String, t_job: Duration, i: usize| SchedulerArgs {
        kind,
        name,
        instance,
        detection: s.detection.flag(),
        t_job,
        t_task: s.t_task,
        service_t_job: None,
        lock: s.architecture == Architecture::Pessimistic,
        seed: seed.wrapping_add(i as u64 + 1),
        max_txn_ops: spec.cell.max_txn_ops,
        extra: &s.extra_args,
    };
    let mut wanted = Vec::new();
    match s.architecture {
        Architecture::Monolithic => {
            let mut a = common("monolithic", "monolithic", "m0".into(), s.batch_t_job, 0);
            a.service_t_job = Some(s.service_t_job);
            wanted.push(a);
        }
        Architecture::Omega | Architecture::Pessimistic => {
            for i in 0..s.batch {
                wanted.push(common("batch", "batch", format!("b{i}"), s.batch_t_job, i));
            }
            for i in 0..s.service {
                wanted.push(common("service", "service", format!("s{i}"), s.service_t_job, s.batch + i));
            }
        }
    }
    wanted.into_iter().map(|a| cell::start_scheduler(&ctx.bin_dir, endpoints, PREFIX, a, &ctx.logs)).collect()
}

/// Reads every scheduler's counters; with `keep`, also writes each one's metrics there (`<instance>.prom`), for
/// a closer look at a run than the tables give.
async fn scrape_all(schedulers: &[SchedulerProc], keep: Option<&Path>) -> Result<Vec<SchedulerCounters>> {
    let mut out = Vec::with_capacity(schedulers.len());
    for s in schedulers {
        let text = scrape::scrape(&s.metrics).await.with_context(|| format!("reading {}'s metrics", s.instance))?;
        if let Some(dir) = keep {
            std::fs::write(dir.join(format!("{}.prom", s.instance)), &text)?;
        }
        out.push(SchedulerCounters::parse(&text));
    }
    Ok(out)
}

/// Polls `check` until it yields, failing after `limit` or as soon as a process dies.
async fn wait_until<T, F, Fut>(procs: &mut Processes, what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        procs.check_alive()?;
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("gave up waiting for {what} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One line of progress on stderr, rewritten in place on a terminal.
fn progress(ctx: &RunContext, line: &str) {
    use std::io::IsTerminal;
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[2K{} {line}", ctx.title);
    } else {
        let _ = writeln!(err, "{} {line}", ctx.title);
    }
    let _ = err.flush();
}

/// The directory of a run's process logs.
pub fn logs_dir(out: &Path, index: usize, label: &str) -> PathBuf {
    let safe: String =
        label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    out.join("logs").join(format!("{:02}-{safe}", index + 1))
}
