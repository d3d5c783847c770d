//! A secure cell: etcd with `--client-cert-auth` and authentication on, certificates and roles made by
//! `deploy/tls/`'s scripts, every component acting as its own etcd user. The cell works end to end; each
//! identity can do only what its role allows; a plain-text client, a wrong CA, an expired or a missing
//! certificate each fail in one clear line.

use omega::audit;
use omega::model::{Allocation, TaskState};
use omega::resources::Resources;
use omega::store::encode;
use omega_testkit::procs::{bin, Proc};
use omega_testkit::tls::{make_certs, SecureEtcd};
use omega_testkit::*;
use std::process::Output;

fn omctl(etcd: &SecureEtcd, who: &str, args: &[&str]) -> Output {
    std::process::Command::new(bin("omctl"))
        .arg("--etcd")
        .arg(etcd.endpoint())
        .args(etcd.flags(who))
        .args(args)
        .output()
        .expect("run omctl")
}

async fn absent(store: &omega::store::Store, key: &str) -> bool {
    store.client().get(key, None).await.expect("read as root").kvs().is_empty()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn start(name: &str, etcd: &SecureEtcd, who: &str, args: &[&str], log: &str) -> Proc {
    let mut all: Vec<String> = vec!["--etcd".into(), etcd.endpoint()];
    all.extend(etcd.flags(who));
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    Proc::start(name, &refs, log)
}

/// Each component on its own certificate: a batch job submitted by an operator is placed by the scheduler,
/// run by the simulated nodes' agent and finished by the controller; a viewer reads and audits but cannot
/// submit; nobody's log shows a permission refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_works_on_its_own_certificate() {
    let etcd = SecureEtcd::start(&["--sim-agents", "sec", "--operator", "alice", "--viewer", "bob"]).await;
    let mut procs = vec![
        start(
            "omega-agent",
            &etcd,
            "agents-sec",
            &["--simulate", "3", "--sim-prefix", "sec", "--sim-cpu", "2", "--sim-memory", "4Gi"],
            "sec-agent",
        ),
        start("omega-scheduler", &etcd, "omega-scheduler", &["--kind", "batch", "--instance", "sec-b1"], "sec-batch"),
        start("omega-controller", &etcd, "omega-controller", &["--instance", "sec-ctl", "--grace", "1s"], "sec-ctl"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("hello.yaml");
    std::fs::write(
        &job,
        "name: hello\nkind: batch\ntasks: 4\nresources: {cpu: 500m, memory: 256Mi}\nimage: busybox\nduration: 1s\n",
    )
    .unwrap();
    let out = omctl(&etcd, "operator-alice", &["submit", job.to_str().unwrap(), "--wait", "--timeout", "120s"]);
    assert!(out.status.success(), "submit as operator: {}", text(&out));

    // Run to the end: every task succeeded, as the viewer reads it.
    wait_for("hello's tasks to succeed", 120, async || {
        let (kvs, _) = etcd.root.list(&etcd.root.keys().tasks_of_job("hello"), 100, None).await.ok()?;
        let done = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<omega::model::Task>(kv.value()).ok())
            .filter(|t| t.state == TaskState::Succeeded)
            .count();
        (done == 4).then_some(())
    })
    .await;
    let out = omctl(&etcd, "viewer-bob", &["job", "hello"]);
    assert!(out.status.success() && text(&out).contains("hello"), "job as viewer: {}", text(&out));
    let out = omctl(&etcd, "viewer-bob", &["audit"]);
    assert!(out.status.success(), "audit as viewer: {}", text(&out));
    let report = audit::audit(&etcd.root).await.unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);

    // A viewer cannot change the cell: refused, in words, and nothing written.
    let job2 = dir.path().join("other.yaml");
    std::fs::write(&job2, "name: other\nkind: batch\ntasks: 1\nresources: {cpu: 100m, memory: 32Mi}\nimage: busybox\n")
        .unwrap();
    let out = omctl(&etcd, "viewer-bob", &["submit", job2.to_str().unwrap()]);
    assert!(!out.status.success(), "a viewer submitted: {}", text(&out));
    assert!(text(&out).contains("permission denied") && text(&out).contains("grant-roles.sh"), "{}", text(&out));
    assert_eq!(out.status.code(), Some(1), "a refusal is the user's, not etcd's failure");
    assert!(text(&out).lines().count() <= 3, "one clear line, not a stack: {}", text(&out));
    assert!(absent(&etcd.root, &etcd.root.keys().job("other")).await);

    for p in &procs {
        assert!(!p.log().contains("permission denied"), "a component was refused:\n{}", p.log());
    }
    for p in &mut procs {
        p.kill();
    }
}

/// Roles are least privilege: the agent of nodes `a-*` cannot touch node `b-0`'s ledger or a job record, the
/// scheduler cannot register a node; each refusal is etcd's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_write_another_nodes_ledger() {
    let etcd = SecureEtcd::start(&["--sim-agents", "a", "--agent", "b-0"]).await;
    let capacity = Resources::new(2000, 4 << 30);
    let ledger = encode("ledger", &Allocation::empty("a-0", capacity)).unwrap();
    let keys = etcd.root.keys().clone();
    // The host of a-* writes its own nodes' ledgers...
    let agent_a = etcd.connect_as("agents-a").await.unwrap();
    agent_a.client().put(keys.alloc("a-0"), ledger.clone(), None).await.expect("its own ledger");
    // ...not b-0's, nor a job's record.
    let e = agent_a.client().put(keys.alloc("b-0"), ledger.clone(), None).await.unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");
    let e = agent_a.client().put(keys.job("x"), b"{}".to_vec(), None).await.unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");
    // The agent of b-0 is held to b-0 (an exact key: not b-00 either).
    let agent_b = etcd.connect_as("agent-b-0").await.unwrap();
    agent_b.client().put(keys.alloc("b-0"), ledger.clone(), None).await.expect("its own ledger");
    for other in ["b-00", "a-0"] {
        let e = agent_b.client().put(keys.alloc(other), ledger.clone(), None).await.unwrap_err();
        assert!(e.to_string().contains("permission denied"), "{other}: {e}");
    }
    // The scheduler claims (ledgers, tasks, assignments) but does not register nodes.
    let scheduler = etcd.connect_as("omega-scheduler").await.unwrap();
    scheduler.client().put(keys.alloc("a-1"), ledger.clone(), None).await.expect("a claim's ledger");
    let e = scheduler.client().put(keys.node("x"), b"{}".to_vec(), None).await.unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");
    assert!(absent(&etcd.root, &keys.job("x")).await && absent(&etcd.root, &keys.node("x")).await);
    assert!(absent(&etcd.root, &keys.alloc("b-00")).await);
}

/// What goes wrong with certificates is said in one line naming the file and the problem, and a plain-text
/// client is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_expired_or_missing_certificates_fail_in_one_line() {
    let etcd = SecureEtcd::start(&["--viewer", "bob"]).await;
    let endpoint = etcd.endpoint();
    let plain = endpoint.replacen("https://", "http://", 1);

    // Plain text to a TLS etcd: refused (the store's connect and omctl alike).
    let e = omega::store::Store::connect(std::slice::from_ref(&plain), omega::keys::Keys::default()).await.unwrap_err();
    assert!(!e.to_string().is_empty());
    let out = std::process::Command::new(bin("omctl")).args(["--etcd", &plain, "jobs"]).output().unwrap();
    assert!(!out.status.success(), "a plain client was let in: {}", text(&out));
    assert!(text(&out).contains("use an https:// endpoint and --cacert"), "{}", text(&out));

    // TLS, but no client certificate: etcd requires one.
    let ca = etcd.certs.path().join("ca.pem");
    let out = std::process::Command::new(bin("omctl"))
        .args(["--etcd", &endpoint, "--cacert", ca.to_str().unwrap(), "jobs"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("client certificate"), "{t}");
    assert_eq!(t.trim().lines().count(), 1, "{t}");

    // Another cell's CA: etcd's certificate is not signed by it, and our certificate is not one etcd trusts.
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path(), &["--viewer", "bob"]);
    let f = |d: &std::path::Path, n: &str| d.join(n).to_str().unwrap().to_string();
    let args = [
        "--cacert",
        &f(other.path(), "ca.pem"),
        "--cert",
        &f(other.path(), "viewer-bob.pem"),
        "--key",
        &f(other.path(), "viewer-bob-key.pem"),
    ];
    let out =
        std::process::Command::new(bin("omctl")).args(["--etcd", &endpoint]).args(args).arg("jobs").output().unwrap();
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("not signed by the CA") && t.contains(&f(other.path(), "ca.pem")), "{t}");
    assert_eq!(t.trim().lines().count(), 1, "{t}");
    // Our CA, a certificate from the other cell.
    let args = [
        "--cacert",
        &f(etcd.certs.path(), "ca.pem"),
        "--cert",
        &f(other.path(), "viewer-bob.pem"),
        "--key",
        &f(other.path(), "viewer-bob-key.pem"),
    ];
    let out =
        std::process::Command::new(bin("omctl")).args(["--etcd", &endpoint]).args(args).arg("jobs").output().unwrap();
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("refused our client certificate") && t.contains("viewer-bob.pem"), "{t}");

    // An expired certificate of the right CA: named, with when it expired. A 0-day certificate expires at the
    // second it was made: within that second etcd (sub-second clock) may refuse it before our check (whole
    // seconds) does, so wait for our own check's words.
    make_certs(etcd.certs.path(), &["--viewer", "old", "--days", "0"]);
    let out = wait_for("the 0-day certificate to expire", 10, async || {
        let out = omctl(&etcd, "viewer-old", &["jobs"]);
        text(&out).contains("expired at").then_some(out)
    })
    .await;
    let t = text(&out);
    assert!(!out.status.success() && t.contains("viewer-old.pem") && t.contains("expired at"), "{t}");
    assert_eq!(t.trim().lines().count(), 1, "{t}");

    // A missing file, a key given as the certificate.
    let args = [
        "--cacert",
        &f(etcd.certs.path(), "ca.pem"),
        "--cert",
        "/nonexistent/me.pem",
        "--key",
        &f(etcd.certs.path(), "viewer-bob-key.pem"),
    ];
    let out =
        std::process::Command::new(bin("omctl")).args(["--etcd", &endpoint]).args(args).arg("jobs").output().unwrap();
    let t = text(&out);
    assert!(!out.status.success() && t.contains("/nonexistent/me.pem") && t.contains("cannot read"), "{t}");
    let args = [
        "--cacert",
        &f(etcd.certs.path(), "ca.pem"),
        "--cert",
        &f(etcd.certs.path(), "viewer-bob-key.pem"),
        "--key",
        &f(etcd.certs.path(), "viewer-bob-key.pem"),
    ];
    let out =
        std::process::Command::new(bin("omctl")).args(["--etcd", &endpoint]).args(args).arg("jobs").output().unwrap();
    let t = text(&out);
    assert!(!out.status.success() && t.contains("--cert") && t.contains("PRIVATE KEY"), "{t}");

    // The components say the same and exit rather than retry for ten minutes.
    let mut args: Vec<String> = vec!["--etcd".into(), endpoint.clone()];
    args.extend(["--cacert".into(), f(other.path(), "ca.pem")]);
    args.extend([
        "--cert".into(),
        f(other.path(), "omega-scheduler.pem"),
        "--key".into(),
        f(other.path(), "omega-scheduler-key.pem"),
    ]);
    args.extend(["--kind".into(), "batch".into()]);
    let out = std::process::Command::new(bin("omega-scheduler")).args(&args).output().unwrap();
    let t = text(&out);
    assert!(!out.status.success() && t.contains("not signed by the CA"), "{t}");
}
