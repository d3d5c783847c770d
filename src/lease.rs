//! Keeping a lease alive, and coming back when it is gone.
//!
//! Every component that says "I am here" to the cell does it with keys bound to a lease: an agent's liveness
//! key, a scheduler instance's record and the jobs it owns, a controller replica's election key, the shared
//! leases of a host of simulated nodes. etcd-client runs no background keep-alive: each refresh is a message
//! on a stream the caller holds. Two layers:
//!
//! - [`Renewer`] holds that stream, reopens it after a failure, and answers one question per period: is the
//!   lease still alive? "Lease not found" is an answer (it is gone), not a transport hiccup to retry.
//! - [`LeaseKeeper`] runs the loop every holder needs: renew every third of the TTL, and when the lease is
//!   gone (etcd was unreachable or paused for longer than the TTL, or someone revoked it) grant a new one and
//!   call the holder's `register` to put its keys back under it, retrying until etcd takes them. Holders read
//!   the current lease, and learn that it changed, from [`LeaseKeeper::watch`].

use crate::error::{Error, Result};
use crate::store::Store;
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper as EtcdLeaseKeeper};
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long to wait for etcd's answer to one refresh.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest pause between attempts to replace a lost lease.
const MAX_REGRANT_BACKOFF: Duration = Duration::from_secs(2);

/// One lease's keep-alive stream.
pub struct Renewer {
    store: Store,
    lease: i64,
    stream: Option<(EtcdLeaseKeeper, LeaseKeepAliveStream)>,
}

impl Renewer {
    pub fn new(store: Store, lease: i64) -> Self {
        Renewer { store, lease, stream: None }
    }

    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Switches to a new lease (after the old one lapsed and the holder granted another).
    pub fn set_lease(&mut self, lease: i64) {
        self.lease = lease;
        self.stream = None;
    }

    /// Refreshes the lease once. `Ok(true)`: alive; `Ok(false)`: it is gone (etcd answers TTL 0, or says it
    /// does not know the lease); `Err`: etcd did not answer (the stream is reopened on the next call).
    pub async fn renew(&mut self) -> Result<bool> {
        let result = self.try_renew().await;
        if !matches!(result, Ok(true)) {
            self.stream = None;
        }
        match result {
            Err(e) if is_lease_not_found(&e) => Ok(false),
            other => other,
        }
    }

    async fn try_renew(&mut self) -> Result<bool> {
        if self.stream.is_none() {
            self.stream = Some(self.store.stream_client().lease_client().keep_alive(self.lease).await?);
        }
        let Some((keeper, responses)) = self.stream.as_mut() else {
            return Err(Error::InvalidArgument("the lease keep-alive stream is not open".into()));
        };
        keeper.keep_alive().await?;
        match tokio::time::timeout(ANSWER_TIMEOUT, responses.message()).await {
            Ok(Ok(Some(r))) => Ok(r.ttl() > 0),
            Ok(Ok(None)) => Err(Error::InvalidArgument("the lease keep-alive stream ended".into())),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Error::Timeout(ANSWER_TIMEOUT, "a lease keep-alive answer".into())),
        }
    }
}

/// Whether etcd said the lease does not exist (expired and revoked, or revoked by someone).
pub fn is_lease_not_found(e: &Error) -> bool {
    e.to_string().contains("lease not found")
}

/// The lease a [`LeaseKeeper`] holds now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseState {
    pub lease: i64,
    /// Incremented each time the lease was lost and replaced; everything bound to the old one is gone.
    pub generation: u64,
}

/// Puts the holder's keys under a (new) lease. Called once at start and again after every replacement; it
/// must be idempotent.
pub type Register = Arc<dyn Fn(Store, i64) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// Keeps a lease alive in the background and replaces it when it is gone. Dropping the keeper stops the
/// renewals (the lease then lapses after its TTL; [`LeaseKeeper::revoke`] ends it at once).
pub struct LeaseKeeper {
    store: Store,
    state: watch::Receiver<LeaseState>,
    renewals: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl`, registers under it (errors are returned: the holder cannot start), and keeps
    /// it alive from then on.
    pub async fn start(
        store: Store,
        ttl: Duration,
        what: impl Into<String>,
        register: Register,
    ) -> Result<LeaseKeeper> {
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let lease = store.grant_lease(ttl_secs).await?;
        register(store.clone(), lease).await?;
        let (tx, state) = watch::channel(LeaseState { lease, generation: 0 });
        let what = what.into();
        let renewals = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(keep(store.clone(), ttl_secs, what, register, tx, renewals.clone()));
        Ok(LeaseKeeper { store, state, renewals, task })
    }

    /// Successful renewals so far.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }

    /// The renewal counter itself, for a holder's statistics that outlive a borrow of the keeper.
    pub fn renewal_counter(&self) -> Arc<AtomicU64> {
        self.renewals.clone()
    }

    /// The lease in force now.
    pub fn lease(&self) -> i64 {
        self.state.borrow().lease
    }

    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// Wakes on every replacement of the lease.
    pub fn watch(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// A function that reads the lease in force, for code that binds keys to it later (job ownership).
    pub fn lease_fn(&self) -> impl Fn() -> i64 + Send + Sync + 'static {
        let state = self.state.clone();
        move || state.borrow().lease
    }

    /// Stops renewing and revokes the lease, so everything bound to it goes now rather than after the TTL.
    pub async fn revoke(self) {
        self.task.abort();
        let lease = self.lease();
        if let Err(e) = self.store.client().lease_client().revoke(lease).await {
            tracing::debug!(lease = format!("{lease:x}"), error = %e, "revoking the lease failed; it lapses by itself");
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep(
    store: Store,
    ttl_secs: i64,
    what: String,
    register: Register,
    tx: watch::Sender<LeaseState>,
    renewals: Arc<AtomicU64>,
) {
    let period = Duration::from_millis(ttl_secs as u64 * 1000 / 3);
    let mut state = *tx.borrow();
    let mut renewer = Renewer::new(store.clone(), state.lease);
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        match renewer.renew().await {
            Ok(true) => {
                last_ok = Instant::now();
                renewals.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {
                tracing::error!(holder = what, lease = format!("{:x}", state.lease), since_renewed = ?last_ok.elapsed(),
                    "the lease is gone, and everything bound to it; granting a new one and registering again");
                state = LeaseState {
                    lease: regrant(&store, ttl_secs, &what, &register).await,
                    generation: state.generation + 1,
                };
                renewer.set_lease(state.lease);
                last_ok = Instant::now();
                tracing::warn!(
                    holder = what,
                    lease = format!("{:x}", state.lease),
                    "registered again under a new lease"
                );
                if tx.send(state).is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!(holder = what, error = %e, since_renewed = ?last_ok.elapsed(),
                "lease keep-alive failed; will retry"),
        }
    }
}

/// Grants a new lease and registers under it, retrying (with backoff, a log line each) until both succeed.
async fn regrant(store: &Store, ttl_secs: i64, what: &str, register: &Register) -> i64 {
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let lease = store.grant_lease(ttl_secs).await?;
            if let Err(e) = register(store.clone(), lease).await {
                let _ = store.client().lease_client().revoke(lease).await;
                return Err(e);
            }
            Ok::<i64, Error>(lease)
        };
        match attempt.await {
            Ok(lease) => return lease,
            Err(e) => {
                tracing::warn!(holder = what, error = %e, retry_in = ?backoff, "registering under a new lease failed")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_REGRANT_BACKOFF);
    }
}
