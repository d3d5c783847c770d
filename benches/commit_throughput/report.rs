//! The table: claims/s, the omega/raw ratio, latencies, conflicts and transactions per batch size (and
//! transport), then, with more than one transport, each one's claims/s against plain text's, then the CPU etcd
//! and this process used in each window, then the machine's load (a shared machine skews them all).

use super::omega_run::OmegaOutcome;
use super::transport::Transport;
use super::Config;
use omega_benches::raw_ceiling::{RawOutcome, RawWatch};
use omega_benches::window::Tally;
use std::fmt::Write as _;

/// One batch size's two measurements over one transport.
pub struct Row {
    pub batch: usize,
    pub transport: Transport,
    pub omega: OmegaOutcome,
    pub raw: RawOutcome,
}

impl Row {
    /// The row's first cells: the batch size, and the transport unless the run is plain text only.
    fn label(&self, config: &Config) -> String {
        if plain_only(config) {
            self.batch.to_string()
        } else {
            format!("{} | {}", self.batch, self.transport)
        }
    }
}

fn plain_only(config: &Config) -> bool {
    config.transports == [Transport::Plain]
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
    if !plain_only(config) {
        let _ = writeln!(
            s,
            "TLS: off = plain http; on = https, client certificates required (`--client-cert-auth`), etcd's \
             authentication off; rbac = on, with the cell's roles granted and authentication on, claims sent as \
             `omega-scheduler`. Certificates from deploy/tls/make-cell-certs.sh (ECDSA P-256).\n"
        );
    }
    let (head, rule) = if plain_only(config) { ("| batch size", "|---:") } else { ("| batch size | TLS", "|---:|---") };
    let _ = writeln!(
        s,
        "{head} | omega claims/s | raw etcd claims/s | ratio omega/raw | omega p50 / p99 commit latency ms \
         | raw p50 / p99 txn latency ms | conflicts (omega / raw) | txns (omega / raw) |"
    );
    let _ = writeln!(s, "{rule}|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let (omega, raw) = (&row.omega.tally, &row.raw.tally);
        let (o50, o99) = omega.percentiles_ms();
        let (r50, r99) = raw.percentiles_ms();
        let ran_out = if row.omega.exhausted { " (pool ran out)" } else { "" };
        let _ = writeln!(
            s,
            "| {} | {:.0}{} | {:.0} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {} / {} | {} / {} |",
            row.label(config),
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
    if config.transports.len() > 1 {
        transports(&mut s, config, rows);
    }
    let _ = writeln!(s, "\nCPU during the window (cores busy; µs of CPU per committed claim):\n");
    let _ = writeln!(s, "{head} | omega: etcd / bench cores | raw: etcd / bench cores | omega: etcd / bench µs per claim | raw: etcd / bench µs per claim |");
    let _ = writeln!(s, "{rule}|---:|---:|---:|---:|");
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
            row.label(config),
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

/// Each batch size's claims/s per transport, and each transport's against plain text's (or the first one's),
/// measured back to back in this run: omega's, and raw etcd's (what TLS costs etcd and a lean client, without
/// the committer).
fn transports(s: &mut String, config: &Config, rows: &[Row]) {
    let base = if config.transports.contains(&Transport::Plain) { Transport::Plain } else { config.transports[0] };
    let others: Vec<Transport> = config.transports.iter().copied().filter(|&t| t != base).collect();
    let _ = writeln!(s, "\nTLS against {base}, per batch size (ratios pairwise, from the rows above):\n");
    let mut head = String::from("| batch size |");
    for t in &config.transports {
        let _ = write!(head, " omega claims/s {t} |");
    }
    for t in &others {
        let _ = write!(head, " omega {t}/{base} |");
    }
    for t in &others {
        let _ = write!(head, " raw {t}/{base} |");
    }
    let _ = writeln!(s, "{head}");
    let _ = writeln!(s, "|---:|{}", "---:|".repeat(config.transports.len() + 2 * others.len()));
    for &batch in &config.batches {
        let find = |t: Transport| rows.iter().find(|r| r.batch == batch && r.transport == t);
        let (Some(b), mut line) = (find(base), format!("| {batch} |")) else { continue };
        for &t in &config.transports {
            let cell = find(t).map(|r| format!("{:.0}", r.omega.tally.claims_per_sec())).unwrap_or_else(|| "?".into());
            let _ = write!(line, " {cell} |");
        }
        let ratio = |x: f64, y: f64| if y > 0.0 { format!("{:.2}", x / y) } else { "?".into() };
        for &t in &others {
            let cell = find(t).map(|r| ratio(r.omega.tally.claims_per_sec(), b.omega.tally.claims_per_sec()));
            let _ = write!(line, " {} |", cell.unwrap_or_else(|| "?".into()));
        }
        for &t in &others {
            let cell = find(t).map(|r| ratio(r.raw.claims_per_sec(), b.raw.claims_per_sec()));
            let _ = write!(line, " {} |", cell.unwrap_or_else(|| "?".into()));
        }
        let _ = writeln!(s, "{line}");
    }
}
