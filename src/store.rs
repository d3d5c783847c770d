//! etcd access shared by every component: connecting (with retries a person can follow in the log),
//! paginated revision-pinned range reads, and the few plain writes that are not claims (registering a node,
//! creating a job with its pending tasks).

use crate::error::{Error, Result};
use crate::keys::{self, prefix_end, Keys};
use crate::model::{now_ms, Allocation, Job, JobState, Liveness, Node};
use crate::space::Space;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod orphans;
pub mod submission;
pub mod versions;
pub use orphans::OrphanTasks;
pub use submission::SubmitError;

/// Large enough for a page of big allocation records; etcd's own reply limit is far above this.
pub const MAX_DECODING_BYTES: usize = 64 << 20;

/// Keys per page in a range scan: large pages cost fewer round trips; small ones keep each reply well under
/// the gRPC limit and the server's per-request memory low.
pub const DEFAULT_PAGE_SIZE: i64 = 2000;

/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

/// How a [`Store`] talks to etcd.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Deadline of every unary request (reads, writes, transactions, lease grants). A hung member then costs a
    /// caller this long, not the HTTP/2 keep-alive's detection time; the caller retries or reports.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive (ping interval, answer timeout): how a silent connection is found dead, for streams
    /// (watches, lease keep-alives) that have no deadline of their own.
    pub keep_alive: (Duration, Duration),
    /// The server's `--max-txn-ops`, as far as this process knows (lowered if the server refuses a batch).
    pub max_txn_ops: usize,
    /// Budget for one request's keys and values (etcd's default `--max-request-bytes` is 1.5 MiB).
    pub max_request_bytes: usize,
    /// TLS to etcd (https endpoints); `None`: plain text.
    pub tls: Option<crate::tls::TlsFiles>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            keep_alive: (Duration::from_secs(10), Duration::from_secs(5)),
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            tls: None,
        }
    }
}

impl StoreOptions {
    /// The defaults, with TLS when `tls` is given.
    pub fn with_tls(tls: Option<crate::tls::TlsFiles>) -> Self {
        StoreOptions { tls, ..StoreOptions::default() }
    }
}

/// etcd's default `--max-request-bytes`, less room for the request's framing.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = (3 << 19) - (64 << 10);

/// The smallest op limit worth working with: one node's sub-transaction with one claim in an outer transaction.
pub const MIN_TXN_OPS: usize = 8;

/// What one etcd server accepts in a transaction, shared by every user of a [`Store`] (and its clones), so
/// a limit learned from one refusal holds for all of them.
#[derive(Debug)]
pub struct TxnLimits {
    max_ops: AtomicUsize,
    max_request_bytes: usize,
}

impl TxnLimits {
    pub fn max_ops(&self) -> usize {
        self.max_ops.load(Ordering::Relaxed)
    }

    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    /// Halves the op limit after the server refused a batch as too large. Returns false if the limit is
    /// already at its floor (a server this small cannot take even one node's claims).
    pub fn shrink(&self, why: &Error) -> bool {
        let now = self.max_ops();
        if now <= MIN_TXN_OPS {
            return false;
        }
        let lower = (now / 2).max(MIN_TXN_OPS);
        // Several senders may learn the same refusal at once: lower only from the value each saw.
        if self.max_ops.compare_exchange(now, lower, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(from = now, to = lower, error = %why, "etcd refused a batch; lowering the op limit and re-sending");
        }
        true
    }
}

/// A connected etcd client plus the key layout.
#[derive(Clone)]
pub struct Store {
    /// Unary requests, each with the deadline of [`StoreOptions::request_timeout`].
    client: Client,
    /// Streams and long polls (watches, lease keep-alives, election campaigns), which a per-request
    /// deadline would cut.
    stream_client: Client,
    keys: Keys,
    endpoints: Vec<String>,
    limits: Arc<TxnLimits>,
    space: Arc<Space>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("endpoints", &self.endpoints).field("prefix", &self.keys.prefix()).finish()
    }
}

fn connect_options(options: &StoreOptions) -> Result<ConnectOptions> {
    let mut o = ConnectOptions::new()
        .with_connect_timeout(options.connect_timeout)
        .with_keep_alive(options.keep_alive.0, options.keep_alive.1)
        .with_keep_alive_while_idle(true);
    if let Some(tls) = &options.tls {
        o = o.with_tls(tls.load()?);
    }
    Ok(o)
}

impl Store {
    /// Connects once; fails with [`Error::Unreachable`] if etcd does not answer a status request in time.
    pub async fn connect(endpoints: &[String], keys: Keys) -> Result<Store> {
        Self::connect_with_retry(endpoints, keys, Duration::ZERO).await
    }

    /// Connects, retrying with backoff (and a log line per attempt) for up to `max_wait`. Components that
    /// start before etcd, or beside an etcd that is restarting, use this rather than failing at once.
    pub async fn connect_with_retry(endpoints: &[String], keys: Keys, max_wait: Duration) -> Result<Store> {
        Self::connect_with(endpoints, keys, StoreOptions::default(), max_wait).await
    }

    /// [`connect_with_retry`](Self::connect_with_retry) with explicit options.
    pub async fn connect_with(
        endpoints: &[String],
        keys: Keys,
        options: StoreOptions,
        max_wait: Duration,
    ) -> Result<Store> {
        if endpoints.is_empty() {
            return Err(Error::InvalidArgument("no etcd endpoint given".into()));
        }
        for e in endpoints {
            check_endpoint(e)?;
            if options.tls.is_some() && !e.starts_with("https://") {
                return Err(Error::Tls(format!("endpoint {e} is not https:// but --cacert was given")));
            }
            if options.tls.is_none() && e.starts_with("https://") {
                return Err(Error::Tls(format!(
                    "endpoint {e} is https:// but no --cacert was given (the CA that signed etcd's certificate; \
                     also --cert and --key when etcd requires client certificates)"
                )));
            }
        }
        // A file that is missing or wrong is said before anything is tried; the files are read once.
        let connect = connect_options(&options)?;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0u32;
        let mut refusals = 0u32;
        loop {
            attempt += 1;
            let last_error = match Self::try_connect(endpoints, &options, &connect).await {
                Ok((client, stream_client)) => {
                    if attempt > 1 {
                        tracing::info!(endpoints = ?endpoints, attempt, "connected to etcd");
                    }
                    let limits = TxnLimits {
                        max_ops: AtomicUsize::new(options.max_txn_ops.max(MIN_TXN_OPS)),
                        max_request_bytes: options.max_request_bytes,
                    };
                    return Ok(Store {
                        client,
                        stream_client,
                        keys,
                        endpoints: endpoints.to_vec(),
                        limits: Arc::new(limits),
                        space: Arc::new(Space::new(endpoints)),
                    });
                }
                Err(e) => {
                    // A refused handshake does not get better by retrying: say what it means. Twice in a row,
                    // or when there is no time to try again: a connection closed by a restarting server
                    // can look like a refusal once.
                    let text = format!("{e:?}");
                    if let Some(why) = crate::tls::explain(options.tls.as_ref(), &text) {
                        refusals += 1;
                        if refusals >= 2 || started.elapsed() + backoff > max_wait {
                            return Err(Error::Tls(why));
                        }
                    } else {
                        refusals = 0;
                    }
                    e.to_string()
                }
            };
            let waited = started.elapsed();
            if waited + backoff > max_wait {
                return Err(Error::Unreachable { endpoints: endpoints.join(","), waited, last_error });
            }
            tracing::warn!(endpoints = ?endpoints, attempt, error = %last_error, retry_in = ?backoff,
                "etcd not reachable yet");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn try_connect(
        endpoints: &[String],
        options: &StoreOptions,
        connect: &ConnectOptions,
    ) -> Result<(Client, Client)> {
        let mut client =
            Client::connect(endpoints, Some(connect.clone().with_timeout(options.request_timeout))).await?;
        // Connecting is lazy; a status call proves someone answers.
        let wait = options.connect_timeout;
        tokio::time::timeout(wait, client.status()).await.map_err(|_| Error::Timeout(wait, "etcd status".into()))??;
        let stream_client = Client::connect(endpoints, Some(connect.clone())).await?;
        Ok((client, stream_client))
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A handle on the client for unary requests (cheap: it shares one channel). Every request carries the
    /// store's deadline.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A handle on the client for streams and long polls (watch, lease keep-alive, campaign): no deadline.
    pub fn stream_client(&self) -> Client {
        self.stream_client.clone()
    }

    /// What the server accepts in one transaction, as far as this process knows.
    pub fn limits(&self) -> &TxnLimits {
        &self.limits
    }

    /// What this process knows about etcd's space quota (shared with every clone).
    pub fn space(&self) -> &Space {
        &self.space
    }

    /// Tells the store the server's `--max-txn-ops` (shared with every clone).
    pub fn set_max_txn_ops(&self, max_txn_ops: usize) {
        self.limits.max_ops.store(max_txn_ops.max(MIN_TXN_OPS), Ordering::Relaxed);
    }

    /// The store's current revision.
    pub async fn revision(&self) -> Result<i64> {
        // One key under the prefix that every component's etcd role may read: with authentication on, a read
        // outside the cell's prefix is refused.
        let resp =
            self.client.kv_client().get(self.keys.space_check(), Some(GetOptions::new().with_count_only())).await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// How many keys are under `prefix`, counted by etcd (nothing is sent back but the count).
    pub async fn count(&self, prefix: &str) -> Result<i64> {
        let resp = self.client.kv_client().get(prefix, Some(GetOptions::new().with_prefix().with_count_only())).await?;
        Ok(resp.count())
    }

    /// Every key under `prefix` at one revision, read in pages of `page_size`.
    ///
    /// With `revision == None` the first page fixes the revision and later pages are pinned to it, so the
    /// result is one consistent cut even while others write. Returns the kvs and that revision.
    pub async fn list(&self, prefix: &str, page_size: i64, revision: Option<i64>) -> Result<(Vec<KeyValue>, i64)> {
        let mut kv = self.client.kv_client().max_decoding_message_size(MAX_DECODING_BYTES);
        let end = prefix_end(prefix.as_bytes());
        let mut start = prefix.as_bytes().to_vec();
        let mut pinned = revision;
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page_size.max(1));
            if let Some(rev) = pinned {
                opts = opts.with_revision(rev);
            }
            let mut resp = kv.get(start.clone(), Some(opts)).await?;
            let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
            let pinned_rev = *pinned.get_or_insert(rev);
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else {
                return Ok((out, pinned_rev));
            };
            // The next page starts just after the last key of this one.
            start = last.key().to_vec();
            start.push(0);
            out.extend(kvs);
            if !more {
                return Ok((out, pinned_rev));
            }
        }
    }

    /// Reads and decodes one key; `None` when absent. Also returns its mod_revision.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>> {
        let resp = self.client.kv_client().get(key, None).await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some((decode(kv)?, kv.mod_revision()))),
        }
    }

    /// Registers (or re-registers) a node: writes its record and makes sure its ledger exists with the
    /// node's current capacity. A ledger that already holds claims is kept; only its capacity follows the
    /// node. Returns the revision of the write.
    pub async fn register_node(&self, node: &Node) -> Result<i64> {
        keys::validate_name("node", &node.name)?;
        let node_key = self.keys.node(&node.name);
        let alloc_key = self.keys.alloc(&node.name);
        let node_json = encode(&node_key, node)?;
        let mut kv = self.client.kv_client();
        // Compare-and-swap on the ledger so a concurrent claim is never overwritten.
        for _ in 0..16 {
            let existing: Option<(Allocation, i64)> = self.get_json(&alloc_key).await?;
            let (ledger, cmp) = match existing {
                Some((mut a, rev)) => {
                    if a.capacity == node.capacity {
                        let resp = kv.put(node_key.as_str(), node_json.clone(), None).await?;
                        return Ok(resp.header().map(|h| h.revision()).unwrap_or(0));
                    }
                    a.capacity = node.capacity;
                    (a, Compare::mod_revision(alloc_key.as_str(), CompareOp::Equal, rev))
                }
                None => (
                    Allocation::empty(&node.name, node.capacity),
                    Compare::create_revision(alloc_key.as_str(), CompareOp::Equal, 0),
                ),
            };
            let txn = Txn::new().when([cmp]).and_then([
                TxnOp::put(node_key.as_str(), node_json.clone(), None),
                TxnOp::put(alloc_key.as_str(), encode(&alloc_key, &ledger)?, None),
            ]);
            let resp = kv.txn(txn).await?;
            if resp.succeeded() {
                return Ok(resp.header().map(|h| h.revision()).unwrap_or(0));
            }
        }
        Err(Error::InvalidArgument(format!("node {} ledger kept changing while registering", node.name)))
    }

    /// Moves a job to `state` if its record is still the one at `mod_revision` (compare-and-swap). Returns the
    /// new revision, or `None` if someone wrote the job meanwhile (read it again and decide again).
    pub async fn set_job_state(&self, job: &Job, mod_revision: i64, state: JobState) -> Result<Option<i64>> {
        self.set_job_state_if(job, mod_revision, state, None).await
    }

    /// [`set_job_state`](Self::set_job_state), also requiring `extra` to hold (a leader's fence).
    pub async fn set_job_state_if(
        &self,
        job: &Job,
        mod_revision: i64,
        state: JobState,
        extra: Option<Compare>,
    ) -> Result<Option<i64>> {
        let key = self.keys.job(&job.id);
        let mut updated = job.clone();
        updated.state = state;
        if state.is_final() && updated.finished_at_ms.is_none() {
            updated.finished_at_ms = Some(now_ms());
        }
        let mut compares = vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, mod_revision)];
        compares.extend(extra);
        let txn = Txn::new().when(compares).and_then([TxnOp::put(key.as_str(), encode(&key, &updated)?, None)]);
        let resp = self.txn_adding_data(txn).await?;
        Ok(resp.succeeded().then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
    }

    /// Writes a job record compared on the `mod_revision` it was read at (and `extra`, a leader's fence).
    /// `None`: it changed since.
    pub async fn put_job_if(&self, job: &Job, mod_revision: i64, extra: Option<Compare>) -> Result<Option<i64>> {
        let key = self.keys.job(&job.id);
        let mut compares = vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, mod_revision)];
        compares.extend(extra);
        let txn = Txn::new().when(compares).and_then([TxnOp::put(key.as_str(), encode(&key, job)?, None)]);
        let resp = self.txn_adding_data(txn).await?;
        Ok(resp.succeeded().then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
    }

    /// Sends a transaction that adds data (a put at its top level), waiting its turn while etcd is out of
    /// space: [`Error::NoSpace`] without a round trip while it stays full (see [`crate::space`]).
    pub async fn txn_adding_data(&self, txn: Txn) -> Result<etcd_client::TxnResponse> {
        let _probe = self.space.admit().await?;
        let result = self.client.kv_client().txn(txn).await.map_err(Error::from);
        self.space.observe(&result);
        result
    }

    /// Grants a lease of `ttl_secs`; its holder must keep it alive or every key bound to it goes.
    pub async fn grant_lease(&self, ttl_secs: i64) -> Result<i64> {
        Ok(self.client.lease_client().grant(ttl_secs, None).await?.id())
    }

    /// Writes a node's liveness key bound to `lease`. Claims are only committed on nodes whose liveness key
    /// exists, so a node whose lease lapsed receives no new work.
    pub async fn put_liveness(&self, node: &str, lease: i64) -> Result<i64> {
        let key = self.keys.live(node);
        let value = Liveness { node: node.to_string(), lease: format!("{lease:x}"), since_ms: now_ms() };
        let resp = self
            .client
            .kv_client()
            .put(key.as_str(), encode(&key, &value)?, Some(PutOptions::new().with_lease(lease)))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Writes a new job and its pending tasks so that no reader ever sees the job without all of them.
    /// Fails with [`Error::AlreadyExists`] if the id is taken. See [`submission`] for how, and
    /// [`Store::submit_job`] for what a failed submission left behind.
    pub async fn create_job(&self, job: &Job, max_txn_ops: usize) -> Result<i64> {
        self.submit_job(job, max_txn_ops).await.map_err(|e| e.error)
    }
}

/// Checks an endpoint's form before connecting: a malformed URL is the caller's mistake, said at once, not
/// a reason to retry for minutes.
pub fn check_endpoint(endpoint: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "etcd endpoint {endpoint:?} {why}; expected a URL such as http://127.0.0.1:2379"
        )))
    };
    let rest = match endpoint.split_once("://") {
        Some(("http" | "https", rest)) => rest,
        Some((scheme, _)) => return bad(&format!("has the scheme {scheme:?}, not http or https")),
        None => endpoint,
    };
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return bad("names no host");
    }
    if authority.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains whitespace");
    }
    let port = match authority.strip_prefix('[') {
        // An IPv6 literal: `[::1]:2379`.
        Some(v6) => match v6.split_once(']') {
            Some((_, after)) => after.strip_prefix(':'),
            None => return bad("has an unclosed '['"),
        },
        None => authority.rsplit_once(':').map(|(_, port)| port),
    };
    if let Some(port) = port {
        if port.parse::<u16>().is_err() {
            return bad(&format!("has the port {port:?}, not a number from 0 to 65535"));
        }
    }
    Ok(())
}

/// Decodes a JSON value, naming the key on failure.
pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(kv.value())
        .map_err(|source| Error::Decode { key: String::from_utf8_lossy(kv.key()).into_owned(), source })
}

/// Encodes a value as JSON, naming the key on failure.
pub fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| Error::Encode { key: key.to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::check_endpoint;

    #[test]
    fn endpoints_are_checked_before_connecting() {
        for ok in [
            "http://127.0.0.1:2379",
            "https://etcd-1.example:2379",
            "127.0.0.1:2379",
            "http://[::1]:2379",
            "http://etcd",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in ["http://", "ftp://x:1", "http://x:99999", "http://x:port", "http://a b:1", "http://[::1:2379"] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
