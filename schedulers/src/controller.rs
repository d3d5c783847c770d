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

use futures_util::FutureExt;
use omega::cell_state::{CellSnapshot, CellState, CellStateOptions, Versioned};
use omega::lease::LeaseKeeper;
use omega::model::{JobKind, JobState, RestartMode, Task, TaskState};
use omega::release::{release_guarded, Fence, Guard, Release, ReleaseOutcome};
use omega::store::Store;
use std::collections::HashMap;
use std::sync::Arc;
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
    /// Forget nodes (their record and ledger) that have been down this long and hold nothing; `None` keeps
    /// them. A node that comes back registers again.
    pub node_gc_after: Option<Duration>,
}

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reconciled {
    pub lost_tasks: usize,
    pub replaced_replicas: usize,
    pub finished_jobs: usize,
    pub collected_jobs: usize,
    pub collected_nodes: usize,
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
        // Leadership is bound to this lease: if it is ever replaced, the old election key went with the old
        // lease, and this replica must stop writing and campaign again.
        let noop: omega::lease::Register = Arc::new(|_, _| async { Ok(()) }.boxed());
        let what = format!("controller {}", config.instance);
        let keeper = match LeaseKeeper::start(store.clone(), config.lease_ttl, what, noop).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot get a lease to campaign with; retrying");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let lease = keeper.lease();
        // Waits until this replica leads (a campaign has no request timeout: it uses the stream client).
        let campaign = async {
            let mut election_client = store.stream_client().election_client();
            election_client.campaign(election(&store), config.instance.clone(), lease).await
        };
        let won = tokio::select! {
            _ = &mut shutdown => { keeper.revoke().await; return Ok(()); }
            won = campaign => won,
        };
        let leader = match won.map(|r| r.leader().cloned()) {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => {
                keeper.revoke().await;
                tracing::warn!("campaign failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let fence = Fence { key: leader.key().to_vec(), revision: leader.rev() };
        tracing::info!(instance = config.instance, "leading the cell");
        let outcome = lead(&store, &config, &fence, &keeper, &mut shutdown).await;
        match outcome {
            Ok(true) => {
                // Shutting down: hand over at once.
                keeper.revoke().await;
                return Ok(());
            }
            Ok(false) => tracing::warn!(instance = config.instance, "lost the leadership; campaigning again"),
            Err(e) => tracing::warn!(error = %e, "leading failed; campaigning again"),
        }
        keeper.revoke().await;
    }
}

/// Leads until shutdown (`Ok(true)`) or until the leadership is lost (`Ok(false)`).
async fn lead(
    store: &Store,
    config: &ControllerConfig,
    fence: &Fence,
    keeper: &LeaseKeeper,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<bool> {
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await?;
    let mut changes = cache.subscribe();
    let mut down_since: HashMap<String, Instant> = HashMap::new();
    let generation = keeper.state().generation;
    let mut lease_changes = keeper.watch();
    loop {
        if keeper.state().generation != generation {
            return Ok(false);
        }
        let snapshot = cache.snapshot();
        match reconcile(store, &snapshot, config, fence, &mut down_since).await {
            Ok(r)
                if r.lost_tasks + r.replaced_replicas + r.finished_jobs + r.collected_jobs + r.collected_nodes > 0 =>
            {
                tracing::info!(?r, "reconciled")
            }
            Ok(_) => {}
            Err(e) if matches!(e.downcast_ref::<omega::Error>(), Some(omega::Error::NotLeader(_))) => return Ok(false),
            Err(e) => tracing::warn!(error = %e, "reconciling failed; will retry"),
        }
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(true),
            _ = changes.changed() => {}
            _ = lease_changes.changed() => {}
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
    let mut lost: Vec<Release> = Vec::new();

    // Lost nodes: registered, holding tasks, and without their liveness key for longer than the grace.
    down_since.retain(|node, _| !snapshot.live.contains_key(node) && snapshot.allocations.contains_key(node));
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
            lost.push(Release {
                task: task.clone(),
                state: next,
                reason: Some(format!("node {node} lost (its agent stopped renewing its lease)")),
                run: None,
            });
        }
    }
    if !lost.is_empty() {
        omega::failpoint::hit("controller.before_lost_release").await;
        // Compared on the node still being down: an agent that re-registered meanwhile keeps its tasks.
        let outcomes = release_guarded(store, &lost, Guard { fence: Some(fence), nodes_down: true }).await?;
        done.lost_tasks = outcomes.iter().filter(|o| matches!(o, ReleaseOutcome::Done { .. })).count();
        let kept = outcomes.iter().filter(|o| **o == ReleaseOutcome::NodeAlive).count();
        if kept > 0 {
            tracing::info!(tasks = kept, "nodes came back before their tasks were given up; they keep them");
        }
    }

    // Service replicas that ended go back to pending.
    let mut releases: Vec<Release> = Vec::new();
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
        release_guarded(store, &releases, Guard { fence: Some(fence), nodes_down: false }).await?;
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
    if let Some(after) = config.node_gc_after {
        done.collected_nodes = collect_nodes(store, snapshot, after, down_since, fence).await?;
    }
    Ok(done)
}

/// Forgets nodes that have been down longer than `after` and hold nothing: record and ledger deleted in one
/// transaction, compared on both, on the node still being down and on the fence. Without this, every node
/// that ever existed (a simulated host's thousands included) would stay in every cache forever.
async fn collect_nodes(
    store: &Store,
    snapshot: &CellSnapshot,
    after: Duration,
    down_since: &HashMap<String, Instant>,
    fence: &Fence,
) -> anyhow::Result<usize> {
    use etcd_client::{Compare, CompareOp};
    use omega::txn::{Group, Outcome, Sender};
    let keys = store.keys();
    let mut groups = Vec::new();
    for (node, since) in down_since {
        if since.elapsed() < after || snapshot.live.contains_key(node) || snapshot.tasks_on(node).next().is_some() {
            continue;
        }
        let Some(ledger) = snapshot.allocations.get(node) else { continue };
        if ledger.value.tasks > 0 {
            continue;
        }
        let (node_key, alloc_key, live_key) = (keys.node(node), keys.alloc(node), keys.live(node));
        let mut g = Group::new();
        g.compare(&alloc_key, Compare::mod_revision(alloc_key.as_str(), CompareOp::Equal, ledger.mod_revision));
        g.compare(&live_key, Compare::create_revision(live_key.as_str(), CompareOp::Equal, 0));
        if let Some(record) = snapshot.nodes.get(node) {
            g.compare(&node_key, Compare::mod_revision(node_key.as_str(), CompareOp::Equal, record.mod_revision));
        }
        g.delete(&alloc_key).delete(&node_key);
        groups.push((node.clone(), g));
    }
    if groups.is_empty() {
        return Ok(0);
    }
    let only: Vec<Group> = groups.iter().map(|(_, g)| g.clone()).collect();
    let sent = Sender::new(store.clone(), 2).nested(&only, Some(&fence.compare())).await;
    let mut collected = 0;
    for ((node, _), outcome) in groups.iter().zip(sent.outcomes) {
        match outcome {
            Outcome::Applied { .. } => {
                collected += 1;
                tracing::info!(node, down_for = ?after, "node down and empty for long enough; forgotten");
            }
            Outcome::Fenced => return Err(omega::Error::NotLeader(String::from_utf8_lossy(&fence.key).into()).into()),
            _ => {}
        }
    }
    Ok(collected)
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
