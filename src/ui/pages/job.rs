//! The Job page: what the job asks for, how its placement went (a waterfall from submission through
//! attempts and conflicts to placed, running and healthy), why tasks are pending, its rollout, its tasks and
//! their events. Its kept versions are read from etcd once per load (the fixed part, [`versions`]).

use crate::cache::View;
use crate::error::{Error, Result};
use crate::history::{History, Milestones};
use crate::html::{escape, node_link, table};
use crate::index::{self, Counts};
use omega::events::EventKind;
use omega::model::{Job, Task, TaskState};
use omega::units::show;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Tasks listed per page of the tasks table, and events listed.
pub const TASKS_PER_PAGE: u32 = 100;
pub const EVENTS_LISTED: usize = 50;

pub fn render(view: &View, history: &History, id: &str, tasks_from: u32) -> Result<String> {
    let s = &view.snapshot;
    let Some(job) = s.jobs.get(id) else {
        let tasks = s.tasks.keys().filter(|k| k.starts_with(&format!("{id}/"))).count();
        return Err(Error::NotFound(if tasks > 0 {
            format!("job {id} (its {tasks} task records are there without a job record: a submission still writing, or one that died)")
        } else {
            format!("job {id}")
        }));
    };
    let job = &job.value;
    let counts = view.jobs.rows.get(id).map(|r| r.counts).unwrap_or_default();
    let status = view.statuses.get(id);
    let reason = view.jobs.rows.get(id).and_then(|r| r.reason.clone());
    let milestones = history.jobs.get(id).copied().unwrap_or_default();
    let mut out = String::new();

    let state = index::state_name(job.state);
    let owner = s.owners.get(id).map(|o| format!("{}/{}", o.value.scheduler, o.value.instance));
    let mut what = vec![
        ("state", format!("<span class=\"state-{state}\" id=\"job-state\">{state}</span>")),
        ("kind", index::kind_name(job.kind).to_string()),
        ("scheduler", escape(&job.scheduler)),
        ("owner", owner.as_deref().map(escape).unwrap_or_else(|| "-".into())),
        ("priority", job.priority.to_string()),
        (
            "tasks",
            format!("{} ({} placed, {} running, {} pending)", job.tasks, counts.placed, counts.running, counts.pending),
        ),
        (
            "each asks",
            format!(
                "cpu {}, memory {}",
                show::cores(job.resources.cpu_millis),
                show::memory(job.resources.memory_bytes)
            ),
        ),
        ("version", job.version.to_string()),
        ("submitted", show::when(job.submitted_at_ms)),
    ];
    if !job.image.is_empty() {
        what.push(("image", escape(&job.image)));
    }
    if !job.command.is_empty() || !job.args.is_empty() {
        let words: Vec<&str> = job.command.iter().chain(job.args.iter()).map(String::as_str).collect();
        what.push(("command", format!("<code>{}</code>", escape(&words.join(" ")))));
    }
    if !job.constraints.is_empty() {
        let c: Vec<String> = job.constraints.iter().map(|c| c.to_string()).collect();
        what.push(("constraints", escape(&c.join(", "))));
    }
    if job.gang {
        what.push(("gang", "all tasks placed together or none".into()));
    }
    out.push_str("<table class=\"summary\"><tbody>");
    for (k, v) in what {
        let _ = write!(out, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    out.push_str("</tbody></table>");

    out.push_str("<h2>Placement</h2>");
    out.push_str(&waterfall(job, &counts, status.map(|s| &**s), &milestones, &first_events(s, job)));

    out.push_str("<h2>Pending reasons</h2>");
    match &reason {
        None => out.push_str("<p class=\"muted\" id=\"pending-reason\">Nothing is pending.</p>"),
        Some(r) => {
            let _ = write!(out, "<p class=\"warn\" id=\"pending-reason\">{}</p>", escape(r));
            if let Some(st) = status.filter(|st| st.pending > 0 && !st.reasons.is_empty()) {
                let rows = st.reasons.iter().map(|(code, nodes)| vec![escape(code), nodes.to_string()]);
                out.push_str(&table(&["reason code", "nodes"], rows, "reason-codes"));
            }
            let mut by_reason: BTreeMap<&str, u32> = BTreeMap::new();
            for t in s.pending_of(id) {
                if let Some(r) = t.value.reason.as_deref() {
                    *by_reason.entry(r).or_default() += 1;
                }
            }
            if !by_reason.is_empty() {
                let rows = by_reason.iter().map(|(r, n)| vec![escape(r), n.to_string()]);
                out.push_str(&table(&["pending tasks' own reason", "tasks"], rows, "task-reasons"));
            }
        }
    }
    if let Some(st) = status {
        let _ = write!(
            out,
            "<p class=\"muted\">Its scheduler's last word ({}): {} attempts, {} with a conflict; last attempt {}.</p>",
            escape(if st.scheduler_instance.is_empty() { "-" } else { &st.scheduler_instance }),
            st.attempts,
            st.conflicts,
            show::ago(st.last_attempt_ms)
        );
    }

    if let Some(d) = &job.deployment {
        out.push_str("<h2>Deployment</h2>");
        let rows = vec![
            vec!["version".into(), d.version.to_string()],
            vec!["state".into(), escape(&d.state.to_string())],
            vec!["started".into(), show::when(d.started_ms)],
            vec!["healthy / unhealthy".into(), format!("{} / {}", d.healthy, d.unhealthy)],
            vec!["canaries".into(), format!("{}{}", d.canaries, if d.promoted { " (promoted)" } else { "" })],
            vec!["reverts to".into(), d.reverts.map_or("-".into(), |v| format!("version {v}"))],
            vec!["message".into(), escape(&d.message)],
        ];
        out.push_str(&table(&["", ""], rows, "deployment"));
    }

    tasks_table(&mut out, s, job, tasks_from);
    events(&mut out, s, job);
    Ok(out)
}

/// The earliest time any task started and turned healthy, from the tasks' own events (agents' clocks).
#[derive(Default)]
struct FirstEvents {
    started: Option<u64>,
    healthy: Option<u64>,
}

fn first_events(s: &omega::cell_state::CellSnapshot, job: &Job) -> FirstEvents {
    let mut f = FirstEvents::default();
    for t in s.tasks_of(job) {
        for e in &t.value.events {
            let at = e.first_ms.unwrap_or(e.at_ms);
            let slot = match e.kind {
                EventKind::Started => &mut f.started,
                EventKind::Healthy => &mut f.healthy,
                _ => continue,
            };
            *slot = Some(slot.map_or(at, |x: u64| x.min(at)));
        }
    }
    f
}

/// The placement waterfall: each stage's count, and when it was reached relative to submission.
fn waterfall(
    job: &Job,
    c: &Counts,
    status: Option<&omega::model::JobStatus>,
    m: &Milestones,
    events: &FirstEvents,
) -> String {
    let t0 = job.submitted_at_ms;
    let total = job.tasks;
    let ran = c.running + c.succeeded + c.failed;
    // (stage, count text, from, to): times in ms since the epoch.
    let stages: Vec<(&str, String, Option<u64>, Option<u64>)> = vec![
        ("submitted", format!("{total} tasks"), Some(t0), Some(t0)),
        (
            "attempts",
            status.map_or("-".into(), |s| s.attempts.to_string()),
            None,
            status.map(|s| s.last_attempt_ms).filter(|t| *t > 0),
        ),
        ("conflicts", status.map_or("-".into(), |s| s.conflicts.to_string()), None, None),
        ("placed", format!("{}/{total}", c.placed), m.first_placed_ms, m.all_placed_ms),
        ("running", format!("{ran}/{total}"), events.started.or(m.first_running_ms), m.all_running_ms),
        ("healthy", format!("{}/{total}", c.healthy), events.healthy.or(m.first_healthy_ms), m.all_healthy_ms),
    ];
    let end = stages.iter().flat_map(|(_, _, a, b)| [*a, *b]).flatten().max().unwrap_or(t0).max(t0 + 1);
    let span = (end - t0) as f64;
    const W: f64 = 360.0;
    let x = |t: u64| (t.saturating_sub(t0) as f64 / span * W).clamp(0.0, W - 2.0);
    let offset = |t: Option<u64>| t.map(|t| format!("+{}", show::span(t.saturating_sub(t0))));
    let rows = stages.iter().map(|(stage, n, from, to)| {
        let when = match (offset(*from), offset(*to)) {
            (Some(a), Some(b)) if a != b => format!("{a} .. {b}"),
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) if *stage == "placed" && m.before_ui && c.placed > 0 => "before the UI started".into(),
            (None, None) => String::new(),
        };
        let bar = match (from, to) {
            (Some(a), Some(b)) => {
                let (xa, xb) = (x(*a), x(*b));
                format!("<rect x=\"{xa:.1}\" y=\"2\" width=\"{:.1}\" height=\"10\" fill=\"#1f5f8b\"/>", (xb - xa).max(2.0))
            }
            (Some(t), None) | (None, Some(t)) => {
                format!("<rect x=\"{:.1}\" y=\"2\" width=\"2\" height=\"10\" fill=\"#1f5f8b\"/>", x(*t))
            }
            (None, None) => String::new(),
        };
        vec![
            format!("<span data-stage=\"{stage}\">{stage}</span>"),
            n.clone(),
            when,
            format!("<svg width=\"{W}\" height=\"14\"><rect x=\"0\" y=\"6\" width=\"{W}\" height=\"1\" fill=\"#e0e4e7\"/>{bar}</svg>"),
        ]
    });
    let mut out = table(&["stage", "count", "since submission", ""], rows, "waterfall");
    out.push_str(
        "<p class=\"muted\">Attempts and conflicts are the scheduler's counts for this job; placed times are when \
         the UI saw them, running and healthy times come from the tasks' events.</p>",
    );
    out
}

fn tasks_table(out: &mut String, s: &omega::cell_state::CellSnapshot, job: &Job, from: u32) {
    let end = job.index_end();
    let _ = write!(out, "<h2>Tasks</h2>");
    let rows = (from..end.min(from.saturating_add(TASKS_PER_PAGE)))
        .filter_map(|i| s.tasks.get(omega::keys::task_id(&job.id, i).as_str()))
        .map(|t| task_row(&t.value));
    out.push_str(&table(
        &["task", "state", "node", "placements", "version", "health", "reason", "started", "exit"],
        rows,
        "tasks",
    ));
    if end > TASKS_PER_PAGE {
        let _ =
            write!(out, "<p class=\"pager\">tasks {from}..{} of {end} ", end.min(from.saturating_add(TASKS_PER_PAGE)));
        if from > 0 {
            let _ = write!(out, "<a href=\"?tasks_from={}\">&larr; previous</a> ", from.saturating_sub(TASKS_PER_PAGE));
        }
        if from.saturating_add(TASKS_PER_PAGE) < end {
            let _ = write!(out, "<a href=\"?tasks_from={}\">next &rarr;</a>", from + TASKS_PER_PAGE);
        }
        out.push_str("</p>");
    }
}

fn task_row(t: &Task) -> Vec<String> {
    let state = t.state.to_string();
    let run = t.run.as_ref();
    vec![
        escape(&t.id),
        format!("<span class=\"state-{state}\">{state}</span>"),
        t.node.as_deref().filter(|_| t.state != TaskState::Pending).map(node_link).unwrap_or_default(),
        t.placements.to_string(),
        t.version.to_string(),
        t.health.as_ref().map(|h| escape(&format!("{:?}", h.status).to_lowercase())).unwrap_or_default(),
        t.reason.as_deref().map(escape).unwrap_or_default(),
        run.map(|r| show::ago(r.started_at_ms)).unwrap_or_default(),
        run.and_then(|r| r.exit_code).map(|c| c.to_string()).unwrap_or_default(),
    ]
}

fn events(out: &mut String, s: &omega::cell_state::CellSnapshot, job: &Job) {
    let mut all: Vec<(u64, &str, &omega::events::TaskEvent)> = Vec::new();
    for t in s.tasks_of(job) {
        for e in &t.value.events {
            all.push((e.at_ms, t.value.id.as_str(), e));
        }
    }
    all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let _ = write!(out, "<h2>Events ({} kept on its tasks)</h2>", all.len());
    if all.is_empty() {
        out.push_str("<p class=\"muted\">No events yet.</p>");
        return;
    }
    let rows = all.iter().take(EVENTS_LISTED).map(|(at, task, e)| {
        vec![
            show::utc(*at),
            escape(task),
            escape(&e.kind.to_string()),
            escape(&e.message),
            if e.count > 1 { format!("x{}", e.count) } else { String::new() },
        ]
    });
    out.push_str(&table(&["when", "task", "event", "message", "repeats"], rows, "events"));
}

/// The job's kept versions, newest first (the fixed part: read from etcd once per page load).
pub fn versions(current: &Job, earlier: &[Job]) -> String {
    let mut out = String::from("<h2>Versions</h2>");
    let mut all: Vec<&Job> = earlier.iter().collect();
    all.push(current);
    all.sort_by_key(|j| std::cmp::Reverse(j.version));
    let rows = all.iter().map(|j| {
        let d = j.deployment.as_ref();
        vec![
            j.version.to_string(),
            if j.version == current.version { "current".into() } else { String::new() },
            if j.stable { "stable".into() } else { String::new() },
            escape(&j.image),
            format!(
                "{} x cpu {}, memory {}",
                j.tasks,
                show::cores(j.resources.cpu_millis),
                show::memory(j.resources.memory_bytes)
            ),
            d.map(|d| escape(&d.state.to_string())).unwrap_or_default(),
            d.map(|d| escape(&d.message)).unwrap_or_default(),
        ]
    });
    out.push_str(&table(&["version", "", "", "image", "tasks", "rollout", "rollout message"], rows, "versions"));
    out
}
