//! The committer's side: a cell of live nodes and pending tasks written through the core's own store, then W
//! workers claiming through one shared [`Committer`], then a check that the cache saw every committed claim.
//!
//! Each worker decides on its own copy of the first snapshot, into which it writes back the ledgers its
//! commits produced, so it never decides on a stale ledger and conflicts stay at zero: this measures the
//! committer's throughput, not contention.

use super::transport::{Certs, Transport};
use super::{Config, Target};
use anyhow::{ensure, Context, Result};
use omega::cell_state::{CellSnapshot, CellState, CellStateOptions, Versioned};
use omega::commit::{Claim, CommitConfig, CommitKind, Committer, Detection};
use omega::model::{now_ms, Job, JobKind, Node, Task, TaskState};
use omega::store::{Store, DEFAULT_MAX_TXN_OPS, DEFAULT_PAGE_SIZE};
use omega_benches::cell::{in_streams, node_name, worker_nodes, CALL_TIMEOUT, CAPACITY, PLACED_BY, REQUEST};
use omega_benches::window::{Tally, Window};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Tasks per job when seeding the pool.
const TASKS_PER_JOB: u32 = 5_000;

/// What the committer's measurement found.
#[derive(Debug, Default)]
pub struct OmegaOutcome {
    /// What the window counted.
    pub tally: Tally,
    /// A worker ran out of pending tasks before the window closed (the rate is then too low).
    pub exhausted: bool,
    /// Everything committed, window or not (checked against the committer's stats and the cache).
    committed_total: u64,
    max_revision: i64,
}

impl OmegaOutcome {
    fn merge(&mut self, other: OmegaOutcome) {
        self.tally.merge(other.tally);
        self.exhausted |= other.exhausted;
        self.committed_total += other.committed_total;
        self.max_revision = self.max_revision.max(other.max_revision);
    }
}

/// Seeds the cell (nodes, liveness, `pool` pending tasks), runs the workers, checks the cache agrees.
pub async fn run_omega(
    config: &Config,
    batch: usize,
    pool: usize,
    transport: Transport,
    certs: Option<&Certs>,
) -> Result<OmegaOutcome> {
    let target = Target::new(config, &format!("omega-b{batch}"), transport, certs).await?;
    // The cell is written as an administrator (under etcd's authentication a scheduler may not register
    // nodes); the cache and the committer connect as what is measured.
    let admin = target.store(&target.ids.admin).await.context("connecting to etcd")?;
    let store = if target.ids.measured == target.ids.admin {
        admin.clone()
    } else {
        target.store(&target.ids.measured).await.context("connecting to etcd as the measured side")?
    };

    let seeding = Instant::now();
    let s = admin.clone();
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
    let lease = admin.grant_lease(600).await?;
    let s = admin.clone();
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
            jobs.push(Job {
                scheduler: PLACED_BY.into(),
                ..Job::new(&format!("w{w}-j{k}"), JobKind::Batch, n, REQUEST)
            });
            left -= n;
            k += 1;
        }
    }
    let jobs = Arc::new(jobs);
    let (s, j) = (admin.clone(), jobs.clone());
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
        CommitConfig { detection: Detection::Fine, placed_by: PLACED_BY.into(), ..Default::default() },
    ));
    let window = Window::after(config.warmup, config.measure);
    let cpu = window.meter_cpu(target.etcd_pid());
    let mut set = JoinSet::new();
    for (w, list) in tasks.into_iter().enumerate() {
        let nodes: Vec<String> = worker_nodes(w, config.workers, config.nodes).into_iter().map(node_name).collect();
        let local: CellSnapshot = (*snapshot).clone();
        set.spawn(omega_worker(committer.clone(), local, list, nodes, batch, window));
    }
    let mut out = OmegaOutcome::default();
    out.tally.window = window.length();
    while let Some(r) = set.join_next().await {
        out.merge(r??);
    }
    out.tally.cpu = cpu.await?;

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
    if out.tally.conflicts > 0 {
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
) -> Result<OmegaOutcome> {
    let mut out = OmegaOutcome::default();
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
                Some(l) => drop(local.allocations.insert(node.clone().into(), l.clone())),
                None => drop(local.allocations.remove(node.as_str())),
            }
        }
        let committed = report.committed() as u64;
        out.committed_total += committed;
        if window.counts(done) {
            out.tally.claims += committed;
            out.tally.conflicts += report.conflicted() as u64;
            out.tally.txns += report.transactions as u64;
            out.tally.latencies.extend(&report.latencies);
        }
    }
    Ok(out)
}
