//! Discovery with the real agent binary, a real etcd and a private containerd: a task's endpoint is published
//! once its check passes (at the node's advertised host and the declared port, where a client reaches it),
//! withdrawn before its record says it turned unhealthy, withdrawn when the task is cancelled, and gone with
//! the node's lease when the agent is killed.

#[path = "support/agent_proc.rs"]
mod agent_proc;
#[path = "support/cell.rs"]
mod cell;
#[path = "support/containerd_daemon.rs"]
mod daemon;

use agent_proc::{AgentOptions, AgentProc};
use cell::*;
use daemon::{TestDaemon, IMAGE};
use omega::cell_state::{CellState, CellStateOptions};
use omega::discovery::{self, Endpoint, ServiceSpec};
use omega::etcd_process::free_port;
use omega::health::{HealthCheck, HealthStatus, Probe};
use omega::model::{Job, JobKind};
use omega::resources::Resources;
use omega::store::Store;
use omega::watcher::{Change, WatchEvent, Watcher};
use omega_testkit::*;
use std::sync::{Arc, Mutex};

const NODE: &str = "node-disc";

/// A one-replica service sleeping, offering `service` on `port`, healthy while a TCP listener on the node
/// accepts on `probe_port` (the test holds that listener, so it decides the task's health).
fn service(id: &str, service: &str, port: u16, probe_port: u16) -> Job {
    let mut j = Job::new(id, JobKind::Service, 1, Resources::new(100, 64 << 20));
    j.image = IMAGE.into();
    j.command = vec!["sleep".into(), "3600".into()];
    let mut check = HealthCheck::new("tcp", Probe::Tcp { port: probe_port });
    (check.interval_ms, check.unhealthy_threshold, check.restart) = (200, 1, false);
    j.checks = vec![check];
    j.ports = [("http".to_string(), port)].into();
    j.services = vec![ServiceSpec { name: service.into(), port: "http".into(), tags: vec!["v1".into()] }];
    j
}

async fn endpoints(store: &Store, service: &str) -> Vec<Endpoint> {
    discovery::list(store, Some(service)).await.map(|mut m| m.remove(service).unwrap_or_default()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_publishes_healthy_tasks_and_withdraws_them_first() {
    let (etcd, store) = start_etcd().await;
    let daemon = TestDaemon::start("disc").await;
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.expect("cell cache");
    let (logs, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let options = AgentOptions {
        etcd: etcd.endpoints(),
        node: NODE,
        daemon: &daemon,
        log_dir: logs.path(),
        work: work.path(),
        lease_ttl: "3s",
        grace: "1s",
    };
    let mut agent = AgentProc::start(&options, "disc", &[]);
    wait_alive(&store, NODE, 60).await;

    // Every withdrawal of service `web`, with its revision.
    let deletes: Arc<Mutex<Vec<i64>>> = Arc::default();
    let d = deletes.clone();
    let mut watcher = Watcher::new(store.clone(), discovery::service_prefix(store.keys(), "web"), 100);
    tokio::spawn(async move {
        loop {
            if let WatchEvent::Changes { changes, .. } = watcher.next().await {
                for c in changes {
                    if let Change::Delete { mod_revision, .. } = c {
                        d.lock().unwrap().push(mod_revision);
                    }
                }
            }
        }
    });

    // Healthy while the test listens on the probe port.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let probe_port = probe.local_addr().unwrap().port();
    let port = free_port().expect("a free port");
    submit_and_place(&store, &cache, service("web", "web", port, probe_port), NODE).await;
    let eps = wait_for("web published", 60, async || {
        let eps = endpoints(&store, "web").await;
        (!eps.is_empty()).then_some(eps)
    })
    .await;
    let t = task(&store, "web/0").await;
    assert_eq!(t.health.as_ref().map(|h| h.status), Some(HealthStatus::Healthy), "published only once healthy");
    assert_eq!(eps.len(), 1);
    let e = &eps[0];
    // The node's advertised address is its log service's, on 127.0.0.1 here.
    assert_eq!((e.address.as_str(), e.port, e.task.as_str(), e.node.as_str()), ("127.0.0.1", port, "web/0", NODE));
    assert_eq!(e.tags, ["v1"]);
    // Bound to the node's lease.
    let key = e.key(store.keys());
    let live = liveness(&store, NODE).await.expect("alive");
    let kv = store.client().kv_client().get(key.as_str(), None).await.unwrap();
    assert_eq!(format!("{:x}", kv.kvs()[0].lease()), live.lease);

    // Unhealthy: withdrawn before the record says so.
    drop(probe);
    let t = wait_task(&store, "web/0", 60, |t| t.health.as_ref().is_some_and(|h| h.status == HealthStatus::Unhealthy))
        .await;
    let (_, record_rev) = store.get_json::<omega::model::Task>(&store.keys().task("web/0")).await.unwrap().unwrap();
    assert!(endpoints(&store, "web").await.is_empty(), "{t:?}");
    let withdrawn = wait_for("the withdrawal seen", 30, async || deletes.lock().unwrap().first().copied()).await;
    assert!(withdrawn < record_rev, "withdrawn at {withdrawn}, unhealthy recorded at {record_rev}");

    // Cancelled: withdrawn.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port2 = free_port().expect("a free port");
    submit_and_place(&store, &cache, service("api", "api", port2, probe.local_addr().unwrap().port()), NODE).await;
    wait_for("api published", 60, async || (endpoints(&store, "api").await.len() == 1).then_some(())).await;
    omega::ops::cancel::cancel_job(&store, "api").await.expect("cancel");
    wait_for("api withdrawn", 30, async || endpoints(&store, "api").await.is_empty().then_some(())).await;

    // The agent killed: its endpoints go with its lease.
    let port3 = free_port().expect("a free port");
    submit_and_place(&store, &cache, service("db", "db", port3, probe.local_addr().unwrap().port()), NODE).await;
    wait_for("db published", 60, async || (endpoints(&store, "db").await.len() == 1).then_some(())).await;
    agent.kill();
    wait_for("db gone with the lease", 60, async || endpoints(&store, "db").await.is_empty().then_some(())).await;
}

/// deploy/examples/greeter.yaml and greeter-client.yaml on a real node: the client finds the server by name
/// through etcd and gets its greeting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_greeter_example_client_finds_its_server_by_name() {
    let (etcd, store) = start_etcd().await;
    let daemon = TestDaemon::start("disc-greeter").await;
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.expect("cell cache");
    let (logs, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let options = AgentOptions {
        etcd: etcd.endpoints(),
        node: NODE,
        daemon: &daemon,
        log_dir: logs.path(),
        work: work.path(),
        lease_ttl: "10s",
        grace: "1s",
    };
    let _agent = AgentProc::start(&options, "greeter", &[]);
    wait_alive(&store, NODE, 60).await;
    let example = |name: &str| {
        let path = format!("{}/../deploy/examples/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("the example file");
        let mut job = omega::job_spec::parse_job(&path, &text).expect("the example parses");
        job.image = IMAGE.into();
        job
    };
    submit_and_place(&store, &cache, example("greeter"), NODE).await;
    wait_for("greeter published", 60, async || (endpoints(&store, "greeter").await.len() == 1).then_some(())).await;
    let mut client = example("greeter-client");
    // This test's etcd, not the local cell's.
    client.env.insert("ETCD".into(), etcd.endpoints()[0].clone());
    submit_and_place(&store, &cache, client, NODE).await;
    let t = wait_task(&store, "greeter-client/0", 60, |t| t.state.is_terminal()).await;
    let log =
        std::fs::read_to_string(omega_agent::agent::log_path(logs.path(), "greeter-client/0")).unwrap_or_default();
    assert_eq!(t.state, omega::model::TaskState::Succeeded, "{t:?}\n{log}");
    assert!(log.contains("greeter at 127.0.0.1:8090 says: hello from"), "{log}");
}
