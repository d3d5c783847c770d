//! The table: claims/s, the omega/raw ratio, latencies, conflicts and transactions per batch size, then the
//! CPU etcd and this process used in each window, then the machine's load (a shared machine skews them all).

use super::omega_run::OmegaOutcome;
use super::Config;
use omega_benches::raw_ceiling::{RawOutcome, RawWatch};
use omega_benches::window::Tally;
use std::fmt::Write as _;

/// One batch size's two measurements.
pub struct Row {
    pub batch: usize,
    pub omega: OmegaOutcome,
    pub raw: RawOutcome,
}

pub fn table(config: &Config, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Commit throughput: {} workers, {} live nodes, one claim per node per commit, {:.1}s measured per cell \
         (after {:.1}s warm-up), fresh etcd per measurement{}.\n",
        config.workers,
        config.nodes,
        config.measure.as_secs_f64(),
        config.warmup.as_secs_f64(),
        match &config.endpoint {
            Some(e) => format!(" at {e}"),
            None => " (Debian etcd, loopback, temp dir)".into(),
        }
    );
    let _ = writeln!(
        s,
        "| batch size | omega claims/s | raw etcd claims/s | ratio omega/raw | omega p50 / p99 commit latency ms \
         | raw p50 / p99 txn latency ms | conflicts (omega / raw) | txns (omega / raw) |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let (omega, raw) = (&row.omega.tally, &row.raw.tally);
        let (o50, o99) = omega.percentiles_ms();
        let (r50, r99) = raw.percentiles_ms();
        let ran_out = if row.omega.exhausted { " (pool ran out)" } else { "" };
        let _ = writeln!(
            s,
            "| {} | {:.0}{} | {:.0} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {} / {} | {} / {} |",
            row.batch,
            omega.claims_per_sec(),
            ran_out,
            raw.claims_per_sec(),
            omega.claims_per_sec() / raw.claims_per_sec(),
            o50,
            o99,
            r50,
            r99,
            omega.conflicts,
            raw.conflicts,
            omega.txns,
            raw.txns,
        );
    }
    let _ = writeln!(
        s,
        "\nomega latency is per etcd transaction of a commit (`CommitReport::latencies`, a commit of B > 125 \
         claims sends two concurrently); claims/s counts commits that completed inside the window. The omega \
         cell-state cache {} during the measurement.",
        if config.cache { "was running" } else { "was not running (OMEGA_BENCH_CACHE=0)" }
    );
    if config.raw_watch != RawWatch::None {
        let _ = writeln!(s, "The raw etcd runs had a watch on their cell range ({:?}).", config.raw_watch);
    }
    let _ = writeln!(s, "\nCPU during the window (cores busy; µs of CPU per committed claim):\n");
    let _ = writeln!(s, "| batch size | omega: etcd / bench cores | raw: etcd / bench cores | omega: etcd / bench µs per claim | raw: etcd / bench µs per claim |");
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|");
    for row in rows {
        let cores = |o: &Tally| match o.cpu {
            Some(c) => format!(
                "{} / {:.2}",
                c.etcd.map(|e| format!("{:.2}", e / o.window.as_secs_f64())).unwrap_or_else(|| "?".into()),
                c.process / o.window.as_secs_f64()
            ),
            None => "? / ?".into(),
        };
        let per_claim = |o: &Tally| match o.cpu {
            Some(c) if o.claims > 0 => format!(
                "{} / {:.0}",
                c.etcd.map(|e| format!("{:.0}", e * 1e6 / o.claims as f64)).unwrap_or_else(|| "?".into()),
                c.process * 1e6 / o.claims as f64
            ),
            _ => "? / ?".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            row.batch,
            cores(&row.omega.tally),
            cores(&row.raw.tally),
            per_claim(&row.omega.tally),
            per_claim(&row.raw.tally)
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        s,
        "\n{} CPUs; load average at the end: {} (other work on the machine skews these numbers).",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    s
}
