//! Running the real omctl binary from tests: its exit code and output, with a hard limit on how long one run
//! may take, and helpers to put a cell into the state a test needs.
#![allow(dead_code)]

use omega::cell_state::CellSnapshot;
use omega::commit::{Claim, CommitConfig, CommitKind, Committer};
use omega::model::Task;
use omega::store::Store;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The longest any single omctl run may take in these tests.
pub const RUN_LIMIT: Duration = Duration::from_secs(60);

/// What one run of omctl did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "omctl failed: {self:?}");
        self
    }
}

/// omctl with `--etcd etcd` and `args`, its output piped, and no cell settings inherited from the environment.
pub fn omctl_command(etcd: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_omctl"));
    cmd.arg("--etcd")
        .arg(etcd)
        .args(args)
        .env_remove("OMEGA_ETCD")
        .env_remove("OMEGA_PREFIX")
        .env_remove("OMEGA_MAX_TXN_OPS")
        .env_remove(omega::failpoint::ENV_POINTS)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs omctl to completion (at most [`RUN_LIMIT`]), with `input` on stdin.
pub async fn omctl_with_input(etcd: &str, args: &[&str], input: Option<&str>) -> Run {
    let mut cmd = omctl_command(etcd, args);
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().expect("start omctl");
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // omctl may stop reading early (an input over its size limit): a closed pipe is its answer, not ours.
        if let Err(e) = stdin.write_all(text.as_bytes()).await {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
        }
        drop(stdin);
    }
    let out = tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("omctl {args:?} did not finish within {RUN_LIMIT:?}"))
        .expect("omctl ran");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub async fn omctl(etcd: &str, args: &[&str]) -> Run {
    omctl_with_input(etcd, args, None).await
}

pub fn endpoint(store: &Store) -> String {
    store.endpoints()[0].clone()
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, text).expect("write job file");
    path.to_string_lossy().into_owned()
}

pub fn batch_file(name: &str, tasks: u32, cpu: &str) -> String {
    format!("name: {name}\nkind: batch\ntasks: {tasks}\nresources: {{cpu: {cpu}, memory: 1Gi}}\nimage: busybox\n")
}

/// The cell as etcd holds it now.
pub async fn snapshot(store: &Store) -> CellSnapshot {
    let (kvs, revision) = store.list(&store.keys().cell_prefix(), 1000, None).await.expect("list the cell");
    CellSnapshot::from_kvs(store.keys(), &kvs, revision)
}

/// Places tasks `task ids -> nodes` with the library's committer, as a scheduler would.
pub async fn place(store: &Store, placements: &[(&str, &str)]) {
    let snap = snapshot(store).await;
    let claims: Vec<Claim> = placements
        .iter()
        .map(|(task, node)| Claim::new(snap.tasks.get(*task).expect("task exists").clone(), *node))
        .collect();
    let committer = Committer::new(store.clone(), CommitConfig { placed_by: "test/t-1".into(), ..Default::default() });
    let report = committer.commit(&snap, &claims, CommitKind::Incremental).await.expect("commit");
    assert_eq!(report.committed(), claims.len(), "{:?}", report.outcomes);
}

pub async fn task(store: &Store, id: &str) -> Task {
    store.get_json::<Task>(&store.keys().task(id)).await.unwrap().expect("task exists").0
}

/// Waits (bounded) until a process paused at failpoint `name` has created its marker in `dir`.
pub async fn wait_for_failpoint(dir: &Path, name: &str) {
    let marker = omega::failpoint::marker(dir, name);
    let deadline = Instant::now() + RUN_LIMIT;
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the process never reached failpoint {name}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
