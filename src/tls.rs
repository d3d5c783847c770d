//! TLS to etcd: the CA that signs etcd's certificate, and this component's client certificate, whose common
//! name is its etcd user once etcd runs with `--client-cert-auth` (see `deploy/tls/`).
//!
//! Why checks of our own before the handshake: a missing file, a key given without its certificate, or a
//! certificate where the key should be otherwise surface as a gRPC transport error several layers deep.
//! Each of them, and each handshake refusal we can recognise (an unknown CA, an expired or refused
//! certificate), is said in one line naming the file and the problem.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Environment variables the components read when the flags are not given (the same in every binary).
pub const ENV_CACERT: &str = "OMEGA_ETCD_CACERT";
pub const ENV_CERT: &str = "OMEGA_ETCD_CERT";
pub const ENV_KEY: &str = "OMEGA_ETCD_KEY";

/// The files of a TLS connection to etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed etcd's server certificate.
    pub ca: PathBuf,
    /// This client's certificate and key (required by an etcd with `--client-cert-auth`).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    /// From the three optional flags: nothing given is plain text; a certificate needs its key and a CA.
    pub fn from_flags(ca: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<TlsFiles>> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(c), None) => {
                return Err(Error::Tls(format!("--cert {} was given without --key (its private key)", c.display())))
            }
            (None, Some(k)) => {
                return Err(Error::Tls(format!("--key {} was given without --cert (its certificate)", k.display())))
            }
        };
        match ca {
            Some(ca) => Ok(Some(TlsFiles { ca, identity })),
            None if identity.is_some() => Err(Error::Tls(
                "--cert/--key were given without --cacert: the CA that signed etcd's certificate is needed to trust it"
                    .into(),
            )),
            None => Ok(None),
        }
    }

    /// Reads the files into the client's TLS options, checking each is what it should be.
    pub fn load(&self) -> Result<etcd_client::TlsOptions> {
        let ca = read_pem(&self.ca, "--cacert", "CERTIFICATE")?;
        let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca.clone()));
        if let Some((cert, key)) = &self.identity {
            let c = read_pem(cert, "--cert", "CERTIFICATE")?;
            let k = read_pem(key, "--key", "PRIVATE KEY")?;
            check_identity(&self.ca, &ca, cert, &c)?;
            tls = tls.identity(etcd_client::Identity::from_pem(c, k));
        }
        Ok(tls)
    }
}

/// The agent's log service over TLS, with the identities etcd knows: the agent serves with its certificate
/// (which `deploy/tls/make-cell-certs.sh` makes valid for the node's name and address) and takes only clients
/// whose certificate the cell's CA signed; omctl dials with its own.
impl TlsFiles {
    fn identity_pem(&self, what: &str) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let ca = read_pem(&self.ca, "--cacert", "CERTIFICATE")?;
        let Some((cert, key)) = &self.identity else {
            return Err(Error::Tls(format!("{what} needs a certificate: give --cert and --key")));
        };
        Ok((ca, read_pem(cert, "--cert", "CERTIFICATE")?, read_pem(key, "--key", "PRIVATE KEY")?))
    }

    /// The log service's server side: our certificate, and a client certificate signed by the CA required.
    pub fn grpc_server(&self) -> Result<tonic::transport::ServerTlsConfig> {
        let (ca, cert, key) = self.identity_pem("serving logs over TLS")?;
        Ok(tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .client_ca_root(tonic::transport::Certificate::from_pem(ca)))
    }

    /// A client of an agent's log service: the CA to trust it by, our certificate to be let in with.
    pub fn grpc_client(&self) -> Result<tonic::transport::ClientTlsConfig> {
        let (ca, cert, key) = self.identity_pem("reading logs over TLS")?;
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .identity(tonic::transport::Identity::from_pem(cert, key)))
    }
}

/// The flags every binary takes for TLS to etcd (`global` so that omctl's subcommands accept them anywhere).
#[cfg(feature = "cli")]
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// The CA certificate (PEM) that signed etcd's certificate; with it, --etcd endpoints are https://.
    #[arg(long, global = true, env = ENV_CACERT, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// This component's client certificate (PEM); its common name is its etcd user (deploy/tls/).
    #[arg(long, global = true, env = ENV_CERT, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, global = true, env = ENV_KEY, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

#[cfg(feature = "cli")]
impl TlsArgs {
    /// The files, or `None` for plain text; the flags given together or not at all.
    pub fn files(&self) -> Result<Option<TlsFiles>> {
        TlsFiles::from_flags(self.cacert.clone(), self.cert.clone(), self.key.clone())
    }
}

/// What a connection error means in TLS terms (also without TLS files: a plain client talking to a TLS etcd).
pub fn explain(files: Option<&TlsFiles>, error: &str) -> Option<String> {
    let e = error.to_ascii_lowercase();
    let ca = files.map(|f| f.ca.display().to_string()).unwrap_or_default();
    let cert = files.and_then(|f| f.identity.as_ref()).map(|(c, _)| c.display().to_string());
    if e.contains("unknownissuer") || e.contains("unknown issuer") || e.contains("badsignature") {
        return Some(format!("etcd's certificate is not signed by the CA in --cacert {ca}"));
    }
    if e.contains("expired") {
        return Some(match &cert {
            Some(c) => format!("a certificate has expired: etcd's, or ours in --cert {c}"),
            None => "etcd's certificate has expired".into(),
        });
    }
    if e.contains("notvalidforname") || e.contains("not valid for name") {
        return Some("etcd's certificate is not valid for the endpoint's host name (check its SANs)".into());
    }
    if e.contains("certificaterequired") || e.contains("certificate required") {
        return Some(
            "etcd requires a client certificate (it runs with --client-cert-auth): give --cert and --key".into(),
        );
    }
    if e.contains("badcertificate")
        || e.contains("bad certificate")
        || e.contains("unknownca")
        || e.contains("unknown ca")
    {
        return Some(match &cert {
            Some(c) => {
                format!("etcd refused our client certificate --cert {c}: not signed by a CA it trusts, or expired")
            }
            None => "etcd refused the connection: it requires a client certificate (give --cert and --key)".into(),
        });
    }
    // With TLS 1.3 the server judges our certificate after the handshake: a refusal reaches us as a closed
    // connection, not as an alert.
    let closed = e.contains("connection closed") || e.contains("broken pipe") || e.contains("connection reset");
    if closed && files.is_some() {
        return Some(match &cert {
            None => "etcd closed the connection: it requires a client certificate (give --cert and --key)".into(),
            Some(c) => format!(
                "etcd closed the connection: it refused our client certificate --cert {c} (not signed by a CA it \
                 trusts, or revoked)"
            ),
        });
    }
    if files.is_none() && (closed || e.contains("h2 protocol error") || e.contains("frame with invalid size")) {
        return Some(
            "the connection broke at once: if etcd serves TLS, use an https:// endpoint and --cacert (with --cert/--key \
             when it requires client certificates)"
                .into(),
        );
    }
    None
}

/// Our certificate, checked the way etcd will check it, before any handshake: an expired (or not yet valid)
/// certificate is refused by etcd with a bare "bad certificate" that names no file. One signed by another
/// CA than `--cacert` is only warned about: etcd may trust a different CA for clients than the one that signed
/// its own certificate.
fn check_identity(ca_path: &Path, ca: &[u8], cert_path: &Path, cert: &[u8]) -> Result<()> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, UnixTime};
    let bad = |flag: &str, path: &Path, e: String| Error::Tls(format!("{flag} {}: {e}", path.display()));
    let ca_der = CertificateDer::from_pem_slice(ca)
        .map_err(|e| bad("--cacert", ca_path, format!("unreadable certificate: {e}")))?;
    let anchor = webpki::anchor_from_trusted_cert(&ca_der)
        .map_err(|e| bad("--cacert", ca_path, format!("not a usable CA certificate: {e}")))?;
    let chain: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(cert)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad("--cert", cert_path, format!("unreadable certificate: {e}")))?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(bad("--cert", cert_path, "holds no certificate".into()));
    };
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| bad("--cert", cert_path, format!("not a usable certificate: {e}")))?;
    let anchors = [anchor];
    let verified = ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    );
    match verified {
        Ok(_) => Ok(()),
        Err(webpki::Error::CertExpired { not_after, .. }) => Err(bad(
            "--cert",
            cert_path,
            format!("expired at {} (make a new one: deploy/tls/make-cell-certs.sh)", rfc3339(not_after.as_secs())),
        )),
        Err(webpki::Error::CertNotValidYet { not_before, .. }) => Err(bad(
            "--cert",
            cert_path,
            format!("not valid until {} (is this machine's clock right?)", rfc3339(not_before.as_secs())),
        )),
        Err(webpki::Error::RequiredEkuNotFoundContext(_)) => Err(bad(
            "--cert",
            cert_path,
            "is not a client certificate (its extended key usage lacks clientAuth)".into(),
        )),
        Err(e) => {
            tracing::warn!(
                cert = %cert_path.display(),
                ca = %ca_path.display(),
                "our client certificate does not verify against --cacert ({e}); etcd will refuse it unless it \
                 trusts another CA for clients"
            );
            Ok(())
        }
    }
}

fn rfc3339(secs: u64) -> String {
    crate::units::show::rfc3339(secs)
}

/// Reads a PEM file that must hold a block of `kind` (`CERTIFICATE`, or any `... PRIVATE KEY`).
fn read_pem(path: &Path, flag: &str, kind: &str) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::Tls(format!("{flag} {}: cannot read it: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    let has = text.lines().any(|l| l.starts_with("-----BEGIN ") && l.ends_with(&format!("{kind}-----")));
    if !has {
        let found = text.lines().find(|l| l.starts_with("-----BEGIN ")).map(|l| l.trim_matches('-').to_string());
        return Err(Error::Tls(match found {
            Some(other) => format!("{flag} {}: holds a {other} block, not a {kind}", path.display()),
            None => format!("{flag} {}: not a PEM file (no -----BEGIN {kind}----- block)", path.display()),
        }));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_go_together() {
        assert_eq!(TlsFiles::from_flags(None, None, None).unwrap(), None);
        assert!(TlsFiles::from_flags(Some("ca".into()), Some("c".into()), None)
            .unwrap_err()
            .to_string()
            .contains("--key"));
        assert!(TlsFiles::from_flags(None, Some("c".into()), Some("k".into()))
            .unwrap_err()
            .to_string()
            .contains("--cacert"));
        let f = TlsFiles::from_flags(Some("ca".into()), Some("c".into()), Some("k".into())).unwrap().unwrap();
        assert_eq!(f.identity, Some(("c".into(), "k".into())));
    }

    #[test]
    fn files_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let f = TlsFiles { ca: key.clone(), identity: None };
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains("--cacert") && e.contains("key.pem") && e.contains("PRIVATE KEY"), "{e}");
        let f = TlsFiles { ca: dir.path().join("nope.pem"), identity: None };
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains("nope.pem") && e.contains("cannot read"), "{e}");
    }
}
