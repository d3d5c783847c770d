//! `omega-controller`: one replica of the cell controller (run several; one leads).

use anyhow::Context;
use clap::Parser;
use omega::keys::Keys;
use omega::store::Store;
use omega::units::parse_duration as duration;
use omega_schedulers::controller::disruption::DisruptionPolicy;
use omega_schedulers::controller::{run, ControllerConfig};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "omega-controller",
    version,
    about = "The Omega cell controller: re-places lost nodes' tasks, \
keeps services at their replica count, marks batch jobs finished. Run several; one leads."
)]
struct Args {
    #[arg(long, env = "OMEGA_ETCD", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd: Vec<String>,
    #[arg(long, env = "OMEGA_PREFIX", default_value = omega::keys::DEFAULT_PREFIX)]
    prefix: String,
    #[command(flatten)]
    tls: omega::tls::TlsArgs,
    /// This replica's name (default: host-pid).
    #[arg(long)]
    instance: Option<String>,
    /// Leadership lease TTL: a dead leader is replaced this long after it stops.
    #[arg(long, default_value = "10s", value_parser = duration)]
    lease_ttl: Duration,
    /// Extra wait after a node's liveness key disappears before its tasks are given up.
    #[arg(long, default_value = "2s", value_parser = duration)]
    grace: Duration,
    /// Delete finished jobs (with their tasks and status) this long after they finished; `0` keeps them.
    #[arg(long, default_value = "1h", value_parser = duration)]
    gc_after: Duration,
    /// Forget nodes down this long that hold no tasks (their record and ledger); `0` keeps them.
    #[arg(long, default_value = "1h", value_parser = duration)]
    node_gc_after: Duration,
    /// Delete tasks without a job record (a submission that died half way) once untouched this long.
    #[arg(long, default_value = "10m", value_parser = duration)]
    orphan_grace: Duration,
    /// Keep at most this many tasks of finished jobs (the oldest jobs are collected first, whatever their
    /// age); `0`: collect by age (--gc-after) only.
    #[arg(long, default_value_t = 100_000)]
    keep_finished_tasks: usize,
    /// Compact etcd's history this often, to the revision of one period earlier (history of one to two
    /// periods is kept; a watcher away longer re-lists); `0`: never (etcd compacts itself, or an operator).
    #[arg(long, default_value = "30s", value_parser = duration)]
    compact_every: Duration,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9104; keep it on loopback unless a scraper
    /// elsewhere needs it).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    disruption: DisruptionArgs,
}

/// When many nodes lapse at once (etcd paused or overloaded, a network split), evictions slow down or stop.
#[derive(clap::Args, Debug)]
struct DisruptionArgs {
    /// A zone (nodes with the same `zone` label; nodes without one form one zone) or the whole cell is
    /// disrupted when more than this fraction of its nodes lapsed at once (`1/3`, `0.5`, `50%`; `1`: never).
    #[arg(long, default_value = "1/3", value_parser = fraction)]
    unhealthy_zone_threshold: f64,
    /// ...and at least this many nodes lapsed.
    #[arg(long, default_value_t = 3)]
    disruption_min_nodes: usize,
    /// Nodes that went down within this long count as lapsing at once (about the agents' lease TTL).
    #[arg(long, default_value = "30s", value_parser = duration)]
    disruption_window: Duration,
    /// Nodes per second whose tasks are released in a disrupted zone (0: none until it recovers); a
    /// disrupted cell releases none.
    #[arg(long, default_value_t = 0.1)]
    disrupted_zone_eviction_rate: f64,
}

impl DisruptionArgs {
    fn policy(&self) -> anyhow::Result<DisruptionPolicy> {
        let policy = DisruptionPolicy {
            threshold: self.unhealthy_zone_threshold,
            min_nodes: self.disruption_min_nodes,
            window: self.disruption_window,
            zone_rate: self.disrupted_zone_eviction_rate,
        };
        policy.validate()?;
        Ok(policy)
    }
}

/// A fraction written `0.5`, `1/3` or `50%`.
fn fraction(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?} is not a fraction (`0.5`, `1/3`, `50%`)");
    let value = if let Some(percent) = s.strip_suffix('%') {
        percent.trim().parse::<f64>().map_err(|_| bad())? / 100.0
    } else if let Some((n, d)) = s.split_once('/') {
        let (n, d) = (n.trim().parse::<f64>().map_err(|_| bad())?, d.trim().parse::<f64>().map_err(|_| bad())?);
        if d == 0.0 {
            return Err(bad());
        }
        n / d
    } else {
        s.trim().parse::<f64>().map_err(|_| bad())?
    };
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("{s:?} is not between 0 and 1"));
    }
    Ok(value)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let disruption = args.disruption.policy()?;
    let instance = args.instance.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .add_global_label("instance", instance.clone())
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
        omega_schedulers::controller::metrics::describe();
    }
    let options = omega::store::StoreOptions::with_tls(args.tls.files()?);
    let store = Store::connect_with(&args.etcd, Keys::new(&args.prefix)?, options, Duration::from_secs(600)).await?;
    let config = ControllerConfig {
        instance,
        lease_ttl: args.lease_ttl,
        grace: args.grace,
        resync: Duration::from_secs(30),
        gc_after: (!args.gc_after.is_zero()).then_some(args.gc_after),
        node_gc_after: (!args.node_gc_after.is_zero()).then_some(args.node_gc_after),
        orphan_grace: args.orphan_grace,
        keep_finished_tasks: (args.keep_finished_tasks > 0).then_some(args.keep_finished_tasks),
        compact_every: (!args.compact_every.is_zero()).then_some(args.compact_every),
        disruption,
    };
    tracing::info!(%config, disruption = %config.disruption, "controller started");
    run(store, config, omega::shutdown::signal()).await
}

#[cfg(test)]
mod tests {
    use super::fraction;

    #[test]
    fn fractions_are_read_three_ways() {
        assert_eq!(fraction("0.5"), Ok(0.5));
        assert_eq!(fraction("1/3"), Ok(1.0 / 3.0));
        assert_eq!(fraction("50%"), Ok(0.5));
        assert_eq!(fraction("1"), Ok(1.0));
        for bad in ["", "x", "1/0", "3/2", "150%", "-0.1"] {
            assert!(fraction(bad).is_err(), "{bad:?}");
        }
    }
}
