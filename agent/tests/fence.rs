//! An agent cut off from etcd, not killed: the real `omega-agent` binary reaches etcd only through a TCP proxy
//! the test owns (loopback), and the test cuts it (existing connections dropped, new ones refused) for longer
//! than the lease TTL plus the controller's grace. Real etcd, a private containerd per agent, real containers,
//! the real service scheduler and controller.
//!
//! What must hold: the cut-off agent stops its containers (seen through its containerd) before the lease can
//! expire, so before the controller releases the tasks and their replacements start on the other node; the
//! service never runs more replicas than asked for longer than the stop grace; when the proxy is restored the
//! agent registers again and leaves nothing stray. A job that opted out (`on_disconnect: keep_running`) keeps
//! its container running through the cut.

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
use omega::model::{now_ms, Job, JobKind, OnDisconnect, Task, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega_agent::containerd::{ContainerInfo, Containerd};
use omega_agent::fence::LABEL_FENCED;
use omega_agent::runner::LABEL_TASK;
use omega_testkit::procs::Proc;
use omega_testkit::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Short enough for a quick test, long enough for a loaded 2-core machine: fencing starts 1.5 s after the
/// last acknowledged renewal (3 s - 1 s grace - 0.5 s margin), renewals every 0.5 s.
const TTL: &str = "3s";
const GRACE: &str = "1s";
const GRACE_MS: u64 = 1000;
/// `exec sleep` as the container's PID 1 ignores SIGTERM: every stop takes the full grace, then SIGKILL (the
/// worst case the fence's arithmetic must cover).
const SERVE: &[&str] = &["sh", "-c", "echo run; exec sleep 3600"];

fn options<'a>(etcd: String, node: &'a str, daemon: &'a TestDaemon, dir: &'a Path) -> AgentOptions<'a> {
    AgentOptions { etcd: vec![etcd], node, daemon, log_dir: dir, work: dir, lease_ttl: TTL, grace: GRACE }
}

fn service(id: &str, replicas: u32, on_disconnect: OnDisconnect) -> Job {
    let mut j = Job::new(id, JobKind::Service, replicas, Resources::new(100, 64 << 20));
    j.image = IMAGE.into();
    j.command = SERVE.iter().map(|s| s.to_string()).collect();
    j.on_disconnect = on_disconnect;
    j
}

async fn tasks_of(store: &Store, job: &str) -> Option<Vec<Task>> {
    let (kvs, _) = store.list(&store.keys().tasks_of_job(job), 100, None).await.ok()?;
    kvs.iter().map(|kv| serde_json::from_slice(kv.value()).ok()).collect()
}

/// The running task containers of a daemon.
async fn running(client: &Containerd) -> Vec<ContainerInfo> {
    let listed = client.list().await.expect("list containers");
    listed.into_iter().filter(|c| c.running && c.labels.contains_key(LABEL_TASK)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_agent_stops_its_tasks_before_they_are_placed_elsewhere_and_comes_back_clean() {
    let (etcd, store) = start_etcd().await;
    let proxy = Proxy::start(etcd.endpoint()).await;
    let (daemon_a, daemon_b) = (TestDaemon::start("fence-a").await, TestDaemon::start("fence-b").await);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (client_a, client_b) = (daemon_a.client().await, daemon_b.client().await);
    let mut agent_a = AgentProc::start(&options(proxy.endpoint(), "node-a", &daemon_a, dir_a.path()), "a", &[]);
    let ep = etcd.endpoint();
    let _scheduler = Proc::start(
        "omega-scheduler",
        &["--etcd", &ep, "--kind", "service", "--instance", "service-1", "--lease-ttl", "2s"],
        "fence-service",
    );
    let _controller = Proc::start(
        "omega-controller",
        &["--etcd", &ep, "--instance", "ctl-1", "--lease-ttl", "2s", "--grace", "500ms"],
        "fence-controller",
    );
    let before = wait_alive(&store, "node-a", 60).await;

    // Three replicas, all on node-a (the only node so far).
    store.create_job(&service("web", 3, OnDisconnect::Stop), 128).await.expect("submit web");
    eventually("3 replicas running on node-a", 120, || async {
        let ts = tasks_of(&store, "web").await?;
        let up = ts.iter().filter(|t| t.state == TaskState::Running && t.node.as_deref() == Some("node-a"));
        (up.count() == 3 && running(&client_a).await.len() == 3).then_some(())
    })
    .await;
    let fenced: Vec<String> = running(&client_a).await.into_iter().map(|c| c.id).collect();
    let _agent_b = AgentProc::start(&options(ep.clone(), "node-b", &daemon_b, dir_b.path()), "b", &[]);
    wait_alive(&store, "node-b", 60).await;

    // Cut node-a off, and watch both nodes' containers until the replicas run on node-b.
    let cut_ms = now_ms();
    let cut = Instant::now();
    proxy.cut();
    let (mut last_a, mut first_b, mut max_total) = (None::<Duration>, None::<Duration>, 0usize);
    let (mut over_ask, mut previous) = (Duration::ZERO, None::<(Instant, bool)>);
    let deadline = cut + Duration::from_secs(120);
    let replaced = loop {
        let (on_a, on_b) = (running(&client_a).await.len(), running(&client_b).await.len());
        let now = Instant::now();
        if let Some((at, over)) = previous {
            if over {
                over_ask += now - at;
            }
        }
        previous = Some((now, on_a + on_b > 3));
        max_total = max_total.max(on_a + on_b);
        if on_a > 0 {
            last_a = Some(now - cut);
        }
        if on_b > 0 && first_b.is_none() {
            first_b = Some(now - cut);
        }
        let ts = tasks_of(&store, "web").await.unwrap_or_default();
        let on_node_b = ts.iter().filter(|t| t.state == TaskState::Running && t.node.as_deref() == Some("node-b"));
        if on_b == 3 && on_node_b.count() == 3 {
            break ts;
        }
        assert!(now < deadline, "the replicas were not re-placed on node-b: {ts:#?}\n{}", agent_a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(agent_a.alive(), "the cut-off agent runs on");

    // Through containerd: every container of node-a ended before the first replacement was started.
    let mut stopped_ms = Vec::new();
    for id in &fenced {
        let exit = tokio::time::timeout(Duration::from_secs(30), client_a.wait(id)).await;
        let exit = exit.expect("node-a's container exited").expect("its exit");
        let labels = client_a.labels(id).await.expect("labels").expect("the container is kept until etcd is back");
        assert!(labels.contains_key(LABEL_FENCED), "{id} was stopped by the fence: {labels:?}");
        stopped_ms.push(exit.finished_at_ms);
    }
    let replacements_started_ms =
        replaced.iter().filter_map(|t| t.run.as_ref().map(|r| r.started_at_ms)).min().expect("started");
    let last_stop_ms = stopped_ms.iter().copied().max().expect("three containers");
    eprintln!(
        "cut -> node-a's containers stopped after {} ms (last; samples saw one running until {last_a:?}); first \
         replacement started after {} ms (first seen running on node-b at {first_b:?}); all 3 running on node-b \
         after {:?}; at most {max_total} replicas running at once, over 3 for {over_ask:?}",
        last_stop_ms - cut_ms,
        replacements_started_ms - cut_ms,
        cut.elapsed(),
    );
    assert!(last_stop_ms < replacements_started_ms, "node-a's containers stopped before any replacement started");
    assert!(last_a < first_b, "no sample saw a container on node-a once one ran on node-b");
    assert!(over_ask <= Duration::from_millis(GRACE_MS), "over the ask for {over_ask:?} (max {max_total})");
    let log = plain(&agent_a.log());
    assert!(log.contains("FENCING") && log.contains("tasks=3 kept_running=0"), "the agent said so loudly: {log}");

    // Back: node-a registers under a new lease, removes what it no longer owns, and holds nothing.
    proxy.restore();
    let after = eventually("node-a alive under a new lease", 60, || async {
        liveness(&store, "node-a").await.filter(|l| l.lease != before.lease)
    })
    .await;
    assert_ne!(after.lease, before.lease);
    wait_no_containers(&daemon_a, 60).await;
    assert_nothing_held(&store, "node-a").await;
    eventually("the 3 replicas running on node-b, and only there", 60, || async {
        let ts = tasks_of(&store, "web").await?;
        let on_b = ts.iter().filter(|t| t.state == TaskState::Running && t.node.as_deref() == Some("node-b"));
        (on_b.count() == 3 && running(&client_b).await.len() == 3 && running(&client_a).await.is_empty()).then_some(())
    })
    .await;
    let log = plain(&agent_a.log());
    assert!(log.contains("fence lifted"), "{log}");
    assert!(log.contains("already released elsewhere"), "the controller released them first: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_opts_out_keeps_running_through_the_cut() {
    let (etcd, store) = start_etcd().await;
    let proxy = Proxy::start(etcd.endpoint()).await;
    let daemon = TestDaemon::start("fence-keep").await;
    let dir = tempfile::tempdir().unwrap();
    let client = daemon.client().await;
    let mut agent = AgentProc::start(&options(proxy.endpoint(), "node-k", &daemon, dir.path()), "k", &[]);
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.expect("cell cache");
    let before = wait_alive(&store, "node-k", 60).await;
    submit_and_place(&store, &cache, service("keep", 1, OnDisconnect::KeepRunning), "node-k").await;
    submit_and_place(&store, &cache, service("stop", 1, OnDisconnect::Stop), "node-k").await;
    let by_task = |cs: &[ContainerInfo], task: &str| cs.iter().find(|c| c.labels[LABEL_TASK] == task).cloned();
    let (kept, stopped) = eventually("both tasks running", 120, || async {
        let cs = running(&client).await;
        let (k, s) = (by_task(&cs, "keep/0")?, by_task(&cs, "stop/0")?);
        let all_recorded = task(&store, "keep/0").await.state == TaskState::Running
            && task(&store, "stop/0").await.state == TaskState::Running;
        all_recorded.then_some((k, s))
    })
    .await;

    // Cut until the node's lease has expired (the liveness key is gone, seen directly), checking all along
    // that the opted-out container runs on.
    let cut = Instant::now();
    proxy.cut();
    let samples = std::cell::Cell::new(0);
    eventually("node-k's lease to expire", 60, || async {
        let cs = running(&client).await;
        let k = by_task(&cs, "keep/0");
        assert_eq!(k.as_ref().map(|c| (&c.id, c.pid)), Some((&kept.id, kept.pid)), "the opted-out task runs on");
        samples.set(samples.get() + 1);
        liveness(&store, "node-k").await.is_none().then_some(())
    })
    .await;
    let expired_ms = now_ms();
    let exit = tokio::time::timeout(Duration::from_secs(30), client.wait(&stopped.id)).await;
    let exit = exit.expect("the other task's container exited").expect("its exit");
    eprintln!(
        "cut -> lease expired after {:?} ({} samples, the opted-out container running in each); the \
         default task's container stopped {} ms before the expiry was seen",
        cut.elapsed(),
        samples.get(),
        expired_ms - exit.finished_at_ms
    );
    assert!(exit.finished_at_ms < expired_ms, "the default task was stopped before the lease expired");

    // Back: the agent hands the fenced task back itself (no controller ran), and the opted-out one is untouched.
    proxy.restore();
    eventually("node-k alive under a new lease", 60, || async {
        liveness(&store, "node-k").await.filter(|l| l.lease != before.lease)
    })
    .await;
    let handed_back = wait_task(&store, "stop/0", 60, |t| t.state == TaskState::Pending).await;
    assert!(handed_back.reason.as_deref().unwrap_or("").contains("fenced"), "{handed_back:?}");
    let lost = handed_back.events.last().map(|e| (e.kind, e.message.as_str()));
    let said = "node node-k cut off from etcd; its agent stopped the task";
    assert_eq!(lost, Some((omega::events::EventKind::Lost, said)), "{handed_back:?}");
    eventually("the fenced container removed", 60, || async {
        let listed = client.list().await.ok()?;
        listed.iter().all(|c| c.id != stopped.id).then_some(())
    })
    .await;
    let k = task(&store, "keep/0").await;
    assert_eq!((k.state, k.node.as_deref()), (TaskState::Running, Some("node-k")), "{k:?}");
    assert_eq!(k.run.as_ref().map(|r| r.container.as_str()), Some(kept.id.as_str()), "{k:?}");
    let cs = running(&client).await;
    assert_eq!(by_task(&cs, "keep/0").map(|c| c.pid), Some(kept.pid), "the same process, never restarted");
    assert!(agent.alive());
    let log = plain(&agent.log());
    assert!(log.contains("FENCING") && log.contains("tasks=1 kept_running=1"), "{log}");
}

/// A log without its colours (ANSI escapes around field names).
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}
