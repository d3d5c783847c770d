//! Preemption on the node: a task that evicted others starts only once they are gone from here.
//!
//! The claim that preempts hands the victims' ledger share to the preemptor in one etcd transaction, but the
//! victims' containers keep running for up to their grace period after their runners are told to stop. Were
//! the preemptor started at once, the node would hold both in fact for that window, over its capacity. So an
//! assignment whose `after` names tasks waits, before its first container starts, until for each of them:
//!
//! - no runner of an evicted placement of it is alive on this agent (its runner stops the container with the
//!   grace period, removes it, and only then ends), and
//! - no container of an evicted placement of it is running in containerd (this covers containers an earlier
//!   agent process left behind, which the agent's sweep stops).
//!
//! "Evicted placement" is any placement of the victim except the one etcd says it holds on this node now: a
//! victim may be placed here again after the preemption (a new, higher placement, accounted for in the ledger
//! on its own), and that run must not hold the preemptor back. Reading the victim's record after the
//! preemptor's assignment exists makes that independent of the order in which the agent sees the events.

use crate::containerd::Containerd;
use crate::error::Result;
use crate::runner::{LABEL_PLACEMENT, LABEL_TASK};
use crate::runners::Runners;
use crate::supervisor::stop_requested;
use omega::model::Task;
use omega::store::Store;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::watch;

/// How often containerd and etcd are looked at again while victims are still here (runner ends wake the
/// wait at once; a leftover container stopping is only seen by looking).
const POLL: Duration = Duration::from_millis(250);

/// What the node needs to know to wait for victims.
pub struct Victims<'a> {
    pub store: &'a Store,
    pub containerd: &'a Containerd,
    pub runners: &'a Runners,
    pub node: &'a str,
    /// The preemptor (for the log).
    pub task: &'a str,
    pub victims: &'a [String],
}

impl Victims<'_> {
    /// Waits until no victim runs here any more: `Ok(true)`; or until the preemptor itself is told to stop:
    /// `Ok(false)`.
    pub async fn wait_gone(&self, stop: &mut watch::Receiver<bool>) -> Result<bool> {
        if self.victims.is_empty() {
            return Ok(true);
        }
        let mut changed = self.runners.changed();
        let mut said = false;
        loop {
            if *stop.borrow() {
                return Ok(false);
            }
            match self.still_here().await? {
                None => {
                    if said {
                        tracing::info!(task = self.task, victims = ?self.victims, "the preempted tasks are gone; starting");
                    }
                    return Ok(true);
                }
                Some(why) if !said => {
                    tracing::info!(task = self.task, why, "waiting for the tasks it preempted to stop on this node");
                    said = true;
                }
                Some(_) => {}
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = stop_requested(stop) => return Ok(false),
            }
        }
    }

    /// What still holds the preemptor back, if anything.
    async fn still_here(&self) -> Result<Option<String>> {
        let keys = self.store.keys();
        let mut current: HashMap<&str, Option<u32>> = HashMap::new();
        for v in self.victims {
            let placed_here = self
                .store
                .get_json::<Task>(&keys.task(v))
                .await?
                .map(|(t, _)| t)
                .filter(|t| t.state.holds_resources() && t.node.as_deref() == Some(self.node))
                .map(|t| t.placements);
            current.insert(v.as_str(), placed_here);
        }
        for v in self.victims {
            let now = current.get(v.as_str()).copied().flatten();
            if let Some(p) = self.runners.placements(v).into_iter().find(|p| Some(*p) != now) {
                return Ok(Some(format!("the runner of {v} (placement {p}) has not ended")));
            }
        }
        for c in self.containerd.list().await? {
            let Some(v) = c.labels.get(LABEL_TASK) else { continue };
            let Some(now) = current.get(v.as_str()) else { continue };
            let placement = c.labels.get(LABEL_PLACEMENT).and_then(|p| p.parse::<u32>().ok());
            if c.running && (placement.is_none() || placement != *now) {
                return Ok(Some(format!("container {} of {v} is still running", c.id)));
            }
        }
        Ok(None)
    }
}
