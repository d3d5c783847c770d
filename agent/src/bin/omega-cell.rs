//! `omega-cell`: a whole Omega cell on this machine in one command (like `nomad agent -dev`).
//!
//! Starts etcd (a child process with its own data directory), a private containerd when this machine can run
//! containers, one batch and one service scheduler and the cell controller (separate processes, as in
//! production), one node agent with its log service, and optionally simulated nodes beside or instead of it. Prints what runs and how to
//! use `omctl`, optionally submits an example job, and on Ctrl-C (or SIGTERM) stops everything it started,
//! leaving no process behind.

use anyhow::Context;
use clap::Parser;
use omega::etcd_process::{EtcdOptions, EtcdProcess, EtcdProxy};
use omega::keys::Keys;
use omega::resources::Resources;
use omega::store::Store;
use omega_agent::agent::{Agent, AgentConfig};
use omega_agent::daemon::{PrivateContainerd, IMAGE};
use omega_agent::logs::{serve_tls, LogService};
use omega_agent::simulated::{SimOptions, SimulatedNodes};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "omega-cell",
    version,
    about = "Run a whole Omega cell on this machine: etcd, containerd, schedulers, an agent"
)]
struct Args {
    /// etcd's client port on 127.0.0.1.
    #[arg(long, default_value_t = 2379)]
    port: u16,
    /// Keep state here (etcd data, logs) instead of a temporary directory removed at exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also host this many simulated nodes (three zones, 16 cores and 64Gi each).
    #[arg(long, default_value_t = 0)]
    simulate: usize,
    /// Run no real agent (no containerd): simulated nodes only.
    #[arg(long)]
    no_agent: bool,
    /// Submit this job file once the cell is up.
    #[arg(long)]
    example: Option<PathBuf>,
    /// First port of the schedulers' Prometheus metrics (batch, then service).
    #[arg(long, default_value_t = 9101)]
    metrics_port: u16,
    /// The agent's log service port.
    #[arg(long, default_value_t = 7070)]
    logs_port: u16,
    /// Put `etcd grpc-proxy` in front of etcd on this loopback port and point the schedulers and the
    /// controller at it (it coalesces their identical watches and lease keep-alives, as a cell with many
    /// schedulers should run).
    #[arg(long)]
    proxy: Option<u16>,
    /// Secure mode: a CA and a certificate per component made with deploy/tls/make-cell-certs.sh (in
    /// <data-dir>/certs), etcd over TLS requiring client certificates, a role per component granted with
    /// deploy/tls/grant-roles.sh and authentication on; each component acts as its own etcd user, the log
    /// service takes TLS, and an operator certificate for omctl is printed.
    #[arg(long)]
    secure: bool,
}

/// The certificates of a secure cell, and how each component connects.
struct Identities {
    dir: PathBuf,
}

impl Identities {
    /// deploy/tls/ beside the working directory (a checkout), else the one this binary was built from.
    fn script(name: &str) -> PathBuf {
        let here = Path::new("deploy/tls").join(name);
        if here.exists() {
            return here;
        }
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tls").join(name)
    }

    fn make(dir: PathBuf) -> anyhow::Result<Identities> {
        let args = ["--agent", "local", "--sim-agents", "sim", "--operator", "admin", "--viewer", "ui"];
        let mut all = vec![dir.as_os_str()];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        run_script(&Self::script("make-cell-certs.sh"), &all)?;
        Ok(Identities { dir })
    }

    fn grant(&self, endpoint: &str) -> anyhow::Result<()> {
        run_script(&Self::script("grant-roles.sh"), &[self.dir.as_os_str(), std::ffi::OsStr::new(endpoint)])
    }

    fn files(&self, name: &str) -> omega::tls::TlsFiles {
        omega::tls::TlsFiles {
            ca: self.dir.join("ca.pem"),
            identity: Some((self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}-key.pem")))),
        }
    }

    fn flags(&self, name: &str) -> Vec<String> {
        let f = self.files(name);
        let (cert, key) = f.identity.unwrap_or_default();
        [
            "--cacert".to_string(),
            f.ca.display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ]
        .into()
    }

    async fn connect(&self, name: &str, etcd: &EtcdProcess) -> anyhow::Result<Store> {
        let options = omega::store::StoreOptions::with_tls(Some(self.files(name)));
        Ok(Store::connect_with(&etcd.endpoints(), Keys::default(), options, Duration::ZERO).await?)
    }
}

fn run_script(script: &Path, args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
struct Process {
    name: String,
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary built beside this one (`cargo build` puts the workspace's binaries in one directory).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating omega-cell")?;
    let path = me.parent().map(|d| d.join(name)).unwrap_or_else(|| PathBuf::from(name));
    anyhow::ensure!(
        path.exists(),
        "{} not found next to omega-cell: build every binary first (`cargo build --release`)",
        path.display()
    );
    Ok(path)
}

fn spawn_scheduler(kind: &str, endpoint: &str, metrics: u16, logs: &Path, tls: &[String]) -> anyhow::Result<Process> {
    let log = std::fs::File::create(logs.join(format!("scheduler-{kind}.log")))?;
    let child = Command::new(sibling("omega-scheduler")?)
        .args(["--etcd", endpoint, "--kind", kind, "--instance", &format!("{kind}-1"), "--max-txn-ops", "1024"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .args(tls)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting the {kind} scheduler"))?;
    Ok(Process { name: format!("{kind} scheduler"), child })
}

fn spawn_controller(endpoint: &str, logs: &Path, tls: &[String]) -> anyhow::Result<Process> {
    let log = std::fs::File::create(logs.join("controller.log"))?;
    let child = Command::new(sibling("omega-controller")?)
        .args(["--etcd", endpoint, "--instance", "controller-1"])
        .args(tls)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the controller")?;
    Ok(Process { name: "controller".into(), child })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let temp;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new().prefix("omega-cell-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    // A bad example file is reported before anything starts.
    let example = match &args.example {
        Some(file) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            Some(omega::job_spec::parse_job(&file.display().to_string(), &text)?)
        }
        None => None,
    };

    // etcd, compacting its history and sized for claims in large batches.
    if std::net::TcpListener::bind(("127.0.0.1", args.port)).is_err() {
        anyhow::bail!("port {} is in use: is another cell (or etcd) running? pick another with --port", args.port);
    }
    if args.secure && args.proxy.is_some() {
        anyhow::bail!(
            "--secure with --proxy is not supported: etcd 3.4's grpc-proxy cannot act as an etcd user (it refuses \
             a client certificate with a common name), so with authentication on it is refused everything"
        );
    }
    let identities = if args.secure { Some(Identities::make(data_dir.join("certs"))?) } else { None };
    let etcd = EtcdProcess::start(EtcdOptions {
        client_port: Some(args.port),
        tls: identities.as_ref().map(|i| omega::etcd_process::ServerTls::from_cell_certs(&i.dir)),
        data_dir: Some(data_dir.join("etcd")),
        max_txn_ops: Some(1024),
        auto_compaction_revisions: Some(10_000),
        quota_backend_bytes: Some(8 << 30),
        ..Default::default()
    })
    .await?;
    let endpoint = etcd.endpoint();
    // Each in-process part connects as itself: the node agent, the simulated nodes, the operator (the example).
    let (store, agent_store, sim_store) = match &identities {
        Some(ids) => {
            ids.grant(&endpoint)?;
            (
                ids.connect("operator-admin", &etcd).await?,
                ids.connect("agent-local", &etcd).await?,
                ids.connect("agents-sim", &etcd).await?,
            )
        }
        None => {
            let s = Store::connect(&etcd.endpoints(), Keys::default()).await?;
            (s.clone(), s.clone(), s)
        }
    };
    let tls_flags = |name: &str| identities.as_ref().map(|i| i.flags(name)).unwrap_or_default();

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // A real node, when this machine can run containers.
    let mut containerd = None;
    let mut tasks = Vec::new();
    let mut agent_note = "no real node (--no-agent)".to_string();
    if !args.no_agent {
        match PrivateContainerd::start("omega").await {
            Ok(daemon) => {
                let client = daemon.client().await?;
                let node = "local".to_string();
                // All cores; three quarters of the memory, leaving room for the cell itself.
                let machine = omega_agent::agent::detected_capacity();
                let (cores, mem) = (machine.cpu_millis / 1000, machine.memory_bytes / 4 * 3);
                let listen: std::net::SocketAddr = format!("127.0.0.1:{}", args.logs_port).parse()?;
                let task_logs = data_dir.join("task-logs");
                let config = AgentConfig {
                    node: node.clone(),
                    capacity: Resources::new(cores * 1000, mem),
                    labels: [("zone".to_string(), "zone-0".to_string())].into(),
                    address: Some(omega_agent::logs::advertised(&listen.to_string(), identities.is_some())),
                    lease_ttl: Duration::from_secs(10),
                    grace: Duration::from_secs(5),
                    log_dir: task_logs.clone(),
                };
                let log_tls = identities.as_ref().map(|i| i.files("agent-local"));
                let log_service = LogService::new(agent_store.clone(), task_logs);
                let log_stop = stopped(stop_rx.clone());
                tasks.push(tokio::spawn(
                    async move { serve_tls(listen, log_service, log_tls.as_ref(), log_stop).await },
                ));
                let agent = Agent::new(agent_store.clone(), config, client);
                let rx = stop_rx.clone();
                tasks.push(tokio::spawn(async move { agent.run(stopped(rx)).await }));
                agent_note = format!(
                    "node `local` ({cores} cores, {} MiB), containers on a private containerd at {} \
                     (image {IMAGE}); task logs on 127.0.0.1:{}",
                    mem >> 20,
                    daemon.socket.display(),
                    args.logs_port
                );
                containerd = Some(daemon);
            }
            Err(e) => {
                agent_note = format!("no real node: this machine cannot run containers here ({e})");
                eprintln!("warning: {agent_note}");
            }
        }
    }
    let simulate = if containerd.is_none() && args.simulate == 0 { 3 } else { args.simulate };
    if simulate > 0 {
        let options = SimOptions { nodes: simulate, ..Default::default() };
        let sim = SimulatedNodes::register(sim_store.clone(), options).await?;
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move { sim.run(stopped(rx)).await }));
    }

    // The schedulers and the controller go through the proxy if asked; the in-process agents, omctl and
    // anything else go straight to etcd.
    let (proxy, components) = match args.proxy {
        Some(port) => {
            let p = EtcdProxy::start(&etcd.endpoints(), Some(port), &logs.join("grpc-proxy.log")).await?;
            let at = p.endpoint().to_string();
            (Some(p), at)
        }
        None => (None, endpoint.clone()),
    };
    let batch = spawn_scheduler("batch", &components, args.metrics_port, &logs, &tls_flags("omega-scheduler"))?;
    let service = spawn_scheduler("service", &components, args.metrics_port + 1, &logs, &tls_flags("omega-scheduler"))?;
    let controller = spawn_controller(&components, &logs, &tls_flags("omega-controller"))?;
    let env = match &identities {
        None => format!("export OMEGA_ETCD={endpoint}"),
        Some(ids) => {
            let f = ids.files("operator-admin");
            let (cert, key) = f.identity.unwrap_or_default();
            format!(
                "export OMEGA_ETCD={endpoint} OMEGA_ETCD_CACERT={} OMEGA_ETCD_CERT={} OMEGA_ETCD_KEY={}",
                f.ca.display(),
                cert.display(),
                key.display()
            )
        }
    };
    let secure_note = match &identities {
        None => String::new(),
        Some(ids) => format!(
            "\n  secure      TLS with client certificates, a role per component, auth on; certificates in {} \
             (operator-admin for omctl, viewer-ui for omega-ui)",
            ids.dir.display()
        ),
    };

    println!(
        "Omega cell is up.\n\
         \n  etcd        {endpoint} (data in {etcd_dir}){proxy_note}\
         \n  schedulers  batch-1 (metrics 127.0.0.1:{m1}), service-1 (metrics 127.0.0.1:{m2}); logs in {logs}\
         \n  agent       {agent_note}\
         \n  simulated   {simulated}{secure_note}\
         \n\nTry:\
         \n  {env}\
         \n  omctl nodes\
         \n  omctl submit deploy/examples/hello.yaml --wait\
         \n  omctl logs hello/0 -f\
         \n  omctl jobs; omctl watch\
         \n\nCtrl-C stops everything.",
        etcd_dir = data_dir.join("etcd").display(),
        proxy_note = if proxy.is_some() {
            format!("; schedulers and controller through grpc-proxy {components}")
        } else {
            String::new()
        },
        simulated = if simulate == 0 {
            "none (--simulate N adds N nodes)".to_string()
        } else {
            format!("{simulate} nodes (sim-000 ...)")
        },
        m1 = args.metrics_port,
        m2 = args.metrics_port + 1,
        logs = logs.display(),
    );
    if let Some(job) = example {
        store.create_job(&job, 1024).await?;
        println!("\nSubmitted {} ({} tasks): `omctl job {}` follows it.", job.id, job.tasks, job.id);
    }

    omega::shutdown::signal().await;
    println!("stopping...");
    let _ = stop_tx.send(true);
    drop(batch);
    drop(service);
    drop(controller);
    drop(proxy);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    drop(containerd);
    drop(etcd);
    println!("stopped.");
    Ok(())
}
