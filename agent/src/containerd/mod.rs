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
//! - **Network**: containers get their own network namespace with only loopback (no CNI here).
//! - No call that goes to the network unwraps: every failure is an [`Error`] naming the call and the id.

mod cgroup;
mod error;
mod spec;
mod unpack;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest, DeleteTaskRequest,
    GetContainerRequest, GetRequest as GetTaskRequest, KillRequest, ListContainersRequest, ListTasksRequest,
    ResumeTaskRequest, StartRequest, WaitRequest,
};
use containerd_client::types::v1::Status as TaskStatus;
use containerd_client::types::Mount;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request};

use cgroup::watch_oom_events;
pub use error::{Error, Result};
use spec::{check_spec, file_uri, SPEC_TYPE_URL};
use unpack::ResolvedImage;

/// The gRPC header containerd reads the namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// The gRPC header that puts what a call creates under a lease (protected from containerd's GC).
const LEASE_HEADER: &str = "containerd-lease";
/// How long a SIGKILLed task gets to be reported gone before `stop`/`remove` give up.
const KILL_TIMEOUT: Duration = Duration::from_secs(15);
/// `tasks.delete` attempts in `remove`: a delete racing the shim's exit handling fails transiently, and a
/// task that is never deleted leaks its shim process and its rootfs mount.
const DELETE_ATTEMPTS: u32 = 6;
const SIGTERM: u32 = 15;
const SIGKILL: u32 = 9;

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

/// What a spawned `tasks.wait` produced: the exit, or the status code and message it failed with.
type WaitOutcome = std::result::Result<RawExit, (Code, String)>;

#[derive(Clone, Copy, Debug)]
struct RawExit {
    code: u32,
    exited_at_ms: u64,
}

struct Waiter {
    rx: watch::Receiver<Option<WaitOutcome>>,
    task: AbortHandle,
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

fn timestamp_ms(ts: Option<&prost_types::Timestamp>) -> u64 {
    match ts {
        Some(t) if t.seconds > 0 => t.seconds as u64 * 1000 + (t.nanos.max(0) as u64) / 1_000_000,
        _ => now_ms(),
    }
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

    // ----- containers and tasks -----

    /// The task of container `id`, or `None` when there is no container or no task.
    async fn task(&self, id: &str) -> Result<Option<containerd_client::types::v1::Process>> {
        let request = GetTaskRequest { container_id: id.to_string(), exec_id: String::new() };
        match self.call("tasks.get", id, self.tasks().get(self.request(request))).await {
            Ok(r) => Ok(r.process),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn container_exists(&self, id: &str) -> Result<bool> {
        let request = GetContainerRequest { id: id.to_string() };
        match self.call("containers.get", id, self.containers().get(self.request(request))).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates and starts container `spec.id`; returns its host pid once it runs.
    ///
    /// If a container with this id exists and is alive, this fails with [`Error::AlreadyRunning`] and
    /// touches nothing; if it exists but is not alive, it is removed and created again. A failure part way
    /// cleans up what this call created, so a retry starts from nothing.
    pub async fn run(&self, spec: &ContainerSpec) -> Result<u32> {
        check_spec(spec)?;
        let id = spec.id.as_str();
        let task = self.task(id).await?;
        if let Some(task) = &task {
            if is_alive(task.status) {
                return Err(Error::AlreadyRunning { id: id.to_string(), pid: task.pid });
            }
        }
        if task.is_some() || self.container_exists(id).await? {
            self.remove(id).await?;
        } else {
            // A snapshot (or lease) of a run that died before its container was created.
            self.remove_snapshot(id).await?;
        }

        let image = self.resolve_image(&spec.image).await?;
        self.ensure_unpacked(&image).await?;
        let oci = self.build_spec(spec, &image)?;
        let spec_json =
            serde_json::to_vec(&oci).map_err(|e| Error::Spec { id: id.to_string(), reason: e.to_string() })?;

        // The snapshot is made under a lease so containerd's GC cannot take it before the container record
        // (which then references it) exists; the lease is dropped once the container holds the snapshot.
        let lease_id = run_lease_id(id);
        let lease = self.create_lease(&lease_id).await?;
        let created = self.create_container(spec, &image, spec_json, &lease).await;
        let dropped = self.delete_lease(&lease_id).await;
        let mounts = match created {
            Ok(mounts) => mounts,
            Err(e) => {
                let _ = self.remove(id).await;
                return Err(e);
            }
        };
        if let Err(e) = dropped {
            let _ = self.remove(id).await;
            return Err(e);
        }

        match self.create_and_start_task(spec, mounts).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                let _ = self.remove(id).await;
                Err(e)
            }
        }
    }

    async fn create_container(
        &self,
        spec: &ContainerSpec,
        image: &ResolvedImage,
        spec_json: Vec<u8>,
        lease: &MetadataValue<Ascii>,
    ) -> Result<Vec<Mount>> {
        let id = spec.id.as_str();
        let top = image.chain_ids.last().cloned().unwrap_or_default();
        let prepare = PrepareSnapshotRequest {
            snapshotter: self.inner.options.snapshotter.clone(),
            key: id.to_string(),
            parent: top,
            labels: HashMap::new(),
        };
        let mounts =
            self.call("snapshots.prepare", id, self.snapshots().prepare(self.leased(prepare, lease))).await?.mounts;
        let container = Container {
            id: id.to_string(),
            labels: spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            image: spec.image.clone(),
            runtime: Some(Runtime { name: self.inner.options.runtime.clone(), options: None }),
            spec: Some(prost_types::Any { type_url: SPEC_TYPE_URL.to_string(), value: spec_json }),
            snapshotter: self.inner.options.snapshotter.clone(),
            snapshot_key: id.to_string(),
            ..Default::default()
        };
        let request = CreateContainerRequest { container: Some(container) };
        self.call("containers.create", id, self.containers().create(self.leased(request, lease))).await?;
        Ok(mounts)
    }

    async fn create_and_start_task(&self, spec: &ContainerSpec, mounts: Vec<Mount>) -> Result<u32> {
        let id = spec.id.as_str();
        if let Some(dir) = spec.log_path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|source| Error::Io { what: format!("creating log directory {}", dir.display()), source })?;
        }
        let log_uri = file_uri(&spec.log_path);
        let create = CreateTaskRequest {
            container_id: id.to_string(),
            rootfs: mounts,
            stdout: log_uri.clone(),
            stderr: log_uri,
            ..Default::default()
        };
        self.call("tasks.create", id, self.tasks().create(self.request(create))).await?;
        lock(&self.inner.oom_events).remove(id);
        // The wait is issued before the task starts (containerd would also keep the exit status of a task that
        // ended before anyone waited, until the task is deleted; waiting first just never depends on that).
        self.fresh_waiter(id);
        let start = StartRequest { container_id: id.to_string(), exec_id: String::new() };
        let started = self.call("tasks.start", id, self.tasks().start(self.request(start))).await?;
        Ok(started.pid)
    }

    // ----- waiting -----

    /// Starts a `tasks.wait` for `id` and makes it the one callers share (replacing any older one).
    fn fresh_waiter(&self, id: &str) -> watch::Receiver<Option<WaitOutcome>> {
        let (tx, rx) = watch::channel(None);
        let mut tasks = self.tasks();
        let request = self.request(WaitRequest { container_id: id.to_string(), exec_id: String::new() });
        let task = tokio::spawn(async move {
            let outcome = match tasks.wait(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    Ok(RawExit { code: r.exit_status, exited_at_ms: timestamp_ms(r.exited_at.as_ref()) })
                }
                Err(status) => Err((status.code(), status.message().to_string())),
            };
            let _ = tx.send(Some(outcome));
        })
        .abort_handle();
        if let Some(old) = lock(&self.inner.waiters).insert(id.to_string(), Waiter { rx: rx.clone(), task }) {
            old.task.abort();
        }
        rx
    }

    /// The shared `tasks.wait` for `id`, started now if there is none (or the last one failed).
    fn waiter(&self, id: &str) -> watch::Receiver<Option<WaitOutcome>> {
        let usable = {
            let waiters = lock(&self.inner.waiters);
            waiters.get(id).and_then(|w| {
                let outcome = w.rx.borrow();
                let failed = matches!(&*outcome, Some(Err(_)));
                let aborted = outcome.is_none() && w.task.is_finished();
                (!failed && !aborted).then(|| w.rx.clone())
            })
        };
        usable.unwrap_or_else(|| self.fresh_waiter(id))
    }

    /// Waits for the exit `rx` reports. A wait that failed transiently (containerd restarting: the shim
    /// keeps the task) or was replaced (another caller restarted it, `run` re-created the task) is picked up
    /// again from the shared waiter, a bounded number of times.
    async fn await_exit(&self, id: &str, mut rx: watch::Receiver<Option<WaitOutcome>>) -> Result<RawExit> {
        let mut retries = 0u32;
        loop {
            // Err: the waiter was aborted without an answer (replaced, removed, or the client dropped).
            let outcome = rx.wait_for(Option::is_some).await.ok().and_then(|v| v.clone());
            match outcome {
                Some(Ok(exit)) => return Ok(exit),
                Some(Err((Code::NotFound, _))) => {
                    self.forget_waiter(id, &rx);
                    return Err(Error::NotFound { id: id.to_string() });
                }
                Some(Err((code, message)))
                    if retries >= 5
                        || !matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal) =>
                {
                    self.forget_waiter(id, &rx);
                    return Err(Error::Rpc { op: "tasks.wait", id: id.to_string(), code, message });
                }
                None if retries >= 5 => return Err(Error::NotFound { id: id.to_string() }),
                failed => {
                    retries += 1;
                    if failed.is_some() {
                        tracing::debug!(container = id, ?failed, "tasks.wait failed; waiting again");
                        tokio::time::sleep(Duration::from_millis(250 * u64::from(retries))).await;
                    }
                    // The shared waiter: a fresh one unless another caller already restarted it.
                    rx = self.waiter(id);
                }
            }
        }
    }

    /// Drops the map entry of a waiter that ended in an error, if it is still the current one.
    fn forget_waiter(&self, id: &str, rx: &watch::Receiver<Option<WaitOutcome>>) {
        let mut waiters = lock(&self.inner.waiters);
        if waiters.get(id).is_some_and(|w| w.rx.same_channel(rx)) {
            waiters.remove(id);
        }
    }

    /// Waits until container `id`'s task exits and returns how; returns at once for a task that already
    /// exited (also one that exited while no agent was watching: containerd keeps the status until the task
    /// is deleted). [`Error::NotFound`] if there is no task. Call it before [`remove`](Self::remove): the OOM
    /// verdict is read from the task's cgroup, which `remove` deletes. The log file may still lack the last
    /// output at this point; it is complete after `remove`.
    pub async fn wait(&self, id: &str) -> Result<Exit> {
        check_id(id)?;
        let rx = self.waiter(id);
        let raw = self.await_exit(id, rx).await?;
        Ok(self.exit_of(id, raw).await)
    }

    async fn exit_of(&self, id: &str, raw: RawExit) -> Exit {
        let code = raw.code as i32;
        let from_cgroup = self.cgroup_oom_kills(id);
        let mut oom_killed = from_cgroup.is_some_and(|n| n > 0) || self.oom_event_seen(id);
        if !oom_killed && from_cgroup.is_none() && code == 128 + SIGKILL as i32 {
            // No cgroup to read (remote containerd, or already deleted): the OOM event may trail the exit.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.oom_event_seen(id) {
                    oom_killed = true;
                    break;
                }
            }
        }
        Exit { code, oom_killed, finished_at_ms: raw.exited_at_ms }
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let request = KillRequest { container_id: id.to_string(), exec_id: String::new(), signal, all };
        match self.call("tasks.kill", id, self.tasks().kill(self.request(request))).await {
            Ok(_) => Ok(()),
            // Already exited (containerd says "process already finished" as NotFound).
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stops container `id`: SIGTERM to its main process, up to `grace` for it to exit, then SIGKILL to
    /// every process in it. Returns the exit, or `None` if it was not running (no container, no task, or
    /// already exited). The container and its task stay until [`remove`](Self::remove).
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<Option<Exit>> {
        check_id(id)?;
        let Some(task) = self.task(id).await? else { return Ok(None) };
        let status = TaskStatus::try_from(task.status).unwrap_or(TaskStatus::Unknown);
        if matches!(status, TaskStatus::Stopped | TaskStatus::Unknown) {
            return Ok(None);
        }
        if matches!(status, TaskStatus::Paused | TaskStatus::Pausing) {
            // A frozen process would not take the signal until thawed.
            let resume = ResumeTaskRequest { container_id: id.to_string() };
            let _ = self.call("tasks.resume", id, self.tasks().resume(self.request(resume))).await;
        }
        let rx = self.waiter(id);
        if status == TaskStatus::Created || grace.is_zero() {
            self.kill(id, SIGKILL, true).await?;
        } else {
            self.kill(id, SIGTERM, false).await?;
            if let Ok(result) = tokio::time::timeout(grace, self.await_exit(id, rx.clone())).await {
                let raw = result?;
                return Ok(Some(self.exit_of(id, raw).await));
            }
            self.kill(id, SIGKILL, true).await?;
        }
        match tokio::time::timeout(KILL_TIMEOUT, self.await_exit(id, rx)).await {
            Ok(result) => Ok(Some(self.exit_of(id, result?).await)),
            Err(_) => Err(Error::Timeout { op: "tasks.wait after SIGKILL", id: id.to_string(), after: KILL_TIMEOUT }),
        }
    }

    /// Deletes container `id` entirely: kills its task if alive, deletes the task (retried: a task never
    /// deleted leaks its shim and rootfs mount), the container, its snapshot and any lease of its run.
    /// Absent pieces are fine: removing twice, or removing what never existed, is `Ok`. Once it returns, the
    /// log file is complete (deleting the task is what waits for the shim's output copy).
    pub async fn remove(&self, id: &str) -> Result<()> {
        self.delete_task(id).await?;
        let request = DeleteContainerRequest { id: id.to_string() };
        match self.call("containers.delete", id, self.containers().delete(self.request(request))).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        self.remove_snapshot(id).await
    }

    /// Deletes container `id`'s task (killing it first if alive; retried), keeping the container record and
    /// its snapshot. This is the step that ends the task's exit status in containerd: the agent takes it only
    /// once that exit is recorded elsewhere. No task is `Ok`.
    pub async fn delete_task(&self, id: &str) -> Result<()> {
        check_id(id)?;
        let mut last_error = None;
        for attempt in 0..DELETE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
            }
            let task = match self.task(id).await {
                Ok(Some(task)) => task,
                Ok(None) => {
                    last_error = None;
                    break;
                }
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            let status = TaskStatus::try_from(task.status).unwrap_or(TaskStatus::Unknown);
            if status != TaskStatus::Stopped {
                if let Err(e) = self.stop(id, Duration::ZERO).await {
                    last_error = Some(e);
                    continue;
                }
            }
            let request = DeleteTaskRequest { container_id: id.to_string() };
            match self.call("tasks.delete", id, self.tasks().delete(self.request(request))).await {
                Ok(_) => {
                    last_error = None;
                    break;
                }
                Err(e) if e.is_not_found() => {
                    last_error = None;
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(e) = last_error {
            return Err(e);
        }
        if let Some(w) = lock(&self.inner.waiters).remove(id) {
            w.task.abort();
        }
        lock(&self.inner.oom_events).remove(id);
        Ok(())
    }

    async fn remove_snapshot(&self, id: &str) -> Result<()> {
        let request =
            RemoveSnapshotRequest { snapshotter: self.inner.options.snapshotter.clone(), key: id.to_string() };
        match self.call("snapshots.remove", id, self.snapshots().remove(self.request(request))).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        self.delete_lease(&run_lease_id(id)).await
    }

    /// Every container in the namespace with its task's state, for reconciliation after an agent restart.
    pub async fn list(&self) -> Result<Vec<ContainerInfo>> {
        let containers = self
            .call("containers.list", "*", self.containers().list(self.request(ListContainersRequest::default())))
            .await?
            .containers;
        let tasks =
            self.call("tasks.list", "*", self.tasks().list(self.request(ListTasksRequest::default()))).await?.tasks;
        // containerd 1.6 fills in only `id` (the init process's id, which is the container id).
        let tasks: HashMap<String, containerd_client::types::v1::Process> = tasks
            .into_iter()
            .map(|t| (if t.container_id.is_empty() { t.id.clone() } else { t.container_id.clone() }, t))
            .collect();
        let mut out: Vec<ContainerInfo> = containers
            .into_iter()
            .map(|c| {
                let task = tasks.get(&c.id);
                ContainerInfo {
                    running: task.is_some_and(|t| is_alive(t.status)),
                    pid: task.map(|t| t.pid).filter(|p| *p > 0),
                    task: task.map_or(TaskPhase::None, |t| TaskPhase::of(t.status)),
                    labels: c.labels.into_iter().collect(),
                    id: c.id,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

fn is_alive(status: i32) -> bool {
    matches!(TaskStatus::try_from(status), Ok(TaskStatus::Running | TaskStatus::Paused | TaskStatus::Pausing))
}

/// The lease a run's snapshot is created under. Lease ids follow the identifier rules (76 characters), so
/// the container id is hashed rather than embedded.
fn run_lease_id(id: &str) -> String {
    format!("omega-run-{}", &hex(&Sha256::digest(id.as_bytes()))[..24])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
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
