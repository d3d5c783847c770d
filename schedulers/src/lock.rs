//! The pessimistic baseline (`--lock`): one etcd lock held around every attempt.
//!
//! The Omega paper sets optimistic shared-state scheduling beside pessimistic concurrency control, where a
//! scheduler holds the cell for the length of its decision, so decisions never overlap and never conflict; the
//! price is that schedulers queue for each other. With `--lock`, each attempt (the decision-time sleep and every
//! decide/commit round) runs while holding one lock shared by every `--lock` scheduler of the cell. The wait for
//! it is queueing, counted on its own (`lock_wait_ms`), not as busyness.
//!
//! - The lock is etcd's lock API: each holder or waiter is a key `<prefix>locks/<name>/<lease>` bound to the
//!   instance's own lease, granted in the order the keys were created. A holder that dies frees it when its
//!   lease lapses; one that shuts down revokes its lease, which frees it at once.
//! - Being granted the lock is not enough: the decision must see every commit made before the grant, or it
//!   would decide on an older cell and conflict anyway. The lock key lies outside the cache's range (`cell/`),
//!   so the cache's revision passes the grant's only once something in the cell changes afterwards, which under
//!   the lock may be never. Instead, every commit writes its node's ledger in its own transaction, so the newest
//!   ledger revision read after the grant bounds every commit made before it, and the attempt waits for the
//!   cache to reach that ([`Held::settled`]). The read is one range over the ledgers (one key per node) sorted
//!   by revision, skipped when the cache has already passed the grant. (A requested watch progress notification
//!   would say the same more cheaply, but etcd 3.4 may send it ahead of events still queued for the watch.)
//! - A lock that cannot be taken (etcd unreachable, the lease just lost) is logged and tried again; a release
//!   that fails is retried until etcd confirms it or the lease it was held under is gone.

use etcd_client::{GetOptions, LockOptions, SortOrder, SortTarget};
use omega::keys::prefix_end;
use omega::store::Store;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a long wait for the lock says so in the log.
const LOG_WAIT_EVERY: Duration = Duration::from_secs(10);
/// The longest pause between tries after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The lease the instance holds now (it changes when a lost lease is replaced).
pub type LeaseFn = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Why one try at the lock failed; the caller logs it and tries again.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("taking the lock {name}: {source}")]
    Take { name: String, source: etcd_client::Error },
    #[error("reading the newest ledger revision after taking the lock: {0}")]
    Settle(etcd_client::Error),
    #[error("etcd granted the lock {name} without a response header")]
    NoHeader { name: String },
}

/// The cell lock of one scheduler instance: which lock, on which store, under which lease.
#[derive(Clone)]
pub struct CellLock {
    store: Store,
    /// The lock's etcd name, `<prefix>locks/<name>`.
    name: String,
    lease: LeaseFn,
}

/// A granted lock: what releases it, and the revision the cache must reach before deciding under it.
#[derive(Debug)]
pub struct Held {
    /// The holder's key (`<name>/<lease>`), which releasing deletes.
    key: Vec<u8>,
    /// The lease it was granted under: once that is gone, so is the key.
    lease: i64,
    /// The cache at this revision has seen every commit made before the grant.
    pub settled: i64,
}

impl CellLock {
    pub fn new(store: Store, name: &str, lease: LeaseFn) -> Self {
        let name = store.keys().lock(name);
        CellLock { store, name, lease }
    }

    /// The lock's etcd name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes the lock, trying again (a log line each time) until it is granted; `cached` reads the cache's
    /// revision. Cancel it by dropping it: etcd deletes the waiting key of a cancelled request, and the lease
    /// covers the rest.
    pub async fn acquire(&self, cached: impl Fn() -> i64) -> Guard {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_acquire(&cached).await {
                Ok(held) => return Guard { lock: self.clone(), held: Some(held) },
                Err(e) => {
                    tracing::warn!(lock = self.name, error = %e, retry_in = ?backoff, "could not take the cell lock; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn try_acquire(&self, cached: &impl Fn() -> i64) -> Result<Held, LockError> {
        let lease = (self.lease)();
        // A lock request waits for as long as the holders before it hold: the stream client, which has no
        // request deadline.
        let mut client = self.store.stream_client().lock_client();
        let request = client.lock(self.name.as_str(), Some(LockOptions::new().with_lease(lease)));
        tokio::pin!(request);
        let started = Instant::now();
        let granted = loop {
            tokio::select! {
                r = &mut request => break r.map_err(|source| LockError::Take { name: self.name.clone(), source })?,
                _ = tokio::time::sleep(LOG_WAIT_EVERY) => {
                    tracing::info!(lock = self.name, waited = ?started.elapsed(), "still waiting for the cell lock");
                }
            }
        };
        let revision =
            granted.header().map(|h| h.revision()).ok_or_else(|| LockError::NoHeader { name: self.name.clone() })?;
        let held = Held { key: granted.key().to_vec(), lease, settled: revision };
        if cached() >= revision {
            return Ok(held);
        }
        match self.newest_ledger_revision().await {
            Ok(settled) => Ok(Held { settled, ..held }),
            Err(e) => {
                // Not left holding a lock this attempt will not use.
                self.release(held).await;
                Err(e)
            }
        }
    }

    /// The highest mod_revision of any node ledger now: every claim (and release) writes its node's ledger in
    /// its own transaction, so a cache at this revision has seen every commit made before this read.
    async fn newest_ledger_revision(&self) -> Result<i64, LockError> {
        let ledgers = self.store.keys().alloc("");
        let newest = GetOptions::new()
            .with_range(prefix_end(ledgers.as_bytes()))
            .with_sort(SortTarget::Mod, SortOrder::Descend)
            .with_limit(1)
            .with_keys_only();
        let resp = self.store.client().kv_client().get(ledgers, Some(newest)).await.map_err(LockError::Settle)?;
        Ok(resp.kvs().first().map(|kv| kv.mod_revision()).unwrap_or(0))
    }

    /// Releases `held`: retried while etcd does not answer, until it confirms or the lease the lock was held
    /// under is gone (replaced after it lapsed; the key went with it).
    async fn release(&self, held: Held) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.store.client().lock_client().unlock(held.key.clone()).await {
                Ok(_) => return,
                Err(e) if (self.lease)() != held.lease => {
                    tracing::debug!(lock = self.name, error = %e, "the lease the lock was held under is gone, and the lock with it");
                    return;
                }
                Err(e) => {
                    tracing::warn!(lock = self.name, error = %e, retry_in = ?backoff, "releasing the cell lock failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// The lock while an attempt holds it. [`Guard::release`] gives it back; a guard dropped still holding it (the
/// attempt cancelled at shutdown) releases it from a task of its own, and the instance's lease, revoked at
/// shutdown, frees it in any case.
pub struct Guard {
    lock: CellLock,
    held: Option<Held>,
}

impl Guard {
    /// The revision the cache must reach before a decision under this lock.
    pub fn settled(&self) -> i64 {
        self.held.as_ref().map(|h| h.settled).unwrap_or(0)
    }

    pub async fn release(mut self) {
        if let Some(held) = self.held.take() {
            self.lock.release(held).await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else { return };
        let lock = self.lock.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move { lock.release(held).await })),
            Err(_) => tracing::debug!(lock = lock.name, "no runtime to release the lock from; its lease frees it"),
        }
    }
}
