//! Task timelines as omctl shows them: the events each task record keeps ([`omega::events`]) as rows, sorted
//! by time across tasks, for `omctl job` and `omctl events`.
//!
//! A placement records no event (a claim's value stays as small as it was: claims are the cell's hot path),
//! so where a task is placed now is shown from its fields (node, placed_by, placements) as a synthesized
//! `placed` row ahead of that placement's events. Its time is not kept anywhere: it is the placement's own
//! write while the task is still `assigned`, else the first event recorded on that placement (its start).

use crate::units;
use omega::events::{EventKind, TaskEvent};
use omega::model::{Task, TaskState};
use serde::Serialize;
use std::collections::HashMap;

/// The name of the synthesized placement row's kind.
pub const PLACED: &str = "placed";

/// One event of one task, as `-o json` and the tables show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventRow {
    /// When it (last) happened, ms since the epoch.
    pub at_ms: u64,
    pub task: String,
    /// The event's kind (`started`, `restarted`, `exited`, ...), or `placed` for the synthesized row.
    pub kind: String,
    pub message: String,
    /// How many times in a row it happened (coalesced repeats).
    pub count: u32,
    /// When it first happened, for a coalesced event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_ms: Option<u64>,
    /// Made by omctl from the task's fields (the placement), not recorded in the task's timeline.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub synthesized: bool,
}

impl EventRow {
    fn recorded(task: &Task, e: &TaskEvent) -> EventRow {
        EventRow {
            at_ms: e.at_ms,
            task: task.id.clone(),
            kind: e.kind.to_string(),
            message: e.message.clone(),
            count: e.count,
            first_ms: e.first_ms,
            synthesized: false,
        }
    }

    /// The message with its repeats: `after exit 1 ×7 over 12s`.
    pub fn message_with_count(&self) -> String {
        if self.count <= 1 {
            return self.message.clone();
        }
        let over = match self.first_ms {
            Some(first) => format!(" over {}", units::span(self.at_ms.saturating_sub(first))),
            None => String::new(),
        };
        let sep = if self.message.is_empty() { "" } else { " " };
        format!("{}{sep}×{}{over}", self.message, self.count)
    }

    /// What identifies this row across reads of its task: a coalesced repeat keeps its identity (and grows
    /// its count); the placement row is one per placement.
    fn identity(&self) -> Identity {
        let start = if self.synthesized { 0 } else { self.first_ms.unwrap_or(self.at_ms) };
        (self.kind.clone(), self.message.clone(), start)
    }
}

/// A row's identity: kind, message, and when it first happened (0 for the placement row).
type Identity = (String, String, u64);

/// Events that end a placement: the next placement's events come after the last of them.
fn ends_placement(kind: EventKind) -> bool {
    matches!(kind, EventKind::Lost | EventKind::Preempted | EventKind::Stopped | EventKind::Rescheduled)
}

/// A task's rows in timeline order: its recorded events, with the synthesized `placed` row before the events
/// of the placement it holds now (a task that holds no resources has its history in its events alone).
pub fn of_task(task: &Task) -> Vec<EventRow> {
    let mut rows: Vec<EventRow> = task.events.iter().map(|e| EventRow::recorded(task, e)).collect();
    let (Some(node), Some(by)) = (&task.node, &task.placed_by) else { return rows };
    if !task.state.holds_resources() || task.placements == 0 {
        return rows;
    }
    let at = task.events.iter().rposition(|e| ends_placement(e.kind)).map_or(0, |i| i + 1);
    let at_ms = match task.events.get(at) {
        _ if task.state == TaskState::Assigned => task.updated_at_ms,
        Some(first) => first.first_ms.unwrap_or(first.at_ms),
        None => task.run.as_ref().map(|r| r.started_at_ms).filter(|ms| *ms > 0).unwrap_or(task.updated_at_ms),
    };
    let placed = EventRow {
        at_ms,
        task: task.id.clone(),
        kind: PLACED.into(),
        message: format!("on {node} by {by} (placement {})", task.placements),
        count: 1,
        first_ms: None,
        synthesized: true,
    };
    rows.insert(at, placed);
    rows
}

/// The rows of `tasks`, sorted by time (stable: a task's own order holds among equal times).
pub fn of_tasks<'a>(tasks: impl IntoIterator<Item = &'a Task>) -> Vec<EventRow> {
    let mut rows: Vec<EventRow> = tasks.into_iter().flat_map(of_task).collect();
    rows.sort_by_key(|r| r.at_ms);
    rows
}

/// The `AGE  TASK  EVENT  MESSAGE` table, ages counted back from `now_ms`.
pub fn table(rows: &[EventRow], now_ms: u64) -> String {
    let mut t = crate::output::Table::new(&["AGE", "TASK", "EVENT", "MESSAGE"]);
    for r in rows {
        let age = if r.at_ms == 0 { "-".to_string() } else { units::span(now_ms.saturating_sub(r.at_ms)) };
        t.row(vec![age, r.task.clone(), r.kind.clone(), r.message_with_count()]);
    }
    t.render()
}

/// What a stream has printed of each task (by its etcd key), so each new event, and each coalesced repeat's
/// new count, prints once.
#[derive(Default)]
pub struct Printed {
    seen: HashMap<Vec<u8>, HashMap<Identity, u32>>,
}

impl Printed {
    /// The rows of `task` (stored at `key`) not printed yet, or printed with a smaller count; remembers them.
    /// Rows the task no longer keeps are forgotten.
    pub fn fresh(&mut self, key: &[u8], task: &Task) -> Vec<EventRow> {
        let rows = of_task(task);
        let before = self.seen.remove(key).unwrap_or_default();
        let mut now = HashMap::with_capacity(rows.len());
        let mut out = Vec::new();
        for row in rows {
            let id = row.identity();
            match before.get(&id) {
                Some(count) if *count >= row.count => drop(now.insert(id, *count)),
                _ => {
                    now.insert(id, row.count);
                    out.push(row);
                }
            }
        }
        self.seen.insert(key.to_vec(), now);
        out
    }

    /// Forgets a deleted task.
    pub fn forget(&mut self, key: &[u8]) {
        self.seen.remove(key);
    }

    /// Forgets every task not in `keys` (after a re-listing).
    pub fn retain(&mut self, keys: &std::collections::HashSet<Vec<u8>>) {
        self.seen.retain(|k, _| keys.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega::model::{Job, JobKind};
    use omega::resources::Resources;

    fn task() -> Task {
        Task::pending(&Job::new("web", JobKind::Service, 1, Resources::new(100, 1 << 20)), 0)
    }

    #[test]
    fn the_placement_row_precedes_the_events_of_the_placement_it_holds() {
        let mut t = task().assigned("n1", "service/s-1", 100);
        let rows = of_task(&t);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].kind.as_str(), rows[0].at_ms), (PLACED, 100));
        assert_eq!(rows[0].message, "on n1 by service/s-1 (placement 1)");

        t.state = TaskState::Running;
        t.record_event(EventKind::Started, "on n1, placement 1, run 0", 150);
        t.record_event(EventKind::Lost, "node n1 lost", 200);
        let mut t = t.assigned("n2", "service/s-1", 300);
        t.state = TaskState::Running;
        t.record_event(EventKind::Started, "on n2, placement 2, run 0", 350);
        let kinds: Vec<(String, u64)> = of_task(&t).into_iter().map(|r| (r.kind, r.at_ms)).collect();
        let expect = [("started", 150), ("lost", 200), (PLACED, 350), ("started", 350)];
        assert_eq!(kinds, expect.map(|(k, at)| (k.to_string(), at)));

        t.state = TaskState::Pending;
        assert!(of_task(&t).iter().all(|r| !r.synthesized), "a pending task is placed nowhere");
    }

    #[test]
    fn a_stream_prints_new_events_and_grown_repeats_once() {
        let mut t = task();
        let mut printed = Printed::default();
        t.record_event(EventKind::Started, "on n1", 1);
        assert_eq!(printed.fresh(b"k", &t).len(), 1);
        assert!(printed.fresh(b"k", &t).is_empty(), "nothing new");
        t.record_event(EventKind::Restarted, "after exit 1", 2);
        t.record_event(EventKind::Restarted, "after exit 1", 3);
        let fresh = printed.fresh(b"k", &t);
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].message_with_count(), "after exit 1 ×2 over 1ms");
        t.record_event(EventKind::Restarted, "after exit 1", 4);
        let fresh = printed.fresh(b"k", &t);
        assert_eq!((fresh.len(), fresh[0].count), (1, 3), "the repeat prints again with its count");
        printed.forget(b"k");
        assert_eq!(printed.fresh(b"k", &t).len(), 2, "a forgotten task prints whole");
    }
}
