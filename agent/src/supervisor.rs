//! Keeping a task runner going until its work is done.
//!
//! A runner fails when etcd or containerd cannot be reached, or (a bug) panics. Either way its task still
//! holds its place on the node, so giving up would leave the task `running` with its resources held forever.
//! The supervisor starts it again, with backoff, until it reports its work done; each attempt starts from the
//! runner's `discover`, the same path an agent restart takes, so an attempt may end anywhere.

use crate::error::Result;
use crate::runners::RunnerGuard;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Resolves once a runner is told to stop (its assignment went away). A closed channel is not a stop: the
/// agent is shutting down and aborts its runners, whose containers must keep running for the next agent.
pub(crate) async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    if stopped.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Doubling waits between attempts, up to a ceiling.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first, max }
    }

    pub(crate) fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }
}

/// One attempt's task, aborted with the supervisor (agent shutdown), not left running detached.
struct AbortOnDrop(JoinHandle<Result<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `attempt` (given the runner's stop signal) until one returns `Ok`, starting it again after a failure
/// or a panic with backoff (200 ms doubling to 10 s). The runner's registration is held until then.
pub fn supervise<F, Fut>(task: String, stop: watch::Receiver<bool>, guard: RunnerGuard, attempt: F) -> JoinHandle<()>
where
    F: Fn(watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let _guard = guard;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let stopping = *stop.borrow();
            let mut running = AbortOnDrop(tokio::spawn(attempt(stop.clone())));
            let failure = match (&mut running.0).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(e) if e.is_panic() => format!("panicked: {e}"),
                Err(e) => format!("ended: {e}"),
            };
            let wait = backoff.next();
            tracing::warn!(task, error = failure, retry_in = ?wait, "task runner failed; starting it again");
            // A stop that arrives during the pause is acted on at once; an attempt that failed while already
            // stopping waits its turn like any other.
            if stopping {
                tokio::time::sleep(wait).await;
            } else {
                let mut stop = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop_requested(&mut stop) => {}
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runners::Runners;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<u64> = (0..4).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
    }

    #[tokio::test]
    async fn failed_and_panicked_attempts_are_started_again_until_one_succeeds() {
        let runners = Runners::new();
        let guard = runners.register("j/0", 1);
        let (_stop, stopped) = watch::channel(false);
        let attempts = Arc::new(AtomicU32::new(0));
        let counted = attempts.clone();
        let handle = supervise("j/0".into(), stopped, guard, move |_| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Err(crate::error::Error::JobMissing { job: "j".into(), task: "j/0".into() }),
                    1 => panic!("a bug in attempt {n}"),
                    _ => Ok(()),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), handle).await.expect("the supervisor ends").expect("no panic");
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        assert!(runners.snapshot().is_empty(), "the registration ends with the supervisor");
    }
}
