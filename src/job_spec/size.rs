//! Whether a job, once stored, fits one etcd request: a job too large for it would pass every other check
//! and then fail at submission with a transport error, so it is refused here, at its largest field.

use super::build::Ctx;
use super::probe::Seg;
use super::JobSpecError;
use crate::keys::Keys;
use crate::model::Job;
use crate::store::submission::{bytes, submission_sizes};
use serde::Serialize;

/// Bytes of a field as stored (JSON).
fn stored<T: Serialize + ?Sized>(value: &T) -> usize {
    serde_json::to_vec(value).map(|v| v.len()).unwrap_or(0)
}

impl Ctx<'_> {
    /// Refuses `job` if submitting it needs more than `max_request_bytes` in one request, pointing at the
    /// field (or environment variable) that takes the most room.
    pub(super) fn check_size(&self, job: &Job, max_request_bytes: usize) -> Result<(), JobSpecError> {
        let sizes = submission_sizes(&Keys::default(), job).map_err(|e| self.error(None, None, e.to_string()))?;
        if sizes.job_transaction <= max_request_bytes {
            return Ok(());
        }
        let mut largest: (Vec<Seg<'_>>, String, usize) = [
            ("env", stored(&job.env)),
            ("command", stored(&job.command)),
            ("args", stored(&job.args)),
            ("constraints", stored(&job.constraints)),
            ("image", stored(&job.image)),
            ("checks", stored(&job.checks)),
        ]
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .map(|(field, size)| (vec![Seg::Key(field)], field.to_string(), size))
        .unwrap_or_default();
        if largest.1 == "env" {
            // One variable that is most of `env` is the one to point at.
            if let Some((name, value)) = job.env.iter().max_by_key(|(n, v)| n.len() + v.len()) {
                let size = stored(name) + stored(value);
                if size * 2 > largest.2 {
                    largest = (vec![Seg::Key("env"), Seg::Key(name)], format!("env.{name}"), size);
                }
            }
        }
        let (path, field, size) = largest;
        Err(self.error_at(
            &path,
            field,
            format!(
                "the job would be stored as a {} record, more than fits one etcd request ({}: etcd's \
                 --max-request-bytes, 1.5 MiB by default, less room for the request's framing); this field alone \
                 is {}: keep large data out of the job file (build it into the image, or have the task fetch it)",
                bytes(sizes.job_record),
                bytes(max_request_bytes),
                bytes(size)
            ),
        ))
    }
}
