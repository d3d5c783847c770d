//! Failure and recovery with real processes: node hosts, schedulers and controller replicas on one etcd.

use omega::audit;
use omega::events::EventKind;
use omega::model::{Job, JobKind, JobState, Task, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::procs::Proc;
use omega_testkit::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn scheduler(etcd: &str, kind: &str) -> Proc {
    Proc::start("omega-scheduler", &["--etcd", etcd, "--kind", kind, "--instance", &format!("{kind}-1")], kind)
}

/// A controller replica. The first test loses two of its three hosts one after the other, the second half of
/// the cell that is left: the disruption rules would hold that back (`tests/eviction_storms.rs`), so here
/// only more than half of the cell lapsing at once counts as a disruption.
fn controller(etcd: &str, name: &str) -> Proc {
    Proc::start(
        "omega-controller",
        &[
            "--etcd",
            etcd,
            "--instance",
            name,
            "--lease-ttl",
            "2s",
            "--grace",
            "500ms",
            "--unhealthy-zone-threshold",
            "1/2",
        ],
        name,
    )
}

/// A process hosting simulated nodes `<prefix>-000..`, their shared lease with a 3 s TTL.
fn host(etcd: &str, prefix: &str, nodes: usize) -> Proc {
    let n = nodes.to_string();
    Proc::start(
        "omega-agent",
        &[
            "--etcd",
            etcd,
            "--simulate",
            &n,
            "--sim-prefix",
            prefix,
            "--lease-ttl",
            "3s",
            "--sim-cpu",
            "4",
            "--sim-memory",
            "8Gi",
        ],
        prefix,
    )
}

async fn tasks(store: &Store, job: &str) -> Vec<Task> {
    let (kvs, _) = store.list(&store.keys().tasks_of_job(job), 1000, None).await.unwrap();
    kvs.iter().map(|kv| serde_json::from_slice(kv.value()).unwrap()).collect()
}

async fn leader(store: &Store) -> Option<String> {
    let mut client = store.client().election_client();
    let resp = client.leader(format!("{}controller", store.keys().prefix())).await.ok()?;
    resp.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

/// kill -9 a node host: its tasks are lost and re-placed on the surviving nodes within the lease TTL plus a
/// few seconds; kill -9 the controller leader: another replica takes over and handles the next failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_nodes_tasks_are_replaced_and_a_new_leader_takes_over() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let mut a = host(&ep, "a", 3);
    let mut b = host(&ep, "b", 3);
    let _c = host(&ep, "c", 3);
    let _service = scheduler(&ep, "service");
    let mut ctl1 = controller(&ep, "ctl-1");
    wait_for("ctl-1 leads", 20, async || (leader(&store).await.as_deref() == Some("ctl-1")).then_some(())).await;
    let _ctl2 = controller(&ep, "ctl-2");
    wait_for("9 nodes alive", 20, async || {
        (store.list(&format!("{}cell/live/", store.keys().prefix()), 100, None).await.ok()?.0.len() == 9).then_some(())
    })
    .await;

    let web = Job::new("web", JobKind::Service, 6, Resources::new(1000, 1 << 30));
    store.create_job(&web, 128).await.unwrap();
    let on_node = |ts: &[Task]| -> BTreeMap<String, usize> {
        ts.iter().filter(|t| t.state == TaskState::Running).fold(BTreeMap::new(), |mut m, t| {
            *m.entry(t.node.clone().unwrap()[..1].to_string()).or_default() += 1;
            m
        })
    };
    let placed = wait_for("6 replicas running", 30, async || {
        let ts = tasks(&store, "web").await;
        (ts.iter().filter(|t| t.state == TaskState::Running).count() == 6).then_some(ts)
    })
    .await;
    eprintln!("replicas by host before: {:?}", on_node(&placed));

    // Host `a` dies without a word.
    let killed = Instant::now();
    a.kill();
    let after = wait_for("replicas off host a and running again", 30, async || {
        let ts = tasks(&store, "web").await;
        let running_elsewhere =
            ts.iter().filter(|t| t.state == TaskState::Running && !t.node.as_deref().unwrap_or("a-").starts_with("a-"));
        (running_elsewhere.count() == 6).then_some(ts)
    })
    .await;
    let recovery = killed.elapsed();
    eprintln!("node host killed -> all replicas running again elsewhere in {recovery:?} (lease TTL 3 s, grace 0.5 s)");
    assert!(after.iter().any(|t| t.placements >= 2), "some replicas were placed again");
    assert!(audit::audit(&store).await.unwrap().is_ok());

    // The leader dies; the other replica takes over and handles the next lost host.
    ctl1.kill();
    let took_over = Instant::now();
    wait_for("ctl-2 leads", 20, async || (leader(&store).await.as_deref() == Some("ctl-2")).then_some(())).await;
    eprintln!("leader killed -> ctl-2 leads after {:?} (lease TTL 2 s)", took_over.elapsed());
    b.kill();
    let killed = Instant::now();
    wait_for("replicas only on host c", 30, async || {
        let ts = tasks(&store, "web").await;
        let on_c =
            ts.iter().filter(|t| t.state == TaskState::Running && t.node.as_deref().unwrap_or("").starts_with("c-"));
        (on_c.count() == 6).then_some(())
    })
    .await;
    eprintln!("second host killed -> all replicas on host c in {:?}", killed.elapsed());
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
}

/// Batch jobs finish: succeeded when every task succeeded; a lost never-restart batch task fails its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_jobs_are_marked_finished() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let _h = host(&ep, "h", 2);
    let _batch = scheduler(&ep, "batch");
    let _ctl = controller(&ep, "ctl-1");
    let mut quick = Job::new("quick", JobKind::Batch, 4, Resources::new(500, 1 << 28));
    quick.duration_ms = Some(300);
    store.create_job(&quick, 128).await.unwrap();
    let state = wait_for("quick finished", 30, async || {
        let (j, _) = store.get_json::<Job>(&store.keys().job("quick")).await.ok()??;
        (j.state == JobState::Succeeded).then_some(j.state)
    })
    .await;
    assert_eq!(state, JobState::Succeeded);
    assert!(tasks(&store, "quick").await.iter().all(|t| t.state == TaskState::Succeeded));

    // A batch task that must not restart, on a host that dies: the task is lost and the job failed.
    // First fill zone-0's only node (h-000), then bring up d-000 (also zone-0): the pinned task can only go there.
    let zone0 = vec![omega::model::Constraint::Equals { label: "zone".into(), value: "zone-0".into() }];
    let mut filler = Job::new("filler", JobKind::Batch, 8, Resources::new(500, 1 << 28));
    filler.duration_ms = Some(600_000);
    filler.constraints = zone0.clone();
    store.create_job(&filler, 128).await.unwrap();
    wait_for("filler running", 30, async || {
        (tasks(&store, "filler").await.iter().filter(|t| t.state == TaskState::Running).count() == 8).then_some(())
    })
    .await;
    let mut doomed_host = host(&ep, "d", 1);
    wait_for("host d alive", 20, async || {
        store.get_json::<serde_json::Value>(&store.keys().live("d-000")).await.ok()?.map(|_| ())
    })
    .await;
    let mut pinned = Job::new("pinned", JobKind::Batch, 1, Resources::new(500, 1 << 28));
    pinned.duration_ms = Some(600_000);
    pinned.constraints = zone0;
    store.create_job(&pinned, 128).await.unwrap();
    wait_for("pinned running on d-000", 30, async || {
        let ts = tasks(&store, "pinned").await;
        (ts[0].state == TaskState::Running && ts[0].node.as_deref() == Some("d-000")).then_some(())
    })
    .await;
    doomed_host.kill();
    wait_for("pinned failed", 30, async || {
        let (j, _) = store.get_json::<Job>(&store.keys().job("pinned")).await.ok()??;
        (j.state == JobState::Failed).then_some(())
    })
    .await;
    let t = &tasks(&store, "pinned").await[0];
    assert_eq!(t.state, TaskState::Lost);
    assert!(t.reason.as_deref().unwrap_or("").contains("node d-000 lost"), "{:?}", t.reason);
    // Its timeline: started by its (simulated) node, then lost with it, in the controller's release.
    let events: Vec<(EventKind, &str)> = t.events.iter().map(|e| (e.kind, e.message.as_str())).collect();
    let started = (EventKind::Started, "on d-000, placement 1, run 0 (simulated)");
    assert_eq!(events, [started, (EventKind::Lost, "node d-000 lost")], "{t:?}");
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

/// Finished jobs are collected after `--gc-after`: job, tasks and status are gone, and nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_garbage_collected() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let _h = host(&ep, "g", 2);
    let _batch = scheduler(&ep, "batch");
    let _ctl = Proc::start("omega-controller", &["--etcd", &ep, "--instance", "gc-1", "--gc-after", "1s"], "gc-1");
    let mut short = Job::new("short", JobKind::Batch, 3, Resources::new(500, 1 << 28));
    short.duration_ms = Some(200);
    store.create_job(&short, 128).await.unwrap();
    let mut long = Job::new("long", JobKind::Batch, 1, Resources::new(500, 1 << 28));
    long.duration_ms = Some(600_000);
    store.create_job(&long, 128).await.unwrap();
    wait_for("short collected", 30, async || {
        let gone = store.get_json::<Job>(&store.keys().job("short")).await.ok()?.is_none();
        (gone && tasks(&store, "short").await.is_empty()).then_some(())
    })
    .await;
    assert!(store.get_json::<serde_json::Value>(&store.keys().status("short")).await.unwrap().is_none());
    let (l, _) = store.get_json::<Job>(&store.keys().job("long")).await.unwrap().expect("a running job is kept");
    assert!(!l.state.is_final());
    assert_eq!(tasks(&store, "long").await.len(), 1);
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

/// Past the cap on finished tasks the oldest finished jobs go first, whatever their age; and the leader
/// compacts etcd's history on its period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_work_beyond_the_cap_is_collected_oldest_first_and_history_is_compacted() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    // Five finished jobs of 4 tasks each, finished in this order.
    for i in 1..=5 {
        let id = format!("old-{i}");
        store.create_job(&Job::new(&id, JobKind::Batch, 4, Resources::new(500, 1 << 28)), 128).await.unwrap();
        let (job, rev) = store.get_json::<Job>(&store.keys().job(&id)).await.unwrap().unwrap();
        store.set_job_state(&job, rev, JobState::Succeeded).await.unwrap().expect("finished");
    }
    let _running = store.create_job(&Job::new("running", JobKind::Batch, 4, Resources::new(500, 1 << 28)), 128).await;
    let before = store.revision().await.unwrap();
    let args = ["--etcd", &ep, "--instance", "cap-1", "--keep-finished-tasks", "10", "--compact-every", "1s"];
    let _ctl = Proc::start("omega-controller", &args, "cap-1");
    // 20 finished tasks, at most 10 kept: old-1, old-2 and old-3 go (12 tasks), old-4 and old-5 stay.
    let kept = wait_for("the oldest finished jobs collected", 30, async || {
        let (kvs, _) = store.list(&store.keys().jobs_prefix(), 100, None).await.ok()?;
        let ids: Vec<String> = kvs.iter().map(|kv| serde_json::from_slice::<Job>(kv.value()).unwrap().id).collect();
        (ids.len() == 3).then_some(ids)
    })
    .await;
    assert_eq!(kept, ["old-4", "old-5", "running"]);
    for gone in ["old-1", "old-2", "old-3"] {
        assert!(tasks(&store, gone).await.is_empty(), "{gone}'s tasks are gone with it");
    }
    assert_eq!(tasks(&store, "running").await.len(), 4, "unfinished work is never collected");
    // History up to the revision of a period earlier is compacted away.
    wait_for("etcd's history compacted", 30, async || {
        let old = store.client().get("\0", Some(etcd_client::GetOptions::new().with_revision(before))).await;
        old.is_err_and(|e| e.to_string().contains("compacted")).then_some(())
    })
    .await;
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

/// A node of the test's own, alive under a lease the test holds (revoke it to "lose" the node).
async fn own_node(store: &Store, name: &str) -> i64 {
    let node = omega::model::Node {
        name: name.into(),
        capacity: Resources::new(4000, 8 << 30),
        labels: Default::default(),
        address: None,
        registered_at_ms: 0,
    };
    store.register_node(&node).await.unwrap();
    let lease = store.grant_lease(60).await.unwrap();
    store.put_liveness(name, lease).await.unwrap();
    lease
}

/// Places every task of `job` on `node` with the commit protocol, as a scheduler would.
async fn place_on(store: &Store, job: &Job, node: &str) {
    use omega::commit::{Claim, CommitConfig, CommitKind, Committer};
    let cache = omega::cell_state::CellState::start(store.clone(), Default::default()).await.unwrap();
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let claims: Vec<Claim> = snap.tasks_of(job).map(|t| Claim::new(t.clone(), node)).collect::<Vec<_>>();
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &claims, CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.committed(), job.tasks as usize);
}

/// The controller decides a node is lost, but its agent re-registers before the release is written: the
/// release, compared on the node still being down, writes nothing, and the node keeps its tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_comes_back_before_its_release_keeps_its_tasks() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let lease = own_node(&store, "n1").await;
    let web = Job::new("web", JobKind::Service, 2, Resources::new(1000, 1 << 30));
    store.create_job(&web, 128).await.unwrap();
    place_on(&store, &web, "n1").await;
    let dir = tempfile::tempdir().unwrap();
    let ctl = Proc::start_with_env(
        "omega-controller",
        &["--etcd", &ep, "--instance", "ctl-fp", "--lease-ttl", "2s", "--grace", "200ms"],
        "ctl-fp",
        &[
            ("OMEGA_FAILPOINTS", "controller.before_lost_release=pause"),
            ("OMEGA_FAILPOINT_DIR", dir.path().to_str().unwrap()),
        ],
    );
    wait_for("ctl-fp leads", 20, async || (leader(&store).await.as_deref() == Some("ctl-fp")).then_some(())).await;

    // The node's lease goes: the controller waits out the grace and is about to give its tasks up.
    store.client().lease_client().revoke(lease).await.unwrap();
    let marker = dir.path().join("controller.before_lost_release");
    wait_for("the controller to decide n1 is lost", 30, async || marker.exists().then_some(())).await;
    // The agent comes back in that window.
    let lease = store.grant_lease(60).await.unwrap();
    store.put_liveness("n1", lease).await.unwrap();
    std::fs::remove_file(&marker).unwrap();
    wait_for("the controller to see the node back", 30, async || {
        ctl.log().contains("nodes came back before their tasks were given up").then_some(())
    })
    .await;
    let ts = tasks(&store, "web").await;
    assert!(
        ts.iter().all(|t| t.state == TaskState::Assigned && t.node.as_deref() == Some("n1")),
        "n1 keeps its tasks: {ts:?}"
    );
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
    assert_eq!(report.placed_tasks, 2);
}

/// Nodes that stay down and hold nothing are forgotten after `--node-gc-after` (record and ledger), so
/// caches do not keep every node that ever existed; a node that held tasks is forgotten once they are
/// released, and a live node is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_down_and_empty_are_forgotten() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let gone_empty = own_node(&store, "empty").await;
    let gone_busy = own_node(&store, "busy").await;
    let _alive = own_node(&store, "alive").await;
    let job = Job::new("j", JobKind::Service, 1, Resources::new(1000, 1 << 30));
    store.create_job(&job, 128).await.unwrap();
    place_on(&store, &job, "busy").await;
    let _ctl = Proc::start(
        "omega-controller",
        &["--etcd", &ep, "--instance", "ctl-gc", "--grace", "200ms", "--node-gc-after", "1s"],
        "ctl-gc",
    );
    for lease in [gone_empty, gone_busy] {
        store.client().lease_client().revoke(lease).await.unwrap();
    }
    for node in ["empty", "busy"] {
        wait_for(&format!("{node} forgotten"), 30, async || {
            let record = store.get_json::<serde_json::Value>(&store.keys().node(node)).await.ok()?;
            let ledger = store.get_json::<serde_json::Value>(&store.keys().alloc(node)).await.ok()?;
            (record.is_none() && ledger.is_none()).then_some(())
        })
        .await;
    }
    let t = &tasks(&store, "j").await[0];
    assert_eq!(t.state, TaskState::Pending, "its task was released before the node was forgotten: {t:?}");
    assert!(store.get_json::<serde_json::Value>(&store.keys().node("alive")).await.unwrap().is_some());
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
}

/// Tasks a submission wrote before it died (no job record) are deleted once nothing of them has been written
/// for `--orphan-grace`; a complete job beside them is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_a_submission_that_died_are_collected() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let whole = Job::new("whole", JobKind::Batch, 2, Resources::new(100, 1 << 20));
    store.create_job(&whole, 128).await.unwrap();
    // What a submission that died after its first transaction leaves: tasks, no record.
    let dead = Job::new("dead", JobKind::Batch, 3, Resources::new(100, 1 << 20));
    let mut kv = store.client().kv_client();
    for i in 0..3 {
        let task = Task::pending(&dead, i);
        kv.put(store.keys().task(&task.id), serde_json::to_vec(&task).unwrap(), None).await.unwrap();
    }
    let _ctl = Proc::start(
        "omega-controller",
        &["--etcd", &ep, "--instance", "ctl-orphans", "--orphan-grace", "1s"],
        "ctl-orphans",
    );
    wait_for("the dead submission's tasks collected", 30, async || {
        tasks(&store, "dead").await.is_empty().then_some(())
    })
    .await;
    assert_eq!(tasks(&store, "whole").await.len(), 2);
    assert!(store.get_json::<Job>(&store.keys().job("whole")).await.unwrap().is_some());
}
