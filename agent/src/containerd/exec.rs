//! Running a command inside a container's running task (containerd's `tasks.exec`), for exec health checks.
//!
//! ```text
//! containers.get (the container's OCI spec: its process as the base) -> tasks.exec(exec id, process with
//! the command's args, stdout = stderr = file://<output>) -> tasks.start -> tasks.wait (bounded by the
//! timeout; past it tasks.kill SIGKILL and wait again) -> tasks.delete_process -> read <output>, remove it
//! ```
//!
//! The command runs as the container's own process does (its user, environment, working directory,
//! capabilities and limits), so a check sees what the service sees. Its exec process is deleted whatever
//! happened, since an exec process nobody deletes stays in the shim until the container's task goes. The
//! output file is read only after the delete, which is what waits for the shim to finish copying it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use containerd_client::services::v1::{
    DeleteProcessRequest, ExecProcessRequest, GetContainerRequest, KillRequest, StartRequest, WaitRequest,
};
use oci_spec::runtime::Spec;

use super::lifecycle::SIGKILL;
use super::spec::file_uri;
use super::{check_id, Containerd, Error, Result};

/// `type_url` containerd expects for an OCI process spec carried as JSON.
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// How much of a command's output is kept (its end: where an error usually is).
const KEEP_OUTPUT: usize = 512;
/// How long a SIGKILLed exec process gets to be reported gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Exec ids in this process: unique per client, and with the time in them, unique across agent restarts.
static NEXT_EXEC: AtomicU64 = AtomicU64::new(0);

/// How an exec'd command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Its exit status (128 + signal when killed); `None` when it ran past the timeout and was killed.
    pub code: Option<i32>,
    /// The end of what it wrote to stdout and stderr, trimmed.
    pub output: String,
}

impl Containerd {
    /// Runs `command` in container `id`'s running task, waits at most `timeout` for it (then kills it), and
    /// returns how it ended. `output` is a file path on this host the shim writes the command's output to; it
    /// is read and removed. A command that cannot be started (not found, the task is not running) is an
    /// error, as is containerd failing.
    pub async fn exec(&self, id: &str, command: &[String], timeout: Duration, output: &Path) -> Result<ExecOutcome> {
        check_id(id)?;
        if command.is_empty() {
            return Err(Error::InvalidSpec(format!("exec in {id:?}: empty command")));
        }
        let process = self.exec_process(id, command).await?;
        let exec_id = format!("check-{}-{}", super::now_ms(), NEXT_EXEC.fetch_add(1, Ordering::Relaxed));
        // A file left by an exec that died with an agent would be appended to (the shim opens it O_APPEND).
        let _ = std::fs::remove_file(output);
        let uri = file_uri(output);
        let request = ExecProcessRequest {
            container_id: id.to_string(),
            stdin: String::new(),
            stdout: uri.clone(),
            stderr: uri,
            terminal: false,
            spec: Some(prost_types::Any { type_url: PROCESS_TYPE_URL.to_string(), value: process }),
            exec_id: exec_id.clone(),
        };
        self.call("tasks.exec", id, self.tasks().exec(self.request(request))).await?;
        let ran = self.start_and_wait(id, &exec_id, timeout).await;
        let deleted = self.delete_process(id, &exec_id).await;
        let text = read_end(output);
        let _ = std::fs::remove_file(output);
        let code = ran?;
        deleted?;
        Ok(ExecOutcome { code, output: text })
    }

    /// The container's process spec with `command` as its arguments, as JSON.
    async fn exec_process(&self, id: &str, command: &[String]) -> Result<Vec<u8>> {
        let request = GetContainerRequest { id: id.to_string() };
        let container = self.call("containers.get", id, self.containers().get(self.request(request))).await?;
        let bad = |reason: String| Error::Spec { id: id.to_string(), reason };
        let spec = container
            .container
            .and_then(|c| c.spec)
            .ok_or_else(|| bad("the container has no OCI spec to take the exec's process from".into()))?;
        let spec: Spec = serde_json::from_slice(&spec.value).map_err(|e| bad(format!("its OCI spec: {e}")))?;
        let mut process = spec.process().clone().unwrap_or_default();
        process.set_args(Some(command.to_vec()));
        process.set_terminal(Some(false));
        serde_json::to_vec(&process).map_err(|e| bad(format!("the exec's process spec: {e}")))
    }

    /// Starts exec `exec_id` and waits for it: its exit status, or `None` if it outran `timeout` and was
    /// killed.
    async fn start_and_wait(&self, id: &str, exec_id: &str, timeout: Duration) -> Result<Option<i32>> {
        let start = StartRequest { container_id: id.to_string(), exec_id: exec_id.to_string() };
        self.call("tasks.start (exec)", id, self.tasks().start(self.request(start))).await?;
        match tokio::time::timeout(timeout, self.wait_exec(id, exec_id)).await {
            Ok(code) => code.map(Some),
            Err(_) => {
                let kill = KillRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    signal: SIGKILL,
                    all: false,
                };
                match self.call("tasks.kill (exec)", id, self.tasks().kill(self.request(kill))).await {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
                match tokio::time::timeout(KILL_TIMEOUT, self.wait_exec(id, exec_id)).await {
                    Ok(code) => code.map(|_| None),
                    Err(_) => Err(Error::Timeout {
                        op: "tasks.wait (exec) after SIGKILL",
                        id: id.to_string(),
                        after: KILL_TIMEOUT,
                    }),
                }
            }
        }
    }

    async fn wait_exec(&self, id: &str, exec_id: &str) -> Result<i32> {
        let request = WaitRequest { container_id: id.to_string(), exec_id: exec_id.to_string() };
        match self.tasks().wait(self.request(request)).await {
            Ok(r) => Ok(r.into_inner().exit_status as i32),
            Err(status) => Err(Error::Rpc {
                op: "tasks.wait (exec)",
                id: id.to_string(),
                code: status.code(),
                message: status.message().to_string(),
            }),
        }
    }

    async fn delete_process(&self, id: &str, exec_id: &str) -> Result<()> {
        let request = DeleteProcessRequest { container_id: id.to_string(), exec_id: exec_id.to_string() };
        match self.call("tasks.delete_process", id, self.tasks().delete_process(self.request(request))).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The last [`KEEP_OUTPUT`] bytes of the file, trimmed (empty if there is none).
fn read_end(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let tail = &bytes[bytes.len().saturating_sub(KEEP_OUTPUT)..];
    String::from_utf8_lossy(tail).trim().to_string()
}
