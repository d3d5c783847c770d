//! Waiting for a container's exit. One `tasks.wait` per container is shared by every caller, started before
//! the task is (or by the first caller, for a task this client did not start): an exit cannot slip by
//! unseen, and containerd is not asked the same question many times. A wait broken by a containerd restart
//! is taken up again, since the shim keeps the task running meanwhile.

use std::time::Duration;

use containerd_client::services::v1::WaitRequest;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::Code;

use super::lifecycle::SIGKILL;
use super::{check_id, lock, now_ms, Containerd, Error, Exit, Result};

/// What a spawned `tasks.wait` produced: the exit, or the status code and message it failed with.
pub(super) type WaitOutcome = std::result::Result<RawExit, (Code, String)>;

#[derive(Clone, Copy, Debug)]
pub(super) struct RawExit {
    code: u32,
    exited_at_ms: u64,
}

pub(super) struct Waiter {
    rx: watch::Receiver<Option<WaitOutcome>>,
    pub(super) task: AbortHandle,
}

fn timestamp_ms(ts: Option<&prost_types::Timestamp>) -> u64 {
    match ts {
        Some(t) if t.seconds > 0 => t.seconds as u64 * 1000 + (t.nanos.max(0) as u64) / 1_000_000,
        _ => now_ms(),
    }
}

impl Containerd {
    /// Starts a `tasks.wait` for `id` and makes it the one callers share (replacing any older one).
    pub(super) fn fresh_waiter(&self, id: &str) -> watch::Receiver<Option<WaitOutcome>> {
        let (tx, rx) = watch::channel(None);
        let mut tasks = self.tasks();
        let request = self.request(WaitRequest { container_id: id.to_string(), exec_id: String::new() });
        let task = tokio::spawn(async move {
            let outcome = match tasks.wait(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    Ok(RawExit { code: r.exit_status, exited_at_ms: timestamp_ms(r.exited_at.as_ref()) })
                }
                Err(status) => Err((status.code(), status.message().to_string())),
            };
            let _ = tx.send(Some(outcome));
        })
        .abort_handle();
        if let Some(old) = lock(&self.inner.waiters).insert(id.to_string(), Waiter { rx: rx.clone(), task }) {
            old.task.abort();
        }
        rx
    }

    /// The shared `tasks.wait` for `id`, started now if there is none (or the last one failed).
    pub(super) fn waiter(&self, id: &str) -> watch::Receiver<Option<WaitOutcome>> {
        let usable = {
            let waiters = lock(&self.inner.waiters);
            waiters.get(id).and_then(|w| {
                let outcome = w.rx.borrow();
                let failed = matches!(&*outcome, Some(Err(_)));
                let aborted = outcome.is_none() && w.task.is_finished();
                (!failed && !aborted).then(|| w.rx.clone())
            })
        };
        usable.unwrap_or_else(|| self.fresh_waiter(id))
    }

    /// Waits for the exit `rx` reports. A wait that failed transiently (containerd restarting: the shim
    /// keeps the task) or was replaced (another caller restarted it, `run` re-created the task) is picked up
    /// again from the shared waiter, a bounded number of times.
    pub(super) async fn await_exit(&self, id: &str, mut rx: watch::Receiver<Option<WaitOutcome>>) -> Result<RawExit> {
        let mut retries = 0u32;
        loop {
            // Err: the waiter was aborted without an answer (replaced, removed, or the client dropped).
            let outcome = rx.wait_for(Option::is_some).await.ok().and_then(|v| v.clone());
            match outcome {
                Some(Ok(exit)) => return Ok(exit),
                Some(Err((Code::NotFound, _))) => {
                    self.forget_waiter(id, &rx);
                    return Err(Error::NotFound { id: id.to_string() });
                }
                Some(Err((code, message)))
                    if retries >= 5
                        || !matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal) =>
                {
                    self.forget_waiter(id, &rx);
                    return Err(Error::Rpc { op: "tasks.wait", id: id.to_string(), code, message });
                }
                None if retries >= 5 => return Err(Error::NotFound { id: id.to_string() }),
                failed => {
                    retries += 1;
                    if failed.is_some() {
                        tracing::debug!(container = id, ?failed, "tasks.wait failed; waiting again");
                        tokio::time::sleep(Duration::from_millis(250 * u64::from(retries))).await;
                    }
                    // The shared waiter: a fresh one unless another caller already restarted it.
                    rx = self.waiter(id);
                }
            }
        }
    }

    /// Drops the map entry of a waiter that ended in an error, if it is still the current one.
    fn forget_waiter(&self, id: &str, rx: &watch::Receiver<Option<WaitOutcome>>) {
        let mut waiters = lock(&self.inner.waiters);
        if waiters.get(id).is_some_and(|w| w.rx.same_channel(rx)) {
            waiters.remove(id);
        }
    }

    /// Waits until container `id`'s task exits and returns how; returns at once for a task that already
    /// exited (also one that exited while no agent was watching: containerd keeps the status until the task
    /// is deleted). [`Error::NotFound`] if there is no task. Call it before [`remove`](Self::remove): the OOM
    /// verdict is read from the task's cgroup, which `remove` deletes. The log file may still lack the last
    /// output at this point; it is complete after `remove`.
    pub async fn wait(&self, id: &str) -> Result<Exit> {
        check_id(id)?;
        let rx = self.waiter(id);
        let raw = self.await_exit(id, rx).await?;
        Ok(self.exit_of(id, raw).await)
    }

    pub(super) async fn exit_of(&self, id: &str, raw: RawExit) -> Exit {
        let code = raw.code as i32;
        let from_cgroup = self.cgroup_oom_kills(id);
        let mut oom_killed = from_cgroup.is_some_and(|n| n > 0) || self.oom_event_seen(id);
        if !oom_killed && from_cgroup.is_none() && code == 128 + SIGKILL as i32 {
            // No cgroup to read (remote containerd, or already deleted): the OOM event may trail the exit.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.oom_event_seen(id) {
                    oom_killed = true;
                    break;
                }
            }
        }
        Exit { code, oom_killed, finished_at_ms: raw.exited_at_ms }
    }
}
