//! `omctl schedulers`: the live scheduler instances, what they own, and how their attempts went.
//!
//! Attempts and conflicts come from the job statuses each instance wrote (`status/<job>` names its writer):
//! they cover the jobs whose status it wrote last, not the instance's whole life (its metrics do that).

use crate::cell;
use crate::cli::Cli;
use crate::exit::Code;
use crate::output::{emit, Table};
use crate::units;
use omega::model::JobKind;
use serde::Serialize;

/// `omctl schedulers -o json`.
#[derive(Serialize)]
pub struct SchedulersOutput {
    pub revision: i64,
    pub schedulers: Vec<SchedulerRow>,
}

#[derive(Serialize)]
pub struct SchedulerRow {
    /// The scheduler's name (what jobs address in `scheduler:`).
    pub scheduler: String,
    pub instance: String,
    pub kind: JobKind,
    pub started_ms: u64,
    /// Where its Prometheus metrics are served.
    pub metrics: Option<String>,
    /// Jobs it owns now (`cell/owners/`), sorted.
    pub jobs_owned: Vec<String>,
    /// Job statuses it wrote last, and the sums of their counters.
    pub statuses: u32,
    pub attempts: u64,
    /// Attempts that hit at least one conflict.
    pub conflicts: u64,
    /// conflicts / attempts (`null` before any attempt).
    pub conflict_fraction: Option<f64>,
}

pub async fn run(cli: &Cli) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    let keys = store.keys();
    let read = cell::read(&store, &[keys.schedulers_prefix(), keys.owner(""), keys.status_prefix()]).await?;
    let s = &read.snapshot;
    let mut rows: Vec<SchedulerRow> = s
        .schedulers
        .values()
        .map(|i| {
            let i = &i.value;
            let name = format!("{}/{}", i.scheduler, i.instance);
            let mut jobs_owned: Vec<String> = s
                .owners
                .values()
                .filter(|o| o.value.scheduler == i.scheduler && o.value.instance == i.instance)
                .map(|o| o.value.job.clone())
                .collect();
            jobs_owned.sort();
            let mut row = SchedulerRow {
                scheduler: i.scheduler.clone(),
                instance: i.instance.clone(),
                kind: i.kind,
                started_ms: i.started_ms,
                metrics: i.metrics.clone(),
                jobs_owned,
                statuses: 0,
                attempts: 0,
                conflicts: 0,
                conflict_fraction: None,
            };
            for st in read.statuses.values().filter(|st| st.scheduler_instance == name) {
                row.statuses += 1;
                row.attempts += st.attempts;
                row.conflicts += st.conflicts;
            }
            row.conflict_fraction = (row.attempts > 0).then(|| row.conflicts as f64 / row.attempts as f64);
            row
        })
        .collect();
    rows.sort_by(|a, b| a.scheduler.cmp(&b.scheduler).then(a.instance.cmp(&b.instance)));
    let out = SchedulersOutput { revision: read.revision, schedulers: rows };
    emit(cli.output, &out, || render(&out))?;
    Ok(Code::Ok)
}

fn render(out: &SchedulersOutput) -> String {
    if out.schedulers.is_empty() {
        return "No scheduler instances are running. Start one with `omega-scheduler --kind batch` (or service).\n"
            .into();
    }
    let mut t = Table::new(&[
        "SCHEDULER",
        "INSTANCE",
        "KIND",
        "STARTED",
        "METRICS",
        "JOBS OWNED",
        "ATTEMPTS",
        "CONFLICTS",
        "CONFLICT FRACTION",
    ]);
    for r in &out.schedulers {
        let owned = match r.jobs_owned.len() {
            0 => "0".to_string(),
            n => format!("{n} ({})", units::truncate(&r.jobs_owned.join(","), 40)),
        };
        t.row(vec![
            r.scheduler.clone(),
            r.instance.clone(),
            units::name(&r.kind),
            units::ago(r.started_ms),
            r.metrics.clone().unwrap_or_else(|| "-".into()),
            owned,
            r.attempts.to_string(),
            r.conflicts.to_string(),
            units::ratio(r.conflicts, r.attempts),
        ]);
    }
    t.render()
}
