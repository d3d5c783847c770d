//! The real `omega-agent` binary as a child process, pointed at a test's etcd and private containerd, with
//! failpoints when a test wants to stop it at one step. SIGKILLed by `kill()` or when dropped; a failing test
//! prints the tail of its log.

#![allow(dead_code)]

use super::daemon::TestDaemon;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// How to start one agent process.
pub struct AgentOptions<'a> {
    pub etcd: Vec<String>,
    pub node: &'a str,
    pub daemon: &'a TestDaemon,
    /// Where task logs go (`<log_dir>/<job>/<index>.log`).
    pub log_dir: &'a Path,
    /// The agent's own log and the failpoint markers go here.
    pub work: &'a Path,
    pub lease_ttl: &'a str,
    pub grace: &'a str,
}

pub struct AgentProc {
    child: Option<Child>,
    log: PathBuf,
}

impl AgentProc {
    /// Starts the agent; each of `failpoints` pauses it the first time it is reached (see `omega::failpoint`),
    /// its marker appearing in [`failpoint_dir`].
    pub fn start(o: &AgentOptions<'_>, name: &str, failpoints: &[&str]) -> AgentProc {
        Self::start_with(o, name, failpoints, &[])
    }

    /// [`start`](Self::start) with more flags (TLS, say).
    pub fn start_with(o: &AgentOptions<'_>, name: &str, failpoints: &[&str], extra: &[String]) -> AgentProc {
        let log = o.work.join(format!("agent-{name}.log"));
        let out = std::fs::File::create(&log).expect("create the agent's log file");
        let port = omega::etcd_process::free_port().expect("a free port for the log service");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_omega-agent"));
        cmd.arg("--etcd")
            .arg(o.etcd.join(","))
            .args(["--node", o.node, "--cpu", "2", "--memory", "2Gi"])
            .args(["--lease-ttl", o.lease_ttl, "--grace", o.grace])
            .arg("--containerd-socket")
            .arg(&o.daemon.socket)
            .args(["--namespace", &o.daemon.namespace, "--snapshotter", &o.daemon.snapshotter])
            .arg("--log-dir")
            .arg(o.log_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove(omega::failpoint::ENV_POINTS)
            .env_remove(omega::failpoint::ENV_DIR)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log file"))
            .stderr(out);
        if !failpoints.is_empty() {
            let dir = failpoint_dir(o.work);
            std::fs::create_dir_all(&dir).expect("create the failpoint directory");
            let points: Vec<String> = failpoints.iter().map(|p| format!("{p}=pause")).collect();
            cmd.env(omega::failpoint::ENV_POINTS, points.join(",")).env(omega::failpoint::ENV_DIR, dir);
        }
        let child = cmd.spawn().expect("start omega-agent");
        AgentProc { child: Some(child), log }
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- {} (last 60 lines) ---", self.log.display());
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// Where paused failpoints put their markers.
pub fn failpoint_dir(work: &Path) -> PathBuf {
    work.join("failpoints")
}
