//! The records Omega keeps in etcd, one type per key kind (see [`crate::keys`] for where each lives).
//!
//! Values are JSON so that `etcdctl watch --prefix /omega/` reads as prose. Every field that a later version
//! might add carries `#[serde(default)]`, so an older reader still decodes a newer record.

use crate::deployment::{Deployment, UpdatePolicy};
use crate::discovery::ServiceSpec;
use crate::events::TaskEvent;
use crate::health::{Health, HealthCheck};
use crate::resources::Resources;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, the time format of every record.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A machine that can run tasks: what it is. What is claimed on it lives in its [`Allocation`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub capacity: Resources,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the node's agent serves (logs, ...), if it serves anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default)]
    pub registered_at_ms: u64,
}

/// The liveness record of a node, bound to its agent's lease: when the lease lapses etcd deletes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Liveness {
    pub node: String,
    /// The lease that keeps this key alive (hex, as `etcdctl lease list` shows it).
    pub lease: String,
    #[serde(default)]
    pub since_ms: u64,
}

/// A node's resource ledger: its capacity and the sum of what is claimed on it.
///
/// This one key is what the commit protocol compares and rewrites on every claim: its mod_revision is the
/// node's sequence number (Omega's coarse conflict detection), and its content is the fresh state a fine check
/// needs. Capacity is kept here, not only in [`Node`], so that a claim's compare covers capacity changes too.
///
/// It holds sums, not the list of tasks: it is rewritten by every claim on the node, so its size is what every
/// claim pays in etcd. Which tasks are on the node is in the tasks themselves (`Task::node`, written in the
/// same transaction), and the audit checks that the sums match them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub node: String,
    pub capacity: Resources,
    /// Sum of the resources of the tasks placed here.
    pub used: Resources,
    /// How many tasks are placed here.
    #[serde(default)]
    pub tasks: u32,
    /// False while the node is drained or down: nothing new may be claimed on it.
    #[serde(default = "default_true")]
    pub schedulable: bool,
}

fn default_true() -> bool {
    true
}

impl Allocation {
    /// An empty ledger for a newly registered node.
    pub fn empty(node: &str, capacity: Resources) -> Self {
        Allocation { node: node.to_string(), capacity, used: Resources::ZERO, tasks: 0, schedulable: true }
    }

    /// Whether `request` fits on this node now (the one fit function).
    pub fn fits(&self, request: Resources) -> Result<(), crate::resources::Dimension> {
        Resources::fit(self.capacity, self.used, request)
    }

    pub fn free(&self) -> Resources {
        Resources::free(self.capacity, self.used)
    }

    /// Records a claim. The caller has checked fit; this only keeps the sums.
    pub fn add(&mut self, request: Resources) {
        self.used = self.used.saturating_add(request);
        self.tasks = self.tasks.saturating_add(1);
    }

    /// Releases a claim. The caller guarantees (by comparing the task in the same transaction) that the task
    /// held it, so a claim is never released twice.
    pub fn remove(&mut self, request: Resources) {
        self.used = self.used.saturating_sub(request);
        self.tasks = self.tasks.saturating_sub(1);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Batch,
    Service,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Some tasks are not yet placed.
    Pending,
    /// Every task is placed or running.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Whether the job is over (nothing will be placed for it again).
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// A submitted job: what to run, how many, where it may go, and who schedules it.
///
/// This is the validated form of a job file (`omega::job_spec` parses the YAML people write).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// The namespace the job belongs to (`default` unless its file says otherwise): whose quota its tasks
    /// count against. Job ids are unique across the cell, not per namespace.
    #[serde(default = "default_namespace", skip_serializing_if = "is_default_namespace")]
    pub namespace: String,
    pub kind: JobKind,
    /// The scheduler that owns this job's placements (like Kubernetes' `schedulerName`).
    pub scheduler: String,
    #[serde(default)]
    pub priority: i32,
    /// Number of tasks (batch) or replicas (service).
    pub tasks: u32,
    /// What each task asks for.
    pub resources: Resources,
    /// All tasks are placed together or not at all (batch only).
    #[serde(default)]
    pub gang: bool,
    pub state: JobState,
    #[serde(default)]
    pub submitted_at_ms: u64,
    /// When the job reached `succeeded`, `failed` or `cancelled` (what garbage collection counts from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Container image (a name known to the node's containerd).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// Replaces the image's entrypoint when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Every constraint must hold on a node for a task to go there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// Spread the tasks evenly over the values of this node label (e.g. `zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    /// No two tasks of this job on one node.
    #[serde(default)]
    pub anti_affinity: bool,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// What a task does while its node's agent is cut off from etcd (default: it is stopped).
    #[serde(default, skip_serializing_if = "OnDisconnect::is_stop")]
    pub on_disconnect: OnDisconnect,
    /// How long a task runs on a simulated node (real nodes run the command until it exits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Probes the agent runs against each task; a task is healthy when all pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<HealthCheck>,
    /// Named host ports the tasks listen on (tasks share the node's network; nothing is allocated).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// Services the tasks offer on those ports, published while a task is running and healthy
    /// ([`crate::discovery`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
    /// How a new version of a service replaces the running one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdatePolicy>,
    /// Which version of the job this record is: 0 when first submitted, one more on each changed submission.
    /// Earlier versions are kept at `<prefix>versions/<job>/<version>`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u32,
    /// This version was fully rolled out and healthy once (what `auto_revert` goes back to).
    #[serde(default, skip_serializing_if = "is_false")]
    pub stable: bool,
    /// The rollout of this version, while it runs and after it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<Deployment>,
    /// One past the highest task index the job ever used (0: `tasks`). An update starts new replicas at fresh
    /// indexes beside the old ones; indexes are never reused, so no container or record of a retired task can
    /// be mistaken for a new one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub index_end: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
/// The namespace of a job whose file names none.
pub const DEFAULT_NAMESPACE: &str = "default";

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

fn is_default_namespace(ns: &str) -> bool {
    ns == DEFAULT_NAMESPACE
}

/// A namespace's quota, at `<prefix>cell/quotas/<namespace>`: at most this much held at once by its tasks
/// (assigned or running). A namespace without one is not limited.
///
/// Use is not stored here: it is the sum over the namespace's tasks, which every cache keeps as it applies
/// changes. Instead every claim in the namespace compares this record's mod_revision and rewrites it (with
/// `last_claim`), so claims racing in one namespace serialize on it as claims on one node serialize on its
/// ledger, and none can be decided on a use older than the last claim's. Releases do not touch it: they only
/// lower the use, so a claim checked against a use read before a release errs on the safe side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub namespace: String,
    /// CPU in millicores; `None`: not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Tasks holding resources at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<u64>,
    /// The guaranteed share: work of other namespaces never preempts this namespace's tasks below this much
    /// CPU (millicores) and memory held. Its own higher-priority work may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guaranteed_cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guaranteed_memory_bytes: Option<u64>,
    /// The claim that last rewrote the record (who, when): what makes racing claims conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_claim: Option<QuotaClaim>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaClaim {
    pub by: String,
    pub at_ms: u64,
}

/// What a namespace's tasks hold now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceUse {
    pub resources: Resources,
    pub tasks: u64,
}

impl NamespaceUse {
    pub fn add(&mut self, r: Resources) {
        self.resources = self.resources.saturating_add(r);
        self.tasks += 1;
    }
    pub fn remove(&mut self, r: Resources) {
        self.resources = self.resources.saturating_sub(r);
        self.tasks = self.tasks.saturating_sub(1);
    }
}

/// Which limit of a quota a claim would pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaDimension {
    Cpu,
    Memory,
    Tasks,
}

impl std::fmt::Display for QuotaDimension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuotaDimension::Cpu => "cpu",
            QuotaDimension::Memory => "memory",
            QuotaDimension::Tasks => "tasks",
        })
    }
}

impl Quota {
    pub fn new(namespace: &str) -> Quota {
        Quota {
            namespace: namespace.to_string(),
            cpu_millis: None,
            memory_bytes: None,
            tasks: None,
            guaranteed_cpu_millis: None,
            guaranteed_memory_bytes: None,
            last_claim: None,
        }
    }

    /// Whether one more task asking `request` fits beside `used`; else the first limit it would pass.
    pub fn fits(&self, used: &NamespaceUse, request: Resources) -> Result<(), QuotaDimension> {
        let over = |limit: Option<u64>, used: u64, more: u64| limit.is_some_and(|l| used.saturating_add(more) > l);
        if over(self.cpu_millis, used.resources.cpu_millis, request.cpu_millis) {
            return Err(QuotaDimension::Cpu);
        }
        if over(self.memory_bytes, used.resources.memory_bytes, request.memory_bytes) {
            return Err(QuotaDimension::Memory);
        }
        if over(self.tasks, used.tasks, 1) {
            return Err(QuotaDimension::Tasks);
        }
        Ok(())
    }

    /// How much of `used` other namespaces' work may preempt: what it holds above its guaranteed share
    /// (`None` in a dimension without a guarantee: all of it).
    pub fn preemptible(&self, used: &NamespaceUse) -> (Option<u64>, Option<u64>) {
        (
            self.guaranteed_cpu_millis.map(|g| used.resources.cpu_millis.saturating_sub(g)),
            self.guaranteed_memory_bytes.map(|g| used.resources.memory_bytes.saturating_sub(g)),
        )
    }

    /// How many more tasks asking `request` fit beside `used` (`u64::MAX` when nothing limits them).
    pub fn room_for(&self, used: &NamespaceUse, request: Resources) -> u64 {
        let per = |limit: Option<u64>, used: u64, each: u64| match limit {
            None => u64::MAX,
            Some(l) if each == 0 => {
                if used <= l {
                    u64::MAX
                } else {
                    0
                }
            }
            Some(l) => l.saturating_sub(used) / each,
        };
        per(self.cpu_millis, used.resources.cpu_millis, request.cpu_millis)
            .min(per(self.memory_bytes, used.resources.memory_bytes, request.memory_bytes))
            .min(per(self.tasks, used.tasks, 1))
    }

    /// The limits in words, e.g. `cpu 8, memory 16 GiB, 20 tasks`.
    pub fn describe_limits(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = self.cpu_millis {
            parts.push(format!("cpu {}", crate::units::show::cpu(c)));
        }
        if let Some(m) = self.memory_bytes {
            parts.push(format!("memory {}", crate::units::show::memory(m)));
        }
        if let Some(t) = self.tasks {
            parts.push(format!("{t} tasks"));
        }
        if let Some(c) = self.guaranteed_cpu_millis {
            parts.push(format!("guaranteed cpu {}", crate::units::show::cpu(c)));
        }
        if let Some(m) = self.guaranteed_memory_bytes {
            parts.push(format!("guaranteed memory {}", crate::units::show::memory(m)));
        }
        if parts.is_empty() {
            "no limits".into()
        } else {
            parts.join(", ")
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Job {
    /// A pending job with the defaults of its kind: scheduled by the scheduler named like the kind, restarted
    /// never (batch) or always (service), no constraints.
    pub fn new(id: &str, kind: JobKind, tasks: u32, resources: Resources) -> Job {
        Job {
            id: id.to_string(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            kind,
            scheduler: kind.default_scheduler().to_string(),
            priority: 0,
            tasks,
            resources,
            gang: false,
            state: JobState::Pending,
            submitted_at_ms: now_ms(),
            finished_at_ms: None,
            image: String::new(),
            command: Vec::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            constraints: Vec::new(),
            spread: None,
            anti_affinity: false,
            restart: RestartPolicy {
                mode: match kind {
                    JobKind::Batch => RestartMode::Never,
                    JobKind::Service => RestartMode::Always,
                },
                ..RestartPolicy::default()
            },
            on_disconnect: OnDisconnect::Stop,
            duration_ms: None,
            checks: Vec::new(),
            ports: BTreeMap::new(),
            services: Vec::new(),
            update: None,
            version: 0,
            stable: false,
            deployment: None,
            index_end: 0,
        }
    }

    /// One past the highest task index in use: tasks live at indexes below this (with gaps where an update
    /// retired replicas).
    pub fn index_end(&self) -> u32 {
        self.index_end.max(self.tasks)
    }

    /// What a task of this job becomes when its node can no longer run it (the node was lost, or its agent
    /// fenced itself): pending again for its scheduler, unless the job is a batch job that never restarts,
    /// whose task ends `lost` (running it again would break "never").
    pub fn state_after_node_loss(&self) -> TaskState {
        match (self.kind, self.restart.mode) {
            (JobKind::Batch, RestartMode::Never) => TaskState::Lost,
            _ => TaskState::Pending,
        }
    }
}

/// What a job's tasks do while their node's agent cannot reach etcd (a network partition, etcd down).
///
/// The agent cannot tell a partition from a dead cell, and the controller on the other side cannot tell it
/// from a dead node: once the node's lease expires (and the controller's grace has passed) the tasks are
/// placed elsewhere. Like Nomad's `stop_after_client_disconnect`, the default stops them first, so a task
/// never runs twice; a job may rather keep running and accept that a replacement overlaps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// Stopped (SIGTERM, the agent's grace, SIGKILL) before the node's lease can expire; handed back to its
    /// scheduler once etcd is reachable again, unless the controller did that first.
    #[default]
    Stop,
    /// Keeps running through the disconnect. If it lasts past the lease and the controller's grace, the task
    /// is placed elsewhere too and both run until the agent is back and stops this one.
    KeepRunning,
}

impl OnDisconnect {
    pub fn is_stop(&self) -> bool {
        *self == OnDisconnect::Stop
    }
}

impl JobKind {
    /// The scheduler a job of this kind goes to when its file names none.
    pub fn default_scheduler(self) -> &'static str {
        match self {
            JobKind::Batch => "batch",
            JobKind::Service => "service",
        }
    }
}

/// A condition on a node label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Constraint {
    /// The label is present and equals `value`.
    Equals { label: String, value: String },
    /// The label is present and is one of `values`.
    In { label: String, values: Vec<String> },
    /// The label is absent or is none of `values`.
    NotIn { label: String, values: Vec<String> },
}

impl Constraint {
    pub fn label(&self) -> &str {
        match self {
            Constraint::Equals { label, .. } | Constraint::In { label, .. } | Constraint::NotIn { label, .. } => label,
        }
    }

    /// Whether a node with these labels satisfies the constraint.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Constraint::Equals { label, value } => labels.get(label) == Some(value),
            Constraint::In { label, values } => labels.get(label).is_some_and(|v| values.contains(v)),
            Constraint::NotIn { label, values } => labels.get(label).is_none_or(|v| !values.contains(v)),
        }
    }
}

impl std::fmt::Display for Constraint {
    /// The form pending reasons use: `zone=b`, `zone in (a,b)`, `zone notin (c)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Constraint::Equals { label, value } => write!(f, "{label}={value}"),
            Constraint::In { label, values } => write!(f, "{label} in ({})", values.join(",")),
            Constraint::NotIn { label, values } => write!(f, "{label} notin ({})", values.join(",")),
        }
    }
}

/// When a finished task is started again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartMode {
    /// Never (the batch default).
    #[default]
    Never,
    /// After a failure, up to `max_restarts` times.
    OnFailure,
    /// After any exit (the service default).
    Always,
}

/// A job's restart policy: which exits restart a task, how often, and how long to wait between tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    #[serde(default)]
    pub mode: RestartMode,
    /// Restarts allowed per task before it is left failed (`0` with `always`: unlimited).
    #[serde(default)]
    pub max_restarts: u32,
    /// Wait before the first restart; doubles on each further one, up to a minute.
    #[serde(default = "default_restart_backoff_ms")]
    pub backoff_ms: u64,
}

fn default_restart_backoff_ms() -> u64 {
    1000
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy { mode: RestartMode::Never, max_restarts: 0, backoff_ms: default_restart_backoff_ms() }
    }
}

/// The life of a task. Resources are held exactly in `Assigned` and `Running`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Lost,
    Killed,
}

impl TaskState {
    /// Whether a task in this state holds a claim in its node's [`Allocation`].
    pub fn holds_resources(self) -> bool {
        matches!(self, TaskState::Assigned | TaskState::Running)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Lost | TaskState::Killed)
    }

    /// The transitions the state machine allows; anything else is a bug in the writer.
    pub fn can_become(self, next: TaskState) -> bool {
        use TaskState::*;
        match (self, next) {
            (Pending, Assigned) | (Pending, Killed) => true,
            (Assigned, Running) | (Assigned, Pending) => true,
            (Assigned | Running, Succeeded | Failed | Lost | Killed) => true,
            // An evicted or lost task goes back to pending for its scheduler.
            (Running, Pending) | (Lost, Pending) | (Failed, Pending) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Lost => "lost",
            TaskState::Killed => "killed",
        };
        f.write_str(s)
    }
}

/// One task of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// `<job>/<index>`.
    pub id: String,
    pub job: String,
    /// Its job's namespace, copied at submission: the cache sums each namespace's use from its tasks alone,
    /// and a task outlives its job record while it is being collected.
    #[serde(default = "default_namespace", skip_serializing_if = "is_default_namespace")]
    pub namespace: String,
    pub index: u32,
    pub resources: Resources,
    pub state: TaskState,
    /// The node holding its claim while `Assigned`/`Running`; the last node afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The scheduler instance that placed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placed_by: Option<String>,
    #[serde(default)]
    pub priority: i32,
    /// How many times a claim for this task was committed (restarts and re-placements count).
    #[serde(default)]
    pub placements: u32,
    /// Why it is in its state, in words (pending reasons, failure causes, "preempted by ...").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Tasks this task's placement evicted (set on the preemptor, so both sides of a preemption show).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preempted: Vec<String>,
    /// What the node's agent reported about the process, once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunInfo>,
    #[serde(default)]
    pub updated_at_ms: u64,
    /// The job version this task runs (see [`Job::version`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u32,
    /// Its checks' verdict while running (absent: the job has no checks, or the run has not been probed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Its timeline, bounded and coalesced ([`crate::events`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<TaskEvent>,
}

impl Task {
    /// A new pending task of `job`.
    pub fn pending(job: &Job, index: u32) -> Self {
        Task {
            id: crate::keys::task_id(&job.id, index),
            job: job.id.clone(),
            namespace: job.namespace.clone(),
            index,
            resources: job.resources,
            state: TaskState::Pending,
            node: None,
            placed_by: None,
            priority: job.priority,
            placements: 0,
            reason: None,
            preempted: Vec::new(),
            run: None,
            updated_at_ms: now_ms(),
            version: job.version,
            health: None,
            events: Vec::new(),
        }
    }

    /// Appends to the task's timeline (coalescing a repeat of the last event).
    pub fn record_event(&mut self, kind: crate::events::EventKind, message: impl Into<String>, at_ms: u64) {
        crate::events::push(&mut self.events, kind, message, at_ms);
    }

    /// Whether the task serves: running, and passing its checks if its job has any (`has_checks`).
    pub fn is_healthy(&self, has_checks: bool) -> bool {
        self.state == TaskState::Running
            && (!has_checks || self.health.as_ref().is_some_and(|h| h.status == crate::health::HealthStatus::Healthy))
    }

    /// The task as a committed claim leaves it: assigned to `node` by `placed_by` at `at_ms`, one placement
    /// more, no reason, no preemptions (the commit names those it made).
    pub fn assigned(&self, node: &str, placed_by: &str, at_ms: u64) -> Task {
        Task {
            state: TaskState::Assigned,
            node: Some(node.to_string()),
            placed_by: Some(placed_by.to_string()),
            placements: self.placements + 1,
            reason: None,
            health: None,
            preempted: Vec::new(),
            updated_at_ms: at_ms,
            ..self.clone()
        }
    }
}

/// A node being drained, at `<prefix>cell/drains/<node>`: what the controller migrates off it, and by when.
///
/// Migrate-first: each service replica on the node gets a replacement placed elsewhere, and the old one is
/// stopped only once its replacement is healthy (at most the job's `update.max_parallel` at a time). At the
/// deadline whatever is still on the node is stopped: services are handed back to their schedulers, batch
/// tasks end as on a lost node. A deadline means what it says (nomad #9902).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub node: String,
    pub started_ms: u64,
    pub deadline_ms: u64,
    pub state: DrainState,
    /// Old task -> its replacement, while the replacement is not yet healthy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub migrations: BTreeMap<String, String>,
    /// Replicas moved so far (replacement healthy, old one stopped).
    #[serde(default)]
    pub moved: u32,
    /// Tasks stopped at the deadline.
    #[serde(default)]
    pub forced: u32,
    /// Tasks still on the node when last looked at.
    #[serde(default)]
    pub remaining: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainState {
    Draining,
    /// Nothing is left on the node.
    Complete,
    /// `omctl drain --undo` during the drain: replacements not yet healthy are stopped, the record removed.
    Cancelled,
}

impl std::fmt::Display for DrainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrainState::Draining => "draining",
            DrainState::Complete => "complete",
            DrainState::Cancelled => "cancelled",
        })
    }
}

/// A task's process as its agent saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The container (or simulated run) id on the node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default)]
    pub started_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The kernel killed it for exceeding its memory limit.
    #[serde(default)]
    pub oom_killed: bool,
    /// Restarts on this placement so far.
    #[serde(default)]
    pub restarts: u32,
}

/// The scheduler instance that currently places a job's tasks. Bound to the instance's lease: when the
/// instance dies, the key goes and another instance of the same scheduler takes the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOwner {
    pub job: String,
    pub scheduler: String,
    pub instance: String,
    #[serde(default)]
    pub since_ms: u64,
}

/// A running scheduler instance, bound to its lease (what `omctl schedulers` lists).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerInstance {
    pub scheduler: String,
    pub instance: String,
    /// The kind of jobs it takes, as readers older than the `scheduler_kind` field understand it. A
    /// monolithic instance takes both kinds and writes `batch` here (this field cannot say `monolithic` without
    /// making the record undecodable for those readers); read [`SchedulerInstance::kind_of_scheduler`].
    pub kind: JobKind,
    /// What the instance is: batch, service or monolithic. Absent in records of schedulers older than the
    /// monolithic one, whose `kind` then says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_kind: Option<SchedulerKind>,
    /// The etcd lock every attempt of this instance holds (`--lock`, the pessimistic baseline), by name; absent
    /// for the optimistic schedulers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
    #[serde(default)]
    pub started_ms: u64,
    /// Where its Prometheus metrics are served, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Its counters since it started, republished every few seconds while they move (what `omctl schedulers`
    /// shows without scraping every instance's metrics).
    #[serde(default)]
    pub stats: SchedulerStats,
}

impl SchedulerInstance {
    /// What the instance is, from `scheduler_kind` when the record has it, else from `kind` (an older record,
    /// which only batch and service schedulers wrote).
    pub fn kind_of_scheduler(&self) -> SchedulerKind {
        self.scheduler_kind.unwrap_or(match self.kind {
            JobKind::Batch => SchedulerKind::Batch,
            JobKind::Service => SchedulerKind::Service,
        })
    }
}

/// Which scheduler an instance is: one of Omega's two (batch, service), or the paper's monolithic baseline, one
/// scheduler that takes the jobs of both kinds in one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Batch,
    Service,
    Monolithic,
}

impl SchedulerKind {
    /// The scheduler name an instance of this kind answers to when it is given none (what jobs address).
    pub fn default_name(self) -> &'static str {
        match self {
            SchedulerKind::Batch => JobKind::Batch.default_scheduler(),
            SchedulerKind::Service => JobKind::Service.default_scheduler(),
            SchedulerKind::Monolithic => "monolithic",
        }
    }
}

/// A scheduler instance's counters since it started.
///
/// The Omega paper's **transactions** are the jobs of attempts that sent at least one claim: an attempt over a
/// job whose decision placed nothing (it fits nowhere) is an attempt, not a transaction, so
/// `attempts_conflicted <= transactions <= attempts`. A transaction conflicted if any of its claims did.
/// Fields added after the first version default to 0, so a record of an older scheduler still decodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerStats {
    /// Jobs attempted, one per job per attempt.
    pub attempts: u64,
    /// Transactions with at least one conflicted claim.
    pub attempts_conflicted: u64,
    /// Attempts that sent at least one claim (the paper's transactions).
    #[serde(default)]
    pub transactions: u64,
    /// Claims sent, and how many of them conflicted.
    pub claims: u64,
    pub claims_conflicted: u64,
    /// Tasks placed (claims committed).
    pub placed: u64,
    /// Time spent deciding (the paper's busyness, useful and wasted), and committing.
    pub busy_ms: u64,
    pub commit_ms: u64,
    /// Time spent waiting for the cell lock (`--lock`, the pessimistic baseline): queueing, not busyness.
    #[serde(default)]
    pub lock_wait_ms: u64,
    /// The sum of the waits from submission to the first attempt at a job, and how many jobs it sums over
    /// (their ratio is the paper's mean "job wait time till first attempt", for readers without Prometheus).
    #[serde(default)]
    pub first_attempt_wait_ms_sum: u64,
    #[serde(default)]
    pub first_attempts: u64,
    /// When these counters were taken.
    pub updated_ms: u64,
}

impl SchedulerStats {
    /// The Omega paper's conflict fraction: conflicted transactions per successful one (`None` before any
    /// successful transaction). It can exceed 1.
    pub fn conflict_fraction(&self) -> Option<f64> {
        conflict_fraction(self.attempts_conflicted, self.transactions)
    }

    /// The mean wait from submission to the first attempt, in milliseconds (`None` before any first attempt).
    pub fn mean_first_attempt_wait_ms(&self) -> Option<f64> {
        (self.first_attempts > 0).then(|| self.first_attempt_wait_ms_sum as f64 / self.first_attempts as f64)
    }
}

/// `conflicted / (transactions - conflicted)`: the paper's conflict fraction from any pair of counts (an
/// instance's, or sums over job statuses). `None` while no transaction has succeeded.
pub fn conflict_fraction(conflicted: u64, transactions: u64) -> Option<f64> {
    let successful = transactions.saturating_sub(conflicted);
    (successful > 0).then(|| conflicted as f64 / successful as f64)
}

/// Why a job's tasks are not all placed: written by its scheduler only when the reason changes (or at most
/// every few seconds), never once per attempt, so an unplaceable job costs etcd almost nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job: String,
    /// Tasks still pending after the last attempt.
    pub pending: u32,
    /// The reason in words, e.g. "0/120 nodes: 80 insufficient memory, 40 constraint zone=b".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Stable reason codes -> node counts, for scripts (`insufficient_memory`, `constraint`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reasons: BTreeMap<String, u32>,
    /// Placement attempts so far, and how many of them hit a conflict.
    #[serde(default)]
    pub attempts: u64,
    #[serde(default)]
    pub conflicts: u64,
    #[serde(default)]
    pub last_attempt_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scheduler_instance: String,
}

/// What an agent reads to know it must run a task: written in the same transaction as the claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub task: String,
    pub job: String,
    pub node: String,
    pub resources: Resources,
    /// Which placement of the task this is (the task's `placements` at commit), so an agent can tell a
    /// re-placement on the same node from the assignment it already runs.
    pub placement: u32,
    pub placed_by: String,
    pub assigned_at_ms: u64,
    /// Tasks this placement evicted from the node (preemption). Their ledger share was handed to this task in
    /// the claim's transaction, but their containers take up to their grace period to stop: the agent starts
    /// this task only once none of them runs on the node any more, so the node never holds both in fact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
}

impl Assignment {
    /// What `node`'s agent runs for a task a claim just placed there ([`Task::assigned`]), once the tasks
    /// `after` names have stopped.
    pub fn of(task: &Task, node: &str, placed_by: &str, at_ms: u64, after: Vec<String>) -> Assignment {
        Assignment {
            task: task.id.clone(),
            job: task.job.clone(),
            node: node.to_string(),
            resources: task.resources,
            placement: task.placements,
            placed_by: placed_by.to_string(),
            assigned_at_ms: at_ms,
            after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_keeps_its_sums() {
        let mut a = Allocation::empty("n", Resources::new(1000, 1000));
        a.add(Resources::new(300, 100));
        a.add(Resources::new(200, 100));
        assert_eq!((a.used, a.tasks), (Resources::new(500, 200), 2));
        a.remove(Resources::new(300, 100));
        assert_eq!((a.used, a.tasks), (Resources::new(200, 100), 1));
        assert_eq!(a.fits(Resources::new(800, 900)), Ok(()));
        assert!(a.fits(Resources::new(801, 0)).is_err());
    }

    #[test]
    fn records_read_as_json_and_tolerate_missing_fields() {
        let a: Allocation = serde_json::from_str(
            r#"{"node":"n","capacity":{"cpu_millis":1,"memory_bytes":2},"used":{"cpu_millis":0,"memory_bytes":0}}"#,
        )
        .unwrap();
        assert!(a.schedulable);
        assert_eq!(a.tasks, 0);
        let s = serde_json::to_string(&TaskState::Assigned).unwrap();
        assert_eq!(s, "\"assigned\"");
    }

    #[test]
    fn constraints_match_labels() {
        let labels: BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
        let eq = |v: &str| Constraint::Equals { label: "zone".into(), value: v.into() };
        assert!(eq("a").matches(&labels));
        assert!(!eq("b").matches(&labels));
        let within = Constraint::In { label: "zone".into(), values: vec!["a".into(), "b".into()] };
        assert!(within.matches(&labels));
        let not_in = Constraint::NotIn { label: "zone".into(), values: vec!["a".into()] };
        assert!(!not_in.matches(&labels));
        let absent = Constraint::NotIn { label: "disk".into(), values: vec!["hdd".into()] };
        assert!(absent.matches(&labels), "notin holds on nodes without the label");
        assert!(!Constraint::In { label: "disk".into(), values: vec!["ssd".into()] }.matches(&labels));
        assert_eq!(within.to_string(), "zone in (a,b)");
        assert_eq!(eq("b").to_string(), "zone=b");
        let json = serde_json::to_string(&within).unwrap();
        assert_eq!(json, r#"{"op":"in","label":"zone","values":["a","b"]}"#);
    }

    #[test]
    fn state_machine() {
        use TaskState::*;
        assert!(Pending.can_become(Assigned));
        assert!(Assigned.can_become(Running));
        assert!(Running.can_become(Succeeded));
        assert!(!Succeeded.can_become(Running));
        assert!(!Pending.can_become(Running));
        assert!(Assigned.holds_resources() && Running.holds_resources());
        assert!(!Pending.holds_resources() && !Succeeded.holds_resources());
    }

    #[test]
    fn an_older_scheduler_record_still_decodes() {
        // What a scheduler from before transactions, first-attempt waits, the lock and the monolithic kind wrote.
        let old = r#"{"scheduler":"service","instance":"s-1","kind":"service","started_ms":5,
            "stats":{"attempts":10,"attempts_conflicted":2,"claims":30,"claims_conflicted":4,"placed":26,
                     "busy_ms":7,"commit_ms":3,"updated_ms":9}}"#;
        let i: SchedulerInstance = serde_json::from_str(old).unwrap();
        assert_eq!(i.kind_of_scheduler(), SchedulerKind::Service);
        assert_eq!((i.stats.transactions, i.stats.first_attempts, i.stats.lock_wait_ms), (0, 0, 0));
        assert_eq!(i.lock, None);
        // And a monolithic record reads as one, while older readers still find a job kind in `kind`.
        let new = SchedulerInstance { scheduler_kind: Some(SchedulerKind::Monolithic), kind: JobKind::Batch, ..i };
        let json = serde_json::to_value(&new).unwrap();
        assert_eq!((json["kind"].as_str(), json["scheduler_kind"].as_str()), (Some("batch"), Some("monolithic")));
        assert_eq!(
            serde_json::from_value::<SchedulerInstance>(json).unwrap().kind_of_scheduler(),
            SchedulerKind::Monolithic
        );
    }

    #[test]
    fn the_conflict_fraction_is_conflicted_per_successful_transaction() {
        let stats = |transactions, attempts_conflicted| SchedulerStats {
            attempts: 100,
            transactions,
            attempts_conflicted,
            ..Default::default()
        };
        assert_eq!(stats(40, 8).conflict_fraction(), Some(0.25), "8 conflicted per 32 successful");
        assert_eq!(stats(30, 20).conflict_fraction(), Some(2.0), "it can exceed 1");
        assert_eq!(stats(5, 5).conflict_fraction(), None, "no successful transaction yet");
        assert_eq!(stats(0, 0).conflict_fraction(), None, "attempts that sent nothing are no transactions");
        let waits = SchedulerStats { first_attempt_wait_ms_sum: 300, first_attempts: 4, ..Default::default() };
        assert_eq!(waits.mean_first_attempt_wait_ms(), Some(75.0));
        assert_eq!(SchedulerStats::default().mean_first_attempt_wait_ms(), None);
    }
}
