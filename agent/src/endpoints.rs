//! What this node publishes for discovery ([`omega::discovery`]): the endpoints of its running, healthy
//! tasks, bound to the node's lease.
//!
//! Runners publish when a run turns healthy (or runs, when its job has no checks) and withdraw before anything
//! stops it. The registry remembers what is published so that when the node's lease is lost and replaced
//! (etcd deleted every key bound to it) the [`omega::lease::LeaseKeeper`]'s registration publishes it all
//! again under the new lease. One lock is held across each etcd write, so a re-publication can never bring
//! back an endpoint a runner is withdrawing.

use omega::discovery::{self, Endpoint};
use omega::store::Store;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::Mutex;

/// How long a withdrawal may take before the stop goes ahead anyway (etcd away: the lease removes the keys).
const WITHDRAW_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Published {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The node's lease now (0 before the first registration).
    lease: i64,
    /// Task id -> what it publishes.
    by_task: BTreeMap<String, Vec<Endpoint>>,
}

impl Published {
    /// Publishes `endpoints` for `task` under the node's lease (nothing to do for a job without services).
    pub async fn publish(&self, store: &Store, task: &str, endpoints: Vec<Endpoint>) {
        if endpoints.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().await;
        if inner.lease != 0 {
            if let Err(e) = discovery::publish(store, &endpoints, inner.lease).await {
                // Kept in the registry: the next lease replacement publishes it; say so loudly meanwhile.
                tracing::warn!(task, error = %e, "publishing the task's endpoints failed");
            }
        }
        inner.by_task.insert(task.to_string(), endpoints);
    }

    /// Withdraws what `task` published, if anything; bounded, since a stop must not wait on etcd for long.
    pub async fn withdraw(&self, store: &Store, task: &str) {
        let mut inner = self.inner.lock().await;
        let Some(endpoints) = inner.by_task.remove(task) else { return };
        let keys: Vec<String> = endpoints.iter().map(|e| e.key(store.keys())).collect();
        match tokio::time::timeout(WITHDRAW_WAIT, discovery::withdraw(store, &keys)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(task, error = %e, "withdrawing the task's endpoints failed; the lease will"),
            Err(_) => tracing::warn!(task, "withdrawing the task's endpoints timed out; the lease will"),
        }
    }

    /// The node's lease was granted (or replaced): everything published goes under it.
    pub async fn lease_granted(&self, store: &Store, lease: i64) -> omega::Result<()> {
        let mut inner = self.inner.lock().await;
        inner.lease = lease;
        let all: Vec<Endpoint> = inner.by_task.values().flatten().cloned().collect();
        discovery::publish(store, &all, lease).await
    }
}
