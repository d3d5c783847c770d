//! Simulated node hosts at scale, against a real etcd: they come back after losing their leases, and keep up
//! with tens of thousands of assignments.

use etcd_client::{Txn, TxnOp};
use omega::model::{Allocation, Assignment, Job, JobKind, Task, TaskState};
use omega::resources::Resources;
use omega::store::{encode, Store};
use omega_agent::simulated::{SimOptions, SimulatedNodes};
use omega_testkit::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

async fn live_nodes(store: &Store) -> usize {
    let live = format!("{}cell/live/", store.keys().prefix());
    let resp = store
        .client()
        .kv_client()
        .get(
            live.as_str(),
            Some(etcd_client::GetOptions::new().with_range(omega::keys::prefix_end(live.as_bytes())).with_count_only()),
        )
        .await
        .unwrap();
    resp.count() as usize
}

/// Every shared lease revoked at once (what etcd does to leases it could not renew while overloaded): all
/// 10,000 virtual nodes are alive again by themselves, under new leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_simulated_nodes_come_back_after_their_leases_are_revoked() {
    let (_etcd, store) = start_etcd().await;
    let options = SimOptions { nodes: 10_000, lease_ttl: Duration::from_secs(3), ..Default::default() };
    let sim = SimulatedNodes::register(store.clone(), options).await.unwrap();
    let leases = sim.leases();
    assert_eq!(leases.len(), 10, "1,000 nodes per shared lease");
    assert_eq!(live_nodes(&store).await, 10_000);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let host = tokio::spawn(sim.run(async move {
        let _ = stop_rx.await;
    }));

    for lease in &leases {
        store.client().lease_client().revoke(*lease).await.unwrap();
    }
    wait_for("all 10,000 nodes alive again", 90, async || (live_nodes(&store).await == 10_000).then_some(())).await;
    // They stay up: the new leases are being renewed.
    let (live, _) = store.list(&format!("{}cell/live/", store.keys().prefix()), 5000, None).await.unwrap();
    let new_leases: std::collections::HashSet<String> =
        live.iter().map(|kv| serde_json::from_slice::<omega::model::Liveness>(kv.value()).unwrap().lease).collect();
    assert_eq!(new_leases.len(), 10, "one new lease per group");
    for old in &leases {
        assert!(!new_leases.contains(&format!("{old:x}")), "no node is on a revoked lease");
    }
    let _ = stop_tx.send(());
    host.await.unwrap().unwrap();
}

/// A host whose nodes hold 60,000 assignments takes them all with one listing and runs every task: racing
/// its watch against its tick must not drop the watch (and re-list everything) on every tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_sixty_thousand_assignments_keeps_up() {
    const TASKS: u32 = 60_000;
    let (_etcd, store) = start_etcd().await;
    let options = SimOptions { nodes: 100, lease_ttl: Duration::from_secs(10), ..Default::default() };
    let nodes = SimulatedNodes::names(&options);
    let task = Resources::new(10, 1 << 20);
    // The state a scheduler would have committed: a service job whose tasks are all assigned, with their
    // assignments and the nodes' ledgers, written in bulk.
    let job = Job::new("big", JobKind::Service, TASKS, task);
    let keys = store.keys().clone();
    let mut kv = store.client().kv_client();
    let mut ops = vec![TxnOp::put(keys.job("big"), encode("job", &job).unwrap(), None)];
    let mut ledgers: Vec<Allocation> = nodes.iter().map(|n| Allocation::empty(n, options.capacity)).collect();
    for i in 0..TASKS {
        let n = i as usize % nodes.len();
        let mut t = Task::pending(&job, i);
        t.state = TaskState::Assigned;
        t.node = Some(nodes[n].clone());
        t.placements = 1;
        ledgers[n].add(task);
        let a = Assignment {
            task: t.id.clone(),
            job: "big".into(),
            node: nodes[n].clone(),
            resources: task,
            placement: 1,
            placed_by: "test".into(),
            assigned_at_ms: 0,
            after: Vec::new(),
        };
        ops.push(TxnOp::put(keys.task(&t.id), encode("task", &t).unwrap(), None));
        ops.push(TxnOp::put(keys.assignment(&nodes[n], &t.id), encode("assignment", &a).unwrap(), None));
        if ops.len() >= 126 {
            kv.txn(Txn::new().and_then(std::mem::take(&mut ops))).await.unwrap();
        }
    }
    for l in &ledgers {
        ops.push(TxnOp::put(keys.alloc(&l.node), encode("alloc", l).unwrap(), None));
        if ops.len() >= 126 {
            kv.txn(Txn::new().and_then(std::mem::take(&mut ops))).await.unwrap();
        }
    }
    kv.txn(Txn::new().and_then(ops)).await.unwrap();

    let sim = SimulatedNodes::register(store.clone(), options).await.unwrap();
    let stats = sim.stats.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let host = tokio::spawn(sim.run(async move {
        let _ = stop_rx.await;
    }));
    let started = Instant::now();
    wait_for("every task running", 300, async || (stats.started.load(Ordering::Relaxed) >= TASKS as u64).then_some(()))
        .await;
    eprintln!("60,000 assignments: every task running after {:?}", started.elapsed());
    assert_eq!(stats.listings.load(Ordering::Relaxed), 1, "one listing; the watch was never dropped");
    let (kvs, _) = store.list(&keys.tasks_of_job("big"), 5000, None).await.unwrap();
    let running =
        kvs.iter().filter(|kv| serde_json::from_slice::<Task>(kv.value()).unwrap().state == TaskState::Running).count();
    assert_eq!(running, TASKS as usize);
    let audit = omega::audit::audit(&store).await.unwrap();
    assert!(audit.is_ok(), "{:?}", &audit.violations[..audit.violations.len().min(5)]);
    let _ = stop_tx.send(());
    host.await.unwrap().unwrap();
}
