//! Service discovery with real processes (etcd, a service scheduler, the controller, simulated nodes) and
//! omctl: endpoints appear only for healthy instances and go when their task is cancelled, drained or its
//! agent dies; a client following a service ([`omega::discovery::Resolver`]) through a rolling update never
//! holds an endpoint whose task is not running and healthy.

mod support;

use etcd_client::GetOptions;
use omega::deployment::DeploymentState;
use omega::discovery::{self, Endpoint, Resolver};
use omega::health::HealthStatus;
use omega::model::{Job, Task, TaskState};
use omega::store::Store;
use omega::watcher::{Change, WatchEvent, Watcher};
use omega_testkit::procs::{bin, Proc};
use omega_testkit::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use support::tasks;

fn omctl(etcd: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("omctl")).arg("--etcd").arg(etcd).args(args).output().expect("run omctl")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `nodes` simulated nodes (one agent process, first in the list, on a 3 s lease), a service scheduler, the
/// controller.
fn cell(etcd: &str, name: &str, nodes: usize) -> Vec<Proc> {
    let n = nodes.to_string();
    let prefix = format!("{name}-n");
    let metrics = support::metrics_addr();
    vec![
        Proc::start(
            "omega-agent",
            &[
                "--etcd",
                etcd,
                "--simulate",
                &n,
                "--sim-prefix",
                &prefix,
                "--sim-cpu",
                "4",
                "--sim-memory",
                "8Gi",
                "--lease-ttl",
                "3s",
            ],
            &format!("{name}-nodes"),
        ),
        Proc::start("omega-scheduler", &["--etcd", etcd, "--kind", "service", "--instance", name], name),
        Proc::start(
            "omega-controller",
            &["--etcd", etcd, "--instance", &format!("{name}-ctl"), "--grace", "1s", "--metrics-addr", &metrics],
            &format!("{name}-ctl"),
        ),
    ]
}

/// A service job file: `replicas` of `image`, port `http` 8080 offered as service `service` (tagged with the
/// image), an exec check running `check` (simulated nodes pass `true` and fail `false`), 2 at a time in an
/// update.
fn service_file(dir: &std::path::Path, job: &str, service: &str, image: &str, replicas: u32, check: &str) -> String {
    let path = dir.join(format!("{job}-{}.yaml", image.replace(':', "-")));
    let tag = image.replace(':', "-");
    let body = format!(
        "name: {job}\nkind: service\nreplicas: {replicas}\nresources: {{cpu: 100m, memory: 64Mi}}\nimage: {image}\n\
         ports: {{http: 8080}}\nservices:\n  - {{name: {service}, port: http, tags: [{tag}]}}\n\
         check: {{type: exec, command: [\"{check}\"], interval: 1s, restart: false}}\n\
         update:\n  max_parallel: 2\n  min_healthy_time: 1s\n"
    );
    std::fs::write(&path, body).expect("write job file");
    path.to_string_lossy().into_owned()
}

async fn task_at(store: &Store, id: &str, revision: i64) -> Option<Task> {
    let key = store.keys().task(id);
    let resp =
        store.client().kv_client().get(key.as_str(), Some(GetOptions::new().with_revision(revision))).await.ok()?;
    serde_json::from_slice(resp.kvs().first()?.value()).ok()
}

/// What a client following a service saw.
#[derive(Default)]
struct Seen {
    /// Endpoints ever inserted.
    inserts: AtomicUsize,
    removes: AtomicUsize,
    /// Held endpoints whose task, at the revision the client was consistent with, was not running and healthy
    /// on the endpoint's node; and endpoints withdrawn only after their task had stopped.
    violations: Mutex<Vec<String>>,
}

/// Follows `service` as a client would, checking after every change each endpoint it holds against the task
/// records at the same revision.
async fn follow(store: Store, service: &str) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let mut resolver = Resolver::new(store.clone(), service).await.expect("resolver");
    // Each withdrawal, as its own etcd event: the task must still have been running just before it (else a
    // client held the endpoint of a stopped task until then, even if never at a revision it was told of).
    let prefix = discovery::service_prefix(store.keys(), service);
    let (w_store, w_seen) = (store.clone(), seen.clone());
    let mut watcher = Watcher::new(store.clone(), prefix.clone(), 1000).resume_from(resolver.revision() + 1);
    tokio::spawn(async move {
        loop {
            let WatchEvent::Changes { changes, .. } = watcher.next().await else { continue };
            for change in changes {
                let Change::Delete { key, mod_revision, .. } = change else { continue };
                let key = String::from_utf8_lossy(&key).into_owned();
                let Some((node, task)) = key.strip_prefix(&prefix).and_then(|r| r.split_once('/')) else { continue };
                let t = task_at(&w_store, task, mod_revision - 1).await;
                let running =
                    t.as_ref().is_some_and(|t| t.state == TaskState::Running && t.node.as_deref() == Some(node));
                if !running {
                    let what = t.map(|t| format!("{} on {:?}", t.state, t.node));
                    w_seen.violations.lock().unwrap().push(format!(
                        "{task} on {node} withdrawn at revision {mod_revision}, after its task was {what:?}"
                    ));
                }
            }
        }
    });
    let s = seen.clone();
    tokio::spawn(async move {
        check_held(&store, &resolver, &s).await;
        loop {
            for change in resolver.changed().await {
                match change {
                    discovery::EndpointChange::Insert(..) => s.inserts.fetch_add(1, Ordering::SeqCst),
                    discovery::EndpointChange::Remove(..) => s.removes.fetch_add(1, Ordering::SeqCst),
                };
            }
            check_held(&store, &resolver, &s).await;
        }
    });
    seen
}

async fn check_held(store: &Store, resolver: &Resolver, seen: &Seen) {
    let revision = resolver.revision();
    for e in resolver.endpoints().values() {
        let t = task_at(store, &e.task, revision).await;
        let ok = t.as_ref().is_some_and(|t| {
            t.state == TaskState::Running
                && t.node.as_deref() == Some(e.node.as_str())
                && t.health.as_ref().is_some_and(|h| h.status == HealthStatus::Healthy)
        });
        if !ok {
            let what = t.map(|t| format!("{} on {:?}, health {:?}", t.state, t.node, t.health.map(|h| h.status)));
            seen.violations
                .lock()
                .unwrap()
                .push(format!("at revision {revision}: {} held while its task was {what:?}", e.task));
        }
    }
}

async fn endpoints(store: &Store, service: &str) -> Vec<Endpoint> {
    discovery::list(store, Some(service)).await.unwrap().remove(service).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_the_healthy_instances_and_go_with_cancel_drain_and_a_killed_agent() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let mut cell = cell(&ep, "disc-a", 3);
    let dir = tempfile::tempdir().unwrap();
    let web_seen = follow(store.clone(), "web").await;
    let bad_seen = follow(store.clone(), "bad").await;

    // A service whose check passes is published once healthy, one endpoint per replica.
    let web = service_file(dir.path(), "web", "web", "web:1", 3, "true");
    let out = omctl(&ep, &["submit", &web, "--wait", "--timeout", "120s"]);
    assert!(out.status.success(), "{}", text(&out));
    let eps = wait_for("3 endpoints of web", 120, async || {
        let eps = endpoints(&store, "web").await;
        (eps.len() == 3).then_some(eps)
    })
    .await;
    let ts = tasks(&store, "web").await;
    for e in &eps {
        let t = ts.iter().find(|t| t.id == e.task).expect("its task exists");
        assert!(t.is_healthy(true) && t.node.as_deref() == Some(e.node.as_str()), "{e:?} {t:?}");
        assert_eq!((e.address.as_str(), e.port, e.job.as_str(), e.version), ("127.0.0.1", 8080, "web", 0));
        assert_eq!(e.tags, vec!["web-1".to_string()]);
    }

    // One whose check fails is never published.
    let bad = service_file(dir.path(), "bad", "bad", "bad:1", 2, "false");
    let out = omctl(&ep, &["submit", &bad, "--wait", "--timeout", "120s"]);
    assert!(out.status.success(), "{}", text(&out));
    // Its first version fails once a replica is found unhealthy (the controller then retires the replicas).
    wait_for("bad's rollout failed on an unhealthy replica", 120, async || {
        let (job, _) = store.get_json::<Job>(&store.keys().job("bad")).await.ok()??;
        let d = job.deployment?;
        (d.state == DeploymentState::Failed && d.message.contains("unhealthy")).then_some(())
    })
    .await;
    assert!(endpoints(&store, "bad").await.is_empty());
    assert_eq!(bad_seen.inserts.load(Ordering::SeqCst), 0, "an unhealthy instance was published");

    // omctl shows what clients resolve.
    let out = omctl(&ep, &["services"]);
    assert!(out.status.success() && text(&out).contains("web") && !text(&out).contains("bad"), "{}", text(&out));
    let out = omctl(&ep, &["service", "web", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["endpoints"].as_array().map(Vec::len), Some(3), "{shown}");
    assert_eq!(shown["endpoints"][0]["port"], 8080, "{shown}");
    let out = omctl(&ep, &["cancel", "bad"]);
    assert!(out.status.success(), "{}", text(&out));

    // A drained node's replicas move; their endpoints move with them.
    let node = eps[0].node.clone();
    let out = omctl(&ep, &["drain", &node, "--deadline", "60s", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("web's 3 endpoints off the drained node", 60, async || {
        let eps = endpoints(&store, "web").await;
        (eps.len() == 3 && eps.iter().all(|e| e.node != node)).then_some(())
    })
    .await;

    // A cancelled job's endpoints go.
    let out = omctl(&ep, &["cancel", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("web's endpoints withdrawn", 60, async || endpoints(&store, "web").await.is_empty().then_some(())).await;

    // A killed agent's endpoints go with its lease, with nobody left to withdraw them.
    let api_seen = follow(store.clone(), "api").await;
    let api = service_file(dir.path(), "api", "api", "api:1", 2, "true");
    let out = omctl(&ep, &["submit", &api, "--wait", "--timeout", "120s"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("2 endpoints of api", 120, async || (endpoints(&store, "api").await.len() == 2).then_some(())).await;
    cell[0].kill();
    wait_for("api's endpoints gone with the lease", 60, async || {
        endpoints(&store, "api").await.is_empty().then_some(())
    })
    .await;

    for (name, seen) in [("web", &web_seen), ("bad", &bad_seen), ("api", &api_seen)] {
        let v = seen.violations.lock().unwrap();
        assert!(v.is_empty(), "{name}: {v:?}");
    }
    eprintln!(
        "web: {} inserts, {} removes seen by a client; api: {} inserts, {} removes",
        web_seen.inserts.load(Ordering::SeqCst),
        web_seen.removes.load(Ordering::SeqCst),
        api_seen.inserts.load(Ordering::SeqCst),
        api_seen.removes.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_following_a_rolling_update_never_holds_a_stopped_instance() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let _cell = cell(&ep, "disc-roll", 4);
    let dir = tempfile::tempdir().unwrap();
    let seen = follow(store.clone(), "web").await;

    let v0 = service_file(dir.path(), "web", "web", "web:1", 6, "true");
    let out = omctl(&ep, &["submit", &v0, "--wait", "--timeout", "120s"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("6 endpoints of version 0", 120, async || {
        let eps = endpoints(&store, "web").await;
        (eps.len() == 6 && eps.iter().all(|e| e.version == 0)).then_some(())
    })
    .await;

    let v1 = service_file(dir.path(), "web", "web", "web:2", 6, "true");
    let out = omctl(&ep, &["submit", &v1, "--wait", "--timeout", "180s"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("6 endpoints of version 1, none of version 0", 180, async || {
        let eps = endpoints(&store, "web").await;
        (eps.len() == 6 && eps.iter().all(|e| e.version == 1 && e.tags == ["web-2"])).then_some(())
    })
    .await;
    let ts = tasks(&store, "web").await;
    for e in endpoints(&store, "web").await {
        let t = ts.iter().find(|t| t.id == e.task).expect("its task exists");
        assert!(t.is_healthy(true) && t.version == 1, "{e:?} {t:?}");
    }
    let v = seen.violations.lock().unwrap();
    assert!(v.is_empty(), "{v:?}");
    let (inserts, removes) = (seen.inserts.load(Ordering::SeqCst), seen.removes.load(Ordering::SeqCst));
    assert!(inserts >= 12 && removes >= 6, "the client followed the update: {inserts} inserts, {removes} removes");
    eprintln!("rolling update seen by a client: {inserts} inserts, {removes} removes, no stopped instance held");
}
