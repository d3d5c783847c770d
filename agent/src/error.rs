//! The agent library's error type.
//!
//! A task runner that fails with one of these is started again by its supervisor (with backoff): every
//! error here is about reaching etcd or containerd, or about records that should be there, all of which
//! may heal. What a task itself did wrong (its image is missing, its command does not exist) is not an
//! error of the runner: it is recorded as the task's failure.

use crate::containerd;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd could not be read or written (unreachable, timed out, refused).
    #[error("etcd: {0}")]
    Store(#[from] omega::Error),

    /// containerd could not be reached, or a call that must work failed.
    #[error("containerd: {0}")]
    Containerd(#[from] containerd::Error),

    /// A task's job record is gone while the task still holds its place on this node.
    #[error("job {job} of task {task} is not in etcd")]
    JobMissing { job: String, task: String },

    /// A container in our namespace says it is for a run this agent cannot account for.
    #[error("container {container} of task {task}: {why}")]
    Unaccountable { container: String, task: String, why: String },
}
