//! A watch over one key range that never silently loses an event.
//!
//! etcd-client does not resume a broken watch, so this does: it lists the range at one revision, watches from
//! the next one, and after any stream error or end re-watches from `last seen + 1`. If that revision has been
//! compacted away, etcd cancels the watch with a compact revision; the watcher then re-lists and tells its
//! consumer to rebuild ([`WatchEvent::Reset`]). The consumer (the cell-state cache, an agent) sees a sequence
//! of resets and change batches and never has to reason about connections.
//!
//! [`Watcher::next`] is cancel-safe: the listing and the stream live in a background task that hands events
//! over a channel, so a consumer may race `next()` against a timer or a shutdown signal in `tokio::select!`
//! as often as it likes without losing its stream or restarting a listing. (An earlier version kept the
//! stream in `next()`'s own state; every cancelled call dropped the watch and re-listed, and a host racing
//! it against a 100 ms tick re-listed its whole range ten times a second.)

use crate::keys::prefix_end;
use crate::store::{Store, MAX_DECODING_BYTES};
use etcd_client::{EventType, KeyValue, WatchOptions, WatchStream};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Events produced ahead of the consumer. Small: a slow consumer holds the producer back (and etcd's stream
/// with it, through gRPC flow control) rather than buffering without bound.
const CHANNEL_EVENTS: usize = 16;

/// What a [`Watcher`] yields.
#[derive(Debug)]
pub enum WatchEvent {
    /// The full content of the range at `revision`: replace whatever was known before.
    Reset { kvs: Vec<KeyValue>, revision: i64 },
    /// Changes in revision order; after applying them the consumer is consistent at `revision`.
    Changes { changes: Vec<Change>, revision: i64 },
    /// Nothing changed in the range up to `revision` (a progress notification).
    Progress { revision: i64 },
}

/// One change to one key.
#[derive(Debug)]
pub enum Change {
    Put(KeyValue),
    /// A delete; `prev` holds the key's last value only if the watcher asked for it
    /// ([`Watcher::with_prev_kv`]).
    Delete {
        key: Vec<u8>,
        mod_revision: i64,
        prev: Option<KeyValue>,
    },
}

/// Counters a caller can show (how often the watch broke, how often it had to rebuild).
#[derive(Clone, Copy, Debug, Default)]
pub struct WatcherStats {
    pub lists: u64,
    pub rewatches: u64,
    pub compactions_seen: u64,
}

enum State {
    NeedList,
    NeedWatch { from: i64 },
    Watching { stream: Box<WatchStream>, from: i64 },
}

/// A resumable list-then-watch over `prefix`. It starts working at the first [`next`](Self::next) and stops
/// when dropped.
pub struct Watcher {
    inner: Option<Inner>,
    stats: Arc<Mutex<WatcherStats>>,
    events: Option<mpsc::Receiver<WatchEvent>>,
    task: Option<JoinHandle<()>>,
}

/// The list/watch state machine; runs in the watcher's background task.
struct Inner {
    store: Store,
    prefix: String,
    page_size: i64,
    prev_kv: bool,
    state: State,
    backoff: Duration,
    stats: Arc<Mutex<WatcherStats>>,
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Watcher {
    pub fn new(store: Store, prefix: impl Into<String>, page_size: i64) -> Self {
        let stats = Arc::new(Mutex::new(WatcherStats::default()));
        let inner = Inner {
            store,
            prefix: prefix.into(),
            page_size,
            prev_kv: false,
            state: State::NeedList,
            backoff: MIN_BACKOFF,
            stats: stats.clone(),
        };
        Watcher { inner: Some(inner), stats, events: None, task: None }
    }

    /// Asks etcd for each deleted key's last value ([`Change::Delete::prev`]).
    ///
    /// Off by default because it is not free: etcd 3.4 reads the previous value of every event it sends, and
    /// with one such watcher on the cell range etcd's ceiling for claims fell from about 30k to 13-15k per
    /// second on a 2-core machine (benches/commit_throughput/, `OMEGA_BENCH_RAW_WATCH=prev_kv`). A consumer
    /// that only needs to know *which* key went away gets that from the key itself.
    pub fn with_prev_kv(mut self, prev_kv: bool) -> Self {
        if let Some(inner) = self.inner.as_mut() {
            inner.prev_kv = prev_kv;
        }
        self
    }

    /// Starts from `revision` instead of listing first (the caller already holds the state at
    /// `revision - 1`). Falls back to a list if that revision is compacted.
    pub fn resume_from(mut self, revision: i64) -> Self {
        if let Some(inner) = self.inner.as_mut() {
            inner.state = State::NeedWatch { from: revision };
        }
        self
    }

    pub fn stats(&self) -> WatcherStats {
        *self.stats.lock()
    }

    /// The next event. Retries etcd failures forever (with backoff and a log line each), so it only returns
    /// something to apply. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> WatchEvent {
        if let Some(mut inner) = self.inner.take() {
            let (tx, rx) = mpsc::channel(CHANNEL_EVENTS);
            self.events = Some(rx);
            self.task = Some(tokio::spawn(async move {
                loop {
                    let event = inner.next_event().await;
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }));
        }
        match self.events.as_mut() {
            Some(rx) => match rx.recv().await {
                Some(event) => event,
                // The task ends only when the receiver is gone, which it is not while we hold it.
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Inner {
    async fn pause(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// The next event (not cancel-safe: it moves its state out while it awaits; only the background task
    /// calls it).
    async fn next_event(&mut self) -> WatchEvent {
        loop {
            match std::mem::replace(&mut self.state, State::NeedList) {
                State::NeedList => match self.store.list(&self.prefix, self.page_size, None).await {
                    Ok((kvs, revision)) => {
                        self.stats.lock().lists += 1;
                        self.backoff = MIN_BACKOFF;
                        self.state = State::NeedWatch { from: revision + 1 };
                        return WatchEvent::Reset { kvs, revision };
                    }
                    Err(e) => {
                        tracing::warn!(prefix = %self.prefix, error = %e, "list failed; retrying");
                        self.state = State::NeedList;
                        self.pause().await;
                    }
                },
                State::NeedWatch { from } => {
                    let mut opts = WatchOptions::new()
                        .with_range(prefix_end(self.prefix.as_bytes()))
                        .with_start_revision(from)
                        .with_progress_notify();
                    if self.prev_kv {
                        opts = opts.with_prev_key();
                    }
                    let mut client =
                        self.store.stream_client().watch_client().max_decoding_message_size(MAX_DECODING_BYTES);
                    match client.watch(self.prefix.as_str(), Some(opts)).await {
                        Ok(stream) => {
                            self.stats.lock().rewatches += 1;
                            self.state = State::Watching { stream: Box::new(stream), from };
                        }
                        Err(e) => {
                            tracing::warn!(prefix = %self.prefix, from, error = %e, "watch failed; retrying");
                            self.state = State::NeedWatch { from };
                            self.pause().await;
                        }
                    }
                }
                State::Watching { mut stream, from } => match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            if resp.compact_revision() > 0 {
                                self.stats.lock().compactions_seen += 1;
                                tracing::info!(prefix = %self.prefix, from, compacted = resp.compact_revision(),
                                    "watch start revision was compacted; re-listing");
                                self.state = State::NeedList;
                            } else {
                                tracing::warn!(prefix = %self.prefix, reason = resp.cancel_reason(),
                                    "watch canceled by server; re-watching");
                                self.state = State::NeedWatch { from };
                                self.pause().await;
                            }
                            continue;
                        }
                        self.backoff = MIN_BACKOFF;
                        let events = resp.events();
                        if events.is_empty() {
                            // A creation notice or a progress notification. Only the latter says something
                            // about revisions: the watch has delivered everything up to the header revision.
                            let header_rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                            if !resp.created() && header_rev >= from {
                                self.state = State::Watching { stream, from: header_rev + 1 };
                                return WatchEvent::Progress { revision: header_rev };
                            }
                            self.state = State::Watching { stream, from };
                            continue;
                        }
                        let mut changes = Vec::with_capacity(events.len());
                        let mut revision = from - 1;
                        for ev in events {
                            let Some(kv) = ev.kv() else { continue };
                            revision = revision.max(kv.mod_revision());
                            match ev.event_type() {
                                EventType::Put => changes.push(Change::Put(kv.clone())),
                                EventType::Delete => changes.push(Change::Delete {
                                    key: kv.key().to_vec(),
                                    mod_revision: kv.mod_revision(),
                                    prev: ev.prev_kv().cloned(),
                                }),
                            }
                        }
                        // Resume after the last revision delivered, never before: no event is seen twice.
                        self.state = State::Watching { stream, from: revision + 1 };
                        return WatchEvent::Changes { changes, revision };
                    }
                    Ok(None) => {
                        tracing::warn!(prefix = %self.prefix, from, "watch stream ended; re-watching");
                        self.state = State::NeedWatch { from };
                        self.pause().await;
                    }
                    Err(e) => {
                        tracing::warn!(prefix = %self.prefix, from, error = %e, "watch stream broke; re-watching");
                        self.state = State::NeedWatch { from };
                        self.pause().await;
                    }
                },
            }
        }
    }
}
