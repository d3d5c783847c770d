//! The results as people read them (two markdown tables) and as programs read them (JSON, CSV).

use crate::result::{RunResult, SchedulerResult, Spread};
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// Where and how the results were made, written beside them.
#[derive(Serialize)]
pub struct Environment {
    pub command: String,
    pub started_utc: String,
    pub cores: usize,
    pub etcd_version: String,
}

impl Environment {
    pub fn here() -> Environment {
        let etcd_version = std::process::Command::new(omega::etcd_process::etcd_binary())
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_default();
        Environment {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            started_utc: omega::units::utc(omega::model::now_ms()),
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            etcd_version,
        }
    }
}

fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_infinite() => "inf".into(),
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    }
}

fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn spread(s: &Spread) -> String {
    match s.n {
        0 => "-".into(),
        _ => format!("{} / {} / {}", num(s.mean, 2), num(s.p90, 2), num(s.p99, 2)),
    }
}

/// The two tables: one row per run, then one row per scheduler of each run.
pub fn tables(results: &[RunResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| run | jobs | tasks | placed/s | backlog placed/s | best 1 s | raw ceiling claims/s | ratio (best) | etcd cores | wait all placed, batch s (mean / p90 / p99) | service s | unplaced | checks |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|");
    for r in results {
        let failed = r.failed_checks().len();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
            r.spec.label,
            r.jobs_submitted,
            r.tasks_submitted,
            rate(r.placement_rate),
            match (r.backlog_rate, r.backlog_secs) {
                (Some(v), Some(secs)) => format!("{} ({} in {secs:.1} s)", rate(v), r.backlog_tasks),
                _ => "-".into(),
            },
            rate(r.placement_rate_best_second),
            r.raw_ceiling_claims_per_sec.map(rate).unwrap_or_else(|| "-".into()),
            num(r.ceiling_ratio, 2),
            num(r.ceiling_ratio_best_second, 2),
            num(r.etcd_cpu_cores, 2),
            spread(&r.wait_all_placed_batch),
            spread(&r.wait_all_placed_service),
            r.tasks_unplaced,
            if failed == 0 { format!("{} ok", r.checks.len()) } else { format!("**{failed} failed**") },
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| run | scheduler | txns | conflict fraction (paper) | task conflicts | attempts/job | busyness | commit | lock wait | cache wait | bookkeeping | idle | commit p50 / p99 ms | claims/txn | wait first attempt s (mean / p90 / p99) |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|");
    for r in results {
        for sch in &r.schedulers {
            let _ = writeln!(
                s,
                "{}",
                scheduler_row(&r.spec.label, sch, r.instances.iter().filter(|i| i.scheduler == sch.scheduler).count())
            );
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| run | etcd db max MB | db at end MB | db growth, 2nd half / 1st | nodes alive (min) | liveness keys lost | lease keep-alive failures | leases lost | proxy |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in results {
        let Some(h) = &r.health else { continue };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} |",
            r.spec.label,
            h.db_size_max_bytes >> 20,
            h.db_size_end_bytes >> 20,
            h.db_growth_second_half,
            h.nodes_alive_min,
            h.liveness_lost,
            r.lease_renewal_failures,
            r.leases_lost,
            if r.spec.cell.proxy { "yes" } else { "no" },
        );
    }
    s
}

fn scheduler_row(run: &str, s: &SchedulerResult, instances: usize) -> String {
    let c = &s.counters;
    format!(
        "| {run} | {}{} | {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} / {} | {} | {} |",
        s.scheduler,
        if instances > 1 { format!(" x{instances}") } else { String::new() },
        c.transactions,
        num(s.conflict_fraction, 3),
        num(s.task_conflict_fraction, 3),
        num(s.attempts_per_job, 2),
        s.busyness,
        s.commit_share,
        s.lock_wait_share,
        s.cache_wait_share,
        s.bookkeeping_share,
        s.idle_share,
        num(s.commit_latency_p50_ms, 1),
        num(s.commit_latency_p99_ms, 1),
        num(s.claims_per_txn, 1),
        spread(&s.wait_first_attempt),
    )
}

/// One CSV row per scheduler instance and per scheduler total, with the run's figures on each.
pub fn csv(results: &[RunResult]) -> String {
    let mut s = String::from(
        "run,x,members,scheduler,instance,transactions,transactions_conflicted,conflict_fraction,claims,claims_conflicted,task_conflict_fraction,attempts_per_job,busyness,commit_share,lock_wait_share,cache_wait_share,bookkeeping_share,idle_share,commit_p50_ms,commit_p99_ms,claims_per_txn,wait_first_attempt_mean_s,wait_first_attempt_p90_s,wait_first_attempt_p99_s,window_s,tasks_submitted,tasks_placed,placement_rate,backlog_rate,placement_rate_best_second,wait_all_batch_mean_s,wait_all_batch_p90_s,wait_all_batch_p99_s,wait_all_service_mean_s,wait_all_service_p90_s,wait_all_service_p99_s,etcd_cpu_cores,raw_ceiling,ceiling_ratio\n",
    );
    let f = |v: Option<f64>| v.filter(|x| x.is_finite()).map(|x| format!("{x}")).unwrap_or_default();
    for r in results {
        for sch in r.instances.iter().chain(&r.schedulers) {
            let c = &sch.counters;
            let cells = [
                r.spec.label.replace(',', ";"),
                format!("{}", r.spec.x),
                r.spec.cell.members.to_string(),
                sch.scheduler.clone(),
                sch.instance.clone(),
                c.transactions.to_string(),
                c.transactions_conflicted.to_string(),
                f(sch.conflict_fraction),
                c.claims().to_string(),
                c.claims_conflicted.to_string(),
                f(sch.task_conflict_fraction),
                f(sch.attempts_per_job),
                sch.busyness.to_string(),
                sch.commit_share.to_string(),
                sch.lock_wait_share.to_string(),
                sch.cache_wait_share.to_string(),
                sch.bookkeeping_share.to_string(),
                sch.idle_share.to_string(),
                f(sch.commit_latency_p50_ms),
                f(sch.commit_latency_p99_ms),
                f(sch.claims_per_txn),
                f(sch.wait_first_attempt.mean),
                f(sch.wait_first_attempt.p90),
                f(sch.wait_first_attempt.p99),
                r.window_secs.to_string(),
                r.tasks_submitted.to_string(),
                r.tasks_placed.to_string(),
                r.placement_rate.to_string(),
                f(r.backlog_rate),
                r.placement_rate_best_second.to_string(),
                f(r.wait_all_placed_batch.mean),
                f(r.wait_all_placed_batch.p90),
                f(r.wait_all_placed_batch.p99),
                f(r.wait_all_placed_service.mean),
                f(r.wait_all_placed_service.p90),
                f(r.wait_all_placed_service.p99),
                f(r.etcd_cpu_cores),
                f(r.raw_ceiling_claims_per_sec),
                f(r.ceiling_ratio),
            ];
            let _ = writeln!(s, "{}", cells.join(","));
        }
    }
    s
}

#[derive(Serialize)]
struct Document<'a> {
    environment: &'a Environment,
    runs: &'a [RunResult],
}

/// Writes results.json, results.csv and table.md into `out`.
pub fn write(out: &Path, env: &Environment, results: &[RunResult]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(&Document { environment: env, runs: results })?;
    std::fs::write(out.join("results.json"), json)?;
    std::fs::write(out.join("results.csv"), csv(results))?;
    let md = format!(
        "Command: `{}`\n\nMachine: {} cores, {}; started {}\n\n{}",
        env.command,
        env.cores,
        env.etcd_version,
        env.started_utc,
        tables(results)
    );
    std::fs::write(out.join("table.md"), md)?;
    Ok(())
}
