//! How a service moves from one version to the next: the job file's `update` policy, and the deployment record
//! the controller keeps in the job while it rolls a version out.
//!
//! The semantics are Nomad's `update` block, with two of its users' complaints fixed by construction:
//! - new replicas are started **beside** the old ones and an old replica is stopped only once a new one has
//!   been healthy for `min_healthy_time`, so a failed update never costs a healthy old replica (nomad #6864)
//!   and the job never has fewer healthy replicas than `count - max_parallel`;
//! - an automatic revert goes straight back to the last stable version, without a canary phase (nomad #10882).

use crate::model::{Job, JobState, Task, TaskState};
use serde::{Deserialize, Serialize};

/// A job file's `update:` block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatePolicy {
    /// New replicas started at once (beside the old ones), and the most old replicas that may be away at once.
    #[serde(default = "one")]
    pub max_parallel: u32,
    /// How long a new replica must stay healthy before it counts (and an old one is stopped for it).
    #[serde(default = "ten_seconds")]
    pub min_healthy_time_ms: u64,
    /// A new replica not healthy this long after it was placed fails the deployment.
    #[serde(default = "five_minutes")]
    pub healthy_deadline_ms: u64,
    /// The deployment fails when no replica turned healthy for this long.
    #[serde(default = "ten_minutes")]
    pub progress_deadline_ms: u64,
    /// Replicas of the new version started beside all old ones first; the update waits for `omctl promote`
    /// (or `auto_promote`) once they are healthy. `canary` = count is a blue/green deployment.
    #[serde(default)]
    pub canary: u32,
    /// Promote the canaries by itself once they are all healthy.
    #[serde(default)]
    pub auto_promote: bool,
    /// When the deployment fails, go back to the last stable version (without a canary phase).
    #[serde(default)]
    pub auto_revert: bool,
}

fn one() -> u32 {
    1
}
fn ten_seconds() -> u64 {
    10_000
}
fn five_minutes() -> u64 {
    300_000
}
fn ten_minutes() -> u64 {
    600_000
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            max_parallel: 1,
            min_healthy_time_ms: ten_seconds(),
            healthy_deadline_ms: five_minutes(),
            progress_deadline_ms: ten_minutes(),
            canary: 0,
            auto_promote: false,
            auto_revert: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Replacing old replicas (or placing canaries).
    Running,
    /// Canaries are healthy; waiting for `omctl promote`.
    AwaitingPromotion,
    /// Every replica runs the new version and was healthy; the version is now stable.
    Succeeded,
    /// A deadline passed or a new replica stayed unhealthy; nothing more is replaced. With `auto_revert`, a
    /// revert deployment follows.
    Failed,
    /// A newer version was submitted before this one finished.
    Superseded,
    /// Cancelled with the job.
    Cancelled,
}

impl DeploymentState {
    pub fn is_active(self) -> bool {
        matches!(self, DeploymentState::Running | DeploymentState::AwaitingPromotion)
    }
}

impl std::fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeploymentState::Running => "running",
            DeploymentState::AwaitingPromotion => "awaiting promotion",
            DeploymentState::Succeeded => "succeeded",
            DeploymentState::Failed => "failed",
            DeploymentState::Superseded => "superseded",
            DeploymentState::Cancelled => "cancelled",
        })
    }
}

/// The rollout of one version, kept in the job record (so every reader of the job sees its progress).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// The version being rolled out (the job's current version).
    pub version: u32,
    pub state: DeploymentState,
    pub started_ms: u64,
    /// When a replica last turned healthy (or the deployment started): `progress_deadline` counts from here.
    pub progress_ms: u64,
    /// Canaries to run before promotion (0: none, or a revert, which skips the canary phase).
    #[serde(default)]
    pub canaries: u32,
    /// The canaries were promoted (by `omctl promote` or `auto_promote`).
    #[serde(default)]
    pub promoted: bool,
    /// New-version replicas that have counted as healthy.
    #[serde(default)]
    pub healthy: u32,
    /// New-version replicas that failed (unhealthy past the deadline, or ended).
    #[serde(default)]
    pub unhealthy: u32,
    /// This deployment reverts to this version's spec (by `omctl revert` or `auto_revert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<u32>,
    /// Tasks of this version run the same containers as the new one (a change of count, priority or policy
    /// only, or a revert to it): they are relabelled to the new version instead of being replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt: Option<u32>,
    /// What happened last, in words (why it failed, what it waits for).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The job as its file says it: the record without what the cell adds (state, times, version bookkeeping).
pub fn spec_of(job: &Job) -> Job {
    Job {
        state: JobState::Pending,
        submitted_at_ms: 0,
        finished_at_ms: None,
        version: 0,
        stable: false,
        deployment: None,
        index_end: 0,
        ..job.clone()
    }
}

/// Whether two versions run the same containers, so that one's tasks can simply be relabelled as the other's
/// (Nomad's in-place update): everything but the count, priority, update and restart policies must match.
pub fn runs_same(a: &Job, b: &Job) -> bool {
    let strip = |j: &Job| Job {
        tasks: 0,
        priority: 0,
        update: None,
        restart: crate::model::RestartPolicy::default(),
        ..spec_of(j)
    };
    strip(a) == strip(b)
}

/// One top-level field of the job file that differs between two versions, as the file would show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    pub field: String,
    /// The field's lines in the old version's file (empty: absent).
    pub old: String,
    pub new: String,
}

/// What changed from `old` to `new`, field by field of the canonical job file (what `omctl job history` and
/// `omctl submit --dry-run` show).
pub fn diff(old: &Job, new: &Job) -> Vec<FieldChange> {
    let a = fields(&crate::job_spec::to_yaml(&spec_of(old)));
    let b = fields(&crate::job_spec::to_yaml(&spec_of(new)));
    let mut names: Vec<&String> = a.iter().map(|(k, _)| k).collect();
    for (k, _) in &b {
        if !names.contains(&k) {
            names.push(k);
        }
    }
    let get =
        |m: &[(String, String)], k: &str| m.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
    names
        .into_iter()
        .filter_map(|k| {
            let (o, n) = (get(&a, k), get(&b, k));
            (o != n).then(|| FieldChange { field: k.clone(), old: o, new: n })
        })
        .collect()
}

/// The job file's top-level fields: each with its lines (a field's block runs until the next unindented line).
fn fields(yaml: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in yaml.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let top = !line.starts_with(' ') && !line.starts_with('-');
        match (top, line.split_once(':'), out.last_mut()) {
            (true, Some((name, _)), _) => out.push((name.to_string(), line.to_string())),
            (_, _, Some((_, block))) => {
                block.push('\n');
                block.push_str(line);
            }
            _ => {}
        }
    }
    out
}

/// The rollout of a service's first version: nothing to replace, but it makes the version stable once every
/// replica has been healthy (what `auto_revert` later goes back to).
pub fn first(job: &Job, now_ms: u64) -> Deployment {
    Deployment {
        version: job.version,
        state: DeploymentState::Running,
        started_ms: now_ms,
        progress_ms: now_ms,
        canaries: 0,
        promoted: false,
        healthy: 0,
        unhealthy: 0,
        reverts: None,
        adopt: None,
        message: String::new(),
    }
}

/// The record of a new version of `current` whose file says `spec`: the next version number, the current
/// state and indexes carried over, and a deployment that rolls it out (or relabels, when only count,
/// priority or policies changed).
pub fn next_version(current: &Job, spec: &Job, now_ms: u64) -> Job {
    let in_place = runs_same(current, spec);
    let policy = spec.update.unwrap_or_default();
    let version = current.version + 1;
    Job {
        version,
        state: current.state,
        submitted_at_ms: now_ms,
        finished_at_ms: None,
        stable: false,
        index_end: current.index_end(),
        deployment: Some(Deployment {
            version,
            state: DeploymentState::Running,
            started_ms: now_ms,
            progress_ms: now_ms,
            canaries: if in_place { 0 } else { policy.canary.min(spec.tasks) },
            promoted: false,
            healthy: 0,
            unhealthy: 0,
            reverts: None,
            adopt: in_place.then_some(current.version),
            message: String::new(),
        }),
        ..spec_of(spec)
    }
}

/// The record that reverts `current` to the earlier version `to`: a copy of `to`'s spec as a new version,
/// whose deployment adopts the tasks still running `to` and skips the canary phase (nomad #10882).
pub fn revert_version(current: &Job, to: &Job, now_ms: u64) -> Job {
    let mut next = next_version(current, to, now_ms);
    if let Some(d) = next.deployment.as_mut() {
        d.canaries = 0;
        d.reverts = Some(to.version);
        d.adopt = Some(to.version);
    }
    next
}

/// What the controller does next for a job with a deployment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Tasks of the adopted version to relabel as the new one (done first, alone).
    pub adopt: Vec<String>,
    /// New replicas of the new version to create (pending, at fresh indexes).
    pub create: u32,
    /// Replicas to stop for good, with why.
    pub retire: Vec<(String, String)>,
    /// The deployment as it is after this step, when it changed.
    pub deployment: Option<Deployment>,
    /// The version becomes stable (its deployment succeeded).
    pub stable: bool,
    /// The deployment failed and `auto_revert` asks to go back.
    pub revert: bool,
}

impl Step {
    pub fn is_empty(&self) -> bool {
        *self == Step::default()
    }
}

/// When a replica counts as healthy for a deployment: serving (running, checks passing when the job has
/// any) for at least `min_healthy_ms`.
fn healthy_since(t: &Task, has_checks: bool) -> Option<u64> {
    if !t.is_healthy(has_checks) {
        return None;
    }
    let started = t.run.as_ref().map_or(t.updated_at_ms, |r| r.started_at_ms);
    let health = t.health.as_ref().map_or(0, |h| h.since_ms);
    Some(started.max(health))
}

/// Decides the next step of `job`'s deployment from its live tasks (not retired), at `now_ms`.
///
/// The rules, in order: adopt (relabel) first; with canaries not yet promoted, keep `canaries` new replicas
/// beside all old ones and wait for them to be healthy; then keep at most `max_parallel` new replicas that are
/// not healthy yet, and stop one old replica for each new one that has been healthy for `min_healthy_time`
/// (so the healthy count never falls because of the update); fail on a new replica that is unhealthy, ended
/// failed, or not healthy `healthy_deadline` after it started, or when nothing turned healthy for
/// `progress_deadline`.
pub fn plan(job: &Job, tasks: &[&Task], now_ms: u64) -> Step {
    let mut step = Step::default();
    let Some(d) = job.deployment.as_ref().filter(|d| d.version == job.version) else {
        return step;
    };
    let policy = job.update.unwrap_or_default();
    let has_checks = !job.checks.is_empty();
    if d.state == DeploymentState::Failed {
        // Stays failed: while old replicas serve, the new ones that do not are kept stopped. A first version
        // has nothing older: its replicas stay, restarted and rescheduled like any service's.
        if tasks.iter().any(|t| t.version != job.version) {
            for t in tasks.iter().filter(|t| t.version == job.version && healthy_since(t, has_checks).is_none()) {
                step.retire.push((t.id.clone(), format!("deployment of version {} failed", job.version)));
            }
        }
        step.revert = policy.auto_revert && d.reverts.is_none();
        return step;
    }
    if !d.state.is_active() {
        return step;
    }
    if let Some(adopt) = d.adopt {
        step.adopt =
            tasks.iter().filter(|t| t.version == adopt && t.version != job.version).map(|t| t.id.clone()).collect();
        if !step.adopt.is_empty() {
            return step;
        }
    }
    let (new, old): (Vec<&Task>, Vec<&Task>) = tasks.iter().copied().partition(|t| t.version == job.version);
    let counts =
        |t: &Task| healthy_since(t, has_checks).is_some_and(|s| now_ms.saturating_sub(s) >= policy.min_healthy_time_ms);
    let healthy_new = new.iter().filter(|t| counts(t)).count() as u32;
    let mut next = d.clone();
    if healthy_new > d.healthy {
        next.progress_ms = now_ms;
    }
    next.healthy = healthy_new;

    let failure = new.iter().find_map(|t| {
        if t.health.as_ref().is_some_and(|h| h.status == crate::health::HealthStatus::Unhealthy) {
            let why = t.health.as_ref().map(|h| h.message.as_str()).unwrap_or("");
            return Some(format!("replica {} of version {} is unhealthy: {why}", t.id, job.version));
        }
        if t.state == TaskState::Failed {
            return Some(format!(
                "replica {} of version {} failed: {}",
                t.id,
                job.version,
                t.reason.as_deref().unwrap_or("it ended")
            ));
        }
        let started = t.run.as_ref().map_or(0, |r| r.started_at_ms);
        (t.state == TaskState::Running
            && started > 0
            && healthy_since(t, has_checks).is_none()
            && now_ms.saturating_sub(started) > policy.healthy_deadline_ms)
            .then(|| {
                format!(
                    "replica {} of version {} was not healthy within the healthy deadline ({})",
                    t.id,
                    job.version,
                    crate::units::span(policy.healthy_deadline_ms)
                )
            })
    });
    let stalled = now_ms.saturating_sub(next.progress_ms) > policy.progress_deadline_ms;
    if failure.is_some() || stalled {
        next.state = DeploymentState::Failed;
        next.unhealthy = new.iter().filter(|t| !counts(t)).count() as u32;
        next.message = failure.unwrap_or_else(|| {
            format!(
                "no replica of version {} turned healthy within the progress deadline ({})",
                job.version,
                crate::units::span(policy.progress_deadline_ms)
            )
        });
        // The old replicas stay; the new ones that do not serve are stopped (they would only crash-loop).
        for t in new.iter().filter(|t| !counts(t)) {
            step.retire.push((t.id.clone(), format!("deployment of version {} failed", job.version)));
        }
        step.revert = policy.auto_revert;
        step.deployment = Some(next);
        return step;
    }

    let live_new = new.len() as u32;
    if d.canaries > 0 && !d.promoted {
        step.create = d.canaries.saturating_sub(live_new);
        if healthy_new >= d.canaries {
            if policy.auto_promote {
                next.promoted = true;
                next.state = DeploymentState::Running;
                next.message = format!("{} canaries healthy; promoted automatically", d.canaries);
            } else {
                next.state = DeploymentState::AwaitingPromotion;
                next.message = format!("{} canaries healthy; promote with `omctl promote {}`", d.canaries, job.id);
            }
        } else {
            next.message = format!("{healthy_new} of {} canaries healthy", d.canaries);
        }
    } else {
        let in_flight = live_new - healthy_new.min(live_new);
        let want_new = job.tasks.saturating_sub(live_new);
        step.create = policy.max_parallel.saturating_sub(in_flight).min(want_new);
        // One old replica stopped for each new one that counts, never more: the old ones that do not serve go
        // first, then the newest.
        let keep_old = job.tasks.saturating_sub(healthy_new) as usize;
        let mut old_sorted: Vec<&&Task> = old.iter().collect();
        old_sorted.sort_by_key(|t| (t.is_healthy(t.health.is_some()), std::cmp::Reverse(t.index)));
        for t in old_sorted.iter().take(old.len().saturating_sub(keep_old)) {
            step.retire.push((t.id.clone(), format!("replaced by version {}", job.version)));
        }
        // A lower count: the new replicas beyond it that serve least go.
        if live_new > job.tasks {
            let mut extra: Vec<&&Task> = new.iter().collect();
            extra.sort_by_key(|t| (counts(t), std::cmp::Reverse(t.index)));
            for t in extra.iter().take((live_new - job.tasks) as usize) {
                step.retire.push((t.id.clone(), format!("scaled down to {}", job.tasks)));
            }
        }
        next.message = format!(
            "{healthy_new} of {} replicas of version {} healthy; {} old left",
            job.tasks,
            job.version,
            old.len()
        );
        if old.is_empty() && healthy_new >= job.tasks && live_new <= job.tasks {
            next.state = DeploymentState::Succeeded;
            next.message = format!("all {} replicas of version {} healthy", job.tasks, job.version);
            step.stable = true;
        }
    }
    if next != *d {
        step.deployment = Some(next);
    }
    step
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobKind, RunInfo};
    use crate::resources::Resources;

    fn job(tasks: u32, policy: UpdatePolicy) -> Job {
        let mut j = Job::new("web", JobKind::Service, tasks, Resources::new(100, 1 << 20));
        j.image = "img:1".into();
        j.update = Some(policy);
        j
    }

    fn running(j: &Job, index: u32, started: u64) -> Task {
        let mut t = Task::pending(j, index);
        t.state = TaskState::Running;
        t.run = Some(RunInfo { started_at_ms: started, ..Default::default() });
        t
    }

    fn policy() -> UpdatePolicy {
        UpdatePolicy { max_parallel: 2, min_healthy_time_ms: 1000, ..UpdatePolicy::default() }
    }

    #[test]
    fn a_count_change_is_in_place_and_an_image_change_is_not() {
        let v0 = job(3, policy());
        let mut more = spec_of(&v0);
        more.tasks = 5;
        let v1 = next_version(&v0, &more, 10);
        assert_eq!(v1.version, 1);
        assert_eq!(v1.deployment.as_ref().and_then(|d| d.adopt), Some(0));
        let mut image = spec_of(&v0);
        image.image = "img:2".into();
        let v1 = next_version(&v0, &image, 10);
        assert_eq!(v1.deployment.as_ref().and_then(|d| d.adopt), None);
        let changes = diff(&v0, &v1);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].field, "image");
    }

    #[test]
    fn rolling_starts_max_parallel_beside_the_old_and_stops_one_old_per_healthy_new() {
        let v0 = job(10, policy());
        let mut spec = spec_of(&v0);
        spec.image = "img:2".into();
        let v1 = next_version(&v0, &spec, 0);
        let old: Vec<Task> = (0..10).map(|i| running(&v0, i, 0)).collect();
        let refs: Vec<&Task> = old.iter().collect();
        let s = plan(&v1, &refs, 100);
        assert_eq!((s.create, s.retire.len()), (2, 0), "two new beside ten old, none stopped");

        // Two new ones running for long enough: two old go, two more new come.
        let mut all = old.clone();
        all.push(running(&v1, 10, 0));
        all.push(running(&v1, 11, 0));
        let refs: Vec<&Task> = all.iter().collect();
        let s = plan(&v1, &refs, 500);
        assert_eq!((s.create, s.retire.len()), (0, 0), "not healthy for min_healthy_time yet");
        let s = plan(&v1, &refs, 5_000);
        assert_eq!((s.create, s.retire.len()), (2, 2));
        assert!(s.retire.iter().all(|(id, _)| id == "web/9" || id == "web/8"), "{:?}", s.retire);
    }

    #[test]
    fn a_failing_new_replica_fails_the_deployment_and_keeps_the_old() {
        let mut p = policy();
        p.auto_revert = true;
        let v0 = job(4, p);
        let mut spec = spec_of(&v0);
        spec.image = "img:bad".into();
        let v1 = next_version(&v0, &spec, 0);
        let mut all: Vec<Task> = (0..4).map(|i| running(&v0, i, 0)).collect();
        let mut bad = running(&v1, 4, 0);
        bad.state = TaskState::Failed;
        all.push(bad);
        let refs: Vec<&Task> = all.iter().collect();
        let s = plan(&v1, &refs, 100);
        assert_eq!(s.deployment.as_ref().map(|d| d.state), Some(DeploymentState::Failed));
        assert!(s.revert);
        assert_eq!(s.retire, vec![("web/4".to_string(), "deployment of version 1 failed".to_string())]);
    }

    #[test]
    fn canaries_wait_for_promotion_and_a_revert_skips_them() {
        let mut p = policy();
        p.canary = 1;
        let v0 = job(3, p);
        let mut spec = spec_of(&v0);
        spec.image = "img:2".into();
        let v1 = next_version(&v0, &spec, 0);
        let mut all: Vec<Task> = (0..3).map(|i| running(&v0, i, 0)).collect();
        let refs: Vec<&Task> = all.iter().collect();
        assert_eq!(plan(&v1, &refs, 10).create, 1);
        all.push(running(&v1, 3, 0));
        let refs: Vec<&Task> = all.iter().collect();
        let s = plan(&v1, &refs, 5_000);
        assert_eq!((s.create, s.retire.len()), (0, 0));
        assert_eq!(s.deployment.map(|d| d.state), Some(DeploymentState::AwaitingPromotion));

        let back = revert_version(&v1, &v0, 6_000);
        assert_eq!(back.deployment.as_ref().map(|d| (d.canaries, d.adopt, d.reverts)), Some((0, Some(0), Some(0))));
        let s = plan(&back, &refs, 6_000);
        assert_eq!(s.adopt, vec!["web/0".to_string(), "web/1".into(), "web/2".into()]);
    }

    #[test]
    fn all_new_and_healthy_succeeds() {
        let v0 = job(2, policy());
        let mut spec = spec_of(&v0);
        spec.image = "img:2".into();
        let v1 = next_version(&v0, &spec, 0);
        let all: Vec<Task> = (2..4).map(|i| running(&v1, i, 0)).collect();
        let refs: Vec<&Task> = all.iter().collect();
        let s = plan(&v1, &refs, 5_000);
        assert!(s.stable);
        assert_eq!(s.deployment.map(|d| d.state), Some(DeploymentState::Succeeded));
    }
}
