//! The core library's error type.

use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to etcd failed (transport, timeout, or a status from the server).
    #[error("etcd request failed: {0}")]
    Etcd(#[from] etcd_client::Error),

    /// etcd could not be reached within the time allowed.
    #[error(
        "cannot reach etcd at {endpoints} after {waited:?}: {last_error}; is it running? \
         (a local one: `etcd --data-dir /tmp/omega-etcd --listen-client-urls http://127.0.0.1:2379 \
         --advertise-client-urls http://127.0.0.1:2379`)"
    )]
    Unreachable { endpoints: String, waited: Duration, last_error: String },

    /// A TLS file is missing or wrong, or etcd refused the handshake: one line naming the file and the problem.
    #[error("TLS to etcd: {0}")]
    Tls(String),

    /// A value stored in etcd is not what its key says it should be.
    #[error("cannot decode the value of {key}: {source}")]
    Decode { key: String, source: serde_json::Error },

    #[error("cannot encode a value for {key}: {source}")]
    Encode { key: String, source: serde_json::Error },

    /// A caller passed something unusable (a bad name, an empty batch where one is required, ...).
    #[error("{0}")]
    InvalidArgument(String),

    /// Something that must not exist already does (a job id reused).
    #[error("{0} already exists")]
    AlreadyExists(String),

    /// Something asked for does not exist (a job to cancel, a node to drain).
    #[error("{0} not found")]
    NotFound(String),

    /// A compare-and-swap lost every race it was allowed (someone kept writing the same record); try again.
    #[error("{0} kept changing under every attempt; try again")]
    KeptChanging(String),

    /// A gang is larger than one etcd transaction can carry; the message gives the counts.
    #[error(
        "gang of {claims} claims on {nodes} nodes needs {compares} compares and {writes} writes in one \
         transaction, more than the server's max-txn-ops={max_txn_ops} allows; start etcd with a larger \
         --max-txn-ops or split the gang"
    )]
    GangTooLarge { claims: usize, nodes: usize, compares: usize, writes: usize, max_txn_ops: usize },

    /// Starting or stopping an etcd child process failed.
    #[error("etcd process: {0}")]
    Process(String),

    #[error("io: {0}")]
    Io(#[from] std::io::Error),

    /// The cell-state cache stopped (its task ended); nothing more will arrive from it.
    #[error("the cell-state cache has stopped")]
    CacheStopped,

    /// A fenced write was refused: the writer is no longer the elected leader.
    #[error("no longer the leader (the election key {0} changed); the write was not applied")]
    NotLeader(String),

    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),

    /// A write's request failed in transport or timed out: it may or may not have been applied. Read the
    /// keys again before deciding anything.
    #[error("the outcome of {0} is unknown (the request failed: {1}); read it again")]
    OutcomeUnknown(String, String),

    /// etcd is out of space and this process holds its writes (see [`crate::space`]); nothing was sent.
    #[error(
        "etcd is out of space (NOSPACE alarm): the write was held, not sent; it resumes once an operator has \
         compacted, defragmented and disarmed the alarm (README: Troubleshooting)"
    )]
    NoSpace,
}

impl Error {
    /// Whether etcd refused a transaction for having too many operations (`--max-txn-ops`).
    pub fn is_too_many_ops(&self) -> bool {
        self.status_message().is_some_and(|m| m.contains("too many operations in txn request"))
    }

    /// Whether etcd refused a request for its size (`--max-request-bytes`).
    pub fn is_request_too_large(&self) -> bool {
        self.status_message().is_some_and(|m| m.contains("request is too large"))
    }

    /// Whether the backend quota is exhausted; every write fails until an operator compacts, defragments and
    /// disarms the alarm.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Error::NoSpace) || self.status_message().is_some_and(|m| m.contains("database space exceeded"))
    }

    /// Whether etcd said it is overloaded ("too many requests": its apply queue is far behind) or the
    /// request ran out of time: a reason to send less.
    pub fn is_overloaded(&self) -> bool {
        match self {
            Error::Etcd(etcd_client::Error::GRpcStatus(s)) => {
                s.code() == tonic::Code::DeadlineExceeded
                    || s.message().contains("too many requests")
                    || s.message().contains("request timed out")
            }
            Error::Timeout(..) => true,
            _ => false,
        }
    }

    fn status_message(&self) -> Option<&str> {
        match self {
            Error::Etcd(etcd_client::Error::GRpcStatus(s)) => Some(s.message()),
            _ => None,
        }
    }
}
