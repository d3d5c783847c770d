//! Schedulers at the edges, as real processes on a real etcd: racing rounds that learn from their own
//! commits, a gang too large for any transaction, a scheduler frozen past its lease, etcd paused past it.

mod support;

use omega::audit;
use omega::model::{Job, JobKind, JobStatus, SchedulerInstance, Task, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::metrics::{metric, metric_where, scrape};
use omega_testkit::procs::Proc;
use omega_testkit::*;
use std::time::Duration;
use support::{all_placed, metrics_addr, scheduler_process, scrape_when_up, tasks};

const TASK: Resources = Resources::new(100, 64 << 20);

fn scheduler(etcd: &str, name: &str, instance: &str, metrics: &str, extra: &[&str]) -> Proc {
    scheduler_process("batch", etcd, name, instance, metrics, extra, &[])
}

fn job_for(id: &str, scheduler: &str, tasks: u32) -> Job {
    let mut job = Job::new(id, JobKind::Batch, tasks, TASK);
    job.scheduler = scheduler.into();
    job
}

/// Two schedulers race for the same few nodes with stale snapshots (coarse detection, think time), so their
/// attempts take several rounds; each round decides on what the earlier ones learned, and no claim ever
/// conflicts with the scheduler's own earlier commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_decide_on_what_earlier_rounds_committed() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    seed_nodes(&store, 6, Resources::new(16_000, 64 << 30)).await;
    let (ma, mb) = (metrics_addr(), metrics_addr());
    let racing = ["--detection", "coarse", "--t-job", "30ms", "--conflict-retries", "8", "--batch-claims", "40"];
    let _a = scheduler(&ep, "a", "a-1", &ma, &racing);
    let _b = scheduler(&ep, "b", "b-1", &mb, &racing);
    scrape_when_up(&ma).await;
    scrape_when_up(&mb).await;
    for i in 0..40 {
        store.create_job(&job_for(&format!("a{i}"), "a", 10), 128).await.unwrap();
        store.create_job(&job_for(&format!("b{i}"), "b", 10), 128).await.unwrap();
    }
    for i in 0..40 {
        for side in ["a", "b"] {
            let id = format!("{side}{i}");
            wait_for(&format!("{id} placed"), 120, async || all_placed(&store, &id, 10).await).await;
        }
    }
    let (mut conflicts, mut rounds, mut own) = (0.0, 0.0, 0.0);
    for addr in [&ma, &mb] {
        let text = scrape(addr).await;
        conflicts += metric(&text, "omega_scheduler_conflicts_total");
        rounds += metric(&text, "omega_scheduler_replacement_rounds_total");
        own += metric(&text, "omega_scheduler_self_conflicts_total");
    }
    eprintln!("conflicted claims {conflicts}, re-placement rounds {rounds}, self-conflicts {own}");
    assert!(conflicts > 0.0 && rounds > 0.0, "the race produced conflicts and re-placement rounds");
    assert_eq!(own, 0.0, "no round compared against a ledger older than the scheduler's own write");
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.violations);
    assert_eq!(report.placed_tasks, 800);
}

/// A gang needing more operations than one etcd transaction takes can never commit: it stays pending with
/// a reason that says so (not "lost placement races"), and is not retried while nothing about it changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_too_large_for_the_server_stays_pending_with_a_permanent_reason() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    seed_nodes(&store, 10, Resources::new(64_000, 256 << 30)).await;
    let m = metrics_addr();
    let _s = scheduler(&ep, "batch", "batch-1", &m, &[]);
    let mut gang = job_for("huge", "batch", 200);
    gang.gang = true;
    store.create_job(&gang, 128).await.unwrap();
    let status = wait_for("a permanent reason", 60, async || {
        let (s, _) = store.get_json::<JobStatus>(&store.keys().status("huge")).await.ok()??;
        s.reasons.contains_key("too_large").then_some(s)
    })
    .await;
    eprintln!("status: {}", status.reason);
    assert!(status.reason.contains("max-txn-ops"), "{}", status.reason);
    assert_eq!(status.pending, 200);
    // The scheduler goes on with other work, and does not try the gang again.
    store.create_job(&job_for("small", "batch", 3), 128).await.unwrap();
    wait_for("small placed", 60, async || all_placed(&store, "small", 3).await).await;
    let again = store.get_json::<JobStatus>(&store.keys().status("huge")).await.unwrap().unwrap().0;
    assert_eq!(again.attempts, status.attempts, "not retried");
    assert!(tasks(&store, "huge").await.iter().all(|t| t.state == TaskState::Pending));
}

/// A scheduler frozen in the middle of an attempt (SIGSTOP) past its lease TTL loses its jobs; resumed, the
/// claims it had decided are refused by the ownership fence, and the job is placed only under its new
/// ownership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_scheduler_resumed_after_its_lease_commits_nothing() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    seed_nodes(&store, 2, Resources::new(16_000, 64 << 30)).await;
    let dir = tempfile::tempdir().unwrap();
    let m = metrics_addr();
    let env =
        [("OMEGA_FAILPOINTS", "scheduler.before_commit=pause"), ("OMEGA_FAILPOINT_DIR", dir.path().to_str().unwrap())];
    let s = scheduler_process("batch", &ep, "batch", "frozen", &m, &[], &env);
    store.create_job(&job_for("j", "batch", 4), 128).await.unwrap();
    let marker = dir.path().join("scheduler.before_commit");
    wait_for("the scheduler to reach its commit", 60, async || marker.exists().then_some(())).await;
    let owner_key = store.keys().owner("j");
    let (_, owned_at) = store.get_json::<omega::model::JobOwner>(&owner_key).await.unwrap().expect("it owns j");

    s.signal("-STOP");
    let instance_key = store.keys().scheduler("batch", "frozen");
    wait_for("its lease to lapse", 30, async || {
        let owner = store.get_json::<omega::model::JobOwner>(&owner_key).await.ok()?;
        let instance = store.get_json::<SchedulerInstance>(&instance_key).await.ok()?;
        (owner.is_none() && instance.is_none()).then_some(())
    })
    .await;
    s.signal("-CONT");
    std::fs::remove_file(&marker).unwrap();

    let placed = wait_for("j placed under a new ownership", 60, async || all_placed(&store, "j", 4).await).await;
    let text = scrape(&m).await;
    let refused = metric_where(&text, "omega_scheduler_conflicts_total", "reason=\"not_owner\"");
    assert_eq!(refused, 4.0, "the frozen attempt's 4 claims were refused by the ownership fence");
    for t in &placed {
        let (_, revision) = store.get_json::<Task>(&store.keys().task(&t.id)).await.unwrap().unwrap();
        assert!(revision > owned_at, "{} was placed after the old ownership", t.id);
    }
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

/// etcd paused (SIGSTOP) for longer than the scheduler's lease TTL revokes the lease when it resumes; the
/// scheduler registers again under a new lease and goes on placing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_comes_back_after_etcd_is_paused_past_its_lease() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    seed_nodes(&store, 2, Resources::new(16_000, 64 << 30)).await;
    let _s = scheduler(&ep, "batch", "batch-1", &metrics_addr(), &[]);
    let key = store.keys().scheduler("batch", "batch-1");
    let lease_of = async |store: &Store| -> Option<i64> {
        let resp = store.client().kv_client().get(key.as_str(), None).await.ok()?;
        resp.kvs().first().map(|kv| kv.lease())
    };
    let first = wait_for("the instance registered", 30, async || lease_of(&store).await).await;

    etcd.pause().unwrap();
    // The pause itself is the fault: longer than the 2 s TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    etcd.resume().unwrap();

    let second = wait_for("the instance registered again under a new lease", 60, async || {
        lease_of(&store).await.filter(|l| *l != first)
    })
    .await;
    assert_ne!(first, second);
    store.create_job(&job_for("after", "batch", 3), 128).await.unwrap();
    wait_for("a job placed after the pause", 60, async || all_placed(&store, "after", 3).await).await;
}

/// A scheduler keeps state only for the jobs it owns: once a job's ownership passes to another instance, the
/// first forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_of_jobs_owned_elsewhere_is_forgotten() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    seed_nodes(&store, 1, Resources::new(1000, 4 << 30)).await;
    let (ma, mb) = (metrics_addr(), metrics_addr());
    let a = scheduler(&ep, "batch", "a", &ma, &[]);
    scrape_when_up(&ma).await;
    // Too large for the cell: stays pending, owned by `a`, with state kept for it.
    let mut big = job_for("big", "batch", 1);
    big.resources = Resources::new(4000, 1 << 30);
    store.create_job(&big, 128).await.unwrap();
    wait_for("a tracks big", 30, async || {
        (metric(&scrape(&ma).await, "omega_scheduler_tracked_jobs") == 1.0).then_some(())
    })
    .await;
    let _b = scheduler(&ep, "batch", "b", &mb, &[]);
    scrape_when_up(&mb).await;
    // `a` freezes past its lease; `b` takes the job over.
    a.signal("-STOP");
    wait_for("b owns big", 30, async || {
        let (owner, _) = store.get_json::<omega::model::JobOwner>(&store.keys().owner("big")).await.ok()??;
        (owner.instance == "b").then_some(())
    })
    .await;
    a.signal("-CONT");
    wait_for("a forgot big", 30, async || {
        (metric(&scrape(&ma).await, "omega_scheduler_tracked_jobs") == 0.0).then_some(())
    })
    .await;
    wait_for("b tracks big", 30, async || {
        (metric(&scrape(&mb).await, "omega_scheduler_tracked_jobs") == 1.0).then_some(())
    })
    .await;
}
