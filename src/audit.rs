//! The cell's invariants, checked on one consistent read of etcd.
//!
//! This is how we know optimistic concurrency did its job: whatever schedulers raced, at any single revision
//! no node is over-committed, every placed task is on exactly one node (its own record names one node, and
//! exactly one assignment names it), and every node's ledger equals the sum of the tasks placed on it. It
//! also checks what submission and gang placement promise: every job record has all its tasks, and no gang
//! holds resources with some of its tasks while others wait. [`audit`] reads the whole prefix at one revision
//! (paginated, pinned); [`check`] is the pure part, usable on any listing.

use crate::error::Result;
use crate::keys::{Key, Keys};
use crate::model::{Allocation, Assignment, Job, NamespaceUse, Node, Quota, QuotaDimension, Task, TaskState};
use crate::resources::{Dimension, Resources};
use crate::store::{Store, DEFAULT_PAGE_SIZE};
use etcd_client::KeyValue;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// A node's ledger claims more than its capacity.
    OverCommitted { node: String, dimension: Dimension, used: u64, capacity: u64 },
    /// A ledger's sums differ from the tasks placed on its node.
    LedgerMismatch { node: String, ledger_used: Resources, ledger_tasks: u32, tasks_sum: Resources, tasks: u32 },
    /// The ledger's capacity differs from the node record's.
    CapacityMismatch { node: String, ledger: Resources, node_record: Resources },
    /// A placed task (assigned or running) has no node, or a node without a ledger.
    PlacedOnNoNode { task: String, node: Option<String> },
    /// A placed task has no assignment key on its node.
    AssignmentMissing { task: String, node: String },
    /// An assignment that names no task placed on its node (so a task would run in two places).
    AssignmentInvalid { node: String, task: String, why: String },
    /// A gang job with some tasks holding resources while others are pending: gangs are placed whole or not
    /// at all, so a half-held gang blocks the cell without running.
    GangSplit { job: String, holding: u32, pending: u32 },
    /// A job record without all its tasks (`missing` lists the first few absent indices).
    JobIncomplete { job: String, tasks: u32, present: u32, missing: Vec<u32> },
    /// A task whose index is beyond its job's task count.
    TaskBeyondJob { task: String, job: String, tasks: u32 },
    /// A namespace's tasks hold more than its quota allows (`used` of `limit`, in the dimension's unit:
    /// millicores, bytes or tasks).
    OverQuota { namespace: String, dimension: QuotaDimension, used: u64, limit: u64 },
    /// A value that does not decode.
    Undecodable { key: String, error: String },
}

/// How many missing task indices a [`Violation::JobIncomplete`] lists.
const MISSING_LISTED: usize = 5;

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::OverCommitted { node, dimension, used, capacity } => {
                write!(f, "node {node}: {dimension} over-committed ({used} claimed of {capacity})")
            }
            Violation::LedgerMismatch { node, ledger_used, ledger_tasks, tasks_sum, tasks } => write!(
                f,
                "node {node}: ledger says {ledger_tasks} tasks using {ledger_used}, but {tasks} tasks placed there use {tasks_sum}"
            ),
            Violation::CapacityMismatch { node, ledger, node_record } => {
                write!(f, "node {node}: ledger capacity {ledger} differs from node record {node_record}")
            }
            Violation::PlacedOnNoNode { task, node } => match node {
                Some(n) => write!(f, "task {task}: placed on {n}, which has no ledger"),
                None => write!(f, "task {task}: placed but has no node"),
            },
            Violation::AssignmentMissing { task, node } => write!(f, "task {task}: placed on {node} but has no assignment"),
            Violation::AssignmentInvalid { node, task, why } => write!(f, "assignment {node}/{task}: {why}"),
            Violation::GangSplit { job, holding, pending } => write!(
                f,
                "gang job {job}: {holding} {} resources while {pending} {} pending; a gang is placed whole or not at all",
                if *holding == 1 { "task holds" } else { "tasks hold" },
                if *pending == 1 { "is" } else { "are" }
            ),
            Violation::JobIncomplete { job, tasks, present, missing } => {
                let listed: Vec<String> = missing.iter().map(|i| format!("{job}/{i}")).collect();
                let more = if (tasks - present) as usize > missing.len() { ", ..." } else { "" };
                write!(f, "job {job}: has {present} of its {tasks} tasks; missing {}{more}", listed.join(", "))
            }
            Violation::TaskBeyondJob { task, job, tasks } => {
                write!(f, "task {task}: beyond the {tasks} tasks of job {job}")
            }
            Violation::Undecodable { key, error } => write!(f, "{key}: cannot decode: {error}"),
            Violation::OverQuota { namespace, dimension, used, limit } => {
                write!(f, "namespace {namespace}: its tasks hold {used} {dimension}, over its quota of {limit}")
            }
        }
    }
}

/// What an audit found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditReport {
    pub revision: i64,
    pub nodes: usize,
    pub jobs: usize,
    pub tasks: usize,
    /// Tasks holding resources (assigned or running).
    pub placed_tasks: usize,
    pub assignments: usize,
    /// Tasks under a job id with no job record: a submission still writing, or one that failed midway. Not a
    /// violation (no scheduler places them), but worth a look if it persists.
    pub orphan_tasks: usize,
    /// Claimed over capacity, summed over all nodes.
    pub used: Resources,
    pub capacity: Resources,
    pub violations: Vec<Violation>,
}

impl AuditReport {
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Reads everything under the prefix at one revision and checks it.
pub async fn audit(store: &Store) -> Result<AuditReport> {
    let (kvs, revision) = store.list(store.keys().prefix(), DEFAULT_PAGE_SIZE, None).await?;
    Ok(check(store.keys(), &kvs, revision))
}

/// Checks the invariants on a listing taken at `revision`.
pub fn check(keys: &Keys, kvs: &[KeyValue], revision: i64) -> AuditReport {
    check_pairs(keys, kvs.iter().map(|kv| (kv.key(), kv.value())), revision)
}

/// [`check`] on keys and values as bytes (what a listing holds; also for tests without etcd).
pub fn check_pairs<'a>(keys: &Keys, kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>, revision: i64) -> AuditReport {
    let mut report = AuditReport { revision, ..Default::default() };
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut ledgers: BTreeMap<String, Allocation> = BTreeMap::new();
    let mut jobs: BTreeMap<String, Job> = BTreeMap::new();
    let mut tasks: BTreeMap<String, Task> = BTreeMap::new();
    let mut assignments: Vec<(String, String, Assignment)> = Vec::new();
    let mut quotas: BTreeMap<String, Quota> = BTreeMap::new();

    for (key, value) in kvs {
        let Ok(key) = std::str::from_utf8(key) else { continue };
        let undecodable = |e: serde_json::Error| Violation::Undecodable { key: key.to_string(), error: e.to_string() };
        let result = match keys.parse(key) {
            Some(Key::Node(n)) => serde_json::from_slice(value).map(|v| drop(nodes.insert(n.to_string(), v))),
            Some(Key::Alloc(n)) => serde_json::from_slice(value).map(|v| drop(ledgers.insert(n.to_string(), v))),
            Some(Key::Task(id)) => serde_json::from_slice(value).map(|v| drop(tasks.insert(id.to_string(), v))),
            Some(Key::Assignment { node, task }) => {
                serde_json::from_slice(value).map(|v| assignments.push((node.to_string(), task.to_string(), v)))
            }
            Some(Key::Job(j)) => {
                report.jobs += 1;
                serde_json::from_slice(value).map(|v| drop(jobs.insert(j.to_string(), v)))
            }
            Some(Key::Quota(ns)) => serde_json::from_slice(value).map(|v| drop(quotas.insert(ns.to_string(), v))),
            Some(
                Key::Live(_) | Key::Owner(_) | Key::Scheduler(_) | Key::Status(_) | Key::Submission(_) | Key::Drain(_),
            )
            | None => Ok(()),
        };
        if let Err(e) = result {
            report.violations.push(undecodable(e));
        }
    }
    check_jobs(&jobs, &tasks, &mut report);
    report.nodes = nodes.len();
    report.tasks = tasks.len();
    report.assignments = assignments.len();

    // What the tasks say each node holds.
    let mut held: BTreeMap<&str, (Resources, u32)> = BTreeMap::new();
    let assigned: BTreeMap<(&str, &str), &Assignment> =
        assignments.iter().map(|(n, t, a)| ((n.as_str(), t.as_str()), a)).collect();
    for (id, task) in &tasks {
        if !task.state.holds_resources() {
            continue;
        }
        report.placed_tasks += 1;
        let node = match task.node.as_deref() {
            Some(n) if ledgers.contains_key(n) => n,
            other => {
                report.violations.push(Violation::PlacedOnNoNode { task: id.clone(), node: other.map(str::to_string) });
                continue;
            }
        };
        let entry = held.entry(node).or_default();
        entry.0 = entry.0.saturating_add(task.resources);
        entry.1 += 1;
        if !assigned.contains_key(&(node, id.as_str())) {
            report.violations.push(Violation::AssignmentMissing { task: id.clone(), node: node.to_string() });
        }
    }

    // Quotas: what each namespace's tasks hold, within its limits.
    let mut by_namespace: BTreeMap<&str, NamespaceUse> = BTreeMap::new();
    for task in tasks.values().filter(|t| t.state.holds_resources()) {
        by_namespace.entry(task.namespace.as_str()).or_default().add(task.resources);
    }
    for (ns, quota) in &quotas {
        let used = by_namespace.get(ns.as_str()).copied().unwrap_or_default();
        let checks = [
            (QuotaDimension::Cpu, quota.cpu_millis, used.resources.cpu_millis),
            (QuotaDimension::Memory, quota.memory_bytes, used.resources.memory_bytes),
            (QuotaDimension::Tasks, quota.tasks, used.tasks),
        ];
        for (dimension, limit, used) in checks {
            if let Some(limit) = limit.filter(|l| used > *l) {
                report.violations.push(Violation::OverQuota { namespace: ns.clone(), dimension, used, limit });
            }
        }
    }

    // Ledgers: within capacity, and equal to what the tasks placed on their node hold.
    for (name, ledger) in &ledgers {
        report.used = report.used.saturating_add(ledger.used);
        report.capacity = report.capacity.saturating_add(ledger.capacity);
        let v = &mut report.violations;
        if let Some(d) = ledger.used.exceeds(ledger.capacity) {
            let (used, capacity) = match d {
                Dimension::Cpu => (ledger.used.cpu_millis, ledger.capacity.cpu_millis),
                Dimension::Memory => (ledger.used.memory_bytes, ledger.capacity.memory_bytes),
            };
            v.push(Violation::OverCommitted { node: name.clone(), dimension: d, used, capacity });
        }
        let (tasks_sum, count) = held.get(name.as_str()).copied().unwrap_or_default();
        if tasks_sum != ledger.used || count != ledger.tasks {
            v.push(Violation::LedgerMismatch {
                node: name.clone(),
                ledger_used: ledger.used,
                ledger_tasks: ledger.tasks,
                tasks_sum,
                tasks: count,
            });
        }
        if let Some(node) = nodes.get(name) {
            if node.capacity != ledger.capacity {
                v.push(Violation::CapacityMismatch {
                    node: name.clone(),
                    ledger: ledger.capacity,
                    node_record: node.capacity,
                });
            }
        }
    }

    // Assignments: each names a task placed on that node.
    for (node, task_id, a) in &assignments {
        let why = match tasks.get(task_id) {
            None => Some("no such task".to_string()),
            Some(t) if !t.state.holds_resources() => Some(format!("task is {}", t.state)),
            Some(t) if t.node.as_deref() != Some(node.as_str()) => {
                Some(format!("task is placed on {}", t.node.as_deref().unwrap_or("no node")))
            }
            Some(_) if a.task != *task_id || a.node != *node => Some("record names another task or node".into()),
            Some(_) => None,
        };
        if let Some(why) = why {
            report.violations.push(Violation::AssignmentInvalid { node: node.clone(), task: task_id.clone(), why });
        }
    }
    report
}

/// Jobs against their tasks: every job has all its tasks and none beyond; no gang is half held.
fn check_jobs(jobs: &BTreeMap<String, Job>, tasks: &BTreeMap<String, Task>, report: &mut AuditReport) {
    let mut of_job: BTreeMap<&str, Vec<(&str, &Task)>> = BTreeMap::new();
    for (id, task) in tasks {
        of_job.entry(task.job.as_str()).or_default().push((id.as_str(), task));
    }
    for (job_id, job_tasks) in &of_job {
        if !jobs.contains_key(*job_id) {
            report.orphan_tasks += job_tasks.len();
        }
    }
    for (id, job) in jobs {
        let own = of_job.get(id.as_str()).map(Vec::as_slice).unwrap_or_default();
        // A job an update touched keeps its tasks at indexes below `index_end` with gaps (retired replicas);
        // only one never updated has exactly `0..tasks`.
        let updated = job.index_end() > job.tasks;
        let mut present = vec![false; job.index_end() as usize];
        for (task_id, task) in own {
            match present.get_mut(task.index as usize) {
                Some(slot) => *slot = true,
                None => report.violations.push(Violation::TaskBeyondJob {
                    task: task_id.to_string(),
                    job: id.clone(),
                    tasks: job.index_end(),
                }),
            }
        }
        let count = present.iter().filter(|p| **p).count() as u32;
        if count < job.tasks && !updated {
            let missing = (0..job.tasks).filter(|&i| !present[i as usize]).take(MISSING_LISTED).collect();
            report.violations.push(Violation::JobIncomplete {
                job: id.clone(),
                tasks: job.tasks,
                present: count,
                missing,
            });
        }
        if job.gang {
            let holding = own.iter().filter(|(_, t)| t.state.holds_resources()).count() as u32;
            let pending = own.iter().filter(|(_, t)| t.state == TaskState::Pending).count() as u32;
            if holding > 0 && pending > 0 {
                report.violations.push(Violation::GangSplit { job: id.clone(), holding, pending });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::JobKind;

    const TASK: Resources = Resources::new(1000, 1 << 30);

    /// A listing of `jobs` and `tasks` (with each task's state and node), plus a node and its ledger and
    /// assignments matching the placed tasks, so only job-level invariants can break.
    fn listing(jobs: &[Job], tasks: &[(&str, u32, TaskState)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let keys = Keys::default();
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut put = |k: String, v: Vec<u8>| out.push((k.into_bytes(), v));
        let capacity = Resources::new(1 << 20, 1 << 50);
        let mut ledger = Allocation::empty("n", capacity);
        for job in jobs {
            put(keys.job(&job.id), serde_json::to_vec(job).unwrap());
        }
        for &(job_id, index, state) in tasks {
            let job = jobs
                .iter()
                .find(|j| j.id == job_id)
                .cloned()
                .unwrap_or_else(|| Job::new(job_id, JobKind::Batch, 1, TASK));
            let mut task = Task::pending(&job, index);
            task.state = state;
            if state.holds_resources() {
                task.node = Some("n".into());
                ledger.add(TASK);
                let assignment = Assignment {
                    task: task.id.clone(),
                    job: job.id.clone(),
                    node: "n".into(),
                    resources: TASK,
                    placement: 1,
                    placed_by: "test/t".into(),
                    assigned_at_ms: 0,
                    after: Vec::new(),
                };
                put(keys.assignment("n", &task.id), serde_json::to_vec(&assignment).unwrap());
            }
            put(keys.task(&task.id), serde_json::to_vec(&task).unwrap());
        }
        let node = Node { name: "n".into(), capacity, labels: Default::default(), address: None, registered_at_ms: 0 };
        put(keys.node("n"), serde_json::to_vec(&node).unwrap());
        put(keys.alloc("n"), serde_json::to_vec(&ledger).unwrap());
        out
    }

    fn violations(jobs: &[Job], tasks: &[(&str, u32, TaskState)]) -> AuditReport {
        let kvs = listing(jobs, tasks);
        check_pairs(&Keys::default(), kvs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())), 1)
    }

    fn gang(id: &str, tasks: u32) -> Job {
        let mut job = Job::new(id, JobKind::Batch, tasks, TASK);
        job.gang = true;
        job
    }

    use TaskState::{Assigned, Pending, Running, Succeeded};

    #[test]
    fn whole_and_absent_gangs_pass() {
        let g = gang("g", 3);
        for states in [[Pending; 3], [Assigned, Running, Assigned], [Succeeded, Running, Running]] {
            let tasks: Vec<_> = states.iter().enumerate().map(|(i, s)| ("g", i as u32, *s)).collect();
            let report = violations(std::slice::from_ref(&g), &tasks);
            assert!(report.is_ok(), "{states:?}: {:?}", report.violations);
        }
        // A job that is not a gang may be placed in part.
        let plain = Job::new("p", JobKind::Batch, 2, TASK);
        assert!(violations(&[plain], &[("p", 0, Assigned), ("p", 1, Pending)]).is_ok());
    }

    #[test]
    fn a_half_held_gang_is_reported() {
        let report = violations(&[gang("g", 3)], &[("g", 0, Assigned), ("g", 1, Running), ("g", 2, Pending)]);
        assert_eq!(report.violations, [Violation::GangSplit { job: "g".into(), holding: 2, pending: 1 }]);
        assert_eq!(
            report.violations[0].to_string(),
            "gang job g: 2 tasks hold resources while 1 is pending; a gang is placed whole or not at all"
        );
        let json = serde_json::to_value(&report.violations[0]).unwrap();
        assert_eq!((json["kind"].as_str(), json["holding"].as_u64()), (Some("gang_split"), Some(2)));
    }

    #[test]
    fn every_job_has_all_its_tasks_and_none_beyond() {
        let tasks: Vec<_> =
            (0..10).filter(|i| *i != 3 && *i < 8).map(|i| ("a", i, Pending)).chain([("a", 12, Pending)]).collect();
        let report = violations(&[Job::new("a", JobKind::Batch, 10, TASK)], &tasks);
        assert_eq!(report.violations.len(), 2, "{:?}", report.violations);
        assert!(report.violations.contains(&Violation::TaskBeyondJob {
            task: "a/12".into(),
            job: "a".into(),
            tasks: 10
        }));
        let incomplete = Violation::JobIncomplete { job: "a".into(), tasks: 10, present: 7, missing: vec![3, 8, 9] };
        assert!(report.violations.contains(&incomplete), "{:?}", report.violations);
        assert_eq!(incomplete.to_string(), "job a: has 7 of its 10 tasks; missing a/3, a/8, a/9");
        let many = Violation::JobIncomplete { job: "b".into(), tasks: 100, present: 0, missing: (0..5).collect() };
        assert!(many.to_string().ends_with("missing b/0, b/1, b/2, b/3, b/4, ..."), "{many}");
    }

    #[test]
    fn tasks_without_a_job_are_counted_not_reported() {
        let report = violations(&[], &[("half", 0, Pending), ("half", 1, Pending)]);
        assert!(report.is_ok(), "{:?}", report.violations);
        assert_eq!(report.orphan_tasks, 2);
        assert_eq!(report.jobs, 0);
    }
}
