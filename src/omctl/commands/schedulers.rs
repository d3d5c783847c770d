//! `omctl schedulers`: the live scheduler instances, what they own, and how their attempts went.
//!
//! The counters come from each instance's own record (`stats`, republished every few seconds while they move):
//! its whole life since it started. An instance whose record carries no counters (an older scheduler) falls
//! back to the sums of the job statuses it wrote last, which cover only those jobs; `counters_from` says which.
//!
//! The conflict fraction is the Omega paper's: conflicted transactions per successful one, where a transaction
//! is an attempt that sent at least one claim. Job statuses count attempts only, so for an instance known only
//! by them the fraction is taken over attempts (which also count attempts that sent nothing).

use crate::cell;
use crate::cli::Cli;
use crate::exit::Code;
use crate::output::{emit, Table};
use crate::units;
use omega::model::{conflict_fraction, JobStatus, SchedulerInstance, SchedulerKind};
use serde::Serialize;
use std::collections::BTreeMap;

/// `omctl schedulers -o json`.
#[derive(Serialize)]
pub struct SchedulersOutput {
    pub revision: i64,
    pub schedulers: Vec<SchedulerRow>,
}

/// Where a row's counters come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CountersFrom {
    /// The instance's own record: everything since it started.
    Instance,
    /// Sums over the job statuses it wrote last (its record carries no counters).
    JobStatuses,
}

#[derive(Serialize)]
pub struct SchedulerRow {
    /// The scheduler's name (what jobs address in `scheduler:`).
    pub scheduler: String,
    pub instance: String,
    /// What the instance is: `batch`, `service` or `monolithic`.
    pub kind: SchedulerKind,
    /// The etcd lock it holds around each attempt (`--lock`, pessimistic), if any.
    pub lock: Option<String>,
    pub started_ms: u64,
    /// Where its Prometheus metrics are served.
    pub metrics: Option<String>,
    /// Jobs it owns now (`cell/owners/`), sorted.
    pub jobs_owned: Vec<String>,
    pub counters_from: CountersFrom,
    /// Job statuses it wrote last.
    pub statuses: u32,
    /// Attempts: one per job per decision, whether or not it sent a claim.
    pub attempts: u64,
    /// The Omega paper's transactions: attempts that sent at least one claim (`null` when only job statuses
    /// are known).
    pub transactions: Option<u64>,
    /// Transactions that hit at least one conflict.
    pub conflicts: u64,
    /// The Omega paper's conflict fraction: conflicted transactions per successful one (`null` before any
    /// successful one). It can exceed 1.
    pub conflict_fraction: Option<f64>,
    /// Tasks placed (claims committed); `null` when only job statuses are known.
    pub placed: Option<u64>,
    /// Claims sent, and how many conflicted.
    pub claims: Option<u64>,
    pub claims_conflicted: Option<u64>,
    /// Time spent deciding (the paper's busyness, useful and wasted), and committing.
    pub busy_ms: Option<u64>,
    pub commit_ms: Option<u64>,
    /// Busy time over the time since it started, up to its last report.
    pub busyness: Option<f64>,
    /// Time spent waiting for the cell lock (`--lock`), apart from busyness.
    pub lock_wait_ms: Option<u64>,
    /// The mean wait from a job's submission to its first attempt (`null` before any).
    pub mean_first_attempt_wait_ms: Option<f64>,
    /// When the instance last published its counters.
    pub stats_updated_ms: Option<u64>,
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
            let i = &*i.value;
            let mut jobs_owned: Vec<String> = s
                .owners
                .values()
                .filter(|o| o.value.scheduler == i.scheduler && o.value.instance == i.instance)
                .map(|o| o.value.job.clone())
                .collect();
            jobs_owned.sort();
            row(i, jobs_owned, &read.statuses)
        })
        .collect();
    rows.sort_by(|a, b| a.scheduler.cmp(&b.scheduler).then(a.instance.cmp(&b.instance)));
    let out = SchedulersOutput { revision: read.revision, schedulers: rows };
    emit(cli.output, &out, || render(&out))?;
    Ok(Code::Ok)
}

/// One instance's row: its own counters when its record has them, else the sums of its job statuses.
pub fn row(i: &SchedulerInstance, jobs_owned: Vec<String>, statuses: &BTreeMap<String, JobStatus>) -> SchedulerRow {
    let name = format!("{}/{}", i.scheduler, i.instance);
    let mine: Vec<&JobStatus> = statuses.values().filter(|st| st.scheduler_instance == name).collect();
    let mut row = SchedulerRow {
        scheduler: i.scheduler.clone(),
        instance: i.instance.clone(),
        kind: i.kind_of_scheduler(),
        lock: i.lock.clone(),
        started_ms: i.started_ms,
        metrics: i.metrics.clone(),
        jobs_owned,
        counters_from: CountersFrom::JobStatuses,
        statuses: mine.len() as u32,
        attempts: mine.iter().map(|st| st.attempts).sum(),
        transactions: None,
        conflicts: mine.iter().map(|st| st.conflicts).sum(),
        conflict_fraction: None,
        placed: None,
        claims: None,
        claims_conflicted: None,
        busy_ms: None,
        commit_ms: None,
        busyness: None,
        lock_wait_ms: None,
        mean_first_attempt_wait_ms: None,
        stats_updated_ms: None,
    };
    row.conflict_fraction = conflict_fraction(row.conflicts, row.attempts);
    // A record that never published counters has them all zero, `updated_ms` included.
    let stats = &i.stats;
    if stats.updated_ms > 0 {
        row.counters_from = CountersFrom::Instance;
        row.attempts = stats.attempts;
        row.transactions = Some(stats.transactions);
        row.conflicts = stats.attempts_conflicted;
        row.conflict_fraction = stats.conflict_fraction();
        row.placed = Some(stats.placed);
        row.claims = Some(stats.claims);
        row.claims_conflicted = Some(stats.claims_conflicted);
        row.busy_ms = Some(stats.busy_ms);
        row.commit_ms = Some(stats.commit_ms);
        row.stats_updated_ms = Some(stats.updated_ms);
        let lived = stats.updated_ms.saturating_sub(i.started_ms);
        row.busyness = (lived > 0 && i.started_ms > 0).then(|| stats.busy_ms as f64 / lived as f64);
        row.lock_wait_ms = i.lock.is_some().then_some(stats.lock_wait_ms);
        row.mean_first_attempt_wait_ms = stats.mean_first_attempt_wait_ms();
    }
    row
}

fn render(out: &SchedulersOutput) -> String {
    if out.schedulers.is_empty() {
        return "No scheduler instances are running. Start one with `omega-scheduler --kind batch` (or service, or \
                monolithic).\n"
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
        "TRANSACTIONS",
        "CONFLICTED",
        "CONFLICT FRACTION",
        "PLACED",
        "CLAIMS (CONFLICTED)",
        "BUSY",
        "COMMITTING",
    ]);
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for r in &out.schedulers {
        let owned = match r.jobs_owned.len() {
            0 => "0".to_string(),
            n => format!("{n} ({})", units::truncate(&r.jobs_owned.join(","), 40)),
        };
        let busy = r.busy_ms.map(|ms| match r.busyness {
            Some(b) => format!("{} ({:.1}%)", seconds(ms), b * 100.0),
            None => seconds(ms),
        });
        t.row(vec![
            r.scheduler.clone(),
            r.instance.clone(),
            match &r.lock {
                Some(lock) => format!("{} (lock {lock})", units::name(&r.kind)),
                None => units::name(&r.kind),
            },
            units::ago(r.started_ms),
            r.metrics.clone().unwrap_or_else(|| "-".into()),
            owned,
            r.attempts.to_string(),
            or_dash(r.transactions.map(|n| n.to_string())),
            r.conflicts.to_string(),
            or_dash(r.conflict_fraction.map(|f| format!("{f:.2}"))),
            or_dash(r.placed.map(|n| n.to_string())),
            or_dash(r.claims.zip(r.claims_conflicted).map(|(c, x)| format!("{c} ({x})"))),
            or_dash(busy),
            or_dash(r.commit_ms.map(seconds)),
        ]);
    }
    let mut text = t.render();
    if out.schedulers.iter().any(|r| r.counters_from == CountersFrom::JobStatuses) {
        text.push_str(
            "Instances without PLACED publish no counters of their own; their attempts and conflicts are the sums of \
             the job statuses they wrote last, and their conflict fraction is taken over attempts.\n",
        );
    }
    text
}

/// `12.3s`.
fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}
