//! `omctl submit FILE`: validate a job file, write the job and its pending tasks; optionally plan only
//! (`--dry-run`) or wait until the schedulers have placed every task (`--wait`).

use crate::cell::{self, TaskCounts};
use crate::cli::{Cli, SubmitArgs};
use crate::exit::{user, Code, NoSpace};
use crate::output::{emit, Fields};
use crate::units;
use omega::cell_state::{CellSnapshot, Versioned};
use omega::job_spec::MAX_FILE_BYTES;
use omega::model::{Job, JobKind, JobState, JobStatus, Task, TaskState};
use omega::placement::explain::{Explanation, Reason};
use omega::placement::feasible::{self, Candidate};
use omega::placement::{self, NodeTable, PlacementOptions};
use omega::store::submission::{check_submission_size, Cleanup};
use omega::store::{Store, SubmitError, DEFAULT_PAGE_SIZE};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::time::{Duration, Instant};

/// How often `--wait` looks at the job's tasks.
const POLL: Duration = Duration::from_millis(250);

/// `omctl submit FILE -o json`.
#[derive(Serialize)]
pub struct SubmitOutput {
    pub job: String,
    pub kind: JobKind,
    pub scheduler: String,
    pub tasks: u32,
    /// The revision of the last write of the submission.
    pub revision: i64,
    /// With `--wait`: how the wait ended.
    pub wait: Option<WaitOutput>,
}

#[derive(Serialize)]
pub struct WaitOutput {
    /// Every task left `pending` in time.
    pub done: bool,
    pub waited_ms: u64,
    pub tasks: TaskCounts,
    /// On timeout: why tasks are still pending.
    pub pending_reason: Option<String>,
    /// On timeout: the job's status record, if its scheduler wrote one.
    pub status: Option<JobStatus>,
}

/// What `omctl submit` of an existing job's file would do.
#[derive(Serialize)]
pub struct UpdatePlan {
    pub current_version: u32,
    /// Empty: nothing changed.
    pub changes: Vec<omega::deployment::FieldChange>,
    /// The replicas would be kept and relabelled (only count, priority or policies changed).
    pub in_place: bool,
    /// Replicas of the current version that would be replaced.
    pub replaced: u32,
    pub canaries: u32,
    pub max_parallel: u32,
    /// Why the submission would be refused (a batch job, a finished job).
    pub refused: Option<String>,
}

/// `omctl submit --dry-run FILE -o json`.
#[derive(Serialize)]
pub struct DryRunOutput {
    pub dry_run: bool,
    /// The job as it would be stored.
    pub job: Job,
    /// The same job in the job-file format (canonical quantities).
    pub job_file: String,
    /// The cell revision the plan was made on.
    pub revision: i64,
    pub already_exists: bool,
    /// When the job exists: what submitting the file would change (a new version), or why it would be refused.
    pub update: Option<UpdatePlan>,
    /// Live instances of the job's scheduler.
    pub scheduler_instances: usize,
    pub nodes: usize,
    pub schedulable_nodes: usize,
    /// Nodes that could take one of its tasks right now.
    pub feasible_nodes: usize,
    /// Why the others could not, like a pending reason: `3/5 nodes available: 2 constraint zone=a`.
    pub one_task: String,
    /// Reason codes -> node counts for one task.
    pub reasons: BTreeMap<String, u32>,
    /// Of the job's tasks, how many one placement decision would place now, and where.
    pub placeable_tasks: usize,
    pub placement: BTreeMap<String, u32>,
    /// Tasks that placement would evict to make room (service jobs with higher priority).
    pub preemptions: usize,
    /// Why the rest would stay pending.
    pub unplaced_reason: Option<String>,
}

pub async fn run(cli: &Cli, args: &SubmitArgs) -> anyhow::Result<Code> {
    let (source, text) = read_source(&args.file)?;
    let mut job = omega::job_spec::parse_job(&source, &text).map_err(|e| user(e.to_string()))?;
    // -n puts a job whose file names no namespace there; a file naming another one is refused (kubectl's rule).
    if let Some(ns) = cli.namespace.as_deref() {
        omega::keys::validate_name("namespace", ns).map_err(|e| user(format!("-n: {e}")))?;
        if job.namespace == omega::model::DEFAULT_NAMESPACE {
            job.namespace = ns.to_string();
        } else if job.namespace != ns {
            return Err(user(format!(
                "{source} names namespace {}, but -n says {ns}: drop one of them",
                job.namespace
            )));
        }
    }
    if args.dry_run {
        return dry_run(cli, job, &source).await;
    }
    let store = crate::connect::connect(cli).await?;
    if let Some((current, rev)) = store.get_json::<Job>(&store.keys().job(&job.id)).await? {
        // An existing service takes the file as its next version; anything else is refused with why. A job
        // keeps its namespace: its running tasks count against that namespace's quota.
        if current.namespace != job.namespace {
            return Err(user(format!(
                "job {} is in namespace {}, not {}: a job cannot move between namespaces (cancel it and submit it \
                 under another name)",
                job.id, current.namespace, job.namespace
            )));
        }
        if let Some(why) = super::versions::refuse(&current, &job, &source) {
            return Err(user(why));
        }
        return super::versions::submit(cli, &store, &current, rev, &job, args.wait.then_some(args.timeout)).await;
    }
    let revision = match store.submit_job(&job, store.limits().max_ops()).await {
        Ok(rev) => rev,
        Err(e) => return Err(failed(&store, &job, &source, e).await),
    };
    let mut out = SubmitOutput {
        job: job.id.clone(),
        kind: job.kind,
        scheduler: job.scheduler.clone(),
        tasks: job.tasks,
        revision,
        wait: None,
    };
    if !args.wait {
        emit(cli.output, &out, || {
            format!(
                "job {} submitted: {} {} for scheduler {} (revision {revision}); follow it with `omctl job {}`\n",
                job.id,
                job.tasks,
                if job.tasks == 1 { "task" } else { "tasks" },
                job.scheduler,
                job.id
            )
        })?;
        return Ok(Code::Ok);
    }
    eprintln!(
        "job {} submitted ({} tasks); waiting up to {} for placement",
        job.id,
        job.tasks,
        units::span(args.timeout.as_millis() as u64)
    );
    let wait = wait(&store, &job.id, args.timeout).await?;
    let done = wait.done;
    out.wait = Some(wait);
    emit(cli.output, &out, || render_wait(&out, args.timeout))?;
    if done {
        Ok(Code::Ok)
    } else {
        Ok(Code::WaitTimedOut)
    }
}

/// Why a submission did not happen, in omctl's words and exit codes; what it left behind is always said.
async fn failed(store: &Store, job: &Job, source: &str, e: SubmitError) -> anyhow::Error {
    let id = &job.id;
    let SubmitError { error, cleanup } = e;
    match (&error, &cleanup) {
        (omega::Error::AlreadyExists(_), Cleanup::TakenOver) => user(format!(
            "another submission of job {id} completed it or took over while this one ran, so this one stopped; \
             see what is there with `omctl job {id}`"
        )),
        (omega::Error::AlreadyExists(_), _) => user(format!(
            "job {id} already exists; give the new one another `name:` in {source}, or see the existing one with \
             `omctl job {id}`"
        )),
        (omega::Error::InvalidArgument(m), _) => user(format!("{source}: {m}")),
        (e, _) if e.is_no_space() => anyhow::Error::new(NoSpace {
            what: format!("job {id} was not submitted ({cleanup})"),
            endpoints: store.endpoints().join(","),
            revision: store.revision().await.ok(),
        }),
        (e, _) if e.is_request_too_large() || e.is_too_many_ops() => {
            user(format!("{source}: job {id} is too large for this etcd server ({cleanup}): {e}"))
        }
        _ => anyhow::Error::new(error).context(format!("job {id} was not submitted ({cleanup})")),
    }
}

/// The file's name for messages and its text; `-` is standard input. A file larger than a job file may be
/// is refused before it is read whole.
fn read_source(file: &str) -> anyhow::Result<(String, String)> {
    let too_large = |name: &str| {
        user(format!(
            "{name}: larger than {MAX_FILE_BYTES} bytes ({} MiB), the most a job file may be (a job must fit one etcd \
             request once stored)",
            MAX_FILE_BYTES >> 20
        ))
    };
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .take(MAX_FILE_BYTES as u64 + 1)
            .read_to_string(&mut text)
            .map_err(|e| user(format!("cannot read the job from standard input: {e}")))?;
        if text.len() > MAX_FILE_BYTES {
            return Err(too_large("<stdin>"));
        }
        return Ok(("<stdin>".into(), text));
    }
    let meta = std::fs::metadata(file).map_err(|e| user(format!("cannot read job file {file}: {e}")))?;
    if meta.len() > MAX_FILE_BYTES as u64 {
        return Err(too_large(file));
    }
    let text = std::fs::read_to_string(file).map_err(|e| user(format!("cannot read job file {file}: {e}")))?;
    Ok((file.to_string(), text))
}

/// Polls the job's tasks until none is pending, the job is cancelled, or `timeout` passes.
async fn wait(store: &Store, id: &str, timeout: Duration) -> anyhow::Result<WaitOutput> {
    let keys = store.keys();
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let read = cell::read(store, &[keys.tasks_of_job(id), keys.schedulers_prefix()]).await?;
        let Some((job, _)) = cell::get_at::<Job>(store, &keys.job(id), read.revision).await? else {
            return Err(user(format!("job {id} disappeared while waiting for it")));
        };
        let counts = TaskCounts::of(job.tasks, read.snapshot.tasks.values().map(|t| &*t.value));
        let pending = counts.in_state(TaskState::Pending) + job.tasks.saturating_sub(counts.present);
        let line = format!("{id}: {}/{} placed ({})", counts.placed, counts.total, counts.describe());
        if line != last {
            eprintln!("  {:>6.1}s  {line}", started.elapsed().as_secs_f64());
            last = line;
        }
        if job.state == JobState::Cancelled {
            return Err(user(format!("job {id} was cancelled while waiting for it")));
        }
        let waited_ms = started.elapsed().as_millis() as u64;
        if pending == 0 {
            return Ok(WaitOutput { done: true, waited_ms, tasks: counts, pending_reason: None, status: None });
        }
        let remaining = timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            let status = cell::get_at::<JobStatus>(store, &keys.status(id), read.revision).await?.map(|(s, _)| s);
            let pending_reason = super::jobs::pending_reason(&read.snapshot, &job, &counts, status.as_ref());
            return Ok(WaitOutput { done: false, waited_ms, tasks: counts, pending_reason, status });
        }
        tokio::time::sleep(remaining.min(POLL)).await;
    }
}

fn render_wait(out: &SubmitOutput, timeout: Duration) -> String {
    let Some(w) = &out.wait else { return String::new() };
    if w.done {
        return format!(
            "job {}: all {} tasks placed after {:.1}s ({})\n",
            out.job,
            w.tasks.total,
            w.waited_ms as f64 / 1000.0,
            w.tasks.describe()
        );
    }
    let pending = w.tasks.in_state(TaskState::Pending) + w.tasks.total.saturating_sub(w.tasks.present);
    let mut s = format!(
        "job {}: timed out after {}: {} of {} tasks still pending: {}\n",
        out.job,
        units::span(timeout.as_millis() as u64),
        pending,
        w.tasks.total,
        w.pending_reason.as_deref().unwrap_or("no reason recorded")
    );
    if let Some(st) = &w.status {
        if !st.reasons.is_empty() {
            let codes: Vec<String> = st.reasons.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "  reason codes: {}", codes.join(", "));
        }
        let _ = writeln!(s, "  attempts: {}, with conflicts: {}", st.attempts, st.conflicts);
    }
    let _ = writeln!(
        s,
        "  the job stays submitted; `omctl job {}` shows it, `omctl cancel {}` removes its tasks",
        out.job, out.job
    );
    s
}

async fn dry_run(cli: &Cli, job: Job, source: &str) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    let keys = store.keys();
    // The file was checked against etcd's default request limit; this checks the key prefix in use too.
    check_submission_size(keys, &job, store.limits().max_request_bytes())
        .map_err(|e| user(format!("{source}: {e}")))?;
    let (kvs, revision) = store.list(&keys.cell_prefix(), DEFAULT_PAGE_SIZE, None).await?;
    let mut snapshot = CellSnapshot::from_kvs(keys, &kvs, revision);
    let already_exists = snapshot.jobs.contains_key(job.id.as_str());
    let update = match snapshot.jobs.get(job.id.as_str()) {
        Some(current) => {
            let current = &current.value;
            let next = omega::deployment::next_version(current, &job, 0);
            let policy = job.update.unwrap_or_default();
            let in_place = omega::deployment::runs_same(current, &job);
            let running = snapshot.tasks_of(current).filter(|t| t.value.state != TaskState::Killed).count() as u32;
            Some(UpdatePlan {
                current_version: current.version,
                changes: omega::deployment::diff(current, &job),
                in_place,
                replaced: if in_place { 0 } else { running },
                canaries: next.deployment.map_or(0, |d| d.canaries),
                max_parallel: policy.max_parallel,
                refused: super::versions::refuse(current, &job, source),
            })
        }
        None => None,
    };
    if already_exists {
        // Plan the file's job as new: tasks of the existing job with the same name would otherwise count as
        // its own (anti-affinity, spread). Their resources stay claimed in the ledgers, as they are.
        let own = format!("{}/", job.id);
        let existing: Vec<String> =
            snapshot.tasks.keys().filter(|id| id.starts_with(&own)).map(|id| id.to_string()).collect();
        for id in existing {
            snapshot.apply_delete(keys, keys.task(&id).as_bytes());
        }
    }
    let mut out = plan(&snapshot, job);
    out.already_exists = already_exists;
    out.update = update;
    emit(cli.output, &out, || render_plan(&out))?;
    Ok(Code::Ok)
}

/// What submitting `job` on `snapshot` would do now.
fn plan(snapshot: &CellSnapshot, job: Job) -> DryRunOutput {
    let table = NodeTable::new(snapshot);
    let one = one_task(&table, &job);
    let feasible_nodes = one.nodes.saturating_sub(one.rejected.values().sum::<usize>());
    let pending: Vec<Versioned<Task>> = (0..job.tasks).map(|i| Versioned::new(Task::pending(&job, i), 0)).collect();
    let options = match job.kind {
        JobKind::Batch => PlacementOptions::batch(),
        JobKind::Service => PlacementOptions::service(),
    };
    let decided = placement::place(snapshot, &job, &pending, &options, &mut rand::rng());
    let mut where_to: BTreeMap<String, u32> = BTreeMap::new();
    for c in &decided.claims {
        *where_to.entry(c.node.clone()).or_default() += 1;
    }
    DryRunOutput {
        dry_run: true,
        job_file: omega::job_spec::to_yaml(&job),
        revision: snapshot.revision,
        already_exists: snapshot.jobs.contains_key(job.id.as_str()),
        update: None,
        scheduler_instances: snapshot.schedulers.values().filter(|i| i.value.scheduler == job.scheduler).count(),
        nodes: table.nodes(),
        schedulable_nodes: table.entries.len(),
        feasible_nodes,
        one_task: one.to_string(),
        reasons: one.codes(),
        placeable_tasks: decided.claims.len(),
        placement: where_to,
        preemptions: decided.claims.iter().map(|c| c.preempts.len()).sum(),
        unplaced_reason: decided.explanation.filter(|_| !decided.unplaced.is_empty()).map(|e| e.to_string()),
        job,
    }
}

/// Every node's first reason for refusing one task of `job` now (nothing of the job is placed yet).
fn one_task(table: &NodeTable<'_>, job: &Job) -> Explanation {
    let mut e = Explanation { nodes: table.nodes(), ..Default::default() };
    for _ in table.entries.len()..table.nodes() {
        e.reject(Reason::NotSchedulable);
    }
    for (index, entry) in table.entries.iter().enumerate() {
        if let Some(reason) = feasible::constraint_reject(job, entry.node) {
            e.reject(reason);
            continue;
        }
        let candidate = Candidate {
            index,
            name: entry.name,
            node: entry.node,
            capacity: entry.capacity,
            free: entry.free,
            job_tasks: 0,
            spread_value: "",
        };
        if let Some(reason) = feasible::dynamic_reject(job, &candidate, job.resources) {
            e.reject(reason);
        }
    }
    e
}

fn render_plan(p: &DryRunOutput) -> String {
    let mut out = format!("# {}: valid; nothing was written\n", p.job.id);
    out.push_str(&p.job_file);
    if !p.job_file.ends_with('\n') {
        out.push('\n');
    }
    let _ = writeln!(out, "\nPlan on the cell at revision {}:", p.revision);
    let mut f = Fields::new();
    f.add("Nodes", format!("{} ({} schedulable)", p.nodes, p.schedulable_nodes));
    f.add("One task fits on", format!("{} ({})", plural(p.feasible_nodes, "node"), p.one_task));
    let whole = if p.placeable_tasks == p.job.tasks as usize {
        format!("all {} tasks would be placed now, on {}", p.job.tasks, plural(p.placement.len(), "node"))
    } else {
        format!(
            "{} of {} tasks would be placed now; the rest would wait: {}",
            p.placeable_tasks,
            p.job.tasks,
            p.unplaced_reason.as_deref().unwrap_or("no room")
        )
    };
    f.add("Whole job", whole);
    if p.preemptions > 0 {
        f.add("Preemptions", format!("{} lower-priority tasks would be evicted", p.preemptions));
    }
    let scheduler = match p.scheduler_instances {
        0 => format!("{}: no instance running; the job would stay pending until one starts", p.job.scheduler),
        n => format!("{} ({})", p.job.scheduler, plural(n, "instance")),
    };
    f.add("Scheduler", scheduler);
    match &p.update {
        Some(UpdatePlan { refused: Some(why), .. }) => {
            f.add("Note", format!("submitting this file would fail: {why}"));
        }
        Some(u) if u.changes.is_empty() => {
            f.add("Update", format!("unchanged from version {}: submitting would change nothing", u.current_version));
        }
        Some(u) => {
            let how = if u.in_place {
                "its replicas run the same containers and would be kept (relabelled)".to_string()
            } else if u.canaries > 0 {
                format!(
                    "{} canaries would start beside the {} running replicas, then wait for `omctl promote`",
                    u.canaries, u.replaced
                )
            } else {
                format!("{} running replicas would be replaced, {} at a time, each old one stopped once a new one is healthy", u.replaced, u.max_parallel)
            };
            f.add("Update", format!("version {} -> {}: {how}", u.current_version, u.current_version + 1));
        }
        None => {}
    }
    out.push_str(&f.render(2));
    if let Some(u) = p.update.as_ref().filter(|u| !u.changes.is_empty()) {
        out.push_str("\n  Changes:\n");
        out.push_str(&super::versions::render_changes(&u.changes));
    }
    out
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}
