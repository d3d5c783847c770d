//! What the agent's tests do to and check in a cell: place tasks as a scheduler would, wait (bounded polls of
//! a condition), and check that nothing is left holding resources.

#![allow(dead_code)]

use super::daemon::TestDaemon;
use omega::audit;
use omega::cell_state::CellState;
use omega::commit::{Claim, CommitConfig, CommitKind, Committer};
use omega::model::{Allocation, Job, JobKind, Liveness, Task};
use omega::resources::Resources;
use omega::store::Store;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

/// Polls `probe` until it yields a value, failing the test after `secs` seconds.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A one-task batch job running `command` in the busybox image.
pub fn job(id: &str, command: &[&str], cpu: u64, memory: u64) -> Job {
    let mut j = Job::new(id, JobKind::Batch, 1, Resources::new(cpu, memory));
    j.image = super::daemon::IMAGE.into();
    j.command = command.iter().map(|s| s.to_string()).collect();
    j
}

/// Submits `job` and places all its tasks on `node` with the commit protocol, as a scheduler would.
pub async fn submit_and_place(store: &Store, cache: &CellState, job: Job, node: &str) {
    store.create_job(&job, 128).await.expect("create the job");
    let snap = cache.wait_for_revision(store.revision().await.unwrap(), Duration::from_secs(30)).await.unwrap();
    let claims: Vec<Claim> = (0..job.tasks)
        .map(|i| Claim::new(snap.tasks.get(format!("{}/{i}", job.id).as_str()).expect("the task").clone(), node))
        .collect();
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &claims, CommitKind::Incremental)
        .await
        .expect("commit");
    assert_eq!(report.committed(), claims.len(), "{:?}", report.outcomes);
}

pub async fn task(store: &Store, id: &str) -> Task {
    store.get_json::<Task>(&store.keys().task(id)).await.expect("read the task").expect("the task exists").0
}

/// Waits until task `id` satisfies `done`. A failed read (etcd electing a leader, say) is "not yet".
pub async fn wait_task(store: &Store, id: &str, secs: u64, done: impl Fn(&Task) -> bool) -> Task {
    eventually(&format!("task {id}"), secs, || async {
        let t = store.get_json::<Task>(&store.keys().task(id)).await.ok().flatten()?.0;
        done(&t).then_some(t)
    })
    .await
}

/// The node's liveness record, if its key exists (and etcd answers).
pub async fn liveness(store: &Store, node: &str) -> Option<Liveness> {
    store.get_json::<Liveness>(&store.keys().live(node)).await.ok().flatten().map(|(l, _)| l)
}

/// Waits until the agent of `node` has registered and is alive.
pub async fn wait_alive(store: &Store, node: &str, secs: u64) -> Liveness {
    eventually(&format!("node {node} alive"), secs, || liveness(store, node)).await
}

/// How many lines `line` the task's log holds: its runs, for a command that prints one line per run.
pub fn runs_logged(log_dir: &Path, task: &str, line: &str) -> usize {
    let path = omega_agent::agent::log_path(log_dir, task);
    std::fs::read_to_string(path).unwrap_or_default().lines().filter(|l| *l == line).count()
}

/// Waits until the private containerd holds no container at all.
pub async fn wait_no_containers(daemon: &TestDaemon, secs: u64) {
    let client = daemon.client().await;
    eventually("no container left", secs, || async {
        let listed = client.list().await.expect("list containers");
        listed.is_empty().then_some(())
    })
    .await
}

/// Nothing is held on `node`: the audit is clean, its ledger is empty and no assignment names it. (Reads are
/// retried while they fail: a client keeps trying a killed etcd member now and then.)
pub async fn assert_nothing_held(store: &Store, node: &str) {
    let report = eventually("an audit", 60, || async { audit::audit(store).await.ok() }).await;
    assert!(report.is_ok(), "{:#?}", report.violations);
    let ledger = eventually("the ledger", 60, || async {
        store.get_json::<Allocation>(&store.keys().alloc(node)).await.ok().map(|l| l.expect("a ledger").0)
    })
    .await;
    assert_eq!((ledger.used, ledger.tasks), (Resources::ZERO, 0), "the node's ledger still holds: {ledger:?}");
    let assigned = eventually("the assignments", 60, || async {
        store.list(&store.keys().assignments_of(node), 100, None).await.ok().map(|(kvs, _)| kvs)
    })
    .await;
    assert!(assigned.is_empty(), "{} assignments left on {node}", assigned.len());
}
