//! `omctl cancel ID`: mark a job cancelled, then kill its tasks and free the nodes they hold.
//!
//! The job's state goes first (compare-and-swap on its record), so no scheduler takes the job again; its
//! schedulers' claims compare each task's mod_revision, so a task killed here cannot be placed afterwards.
//! Then every unfinished task is released through `omega::release`: pending tasks get their state written,
//! tasks holding resources leave their node's ledger and lose their assignment in the same transaction.
//! A task that changed under us (placed, started) is re-read and released again, a few rounds at most.

use crate::cell;
use crate::cli::{CancelArgs, Cli};
use crate::exit::{user, Code};
use crate::output::emit;
use omega::cell_state::Versioned;
use omega::model::{Job, JobState, TaskState};
use omega::release::{release, Release, ReleaseOutcome};
use omega::store::Store;
use serde::Serialize;

/// Attempts at the job record's compare-and-swap, and rounds of task releases.
const ROUNDS: usize = 8;

/// The reason cancelled tasks carry.
pub const REASON: &str = "cancelled";

/// `omctl cancel ID -o json`.
#[derive(Serialize, Default)]
pub struct CancelOutput {
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
    /// Tasks that kept changing under the cancel and are not killed yet (run the cancel again).
    pub not_killed: Vec<String>,
}

pub async fn run(cli: &Cli, args: &CancelArgs) -> anyhow::Result<Code> {
    cell::check_job_id(&args.id)?;
    let store = crate::connect::connect(cli).await?;
    let out = cancel(&store, &args.id).await?;
    emit(cli.output, &out, || render(&out))?;
    if !out.not_killed.is_empty() {
        return Err(user(format!(
            "{} task(s) of job {} kept changing and are not killed yet ({}); run `omctl cancel {}` again",
            out.not_killed.len(),
            out.job,
            out.not_killed.join(", "),
            out.job
        )));
    }
    Ok(Code::Ok)
}

pub async fn cancel(store: &Store, id: &str) -> anyhow::Result<CancelOutput> {
    let mut out = CancelOutput { job: id.to_string(), ..Default::default() };
    let state = mark_cancelled(store, id, &mut out).await?;
    out.state = crate::units::name(&state);
    if out.already_finished {
        return Ok(out);
    }
    let keys = store.keys();
    for round in 0..ROUNDS {
        let read = cell::read(store, &[keys.tasks_of_job(id)]).await?;
        let mut releases = Vec::new();
        let mut done = 0;
        for t in cell::sorted(read.snapshot.tasks.values()) {
            if t.value.state.is_terminal() {
                done += 1;
            } else {
                releases.push(Release {
                    task: Versioned::clone(t),
                    state: TaskState::Killed,
                    reason: Some(REASON.into()),
                    run: None,
                });
            }
        }
        if round == 0 {
            // Later rounds see the tasks killed by earlier ones as finished too.
            out.already_done = done;
        }
        if releases.is_empty() {
            out.not_killed.clear();
            break;
        }
        let outcomes = release(store, &releases).await?;
        out.not_killed.clear();
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

/// Sets the job's state to cancelled unless it is over already. Returns the state it ends in.
async fn mark_cancelled(store: &Store, id: &str, out: &mut CancelOutput) -> anyhow::Result<JobState> {
    let key = store.keys().job(id);
    for _ in 0..ROUNDS {
        let Some((job, mod_revision)) = store.get_json::<Job>(&key).await? else {
            return Err(user(format!("job {id} not found; `omctl jobs` lists the jobs")));
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
    anyhow::bail!("job {id} kept changing while cancelling it; run `omctl cancel {id}` again")
}

fn render(out: &CancelOutput) -> String {
    if out.already_finished {
        return format!("job {} already {}; nothing to cancel\n", out.job, out.state);
    }
    let mut parts = Vec::new();
    if out.killed_pending > 0 {
        parts.push(format!("{} pending {} killed", out.killed_pending, plural(out.killed_pending, "task", "tasks")));
    }
    if out.released > 0 {
        parts.push(format!(
            "{} running or assigned {} killed and released from {} (ledger freed, assignment removed)",
            out.released,
            plural(out.released, "task", "tasks"),
            plural(out.released, "its node", "their nodes"),
        ));
    }
    if out.already_done > 0 {
        parts.push(format!("{} already finished", out.already_done));
    }
    let what = if parts.is_empty() { "no tasks".to_string() } else { parts.join("; ") };
    if out.already_cancelled {
        let note = if out.killed_pending + out.released == 0 { "; nothing left to do" } else { "" };
        format!("job {} was already cancelled (note: cancelling again is harmless): {what}{note}\n", out.job)
    } else {
        format!("job {} cancelled: {what}\n", out.job)
    }
}

fn plural<'a>(n: u32, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}
