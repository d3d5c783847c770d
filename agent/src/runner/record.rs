//! What a task runner writes to etcd, each write guarded by the task's mod_revision and retried until it
//! settles: `running` when a run starts (with health `starting` when its job has checks), each health
//! transition (with its event), the next run before a restart, and the end (a release, which also frees the
//! ledger and deletes the assignment). A write whose answer was lost is settled by reading the task
//! again: the record either already says what was written, or is no longer this assignment's.

use super::{container_id, Run, TaskRunner};
use crate::error::Result;
use crate::supervisor::{stop_requested, Backoff};
use omega::cell_state::Versioned;
use omega::events::EventKind;
use omega::health::{Health, HealthStatus};
use omega::model::{now_ms, Assignment, RunInfo, Task, TaskState};
use omega::release::{release, update_task, Release, ReleaseOutcome};
use std::time::Duration;
use tokio::sync::watch;

/// What a guarded write found.
pub(super) enum Written {
    Done,
    /// The task is no longer this placement's, holding resources here: someone else decided its fate.
    NotOurs,
    /// The runner was told to stop meanwhile.
    Stopped,
}

impl TaskRunner {
    /// Writes `running` for `run`, retried until it lands or the task is no longer ours. The task's timeline
    /// gains `Started`, except for a run the `Restarted` just before it announced: a crash loop then stays one
    /// coalesced `Restarted` instead of alternating with starts that never coalesce. `checked`: the job has
    /// checks, so the run's health starts as `starting` in the same write.
    pub(super) async fn record_running(
        &self,
        run: &Run,
        checked: bool,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Written> {
        let info = RunInfo {
            container: run.container.clone(),
            pid: run.pid,
            started_at_ms: run.started_at_ms,
            restarts: run.number,
            ..Default::default()
        };
        let started = started(self.a(), run.number);
        self.write_own(stop, |t| {
            if t.state == TaskState::Running && t.run.as_ref() == Some(&info) {
                return None;
            }
            let mut new = t.clone();
            new.state = TaskState::Running;
            new.run = Some(info.clone());
            let announced = run.number > 0 && t.events.last().is_some_and(|e| e.kind == EventKind::Restarted);
            if !announced {
                new.record_event(EventKind::Started, started.clone(), run.started_at_ms);
            }
            if checked {
                new.health =
                    Some(Health { status: HealthStatus::Starting, since_ms: now_ms(), message: String::new() });
            }
            Some(new)
        })
        .await
    }

    /// Writes a health transition of the current run, with its event (`kind`, saying `event`).
    pub(super) async fn record_health(
        &self,
        health: &Health,
        kind: EventKind,
        event: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Written> {
        self.write_own(stop, |t| {
            let has = t.health.as_ref().is_some_and(|h| h.status == health.status && h.message == health.message);
            if has {
                return None;
            }
            let mut new = t.clone();
            new.health = Some(health.clone());
            new.record_event(kind, event, health.since_ms);
            Some(new)
        })
        .await
    }

    /// Writes that the run after `ended` is the current one and not yet started, before anything of it
    /// exists. The timeline gains `Restarted` with `why` (no restart counter in it, so a crash loop
    /// coalesces), after `ended`'s `Started` if its `running` was never written (it exited at once).
    pub(super) async fn record_restart(
        &self,
        ended: &Run,
        reason: String,
        why: String,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Written> {
        let a = self.a();
        let next = ended.number + 1;
        let info =
            RunInfo { container: container_id(&a.task, a.placement, next), restarts: next, ..Default::default() };
        self.write_own(stop, |t| {
            if t.run.as_ref() == Some(&info) {
                return None;
            }
            let mut new = t.clone();
            new.state = TaskState::Running;
            new.run = Some(info.clone());
            new.reason = Some(reason.clone());
            if t.state == TaskState::Assigned {
                new.record_event(EventKind::Started, started(a, ended.number), known_or_now(ended.started_at_ms));
            }
            new.record_event(EventKind::Restarted, why.clone(), now_ms());
            // The next run has passed no check yet (an unhealthy verdict stands until one has).
            if let Some(h) = new.health.as_mut().filter(|h| h.status == HealthStatus::Healthy) {
                *h = Health { status: HealthStatus::Starting, since_ms: now_ms(), message: String::new() };
            }
            Some(new)
        })
        .await
    }

    /// A guarded update of our task (one that keeps its resources), retried until it lands: `change` gives
    /// the new record, or `None` when the record already has it (a write whose answer was lost did land).
    async fn write_own(
        &self,
        stop: &mut watch::Receiver<bool>,
        change: impl Fn(&Task) -> Option<Task>,
    ) -> Result<Written> {
        self.until_written(stop, "updating the task", || async {
            let Some(seen) = self.read_task().await? else { return Ok(Attempt::Settled(Written::NotOurs)) };
            if !self.ours(&seen.value) {
                return Ok(Attempt::Settled(Written::NotOurs));
            }
            let Some(mut new) = change(&seen.value) else { return Ok(Attempt::Settled(Written::Done)) };
            new.updated_at_ms = now_ms();
            Ok(match update_task(&self.store, &seen, &new).await? {
                Some(_) => Attempt::Settled(Written::Done),
                None => Attempt::Changed,
            })
        })
        .await
    }

    /// Releases the task into its final state, retried until etcd takes it. An unknown outcome is settled by
    /// reading the task again: if it is no longer ours, the end is recorded (ours landed, or someone else's).
    /// `event` goes into the task's timeline with the release.
    pub(super) async fn record_end(
        &self,
        state: TaskState,
        reason: Option<String>,
        info: RunInfo,
        event: (EventKind, String),
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Written> {
        self.until_written(stop, "recording the task's end", || async {
            let Some(seen) = self.read_task().await? else { return Ok(Attempt::Settled(Written::NotOurs)) };
            if !self.ours(&seen.value) {
                return Ok(Attempt::Settled(Written::NotOurs));
            }
            let ran = info.started_at_ms > 0 || info.exit_code.is_some();
            let seen = if seen.value.state == TaskState::Assigned && ran {
                // The run ended before its `running` was written (it exited at once): its start joins the
                // timeline in this write, ahead of its end. Only the timeline differs from what was read; the
                // release still compares the revision read.
                let mut t = (*seen.value).clone();
                t.record_event(EventKind::Started, started(self.a(), info.restarts), known_or_now(info.started_at_ms));
                Versioned::new(t, seen.mod_revision)
            } else {
                seen
            };
            let r = Release {
                task: seen,
                state,
                reason: reason.clone(),
                run: Some(info.clone()),
                event: Some(event.clone()),
            };
            Ok(match release(&self.store, &[r]).await?.first().copied() {
                Some(ReleaseOutcome::Done { .. }) => Attempt::Settled(Written::Done),
                Some(ReleaseOutcome::TaskChanged) => Attempt::Changed,
                other => Attempt::Unsettled(format!("release outcome {other:?}")),
            })
        })
        .await
    }

    /// Runs `attempt` until it settles: again at once when the task changed under it, after a backoff when
    /// etcd failed or the outcome is not known; a stop ends the loop (the assignment is gone, so the task's
    /// fate is recorded).
    async fn until_written<F, Fut>(&self, stop: &mut watch::Receiver<bool>, what: &str, attempt: F) -> Result<Written>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            if *stop.borrow() {
                return Ok(Written::Stopped);
            }
            let why = match attempt().await {
                Ok(Attempt::Settled(written)) => return Ok(written),
                Ok(Attempt::Changed) => continue,
                Ok(Attempt::Unsettled(why)) => why,
                Err(e) => e.to_string(),
            };
            let wait = backoff.next();
            tracing::warn!(task = self.a().task, error = why, retry_in = ?wait, "{what} failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop_requested(stop) => return Ok(Written::Stopped),
            }
        }
    }
}

/// The `Started` event's message: where, which placement, which run.
fn started(a: &Assignment, run: u32) -> String {
    format!("on {}, placement {}, run {}", a.node, a.placement, run)
}

/// A run's start time, or now when it is not known (an exit collected after a crash, its start never written).
fn known_or_now(started_at_ms: u64) -> u64 {
    if started_at_ms > 0 {
        started_at_ms
    } else {
        now_ms()
    }
}

/// One try at a guarded write.
enum Attempt {
    Settled(Written),
    /// The task changed between the read and the write: read it again.
    Changed,
    /// Nothing known to be written (contention, an unknown outcome): try again after a pause.
    Unsettled(String),
}
