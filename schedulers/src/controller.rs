//! The cell controller: what no single scheduler owns.
//!
//! Several replicas run; one leads, elected through etcd's election API, and every write it makes is fenced
//! on its leader key, so a replica that lost leadership (paused, partitioned) cannot write after the new
//! leader has started. The leader watches the cell and:
//! - **lost nodes**: a node whose liveness key is gone (its agent's lease lapsed) for longer than `grace`
//!   loses its tasks: each is released from the node (ledger freed, assignment removed) and goes back to
//!   `pending` for its scheduler, or, for a batch job that never restarts, ends `lost`;
//! - **service replicas**: a replica that ended (failed after its restarts, or lost) is handed back to
//!   `pending`, so the service keeps its replica count;
//! - **batch completion**: a batch job whose tasks have all ended is `succeeded` if every task succeeded,
//!   else `failed`;
//! - **garbage collection**: a job that finished (succeeded, failed, cancelled) longer than `gc_after` ago is
//!   deleted with its tasks, status and owner key, so a cell that runs for weeks does not grow without bound.
//!
//! The controller only releases and re-pends; placing is the schedulers' job, through the same optimistic
//! commits as always.

use omega::cell_state::{CellSnapshot, CellState, CellStateOptions, Versioned};
use omega::lease::Renewer;
use omega::model::{JobKind, JobState, RestartMode, Task, TaskState};
use omega::release::{release_fenced, Fence, Release};
use omega::store::Store;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub instance: String,
    /// TTL of the leadership lease: a dead leader is replaced this long after it stopped renewing.
    pub lease_ttl: Duration,
    /// How long a node stays without its liveness key before its tasks are given up (on top of the agent's
    /// lease TTL, which already is the main grace).
    pub grace: Duration,
    /// How often the leader looks at the cell when nothing wakes it.
    pub period: Duration,
    /// Delete jobs (with their tasks and status) this long after they finished; `None` keeps them.
    pub gc_after: Option<Duration>,
}

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reconciled {
    pub lost_tasks: usize,
    pub replaced_replicas: usize,
    pub finished_jobs: usize,
    pub collected_jobs: usize,
}

fn election(store: &Store) -> String {
    format!("{}controller", store.keys().prefix())
}

/// Runs one controller replica until `shutdown`: campaigns, leads while it holds the leadership, campaigns
/// again after losing it.
pub async fn run(
    store: Store,
    config: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let ttl = config.lease_ttl.as_secs().max(2) as i64;
        let lease = store.grant_lease(ttl).await?;
        let mut renewer = Renewer::new(store.clone(), lease);
        let keep = tokio::spawn({
            let period = config.lease_ttl / 3;
            async move {
                loop {
                    tokio::time::sleep(period).await;
                    match renewer.renew().await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => tracing::warn!(error = %e, "controller lease keep-alive failed; will retry"),
                    }
                }
            }
        });
        // Waits until this replica leads (a campaign has no request timeout on our client).
        let campaign = async {
            let mut election_client = store.client().election_client();
            election_client.campaign(election(&store), config.instance.clone(), lease).await
        };
        let won = tokio::select! {
            _ = &mut shutdown => { keep.abort(); let _ = store.client().lease_client().revoke(lease).await; return Ok(()); }
            won = campaign => won,
        };
        let leader = match won.map(|r| r.leader().cloned()) {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => {
                keep.abort();
                tracing::warn!("campaign failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let fence = Fence { key: leader.key().to_vec(), revision: leader.rev() };
        tracing::info!(instance = config.instance, "leading the cell");
        let outcome = lead(&store, &config, &fence, &keep, &mut shutdown).await;
        keep.abort();
        match outcome {
            Ok(true) => {
                // Shutting down: hand over at once.
                let _ = store.client().lease_client().revoke(lease).await;
                return Ok(());
            }
            Ok(false) => tracing::warn!(instance = config.instance, "lost the leadership; campaigning again"),
            Err(e) => tracing::warn!(error = %e, "leading failed; campaigning again"),
        }
    }
}

/// Leads until shutdown (`Ok(true)`) or until the leadership is lost (`Ok(false)`).
async fn lead(
    store: &Store,
    config: &ControllerConfig,
    fence: &Fence,
    keep: &tokio::task::JoinHandle<()>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<bool> {
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await?;
    let mut changes = cache.subscribe();
    let mut down_since: HashMap<String, Instant> = HashMap::new();
    loop {
        if keep.is_finished() {
            return Ok(false);
        }
        let snapshot = cache.snapshot();
        match reconcile(store, &snapshot, config, fence, &mut down_since).await {
            Ok(r) if r.lost_tasks + r.replaced_replicas + r.finished_jobs + r.collected_jobs > 0 => {
                tracing::info!(?r, "reconciled")
            }
            Ok(_) => {}
            Err(e) if matches!(e.downcast_ref::<omega::Error>(), Some(omega::Error::NotLeader(_))) => return Ok(false),
            Err(e) => tracing::warn!(error = %e, "reconciling failed; will retry"),
        }
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(true),
            _ = changes.changed() => {}
            _ = tokio::time::sleep(config.period) => {}
        }
    }
}

/// One pass over the cell. Writes only through the fence.
pub async fn reconcile(
    store: &Store,
    snapshot: &CellSnapshot,
    config: &ControllerConfig,
    fence: &Fence,
    down_since: &mut HashMap<String, Instant>,
) -> anyhow::Result<Reconciled> {
    let mut done = Reconciled::default();
    let now = Instant::now();
    let mut releases: Vec<Release> = Vec::new();

    // Lost nodes: registered, holding tasks, and without their liveness key for longer than the grace.
    down_since.retain(|node, _| !snapshot.live.contains_key(node));
    for node in snapshot.allocations.keys() {
        if snapshot.live.contains_key(node) {
            continue;
        }
        let since = *down_since.entry(node.clone()).or_insert(now);
        if now.duration_since(since) < config.grace {
            continue;
        }
        for task in snapshot.tasks_on(node) {
            let next = after_loss(snapshot, &task.value);
            releases.push(Release {
                task: task.clone(),
                state: next,
                reason: Some(format!("node {node} lost (its agent stopped renewing its lease)")),
                run: None,
            });
        }
    }
    done.lost_tasks = releases.len();

    // Service replicas that ended go back to pending.
    for job in snapshot.jobs.values() {
        let job = &job.value;
        if job.kind != JobKind::Service || !matches!(job.state, JobState::Pending | JobState::Running) {
            continue;
        }
        for t in snapshot.tasks_of(job) {
            if matches!(t.value.state, TaskState::Failed | TaskState::Lost | TaskState::Succeeded) {
                releases.push(replace(t));
                done.replaced_replicas += 1;
            }
        }
    }
    if !releases.is_empty() {
        release_fenced(store, &releases, Some(fence)).await?;
    }

    // Batch jobs whose tasks have all ended.
    for job in snapshot.jobs.values() {
        let j = &job.value;
        if j.kind != JobKind::Batch || !matches!(j.state, JobState::Pending | JobState::Running) {
            continue;
        }
        let tasks: Vec<&Versioned<Task>> = snapshot.tasks_of(j).collect();
        if tasks.len() != j.tasks as usize || !tasks.iter().all(|t| t.value.state.is_terminal()) {
            continue;
        }
        let state = if tasks.iter().all(|t| t.value.state == TaskState::Succeeded) {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        if store.set_job_state_if(j, job.mod_revision, state, Some(fence.compare())).await?.is_some() {
            done.finished_jobs += 1;
            tracing::info!(job = j.id, ?state, "job finished");
        }
    }
    if let Some(after) = config.gc_after {
        done.collected_jobs = collect(store, snapshot, after, fence).await?;
    }
    Ok(done)
}

/// Deletes jobs that finished more than `after` ago and hold nothing: job, tasks, status and owner in one
/// transaction, compared on the job record and the fence.
async fn collect(store: &Store, snapshot: &CellSnapshot, after: Duration, fence: &Fence) -> anyhow::Result<usize> {
    use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};
    let keys = store.keys();
    let cutoff = omega::model::now_ms().saturating_sub(after.as_millis() as u64);
    let mut collected = 0;
    for job in snapshot.jobs.values() {
        let j = &job.value;
        let old_enough = j.state.is_final() && j.finished_at_ms.is_some_and(|t| t <= cutoff);
        if !old_enough || snapshot.tasks_of(j).any(|t| t.value.state.holds_resources()) {
            continue;
        }
        let job_key = keys.job(&j.id);
        let tasks = keys.tasks_of_job(&j.id);
        let txn = Txn::new()
            .when([Compare::mod_revision(job_key.as_str(), CompareOp::Equal, job.mod_revision), fence.compare()])
            .and_then([
                TxnOp::delete(job_key.as_str(), None),
                TxnOp::delete(
                    tasks.as_str(),
                    Some(DeleteOptions::new().with_range(omega::keys::prefix_end(tasks.as_bytes()))),
                ),
                TxnOp::delete(keys.status(&j.id), None),
                TxnOp::delete(keys.owner(&j.id), None),
            ]);
        if store.client().kv_client().txn(txn).await?.succeeded() {
            collected += 1;
            tracing::info!(job = j.id, "finished job collected");
        }
    }
    Ok(collected)
}

/// What a task becomes when its node is lost: pending again for its scheduler, unless it is a batch task
/// that must not restart, which ends `lost`.
fn after_loss(snapshot: &CellSnapshot, task: &Task) -> TaskState {
    let job = snapshot.jobs.get(&task.job);
    match job.map(|j| (j.value.kind, j.value.restart.mode)) {
        Some((JobKind::Batch, RestartMode::Never)) => TaskState::Lost,
        _ => TaskState::Pending,
    }
}

fn replace(t: &Versioned<Task>) -> Release {
    Release {
        task: t.clone(),
        state: TaskState::Pending,
        reason: Some(format!("replacing a replica that ended {}", t.value.state)),
        run: None,
    }
}

impl std::fmt::Display for ControllerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "controller {} (lease {:?}, grace {:?})", self.instance, self.lease_ttl, self.grace)
    }
}
