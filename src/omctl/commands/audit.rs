//! `omctl audit`: the cell's invariants at one revision; exit code 2 when any is broken.

use crate::cli::Cli;
use crate::exit::Code;
use crate::output::emit;
use crate::units;
use omega::audit::AuditReport;
use serde::Serialize;
use std::fmt::Write as _;

/// `omctl audit -o json`: the library's report plus `ok`.
#[derive(Serialize)]
pub struct AuditOutput<'a> {
    pub ok: bool,
    #[serde(flatten)]
    pub report: &'a AuditReport,
}

pub async fn run(cli: &Cli) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    let report = omega::audit::audit(&store).await?;
    let out = AuditOutput { ok: report.is_ok(), report: &report };
    emit(cli.output, &out, || render(&report))?;
    Ok(if report.is_ok() { Code::Ok } else { Code::Violations })
}

fn render(r: &AuditReport) -> String {
    let mut out = format!(
        "revision {}: {} nodes, {} jobs, {} tasks ({} placed, {} assignments); cpu {}/{} ({}), memory {}/{} ({})\n",
        r.revision,
        r.nodes,
        r.jobs,
        r.tasks,
        r.placed_tasks,
        r.assignments,
        units::cores(r.used.cpu_millis),
        units::cores(r.capacity.cpu_millis),
        units::percent(r.used.cpu_millis, r.capacity.cpu_millis),
        units::memory(r.used.memory_bytes),
        units::memory(r.capacity.memory_bytes),
        units::percent(r.used.memory_bytes, r.capacity.memory_bytes),
    );
    if r.orphan_tasks > 0 {
        let _ = writeln!(
            out,
            "{} tasks have no job record: a submission still writing, or one that failed midway (`omctl jobs` \
             lists them; submitting the same file again completes it)",
            r.orphan_tasks
        );
    }
    if r.violations.is_empty() {
        out.push_str("OK: every invariant holds\n");
    } else {
        let _ = writeln!(
            out,
            "{} {}:",
            r.violations.len(),
            if r.violations.len() == 1 { "violation" } else { "violations" }
        );
        for v in &r.violations {
            let _ = writeln!(out, "  {v}");
        }
    }
    out
}
