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
//!
//! **Health**, so that scale tests can exercise what reads it (rolling updates, ...). A task runs its own
//! version's spec (the job in the cache when the versions match, else that version fetched once with
//! `Store::job_version` and kept), and when that spec has checks its simulated run follows one rule:
//! - health `starting` is written with `running` (no write of its own);
//! - if some check is `type: exec` whose command's first word is `false` (`["false"]`, `["/bin/false", ...]`),
//!   the run turns `unhealthy` (message `<check> check: \`<command>\` exited with 1`, an `unhealthy` event) once
//!   that check's `grace + interval x unhealthy_threshold` has passed; with its `restart: true`, it is then
//!   restarted as a real agent would (after the policy's backoff, counting `run.restarts`: a new run,
//!   `starting` again, reason `restarting after unhealthy: ...`, a `restarted` event) while the job's restart
//!   policy allows, and ends `failed` (`unhealthy: ...`) once it does not; with `restart: false` it stays
//!   unhealthy;
//! - otherwise it turns `healthy` (a `healthy` event) once the longest `interval x healthy_threshold` of its
//!   checks has passed.
//!
//! One write per transition, as a real agent makes.
//!
//! **Discovery** ([`omega::discovery`]): a task of a job with `services` is published (address `127.0.0.1`,
//! the declared port) once it turns healthy, or once it runs when its job has no checks, under its node's
//! shared lease; it is withdrawn before anything else is written about it turning unhealthy or ending, and
//! when its assignment goes away (cancelled, preempted, drained, replaced by an update). When a shared lease
//! is lost and replaced, its nodes' endpoints are published again under the new one.

use crate::agent::{restart_backoff, restart_reason, should_restart};
use etcd_client::{PutOptions, Txn, TxnOp};
use futures_util::FutureExt;
use omega::cell_state::{CellSnapshot, CellState, CellStateOptions, Versioned};
use omega::discovery::{self, Endpoint};
use omega::events::EventKind;
use omega::health::{Health, HealthCheck, HealthStatus, Probe};
use omega::keys::{Key, Keys};
use omega::lease::{LeaseKeeper, Register};
use omega::model::{now_ms, Allocation, Assignment, Job, JobKind, Liveness, Node, RunInfo, Task, TaskState};
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
    /// Stopped as unhealthy; the next run is recorded at this time, with this reason.
    Restarting(Instant, String),
    /// Unhealthy with its restarts spent: ends `failed` with this reason.
    Failing(String),
}

#[derive(Clone, Debug)]
struct SimTask {
    node: String,
    placement: u32,
    phase: Phase,
    /// The one health transition the current run still makes.
    health: Option<SimHealth>,
    /// What the current run has published (to withdraw, or to publish again under a replaced lease).
    published: Vec<Endpoint>,
}

/// A simulated run's health transition: at `at`, to `status`.
#[derive(Clone, Debug)]
struct SimHealth {
    at: Instant,
    status: HealthStatus,
    /// The failing check's message (unhealthy), or the checks passing (healthy).
    message: String,
    /// Unhealthy, and the failing check restarts its task.
    restart: bool,
}

/// Specs by (job, version), for tasks of a version other than the cached job's.
type Specs = HashMap<(String, u32), Arc<Job>>;

/// The health transition a simulated run of `job` makes (see the module doc for the rule), if it has checks.
fn simulated_health(job: &Job, started: Instant) -> Option<SimHealth> {
    let ms = |ms: u64| Duration::from_millis(ms);
    if let Some(failing) = job.checks.iter().find(|c| fails_in_simulation(c)) {
        let after =
            ms(failing.grace_ms) + ms(failing.interval_ms.saturating_mul(u64::from(failing.unhealthy_threshold)));
        let command = match &failing.probe {
            Probe::Exec { command } => command.join(" "),
            _ => String::new(),
        };
        return Some(SimHealth {
            at: started + after,
            status: HealthStatus::Unhealthy,
            message: format!("{} check: `{command}` exited with 1", failing.name),
            restart: failing.restart,
        });
    }
    let after = job.checks.iter().map(|c| ms(c.interval_ms.saturating_mul(u64::from(c.healthy_threshold)))).max()?;
    let names: Vec<&str> = job.checks.iter().map(|c| c.name.as_str()).collect();
    Some(SimHealth {
        at: started + after,
        status: HealthStatus::Healthy,
        message: format!("passing: {}", names.join(", ")),
        restart: false,
    })
}

/// Whether a check fails on a simulated node: an exec check whose command's first word is `false`.
fn fails_in_simulation(check: &HealthCheck) -> bool {
    match &check.probe {
        Probe::Exec { command } => command.first().is_some_and(|w| w.rsplit('/').next() == Some("false")),
        _ => false,
    }
}

/// The simulated host.
pub struct SimulatedNodes {
    store: Store,
    options: SimOptions,
    names: Vec<String>,
    ours: HashSet<String>,
    /// One keeper per group of `nodes_per_lease` nodes.
    keepers: Vec<LeaseKeeper>,
    /// Each node's group (its keeper's index).
    group_of: HashMap<String, usize>,
    /// The lease each group's endpoints were last published under (0: publish them again).
    published_under: std::sync::Mutex<Vec<i64>>,
    pub stats: Arc<SimStats>,
}

/// Where simulated tasks are reached: they run nowhere, so a test client connects to the declared port here.
const SIMULATED_ADDRESS: &str = "127.0.0.1";

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
        let per = options.nodes_per_lease.max(1);
        let group_of = names.iter().enumerate().map(|(i, n)| (n.clone(), i / per)).collect();
        let stats = Arc::new(SimStats {
            renewals: keepers.iter().map(LeaseKeeper::renewal_counter).collect(),
            ..Default::default()
        });
        let published_under = std::sync::Mutex::new(keepers.iter().map(LeaseKeeper::lease).collect());
        Ok(SimulatedNodes { store, options, names, ours, keepers, group_of, published_under, stats })
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
        // Only our nodes' assignments: less traffic, and all an agent's etcd role lets it read (`deploy/tls/`).
        let ours = format!("{}{}-", keys.assignments_prefix(), self.options.name_prefix);
        let mut watcher = Watcher::new(self.store.clone(), ours, 5000);
        let mut tasks: HashMap<String, SimTask> = HashMap::new();
        let mut specs = Specs::new();
        let mut tick = tokio::time::interval(self.options.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Endpoints of tasks that went away, not yet withdrawn (a failed delete is retried each tick).
        let mut withdrawals: Vec<String> = Vec::new();
        loop {
            // `watcher.next()` is cancel-safe: losing the race against the tick loses nothing.
            tokio::select! {
                _ = &mut shutdown => break,
                event = watcher.next() => {
                    withdrawals.extend(self.on_watch(&keys, event, &mut tasks));
                    self.withdraw(&mut withdrawals).await;
                }
                _ = tick.tick() => {
                    self.withdraw(&mut withdrawals).await;
                    self.republish(&tasks).await;
                    if let Err(e) = self.advance(&cache.snapshot(), &mut tasks, &mut specs).await {
                        tracing::warn!(error = %e, "writing simulated task transitions failed; will retry");
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes the endpoints of tasks that went away; what fails stays in `keys` for the next tick.
    async fn withdraw(&self, keys: &mut Vec<String>) {
        if keys.is_empty() {
            return;
        }
        match discovery::withdraw(&self.store, keys).await {
            Ok(()) => keys.clear(),
            Err(e) => tracing::warn!(error = %e, endpoints = keys.len(), "withdrawing endpoints failed; will retry"),
        }
    }

    /// Publishes again the endpoints of each group whose shared lease was replaced (the old lease's keys are
    /// gone with it).
    async fn republish(&self, tasks: &HashMap<String, SimTask>) {
        for (g, keeper) in self.keepers.iter().enumerate() {
            let lease = keeper.lease();
            if self.published_under(g) == Some(lease) {
                continue;
            }
            let endpoints: Vec<Endpoint> = tasks
                .values()
                .filter(|t| self.group_of.get(&t.node) == Some(&g))
                .flat_map(|t| t.published.iter().cloned())
                .collect();
            match discovery::publish(&self.store, &endpoints, lease).await {
                Ok(()) => self.set_published_under(g, lease),
                Err(e) => tracing::warn!(error = %e, "publishing endpoints under a new lease failed; will retry"),
            }
        }
    }

    fn published_under(&self, group: usize) -> Option<i64> {
        self.published_under.lock().ok().and_then(|p| p.get(group).copied())
    }

    fn set_published_under(&self, group: usize, lease: i64) {
        if let Some(p) = self.published_under.lock().ok().as_mut().and_then(|p| p.get_mut(group)) {
            *p = lease;
        }
    }

    /// Applies assignment changes; returns the endpoint keys of the tasks that went away, to withdraw.
    fn on_watch(&self, keys: &Keys, event: WatchEvent, tasks: &mut HashMap<String, SimTask>) -> Vec<String> {
        let now = Instant::now();
        let mut gone_keys = Vec::new();
        let start = |node: &str, a: &Assignment| SimTask {
            node: node.to_string(),
            placement: a.placement,
            phase: Phase::Starting(now + self.options.start_delay),
            health: None,
            published: Vec::new(),
        };
        let mut drop = |t: Option<SimTask>| {
            if let Some(t) = &t {
                gone_keys.extend(t.published.iter().map(|e| e.key(keys)));
            }
            t.is_some()
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
                        drop(tasks.insert(task, start(&node, &a)));
                    }
                }
                let gone: Vec<String> = tasks.keys().filter(|t| !seen.contains(*t)).cloned().collect();
                for t in gone {
                    drop(tasks.remove(&t));
                    self.stats.stopped.fetch_add(1, Ordering::Relaxed);
                }
            }
            WatchEvent::Changes { changes, .. } => {
                for change in changes {
                    match change {
                        Change::Put(kv) => {
                            if let Some((node, task, a)) = self.parse(keys, kv.key(), kv.value()) {
                                if tasks.get(&task).is_none_or(|t| t.placement != a.placement) {
                                    drop(tasks.insert(task, start(&node, &a)));
                                }
                            }
                        }
                        Change::Delete { key, .. } => {
                            let Ok(key) = std::str::from_utf8(&key) else { continue };
                            if let Some(Key::Assignment { node, task }) = keys.parse(key) {
                                if self.ours.contains(node) && drop(tasks.remove(task)) {
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
        gone_keys
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

    /// Writes the transitions that are due: starts (assigned -> running), health transitions, restarts of
    /// unhealthy runs, and ends (-> succeeded; -> failed once an unhealthy task's restarts are spent).
    async fn advance(
        &self,
        snapshot: &CellSnapshot,
        tasks: &mut HashMap<String, SimTask>,
        specs: &mut Specs,
    ) -> anyhow::Result<()> {
        let now = Instant::now();
        if !specs.is_empty() {
            specs.retain(|(job, _), _| snapshot.jobs.contains_key(job.as_str()));
        }
        // Writes that keep the task's resources, each with what its simulated task becomes once written and
        // what it then publishes.
        let mut updates: Vec<(Versioned<Task>, Task, Next, Vec<Endpoint>)> = Vec::new();
        let mut finishes: Vec<Release> = Vec::new();
        // Endpoints to delete before any of the writes (a task turning unhealthy or ending is withdrawn first).
        let mut withdraw_first: Vec<String> = Vec::new();
        let keys = self.store.keys().clone();
        let serves = |job: &Job, task: &Task| -> Vec<Endpoint> {
            let node = task.node.as_deref().unwrap_or_default();
            let mut eps = discovery::endpoints_of(job, &task.id, node, SIMULATED_ADDRESS, now_ms());
            for e in &mut eps {
                e.version = task.version;
            }
            eps
        };
        for (id, sim) in tasks.iter() {
            // Act only on the record this assignment belongs to (the cache may lag the assignment watch).
            let Some(seen) = snapshot.tasks.get(id.as_str()) else { continue };
            let t = &seen.value;
            if t.node.as_deref() != Some(sim.node.as_str()) || t.placements != sim.placement {
                continue;
            }
            let restarts = t.run.as_ref().map_or(0, |r| r.restarts);
            match &sim.phase {
                Phase::Starting(at) if *at <= now && t.state == TaskState::Assigned => {
                    let Some(job) = self.spec(snapshot, specs, t).await else { continue };
                    let running = started(t, sim, 0, &job);
                    let next = Next::Run {
                        until: self.duration_of(&job).map(|d| now + d),
                        health: simulated_health(&job, now),
                        first: true,
                    };
                    // Without checks a running task counts as healthy.
                    let publish = if job.checks.is_empty() { serves(&job, &running) } else { Vec::new() };
                    updates.push((seen.clone(), running, next, publish));
                }
                Phase::Running(Some(until)) if *until <= now && t.state == TaskState::Running => {
                    withdraw_first.extend(sim.published.iter().map(|e| e.key(&keys)));
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
                Phase::Running(_) if t.state == TaskState::Running => {
                    let Some(h) = sim.health.as_ref().filter(|h| h.at <= now) else { continue };
                    let mut new = (**t).clone();
                    let at_ms = now_ms();
                    let (kind, message) = match h.status {
                        HealthStatus::Unhealthy => (EventKind::Unhealthy, h.message.clone()),
                        _ => (EventKind::Healthy, String::new()),
                    };
                    new.health = Some(Health { status: h.status, since_ms: at_ms, message });
                    new.record_event(kind, h.message.clone(), at_ms);
                    new.updated_at_ms = at_ms;
                    let mut publish = Vec::new();
                    if h.status == HealthStatus::Healthy {
                        let Some(job) = self.spec(snapshot, specs, t).await else { continue };
                        publish = serves(&job, &new);
                    } else {
                        withdraw_first.extend(sim.published.iter().map(|e| e.key(&keys)));
                    }
                    let mut then = None;
                    if h.status == HealthStatus::Unhealthy && h.restart {
                        let Some(job) = self.spec(snapshot, specs, t).await else { continue };
                        let why = format!("unhealthy: {}", h.message);
                        then = Some(if should_restart(&job, true, restarts) {
                            let reason = restart_reason(&job, &why, restarts + 1);
                            Phase::Restarting(now + restart_backoff(&job, restarts), reason)
                        } else {
                            Phase::Failing(why)
                        });
                    }
                    updates.push((seen.clone(), new, Next::Health(then), publish));
                }
                Phase::Restarting(at, reason) if *at <= now && t.state == TaskState::Running => {
                    let Some(job) = self.spec(snapshot, specs, t).await else { continue };
                    let mut running = started(t, sim, restarts + 1, &job);
                    running.reason = Some(reason.clone());
                    // The event says why without the restart counter, so repeats coalesce.
                    let why = reason.split(" (restart ").next().unwrap_or(reason).trim_start_matches("restarting ");
                    running.record_event(EventKind::Restarted, why, now_ms());
                    let next = Next::Run {
                        until: self.duration_of(&job).map(|d| now + d),
                        health: simulated_health(&job, now),
                        first: false,
                    };
                    let publish = if job.checks.is_empty() { serves(&job, &running) } else { Vec::new() };
                    updates.push((seen.clone(), running, next, publish));
                }
                Phase::Failing(reason) if t.state == TaskState::Running => {
                    withdraw_first.extend(sim.published.iter().map(|e| e.key(&keys)));
                    let mut run = t.run.clone().unwrap_or_default();
                    run.finished_at_ms = Some(now_ms());
                    finishes.push(Release {
                        task: seen.clone(),
                        state: TaskState::Failed,
                        reason: Some(reason.clone()),
                        run: Some(run),
                        event: Some((EventKind::Exited, reason.clone())),
                    });
                }
                _ => {}
            }
        }
        if !withdraw_first.is_empty() {
            // Nothing is written about these tasks until their endpoints are gone (an error ends the tick).
            discovery::withdraw(&self.store, &withdraw_first).await?;
            let gone: HashSet<&String> = withdraw_first.iter().collect();
            for sim in tasks.values_mut() {
                sim.published.retain(|e| !gone.contains(&e.key(&keys)));
            }
        }
        if !updates.is_empty() {
            let writes: Vec<(Versioned<Task>, Task)> =
                updates.iter().map(|(seen, new, _, _)| (seen.clone(), new.clone())).collect();
            let out = update_tasks(&self.store, &writes).await?;
            let mut to_publish: BTreeMap<i64, (usize, Vec<Endpoint>)> = BTreeMap::new();
            for ((seen, _, next, publish), result) in updates.into_iter().zip(out) {
                if result.is_none() {
                    continue;
                }
                let Some(sim) = tasks.get_mut(&seen.value.id) else { continue };
                if !publish.is_empty() {
                    if let Some(g) = self.group_of.get(&sim.node).copied() {
                        let lease = self.keepers[g].lease();
                        to_publish.entry(lease).or_insert((g, Vec::new())).1.extend(publish.iter().cloned());
                        sim.published = publish;
                    }
                }
                match next {
                    Next::Run { until, health, first } => {
                        if first {
                            self.stats.started.fetch_add(1, Ordering::Relaxed);
                        }
                        sim.phase = Phase::Running(until);
                        sim.health = health;
                    }
                    Next::Health(then) => {
                        sim.health = None;
                        if let Some(phase) = then {
                            sim.phase = phase;
                        }
                    }
                }
            }
            for (lease, (group, endpoints)) in to_publish {
                // One put per endpoint, once, on becoming healthy. A failure marks the group for publishing
                // again on the next tick (with everything it serves).
                if let Err(e) = discovery::publish(&self.store, &endpoints, lease).await {
                    tracing::warn!(error = %e, endpoints = endpoints.len(), "publishing endpoints failed; will retry");
                    self.set_published_under(group, 0);
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

    /// The spec `task` runs: the cached job when it is the task's version, else that version read from etcd
    /// once and kept (while its job exists). `None` while neither is to be had (try again next tick).
    async fn spec(&self, snapshot: &CellSnapshot, specs: &mut Specs, task: &Task) -> Option<Arc<Job>> {
        if let Some(job) = snapshot.jobs.get(task.job.as_str()).filter(|j| j.value.version == task.version) {
            return Some(job.value.clone());
        }
        let key = (task.job.clone(), task.version);
        if let Some(job) = specs.get(&key) {
            return Some(job.clone());
        }
        match self.store.job_version(&task.job, task.version).await {
            Ok(Some(job)) => {
                let job = Arc::new(job);
                specs.insert(key, job.clone());
                Some(job)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(job = task.job, version = task.version, error = %e, "reading a job version failed");
                None
            }
        }
    }

    /// How long a task runs: its job's `duration`, else the default for batch, else forever (services).
    fn duration_of(&self, job: &Job) -> Option<Duration> {
        match (job.duration_ms, job.kind) {
            (Some(ms), _) => Some(Duration::from_millis(ms)),
            (None, JobKind::Batch) => Some(self.options.default_batch_duration),
            (None, JobKind::Service) => None,
        }
    }
}

/// What a simulated task becomes once its write lands.
enum Next {
    /// A run started (`first`: the placement's first, counted in the stats).
    Run { until: Option<Instant>, health: Option<SimHealth>, first: bool },
    /// A health transition was written; the phase that follows it, if it changes.
    Health(Option<Phase>),
}

/// `task` running its run `run` from now, with health `starting` if `job` has checks.
fn started(task: &Task, sim: &SimTask, run: u32, job: &Job) -> Task {
    let at_ms = now_ms();
    let mut running = task.clone();
    running.state = TaskState::Running;
    let mut container = format!("sim-{}-p{}", task.id.replace('/', "-"), sim.placement);
    if run > 0 {
        container.push_str(&format!("-r{run}"));
    }
    running.run = Some(RunInfo { container, started_at_ms: at_ms, restarts: run, ..Default::default() });
    if !job.checks.is_empty() {
        running.health = Some(Health { status: HealthStatus::Starting, since_ms: at_ms, message: String::new() });
    }
    running.updated_at_ms = at_ms;
    if run == 0 {
        // A restart's run is announced by its `Restarted` (so a crash loop coalesces).
        let on = format!("on {}, placement {}, run 0 (simulated)", sim.node, sim.placement);
        running.record_event(EventKind::Started, on, at_ms);
    }
    running
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
