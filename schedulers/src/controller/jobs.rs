//! The job reconciler: what no scheduler owns about a job once its tasks are placed.
//!
//! - **service replicas**: a replica that ended (failed after its restarts, lost, or exited) is handed back to
//!   `pending`, so the service keeps its replica count;
//! - **batch completion**: a batch job whose tasks have all ended is `succeeded` if every task succeeded, else
//!   `failed`;
//! - **garbage collection**: a job that finished (succeeded, failed, cancelled) longer than `gc_after` ago is
//!   deleted with its tasks, status and owner key, so a cell that runs for weeks does not grow without bound;
//!   tasks without a job record (a submission that died half way, written for longer than `orphan_grace`)
//!   are deleted too.

use super::{queue::WorkQueue, ControllerConfig, Object, Reconciled};
use etcd_client::{Compare, CompareOp, DeleteOptions, TxnOp};
use omega::cell_state::{CellSnapshot, Versioned};
use omega::events::EventKind;
use omega::model::{now_ms, JobKind, JobState, Task, TaskState};
use omega::release::{release_guarded, Fence, Guard, Release};
use omega::store::Store;
use omega::txn::Group;
use std::time::Duration;

/// Looks at `jobs`; asks the queue to look again when a finished job becomes old enough to collect.
pub async fn reconcile(
    store: &Store,
    snapshot: &CellSnapshot,
    config: &ControllerConfig,
    fence: &Fence,
    jobs: &[String],
    queue: &mut WorkQueue<Object>,
) -> anyhow::Result<Reconciled> {
    let mut done = Reconciled::default();
    let mut replace: Vec<Release> = Vec::new();
    let mut finished: Vec<(Versioned<omega::model::Job>, JobState)> = Vec::new();
    let mut collect: Vec<Versioned<omega::model::Job>> = Vec::new();
    let mut orphans: Vec<&String> = Vec::new();
    for id in jobs {
        let Some(job) = snapshot.jobs.get(id.as_str()) else {
            if has_tasks(snapshot, id) {
                orphans.push(id);
            }
            continue;
        };
        let j = &job.value;
        let active = matches!(j.state, JobState::Pending | JobState::Running);
        match (j.kind, active) {
            (JobKind::Service, true) => {
                // A deployment decides about the replicas of the version it rolls out (a new replica that
                // ends failed fails the deployment; it is not simply started again).
                let rolling =
                    j.deployment.as_ref().filter(|d| d.version == j.version && d.state.is_active()).map(|d| d.version);
                for t in snapshot.tasks_of(j) {
                    if matches!(t.value.state, TaskState::Failed | TaskState::Lost | TaskState::Succeeded)
                        && !(rolling == Some(t.value.version) && t.value.state != TaskState::Lost)
                    {
                        replace.push(replacement(t));
                    }
                }
                let rolled = super::deployments::reconcile(store, snapshot, fence, job, queue).await?;
                done.deployments.add(rolled);
            }
            (JobKind::Batch, true) => {
                // Every change to a task of the job brings it here: a job with pending work is answered from the
                // snapshot's index, and the walk over its tasks stops at the first one still going.
                if snapshot.pending_count(&j.id) > 0 {
                    continue;
                }
                let (mut present, mut all_succeeded) = (0u32, true);
                let done = snapshot.tasks_of(j).all(|t| {
                    present += 1;
                    all_succeeded &= t.value.state == TaskState::Succeeded;
                    t.value.state.is_terminal()
                });
                if done && present == j.tasks {
                    let state = if all_succeeded { JobState::Succeeded } else { JobState::Failed };
                    finished.push((job.clone(), state));
                }
            }
            (_, false) => {
                let (Some(after), Some(at)) = (config.gc_after, j.finished_at_ms) else { continue };
                let age = Duration::from_millis(now_ms().saturating_sub(at));
                if snapshot.tasks_of(j).any(|t| t.value.state.holds_resources()) {
                    // Its tasks are still being stopped; their releases bring it back here.
                    continue;
                }
                if age >= after {
                    collect.push(job.clone());
                } else {
                    queue.add_after(Object::Job(id.clone()), after - age);
                }
            }
        }
    }
    if !replace.is_empty() {
        done.replaced_replicas = replace.len();
        release_guarded(store, &replace, Guard { fence: Some(fence), nodes_down: false }).await?;
    }
    for (job, state) in finished {
        if store.set_job_state_if(&job.value, job.mod_revision, state, Some(fence.compare())).await?.is_some() {
            done.finished_jobs += 1;
            tracing::info!(job = job.value.id, ?state, "job finished");
            if let Some(after) = config.gc_after {
                queue.add_after(Object::Job(job.value.id.clone()), after);
            }
        }
    }
    if !collect.is_empty() {
        done.collected_jobs = collect_jobs(store, &collect, fence).await?;
    }
    for id in orphans {
        match store.delete_orphan_tasks(id, config.orphan_grace, Some(fence.compare())).await? {
            Some(n) => {
                done.collected_orphans += n as usize;
                tracing::info!(job = id, tasks = n, "collected the tasks of a submission that never completed");
            }
            // Too young (or its submission moved on): look again once the grace could have run out.
            None => queue.add_after(Object::Job(id.clone()), config.orphan_grace),
        }
    }
    Ok(done)
}

/// Whether `job`'s tasks are in the snapshot (a submission writes them from index 0 up).
pub fn has_tasks(snapshot: &CellSnapshot, job: &str) -> bool {
    snapshot.tasks.contains_key(omega::keys::task_id(job, 0).as_str())
}

fn replacement(t: &Versioned<Task>) -> Release {
    let why = format!("replacing a replica that ended {}", t.value.state);
    Release {
        task: t.clone(),
        state: TaskState::Pending,
        reason: Some(why.clone()),
        run: None,
        event: Some((EventKind::Rescheduled, why)),
    }
}

/// Deletes finished jobs that hold nothing: each job with its tasks, status and owner in one group, compared
/// on the job record and the fence.
pub(super) async fn collect_jobs(
    store: &Store,
    jobs: &[Versioned<omega::model::Job>],
    fence: &Fence,
) -> anyhow::Result<usize> {
    let keys = store.keys();
    let mut groups = Vec::with_capacity(jobs.len());
    for job in jobs {
        let id = &job.value.id;
        let job_key = keys.job(id);
        let tasks = keys.tasks_of_job(id);
        let mut g = Group::new();
        g.compare(&job_key, Compare::mod_revision(job_key.as_str(), CompareOp::Equal, job.mod_revision));
        g.delete(&job_key);
        let range = DeleteOptions::new().with_range(omega::keys::prefix_end(tasks.as_bytes()));
        g.write(TxnOp::delete(tasks.as_str(), Some(range)), tasks.len() * 2);
        g.delete(&keys.status(id)).delete(&keys.owner(id));
        let versions = keys.versions_of(id);
        let range = DeleteOptions::new().with_range(omega::keys::prefix_end(versions.as_bytes()));
        g.write(TxnOp::delete(versions.as_str(), Some(range)), versions.len() * 2);
        groups.push(g);
    }
    let ids: Vec<&str> = jobs.iter().map(|j| j.value.id.as_str()).collect();
    let applied = super::apply_fenced(store, groups, fence).await?;
    for (id, _) in ids.iter().zip(&applied).filter(|(_, done)| **done) {
        tracing::info!(job = id, "finished job collected");
    }
    Ok(applied.iter().filter(|d| **d).count())
}
