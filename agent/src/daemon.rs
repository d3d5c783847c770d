//! A private containerd: its own root, state, socket and config in a directory of its own, started as a child
//! process and torn down on drop (tasks killed and deleted so no shim outlives it, containerd killed, leftover
//! mounts and the namespace's cgroup directories removed).
//!
//! The local cell runs its containers on one of these, so trying Omega needs no system containerd and leaves
//! nothing behind; the agent's tests start one per test. It needs root (containerd, runc, cgroups, mounts).

use crate::containerd::{Containerd, ContainerdOptions};
use crate::image::{build_busybox_image, import_oci_tar_with, Unpack};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The busybox image a private daemon can hold (`PrivateContainerd::start`).
pub const IMAGE: &str = "omega.local/busybox:latest";

/// Why a private containerd could not be had.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DaemonError(pub String);

type Result<T, E = DaemonError> = std::result::Result<T, E>;

pub struct PrivateContainerd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    /// How long containerd took to answer after being spawned.
    pub startup: Duration,
}

fn run_quiet(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{program} {}: {}: {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Whether an overlay mount works in `dir` (it does not on every filesystem, e.g. on top of another
/// overlay); containerd's overlayfs snapshotter loads either way and only fails at the first mount.
fn overlay_works(dir: &Path) -> Result<(), String> {
    let probe = dir.join("overlay-probe");
    for d in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir_all(probe.join(d)).map_err(|e| e.to_string())?;
    }
    let p = |d: &str| probe.join(d).display().to_string();
    let options = format!("lowerdir={},upperdir={},workdir={}", p("lower"), p("upper"), p("work"));
    let mounted = run_quiet("mount", &["-t", "overlay", "overlay", "-o", &options, &p("merged")]);
    if mounted.is_ok() {
        let _ = run_quiet("umount", &[&p("merged")]);
    }
    let _ = std::fs::remove_dir_all(&probe);
    mounted.map(|_| ())
}

impl PrivateContainerd {
    /// Starts containerd for `namespace` and imports the busybox image as [`IMAGE`] (unpacked).
    pub async fn start(namespace: &str) -> Result<PrivateContainerd> {
        let daemon = Self::start_empty(namespace).await?;
        daemon.import(IMAGE, Unpack::Into(&daemon.snapshotter.clone()))?;
        Ok(daemon)
    }

    /// Starts containerd with no image in it.
    pub async fn start_empty(namespace: &str) -> Result<PrivateContainerd> {
        if !is_root() {
            return Err(DaemonError(
                "running containers needs root (containerd, runc, cgroups, mounts): run as root, e.g. with sudo -E"
                    .into(),
            ));
        }
        for (program, package) in [("containerd", "containerd"), ("runc", "runc"), ("ctr", "containerd")] {
            if Command::new(program).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
                return Err(DaemonError(format!(
                    "cannot run {program}: install Debian's {package} (deploy/install-deps.sh)"
                )));
            }
        }
        // Under /tmp: the socket path must stay short (108 bytes) and the filesystem must take overlay mounts.
        let dir = tempfile::Builder::new()
            .prefix("omega-ctd-")
            .tempdir_in("/tmp")
            .map_err(|e| DaemonError(format!("creating a directory under /tmp: {e}")))?;
        // OMEGA_TEST_SNAPSHOTTER=native runs the tests on the fallback.
        let snapshotter = match overlay_works(dir.path()) {
            _ if std::env::var("OMEGA_TEST_SNAPSHOTTER").is_ok_and(|s| !s.is_empty()) => {
                std::env::var("OMEGA_TEST_SNAPSHOTTER").unwrap_or_default()
            }
            Ok(()) => "overlayfs".to_string(),
            Err(e) => {
                eprintln!("overlay mounts do not work in {} ({e}); using the native snapshotter", dir.path().display());
                "native".to_string()
            }
        };
        let socket = dir.path().join("containerd.sock");
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{socket}\"\n",
            root = dir.path().join("root").display(),
            state = dir.path().join("state").display(),
            socket = socket.display(),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).map_err(|e| DaemonError(format!("writing containerd's config: {e}")))?;
        let namespace = namespace.to_string();
        let mut daemon =
            PrivateContainerd { child: None, dir, socket, namespace, snapshotter, startup: Duration::ZERO };
        daemon.spawn().await?;
        Ok(daemon)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))
            .map_err(|e| DaemonError(format!("containerd's log file: {e}")))?;
        let spawned = Instant::now();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .arg("--log-level")
            .arg("warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| DaemonError(format!("containerd's log file: {e}")))?)
            .stderr(log)
            .spawn()
            .map_err(|e| DaemonError(format!("cannot start containerd: {e}")))?;
        self.child = Some(child);
        self.wait_ready().await?;
        self.startup = spawned.elapsed();
        Ok(())
    }

    /// Kills containerd (SIGKILL; its shims, and so the containers, keep running) and starts it again on the
    /// same root, state and socket, as a node's containerd restarting under a running agent.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::from("no attempt yet");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(DaemonError(format!(
                        "containerd exited with {status} while starting:\n{}",
                        self.log_tail()
                    )));
                }
            }
            if self.socket.exists() {
                match tokio::time::timeout(Duration::from_secs(2), Containerd::connect(&self.socket, "probe")).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "connect timed out".into(),
                }
            }
            if Instant::now() > deadline {
                return Err(DaemonError(format!(
                    "containerd did not answer on {} within 30 s ({last}):\n{}",
                    self.socket.display(),
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Builds the busybox image (in this daemon's directory) and imports it as `name`.
    pub fn import(&self, name: &str, unpack: Unpack) -> Result<()> {
        let build_dir = self.dir.path().join("image");
        let tar = build_busybox_image(&build_dir, name)
            .map_err(|e| DaemonError(format!("building the busybox image: {e}")))?;
        import_oci_tar_with(&self.socket, &self.namespace, &tar, name, unpack)
            .map_err(|e| DaemonError(format!("importing the busybox image: {e}")))
    }

    pub fn options(&self) -> ContainerdOptions {
        ContainerdOptions { snapshotter: self.snapshotter.clone(), ..ContainerdOptions::default() }
    }

    /// A new client (as a restarted agent would make).
    pub async fn client(&self) -> Result<Containerd> {
        Containerd::connect_with(&self.socket, &self.namespace, self.options())
            .await
            .map_err(|e| DaemonError(format!("connecting to the private containerd: {e}\n{}", self.log_tail())))
    }

    /// `ctr -a <socket> -n <namespace> <args>`, stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let socket = self.socket.display().to_string();
        let mut all = vec!["-a", socket.as_str(), "-n", self.namespace.as_str()];
        all.extend_from_slice(args);
        run_quiet("ctr", &all).map_err(DaemonError)
    }

    /// Keys of the snapshots in this daemon's snapshotter.
    pub fn snapshot_keys(&self) -> Result<Vec<String>> {
        Ok(self
            .ctr(&["snapshots", "--snapshotter", &self.snapshotter, "ls"])?
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect())
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{id}.log"))
    }

    fn teardown(&mut self) {
        let socket = self.socket.display().to_string();
        let ctr = |args: &[&str]| {
            let mut all = vec!["-a", socket.as_str(), "-n", self.namespace.as_str()];
            all.extend_from_slice(args);
            run_quiet("ctr", &all)
        };
        if self.child.is_some() {
            for id in ctr(&["tasks", "ls", "-q"]).unwrap_or_default().lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
                let _ = ctr(&["tasks", "rm", "-f", id]);
            }
            for id in
                ctr(&["containers", "ls", "-q"]).unwrap_or_default().lines().map(str::trim).filter(|l| !l.is_empty())
            {
                let _ = ctr(&["containers", "rm", id]);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive containerd by design: kill any of this daemon's that are left, by pid.
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for entry in procs.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains("containerd-shim") && cmdline.contains(&socket) {
                    eprintln!("killing leftover shim {pid}: {cmdline}");
                    let _ = run_quiet("kill", &["-9", &pid.to_string()]);
                }
            }
        }
        // Mounts left under our directory (a rootfs of a task that was not deleted), deepest first.
        let root = self.dir.path().display().to_string();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<String> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = run_quiet("umount", &["-l", &m]);
        }
        // The namespace's (now empty) cgroup directories: /sys/fs/cgroup/<controller>/omega/<namespace>.
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in controllers.flatten() {
                let _ = std::fs::remove_dir(c.path().join("omega").join(&self.namespace));
            }
        }
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        self.teardown();
    }
}
