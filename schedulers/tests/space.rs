//! A cell whose etcd runs out of space says so (omctl, a scheduler, an agent), stops adding to it, and
//! resumes by itself once an operator has compacted, defragmented and disarmed the alarm; nothing is lost.

mod support;

use omega::audit;
use omega::etcd_process::EtcdOptions;
use omega::model::{Job, JobKind, JobState, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::metrics::{metric, scrape};
use omega_testkit::procs::{bin, Proc};
use omega_testkit::*;
use support::{metrics_addr, scrape_when_up, tasks};

const TASK: Resources = Resources::new(1000, 1 << 30);

fn job(id: &str, tasks: u32, duration_ms: u64) -> Job {
    let mut j = Job::new(id, JobKind::Batch, tasks, TASK);
    j.duration_ms = Some(duration_ms);
    j
}

fn omctl(etcd: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("omctl")).arg("--etcd").arg(etcd).args(args).output().expect("run omctl")
}

async fn all_succeeded(store: &Store, id: &str, n: usize) -> Option<()> {
    let ts = tasks(store, id).await;
    let job = store.get_json::<Job>(&store.keys().job(id)).await.ok()??.0;
    (ts.len() == n && ts.iter().all(|t| t.state == TaskState::Succeeded) && job.state == JobState::Succeeded)
        .then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_etcd_is_said_by_every_component_and_the_cell_resumes_once_space_is_freed() {
    let (etcd, store) = start_etcd_with(EtcdOptions { quota_backend_bytes: Some(8 << 20), ..Default::default() }).await;
    let ep = etcd.endpoint();
    let metrics = metrics_addr();
    let args =
        ["--etcd", &ep, "--kind", "batch", "--instance", "b-1", "--lease-ttl", "30s", "--metrics-addr", &metrics];
    let scheduler = Proc::start("omega-scheduler", &args, "space-scheduler");
    let agent_metrics = metrics_addr();
    let host = Proc::start(
        "omega-agent",
        &[
            "--etcd",
            &ep,
            "--simulate",
            "2",
            "--sim-prefix",
            "full",
            "--sim-cpu",
            "4",
            "--sim-memory",
            "8Gi",
            "--metrics-addr",
            &agent_metrics,
        ],
        "space-agent",
    );
    let _controller = Proc::start("omega-controller", &["--etcd", &ep, "--instance", "ctl-1"], "space-controller");
    assert_eq!(metric(&scrape_when_up(&metrics).await, "omega_etcd_space_exceeded"), 0.0);
    assert_eq!(metric(&scrape_when_up(&agent_metrics).await, "omega_etcd_space_exceeded"), 0.0);

    // Work in flight when etcd fills: tasks running (their ends must wait), and a job the scheduler has not
    // placed yet (it is stopped while the job arrives and etcd fills).
    store.create_job(&job("running", 4, 4_000), 128).await.unwrap();
    wait_for("4 tasks running", 60, async || {
        (tasks(&store, "running").await.iter().filter(|t| t.state == TaskState::Running).count() == 4).then_some(())
    })
    .await;
    scheduler.signal("-STOP");
    store.create_job(&job("queued", 4, 100), 128).await.unwrap();
    fill_until_no_space(&store).await;
    scheduler.signal("-CONT");

    // Each says so: the scheduler (log and gauge), the agent (log), omctl (its error, and a warning on reads).
    let said = "etcd is out of space (NOSPACE alarm)";
    wait_for("the scheduler to say etcd is full", 60, async || {
        let full = metric(&scrape(&metrics).await, "omega_etcd_space_exceeded") == 1.0;
        (full && scheduler.log().contains(said)).then_some(())
    })
    .await;
    wait_for("the agent to say etcd is full", 60, async || {
        let full = metric(&scrape(&agent_metrics).await, "omega_etcd_space_exceeded") == 1.0;
        (full && host.log().contains(said)).then_some(())
    })
    .await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        "name: later\nkind: batch\ntasks: 2\nimage: busybox\nresources: {cpu: 1, memory: 1Gi}\n",
    )
    .unwrap();
    let submit = omctl(&ep, &["submit", file.path().to_str().unwrap()]);
    assert_eq!(submit.status.code(), Some(6), "{submit:?}");
    assert!(String::from_utf8_lossy(&submit.stderr).contains("etcd is out of space"), "{submit:?}");
    let jobs = omctl(&ep, &["jobs"]);
    assert!(jobs.status.success(), "{jobs:?}");
    let warning = String::from_utf8_lossy(&jobs.stderr);
    assert!(warning.contains("warning: etcd is out of space") && warning.contains("alarm disarm"), "{jobs:?}");
    // Nothing was placed while full.
    assert!(tasks(&store, "queued").await.iter().all(|t| t.state == TaskState::Pending));

    // An operator frees space; every component resumes by itself and nothing is lost.
    free_space(&store).await;
    let submit = omctl(&ep, &["submit", file.path().to_str().unwrap()]);
    assert!(submit.status.success(), "{submit:?}");
    for (id, n) in [("running", 4), ("queued", 4), ("later", 2)] {
        wait_for(&format!("job {id} to succeed"), 90, async || all_succeeded(&store, id, n).await).await;
    }
    wait_for("the scheduler to say etcd has room", 30, async || {
        let room = metric(&scrape(&metrics).await, "omega_etcd_space_exceeded") == 0.0;
        (room && scheduler.log().contains("etcd has room again")).then_some(())
    })
    .await;
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
}
