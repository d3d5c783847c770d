use anyhow::Context;
use clap::Parser;
use metrics_exporter_prometheus::Matcher;
use omega::cell_state::{CellState, CellStateOptions};
use omega::keys::Keys;
use omega::store::{Store, StoreOptions};
use omega_schedulers::config::Config;
use omega_schedulers::instance;
use omega_schedulers::scheduler::{Scheduler, FIRST_ATTEMPT_WAIT, FIRST_ATTEMPT_WAIT_BUCKETS};
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let config = Config::parse();
    config.validate()?;
    let name = config.scheduler_name();
    let instance_id = config.instance_id();
    omega::keys::validate_name("scheduler", &name)?;
    omega::keys::validate_name("instance", &instance_id)?;

    if let Some(addr) = config.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .add_global_label("scheduler", name.clone())
            .add_global_label("instance", instance_id.clone())
            // Histograms (not the exporter's default summaries), so latencies aggregate across instances.
            .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])?
            // Waits for a first attempt run to minutes, not milliseconds.
            .set_buckets_for_metric(Matcher::Full(FIRST_ATTEMPT_WAIT.into()), FIRST_ATTEMPT_WAIT_BUCKETS)?
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
        omega_schedulers::metrics::describe();
    }

    let keys = Keys::new(&config.prefix)?;
    // Wait for etcd rather than fail: a scheduler may start before its store.
    let options = StoreOptions::with_tls(config.tls.files()?);
    let store = Store::connect_with(&config.etcd, keys, options, Duration::from_secs(600)).await?;
    let lock = config.lock.then(|| config.lock_name.clone());
    let metrics = config.metrics_addr.map(|a| a.to_string());
    let record = instance::record(&name, &instance_id, config.kind.scheduler_kind(), lock, metrics);
    let presence = instance::register(&store, record, config.lease_ttl).await?;
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await?;
    tracing::info!(scheduler = name, instance = instance_id, kind = ?config.kind, detection = ?config.detection(),
        lock = config.lock.then_some(config.lock_name.as_str()), etcd = ?config.etcd, "scheduler started");

    let lease = Box::new(presence.keeper().lease_fn());
    let scheduler = Scheduler::new(config, store.clone(), cache, lease, presence.stats());
    let shutdown = omega::shutdown::signal();
    scheduler.run(shutdown).await;
    // Give the jobs back at once instead of making the others wait out the lease.
    presence.withdraw().await;
    tracing::info!("scheduler stopped");
    Ok(())
}
