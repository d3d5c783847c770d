//! Self-fencing: an agent cut off from etcd stops its tasks before the cell can place them elsewhere.
//!
//! A node is alive while its agent's lease keeps its liveness key. An agent that cannot reach etcd cannot
//! renew the lease; once it expires, and the controller's grace has passed, the controller releases the
//! node's tasks and their schedulers place them on other nodes. Without fencing the cut-off node keeps
//! running its containers meanwhile (measured: a 3-replica service ran 6 containers for about 8 s during a
//! partition). So the agent watches its own lease: when no renewal has been acknowledged for long enough
//! that the lease could expire before a task's stop would finish, it stops every task whose job did not opt
//! out (`on_disconnect: keep_running`), SIGTERM, the stop grace, SIGKILL, and says so loudly.
//!
//! What the agent writes, and when:
//! - nothing to etcd while cut off (it cannot). Each stopped container is labelled [`LABEL_FENCED`] in
//!   containerd *before* it is signalled, so its runner (or a runner of a later agent process) knows that the
//!   exit it sees was the fence, not the task ending by itself, and never records it as the task's end;
//! - once etcd answers again (the lease renewed, or replaced by a new one) the fence lifts and each runner
//!   of a fenced container hands its task back the way the controller would have: `pending` for its
//!   scheduler, or `lost` for a batch job that never restarts ([`omega::model::Job::state_after_node_loss`]),
//!   in a release compared on the task's revision. If the controller released it first (its assignment is
//!   gone, it may be running elsewhere already) that compare fails, the runner finds the task no longer its
//!   own and only removes the container. Either way exactly one of them writes the task's fate;
//! - nothing new starts while fenced: a runner about to start a container waits for the fence to lift and
//!   then reads its task again, and one that started a container as the fence fell stops it itself.
//!
//! The arithmetic is [`FencePlan`]'s. Simulated nodes (`crate::simulated`) do not fence: their tasks are
//! timers that run nowhere, so nothing of theirs can overlap a replacement, and their every write is guarded
//! by the task's revision, so a task the controller re-placed is never overwritten by them either.

use crate::containerd::{ContainerInfo, Containerd};
use crate::runner::LABEL_TASK;
use crate::supervisor::Backoff;
use omega::lease::Renewed;
use omega::model::now_ms;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Set on a container (to the time, ms since the epoch) just before the fence stops it.
pub const LABEL_FENCED: &str = "omega.fenced";
/// Set to [`KEEP_RUNNING`] on the containers of jobs with `on_disconnect: keep_running`: the fence leaves
/// them alone without asking etcd about their job (it cannot).
pub const LABEL_ON_DISCONNECT: &str = "omega.on_disconnect";
pub const KEEP_RUNNING: &str = "keep_running";

/// Time kept in hand between the fenced containers being gone and the earliest moment the lease can expire.
/// It covers what the arithmetic cannot see: a timer firing late on a loaded machine, listing and labelling
/// the containers, the SIGKILL's delivery and the reaping of the process.
pub const MARGIN: Duration = Duration::from_millis(500);

/// When to fence, and how often to renew so that a healthy node is not fenced by one slow answer.
///
/// Let `s` be when the request of the last renewal etcd acknowledged was sent (this process's monotonic
/// clock). etcd restarted the lease's TTL at some moment after `s`, so the lease lives until at least
/// `E = s + TTL`: the earliest expiry this agent can be sure of, whatever the round trip was. The controller
/// gives up the node no sooner than `E + its grace` (it sees the key gone at `E` or later, then waits its
/// `--grace`), and a replacement starts later still (a scheduler places it, another agent starts it). The
/// agent does not know the controller's grace, so it aims at `E` itself: every fenced container gone by
/// `E - MARGIN`. Stopping a container takes at most the stop grace `G` (SIGTERM, `G`, SIGKILL, which
/// takes milliseconds), so fencing starts at
///
/// ```text
/// start = s + TTL - G - MARGIN
/// ```
///
/// The window `W = TTL - G - MARGIN` is all the time a renewal has to get through before a healthy node
/// would fence itself, so the agent renews every `min(TTL / 3, W / 3)`: a failed renewal is retried (with
/// backoff from 100 ms) and still leaves two more regular tries inside `W`. A `G` that would leave `W` under
/// a fifth of the TTL is shortened for fencing (`new` says by how much; the agent logs it at start), since a
/// fence that cannot finish before the lease expires protects nothing. With the defaults (TTL 15 s, grace
/// 10 s): `W` = 4.5 s, renewals every 1.5 s. An operator who wants more room raises `--lease-ttl` well above
/// `--grace`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FencePlan {
    /// The lease TTL etcd was asked for.
    pub ttl: Duration,
    /// The stop grace fencing uses: the agent's, unless that leaves too small a window.
    pub grace: Duration,
    /// How often the agent renews its lease.
    pub renew_every: Duration,
}

impl FencePlan {
    /// The plan for a lease of `ttl` (as granted) and tasks stopped with `grace`.
    pub fn new(ttl: Duration, grace: Duration) -> FencePlan {
        let least_window = ttl / 5;
        let grace = grace.min(ttl.saturating_sub(MARGIN + least_window));
        let window = ttl.saturating_sub(grace + MARGIN);
        let renew_every = (window / 3).min(ttl / 3).max(Duration::from_millis(50));
        FencePlan { ttl, grace, renew_every }
    }

    /// How long after the last acknowledged renewal's request fencing starts (`W`).
    pub fn window(&self) -> Duration {
        self.ttl.saturating_sub(self.grace + MARGIN)
    }

    /// When fencing starts if the renewal sent at `sent_at` is the last one acknowledged.
    pub fn start_at(&self, sent_at: Instant) -> Instant {
        sent_at + self.window()
    }

    /// The earliest moment the lease renewed at `sent_at` can expire.
    pub fn expiry(&self, sent_at: Instant) -> Instant {
        sent_at + self.ttl
    }
}

/// Whether the agent is fenced now, for its task runners. Cheap to clone.
#[derive(Clone, Debug)]
pub struct FenceSignal {
    fenced: watch::Receiver<bool>,
    grace: Duration,
}

impl FenceSignal {
    /// A signal that never fences (for runners outside an agent that fences).
    pub fn never() -> FenceSignal {
        FenceSignal { fenced: watch::channel(false).1, grace: Duration::ZERO }
    }

    pub fn is_fenced(&self) -> bool {
        *self.fenced.borrow()
    }

    /// The stop grace fencing uses ([`FencePlan::grace`]).
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Resolves once the agent is not fenced (at once if it is not now).
    pub async fn lifted(&self) {
        let mut rx = self.fenced.clone();
        // A closed channel: the agent is shutting down and nothing fences any more.
        let _ = rx.wait_for(|fenced| !*fenced).await;
    }
}

/// The fence of one agent: follows its lease's renewals and stops its tasks when they stop coming.
pub struct Fence {
    plan: FencePlan,
    node: String,
    containerd: Arc<Containerd>,
    state: watch::Sender<bool>,
}

impl Fence {
    pub fn new(plan: FencePlan, node: String, containerd: Arc<Containerd>) -> (Fence, FenceSignal) {
        let (state, fenced) = watch::channel(false);
        (Fence { plan, node, containerd, state }, FenceSignal { fenced, grace: plan.grace })
    }

    /// Runs until the lease keeper is gone: fences when no renewal came in time, lifts the fence on the next.
    pub async fn run(self, mut renewed: watch::Receiver<Renewed>) {
        let node = self.node.as_str();
        loop {
            let last = *renewed.borrow_and_update();
            tokio::select! {
                changed = renewed.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(self.plan.start_at(last.sent_at).into()) => {}
            }
            let fenced_at = Instant::now();
            self.state.send_replace(true);
            self.fence(last).await;
            if renewed.changed().await.is_err() {
                return;
            }
            self.state.send_replace(false);
            tracing::warn!(node, fenced_for = ?fenced_at.elapsed(),
                "etcd answers again: fence lifted; fenced tasks go back to their schedulers (unless the controller \
                 released them first)");
        }
    }

    /// Stops every running task container whose job did not opt out, all at once, each labelled first.
    async fn fence(&self, last: Renewed) {
        let node = self.node.as_str();
        let expiry = self.plan.expiry(last.sent_at);
        let containers = self.list_until(expiry).await;
        let (keep, stop): (Vec<ContainerInfo>, Vec<ContainerInfo>) = containers
            .into_iter()
            .filter(|c| c.running && c.labels.contains_key(LABEL_TASK))
            .partition(|c| c.labels.get(LABEL_ON_DISCONNECT).map(String::as_str) == Some(KEEP_RUNNING));
        let now = Instant::now();
        tracing::warn!(
            node,
            tasks = stop.len(),
            kept_running = keep.len(),
            deadline_in = ?expiry.saturating_duration_since(now + MARGIN),
            lease_expires_in = ?expiry.saturating_duration_since(now),
            since_renewed = ?now.saturating_duration_since(last.sent_at),
            ttl = ?self.plan.ttl,
            grace = ?self.plan.grace,
            "FENCING: cut off from etcd; stopping this node's tasks before its lease can expire and they are \
             placed elsewhere"
        );
        metrics::counter!("omega_agent_fencings_total").increment(1);
        metrics::counter!("omega_agent_fenced_tasks_total").increment(stop.len() as u64);
        let mut stops = JoinSet::new();
        for c in stop {
            let containerd = self.containerd.clone();
            let grace = self.plan.grace;
            stops.spawn(async move {
                let result = fence_container(&containerd, &c.id, grace, expiry).await;
                (c.id, c.labels.get(LABEL_TASK).cloned().unwrap_or_default(), result)
            });
        }
        while let Some(joined) = stops.join_next().await {
            match joined {
                Ok((container, task, Ok(()))) => tracing::info!(node, task, container, "fenced: stopped"),
                Ok((container, task, Err(e))) => {
                    tracing::error!(node, task, container, error = %e, "fencing could not stop the container")
                }
                Err(e) => tracing::error!(node, error = %e, "a fencing stop panicked"),
            }
        }
    }

    /// The namespace's containers, retried while containerd fails (until the lease could expire: past that
    /// the fence is too late to matter, and the agent's sweep on re-registration removes what is left).
    async fn list_until(&self, expiry: Instant) -> Vec<ContainerInfo> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        loop {
            match self.containerd.list().await {
                Ok(listed) => return listed,
                Err(e) if Instant::now() < expiry => {
                    let wait = backoff.next();
                    tracing::warn!(node = self.node, error = %e, retry_in = ?wait, "fencing: listing containers failed");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    tracing::error!(node = self.node, error = %e, "fencing: containerd did not answer before the lease \
                        could expire; no container stopped");
                    return Vec::new();
                }
            }
        }
    }
}

/// Labels container `id` fenced, then stops it (SIGTERM, `grace`, SIGKILL); containerd failures are retried
/// until the lease could expire.
pub(crate) async fn fence_container(
    containerd: &Containerd,
    id: &str,
    grace: Duration,
    expiry: Instant,
) -> crate::containerd::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    loop {
        let attempt = async {
            containerd.set_label(id, LABEL_FENCED, &now_ms().to_string()).await?;
            containerd.stop(id, grace).await
        };
        match attempt.await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) if Instant::now() < expiry => {
                let wait = backoff.next();
                tracing::warn!(container = id, error = %e, retry_in = ?wait, "fencing a container failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn the_defaults_keep_their_grace_and_renew_often_enough_to_ride_out_a_slow_answer() {
        let plan = FencePlan::new(S(15), S(10));
        assert_eq!((plan.grace, plan.window(), plan.renew_every), (S(10), MS(4500), MS(1500)));
        let s = Instant::now();
        // Stopping from `start` with the full grace ends a margin before the earliest expiry.
        assert_eq!(plan.start_at(s) + plan.grace + MARGIN, plan.expiry(s));
    }

    #[test]
    fn renewals_never_come_less_often_than_every_third_of_the_ttl() {
        for (ttl, grace) in [(S(60), S(0)), (S(60), S(5)), (S(15), S(1)), (S(2), S(0))] {
            let plan = FencePlan::new(ttl, grace);
            assert!(plan.renew_every <= ttl / 3 && plan.renew_every <= plan.window() / 3, "{plan:?}");
        }
    }

    #[test]
    fn a_grace_that_leaves_no_window_is_shortened_for_fencing() {
        let plan = FencePlan::new(S(2), S(2));
        assert_eq!(plan.grace, MS(1100), "2 s - margin - a fifth of the TTL");
        assert_eq!(plan.window(), MS(400));
        assert!(plan.renew_every >= MS(50) && plan.renew_every <= plan.window() / 3);
        let plan = FencePlan::new(S(3), S(1));
        assert_eq!((plan.grace, plan.window(), plan.renew_every), (S(1), MS(1500), MS(500)));
    }
}
