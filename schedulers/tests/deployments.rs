//! Rolling a service to a new version, with real processes (etcd, a service scheduler, the controller,
//! simulated nodes) and omctl: the healthy count never drops below `count - max_parallel`, canaries wait for
//! promotion, a revert goes to a named version, and a failing version is reverted by itself while the old
//! replicas never stop.

mod support;

use omega::audit;
use omega::deployment::{self, DeploymentState, UpdatePolicy};
use omega::health::{HealthCheck, Probe};
use omega::model::{Job, JobKind, Task, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega::watcher::{Change, WatchEvent, Watcher};
use omega_testkit::procs::{bin, Proc};
use omega_testkit::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use support::tasks;

fn omctl(etcd: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("omctl")).arg("--etcd").arg(etcd).args(args).output().expect("run omctl")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A cell: `nodes` simulated nodes (4 CPU, 8 GiB), one service scheduler, the controller (serving metrics on
/// `metrics`).
fn cell_with_metrics(etcd: &str, name: &str, nodes: usize, metrics: &str) -> Vec<Proc> {
    let n = nodes.to_string();
    let prefix = format!("{name}-n");
    vec![
        Proc::start(
            "omega-agent",
            &["--etcd", etcd, "--simulate", &n, "--sim-prefix", &prefix, "--sim-cpu", "4", "--sim-memory", "8Gi"],
            &format!("{name}-nodes"),
        ),
        Proc::start("omega-scheduler", &["--etcd", etcd, "--kind", "service", "--instance", name], name),
        Proc::start(
            "omega-controller",
            &["--etcd", etcd, "--instance", &format!("{name}-ctl"), "--grace", "1s", "--metrics-addr", metrics],
            &format!("{name}-ctl"),
        ),
    ]
}

fn cell(etcd: &str, name: &str, nodes: usize) -> Vec<Proc> {
    cell_with_metrics(etcd, name, nodes, &support::metrics_addr())
}

/// The job file of service `web`: `replicas` replicas of `image` with a check simulated nodes pass, updated 2
/// at a time, counting a replica after it was healthy for 1 s; `extra` lines appended (more `update:` fields).
fn web_file(dir: &std::path::Path, name: &str, image: &str, replicas: u32, extra: &str) -> String {
    let path = dir.join(format!("{name}.yaml"));
    let body = format!(
        "name: web\nkind: service\nreplicas: {replicas}\nresources: {{cpu: 100m, memory: 64Mi}}\nimage: {image}\n\
         check: {{type: exec, command: [\"true\"], interval: 1s}}\n\
         update:\n  max_parallel: 2\n  min_healthy_time: 1s\n{extra}"
    );
    std::fs::write(&path, body).expect("write job file");
    path.to_string_lossy().into_owned()
}

async fn job(store: &Store, id: &str) -> Job {
    store.get_json::<Job>(&store.keys().job(id)).await.unwrap().expect("job exists").0
}

/// The job's rollout, once it reached `state` for `version`.
async fn rollout(store: &Store, id: &str, version: u32, state: DeploymentState) -> Job {
    wait_for(&format!("version {version} of {id}: {state}"), 120, async || {
        let j = job(store, id).await;
        (j.version == version && j.deployment.as_ref().is_some_and(|d| d.state == state)).then_some(j)
    })
    .await
}

fn live(ts: &[Task]) -> Vec<&Task> {
    ts.iter().filter(|t| t.state != TaskState::Killed).collect()
}

/// Follows every change to the job's tasks and keeps the lowest number of healthy replicas (running, and
/// passing their checks when they have a health record) seen at any revision (start it once the job is up).
fn track_min_running(store: Store, job: &str) -> Arc<AtomicUsize> {
    let min = Arc::new(AtomicUsize::new(usize::MAX));
    let m = min.clone();
    let prefix = store.keys().tasks_of_job(job);
    tokio::spawn(async move {
        let mut watcher = Watcher::new(store, prefix, 1000);
        let serving = |t: &Task| t.is_healthy(t.health.is_some());
        let mut state: BTreeMap<Vec<u8>, bool> = BTreeMap::new();
        loop {
            match watcher.next().await {
                WatchEvent::Reset { kvs, .. } => {
                    state = kvs
                        .iter()
                        .filter_map(|kv| {
                            Some((kv.key().to_vec(), serving(&serde_json::from_slice::<Task>(kv.value()).ok()?)))
                        })
                        .collect();
                }
                WatchEvent::Changes { changes, .. } => {
                    for c in changes {
                        match c {
                            Change::Put(kv) => {
                                if let Ok(t) = serde_json::from_slice::<Task>(kv.value()) {
                                    state.insert(kv.key().to_vec(), serving(&t));
                                }
                            }
                            Change::Delete { key, .. } => {
                                state.remove(&key);
                            }
                        }
                    }
                }
                _ => continue,
            }
            let running = state.values().filter(|s| **s).count();
            m.fetch_min(running, Ordering::SeqCst);
        }
    });
    min
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_canary_promote_and_revert_through_omctl() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let metrics = support::metrics_addr();
    let _cell = cell_with_metrics(&ep, "deploy-roll", 4, &metrics);
    let dir = tempfile::tempdir().unwrap();

    let v0 = web_file(dir.path(), "v0", "web:1", 10, "");
    let out = omctl(&ep, &["submit", &v0, "--wait", "--timeout", "120s"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("10 replicas healthy", 120, async || {
        (tasks(&store, "web").await.iter().filter(|t| t.is_healthy(true)).count() == 10).then_some(())
    })
    .await;
    let min_running = track_min_running(store.clone(), "web");
    let seen = wait_for("the tracker's first listing", 30, async || {
        let n = min_running.load(Ordering::SeqCst);
        (n != usize::MAX).then_some(n)
    })
    .await;
    assert_eq!(seen, 10);

    // Unchanged: nothing submitted.
    let out = omctl(&ep, &["submit", &v0]);
    assert!(out.status.success() && text(&out).contains("unchanged (version 0)"), "{}", text(&out));

    // A dry run of a new image says what would be replaced and shows the change.
    let v1 = web_file(dir.path(), "v1", "web:2", 10, "");
    let out = omctl(&ep, &["submit", "--dry-run", &v1]);
    let plan = text(&out);
    assert!(out.status.success(), "{plan}");
    assert!(
        plan.contains("version 0 -> 1") && plan.contains("10 running replicas would be replaced, 2 at a time"),
        "{plan}"
    );
    assert!(plan.contains("- image: web:1") && plan.contains("+ image: web:2"), "{plan}");
    assert_eq!(job(&store, "web").await.version, 0, "a dry run writes nothing");

    // The rolling update: 2 at a time, never fewer than 10 - 2 running.
    let out = omctl(&ep, &["submit", &v1, "--wait", "--timeout", "180s"]);
    assert!(out.status.success(), "{}", text(&out));
    let j = rollout(&store, "web", 1, DeploymentState::Succeeded).await;
    assert!(j.stable);
    let ts = tasks(&store, "web").await;
    let l = live(&ts);
    assert_eq!(l.len(), 10, "{:?}", ts.iter().map(|t| (&t.id, t.state, t.version)).collect::<Vec<_>>());
    assert!(l.iter().all(|t| t.version == 1 && t.state == TaskState::Running));
    let lowest = min_running.load(Ordering::SeqCst);
    assert!(lowest >= 8, "healthy replicas fell to {lowest} during the update");
    eprintln!("lowest healthy count during the rolling update: {lowest} (of 10, max_parallel 2)");
    wait_for("the retired replicas to be deleted", 60, async || (tasks(&store, "web").await.len() == 10).then_some(()))
        .await;

    // A count change is applied in place: the replicas are kept and relabelled.
    let before: Vec<String> = live(&tasks(&store, "web").await).iter().map(|t| t.id.clone()).collect();
    let v2 = web_file(dir.path(), "v2", "web:2", 12, "");
    let out = omctl(&ep, &["submit", &v2, "--wait", "--timeout", "120s"]);
    assert!(out.status.success(), "{}", text(&out));
    rollout(&store, "web", 2, DeploymentState::Succeeded).await;
    let ts = tasks(&store, "web").await;
    assert_eq!(live(&ts).len(), 12);
    for id in &before {
        let t = ts.iter().find(|t| &t.id == id).expect("kept");
        assert_eq!((t.version, t.state), (2, TaskState::Running), "{id} kept, relabelled");
    }

    // Canaries: 2 new beside the 12 old until promoted.
    let v3 = web_file(dir.path(), "v3", "web:3", 12, "  canary: 2\n");
    let out = omctl(&ep, &["submit", &v3]);
    assert!(out.status.success(), "{}", text(&out));
    rollout(&store, "web", 3, DeploymentState::AwaitingPromotion).await;
    let ts = tasks(&store, "web").await;
    let l = live(&ts);
    assert_eq!(l.iter().filter(|t| t.version == 3).count(), 2, "two canaries");
    assert_eq!(l.iter().filter(|t| t.version == 2 && t.state == TaskState::Running).count(), 12, "all old kept");
    let out = omctl(&ep, &["job", "web"]);
    assert!(text(&out).contains("awaiting promotion"), "{}", text(&out));
    let out = omctl(&ep, &["promote", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    rollout(&store, "web", 3, DeploymentState::Succeeded).await;
    assert!(live(&tasks(&store, "web").await).iter().all(|t| t.version == 3));

    // History lists the versions with what changed; revert to a named one.
    let out = omctl(&ep, &["job", "history", "web"]);
    let h = text(&out);
    assert!(out.status.success(), "{h}");
    for v in 0..=3 {
        assert!(h.contains(&format!("version {v} ")), "{h}");
    }
    assert!(h.contains("+ image: web:3") && h.contains("+   canary: 2"), "{h}");
    let out = omctl(&ep, &["revert", "web", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let j = rollout(&store, "web", 4, DeploymentState::Succeeded).await;
    assert_eq!((j.image.as_str(), j.tasks, j.deployment.and_then(|d| d.reverts)), ("web:2", 10, Some(1)));
    let lowest = min_running.load(Ordering::SeqCst);
    assert!(lowest >= 8, "running replicas fell to {lowest}");
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{report:?}");

    // The controller's metrics: rollouts, the retired and started replicas, the replicas' health per job.
    support::scrape_when_up(&metrics).await;
    wait_for("the rollout metrics", 30, async || {
        let text = omega_testkit::metrics::scrape(&metrics).await;
        let ok = omega_testkit::metrics::metric(&text, "omega_controller_rollouts_succeeded_total") >= 4.0
            && omega_testkit::metrics::metric_where(&text, "omega_job_replicas_healthy", "job=\"web\"") == 10.0
            && omega_testkit::metrics::metric(&text, "omega_controller_rollouts_in_progress") == 0.0
            && omega_testkit::metrics::metric(&text, "omega_controller_rollout_replicas_retired_total") >= 20.0;
        ok.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_never_turns_healthy_is_reverted_and_the_old_replicas_never_stop() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let _cell = cell(&ep, "deploy-revert", 3);

    let mut web = Job::new("api", JobKind::Service, 4, Resources::new(100, 64 << 20));
    web.image = "api:1".into();
    web.update = Some(UpdatePolicy {
        max_parallel: 2,
        min_healthy_time_ms: 500,
        healthy_deadline_ms: 3_000,
        auto_revert: true,
        ..UpdatePolicy::default()
    });
    store.create_job(&web, 128).await.unwrap();
    let old: Vec<Task> = wait_for("4 replicas running", 120, async || {
        let ts = tasks(&store, "api").await;
        (ts.iter().filter(|t| t.state == TaskState::Running).count() == 4).then_some(ts)
    })
    .await;
    // Version 0 was never rolled out (it was submitted), so it is not stable yet: make version 1 a good one.
    let (current, rev) = store.get_json::<Job>(&store.keys().job("api")).await.unwrap().unwrap();
    let mut good = deployment::spec_of(&current);
    good.priority = 1;
    store
        .put_next_version(&current, rev, &deployment::next_version(&current, &good, omega::model::now_ms()), None)
        .await
        .unwrap()
        .unwrap();
    rollout(&store, "api", 1, DeploymentState::Succeeded).await;
    let old_ids: Vec<String> = old.iter().map(|t| t.id.clone()).collect();

    // Version 2 has a check its replicas never pass.
    let (current, rev) = store.get_json::<Job>(&store.keys().job("api")).await.unwrap().unwrap();
    let mut bad = deployment::spec_of(&current);
    bad.image = "api:broken".into();
    bad.checks = vec![HealthCheck::new("exec", Probe::Exec { command: vec!["false".into()] })];
    store
        .put_next_version(&current, rev, &deployment::next_version(&current, &bad, omega::model::now_ms()), None)
        .await
        .unwrap()
        .unwrap();

    let reverted = wait_for("the automatic revert", 120, async || {
        let j = job(&store, "api").await;
        (j.version == 3).then_some(j)
    })
    .await;
    assert_eq!(reverted.deployment.as_ref().and_then(|d| d.reverts), Some(1));
    assert_eq!(reverted.image, "api:1");
    assert_eq!(reverted.deployment.as_ref().map(|d| d.canaries), Some(0), "a revert skips the canary phase");
    let failed = store.job_version("api", 2).await.unwrap().expect("version 2 kept");
    let d = failed.deployment.expect("its deployment");
    assert_eq!(d.state, DeploymentState::Failed);
    assert!(d.message.contains("healthy"), "{}", d.message);
    rollout(&store, "api", 3, DeploymentState::Succeeded).await;

    // The old replicas ran through it all: same tasks, same placement, never restarted or re-placed.
    let ts = tasks(&store, "api").await;
    for (id, before) in old_ids.iter().zip(&old) {
        let t = ts.iter().find(|t| &t.id == id).expect("old replica still there");
        assert_eq!((t.state, t.placements, &t.node), (TaskState::Running, before.placements, &before.node), "{id}");
        assert_eq!(t.version, 3, "adopted by the revert");
    }
    assert_eq!(live(&ts).len(), 4);
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_migrates_first_and_its_deadline_stops_what_is_left() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let _cell = cell(&ep, "deploy-drain", 3);
    let _batch = Proc::start(
        "omega-scheduler",
        &["--etcd", &ep, "--kind", "batch", "--instance", "deploy-drain-b"],
        "deploy-drain-b",
    );
    let dir = tempfile::tempdir().unwrap();
    let web = web_file(dir.path(), "web", "web:1", 6, "");
    assert!(omctl(&ep, &["submit", &web, "--wait", "--timeout", "120s"]).status.success());
    let mut crunch = Job::new("crunch", JobKind::Batch, 1, Resources::new(100, 1 << 20));
    crunch.duration_ms = Some(3_600_000);
    store.create_job(&crunch, 128).await.unwrap();
    let (node, before) = wait_for("web and crunch running", 120, async || {
        let ts = tasks(&store, "web").await;
        let c = tasks(&store, "crunch").await;
        let node = c.first().filter(|t| t.state == TaskState::Running)?.node.clone()?;
        (ts.iter().filter(|t| t.is_healthy(true)).count() == 6).then_some((node, ts))
    })
    .await;
    let on_node: Vec<String> =
        before.iter().filter(|t| t.node.as_deref() == Some(node.as_str())).map(|t| t.id.clone()).collect();
    let min_running = track_min_running(store.clone(), "web");
    let seen = wait_for("the tracker's first listing", 30, async || {
        let n = min_running.load(Ordering::SeqCst);
        (n != usize::MAX).then_some(n)
    })
    .await;
    assert_eq!(seen, 6);

    // The batch task holds the node until the deadline; the service replicas move first.
    let out = omctl(&ep, &["drain", &node, "--deadline", "12s", "--wait", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let drain = &report["drain"];
    assert_eq!(drain["state"], "complete", "{report}");
    assert_eq!(drain["moved"].as_u64(), Some(on_node.len() as u64), "{report}");
    assert_eq!(drain["forced"].as_u64(), Some(1), "the batch task was stopped at the deadline: {report}");
    assert!(text(&out).contains("moved"), "progress is shown: {}", text(&out));

    let ts = tasks(&store, "web").await;
    let l = live(&ts);
    assert_eq!(l.iter().filter(|t| t.state == TaskState::Running).count(), 6);
    assert!(l.iter().all(|t| t.node.as_deref() != Some(node.as_str())), "nothing of web left on {node}");
    let lowest = min_running.load(Ordering::SeqCst);
    assert!(lowest >= 6, "running replicas fell to {lowest}: a replica stopped before its replacement served");
    eprintln!("drain of {node}: {} replicas moved, lowest running count {lowest} of 6", on_node.len());
    let c = &tasks(&store, "crunch").await[0];
    assert_eq!(c.state, TaskState::Lost, "a batch task that never restarts ends lost at the deadline");
    assert!(c.reason.as_deref().unwrap_or("").contains("drain deadline"), "{c:?}");
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    let out = omctl(&ep, &["drain", &node, "--undo"]);
    assert!(out.status.success() && text(&out).contains("schedulable again"), "{}", text(&out));
}
