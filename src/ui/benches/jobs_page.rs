//! The Jobs page at 100,000 jobs: a real etcd holding 100,000 jobs (one task each, a tenth of them pending
//! with a status saying why), the UI's cache started on it as `omega-ui` starts it (list, then watch), and
//! the Jobs page requested over HTTP on loopback, first page and filtered and deep pages, each timed from
//! the request to the last byte of the answer.
//!
//! Run: `cargo bench -p omega-ui` (needs etcd; `OMEGA_ETCD_BIN` names another binary). `OMEGA_UI_BENCH_JOBS`
//! changes the number of jobs. Not a test: it reports and flags pages over the 200 ms target, and fails
//! nothing.

#[path = "../tests/support/http.rs"]
mod http;

use etcd_client::{Txn, TxnOp};
use omega::etcd_process::{free_port, EtcdOptions, EtcdProcess};
use omega::keys::Keys;
use omega::model::{now_ms, Job, JobKind, JobState, JobStatus, Task, TaskState};
use omega::resources::Resources;
use omega::store::{encode, Store};
use omega_ui::cache::UiCache;
use omega_ui::server::{serve, App};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Requests timed per page (after warm-up ones).
const RUNS: usize = 30;
const WARMUP: usize = 3;
const TARGET: Duration = Duration::from_millis(200);

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run())
}

/// Job `i`: its state and scheduler vary so that every filter has work to do.
fn job(i: usize) -> (Job, Task, Option<JobStatus>) {
    let kind = if i % 5 == 0 { JobKind::Service } else { JobKind::Batch };
    let mut j = Job::new(&format!("job-{i:06}"), kind, 1, Resources::new(250, 256 << 20));
    j.scheduler = format!("{}-{}", kind.default_scheduler(), i % 3);
    j.image = "omega.local/busybox:latest".into();
    j.command = vec!["sh".into(), "-c".into(), format!("echo job {i}; sleep 30")];
    let mut t = Task::pending(&j, 0);
    let pending = i % 10 == 3;
    let status = if pending {
        j.state = JobState::Pending;
        let code = if i % 20 == 3 { "insufficient_memory" } else { "constraint" };
        Some(JobStatus {
            job: j.id.clone(),
            pending: 1,
            reason: format!("0/10000 nodes available: 10000 {}", code.replace('_', " ")),
            reasons: BTreeMap::from([(code.to_string(), 10_000)]),
            attempts: 3,
            last_attempt_ms: now_ms(),
            scheduler_instance: format!("{}/a", j.scheduler),
            ..Default::default()
        })
    } else {
        let done = i % 10 >= 6;
        j.state = if done { JobState::Succeeded } else { JobState::Running };
        t.state = if done { TaskState::Succeeded } else { TaskState::Running };
        t.node = Some(format!("node-{:05}", i % 10_000));
        t.placed_by = Some(format!("{}/a", j.scheduler));
        t.placements = 1;
        None
    };
    (j, t, status)
}

/// Writes `n` jobs with their tasks (and statuses), several transactions in flight.
async fn load(store: &Store, n: usize) -> anyhow::Result<()> {
    let keys = store.keys().clone();
    let mut batches: Vec<Vec<TxnOp>> = Vec::new();
    let mut ops = Vec::new();
    for i in 0..n {
        let (j, t, st) = job(i);
        ops.push(TxnOp::put(keys.task(&t.id), encode(&t.id, &t)?, None));
        ops.push(TxnOp::put(keys.job(&j.id), encode(&j.id, &j)?, None));
        if let Some(st) = st {
            ops.push(TxnOp::put(keys.status(&j.id), encode(&j.id, &st)?, None));
        }
        if ops.len() >= 120 {
            batches.push(std::mem::take(&mut ops));
        }
    }
    batches.push(ops);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    use futures_util::StreamExt;
    for batch in batches {
        let mut kv = store.client().kv_client();
        pending.push(async move { kv.txn(Txn::new().and_then(batch)).await });
        if pending.len() >= 8 {
            if let Some(r) = pending.next().await {
                r?;
            }
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let n: usize = std::env::var("OMEGA_UI_BENCH_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let etcd = EtcdProcess::start(EtcdOptions::default()).await?;
    let store = Store::connect(&etcd.endpoints(), Keys::default()).await?;
    let t = Instant::now();
    load(&store, n).await?;
    println!(
        "loaded {n} jobs (and their tasks; {} pending with a status) into etcd in {:.1}s",
        n / 10,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let cache = UiCache::start(store.clone()).await?;
    let jobs = cache.view().jobs.rows.len();
    println!("the UI's cache listed and indexed {jobs} jobs in {:.1}s", t.elapsed().as_secs_f64());
    anyhow::ensure!(jobs == n, "the cache holds {jobs} jobs, not {n}");
    let middle = format!("job-{:06}", n / 2);
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let app = App::new(cache, Some(store), false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app, async move {
        let _ = stopped.await;
    }));

    let pages = [
        ("first page, all jobs", "/jobs".to_string()),
        ("pending", "/jobs?state=pending".to_string()),
        ("pending for a constraint", "/jobs?reason=constraint".to_string()),
        ("running, one scheduler", "/jobs?state=running&scheduler=batch-1".to_string()),
        ("deep page (after the 50,000th)", format!("/jobs?after={middle}")),
        ("id prefix", "/jobs?q=job-0999".to_string()),
        ("200 rows a page", "/jobs?limit=200".to_string()),
    ];
    println!("\n| page | query | bytes | min ms | median ms | p90 ms | max ms | under 200 ms |");
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for (what, path) in &pages {
        let mut times = Vec::with_capacity(RUNS);
        let mut bytes = 0;
        for i in 0..WARMUP + RUNS {
            let t = Instant::now();
            let r = http::get(&addr, path).await?;
            let took = t.elapsed();
            anyhow::ensure!(r.status == 200, "{path}: {} {}", r.status, r.text());
            bytes = r.body.len();
            if i >= WARMUP {
                times.push(took);
            }
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let median = times[times.len() / 2];
        println!(
            "| {what} | `{path}` | {bytes} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            ms(times[0]),
            ms(median),
            ms(times[times.len() * 9 / 10]),
            ms(times[times.len() - 1]),
            if times[times.len() - 1] < TARGET { "yes" } else { "NO" }
        );
    }
    let _ = stop.send(());
    let _ = server.await;
    drop(etcd);
    Ok(())
}
