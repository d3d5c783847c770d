//! What a measurement talks to etcd over (`OMEGA_BENCH_TLS`): plain text, TLS with client certificates, or
//! that with etcd's authentication on as well.
//!
//! - `off`: plain http, as before.
//! - `on`: https; etcd runs with `--client-cert-auth` and refuses a client without a certificate its CA
//!   signed. Authentication stays off (`deploy/tls/grant-roles.sh` is not run), so etcd checks certificates
//!   when a connection opens and nothing per request.
//! - `rbac`: as `on`, then `grant-roles.sh` creates the cell's users and roles and turns authentication on; the
//!   measured side connects as `omega-scheduler`, so etcd checks that role's key ranges on every request.
//!
//! The certificates are the cell's own: `deploy/tls/make-cell-certs.sh` (ECDSA P-256) into a temporary
//! directory, once per run, shared by every etcd of the run. The cell is seeded, read back and cleaned as
//! `root` (a scheduler may not register nodes); the claims, and the cache beside the committer, go as
//! `omega-scheduler` under both `on` and `rbac`.

use anyhow::{bail, ensure, Context, Result};
use etcd_client::{Client, ConnectOptions};
use omega::etcd_process::ServerTls;
use omega::keys::Keys;
use omega::tls::TlsFiles;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Plain,
    Tls,
    Rbac,
}

impl Transport {
    /// `OMEGA_BENCH_TLS`: comma-separated, each at most once, in the order to run them.
    pub fn parse_list(s: &str) -> Result<Vec<Transport>> {
        let mut list = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let t: Transport = t.parse()?;
            ensure!(!list.contains(&t), "{t} is named twice");
            list.push(t);
        }
        ensure!(!list.is_empty(), "names no transport");
        Ok(list)
    }

    pub fn is_tls(self) -> bool {
        self != Transport::Plain
    }
}

impl FromStr for Transport {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Transport> {
        match s {
            "off" => Ok(Transport::Plain),
            "on" => Ok(Transport::Tls),
            "rbac" => Ok(Transport::Rbac),
            other => bail!("{other:?}: use off, on or rbac"),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Plain => "off",
            Transport::Tls => "on",
            Transport::Rbac => "rbac",
        })
    }
}

/// A directory of the cell's certificates, deleted when dropped.
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// Runs `deploy/tls/make-cell-certs.sh` into a new temporary directory.
    pub async fn make() -> Result<Certs> {
        let dir = tempfile::Builder::new().prefix("omega-bench-certs-").tempdir()?;
        run_script("make-cell-certs.sh", &[dir.path().as_os_str()]).await?;
        Ok(Certs { dir })
    }

    /// How etcd serves: its certificate, the CA, client certificates required.
    pub fn server(&self) -> ServerTls {
        ServerTls::from_cell_certs(self.dir.path())
    }

    /// Creates the users and roles for the cell under `keys` on the etcd at `endpoint`, turns authentication
    /// on, and checks it is on: the scheduler's identity may not register a node.
    pub async fn grant_roles(&self, endpoint: &str, keys: &Keys) -> Result<()> {
        let prefix = keys.prefix();
        run_script("grant-roles.sh", &[self.dir.path().as_os_str(), endpoint.as_ref(), prefix.as_ref()]).await?;
        let tls = self.files("omega-scheduler").load()?;
        let mut client = Client::connect([endpoint], Some(ConnectOptions::new().with_tls(tls))).await?;
        match client.put(keys.node("rbac-probe"), "", None).await {
            Err(e) if e.to_string().contains("permission denied") => Ok(()),
            Err(e) => Err(e).context("checking etcd's authentication is on"),
            Ok(_) => bail!("omega-scheduler could register a node: etcd's authentication is not on"),
        }
    }

    /// The identity `name` (a certificate's file stem: `root`, `omega-scheduler`).
    pub fn files(&self, name: &str) -> TlsFiles {
        let dir = self.dir.path();
        TlsFiles {
            ca: dir.join("ca.pem"),
            identity: Some((dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")))),
        }
    }
}

/// Who connects to a measurement's etcd: `None` for plain text.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    /// Seeds, reads back and cleans the cell.
    pub admin: Option<TlsFiles>,
    /// Is measured: the committer and its cache, or the raw claims.
    pub measured: Option<TlsFiles>,
}

impl Identities {
    pub fn of(certs: Option<&Certs>) -> Identities {
        Identities { admin: certs.map(|c| c.files("root")), measured: certs.map(|c| c.files("omega-scheduler")) }
    }
}

/// The repository's `deploy/tls/` scripts (this package is `benches/` in the workspace).
fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tls").join(name)
}

async fn run_script(name: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let path = script(name);
    let out = tokio::process::Command::new("bash")
        .arg(&path)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {}", path.display()))?;
    ensure!(
        out.status.success(),
        "{name} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
