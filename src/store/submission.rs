//! Submitting a job so that no reader ever sees it in part, and a failed submission leaves nothing a retry
//! does not complete.
//!
//! Why: schedulers decide on whatever their cache holds. A job record whose tasks are not all written yet gets
//! placed in part (a gang of 1,000 seen with 300 tasks is another gang), and if the submission then fails the
//! job stays pending forever with its name taken. So the job record is always written last:
//!
//! - A job whose tasks and record fit one transaction (about 4,000 small tasks at etcd's default limits) is
//!   written in one, guarded on the job, every task of it and any submission marker being absent.
//! - A larger one first takes a marker, `<prefix>submissions/<job>`, holding a random token, and deletes any
//!   tasks an earlier attempt left; then writes its tasks in as few transactions as the limits allow, each
//!   guarded on the job being absent and the marker still holding its token; then writes the job record and
//!   removes the marker in one last transaction under the same guard. A reader may see tasks without a job
//!   (schedulers place only tasks of jobs they know), never a job without all its tasks.
//! - Any later submission of the same name takes the marker over. So an attempt that died half way is
//!   completed by the next one, and two racing submissions never mix their tasks: the superseded one fails at
//!   its next write.
//! - A failed attempt deletes what it wrote (best effort, guarded on its token). What a dead process left is
//!   for [`Store::delete_orphan_tasks`] to collect once it is older than a grace period.
//!
//! The marker lives outside `cell/`, so no scheduler's cache sees it.

use super::{encode, Store};
use crate::error::{Error, Result};
use crate::keys::{self, prefix_end, Keys};
use crate::model::{now_ms, Job, Task};
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Request bytes an operation costs beside its key and value; a compare beside its key (and value).
const OP_OVERHEAD: usize = 16;
const COMPARE_OVERHEAD: usize = 24;
/// Request bytes a nested sub-transaction costs beside its operations.
const SUBTXN_OVERHEAD: usize = 8;
/// The failpoint between a multi-transaction submission's tasks and its job record.
pub const FAILPOINT_AFTER_TASKS: &str = "submit.after_tasks";

/// A submission in progress, at `<prefix>submissions/<job>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmissionMarker {
    pub job: String,
    /// Whose submission it is: every write of the submission compares the marker's value.
    pub token: String,
    pub tasks: u32,
    pub started_ms: u64,
}

/// Where a submission's marker lives (one place for the layout: [`Keys::submission`]).
pub fn marker_key(keys: &Keys, job: &str) -> String {
    keys.submission(job)
}

/// What a failed submission left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// Nothing of it was written.
    NothingWritten,
    /// The tasks it had written (and its marker) were deleted again.
    Removed { tasks: u64 },
    /// Another submission of the same name took over; what is there now is that one's.
    TakenOver,
    /// Deleting what it wrote failed too: tasks without a job record may remain (no scheduler places them);
    /// submitting the same job again replaces them and completes.
    Remains { error: String },
    /// Its last write's outcome is unknown: the job either exists whole or not at all, and tasks without a
    /// job record may remain.
    Unknown { error: String },
}

impl fmt::Display for Cleanup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cleanup::NothingWritten => f.write_str("nothing was written"),
            Cleanup::Removed { tasks } => {
                write!(f, "the {tasks} tasks it had written were deleted again; nothing of it remains")
            }
            Cleanup::TakenOver => f.write_str(
                "another submission of the same job completed it or took over from this one; what is there now is \
                 that one's",
            ),
            Cleanup::Remains { error } => write!(
                f,
                "deleting the tasks it had written failed too ({error}): tasks without a job record may remain \
                 (no scheduler places them); submitting the same job again replaces them"
            ),
            Cleanup::Unknown { error } => write!(
                f,
                "whether its last write landed is unknown ({error}): the job exists whole or not at all, and \
                 tasks without a job record may remain; submitting the same job again completes or replaces them"
            ),
        }
    }
}

/// A submission that did not complete.
#[derive(Debug, thiserror::Error)]
#[error("{error}; {cleanup}")]
pub struct SubmitError {
    #[source]
    pub error: Error,
    pub cleanup: Cleanup,
}

impl SubmitError {
    fn nothing(error: Error) -> Self {
        SubmitError { error, cleanup: Cleanup::NothingWritten }
    }
}

/// Request bytes of what a submission writes, for checking a job against the server's limit before writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubmissionSizes {
    /// The job record's key and value.
    pub job_record: usize,
    /// The transaction that writes the record (with its guards); no submission can do with less.
    pub job_transaction: usize,
    /// The largest task record's key and value.
    pub largest_task: usize,
    /// A transaction carrying only that task (with its guards): the least a task transaction needs.
    pub task_transaction: usize,
}

/// What submitting `job` under `keys` writes, in request bytes.
pub fn submission_sizes(keys: &Keys, job: &Job) -> Result<SubmissionSizes> {
    let encoded = Encoded::new(keys, job, "0123456789abcdef")?;
    let largest_task = encoded.tasks.iter().map(|op| op.bytes).max().unwrap_or(0);
    Ok(SubmissionSizes {
        job_record: encoded.job.bytes - OP_OVERHEAD,
        job_transaction: encoded.final_bytes(),
        largest_task: largest_task.saturating_sub(OP_OVERHEAD),
        task_transaction: largest_task + SUBTXN_OVERHEAD + encoded.guard_bytes(),
    })
}

/// Refuses a job that cannot be submitted under a request limit of `max_request_bytes`, saying by how much.
pub fn check_submission_size(keys: &Keys, job: &Job, max_request_bytes: usize) -> Result<()> {
    let sizes = submission_sizes(keys, job)?;
    if sizes.job_transaction <= max_request_bytes && sizes.task_transaction <= max_request_bytes {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "job {} would be stored as a {} record; with its guards that is {} in one request, more than the {} \
         etcd accepts (its --max-request-bytes, 1.5 MiB by default, less room for the request's framing); keep \
         large data out of the job (in the image, or fetched by the task)",
        job.id,
        bytes(sizes.job_record),
        bytes(sizes.job_transaction),
        bytes(max_request_bytes)
    )))
}

/// `1.6 MiB`, `900 KiB`, `120 bytes`.
pub fn bytes(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{:.2} MiB", n as f64 / f64::from(1 << 20))
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} bytes")
    }
}

/// One write, with its share of a request.
#[derive(Clone)]
struct Op {
    op: TxnOp,
    bytes: usize,
}

impl Op {
    fn put(key: String, value: Vec<u8>) -> Op {
        let bytes = key.len() + value.len() + OP_OVERHEAD;
        Op { op: TxnOp::put(key, value, None), bytes }
    }
}

/// Everything a submission writes, encoded once.
struct Encoded {
    id: String,
    job_key: String,
    job_value: Vec<u8>,
    job: Op,
    tasks: Vec<Op>,
    tasks_prefix: String,
    marker_key: String,
    marker_value: Vec<u8>,
}

impl Encoded {
    fn new(keys: &Keys, job: &Job, token: &str) -> Result<Encoded> {
        let job_key = keys.job(&job.id);
        let job_value = encode(&job_key, job)?;
        let mut tasks = Vec::with_capacity(job.tasks as usize);
        for index in 0..job.tasks {
            let task = Task::pending(job, index);
            let key = keys.task(&task.id);
            let value = encode(&key, &task)?;
            tasks.push(Op::put(key, value));
        }
        let marker_key = marker_key(keys, &job.id);
        let marker =
            SubmissionMarker { job: job.id.clone(), token: token.to_string(), tasks: job.tasks, started_ms: now_ms() };
        let marker_value = encode(&marker_key, &marker)?;
        Ok(Encoded {
            id: job.id.clone(),
            job: Op::put(job_key.clone(), job_value.clone()),
            job_key,
            job_value,
            tasks,
            tasks_prefix: keys.tasks_of_job(&job.id),
            marker_key,
            marker_value,
        })
    }

    fn job_absent(&self) -> Compare {
        Compare::create_revision(self.job_key.as_str(), CompareOp::Equal, 0)
    }

    fn marker_is_ours(&self) -> Compare {
        Compare::value(self.marker_key.as_str(), CompareOp::Equal, self.marker_value.clone())
    }

    /// Bytes of the guards every write of the general protocol carries.
    fn guard_bytes(&self) -> usize {
        self.job_key.len() + self.marker_key.len() + self.marker_value.len() + 2 * COMPARE_OVERHEAD
    }

    /// Bytes of the one-transaction form beside its tasks: the record, three guards, the read-back.
    fn whole_fixed_bytes(&self) -> usize {
        self.job.bytes
            + 2 * self.job_key.len()
            + 2 * self.tasks_prefix.len()
            + self.marker_key.len()
            + 3 * COMPARE_OVERHEAD
            + OP_OVERHEAD
    }

    /// Bytes of the last transaction: the record, the marker's removal, the guards, the read-back.
    fn final_bytes(&self) -> usize {
        self.job.bytes + self.marker_key.len() + self.job_key.len() + 2 * OP_OVERHEAD + self.guard_bytes()
    }

    fn delete_tasks(&self) -> TxnOp {
        TxnOp::delete(
            self.tasks_prefix.as_str(),
            Some(DeleteOptions::new().with_range(prefix_end(self.tasks_prefix.as_bytes()))),
        )
    }
}

/// How many operations a transaction with `compares` compares can carry under `max_ops`: flat up to
/// `max_ops`, or one at the top level and the rest in `n` nested sub-transactions of
/// `max_ops - max(compares, n + 1)` each (etcd 3.4 gives a nested transaction only what the outer one leaves of
/// the limit).
///
/// Why one write stays at the top level: etcd's space quota costs a transaction by its top-level puts only,
/// so a transaction whose puts are all nested costs nothing and is written even while the `NOSPACE` alarm is
/// raised. One top-level put makes the quota apply to the whole transaction.
fn capacity(max_ops: usize, compares: usize) -> usize {
    if compares > max_ops {
        return 0;
    }
    let nested = (1..max_ops)
        .map(|n| {
            let per = max_ops.saturating_sub(compares.max(n + 1));
            if per == 0 {
                0
            } else {
                1 + n * per
            }
        })
        .max()
        .unwrap_or(0);
    max_ops.max(nested)
}

/// The success branch for `ops`: flat when they fit, else the first at the top level (see [`capacity`]) and
/// the rest spread over the fewest nested sub-transactions. `ops.len()` must be at most [`capacity`].
fn packed(mut ops: Vec<TxnOp>, max_ops: usize, compares: usize) -> Vec<TxnOp> {
    if ops.len() <= max_ops {
        return ops;
    }
    let rest = ops.split_off(1);
    for n in 1..max_ops {
        let per = max_ops.saturating_sub(compares.max(n + 1));
        if per > 0 && n * per >= rest.len() {
            ops.extend(rest.chunks(per).map(|part| TxnOp::txn(Txn::new().and_then(part.to_vec()))));
            return ops;
        }
    }
    ops.extend(rest);
    ops
}

/// How many of `ops`, from the first, one transaction can carry besides `fixed_ops` other writes and
/// `fixed_bytes`. Each op is counted with the framing of a sub-transaction of its own (the most it can cost).
fn fitting(ops: &[Op], max_ops: usize, compares: usize, fixed_ops: usize, fixed_bytes: usize, budget: usize) -> usize {
    let room_ops = capacity(max_ops, compares).saturating_sub(fixed_ops);
    let mut used = fixed_bytes;
    let mut n = 0;
    for op in ops.iter().take(room_ops) {
        if used + op.bytes + SUBTXN_OVERHEAD > budget {
            break;
        }
        used += op.bytes + SUBTXN_OVERHEAD;
        n += 1;
    }
    n
}

pub(super) fn revision(resp: &TxnResponse) -> i64 {
    resp.header().map(|h| h.revision()).unwrap_or(0)
}

/// The first value a refused transaction read back with its `get`s (`None`: none of the keys exists).
fn read_back(resp: &TxnResponse) -> Option<KeyValue> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}

/// A random token naming one submission.
fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// What deleting a failed submission's writes found.
enum Abandoned {
    /// Its tasks (this many) and marker were deleted.
    Removed(u64),
    /// Its marker was never written: nothing of it is there.
    NeverWritten,
    /// Another submission's marker or job record is there.
    NotOurs,
}

impl Store {
    /// Writes a new job and its pending tasks so that no reader ever sees the job without all of them (see
    /// [`submission`](super::submission)); on failure, says what was left behind. `max_txn_ops` caps the
    /// operations per transaction (the server's `--max-txn-ops`, or less).
    pub async fn submit_job(&self, job: &Job, max_txn_ops: usize) -> Result<i64, SubmitError> {
        keys::validate_name("job", &job.id).map_err(SubmitError::nothing)?;
        let budget = self.limits.max_request_bytes();
        check_submission_size(&self.keys, job, budget).map_err(SubmitError::nothing)?;
        let encoded = Encoded::new(&self.keys, job, &token()).map_err(SubmitError::nothing)?;
        let max_ops = || max_txn_ops.min(self.limits.max_ops()).max(super::MIN_TXN_OPS);
        loop {
            let ops = max_ops();
            let fits = fitting(&encoded.tasks, ops, 3, 1, encoded.whole_fixed_bytes(), budget);
            if fits < encoded.tasks.len() {
                break;
            }
            match self.submit_whole(&encoded, ops).await {
                Ok(done) => return done,
                Err(e) if self.refused_as_too_large(&e) => continue,
                Err(e) => return Err(SubmitError::nothing(e)),
            }
        }
        self.submit_in_parts(&encoded, max_ops, budget).await
    }

    /// Whether etcd refused a request for its size, having lowered the op limit so a retry can fit.
    fn refused_as_too_large(&self, e: &Error) -> bool {
        (e.is_too_many_ops() || e.is_request_too_large()) && self.limits.shrink(e)
    }

    /// The one-transaction submission. `Ok(Err(..))` is a definitive answer; `Err` a refusal for size.
    async fn submit_whole(&self, e: &Encoded, max_ops: usize) -> Result<Result<i64, SubmitError>> {
        let guards = [
            e.job_absent(),
            Compare::create_revision(e.tasks_prefix.as_str(), CompareOp::Equal, 0)
                .with_range(prefix_end(e.tasks_prefix.as_bytes())),
            Compare::create_revision(e.marker_key.as_str(), CompareOp::Equal, 0),
        ];
        // The record first: it is the write that stays at the top level.
        let ops: Vec<TxnOp> = std::iter::once(&e.job).chain(&e.tasks).map(|op| op.op.clone()).collect();
        let txn = Txn::new()
            .when(guards)
            .and_then(packed(ops, max_ops, 3))
            .or_else([TxnOp::get(e.job_key.as_str(), Some(GetOptions::new().with_keys_only()))]);
        let resp = match self.client.kv_client().txn(txn).await {
            Ok(resp) => resp,
            Err(err) => {
                let err = Error::from(err);
                if err.is_too_many_ops() || err.is_request_too_large() {
                    return Err(err);
                }
                // One transaction lands whole or not at all: whether the job is there now says which.
                return Ok(self.confirm(e, err).await);
            }
        };
        if resp.succeeded() {
            return Ok(Ok(revision(&resp)));
        }
        if read_back(&resp).is_some() {
            return Ok(Err(SubmitError::nothing(Error::AlreadyExists(format!("job {}", e.id)))));
        }
        // Tasks of an earlier attempt, or a submission in progress: take over through the general protocol.
        Ok(self.submit_in_parts(e, || max_ops, self.limits.max_request_bytes()).await)
    }

    /// After a write whose outcome is unknown: the job record, if it is ours, means the submission is done.
    async fn confirm(&self, e: &Encoded, err: Error) -> Result<i64, SubmitError> {
        match self.client.kv_client().get(e.job_key.as_str(), None).await {
            Ok(resp) => match resp.kvs().first() {
                Some(kv) if kv.value() == e.job_value.as_slice() => Ok(kv.mod_revision()),
                Some(_) => Err(SubmitError::nothing(Error::AlreadyExists(format!("job {}", e.id)))),
                None => Err(SubmitError { error: err, cleanup: Cleanup::NothingWritten }),
            },
            Err(read) => {
                let cleanup = Cleanup::Unknown { error: read.to_string() };
                Err(SubmitError { error: err, cleanup })
            }
        }
    }

    /// The general protocol: marker, tasks, then the record (see the module documentation).
    async fn submit_in_parts(
        &self,
        e: &Encoded,
        max_ops: impl Fn() -> usize,
        budget: usize,
    ) -> Result<i64, SubmitError> {
        let id = &e.id;
        let begin = Txn::new()
            .when([e.job_absent()])
            .and_then([TxnOp::put(e.marker_key.as_str(), e.marker_value.clone(), None), e.delete_tasks()])
            .or_else([TxnOp::get(e.job_key.as_str(), Some(GetOptions::new().with_keys_only()))]);
        match self.client.kv_client().txn(begin).await {
            Ok(resp) if resp.succeeded() => {}
            Ok(_) => return Err(SubmitError::nothing(Error::AlreadyExists(format!("job {id}")))),
            Err(err) => return Err(self.fail(e, err.into()).await),
        }
        let mut next = 0;
        while next < e.tasks.len() {
            let ops = max_ops();
            let n = fitting(&e.tasks[next..], ops, 2, 0, e.guard_bytes(), budget).max(1);
            let writes: Vec<TxnOp> = e.tasks[next..next + n].iter().map(|t| t.op.clone()).collect();
            let txn = self.guarded(e, packed(writes, ops, 2));
            match self.client.kv_client().txn(txn).await {
                Ok(resp) if resp.succeeded() => next += n,
                Ok(_) => return Err(self.refused(e)),
                Err(err) => {
                    let err = Error::from(err);
                    if !self.refused_as_too_large(&err) {
                        return Err(self.fail(e, err).await);
                    }
                }
            }
        }
        crate::failpoint::hit(FAILPOINT_AFTER_TASKS).await;
        let last = self.guarded(e, vec![e.job.op.clone(), TxnOp::delete(e.marker_key.as_str(), None)]);
        match self.client.kv_client().txn(last).await {
            Ok(resp) if resp.succeeded() => Ok(revision(&resp)),
            Ok(_) => Err(self.refused(e)),
            Err(err) => match self.confirm(e, err.into()).await {
                Ok(rev) => Ok(rev),
                Err(SubmitError { error, cleanup: Cleanup::NothingWritten }) => Err(self.fail(e, error).await),
                Err(other) => Err(other),
            },
        }
    }

    /// `writes`, guarded on the job being absent and the marker holding our token.
    fn guarded(&self, e: &Encoded, writes: Vec<TxnOp>) -> Txn {
        Txn::new().when([e.job_absent(), e.marker_is_ours()]).and_then(writes)
    }

    /// A step of the general protocol was refused: another submission of the job completed it or took it
    /// over. Either way what is there is the other's: nothing to clean up.
    fn refused(&self, e: &Encoded) -> SubmitError {
        SubmitError { error: Error::AlreadyExists(format!("job {}", e.id)), cleanup: Cleanup::TakenOver }
    }

    /// A step failed: delete what this submission wrote (if the marker is still ours), and say what is left.
    async fn fail(&self, e: &Encoded, error: Error) -> SubmitError {
        let cleanup = match self.abandon(e).await {
            Ok(Abandoned::Removed(tasks)) => Cleanup::Removed { tasks },
            Ok(Abandoned::NeverWritten) => Cleanup::NothingWritten,
            Ok(Abandoned::NotOurs) => Cleanup::TakenOver,
            Err(err) => Cleanup::Remains { error: err.to_string() },
        };
        tracing::warn!(job = e.id, error = %error, %cleanup, "submission failed");
        SubmitError { error, cleanup }
    }

    /// Deletes this submission's tasks and marker if the marker is still ours.
    async fn abandon(&self, e: &Encoded) -> Result<Abandoned> {
        let keys_only = || Some(GetOptions::new().with_keys_only());
        let txn = Txn::new()
            .when([e.job_absent(), e.marker_is_ours()])
            .and_then([e.delete_tasks(), TxnOp::delete(e.marker_key.as_str(), None)])
            .or_else([TxnOp::get(e.job_key.as_str(), keys_only()), TxnOp::get(e.marker_key.as_str(), keys_only())]);
        let resp = self.client.kv_client().txn(txn).await?;
        if resp.succeeded() {
            return Ok(Abandoned::Removed(deleted(&resp)));
        }
        // No job and no marker: our marker never landed (or was collected with our tasks), so nothing of ours
        // is there. Anything else is another submission's.
        Ok(if read_back(&resp).is_none() { Abandoned::NeverWritten } else { Abandoned::NotOurs })
    }
}

/// Keys the first delete of a successful transaction removed.
pub(super) fn deleted(resp: &TxnResponse) -> u64 {
    resp.op_responses()
        .into_iter()
        .find_map(|r| match r {
            TxnOpResponse::Delete(d) => Some(d.deleted().max(0) as u64),
            _ => None,
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::JobKind;
    use crate::resources::Resources;

    #[test]
    fn capacity_follows_etcd_nesting_rules() {
        // 128: one write at the top level beside 63 sub-transactions of 64.
        assert_eq!(capacity(128, 3), 1 + 63 * 64);
        assert_eq!(capacity(16, 2), 1 + 7 * 8);
        assert_eq!(capacity(8, 2), 1 + 3 * 4);
        // Too few ops for nesting to help: flat.
        assert_eq!(capacity(3, 2), 3);
        assert_eq!(capacity(2, 3), 0, "the compares alone are too many");
    }

    #[test]
    fn packing_respects_the_op_limit() {
        let ops: Vec<TxnOp> = (0..57).map(|i| TxnOp::put(format!("k{i}"), "v", None)).collect();
        assert_eq!(packed(ops.clone()[..16].to_vec(), 16, 2).len(), 16, "flat when it fits");
        let nested = packed(ops, 16, 2);
        assert_eq!(nested.len(), 1 + 7, "one write at the top level, 56 more in 7 sub-transactions of 8");
    }

    #[test]
    fn sizes_name_the_record_and_the_limit() {
        let keys = Keys::default();
        let mut job = Job::new("big", JobKind::Batch, 3, Resources::new(1000, 1 << 30));
        let small = submission_sizes(&keys, &job).unwrap();
        assert!(small.job_transaction > small.job_record && small.largest_task > 0);
        assert!(check_submission_size(&keys, &job, 1 << 20).is_ok());
        job.env.insert("BLOB".into(), "x".repeat(2 << 20));
        let err = check_submission_size(&keys, &job, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("2.00 MiB record") && err.contains("1.00 MiB etcd accepts"), "{err}");
    }

    #[test]
    fn fitting_stops_at_the_byte_budget() {
        let ops: Vec<Op> = (0..100).map(|i| Op::put(format!("k{i:02}"), vec![0; 84])).collect();
        // Each op is 3 + 84 + 16 = 103 bytes, and 8 of sub-transaction framing.
        assert_eq!(fitting(&ops, 16, 2, 0, 0, 10 * 111 + 110), 10);
        assert_eq!(fitting(&ops, 16, 2, 0, 0, 1 << 20), capacity(16, 2));
    }
}
