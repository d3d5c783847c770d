//! Simulated nodes against a real etcd: they register, stay alive, run tasks to completion, stop on removal.

use omega::audit;
use omega::cell_state::{CellState, CellStateOptions};
use omega::commit::{Claim, CommitConfig, CommitKind, Committer};
use omega::model::{Job, JobKind, Task, TaskState};
use omega::release::{release, Release};
use omega::resources::Resources;
use omega::store::Store;
use omega_agent::simulated::{SimOptions, SimulatedNodes};
use omega_testkit::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

async fn tasks_of(store: &Store, job: &str) -> Vec<Task> {
    let (kvs, _) = store.list(&store.keys().tasks_of_job(job), 1000, None).await.unwrap();
    kvs.iter().map(|kv| serde_json::from_slice(kv.value()).unwrap()).collect()
}

async fn place_all(store: &Store, cache: &CellState, job: &Job, nodes: &[String]) {
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let claims: Vec<Claim> = (0..job.tasks as usize)
        .map(|i| {
            Claim::new(
                snap.tasks.get(format!("{}/{i}", job.id).as_str()).unwrap().clone(),
                nodes[i % nodes.len()].clone(),
            )
        })
        .collect();
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &claims, CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.committed(), claims.len());
}

async fn wait_for(store: &Store, job: &str, what: &str, done: impl Fn(&[Task]) -> bool) -> Vec<Task> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = tasks_of(store, job).await;
        if done(&tasks) {
            return tasks;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {tasks:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_nodes_run_tasks_to_completion_and_stop_removed_ones() {
    let (_etcd, store) = start_etcd().await;
    let options = SimOptions { nodes: 50, lease_ttl: Duration::from_secs(5), ..Default::default() };
    let sim = SimulatedNodes::register(store.clone(), options).await.unwrap();
    let nodes = sim.node_names().to_vec();
    let stats = sim.stats.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let host = tokio::spawn(sim.run(async move {
        let _ = stop_rx.await;
    }));
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();

    // A batch job of 30 short tasks runs to completion; its room is given back.
    let mut batch = Job::new("short", JobKind::Batch, 30, Resources::new(1000, 1 << 30));
    batch.duration_ms = Some(300);
    store.create_job(&batch, 128).await.unwrap();
    place_all(&store, &cache, &batch, &nodes).await;
    let done =
        wait_for(&store, "short", "all tasks succeeded", |t| t.iter().all(|t| t.state == TaskState::Succeeded)).await;
    for t in &done {
        let run = t.run.as_ref().expect("run info written");
        assert_eq!(run.exit_code, Some(0));
        assert!(run.finished_at_ms.unwrap() >= run.started_at_ms);
    }
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
    assert_eq!(report.used, Resources::ZERO, "finished tasks hold nothing");

    // A service (no duration) runs until its assignment is removed.
    let web = Job::new("web", JobKind::Service, 4, Resources::new(500, 1 << 30));
    store.create_job(&web, 128).await.unwrap();
    place_all(&store, &cache, &web, &nodes).await;
    wait_for(&store, "web", "replicas running", |t| t.iter().all(|t| t.state == TaskState::Running)).await;
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let victim = snap.tasks.get("web/0").unwrap().clone();
    let stopped_before = stats.stopped.load(Ordering::Relaxed);
    let kill =
        Release { task: victim, state: TaskState::Killed, reason: Some("cancelled".into()), run: None, event: None };
    release(&store, &[kill]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.stopped.load(Ordering::Relaxed) == stopped_before {
        assert!(Instant::now() < deadline, "the simulated node stopped the removed task");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let web_tasks = tasks_of(&store, "web").await;
    assert_eq!(web_tasks.iter().filter(|t| t.state == TaskState::Running).count(), 3);
    assert_eq!(
        web_tasks.iter().find(|t| t.id == "web/0").unwrap().state,
        TaskState::Killed,
        "nothing overwrote the kill"
    );
    assert!(audit::audit(&store).await.unwrap().is_ok());
    let _ = stop_tx.send(());
    host.await.unwrap().unwrap();
}

/// 10,000 virtual nodes register and stay alive past their lease TTL; the process's cost is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_simulated_nodes_register_and_heartbeat() {
    let (_etcd, store) = start_etcd().await;
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let ttl = Duration::from_secs(3);
    let options = SimOptions { nodes: 10_000, lease_ttl: ttl, ..Default::default() };
    let sim = SimulatedNodes::register(store.clone(), options).await.unwrap();
    let registered_in = started.elapsed();
    let stats = sim.stats.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let host = tokio::spawn(sim.run(async move {
        let _ = stop_rx.await;
    }));
    // Three TTLs later every node is alive: the shared leases were renewed (on a machine loaded enough that
    // etcd let one lapse, its keeper replaced it and its nodes came back: wait for that, bounded).
    tokio::time::sleep(ttl * 3).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (live, _) = store.list(&format!("{}cell/live/", store.keys().prefix()), 5000, None).await.unwrap();
        if live.len() == 10_000 {
            break;
        }
        assert!(Instant::now() < deadline, "every virtual node is alive after 3 TTLs: {} are", live.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (nodes, _) = store.list(&store.keys().nodes_prefix(), 5000, None).await.unwrap();
    assert_eq!(nodes.len(), 10_000);
    assert!(stats.keepalives() >= 10 * 2, "leases renewed");
    let cpu = process_cpu_seconds() - cpu_before;
    eprintln!(
        "10,000 simulated nodes: registered in {registered_in:?}; over {:?}: {cpu:.2} s CPU in this test process \
         (simulated host + test client), RSS {} MiB",
        started.elapsed(),
        rss_mib()
    );
    let _ = stop_tx.send(());
    host.await.unwrap().unwrap();
}

fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}
