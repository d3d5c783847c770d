//! A secure etcd per test: certificates and roles made by the very scripts an operator runs
//! (`deploy/tls/make-cell-certs.sh`, `deploy/tls/grant-roles.sh`), etcd started with `--client-cert-auth`
//! and authentication on, so that every component in a test acts as its own etcd user.

use omega::etcd_process::{EtcdOptions, EtcdProcess, ServerTls};
use omega::keys::Keys;
use omega::store::{Store, StoreOptions};
use omega::tls::TlsFiles;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's `deploy/tls/` scripts.
pub fn tls_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tls").join(name)
}

/// Runs `make-cell-certs.sh DIR ARGS...`, panicking with its output if it fails.
pub fn make_certs(dir: &Path, args: &[&str]) {
    let out = Command::new("bash").arg(tls_script("make-cell-certs.sh")).arg(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "make-cell-certs.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct SecureEtcd {
    pub certs: tempfile::TempDir,
    pub etcd: EtcdProcess,
    /// Connected as etcd's root user.
    pub root: Store,
}

impl SecureEtcd {
    /// Certificates for `identities` (make-cell-certs.sh's flags, e.g. `["--sim-agents", "a"]`), an etcd that
    /// requires them, and the roles granted with authentication enabled.
    pub async fn start(identities: &[&str]) -> SecureEtcd {
        crate::etcd::init_tracing();
        let certs = tempfile::Builder::new().prefix("omega-certs-").tempdir().unwrap();
        make_certs(certs.path(), identities);
        let options = EtcdOptions { tls: Some(ServerTls::from_cell_certs(certs.path())), ..EtcdOptions::default() };
        let etcd = EtcdProcess::start(options).await.expect("start etcd with TLS");
        let out = Command::new("bash")
            .arg(tls_script("grant-roles.sh"))
            .arg(certs.path())
            .arg(etcd.endpoint())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "grant-roles.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let root = Store::connect_with(
            &etcd.endpoints(),
            Keys::default(),
            StoreOptions::with_tls(Some(files(certs.path(), "root"))),
            std::time::Duration::ZERO,
        )
        .await
        .expect("connect as root");
        SecureEtcd { certs, etcd, root }
    }

    pub fn endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    /// The identity `name` (a certificate file's stem: `omega-scheduler`, `agents-a`, `operator-alice`).
    pub fn files(&self, name: &str) -> TlsFiles {
        files(self.certs.path(), name)
    }

    /// `--cacert .. --cert .. --key ..` for a component acting as `name`.
    pub fn flags(&self, name: &str) -> Vec<String> {
        let f = self.files(name);
        let (cert, key) = f.identity.expect("an identity");
        vec![
            "--cacert".into(),
            f.ca.display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ]
    }

    /// A store connected as `name`.
    pub async fn connect_as(&self, name: &str) -> omega::Result<Store> {
        Store::connect_with(
            &self.etcd.endpoints(),
            Keys::default(),
            StoreOptions::with_tls(Some(self.files(name))),
            std::time::Duration::ZERO,
        )
        .await
    }
}

fn files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        identity: Some((dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")))),
    }
}
