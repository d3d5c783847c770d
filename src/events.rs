//! A task's timeline: what happened to it, kept in its own record.
//!
//! Why in the task record and not in keys of their own: every event coincides with a write of the task that
//! happens anyway (the agent records `running`, a restart, an exit, a health change; the controller a loss;
//! a scheduler a preemption), so appending to the record costs no write at all. A crash loop does not grow it
//! either: a repeat of the last event (same kind, same message) is coalesced into it with a count, and the
//! list keeps only the last [`MAX_EVENTS`]. The timeline lives exactly as long as the task: it is collected
//! with its job (Nomad loses events at allocation GC, Kubernetes after an hour; here they last as long as the
//! task can be looked at).

use serde::{Deserialize, Serialize};

/// How many events a task keeps (the oldest go first).
pub const MAX_EVENTS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Its process started on a node (message: node, placement, run).
    Started,
    /// Passed its checks.
    Healthy,
    /// Failed its checks (message: the failing check's output).
    Unhealthy,
    /// Restarted in place by its agent (message: why).
    Restarted,
    /// Exited; the message holds the code (or, when there is none, why: it could not start, or vanished).
    Exited,
    /// Killed by the kernel for exceeding its memory limit.
    OomKilled,
    /// Evicted for a task of higher priority (message: by which).
    Preempted,
    /// Its node was lost (or fenced); the task is handed back or ends lost.
    Lost,
    /// Stopped on purpose: cancelled, retired by an update, moved off a draining node.
    Stopped,
    /// Put back to pending for its scheduler (message: why).
    Rescheduled,
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EventKind::Started => "started",
            EventKind::Healthy => "healthy",
            EventKind::Unhealthy => "unhealthy",
            EventKind::Restarted => "restarted",
            EventKind::Exited => "exited",
            EventKind::OomKilled => "oom-killed",
            EventKind::Preempted => "preempted",
            EventKind::Lost => "lost",
            EventKind::Stopped => "stopped",
            EventKind::Rescheduled => "rescheduled",
        })
    }
}

/// One entry of a task's timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// When it (last) happened.
    pub at_ms: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// How many times in a row it happened (coalesced repeats); 1 when absent.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u32,
    /// When it first happened, for a coalesced event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_ms: Option<u64>,
}

fn one() -> u32 {
    1
}
fn is_one(n: &u32) -> bool {
    *n == 1
}

/// Appends an event to a timeline: a repeat of the last one (same kind and message) is counted in it, and
/// the list is cut to its last [`MAX_EVENTS`].
pub fn push(events: &mut Vec<TaskEvent>, kind: EventKind, message: impl Into<String>, at_ms: u64) {
    let message = message.into();
    if let Some(last) = events.last_mut() {
        if last.kind == kind && last.message == message {
            last.first_ms.get_or_insert(last.at_ms);
            last.at_ms = at_ms;
            last.count = last.count.saturating_add(1);
            return;
        }
    }
    events.push(TaskEvent { at_ms, kind, message, count: 1, first_ms: None });
    if events.len() > MAX_EVENTS {
        let extra = events.len() - MAX_EVENTS;
        events.drain(..extra);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_coalesce_and_the_list_is_bounded() {
        let mut ev = Vec::new();
        push(&mut ev, EventKind::Started, "on n1", 1);
        for t in 2..1000 {
            push(&mut ev, EventKind::Restarted, "after exit 1", t);
        }
        assert_eq!(ev.len(), 2, "a crash loop is one coalesced event");
        assert_eq!((ev[1].count, ev[1].first_ms, ev[1].at_ms), (998, Some(2), 999));
        for t in 0..40u64 {
            push(&mut ev, if t % 2 == 0 { EventKind::Healthy } else { EventKind::Unhealthy }, "", 1000 + t);
        }
        assert_eq!(ev.len(), MAX_EVENTS);
        assert_eq!(ev.last().map(|e| e.at_ms), Some(1039));
    }

    #[test]
    fn a_single_event_reads_without_count() {
        let mut ev = Vec::new();
        push(&mut ev, EventKind::Exited, "code 0", 5);
        let json = serde_json::to_string(&ev).unwrap_or_default();
        assert_eq!(json, r#"[{"at_ms":5,"kind":"exited","message":"code 0"}]"#);
    }
}
