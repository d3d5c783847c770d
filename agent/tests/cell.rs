//! The one-command local cell, as a new user runs it: up, an example job runs in a real container to
//! completion with its log readable, and SIGTERM leaves no process behind.

use omega::etcd_process::free_port;
use omega::keys::Keys;
use omega::model::{Job, JobState, SchedulerInstance, Task, TaskState};
use omega::proto::logs::logs_client::LogsClient;
use omega::proto::logs::TailRequest;
use omega::store::Store;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What omega-cell prints until it says it submitted the example (`hello`), waiting at most `secs`.
fn banner(cell: &mut std::process::Child, secs: u64) -> Vec<String> {
    let stdout = cell.stdout.take().expect("omega-cell's stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut banner = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let submitted = line.starts_with("Submitted hello");
                banner.push(line);
                if submitted {
                    return banner;
                }
            }
            Err(_) => assert!(Instant::now() < deadline, "the cell came up: {banner:#?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_cell_runs_an_example_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let example = dir.path().join("hello.yaml");
    std::fs::write(
        &example,
        "name: hello\nkind: batch\ntasks: 2\nresources: {cpu: 100m, memory: 32Mi}\nimage: omega.local/busybox:latest\n\
         command: [\"sh\", \"-c\", \"echo hello from the cell\"]\n",
    )
    .unwrap();
    let (port, metrics, logs_port) = (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
    let mut cell = Command::new(env!("CARGO_BIN_EXE_omega-cell"))
        .args(["--port", &port.to_string(), "--metrics-port", &metrics.to_string()])
        .args(["--logs-port", &logs_port.to_string(), "--example", example.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start omega-cell");
    let banner = banner(&mut cell, 60);
    assert!(banner.iter().any(|l| l.contains("node `local`")), "a real node with containerd: {banner:#?}");

    // The example runs to completion on the real node, and its log is served.
    let endpoint = format!("http://127.0.0.1:{port}");
    let store = Store::connect(std::slice::from_ref(&endpoint), Keys::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (kvs, _) = store.list(&store.keys().tasks_of_job("hello"), 100, None).await.unwrap();
        let tasks: Vec<Task> = kvs.iter().map(|kv| serde_json::from_slice(kv.value()).unwrap()).collect();
        if tasks.len() == 2 && tasks.iter().all(|t| t.state == TaskState::Succeeded) {
            assert!(tasks.iter().all(|t| t.node.as_deref() == Some("local")), "{tasks:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the example succeeded: {tasks:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The controller marks the job finished, and the scheduler's record shows the work it did.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = store.get_json::<Job>(&store.keys().job("hello")).await.unwrap().map(|(j, _)| j.state);
        let (kvs, _) = store.list(&store.keys().schedulers_prefix(), 100, None).await.unwrap();
        let placed: u64 =
            kvs.iter().map(|kv| serde_json::from_slice::<SchedulerInstance>(kv.value()).unwrap().stats.placed).sum();
        if job == Some(JobState::Succeeded) && placed >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "job hello is {job:?}, schedulers placed {placed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = LogsClient::connect(format!("http://127.0.0.1:{logs_port}")).await.unwrap();
    let mut stream =
        client.tail(TailRequest { task: "hello/1".into(), follow: false, offset: 0 }).await.unwrap().into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        text.extend_from_slice(&chunk.data);
    }
    assert_eq!(String::from_utf8_lossy(&text).trim(), "hello from the cell");

    // The real omctl against the real cell (built beside omega-cell by `cargo test --workspace`).
    let omctl = std::path::Path::new(env!("CARGO_BIN_EXE_omega-cell")).with_file_name("omctl");
    assert!(
        omctl.exists(),
        "omctl not built next to omega-cell ({}): run the tests with `cargo test --workspace`",
        omctl.display()
    );
    let run = |args: &[&str]| Command::new(&omctl).args(args).env("OMEGA_ETCD", &endpoint).output().unwrap();
    let logs = run(&["logs", "hello/0", "-f"]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout).trim(), "hello from the cell");
    assert!(String::from_utf8_lossy(&logs.stderr).contains("succeeded, exit code 0"));
    assert_eq!(logs.status.code(), Some(0));
    let jobs = run(&["jobs", "-o", "json"]);
    assert!(
        String::from_utf8_lossy(&jobs.stdout).contains("\"id\": \"hello\""),
        "{}",
        String::from_utf8_lossy(&jobs.stdout)
    );
    assert_eq!(run(&["audit"]).status.code(), Some(0));
    // `omctl schedulers` shows the work the batch scheduler did (from its record's counters).
    let schedulers = run(&["schedulers", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&schedulers.stdout).unwrap();
    let batch = listed["schedulers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scheduler"] == "batch")
        .unwrap_or_else(|| panic!("the batch scheduler is listed: {listed}"));
    assert!(batch["attempts"].as_u64().unwrap_or(0) >= 1, "{batch}");
    assert!(batch["placed"].as_u64().unwrap_or(0) >= 2, "{batch}");
    assert_eq!(run(&["logs", "nosuch/0"]).status.code(), Some(1));

    // SIGTERM: everything it started stops.
    let pid = cell.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = cell.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "omega-cell stopped on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "etcd is gone");
    assert!(std::net::TcpStream::connect(("127.0.0.1", metrics)).is_err(), "the batch scheduler is gone");
    let leftovers = Command::new("pgrep").args(["-f", &format!("127.0.0.1:{port}")]).output().unwrap();
    assert!(String::from_utf8_lossy(&leftovers.stdout).trim().is_empty(), "no process of this cell is left");
}

/// `omega-cell --secure`: etcd requires client certificates and checks roles, each component runs on its own
/// certificate, and the banner's `export` line is all omctl needs; without it omctl is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_local_cell_runs_an_example_with_every_component_on_its_own_identity() {
    let dir = tempfile::tempdir().unwrap();
    let example = dir.path().join("hello.yaml");
    std::fs::write(
        &example,
        "name: hello\nkind: batch\ntasks: 2\nresources: {cpu: 100m, memory: 32Mi}\nimage: omega.local/busybox:latest\n\
         command: [\"sh\", \"-c\", \"echo hello from a secure cell\"]\n",
    )
    .unwrap();
    let (port, metrics, logs_port) = (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
    let mut cell = Command::new(env!("CARGO_BIN_EXE_omega-cell"))
        .args(["--secure", "--port", &port.to_string(), "--metrics-port", &metrics.to_string()])
        .args(["--logs-port", &logs_port.to_string(), "--example", example.to_str().unwrap()])
        .arg("--data-dir")
        .arg(dir.path().join("cell"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start omega-cell --secure");
    let banner = banner(&mut cell, 90);
    // The banner's export line: OMEGA_ETCD=https://... and the operator's certificate.
    let export = banner.iter().find(|l| l.trim_start().starts_with("export OMEGA_ETCD=")).expect("an export line");
    let env: Vec<(String, String)> = export
        .trim_start()
        .trim_start_matches("export ")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    assert_eq!(env.len(), 4, "{export}");
    assert!(env[0].1.starts_with("https://"), "{export}");
    let omctl = std::path::Path::new(env!("CARGO_BIN_EXE_omega-cell")).with_file_name("omctl");
    let run = |args: &[&str]| Command::new(&omctl).args(args).envs(env.iter().cloned()).output().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = run(&["tasks", "--job", "hello", "-o", "json"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.matches("\"succeeded\"").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the example succeeded: {text}{}", String::from_utf8_lossy(&out.stderr));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = run(&["logs", "hello/0"]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout).trim(), "hello from a secure cell", "{logs:?}");
    assert_eq!(run(&["audit"]).status.code(), Some(0));
    // Without the certificates omctl is refused, in one line.
    let plain = Command::new(&omctl).args(["--etcd", &env[0].1, "jobs"]).env_clear().output().unwrap();
    assert_eq!(plain.status.code(), Some(1), "{plain:?}");
    assert!(String::from_utf8_lossy(&plain.stderr).contains("--cacert"), "{plain:?}");
    // Nobody in the cell was refused by etcd.
    let cell_logs = dir.path().join("cell/logs");
    for entry in std::fs::read_dir(&cell_logs).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(!text.contains("permission denied"), "{}:\n{text}", path.display());
    }

    Command::new("kill").args(["-TERM", &cell.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = cell.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "omega-cell stopped on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
}
