//! What a scheduler counts for the Omega paper's metrics, as a real process on a real etcd: its transactions
//! (attempts that sent a claim) and each job's wait from submission to its first attempt, in its published
//! record and in its Prometheus metrics.

mod support;

use omega::model::{now_ms, Job, JobKind, SchedulerStats};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::metrics::{metric, metric_where, scrape};
use omega_testkit::procs::Proc;
use omega_testkit::*;
use support::{all_placed, instance_record, metrics_addr, scheduler_process, scrape_when_up};

const CPU: u64 = 1000;
const MEM: u64 = 1 << 30;
/// How long before the test the jobs say they were submitted: every wait counted is at least this long.
const SUBMITTED_AGO_MS: u64 = 100_000;

/// A batch job submitted (by its record) [`SUBMITTED_AGO_MS`] ago.
fn job_submitted_earlier(id: &str, tasks: u32, resources: Resources) -> Job {
    Job { submitted_at_ms: now_ms() - SUBMITTED_AGO_MS, ..Job::new(id, JobKind::Batch, tasks, resources) }
}

/// Three 4-core nodes and a batch scheduler `batch/b-1` serving its metrics (the address returned).
async fn cell_with_a_batch_scheduler() -> (omega::etcd_process::EtcdProcess, Store, Proc, String) {
    let (etcd, store) = start_etcd().await;
    seed_nodes(&store, 3, Resources::new(4 * CPU, 16 * MEM)).await;
    let m = metrics_addr();
    let scheduler = scheduler_process("batch", &etcd.endpoint(), "batch", "b-1", &m, &[], &[]);
    scrape_when_up(&m).await;
    (etcd, store, scheduler, m)
}

/// The counters the instance published last, once `ready` holds for them.
async fn published(store: &Store, what: &str, ready: impl Fn(&SchedulerStats) -> bool) -> SchedulerStats {
    wait_for(what, 60, async || {
        let (record, _) = instance_record(store, "batch", "b-1").await?;
        ready(&record.stats).then_some(record.stats)
    })
    .await
}

/// A job that fits nowhere is attempted again and again, but sends no claim: attempts, no transaction. A job
/// placed in one attempt is one transaction. Conflicted transactions stay among the transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplaceable_jobs_attempts_are_attempts_but_not_transactions() {
    let (_etcd, store, _scheduler, m) = cell_with_a_batch_scheduler().await;

    store.create_job(&Job::new("huge", JobKind::Batch, 1, Resources::new(64 * CPU, MEM)), 128).await.unwrap();
    let before = published(&store, "two attempts at the unplaceable job", |s| s.attempts >= 2).await;
    assert_eq!((before.transactions, before.claims, before.attempts_conflicted), (0, 0, 0), "{before:?}");

    store.create_job(&Job::new("small", JobKind::Batch, 3, Resources::new(CPU, MEM)), 128).await.unwrap();
    wait_for("small placed", 60, async || all_placed(&store, "small", 3).await).await;
    let after = published(&store, "the placement published", |s| s.placed == 3).await;
    assert_eq!(after.transactions, 1, "small was placed in one transaction: {after:?}");
    assert!(after.attempts > after.transactions, "the unplaceable job's attempts count as attempts: {after:?}");
    assert_eq!(after.attempts_conflicted, 0, "alone in the cell: {after:?}");
    assert_eq!(after.conflict_fraction(), Some(0.0));

    let text = scrape(&m).await;
    assert_eq!(metric(&text, "omega_scheduler_transactions_total"), 1.0, "{text}");
    assert!(metric(&text, "omega_scheduler_attempts_total") > 1.0, "{text}");
}

/// Each job's wait from submission to the first attempt is counted once (whatever the attempts after), in a
/// histogram whose buckets reach minutes while the other histograms keep theirs, and in the published
/// counters (sum and count, for the mean).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_till_the_first_attempt_is_counted_once_per_job() {
    let (_etcd, store, _scheduler, m) = cell_with_a_batch_scheduler().await;

    store.create_job(&job_submitted_earlier("huge", 1, Resources::new(64 * CPU, MEM)), 128).await.unwrap();
    store.create_job(&job_submitted_earlier("small", 3, Resources::new(CPU, MEM)), 128).await.unwrap();
    wait_for("small placed", 60, async || all_placed(&store, "small", 3).await).await;
    let first = published(&store, "both jobs attempted", |s| s.first_attempts == 2 && s.placed == 3).await;
    // The unplaceable job goes on being attempted; its first attempt stays the only one counted.
    let later = published(&store, "more attempts at the unplaceable job", |s| s.attempts >= first.attempts + 2).await;
    assert_eq!(later.first_attempts, 2, "once per job, not per attempt: {later:?}");
    assert_eq!(later.first_attempt_wait_ms_sum, first.first_attempt_wait_ms_sum);
    assert!(
        later.first_attempt_wait_ms_sum >= 2 * SUBMITTED_AGO_MS,
        "measured from the job's submission time: {later:?}"
    );

    let text = scrape(&m).await;
    let wait = "omega_scheduler_job_wait_first_attempt_seconds";
    assert_eq!(metric(&text, &format!("{wait}_count")), 2.0, "{text}");
    let bucket = |le: &str| metric_where(&text, &format!("{wait}_bucket"), &format!("le=\"{le}\""));
    assert_eq!(bucket("60"), 0.0, "both waited longer than a minute: {text}");
    assert_eq!(bucket("600"), 2.0, "the buckets reach ten minutes: {text}");
    let decision_buckets = |le: &str| {
        text.lines()
            .any(|l| l.starts_with("omega_scheduler_decision_seconds_bucket") && l.contains(&format!("le=\"{le}\"")))
    };
    assert!(decision_buckets("0.0005") && !decision_buckets("600"), "the other histograms keep their buckets");
}

/// A backlog is shared by the instances of a scheduler even when one starts first: an instance owns only about
/// two attempts' worth of work (`--batch-claims` tasks each), so those that start later find jobs to take.
/// (Before, the first instance saw no peers, preferred every job, claimed all of them and placed them alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_shared_by_instances_that_start_later() {
    let (etcd, store) = start_etcd().await;
    seed_nodes(&store, 4, Resources::new(64 * CPU, 64 * MEM)).await;
    let jobs = 24;
    for i in 0..jobs {
        store
            .create_job(&Job::new(&format!("backlog-{i:02}"), JobKind::Batch, 4, Resources::new(CPU, MEM)), 128)
            .await
            .unwrap();
    }
    // One job per attempt, each attempt at least 200 ms: the backlog takes the first instance seconds alone.
    let slow = ["--batch-claims", "4", "--t-job", "200ms"];
    let first = metrics_addr();
    let _b1 = scheduler_process("batch", &etcd.endpoint(), "batch", "b-1", &first, &slow, &[]);
    wait_for("the first instance placing", 60, async || {
        let (record, _) = instance_record(&store, "batch", "b-1").await?;
        (record.stats.placed > 0).then_some(())
    })
    .await;
    let (m2, m3) = (metrics_addr(), metrics_addr());
    let _b2 = scheduler_process("batch", &etcd.endpoint(), "batch", "b-2", &m2, &slow, &[]);
    let _b3 = scheduler_process("batch", &etcd.endpoint(), "batch", "b-3", &m3, &slow, &[]);
    for i in 0..jobs {
        let job = format!("backlog-{i:02}");
        wait_for("every backlog job placed", 120, async || all_placed(&store, &job, 4).await).await;
    }
    let mut placed_by = std::collections::BTreeMap::new();
    for i in 0..jobs {
        for t in support::tasks(&store, &format!("backlog-{i:02}")).await {
            *placed_by.entry(t.placed_by.unwrap_or_default()).or_insert(0) += 1;
        }
    }
    assert_eq!(placed_by.values().sum::<u32>(), jobs * 4);
    for instance in ["batch/b-1", "batch/b-2", "batch/b-3"] {
        assert!(placed_by.get(instance).copied().unwrap_or(0) > 0, "{instance} placed nothing: {placed_by:?}");
    }
}
