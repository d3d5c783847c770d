//! `omega-controller`: one replica of the cell controller (run several; one leads).

use clap::Parser;
use omega::keys::Keys;
use omega::store::Store;
use omega::units::parse_duration as duration;
use omega_schedulers::controller::{run, ControllerConfig};
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let instance = args.instance.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let store = Store::connect_with_retry(&args.etcd, Keys::new(&args.prefix)?, Duration::from_secs(600)).await?;
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
    };
    tracing::info!(%config, "controller started");
    run(store, config, omega::shutdown::signal()).await
}
