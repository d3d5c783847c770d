//! Raw commit throughput: claims per second through Omega's committer, next to the ceiling etcd itself
//! offers for the same write pattern.
//!
//! For each batch size B (claims per commit call) two measurements run back to back, each on a fresh etcd:
//!
//! - **omega**: N live nodes with room for everything and a pool of pending tasks; W workers, each owning a
//!   disjoint share of nodes and tasks, repeatedly claim their next B tasks on their next B nodes (one claim
//!   per node, round-robin) through one shared [`Committer`] (`Detection::Fine`, `CommitKind::Incremental`).
//!   A [`CellState`] cache runs the whole time, as it would beside a scheduler. Each worker decides on its own
//!   copy of the first snapshot into which it writes back the ledgers its commits produced, so it never
//!   decides on a stale ledger and conflicts stay at zero: this measures throughput, not contention.
//! - **raw etcd**: the same transactions built by hand with `etcd_client` (an outer transaction without
//!   compares holding one sub-transaction per node: three compares, three puts of about 200, 300 and 150
//!   bytes, three gets on failure), at most 125 sub-transactions per outer one, same W workers, mod_revisions
//!   tracked locally. Nothing watches etcd during this run unless asked to. Its ledgers keep one size, where
//!   omega's grow by one entry (about 55 bytes) per claim on the node.
//!
//! Claims are counted for commits that complete inside the measurement window (after a short warm-up).
//!
//! Environment:
//! - `OMEGA_BENCH_SECS` (default 5): measured seconds per measurement.
//! - `OMEGA_BENCH_BATCHES` (default `1,16,64,128`): batch sizes.
//! - `OMEGA_BENCH_WORKERS` (default 4), `OMEGA_BENCH_NODES` (default 2000).
//! - `OMEGA_BENCH_ETCD`: use this endpoint instead of starting etcd (keys go under a fresh prefix per
//!   measurement and are deleted afterwards).
//! - `OMEGA_BENCH_CACHE=0`: no cell-state cache during the omega run (its snapshot comes from one listing),
//!   to separate the committer's cost from the cost of watching the cell.
//! - `OMEGA_BENCH_RAW_WATCH=plain|prev_kv`: watch the raw cell range during the raw run (default none), to see
//!   what a watcher like the cache's costs etcd on its own.
//! - `OMEGA_BENCH_RAW_TASKS` (default 4096): raw task keys per worker, claimed round-robin over and over.
//! - `RUST_LOG`: log filter (default `warn`).
//!
//! Besides claims/s and latencies the output shows the CPU etcd and this process used during each window
//! (from `/proc`): on a small machine both share the cores, so that says where the time went.
//!
//! Run with `cargo bench --bench commit_throughput`. The table goes to stdout and to
//! `target/omega-bench/commit_throughput.md`. Without `--bench` (as `cargo test --benches` runs it) it does a
//! short smoke run instead.

use anyhow::{bail, ensure, Context, Result};
use etcd_client::{
    Client, Compare, CompareOp, KvClient, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use omega::cell_state::{CellSnapshot, CellState, CellStateOptions, Versioned};
use omega::commit::{Claim, CommitConfig, CommitKind, Committer, Detection};
use omega::etcd_process::{EtcdOptions, EtcdProcess};
use omega::keys::Keys;
use omega::model::{now_ms, Job, JobKind, Node, Task, TaskState};
use omega::resources::Resources;
use omega::store::{Store, DEFAULT_MAX_TXN_OPS, DEFAULT_PAGE_SIZE};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// One commit (or raw transaction) that takes longer than this fails the benchmark instead of hanging it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Sub-transactions per raw outer transaction: each holds 3 compares / puts / gets, and etcd gives a nested
/// transaction the outer one's leftover op budget, so `subs + 3 <= 128`.
const RAW_SUBS_PER_TXN: usize = DEFAULT_MAX_TXN_OPS - 3;
/// Tasks per job when seeding the omega pool.
const TASKS_PER_JOB: u32 = 5_000;
/// Concurrent requests while seeding.
const SEED_STREAMS: usize = 16;
/// What every task asks for; nodes have room for millions of them.
const REQUEST: Resources = Resources::new(10, 1 << 20);
const CAPACITY: Resources = Resources::new(1 << 40, 1 << 60);

#[derive(Clone, Debug)]
struct Config {
    batches: Vec<usize>,
    measure: Duration,
    warmup: Duration,
    workers: usize,
    nodes: usize,
    endpoint: Option<String>,
    /// Raw tasks per worker, claimed round-robin again and again.
    raw_tasks_per_worker: usize,
    /// Keep the omega cell-state cache running during the measurement (`OMEGA_BENCH_CACHE=0` stops it).
    cache: bool,
    /// Watch the raw cell range while measuring raw etcd, as omega's cache does (`OMEGA_BENCH_RAW_WATCH`).
    raw_watch: RawWatch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RawWatch {
    None,
    Plain,
    PrevKv,
}

impl Config {
    fn from_env(smoke: bool) -> Result<Config> {
        let secs: f64 = env_or("OMEGA_BENCH_SECS", if smoke { 0.5 } else { 5.0 })?;
        ensure!(secs > 0.0 && secs <= 600.0, "OMEGA_BENCH_SECS must be in (0, 600]");
        let batches = match std::env::var("OMEGA_BENCH_BATCHES") {
            Ok(s) => s
                .split(',')
                .map(|b| b.trim().parse::<usize>().with_context(|| format!("OMEGA_BENCH_BATCHES entry {b:?}")))
                .collect::<Result<Vec<_>>>()?,
            Err(_) if smoke => vec![16],
            Err(_) => vec![1, 16, 64, 128],
        };
        let workers: usize = env_or("OMEGA_BENCH_WORKERS", 4)?;
        let nodes: usize = env_or("OMEGA_BENCH_NODES", if smoke { 200 } else { 2000 })?;
        ensure!(workers >= 1 && nodes >= workers, "need at least one worker and one node per worker");
        for &b in &batches {
            ensure!(b >= 1, "batch sizes must be at least 1");
            ensure!(
                b <= nodes / workers,
                "batch size {b} needs {b} distinct nodes per worker, but {workers} workers share only {nodes} nodes"
            );
        }
        let raw_tasks_per_worker: usize = env_or("OMEGA_BENCH_RAW_TASKS", 4096)?;
        ensure!(
            batches.iter().all(|&b| b <= raw_tasks_per_worker),
            "OMEGA_BENCH_RAW_TASKS must be at least the largest batch size (a task may appear once per commit)"
        );
        let measure = Duration::from_secs_f64(secs);
        Ok(Config {
            batches,
            measure,
            warmup: (measure / 5).min(Duration::from_millis(500)),
            workers,
            nodes,
            endpoint: std::env::var("OMEGA_BENCH_ETCD").ok().filter(|s| !s.is_empty()),
            raw_tasks_per_worker,
            cache: env_or("OMEGA_BENCH_CACHE", 1u8)? != 0,
            raw_watch: match std::env::var("OMEGA_BENCH_RAW_WATCH").unwrap_or_default().as_str() {
                "" | "none" => RawWatch::None,
                "plain" => RawWatch::Plain,
                "prev_kv" => RawWatch::PrevKv,
                other => bail!("OMEGA_BENCH_RAW_WATCH={other:?}: use none, plain or prev_kv"),
            },
        })
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(s) => s.trim().parse().map_err(|e| anyhow::anyhow!("{name}={s:?}: {e}")),
        Err(_) => Ok(default),
    }
}

/// Where a measurement's keys live: a fresh etcd of its own, or a fresh prefix on `$OMEGA_BENCH_ETCD`.
struct Target {
    etcd: Option<EtcdProcess>,
    endpoints: Vec<String>,
    prefix: String,
    shared: bool,
}

impl Target {
    async fn new(config: &Config, name: &str) -> Result<Target> {
        match &config.endpoint {
            Some(e) => Ok(Target {
                etcd: None,
                endpoints: vec![e.clone()],
                prefix: format!("/omega-bench/{}-{}-{name}/", std::process::id(), now_ms()),
                shared: true,
            }),
            None => {
                let etcd = EtcdProcess::start(EtcdOptions { quota_backend_bytes: Some(8 << 30), ..Default::default() })
                    .await
                    .context("starting etcd")?;
                Ok(Target { endpoints: etcd.endpoints(), etcd: Some(etcd), prefix: "/omega/".into(), shared: false })
            }
        }
    }

    fn etcd_pid(&self) -> Option<u32> {
        self.etcd.as_ref().and_then(EtcdProcess::pid)
    }

    /// On a shared etcd, removes what the measurement wrote.
    async fn clean(&self) -> Result<()> {
        if self.shared {
            let mut client = Client::connect(&self.endpoints, None).await?;
            client.delete(self.prefix.as_str(), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
        }
        Ok(())
    }
}

/// What one measurement found.
#[derive(Debug, Default)]
struct Outcome {
    /// Claims committed by commits that completed in the window.
    claims: u64,
    conflicts: u64,
    txns: u64,
    window: Duration,
    latencies: Vec<Duration>,
    /// A worker ran out of pending tasks before the window closed (the rate is then too low).
    exhausted: bool,
    /// Everything committed, window or not (for the omega check against the cache).
    committed_total: u64,
    max_revision: i64,
    /// CPU seconds used during the window by etcd (when we started it) and by this process.
    cpu: Option<Cpu>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    etcd: Option<f64>,
    bench: f64,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.claims as f64 / self.window.as_secs_f64()
    }

    fn merge(&mut self, other: Outcome) {
        self.claims += other.claims;
        self.conflicts += other.conflicts;
        self.txns += other.txns;
        self.latencies.extend(other.latencies);
        self.exhausted |= other.exhausted;
        self.committed_total += other.committed_total;
        self.max_revision = self.max_revision.max(other.max_revision);
    }

    /// p50 and p99 of the per-transaction latencies, in milliseconds.
    fn percentiles_ms(&mut self) -> (f64, f64) {
        if self.latencies.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        self.latencies.sort_unstable();
        let at = |q: usize| {
            let i = (self.latencies.len() * q / 100).min(self.latencies.len() - 1);
            self.latencies[i].as_secs_f64() * 1e3
        };
        (at(50), at(99))
    }
}

/// The measurement window shared by all workers of one measurement.
#[derive(Clone, Copy)]
struct Window {
    open: Instant,
    close: Instant,
}

impl Window {
    fn new(config: &Config) -> Window {
        let open = Instant::now() + config.warmup;
        Window { open, close: open + config.measure }
    }

    fn counts(&self, done: Instant) -> bool {
        done >= self.open && done <= self.close
    }

    /// Measures the CPU time etcd and this process use between `open` and `close`.
    fn meter_cpu(&self, etcd_pid: Option<u32>) -> tokio::task::JoinHandle<Option<Cpu>> {
        let w = *self;
        tokio::spawn(async move {
            tokio::time::sleep_until(w.open.into()).await;
            let (e0, b0) = (etcd_pid.and_then(cpu_seconds), cpu_seconds(std::process::id())?);
            tokio::time::sleep_until(w.close.into()).await;
            let (e1, b1) = (etcd_pid.and_then(cpu_seconds), cpu_seconds(std::process::id())?);
            let etcd = e0.zip(e1).map(|(a, b)| b - a);
            Some(Cpu { etcd, bench: b1 - b0 })
        })
    }
}

/// User + system CPU seconds of a process, all threads (`/proc/<pid>/stat`, in USER_HZ = 100 ticks/s).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, so split after its closing parenthesis):
    // state is field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// Node indices owned by `worker`.
fn nodes_of(config: &Config, worker: usize) -> Vec<usize> {
    (worker..config.nodes).step_by(config.workers).collect()
}

/// Runs `f(i)` for every `i` in `0..n` over [`SEED_STREAMS`] concurrent streams.
async fn in_streams<F, Fut>(n: usize, f: F) -> Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let f = Arc::new(f);
    let mut set = JoinSet::new();
    for s in 0..SEED_STREAMS.min(n.max(1)) {
        let f = f.clone();
        set.spawn(async move {
            for i in (s..n).step_by(SEED_STREAMS) {
                f(i).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// omega

/// Seeds the cell (nodes, liveness, `pool` pending tasks), runs the workers, checks the cache agrees.
async fn run_omega(config: &Config, batch: usize, pool: usize) -> Result<Outcome> {
    let target = Target::new(config, &format!("omega-b{batch}")).await?;
    let store = Store::connect(&target.endpoints, Keys::new(&target.prefix)?).await?;

    let seeding = Instant::now();
    let s = store.clone();
    in_streams(config.nodes, move |i| {
        let s = s.clone();
        async move {
            let node = Node {
                name: node_name(i),
                capacity: CAPACITY,
                labels: BTreeMap::new(),
                address: None,
                registered_at_ms: now_ms(),
            };
            s.register_node(&node).await?;
            Ok(())
        }
    })
    .await
    .context("registering nodes")?;
    let lease = store.grant_lease(600).await?;
    let s = store.clone();
    in_streams(config.nodes, move |i| {
        let s = s.clone();
        async move {
            s.put_liveness(&node_name(i), lease).await?;
            Ok(())
        }
    })
    .await
    .context("writing liveness")?;

    // Each worker's tasks are its own jobs: `w<worker>-j<k>`.
    let per_worker = pool.div_ceil(config.workers);
    let mut jobs = Vec::new();
    for w in 0..config.workers {
        let mut left = per_worker as u32;
        let mut k = 0;
        while left > 0 {
            let n = left.min(TASKS_PER_JOB);
            jobs.push(Job { scheduler: "bench".into(), ..Job::new(&format!("w{w}-j{k}"), JobKind::Batch, n, REQUEST) });
            left -= n;
            k += 1;
        }
    }
    let jobs = Arc::new(jobs);
    let (s, j) = (store.clone(), jobs.clone());
    in_streams(jobs.len(), move |i| {
        let (s, j) = (s.clone(), j.clone());
        async move {
            s.create_job(&j[i], DEFAULT_MAX_TXN_OPS).await?;
            Ok(())
        }
    })
    .await
    .context("creating jobs")?;
    let seeded_in = seeding.elapsed();

    // The cache follows the cell during the measurement, as beside a scheduler; without it
    // (`OMEGA_BENCH_CACHE=0`) the snapshot comes from one listing and nothing watches.
    let (cache, snapshot) = if config.cache {
        let cache = CellState::start(store.clone(), CellStateOptions::default()).await?;
        let snapshot = cache.snapshot();
        (Some(cache), snapshot)
    } else {
        (None, Arc::new(listed(&store).await?))
    };
    ensure!(snapshot.allocations.len() == config.nodes, "cache has {} ledgers", snapshot.allocations.len());
    ensure!(snapshot.live.len() == config.nodes, "cache has {} live nodes", snapshot.live.len());
    ensure!(snapshot.tasks.len() == per_worker * config.workers, "cache has {} tasks", snapshot.tasks.len());
    eprintln!(
        "  omega B={batch}: seeded {} nodes and {} tasks in {:.1}s",
        config.nodes,
        snapshot.tasks.len(),
        seeded_in.as_secs_f64()
    );

    // Each worker's pending tasks, in job/index order.
    let mut tasks: Vec<Vec<Versioned<Task>>> = vec![Vec::with_capacity(per_worker); config.workers];
    for (_, t) in snapshot.tasks.iter() {
        let w: usize = t.value.job[1..].split('-').next().and_then(|w| w.parse().ok()).context("job id")?;
        tasks[w].push(t.clone());
    }
    for list in &mut tasks {
        list.sort_by(|a, b| (&a.value.job, a.value.index).cmp(&(&b.value.job, b.value.index)));
    }

    let committer = Arc::new(Committer::new(
        store.clone(),
        CommitConfig { detection: Detection::Fine, placed_by: "bench".into(), ..Default::default() },
    ));
    let window = Window::new(config);
    let cpu = window.meter_cpu(target.etcd_pid());
    let mut set = JoinSet::new();
    for (w, list) in tasks.into_iter().enumerate() {
        let nodes: Vec<String> = nodes_of(config, w).into_iter().map(node_name).collect();
        let local: CellSnapshot = (*snapshot).clone();
        set.spawn(omega_worker(committer.clone(), local, list, nodes, batch, window));
    }
    let mut out = Outcome { window: window.close - window.open, ..Default::default() };
    while let Some(r) = set.join_next().await {
        out.merge(r??);
    }
    out.cpu = cpu.await?;

    // The cache must end up with exactly the claims the workers counted as committed.
    let stats = committer.stats();
    ensure!(
        stats.committed.load(std::sync::atomic::Ordering::Relaxed) == out.committed_total,
        "committer stats disagree with the workers"
    );
    let last = match cache {
        Some(cache) => cache.wait_for_revision(out.max_revision, Duration::from_secs(60)).await?,
        None => Arc::new(listed(&store).await?),
    };
    let assigned = last.tasks.values().filter(|t| t.value.state == TaskState::Assigned).count() as u64;
    ensure!(
        assigned == out.committed_total,
        "cache shows {assigned} assigned tasks, workers committed {}",
        out.committed_total
    );
    if out.conflicts > 0 {
        eprintln!("  omega B={batch}: conflicts by reason: {:?}", stats.conflicts_by_reason());
    }
    target.clean().await?;
    Ok(out)
}

/// The cell as one listing sees it.
async fn listed(store: &Store) -> Result<CellSnapshot> {
    let (kvs, revision) = store.list(&store.keys().cell_prefix(), DEFAULT_PAGE_SIZE, None).await?;
    Ok(CellSnapshot::from_kvs(store.keys(), &kvs, revision))
}

async fn omega_worker(
    committer: Arc<Committer>,
    mut local: CellSnapshot,
    tasks: Vec<Versioned<Task>>,
    nodes: Vec<String>,
    batch: usize,
    window: Window,
) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut next_task = tasks.into_iter();
    let mut next_node = 0usize;
    let mut claims = Vec::with_capacity(batch);
    while Instant::now() < window.close {
        claims.clear();
        for _ in 0..batch {
            let Some(task) = next_task.next() else { break };
            claims.push(Claim::new(task, nodes[next_node].clone()));
            next_node = (next_node + 1) % nodes.len();
        }
        if claims.len() < batch {
            out.exhausted = true;
            break;
        }
        let report = tokio::time::timeout(CALL_TIMEOUT, committer.commit(&local, &claims, CommitKind::Incremental))
            .await
            .context("commit timed out")??;
        let done = Instant::now();

        // Keep this worker's copy of its ledgers current from what the commit reports it wrote (or found).
        if let Some(rev) = report.max_revision() {
            out.max_revision = out.max_revision.max(rev);
        }
        for (node, ledger) in &report.ledgers {
            match ledger {
                Some(l) => drop(local.allocations.insert(node.clone(), l.clone())),
                None => drop(local.allocations.remove(node)),
            }
        }
        let committed = report.committed() as u64;
        out.committed_total += committed;
        if window.counts(done) {
            out.claims += committed;
            out.conflicts += report.conflicted() as u64;
            out.txns += report.transactions as u64;
            out.latencies.extend(&report.latencies);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------
// raw etcd

/// Pads a JSON object (given without its closing brace) with a filler field to `len` bytes.
fn padded(mut json: String, len: usize) -> Vec<u8> {
    json.push_str(",\"pad\":\"");
    while json.len() + 2 < len {
        json.push('x');
    }
    json.push_str("\"}");
    json.into_bytes()
}

struct RawKeys {
    prefix: String,
}

impl RawKeys {
    fn alloc(&self, node: &str) -> String {
        format!("{}cell/alloc/{node}", self.prefix)
    }
    fn live(&self, node: &str) -> String {
        format!("{}cell/live/{node}", self.prefix)
    }
    fn task(&self, id: &str) -> String {
        format!("{}cell/tasks/{id}", self.prefix)
    }
    fn assign(&self, node: &str, id: &str) -> String {
        format!("{}assign/{node}/{id}", self.prefix)
    }
}

fn raw_alloc(node: &str, claims: u64) -> Vec<u8> {
    padded(
        format!(
            "{{\"node\":\"{node}\",\"capacity\":{{\"cpu_millis\":{},\"memory_bytes\":{}}},\"used\":{{\"cpu_millis\":{},\"memory_bytes\":{}}},\"schedulable\":true",
            CAPACITY.cpu_millis,
            CAPACITY.memory_bytes,
            claims * REQUEST.cpu_millis,
            claims * REQUEST.memory_bytes
        ),
        200,
    )
}

fn raw_task(id: &str, node: Option<&str>, placements: u32) -> Vec<u8> {
    let (job, index) = id.split_once('/').unwrap_or((id, "0"));
    let state = if node.is_some() { "assigned" } else { "pending" };
    padded(
        format!(
            "{{\"id\":\"{id}\",\"job\":\"{job}\",\"index\":{index},\"resources\":{{\"cpu_millis\":{},\"memory_bytes\":{}}},\"state\":\"{state}\",\"node\":\"{}\",\"placed_by\":\"bench\",\"priority\":0,\"placements\":{placements},\"updated_at_ms\":{}",
            REQUEST.cpu_millis,
            REQUEST.memory_bytes,
            node.unwrap_or(""),
            now_ms()
        ),
        300,
    )
}

fn raw_assignment(id: &str, node: &str, placement: u32) -> Vec<u8> {
    padded(
        format!(
            "{{\"task\":\"{id}\",\"node\":\"{node}\",\"resources\":{{\"cpu_millis\":{},\"memory_bytes\":{}}},\"placement\":{placement},\"placed_by\":\"bench\",\"assigned_at_ms\":{}",
            REQUEST.cpu_millis,
            REQUEST.memory_bytes,
            now_ms()
        ),
        150,
    )
}

/// A key and its value, to put.
type KeyValuePair = (String, Vec<u8>);

/// Puts `kvs` in transactions of at most 128 puts, over concurrent streams. Returns each key's mod_revision
/// (all puts of one transaction get its revision).
async fn raw_put_all(client: &Client, kvs: Vec<KeyValuePair>, lease: Option<i64>) -> Result<HashMap<String, i64>> {
    let chunks: Arc<Vec<Vec<KeyValuePair>>> = Arc::new(kvs.chunks(DEFAULT_MAX_TXN_OPS).map(|c| c.to_vec()).collect());
    let revs = Arc::new(parking_lot::Mutex::new(vec![0i64; chunks.len()]));
    let (c, r, ch) = (client.clone(), revs.clone(), chunks.clone());
    in_streams(chunks.len(), move |i| {
        let (mut kv, r, ch) = (c.kv_client(), r.clone(), ch.clone());
        async move {
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            let ops: Vec<TxnOp> = ch[i].iter().map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), opts.clone())).collect();
            let resp = kv.txn(Txn::new().and_then(ops)).await?;
            r.lock()[i] = resp.header().map(|h| h.revision()).context("txn response without header")?;
            Ok(())
        }
    })
    .await?;
    let revs = revs.lock();
    Ok(chunks.iter().zip(revs.iter()).flat_map(|(c, &rev)| c.iter().map(move |(k, _)| (k.clone(), rev))).collect())
}

async fn run_raw(config: &Config, batch: usize) -> Result<Outcome> {
    let target = Target::new(config, &format!("raw-b{batch}")).await?;
    let client = Client::connect(&target.endpoints, None).await?;
    let keys = Arc::new(RawKeys { prefix: target.prefix.clone() });

    // Live keys (lease-bound), ledgers, and each worker's tasks `r<worker>-j0/<i>`, all written up front.
    let lease = client.lease_client().grant(600, None).await?.id();
    let names: Vec<String> = (0..config.nodes).map(node_name).collect();
    let live: Vec<KeyValuePair> = names
        .iter()
        .map(|n| (keys.live(n), padded(format!("{{\"node\":\"{n}\",\"lease\":\"{lease:x}\""), 80)))
        .collect();
    raw_put_all(&client, live, Some(lease)).await?;
    // The revisions the workers start from, so the first compares hold.
    let alloc_revs =
        raw_put_all(&client, names.iter().map(|n| (keys.alloc(n), raw_alloc(n, 0))).collect(), None).await?;
    let task_ids: Vec<Vec<String>> = (0..config.workers)
        .map(|w| (0..config.raw_tasks_per_worker).map(|i| format!("r{w}-j0/{i}")).collect())
        .collect();
    let all_tasks: Vec<KeyValuePair> =
        task_ids.iter().flatten().map(|id| (keys.task(id), raw_task(id, None, 0))).collect();
    let task_revs = raw_put_all(&client, all_tasks, None).await?;

    let watch = match config.raw_watch {
        RawWatch::None => None,
        mode => {
            let mut opts = WatchOptions::new().with_prefix();
            if mode == RawWatch::PrevKv {
                opts = opts.with_prev_key();
            }
            let mut stream = client
                .watch_client()
                .max_decoding_message_size(64 << 20)
                .watch(format!("{}cell/", keys.prefix), Some(opts))
                .await?;
            Some(tokio::spawn(async move {
                let mut events = 0u64;
                while let Ok(Some(resp)) = stream.message().await {
                    events += resp.events().len() as u64;
                }
                events
            }))
        }
    };
    let window = Window::new(config);
    let cpu = window.meter_cpu(target.etcd_pid());
    let mut set = JoinSet::new();
    for (w, ids) in task_ids.into_iter().enumerate() {
        let nodes: Vec<RawNode> = nodes_of(config, w)
            .into_iter()
            .map(|i| {
                let name = node_name(i);
                let rev = alloc_revs[&keys.alloc(&name)];
                RawNode { name, rev, claims: 0 }
            })
            .collect();
        let tasks: Vec<RawTask> =
            ids.into_iter().map(|id| RawTask { rev: task_revs[&keys.task(&id)], id, placements: 0 }).collect();
        set.spawn(raw_worker(client.kv_client(), keys.clone(), nodes, tasks, batch, window));
    }
    let mut out = Outcome { window: window.close - window.open, ..Default::default() };
    while let Some(r) = set.join_next().await {
        out.merge(r??);
    }
    out.cpu = cpu.await?;
    if let Some(watch) = watch {
        watch.abort();
    }
    target.clean().await?;
    Ok(out)
}

struct RawNode {
    name: String,
    rev: i64,
    claims: u64,
}

struct RawTask {
    id: String,
    rev: i64,
    placements: u32,
}

async fn raw_worker(
    kv: KvClient,
    keys: Arc<RawKeys>,
    mut nodes: Vec<RawNode>,
    mut tasks: Vec<RawTask>,
    batch: usize,
    window: Window,
) -> Result<Outcome> {
    let mut out = Outcome::default();
    let (mut next_node, mut next_task) = (0usize, 0usize);
    while Instant::now() < window.close {
        // (node index, task index) per claim; one claim per node.
        let mut claims = Vec::with_capacity(batch);
        for _ in 0..batch {
            claims.push((next_node, next_task));
            next_node = (next_node + 1) % nodes.len();
            next_task = (next_task + 1) % tasks.len();
        }
        let mut txns = Vec::new();
        for part in claims.chunks(RAW_SUBS_PER_TXN) {
            let subs: Vec<TxnOp> = part
                .iter()
                .map(|&(n, t)| {
                    let (node, task) = (&nodes[n], &tasks[t]);
                    let (alloc_key, live_key) = (keys.alloc(&node.name), keys.live(&node.name));
                    let task_key = keys.task(&task.id);
                    let assign_key = keys.assign(&node.name, &task.id);
                    TxnOp::txn(
                        Txn::new()
                            .when([
                                Compare::mod_revision(alloc_key.as_str(), CompareOp::Equal, node.rev),
                                Compare::create_revision(live_key.as_str(), CompareOp::Greater, 0),
                                Compare::mod_revision(task_key.as_str(), CompareOp::Equal, task.rev),
                            ])
                            .and_then([
                                TxnOp::put(alloc_key.as_str(), raw_alloc(&node.name, node.claims + 1), None),
                                TxnOp::put(
                                    task_key.as_str(),
                                    raw_task(&task.id, Some(&node.name), task.placements + 1),
                                    None,
                                ),
                                TxnOp::put(
                                    assign_key.as_str(),
                                    raw_assignment(&task.id, &node.name, task.placements + 1),
                                    None,
                                ),
                            ])
                            .or_else([
                                TxnOp::get(alloc_key.as_str(), None),
                                TxnOp::get(live_key.as_str(), None),
                                TxnOp::get(task_key.as_str(), None),
                            ]),
                    )
                })
                .collect();
            txns.push(Txn::new().and_then(subs));
        }
        let sends = txns.into_iter().map(|txn| {
            let mut kv = kv.clone();
            async move {
                let started = Instant::now();
                let resp = kv.txn(txn).await?;
                anyhow::Ok((resp, started.elapsed()))
            }
        });
        let results = tokio::time::timeout(CALL_TIMEOUT, futures_util::future::join_all(sends))
            .await
            .context("raw transaction timed out")?;
        let done = Instant::now();
        let counts = window.counts(done);
        for (part, result) in claims.chunks(RAW_SUBS_PER_TXN).zip(results) {
            let (resp, latency): (TxnResponse, Duration) = result?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let subs = resp.op_responses();
            ensure!(subs.len() == part.len(), "raw txn answered {} of {} sub-transactions", subs.len(), part.len());
            let mut committed = 0;
            for (&(n, t), sub) in part.iter().zip(subs) {
                let TxnOpResponse::Txn(sub) = sub else { bail!("nested transaction answered with a non-txn response") };
                if sub.succeeded() {
                    nodes[n].rev = revision;
                    nodes[n].claims += 1;
                    tasks[t].rev = revision;
                    tasks[t].placements += 1;
                    committed += 1;
                } else {
                    // Learn the fresh revisions so the next claims on these keys compare right.
                    let gets: Vec<Option<i64>> = sub
                        .op_responses()
                        .into_iter()
                        .map(|r| match r {
                            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
                            _ => None,
                        })
                        .collect();
                    nodes[n].rev = gets.first().copied().flatten().unwrap_or(0);
                    tasks[t].rev = gets.get(2).copied().flatten().unwrap_or(0);
                    if counts {
                        out.conflicts += 1;
                    }
                }
            }
            out.committed_total += committed;
            out.max_revision = out.max_revision.max(revision);
            if counts {
                out.claims += committed;
                out.txns += 1;
                out.latencies.push(latency);
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------

struct Row {
    batch: usize,
    omega: Outcome,
    raw: Outcome,
}

fn table(config: &Config, rows: &mut [Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Commit throughput: {} workers, {} live nodes, one claim per node per commit, {:.1}s measured per cell \
         (after {:.1}s warm-up), fresh etcd per measurement{}.\n",
        config.workers,
        config.nodes,
        config.measure.as_secs_f64(),
        config.warmup.as_secs_f64(),
        match &config.endpoint {
            Some(e) => format!(" at {e}"),
            None => " (Debian etcd, loopback, temp dir)".into(),
        }
    );
    let _ = writeln!(
        s,
        "| batch size | omega claims/s | raw etcd claims/s | ratio omega/raw | omega p50 / p99 commit latency ms \
         | raw p50 / p99 txn latency ms | conflicts (omega / raw) | txns (omega / raw) |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows.iter_mut() {
        let (o50, o99) = row.omega.percentiles_ms();
        let (r50, r99) = row.raw.percentiles_ms();
        let mark = |o: &Outcome| if o.exhausted { " (pool ran out)" } else { "" };
        let _ = writeln!(
            s,
            "| {} | {:.0}{} | {:.0}{} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {} / {} | {} / {} |",
            row.batch,
            row.omega.rate(),
            mark(&row.omega),
            row.raw.rate(),
            mark(&row.raw),
            row.omega.rate() / row.raw.rate(),
            o50,
            o99,
            r50,
            r99,
            row.omega.conflicts,
            row.raw.conflicts,
            row.omega.txns,
            row.raw.txns,
        );
    }
    let _ = writeln!(
        s,
        "\nomega latency is per etcd transaction of a commit (`CommitReport::latencies`, a commit of B > 125 \
         claims sends two concurrently); claims/s counts commits that completed inside the window. The omega \
         cell-state cache {} during the measurement.",
        if config.cache { "was running" } else { "was not running (OMEGA_BENCH_CACHE=0)" }
    );
    if config.raw_watch != RawWatch::None {
        let _ = writeln!(s, "The raw etcd runs had a watch on their cell range ({:?}).", config.raw_watch);
    }
    let _ = writeln!(s, "\nCPU during the window (cores busy; µs of CPU per committed claim):\n");
    let _ = writeln!(s, "| batch size | omega: etcd / bench cores | raw: etcd / bench cores | omega: etcd / bench µs per claim | raw: etcd / bench µs per claim |");
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|");
    for row in rows.iter() {
        let cores = |o: &Outcome| match o.cpu {
            Some(c) => format!(
                "{} / {:.2}",
                c.etcd.map(|e| format!("{:.2}", e / o.window.as_secs_f64())).unwrap_or_else(|| "?".into()),
                c.bench / o.window.as_secs_f64()
            ),
            None => "? / ?".into(),
        };
        let per_claim = |o: &Outcome| match o.cpu {
            Some(c) if o.claims > 0 => format!(
                "{} / {:.0}",
                c.etcd.map(|e| format!("{:.0}", e * 1e6 / o.claims as f64)).unwrap_or_else(|| "?".into()),
                c.bench * 1e6 / o.claims as f64
            ),
            _ => "? / ?".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            row.batch,
            cores(&row.omega),
            cores(&row.raw),
            per_claim(&row.omega),
            per_claim(&row.raw)
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        s,
        "\n{} CPUs; load average at the end: {} (other work on the machine skews these numbers).",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    s
}

async fn bench(config: Config) -> Result<String> {
    let mut rows = Vec::new();
    for &batch in &config.batches {
        let raw = run_raw(&config, batch).await.with_context(|| format!("raw etcd, batch {batch}"))?;
        eprintln!("  raw   B={batch}: {:.0} claims/s", raw.rate());
        // Enough pending tasks for omega to go as fast as raw etcd did, and then some (a floor for when raw
        // etcd was the slower one, as with OMEGA_BENCH_RAW_WATCH=prev_kv).
        let span = (config.warmup + config.measure).as_secs_f64();
        let pool = ((raw.rate() * span * 1.5) as usize + 8 * config.workers * batch).max(20_000);
        let omega = run_omega(&config, batch, pool).await.with_context(|| format!("omega, batch {batch}"))?;
        eprintln!("  omega B={batch}: {:.0} claims/s", omega.rate());
        rows.push(Row { batch, omega, raw });
    }
    Ok(table(&config, &mut rows))
}

fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`) gets a short smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let config = Config::from_env(smoke)?;
    eprintln!("commit_throughput: {config:?}");
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let table = runtime.block_on(bench(config))?;
    println!("{table}");
    if !smoke {
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            // The workspace's target directory (this package is `benches/` in the workspace).
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("omega-bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("commit_throughput.md");
        std::fs::write(&path, &table)?;
        eprintln!("wrote {} ({:.0}s in all)", path.display(), started.elapsed().as_secs_f64());
    }
    Ok(())
}
