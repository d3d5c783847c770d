//! Cancelling a job: mark it cancelled, then kill its tasks and free the nodes they hold.
//!
//! The job's state goes first (compare-and-swap on its record), so no scheduler takes the job again; the
//! schedulers' claims compare each task's mod_revision, so a task killed here cannot be placed afterwards.
//! Then every unfinished task is released: pending tasks get their state written, tasks holding resources
//! leave their node's ledger and lose their assignment in the same transaction, many per round trip. A task
//! that changed under us (placed, started) is read again and released again, a few rounds at most.

use crate::cell_state::Versioned;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::keys;
use crate::model::{Job, JobState, Task, TaskState};
use crate::release::{release, Release, ReleaseOutcome};
use crate::store::{decode, Store, DEFAULT_PAGE_SIZE};
use serde::Serialize;

/// Attempts at the job record's compare-and-swap, and rounds of task releases.
const ROUNDS: usize = 8;

/// The reason cancelled tasks carry.
pub const REASON: &str = "cancelled";

/// What a cancel did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CancelReport {
    pub job: String,
    /// The job's state afterwards (`cancelled`, or `succeeded`/`failed` for a job that had already finished).
    pub state: String,
    pub already_cancelled: bool,
    /// The job had finished before; nothing was changed.
    pub already_finished: bool,
    /// Pending tasks now `killed`.
    pub killed_pending: u32,
    /// Tasks that held resources, now `killed` and released from their node (ledger and assignment).
    pub released: u32,
    /// Tasks that had already finished (left as they were).
    pub already_done: u32,
    /// Tasks that kept changing under the cancel and are not killed yet (cancel again).
    pub not_killed: Vec<String>,
}

/// Cancels job `id`. [`Error::NotFound`] if there is no such job.
pub async fn cancel_job(store: &Store, id: &str) -> Result<CancelReport> {
    keys::validate_name("job", id)?;
    let mut out = CancelReport { job: id.to_string(), ..Default::default() };
    let state = mark_cancelled(store, id, &mut out).await?;
    out.state = serde_json::to_value(state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    if out.already_finished {
        return Ok(out);
    }
    for round in 0..ROUNDS {
        let tasks = tasks_of(store, id).await?;
        let mut releases = Vec::new();
        let mut done = 0;
        for t in tasks {
            if t.value.state.is_terminal() {
                done += 1;
            } else {
                releases.push(Release {
                    task: t,
                    state: TaskState::Killed,
                    reason: Some(REASON.into()),
                    run: None,
                    event: Some((EventKind::Stopped, REASON.into())),
                });
            }
        }
        if round == 0 {
            // Later rounds see the tasks killed by earlier ones as finished too.
            out.already_done = done;
        }
        out.not_killed.clear();
        if releases.is_empty() {
            break;
        }
        // Out of discovery first, so no client holds an endpoint whose task is already stopped.
        if let Some((job, _)) = store.get_json::<crate::model::Job>(&store.keys().job(id)).await? {
            let running: Vec<&Task> =
                releases.iter().filter(|r| r.task.value.state == TaskState::Running).map(|r| &*r.task.value).collect();
            crate::discovery::withdraw_tasks(store, &job, &running).await?;
        }
        let outcomes = release(store, &releases).await?;
        for (r, outcome) in releases.iter().zip(outcomes) {
            match outcome {
                ReleaseOutcome::Done { .. } if r.task.value.state.holds_resources() => out.released += 1,
                ReleaseOutcome::Done { .. } => out.killed_pending += 1,
                ReleaseOutcome::TaskChanged
                | ReleaseOutcome::Contention
                | ReleaseOutcome::NodeAlive
                | ReleaseOutcome::Unknown => out.not_killed.push(r.task.value.id.clone()),
            }
        }
        if out.not_killed.is_empty() {
            break;
        }
        if round + 1 < ROUNDS {
            tokio::time::sleep(std::time::Duration::from_millis(20 << round.min(5))).await;
        }
    }
    Ok(out)
}

/// The job's tasks at one revision, in index order.
async fn tasks_of(store: &Store, id: &str) -> Result<Vec<Versioned<Task>>> {
    let (kvs, _) = store.list(&store.keys().tasks_of_job(id), DEFAULT_PAGE_SIZE, None).await?;
    let mut tasks = kvs
        .iter()
        .map(|kv| decode::<Task>(kv).map(|t| Versioned::new(t, kv.mod_revision())))
        .collect::<Result<Vec<_>>>()?;
    tasks.sort_by_key(|t| t.value.index);
    Ok(tasks)
}

/// Sets the job's state to cancelled unless it is over already. Returns the state it ends in.
async fn mark_cancelled(store: &Store, id: &str, out: &mut CancelReport) -> Result<JobState> {
    let key = store.keys().job(id);
    for _ in 0..ROUNDS {
        let Some((job, mod_revision)) = store.get_json::<Job>(&key).await? else {
            return Err(Error::NotFound(format!("job {id}")));
        };
        match job.state {
            JobState::Cancelled => {
                out.already_cancelled = true;
                return Ok(JobState::Cancelled);
            }
            JobState::Succeeded | JobState::Failed => {
                out.already_finished = true;
                return Ok(job.state);
            }
            JobState::Pending | JobState::Running => {}
        }
        if store.set_job_state(&job, mod_revision, JobState::Cancelled).await?.is_some() {
            return Ok(JobState::Cancelled);
        }
        // Someone (its scheduler marking it running) wrote the job meanwhile: read it again.
    }
    Err(Error::KeptChanging(format!("job {id}")))
}
