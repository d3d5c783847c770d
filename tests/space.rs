//! etcd out of space: Omega's nested transactions are refused like any other write (etcd 3.4 would apply
//! them, since it prices a transaction by its top-level puts only), the store remembers that etcd is full,
//! and writes resume by themselves once an operator has freed space.

use omega::audit;
use omega::cell_state::{CellSnapshot, CellState, CellStateOptions};
use omega::commit::{Claim, CommitConfig, CommitKind, CommitReport, Committer};
use omega::etcd_process::EtcdOptions;
use omega::resources::Resources;
use omega_testkit::*;

const TASK: Resources = Resources::new(100, 1 << 20);

fn claims(snap: &CellSnapshot, job: &str, n: usize) -> Vec<Claim> {
    (0..n)
        .map(|i| Claim::new(snap.tasks.get(format!("{job}/{i}").as_str()).expect("task").clone(), node_name(i % 2)))
        .collect()
}

async fn commit(committer: &Committer, snap: &CellSnapshot, job: &str, n: usize, kind: CommitKind) -> CommitReport {
    committer.commit(snap, &claims(snap, job, n), kind).await.expect("commit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_claims_are_refused_while_etcd_is_full_and_commit_once_it_has_room() {
    let (_etcd, store) = start_etcd_with(EtcdOptions {
        quota_backend_bytes: Some(8 << 20),
        max_txn_ops: Some(128),
        ..Default::default()
    })
    .await;
    seed_nodes(&store, 2, Resources::new(1_000_000, 1 << 40)).await;
    store.create_job(&batch_job("spread", 20, TASK), 128).await.unwrap();
    // 70 tasks on 2 nodes: 140 writes beside the ledgers, more than 128 ops, so the gang's flat transaction
    // nests its writes.
    let mut gang = batch_job("gang", 70, TASK);
    gang.gang = true;
    store.create_job(&gang, 128).await.unwrap();
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    let committer = Committer::new(store.clone(), CommitConfig { placed_by: "test".into(), ..Default::default() });

    fill_until_no_space(&store).await;
    let full_at = store.revision().await.unwrap();
    let report = commit(&committer, &snap, "spread", 20, CommitKind::Incremental).await;
    assert_eq!(report.committed(), 0, "{report:?}");
    assert!(store.space().is_full(), "the store knows etcd is full");
    let report = commit(&committer, &snap, "gang", 70, CommitKind::Gang).await;
    assert_eq!(report.committed(), 0, "{report:?}");
    assert_eq!(store.revision().await.unwrap(), full_at, "nothing was written while etcd was full");

    free_space(&store).await;
    // The first write after the refusal waits for its turn to probe, finds room, and every write goes again.
    assert_eq!(commit(&committer, &snap, "spread", 20, CommitKind::Incremental).await.committed(), 20);
    assert!(!store.space().is_full());
    assert_eq!(commit(&committer, &snap, "gang", 70, CommitKind::Gang).await.committed(), 70);
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
}
