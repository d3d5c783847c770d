//! The node agent: makes this node's assignments real containers, and reports what becomes of them.
//!
//! This is the loop that follows assignments; what happens to one task is its runner's business
//! ([`crate::runner`], a state machine that survives agent crashes). The loop:
//!
//! - registers the node and keeps its liveness key alive on one lease ([`LeaseKeeper`]: if etcd was away for
//!   longer than the TTL, or the lease was revoked, a new lease is granted and the key written again);
//! - fences itself ([`crate::fence`]): when renewals stop coming in time, it stops its tasks before the lease
//!   can expire and the controller can place them elsewhere, and lifts the fence when etcd answers again;
//! - follows `assign/<node>/`: one supervised runner per assignment (task, placement). A new placement of a
//!   task replaces the runner of the old one; a removed assignment (cancel, preemption, lost node) tells its
//!   runner to stop the container with the grace period (whoever removed it has written the task's state);
//! - on every (re-)listing of the assignments, sweeps containerd for containers no runner accounts for
//!   (left by an earlier agent process for an assignment that is gone) and stops and removes them.
//!
//! Nothing is adopted here: a runner finds its own containers in containerd, so adoption after a restart is
//! the same code as every runner's start, and is retried with the runner until it succeeds.

use crate::containerd::Containerd;
use crate::endpoints::Published;
use crate::fence::{Fence, FencePlan, FenceSignal};
use crate::runner::{TaskRunner, LABEL_PLACEMENT, LABEL_TASK};
use crate::runners::Runners;
use crate::supervisor::{supervise, Backoff};
use omega::keys::{Key, Keys};
use omega::lease::{granted_ttl, LeaseKeeper, LeaseOptions, Register};
use omega::model::{now_ms, Assignment, Job, Node, RestartMode};
use omega::resources::Resources;
use omega::store::Store;
use omega::watcher::{Change, WatchEvent, Watcher};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

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
    /// Task logs: `<log_dir>/<job>/<index>.log` (kept after the container is gone, shared by a task's runs).
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

/// The runner of a current assignment, and how to tell it to stop.
struct Active {
    placement: u32,
    stop: watch::Sender<bool>,
}

pub struct Agent {
    store: Store,
    config: Arc<AgentConfig>,
    containerd: Arc<Containerd>,
    runners: Runners,
    /// Whether the agent is fenced now (never, until `run` starts the fence).
    fence: FenceSignal,
    /// Task -> the runner of its current assignment here.
    active: HashMap<String, Active>,
    /// Every runner and sweep spawned (stopping runners included), aborted at shutdown.
    handles: Vec<JoinHandle<()>>,
    /// The endpoints this node publishes for discovery.
    published: Arc<Published>,
}

impl Agent {
    pub fn new(store: Store, config: AgentConfig, containerd: Containerd) -> Self {
        Agent {
            store,
            config: Arc::new(config),
            containerd: Arc::new(containerd),
            runners: Runners::new(),
            fence: FenceSignal::never(),
            active: HashMap::new(),
            handles: Vec::new(),
            published: Arc::new(Published::default()),
        }
    }

    /// The live task runners (for whoever wants to see or wait on them).
    pub fn runners(&self) -> Runners {
        self.runners.clone()
    }

    /// Registers the node and runs until `shutdown`. Tasks keep running in containerd when the agent stops:
    /// the next agent's runners adopt them.
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
        let name = self.config.node.clone();
        let published = self.published.clone();
        let register: Register = Arc::new(move |store: Store, lease: i64| {
            let (name, published) = (name.clone(), published.clone());
            Box::pin(async move {
                store.put_liveness(&name, lease).await?;
                // Endpoints bound to a lost lease went with it: publish them again under this one.
                published.lease_granted(&store, lease).await
            })
        });
        let plan = FencePlan::new(granted_ttl(self.config.lease_ttl), self.config.grace);
        if plan.grace < self.config.grace {
            tracing::warn!(node = self.config.node, lease_ttl = ?plan.ttl, grace = ?self.config.grace, fencing_grace = ?plan.grace,
                "the lease TTL leaves too little room for the grace: tasks stopped by fencing get a shorter one \
                 (raise --lease-ttl)");
        }
        let options = LeaseOptions { ttl: self.config.lease_ttl, renew_every: Some(plan.renew_every) };
        let keeper =
            LeaseKeeper::start_with(self.store.clone(), options, format!("node {}", node.name), register).await?;
        tracing::info!(node = self.config.node, capacity = %self.config.capacity, renew_every = ?plan.renew_every,
            fence_after = ?plan.window(), "node registered");
        let (fence, signal) = Fence::new(plan, self.config.node.clone(), self.containerd.clone());
        self.fence = signal;
        let fence = tokio::spawn(fence.run(keeper.renewed()));

        let keys = self.store.keys().clone();
        let mut watcher = Watcher::new(self.store.clone(), keys.assignments_of(&self.config.node), 1000);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                event = watcher.next() => {
                    self.handles.retain(|h| !h.is_finished());
                    match event {
                        WatchEvent::Reset { kvs, .. } => {
                            let desired = kvs.iter().filter_map(|kv| parse(&keys, kv.key(), kv.value())).collect();
                            self.reconcile(desired);
                            self.sweep();
                        }
                        WatchEvent::Changes { changes, .. } => self.apply(&keys, changes),
                        WatchEvent::Progress { .. } => {}
                    }
                }
            }
        }
        // Runners are aborted, not stopped: their containers keep running for the next agent. They are all
        // gone before their stop channels close, so none mistakes the shutdown for a removed assignment.
        for h in &self.handles {
            h.abort();
        }
        for h in self.handles.drain(..) {
            let _ = h.await;
        }
        self.active.clear();
        fence.abort();
        drop(keeper);
        Ok(())
    }

    /// Makes the runners match `desired` (task -> assignment), after a (re-)listing.
    fn reconcile(&mut self, desired: HashMap<String, Assignment>) {
        let stale: Vec<String> = self
            .active
            .iter()
            .filter(|(t, r)| desired.get(*t).is_none_or(|a| a.placement != r.placement))
            .map(|(t, _)| t.clone())
            .collect();
        for task in stale {
            self.stop_runner(&task);
        }
        for (task, a) in desired {
            if self.active.get(&task).is_none_or(|r| r.placement != a.placement) {
                self.start_runner(task, a);
            }
        }
    }

    fn apply(&mut self, keys: &Keys, changes: Vec<Change>) {
        for change in changes {
            match change {
                Change::Put(kv) => {
                    if let Some((task, a)) = parse(keys, kv.key(), kv.value()) {
                        if self.active.get(&task).is_none_or(|r| r.placement != a.placement) {
                            self.stop_runner(&task);
                            self.start_runner(task, a);
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
    }

    fn stop_runner(&mut self, task: &str) {
        if let Some(r) = self.active.remove(task) {
            tracing::info!(task, placement = r.placement, "assignment removed; stopping its runner");
            let _ = r.stop.send(true);
        }
    }

    fn start_runner(&mut self, task: String, assignment: Assignment) {
        // Registered before it touches containerd, so the sweep never takes its containers for leftovers.
        let guard = self.runners.register(&task, assignment.placement);
        let (stop, stopped) = watch::channel(false);
        let placement = assignment.placement;
        let runner = TaskRunner {
            store: self.store.clone(),
            containerd: self.containerd.clone(),
            config: self.config.clone(),
            runners: self.runners.clone(),
            fence: self.fence.clone(),
            published: self.published.clone(),
            assignment,
        };
        let runner = Arc::new(runner);
        let attempt = move |stop| {
            let runner = runner.clone();
            async move { runner.run(stop).await }
        };
        self.handles.push(supervise(task.clone(), stopped, guard, attempt));
        self.active.insert(task, Active { placement, stop });
    }

    /// Stops and removes the containers that no runner accounts for (their assignments are gone: cancelled,
    /// preempted or ended while no agent ran), retrying until containerd lets it.
    fn sweep(&mut self) {
        let (containerd, runners, grace) = (self.containerd.clone(), self.runners.clone(), self.config.grace);
        self.handles.push(tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
            let listed = loop {
                match containerd.list().await {
                    Ok(listed) => break listed,
                    Err(e) => {
                        let wait = backoff.next();
                        tracing::warn!(error = %e, retry_in = ?wait, "listing containerd's containers failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                }
            };
            let mut removals = JoinSet::new();
            for c in listed {
                let Some(task) = c.labels.get(LABEL_TASK).cloned() else { continue };
                let placement = c.labels.get(LABEL_PLACEMENT).and_then(|p| p.parse::<u32>().ok());
                if placement.is_some_and(|p| runners.has(&task, p)) {
                    continue;
                }
                let (containerd, runners) = (containerd.clone(), runners.clone());
                removals.spawn(async move {
                    tracing::info!(container = c.id, task, "stopping a container no assignment asks for");
                    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
                    loop {
                        if placement.is_some_and(|p| runners.has(&task, p)) {
                            return;
                        }
                        let removed = async {
                            containerd.stop(&c.id, grace).await?;
                            containerd.remove(&c.id).await
                        };
                        match removed.await {
                            Ok(()) => return,
                            Err(e) => {
                                let wait = backoff.next();
                                tracing::warn!(container = c.id, error = %e, retry_in = ?wait, "removing a leftover container failed; retrying");
                                tokio::time::sleep(wait).await;
                            }
                        }
                    }
                });
            }
            while removals.join_next().await.is_some() {}
        }));
    }
}

fn parse(keys: &Keys, key: &[u8], value: &[u8]) -> Option<(String, Assignment)> {
    let key = std::str::from_utf8(key).ok()?;
    let Some(Key::Assignment { task, .. }) = keys.parse(key) else { return None };
    let a: Assignment = serde_json::from_slice(value).ok()?;
    Some((task.to_string(), a))
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

/// Why a task restarts, as its record says: `restarting after exit 1 (restart 2 of 3)`; `after` is what
/// ended the run.
pub fn restart_reason(job: &Job, after: &str, next: u32) -> String {
    match job.restart.max_restarts {
        0 => format!("restarting after {after} (restart {next})"),
        max => format!("restarting after {after} (restart {next} of {max})"),
    }
}

/// The wait before the next run: the policy's backoff, doubled for each restart so far, at most a minute.
pub fn restart_backoff(job: &Job, restarts_so_far: u32) -> Duration {
    Duration::from_millis(job.restart.backoff_ms.saturating_mul(1 << restarts_so_far.min(6)))
        .min(Duration::from_secs(60))
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
