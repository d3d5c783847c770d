//! The drain reconciler: moves service replicas off a draining node, migrating first (see
//! [`omega::model::Drain`]).
//!
//! For each replica on the node it starts a replacement elsewhere (a new pending task of the same version at a
//! fresh index; the node is unschedulable, so it lands elsewhere), at most the job's `update.max_parallel` at
//! a time, and stops the old one once the replacement has been healthy for the job's `min_healthy_time`. At
//! the deadline it stops whatever is left. Progress lives in the drain record, so `omctl drain --wait`,
//! `omctl nodes` and `etcdctl watch` all show it.
//!
//! Jobs with a rollout in progress are left to their deployment until the deadline (two movers of one
//! replica would fight).

use super::{queue::WorkQueue, Object};
use etcd_client::{Compare, CompareOp, TxnOp};
use omega::cell_state::{CellSnapshot, Versioned};
use omega::events::EventKind;
use omega::model::{now_ms, Drain, DrainState, Job, JobKind, JobState, Task, TaskState};
use omega::release::{release_guarded, Fence, Guard, Release, ReleaseOutcome};
use omega::store::Store;
use omega::txn::Group;
use std::collections::BTreeMap;
use std::time::Duration;

/// How often a draining node is looked at without a change notice (replacements turning healthy are task
/// changes, which queue their job, not the node).
const TICK: Duration = Duration::from_millis(500);

/// Replacements started per look, so one transaction stays well inside etcd's limits.
const MAX_CREATE: usize = 32;

/// Counters, for logs and metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Drained {
    pub started: usize,
    pub moved: usize,
    pub forced: usize,
}

pub async fn reconcile(
    store: &Store,
    snapshot: &CellSnapshot,
    fence: &Fence,
    nodes: &[String],
    queue: &mut WorkQueue<Object>,
) -> anyhow::Result<Drained> {
    let mut done = Drained::default();
    for node in nodes {
        let Some(d) = snapshot.drains.get(node.as_str()) else { continue };
        match d.value.state {
            DrainState::Complete => {}
            DrainState::Cancelled => cancel(store, snapshot, fence, d).await?,
            DrainState::Draining => {
                queue.add_after(Object::Node(node.clone()), TICK);
                let step = step(store, snapshot, fence, d).await?;
                done.started += step.started;
                done.moved += step.moved;
                done.forced += step.forced;
            }
        }
    }
    Ok(done)
}

fn job_of<'a>(snapshot: &'a CellSnapshot, t: &Task) -> Option<&'a Versioned<Job>> {
    snapshot.jobs.get(t.job.as_str())
}

/// Withdraws from discovery what `releases` are about to stop, before they are released, so that no client
/// holds an endpoint whose task record is already stopped (the agent withdraws too, but only once it sees the
/// release).
async fn withdraw_first(store: &Store, snapshot: &CellSnapshot, releases: &[Release]) -> anyhow::Result<()> {
    for r in releases.iter().filter(|r| r.task.value.state == TaskState::Running) {
        if let Some(job) = job_of(snapshot, &r.task.value) {
            omega::discovery::withdraw_tasks(store, &job.value, &[&*r.task.value]).await?;
        }
    }
    Ok(())
}

/// Whether a replacement has served long enough for its old replica to stop.
fn counts(job: &Job, t: &Task, now: u64) -> bool {
    let min = job.update.unwrap_or_default().min_healthy_time_ms;
    if !t.is_healthy(!job.checks.is_empty()) {
        return false;
    }
    let started = t.run.as_ref().map_or(t.updated_at_ms, |r| r.started_at_ms);
    let since = started.max(t.health.as_ref().map_or(0, |h| h.since_ms));
    now.saturating_sub(since) >= min
}

async fn step(store: &Store, snapshot: &CellSnapshot, fence: &Fence, d: &Versioned<Drain>) -> anyhow::Result<Drained> {
    let mut done = Drained::default();
    let node = d.value.node.as_str();
    let now = now_ms();
    let on_node: Vec<&Versioned<Task>> = snapshot.tasks_on(node).collect();
    let mut record = (*d.value).clone();
    record.migrations.retain(|old, _| on_node.iter().any(|t| t.value.id == *old));

    if now >= record.deadline_ms {
        let releases: Vec<Release> = on_node
            .iter()
            .map(|t| {
                let (state, reason) = match (record.migrations.get(&t.value.id), job_of(snapshot, &t.value)) {
                    (Some(r), _) => (TaskState::Killed, format!("node {node} drain deadline passed; replaced by {r}")),
                    (None, Some(j)) if j.value.kind == JobKind::Service => {
                        (TaskState::Pending, format!("node {node} drain deadline passed; moving"))
                    }
                    (None, Some(j)) => (j.value.state_after_node_loss(), format!("node {node} drain deadline passed")),
                    (None, None) => (TaskState::Killed, format!("node {node} drain deadline passed")),
                };
                let event = Some((EventKind::Stopped, reason.clone()));
                Release { task: (*t).clone(), state, reason: Some(reason), run: None, event }
            })
            .collect();
        withdraw_first(store, snapshot, &releases).await?;
        let outcomes = release_guarded(store, &releases, Guard { fence: Some(fence), nodes_down: false }).await?;
        let forced = outcomes.iter().filter(|o| matches!(o, ReleaseOutcome::Done { .. })).count();
        record.forced += forced as u32;
        record.migrations.clear();
        record.remaining = (on_node.len() - forced) as u32;
        if record.remaining == 0 {
            record.state = DrainState::Complete;
            record.message = format!("deadline passed: {} stopped on the node", record.forced);
        }
        done.forced = forced;
        if forced > 0 {
            tracing::warn!(node, forced, "drain deadline passed; stopped what was left on the node");
        }
        put_record(store, fence, d, &record, Group::new()).await?;
        return Ok(done);
    }

    // Replacements that serve: their old replicas stop. Replacements that ended: a new one is started.
    let mut retire: Vec<Release> = Vec::new();
    let mut in_flight: BTreeMap<String, u32> = BTreeMap::new();
    for (old, new) in record.migrations.clone() {
        let Some(old_task) = on_node.iter().find(|t| t.value.id == old) else { continue };
        let Some(job) = job_of(snapshot, &old_task.value) else { continue };
        match snapshot.tasks.get(new.as_str()) {
            Some(r) if counts(&job.value, &r.value, now) => {
                let to = r.value.node.clone().unwrap_or_default();
                let why = format!("migrated to {new} on {to}: node {node} drained");
                retire.push(Release {
                    task: (*old_task).clone(),
                    state: TaskState::Killed,
                    reason: Some(why.clone()),
                    run: None,
                    event: Some((EventKind::Stopped, why)),
                });
            }
            Some(r) if !r.value.state.is_terminal() => *in_flight.entry(job.value.id.clone()).or_default() += 1,
            _ => {
                record.migrations.remove(&old);
            }
        }
    }
    if !retire.is_empty() {
        withdraw_first(store, snapshot, &retire).await?;
        let outcomes = release_guarded(store, &retire, Guard { fence: Some(fence), nodes_down: false }).await?;
        for (r, o) in retire.iter().zip(outcomes) {
            if matches!(o, ReleaseOutcome::Done { .. }) {
                record.migrations.remove(&r.task.value.id);
                record.moved += 1;
                done.moved += 1;
            }
        }
        tracing::info!(node, moved = done.moved, "drain: replicas moved once their replacements were healthy");
    }

    // New replacements, per job up to its max_parallel, for replicas without one.
    let mut group = Group::new();
    let mut next_index: BTreeMap<String, (Versioned<Job>, u32)> = BTreeMap::new();
    for t in &on_node {
        if done.started >= MAX_CREATE || record.migrations.contains_key(&t.value.id) {
            continue;
        }
        if retire.iter().any(|r| r.task.value.id == t.value.id) {
            continue;
        }
        let Some(job) = job_of(snapshot, &t.value) else { continue };
        let j = &job.value;
        let rolling = j.deployment.as_ref().is_some_and(|d| d.state.is_active() && d.version == j.version);
        if j.kind != JobKind::Service || !matches!(j.state, JobState::Pending | JobState::Running) || rolling {
            continue;
        }
        let flying = in_flight.entry(j.id.clone()).or_default();
        if *flying >= j.update.unwrap_or_default().max_parallel {
            continue;
        }
        let (_, index) = next_index.entry(j.id.clone()).or_insert_with(|| (job.clone(), j.index_end()));
        let mut replacement = Task::pending(j, *index);
        replacement.version = t.value.version;
        replacement.resources = t.value.resources;
        replacement.priority = t.value.priority;
        let key = store.keys().task(&replacement.id);
        group.compare(&key, Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
        group.put(&key, omega::store::encode(&key, &replacement)?);
        record.migrations.insert(t.value.id.clone(), replacement.id.clone());
        *index += 1;
        *flying += 1;
        done.started += 1;
    }
    for (job, index_end) in next_index.values() {
        let key = store.keys().job(&job.value.id);
        let mut j = (*job.value).clone();
        j.index_end = *index_end;
        group.compare(&key, Compare::mod_revision(key.as_str(), CompareOp::Equal, job.mod_revision));
        group.put(&key, omega::store::encode(&key, &j)?);
    }
    let moved_now = retire.iter().filter(|r| !record.migrations.contains_key(&r.task.value.id)).count();
    record.remaining = (on_node.len() - moved_now.min(on_node.len())) as u32;
    if record.remaining == 0 && record.migrations.is_empty() {
        record.state = DrainState::Complete;
        record.message = "nothing left on the node".into();
        tracing::info!(node, moved = record.moved, "drain complete");
    }
    let changed = record != *d.value || done.started > 0;
    if changed && put_record(store, fence, d, &record, group).await? && done.started > 0 {
        tracing::info!(node, started = done.started, "drain: replacements started elsewhere");
    }
    Ok(done)
}

/// Writes the drain record with `group`'s writes, compared on the record. False: it changed since.
async fn put_record(
    store: &Store,
    fence: &Fence,
    seen: &Versioned<Drain>,
    record: &Drain,
    mut group: Group,
) -> anyhow::Result<bool> {
    let key = store.keys().drain(&record.node);
    group.compare(&key, Compare::mod_revision(key.as_str(), CompareOp::Equal, seen.mod_revision));
    group.put(&key, omega::store::encode(&key, record)?);
    Ok(super::apply_fenced(store, vec![group], fence).await?.first().copied().unwrap_or(false))
}

/// An undone drain: the replacements started for it are stopped (their old replicas stay), the record goes.
async fn cancel(store: &Store, snapshot: &CellSnapshot, fence: &Fence, d: &Versioned<Drain>) -> anyhow::Result<()> {
    let releases: Vec<Release> = d
        .value
        .migrations
        .values()
        .filter_map(|id| snapshot.tasks.get(id.as_str()))
        .filter(|t| !t.value.state.is_terminal())
        .map(|t| Release {
            task: t.clone(),
            state: TaskState::Killed,
            reason: Some(format!("drain of node {} undone; the replica it replaced stays", d.value.node)),
            run: None,
            event: Some((EventKind::Stopped, format!("drain of node {} undone", d.value.node))),
        })
        .collect();
    withdraw_first(store, snapshot, &releases).await?;
    release_guarded(store, &releases, Guard { fence: Some(fence), nodes_down: false }).await?;
    let key = store.keys().drain(&d.value.node);
    let mut g = Group::new();
    g.compare(&key, Compare::mod_revision(key.as_str(), CompareOp::Equal, d.mod_revision));
    g.write(TxnOp::delete(key.as_str(), None), key.len());
    super::apply_fenced(store, vec![g], fence).await?;
    tracing::info!(node = d.value.node, stopped = releases.len(), "drain undone");
    Ok(())
}
