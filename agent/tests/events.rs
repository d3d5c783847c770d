//! Task events under a real agent (the `omega-agent` binary), a real etcd and a private containerd: a task in
//! a crash loop keeps a short timeline and costs no write beyond the restarts' own.

#[path = "support/agent_proc.rs"]
mod agent_proc;
#[path = "support/cell.rs"]
mod cell;
#[path = "support/containerd_daemon.rs"]
mod daemon;

use agent_proc::{AgentOptions, AgentProc};
use cell::*;
use daemon::TestDaemon;
use omega::cell_state::{CellState, CellStateOptions};
use omega::events::EventKind;
use omega::model::{RestartMode, RestartPolicy, Task, TaskState};
use omega::store::{decode, Store};
use omega_testkit::*;

const NODE: &str = "node-events";
const TASK: &str = "loop/0";

/// The task's record and its etcd version (how many times it was put since it was created), in one read.
async fn task_and_version(store: &Store) -> (Task, i64) {
    let resp = store.client().kv_client().get(store.keys().task(TASK), None).await.expect("read the task");
    let kv = resp.kvs().first().expect("the task exists");
    (decode::<Task>(kv).expect("a task record"), kv.version())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_keeps_a_short_timeline_and_writes_nothing_extra_for_it() {
    init_tracing();
    let (etcd, store) = start_etcd().await;
    let daemon = TestDaemon::start("events-loop").await;
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.expect("cell cache");
    let (logs, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let options = AgentOptions {
        etcd: etcd.endpoints(),
        node: NODE,
        daemon: &daemon,
        log_dir: logs.path(),
        work: work.path(),
        lease_ttl: "10s",
        grace: "2s",
    };
    let _agent = AgentProc::start(&options, "agent", &[]);
    wait_alive(&store, NODE, 60).await;

    let mut looping = job("loop", &["sh", "-c", "exit 1"], 100, 64 << 20);
    looping.restart = RestartPolicy { mode: RestartMode::Always, max_restarts: 0, backoff_ms: 20 };
    store.create_job(&looping, 128).await.expect("create the job");
    let (_, created) = task_and_version(&store).await;
    place(&store, &cache).await;

    wait_task(&store, TASK, 120, |t| t.run.as_ref().is_some_and(|r| r.restarts >= 8)).await;
    let (t, version) = task_and_version(&store).await;
    let restarts = t.run.as_ref().map_or(0, |r| r.restarts) as i64;
    let events: Vec<(EventKind, &str, u32)> = t.events.iter().map(|e| (e.kind, e.message.as_str(), e.count)).collect();
    let started = format!("on {NODE}, placement 1, run 0");
    assert_eq!(
        events,
        [(EventKind::Started, started.as_str(), 1), (EventKind::Restarted, "after exit 1", restarts as u32)],
        "one start, then every restart coalesced into one event: {t:?}"
    );
    // The task's writes since it was created: its placement, then per run at most its `running` (skipped when
    // the run ends first) and per restart the restart's record. The events add none.
    let writes = version - created;
    assert!((1 + restarts..=2 + 2 * restarts).contains(&writes), "{writes} writes for {restarts} restarts");

    // Cancelled: the end joins the timeline in the cancel's own write, and the loop stops.
    omega::ops::cancel::cancel_job(&store, "loop").await.expect("cancel");
    let t = wait_task(&store, TASK, 60, |t| t.state == TaskState::Killed).await;
    let kinds: Vec<EventKind> = t.events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Started, EventKind::Restarted, EventKind::Stopped], "{t:?}");
    assert_eq!(t.events[2].message, "cancelled");
    wait_no_containers(&daemon, 60).await;
    assert_nothing_held(&store, NODE).await;
}

/// Places the job's one task on [`NODE`] with the commit protocol, as a scheduler would.
async fn place(store: &Store, cache: &CellState) {
    let snap = cache
        .wait_for_revision(store.revision().await.unwrap(), std::time::Duration::from_secs(30))
        .await
        .expect("the cache catches up");
    let claim = omega::commit::Claim::new(snap.tasks.get(TASK).expect("the task").clone(), NODE);
    let report = omega::commit::Committer::new(store.clone(), Default::default())
        .commit(&snap, &[claim], omega::commit::CommitKind::Incremental)
        .await
        .expect("commit");
    assert_eq!(report.committed(), 1, "{:?}", report.outcomes);
}
