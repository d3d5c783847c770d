//! The node agent end to end: real etcd, a real (private) containerd with runc, real containers.
//!
//! Each test starts etcd and containerd of its own, runs the agent in-process with its log service, places
//! tasks with the commit protocol (as a scheduler would) and watches what the agent makes of them.

#[path = "support/containerd_daemon.rs"]
mod daemon;

use daemon::{TestDaemon, IMAGE};
use omega::audit;
use omega::cell_state::{CellState, CellStateOptions};
use omega::commit::{Claim, CommitConfig, CommitKind, Committer};
use omega::events::EventKind;
use omega::model::{Job, JobKind, Node, Task, TaskState};
use omega::proto::logs::logs_client::LogsClient;
use omega::proto::logs::TailRequest;
use omega::release::{release, Release};
use omega::resources::Resources;
use omega::store::Store;
use omega_agent::agent::{Agent, AgentConfig};
use omega_agent::logs::{serve, LogService};
use omega_agent::runners::Runners;
use omega_testkit::*;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const NODE: &str = "node-e2e";

/// A running agent (and its log service) that can be stopped like a process stopping.
struct RunningAgent {
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    logs: String,
    runners: Runners,
}

impl RunningAgent {
    async fn start(store: &Store, daemon: &TestDaemon, log_dir: &std::path::Path) -> RunningAgent {
        let port = omega::etcd_process::free_port().unwrap();
        let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = AgentConfig {
            node: NODE.into(),
            capacity: Resources::new(2000, 2 << 30),
            labels: Default::default(),
            address: Some(listen.to_string()),
            lease_ttl: Duration::from_secs(5),
            grace: Duration::from_secs(2),
            log_dir: log_dir.to_path_buf(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (stop_logs, logs_stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listen, LogService::new(store.clone(), log_dir.to_path_buf()), async move {
            let _ = logs_stopped.await;
        }));
        let agent = Agent::new(store.clone(), config, daemon.client().await);
        let runners = agent.runners();
        let handle = tokio::spawn(async move {
            let r = agent
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
            let _ = stop_logs.send(());
            r
        });
        // Registered once its node record appears.
        let deadline = Instant::now() + Duration::from_secs(20);
        while store.get_json::<Node>(&store.keys().node(NODE)).await.unwrap().is_none() {
            assert!(Instant::now() < deadline, "the agent registered its node");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        RunningAgent { stop: Some(stop), handle, logs: format!("http://{listen}"), runners }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.handle.await.unwrap().unwrap();
    }
}

async fn submit_and_place(store: &Store, cache: &CellState, job: Job) {
    store.create_job(&job, 128).await.unwrap();
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let claims: Vec<Claim> = (0..job.tasks)
        .map(|i| Claim::new(snap.tasks.get(format!("{}/{i}", job.id).as_str()).unwrap().clone(), NODE))
        .collect();
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &claims, CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.committed(), claims.len(), "{:?}", report.outcomes);
}

async fn task(store: &Store, id: &str) -> Task {
    store.get_json::<Task>(&store.keys().task(id)).await.unwrap().unwrap().0
}

async fn wait_state(store: &Store, id: &str, secs: u64, done: impl Fn(&Task) -> bool) -> Task {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let t = task(store, id).await;
        if done(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting on task {id}: {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn job(id: &str, command: &[&str], cpu: u64, memory: u64) -> Job {
    let mut j = Job::new(id, JobKind::Batch, 1, Resources::new(cpu, memory));
    j.image = IMAGE.into();
    j.command = command.iter().map(|s| s.to_string()).collect();
    j
}

async fn setup(name: &str) -> (omega::etcd_process::EtcdProcess, Store, TestDaemon, CellState, tempfile::TempDir) {
    let (etcd, store) = start_etcd().await;
    let daemon = TestDaemon::start(name).await;
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    (etcd, store, daemon, cache, tempfile::tempdir().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_succeeds_and_its_output_is_readable_through_the_log_api() {
    let (_etcd, store, daemon, cache, logs) = setup("e2e-echo").await;
    let agent = RunningAgent::start(&store, &daemon, logs.path()).await;
    submit_and_place(&store, &cache, job("hello", &["sh", "-c", "echo hello from omega"], 100, 64 << 20)).await;
    let t = wait_state(&store, "hello/0", 30, |t| t.state.is_terminal()).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let run = t.run.expect("run info");
    assert_eq!(run.exit_code, Some(0));
    assert!(!run.oom_killed);
    assert!(run.container.starts_with("hello-0-p1"), "{}", run.container);

    // The log API: the whole output, then an end marker with the final state.
    let mut client = LogsClient::connect(agent.logs.clone()).await.unwrap();
    let mut stream =
        client.tail(TailRequest { task: "hello/0".into(), follow: true, offset: 0 }).await.unwrap().into_inner();
    let mut text = Vec::new();
    let mut end = None;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap() {
        text.extend_from_slice(&chunk.data);
        if chunk.end {
            end = Some(chunk);
            break;
        }
    }
    assert_eq!(String::from_utf8_lossy(&text).trim(), "hello from omega");
    let end = end.expect("a followed log of an ended task ends");
    assert_eq!((end.state.as_str(), end.exit_code), ("succeeded", Some(0)));
    // Resources are back and the audit is clean.
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
    assert_eq!(report.used, Resources::ZERO);
    assert!(client.tail(TailRequest { task: "../../etc/passwd".into(), follow: false, offset: 0 }).await.is_err());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_over_its_memory_limit_fails_as_oom_and_cpu_limits_reach_the_cgroup() {
    let (_etcd, store, daemon, cache, logs) = setup("e2e-limits").await;
    let agent = RunningAgent::start(&store, &daemon, logs.path()).await;
    let hog = job("hog", &["sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo done"], 100, 32 << 20);
    submit_and_place(&store, &cache, hog).await;
    let t = wait_state(&store, "hog/0", 60, |t| t.state.is_terminal()).await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let run = t.run.clone().unwrap();
    assert!(run.oom_killed, "{run:?}");
    assert!(t.reason.as_deref().unwrap_or("").contains("OOM"), "{:?}", t.reason);
    assert_eq!(t.events.last().map(|e| e.kind), Some(EventKind::OomKilled), "{:?}", t.events);

    // A 500-millicore task: its quota is in the container's cgroup on the host.
    submit_and_place(&store, &cache, job("capped", &["sleep", "60"], 500, 64 << 20)).await;
    let t = wait_state(&store, "capped/0", 30, |t| t.state == TaskState::Running).await;
    let container = t.run.unwrap().container;
    let dir = daemon.client().await.cgroup_dir("cpu", &container).expect("cpu cgroup mounted");
    let quota = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap();
    let period = std::fs::read_to_string(dir.join("cpu.cfs_period_us")).unwrap();
    assert_eq!((quota.trim(), period.trim()), ("50000", "100000"));
    agent.stop().await;
    let _ = daemon.client().await.stop(&container, Duration::from_secs(1)).await;
    let _ = daemon.client().await.remove(&container).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_stops_its_container_within_the_grace_period() {
    let (_etcd, store, daemon, cache, logs) = setup("e2e-cancel").await;
    let agent = RunningAgent::start(&store, &daemon, logs.path()).await;
    submit_and_place(&store, &cache, job("sleeper", &["sleep", "600"], 100, 64 << 20)).await;
    let running = wait_state(&store, "sleeper/0", 30, |t| t.state == TaskState::Running).await;
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let seen = snap.tasks.get("sleeper/0").unwrap().clone();
    assert_eq!(seen.value.state, TaskState::Running);
    let cancelled = Instant::now();
    let kill = Release {
        task: seen,
        state: TaskState::Killed,
        reason: Some("cancelled".into()),
        run: running.run.clone(),
        event: None,
    };
    release(&store, &[kill]).await.unwrap();
    let client = daemon.client().await;
    let grace = Duration::from_secs(2);
    loop {
        if client.list().await.unwrap().is_empty() {
            break;
        }
        assert!(cancelled.elapsed() < grace + Duration::from_secs(3), "container gone within the grace period");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "container gone {:?} after the cancel (grace {grace:?}; `sleep` as pid 1 ignores SIGTERM)",
        cancelled.elapsed()
    );
    assert_eq!(task(&store, "sleeper/0").await.state, TaskState::Killed);
    assert!(audit::audit(&store).await.unwrap().is_ok());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_running_containers_and_never_starts_a_task_twice() {
    let (_etcd, store, daemon, cache, logs) = setup("e2e-restart").await;
    let agent = RunningAgent::start(&store, &daemon, logs.path()).await;
    submit_and_place(&store, &cache, job("long", &["sleep", "600"], 100, 64 << 20)).await;
    let before = wait_state(&store, "long/0", 30, |t| t.state == TaskState::Running).await.run.unwrap();
    // The agent goes away (as a crashed process would); the container keeps running.
    agent.stop().await;
    let client = daemon.client().await;
    let listed = client.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].running);

    let agent = RunningAgent::start(&store, &daemon, logs.path()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed = client.list().await.unwrap();
    assert_eq!(listed.len(), 1, "no duplicate container: {listed:?}");
    assert_eq!(listed[0].id, before.container);
    assert_eq!(listed[0].pid, before.pid, "the same process, adopted");
    let t = task(&store, "long/0").await;
    assert_eq!(t.state, TaskState::Running);
    assert_eq!(t.placements, 1);

    // A container no assignment asks for is stopped at start-up: kill the task while no agent runs.
    agent.stop().await;
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let seen = snap.tasks.get("long/0").unwrap().clone();
    release(
        &store,
        &[Release { task: seen, state: TaskState::Killed, reason: Some("cancelled".into()), run: None, event: None }],
    )
    .await
    .unwrap();
    let agent = RunningAgent::start(&store, &daemon, logs.path()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.list().await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the stale container was stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(audit::audit(&store).await.unwrap().is_ok());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_restarted_per_policy_then_left_failed() {
    let (_etcd, store, daemon, cache, logs) = setup("e2e-restart-policy").await;
    let agent = RunningAgent::start(&store, &daemon, logs.path()).await;
    let mut flaky = job("flaky", &["sh", "-c", "echo attempt; exit 3"], 100, 64 << 20);
    flaky.restart =
        omega::model::RestartPolicy { mode: omega::model::RestartMode::OnFailure, max_restarts: 2, backoff_ms: 100 };
    submit_and_place(&store, &cache, flaky).await;
    let t = wait_state(&store, "flaky/0", 60, |t| t.state.is_terminal()).await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let run = t.run.unwrap();
    assert_eq!((run.exit_code, run.restarts), (Some(3), 2), "two restarts, then left failed");
    assert_eq!(t.reason.as_deref(), Some("exited with code 3"));
    assert_eq!(t.placements, 1, "restarts happen on the node, not as new placements");
    let events: Vec<(EventKind, &str, u32)> = t.events.iter().map(|e| (e.kind, e.message.as_str(), e.count)).collect();
    let started = format!("on {NODE}, placement 1, run 0");
    let expected = [
        (EventKind::Started, started.as_str(), 1),
        (EventKind::Restarted, "after exit 3", 2),
        (EventKind::Exited, "code 3", 1),
    ];
    assert_eq!(events, expected, "the timeline");
    // Three runs wrote to one log.
    let text = std::fs::read_to_string(omega_agent::agent::log_path(logs.path(), "flaky/0")).unwrap();
    assert_eq!(text.matches("attempt").count(), 3, "{text}");
    assert!(audit::audit(&store).await.unwrap().is_ok());
    agent.stop().await;
}

/// Preemption on the node: the preemptor's claim takes the victim's ledger share at once, but its container
/// starts only after the victim's container has exited (here after the whole grace period: the victim
/// ignores SIGTERM) and the victim's runner has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preemptor_starts_only_after_its_victim_has_stopped() {
    let (_etcd, store, daemon, cache, logs) = setup("e2e-preempt").await;
    let agent = RunningAgent::start(&store, &daemon, logs.path()).await;
    // The node's whole CPU each, so the two cannot both hold it.
    let stubborn = ["sh", "-c", "trap '' TERM; echo victim; while true; do sleep 1; done"];
    submit_and_place(&store, &cache, job("low", &stubborn, 2000, 64 << 20)).await;
    let victim = wait_state(&store, "low/0", 30, |t| t.state == TaskState::Running).await;
    let victim_container = victim.run.expect("run info").container;
    let client = daemon.client().await;
    let victim_exit = tokio::spawn({
        let (client, id) = (client.clone(), victim_container.clone());
        async move { client.wait(&id).await }
    });

    let mut high = job("high", &["sh", "-c", "echo preemptor; sleep 600"], 2000, 64 << 20);
    high.priority = 100;
    store.create_job(&high, 128).await.unwrap();
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let claim = Claim::preempting(
        snap.tasks.get("high/0").unwrap().clone(),
        NODE,
        vec![snap.tasks.get("low/0").unwrap().clone()],
    );
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &[claim], CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.committed(), 1, "{:?}", report.outcomes);

    let preemptor = wait_state(&store, "high/0", 60, |t| t.state == TaskState::Running).await;
    let started_at = preemptor.run.expect("run info").started_at_ms;
    let exit = tokio::time::timeout(Duration::from_secs(30), victim_exit).await.unwrap().unwrap().unwrap();
    assert_eq!(exit.code, 137, "the victim ignored SIGTERM and was killed after the grace period");
    assert!(
        started_at >= exit.finished_at_ms,
        "the preemptor started at {started_at}, before its victim exited at {}",
        exit.finished_at_ms
    );
    assert!(
        agent.runners.placements("low/0").is_empty(),
        "the victim's runner is gone: {:?}",
        agent.runners.snapshot()
    );
    let listed = client.list().await.unwrap();
    assert!(listed.iter().all(|c| c.id != victim_container), "the victim's container is removed: {listed:?}");
    assert_eq!(task(&store, "low/0").await.state, TaskState::Pending, "the victim waits for its scheduler");
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
    agent.stop().await;
    let running: Vec<String> = client.list().await.unwrap().into_iter().map(|c| c.id).collect();
    for id in running {
        let _ = client.stop(&id, Duration::from_secs(1)).await;
        let _ = client.remove(&id).await;
    }
}
