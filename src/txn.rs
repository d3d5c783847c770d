//! The transaction layer: guarded groups of writes, packed into as few etcd round trips as the server takes.
//!
//! Everything that changes shared cell state (claims, releases, task updates) is a set of [`Group`]s: compares
//! that must hold, writes applied if they do, and reads that return the fresh state if they do not. A group is
//! one node's part of a commit, one task's state change, one node's releases. [`Sender::nested`] puts many
//! groups into one outer transaction as etcd nested sub-transactions, so each group succeeds or fails on its own
//! while they share one round trip; [`Sender::flat`] puts one group's compares into a single flat transaction,
//! all or nothing (gangs).
//!
//! Limits live here and nowhere else: the server's `--max-txn-ops` (which etcd 3.4 applies to the outer
//! transaction and, with the outer transaction's ops subtracted, to each nested one), the request-size budget,
//! and what to do when the server refuses a batch as too large (lower the shared limit, re-pack, re-send). The
//! number of transactions in flight is bounded per sender, so one busy component cannot starve lease renewals.
//!
//! etcd's space quota lives here too. etcd 3.4 prices a transaction for its quota by the puts at its top level
//! (the larger of the success and failure branches); puts inside nested sub-transactions cost nothing, so a
//! transaction of nested claims would pass the quota check and be applied even while etcd's NOSPACE alarm is
//! raised. Every outer transaction holding puts therefore carries one put at its top level: in the failure
//! branch of a nested transaction (with no fence it never runs; with a fence it runs only when the fence
//! fails, writing the empty `space-check` key), and in the success branch of a flat one whose writes had to
//! be nested. While etcd is full, writes wait their turn in [`crate::space::Space`].

use crate::backpressure::{Signal, Window};
use crate::error::{Error, Result};
use crate::store::Store;
use etcd_client::{Compare, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse};
use futures_util::future::join_all;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a compare costs in the request beside its key (revision, target, result).
const COMPARE_OVERHEAD: usize = 24;
/// What any op costs in the request beside its key and value.
const OP_OVERHEAD: usize = 16;

/// Compares, the writes they guard, and the reads that tell why they failed.
///
/// Sending consumes a group (its keys and values move into the request, never copied): a caller that may
/// have to send again builds the group again, which it can do better anyway, from what it has learned.
#[derive(Default)]
pub struct Group {
    compares: Vec<Compare>,
    writes: Vec<TxnOp>,
    reads: Vec<TxnOp>,
    bytes: usize,
    /// The index in `writes` of its first put (a delete adds nothing for etcd's quota).
    first_put: Option<usize>,
}

impl Group {
    pub fn new() -> Self {
        Group::default()
    }

    /// Adds a compare on `key` (the key's length counts toward the request size).
    pub fn compare(&mut self, key: &str, compare: Compare) -> &mut Self {
        self.bytes += key.len() + COMPARE_OVERHEAD;
        self.compares.push(compare);
        self
    }

    /// Adds a compare on a key given as bytes.
    pub fn compare_bytes(&mut self, key: &[u8], compare: Compare) -> &mut Self {
        self.bytes += key.len() + COMPARE_OVERHEAD;
        self.compares.push(compare);
        self
    }

    pub fn put(&mut self, key: &str, value: Vec<u8>) -> &mut Self {
        self.bytes += key.len() + value.len() + OP_OVERHEAD;
        self.first_put.get_or_insert(self.writes.len());
        self.writes.push(TxnOp::put(key, value, None));
        self
    }

    pub fn delete(&mut self, key: &str) -> &mut Self {
        self.bytes += key.len() + OP_OVERHEAD;
        self.writes.push(TxnOp::delete(key, None));
        self
    }

    /// Adds any write op other than a put (for options such as a range delete); `bytes` is its size in the
    /// request.
    pub fn write(&mut self, op: TxnOp, bytes: usize) -> &mut Self {
        self.bytes += bytes + OP_OVERHEAD;
        self.writes.push(op);
        self
    }

    /// Reads `key` back if a compare fails (its value comes back in [`Outcome::Refused`], in order).
    pub fn read(&mut self, key: &str) -> &mut Self {
        self.bytes += key.len() + OP_OVERHEAD;
        self.reads.push(TxnOp::get(key, None));
        self
    }

    /// The ops etcd counts for this group as a transaction: the largest of its three lists.
    pub fn ops(&self) -> usize {
        self.compares.len().max(self.writes.len()).max(self.reads.len())
    }

    /// Its share of a request, in bytes (an estimate on the generous side).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn compares(&self) -> usize {
        self.compares.len()
    }

    pub fn writes(&self) -> usize {
        self.writes.len()
    }

    /// Whether it adds data (a put), which etcd refuses while it is out of space.
    pub fn adds_data(&self) -> bool {
        self.first_put.is_some()
    }

    fn into_txn(self) -> Txn {
        Txn::new().when(self.compares).and_then(self.writes).or_else(self.reads)
    }
}

/// What became of one group.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Its compares held; its writes are applied at this revision.
    Applied { revision: i64 },
    /// A compare failed; nothing of it was written. The values of its reads, in order (`None`: no such key).
    Refused { fresh: Vec<Option<KeyValue>> },
    /// The outer fence failed (the writer is no longer the leader); nothing of it was written.
    Fenced,
    /// The group needs more ops or bytes than the server takes in one transaction. Nothing was written;
    /// split it (or, for a gang, give up: it can never commit on this server).
    TooLarge { ops: usize, max_ops: usize, bytes: usize, max_bytes: usize },
    /// Not sent: the server refused a batch holding it as too large, the shared limit is now lower, and the
    /// group must be built again (smaller, if the caller can split it) and sent again.
    Resend,
    /// The request failed in transport or timed out: it may or may not have been applied. Re-read.
    Unknown(String),
}

impl Outcome {
    pub fn is_applied(&self) -> bool {
        matches!(self, Outcome::Applied { .. })
    }
}

/// Outcomes of one call, in the order of its groups, and what it cost.
#[derive(Debug, Default)]
pub struct Sent {
    pub outcomes: Vec<Outcome>,
    pub transactions: u32,
    /// Latency of each transaction that got an answer.
    pub latencies: Vec<Duration>,
}

/// Sends groups to etcd. Cheap to clone; clones share the in-flight bound.
#[derive(Clone)]
pub struct Sender {
    store: Store,
    in_flight: Arc<Window>,
}

impl Sender {
    /// A sender with at most `max_in_flight` transactions outstanding at once.
    pub fn new(store: Store, max_in_flight: usize) -> Self {
        Sender { store, in_flight: Arc::new(Window::fixed(max_in_flight)) }
    }

    /// A sender whose bound adapts between 1 and `max_in_flight` to keep answers under `latency_target`
    /// (see [`crate::backpressure`]).
    pub fn adaptive(store: Store, max_in_flight: usize, latency_target: Duration) -> Self {
        Sender { store, in_flight: Arc::new(Window::adaptive(max_in_flight, latency_target)) }
    }

    /// The bound on transactions in flight now.
    pub fn window(&self) -> usize {
        self.in_flight.limit()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The op limit in force (what the server accepts, as far as we know).
    pub fn max_ops(&self) -> usize {
        self.store.limits().max_ops()
    }

    /// How many claims-like items of `per_item` writes fit one group beside a sibling in an outer transaction,
    /// given `fixed` writes of its own.
    pub fn items_per_group(&self, fixed: usize, per_item: usize) -> usize {
        (self.max_ops().saturating_sub(1 + fixed) / per_item.max(1)).max(1)
    }

    /// Sends `groups` as nested sub-transactions, as many per round trip as the limits allow, the round trips
    /// concurrently. With a `fence`, every outer transaction also requires it (else [`Outcome::Fenced`]).
    /// Groups must not write the same key twice among them (etcd refuses the whole transaction). Groups of a
    /// round trip the server refused as too large come back as [`Outcome::Resend`] (the limit is lowered).
    pub async fn nested(&self, groups: Vec<Group>, fence: Option<&Compare>) -> Sent {
        let n = groups.len();
        let mut sent = Sent { outcomes: vec![Outcome::Unknown("not sent".into()); n], ..Default::default() };
        let max_ops = self.max_ops();
        let max_bytes = self.store.limits().max_request_bytes();
        let mut batches: Vec<Vec<(usize, Group)>> = Vec::new();
        let (mut batch, mut widest, mut bytes) = (Vec::new(), 0usize, 0usize);
        for (i, g) in groups.into_iter().enumerate() {
            // One op of the outer transaction per sub-transaction (and one compare for the fence).
            if 1 + g.ops() > max_ops || g.bytes() > max_bytes {
                sent.outcomes[i] = Outcome::TooLarge { ops: g.ops(), max_ops, bytes: g.bytes(), max_bytes };
                continue;
            }
            let fits = (batch.len() + 1).max(usize::from(fence.is_some())) + widest.max(g.ops()) <= max_ops
                && bytes + g.bytes() <= max_bytes;
            if !batch.is_empty() && !fits {
                batches.push(std::mem::take(&mut batch));
                widest = 0;
                bytes = 0;
            }
            widest = widest.max(g.ops());
            bytes += g.bytes();
            batch.push((i, g));
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        let space_check = self.store.keys().space_check();
        let sends = batches.into_iter().map(|batch| {
            let space_check = space_check.clone();
            async move {
                let mut outer = Txn::new();
                if let Some(f) = fence {
                    outer = outer.when([f.clone()]);
                }
                let adds_data = batch.iter().any(|(_, g)| g.adds_data());
                let (indices, subs): (Vec<usize>, Vec<TxnOp>) =
                    batch.into_iter().map(|(i, g)| (i, TxnOp::txn(g.into_txn()))).unzip();
                let mut outer = outer.and_then(subs);
                if adds_data {
                    // The price for etcd's quota (see the module's doc).
                    outer = outer.or_else([TxnOp::put(space_check, Vec::new(), None)]);
                }
                (indices, self.send(outer, adds_data).await)
            }
        });
        for (batch, result) in join_all(sends).await {
            sent.transactions += 1;
            let (resp, latency) = match result {
                Ok(ok) => ok,
                Err(e) if e.is_too_many_ops() || e.is_request_too_large() => {
                    let again = self.store.limits().shrink(&e);
                    for i in batch {
                        sent.outcomes[i] = if again {
                            Outcome::Resend
                        } else {
                            Outcome::TooLarge { ops: max_ops, max_ops, bytes: max_bytes, max_bytes }
                        };
                    }
                    continue;
                }
                Err(e) => {
                    if !e.is_no_space() {
                        tracing::warn!(error = %e, groups = batch.len(), "transaction failed; its outcome is unknown");
                    }
                    for i in batch {
                        sent.outcomes[i] = Outcome::Unknown(e.to_string());
                    }
                    continue;
                }
            };
            sent.latencies.push(latency);
            if !resp.succeeded() {
                for i in batch {
                    sent.outcomes[i] = Outcome::Fenced;
                }
                continue;
            }
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let subs = resp.op_responses();
            if subs.len() != batch.len() {
                for i in batch {
                    sent.outcomes[i] =
                        Outcome::Unknown("etcd answered with a different number of sub-transactions".into());
                }
                continue;
            }
            for (i, sub) in batch.into_iter().zip(subs) {
                sent.outcomes[i] = match sub {
                    TxnOpResponse::Txn(t) if t.succeeded() => Outcome::Applied { revision },
                    TxnOpResponse::Txn(t) => Outcome::Refused { fresh: gets(&t) },
                    _ => Outcome::Unknown("etcd answered a sub-transaction with something else".into()),
                };
            }
        }
        sent
    }

    /// Sends one group as a single flat transaction: every compare in the outer transaction, so all its writes
    /// land or none does. Writes that do not fit beside the compares go into nested write-only
    /// sub-transactions (they run only if the outer compares hold).
    pub async fn flat(&self, group: Group) -> (Outcome, Option<Duration>) {
        let max_ops = self.max_ops();
        let max_bytes = self.store.limits().max_request_bytes();
        let too_large = Outcome::TooLarge { ops: group.ops(), max_ops, bytes: group.bytes(), max_bytes };
        if group.bytes() > max_bytes {
            return (too_large, None);
        }
        let adds_data = group.adds_data();
        let Some(txn) = flat_txn(group, max_ops) else { return (too_large, None) };
        match self.send(txn, adds_data).await {
            Ok((resp, latency)) if resp.succeeded() => {
                let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                (Outcome::Applied { revision }, Some(latency))
            }
            Ok((resp, latency)) => (Outcome::Refused { fresh: gets(&resp) }, Some(latency)),
            Err(e) if e.is_too_many_ops() || e.is_request_too_large() => {
                let outcome = if self.store.limits().shrink(&e) { Outcome::Resend } else { too_large };
                (outcome, None)
            }
            Err(e) => {
                if !e.is_no_space() {
                    tracing::warn!(error = %e, "flat transaction failed; its outcome is unknown");
                }
                (Outcome::Unknown(e.to_string()), None)
            }
        }
    }

    /// Sends one transaction within the in-flight bound. One that `adds_data` waits its turn while etcd is out
    /// of space (and may be refused here, unsent, with [`Error::NoSpace`]).
    async fn send(&self, txn: Txn, adds_data: bool) -> Result<(TxnResponse, Duration)> {
        let space = self.store.space();
        let _probe = if adds_data { space.admit().await? } else { None };
        let permit = self.in_flight.acquire().await;
        let started = Instant::now();
        let result = self.store.client().kv_client().txn(txn).await.map_err(Error::from);
        let latency = started.elapsed();
        permit.done(match &result {
            Ok(_) => Signal::Answered(latency),
            Err(e) if e.is_overloaded() => Signal::Overloaded,
            Err(_) => Signal::Neutral,
        });
        if adds_data {
            space.observe(&result);
        }
        Ok((result?, latency))
    }
}

/// One flat transaction for `group` under `max_ops`, or `None` if its compares (or reads) alone exceed it.
fn flat_txn(group: Group, max_ops: usize) -> Option<Txn> {
    if group.compares.len() > max_ops || group.reads.len() > max_ops {
        return None;
    }
    if group.writes.len() <= max_ops {
        return Some(group.into_txn());
    }
    let Group { compares, mut writes, reads, first_put, .. } = group;
    // One put stays at the top level, so that etcd's quota prices the transaction (see the module's doc).
    let top: Vec<TxnOp> = first_put.map(|i| writes.remove(i)).into_iter().collect();
    // opc = max(compares, reads, top-level puts + sub-txns); each sub-txn may hold `max_ops - opc` ops.
    let opc_base = compares.len().max(reads.len());
    let mut n_subs = 1;
    loop {
        let opc = opc_base.max(n_subs + top.len());
        let budget = max_ops.saturating_sub(opc);
        if budget == 0 || n_subs + top.len() > max_ops {
            return None;
        }
        if n_subs * budget >= writes.len() {
            let mut rest = writes.into_iter().peekable();
            let mut success = top;
            while rest.peek().is_some() {
                success.push(TxnOp::txn(Txn::new().and_then(rest.by_ref().take(budget).collect::<Vec<_>>())));
            }
            return Some(Txn::new().when(compares).and_then(success).or_else(reads));
        }
        n_subs += 1;
    }
}

/// The values of a failed transaction's `get`s, in order (`None` for an absent key).
fn gets(resp: &TxnResponse) -> Vec<Option<KeyValue>> {
    resp.op_responses()
        .into_iter()
        .map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::CompareOp;

    fn group(compares: usize, writes: usize) -> Group {
        let mut g = Group::new();
        for i in 0..compares {
            let k = format!("c{i}");
            g.compare(&k, Compare::mod_revision(k.as_str(), CompareOp::Equal, 1));
        }
        for i in 0..writes {
            g.put(&format!("w{i}"), vec![0; 10]);
        }
        g
    }

    #[test]
    fn ops_are_the_largest_list() {
        assert_eq!(group(4, 3).ops(), 4);
        assert_eq!(group(2, 7).ops(), 7);
        assert!(group(1, 1).bytes() > 0);
    }

    #[test]
    fn flat_transactions_split_their_writes() {
        assert!(flat_txn(group(3, 10), 16).is_some(), "fits as is");
        // 3 compares: one put at the top level and 5 sub-transactions of 10 writes carry 50 (opc 6).
        assert!(flat_txn(group(3, 50), 16).is_some(), "writes nested");
        assert!(flat_txn(group(3, 100), 16).is_none(), "at most 1 + 7 x 8 = 57 writes fit under 16 ops");
        assert!(flat_txn(group(17, 1), 16).is_none(), "too many compares");
        // 10 compares leave 6 per sub-txn; 200 writes would need 34 sub-txns, more than the limit.
        assert!(flat_txn(group(10, 200), 16).is_none());
    }
}
