//! Health checks end to end: the real `omega-agent` binary, a real etcd, a private containerd per test, real
//! containers probed over the node's loopback (tasks share the node's network namespace) and through
//! containerd's exec.
//!
//! What must hold: a check that passes turns the task healthy, one write with a `healthy` event; a check that
//! fails turns it unhealthy, and with `restart: true` the run is stopped and counted as a failure under the
//! restart policy, until the restarts are spent and the task ends `failed` with the check's message; a failure
//! within the grace does not count; and a task runs its own version's spec, not the job record's.

#[path = "support/agent_proc.rs"]
mod agent_proc;
#[path = "support/cell.rs"]
mod cell;
#[path = "support/containerd_daemon.rs"]
mod daemon;

use agent_proc::{AgentOptions, AgentProc};
use cell::*;
use daemon::{TestDaemon, IMAGE};
use omega::cell_state::{CellState, CellStateOptions};
use omega::etcd_process::{free_port, EtcdProcess};
use omega::events::EventKind;
use omega::health::{HealthCheck, HealthStatus, Probe};
use omega::model::{Job, JobKind, RestartMode, RestartPolicy, Task, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::*;

const NODE: &str = "node-health";

struct Setup {
    _etcd: EtcdProcess,
    store: Store,
    cache: CellState,
    daemon: TestDaemon,
    logs: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl Setup {
    async fn new(name: &str) -> Setup {
        let (etcd, store) = start_etcd().await;
        let daemon = TestDaemon::start(name).await;
        let cache = CellState::start(store.clone(), CellStateOptions::default()).await.expect("cell cache");
        Setup {
            _etcd: etcd,
            store,
            cache,
            daemon,
            logs: tempfile::tempdir().expect("a log directory"),
            work: tempfile::tempdir().expect("a work directory"),
        }
    }

    /// The agent, with a 1 s stop grace (a `sleep` as PID 1 ignores SIGTERM: each stop takes the grace).
    async fn agent(&self, name: &str) -> AgentProc {
        let options = AgentOptions {
            etcd: self._etcd.endpoints(),
            node: NODE,
            daemon: &self.daemon,
            log_dir: self.logs.path(),
            work: self.work.path(),
            lease_ttl: "10s",
            grace: "1s",
        };
        let agent = AgentProc::start(&options, name, &[]);
        wait_alive(&self.store, NODE, 60).await;
        agent
    }

    async fn run(&self, job: Job) {
        submit_and_place(&self.store, &self.cache, job, NODE).await;
    }
}

/// A one-replica service running `command`, probed by `checks`.
fn service(id: &str, command: &[&str], checks: Vec<HealthCheck>) -> Job {
    let mut j = Job::new(id, JobKind::Service, 1, Resources::new(100, 64 << 20));
    j.image = IMAGE.into();
    j.command = command.iter().map(|s| s.to_string()).collect();
    j.checks = checks;
    j
}

/// A check probed every 200 ms (the defaults' 10 s would only make the test slow).
fn check(name: &str, probe: Probe) -> HealthCheck {
    HealthCheck { interval_ms: 200, timeout_ms: 2000, ..HealthCheck::new(name, probe) }
}

fn events(t: &Task, kind: EventKind) -> Vec<String> {
    t.events.iter().filter(|e| e.kind == kind).map(|e| e.message.clone()).collect()
}

fn health(t: &Task) -> Option<HealthStatus> {
    t.health.as_ref().map(|h| h.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_check_of_a_serving_task_turns_it_healthy() {
    let s = Setup::new("health-http").await;
    let _agent = s.agent("http").await;
    let port = free_port().expect("a free port");
    // busybox httpd on the node's loopback (the container shares the node's network), serving one file.
    let serve = format!("mkdir -p /www && echo ok > /www/health && exec httpd -f -p 127.0.0.1:{port} -h /www");
    let probe = Probe::Http { port, path: "/health".into(), expect_status: None };
    s.run(service("web", &["sh", "-c", &serve], vec![check("http", probe)])).await;

    let t = wait_task(&s.store, "web/0", 60, |t| health(t) == Some(HealthStatus::Healthy)).await;
    assert_eq!(t.state, TaskState::Running, "{t:?}");
    let h = t.health.as_ref().expect("health");
    let run = t.run.as_ref().expect("run info");
    assert!(h.since_ms >= run.started_at_ms && h.message.is_empty(), "{h:?} {run:?}");
    assert_eq!(events(&t, EventKind::Healthy), ["passing: http"], "{:?}", t.events);
    assert!(events(&t, EventKind::Unhealthy).is_empty(), "{:?}", t.events);
    assert_eq!(run.restarts, 0);

    // A path the server does not have fails the check: 404 is no 2xx/3xx.
    let missing = Probe::Http { port, path: "/nothing-here".into(), expect_status: None };
    let mut job = service("web-404", &["sleep", "3600"], vec![check("http", missing)]);
    job.checks[0].unhealthy_threshold = 1;
    job.checks[0].restart = false;
    s.run(job).await;
    let t = wait_task(&s.store, "web-404/0", 60, |t| health(t) == Some(HealthStatus::Unhealthy)).await;
    let message = t.health.as_ref().map(|h| h.message.clone()).unwrap_or_default();
    assert_eq!(message, "http check: GET /nothing-here returned 404", "{t:?}");
    assert_eq!((t.state, t.run.as_ref().map(|r| r.restarts)), (TaskState::Running, Some(0)), "restart: false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_tcp_check_restarts_the_task_until_its_restarts_are_spent() {
    let s = Setup::new("health-tcp").await;
    let _agent = s.agent("tcp").await;
    // Nothing listens there: every probe is refused.
    let port = free_port().expect("a free port");
    let mut tcp = check("tcp", Probe::Tcp { port });
    tcp.unhealthy_threshold = 2;
    let mut job = service("db", &["sleep", "3600"], vec![tcp]);
    job.restart = RestartPolicy { mode: RestartMode::OnFailure, max_restarts: 2, backoff_ms: 100 };
    s.run(job).await;

    let restarted = wait_task(&s.store, "db/0", 60, |t| t.run.as_ref().is_some_and(|r| r.restarts >= 1)).await;
    let reason = restarted.reason.clone().unwrap_or_default();
    let why = format!("tcp check: connecting to 127.0.0.1:{port}: ");
    assert!(reason.starts_with(&format!("restarting after unhealthy: {why}")), "{reason}");
    assert!(reason.ends_with("(restart 1 of 2)"), "{reason}");

    let t = wait_task(&s.store, "db/0", 120, |t| t.state.is_terminal()).await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let reason = t.reason.clone().unwrap_or_default();
    assert!(reason.starts_with(&format!("unhealthy: {why}")), "{reason}");
    let run = t.run.as_ref().expect("run info");
    assert_eq!(run.restarts, 2, "every restart the policy allows, then the end");
    assert!(run.exit_code.is_some(), "the stopped run's exit is recorded: {run:?}");
    let unhealthy = events(&t, EventKind::Unhealthy);
    assert!(!unhealthy.is_empty() && unhealthy.iter().all(|m| m.starts_with(&why)), "{:?}", t.events);
    let restarts = t.events.iter().filter(|e| e.kind == EventKind::Restarted).count();
    assert_eq!(restarts, 2, "{:?}", t.events);
    assert_nothing_held(&s.store, NODE).await;
    wait_no_containers(&s.daemon, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_checks_run_in_the_tasks_container() {
    let s = Setup::new("health-exec").await;
    let _agent = s.agent("exec").await;
    let exec = |command: &[&str]| Probe::Exec { command: command.iter().map(|c| c.to_string()).collect() };
    // The check reads a file the task itself wrote: it runs inside the task's container.
    let ready = check("ready", exec(&["cat", "/tmp/ready"]));
    s.run(service("ok", &["sh", "-c", "echo yes > /tmp/ready && exec sleep 3600"], vec![ready])).await;
    let mut failing = check("exec", exec(&["false"]));
    (failing.unhealthy_threshold, failing.restart) = (1, false);
    s.run(service("bad", &["sleep", "3600"], vec![failing])).await;
    let mut missing = check("cat", exec(&["cat", "/no/such/file"]));
    (missing.unhealthy_threshold, missing.restart) = (1, false);
    s.run(service("missing", &["sleep", "3600"], vec![missing])).await;

    let ok = wait_task(&s.store, "ok/0", 60, |t| health(t) == Some(HealthStatus::Healthy)).await;
    assert_eq!(events(&ok, EventKind::Healthy), ["passing: ready"]);
    let bad = wait_task(&s.store, "bad/0", 60, |t| health(t) == Some(HealthStatus::Unhealthy)).await;
    assert_eq!(bad.health.map(|h| h.message).as_deref(), Some("exec check: `false` exited with 1"));
    assert_eq!(bad.state, TaskState::Running, "restart: false only reports");
    let missing = wait_task(&s.store, "missing/0", 60, |t| health(t) == Some(HealthStatus::Unhealthy)).await;
    let message = missing.health.map(|h| h.message).unwrap_or_default();
    assert!(message.starts_with("cat check: `cat /no/such/file` exited with 1: cat: "), "{message}");
    assert!(message.contains("/no/such/file"), "the command's output is in the message: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_within_the_grace_leave_the_task_starting() {
    let s = Setup::new("health-grace").await;
    let _agent = s.agent("grace").await;
    // Each probe fails, and leaves a line in the container; the task says in its log once there are three.
    let probe = Probe::Exec { command: vec!["sh".into(), "-c".into(), "echo probe >> /tmp/probes; exit 1".into()] };
    let mut slow = check("exec", probe);
    (slow.unhealthy_threshold, slow.grace_ms) = (1, 3_600_000);
    let watch =
        "until [ \"$(cat /tmp/probes 2>/dev/null | wc -l)\" -ge 3 ]; do sleep 0.1; done; echo probed; exec sleep 3600";
    s.run(service("slow", &["sh", "-c", watch], vec![slow])).await;
    // `starting` is written with `running`, in the same write.
    let t = wait_task(&s.store, "slow/0", 60, |t| t.state == TaskState::Running).await;
    assert_eq!(health(&t), Some(HealthStatus::Starting), "{t:?}");
    eventually("three failed probes", 60, || async {
        (runs_logged(s.logs.path(), "slow/0", "probed") == 1).then_some(())
    })
    .await;
    let t = task(&s.store, "slow/0").await;
    assert_eq!(health(&t), Some(HealthStatus::Starting), "failures within the grace do not count: {t:?}");
    assert!(events(&t, EventKind::Unhealthy).is_empty(), "{:?}", t.events);
    assert_eq!((t.state, t.run.as_ref().map(|r| r.restarts)), (TaskState::Running, Some(0)));

    // A job without checks has no health at all.
    s.run(service("plain", &["sleep", "3600"], vec![])).await;
    let t = wait_task(&s.store, "plain/0", 60, |t| t.state == TaskState::Running).await;
    assert_eq!(t.health, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_its_own_versions_spec() {
    let s = Setup::new("health-version").await;
    let _agent = s.agent("version").await;
    let v0 = service("app", &["sh", "-c", "echo v0 && exec sleep 3600"], vec![]);
    s.store.create_job(&v0, 128).await.expect("create the job");
    // The job moves on to version 1 (what an update writes: the old record kept under versions/).
    let mut v1 = v0.clone();
    (v1.version, v1.command) = (1, vec!["sh".into(), "-c".into(), "echo v1 && exec sleep 3600".into()]);
    let mut kv = s.store.client().kv_client();
    let kept = s.store.keys().version("app", 0);
    kv.put(kept.as_str(), serde_json::to_vec(&v0).expect("json"), None).await.expect("keep version 0");
    let current = s.store.keys().job("app");
    kv.put(current.as_str(), serde_json::to_vec(&v1).expect("json"), None).await.expect("write version 1");
    // Its task, still of version 0, placed now.
    let snap =
        s.cache.wait_for_revision(s.store.revision().await.expect("revision"), std::time::Duration::from_secs(30));
    let snap = snap.await.expect("the cache caught up");
    let claim = omega::commit::Claim::new(snap.tasks.get("app/0").expect("the task").clone(), NODE);
    let report = omega::commit::Committer::new(s.store.clone(), omega::commit::CommitConfig::default())
        .commit(&snap, &[claim], omega::commit::CommitKind::Incremental)
        .await
        .expect("commit");
    assert_eq!(report.committed(), 1);
    let t = wait_task(&s.store, "app/0", 60, |t| t.state == TaskState::Running).await;
    assert_eq!(t.version, 0);
    eventually("its output", 30, || async { (runs_logged(s.logs.path(), "app/0", "v0") == 1).then_some(()) }).await;
    assert_eq!(runs_logged(s.logs.path(), "app/0", "v1"), 0, "version 0's command ran, not the record's");
}
