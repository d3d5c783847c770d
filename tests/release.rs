//! Releasing tasks: ledger, task and assignment change together; never twice; safe beside racing claims.

use omega::audit;
use omega::cell_state::{CellState, CellStateOptions};
use omega::commit::{Claim, CommitConfig, CommitKind, Committer};
use omega::events::EventKind;
use omega::model::{Allocation, RunInfo, TaskState};
use omega::release::{release, update_task, Release, ReleaseOutcome};
use omega::resources::Resources;
use omega_testkit::*;
use std::time::Duration;

const TASK: Resources = Resources::new(1000, 1 << 30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_task_frees_its_node_once() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 1, Resources::new(4000, 8 << 30)).await;
    store.create_job(&batch_job("a", 3, TASK), 128).await.unwrap();
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    let claims: Vec<Claim> =
        (0..2).map(|i| Claim::new(snap.tasks.get(format!("a/{i}").as_str()).unwrap().clone(), node_name(0))).collect();
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &claims, CommitKind::Incremental)
        .await
        .unwrap();
    let snap = cache.wait_for_revision(report.max_revision().unwrap(), Duration::from_secs(10)).await.unwrap();

    // a/0 runs (a transition that keeps its resources), then succeeds.
    let seen = snap.tasks.get("a/0").unwrap().clone();
    let mut running = (*seen.value).clone();
    running.state = TaskState::Running;
    let rev = update_task(&store, &seen, &running).await.unwrap().expect("task unchanged");
    let snap = cache.wait_for_revision(rev, Duration::from_secs(10)).await.unwrap();
    let run = RunInfo { container: "c0".into(), exit_code: Some(0), ..Default::default() };
    let done = Release {
        task: snap.tasks.get("a/0").unwrap().clone(),
        state: TaskState::Succeeded,
        reason: None,
        run: Some(run),
        event: Some((EventKind::Exited, "code 0".into())),
    };
    // a/2 is still pending: cancelling it only writes its state.
    let cancel = Release {
        task: snap.tasks.get("a/2").unwrap().clone(),
        state: TaskState::Killed,
        reason: Some("cancelled".into()),
        run: None,
        event: Some((EventKind::Stopped, "cancelled".into())),
    };
    let out = release(&store, &[done.clone(), cancel]).await.unwrap();
    assert!(out.iter().all(|o| matches!(o, ReleaseOutcome::Done { .. })), "{out:?}");

    let (ledger, _) = store.get_json::<Allocation>(&store.keys().alloc(&node_name(0))).await.unwrap().unwrap();
    assert_eq!((ledger.used, ledger.tasks), (TASK, 1), "only a/1 holds the node now");
    assert!(store
        .get_json::<serde_json::Value>(&store.keys().assignment(&node_name(0), "a/0"))
        .await
        .unwrap()
        .is_none());
    let (t0, _) = store.get_json::<omega::model::Task>(&store.keys().task("a/0")).await.unwrap().unwrap();
    assert_eq!(t0.state, TaskState::Succeeded);
    assert_eq!(t0.run.as_ref().unwrap().exit_code, Some(0));
    // Each release recorded its event in the same write, on either path (held resources or not).
    let kinds = |t: &omega::model::Task| t.events.iter().map(|e| (e.kind, e.message.clone())).collect::<Vec<_>>();
    assert_eq!(kinds(&t0), [(EventKind::Exited, "code 0".to_string())]);
    let (t2, _) = store.get_json::<omega::model::Task>(&store.keys().task("a/2")).await.unwrap().unwrap();
    assert_eq!(kinds(&t2), [(EventKind::Stopped, "cancelled".to_string())]);
    // The same release again (stale task) does nothing.
    assert_eq!(release(&store, &[done]).await.unwrap(), vec![ReleaseOutcome::TaskChanged]);
    let (again, _) = store.get_json::<Allocation>(&store.keys().alloc(&node_name(0))).await.unwrap().unwrap();
    assert_eq!(again.used, TASK);
    assert!(audit::audit(&store).await.unwrap().is_ok());
    assert!(release(
        &store,
        &[Release { task: seen, state: TaskState::Running, reason: None, run: None, event: None }]
    )
    .await
    .is_err());
}

/// Claims and releases race on the same few nodes; the ledgers stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn releases_racing_claims_keep_ledgers_exact() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 3, Resources::new(1000 * 100, 100 << 30)).await;
    store.create_job(&batch_job("first", 150, TASK), 128).await.unwrap();
    store.create_job(&batch_job("second", 150, TASK), 128).await.unwrap();
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    let first: Vec<Claim> = (0..150)
        .map(|i| Claim::new(snap.tasks.get(format!("first/{i}").as_str()).unwrap().clone(), node_name(i % 3)))
        .collect();
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &first, CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.committed(), 150);
    let snap = cache.wait_for_revision(report.max_revision().unwrap(), Duration::from_secs(10)).await.unwrap();

    // Release all of `first` while `second` is claimed onto the same nodes, in small concurrent pieces.
    let releases: Vec<Release> = (0..150)
        .map(|i| Release {
            task: snap.tasks.get(format!("first/{i}").as_str()).unwrap().clone(),
            state: TaskState::Succeeded,
            reason: None,
            run: None,
            event: None,
        })
        .collect();
    let claims: Vec<Claim> = (0..150)
        .map(|i| Claim::new(snap.tasks.get(format!("second/{i}").as_str()).unwrap().clone(), node_name(i % 3)))
        .collect();
    let mut handles = Vec::new();
    for part in releases.chunks(10) {
        let (store, part) = (store.clone(), part.to_vec());
        handles.push(tokio::spawn(async move { release(&store, &part).await.unwrap() }));
    }
    let committer = std::sync::Arc::new(Committer::new(store.clone(), CommitConfig::default()));
    let mut commits = Vec::new();
    for part in claims.chunks(10) {
        let (committer, part, snap) = (committer.clone(), part.to_vec(), snap.clone());
        commits.push(tokio::spawn(async move {
            let report = committer.commit(&snap, &part, CommitKind::Incremental).await.unwrap();
            (part, report)
        }));
    }
    // Releases that lost every race on a ledger say so (never a wrong outcome) and succeed when re-sent.
    let mut again = Vec::new();
    for (h, part) in handles.into_iter().zip(releases.chunks(10)) {
        for (o, r) in h.await.unwrap().into_iter().zip(part) {
            match o {
                ReleaseOutcome::Done { .. } => {}
                ReleaseOutcome::Contention => again.push(r.clone()),
                ReleaseOutcome::TaskChanged => panic!("{} changed under its own release", r.task.value.id),
                other @ (ReleaseOutcome::NodeAlive | ReleaseOutcome::Unknown) => {
                    panic!("{}: {other:?} from a release on a healthy cell", r.task.value.id)
                }
            }
        }
    }
    if !again.is_empty() {
        let out = release(&store, &again).await.unwrap();
        assert!(out.iter().all(|o| matches!(o, ReleaseOutcome::Done { .. })), "{out:?}");
    }
    let mut placed = 0;
    let mut left: Vec<String> = Vec::new();
    for c in commits {
        let (part, report): (Vec<Claim>, omega::commit::CommitReport) = c.await.unwrap();
        placed += report.committed();
        for (claim, outcome) in part.iter().zip(&report.outcomes) {
            if let omega::commit::ClaimOutcome::Conflicted(why) = outcome {
                assert_eq!(why, &omega::commit::Conflict::Contention, "only lost races, never a wrong refusal");
                left.push(claim.task.value.id.clone());
            }
        }
    }
    // What lost its races is placed again on a fresh snapshot, as a scheduler would.
    for _ in 0..20 {
        if left.is_empty() {
            break;
        }
        let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(10)).await.unwrap();
        let again: Vec<Claim> = left
            .iter()
            .enumerate()
            .map(|(i, id)| Claim::new(snap.tasks.get(id.as_str()).unwrap().clone(), node_name(i % 3)))
            .collect();
        let report = committer.commit(&snap, &again, CommitKind::Incremental).await.unwrap();
        placed += report.committed();
        left = again
            .iter()
            .zip(&report.outcomes)
            .filter(|(_, o)| !o.is_committed())
            .map(|(c, _)| c.task.value.id.clone())
            .collect();
    }
    assert_eq!(placed, 150, "every claim lands once its races are over");
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
    assert_eq!(report.placed_tasks, 150);
    assert_eq!(report.used, Resources::new(150 * 1000, 150 << 30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_start_running_in_few_round_trips() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 4, Resources::new(1000 * 100, 100 << 30)).await;
    store.create_job(&batch_job("many", 300, TASK), 128).await.unwrap();
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    let claims: Vec<Claim> = (0..300)
        .map(|i| Claim::new(snap.tasks.get(format!("many/{i}").as_str()).unwrap().clone(), node_name(i % 4)))
        .collect();
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &claims, CommitKind::Incremental)
        .await
        .unwrap();
    let snap = cache.wait_for_revision(report.max_revision().unwrap(), Duration::from_secs(10)).await.unwrap();
    let mut updates: Vec<_> = (0..300)
        .map(|i| {
            let seen = snap.tasks.get(format!("many/{i}").as_str()).unwrap().clone();
            let mut new = (*seen.value).clone();
            new.state = TaskState::Running;
            (seen, new)
        })
        .collect();
    // One of them is stale: it must be refused alone.
    let (stale, _) = updates[7].clone();
    let mut changed = (*stale.value).clone();
    changed.reason = Some("touched".into());
    omega::release::update_task(&store, &stale, &changed).await.unwrap().unwrap();
    let out = omega::release::update_tasks(&store, &updates).await.unwrap();
    assert_eq!(out.iter().filter(|r| r.is_some()).count(), 299);
    assert!(out[7].is_none());
    updates.truncate(1);
    updates[0].1.state = TaskState::Succeeded;
    assert!(omega::release::update_tasks(&store, &updates).await.is_err(), "leaving a node goes through release()");
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

/// Cancelling a large job: its pending tasks are released many per round trip (each etcd transaction that
/// writes raises the revision by one, so the revision counts the round trips), and its placed tasks leave
/// their nodes in groups per node, within the server's op limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_thousands_of_tasks_takes_few_round_trips() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 10, Resources::new(400_000, 1 << 40)).await;
    store.create_job(&batch_job("big", 2000, TASK), 128).await.unwrap();
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    // 500 of them placed, 50 on each node.
    let claims: Vec<Claim> = (0..500)
        .map(|i| Claim::new(snap.tasks.get(format!("big/{i}").as_str()).unwrap().clone(), node_name(i % 10)))
        .collect();
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &claims, CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.committed(), 500);
    let snap = cache.wait_for_revision(report.max_revision().unwrap(), Duration::from_secs(10)).await.unwrap();
    let releases: Vec<Release> = snap
        .tasks
        .values()
        .map(|t| Release {
            task: t.clone(),
            state: TaskState::Killed,
            reason: Some("cancelled".into()),
            run: None,
            event: None,
        })
        .collect();
    assert_eq!(releases.len(), 2000);
    let before = store.revision().await.unwrap();
    let out = release(&store, &releases).await.unwrap();
    let round_trips = store.revision().await.unwrap() - before;
    assert!(out.iter().all(|o| matches!(o, ReleaseOutcome::Done { .. })), "{:?}", &out[..3]);
    // 1,500 pending tasks at 125 per transaction (12), then the 500 placed ones: one group per node of 101
    // writes (ledger, 50 tasks, 50 assignments), and ten such groups fit one transaction under 128 ops.
    eprintln!("2,000 releases in {round_trips} transactions");
    assert!(round_trips <= 13 + 10, "2,000 releases took {round_trips} transactions");
    let audit = audit::audit(&store).await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.violations);
    assert_eq!(audit.used, Resources::ZERO);
}
