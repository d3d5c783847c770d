//! The node agent: makes this node's assignments real containers, and reports what becomes of them.
//!
//! The loop: register the node and keep its liveness key alive on one lease; reconcile what containerd runs
//! with what etcd assigns (adopt what should run, stop what should not, never start a task twice); then
//! follow `assign/<node>/` and, per assignment, run the task through containerd with a runner that writes
//! `running` (container, pid), applies the job's restart policy, and finally releases the task as `succeeded`
//! or `failed` (exit code, OOM). A removed assignment (cancel, preemption, lost node) stops the container
//! with a grace period; whoever removed it has already written the task's state.
//!
//! Containers are named `<job>-<index>-p<placement>` and labelled with the task and placement, so after a
//! restart the agent can tell a container it must adopt from a stale one of an earlier placement.

use crate::containerd::{ContainerSpec, Containerd, Error as ContainerdError, Exit};
use omega::cell_state::Versioned;
use omega::keys::{Key, Keys};
use omega::lease::Renewer;
use omega::model::{now_ms, Assignment, Job, Node, RestartMode, RunInfo, Task, TaskState};
use omega::release::{release, update_task, Release, ReleaseOutcome};
use omega::resources::Resources;
use omega::store::Store;
use omega::watcher::{Change, WatchEvent, Watcher};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const LABEL_TASK: &str = "omega.task";
const LABEL_PLACEMENT: &str = "omega.placement";

/// What this agent is and where it keeps things.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: String,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    pub address: Option<String>,
    pub lease_ttl: Duration,
    /// SIGTERM -> SIGKILL grace when stopping a task.
    pub grace: Duration,
    /// Task logs: `<log_dir>/<job>/<index>.log` (kept after the container is gone).
    pub log_dir: PathBuf,
}

/// What this machine offers: all its cores and all its memory (flags override either).
pub fn detected_capacity() -> Resources {
    let cores = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    Resources::new(cores * 1000, mem_kib * 1024)
}

/// The path of a task's log file (what the log service streams).
pub fn log_path(log_dir: &std::path::Path, task_id: &str) -> PathBuf {
    log_dir.join(format!("{task_id}.log"))
}

fn container_id(task_id: &str, placement: u32) -> String {
    format!("{}-p{placement}", task_id.replace('/', "-"))
}

/// One running assignment: its runner, and how to tell it to stop.
struct Runner {
    placement: u32,
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

pub struct Agent {
    store: Store,
    config: AgentConfig,
    containerd: Arc<Containerd>,
    runners: HashMap<String, Runner>,
}

impl Agent {
    pub fn new(store: Store, config: AgentConfig, containerd: Containerd) -> Self {
        Agent { store, config, containerd: Arc::new(containerd), runners: HashMap::new() }
    }

    /// Registers the node and runs until `shutdown`. Tasks keep running in containerd when the agent stops:
    /// the next agent adopts them.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let node = Node {
            name: self.config.node.clone(),
            capacity: self.config.capacity,
            labels: self.config.labels.clone(),
            address: self.config.address.clone(),
            registered_at_ms: now_ms(),
        };
        self.store.register_node(&node).await?;
        let lease = self.store.grant_lease(self.config.lease_ttl.as_secs().max(2) as i64).await?;
        self.store.put_liveness(&self.config.node, lease).await?;
        let heartbeat =
            tokio::spawn(heartbeat(self.store.clone(), self.config.node.clone(), lease, self.config.lease_ttl));
        tracing::info!(node = self.config.node, capacity = %self.config.capacity, "node registered");

        let keys = self.store.keys().clone();
        let mut watcher = Watcher::new(self.store.clone(), keys.assignments_of(&self.config.node), 1000);
        let mut first = true;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                event = watcher.next() => {
                    let result = match event {
                        WatchEvent::Reset { kvs, .. } => {
                            let desired = kvs.iter().filter_map(|kv| parse(&keys, kv.key(), kv.value())).collect();
                            self.reconcile(desired, first).await
                        }
                        WatchEvent::Changes { changes, .. } => self.apply(&keys, changes).await,
                        WatchEvent::Progress { .. } => Ok(()),
                    };
                    first = false;
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "handling assignments failed; the next change or re-list retries");
                    }
                }
            }
        }
        heartbeat.abort();
        for (_, r) in self.runners.drain() {
            r.handle.abort();
        }
        Ok(())
    }

    /// Makes the set of runners match `desired` (task -> assignment). On the first pass also looks at what
    /// containerd runs, adopting containers of current placements and stopping the rest.
    async fn reconcile(&mut self, desired: HashMap<String, Assignment>, adopt: bool) -> anyhow::Result<()> {
        let mut existing: HashMap<String, (u32, String, bool)> = HashMap::new();
        if adopt {
            for c in self.containerd.list().await? {
                let (Some(task), Some(placement)) = (c.labels.get(LABEL_TASK), c.labels.get(LABEL_PLACEMENT)) else {
                    continue;
                };
                let placement: u32 = placement.parse().unwrap_or(0);
                let current = desired.get(task).is_some_and(|a| a.placement == placement);
                if current {
                    existing.insert(task.clone(), (placement, c.id.clone(), c.running));
                } else {
                    tracing::info!(container = c.id, "stopping a container no assignment asks for");
                    let containerd = self.containerd.clone();
                    let grace = self.config.grace;
                    tokio::spawn(async move {
                        let _ = containerd.stop(&c.id, grace).await;
                        let _ = containerd.remove(&c.id).await;
                    });
                }
            }
        }
        let stale: Vec<String> = self
            .runners
            .iter()
            .filter(|(t, r)| desired.get(*t).is_none_or(|a| a.placement != r.placement))
            .map(|(t, _)| t.clone())
            .collect();
        for task in stale {
            self.stop_runner(&task);
        }
        for (task, a) in desired {
            if self.runners.get(&task).is_some_and(|r| r.placement == a.placement) {
                continue;
            }
            let adopted = existing.remove(&task).map(|(_, id, running)| (id, running));
            self.start_runner(task, a, adopted);
        }
        Ok(())
    }

    async fn apply(&mut self, keys: &Keys, changes: Vec<Change>) -> anyhow::Result<()> {
        for change in changes {
            match change {
                Change::Put(kv) => {
                    if let Some((task, a)) = parse(keys, kv.key(), kv.value()) {
                        if self.runners.get(&task).is_none_or(|r| r.placement != a.placement) {
                            self.stop_runner(&task);
                            self.start_runner(task, a, None);
                        }
                    }
                }
                Change::Delete { key, .. } => {
                    if let Some(Key::Assignment { task, .. }) =
                        std::str::from_utf8(&key).ok().and_then(|k| keys.parse(k))
                    {
                        self.stop_runner(task);
                    }
                }
            }
        }
        Ok(())
    }

    fn stop_runner(&mut self, task: &str) {
        if let Some(r) = self.runners.remove(task) {
            tracing::info!(task, "assignment removed; stopping");
            let _ = r.stop.send(true);
        }
    }

    fn start_runner(&mut self, task: String, assignment: Assignment, adopted: Option<(String, bool)>) {
        let (stop, stopped) = watch::channel(false);
        let ctx = RunContext {
            store: self.store.clone(),
            containerd: self.containerd.clone(),
            config: self.config.clone(),
            assignment: assignment.clone(),
        };
        let handle = tokio::spawn(async move {
            if let Err(e) = ctx.run(adopted, stopped).await {
                tracing::warn!(task = ctx.assignment.task, error = %e, "task runner failed");
            }
        });
        self.runners.insert(task, Runner { placement: assignment.placement, stop, handle });
    }
}

fn parse(keys: &Keys, key: &[u8], value: &[u8]) -> Option<(String, Assignment)> {
    let key = std::str::from_utf8(key).ok()?;
    let Some(Key::Assignment { task, .. }) = keys.parse(key) else { return None };
    let a: Assignment = serde_json::from_slice(value).ok()?;
    Some((task.to_string(), a))
}

/// Everything one task's runner needs.
struct RunContext {
    store: Store,
    containerd: Arc<Containerd>,
    config: AgentConfig,
    assignment: Assignment,
}

impl RunContext {
    async fn task(&self) -> anyhow::Result<Option<Versioned<Task>>> {
        let key = self.store.keys().task(&self.assignment.task);
        Ok(self.store.get_json::<Task>(&key).await?.map(|(t, rev)| Versioned::new(t, rev)))
    }

    /// Runs the task (or adopts its container), applies the restart policy, and reports the end.
    async fn run(&self, adopted: Option<(String, bool)>, mut stopped: watch::Receiver<bool>) -> anyhow::Result<()> {
        let a = &self.assignment;
        let Some((job, _)) = self.store.get_json::<Job>(&self.store.keys().job(&a.job)).await? else {
            anyhow::bail!("job {} of assignment {} not found", a.job, a.task);
        };
        let id = container_id(&a.task, a.placement);
        let mut restarts = 0u32;
        let mut adopted = adopted;
        loop {
            // Start (or adopt) the container, then record `running`.
            let pid = match adopted.take() {
                Some((_, true)) => None,
                Some((existing, false)) => {
                    // Adopted but already exited while no agent watched: collect its exit below.
                    tracing::info!(container = existing, "adopting an exited container");
                    None
                }
                None => {
                    let spec = self.spec(&job, &id);
                    if let Some(dir) = spec.log_path.parent() {
                        if let Err(e) = tokio::fs::create_dir_all(dir).await {
                            return self
                                .finish(TaskState::Failed, Some(format!("log directory {}: {e}", dir.display())), None)
                                .await;
                        }
                    }
                    if let Err(e) = self.containerd.ensure_image(&job.image).await {
                        return self.finish(TaskState::Failed, Some(format!("image: {e}")), None).await;
                    }
                    // `run` replaces a dead container of this placement and refuses a live one, which is then
                    // adopted: a task is never run twice.
                    match self.containerd.run(&spec).await {
                        Ok(pid) => Some(pid),
                        Err(ContainerdError::AlreadyRunning { pid, .. }) => Some(pid),
                        Err(e) => return self.finish(TaskState::Failed, Some(format!("start: {e}")), None).await,
                    }
                }
            };
            let started_at_ms = now_ms();
            if let Some(seen) = self.task().await? {
                if seen.value.placements != a.placement || !seen.value.state.holds_resources() {
                    // The task moved on (cancelled, preempted) while we started: do not run it.
                    let _ = self.containerd.stop(&id, self.config.grace).await;
                    let _ = self.containerd.remove(&id).await;
                    return Ok(());
                }
                let mut running = (*seen.value).clone();
                running.state = TaskState::Running;
                running.run = Some(RunInfo {
                    container: id.clone(),
                    pid: pid.or(seen.value.run.as_ref().and_then(|r| r.pid)),
                    started_at_ms,
                    restarts,
                    ..Default::default()
                });
                running.updated_at_ms = now_ms();
                update_task(&self.store, &seen, &running).await?;
            }

            // Wait for the exit, or for the assignment to go away.
            let exit: Exit = tokio::select! {
                exit = self.containerd.wait(&id) => exit?,
                _ = stop_requested(&mut stopped) => {
                    let grace = self.config.grace;
                    let exit = self.containerd.stop(&id, grace).await?;
                    let _ = self.containerd.remove(&id).await;
                    tracing::info!(task = a.task, ?exit, "stopped");
                    return Ok(());
                }
            };
            let _ = self.containerd.remove(&id).await;
            let run = RunInfo {
                container: id.clone(),
                pid,
                started_at_ms,
                finished_at_ms: Some(exit.finished_at_ms),
                exit_code: Some(exit.code),
                oom_killed: exit.oom_killed,
                restarts,
            };
            let failed = exit.code != 0 || exit.oom_killed;
            if should_restart(&job, failed, restarts) {
                restarts += 1;
                let backoff = Duration::from_millis(job.restart.backoff_ms.saturating_mul(1 << (restarts - 1).min(6)))
                    .min(Duration::from_secs(60));
                tracing::info!(task = a.task, code = exit.code, restarts, ?backoff, "restarting per policy");
                if let Some(seen) = self.task().await? {
                    let mut t = (*seen.value).clone();
                    t.run = Some(run);
                    t.reason = Some(format!("restarting after exit {} ({} so far)", exit.code, restarts));
                    update_task(&self.store, &seen, &t).await?;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    _ = stop_requested(&mut stopped) => return Ok(()),
                }
            }
            let (state, reason) = if exit.oom_killed {
                (TaskState::Failed, Some("OOM-killed: exceeded its memory limit".to_string()))
            } else if failed {
                (TaskState::Failed, Some(format!("exited with code {}", exit.code)))
            } else {
                (TaskState::Succeeded, None)
            };
            return self.finish(state, reason, Some(run)).await;
        }
    }

    fn spec(&self, job: &Job, id: &str) -> ContainerSpec {
        let a = &self.assignment;
        let labels: BTreeMap<String, String> = [
            (LABEL_TASK.to_string(), a.task.clone()),
            (LABEL_PLACEMENT.to_string(), a.placement.to_string()),
            ("omega.job".to_string(), a.job.clone()),
        ]
        .into();
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

    /// Releases the task into its final state (guarded: a task changed meanwhile is left as it is).
    async fn finish(&self, state: TaskState, reason: Option<String>, run: Option<RunInfo>) -> anyhow::Result<()> {
        for _ in 0..5 {
            let Some(seen) = self.task().await? else { return Ok(()) };
            if seen.value.placements != self.assignment.placement || !seen.value.state.holds_resources() {
                return Ok(());
            }
            let r = Release { task: seen, state, reason: reason.clone(), run: run.clone() };
            if matches!(release(&self.store, &[r]).await?.first(), Some(ReleaseOutcome::Done { .. })) {
                tracing::info!(task = self.assignment.task, %state, "task finished");
                return Ok(());
            }
        }
        anyhow::bail!("task {} kept changing while recording its end", self.assignment.task)
    }
}

/// Resolves once the runner is told to stop (the assignment went away).
async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// Whether a task that just exited runs again on this node (the job's restart policy).
pub fn should_restart(job: &Job, failed: bool, restarts_so_far: u32) -> bool {
    let policy = &job.restart;
    let wanted = match policy.mode {
        RestartMode::Never => false,
        RestartMode::OnFailure => failed,
        RestartMode::Always => true,
    };
    let unlimited = policy.mode == RestartMode::Always && policy.max_restarts == 0;
    wanted && (unlimited || restarts_so_far < policy.max_restarts)
}

/// Keeps this node's lease alive; if it lapses (etcd unreachable longer than the TTL) the node has been
/// declared gone and its tasks may be re-placed elsewhere: say so loudly, and re-register.
async fn heartbeat(store: Store, node: String, lease: i64, ttl: Duration) {
    let period = ttl / 3;
    let mut renewer = Renewer::new(store.clone(), lease);
    loop {
        tokio::time::sleep(period).await;
        match renewer.renew().await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(
                    node,
                    "the node's lease lapsed: the cell considers this node lost and may re-place its tasks; \
                     containers still running here may be duplicated elsewhere until the controller reconciles"
                );
                match store.grant_lease(ttl.as_secs().max(2) as i64).await {
                    Ok(new) => {
                        renewer.set_lease(new);
                        if let Err(e) = store.put_liveness(&node, new).await {
                            tracing::warn!(error = %e, "re-registering liveness failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "granting a new lease failed"),
                }
            }
            Err(e) => tracing::warn!(node, error = %e, "heartbeat failed; etcd unreachable? will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega::model::{JobKind, RestartPolicy};

    #[test]
    fn restart_policies() {
        let mut job = Job::new("j", JobKind::Batch, 1, Resources::new(1, 1));
        assert!(!should_restart(&job, true, 0), "batch default: never");
        job.restart = RestartPolicy { mode: RestartMode::OnFailure, max_restarts: 2, backoff_ms: 10 };
        assert!(should_restart(&job, true, 0));
        assert!(should_restart(&job, true, 1));
        assert!(!should_restart(&job, true, 2), "limit reached");
        assert!(!should_restart(&job, false, 0), "success is not restarted on_failure");
        let svc = Job::new("s", JobKind::Service, 1, Resources::new(1, 1));
        assert!(should_restart(&svc, false, 1000), "service default: always, unlimited");
    }
}
