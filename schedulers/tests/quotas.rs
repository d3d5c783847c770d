//! Namespace quotas with real processes: three scheduler instances (two batch, one service) race to place
//! work of one namespace on simulated nodes with room for far more than its quota. The quota is checked in the
//! transaction that claims the room, so at no revision the audit reads do its tasks hold more than it allows;
//! the work over it stays pending with a reason that names the quota; raising the quota lets more in; another
//! namespace is not held back. It runs on a secure etcd (client certificates, a role per component, auth
//! on), each process on its own certificate: the schedulers' role lets them rewrite quotas, nothing more.

mod support;

use omega::audit;
use omega::model::{Job, JobKind, Task};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::procs::{bin, Proc};
use omega_testkit::tls::SecureEtcd;
use omega_testkit::*;
use std::process::Output;

/// omctl as the operator `alice`.
fn omctl(etcd: &SecureEtcd, args: &[&str]) -> Output {
    std::process::Command::new(bin("omctl"))
        .arg("--etcd")
        .arg(etcd.endpoint())
        .args(etcd.flags("operator-alice"))
        .args(args)
        .output()
        .expect("run omctl")
}

fn start(name: &str, etcd: &SecureEtcd, who: &str, args: &[&str], log: &str) -> Proc {
    let mut all = vec!["--etcd".to_string(), etcd.endpoint()];
    all.extend(etcd.flags(who));
    all.extend(args.iter().map(|s| s.to_string()));
    Proc::start(name, &all.iter().map(String::as_str).collect::<Vec<_>>(), log)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A job of `tasks` tasks of 500m / 256Mi that simulated nodes run for ten minutes.
fn job(id: &str, namespace: &str, kind: JobKind, tasks: u32) -> Job {
    let mut j = Job::new(id, kind, tasks, Resources::new(500, 256 << 20));
    j.namespace = namespace.to_string();
    j.image = "busybox".into();
    j.duration_ms = Some(600_000);
    j
}

/// What the tasks of `namespace` hold now: (millicores, tasks).
async fn held(store: &Store, namespace: &str) -> (u64, u64) {
    let (kvs, _) = store.list(&store.keys().tasks_prefix(), 1000, None).await.unwrap();
    kvs.iter()
        .filter_map(|kv| serde_json::from_slice::<Task>(kv.value()).ok())
        .filter(|t| t.namespace == namespace && t.state.holds_resources())
        .fold((0, 0), |(cpu, n), t| (cpu + t.resources.cpu_millis, n + 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_schedulers_never_pass_a_namespace_quota() {
    let etcd = SecureEtcd::start(&["--sim-agents", "q", "--operator", "alice"]).await;
    let store = etcd.root.clone();
    let ep = &etcd;
    // 16 cores of nodes; the namespace may hold 4 of them (8 tasks).
    let out = omctl(ep, &["quota", "set", "team-a", "--cpu", "4", "--tasks", "20"]);
    assert!(out.status.success(), "{}", text(&out));
    let procs = [
        start(
            "omega-agent",
            ep,
            "agents-q",
            &["--simulate", "4", "--sim-prefix", "q", "--sim-cpu", "4", "--sim-memory", "16Gi"],
            "quota-nodes",
        ),
        start("omega-scheduler", ep, "omega-scheduler", &["--kind", "batch", "--instance", "qb-1"], "qb-1"),
        start("omega-scheduler", ep, "omega-scheduler", &["--kind", "batch", "--instance", "qb-2"], "qb-2"),
        start("omega-scheduler", ep, "omega-scheduler", &["--kind", "service", "--instance", "qs-1"], "qs-1"),
    ];
    wait_for("the four nodes", 60, async || {
        let (kvs, _) = store.list(&store.keys().nodes_prefix(), 100, None).await.ok()?;
        (kvs.len() == 4).then_some(())
    })
    .await;
    // 28 tasks (14 cores) asked in team-a by batch and service jobs at once; 4 tasks in another namespace.
    for i in 0..6 {
        store.create_job(&job(&format!("a-batch-{i}"), "team-a", JobKind::Batch, 4), 128).await.unwrap();
    }
    for i in 0..2 {
        store.create_job(&job(&format!("a-web-{i}"), "team-a", JobKind::Service, 2), 128).await.unwrap();
    }
    store.create_job(&job("b-batch", "team-b", JobKind::Batch, 4), 128).await.unwrap();

    // Until the namespace's quota is full, every audit (one consistent read each) finds it within its quota.
    let mut audits = 0;
    wait_for("team-a to fill its quota", 120, async || {
        let report = audit::audit(&store).await.unwrap();
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        audits += 1;
        let (cpu, _) = held(&store, "team-a").await;
        assert!(cpu <= 4000, "team-a holds {cpu}m of a 4-core quota");
        (cpu == 4000).then_some(())
    })
    .await;
    assert!(audits >= 1);
    // The other namespace is not held back.
    wait_for("team-b's job to be placed", 60, async || (held(&store, "team-b").await.1 == 4).then_some(())).await;

    // The rest waits, saying why: the quota, its use and what a task asks.
    let out = wait_for("a pending reason naming the quota", 60, async || {
        let out = omctl(ep, &["jobs", "-n", "team-a"]);
        text(&out).contains("quota of namespace team-a").then_some(out)
    })
    .await;
    assert!(text(&out).contains("cpu 4 of 4 in use"), "{}", text(&out));
    let out = omctl(ep, &["quota", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = v["namespaces"].as_array().unwrap().iter().find(|n| n["namespace"] == "team-a").unwrap().clone();
    assert_eq!(a["used"]["resources"]["cpu_millis"], 4000, "{v}");
    assert_eq!(a["pending_tasks"], 20, "{v}");

    // More quota, more placed; still never over it.
    let out = omctl(ep, &["quota", "set", "team-a", "--cpu", "6"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("team-a to fill its raised quota", 120, async || {
        let report = audit::audit(&store).await.unwrap();
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        let (cpu, _) = held(&store, "team-a").await;
        assert!(cpu <= 6000, "team-a holds {cpu}m of a 6-core quota");
        (cpu == 6000).then_some(())
    })
    .await;
    let out = omctl(ep, &["audit"]);
    assert!(out.status.success(), "{}", text(&out));
    for p in &procs {
        assert!(!p.log().contains("permission denied"), "a component was refused:\n{}", p.log());
    }
}
