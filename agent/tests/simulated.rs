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

/// Simulated nodes simulate health checks (the rule in `omega_agent::simulated`): an exec check running `false`
/// turns a task unhealthy (and restarts it per the policy, then fails it), any other check turns it healthy;
/// a task follows its own version's checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_nodes_simulate_health_checks() {
    use omega::events::EventKind;
    use omega::health::{HealthCheck, HealthStatus, Probe};
    use omega::model::{RestartMode, RestartPolicy};

    let (_etcd, store) = start_etcd().await;
    let options = SimOptions { nodes: 3, lease_ttl: Duration::from_secs(5), ..Default::default() };
    let sim = SimulatedNodes::register(store.clone(), options).await.unwrap();
    let nodes = sim.node_names().to_vec();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let host = tokio::spawn(sim.run(async move {
        let _ = stop_rx.await;
    }));
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    let exec = |command: &str, restart: bool| HealthCheck {
        interval_ms: 100,
        unhealthy_threshold: 2,
        restart,
        ..HealthCheck::new("exec", Probe::Exec { command: vec![command.to_string()] })
    };
    let service = |id: &str, replicas: u32, check: HealthCheck| {
        let mut job = Job::new(id, JobKind::Service, replicas, Resources::new(100, 1 << 20));
        job.checks = vec![check];
        job
    };
    let health = |t: &Task| t.health.as_ref().map(|h| h.status);
    let kinds = |t: &Task, kind: EventKind| t.events.iter().filter(|e| e.kind == kind).count();

    let good = service("good", 2, exec("true", true));
    let mut sick = service("sick", 1, exec("false", true));
    sick.restart = RestartPolicy { mode: RestartMode::OnFailure, max_restarts: 1, backoff_ms: 100 };
    let reporting = service("reporting", 1, exec("/bin/false", false));
    for job in [&good, &sick, &reporting] {
        store.create_job(job, 128).await.unwrap();
        place_all(&store, &cache, job, &nodes).await;
    }
    let done =
        wait_for(&store, "good", "healthy replicas", |t| t.iter().all(|t| health(t) == Some(HealthStatus::Healthy)))
            .await;
    for t in &done {
        assert_eq!((t.state, kinds(t, EventKind::Healthy)), (TaskState::Running, 1), "{t:?}");
    }
    let failed = wait_for(&store, "sick", "failed once restarts are spent", |t| t[0].state == TaskState::Failed).await;
    let t = &failed[0];
    assert_eq!(t.reason.as_deref(), Some("unhealthy: exec check: `false` exited with 1"), "{t:?}");
    assert_eq!(t.run.as_ref().map(|r| r.restarts), Some(1), "one restart, as the policy allows");
    assert_eq!((kinds(t, EventKind::Unhealthy), kinds(t, EventKind::Restarted)), (2, 1), "{:?}", t.events);
    let reported = wait_for(&store, "reporting", "unhealthy", |t| health(&t[0]) == Some(HealthStatus::Unhealthy)).await;
    assert_eq!(reported[0].state, TaskState::Running, "restart: false only reports");

    // A task of version 0 follows version 0's checks while the job record is at version 1.
    let v0 = service("versioned", 1, exec("false", false));
    store.create_job(&v0, 128).await.unwrap();
    let mut v1 = service("versioned", 1, exec("true", false));
    (v1.version, v1.submitted_at_ms) = (1, v0.submitted_at_ms);
    let mut kv = store.client().kv_client();
    kv.put(store.keys().version("versioned", 0), serde_json::to_vec(&v0).unwrap(), None).await.unwrap();
    kv.put(store.keys().job("versioned"), serde_json::to_vec(&v1).unwrap(), None).await.unwrap();
    place_all(&store, &cache, &v0, &nodes).await;
    let t = wait_for(&store, "versioned", "unhealthy", |t| health(&t[0]) == Some(HealthStatus::Unhealthy)).await;
    assert_eq!(t[0].version, 0);

    assert!(audit::audit(&store).await.unwrap().is_ok());
    let _ = stop_tx.send(());
    host.await.unwrap().unwrap();
}
