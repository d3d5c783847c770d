//! The agent in a secure cell: etcd with `--client-cert-auth` and authentication on, roles from
//! `deploy/tls/grant-roles.sh`, the real `omega-agent` on its node's certificate running a real container
//! through a private containerd, and its log service taking only clients with a certificate of the cell.

#[path = "support/agent_proc.rs"]
mod agent_proc;
#[path = "support/cell.rs"]
mod cell;
#[path = "support/containerd_daemon.rs"]
mod daemon;

use agent_proc::{AgentOptions, AgentProc};
use cell::*;
use daemon::TestDaemon;
use omega::audit;
use omega::cell_state::{CellState, CellStateOptions};
use omega::model::{Node, TaskState};
use omega::proto::logs::logs_client::LogsClient;
use omega::proto::logs::TailRequest;
use omega_testkit::procs::bin;
use omega_testkit::tls::SecureEtcd;

const NODE: &str = "secure-node";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_runs_tasks_and_serves_logs_on_its_own_certificate() {
    let etcd = SecureEtcd::start(&["--agent", NODE, "--operator", "alice"]).await;
    let daemon = TestDaemon::start("secure").await;
    let cache = CellState::start(etcd.root.clone(), CellStateOptions::default()).await.expect("cell cache");
    let logs = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let options = AgentOptions {
        etcd: etcd.etcd.endpoints(),
        node: NODE,
        daemon: &daemon,
        log_dir: logs.path(),
        work: work.path(),
        lease_ttl: "10s",
        grace: "1s",
    };
    let mut agent = AgentProc::start_with(&options, "secure", &[], &etcd.flags(&format!("agent-{NODE}")));
    wait_alive(&etcd.root, NODE, 60).await;

    // A real container runs, its states recorded by the agent under its own role.
    let j = job("hello", &["sh", "-c", "echo hello from a secure node"], 100, 32 << 20);
    submit_and_place(&etcd.root, &cache, j, NODE).await;
    let t = wait_task(&etcd.root, "hello/0", 90, |t| t.state.is_terminal()).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{}", agent.log());

    // The node advertises its log service as TLS; omctl, as an operator, reads the log through it.
    let (node, _) = etcd.root.get_json::<Node>(&etcd.root.keys().node(NODE)).await.unwrap().expect("the node");
    let address = node.address.clone().expect("an address");
    let host = address.strip_prefix("https://").unwrap_or_else(|| panic!("not advertised as TLS: {address}"));
    let out = std::process::Command::new(bin("omctl"))
        .args(["--etcd", &etcd.endpoint()])
        .args(etcd.flags("operator-alice"))
        .args(["logs", "hello/0"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("hello from a secure node"), "{text}");

    // Without a certificate of the cell the log service answers nobody: plain text, or TLS without one.
    let request = || TailRequest { task: "hello/0".into(), follow: false, offset: 0 };
    let plain = async {
        let mut c = LogsClient::connect(format!("http://{host}")).await.ok()?;
        c.tail(request()).await.ok()?.into_inner().message().await.ok()
    };
    assert!(plain.await.is_none(), "a plain client read the log");
    let ca = std::fs::read(etcd.certs.path().join("ca.pem")).unwrap();
    let anonymous = async {
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{host}")).ok()?.tls_config(tls).ok()?;
        let mut c = LogsClient::new(channel.connect().await.ok()?);
        c.tail(request()).await.ok()?.into_inner().message().await.ok()
    };
    assert!(anonymous.await.is_none(), "a client without a certificate read the log");

    assert!(!agent.log().contains("permission denied"), "the agent's role fell short:\n{}", agent.log());
    let report = audit::audit(&etcd.root).await.unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    agent.kill();
}
