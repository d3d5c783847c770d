//! The agent killed at each step of a task's life: the real `omega-agent` binary as a child process, a real
//! etcd, a private containerd per test, real containers; SIGKILL at a failpoint, then a new agent process.
//!
//! What must hold after every crash: the task ran exactly once (its command prints one line per run to its
//! log, which the agent keeps across runs), its end is recorded with its exit code, its assignment is gone,
//! its node's ledger holds nothing, and no container is left behind.

#[path = "support/agent_proc.rs"]
mod agent_proc;
#[path = "support/cell.rs"]
mod cell;
#[path = "support/containerd_daemon.rs"]
mod daemon;

use agent_proc::{failpoint_dir, AgentOptions, AgentProc};
use cell::*;
use daemon::TestDaemon;
use omega::cell_state::{CellState, CellStateOptions};
use omega::etcd_process::{EtcdCluster, EtcdOptions};
use omega::keys::Keys;
use omega::model::{RestartMode, RestartPolicy, TaskState};
use omega::store::Store;
use omega_agent::containerd::TaskPhase;
use omega_agent::runner::failpoints;
use omega_testkit::*;
use std::time::Duration;

const NODE: &str = "node-crash";
/// One line per run, and a second for the line to be in the log well before the exit.
const ONCE: &[&str] = &["sh", "-c", "echo run; sleep 1"];

struct Setup {
    etcd: Vec<String>,
    store: Store,
    cache: CellState,
    daemon: TestDaemon,
    logs: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl Setup {
    async fn new(etcd: Vec<String>, name: &str) -> Setup {
        init_tracing();
        let store = Store::connect(&etcd, Keys::default()).await.expect("connect to etcd");
        let daemon = TestDaemon::start(name).await;
        let cache = CellState::start(store.clone(), CellStateOptions::default()).await.expect("cell cache");
        Setup { etcd, store, cache, daemon, logs: tempfile::tempdir().unwrap(), work: tempfile::tempdir().unwrap() }
    }

    fn options(&self, lease_ttl: &'static str) -> AgentOptions<'_> {
        AgentOptions {
            etcd: self.etcd.clone(),
            node: NODE,
            daemon: &self.daemon,
            log_dir: self.logs.path(),
            work: self.work.path(),
            lease_ttl,
            grace: "2s",
        }
    }

    fn agent(&self, name: &str, failpoints: &[&str]) -> AgentProc {
        AgentProc::start(&self.options("10s"), name, failpoints)
    }

    /// Waits until the agent paused at `point`, and kills it there.
    async fn kill_at(&self, agent: &mut AgentProc, point: &str) {
        let marker = omega::failpoint::marker(&failpoint_dir(self.work.path()), point);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !marker.exists() {
            assert!(agent.alive(), "the agent exited before reaching {point}:\n{}", agent.log());
            assert!(std::time::Instant::now() < deadline, "timed out waiting for the agent to reach {point}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agent.kill();
    }

    fn runs(&self, task: &str) -> usize {
        runs_logged(self.logs.path(), task, "run")
    }

    /// The containers of the test's namespace: (id, task phase).
    async fn containers(&self) -> Vec<(String, TaskPhase)> {
        self.daemon.client().await.list().await.expect("list").into_iter().map(|c| (c.id, c.task)).collect()
    }
}

/// Kills the agent at `point` around the exit of a one-run batch task, restarts it without failpoints, and
/// checks that the task ran once and ended cleanly. `at_crash` checks the state the crash left (that the test
/// hit the window it names).
async fn crash_around_exit(name: &str, point: &str, at_crash: impl Fn(&omega::model::Task, &[(String, TaskPhase)])) {
    let (_etcd, _) = start_etcd().await;
    let s = Setup::new(_etcd.endpoints(), name).await;
    let mut agent = s.agent("first", &[point]);
    wait_alive(&s.store, NODE, 60).await;
    submit_and_place(&s.store, &s.cache, job("once", ONCE, 100, 64 << 20), NODE).await;
    s.kill_at(&mut agent, point).await;
    at_crash(&task(&s.store, "once/0").await, &s.containers().await);

    let _agent = s.agent("second", &[]);
    let t = wait_task(&s.store, "once/0", 120, |t| t.state.is_terminal()).await;
    wait_no_containers(&s.daemon, 120).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let run = t.run.clone().expect("run info");
    assert_eq!(run.exit_code, Some(0), "{t:?}");
    assert_eq!(s.runs("once/0"), 1, "the task ran exactly once");
    assert_nothing_held(&s.store, NODE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_start_before_running_is_recorded_the_container_is_adopted() {
    crash_around_exit("crash-start", failpoints::AFTER_START, |t, containers| {
        assert_eq!(t.state, TaskState::Assigned, "running not recorded yet: {t:?}");
        assert_eq!(containers.len(), 1, "{containers:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_exit_before_the_release_the_exit_is_collected_not_run_again() {
    crash_around_exit("crash-exit", failpoints::AFTER_EXIT, |t, containers| {
        assert_eq!(t.state, TaskState::Running, "end not recorded: {t:?}");
        assert_eq!(containers.len(), 1, "{containers:?}");
        assert_eq!(containers[0].1, TaskPhase::Exited, "{containers:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_release_before_containerd_cleanup_the_leftover_is_removed() {
    crash_around_exit("crash-release", failpoints::AFTER_RELEASE, |t, containers| {
        assert_eq!(t.state, TaskState::Succeeded, "end recorded: {t:?}");
        assert_eq!(containers.len(), 1, "{containers:?}");
        assert_eq!(containers[0].1, TaskPhase::Exited, "task not deleted yet: {containers:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_task_and_container_deletion_the_container_is_removed() {
    crash_around_exit("crash-taskdel", failpoints::AFTER_TASK_DELETE, |t, containers| {
        assert_eq!(t.state, TaskState::Succeeded, "end recorded: {t:?}");
        assert_eq!(containers.len(), 1, "{containers:?}");
        assert_eq!(containers[0].1, TaskPhase::None, "task deleted, container not: {containers:?}");
    })
    .await;
}

/// on_failure with max 2 restarts: three runs in all, with the agent killed once after a restart was
/// recorded (before the exited run's container was deleted) and once after a later run's exit (before the
/// restart was recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_policy_survives_agent_crashes_between_runs() {
    let (_etcd, _) = start_etcd().await;
    let s = Setup::new(_etcd.endpoints(), "crash-restarts").await;
    let mut flaky = job("flaky", &["sh", "-c", "echo run; sleep 1; exit 3"], 100, 64 << 20);
    flaky.restart = RestartPolicy { mode: RestartMode::OnFailure, max_restarts: 2, backoff_ms: 100 };

    let mut agent = s.agent("first", &[failpoints::AFTER_RESTART_RECORDED]);
    wait_alive(&s.store, NODE, 60).await;
    submit_and_place(&s.store, &s.cache, flaky, NODE).await;
    s.kill_at(&mut agent, failpoints::AFTER_RESTART_RECORDED).await;
    let t = task(&s.store, "flaky/0").await;
    assert_eq!(t.run.as_ref().map(|r| r.restarts), Some(1), "the restart is recorded: {t:?}");
    assert_eq!(s.runs("flaky/0"), 1);

    let mut agent = s.agent("second", &[failpoints::AFTER_EXIT]);
    s.kill_at(&mut agent, failpoints::AFTER_EXIT).await;
    let t = task(&s.store, "flaky/0").await;
    assert_eq!(t.run.as_ref().map(|r| r.restarts), Some(1), "the second run's exit is not recorded: {t:?}");
    assert_eq!(s.runs("flaky/0"), 2);

    let _agent = s.agent("third", &[]);
    let t = wait_task(&s.store, "flaky/0", 120, |t| t.state.is_terminal()).await;
    wait_no_containers(&s.daemon, 120).await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let run = t.run.clone().expect("run info");
    assert_eq!((run.exit_code, run.restarts), (Some(3), 2), "{t:?}");
    assert_eq!(t.placements, 1, "restarts happen on the node, not as new placements");
    assert_eq!(s.runs("flaky/0"), 3, "three runs in all");
    assert_nothing_held(&s.store, NODE).await;
}

/// A runner that fails is started again until its work is done: containerd is killed while a task's end is
/// being recorded, so deleting the run's containerd state fails (and keeps failing while containerd is down);
/// the end is recorded regardless, and once containerd is back the container is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_runner_is_started_again_until_its_work_is_done() {
    let (_etcd, _) = start_etcd().await;
    let mut s = Setup::new(_etcd.endpoints(), "crash-supervise").await;
    let agent = s.agent("only", &[failpoints::AFTER_EXIT]);
    wait_alive(&s.store, NODE, 60).await;
    submit_and_place(&s.store, &s.cache, job("once", ONCE, 100, 64 << 20), NODE).await;
    let marker = omega::failpoint::marker(&failpoint_dir(s.work.path()), failpoints::AFTER_EXIT);
    eventually("the exit", 120, || async { marker.exists().then_some(()) }).await;
    let containerd = containerd_pid(&s.daemon).expect("the private containerd's pid");
    signal("-KILL", &containerd.to_string());
    std::fs::remove_file(&marker).expect("release the failpoint");

    let t = wait_task(&s.store, "once/0", 120, |t| t.state.is_terminal()).await;
    assert_eq!((t.state, t.run.as_ref().and_then(|r| r.exit_code)), (TaskState::Succeeded, Some(0)), "{t:?}");
    eventually("the runner to fail on containerd", 120, || async {
        agent.log().contains("task runner failed; starting it again").then_some(())
    })
    .await;
    s.daemon.restart().await;
    wait_no_containers(&s.daemon, 120).await;
    assert_eq!(s.runs("once/0"), 1);
    assert_nothing_held(&s.store, NODE).await;
}

/// The pid of the daemon's containerd (its command line names the daemon's config file).
fn containerd_pid(daemon: &TestDaemon) -> Option<u32> {
    let config = daemon.dir.path().join("config.toml").display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let is_containerd = args.first().is_some_and(|a| a.ends_with("containerd"));
        (is_containerd && args.contains(&config)).then_some(pid)
    })
}

/// Three etcd members, the agent connected to all three; the leader is killed while tasks exit (the first
/// exit is held at a failpoint until the leader is dead, the others exit during the election).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_end_is_recorded_when_the_etcd_leader_dies_as_tasks_exit() {
    let mut cluster = EtcdCluster::start(3, EtcdOptions::default()).await.expect("three etcd members");
    let s = Setup::new(cluster.endpoints(), "crash-leader").await;
    let mut agent = s.agent("only", &[failpoints::AFTER_EXIT]);
    wait_alive(&s.store, NODE, 60).await;
    let jobs = ["quick", "middle", "slow"];
    for (i, id) in jobs.iter().enumerate() {
        let command = format!("echo run; sleep {}", i + 1);
        submit_and_place(&s.store, &s.cache, job(id, &["sh", "-c", &command], 100, 64 << 20), NODE).await;
    }
    let marker = omega::failpoint::marker(&failpoint_dir(s.work.path()), failpoints::AFTER_EXIT);
    eventually("the first exit", 120, || async { marker.exists().then_some(()) }).await;
    let leader = cluster.leader().await.expect("a leader");
    cluster.members[leader].kill();
    std::fs::remove_file(&marker).expect("release the failpoint");

    for id in jobs {
        let t = wait_task(&s.store, &format!("{id}/0"), 120, |t| t.state.is_terminal()).await;
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!(t.run.as_ref().and_then(|r| r.exit_code), Some(0), "{t:?}");
        assert_eq!(s.runs(&format!("{id}/0")), 1, "{id} ran once");
    }
    wait_no_containers(&s.daemon, 120).await;
    assert_nothing_held(&s.store, NODE).await;
    assert!(agent.alive(), "the agent rode it out");
    let log = agent.log();
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    eprintln!(
        "while the leader changed the agent retried {} end records and {} other task updates; its watch broke {} times",
        count("recording the task's end failed"),
        count("updating the task failed"),
        count("watch stream broke"),
    );
}

/// An agent cut off from etcd past its lease (etcd frozen with SIGSTOP for longer than the TTL) comes back: a
/// new lease, its liveness key written again, and new work runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_lease_lapsed_while_etcd_was_frozen_comes_back() {
    let (etcd, _) = start_etcd().await;
    let s = Setup::new(etcd.endpoints(), "lease-back").await;
    let _agent = AgentProc::start(&s.options("2s"), "only", &[]);
    let before = wait_alive(&s.store, NODE, 60).await;

    let pid = etcd.pid().expect("etcd's pid").to_string();
    signal("-STOP", &pid);
    // The pause itself: longer than the 2 s TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    signal("-CONT", &pid);

    let after = eventually("a new liveness key under a new lease", 60, || async {
        liveness(&s.store, NODE).await.filter(|l| l.lease != before.lease)
    })
    .await;
    assert_ne!(after.lease, before.lease);
    submit_and_place(&s.store, &s.cache, job("after", &["echo", "back"], 100, 64 << 20), NODE).await;
    let t = wait_task(&s.store, "after/0", 120, |t| t.state.is_terminal()).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
}

fn signal(sig: &str, pid: &str) {
    let status = std::process::Command::new("kill").args([sig, pid]).status().expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}
