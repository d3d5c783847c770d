//! Containers and their tasks, from creation to removal. The agent may die between any two calls, so each
//! step accepts what an interrupted earlier one left behind (a half-made container, a leftover snapshot or
//! lease, a task nobody deleted), and `run` cleans up what it made itself when it fails part way, so a retry
//! or the next agent starts from a state it knows.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest, DeleteTaskRequest,
    GetContainerRequest, GetRequest as GetTaskRequest, KillRequest, ListContainersRequest, ListTasksRequest,
    ResumeTaskRequest, StartRequest, UpdateContainerRequest,
};
use containerd_client::types::v1::Status as TaskStatus;
use containerd_client::types::Mount;
use sha2::{Digest as _, Sha256};
use tonic::metadata::{Ascii, MetadataValue};

use super::spec::{check_spec, file_uri, SPEC_TYPE_URL};
use super::unpack::ResolvedImage;
use super::{check_id, hex, lock, ContainerInfo, ContainerSpec, Containerd, Error, Exit, Result, TaskPhase};

/// How long a SIGKILLed task gets to be reported gone before `stop`/`remove` give up.
const KILL_TIMEOUT: Duration = Duration::from_secs(15);
/// `tasks.delete` attempts in `delete_task` (which `remove` calls): a delete racing the shim's exit handling fails transiently, and a
/// task that is never deleted leaks its shim process and its rootfs mount.
const DELETE_ATTEMPTS: u32 = 6;
const SIGTERM: u32 = 15;
pub(super) const SIGKILL: u32 = 9;

impl Containerd {
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

    /// Sets one label of container `id`, leaving the others as they are. A label written this way outlives the
    /// agent process (it is containerd's record), so it can say what happened to a container while no etcd
    /// record could.
    pub async fn set_label(&self, id: &str, key: &str, value: &str) -> Result<()> {
        check_id(id)?;
        let container = Container {
            id: id.to_string(),
            labels: [(key.to_string(), value.to_string())].into(),
            ..Default::default()
        };
        let mask = prost_types::FieldMask { paths: vec![format!("labels.{key}")] };
        let request = UpdateContainerRequest { container: Some(container), update_mask: Some(mask) };
        self.call("containers.update", id, self.containers().update(self.request(request))).await?;
        Ok(())
    }

    /// The labels of container `id`, or `None` when there is no such container.
    pub async fn labels(&self, id: &str) -> Result<Option<BTreeMap<String, String>>> {
        check_id(id)?;
        let request = GetContainerRequest { id: id.to_string() };
        match self.call("containers.get", id, self.containers().get(self.request(request))).await {
            Ok(r) => Ok(r.container.map(|c| c.labels.into_iter().collect())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
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
pub(super) fn run_lease_id(id: &str) -> String {
    format!("omega-run-{}", &hex(&Sha256::digest(id.as_bytes()))[..24])
}
