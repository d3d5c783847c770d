//! `omctl jobs`: every job in one table, with why its tasks are not all placed.

use crate::cell::{self, CellRead, TaskCounts};
use crate::cli::{Cli, JobsArgs};
use crate::exit::Code;
use crate::output::{emit, Table};
use crate::units;
use omega::cell_state::CellSnapshot;
use omega::model::{Job, JobKind, JobState, JobStatus, TaskState};
use omega::store::Store;
use serde::Serialize;
use std::collections::BTreeMap;

/// `omctl jobs -o json`.
#[derive(Serialize)]
pub struct JobsOutput {
    /// The etcd revision the listing reflects.
    pub revision: i64,
    pub jobs: Vec<JobRow>,
    /// Job ids with tasks but no job record: a submission still writing its tasks, or one that failed midway.
    /// No scheduler places these tasks; submitting the same file again completes the job.
    pub incomplete_submissions: Vec<IncompleteSubmission>,
}

#[derive(Serialize)]
pub struct IncompleteSubmission {
    pub job: String,
    /// Task records written so far.
    pub tasks: u32,
}

#[derive(Serialize)]
pub struct JobRow {
    pub id: String,
    pub namespace: String,
    pub kind: JobKind,
    pub scheduler: String,
    pub priority: i32,
    pub state: JobState,
    pub tasks: TaskCounts,
    /// Why tasks are still pending (the scheduler's status, or why no scheduler has looked yet); `null` when
    /// nothing is pending.
    pub pending_reason: Option<String>,
    /// Stable reason codes -> node counts from the job's status (`insufficient_memory`, `constraint`, ...).
    pub reasons: BTreeMap<String, u32>,
    /// The scheduler instance placing the job now (`<scheduler>/<instance>`), if any.
    pub owner: Option<String>,
    pub submitted_at_ms: u64,
}

pub async fn run(cli: &Cli, args: &JobsArgs) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    let out = list(&store).await?;
    let namespace = cli.namespace.as_deref().unwrap_or(omega::model::DEFAULT_NAMESPACE);
    let jobs: Vec<JobRow> = out
        .jobs
        .into_iter()
        .filter(|j| args.all_namespaces || j.namespace == namespace)
        .filter(|j| args.state.is_none_or(|s| j.state == s.state()))
        .collect();
    let out = JobsOutput { jobs, ..out };
    emit(cli.output, &out, || render(&out))?;
    Ok(Code::Ok)
}

/// Reads every job with its tasks, statuses and owners at one revision.
pub async fn list(store: &Store) -> anyhow::Result<JobsOutput> {
    let keys = store.keys();
    let read = cell::read(
        store,
        &[keys.jobs_prefix(), keys.tasks_prefix(), keys.owner(""), keys.schedulers_prefix(), keys.status_prefix()],
    )
    .await?;
    let mut jobs: Vec<&Job> = read.snapshot.jobs.values().map(|j| &*j.value).collect();
    jobs.sort_by(|a, b| a.id.cmp(&b.id));
    let rows = jobs.into_iter().map(|job| row(&read, job)).collect();
    let mut incomplete: BTreeMap<&str, u32> = BTreeMap::new();
    for task in read.snapshot.tasks.values().filter(|t| !read.snapshot.jobs.contains_key(t.value.job.as_str())) {
        *incomplete.entry(task.value.job.as_str()).or_default() += 1;
    }
    let incomplete_submissions =
        incomplete.into_iter().map(|(job, tasks)| IncompleteSubmission { job: job.to_string(), tasks }).collect();
    Ok(JobsOutput { revision: read.revision, jobs: rows, incomplete_submissions })
}

fn row(read: &CellRead, job: &Job) -> JobRow {
    let s = &read.snapshot;
    let counts = TaskCounts::of(job.tasks, s.tasks_of(job).map(|t| &*t.value));
    let status = read.statuses.get(&job.id);
    let pending_reason = pending_reason(s, job, &counts, status);
    JobRow {
        id: job.id.clone(),
        namespace: job.namespace.clone(),
        kind: job.kind,
        scheduler: job.scheduler.clone(),
        priority: job.priority,
        state: job.state,
        pending_reason,
        reasons: status.filter(|st| st.pending > 0).map(|st| st.reasons.clone()).unwrap_or_default(),
        owner: s.owners.get(job.id.as_str()).map(|o| format!("{}/{}", o.value.scheduler, o.value.instance)),
        submitted_at_ms: job.submitted_at_ms,
        tasks: counts,
    }
}

/// Why a job still has pending tasks: its scheduler's last word if it wrote one, else why no scheduler has
/// (none of that name running, or not yet). `None` when nothing is pending or the job is over.
pub fn pending_reason(
    snapshot: &CellSnapshot,
    job: &Job,
    counts: &TaskCounts,
    status: Option<&JobStatus>,
) -> Option<String> {
    let active = matches!(job.state, JobState::Pending | JobState::Running);
    let pending = counts.in_state(TaskState::Pending);
    if !active || pending == 0 {
        return None;
    }
    if let Some(st) = status.filter(|st| st.pending > 0 && !st.reason.is_empty()) {
        return Some(st.reason.clone());
    }
    let running = snapshot.schedulers.values().any(|i| i.value.scheduler == job.scheduler);
    Some(if running {
        format!("waiting for scheduler {}", job.scheduler)
    } else {
        format!("no instance of scheduler {} is running", job.scheduler)
    })
}

fn render(out: &JobsOutput) -> String {
    let mut text = table(out);
    for s in &out.incomplete_submissions {
        text.push_str(&format!(
            "Incomplete submission: {} tasks of job {} have no job record yet (a submission still writing, or one \
             that failed midway); no scheduler places them, and submitting the same file again completes it\n",
            s.tasks, s.job
        ));
    }
    text
}

fn table(out: &JobsOutput) -> String {
    if out.jobs.is_empty() {
        return "No jobs. Submit one with `omctl submit FILE`.\n".into();
    }
    // The namespace column once there is more than the default one to tell apart.
    let namespaces = out.jobs.iter().any(|j| j.namespace != omega::model::DEFAULT_NAMESPACE);
    let mut header = vec!["ID", "KIND", "SCHEDULER", "PRIORITY", "STATE", "TASKS", "PENDING REASON"];
    if namespaces {
        header.insert(0, "NAMESPACE");
    }
    let mut t = Table::new(&header);
    for j in &out.jobs {
        let mut row = vec![
            j.id.clone(),
            units::name(&j.kind),
            j.scheduler.clone(),
            j.priority.to_string(),
            units::name(&j.state),
            format!("{}/{}", j.tasks.placed, j.tasks.total),
            units::truncate(j.pending_reason.as_deref().unwrap_or(""), 60),
        ];
        if namespaces {
            row.insert(0, j.namespace.clone());
        }
        t.row(row);
    }
    t.render()
}
