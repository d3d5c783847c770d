//! Exit codes, and which errors map to which.
//!
//! Scripts branch on these, so they are part of omctl's interface: 0 ok, 1 user error, 2 audit violations,
//! 3 etcd unreachable (or a request to it failed), 4 `submit --wait` timed out, 5 `logs -f`: the task did not
//! succeed, 6 etcd is out of space (it refuses every write until an operator frees space; the message says how).

use std::fmt;
use std::time::Duration;

/// How omctl ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    /// Not found, bad job file, already exists, bad arguments.
    User = 1,
    /// The audit found broken invariants.
    Violations = 2,
    /// etcd could not be reached, or a request to it failed.
    Etcd = 3,
    /// `submit --wait` gave up with tasks still pending.
    WaitTimedOut = 4,
    /// `logs -f`: the task ended without succeeding (failed, killed, lost).
    TaskFailed = 5,
    /// etcd refused a write because its database reached its space quota (`mvcc: database space exceeded`).
    /// Not "unreachable": etcd answers, reads work, and retrying cannot help until an operator frees space.
    NoSpace = 6,
}

impl From<Code> for std::process::ExitCode {
    fn from(code: Code) -> Self {
        std::process::ExitCode::from(code as u8)
    }
}

/// etcd did not answer within the connect timeout.
#[derive(Debug)]
pub struct Unreachable {
    pub endpoints: String,
    pub waited: Duration,
    pub last_error: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot reach etcd at {} (gave up after {:.1}s: {}): is it running? start a local one with \
             `etcd --data-dir /tmp/omega-etcd`, or point --etcd (or OMEGA_ETCD) at yours",
            self.endpoints,
            self.waited.as_secs_f64(),
            self.last_error
        )
    }
}

impl std::error::Error for Unreachable {}

/// etcd is out of space: what happened and the commands that recover it.
#[derive(Debug)]
pub struct NoSpace {
    /// What was refused, e.g. "nothing of job web was written".
    pub what: String,
    pub endpoints: String,
    /// The store's current revision, to compact up to (reads still work when etcd is full).
    pub revision: Option<i64>,
}

impl fmt::Display for NoSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.endpoints;
        let revision = self.revision.map(|r| r.to_string()).unwrap_or_else(|| "<revision>".into());
        write!(
            f,
            "etcd is out of space: its database reached its quota (--quota-backend-bytes, 2 GiB by default) and it \
             refuses every write until an operator frees space; {what}.\n\
             To recover, drop old revisions ({revision} is the current one) and give their space back, then lift \
             the alarm:\n  \
             etcdctl --endpoints {e} compact {revision} --physical\n  \
             etcdctl --endpoints {e} defrag\n  \
             etcdctl --endpoints {e} alarm disarm\n  \
             etcdctl --endpoints {e} endpoint status -w table    # DB SIZE should have dropped\n\
             Without --physical, compaction finishes in the background and a defrag right after it frees nothing: \
             run defrag twice, a few seconds apart. If DB SIZE stays near the quota, live data fills it: delete \
             finished jobs (then compact at the newer revision and defrag again), or restart etcd with a larger \
             --quota-backend-bytes.",
            what = self.what
        )
    }
}

impl std::error::Error for NoSpace {}

/// A mistake of the caller's (unknown job, file that does not parse, id taken): exit code 1, message as is.
#[derive(Debug)]
pub struct UserError(pub String);

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

/// Shorthand for returning a [`UserError`].
pub fn user(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UserError(message.into()))
}

/// The exit code for an error: a full etcd is 6, other etcd trouble anywhere in the chain 3, a request too
/// large for etcd 1 (it is the request, not etcd), everything else 1.
/// etcd's RBAC refused the request: this identity's role does not cover the key. Not an etcd failure.
pub fn is_permission_denied(message: &str) -> bool {
    message.contains("etcdserver: permission denied") || message.contains("auth: permission denied")
}

pub fn classify(err: &anyhow::Error) -> Code {
    for cause in err.chain() {
        if cause.is::<UserError>() {
            return Code::User;
        }
        if cause.is::<NoSpace>() {
            return Code::NoSpace;
        }
        if cause.is::<Unreachable>() {
            return Code::Etcd;
        }
        if let Some(e) = cause.downcast_ref::<etcd_client::Error>() {
            let message = e.to_string();
            return if message.contains("database space exceeded") {
                Code::NoSpace
            } else if is_permission_denied(&message)
                || message.contains("request is too large")
                || message.contains("too many operations")
            {
                Code::User
            } else {
                Code::Etcd
            };
        }
        if let Some(e) = cause.downcast_ref::<omega::Error>() {
            return match e {
                e if e.is_no_space() => Code::NoSpace,
                e if e.is_request_too_large() || e.is_too_many_ops() => Code::User,
                e if is_permission_denied(&e.to_string()) => Code::User,
                omega::Error::Etcd(_)
                | omega::Error::Unreachable { .. }
                | omega::Error::Timeout(..)
                | omega::Error::OutcomeUnknown(..) => Code::Etcd,
                _ => Code::User,
            };
        }
    }
    Code::User
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_follow_the_cause() {
        let e =
            anyhow::Error::new(Unreachable { endpoints: "x".into(), waited: Duration::ZERO, last_error: "y".into() });
        assert_eq!(classify(&e.context("connecting")), Code::Etcd);
        assert_eq!(classify(&user("job x not found")), Code::User);
        let lib: anyhow::Result<()> = Err(omega::Error::AlreadyExists("job a".into())).context("submitting");
        assert_eq!(classify(&lib.unwrap_err()), Code::User);
        assert_eq!(classify(&anyhow::anyhow!("something")), Code::User);
        let full = NoSpace {
            what: "nothing of job a was written".into(),
            endpoints: "http://e:2379".into(),
            revision: Some(42),
        };
        let text = full.to_string();
        for expected in ["out of space", "compact 42 --physical", "defrag", "alarm disarm", "nothing of job a"] {
            assert!(text.contains(expected), "{expected:?} in {text}");
        }
        assert_eq!(classify(&anyhow::Error::new(full).context("submitting")), Code::NoSpace);
    }
}
