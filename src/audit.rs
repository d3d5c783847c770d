//! The cell's invariants, checked on one consistent read of etcd.
//!
//! This is how we know optimistic concurrency did its job: whatever schedulers raced, at any single revision
//! no node is over-committed, every placed task is on exactly one node (its own record names one node, and
//! exactly one assignment names it), and every node's ledger equals the sum of the tasks placed on it. [`audit`] reads the whole prefix at one revision (paginated, pinned);
//! [`check`] is the pure part, usable on any listing.

use crate::error::Result;
use crate::keys::{Key, Keys};
use crate::model::{Allocation, Assignment, Node, Task};
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
    /// A value that does not decode.
    Undecodable { key: String, error: String },
}

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
            Violation::Undecodable { key, error } => write!(f, "{key}: cannot decode: {error}"),
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
    let mut report = AuditReport { revision, ..Default::default() };
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut ledgers: BTreeMap<String, Allocation> = BTreeMap::new();
    let mut tasks: BTreeMap<String, Task> = BTreeMap::new();
    let mut assignments: Vec<(String, String, Assignment)> = Vec::new();

    for kv in kvs {
        let Ok(key) = std::str::from_utf8(kv.key()) else { continue };
        let undecodable = |e: serde_json::Error| Violation::Undecodable { key: key.to_string(), error: e.to_string() };
        let result = match keys.parse(key) {
            Some(Key::Node(n)) => serde_json::from_slice(kv.value()).map(|v| drop(nodes.insert(n.to_string(), v))),
            Some(Key::Alloc(n)) => serde_json::from_slice(kv.value()).map(|v| drop(ledgers.insert(n.to_string(), v))),
            Some(Key::Task(id)) => serde_json::from_slice(kv.value()).map(|v| drop(tasks.insert(id.to_string(), v))),
            Some(Key::Assignment { node, task }) => {
                serde_json::from_slice(kv.value()).map(|v| assignments.push((node.to_string(), task.to_string(), v)))
            }
            Some(Key::Job(_)) => {
                report.jobs += 1;
                Ok(())
            }
            Some(Key::Live(_) | Key::Owner(_) | Key::Scheduler(_) | Key::Status(_)) | None => Ok(()),
        };
        if let Err(e) = result {
            report.violations.push(undecodable(e));
        }
    }
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
