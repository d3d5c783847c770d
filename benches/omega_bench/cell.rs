//! The cell a run builds: etcd (one member or three), then the project's own binaries as processes
//! (simulated nodes, the controller, the schedulers), each logging to a file of the run.
//!
//! Everything listens on loopback only; every process is killed when its handle drops, so a failed run
//! leaves nothing behind.

use anyhow::{bail, Context, Result};
use omega::etcd_process::{free_port, EtcdCluster, EtcdOptions, EtcdProcess};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The binaries a run starts.
pub const BINARIES: [&str; 3] = ["omega-scheduler", "omega-agent", "omega-controller"];

/// Where the project's binaries are: given, or beside this one (`cargo build --release` puts them all in
/// `target/release/`).
pub fn bin_dir(given: Option<&Path>) -> Result<PathBuf> {
    let dir = match given {
        Some(d) => d.to_path_buf(),
        None => std::env::current_exe()
            .context("finding this binary's own path")?
            .parent()
            .context("this binary has no directory")?
            .to_path_buf(),
    };
    for name in BINARIES {
        if !dir.join(name).is_file() {
            bail!(
                "{} not found in {}: build every binary (`cargo build --release`) or pass --bin-dir",
                name,
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// etcd as a run uses it.
pub enum Etcd {
    One(Box<EtcdProcess>),
    Three(EtcdCluster),
}

impl Etcd {
    pub async fn start(cell: &crate::spec::Cell) -> Result<Etcd> {
        let options = EtcdOptions {
            max_txn_ops: Some(cell.max_txn_ops),
            quota_backend_bytes: cell.etcd_quota_bytes,
            auto_compaction_revisions: cell.etcd_auto_compaction,
            ..Default::default()
        };
        let members = cell.members;
        Ok(match members {
            1 => Etcd::One(Box::new(EtcdProcess::start(options).await.context("starting etcd")?)),
            n => Etcd::Three(EtcdCluster::start(n, options).await.context("starting the etcd cluster")?),
        })
    }

    pub fn endpoints(&self) -> Vec<String> {
        match self {
            Etcd::One(e) => e.endpoints(),
            Etcd::Three(c) => c.endpoints(),
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        match self {
            Etcd::One(e) => e.pid().into_iter().collect(),
            Etcd::Three(c) => c.members.iter().filter_map(EtcdProcess::pid).collect(),
        }
    }
}

/// One of the project's processes, killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn start(bin_dir: &Path, program: &str, name: &str, args: &[String], logs: &Path) -> Result<Proc> {
        Self::start_program(&bin_dir.join(program), name, args, logs)
    }

    pub fn start_program(program: &Path, name: &str, args: &[String], logs: &Path) -> Result<Proc> {
        std::fs::create_dir_all(logs)?;
        let log = logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", std::env::var("OMEGA_BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Proc { name: name.to_string(), child, log })
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited (with the end of its log), so a crashed component stops the run.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// Asks it to stop (SIGTERM: a scheduler then hands its jobs back) and waits a little before killing.
    pub fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scheduler process and where its metrics are served.
pub struct SchedulerProc {
    pub proc: Proc,
    pub scheduler: String,
    pub instance: String,
    pub metrics: String,
}

/// What a scheduler process is asked to be.
pub struct SchedulerArgs<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    pub instance: String,
    pub detection: &'a str,
    pub t_job: Duration,
    pub t_task: Duration,
    /// For the monolithic kind: the service jobs' decision time.
    pub service_t_job: Option<Duration>,
    pub lock: bool,
    pub seed: u64,
    pub max_txn_ops: usize,
    pub extra: &'a [String],
}

pub fn start_scheduler(
    bin_dir: &Path,
    endpoints: &[String],
    prefix: &str,
    a: SchedulerArgs,
    logs: &Path,
) -> Result<SchedulerProc> {
    let port = free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let mut args = vec![
        format!("--etcd={}", endpoints.join(",")),
        format!("--prefix={prefix}"),
        format!("--kind={}", a.kind),
        format!("--name={}", a.name),
        format!("--instance={}", a.instance),
        format!("--detection={}", a.detection),
        format!("--t-job={}ms", a.t_job.as_millis()),
        format!("--t-task={}ms", a.t_task.as_millis()),
        format!("--seed={}", a.seed),
        format!("--max-txn-ops={}", a.max_txn_ops),
        format!("--metrics-addr={metrics}"),
    ];
    if let Some(t) = a.service_t_job {
        args.push(format!("--service-t-job={}ms", t.as_millis()));
        args.push(format!("--service-t-task={}ms", a.t_task.as_millis()));
    }
    if a.lock {
        args.push("--lock".into());
    }
    args.extend(a.extra.iter().cloned());
    let proc = Proc::start(bin_dir, "omega-scheduler", &a.instance, &args, logs)?;
    Ok(SchedulerProc { proc, scheduler: a.name.to_string(), instance: a.instance, metrics })
}
