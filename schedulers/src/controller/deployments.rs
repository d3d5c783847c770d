//! The deployment reconciler: rolls a service to its current version, one step per look.
//!
//! What to do is decided by [`omega::deployment::plan`] (pure, unit-tested); this module only carries a step
//! out, each part as its own fenced write so a step that fails half way is simply decided again:
//! 1. adopt: relabel the tasks of a version that runs the same containers (a count change, a revert) as the
//!    new version, compared on each task;
//! 2. the job record (deployment progress, `stable`, `index_end`) with the new replicas, pending at fresh
//!    indexes, in one transaction compared on the record (and the new task keys being absent);
//! 3. retire: old replicas stopped for good (`killed`, released from their nodes like a cancel) once new ones
//!    serve;
//! 4. auto-revert: a failed deployment of a job with `auto_revert` submits the last stable version again as a
//!    new version that adopts that version's surviving replicas.
//!
//! Retired tasks are deleted once no deployment of the job is in progress, so the job's records show what an
//! update stopped while it runs, and a long-lived service does not accumulate them.

use super::{queue::WorkQueue, Object};
use etcd_client::{Compare, CompareOp, TxnOp};
use omega::cell_state::{CellSnapshot, Versioned};
use omega::deployment::{self, DeploymentState};
use omega::events::EventKind;
use omega::model::{now_ms, Job, JobKind, JobState, Task, TaskState};
use omega::release::{release_guarded, Fence, Guard, Release};
use omega::store::Store;
use omega::txn::Group;
use std::time::Duration;

/// How often a job with a deployment in progress is looked at without a change notice: the time-based
/// conditions (min_healthy_time, the deadlines) need it.
const TICK: Duration = Duration::from_millis(500);

/// Marks a failed deployment that `auto_revert` could not revert (no stable version), so it is tried once.
const NO_STABLE: &str = "; no stable version to revert to";

/// Counters, for logs and metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rolled {
    pub adopted: usize,
    pub created: usize,
    pub retired: usize,
    pub deleted: usize,
    pub reverts: usize,
    pub succeeded: usize,
    pub failed: usize,
}

impl Rolled {
    pub fn add(&mut self, o: Rolled) {
        self.adopted += o.adopted;
        self.created += o.created;
        self.retired += o.retired;
        self.deleted += o.deleted;
        self.reverts += o.reverts;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
    }

    pub fn total(&self) -> usize {
        self.adopted + self.created + self.retired + self.deleted + self.reverts + self.succeeded + self.failed
    }
}

/// Looks at one active service job.
pub async fn reconcile(
    store: &Store,
    snapshot: &CellSnapshot,
    fence: &Fence,
    job: &Versioned<Job>,
    queue: &mut WorkQueue<Object>,
) -> anyhow::Result<Rolled> {
    let j: &Job = &job.value;
    let mut done = Rolled::default();
    if j.kind != JobKind::Service || !matches!(j.state, JobState::Pending | JobState::Running) {
        return Ok(done);
    }
    if j.deployment.is_none() {
        // A service submitted as it is: its first version gets a rollout of its own, to become stable.
        let mut record = j.clone();
        record.deployment = Some(deployment::first(j, now_ms()));
        let applied = store.put_job_if(&record, job.mod_revision, Some(fence.compare())).await?;
        if applied.is_some() {
            queue.add_after(Object::Job(j.id.clone()), TICK);
        }
        return Ok(done);
    }
    let tasks: Vec<&Versioned<Task>> = snapshot.tasks_of(j).collect();
    let live: Vec<&Task> = tasks.iter().filter(|t| t.value.state != TaskState::Killed).map(|t| &*t.value).collect();
    let active = j.deployment.as_ref().is_some_and(|d| d.state.is_active() && d.version == j.version);
    if active {
        queue.add_after(Object::Job(j.id.clone()), TICK);
    } else {
        let retired: Vec<&Versioned<Task>> =
            tasks.iter().copied().filter(|t| t.value.state == TaskState::Killed).collect();
        done.deleted = delete_retired(store, fence, &retired).await?;
    }
    let now = now_ms();
    let step = deployment::plan(j, &live, now);

    if !step.adopt.is_empty() {
        let groups = step
            .adopt
            .iter()
            .filter_map(|id| snapshot.tasks.get(id.as_str()))
            .map(|t| {
                let mut relabelled = (*t.value).clone();
                relabelled.version = j.version;
                task_put(store, t, &relabelled)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let applied = super::apply_fenced(store, groups, fence).await?;
        done.adopted = applied.iter().filter(|a| **a).count();
        tracing::info!(
            job = j.id,
            version = j.version,
            tasks = done.adopted,
            "adopted replicas of a version that runs the same"
        );
        return Ok(done);
    }

    if step.create > 0 || step.deployment.is_some() || step.stable {
        let mut record = j.clone();
        if let Some(d) = &step.deployment {
            record.deployment = Some(d.clone());
        }
        record.stable |= step.stable;
        let first = j.index_end();
        record.index_end = first + step.create;
        let job_key = store.keys().job(&j.id);
        let mut g = Group::new();
        g.compare(&job_key, Compare::mod_revision(job_key.as_str(), CompareOp::Equal, job.mod_revision));
        g.put(&job_key, omega::store::encode(&job_key, &record)?);
        for index in first..first + step.create {
            let task = Task::pending(&record, index);
            let key = store.keys().task(&task.id);
            g.compare(&key, Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
            g.put(&key, omega::store::encode(&key, &task)?);
        }
        let applied = super::apply_fenced(store, vec![g], fence).await?;
        if !applied.first().copied().unwrap_or(false) {
            // The record or a task changed under us: the change notice brings the job back.
            return Ok(done);
        }
        done.created = step.create as usize;
        if let Some(d) = &step.deployment {
            if d.state != j.deployment.as_ref().map_or(d.state, |old| old.state) || step.create > 0 {
                tracing::info!(job = j.id, version = j.version, state = %d.state, created = step.create, "{}", d.message);
            }
            match d.state {
                DeploymentState::Succeeded => done.succeeded += 1,
                DeploymentState::Failed => done.failed += 1,
                _ => {}
            }
        }
    }

    if !step.retire.is_empty() {
        let releases: Vec<Release> = step
            .retire
            .iter()
            .filter_map(|(id, why)| {
                snapshot.tasks.get(id.as_str()).map(|t| Release {
                    task: t.clone(),
                    state: TaskState::Killed,
                    reason: Some(format!("retired: {why}")),
                    run: None,
                    event: Some((EventKind::Stopped, format!("retired: {why}"))),
                })
            })
            .collect();
        // Out of discovery first, so no client holds an endpoint whose task is already stopped.
        let retiring: Vec<&Task> = releases.iter().map(|r| &*r.task.value).collect();
        omega::discovery::withdraw_tasks(store, j, &retiring).await?;
        release_guarded(store, &releases, Guard { fence: Some(fence), nodes_down: false }).await?;
        done.retired = releases.len();
    }

    if step.revert {
        done.reverts = auto_revert(store, fence, job).await?;
    }
    Ok(done)
}

/// Goes back to the newest stable version before the current one: a copy of it as a new version.
async fn auto_revert(store: &Store, fence: &Fence, job: &Versioned<Job>) -> anyhow::Result<usize> {
    let j: &Job = &job.value;
    let Some(d) = j.deployment.as_ref() else { return Ok(0) };
    if d.reverts.is_some() || d.message.ends_with(NO_STABLE) {
        // A revert that fails is not reverted again (that would loop); nor is one with nothing to go back to.
        return Ok(0);
    }
    let earlier = store.earlier_versions(&j.id).await?;
    let Some(stable) = earlier.iter().rev().find(|v| v.stable && v.version < j.version) else {
        let mut record = j.clone();
        if let Some(d) = record.deployment.as_mut() {
            d.message.push_str(NO_STABLE);
        }
        store.put_job_if(&record, job.mod_revision, Some(fence.compare())).await?;
        tracing::warn!(job = j.id, version = j.version, "deployment failed; no stable version to revert to");
        return Ok(0);
    };
    let next = deployment::revert_version(j, stable, now_ms());
    match store.put_next_version(j, job.mod_revision, &next, Some(fence.compare())).await? {
        Some(_) => {
            tracing::warn!(
                job = j.id,
                failed = j.version,
                to = stable.version,
                version = next.version,
                "deployment failed; reverting to the last stable version"
            );
            Ok(1)
        }
        None => Ok(0),
    }
}

/// Deletes retired tasks (they hold nothing), each compared on its revision.
async fn delete_retired(store: &Store, fence: &Fence, retired: &[&Versioned<Task>]) -> anyhow::Result<usize> {
    if retired.is_empty() {
        return Ok(0);
    }
    let groups: Vec<Group> = retired
        .iter()
        .map(|t| {
            let key = store.keys().task(&t.value.id);
            let mut g = Group::new();
            g.compare(&key, Compare::mod_revision(key.as_str(), CompareOp::Equal, t.mod_revision));
            g.write(TxnOp::delete(key.as_str(), None), key.len());
            g
        })
        .collect();
    let applied = super::apply_fenced(store, groups, fence).await?;
    Ok(applied.iter().filter(|a| **a).count())
}

fn task_put(store: &Store, seen: &Versioned<Task>, new: &Task) -> anyhow::Result<Group> {
    let key = store.keys().task(&seen.value.id);
    let mut g = Group::new();
    g.compare(&key, Compare::mod_revision(key.as_str(), CompareOp::Equal, seen.mod_revision));
    g.put(&key, omega::store::encode(&key, new)?);
    Ok(g)
}
