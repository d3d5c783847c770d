//! The cell controller: what no single scheduler owns.
//!
//! Several replicas run; one leads, elected through etcd's election API, and every write it makes is fenced
//! on its leader key, so a replica that lost leadership (paused, partitioned) cannot write after the new
//! leader has started. The leader watches the cell and:
//! - **lost nodes**: a node whose liveness key is gone (its agent's lease lapsed) for longer than `grace`
//!   loses its tasks: each is released from the node (ledger freed, assignment removed) and goes back to
//!   `pending` for its scheduler, or, for a batch job that never restarts, ends `lost`; when many nodes lapse
//!   at once (etcd or the network failing, not the nodes), more slowly or not at all ([`disruption`]);
//! - **service replicas**: a replica that ended (failed after its restarts, or lost) is handed back to
//!   `pending`, so the service keeps its replica count;
//! - **batch completion**: a batch job whose tasks have all ended is `succeeded` if every task succeeded,
//!   else `failed`;
//! - **garbage collection**: a job that finished (succeeded, failed, cancelled) longer than `gc_after` ago is
//!   deleted with its tasks, status and owner key, so a cell that runs for weeks does not grow without bound;
//!   past a cap on the tasks of finished jobs the oldest go sooner ([`retention`]);
//! - **compaction**: etcd's history is compacted every `compact_every` ([`compaction`]), so its database
//!   stops growing.
//!
//! The controller only releases and re-pends; placing is the schedulers' job, through the same optimistic
//! commits as always.
//!
//! Like kube-runtime's controllers, the leader does not rescan the cell on every change: the cache tells it
//! which objects changed ([`CellChanges`]), those go into a [`queue::WorkQueue`] (each once, with backoff per
//! object after a failure, and a later due time when a grace period is running), and the [`nodes`] and
//! [`jobs`] reconcilers look only at what is due. A full pass every `resync` is the safety net for anything a
//! notice could have missed. What it does shows in its Prometheus metrics ([`metrics`]).

mod compaction;
mod deployments;
pub mod disruption;
mod drains;
mod jobs;
pub mod metrics;
mod nodes;
pub mod queue;
mod retention;

use futures_util::FutureExt;
use omega::cell_state::{CellChanges, CellObject, CellSnapshot, CellState, CellStateOptions};
use omega::lease::LeaseKeeper;
use omega::release::Fence;
use omega::store::Store;
use queue::WorkQueue;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub instance: String,
    /// TTL of the leadership lease: a dead leader is replaced this long after it stopped renewing.
    pub lease_ttl: Duration,
    /// How long a node stays without its liveness key before its tasks are given up (on top of the agent's
    /// lease TTL, which already is the main grace).
    pub grace: Duration,
    /// How often the leader looks at every node and job even if no change notice asked for it.
    pub resync: Duration,
    /// Delete jobs (with their tasks and status) this long after they finished; `None` keeps them.
    pub gc_after: Option<Duration>,
    /// Forget nodes (their record and ledger) that have been down this long and hold nothing; `None` keeps
    /// them. A node that comes back registers again.
    pub node_gc_after: Option<Duration>,
    /// Delete tasks without a job record (a submission that died half way) once nothing of them was written
    /// for this long.
    pub orphan_grace: Duration,
    /// Keep at most this many tasks of finished jobs, collecting the oldest jobs first; `None`: age only.
    pub keep_finished_tasks: Option<usize>,
    /// Compact etcd's history this often, to the revision of one period earlier; `None`: never (etcd runs
    /// with `--auto-compaction-*`, or an operator compacts).
    pub compact_every: Option<Duration>,
    /// When many nodes lapse at once, releasing their tasks slows down or stops ([`disruption`]).
    pub disruption: disruption::DisruptionPolicy,
}

/// How often the leader checks the cap on finished tasks (a walk over every job).
const RETENTION_EVERY: Duration = Duration::from_secs(10);

/// How often the leader publishes the services' health and rollouts (a walk over the service jobs).
const SERVICES_EVERY: Duration = Duration::from_secs(2);

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reconciled {
    pub lost_tasks: usize,
    pub replaced_replicas: usize,
    pub finished_jobs: usize,
    pub collected_jobs: usize,
    pub collected_nodes: usize,
    pub collected_orphans: usize,
    pub deployments: deployments::Rolled,
    pub drains: drains::Drained,
}

impl Reconciled {
    fn add(&mut self, other: Reconciled) {
        self.lost_tasks += other.lost_tasks;
        self.replaced_replicas += other.replaced_replicas;
        self.finished_jobs += other.finished_jobs;
        self.collected_jobs += other.collected_jobs;
        self.collected_nodes += other.collected_nodes;
        self.collected_orphans += other.collected_orphans;
        self.deployments.add(other.deployments);
        self.drains.started += other.drains.started;
        self.drains.moved += other.drains.moved;
        self.drains.forced += other.drains.forced;
    }

    fn any(&self) -> bool {
        self.lost_tasks
            + self.replaced_replicas
            + self.finished_jobs
            + self.collected_jobs
            + self.collected_nodes
            + self.collected_orphans
            + self.deployments.total()
            + self.drains.started
            + self.drains.moved
            + self.drains.forced
            > 0
    }
}

/// What the controller's queue holds: nodes and jobs (a task's change queues its job).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Object {
    Node(String),
    Job(String),
}

impl Object {
    fn from_cell(object: &CellObject) -> Object {
        match object {
            CellObject::Node(n) => Object::Node(n.clone()),
            CellObject::Job(j) => Object::Job(j.clone()),
            CellObject::Task(t) => Object::Job(t.split_once('/').map(|(j, _)| j).unwrap_or(t).to_string()),
        }
    }
}

fn election(store: &Store) -> String {
    store.keys().controller_election()
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
    // Subscribed before the first look, so no change between the two is missed.
    let mut changes = cache.subscribe_changes();
    let generation = keeper.state().generation;
    let mut lease_changes = keeper.watch();
    let mut queue: WorkQueue<Object> = WorkQueue::default();
    let mut nodes = nodes::NodeReconciler::new(config);
    metrics::leading(true);
    let mut next_resync = Instant::now();
    let mut next_retention = Instant::now() + RETENTION_EVERY;
    let mut next_services = Instant::now();
    let mut labelled = std::collections::BTreeSet::new();
    // Runs while this replica leads; aborted when `lead` returns.
    let compactor = config.compact_every.map(|every| AbortOnDrop(tokio::spawn(compaction::run(store.clone(), every))));
    let _compactor = compactor;
    loop {
        if keeper.state().generation != generation {
            return Ok(false);
        }
        let snapshot = cache.snapshot();
        if Instant::now() >= next_resync {
            enqueue_all(&snapshot, &mut queue);
            nodes.retain(&snapshot);
            next_resync = Instant::now() + config.resync;
        }
        if Instant::now() >= next_services {
            next_services = Instant::now() + SERVICES_EVERY;
            labelled = metrics::services(&snapshot, &labelled);
        }
        if let Some(cap) = config.keep_finished_tasks.filter(|_| Instant::now() >= next_retention) {
            next_retention = Instant::now() + RETENTION_EVERY;
            let old = retention::beyond_cap(&snapshot, cap);
            if !old.is_empty() {
                match jobs::collect_jobs(store, &old, fence).await {
                    Ok(n) => tracing::info!(jobs = n, cap, "collected the oldest finished jobs beyond the cap"),
                    Err(e) if matches!(e.downcast_ref::<omega::Error>(), Some(omega::Error::NotLeader(_))) => {
                        return Ok(false)
                    }
                    Err(e) => tracing::warn!(error = %e, "collecting finished jobs beyond the cap failed"),
                }
            }
        }
        let due = queue.pop_due(Instant::now());
        if !due.is_empty() {
            match reconcile(store, &snapshot, config, fence, &due, &mut nodes, &mut queue).await {
                Ok(done) if done.any() => {
                    metrics::reconciled(&done);
                    tracing::info!(?done, "reconciled")
                }
                Ok(_) => {}
                Err(e) if matches!(e.downcast_ref::<omega::Error>(), Some(omega::Error::NotLeader(_))) => {
                    return Ok(false)
                }
                Err(e) => tracing::warn!(error = %e, "reconciling failed; those objects will be retried"),
            }
        }
        let mut wake = queue.next_due().unwrap_or(next_resync).min(next_resync);
        if config.keep_finished_tasks.is_some() {
            wake = wake.min(next_retention);
        }
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(true),
            notice = changes.recv() => match notice {
                Ok(notice) => match &*notice {
                    CellChanges::All { .. } => enqueue_all(&cache.snapshot(), &mut queue),
                    CellChanges::Objects { objects, .. } => {
                        for o in objects {
                            queue.add(Object::from_cell(o));
                        }
                    }
                },
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "fell behind the cell's change notices; looking at everything");
                    enqueue_all(&cache.snapshot(), &mut queue);
                }
                Err(RecvError::Closed) => anyhow::bail!("the cell-state cache stopped"),
            },
            _ = lease_changes.changed() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// Aborts a task when dropped (the compactor stops with the leadership).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends the leader's `groups`, each under the fence: which of them applied. [`omega::Error::NotLeader`] if
/// the fence failed (this replica leads no more; nothing after that point was written).
async fn apply_fenced(store: &Store, groups: Vec<omega::txn::Group>, fence: &Fence) -> anyhow::Result<Vec<bool>> {
    use omega::txn::{Outcome, Sender};
    let sent = Sender::new(store.clone(), 2).nested(groups, Some(&fence.compare())).await;
    let mut applied = Vec::with_capacity(sent.outcomes.len());
    for outcome in sent.outcomes {
        match outcome {
            Outcome::Fenced => return Err(omega::Error::NotLeader(String::from_utf8_lossy(&fence.key).into()).into()),
            o => applied.push(o.is_applied()),
        }
    }
    Ok(applied)
}

/// Queues every node and every job of the cell, and every job id that has tasks but no record.
fn enqueue_all(snapshot: &CellSnapshot, queue: &mut WorkQueue<Object>) {
    for node in snapshot.allocations.keys().chain(snapshot.nodes.keys()) {
        queue.add(Object::Node(node.to_string()));
    }
    for job in snapshot.jobs.keys() {
        queue.add(Object::Job(job.to_string()));
    }
    for task in snapshot.tasks.values() {
        if !snapshot.jobs.contains_key(task.value.job.as_str()) {
            queue.add(Object::Job(task.value.job.clone()));
        }
    }
}

/// Reconciles the objects due now: nodes, then jobs (so the releases of a lost node and the replicas they
/// affect are handled in one pass). A failure puts that batch's objects back with backoff.
async fn reconcile(
    store: &Store,
    snapshot: &CellSnapshot,
    config: &ControllerConfig,
    fence: &Fence,
    due: &[Object],
    nodes: &mut nodes::NodeReconciler,
    queue: &mut WorkQueue<Object>,
) -> anyhow::Result<Reconciled> {
    let mut done = Reconciled::default();
    let node_ids: Vec<String> =
        due.iter().filter_map(|o| if let Object::Node(n) = o { Some(n.clone()) } else { None }).collect();
    let job_ids: Vec<String> =
        due.iter().filter_map(|o| if let Object::Job(j) = o { Some(j.clone()) } else { None }).collect();
    let batches = [(node_ids, true), (job_ids, false)];
    for (ids, is_nodes) in batches {
        if ids.is_empty() {
            continue;
        }
        let result = if is_nodes {
            match nodes.reconcile(store, snapshot, config, fence, &ids, queue).await {
                Ok(mut d) => drains::reconcile(store, snapshot, fence, &ids, queue).await.map(|drained| {
                    d.drains = drained;
                    d
                }),
                Err(e) => Err(e),
            }
        } else {
            jobs::reconcile(store, snapshot, config, fence, &ids, queue).await
        };
        let wrap = |id: &String| if is_nodes { Object::Node(id.clone()) } else { Object::Job(id.clone()) };
        match result {
            Ok(d) => {
                done.add(d);
                for id in &ids {
                    queue.succeeded(&wrap(id));
                }
            }
            Err(e) if matches!(e.downcast_ref::<omega::Error>(), Some(omega::Error::NotLeader(_))) => return Err(e),
            Err(e) => {
                for id in &ids {
                    queue.failed(wrap(id));
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

impl std::fmt::Display for ControllerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gc = |d: Option<Duration>| d.map(|d| format!("{d:?}")).unwrap_or_else(|| "never".into());
        write!(
            f,
            "controller {} (lease {:?}, grace {:?}, jobs collected after {}{}, nodes after {}, etcd compacted {})",
            self.instance,
            self.lease_ttl,
            self.grace,
            gc(self.gc_after),
            self.keep_finished_tasks.map(|n| format!(" or beyond {n} finished tasks")).unwrap_or_default(),
            gc(self.node_gc_after),
            self.compact_every.map(|d| format!("every {d:?}")).unwrap_or_else(|| "never".into())
        )
    }
}
