//! The audit passes on a cell the commit protocol wrote, and names each kind of corruption written by hand.

use omega::audit::{self, Violation};
use omega::cell_state::{CellState, CellStateOptions};
use omega::commit::{Claim, CommitConfig, CommitKind, Committer};
use omega::model::{Allocation, Assignment, Task, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::*;

async fn put_json<T: serde::Serialize>(store: &Store, key: String, value: &T) {
    store.client().kv_client().put(key, serde_json::to_vec(value).unwrap(), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_names_every_broken_invariant() {
    let (_etcd, store) = start_etcd().await;
    let cap = Resources::new(4000, 8 << 30);
    seed_nodes(&store, 3, cap).await;
    store.create_job(&batch_job("a", 6, Resources::new(1000, 1 << 30)), 128).await.unwrap();
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    let claims: Vec<Claim> = (0..4)
        .map(|i| Claim::new(snap.tasks.get(format!("a/{i}").as_str()).unwrap().clone(), node_name(i % 2)))
        .collect();
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &claims, CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.committed(), 4);
    let clean = audit::audit(&store).await.unwrap();
    assert!(clean.is_ok(), "{:?}", clean.violations);
    assert_eq!((clean.nodes, clean.jobs, clean.tasks, clean.placed_tasks, clean.assignments), (3, 1, 6, 4, 4));
    assert_eq!(clean.used, Resources::new(4000, 4 << 30));

    let keys = store.keys().clone();
    // 1. Node 2's ledger claims more than its capacity (and more than its tasks hold).
    let mut over = Allocation::empty(&node_name(2), cap);
    over.used = Resources::new(5000, 0);
    put_json(&store, keys.alloc(&node_name(2)), &over).await;
    // 2. Task a/4 says it is assigned to node 0, but node 0's ledger and assignments do not know it.
    let (mut t4, _) = store.get_json::<Task>(&keys.task("a/4")).await.unwrap().unwrap();
    t4.state = TaskState::Assigned;
    t4.node = Some(node_name(0));
    put_json(&store, keys.task("a/4"), &t4).await;
    // 3. Task a/0 runs on node 0, and an assignment tells node 1 to run it too.
    let (a0, _) = store.get_json::<Assignment>(&keys.assignment(&node_name(0), "a/0")).await.unwrap().unwrap();
    put_json(&store, keys.assignment(&node_name(1), "a/0"), &Assignment { node: node_name(1), ..a0.clone() }).await;
    // 4. An assignment for a task that is not placed anywhere.
    put_json(&store, keys.assignment(&node_name(2), "a/5"), &Assignment { task: "a/5".into(), ..a0 }).await;
    // 5. Task a/5 is placed on a node that does not exist.
    let (mut t5, _) = store.get_json::<Task>(&keys.task("a/5")).await.unwrap().unwrap();
    t5.state = TaskState::Running;
    t5.node = Some("ghost".into());
    put_json(&store, keys.task("a/5"), &t5).await;
    // 6. Garbage.
    store.client().kv_client().put(keys.task("a/9"), "{not json", None).await.unwrap();

    let bad = audit::audit(&store).await.unwrap();
    let has = |f: &dyn Fn(&Violation) -> bool| bad.violations.iter().any(f);
    let n = |i: usize| node_name(i);
    assert!(has(&|v| matches!(v, Violation::OverCommitted { node, .. } if *node == n(2))), "{:#?}", bad.violations);
    assert!(has(&|v| matches!(v, Violation::LedgerMismatch { node, .. } if *node == n(2))));
    assert!(has(&|v| matches!(v, Violation::LedgerMismatch { node, tasks: 3, ledger_tasks: 2, .. } if *node == n(0))));
    assert!(has(&|v| matches!(v, Violation::AssignmentMissing { task, .. } if task == "a/4")));
    assert!(has(&|v| matches!(v, Violation::AssignmentInvalid { node, task, .. } if *node == n(1) && task == "a/0")));
    assert!(has(&|v| matches!(v, Violation::AssignmentInvalid { task, .. } if task == "a/5")));
    assert!(has(&|v| matches!(v, Violation::PlacedOnNoNode { task, .. } if task == "a/5")));
    assert!(has(&|v| matches!(v, Violation::Undecodable { key, .. } if key.ends_with("a/9"))));
    // Node 1's ledger still matches its tasks: only what is broken is reported.
    assert!(!has(&|v| matches!(v, Violation::LedgerMismatch { node, .. } if *node == n(1))));
    assert_eq!(bad.violations.len(), 8, "{:#?}", bad.violations);
    // Every violation reads as a sentence naming what is wrong, and serialises for `-o json`.
    for v in &bad.violations {
        assert!(!v.to_string().is_empty());
        assert!(serde_json::to_value(v).unwrap().get("kind").is_some());
    }
}
