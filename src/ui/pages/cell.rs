//! The Cell page: the node heat-map by zone, totals per zone, and the nodes that are down or draining.

use crate::cache::View;
use crate::heatmap::{self, Options, Totals};
use crate::html::{bar, count, escape, node_link, table, url_encode};
use crate::zones::zone_label;
use omega::units::show;
use std::fmt::Write;

/// Nodes listed by name under "down or draining" and "matching the search" before the list is cut.
const LISTED: usize = 100;

/// The search and metric form (fixed: a person types into it).
pub fn form(options: &Options) -> String {
    let metric = |m: heatmap::Metric, label: &str| {
        let selected = if options.metric == m { " selected" } else { "" };
        format!("<option value=\"{}\"{selected}>{label}</option>", m.name())
    };
    let zone = options
        .zone
        .as_deref()
        .map(|z| format!("<input type=\"hidden\" name=\"zone\" value=\"{}\">", escape(z)))
        .unwrap_or_default();
    format!(
        "<form class=\"filters\" method=\"get\" action=\"/\">{zone}\
         <label>Find nodes<input type=\"search\" name=\"q\" value=\"{}\" placeholder=\"part of a node name\"></label>\
         <label>Color by<select name=\"metric\">{}{}{}</select></label><button type=\"submit\">Show</button></form>",
        escape(options.search.as_deref().unwrap_or("")),
        metric(heatmap::Metric::Max, "max(cpu, memory)"),
        metric(heatmap::Metric::Cpu, "cpu"),
        metric(heatmap::Metric::Memory, "memory"),
    )
}

pub fn render(view: &View, options: &Options) -> String {
    let zones = heatmap::zones(view, options);
    let mut cell = Totals::default();
    for z in &zones {
        cell.merge(&z.totals);
    }
    let s = &view.snapshot;
    let mut out = String::new();
    let _ = write!(
        out,
        "<div class=\"cards\">{}{}{}{}{}</div>",
        card("nodes", &count(cell.nodes), &format!("{} down, {} draining", cell.down, cell.draining)),
        card(
            "cpu allocated",
            &show::percent(cell.cpu.0, cell.cpu.1),
            &format!("{} of {} cores", show::cores(cell.cpu.0), show::cores(cell.cpu.1))
        ),
        card(
            "memory allocated",
            &show::percent(cell.memory.0, cell.memory.1),
            &format!("{} of {}", show::memory(cell.memory.0), show::memory(cell.memory.1))
        ),
        card("tasks placed", &count(cell.tasks), &format!("{} jobs", count(view.jobs.rows.len() as u64))),
        card("revision", &s.revision.to_string(), "etcd revision shown"),
    );
    if let Some(zone) = &options.zone {
        let _ = write!(out, "<p><a href=\"{}\">All zones</a> &rsaquo; ", escape(&options.query(None, None)));
        match options.range {
            Some((a, b)) => {
                let _ = write!(
                    out,
                    "<a href=\"{}\">{}</a> &rsaquo; nodes {a}..{b}</p>",
                    escape(&options.query(Some(zone), None)),
                    escape(zone_label(zone))
                );
            }
            None => {
                let _ = write!(out, "{}</p>", escape(zone_label(zone)));
            }
        }
    }
    if zones.is_empty() {
        out.push_str("<p class=\"muted\">No nodes registered.</p>");
    }
    out.push_str("<h2>Allocated, by zone</h2>");
    out.push_str(&heatmap::legend(options.metric));
    for z in &zones {
        let t = &z.totals;
        let _ = write!(
            out,
            "<div class=\"zone\" data-zone=\"{zone}\"><h3><a href=\"{href}\">{label}</a> <span class=\"muted\">{} nodes, \
             {} down, {} draining</span></h3>\
             <div>cpu {} &nbsp; memory {}</div>{}</div>",
            t.nodes,
            t.down,
            t.draining,
            bar(t.cpu.0, t.cpu.1, &format!("{} of {} cores", show::cores(t.cpu.0), show::cores(t.cpu.1))),
            bar(t.memory.0, t.memory.1, &format!("{} of {}", show::memory(t.memory.0), show::memory(t.memory.1))),
            heatmap::zone_svg(z, options),
            zone = escape(&z.zone),
            href = escape(&options.query(Some(&z.zone), None)),
            label = escape(zone_label(&z.zone)),
        );
    }
    out.push_str("<h2>Totals per zone</h2>");
    let rows = zones.iter().map(|z| {
        let t = &z.totals;
        vec![
            format!("<a href=\"/?zone={}\">{}</a>", url_encode(&z.zone), escape(zone_label(&z.zone))),
            t.nodes.to_string(),
            (t.nodes - t.down).to_string(),
            t.down.to_string(),
            t.draining.to_string(),
            t.tasks.to_string(),
            format!("{} / {} ({})", show::cores(t.cpu.0), show::cores(t.cpu.1), show::percent(t.cpu.0, t.cpu.1)),
            format!(
                "{} / {} ({})",
                show::memory(t.memory.0),
                show::memory(t.memory.1),
                show::percent(t.memory.0, t.memory.1)
            ),
        ]
    });
    out.push_str(&table(
        &["zone", "nodes", "alive", "down", "draining", "tasks", "cpu allocated", "memory allocated"],
        rows,
        "totals",
    ));
    if options.search.as_deref().is_some_and(|q| !q.is_empty()) {
        let matched: Vec<&heatmap::NodeCell> =
            zones.iter().flat_map(|z| z.nodes.iter()).filter(|n| n.matched).collect();
        let _ = write!(out, "<h2>Nodes matching the search ({})</h2><p class=\"matches\">", matched.len());
        for n in matched.iter().take(LISTED) {
            let _ = write!(out, "{} ", node_link(&n.name));
        }
        if matched.len() > LISTED {
            let _ = write!(out, "<span class=\"muted\">and {} more</span>", matched.len() - LISTED);
        }
        out.push_str("</p>");
    }
    let troubled: Vec<(&str, &heatmap::NodeCell)> = zones
        .iter()
        .flat_map(|z| z.nodes.iter().map(move |n| (z.zone.as_str(), n)))
        .filter(|(_, n)| n.down || n.draining)
        .collect();
    let _ = write!(out, "<h2>Nodes down or draining ({})</h2>", troubled.len());
    if troubled.is_empty() {
        out.push_str("<p class=\"muted\">None.</p>");
    } else {
        let rows = troubled.iter().take(LISTED).map(|(zone, n)| {
            let drain = s.drains.get(&n.name).map(|d| {
                format!(
                    "{} ({} moved, {} migrating, deadline {})",
                    d.value.state,
                    d.value.moved,
                    d.value.migrations.len(),
                    show::when(d.value.deadline_ms)
                )
            });
            let since = s.live.get(&n.name).map(|l| l.value.since_ms).unwrap_or(0);
            vec![
                node_link(&n.name),
                escape(zone_label(zone)),
                if n.down { "down".into() } else { "alive".into() },
                if n.draining { escape(&drain.unwrap_or_else(|| "not schedulable".into())) } else { String::new() },
                n.tasks.to_string(),
                if n.down { String::new() } else { show::ago(since) },
            ]
        });
        out.push_str(&table(&["node", "zone", "liveness", "drain", "tasks", "alive since"], rows, "troubled"));
        if troubled.len() > LISTED {
            let _ = write!(out, "<p class=\"muted\">and {} more</p>", troubled.len() - LISTED);
        }
    }
    out
}

fn card(what: &str, big: &str, small: &str) -> String {
    format!(
        "<div class=\"card\"><div class=\"muted\">{}</div><div class=\"big\">{}</div><div class=\"muted\">{}</div></div>",
        escape(what),
        escape(big),
        escape(small)
    )
}
