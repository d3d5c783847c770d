//! The schedulers as separate processes sharing one real etcd.

use omega::audit;
use omega::model::{Constraint, Job, JobKind, JobStatus, Task, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::metrics::{metric, scrape};
use omega_testkit::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CPU: u64 = 1000;
const MEM: u64 = 1 << 30;

/// A scheduler process, killed (SIGKILL) when dropped.
struct SchedulerProcess {
    child: Child,
}

impl SchedulerProcess {
    fn start(etcd: &str, kind: &str, instance: &str, extra: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("omega-test-{instance}-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_omega-scheduler"))
            .args([
                "--etcd",
                etcd,
                "--kind",
                kind,
                "--instance",
                instance,
                "--lease-ttl",
                "2s",
                "--steal-after",
                "500ms",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("start omega-scheduler");
        SchedulerProcess { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SchedulerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn tasks(store: &Store) -> BTreeMap<String, Task> {
    let (kvs, _) = store.list(&store.keys().tasks_prefix(), 1000, None).await.unwrap();
    kvs.iter().map(|kv| serde_json::from_slice::<Task>(kv.value()).unwrap()).map(|t| (t.id.clone(), t)).collect()
}

/// Polls until `done` holds for the cell's tasks, or panics after `limit` with what is still pending.
async fn wait_until(
    store: &Store,
    limit: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<String, Task>) -> bool,
) -> BTreeMap<String, Task> {
    let deadline = Instant::now() + limit;
    loop {
        let all = tasks(store).await;
        if done(&all) {
            return all;
        }
        if Instant::now() > deadline {
            let pending: Vec<&String> = all.values().filter(|t| t.state == TaskState::Pending).map(|t| &t.id).collect();
            panic!("timed out waiting for {what}; pending: {pending:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status(store: &Store, job: &str) -> Option<JobStatus> {
    store.get_json::<JobStatus>(&store.keys().status(job)).await.unwrap().map(|(s, _)| s)
}

fn placed(t: &Task) -> bool {
    t.state == TaskState::Assigned
}

/// 12 nodes over 3 zones, a batch and a service scheduler, a mixed workload: every task ends placed or
/// pending with a reason, the audit passes, and placement rules hold on the final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_service_share_a_cell() {
    let (etcd, store) = start_etcd().await;
    // 8-core nodes: the batch work below (16 cores, 28 GiB) fills at most 2 of them, so every zone keeps at
    // least 2 nodes with room and the service's 2-per-zone spread is feasible whatever the timing (spread is a
    // preference; anti-affinity is a rule).
    seed_nodes(&store, 12, Resources::new(8 * CPU, 16 * MEM)).await; // zones: zone-0, zone-1, zone-2
    let metrics_port = omega::etcd_process::free_port().unwrap();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _batch = SchedulerProcess::start(&etcd.endpoint(), "batch", "batch-1", &["--metrics-addr", &metrics_addr]);
    let _service = SchedulerProcess::start(&etcd.endpoint(), "service", "service-1", &[]);

    let mut jobs = Vec::new();
    for i in 0..4 {
        jobs.push(Job::new(&format!("crunch-{i}"), JobKind::Batch, 6, Resources::new(CPU / 2, MEM)));
    }
    let mut gang = Job::new("gang", JobKind::Batch, 4, Resources::new(CPU, MEM));
    gang.gang = true;
    jobs.push(gang);
    let mut too_big_gang = Job::new("huge-gang", JobKind::Batch, 3, Resources::new(9 * CPU, MEM));
    too_big_gang.gang = true;
    jobs.push(too_big_gang);
    let mut web = Job::new("web", JobKind::Service, 6, Resources::new(CPU / 2, MEM));
    web.spread = Some("zone".into());
    web.anti_affinity = true;
    jobs.push(web);
    let mut db = Job::new("db", JobKind::Service, 2, Resources::new(CPU, 2 * MEM));
    db.constraints = vec![Constraint::In { label: "zone".into(), values: vec!["zone-1".into(), "zone-2".into()] }];
    db.anti_affinity = true;
    jobs.push(db);
    let mut nowhere = Job::new("nowhere", JobKind::Service, 1, Resources::new(CPU, MEM));
    nowhere.constraints = vec![Constraint::Equals { label: "zone".into(), value: "zone-9".into() }];
    jobs.push(nowhere);
    for j in &jobs {
        store.create_job(j, 128).await.unwrap();
    }
    let unplaceable: HashSet<&str> = ["huge-gang", "nowhere"].into();
    let all = wait_until(&store, Duration::from_secs(60), "every placeable task placed", |all| {
        all.values().all(|t| placed(t) || unplaceable.contains(t.job.as_str()))
    })
    .await;

    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
    assert_eq!(report.placed_tasks, 4 * 6 + 4 + 6 + 2);
    let node_zone = |n: &str| format!("zone-{}", n.trim_start_matches("node-").parse::<usize>().unwrap() % 3);
    let of = |job: &str| all.values().filter(move |t| t.job == job).collect::<Vec<_>>();
    // Service placement rules on the final state.
    let web_nodes: Vec<String> = of("web").iter().map(|t| t.node.clone().unwrap()).collect();
    assert_eq!(web_nodes.iter().collect::<HashSet<_>>().len(), 6, "anti-affinity: {web_nodes:?}");
    let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
    for n in &web_nodes {
        *per_zone.entry(node_zone(n)).or_default() += 1;
    }
    assert_eq!(per_zone.values().copied().collect::<Vec<_>>(), [2, 2, 2], "spread over zones: {per_zone:?}");
    for t in of("db") {
        assert_ne!(node_zone(t.node.as_deref().unwrap()), "zone-0", "constraint zone in (zone-1, zone-2)");
    }
    assert!(of("web").iter().all(|t| t.placed_by.as_deref().unwrap().starts_with("service/")));
    assert!(of("crunch-0").iter().all(|t| t.placed_by.as_deref().unwrap().starts_with("batch/")));
    // The gang is whole; the one that cannot fit is absent, with a reason.
    assert!(of("gang").iter().all(|t| placed(t)));
    assert!(of("huge-gang").iter().all(|t| t.state == TaskState::Pending));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (huge, nowhere) = loop {
        if let (Some(a), Some(b)) = (status(&store, "huge-gang").await, status(&store, "nowhere").await) {
            break (a, b);
        }
        assert!(Instant::now() < deadline, "statuses of unplaceable jobs were written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(huge.pending, 3);
    assert!(huge.reason.contains("insufficient cpu"), "{huge:?}");
    assert_eq!(huge.reasons.get("insufficient_cpu"), Some(&12));
    assert_eq!(nowhere.reason, "0/12 nodes available: 12 constraint zone=zone-9", "{nowhere:?}");
    // The batch scheduler's metrics say what it did.
    let metrics = scrape(&metrics_addr).await;
    let placements = metric(&metrics, "omega_scheduler_placements_total");
    assert!(placements >= (4 * 6 + 4) as f64, "placements counted: {placements}\n{metrics}");
    assert!(metric(&metrics, "omega_scheduler_attempts_total") >= 1.0);
    assert!(metrics.contains("omega_scheduler_commit_txn_seconds"), "commit latency histogram served");
    assert!(metrics.contains("omega_scheduler_decision_seconds"));
    assert!(metrics.contains(r#"instance="batch-1""#));
    // Fully placed jobs are marked running.
    let (web_job, _) = store.get_json::<Job>(&store.keys().job("web")).await.unwrap().unwrap();
    assert_eq!(web_job.state, omega::model::JobState::Running);
}

/// Two instances of the batch scheduler split a stream of jobs; one is killed mid-stream; no job is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_loses_no_job() {
    let (etcd, store) = start_etcd().await;
    seed_nodes(&store, 20, Resources::new(64 * CPU, 256 * MEM)).await;
    let mut a = SchedulerProcess::start(&etcd.endpoint(), "batch", "batch-a", &["--t-job", "50ms"]);
    let _b = SchedulerProcess::start(&etcd.endpoint(), "batch", "batch-b", &["--t-job", "50ms"]);
    // Both instances are registered before the stream starts, so the work is split from the first job.
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.list(&store.keys().schedulers_prefix(), 10, None).await.unwrap().0.len() < 2 {
        assert!(Instant::now() < deadline, "both instances registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = 40;
    for i in 0..total {
        store
            .create_job(&Job::new(&format!("stream-{i:02}"), JobKind::Batch, 5, Resources::new(CPU / 4, MEM / 4)), 128)
            .await
            .unwrap();
        if i == total / 2 {
            let (owners, _) = store.list(&format!("{}cell/owners/", store.keys().prefix()), 100, None).await.unwrap();
            let held = owners.iter().filter(|kv| kv.value_str().unwrap_or("").contains("batch-a")).count();
            eprintln!("batch-a owns {held} jobs when killed");
            a.kill();
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let killed_at = Instant::now();
    let all = wait_until(&store, Duration::from_secs(60), "every job of the stream placed", |all| {
        all.len() == total * 5 && all.values().all(placed)
    })
    .await;
    let by: HashMap<String, usize> = all.values().fold(HashMap::new(), |mut m, t| {
        *m.entry(t.placed_by.clone().unwrap()).or_default() += 1;
        m
    });
    assert!(by.contains_key("batch/batch-a") && by.contains_key("batch/batch-b"), "both instances worked: {by:?}");
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
    eprintln!("placed by {by:?}; everything placed {:?} after the kill", killed_at.elapsed());
}

/// A full cell of low-priority batch work; a high-priority service job arrives and evicts the fewest
/// lowest-priority tasks it needs; they go back to pending, with the reason on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_service_preempts_batch_work() {
    let (etcd, store) = start_etcd().await;
    seed_nodes(&store, 4, Resources::new(4 * CPU, 16 * MEM)).await;
    let _batch = SchedulerProcess::start(&etcd.endpoint(), "batch", "batch-1", &[]);
    let _service = SchedulerProcess::start(&etcd.endpoint(), "service", "service-1", &[]);
    let mut low = Job::new("filler", JobKind::Batch, 12, Resources::new(CPU, MEM));
    low.priority = 0;
    let mut mid = Job::new("important-batch", JobKind::Batch, 4, Resources::new(CPU, MEM));
    mid.priority = 50;
    store.create_job(&low, 128).await.unwrap();
    store.create_job(&mid, 128).await.unwrap();
    wait_until(&store, Duration::from_secs(30), "the cell filled", |all| all.values().all(placed)).await;

    let mut urgent = Job::new("urgent", JobKind::Service, 2, Resources::new(CPU, MEM));
    urgent.priority = 100;
    store.create_job(&urgent, 128).await.unwrap();
    let all = wait_until(&store, Duration::from_secs(30), "the urgent service placed", |all| {
        all.values().filter(|t| t.job == "urgent").all(placed)
    })
    .await;
    let evicted: Vec<&Task> = all.values().filter(|t| t.state == TaskState::Pending).collect();
    assert_eq!(evicted.len(), 2, "two tasks evicted for two replicas: {evicted:?}");
    for t in &evicted {
        assert_eq!(t.job, "filler", "the lowest priority goes first");
        assert!(t.reason.as_deref().unwrap_or("").starts_with("preempted by urgent/"), "{:?}", t.reason);
    }
    let preempted: Vec<String> = all.values().filter(|t| t.job == "urgent").flat_map(|t| t.preempted.clone()).collect();
    let mut expected: Vec<String> = evicted.iter().map(|t| t.id.clone()).collect();
    let mut got = preempted.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "the preemptors name their victims");
    assert!(all.values().filter(|t| t.job == "important-batch").all(placed));
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
    // The evicted tasks are pending for their own scheduler, which explains why they do not fit.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = status(&store, "filler").await {
            if s.pending == 2 {
                assert!(s.reason.contains("insufficient cpu"), "{s:?}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "the batch scheduler explained the evicted tasks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
