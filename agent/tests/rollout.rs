//! Rolling a real service through the local cell, as the update examples say: `omega-cell` (etcd, containerd,
//! the agent, the schedulers, the controller) runs deploy/examples/api.yaml in real containers with an exec
//! health check; omctl rolls it to api-update/v1.yaml, then submits api-update/broken.yaml, whose check never
//! passes: the rollout fails, is reverted by itself, and the healthy replicas never stop.

use omega::deployment::DeploymentState;
use omega::etcd_process::free_port;
use omega::keys::Keys;
use omega::model::{Job, Task, TaskState};
use omega::store::Store;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

async fn tasks(store: &Store) -> Vec<Task> {
    let (kvs, _) = store.list(&store.keys().tasks_of_job("api"), 100, None).await.unwrap();
    kvs.iter().map(|kv| serde_json::from_slice(kv.value()).unwrap()).collect()
}

async fn job(store: &Store) -> Option<Job> {
    store.get_json::<Job>(&store.keys().job("api")).await.ok().flatten().map(|(j, _)| j)
}

/// Polls until `check` yields, failing after `secs`.
async fn until<T>(what: &str, secs: u64, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_service_rolls_forward_and_a_broken_version_is_reverted_without_stopping_the_old() {
    let (port, metrics, logs_port) = (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
    let api = examples().join("api.yaml");
    let mut cell = Command::new(env!("CARGO_BIN_EXE_omega-cell"))
        .args(["--port", &port.to_string(), "--metrics-port", &metrics.to_string()])
        .args(["--logs-port", &logs_port.to_string(), "--example", api.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start omega-cell");
    let stdout = cell.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut banner = Vec::new();
    while !banner.iter().any(|l: &String| l.starts_with("Submitted api")) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => banner.push(line),
            Err(_) => assert!(Instant::now() < deadline, "the cell came up: {banner:#?}"),
        }
    }
    let endpoint = format!("http://127.0.0.1:{port}");
    let store = Store::connect(std::slice::from_ref(&endpoint), Keys::default()).await.unwrap();
    let omctl = std::path::Path::new(env!("CARGO_BIN_EXE_omega-cell")).with_file_name("omctl");
    assert!(omctl.exists(), "omctl is built next to omega-cell by `cargo test --workspace`");
    let run = |args: &[&str]| Command::new(&omctl).args(args).env("OMEGA_ETCD", &endpoint).output().unwrap();

    // Version 0 runs, passes its check, and its rollout makes it stable.
    until("version 0 stable", 120, async || job(&store).await.filter(|j| j.stable && j.version == 0)).await;

    // A good update: rolled one replica at a time.
    let v1 = examples().join("api-update/v1.yaml");
    let plan = run(&["submit", "--dry-run", v1.to_str().unwrap()]);
    assert!(text(&plan).contains("version 0 -> 1") && text(&plan).contains("+ command:"), "{}", text(&plan));
    let out = run(&["submit", v1.to_str().unwrap(), "--wait", "--timeout", "120s"]);
    assert!(out.status.success(), "{}", text(&out));
    let rolled = tasks(&store).await;
    let serving: Vec<&Task> = rolled.iter().filter(|t| t.state == TaskState::Running && t.version == 1).collect();
    assert_eq!(serving.len(), 2, "{rolled:#?}");
    assert!(serving.iter().all(|t| t.is_healthy(true)), "{serving:#?}");

    // A broken update: its replica never passes the check; the rollout fails and goes back to version 1.
    let broken = examples().join("api-update/broken.yaml");
    let out = run(&["submit", broken.to_str().unwrap(), "--wait", "--timeout", "120s"]);
    assert_eq!(out.status.code(), Some(5), "a failed rollout exits 5: {}", text(&out));
    assert!(text(&out).contains("reverted to version 1"), "{}", text(&out));
    let j = until("the revert to succeed", 120, async || {
        job(&store).await.filter(|j| j.deployment.as_ref().is_some_and(|d| d.state == DeploymentState::Succeeded))
    })
    .await;
    assert_eq!((j.version, j.deployment.as_ref().and_then(|d| d.reverts)), (3, Some(1)));
    let failed = store.job_version("api", 2).await.unwrap().and_then(|j| j.deployment).expect("version 2 kept");
    assert_eq!(failed.state, DeploymentState::Failed);
    assert!(failed.message.contains("unhealthy"), "{}", failed.message);

    // The version-1 replicas ran through it all: same placement, same run, never stopped.
    let after = tasks(&store).await;
    for before in &serving {
        let t = after.iter().find(|t| t.id == before.id).unwrap_or_else(|| panic!("{} is still there", before.id));
        assert_eq!(
            (t.state, t.placements, t.node.as_deref()),
            (TaskState::Running, before.placements, before.node.as_deref())
        );
        assert_eq!(
            t.run.as_ref().map(|r| (r.restarts, r.started_at_ms)),
            before.run.as_ref().map(|r| (r.restarts, r.started_at_ms)),
            "{} was not restarted",
            t.id
        );
        assert_eq!(t.version, 3, "adopted by the revert");
    }
    until("the broken replica to be stopped", 60, async || {
        let ts = tasks(&store).await;
        ts.iter().all(|t| t.version == 3 || !t.state.holds_resources()).then_some(())
    })
    .await;
    let history = run(&["job", "history", "api"]);
    assert!(text(&history).contains("reverts to 1") && text(&history).contains("rollout failed"), "{}", text(&history));
    assert_eq!(run(&["audit"]).status.code(), Some(0));

    Command::new("kill").args(["-TERM", &cell.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cell.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "omega-cell stopped on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}
