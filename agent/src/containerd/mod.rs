//! The node agent's container runtime: containerd's gRPC API over its unix socket.
//!
//! One [`Containerd`] talks to one containerd daemon in one containerd namespace (every call carries the
//! `containerd-namespace` header; containerd keeps namespaces apart, so Omega's containers never mix with
//! anyone else's). The calls are the ones containerd's Go client makes, done by hand because containerd 1.6
//! has no higher-level service for them:
//!
//! ```text
//! run:    images.get -> content.read (index ->) manifest -> config -> chain id of the layers
//!         -> (first use only) unpack the layers into the snapshotter: prepare / diff.apply / commit
//!         -> snapshots.prepare(key = container id, parent = chain id)       under a containerd lease
//!         -> containers.create(OCI runtime spec built with oci-spec)         under the same lease
//!         -> tasks.create(rootfs mounts, stdout = stderr = file:///log)      -> tasks.wait (spawned) -> tasks.start
//! wait:   tasks.wait -> exit status, time; OOM kill from the container's memory cgroup (and /tasks/oom events)
//! stop:   tasks.kill(SIGTERM) -> grace -> tasks.kill(SIGKILL, all) -> the exit
//! remove: tasks.kill(SIGKILL) if alive -> tasks.delete (retried) -> containers.delete -> snapshots.remove
//! exec:   containers.get (its process spec) -> tasks.exec -> tasks.start -> tasks.wait (bounded; SIGKILL past
//!         it) -> tasks.delete_process                                      (exec health checks, `exec.rs`)
//! ```
//!
//! Choices worth knowing:
//! - **Idempotent `run`**: if a container with the id exists and its task is alive (running or paused), `run`
//!   refuses with [`Error::AlreadyRunning`] and leaves it alone (the caller adopts it, e.g. after an agent
//!   restart). If it exists but is not alive (exited, created but never started, or without a task), it is
//!   removed and created again: a half-made or finished container of the same id is never reused.
//! - **Logs** go to `file://<log_path>`, the same URI for stdout and stderr: the shim writes the file itself,
//!   so output keeps landing there across an agent restart (containerd's shim sends stderr to the stdout file
//!   anyway when both are `file://`). Two things about that file, both measured: lines of stdout and stderr
//!   arrive whole but in no guaranteed order between the two streams; and the shim may still be copying the
//!   last output when the exit is reported. It finishes (waiting up to 2 s) when the task is deleted, so the
//!   log is complete once [`Containerd::remove`] returns, not necessarily when [`Containerd::wait`] does.
//! - **Cgroups**: each container's cgroup is `<cgroup_parent>/<namespace>/<id>` (default parent `/omega`), set
//!   as `linux.cgroupsPath`, so the agent knows where to read it (on cgroup v1:
//!   `/sys/fs/cgroup/<controller>/omega/<namespace>/<id>`). CPU: `cpu_millis` becomes a CFS quota over a
//!   100 ms period and `cpu.shares = cpu_millis * 1024 / 1000`; memory: `memory.limit_in_bytes`, and the
//!   same value as the memory+swap limit where swap accounting exists, so a container cannot swap past it.
//! - **OOM kills** are read from the container's memory cgroup after the task exits and before it is
//!   deleted (`oom_kill` in `memory.oom_control` on cgroup v1, `memory.events` on v2): the kernel counts
//!   every kill there, synchronously, and the cgroup outlives the task until `tasks.delete`, so the answer is
//!   right even for a wait started after an agent restart. `/tasks/oom` events, which a background
//!   subscription records, are the second source (a containerd on another host, or a cgroup we cannot
//!   read). A container counts as OOM-killed if any of its processes was, as the CRI plugin reports it.
//! - **Network**: containers share the node's network namespace (host networking, no CNI): a task's ports are
//!   the node's, and the node's `/etc/resolv.conf` and `/etc/hosts` are bound in read-only (`spec.rs`).
//! - No call that goes to the network unwraps: every failure is an [`Error`] naming the call and the id.

mod cgroup;
mod error;
mod exec;
mod lifecycle;
mod spec;
mod unpack;
mod wait;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::types::v1::Status as TaskStatus;
use tokio::task::AbortHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::Request;

use cgroup::watch_oom_events;
pub use error::{Error, Result};
pub use exec::ExecOutcome;
use wait::Waiter;

/// The gRPC header containerd reads the namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// The gRPC header that puts what a call creates under a lease (protected from containerd's GC).
const LEASE_HEADER: &str = "containerd-lease";

/// What to run: one container for one placement of one task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Container id, e.g. `<job>-<index>-p<placement>`: letters, digits, `.`, `_`, `-`, at most 76 characters
    /// (containerd's identifier rules). Also the snapshot key and the last part of the cgroup path.
    pub id: String,
    /// Image reference as stored in containerd, e.g. `omega.local/busybox:latest`; it must already be there.
    pub image: String,
    /// Replaces the image's entrypoint and cmd when not empty.
    pub command: Vec<String>,
    /// Appended to `command`; when `command` is empty, replaces the image's cmd after its entrypoint.
    pub args: Vec<String>,
    /// Added to (and overriding) the image's environment.
    pub env: BTreeMap<String, String>,
    /// CPU limit in millicores (1000 = one core); 0 = unlimited.
    pub cpu_millis: u64,
    /// Memory limit in bytes; 0 = unlimited.
    pub memory_bytes: u64,
    /// Absolute path of the file stdout and stderr are appended to (created with its directory).
    pub log_path: PathBuf,
    /// containerd container labels (e.g. job, task index, placement), returned by [`Containerd::list`].
    pub labels: BTreeMap<String, String>,
}

/// How a container's main process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Exit status; 128 + signal number when killed by a signal (137 = SIGKILL).
    pub code: i32,
    /// Whether the kernel's OOM killer killed a process of the container.
    pub oom_killed: bool,
    /// When containerd saw the process exit, milliseconds since the Unix epoch.
    pub finished_at_ms: u64,
}

/// A container in the namespace, for reconciliation after an agent restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// Its task is alive (running or paused). A created-but-never-started task or an exited one is not.
    pub running: bool,
    /// The task's pid on the host, when a task exists.
    pub pid: Option<u32>,
    /// Where its task is in its life: after a crash the agent must tell a process that ran and exited (its
    /// exit is there to collect) from one that never started (it may be started).
    pub task: TaskPhase,
}

/// The life of a container's task, as containerd reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskPhase {
    /// The container has no task (never created, or already deleted).
    None,
    /// Created but never started.
    Created,
    /// Running or paused.
    Alive,
    /// Ran and exited; its exit status is kept until the task is deleted.
    Exited,
    /// A status containerd did not name.
    Unknown,
}

impl TaskPhase {
    fn of(status: i32) -> TaskPhase {
        match TaskStatus::try_from(status) {
            Ok(TaskStatus::Created) => TaskPhase::Created,
            Ok(TaskStatus::Running | TaskStatus::Paused | TaskStatus::Pausing) => TaskPhase::Alive,
            Ok(TaskStatus::Stopped) => TaskPhase::Exited,
            _ => TaskPhase::Unknown,
        }
    }
}

/// Settings beyond the socket and namespace. The defaults suit a Debian containerd 1.6 with runc.
#[derive(Clone, Debug)]
pub struct ContainerdOptions {
    /// Snapshotter holding image layers and container root filesystems (`overlayfs`; `native` always works).
    pub snapshotter: String,
    /// containerd runtime (shim) name.
    pub runtime: String,
    /// Parent of every container's cgroup; a container's cgroup is `<parent>/<namespace>/<id>`.
    pub cgroup_parent: String,
    /// Limit on each ordinary call (not on waiting for an exit).
    pub rpc_timeout: Duration,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        ContainerdOptions {
            snapshotter: "overlayfs".to_string(),
            runtime: "io.containerd.runc.v2".to_string(),
            cgroup_parent: "/omega".to_string(),
            rpc_timeout: Duration::from_secs(30),
        }
    }
}

struct Inner {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    namespace_header: MetadataValue<Ascii>,
    options: ContainerdOptions,
    /// One `tasks.wait` per container, started before `tasks.start` (or by the first `wait`/`stop` of a
    /// container this client did not start) and shared by every caller waiting for that container.
    waiters: Mutex<HashMap<String, Waiter>>,
    /// Container ids a `/tasks/oom` event named, with when it arrived (ms since the epoch).
    oom_events: Arc<Mutex<HashMap<String, u64>>>,
    events_task: AbortHandle,
    /// Serialises unpacking, so two runs of a new image do not both unpack it.
    unpack_lock: tokio::sync::Mutex<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.events_task.abort();
        for (_, waiter) in lock(&self.waiters).drain() {
            waiter.task.abort();
        }
    }
}

/// A client for one containerd namespace. Cheap to clone (the clones share the connection and the waiters).
#[derive(Clone)]
pub struct Containerd {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.inner.socket)
            .field("namespace", &self.inner.namespace)
            .field("options", &self.inner.options)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain maps behind, still consistent enough to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// containerd's identifier rule (namespaces, containers, leases): `[A-Za-z0-9]` then `[A-Za-z0-9._-]`, at
/// most 76 characters.
fn valid_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 76
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn check_id(id: &str) -> Result<()> {
    if valid_identifier(id) {
        Ok(())
    } else {
        Err(Error::InvalidSpec(format!(
            "container id {id:?} must be 1-76 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

impl Containerd {
    /// Connects to containerd's gRPC socket with the default [`ContainerdOptions`] and checks it answers.
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self> {
        Self::connect_with(socket, namespace, ContainerdOptions::default()).await
    }

    /// Connects with explicit options (snapshotter, runtime, cgroup parent, call timeout).
    ///
    /// The channel reconnects by itself if containerd restarts; the `/tasks/oom` subscription is restarted
    /// in the background when its stream breaks.
    pub async fn connect_with(socket: &Path, namespace: &str, options: ContainerdOptions) -> Result<Self> {
        if !valid_identifier(namespace) {
            return Err(Error::InvalidSpec(format!(
                "namespace {namespace:?} must be letters, digits, '.', '_' or '-', starting with a letter or digit"
            )));
        }
        let namespace_header = MetadataValue::try_from(namespace)
            .map_err(|e| Error::InvalidSpec(format!("namespace {namespace:?} cannot be a gRPC header: {e}")))?;
        let connect = containerd_client::connect(socket);
        let channel = match tokio::time::timeout(options.rpc_timeout, connect).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                let reason = match std::error::Error::source(&e) {
                    Some(source) => format!("{e}: {source}"),
                    None => e.to_string(),
                };
                return Err(Error::Connect { socket: socket.to_path_buf(), reason });
            }
            Err(_) => {
                return Err(Error::Connect {
                    socket: socket.to_path_buf(),
                    reason: format!("no connection within {:?}", options.rpc_timeout),
                })
            }
        };
        // The version call proves a containerd (not just any listener) is serving on the socket.
        let mut version = VersionClient::new(channel.clone());
        match tokio::time::timeout(options.rpc_timeout, version.version(())).await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                return Err(Error::Connect {
                    socket: socket.to_path_buf(),
                    reason: format!("version call failed: {:?}: {}", status.code(), status.message()),
                })
            }
            Err(_) => {
                return Err(Error::Connect {
                    socket: socket.to_path_buf(),
                    reason: format!("version call got no answer within {:?}", options.rpc_timeout),
                })
            }
        }
        let oom_events = Arc::new(Mutex::new(HashMap::new()));
        let events_task =
            tokio::spawn(watch_oom_events(channel.clone(), namespace.to_string(), oom_events.clone())).abort_handle();
        Ok(Containerd {
            inner: Arc::new(Inner {
                channel,
                socket: socket.to_path_buf(),
                namespace: namespace.to_string(),
                namespace_header,
                options,
                waiters: Mutex::new(HashMap::new()),
                oom_events,
                events_task,
                unpack_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The containerd namespace this client works in.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The snapshotter this client uses.
    pub fn snapshotter(&self) -> &str {
        &self.inner.options.snapshotter
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(NAMESPACE_HEADER, self.inner.namespace_header.clone());
        request
    }

    fn leased<T>(&self, message: T, lease: &MetadataValue<Ascii>) -> Request<T> {
        let mut request = self.request(message);
        request.metadata_mut().insert(LEASE_HEADER, lease.clone());
        request
    }

    /// Runs one unary call with the call timeout, turning a status into [`Error::Rpc`].
    async fn call<T>(
        &self,
        op: &'static str,
        id: &str,
        fut: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        let after = self.inner.options.rpc_timeout;
        match tokio::time::timeout(after, fut).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => {
                Err(Error::Rpc { op, id: id.to_string(), code: status.code(), message: status.message().to_string() })
            }
            Err(_) => Err(Error::Timeout { op, id: id.to_string(), after }),
        }
    }

    fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.inner.channel.clone())
    }

    fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.inner.channel.clone())
    }

    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.inner.channel.clone())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::lifecycle::run_lease_id;
    use super::*;

    #[test]
    fn identifiers() {
        assert!(valid_identifier("job-1-p0"));
        assert!(valid_identifier("a.b_c"));
        assert!(!valid_identifier("-x"));
        assert!(!valid_identifier("a/b"));
        assert!(!valid_identifier(&"x".repeat(77)));
        assert!(valid_identifier(&run_lease_id(&"x".repeat(76))));
    }
}
