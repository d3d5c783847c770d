//! What can go wrong talking to containerd. Each error says which call and which container, image or socket
//! it concerns, so one line of the agent's log tells what failed; the predicates answer what callers must
//! decide: whether the thing was simply absent (removal is idempotent), and whether trying again later can
//! help (containerd restarting) or would fail the same way.

use std::path::PathBuf;
use std::time::Duration;

use tonic::Code;

/// Everything that can go wrong talking to containerd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket did not answer at all.
    #[error("cannot connect to containerd at {socket}: {reason}; is it running? (e.g. `containerd --config <file>`)")]
    Connect { socket: PathBuf, reason: String },

    /// containerd answered a call with an error status.
    #[error("containerd {op} for {id:?} failed: {code:?}: {message}")]
    Rpc { op: &'static str, id: String, code: Code, message: String },

    /// A call got no answer in time (containerd hung or is overloaded).
    #[error("containerd {op} for {id:?} got no answer within {after:?}")]
    Timeout { op: &'static str, id: String, after: Duration },

    /// The image is not in containerd. No registry is used: images are loaded from OCI tarballs.
    #[error(
        "image {image:?} is not in containerd namespace {namespace:?}; no registry is used, so load it from an \
         OCI tarball first: `ctr -a {socket} -n {namespace} images import --base-name <name without :tag> \
         <image.tar>` (or omega_agent::image::import_oci_tar; see agent/README.md, \"Images\")",
        socket = .socket.display()
    )]
    ImageNotFound { image: String, namespace: String, socket: PathBuf },

    /// The image's manifest or config is unusable (unknown media type, no linux manifest, bad JSON, ...).
    #[error("image {image:?}: {reason}")]
    BadImage { image: String, reason: String },

    /// The caller's spec or id cannot be used.
    #[error("invalid container spec: {0}")]
    InvalidSpec(String),

    /// `run` found a live task with this id and left it alone.
    #[error("container {id:?} is already running (pid {pid}); stop and remove it first, or adopt it")]
    AlreadyRunning { id: String, pid: u32 },

    /// No such container or task.
    #[error("container {id:?} has no task in containerd")]
    NotFound { id: String },

    /// Building the OCI runtime spec failed.
    #[error("building the OCI runtime spec for {id:?}: {reason}")]
    Spec { id: String, reason: String },

    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl Error {
    /// containerd said "not found" (container, task, snapshot, lease, image or process).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Rpc { code: Code::NotFound, .. } | Error::NotFound { .. })
    }

    /// containerd could not be reached or did not answer in time: trying the same call again later may work.
    /// Anything else (the image is missing, runc refused the command, ...) would fail the same way again.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } => true,
            Error::Rpc { code, .. } => {
                matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted)
            }
            _ => false,
        }
    }

    pub(super) fn is_already_exists(&self) -> bool {
        matches!(self, Error::Rpc { code: Code::AlreadyExists, .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
