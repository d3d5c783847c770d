//! The commit protocol's rules, one at a time, against a real etcd.

use omega::audit;
use omega::cell_state::{CellSnapshot, CellState, CellStateOptions};
use omega::commit::{Claim, ClaimOutcome, CommitConfig, CommitKind, Committer, Conflict, Detection};
use omega::etcd_process::EtcdOptions;
use omega::model::{Assignment, Task, TaskState};
use omega::resources::{Dimension, Resources};
use omega::store::Store;
use omega::Error;
use omega_testkit::*;
use std::sync::Arc;
use std::time::Duration;

const TASK: Resources = Resources::new(1000, 1 << 30);

fn committer(store: &Store, detection: Detection) -> Committer {
    Committer::new(store.clone(), CommitConfig { detection, placed_by: "test".into(), ..Default::default() })
}

/// Claims for the first `n` pending tasks of `job` (in index order), on `node_of(i)`.
fn claims(snap: &CellSnapshot, job: &str, n: usize, node_of: impl Fn(usize) -> String) -> Vec<Claim> {
    (0..n)
        .map(|i| {
            Claim::new(snap.tasks.get(format!("{job}/{i}").as_str()).expect("task in snapshot").clone(), node_of(i))
        })
        .collect()
}

async fn setup(
    nodes: usize,
    capacity: Resources,
    jobs: &[(&str, u32)],
) -> (omega::etcd_process::EtcdProcess, Store, CellState) {
    let (etcd, store) = start_etcd().await;
    seed_nodes(&store, nodes, capacity).await;
    for (id, n) in jobs {
        store.create_job(&batch_job(id, *n, TASK), 128).await.unwrap();
    }
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    assert_converged(&store, &cache).await;
    (etcd, store, cache)
}

async fn task_in_etcd(store: &Store, id: &str) -> Task {
    store.get_json::<Task>(&store.keys().task(id)).await.unwrap().expect("task exists").0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_writes_ledger_task_and_assignment_together() {
    let (_etcd, store, cache) = setup(1, Resources::new(4000, 8 << 30), &[("a", 2)]).await;
    let snap = cache.snapshot();
    let report = committer(&store, Detection::Fine)
        .commit(&snap, &claims(&snap, "a", 2, |_| node_name(0)), CommitKind::Incremental)
        .await
        .unwrap();
    let rev = match report.outcomes[0] {
        ClaimOutcome::Committed { revision } => revision,
        other => panic!("expected a commit, got {other:?}"),
    };
    assert_eq!(report.committed(), 2, "{:?}", report);
    assert_eq!(report.transactions, 1);

    let task = task_in_etcd(&store, "a/0").await;
    assert_eq!(task.state, TaskState::Assigned);
    assert_eq!(task.node.as_deref(), Some(node_name(0).as_str()));
    assert_eq!(task.placed_by.as_deref(), Some("test"));
    assert_eq!(task.placements, 1);
    let (assignment, arev) = store
        .get_json::<Assignment>(&store.keys().assignment(&node_name(0), "a/0"))
        .await
        .unwrap()
        .expect("assignment");
    assert_eq!(arev, rev, "assignment written in the claim's transaction");
    assert_eq!(assignment.resources, TASK);
    let after = cache.wait_for_revision(rev, Duration::from_secs(10)).await.unwrap();
    let ledger = &after.allocations.get(node_name(0).as_str()).unwrap().value;
    assert_eq!(ledger.used, Resources::new(2000, 2 << 30));
    assert_eq!(ledger.tasks, 2);
    assert_eq!(
        report.ledgers.get(&node_name(0)).cloned().flatten().as_ref(),
        after.allocations.get(node_name(0).as_str()),
        "the report carries the ledger it wrote"
    );
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

/// Omega's two conflict detections on the same race: another scheduler claimed on the node after our
/// snapshot, leaving room for us. Coarse refuses; fine re-checks the fresh state and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coarse_refuses_a_changed_node_fine_commits_what_still_fits() {
    for detection in [Detection::Coarse, Detection::Fine] {
        let (_etcd, store, cache) = setup(1, Resources::new(4000, 8 << 30), &[("mine", 1), ("theirs", 1)]).await;
        let stale = cache.snapshot();
        let other = committer(&store, Detection::Fine);
        let r = other.commit(&stale, &claims(&stale, "theirs", 1, node_name), CommitKind::Incremental).await.unwrap();
        assert_eq!(r.committed(), 1);

        let me = committer(&store, detection);
        let report = me.commit(&stale, &claims(&stale, "mine", 1, node_name), CommitKind::Incremental).await.unwrap();
        assert_eq!(report.failed_node_txns, 1, "the stale compare failed once");
        let newest = report.ledgers.get(&node_name(0)).expect("ledger reported").as_ref().unwrap();
        match detection {
            // The failure returned the node's fresh state, holding the other scheduler's claim.
            Detection::Coarse => assert_eq!(newest.value.used, TASK),
            // The fresh state was used for the retry, and the report carries what the retry wrote.
            Detection::Fine => assert_eq!(newest.value.used, Resources::new(2000, 2 << 30)),
        }
        match detection {
            Detection::Coarse => {
                assert_eq!(report.outcomes[0], ClaimOutcome::Conflicted(Conflict::NodeChanged));
                assert_eq!(task_in_etcd(&store, "mine/0").await.state, TaskState::Pending);
            }
            Detection::Fine => {
                assert!(report.outcomes[0].is_committed(), "{:?}", report.outcomes);
                assert_eq!(report.retried_claims, 1);
                assert_eq!(report.transactions, 2, "re-sent at once, without a new placement");
                assert_eq!(task_in_etcd(&store, "mine/0").await.state, TaskState::Assigned);
            }
        }
        assert!(audit::audit(&store).await.unwrap().is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fine_detection_reports_no_room_when_the_fresh_state_is_full() {
    // Room for exactly one task.
    let (_etcd, store, cache) = setup(1, Resources::new(1000, 8 << 30), &[("mine", 1), ("theirs", 1)]).await;
    let stale = cache.snapshot();
    committer(&store, Detection::Fine)
        .commit(&stale, &claims(&stale, "theirs", 1, node_name), CommitKind::Incremental)
        .await
        .unwrap();
    let report = committer(&store, Detection::Fine)
        .commit(&stale, &claims(&stale, "mine", 1, node_name), CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.outcomes[0], ClaimOutcome::Conflicted(Conflict::NoRoom(Dimension::Cpu)));
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_placed_by_someone_else_is_not_placed_again() {
    let (_etcd, store, cache) = setup(2, Resources::new(8000, 8 << 30), &[("a", 1)]).await;
    let stale = cache.snapshot();
    let first = committer(&store, Detection::Fine)
        .commit(&stale, &claims(&stale, "a", 1, |_| node_name(0)), CommitKind::Incremental)
        .await;
    assert!(first.unwrap().outcomes[0].is_committed());
    for detection in [Detection::Coarse, Detection::Fine] {
        let report = committer(&store, detection)
            .commit(&stale, &claims(&stale, "a", 1, |_| node_name(1)), CommitKind::Incremental)
            .await
            .unwrap();
        assert_eq!(report.outcomes[0], ClaimOutcome::Conflicted(Conflict::TaskChanged), "{detection:?}");
    }
    assert_eq!(task_in_etcd(&store, "a/0").await.node.as_deref(), Some(node_name(0).as_str()));
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_without_liveness_or_ledger_get_nothing() {
    let (_etcd, store, cache) = setup(2, Resources::new(8000, 8 << 30), &[("a", 3)]).await;
    let mut kv = store.client().kv_client();
    kv.delete(store.keys().live(&node_name(0)), None).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    let mut c = claims(&snap, "a", 2, |_| node_name(0));
    c.push(Claim::new(snap.tasks.get("a/2").unwrap().clone(), "no-such-node"));
    let report = committer(&store, Detection::Fine).commit(&snap, &c, CommitKind::Incremental).await.unwrap();
    assert_eq!(report.outcomes[0], ClaimOutcome::Conflicted(Conflict::NotSchedulable));
    assert_eq!(report.outcomes[1], ClaimOutcome::Conflicted(Conflict::NotSchedulable));
    assert_eq!(report.outcomes[2], ClaimOutcome::Conflicted(Conflict::NodeGone));

    // A snapshot taken before the node died still cannot land a claim there: liveness is in the compare.
    let (_etcd2, store2, cache2) = setup(1, Resources::new(8000, 8 << 30), &[("b", 1)]).await;
    let before = cache2.snapshot();
    store2.client().kv_client().delete(store2.keys().live(&node_name(0)), None).await.unwrap();
    let report = committer(&store2, Detection::Fine)
        .commit(&before, &claims(&before, "b", 1, node_name), CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.outcomes[0], ClaimOutcome::Conflicted(Conflict::NotSchedulable));
    assert_eq!(task_in_etcd(&store2, "b/0").await.state, TaskState::Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_claimed_twice_in_one_commit_is_tried_once() {
    let (_etcd, store, cache) = setup(2, Resources::new(8000, 8 << 30), &[("a", 1)]).await;
    let snap = cache.snapshot();
    let t = snap.tasks.get("a/0").unwrap().clone();
    let c = vec![Claim::new(t.clone(), node_name(0)), Claim::new(t, node_name(1))];
    let report = committer(&store, Detection::Fine).commit(&snap, &c, CommitKind::Incremental).await.unwrap();
    assert!(report.outcomes[0].is_committed());
    assert_eq!(report.outcomes[1], ClaimOutcome::Conflicted(Conflict::Duplicate));
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

/// 300 claims on 300 nodes: more sub-transactions than one etcd transaction may hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_split_to_the_servers_op_limit() {
    let (_etcd, store, cache) = setup(300, Resources::new(4000, 8 << 30), &[("wide", 300)]).await;
    let snap = cache.snapshot();
    let report = committer(&store, Detection::Coarse)
        .commit(&snap, &claims(&snap, "wide", 300, node_name), CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.committed(), 300);
    // Each one-claim sub-txn needs 3 ops; with 128 ops a transaction holds at most 125 of them.
    assert_eq!(report.transactions, 3, "300 sub-transactions in 125 + 125 + 50");
    let audit = audit::audit(&store).await.unwrap();
    assert!(audit.is_ok());
    assert_eq!(audit.placed_tasks, 300);
}

/// The committer is told a larger limit than the server has: it learns from the refusal and re-sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_larger_than_the_servers_is_lowered_on_refusal() {
    let (_etcd, store, cache) = setup(200, Resources::new(4000, 8 << 30), &[("wide", 200)]).await;
    let snap = cache.snapshot();
    let c = Committer::new(store.clone(), CommitConfig { max_txn_ops: Some(1024), ..Default::default() });
    let report = c.commit(&snap, &claims(&snap, "wide", 200, node_name), CommitKind::Incremental).await.unwrap();
    assert_eq!(report.committed(), 200);
    assert!(c.max_txn_ops() <= 128, "lowered to what the server accepts, now {}", c.max_txn_ops());
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

/// A server started with a larger `--max-txn-ops` takes larger batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_server_limit_means_fewer_round_trips() {
    let (_etcd, store) = start_etcd_with(EtcdOptions { max_txn_ops: Some(1024), ..Default::default() }).await;
    seed_nodes(&store, 300, Resources::new(4000, 8 << 30)).await;
    store.create_job(&batch_job("wide", 300, TASK), 128).await.unwrap();
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    let c = Committer::new(store.clone(), CommitConfig { max_txn_ops: Some(1024), ..Default::default() });
    let report = c.commit(&snap, &claims(&snap, "wide", 300, node_name), CommitKind::Incremental).await.unwrap();
    assert_eq!(report.committed(), 300);
    assert_eq!(report.transactions, 1);
}

/// Many claims on one node: one node's sub-transaction is capped, the rest follow in later rounds against
/// the ledger the earlier round wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_claims_on_one_node_are_chained() {
    let (_etcd, store, cache) = setup(1, Resources::new(200_000, 256 << 30), &[("deep", 150)]).await;
    let snap = cache.snapshot();
    let report = committer(&store, Detection::Coarse)
        .commit(&snap, &claims(&snap, "deep", 150, |_| node_name(0)), CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.committed(), 150);
    assert_eq!(report.transactions, 3, "63 + 63 + 24 claims");
    let audit = audit::audit(&store).await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.violations);
    assert_eq!(audit.placed_tasks, 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_lands_whole_or_not_at_all() {
    // Two nodes with room for 2 tasks each; a gang of 4 fits exactly.
    let (_etcd, store, cache) = setup(2, Resources::new(2000, 8 << 30), &[("gang", 4), ("intruder", 1)]).await;
    let stale = cache.snapshot();
    // Someone takes one slot after our snapshot.
    let r = committer(&store, Detection::Fine)
        .commit(&stale, &claims(&stale, "intruder", 1, |_| node_name(1)), CommitKind::Incremental)
        .await;
    assert!(r.unwrap().outcomes[0].is_committed());
    for detection in [Detection::Coarse, Detection::Fine] {
        let gang = claims(&stale, "gang", 4, |i| node_name(i / 2));
        let report = committer(&store, detection).commit(&stale, &gang, CommitKind::Gang).await.unwrap();
        assert_eq!(report.committed(), 0, "{detection:?}: {:?}", report.outcomes);
        let culprit =
            if detection == Detection::Coarse { Conflict::NodeChanged } else { Conflict::NoRoom(Dimension::Cpu) };
        assert!(report.outcomes.contains(&ClaimOutcome::Conflicted(culprit)), "{detection:?}: {:?}", report.outcomes);
        assert!(report.outcomes.contains(&ClaimOutcome::Conflicted(Conflict::GangAborted)));
        for i in 0..4 {
            assert_eq!(task_in_etcd(&store, &format!("gang/{i}")).await.state, TaskState::Pending);
        }
    }
    // On three nodes' worth of fresh state the same gang fits and lands whole.
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let gang = claims(&snap, "gang", 4, |i| node_name(if i < 2 { 0 } else { 1 }));
    let report = committer(&store, Detection::Fine).commit(&snap, &gang, CommitKind::Gang).await.unwrap();
    // Node 1 holds the intruder, so only one gang task fits there: the gang is refused before sending.
    assert_eq!(report.committed(), 0);
    assert_eq!(report.transactions, 0, "a gang that does not fit its own snapshot is not sent");
    let gang: Vec<Claim> = claims(&snap, "gang", 2, |_| node_name(0));
    let report = committer(&store, Detection::Fine).commit(&snap, &gang, CommitKind::Gang).await.unwrap();
    assert_eq!(report.committed(), 2, "{:?}", report);
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

/// A gang whose writes do not fit one flat transaction is committed through nested write groups; one that
/// needs more compares than the server allows is refused with the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_gangs_nest_their_writes_and_oversized_gangs_are_refused() {
    let (_etcd, store, cache) = setup(10, Resources::new(100_000, 256 << 30), &[("big", 60), ("huge", 200)]).await;
    let snap = cache.snapshot();
    // 60 claims on 10 nodes: 80 compares, 130 writes (over 128: nested).
    let report = committer(&store, Detection::Fine)
        .commit(&snap, &claims(&snap, "big", 60, |i| node_name(i % 10)), CommitKind::Gang)
        .await
        .unwrap();
    assert_eq!(report.committed(), 60, "{:?}", report.outcomes.first());
    assert_eq!(report.transactions, 1);
    let audit = audit::audit(&store).await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.violations);
    assert_eq!(audit.placed_tasks, 60);

    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let err = committer(&store, Detection::Fine)
        .commit(&snap, &claims(&snap, "huge", 200, |i| node_name(i % 10)), CommitKind::Gang)
        .await
        .expect_err("200 task compares cannot fit in 128 ops");
    assert!(matches!(err, Error::GangTooLarge { claims: 200, nodes: 10, .. }), "{err}");
    assert!(err.to_string().contains("max-txn-ops"), "{err}");
}

/// Snapshots are values: a reader's snapshot does not change under it while the cache moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_immutable_while_the_cache_moves_on() {
    let (_etcd, store, cache) = setup(1, Resources::new(8000, 8 << 30), &[("a", 2)]).await;
    let before: Arc<CellSnapshot> = cache.snapshot();
    let report = committer(&store, Detection::Fine)
        .commit(&before, &claims(&before, "a", 2, |_| node_name(0)), CommitKind::Incremental)
        .await
        .unwrap();
    let after = cache.wait_for_revision(report.max_revision().unwrap(), Duration::from_secs(10)).await.unwrap();
    assert!(before.tasks.values().all(|t| t.value.state == TaskState::Pending));
    assert!(after.tasks.values().all(|t| t.value.state == TaskState::Assigned));
    assert!(after.revision > before.revision);
}

/// Preemption: a high-priority task evicts a lower-priority one from a full node in the claim's own
/// sub-transaction; both sides record it, and the victim goes back to pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_evicts_and_claims_in_one_transaction() {
    // One node with room for exactly one task.
    let (_etcd, store, cache) = setup(1, Resources::new(1000, 8 << 30), &[("low", 2)]).await;
    let mut high = batch_job("high", 1, TASK);
    high.priority = 100;
    store.create_job(&high, 128).await.unwrap();
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let low = claims(&snap, "low", 1, node_name);
    let placed_low = committer(&store, Detection::Fine).commit(&snap, &low, CommitKind::Incremental).await.unwrap();
    assert!(placed_low.outcomes[0].is_committed());
    let snap = cache.wait_for_revision(placed_low.max_revision().unwrap(), Duration::from_secs(10)).await.unwrap();

    // Without preemption the high-priority task does not fit.
    let plain = vec![Claim::new(snap.tasks.get("high/0").unwrap().clone(), node_name(0))];
    let report = committer(&store, Detection::Fine).commit(&snap, &plain, CommitKind::Incremental).await.unwrap();
    assert_eq!(report.outcomes[0], ClaimOutcome::Conflicted(Conflict::NoRoom(Dimension::Cpu)));

    let victim = snap.tasks.get("low/0").unwrap().clone();
    let preempting = vec![Claim::preempting(snap.tasks.get("high/0").unwrap().clone(), node_name(0), vec![victim])];
    let report = committer(&store, Detection::Fine).commit(&snap, &preempting, CommitKind::Incremental).await.unwrap();
    assert!(report.outcomes[0].is_committed(), "{:?}", report.outcomes);
    let high0 = task_in_etcd(&store, "high/0").await;
    assert_eq!(high0.state, TaskState::Assigned);
    assert_eq!(high0.preempted, vec!["low/0".to_string()]);
    let low0 = task_in_etcd(&store, "low/0").await;
    assert_eq!(low0.state, TaskState::Pending, "the victim is pending again for its scheduler");
    assert!(low0.reason.as_deref().unwrap_or("").contains("preempted by high/0"), "{:?}", low0.reason);
    assert!(store.get_json::<Assignment>(&store.keys().assignment(&node_name(0), "low/0")).await.unwrap().is_none());
    let audit = audit::audit(&store).await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.violations);
    assert_eq!(audit.placed_tasks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_of_a_changed_victim_is_refused_and_evicts_nothing() {
    let (_etcd, store, cache) = setup(1, Resources::new(2000, 8 << 30), &[("low", 2), ("high", 2)]).await;
    let snap = cache.snapshot();
    let r = committer(&store, Detection::Fine)
        .commit(&snap, &claims(&snap, "low", 2, |_| node_name(0)), CommitKind::Incremental)
        .await;
    let rev = r.unwrap().max_revision().unwrap();
    let snap = cache.wait_for_revision(rev, Duration::from_secs(10)).await.unwrap();
    let (v0, v1) = (snap.tasks.get("low/0").unwrap().clone(), snap.tasks.get("low/1").unwrap().clone());

    // The same victim promised to two claims: only the first may have it.
    let twice = vec![
        Claim::preempting(snap.tasks.get("high/0").unwrap().clone(), node_name(0), vec![v0.clone()]),
        Claim::preempting(snap.tasks.get("high/1").unwrap().clone(), node_name(0), vec![v0.clone()]),
    ];
    // Committed against a copy whose victim then changes under us: low/1 finishes after the snapshot.
    let mut finished = (*v1.value).clone();
    finished.state = TaskState::Succeeded;
    store
        .client()
        .kv_client()
        .put(store.keys().task("low/1"), serde_json::to_vec(&finished).unwrap(), None)
        .await
        .unwrap();
    let changed = vec![Claim::preempting(snap.tasks.get("high/1").unwrap().clone(), node_name(0), vec![v1])];
    let report = committer(&store, Detection::Fine).commit(&snap, &changed, CommitKind::Incremental).await.unwrap();
    assert_eq!(report.outcomes[0], ClaimOutcome::Conflicted(Conflict::VictimChanged));
    assert_eq!(task_in_etcd(&store, "high/1").await.state, TaskState::Pending);

    let report = committer(&store, Detection::Fine).commit(&snap, &twice, CommitKind::Incremental).await.unwrap();
    assert!(report.outcomes[0].is_committed(), "{:?}", report.outcomes);
    assert_eq!(report.outcomes[1], ClaimOutcome::Conflicted(Conflict::Duplicate));
    assert_eq!(task_in_etcd(&store, "low/0").await.state, TaskState::Pending);
}

/// One claim that can never fit a request (its task record alone is over etcd's request limit) among 120
/// that can: the others land and are reported, the big one is refused for good, and nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_too_large_for_any_request_does_not_cost_the_others_their_outcome() {
    let (_etcd, store, cache) = setup(120, Resources::new(4000, 8 << 30), &[("wide", 120)]).await;
    // Task 7's record carries 1.53 MB of text: it can be written alone, but no claim carrying it fits a request.
    let key = store.keys().task("wide/7");
    let (mut big, _) = store.get_json::<Task>(&key).await.unwrap().unwrap();
    big.run = Some(omega::model::RunInfo { container: "x".repeat(1_530_000), ..Default::default() });
    let mut kv = store.client().kv_client().max_decoding_message_size(64 << 20);
    kv.put(key.as_str(), serde_json::to_vec(&big).unwrap(), None).await.unwrap();
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let report = committer(&store, Detection::Fine)
        .commit(&snap, &claims(&snap, "wide", 120, node_name), CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.outcomes[7], ClaimOutcome::Conflicted(Conflict::TooLarge));
    assert_eq!(
        report.committed(),
        119,
        "{:?}",
        report.outcomes.iter().filter(|o| !o.is_committed()).collect::<Vec<_>>()
    );
    let audit = audit::audit(&store).await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.violations);
    assert_eq!(audit.placed_tasks, 119);
}

/// Preempting a task of a gang evicts the whole gang, wherever its tasks run, in the claim's own
/// transaction: the gang is pending again whole, and both nodes' ledgers are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempting_a_gang_evicts_it_whole_in_one_transaction() {
    let (_etcd, store, cache) = setup(2, Resources::new(1000, 8 << 30), &[]).await;
    let mut gang = batch_job("gang", 2, TASK);
    gang.gang = true;
    store.create_job(&gang, 128).await.unwrap();
    let mut high = batch_job("high", 1, TASK);
    high.priority = 100;
    store.create_job(&high, 128).await.unwrap();
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
    let placed = committer(&store, Detection::Fine)
        .commit(&snap, &claims(&snap, "gang", 2, node_name), CommitKind::Gang)
        .await
        .unwrap();
    assert_eq!(placed.committed(), 2);
    let snap = cache.wait_for_revision(placed.max_revision().unwrap(), Duration::from_secs(10)).await.unwrap();
    let victims = vec![snap.tasks.get("gang/0").unwrap().clone(), snap.tasks.get("gang/1").unwrap().clone()];
    let claim = Claim::preempting(snap.tasks.get("high/0").unwrap().clone(), node_name(0), victims);
    let report = committer(&store, Detection::Fine).commit(&snap, &[claim], CommitKind::Incremental).await.unwrap();
    assert!(report.outcomes[0].is_committed(), "{:?}", report.outcomes);
    for id in ["gang/0", "gang/1"] {
        let t = task_in_etcd(&store, id).await;
        assert_eq!(t.state, TaskState::Pending, "{id} left with its gang");
        assert!(t.reason.as_deref().unwrap_or("").contains("preempted"), "{:?}", t.reason);
    }
    let high0 = task_in_etcd(&store, "high/0").await;
    assert_eq!(high0.preempted.len(), 2, "both sides show the preemption");
    let (assignment, _) =
        store.get_json::<Assignment>(&store.keys().assignment(&node_name(0), "high/0")).await.unwrap().unwrap();
    assert_eq!(assignment.after, vec!["gang/0".to_string()], "the agent waits for the victim on its own node");
    let audit = audit::audit(&store).await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.violations);
    assert_eq!(audit.placed_tasks, 1);
    assert_eq!(audit.used, TASK, "node 1's ledger gave the gang's share back too");
}
