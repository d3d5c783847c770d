//! The audit passes on a cell the commit protocol wrote, and names each kind of corruption written by hand.

mod common;

use common::*;
use omega::audit::{self, Violation};
use omega::cell_state::{CellState, CellStateOptions};
use omega::commit::{Claim, CommitConfig, CommitKind, Committer};
use omega::model::{Allocation, Task, TaskState};
use omega::resources::Resources;
use omega::store::Store;

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
        .map(|i| Claim { task: snap.tasks.get(&format!("a/{i}")).unwrap().clone(), node: node_name(i % 2) })
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
    // 1. Node 2's ledger claims more than its capacity, and its sum is off.
    let mut over = Allocation::empty(&node_name(2), cap);
    over.used = Resources::new(5000, 0);
    put_json(&store, keys.alloc(&node_name(2)), &over).await;
    // 2. Task a/4 says it is assigned to node 0, but node 0's ledger and assignments do not know it.
    let (mut t4, _) = store.get_json::<Task>(&keys.task("a/4")).await.unwrap().unwrap();
    t4.state = TaskState::Assigned;
    t4.node = Some(node_name(0));
    put_json(&store, keys.task("a/4"), &t4).await;
    // 3. Node 1's ledger also lists a/0, which lives on node 0.
    let (mut l1, _) = store.get_json::<Allocation>(&keys.alloc(&node_name(1))).await.unwrap().unwrap();
    l1.add("a/0", Resources::new(1000, 1 << 30));
    put_json(&store, keys.alloc(&node_name(1)), &l1).await;
    // 4. An assignment for a task that is not placed there.
    let (a, _) = store.get_json::<serde_json::Value>(&keys.assignment(&node_name(0), "a/0")).await.unwrap().unwrap();
    put_json(&store, keys.assignment(&node_name(2), "a/5"), &a).await;
    // 5. Garbage.
    store.client().kv_client().put(keys.task("a/9"), "{not json", None).await.unwrap();

    let bad = audit::audit(&store).await.unwrap();
    let has = |f: &dyn Fn(&Violation) -> bool| bad.violations.iter().any(f);
    assert!(
        has(&|v| matches!(v, Violation::OverCommitted { node, .. } if *node == node_name(2))),
        "{:#?}",
        bad.violations
    );
    assert!(has(&|v| matches!(v, Violation::LedgerSumMismatch { node, .. } if *node == node_name(2))));
    assert!(has(&|v| matches!(v, Violation::TaskNotInLedger { task, .. } if task == "a/4")));
    assert!(has(&|v| matches!(v, Violation::AssignmentMissing { task, .. } if task == "a/4")));
    assert!(has(&|v| matches!(v, Violation::TaskInSeveralLedgers { task, .. } if task == "a/0")));
    assert!(has(
        &|v| matches!(v, Violation::LedgerEntryInvalid { node, task, .. } if *node == node_name(1) && task == "a/0")
    ));
    assert!(has(&|v| matches!(v, Violation::AssignmentInvalid { task, .. } if task == "a/5")));
    assert!(has(&|v| matches!(v, Violation::Undecodable { key, .. } if key.ends_with("a/9"))));
    // Every violation reads as a sentence naming what is wrong.
    for v in &bad.violations {
        assert!(!v.to_string().is_empty());
    }
}
