//! Simulated nodes: many virtual nodes in one process, for scale tests (like Kubernetes' hollow nodes).
//!
//! Each virtual node registers (node record and ledger), is kept alive, takes its assignments and "runs" each
//! task as a timer of the job's stated `duration`, writing the same state transitions a real agent writes
//! (assigned -> running -> succeeded, resources released). What differs from real agents is only what the
//! measurements in the notes demand:
//! - the virtual nodes share a few leases (one per `nodes_per_lease` nodes) instead of one each: 10,000
//!   leases renewed every few seconds cost etcd most of a core and starve claims; their fate is this process's
//!   anyway. Each shared lease has a [`LeaseKeeper`]: when etcd lets one lapse (a pause, an overload) the
//!   keeper grants a new one and writes its nodes' liveness keys again, so the nodes come back by themselves;
//! - one watch on `assign/` serves every virtual node, and one cell-state cache gives the tasks' revisions;
//! - transitions are written in batches every `tick` (guarded per task), not one round trip each.
//!
//! Unlike a real agent they do not fence themselves when cut off from etcd ([`crate::fence`] says why: their
//! tasks run nowhere, and every write they make is guarded by the task's revision).

use etcd_client::{PutOptions, Txn, TxnOp};
use futures_util::FutureExt;
use omega::cell_state::{CellSnapshot, CellState, CellStateOptions, Versioned};
use omega::events::EventKind;
use omega::keys::{Key, Keys};
use omega::lease::{LeaseKeeper, Register};
use omega::model::{now_ms, Allocation, Assignment, JobKind, Liveness, Node, RunInfo, Task, TaskState};
use omega::release::{release, update_tasks, Release};
use omega::resources::Resources;
use omega::store::{encode, Store};
use omega::watcher::{Change, WatchEvent, Watcher};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the virtual nodes look and behave.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub nodes: usize,
    /// Node names are `<name_prefix>-<index>` (zero-padded).
    pub name_prefix: String,
    pub capacity: Resources,
    /// Nodes get a `zone` label `zone-<index % zones>`.
    pub zones: usize,
    /// Labels every node gets on top (one given here wins over the generated `zone`): one host per zone, so a
    /// test can take a whole zone away by killing one process.
    pub labels: BTreeMap<String, String>,
    pub lease_ttl: Duration,
    pub nodes_per_lease: usize,
    /// How long a task takes to start.
    pub start_delay: Duration,
    /// How long a batch task runs when its job states no duration (services without one run until stopped).
    pub default_batch_duration: Duration,
    /// How often due transitions are written.
    pub tick: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            nodes: 100,
            name_prefix: "sim".into(),
            capacity: Resources::new(16_000, 64 << 30),
            zones: 3,
            labels: BTreeMap::new(),
            lease_ttl: Duration::from_secs(15),
            nodes_per_lease: 1000,
            start_delay: Duration::from_millis(50),
            default_batch_duration: Duration::from_secs(10),
            tick: Duration::from_millis(100),
        }
    }
}

/// Counters for logs, tests and the README's measurements.
#[derive(Debug, Default)]
pub struct SimStats {
    pub started: AtomicU64,
    pub finished: AtomicU64,
    pub stopped: AtomicU64,
    /// Full listings of the assignments the host had to take (1 at start; more only after etcd compacted
    /// past its watch).
    pub listings: AtomicU64,
    /// The shared leases' renewal counters.
    renewals: Vec<Arc<AtomicU64>>,
}

impl SimStats {
    /// Successful renewals of the shared leases so far.
    pub fn keepalives(&self) -> u64 {
        self.renewals.iter().map(|r| r.load(Ordering::Relaxed)).sum()
    }
}

/// What one virtual node is doing with one assignment.
#[derive(Clone, Debug)]
enum Phase {
    /// Waiting to be marked running at this time.
    Starting(Instant),
    /// Running; finishes at this time (`None`: until stopped).
    Running(Option<Instant>),
}

#[derive(Clone, Debug)]
struct SimTask {
    node: String,
    placement: u32,
    phase: Phase,
}

/// The simulated host.
pub struct SimulatedNodes {
    store: Store,
    options: SimOptions,
    names: Vec<String>,
    ours: HashSet<String>,
    /// One keeper per group of `nodes_per_lease` nodes.
    keepers: Vec<LeaseKeeper>,
    pub stats: Arc<SimStats>,
}

impl SimulatedNodes {
    pub fn names(options: &SimOptions) -> Vec<String> {
        let width = options.nodes.saturating_sub(1).to_string().len().max(3);
        (0..options.nodes).map(|i| format!("{}-{:0width$}", options.name_prefix, i)).collect()
    }

    /// Registers every virtual node (keeping the ledgers of nodes that exist already) and makes them alive.
    pub async fn register(store: Store, options: SimOptions) -> anyhow::Result<SimulatedNodes> {
        let names = Self::names(&options);
        let keys = store.keys().clone();
        let mut kv = store.client().kv_client();
        // Ledgers that already exist are kept (claims on them survive a restart of this process).
        let (existing, _) =
            store.list(&format!("{}cell/alloc/{}-", keys.prefix(), options.name_prefix), 5000, None).await?;
        let have: HashSet<String> = existing
            .iter()
            .filter_map(|kv| match keys.parse(kv.key_str().ok()?) {
                Some(Key::Alloc(n)) => Some(n.to_string()),
                _ => None,
            })
            .collect();
        let per_txn = store.limits().max_ops().saturating_sub(8).max(8);
        let mut ops = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let mut labels: BTreeMap<String, String> = [
                ("zone".to_string(), format!("zone-{}", i % options.zones.max(1))),
                ("simulated".to_string(), "true".to_string()),
            ]
            .into();
            labels.extend(options.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            let node = Node {
                name: name.clone(),
                capacity: options.capacity,
                labels,
                address: None,
                registered_at_ms: now_ms(),
            };
            let node_key = keys.node(name);
            ops.push(TxnOp::put(node_key.as_str(), encode(&node_key, &node)?, None));
            if !have.contains(name) {
                let alloc_key = keys.alloc(name);
                ops.push(TxnOp::put(
                    alloc_key.as_str(),
                    encode(&alloc_key, &Allocation::empty(name, options.capacity))?,
                    None,
                ));
            }
            if ops.len() + 2 > per_txn || i + 1 == names.len() {
                kv.txn(Txn::new().and_then(std::mem::take(&mut ops))).await?;
            }
        }
        // Alive: each group of nodes under a lease of its own, kept (and replaced if lost) by a keeper.
        let mut keepers = Vec::new();
        for (g, group) in names.chunks(options.nodes_per_lease.max(1)).enumerate() {
            let group: Arc<Vec<String>> = Arc::new(group.to_vec());
            let register: Register = Arc::new(move |store: Store, lease: i64| {
                let group = group.clone();
                async move { put_liveness(&store, &group, lease).await }.boxed()
            });
            let what = format!("simulated nodes {}-{} (group {g})", options.name_prefix, g);
            keepers.push(LeaseKeeper::start(store.clone(), options.lease_ttl, what, register).await?);
        }
        let ours = names.iter().cloned().collect();
        let stats = Arc::new(SimStats {
            renewals: keepers.iter().map(LeaseKeeper::renewal_counter).collect(),
            ..Default::default()
        });
        Ok(SimulatedNodes { store, options, names, ours, keepers, stats })
    }

    /// Successful renewals of the shared leases so far.
    pub fn renewals(&self) -> u64 {
        self.keepers.iter().map(LeaseKeeper::renewals).sum()
    }

    /// How many times a shared lease was lost and replaced.
    pub fn lease_replacements(&self) -> u64 {
        self.keepers.iter().map(|k| k.state().generation).sum()
    }

    /// The shared leases in force now.
    pub fn leases(&self) -> Vec<i64> {
        self.keepers.iter().map(LeaseKeeper::lease).collect()
    }

    pub fn node_names(&self) -> &[String] {
        &self.names
    }

    /// Takes assignments and runs them (the keepers hold the nodes alive meanwhile), until `shutdown`.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let cache = CellState::start(self.store.clone(), CellStateOptions::default()).await?;
        let keys = self.store.keys().clone();
        let mut watcher = Watcher::new(self.store.clone(), keys.assignments_prefix(), 5000);
        let mut tasks: HashMap<String, SimTask> = HashMap::new();
        let mut tick = tokio::time::interval(self.options.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // `watcher.next()` is cancel-safe: losing the race against the tick loses nothing.
            tokio::select! {
                _ = &mut shutdown => break,
                event = watcher.next() => self.on_watch(&keys, event, &mut tasks),
                _ = tick.tick() => {
                    if let Err(e) = self.advance(&cache.snapshot(), &mut tasks).await {
                        tracing::warn!(error = %e, "writing simulated task transitions failed; will retry");
                    }
                }
            }
        }
        Ok(())
    }

    fn on_watch(&self, keys: &Keys, event: WatchEvent, tasks: &mut HashMap<String, SimTask>) {
        let now = Instant::now();
        let start = |node: &str, a: &Assignment| SimTask {
            node: node.to_string(),
            placement: a.placement,
            phase: Phase::Starting(now + self.options.start_delay),
        };
        match event {
            WatchEvent::Reset { kvs, .. } => {
                self.stats.listings.fetch_add(1, Ordering::Relaxed);
                let mut seen = HashSet::new();
                for kv in &kvs {
                    let Some((node, task, a)) = self.parse(keys, kv.key(), kv.value()) else { continue };
                    seen.insert(task.clone());
                    let known = tasks.get(&task).is_some_and(|t| t.placement == a.placement && t.node == node);
                    if !known {
                        tasks.insert(task, start(&node, &a));
                    }
                }
                let gone: Vec<String> = tasks.keys().filter(|t| !seen.contains(*t)).cloned().collect();
                for t in gone {
                    tasks.remove(&t);
                    self.stats.stopped.fetch_add(1, Ordering::Relaxed);
                }
            }
            WatchEvent::Changes { changes, .. } => {
                for change in changes {
                    match change {
                        Change::Put(kv) => {
                            if let Some((node, task, a)) = self.parse(keys, kv.key(), kv.value()) {
                                if tasks.get(&task).is_none_or(|t| t.placement != a.placement) {
                                    tasks.insert(task, start(&node, &a));
                                }
                            }
                        }
                        Change::Delete { key, .. } => {
                            let Ok(key) = std::str::from_utf8(&key) else { continue };
                            if let Some(Key::Assignment { node, task }) = keys.parse(key) {
                                if self.ours.contains(node) && tasks.remove(task).is_some() {
                                    // Cancelled or preempted: the "container" stops at once.
                                    self.stats.stopped.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                }
            }
            WatchEvent::Progress { .. } => {}
        }
    }

    fn parse(&self, keys: &Keys, key: &[u8], value: &[u8]) -> Option<(String, String, Assignment)> {
        let key = std::str::from_utf8(key).ok()?;
        let Some(Key::Assignment { node, task }) = keys.parse(key) else { return None };
        if !self.ours.contains(node) {
            return None;
        }
        let a: Assignment = serde_json::from_slice(value).ok()?;
        Some((node.to_string(), task.to_string(), a))
    }

    /// Writes the transitions that are due: starts (assigned -> running) and finishes (-> succeeded).
    async fn advance(&self, snapshot: &CellSnapshot, tasks: &mut HashMap<String, SimTask>) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut starts: Vec<(Versioned<Task>, Task)> = Vec::new();
        let mut finishes: Vec<Release> = Vec::new();
        for (id, sim) in tasks.iter() {
            // Act only on the record this assignment belongs to (the cache may lag the assignment watch).
            let Some(seen) = snapshot.tasks.get(id.as_str()) else { continue };
            let t = &seen.value;
            if t.node.as_deref() != Some(sim.node.as_str()) || t.placements != sim.placement {
                continue;
            }
            match sim.phase {
                Phase::Starting(at) if at <= now && t.state == TaskState::Assigned => {
                    let mut running = (**t).clone();
                    running.state = TaskState::Running;
                    running.run = Some(RunInfo {
                        container: format!("sim-{}-p{}", id.replace('/', "-"), sim.placement),
                        started_at_ms: now_ms(),
                        ..Default::default()
                    });
                    running.updated_at_ms = now_ms();
                    let on = format!("on {}, placement {}, run 0 (simulated)", sim.node, sim.placement);
                    running.record_event(EventKind::Started, on, running.updated_at_ms);
                    starts.push((seen.clone(), running));
                }
                Phase::Running(Some(until)) if until <= now && t.state == TaskState::Running => {
                    let mut run = t.run.clone().unwrap_or_default();
                    run.finished_at_ms = Some(now_ms());
                    run.exit_code = Some(0);
                    finishes.push(Release {
                        task: seen.clone(),
                        state: TaskState::Succeeded,
                        reason: None,
                        run: Some(run),
                        event: Some((EventKind::Exited, "code 0".into())),
                    });
                }
                _ => {}
            }
        }
        if !starts.is_empty() {
            let out = update_tasks(&self.store, &starts).await?;
            for ((seen, _), result) in starts.iter().zip(out) {
                if result.is_none() {
                    continue;
                }
                self.stats.started.fetch_add(1, Ordering::Relaxed);
                let until = self.duration_of(snapshot, &seen.value).map(|d| now + d);
                if let Some(sim) = tasks.get_mut(&seen.value.id) {
                    sim.phase = Phase::Running(until);
                }
            }
        }
        if !finishes.is_empty() {
            let out = release(&self.store, &finishes).await?;
            for (r, o) in finishes.iter().zip(out) {
                if matches!(o, omega::release::ReleaseOutcome::Done { .. }) {
                    self.stats.finished.fetch_add(1, Ordering::Relaxed);
                    tasks.remove(&r.task.value.id);
                }
            }
        }
        Ok(())
    }

    /// How long a task runs: its job's `duration`, else the default for batch, else forever (services).
    fn duration_of(&self, snapshot: &CellSnapshot, task: &Task) -> Option<Duration> {
        let job = snapshot.jobs.get(task.job.as_str())?;
        match (job.value.duration_ms, job.value.kind) {
            (Some(ms), _) => Some(Duration::from_millis(ms)),
            (None, JobKind::Batch) => Some(self.options.default_batch_duration),
            (None, JobKind::Service) => None,
        }
    }
}

/// Writes the liveness keys of `nodes` bound to `lease`, in as few transactions as the op limit allows.
async fn put_liveness(store: &Store, nodes: &[String], lease: i64) -> omega::Result<()> {
    let keys = store.keys();
    let mut kv = store.client().kv_client();
    let per_txn = store.limits().max_ops().max(1);
    for chunk in nodes.chunks(per_txn) {
        let mut ops = Vec::with_capacity(chunk.len());
        for name in chunk {
            let key = keys.live(name);
            let live = Liveness { node: name.clone(), lease: format!("{lease:x}"), since_ms: now_ms() };
            ops.push(TxnOp::put(key.as_str(), encode(&key, &live)?, Some(PutOptions::new().with_lease(lease))));
        }
        kv.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}
