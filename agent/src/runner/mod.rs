//! One task's life on this node: an explicit state machine that an agent crash at any step cannot make run a
//! task twice, or leave holding its resources.
//!
//! ```text
//!            +-------------------------------- restart policy: record run R+1, then delete run R -----+
//!            v                                                                                       |
//! discover -> start(R) -> running(R) -> exited(R) -> end recorded (release) -> task deleted -> container removed
//!     |                        |   ^ health checks: unhealthy (restart: true) -> stopped -+    (done)
//!     |                        +--> fenced (the agent lost etcd and stopped it) -> etcd back -> handed back
//!     |                             (release to pending / lost, unless the controller did it) -> removed
//!     +--> stop (the assignment is gone): SIGTERM, grace, SIGKILL, remove
//! ```
//!
//! What is persisted where, and why it is enough:
//!
//! - **Each run is its own container**, `<job>-<index>-p<placement>-r<run>`, labelled with the task, the
//!   placement and the run number, so a container found after a crash says exactly which run it is.
//! - **etcd says which run is current**: the task record's `run.restarts` is the run number, `run.container`
//!   its container (whose name carries the placement), `run.started_at_ms > 0` with state `running` that it
//!   was started. A restart writes run R+1 (not yet started) *before* run R's container is deleted and run
//!   R+1 is created, so after a crash a container of an older run is known to be counted already.
//! - **"Assignment present" means "end not recorded"**: the end is recorded by a release, which deletes the
//!   assignment in the same transaction. Nothing of containerd's state of the run is deleted before that
//!   release has landed, so containerd keeps the exit status (and the OOM count in the cgroup) until etcd has
//!   it. Recording is retried until etcd takes it (a transport failure is an unknown outcome: the task is read
//!   again, and what it says decides).
//!
//! After a crash a new runner starts from `discover`, which reads the record and the task's containers:
//!
//! | container of the current run R | record says R started | then |
//! |---|---|---|
//! | running | either | adopt it: wait for its exit |
//! | exited | either | collect its exit (the process ran; it is never run again) |
//! | created but never started, or no task | no | start it (what ran before was nothing) |
//! | absent | no | start run R |
//! | absent, or its task gone | yes | the process vanished (containerd lost it): a failed run, exit unknown |
//!
//! A container labelled fenced ([`crate::fence`]) is never adopted nor its exit collected as the task's own:
//! the fence stopped it, so the task is handed back as its node had been lost.
//!
//! Containers of runs older than R are removed (their exits are counted); containers of other placements
//! belong to other runners or to the agent's sweep of leftovers.
//!
//! **The spec a task runs is its version's** (`store.spec_for`): a task of an older version of the job keeps
//! that version's image, command and checks, through restarts and agent restarts, until an update replaces
//! the task itself.
//!
//! **Health checks** ([`crate::health`]): while a run is `running` its job's checks are probed, and its
//! health is written to the task record on a transition only (`starting` goes with `running`; `healthy` and
//! `unhealthy` each with an event of their own kind), through the same guarded writes as the rest. A check
//! with `restart: true` turning unhealthy stops the run (SIGTERM, grace, SIGKILL) and counts as a failed exit
//! under the restart policy: the next run, or the end (`failed`, `unhealthy: <check>: <why>`) once the
//! restarts are spent. An agent that dies after stopping such a run finds it exited, and counts that exit as
//! the failure it was.
//!
//! Failpoints ([`omega::failpoint`]) mark each step boundary, so tests can kill the real agent exactly there.
//! A runner that fails (etcd or containerd unreachable) is started again by its supervisor
//! ([`crate::supervisor`]), with backoff, from `discover`: the same path as after a crash. What the runner
//! writes to etcd, and how each write is retried until it lands, is in `record.rs`.

mod record;

use crate::agent::{log_path, restart_backoff, restart_reason, should_restart, AgentConfig};
use crate::containerd::{ContainerInfo, ContainerSpec, Containerd, Error as ContainerdError, Exit, TaskPhase};
use crate::error::{Error, Result};
use crate::fence::{fence_container, FenceSignal, KEEP_RUNNING, LABEL_FENCED, LABEL_ON_DISCONNECT};
use crate::health::{Monitor, Probes};
use crate::preemption::Victims;
use crate::runners::Runners;
use crate::supervisor::stop_requested;
use omega::cell_state::Versioned;
use omega::events::EventKind;
use omega::failpoint;
use omega::health::HealthStatus;
use omega::model::{now_ms, Assignment, Job, OnDisconnect, RunInfo, Task, TaskState};
use omega::store::Store;
use record::Written;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

pub const LABEL_TASK: &str = "omega.task";
pub const LABEL_PLACEMENT: &str = "omega.placement";
pub const LABEL_RUN: &str = "omega.run";
pub const LABEL_JOB: &str = "omega.job";

/// The step boundaries a test can stop the agent at (`OMEGA_FAILPOINTS=<name>=pause`).
pub mod failpoints {
    /// About to create and start a run's container (a preemptor's victims are gone).
    pub const BEFORE_START: &str = "agent.before_start";
    /// The container runs; `running` is not recorded yet.
    pub const AFTER_START: &str = "agent.after_start";
    /// The exit was observed; nothing of it is recorded.
    pub const AFTER_EXIT: &str = "agent.after_exit";
    /// The restart policy's next run is recorded; the exited run's container is still there.
    pub const AFTER_RESTART_RECORDED: &str = "agent.after_restart_recorded";
    /// The end is recorded (task released, assignment deleted); the containerd task and container remain.
    pub const AFTER_RELEASE: &str = "agent.after_release";
    /// The containerd task is deleted; the container record (and snapshot) remain.
    pub const AFTER_TASK_DELETE: &str = "agent.after_task_delete";
}

/// The container of run `run` of `task_id`'s placement `placement`.
pub fn container_id(task_id: &str, placement: u32, run: u32) -> String {
    format!("{}-p{placement}-r{run}", task_id.replace('/', "-"))
}

/// Where an exec check's output goes while it runs: beside the task's log, as `<job>/<index>.check`.
fn check_output_path(log_dir: &std::path::Path, task_id: &str) -> std::path::PathBuf {
    log_path(log_dir, task_id).with_extension("check")
}

/// The placement and run a container id names, for a container of `task_id`: `<task>-p<P>-r<R>`, or
/// `<task>-p<P>` (agents before runs were numbered: one container per placement, taken as run 0).
pub fn parse_container_id(task_id: &str, id: &str) -> Option<(u32, u32)> {
    let rest = id.strip_prefix(&task_id.replace('/', "-"))?.strip_prefix("-p")?;
    match rest.split_once("-r") {
        Some((p, r)) => Some((p.parse().ok()?, r.parse().ok()?)),
        None => Some((rest.parse().ok()?, 0)),
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
enum End {
    Exited(Exit),
    /// Its process is gone with no exit status (containerd lost the task, e.g. the machine rebooted).
    Vanished,
    /// Stopped by its agent because a check (with `restart: true`) turned unhealthy; the message names the
    /// check and its failure. The exit is the stopped process's, when seen.
    Unhealthy {
        exit: Option<Exit>,
        message: String,
    },
}

impl End {
    fn failed(&self) -> bool {
        match self {
            End::Exited(e) => e.code != 0 || e.oom_killed,
            End::Vanished | End::Unhealthy { .. } => true,
        }
    }

    fn describe(&self) -> String {
        match self {
            End::Exited(e) if e.oom_killed => "an OOM kill".to_string(),
            End::Exited(e) => format!("exit {}", e.code),
            End::Vanished => "its process vanished".to_string(),
            End::Unhealthy { message, .. } => format!("unhealthy: {message}"),
        }
    }
}

/// A run in progress (or just ended).
#[derive(Clone, Debug)]
struct Run {
    number: u32,
    container: String,
    pid: Option<u32>,
    started_at_ms: u64,
}

enum Step {
    Start(u32),
    /// `recorded`: the record already says this run started (nothing to write before waiting), with this
    /// health.
    Running {
        run: Run,
        recorded: bool,
        health: Option<HealthStatus>,
    },
    Exited(Run, End),
    /// The agent's fence stopped (or is stopping) this run; its exit, if seen, is not the task's own end.
    Fenced(Run, Option<Exit>),
    End {
        container: String,
        state: TaskState,
        reason: Option<String>,
        info: RunInfo,
    },
    /// Read the record again from the start (the agent was fenced before this run could start).
    Rediscover,
    Stop,
    Done,
}

/// One assignment's runner.
pub struct TaskRunner {
    pub store: Store,
    pub containerd: Arc<Containerd>,
    pub config: Arc<AgentConfig>,
    pub runners: Runners,
    pub fence: FenceSignal,
    /// The node's endpoints for discovery: a healthy run's are published, and withdrawn before it stops.
    pub published: Arc<crate::endpoints::Published>,
    pub assignment: Assignment,
}

impl TaskRunner {
    fn a(&self) -> &Assignment {
        &self.assignment
    }

    /// One attempt: find out where the task stands, then walk the state machine to its end.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) -> Result<()> {
        'discover: while let Some((job, mut step)) = self.discover(&stop).await? {
            loop {
                step = match step {
                    Step::Start(n) => self.start(&job, n, &mut stop).await?,
                    Step::Running { run, recorded, health } => {
                        let next = self.running(&job, run, recorded, health, &mut stop).await;
                        // Whatever ended the run's serving (a stop, an exit, the fence), it is out of
                        // discovery before the next step stops or records anything.
                        self.published.withdraw(&self.store, &self.a().task).await;
                        next?
                    }
                    Step::Exited(run, end) => self.exited(&job, run, end, &mut stop).await?,
                    Step::Fenced(run, exit) => self.fenced(&job, run, exit, &mut stop).await?,
                    Step::End { container, state, reason, info } => {
                        self.end(container, state, reason, info, &mut stop).await?
                    }
                    Step::Rediscover => continue 'discover,
                    Step::Stop => break 'discover,
                    Step::Done => return Ok(()),
                }
            }
        }
        self.stop_containers().await
    }

    async fn read_task(&self) -> Result<Option<Versioned<Task>>> {
        let key = self.store.keys().task(&self.a().task);
        Ok(self.store.get_json::<Task>(&key).await?.map(|(t, rev)| Versioned::new(t, rev)))
    }

    /// Whether the task is still this assignment's: this placement, on this node, holding its resources.
    fn ours(&self, t: &Task) -> bool {
        t.placements == self.a().placement && t.state.holds_resources() && t.node.as_deref() == Some(&self.a().node)
    }

    /// The run the record says is current, and whether it was started.
    fn recorded_run(&self, t: &Task) -> (u32, bool) {
        match &t.run {
            Some(run) if parse_container_id(&t.id, &run.container).map(|(p, _)| p) == Some(self.a().placement) => {
                (run.restarts, t.state == TaskState::Running && run.started_at_ms > 0)
            }
            _ => (0, false),
        }
    }

    /// This placement's containers of the task, with their run numbers.
    async fn containers(&self, current: u32) -> Result<Vec<(u32, ContainerInfo)>> {
        let a = self.a();
        let placement = a.placement.to_string();
        let mut out = Vec::new();
        for c in self.containerd.list().await? {
            if c.labels.get(LABEL_TASK) != Some(&a.task) || c.labels.get(LABEL_PLACEMENT) != Some(&placement) {
                continue;
            }
            // No run label: made by an agent that kept one container per placement, i.e. the current run.
            let run = match c.labels.get(LABEL_RUN) {
                Some(r) => r.parse::<u32>().map_err(|_| Error::Unaccountable {
                    container: c.id.clone(),
                    task: a.task.clone(),
                    why: format!("run label {r:?} is not a number"),
                })?,
                None => current,
            };
            out.push((run, c));
        }
        Ok(out)
    }

    /// Reads the record and the containers and decides where to resume. `None`: the task is not ours any
    /// more (its end was recorded, or someone else moved it): only our containers are left to stop.
    async fn discover(&self, stop: &watch::Receiver<bool>) -> Result<Option<(Job, Step)>> {
        let a = self.a();
        if *stop.borrow() {
            return Ok(None);
        }
        let Some(task) = self.read_task().await? else { return Ok(None) };
        if !self.ours(&task.value) {
            return Ok(None);
        }
        // The task's own version of the job: an older version's task runs that version's spec.
        let Some(job) = self.store.spec_for(&task.value).await? else {
            return Err(Error::JobMissing { job: a.job.clone(), task: a.task.clone() });
        };
        let (current, started) = self.recorded_run(&task.value);
        let health = task.value.health.as_ref().map(|h| h.status).filter(|_| started);
        let recorded_start = task.value.run.as_ref().map(|r| r.started_at_ms).filter(|_| started).unwrap_or(0);
        let mut found = None;
        for (run, c) in self.containers(current).await? {
            if run < current {
                tracing::info!(task = a.task, container = c.id, run, current, "removing a run whose end is counted");
                self.containerd.remove(&c.id).await?;
            } else if run > current {
                // Never started by this protocol (a run starts only once the record names it): not ours to run.
                tracing::warn!(task = a.task, container = c.id, run, current, "removing a run the record never named");
                self.containerd.stop(&c.id, self.config.grace).await?;
                self.containerd.remove(&c.id).await?;
            } else {
                found = Some(c);
            }
        }
        let run = |c: &ContainerInfo, pid| Run {
            number: current,
            container: c.id.clone(),
            pid,
            started_at_ms: recorded_start,
        };
        let step = match found {
            Some(c) if c.labels.contains_key(LABEL_FENCED) => {
                tracing::info!(task = a.task, container = c.id, "found a container the fence stopped");
                Step::Fenced(run(&c, c.pid), None)
            }
            Some(c) => match c.task {
                TaskPhase::Alive | TaskPhase::Unknown => {
                    tracing::info!(task = a.task, container = c.id, "adopting a running container");
                    Step::Running { run: run(&c, c.pid), recorded: started, health }
                }
                TaskPhase::Exited => {
                    tracing::info!(task = a.task, container = c.id, "collecting the exit of a container that ended");
                    Step::Running { run: run(&c, c.pid), recorded: true, health }
                }
                TaskPhase::Created | TaskPhase::None if started => {
                    let pid = task.value.run.as_ref().and_then(|r| r.pid);
                    Step::Exited(run(&c, pid), End::Vanished)
                }
                TaskPhase::Created | TaskPhase::None => Step::Start(current),
            },
            None if started => {
                let r = task.value.run.as_ref();
                let gone = Run {
                    number: current,
                    container: r
                        .map(|r| r.container.clone())
                        .unwrap_or_else(|| container_id(&a.task, a.placement, current)),
                    pid: r.and_then(|r| r.pid),
                    started_at_ms: recorded_start,
                };
                Step::Exited(gone, End::Vanished)
            }
            None => Step::Start(current),
        };
        if let Step::Exited(run, End::Vanished) = &step {
            tracing::warn!(
                task = a.task,
                container = run.container,
                "the run's process vanished without an exit status"
            );
        }
        Ok(Some((job, step)))
    }

    fn spec(&self, job: &Job, id: &str, run: u32) -> ContainerSpec {
        let a = self.a();
        let mut labels: BTreeMap<String, String> = [
            (LABEL_TASK.to_string(), a.task.clone()),
            (LABEL_PLACEMENT.to_string(), a.placement.to_string()),
            (LABEL_RUN.to_string(), run.to_string()),
            (LABEL_JOB.to_string(), a.job.clone()),
        ]
        .into();
        if job.on_disconnect == OnDisconnect::KeepRunning {
            labels.insert(LABEL_ON_DISCONNECT.to_string(), KEEP_RUNNING.to_string());
        }
        ContainerSpec {
            id: id.to_string(),
            image: job.image.clone(),
            command: job.command.clone(),
            args: job.args.clone(),
            env: job.env.clone(),
            cpu_millis: a.resources.cpu_millis,
            memory_bytes: a.resources.memory_bytes,
            log_path: log_path(&self.config.log_dir, &a.task),
            labels,
        }
    }

    async fn start(&self, job: &Job, number: u32, stop: &mut watch::Receiver<bool>) -> Result<Step> {
        let a = self.a();
        let victims = Victims {
            store: &self.store,
            containerd: &self.containerd,
            runners: &self.runners,
            node: &a.node,
            task: &a.task,
            victims: &a.after,
        };
        if !victims.wait_gone(stop).await? {
            return Ok(Step::Stop);
        }
        failpoint::hit(failpoints::BEFORE_START).await;
        if *stop.borrow() {
            return Ok(Step::Stop);
        }
        if self.fence.is_fenced() && job.on_disconnect == OnDisconnect::Stop {
            // Nothing starts while the node may be given up; once etcd is back, the record says whether the
            // task is still ours to start.
            tracing::info!(task = a.task, "fenced: not starting; waiting for etcd");
            tokio::select! {
                _ = self.fence.lifted() => return Ok(Step::Rediscover),
                _ = stop_requested(stop) => return Ok(Step::Stop),
            }
        }
        let id = container_id(&a.task, a.placement, number);
        let failed = |reason: String| Step::End {
            container: id.clone(),
            state: TaskState::Failed,
            reason: Some(reason),
            info: RunInfo { container: id.clone(), restarts: number, ..Default::default() },
        };
        let spec = self.spec(job, &id, number);
        if let Some(dir) = spec.log_path.parent() {
            if let Err(e) = tokio::fs::create_dir_all(dir).await {
                return Ok(failed(format!("log directory {}: {e}", dir.display())));
            }
        }
        match self.containerd.ensure_image(&job.image).await {
            Ok(()) => {}
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => return Ok(failed(format!("image: {e}"))),
        }
        // Taken before the container starts: whatever started later is after this.
        let started_at_ms = now_ms();
        let pid = match self.containerd.run(&spec).await {
            Ok(pid) => pid,
            Err(ContainerdError::AlreadyRunning { pid, .. }) => pid,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => return Ok(failed(format!("start: {e}"))),
        };
        tracing::info!(task = a.task, container = id, pid, run = number, "started");
        if self.fence.is_fenced() && job.on_disconnect == OnDisconnect::Stop {
            // The fence fell while this container was starting and may have listed the node's containers
            // before it existed: stop it as the fence would have. Its exit then reads as fenced.
            let expiry = std::time::Instant::now() + self.config.lease_ttl;
            fence_container(&self.containerd, &id, self.fence.grace(), expiry).await?;
        }
        failpoint::hit(failpoints::AFTER_START).await;
        let run = Run { number, container: id, pid: Some(pid), started_at_ms };
        Ok(Step::Running { run, recorded: false, health: None })
    }

    /// Records `running` (unless the record has it; with health `starting` when the job has checks), then
    /// waits for the exit or a stop, probing the job's checks meanwhile and writing each health transition.
    async fn running(
        &self,
        job: &Job,
        mut run: Run,
        recorded: bool,
        mut health: Option<HealthStatus>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Step> {
        let container = run.container.clone();
        let wait = self.containerd.wait(&container);
        tokio::pin!(wait);
        let checked = !job.checks.is_empty();
        if !recorded {
            if run.started_at_ms == 0 {
                run.started_at_ms = now_ms();
            }
            let mut stop_writing = stop.clone();
            tokio::select! {
                biased;
                written = self.record_running(&run, checked, &mut stop_writing) => match written? {
                    Written::Done => {
                        health = checked.then_some(HealthStatus::Starting);
                        if !checked {
                            // Without checks a running task counts as healthy.
                            self.publish(job).await;
                        }
                    }
                    Written::NotOurs | Written::Stopped => return Ok(Step::Stop),
                },
                // It ended before etcd took `running` (etcd slow or away): the end is what matters.
                exit = &mut wait => return self.observed(run, exit).await,
                _ = stop_requested(stop) => return Ok(Step::Stop),
            }
        }
        if recorded && (!checked || health == Some(HealthStatus::Healthy)) {
            // A run found serving (this agent restarted): published again, in case its lease went meanwhile.
            self.publish(job).await;
        }
        let mut monitor = Monitor::new(&job.checks, run.started_at_ms, health);
        let output = check_output_path(&self.config.log_dir, &self.a().task);
        let probes = Probes { containerd: &self.containerd, container: &container, output: &output };
        loop {
            tokio::select! {
                biased;
                exit = &mut wait => return self.observed(run, exit).await,
                _ = stop_requested(stop) => return Ok(Step::Stop),
                verdict = monitor.next(&probes), if !monitor.is_empty() => {
                    if let Some(health) = verdict.health {
                        let kind = match health.status {
                            HealthStatus::Unhealthy => EventKind::Unhealthy,
                            _ => EventKind::Healthy,
                        };
                        tracing::info!(task = self.a().task, container, health = %health.status,
                            message = verdict.event, "health changed");
                        if health.status != HealthStatus::Healthy {
                            // Out of discovery before the record says so, and before any restart stops it.
                            self.published.withdraw(&self.store, &self.a().task).await;
                        }
                        // Raced against the exit, as `running` is: a write that cannot land (etcd away, the
                        // node fenced) must not keep the runner from seeing the run end.
                        let written = tokio::select! {
                            biased;
                            exit = &mut wait => return self.observed(run, exit).await,
                            written = self.record_health(&health, kind, &verdict.event, stop) => written?,
                        };
                        match written {
                            Written::Done => {
                                monitor.recorded(health.status);
                                if health.status == HealthStatus::Healthy {
                                    self.publish(job).await;
                                }
                            }
                            Written::NotOurs | Written::Stopped => return Ok(Step::Stop),
                        }
                    }
                    if let Some(message) = verdict.restart {
                        return self.unhealthy(run, message).await;
                    }
                }
            }
        }
    }

    /// Publishes the run's endpoints (one per service of its job) at the node's advertised host.
    async fn publish(&self, job: &Job) {
        if job.services.is_empty() {
            return;
        }
        let a = self.a();
        let host =
            self.config.address.as_deref().map_or_else(|| "127.0.0.1".to_string(), omega::discovery::address_host);
        let endpoints = omega::discovery::endpoints_of(job, &a.task, &a.node, &host, now_ms());
        self.published.publish(&self.store, &a.task, endpoints).await;
    }

    /// Stops a run a check found unhealthy (SIGTERM, grace, SIGKILL): its end is a failure the restart
    /// policy counts, unless the fence stopped it first.
    async fn unhealthy(&self, run: Run, message: String) -> Result<Step> {
        tracing::warn!(task = self.a().task, container = run.container, message, "unhealthy; stopping the run");
        let exit = match self.containerd.stop(&run.container, self.config.grace).await? {
            Some(exit) => Some(exit),
            // It had exited already: its exit is kept until the task is deleted.
            None => match self.containerd.wait(&run.container).await {
                Ok(exit) => Some(exit),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            },
        };
        let labels = self.containerd.labels(&run.container).await?.unwrap_or_default();
        if labels.contains_key(LABEL_FENCED) {
            return Ok(Step::Fenced(run, exit));
        }
        failpoint::hit(failpoints::AFTER_EXIT).await;
        Ok(Step::Exited(run, End::Unhealthy { exit, message }))
    }

    async fn observed(&self, run: Run, exit: std::result::Result<Exit, ContainerdError>) -> Result<Step> {
        let end = match exit {
            Ok(exit) => End::Exited(exit),
            Err(e) if e.is_not_found() => End::Vanished,
            Err(e) => return Err(e.into()),
        };
        let labels = self.containerd.labels(&run.container).await?.unwrap_or_default();
        if labels.contains_key(LABEL_FENCED) {
            tracing::info!(
                task = self.a().task,
                container = run.container,
                end = end.describe(),
                "stopped by the fence"
            );
            let exit = match end {
                End::Exited(e) => Some(e),
                End::Vanished => None,
                End::Unhealthy { exit, .. } => exit,
            };
            return Ok(Step::Fenced(run, exit));
        }
        tracing::info!(task = self.a().task, container = run.container, end = end.describe(), "run ended");
        failpoint::hit(failpoints::AFTER_EXIT).await;
        Ok(Step::Exited(run, end))
    }

    /// Applies the restart policy: the next run (recorded first), or the end.
    async fn exited(&self, job: &Job, run: Run, end: End, stop: &mut watch::Receiver<bool>) -> Result<Step> {
        let a = self.a();
        let (exit_code, oom_killed, finished_at_ms) = match &end {
            End::Exited(e) | End::Unhealthy { exit: Some(e), .. } => {
                (Some(e.code), e.oom_killed, Some(e.finished_at_ms))
            }
            End::Vanished | End::Unhealthy { exit: None, .. } => (None, false, Some(now_ms())),
        };
        let info = RunInfo {
            container: run.container.clone(),
            pid: run.pid,
            started_at_ms: run.started_at_ms,
            finished_at_ms,
            exit_code,
            oom_killed,
            restarts: run.number,
        };
        if should_restart(job, end.failed(), run.number) {
            let next = run.number + 1;
            let reason = restart_reason(job, &end.describe(), next);
            match self.record_restart(&run, reason, format!("after {}", end.describe()), stop).await? {
                Written::Done => {}
                Written::NotOurs | Written::Stopped => return Ok(Step::Stop),
            }
            failpoint::hit(failpoints::AFTER_RESTART_RECORDED).await;
            self.delete_container(&run.container).await?;
            let backoff = restart_backoff(job, run.number);
            tracing::info!(task = a.task, end = end.describe(), next, ?backoff, "restarting per policy");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => return Ok(Step::Start(next)),
                _ = stop_requested(stop) => return Ok(Step::Stop),
            }
        }
        let (state, reason) = match end {
            End::Unhealthy { message, .. } => (TaskState::Failed, Some(format!("unhealthy: {message}"))),
            End::Exited(e) if e.oom_killed => {
                (TaskState::Failed, Some("OOM-killed: exceeded its memory limit".to_string()))
            }
            End::Exited(e) if e.code != 0 => (TaskState::Failed, Some(format!("exited with code {}", e.code))),
            End::Exited(_) => (TaskState::Succeeded, None),
            End::Vanished => (
                TaskState::Failed,
                Some("its process vanished: containerd no longer knows the task (was the node rebooted?)".into()),
            ),
        };
        Ok(Step::End { container: run.container, state, reason, info })
    }

    /// A run the fence stopped: once etcd answers again, hands the task back as a lost node's task would be
    /// (pending for its scheduler, or lost for a batch job that never restarts), compared on the task's
    /// revision, so that if the controller released it first nothing is written; then removes the container.
    async fn fenced(&self, job: &Job, run: Run, exit: Option<Exit>, stop: &mut watch::Receiver<bool>) -> Result<Step> {
        let a = self.a();
        tokio::select! {
            _ = self.fence.lifted() => {}
            _ = stop_requested(stop) => return Ok(Step::Stop),
        }
        // Found labelled but alive (the agent died between labelling and stopping): finish the fence's work.
        let exit = match self.containerd.stop(&run.container, self.config.grace).await? {
            Some(stopped) => Some(stopped),
            None => exit,
        };
        let info = RunInfo {
            container: run.container.clone(),
            pid: run.pid,
            started_at_ms: run.started_at_ms,
            finished_at_ms: Some(exit.map_or_else(now_ms, |e| e.finished_at_ms)),
            exit_code: exit.map(|e| e.code),
            oom_killed: false,
            restarts: run.number,
        };
        let state = job.state_after_node_loss();
        let reason = format!(
            "fenced: node {} was cut off from etcd, so its agent stopped the task before the node's lease could \
             expire",
            a.node
        );
        let event = (EventKind::Lost, format!("node {} cut off from etcd; its agent stopped the task", a.node));
        match self.record_end(state, Some(reason), info, event, stop).await? {
            Written::Done => tracing::info!(task = a.task, %state, "fenced task handed back"),
            Written::NotOurs => {
                tracing::info!(task = a.task, "fenced task already released elsewhere (the controller)")
            }
            Written::Stopped => return Ok(Step::Stop),
        }
        self.delete_container(&run.container).await?;
        Ok(Step::Done)
    }

    /// Records the end (retried until etcd takes it), then deletes the run's containerd state.
    async fn end(
        &self,
        container: String,
        state: TaskState,
        reason: Option<String>,
        info: RunInfo,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Step> {
        // The timeline says how the process ended: its code, the OOM kill, or why there is no code.
        let event = match (info.oom_killed, info.exit_code) {
            (true, code) => {
                let code = code.map(|c| format!(" (code {c})")).unwrap_or_default();
                (EventKind::OomKilled, format!("exceeded its memory limit{code}"))
            }
            (false, Some(code)) => (EventKind::Exited, format!("code {code}")),
            (false, None) => (EventKind::Exited, reason.clone().unwrap_or_else(|| "no exit code".into())),
        };
        match self.record_end(state, reason, info, event, stop).await? {
            Written::Done => tracing::info!(task = self.a().task, %state, "task finished"),
            Written::NotOurs | Written::Stopped => {
                tracing::info!(task = self.a().task, "its end was already recorded elsewhere")
            }
        }
        failpoint::hit(failpoints::AFTER_RELEASE).await;
        self.delete_container(&container).await?;
        Ok(Step::Done)
    }

    /// Deletes a run's containerd task, then its container: only ever after its exit is recorded in etcd.
    async fn delete_container(&self, id: &str) -> Result<()> {
        self.containerd.delete_task(id).await?;
        failpoint::hit(failpoints::AFTER_TASK_DELETE).await;
        self.containerd.remove(id).await?;
        Ok(())
    }

    /// Stops and removes every container of this placement (the assignment is gone: whoever removed it has
    /// written the task's state).
    async fn stop_containers(&self) -> Result<()> {
        for (_, c) in self.containers(0).await? {
            if c.running || c.task == TaskPhase::Created {
                let exit = self.containerd.stop(&c.id, self.config.grace).await?;
                tracing::info!(task = self.a().task, container = c.id, ?exit, "stopped");
            }
            self.containerd.remove(&c.id).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_name_placement_and_run() {
        assert_eq!(container_id("web/3", 2, 0), "web-3-p2-r0");
        assert_eq!(parse_container_id("web/3", "web-3-p2-r5"), Some((2, 5)));
        assert_eq!(parse_container_id("web/3", "web-3-p2"), Some((2, 0)), "one container per placement");
        assert_eq!(parse_container_id("web/3", "web-30-p2-r0"), None);
        assert_eq!(parse_container_id("web/3", "web-3-px"), None);
    }
}
