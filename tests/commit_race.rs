//! Many committers with stale caches fight over a few nodes; afterwards nothing is double-booked.
//!
//! Eight committers, each with its own cell-state cache fed by its own watch, repeatedly pick pending tasks
//! and nodes that look free in their (deliberately stale) snapshot and commit them. Their task choices overlap
//! and the nodes are few, so claims collide on nodes and on tasks. Afterwards, on a real etcd:
//! - the audit finds no violation (no node over capacity, ledgers match tasks, every placed task on one node);
//! - every claim was reported committed or conflicted, and each committed claim is in etcd exactly once;
//! - the committers' conflict counts add up to what they attempted.

use omega::audit;
use omega::cell_state::{CellState, CellStateOptions};
use omega::commit::{Claim, ClaimOutcome, CommitConfig, CommitKind, Committer, Conflict, Detection};
use omega::model::{Task, TaskState};
use omega::resources::Resources;
use omega_testkit::*;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const COMMITTERS: usize = 8;
const NODES: usize = 8;
const TASK_CPU: u64 = 250;
const TASK_MEM: u64 = 512 << 20;
/// Tasks that fit on one node (cpu and memory both run out together).
const SLOTS_PER_NODE: u64 = 256;
const NODE_CAPACITY: Resources = Resources::new(SLOTS_PER_NODE * TASK_CPU, SLOTS_PER_NODE * TASK_MEM);
const JOBS: u32 = 10;
const TASKS_PER_JOB: u32 = 250;

/// What one committer did.
#[derive(Default)]
struct Tally {
    attempted: usize,
    committed: Vec<(String, String, i64)>,
    conflicts: BTreeMap<String, usize>,
    /// Gang mode: per gang, how many of its claims committed and how many it had.
    gangs: Vec<(usize, usize)>,
}

async fn race(detection: Detection, kind: CommitKind) {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, NODES, NODE_CAPACITY).await;
    for j in 0..JOBS {
        store
            .create_job(&batch_job(&format!("job-{j}"), TASKS_PER_JOB, Resources::new(TASK_CPU, TASK_MEM)), 128)
            .await
            .expect("create job");
    }
    let total_tasks = (JOBS * TASKS_PER_JOB) as usize;
    let slots = NODES * SLOTS_PER_NODE as usize;
    assert!(total_tasks > slots, "more work than room, so the cell fills and conflicts on room happen");

    let mut handles = Vec::new();
    for c in 0..COMMITTERS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let cache = CellState::start(store.clone(), CellStateOptions::default()).await.expect("start cache");
            let committer = Committer::new(
                store,
                CommitConfig { detection, placed_by: format!("committer-{c}"), ..Default::default() },
            );
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64 * 7919 + 1);
            let mut tally = Tally::default();
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut idle_rounds = 0;
            for _ in 0..2000 {
                if Instant::now() > deadline || idle_rounds > 20 {
                    break;
                }
                // Decide several batches on one snapshot: the snapshot goes stale while we commit, as a
                // scheduler's does while it thinks.
                let snapshot = cache.snapshot();
                let mut pending: Vec<Arc<Task>> = snapshot
                    .tasks
                    .values()
                    .filter(|t| t.value.state == TaskState::Pending)
                    .map(|t| t.value.clone())
                    .collect();
                pending.sort_by(|a, b| a.id.cmp(&b.id));
                pending.shuffle(&mut rng);
                let mut free: HashMap<String, Resources> = snapshot
                    .allocations
                    .iter()
                    .filter(|(n, _)| snapshot.is_schedulable(n))
                    .map(|(n, a)| (n.to_string(), a.value.free()))
                    .collect();
                let mut proposed_any = false;
                for _batch in 0..3 {
                    let size =
                        if kind == CommitKind::Gang { rng.random_range(2..=8) } else { rng.random_range(1..=48) };
                    let mut claims = Vec::new();
                    while claims.len() < size {
                        let Some(task) = pending.pop() else { break };
                        let mut nodes: Vec<&String> = free
                            .iter()
                            .filter(|(_, f)| Resources::fit(**f, Resources::ZERO, task.resources).is_ok())
                            .map(|(n, _)| n)
                            .collect();
                        nodes.sort();
                        let Some(node) = nodes.choose(&mut rng).map(|n| (*n).clone()) else { break };
                        let f = free.get_mut(&node).expect("node in free map");
                        *f = f.saturating_sub(task.resources);
                        let seen = snapshot.tasks.get(task.id.as_str()).expect("task in snapshot").clone();
                        claims.push(Claim::new(seen, node));
                    }
                    if claims.is_empty() {
                        break;
                    }
                    proposed_any = true;
                    let report = committer.commit(&snapshot, &claims, kind).await.expect("commit");
                    assert_eq!(report.outcomes.len(), claims.len(), "one outcome per claim");
                    tally.attempted += claims.len();
                    let mut committed_here = 0;
                    for (claim, outcome) in claims.iter().zip(&report.outcomes) {
                        match outcome {
                            ClaimOutcome::Committed { revision } => {
                                committed_here += 1;
                                tally.committed.push((claim.task.value.id.clone(), claim.node.clone(), *revision));
                            }
                            ClaimOutcome::Conflicted(why) => {
                                assert_ne!(*why, Conflict::Unknown, "no transport failure expected here");
                                *tally.conflicts.entry(omega::commit::conflict_label(*why)).or_default() += 1;
                            }
                        }
                    }
                    if kind == CommitKind::Gang {
                        tally.gangs.push((committed_here, claims.len()));
                    }
                }
                if proposed_any {
                    idle_rounds = 0;
                } else {
                    idle_rounds += 1;
                    // Nothing fits in our view: wait for news before looking again.
                    let mut rx = cache.subscribe();
                    let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
                }
            }
            // The process-wide counters agree with the per-claim outcomes.
            let stats = committer.stats();
            let conflicted: usize = tally.conflicts.values().sum();
            assert_eq!(stats.claims.load(Ordering::Relaxed) as usize, tally.attempted);
            assert_eq!(stats.committed.load(Ordering::Relaxed) as usize, tally.committed.len());
            assert_eq!(stats.conflicted.load(Ordering::Relaxed) as usize, conflicted);
            let by_reason: BTreeMap<String, usize> =
                stats.conflicts_by_reason().into_iter().map(|(k, v)| (k, v as usize)).collect();
            assert_eq!(by_reason, tally.conflicts);
            tally
        }));
    }

    let mut tallies = Vec::new();
    for h in handles {
        tallies.push(h.await.expect("committer task"));
    }

    let report = audit::audit(&store).await.expect("audit");
    assert!(report.is_ok(), "audit violations: {:#?}", report.violations);

    // Every committed claim is in etcd, once; nothing is placed that no committer was told it committed.
    let attempted: usize = tallies.iter().map(|t| t.attempted).sum();
    let committed: Vec<&(String, String, i64)> = tallies.iter().flat_map(|t| &t.committed).collect();
    let conflicted: usize = tallies.iter().map(|t| t.conflicts.values().sum::<usize>()).sum();
    assert_eq!(attempted, committed.len() + conflicted, "every claim is committed or conflicted");
    let mut ids = HashSet::new();
    for (task, _, _) in &committed {
        assert!(ids.insert(task.clone()), "task {task} reported committed twice");
    }
    assert_eq!(report.placed_tasks, committed.len(), "etcd holds exactly the committed claims");
    let (kvs, _) = store.list(&store.keys().tasks_prefix(), 1000, None).await.expect("list tasks");
    let placed: HashMap<String, String> = kvs
        .iter()
        .map(|kv| serde_json::from_slice::<Task>(kv.value()).expect("task json"))
        .filter(|t| t.state == TaskState::Assigned)
        .map(|t| (t.id.clone(), t.node.clone().expect("assigned task has a node")))
        .collect();
    for (task, node, _) in &committed {
        assert_eq!(placed.get(task), Some(node), "committed claim {task} -> {node} is what etcd holds");
    }
    // The cell filled up: optimistic concurrency did not leave room unused for lack of retries.
    assert_eq!(committed.len(), slots, "every slot ends up used");
    assert!(conflicted > 0, "the committers really raced");
    assert!(attempted >= 2000, "thousands of claims were attempted (got {attempted})");
    if kind == CommitKind::Gang {
        for t in &tallies {
            for (ok, of) in &t.gangs {
                assert!(*ok == 0 || ok == of, "a gang is whole or absent ({ok} of {of} committed)");
            }
        }
    }
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tallies {
        for (k, v) in &t.conflicts {
            *reasons.entry(k.clone()).or_default() += v;
        }
    }
    eprintln!(
        "{detection:?}/{kind:?}: {attempted} claims, {} committed, {conflicted} conflicted {reasons:?}",
        committed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_coarse_incremental() {
    race(Detection::Coarse, CommitKind::Incremental).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_fine_incremental() {
    race(Detection::Fine, CommitKind::Incremental).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_coarse_gang() {
    race(Detection::Coarse, CommitKind::Gang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_fine_gang() {
    race(Detection::Fine, CommitKind::Gang).await;
}
