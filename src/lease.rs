//! Keeping a lease alive, and coming back when it is gone.
//!
//! Every component that says "I am here" to the cell does it with keys bound to a lease: an agent's liveness
//! key, a scheduler instance's record and the jobs it owns, a controller replica's election key, the shared
//! leases of a host of simulated nodes. etcd-client runs no background keep-alive: each refresh is a message
//! on a stream the caller holds. Two layers:
//!
//! - [`Renewer`] holds that stream, reopens it after a failure, and answers one question per period: is the
//!   lease still alive? "Lease not found" is an answer (it is gone), not a transport hiccup to retry.
//! - [`LeaseKeeper`] runs the loop every holder needs: renew every third of the TTL (or as often as the holder
//!   asks), retry a failed renewal after a short, growing, jittered pause (never in a tight loop, and never
//!   in step with every other holder that lost the same etcd), and when the lease is gone (etcd was
//!   unreachable or paused for longer than the TTL, or someone revoked it) grant a new one and call the
//!   holder's `register` to put its keys back under it, retrying until etcd takes them. Holders read the
//!   current lease, and learn that it changed, from [`LeaseKeeper::watch`]; a holder that must act before
//!   its lease could expire (a node agent fencing itself) reads when the last renewal was acknowledged from
//!   [`LeaseKeeper::renewed`].

use crate::error::{Error, Result};
use crate::store::Store;
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper as EtcdLeaseKeeper};
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The longest wait for etcd's answer to one refresh (opening the stream included); a keeper that renews
/// more often than this waits one renewal period instead.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// The shortest wait for an answer: below it a loaded machine would call a healthy etcd unreachable.
const MIN_ANSWER_TIMEOUT: Duration = Duration::from_millis(500);
/// The first pause after a failed renewal (then doubling, up to the renewal period).
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest pause between attempts to replace a lost lease.
const MAX_REGRANT_BACKOFF: Duration = Duration::from_secs(2);

/// One lease's keep-alive stream.
pub struct Renewer {
    store: Store,
    lease: i64,
    stream: Option<(EtcdLeaseKeeper, LeaseKeepAliveStream)>,
    answer_timeout: Duration,
}

impl Renewer {
    pub fn new(store: Store, lease: i64) -> Self {
        Renewer { store, lease, stream: None, answer_timeout: ANSWER_TIMEOUT }
    }

    /// How long one refresh (opening the stream, sending, the answer) may take before it counts as failed.
    pub fn with_answer_timeout(mut self, timeout: Duration) -> Self {
        self.answer_timeout = timeout;
        self
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
        let timeout = self.answer_timeout;
        let result = match tokio::time::timeout(timeout, self.try_renew()).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(timeout, "a lease keep-alive answer".into())),
        };
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
        match responses.message().await {
            Ok(Some(r)) => Ok(r.ttl() > 0),
            Ok(None) => Err(Error::InvalidArgument("the lease keep-alive stream ended".into())),
            Err(e) => Err(e.into()),
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

/// The last renewal etcd acknowledged (or the grant of the lease in force, before its first renewal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewed {
    /// When the acknowledged request was sent. etcd restarted the lease's TTL at some moment after this one,
    /// so the lease lives at least until `sent_at + ttl` (unless revoked): the earliest expiry anyone holding
    /// only this process's clock can be sure of.
    pub sent_at: Instant,
    pub lease: i64,
}

/// How a [`LeaseKeeper`] keeps its lease.
#[derive(Clone, Copy, Debug)]
pub struct LeaseOptions {
    /// Asked of etcd in whole seconds, at least 2 ([`granted_ttl`]).
    pub ttl: Duration,
    /// How often to renew while all is well; default a third of the TTL. A failed renewal is retried sooner.
    pub renew_every: Option<Duration>,
}

impl LeaseOptions {
    pub fn new(ttl: Duration) -> Self {
        LeaseOptions { ttl, renew_every: None }
    }
}

/// The TTL a keeper asks etcd for when given `ttl`: whole seconds (etcd's unit), at least 2.
pub fn granted_ttl(ttl: Duration) -> Duration {
    Duration::from_secs(ttl.as_secs().max(2))
}

/// Puts the holder's keys under a (new) lease. Called once at start and again after every replacement; it
/// must be idempotent.
pub type Register = Arc<dyn Fn(Store, i64) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// Keeps a lease alive in the background and replaces it when it is gone. Dropping the keeper stops the
/// renewals (the lease then lapses after its TTL; [`LeaseKeeper::revoke`] ends it at once).
pub struct LeaseKeeper {
    store: Store,
    state: watch::Receiver<LeaseState>,
    renewed: watch::Receiver<Renewed>,
    ttl: Duration,
    renewals: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl`, registers under it (errors are returned: the holder cannot start), and keeps
    /// it alive from then on, renewing every third of the TTL.
    pub async fn start(
        store: Store,
        ttl: Duration,
        what: impl Into<String>,
        register: Register,
    ) -> Result<LeaseKeeper> {
        Self::start_with(store, LeaseOptions::new(ttl), what, register).await
    }

    /// [`start`](Self::start) with explicit [`LeaseOptions`].
    pub async fn start_with(
        store: Store,
        options: LeaseOptions,
        what: impl Into<String>,
        register: Register,
    ) -> Result<LeaseKeeper> {
        let ttl = granted_ttl(options.ttl);
        let period = options.renew_every.unwrap_or(ttl / 3).clamp(Duration::from_millis(50), ttl / 3);
        let sent_at = Instant::now();
        let lease = store.grant_lease(ttl.as_secs() as i64).await?;
        register(store.clone(), lease).await?;
        let (tx, state) = watch::channel(LeaseState { lease, generation: 0 });
        let (renewed_tx, renewed) = watch::channel(Renewed { sent_at, lease });
        let renewals = Arc::new(AtomicU64::new(0));
        let keep = Keep {
            store: store.clone(),
            ttl,
            period,
            what: what.into(),
            register,
            state: tx,
            renewed: renewed_tx,
            renewals: renewals.clone(),
        };
        let task = tokio::spawn(keep.run());
        Ok(LeaseKeeper { store, state, renewed, ttl, renewals, task })
    }

    /// The TTL etcd was asked for (what the lease lives after its last renewal).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Wakes on every acknowledged renewal and on every replacement of the lease (whose grant counts as one).
    pub fn renewed(&self) -> watch::Receiver<Renewed> {
        self.renewed.clone()
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

/// The keeper's loop and what it needs.
struct Keep {
    store: Store,
    ttl: Duration,
    period: Duration,
    what: String,
    register: Register,
    state: watch::Sender<LeaseState>,
    renewed: watch::Sender<Renewed>,
    renewals: Arc<AtomicU64>,
}

impl Keep {
    async fn run(self) {
        let what = self.what.as_str();
        let mut state = *self.state.borrow();
        let answer_timeout = self.period.clamp(MIN_ANSWER_TIMEOUT, ANSWER_TIMEOUT);
        let mut renewer = Renewer::new(self.store.clone(), state.lease).with_answer_timeout(answer_timeout);
        let mut retry = Jittered::new(FIRST_RETRY.min(self.period), self.period);
        let mut wait = self.period;
        loop {
            tokio::time::sleep(wait).await;
            let sent_at = Instant::now();
            match renewer.renew().await {
                Ok(true) => {
                    self.renewed.send_replace(Renewed { sent_at, lease: state.lease });
                    self.renewals.fetch_add(1, Ordering::Relaxed);
                    retry.reset();
                    wait = self.period;
                }
                Ok(false) => {
                    let since = self.renewed.borrow().sent_at.elapsed();
                    tracing::error!(holder = what, lease = format!("{:x}", state.lease), since_renewed = ?since,
                        "the lease is gone, and everything bound to it; granting a new one and registering again");
                    let (lease, sent_at) = regrant(&self.store, self.ttl, what, &self.register).await;
                    state = LeaseState { lease, generation: state.generation + 1 };
                    renewer.set_lease(lease);
                    self.renewed.send_replace(Renewed { sent_at, lease });
                    retry.reset();
                    wait = self.period;
                    tracing::warn!(holder = what, lease = format!("{lease:x}"), "registered again under a new lease");
                    if self.state.send(state).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    wait = retry.next();
                    let since = self.renewed.borrow().sent_at.elapsed();
                    tracing::warn!(holder = what, error = %e, since_renewed = ?since, retry_in = ?wait,
                        "lease keep-alive failed; will retry");
                }
            }
        }
    }
}

/// Doubling pauses up to a ceiling, each drawn uniformly from its upper half: holders cut off from etcd
/// together (a partition, an etcd restart) spread their retries instead of arriving in one burst.
struct Jittered {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Jittered {
    fn new(first: Duration, max: Duration) -> Self {
        Jittered { first, next: first, max }
    }

    fn reset(&mut self) {
        self.next = self.first;
    }

    fn next(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(rand::random_range(ms / 2..=ms.max(1)))
    }
}

/// Grants a new lease and registers under it, retrying (with jittered backoff, a log line each) until both
/// succeed. Returns the lease and when the grant that made it was sent (the new lease's first "renewal").
async fn regrant(store: &Store, ttl: Duration, what: &str, register: &Register) -> (i64, Instant) {
    let mut backoff = Jittered::new(Duration::from_millis(100), MAX_REGRANT_BACKOFF);
    loop {
        let sent_at = Instant::now();
        let attempt = async {
            let lease = store.grant_lease(ttl.as_secs() as i64).await?;
            if let Err(e) = register(store.clone(), lease).await {
                let _ = store.client().lease_client().revoke(lease).await;
                return Err(e);
            }
            Ok::<i64, Error>(lease)
        };
        let e = match attempt.await {
            Ok(lease) => return (lease, sent_at),
            Err(e) => e,
        };
        let wait = backoff.next();
        tracing::warn!(holder = what, error = %e, retry_in = ?wait, "registering under a new lease failed");
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_with_jitter_up_to_the_ceiling_and_start_over_after_a_success() {
        let mut j = Jittered::new(Duration::from_millis(100), Duration::from_millis(400));
        let waits: Vec<Duration> = (0..5).map(|_| j.next()).collect();
        for (w, ceiling) in waits.iter().zip([100, 200, 400, 400, 400]) {
            assert!(*w >= Duration::from_millis(ceiling / 2) && *w <= Duration::from_millis(ceiling), "{waits:?}");
        }
        j.reset();
        assert!(j.next() <= Duration::from_millis(100));
    }

    #[test]
    fn the_granted_ttl_is_whole_seconds_and_at_least_two() {
        assert_eq!(granted_ttl(Duration::from_millis(500)), Duration::from_secs(2));
        assert_eq!(granted_ttl(Duration::from_millis(3900)), Duration::from_secs(3));
        assert_eq!(granted_ttl(Duration::from_secs(15)), Duration::from_secs(15));
    }
}
