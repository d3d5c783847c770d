//! One change to one key, in words: what `omctl watch` prints (`task web/2 pending -> assigned on node-3`).
//!
//! The summary compares the key's new value with the one it had before (the watch keeps the last value of
//! every key it has seen), so a line says what changed, not only that something did.

use crate::units;
use omega::keys::{Key, Keys};
use omega::model::{Allocation, Assignment, Job, JobOwner, JobStatus, Liveness, Node, SchedulerInstance, Task};
use omega::store::submission::SubmissionMarker;
use serde::de::DeserializeOwned;

/// What a change was about: a kind (`task`, `job`, `node`, ...), the thing's name, and the sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub kind: &'static str,
    pub name: String,
    pub text: String,
}

/// A submission marker: a job being written in several transactions (its record comes last).
fn submission(job: &str, new: Option<SubmissionMarker>, exists: bool) -> String {
    match (new, exists) {
        (Some(m), _) => format!("submission of job {job} started: writing its {} tasks, its record last", m.tasks),
        (None, true) => format!("submission of job {job} started (undecodable marker)"),
        (None, false) => {
            format!("submission of job {job} ended (its record is written, or the attempt was cleaned up)")
        }
    }
}

fn decoded<T: DeserializeOwned>(bytes: Option<&[u8]>) -> Option<T> {
    bytes.and_then(|b| serde_json::from_slice(b).ok())
}

/// Describes the change of `key` from `prev` to `new` (`None`: absent before / deleted now).
pub fn describe(keys: &Keys, key: &str, prev: Option<&[u8]>, new: Option<&[u8]>) -> Summary {
    let undecodable = new.is_some_and(|b| serde_json::from_slice::<serde_json::Value>(b).is_err());
    let (kind, name, text) = match keys.parse(key) {
        Some(Key::Task(id)) => ("task", id, task(id, decoded(prev), decoded(new), new.is_some())),
        Some(Key::Job(id)) => ("job", id, job(id, decoded(prev), decoded(new), new.is_some())),
        Some(Key::Node(n)) => ("node", n, node(n, decoded(prev), decoded(new), new.is_some())),
        Some(Key::Live(n)) => ("live", n, live(n, decoded(new), new.is_some())),
        Some(Key::Alloc(n)) => ("alloc", n, ledger(n, decoded(prev), decoded(new), new.is_some())),
        Some(Key::Owner(j)) => ("owner", j, owner(j, decoded(prev), decoded(new), new.is_some())),
        Some(Key::Scheduler(s)) => ("scheduler", s, scheduler(s, decoded(new), new.is_some())),
        Some(Key::Status(j)) => ("status", j, status(j, decoded(new), new.is_some())),
        Some(Key::Assignment { node, task }) => ("assign", task, assignment(node, task, decoded(new), new.is_some())),
        Some(Key::Submission(job)) => ("submission", job, submission(job, decoded(new), new.is_some())),
        Some(Key::Drain(n)) => ("drain", n, drain(n, decoded(new), new.is_some())),
        Some(Key::Quota(ns)) => ("quota", ns, quota(ns, decoded(new), new.is_some())),
        None => ("other", key, format!("key {key} {}", if new.is_some() { "written" } else { "deleted" })),
    };
    let text = if undecodable { format!("{key}: value is not JSON") } else { text };
    Summary { kind, name: name.to_string(), text }
}

fn quota(ns: &str, new: Option<omega::model::Quota>, present: bool) -> String {
    match new {
        Some(q) => match &q.last_claim {
            Some(c) => format!("quota {ns} ({}): claimed in by {}", q.describe_limits(), c.by),
            None => format!("quota {ns} set: {}", q.describe_limits()),
        },
        None if present => format!("quota {ns} written (undecodable)"),
        None => format!("quota {ns} removed"),
    }
}

fn task(id: &str, prev: Option<Task>, new: Option<Task>, present: bool) -> String {
    let Some(n) = new else {
        return if present { format!("task {id} written (undecodable)") } else { format!("task {id} deleted") };
    };
    let reason = n.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
    let Some(p) = prev else {
        return format!("task {id} created ({}){reason}", n.state);
    };
    let on = n.node.as_deref().map(|node| format!(" on {node}")).unwrap_or_default();
    if p.state != n.state {
        let mut s = format!("task {id} {} -> {}", p.state, n.state);
        if n.state.holds_resources() || n.state.is_terminal() {
            s.push_str(&on);
        }
        if n.placements > p.placements {
            if let Some(by) = &n.placed_by {
                s.push_str(&format!(" by {by}"));
            }
        }
        if !n.preempted.is_empty() && n.preempted != p.preempted {
            s.push_str(&format!(", preempting {}", n.preempted.join(", ")));
        }
        s.push_str(&reason);
        return s;
    }
    if p.node != n.node {
        return format!("task {id} {} moved{on}{reason}", n.state);
    }
    format!("task {id} updated ({}{on}){reason}", n.state)
}

fn job(id: &str, prev: Option<Job>, new: Option<Job>, present: bool) -> String {
    let Some(n) = new else {
        return if present { format!("job {id} written (undecodable)") } else { format!("job {id} deleted") };
    };
    match prev {
        None => format!(
            "job {id} submitted: {}, {} tasks, priority {}, scheduler {}",
            units::name(&n.kind),
            n.tasks,
            n.priority,
            n.scheduler
        ),
        Some(p) if p.state != n.state => {
            format!("job {id} {} -> {}", units::name(&p.state), units::name(&n.state))
        }
        Some(_) => format!("job {id} updated ({})", units::name(&n.state)),
    }
}

fn node(name: &str, prev: Option<Node>, new: Option<Node>, present: bool) -> String {
    let Some(n) = new else {
        return if present { format!("node {name} written (undecodable)") } else { format!("node {name} removed") };
    };
    let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let what = format!(
        "cpu {}, memory {}{}",
        units::cores(n.capacity.cpu_millis),
        units::memory(n.capacity.memory_bytes),
        if labels.is_empty() { String::new() } else { format!(", {}", labels.join(",")) }
    );
    match prev {
        None => format!("node {name} registered: {what}"),
        Some(_) => format!("node {name} updated: {what}"),
    }
}

fn live(name: &str, new: Option<Liveness>, present: bool) -> String {
    match (new, present) {
        (Some(l), _) => format!("node {name} is alive (lease {})", l.lease),
        (None, true) => format!("node {name} liveness written (undecodable)"),
        (None, false) => format!("node {name} lost its liveness key (lease expired or agent stopped)"),
    }
}

fn ledger(name: &str, prev: Option<Allocation>, new: Option<Allocation>, present: bool) -> String {
    let Some(n) = new else {
        return if present {
            format!("ledger of {name} written (undecodable)")
        } else {
            format!("ledger of {name} removed")
        };
    };
    let mut s = format!(
        "ledger {name}: {} {}, cpu {}/{}, memory {}/{}",
        n.tasks,
        if n.tasks == 1 { "task" } else { "tasks" },
        units::cores(n.used.cpu_millis),
        units::cores(n.capacity.cpu_millis),
        units::memory(n.used.memory_bytes),
        units::memory(n.capacity.memory_bytes)
    );
    if let Some(p) = prev {
        let delta = i64::from(n.tasks) - i64::from(p.tasks);
        if delta != 0 {
            s.push_str(&format!(" ({delta:+} {})", if delta.abs() == 1 { "task" } else { "tasks" }));
        }
        if p.schedulable && !n.schedulable {
            s.push_str("; drained: no new claims");
        } else if !p.schedulable && n.schedulable {
            s.push_str("; accepting claims again");
        }
    }
    s
}

fn owner(job: &str, prev: Option<JobOwner>, new: Option<JobOwner>, present: bool) -> String {
    match (new, prev, present) {
        (Some(o), _, _) => format!("job {job} owned by {}/{}", o.scheduler, o.instance),
        (None, _, true) => format!("owner of job {job} written (undecodable)"),
        (None, Some(p), false) => format!("job {job} released by {}/{}", p.scheduler, p.instance),
        (None, None, false) => format!("job {job} has no owner now"),
    }
}

fn scheduler(name: &str, new: Option<SchedulerInstance>, present: bool) -> String {
    match (new, present) {
        (Some(i), _) => format!(
            "scheduler {name} started ({}{}{})",
            units::name(&i.kind_of_scheduler()),
            i.lock.as_deref().map(|l| format!(", lock {l}")).unwrap_or_default(),
            i.metrics.map(|m| format!(", metrics on {m}")).unwrap_or_default()
        ),
        (None, true) => format!("scheduler {name} written (undecodable)"),
        (None, false) => format!("scheduler {name} gone (stopped, or its lease lapsed)"),
    }
}

fn status(job: &str, new: Option<JobStatus>, present: bool) -> String {
    match (new, present) {
        (Some(s), _) if s.pending > 0 => format!("job {job}: {} pending: {}", s.pending, s.reason),
        (Some(s), _) => format!("job {job}: nothing pending ({} attempts, {} with conflicts)", s.attempts, s.conflicts),
        (None, true) => format!("status of job {job} written (undecodable)"),
        (None, false) => format!("status of job {job} removed"),
    }
}

fn assignment(node: &str, task: &str, new: Option<Assignment>, present: bool) -> String {
    match (new, present) {
        (Some(a), _) => format!("node {node} assigned {task} (placement {}, by {})", a.placement, a.placed_by),
        (None, true) => format!("assignment of {task} on {node} written (undecodable)"),
        (None, false) => format!("assignment of {task} on {node} removed"),
    }
}

fn drain(node: &str, new: Option<omega::model::Drain>, present: bool) -> String {
    match new {
        Some(d) => format!(
            "drain of node {node}: {} ({} moved, {} migrating, {} left){}",
            d.state,
            d.moved,
            d.migrations.len(),
            d.remaining,
            if d.message.is_empty() { String::new() } else { format!(": {}", d.message) }
        ),
        None if present => format!("drain of node {node} written (undecodable)"),
        None => format!("drain of node {node} removed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega::model::{JobKind, TaskState};
    use omega::resources::Resources;

    #[test]
    fn a_placement_reads_as_a_transition() {
        let keys = Keys::default();
        let job = Job::new("web", JobKind::Service, 3, Resources::new(500, 1 << 29));
        let pending = Task::pending(&job, 2);
        let mut placed = pending.clone();
        placed.state = TaskState::Assigned;
        placed.node = Some("node-3".into());
        placed.placed_by = Some("service/s-1".into());
        placed.placements = 1;
        let p = serde_json::to_vec(&pending).unwrap();
        let n = serde_json::to_vec(&placed).unwrap();
        let s = describe(&keys, &keys.task("web/2"), Some(&p), Some(&n));
        assert_eq!(s.kind, "task");
        assert_eq!(s.name, "web/2");
        assert_eq!(s.text, "task web/2 pending -> assigned on node-3 by service/s-1");
        let created = describe(&keys, &keys.task("web/2"), None, Some(&p));
        assert_eq!(created.text, "task web/2 created (pending)");
        let gone = describe(&keys, &keys.task("web/2"), Some(&p), None);
        assert_eq!(gone.text, "task web/2 deleted");
        let junk = describe(&keys, &keys.job("x"), None, Some(b"{not json"));
        assert!(junk.text.contains("not JSON"), "{}", junk.text);
    }
}
