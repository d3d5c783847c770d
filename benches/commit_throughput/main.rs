//! Raw commit throughput: claims per second through Omega's committer, next to the ceiling etcd itself
//! offers for the same write pattern.
//!
//! For each batch size B (claims per commit call), and each transport asked for, two measurements run back to
//! back, each on a fresh etcd:
//!
//! - **omega** ([`omega_run`]): N live nodes with room for everything and a pool of pending tasks; W workers,
//!   each owning a disjoint share of nodes and tasks, repeatedly claim their next B tasks on their next B nodes
//!   (one claim per node, round-robin) through one shared `Committer` (`Detection::Fine`,
//!   `CommitKind::Incremental`). A `CellState` cache runs the whole time, as it would beside a scheduler.
//!   Conflicts stay at zero: this measures throughput, not contention.
//! - **raw etcd** ([`omega_benches::raw_ceiling`]): the same transactions built by hand with `etcd_client`
//!   from the core's keys and records (an outer transaction without compares holding one sub-transaction per
//!   claim: three compares, three puts, three gets on failure), at most 125 sub-transactions per outer one,
//!   same W workers, mod_revisions tracked locally. Nothing watches etcd during this run unless asked to. That
//!   module's documentation says what still differs from a commit.
//!
//! Claims are counted for commits that complete inside the measurement window (after a short warm-up).
//!
//! Over TLS ([`transport`]: https with client certificates, optionally with etcd's authentication on) both
//! measurements are repeated per transport, and the table sets each transport's claims/s against plain text's
//! (or the first transport's), pair by pair per batch size. On the project's 2-core machine TLS cost Omega's
//! commits about 5-8% of their rate and etcd's authentication up to as much again at small batches, within
//! noise as large as the effect (README, "Measured").
//!
//! Environment:
//! - `OMEGA_BENCH_SECS` (default 5): measured seconds per measurement.
//! - `OMEGA_BENCH_BATCHES` (default `1,16,64,128`): batch sizes.
//! - `OMEGA_BENCH_WORKERS` (default 4), `OMEGA_BENCH_NODES` (default 2000).
//! - `OMEGA_BENCH_ETCD`: use this endpoint instead of starting etcd (keys go under a fresh prefix per
//!   measurement and are deleted afterwards).
//! - `OMEGA_BENCH_CACHE=0`: no cell-state cache during the omega run (its snapshot comes from one listing),
//!   to separate the committer's cost from the cost of watching the cell.
//! - `OMEGA_BENCH_RAW_WATCH=plain|prev_kv`: watch the raw cell range during the raw run (default none), to see
//!   what a watcher like the cache's costs etcd on its own.
//! - `OMEGA_BENCH_RAW_TASKS` (default 4096): raw task keys per worker, claimed round-robin over and over.
//! - `OMEGA_BENCH_TLS` (default `off`): transports, in order, from `off` (plain http), `on` (TLS, client
//!   certificates required, no authentication) and `rbac` (`on` with the cell's roles and authentication on),
//!   e.g. `off,on,rbac`. Not with `OMEGA_BENCH_ETCD`.
//! - `RUST_LOG`: log filter (default `warn`).
//!
//! Besides claims/s and latencies the output ([`report`]) shows the CPU etcd and this process used during each
//! window (from `/proc`): on a small machine both share the cores, so that says where the time went.
//!
//! Run with `cargo bench --bench commit_throughput`. The table goes to stdout and to
//! `target/omega-bench/commit_throughput.md`. Without `--bench` (as `cargo test --benches` runs it) it does a
//! short smoke run instead (batch 16, half-second windows, `off,rbac` unless `OMEGA_BENCH_TLS` says otherwise).
//!
//! This file holds the settings, where each measurement runs, and the sequence; the committer's side, the
//! table, the transports and the raw ceiling each live in their own module, the last in the benches' library
//! so other programs measure the ceiling the same way.

mod omega_run;
mod report;
mod transport;

use anyhow::{ensure, Context, Result};
use etcd_client::{Client, DeleteOptions};
use omega::etcd_process::{EtcdOptions, EtcdProcess};
use omega::keys::Keys;
use omega::model::now_ms;
use omega::store::{Store, StoreOptions};
use omega::tls::TlsFiles;
use omega_benches::raw_ceiling::{self, RawOptions, RawOutcome, RawTls, RawWatch};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use transport::{Certs, Identities, Transport};

#[derive(Clone, Debug)]
struct Config {
    batches: Vec<usize>,
    measure: Duration,
    warmup: Duration,
    workers: usize,
    nodes: usize,
    endpoint: Option<String>,
    /// Raw tasks per worker, claimed round-robin again and again.
    raw_tasks_per_worker: usize,
    /// Keep the omega cell-state cache running during the measurement (`OMEGA_BENCH_CACHE=0` stops it).
    cache: bool,
    /// Watch the raw cell range while measuring raw etcd, as omega's cache does (`OMEGA_BENCH_RAW_WATCH`).
    raw_watch: RawWatch,
    /// The transports each batch size is measured over, in this order (`OMEGA_BENCH_TLS`).
    transports: Vec<Transport>,
}

impl Config {
    fn from_env(smoke: bool) -> Result<Config> {
        let secs: f64 = env_or("OMEGA_BENCH_SECS", if smoke { 0.5 } else { 5.0 })?;
        ensure!(secs > 0.0 && secs <= 600.0, "OMEGA_BENCH_SECS must be in (0, 600]");
        let batches = match std::env::var("OMEGA_BENCH_BATCHES") {
            Ok(s) => s
                .split(',')
                .map(|b| b.trim().parse::<usize>().with_context(|| format!("OMEGA_BENCH_BATCHES entry {b:?}")))
                .collect::<Result<Vec<_>>>()?,
            Err(_) if smoke => vec![16],
            Err(_) => vec![1, 16, 64, 128],
        };
        let workers: usize = env_or("OMEGA_BENCH_WORKERS", 4)?;
        let nodes: usize = env_or("OMEGA_BENCH_NODES", if smoke { 200 } else { 2000 })?;
        ensure!(workers >= 1 && nodes >= workers, "need at least one worker and one node per worker");
        for &b in &batches {
            ensure!(b >= 1, "batch sizes must be at least 1");
            ensure!(
                b <= nodes / workers,
                "batch size {b} needs {b} distinct nodes per worker, but {workers} workers share only {nodes} nodes"
            );
        }
        let raw_tasks_per_worker: usize = env_or("OMEGA_BENCH_RAW_TASKS", 4096)?;
        ensure!(
            batches.iter().all(|&b| b <= raw_tasks_per_worker),
            "OMEGA_BENCH_RAW_TASKS must be at least the largest batch size (a task may appear once per commit)"
        );
        let measure = Duration::from_secs_f64(secs);
        let raw_watch = std::env::var("OMEGA_BENCH_RAW_WATCH").unwrap_or_default();
        let endpoint = std::env::var("OMEGA_BENCH_ETCD").ok().filter(|s| !s.is_empty());
        // The smoke run also goes over TLS with authentication on (the path with the most to it), so that path
        // cannot rot unnoticed; not on an etcd of someone else's, which has none of our certificates.
        let tls = std::env::var("OMEGA_BENCH_TLS")
            .unwrap_or_else(|_| if smoke && endpoint.is_none() { "off,rbac" } else { "off" }.into());
        let transports = Transport::parse_list(&tls).with_context(|| format!("OMEGA_BENCH_TLS={tls:?}"))?;
        ensure!(
            endpoint.is_none() || transports == [Transport::Plain],
            "OMEGA_BENCH_TLS={tls}: TLS needs etcds this benchmark starts (with its certificates); unset OMEGA_BENCH_ETCD"
        );
        Ok(Config {
            batches,
            measure,
            warmup: (measure / 5).min(Duration::from_millis(500)),
            workers,
            nodes,
            endpoint,
            raw_tasks_per_worker,
            cache: env_or("OMEGA_BENCH_CACHE", 1u8)? != 0,
            raw_watch: raw_watch.parse().with_context(|| format!("OMEGA_BENCH_RAW_WATCH={raw_watch:?}"))?,
            transports,
        })
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(s) => s.trim().parse().map_err(|e| anyhow::anyhow!("{name}={s:?}: {e}")),
        Err(_) => Ok(default),
    }
}

/// Where a measurement's keys live: a fresh etcd of its own, or a fresh prefix on `$OMEGA_BENCH_ETCD`; and
/// who connects to it.
struct Target {
    etcd: Option<EtcdProcess>,
    endpoints: Vec<String>,
    prefix: String,
    shared: bool,
    ids: Identities,
}

impl Target {
    /// `certs` is the run's certificates, which every transport but plain text needs.
    async fn new(config: &Config, name: &str, transport: Transport, certs: Option<&Certs>) -> Result<Target> {
        let certs = if transport.is_tls() { Some(certs.context("TLS without certificates")?) } else { None };
        match &config.endpoint {
            Some(e) => {
                ensure!(certs.is_none(), "TLS to an etcd the benchmark did not start");
                Ok(Target {
                    etcd: None,
                    endpoints: vec![e.clone()],
                    prefix: format!("/omega-bench/{}-{}-{name}/", std::process::id(), now_ms()),
                    shared: true,
                    ids: Identities::default(),
                })
            }
            None => {
                let options = EtcdOptions {
                    quota_backend_bytes: Some(8 << 30),
                    tls: certs.map(Certs::server),
                    ..Default::default()
                };
                let etcd = EtcdProcess::start(options).await.context("starting etcd")?;
                let keys = Keys::default();
                if transport == Transport::Rbac {
                    let certs = certs.context("RBAC without certificates")?;
                    certs.grant_roles(&etcd.endpoint(), &keys).await?;
                }
                Ok(Target {
                    endpoints: etcd.endpoints(),
                    etcd: Some(etcd),
                    prefix: keys.prefix().into(),
                    shared: false,
                    ids: Identities::of(certs),
                })
            }
        }
    }

    /// A store on the target's prefix, connected as `who` (plain text when `None`).
    async fn store(&self, who: &Option<TlsFiles>) -> Result<Store> {
        let options = StoreOptions::with_tls(who.clone());
        Ok(Store::connect_with(&self.endpoints, Keys::new(&self.prefix)?, options, Duration::ZERO).await?)
    }

    fn etcd_pid(&self) -> Option<u32> {
        self.etcd.as_ref().and_then(EtcdProcess::pid)
    }

    /// On a shared etcd, removes what the measurement wrote.
    async fn clean(&self) -> Result<()> {
        if self.shared {
            let mut client = Client::connect(&self.endpoints, None).await?;
            client.delete(self.prefix.as_str(), Some(DeleteOptions::new().with_prefix())).await?;
        }
        Ok(())
    }
}

/// etcd's ceiling for batch size `batch`, on a target of its own (the raw ceiling cleans a shared one).
async fn run_raw(config: &Config, batch: usize, transport: Transport, certs: Option<&Certs>) -> Result<RawOutcome> {
    let target = Target::new(config, &format!("raw-b{batch}"), transport, certs).await?;
    let tls = match (&target.ids.admin, &target.ids.measured) {
        (Some(admin), Some(claims)) => Some(RawTls { admin: admin.clone(), claims: claims.clone() }),
        _ => None,
    };
    let opts = RawOptions {
        workers: config.workers,
        nodes: config.nodes,
        batch,
        warmup: config.warmup,
        measure: config.measure,
        tasks_per_worker: config.raw_tasks_per_worker,
        etcd_pid: target.etcd_pid(),
        watch: config.raw_watch,
        clean: target.shared,
        tls,
        ..RawOptions::default()
    };
    raw_ceiling::measure(&target.endpoints, &target.prefix, &opts).await
}

async fn bench(config: Config) -> Result<String> {
    // One set of certificates for the whole run, when any transport is TLS.
    let certs = if config.transports.iter().any(|t| t.is_tls()) {
        Some(Certs::make().await.context("making certificates")?)
    } else {
        None
    };
    let mut rows = Vec::new();
    for &batch in &config.batches {
        // Each transport's pair back to back, so that what else the machine does weighs on them alike.
        for &transport in &config.transports {
            let raw = run_raw(&config, batch, transport, certs.as_ref())
                .await
                .with_context(|| format!("raw etcd, batch {batch}, TLS {transport}"))?;
            eprintln!("  raw   B={batch} TLS {transport}: {:.0} claims/s", raw.claims_per_sec());
            // Enough pending tasks for omega to go as fast as raw etcd did, and then some (a floor for when raw
            // etcd was the slower one, as with OMEGA_BENCH_RAW_WATCH=prev_kv).
            let span = (config.warmup + config.measure).as_secs_f64();
            let pool = ((raw.claims_per_sec() * span * 1.5) as usize + 8 * config.workers * batch).max(20_000);
            let omega = omega_run::run_omega(&config, batch, pool, transport, certs.as_ref())
                .await
                .with_context(|| format!("omega, batch {batch}, TLS {transport}"))?;
            eprintln!("  omega B={batch} TLS {transport}: {:.0} claims/s", omega.tally.claims_per_sec());
            rows.push(report::Row { batch, transport, omega, raw });
        }
    }
    Ok(report::table(&config, &rows))
}

fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`) gets a short smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let config = Config::from_env(smoke)?;
    eprintln!("commit_throughput: {config:?}");
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let table = runtime.block_on(bench(config))?;
    println!("{table}");
    if !smoke {
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            // The workspace's target directory (this package is `benches/` in the workspace).
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("omega-bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("commit_throughput.md");
        std::fs::write(&path, &table)?;
        eprintln!("wrote {} ({:.0}s in all)", path.display(), started.elapsed().as_secs_f64());
    }
    Ok(())
}
