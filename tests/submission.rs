//! Submitting a job: no reader ever sees a job without all its tasks, a retry completes what a failed attempt
//! left, an out-of-space etcd leaves nothing half-written, and leftovers of dead submissions can be collected.

use etcd_client::{Compare, CompareOp};
use omega::cell_state::{CellState, CellStateOptions};
use omega::etcd_process::EtcdOptions;
use omega::model::{Job, Task, TaskState};
use omega::resources::Resources;
use omega::store::submission::{marker_key, Cleanup, SubmissionMarker};
use omega::store::{encode, Store};
use omega::Error;
use omega_testkit::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TASK: Resources = Resources::new(100, 1 << 20);

fn gang(id: &str, tasks: u32) -> Job {
    let mut job = batch_job(id, tasks, TASK);
    job.gang = true;
    job
}

/// For every revision in `from..=to`: if `job` exists there, all its tasks exist there too.
async fn whole_at_every_revision(store: &Store, job: &Job, from: i64, to: i64) {
    let keys = store.keys();
    for rev in from..=to {
        let (record, _) = store.list(&keys.job(&job.id), 10, Some(rev)).await.expect("read the job at a revision");
        let (tasks, _) = store.list(&keys.tasks_of_job(&job.id), 1000, Some(rev)).await.expect("read its tasks");
        if !record.is_empty() {
            assert_eq!(tasks.len(), job.tasks as usize, "job {} at revision {rev} has only part of its tasks", job.id);
        }
    }
}

async fn tasks_of(store: &Store, job: &str) -> Vec<Task> {
    let (kvs, _) = store.list(&store.keys().tasks_of_job(job), 1000, None).await.unwrap();
    kvs.iter().map(|kv| serde_json::from_slice(kv.value()).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_is_never_seen_in_part() {
    let (_etcd, store) = start_etcd().await;
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    // Every snapshot the cache publishes: any job in it has all its tasks.
    let partial: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut snapshots = cache.subscribe();
    let seen = partial.clone();
    let checker = tokio::spawn(async move {
        while snapshots.changed().await.is_ok() {
            let snap = snapshots.borrow_and_update().clone();
            for job in snap.jobs.values() {
                let present = snap.tasks_of(&job.value).count();
                if present != job.value.tasks as usize {
                    seen.lock().unwrap().push(format!("{} with {present} tasks at {}", job.value.id, snap.revision));
                }
            }
        }
    });

    let before = store.revision().await.unwrap();
    // Fits one transaction at etcd's default limit.
    let one = gang("gang-one", 1000);
    let first = store.create_job(&one, 128).await.unwrap();
    assert_eq!(first, before + 1, "one transaction");
    // Told a limit of 16 operations per transaction: about twenty transactions.
    let parts = gang("gang-parts", 1000);
    let rev = store.create_job(&parts, 16).await.unwrap();
    let after = store.revision().await.unwrap();
    assert!(after - before > 10, "the second job took many transactions ({before}..{after})");

    let snap = cache.wait_for_revision(rev, Duration::from_secs(30)).await.unwrap();
    assert_eq!(snap.tasks_of(&snap.jobs.get("gang-parts").unwrap().value).count(), 1000);
    checker.abort();
    assert!(partial.lock().unwrap().is_empty(), "partial jobs seen: {:?}", partial.lock().unwrap());
    whole_at_every_revision(&store, &one, before + 1, after).await;
    whole_at_every_revision(&store, &parts, before + 1, after).await;
    assert!(store.orphan_tasks().await.unwrap().is_empty());
    assert!(store.get_json::<SubmissionMarker>(&marker_key(store.keys(), "gang-parts")).await.unwrap().is_none());
}

/// Leaves what a submission that died half way leaves: some tasks (of another spec, with an index the new
/// job does not have) and its marker.
async fn leave_a_dead_attempt(store: &Store, id: &str, started_ms: u64) {
    let keys = store.keys();
    let old = batch_job(id, 500, Resources::new(999, 999));
    let mut kv = store.client().kv_client();
    for index in [0, 7, 499] {
        let task = Task::pending(&old, index);
        kv.put(keys.task(&task.id), encode(id, &task).unwrap(), None).await.unwrap();
    }
    let marker = SubmissionMarker { job: id.into(), token: "dead".into(), tasks: 500, started_ms };
    kv.put(marker_key(keys, id), encode(id, &marker).unwrap(), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_replaces_what_a_dead_attempt_left_and_completes() {
    let (_etcd, store) = start_etcd().await;
    for (id, max_ops) in [("small", 128), ("large", 16)] {
        leave_a_dead_attempt(&store, id, omega::model::now_ms()).await;
        let orphans = store.orphan_tasks().await.unwrap();
        let orphan = orphans.iter().find(|o| o.job == id).expect("listed as orphan");
        assert_eq!((orphan.tasks, orphan.marker.as_ref().map(|m| m.token.as_str())), (3, Some("dead")));

        let job = batch_job(id, 300, TASK);
        store.create_job(&job, max_ops).await.unwrap();
        let tasks = tasks_of(&store, id).await;
        assert_eq!(tasks.len(), 300, "{id}: exactly the new job's tasks");
        assert!(tasks.iter().all(|t| t.resources == TASK && t.index < 300 && t.state == TaskState::Pending));
        assert!(store.get_json::<SubmissionMarker>(&marker_key(store.keys(), id)).await.unwrap().is_none());
        let err = store.create_job(&job, max_ops).await.expect_err("the id is taken now");
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    }
    assert!(store.orphan_tasks().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_collected_only_when_old_and_unchanged() {
    let (_etcd, store) = start_etcd().await;
    leave_a_dead_attempt(&store, "dead", omega::model::now_ms()).await;
    store.create_job(&batch_job("alive", 3, TASK), 128).await.unwrap();

    let hour = Duration::from_secs(3600);
    assert_eq!(store.delete_orphan_tasks("dead", hour, None).await.unwrap(), None, "younger than the grace");
    // A failing fence keeps everything.
    let fence = Compare::create_revision("/no-such-leader-key", CompareOp::Greater, 0);
    assert_eq!(store.delete_orphan_tasks("dead", Duration::ZERO, Some(fence)).await.unwrap(), None);
    assert_eq!(store.delete_orphan_tasks("dead", Duration::ZERO, None).await.unwrap(), Some(3));
    assert!(tasks_of(&store, "dead").await.is_empty());
    assert!(store.orphan_tasks().await.unwrap().is_empty());
    // A job with its record is never an orphan.
    assert_eq!(store.delete_orphan_tasks("alive", Duration::ZERO, None).await.unwrap(), None);
    assert_eq!(tasks_of(&store, "alive").await.len(), 3);
    // Tasks without a marker count their age from their own updates.
    let stray = Task::pending(&batch_job("stray", 1, TASK), 0);
    let key = store.keys().task(&stray.id);
    store.client().kv_client().put(key.as_str(), encode(&key, &stray).unwrap(), None).await.unwrap();
    assert_eq!(store.delete_orphan_tasks("stray", hour, None).await.unwrap(), None);
    assert_eq!(store.delete_orphan_tasks("stray", Duration::ZERO, None).await.unwrap(), Some(1));
}

/// Writes values until etcd refuses even a small one for lack of space (a large one is refused while
/// smaller ones still fit, so the values shrink as it fills).
pub async fn fill_until_no_space(store: &Store) {
    let mut kv = store.client().kv_client();
    let mut i = 0;
    for size in [256 << 10, 16 << 10, 1 << 10, 16] {
        loop {
            i += 1;
            assert!(i < 2000, "etcd never ran out of space");
            match kv.put(format!("/filler/{i}"), vec![b'x'; size], None).await.map_err(Error::from) {
                Ok(_) => {}
                Err(e) if e.is_no_space() => break,
                Err(e) => panic!("filling etcd: {e}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_space_leaves_nothing_half_written() {
    let (_etcd, store) =
        start_etcd_with(EtcdOptions { quota_backend_bytes: Some(8 << 20), ..Default::default() }).await;
    fill_until_no_space(&store).await;
    for (id, max_ops) in [("one", 128), ("parts", 16)] {
        let err = store.submit_job(&batch_job(id, 300, TASK), max_ops).await.expect_err("etcd is full");
        assert!(err.error.is_no_space(), "{err}");
        assert!(matches!(err.cleanup, Cleanup::NothingWritten | Cleanup::Removed { .. }), "{err}");
        assert!(store.get_json::<Job>(&store.keys().job(id)).await.unwrap().is_none());
        assert!(tasks_of(&store, id).await.is_empty(), "{id}: no task left behind");
    }
    assert!(store.orphan_tasks().await.unwrap().is_empty());
}
