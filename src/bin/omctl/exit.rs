//! Exit codes, and which errors map to which.
//!
//! Scripts branch on these, so they are part of omctl's interface: 0 ok, 1 user error, 2 audit violations,
//! 3 etcd unreachable (or a request to it failed), 4 `submit --wait` timed out.

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

/// The exit code for an error: etcd trouble anywhere in the chain is 3, everything else is 1.
pub fn classify(err: &anyhow::Error) -> Code {
    for cause in err.chain() {
        if cause.is::<UserError>() {
            return Code::User;
        }
        if cause.is::<Unreachable>() || cause.is::<etcd_client::Error>() {
            return Code::Etcd;
        }
        if let Some(e) = cause.downcast_ref::<omega::Error>() {
            return match e {
                omega::Error::Etcd(_) | omega::Error::Unreachable { .. } | omega::Error::Timeout(..) => Code::Etcd,
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
    }
}
