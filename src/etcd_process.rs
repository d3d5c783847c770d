//! A real etcd server run as a child process, on loopback ports of its own and a data directory of its own.
//!
//! Integration tests, benchmarks and the one-command local cell all need "an etcd that is ours": this starts
//! Debian's `etcd` binary, waits until it answers, and kills it (and removes its data) when dropped. It can
//! also stop and restart the same member on the same ports and data, which is how tests take etcd away from
//! a running client.

use crate::error::{Error, Result};
use crate::tls::TlsFiles;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to start the server.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// The binary (default: `etcd` on `PATH`, or `$OMEGA_ETCD_BIN`).
    pub binary: PathBuf,
    /// `--max-txn-ops` (etcd's default is 128).
    pub max_txn_ops: Option<usize>,
    /// `--quota-backend-bytes`.
    pub quota_backend_bytes: Option<u64>,
    /// `--auto-compaction-retention` in revisions (`--auto-compaction-mode=revision`).
    pub auto_compaction_revisions: Option<u64>,
    /// Keep the data directory here instead of a temporary one (and do not delete it).
    pub data_dir: Option<PathBuf>,
    /// Client port; a free one is picked when `None`.
    pub client_port: Option<u16>,
    pub startup_timeout: Duration,
    /// Serve clients (and peers) over TLS; `None`: plain http.
    pub tls: Option<ServerTls>,
}

/// TLS for an etcd of our own: https client and peer URLs with one certificate, as `deploy/tls/` makes them.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server's (and peer's) certificate and key; valid for 127.0.0.1.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA clients' (and peers') certificates must be signed by.
    pub ca: PathBuf,
    /// `--client-cert-auth`: a client without such a certificate is refused (and, once auth is enabled, a
    /// certificate's common name is its user).
    pub client_cert_auth: bool,
    /// What the readiness probe connects as (with client-cert auth, a certificate it accepts: root's).
    pub probe: TlsFiles,
}

impl ServerTls {
    /// The server certificate, CA and root identity in a directory `deploy/tls/make-cell-certs.sh` made.
    pub fn from_cell_certs(dir: &Path) -> ServerTls {
        ServerTls {
            cert: dir.join("etcd.pem"),
            key: dir.join("etcd-key.pem"),
            ca: dir.join("ca.pem"),
            client_cert_auth: true,
            probe: TlsFiles {
                ca: dir.join("ca.pem"),
                identity: Some((dir.join("root.pem"), dir.join("root-key.pem"))),
            },
        }
    }
}

/// The etcd binary: `$OMEGA_ETCD_BIN`, else `etcd` on `PATH`.
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("OMEGA_ETCD_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("etcd"))
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            binary: etcd_binary(),
            max_txn_ops: None,
            quota_backend_bytes: None,
            auto_compaction_revisions: None,
            data_dir: None,
            client_port: None,
            startup_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// A running (or stopped, restartable) etcd member.
pub struct EtcdProcess {
    options: EtcdOptions,
    /// Member name, and the whole cluster's `name=peer-url` list (a single member when `None`).
    name: String,
    initial_cluster: Option<String>,
    child: Option<Child>,
    _temp: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

/// A loopback port nobody listens on right now. Another process can take it before etcd does; `start`
/// retries with new ports when etcd exits at once.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdProcess {
    /// Starts a new single-member cluster and waits until it serves.
    pub async fn start(options: EtcdOptions) -> Result<EtcdProcess> {
        let (temp, data_dir) = match &options.data_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new().prefix("omega-etcd-").tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let mut last = String::new();
        for _ in 0..5 {
            let client_port = match options.client_port {
                Some(p) => p,
                None => free_port()?,
            };
            let mut me = EtcdProcess {
                options: options.clone(),
                name: "omega".into(),
                initial_cluster: None,
                child: None,
                _temp: None,
                data_dir: data_dir.clone(),
                client_port,
                peer_port: free_port()?,
            };
            match me.launch().await {
                Ok(()) => {
                    me._temp = temp;
                    return Ok(me);
                }
                Err(e) => {
                    last = e.to_string();
                    me.kill();
                    // A half-initialised member directory would pin the old peer URL; start over.
                    let _ = std::fs::remove_dir_all(data_dir.join("member"));
                    if options.client_port.is_some() {
                        break;
                    }
                }
            }
        }
        Err(Error::Process(format!("etcd did not start: {last}")))
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    fn scheme(&self) -> &'static str {
        if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The connect options a client of this server needs to be let in (the probe's identity with TLS).
    pub fn client_options(&self) -> Option<etcd_client::ConnectOptions> {
        let tls = self.options.tls.as_ref()?;
        tls.probe.load().ok().map(|t| etcd_client::ConnectOptions::new().with_tls(t))
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Freezes the server (SIGSTOP): it keeps its connections but answers nothing, like a hung member, and
    /// its leases keep expiring by the clock. [`resume`](Self::resume) lets it go on.
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// Lets a [paused](Self::pause) server go on (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().ok_or_else(|| Error::Process("etcd is not running".into()))?;
        let status = Command::new("kill").args([signal, &pid.to_string()]).status()?;
        if !status.success() {
            return Err(Error::Process(format!("kill {signal} {pid} failed: {status}")));
        }
        Ok(())
    }

    /// Kills the server (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the same member again (same ports, same data) after [`kill`](Self::kill).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch().await
    }

    /// This member's id in its cluster (what `status` reports as the leader).
    pub async fn member_id(&self) -> Result<u64> {
        let mut c = etcd_client::Client::connect([self.endpoint()], self.client_options()).await?;
        Ok(c.status().await?.header().map(|h| h.member_id()).unwrap_or(0))
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join("etcd.log")
    }

    async fn launch(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_ready().await
    }

    fn spawn(&mut self) -> Result<()> {
        let client = format!("{}://127.0.0.1:{}", self.scheme(), self.client_port);
        let peer = format!("{}://127.0.0.1:{}", self.scheme(), self.peer_port);
        let cluster = self.initial_cluster.clone().unwrap_or_else(|| format!("{}={peer}", self.name));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let mut cmd = Command::new(&self.options.binary);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(cluster)
            .arg("--initial-cluster-token")
            .arg("omega")
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn");
        if let Some(tls) = &self.options.tls {
            cmd.arg("--cert-file").arg(&tls.cert).arg("--key-file").arg(&tls.key).arg("--trusted-ca-file").arg(&tls.ca);
            cmd.arg("--peer-cert-file").arg(&tls.cert).arg("--peer-key-file").arg(&tls.key);
            cmd.arg("--peer-trusted-ca-file").arg(&tls.ca).arg("--peer-client-cert-auth");
            if tls.client_cert_auth {
                cmd.arg("--client-cert-auth");
            }
        }
        if let Some(n) = self.options.max_txn_ops {
            cmd.arg("--max-txn-ops").arg(n.to_string());
        }
        if let Some(q) = self.options.quota_backend_bytes {
            cmd.arg("--quota-backend-bytes").arg(q.to_string());
        }
        if let Some(r) = self.options.auto_compaction_revisions {
            cmd.arg("--auto-compaction-mode").arg("revision").arg("--auto-compaction-retention").arg(r.to_string());
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().map_err(|e| {
            Error::Process(format!(
                "cannot run {:?}: {e} (install Debian's etcd-server, or set OMEGA_ETCD_BIN)",
                self.options.binary
            ))
        })?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.options.startup_timeout;
        let endpoint = self.endpoint();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(Error::Process(format!(
                        "etcd exited with {status} while starting; see {}",
                        self.log_path().display()
                    )));
                }
            }
            let options = self.client_options();
            let ready = async {
                let mut c = etcd_client::Client::connect([endpoint.as_str()], options).await.ok()?;
                c.status().await.ok()
            };
            if tokio::time::timeout(Duration::from_secs(2), ready).await.ok().flatten().is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Process(format!(
                    "etcd did not answer on {endpoint} within {:?}; see {}",
                    self.options.startup_timeout,
                    self.log_path().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Several etcd members forming one cluster on loopback (for tests of member and leader failures).
pub struct EtcdCluster {
    pub members: Vec<EtcdProcess>,
    _temp: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until each answers.
    pub async fn start(n: usize, options: EtcdOptions) -> Result<EtcdCluster> {
        let temp = tempfile::Builder::new().prefix("omega-etcd-cluster-").tempdir()?;
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let data_dir = temp.path().join(format!("m{i}"));
            std::fs::create_dir_all(&data_dir)?;
            members.push(EtcdProcess {
                options: options.clone(),
                name: format!("m{i}"),
                initial_cluster: None,
                child: None,
                _temp: None,
                data_dir,
                client_port: free_port()?,
                peer_port: free_port()?,
            });
        }
        let cluster = members
            .iter()
            .map(|m| format!("{}={}://127.0.0.1:{}", m.name, m.scheme(), m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = Some(cluster.clone());
            m.spawn()?;
        }
        // A member only serves once a quorum has formed, so all are spawned before any is waited for.
        for m in &mut members {
            m.wait_ready().await?;
        }
        Ok(EtcdCluster { members, _temp: temp })
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdProcess::endpoint).collect()
    }

    /// The index of the current leader, as the members that answer see it.
    pub async fn leader(&self) -> Result<usize> {
        for m in &self.members {
            if m.child.is_none() {
                continue;
            }
            let Ok(mut c) = etcd_client::Client::connect([m.endpoint()], m.client_options()).await else { continue };
            let Ok(status) = c.status().await else { continue };
            let leader = status.leader();
            for (i, other) in self.members.iter().enumerate() {
                if other.child.is_some() && other.member_id().await.ok() == Some(leader) {
                    return Ok(i);
                }
            }
        }
        Err(Error::Process("no member reports a live leader".into()))
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `etcd grpc-proxy` (the same binary) on a loopback port, in front of `upstream`: what a local cell or a
/// benchmark puts between many schedulers and etcd. Killed when dropped.
pub struct EtcdProxy {
    child: Child,
    endpoint: String,
}

impl EtcdProxy {
    /// Starts the proxy on 127.0.0.1:`port` (a free port when `None`), logging to `log`, and waits (up to
    /// 30 s) until it accepts connections.
    pub async fn start(upstream: &[String], port: Option<u16>, log: &Path) -> Result<EtcdProxy> {
        let listen = format!(
            "127.0.0.1:{}",
            match port {
                Some(p) => p,
                None => free_port()?,
            }
        );
        let binary = etcd_binary();
        let out = std::fs::File::create(log)?;
        let members: Vec<&str> = upstream.iter().map(|e| e.trim_start_matches("http://")).collect();
        let child = Command::new(&binary)
            .args(["grpc-proxy", "start"])
            .arg(format!("--endpoints={}", members.join(",")))
            .arg(format!("--listen-addr={listen}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| Error::Process(format!("cannot run {binary:?} grpc-proxy: {e}")))?;
        let mut proxy = EtcdProxy { child, endpoint: format!("http://{listen}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&listen).await.is_err() {
            if let Some(status) = proxy.child.try_wait()? {
                return Err(Error::Process(format!("etcd grpc-proxy exited with {status}; see {}", log.display())));
            }
            if Instant::now() > deadline {
                return Err(Error::Process(format!("etcd grpc-proxy did not listen on {listen} within 30 s")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(proxy)
    }

    /// The endpoint clients use instead of etcd's.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Fails if the proxy has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => Err(Error::Process(format!("etcd grpc-proxy exited with {status}"))),
            None => Ok(()),
        }
    }
}

impl Drop for EtcdProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
