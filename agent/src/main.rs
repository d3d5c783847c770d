use anyhow::Context;
use clap::Parser;
use omega::keys::Keys;
use omega::resources::Resources;
use omega::store::Store;
use omega::units::{parse_cpu, parse_duration as duration, parse_memory};
use omega_agent::agent::{Agent, AgentConfig};
use omega_agent::containerd::{Containerd, ContainerdOptions};
use omega_agent::logs::LogService;
use omega_agent::simulated::{SimOptions, SimulatedNodes};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Omega's node agent: registers this node, runs its assigned tasks as containers through containerd and
/// reports their states to etcd. With `--simulate N` it instead hosts N virtual nodes that run tasks as timers.
#[derive(Parser, Debug)]
#[command(name = "omega-agent", version)]
struct Args {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "OMEGA_ETCD", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd: Vec<String>,
    #[arg(long, env = "OMEGA_PREFIX", default_value = omega::keys::DEFAULT_PREFIX)]
    prefix: String,
    #[command(flatten)]
    tls: omega::tls::TlsArgs,
    /// This node's name (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// CPU to offer, e.g. `4` or `3500m` (default: all cores).
    #[arg(long, value_parser = parse_cpu)]
    cpu: Option<u64>,
    /// Memory to offer, e.g. `16Gi` (default: all of it).
    #[arg(long, value_parser = parse_memory)]
    memory: Option<u64>,
    /// A node label `key=value` (repeatable), for job constraints and spread; with `--simulate`, every
    /// simulated node gets it (a `zone` given here replaces the generated ones).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Lease TTL: how long after this agent stops heartbeating the cell considers the node lost. Cut off from
    /// etcd, the agent stops its tasks `--lease-ttl` - `--grace` - 0.5 s after its last acknowledged renewal,
    /// so keep it well above `--grace`. Tens of seconds: under full commit load etcd 3.4 answers a renewal
    /// late now and then, and a short TTL turns that into a lost node.
    #[arg(long, default_value = "30s", value_parser = duration)]
    lease_ttl: Duration,
    /// Grace between SIGTERM and SIGKILL when stopping a task (also when fencing).
    #[arg(long, default_value = "10s", value_parser = duration)]
    grace: Duration,
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_socket: PathBuf,
    /// containerd namespace holding Omega's containers (one dedicated namespace).
    #[arg(long, default_value = "omega")]
    namespace: String,
    /// containerd snapshotter for task root filesystems (`native` where overlay mounts do not work).
    #[arg(long, default_value = "overlayfs")]
    snapshotter: String,
    /// Where task logs are kept.
    #[arg(long, default_value = "/var/lib/omega/logs")]
    log_dir: PathBuf,
    /// Serve task logs (for `omctl logs`) on this address; it is advertised as the node's address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: std::net::SocketAddr,
    /// The address other machines reach the log service at, advertised in the node record (default: the
    /// listen address; required when listening on 0.0.0.0, which no other machine can dial).
    #[arg(long)]
    advertise: Option<String>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9105): fencings, etcd out of space
    /// (`omega_etcd_space_exceeded`).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Host this many simulated nodes instead of running containers.
    #[arg(long)]
    simulate: Option<usize>,
    /// Simulated nodes are named `<prefix>-<index>`.
    #[arg(long, default_value = "sim")]
    sim_prefix: String,
    #[arg(long, default_value_t = 3)]
    sim_zones: usize,
    #[arg(long, default_value = "16", value_parser = parse_cpu)]
    sim_cpu: u64,
    #[arg(long, default_value = "64Gi", value_parser = parse_memory)]
    sim_memory: u64,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("label {s:?} must be key=value"))?;
    if k.is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
        omega::space::describe_metrics();
        metrics::describe_counter!(
            "omega_agent_fencings_total",
            "Times this agent fenced its node: cut off from etcd, it stopped the node's tasks before its lease could \
             expire and they be placed elsewhere"
        );
        metrics::describe_counter!("omega_agent_fenced_tasks_total", "Tasks stopped because their node was fenced");
        metrics::counter!("omega_agent_fencings_total").absolute(0);
        metrics::counter!("omega_agent_fenced_tasks_total").absolute(0);
    }
    let keys = Keys::new(&args.prefix)?;
    let tls = args.tls.files()?;
    let options = omega::store::StoreOptions::with_tls(tls.clone());
    let store = Store::connect_with(&args.etcd, keys, options, Duration::from_secs(600)).await?;
    let shutdown = omega::shutdown::signal();

    if let Some(n) = args.simulate {
        let options = SimOptions {
            nodes: n,
            name_prefix: args.sim_prefix.clone(),
            capacity: Resources::new(args.sim_cpu, args.sim_memory),
            zones: args.sim_zones,
            labels: args.labels.iter().cloned().collect(),
            lease_ttl: args.lease_ttl,
            ..Default::default()
        };
        let sim = SimulatedNodes::register(store, options).await?;
        tracing::info!(nodes = n, prefix = args.sim_prefix, "simulated nodes registered");
        return sim.run(shutdown).await;
    }

    let detected = omega_agent::agent::detected_capacity();
    let node = match args.node {
        Some(n) => n,
        None => {
            std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?.trim().to_string()
        }
    };
    omega::keys::validate_name("node", &node)?;
    let advertised = match (&args.advertise, args.listen.ip().is_unspecified()) {
        (Some(a), _) => a.clone(),
        (None, false) => args.listen.to_string(),
        (None, true) => anyhow::bail!(
            "--listen {} is every interface: also give --advertise HOST:PORT, the address omctl should dial",
            args.listen
        ),
    };
    std::fs::create_dir_all(&args.log_dir).with_context(|| format!("creating {}", args.log_dir.display()))?;
    let options = ContainerdOptions { snapshotter: args.snapshotter.clone(), ..ContainerdOptions::default() };
    let containerd = Containerd::connect_with(&args.containerd_socket, &args.namespace, options)
        .await
        .with_context(|| format!("connecting to containerd at {}", args.containerd_socket.display()))?;
    let config = AgentConfig {
        node,
        capacity: Resources::new(args.cpu.unwrap_or(detected.cpu_millis), args.memory.unwrap_or(detected.memory_bytes)),
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        address: Some(omega_agent::logs::advertised(&advertised, tls.is_some())),
        lease_ttl: args.lease_ttl,
        grace: args.grace,
        log_dir: args.log_dir,
    };
    let (stop_logs, logs_stopped) = tokio::sync::oneshot::channel::<()>();
    let logs = LogService::new(store.clone(), config.log_dir.clone());
    // With TLS to etcd, the log service takes TLS too, with the same identity.
    let log_tls = tls.clone();
    let server = tokio::spawn(async move {
        omega_agent::logs::serve_tls(args.listen, logs, log_tls.as_ref(), async move {
            let _ = logs_stopped.await;
        })
        .await
    });
    let result = Agent::new(store, config, containerd).run(shutdown).await;
    let _ = stop_logs.send(());
    let _ = server.await;
    result
}
