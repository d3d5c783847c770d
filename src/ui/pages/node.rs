//! The Node page: what the node is, its ledger against its capacity, its drain, its liveness as the UI saw it
//! change, and the tasks holding resources on it.

use crate::cache::View;
use crate::error::{Error, Result};
use crate::history::History;
use crate::html::{bar, escape, job_link, table};
use crate::zones::zone_label;
use omega::units::show;
use std::fmt::Write;

pub fn render(view: &View, history: &History, name: &str) -> Result<String> {
    let s = &view.snapshot;
    let node = s.nodes.get(name);
    let ledger = s.allocations.get(name);
    if node.is_none() && ledger.is_none() {
        return Err(Error::NotFound(format!("node {name}")));
    }
    let alive = s.live.get(name);
    let mut out = String::new();
    out.push_str("<table class=\"summary\"><tbody>");
    let mut rows: Vec<(&str, String)> = vec![
        (
            "liveness",
            match alive {
                Some(l) => format!(
                    "<span id=\"liveness\" class=\"state-running\">alive</span> since {}",
                    show::when(l.value.since_ms)
                ),
                None => "<span id=\"liveness\" class=\"state-failed\">down</span> (no liveness key)".into(),
            },
        ),
        ("zone", escape(zone_label(view.zones.zone_of(name).unwrap_or("")))),
    ];
    if let Some(n) = node {
        let n = &n.value;
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rows.push(("labels", escape(&labels.join(", "))));
        rows.push(("address", escape(n.address.as_deref().unwrap_or("-"))));
        rows.push(("registered", show::when(n.registered_at_ms)));
    }
    if let Some(l) = ledger {
        let l = &l.value;
        rows.push((
            "cpu allocated",
            bar(
                l.used.cpu_millis,
                l.capacity.cpu_millis,
                &format!(
                    "{} of {} cores ({})",
                    show::cores(l.used.cpu_millis),
                    show::cores(l.capacity.cpu_millis),
                    show::percent(l.used.cpu_millis, l.capacity.cpu_millis)
                ),
            ),
        ));
        rows.push((
            "memory allocated",
            bar(
                l.used.memory_bytes,
                l.capacity.memory_bytes,
                &format!(
                    "{} of {} ({})",
                    show::memory(l.used.memory_bytes),
                    show::memory(l.capacity.memory_bytes),
                    show::percent(l.used.memory_bytes, l.capacity.memory_bytes)
                ),
            ),
        ));
        rows.push(("tasks in the ledger", l.tasks.to_string()));
        rows.push(("schedulable", if l.schedulable { "yes".into() } else { "<span class=\"warn\">no</span>".into() }));
    }
    if let Some(d) = s.drains.get(name) {
        let d = &d.value;
        rows.push((
            "drain",
            escape(&format!(
                "{}: {} moved, {} migrating, {} still on the node, {} stopped at the deadline; deadline {}{}",
                d.state,
                d.moved,
                d.migrations.len(),
                d.remaining,
                d.forced,
                show::when(d.deadline_ms),
                if d.message.is_empty() { String::new() } else { format!(" ({})", d.message) }
            )),
        ));
    }
    for (k, v) in rows {
        let _ = write!(out, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    out.push_str("</tbody></table>");

    out.push_str("<h2>Liveness, as the UI saw it</h2>");
    match history.nodes.get(name) {
        Some(h) if !h.changes.is_empty() => {
            let rows = h.changes.iter().rev().enumerate().map(|(i, (at, up))| {
                let first = i + 1 == h.changes.len();
                let what = match (up, first && *at <= history.started_ms + 5_000) {
                    (true, true) => "alive when the UI started",
                    (false, true) => "down when the UI started",
                    (true, false) => "came up",
                    (false, false) => "went down",
                };
                vec![show::utc(*at), what.to_string()]
            });
            out.push_str(&table(&["when", ""], rows, "liveness"));
        }
        _ => out.push_str("<p class=\"muted\">Nothing seen yet.</p>"),
    }

    let mut tasks: Vec<_> = s.tasks_on(name).collect();
    tasks.sort_by(|a, b| a.value.job.cmp(&b.value.job).then(a.value.index.cmp(&b.value.index)));
    let _ = write!(out, "<h2>Tasks holding resources here ({})</h2>", tasks.len());
    if tasks.is_empty() {
        out.push_str("<p class=\"muted\">None.</p>");
    } else {
        let rows = tasks.iter().map(|t| {
            let t = &t.value;
            vec![
                job_link(&t.job),
                escape(&t.id),
                escape(&t.state.to_string()),
                format!("{} / {}", show::cores(t.resources.cpu_millis), show::memory(t.resources.memory_bytes)),
                t.priority.to_string(),
                escape(t.placed_by.as_deref().unwrap_or("")),
                t.run.as_ref().map(|r| show::ago(r.started_at_ms)).unwrap_or_default(),
            ]
        });
        out.push_str(&table(
            &["job", "task", "state", "cpu / memory", "priority", "placed by", "started"],
            rows,
            "tasks",
        ));
    }
    Ok(out)
}
