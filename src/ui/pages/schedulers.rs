//! The Schedulers page: every scheduler instance, its lifetime counters as `omctl schedulers` shows them, and
//! small charts of how it has been doing since the UI started watching.
//!
//! The counters are the instance's own record (`cell/schedulers/<name>/<instance>`, republished every 2 s
//! while they move). The conflict fraction is the Omega paper's: conflicted transactions per successful one,
//! where a transaction is an attempt that sent at least one claim ([`omega::model::conflict_fraction`]); the
//! charts take it over each interval between two samples, the table over the instance's life.

use crate::cache::View;
use crate::chart::line_chart;
use crate::history::History;
use crate::html::{escape, table};
use omega::model::SchedulerKind;
use omega::units::show;
use std::collections::HashMap;
use std::fmt::Write;

pub fn render(view: &View, history: &History) -> String {
    let s = &view.snapshot;
    let mut owned: HashMap<(String, String), usize> = HashMap::new();
    for o in s.owners.values() {
        *owned.entry((o.value.scheduler.clone(), o.value.instance.clone())).or_default() += 1;
    }
    let mut instances: Vec<_> = s.schedulers.iter().collect();
    instances.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = String::new();
    if instances.is_empty() {
        out.push_str("<p class=\"muted\">No scheduler instance is running.</p>");
    }
    let rows = instances.iter().map(|(key, i)| {
        let i = &i.value;
        let st = &i.stats;
        let kind = match i.kind_of_scheduler() {
            SchedulerKind::Batch => "batch",
            SchedulerKind::Service => "service",
            SchedulerKind::Monolithic => "monolithic",
        };
        let lived = st.updated_ms.saturating_sub(i.started_ms);
        let busyness = (lived > 0).then(|| st.busy_ms as f64 / lived as f64);
        let commit = (st.transactions > 0).then(|| st.commit_ms as f64 / st.transactions as f64);
        vec![
            format!("<a href=\"#{}\">{}</a>", escape(&anchor(key)), escape(&i.scheduler)),
            escape(&i.instance),
            format!("{kind}{}", i.lock.as_deref().map(|l| format!(" (lock {})", escape(l))).unwrap_or_default()),
            owned.get(&(i.scheduler.clone(), i.instance.clone())).copied().unwrap_or(0).to_string(),
            st.attempts.to_string(),
            st.transactions.to_string(),
            st.attempts_conflicted.to_string(),
            st.conflict_fraction().map_or("-".into(), |f| format!("{f:.3}")),
            st.placed.to_string(),
            busyness.map_or("-".into(), |b| format!("{:.1}%", b * 100.0)),
            commit.map_or("-".into(), |c| format!("{c:.1} ms")),
            show::ago(i.started_ms),
            show::ago(st.updated_ms),
        ]
    });
    out.push_str(&table(
        &[
            "scheduler",
            "instance",
            "kind",
            "jobs owned",
            "attempts",
            "transactions",
            "conflicted",
            "conflict fraction",
            "placed",
            "busyness",
            "commit / txn",
            "started",
            "counters from",
        ],
        rows,
        "schedulers",
    ));
    out.push_str(
        "<p class=\"muted\">Conflict fraction: conflicted transactions per successful one (the Omega paper's; it can \
         exceed 1). A transaction is an attempt that sent at least one claim. Busyness: time spent deciding over \
         time. Charts: per interval between the instance's published counters, since the UI started.</p>",
    );
    for (key, h) in &history.schedulers {
        let points = h.points();
        let series = |f: &dyn Fn(&crate::history::Point) -> Option<f64>| -> Vec<(u64, Option<f64>)> {
            points.iter().map(|p| (p.at_ms, f(p))).collect()
        };
        let gone =
            h.gone_since_ms.map(|t| format!(" <span class=\"warn\">gone {}</span>", show::ago(t))).unwrap_or_default();
        let _ = write!(
            out,
            "<h2 id=\"{}\" class=\"instance\" data-instance=\"{}\">{}{gone}</h2><div class=\"charts\">{}{}{}{}{}</div>",
            escape(&anchor(key)),
            escape(key),
            escape(key),
            line_chart("conflict fraction", &series(&|p| p.conflict_fraction), |v| format!("{v:.2}")),
            line_chart("attempts/s", &series(&|p| Some(p.attempts_per_s)), |v| format!("{v:.1}")),
            line_chart("placements/s", &series(&|p| Some(p.placements_per_s)), |v| format!("{v:.1}")),
            line_chart("busyness", &series(&|p| Some(p.busyness)), |v| format!("{:.1}%", v * 100.0)),
            line_chart("commit latency per txn", &series(&|p| p.commit_ms), |v| format!("{v:.1} ms")),
        );
    }
    out
}

/// An HTML id for an instance (`batch/b-1` -> `i-batch-b-1`).
fn anchor(key: &str) -> String {
    let cleaned: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    format!("i-{cleaned}")
}
