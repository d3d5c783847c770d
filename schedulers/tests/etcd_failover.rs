//! A three-member etcd on loopback loses its leader during a stream of submissions; every component rides it
//! out: every job submitted is run to completion and the cell's invariants hold.

use omega::audit;
use omega::etcd_process::{EtcdCluster, EtcdOptions};
use omega::keys::Keys;
use omega::model::{Job, JobKind, JobState};
use omega::resources::Resources;
use omega::store::Store;
use omega::Error;
use omega_testkit::procs::Proc;
use std::time::{Duration, Instant};

/// Submits a job, retrying through the election: a retry that finds the job already there means an earlier
/// attempt was applied but its answer lost.
async fn submit(store: &Store, job: &Job) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.create_job(job, 128).await {
            Ok(_) | Err(Error::AlreadyExists(_)) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "submitting {} kept failing: {e}", job.id);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cell_rides_out_the_loss_of_its_etcd_leader() {
    omega_testkit::init_tracing();
    let mut cluster = EtcdCluster::start(3, EtcdOptions::default()).await.expect("three etcd members");
    let endpoints = cluster.endpoints().join(",");
    let store =
        Store::connect_with_retry(&cluster.endpoints(), Keys::default(), Duration::from_secs(10)).await.unwrap();
    let _host = Proc::start(
        "omega-agent",
        &["--etcd", &endpoints, "--simulate", "6", "--lease-ttl", "15s"],
        "failover-omega-agent",
    );
    let _batch = Proc::start(
        "omega-scheduler",
        &["--etcd", &endpoints, "--kind", "batch", "--instance", "batch-1"],
        "failover-omega-scheduler",
    );
    let _ctl = Proc::start(
        "omega-controller",
        &["--etcd", &endpoints, "--instance", "ctl-1", "--lease-ttl", "3s"],
        "failover-omega-controller",
    );

    let total = 30;
    let mut killed = None;
    for i in 0..total {
        let mut job = Job::new(&format!("stream-{i:02}"), JobKind::Batch, 2, Resources::new(500, 1 << 28));
        job.duration_ms = Some(300);
        submit(&store, &job).await;
        if i == 10 {
            let leader = cluster.leader().await.expect("a leader");
            eprintln!("killing etcd leader m{leader}");
            cluster.members[leader].kill();
            killed = Some((leader, Instant::now()));
        }
        if i == 20 {
            let (leader, at) = killed.expect("killed at 10");
            cluster.members[leader].restart().await.expect("restart the old leader");
            eprintln!("old leader m{leader} back after {:?}", at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    // Every submitted job runs to completion.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (kvs, _) = store.list(&store.keys().jobs_prefix(), 100, None).await.unwrap();
        let jobs: Vec<Job> = kvs.iter().map(|kv| serde_json::from_slice(kv.value()).unwrap()).collect();
        let done = jobs.iter().filter(|j| j.state == JobState::Succeeded).count();
        if jobs.len() == total && done == total {
            break;
        }
        assert!(Instant::now() < deadline, "{done} of {} jobs succeeded ({total} submitted)", jobs.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
    assert_eq!(report.tasks, total * 2);
    assert_eq!(report.used, Resources::ZERO, "every finished task released its node");
}
