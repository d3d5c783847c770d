//! One raw worker: claims its next `batch` tasks on its next `batch` nodes (one claim per node, both
//! round-robin), as nested sub-transactions built by hand, until the window closes.
//!
//! It keeps each node's ledger and each task as it last wrote them, with their mod_revisions, so every
//! compare holds while nobody else writes its keys. A refused claim is counted and its node's and task's
//! fresh state (what the sub-transaction's gets returned) taken over, so the next claim on them compares right.

use crate::cell::{CALL_TIMEOUT, PLACED_BY};
use crate::window::{Tally, Window};
use anyhow::{bail, ensure, Context, Result};
use etcd_client::{Compare, CompareOp, KeyValue, KvClient, Txn, TxnOp, TxnOpResponse, TxnResponse};
use omega::keys::Keys;
use omega::model::{now_ms, Allocation, Assignment, Task};
use omega::store::{decode, encode};
use std::time::{Duration, Instant};

/// A node as the worker last wrote it.
pub(super) struct RawNode {
    pub ledger: Allocation,
    pub rev: i64,
}

/// A task as the worker last wrote it.
pub(super) struct RawTask {
    pub task: Task,
    pub rev: i64,
}

/// What a claim writes if its compares hold.
struct Written {
    node: usize,
    task: usize,
    ledger: Allocation,
    placed: Task,
}

pub(super) struct Worker {
    kv: KvClient,
    keys: Keys,
    nodes: Vec<RawNode>,
    tasks: Vec<RawTask>,
    subs_per_txn: usize,
}

impl Worker {
    pub fn new(kv: KvClient, keys: Keys, nodes: Vec<RawNode>, tasks: Vec<RawTask>, subs_per_txn: usize) -> Worker {
        Worker { kv, keys, nodes, tasks, subs_per_txn }
    }

    /// Runs until the window closes; returns what the window counted and every claim committed.
    pub async fn run(mut self, batch: usize, window: Window) -> Result<(Tally, u64)> {
        let mut tally = Tally::default();
        let mut committed = 0u64;
        let (mut next_node, mut next_task) = (0usize, 0usize);
        while Instant::now() < window.close {
            let now = now_ms();
            let mut claims = Vec::with_capacity(batch);
            for _ in 0..batch {
                claims.push(self.claim(next_node, next_task, now));
                next_node = (next_node + 1) % self.nodes.len();
                next_task = (next_task + 1) % self.tasks.len();
            }
            let mut parts: Vec<Vec<Written>> = Vec::new();
            let mut txns = Vec::new();
            let mut claims = claims.into_iter().peekable();
            while claims.peek().is_some() {
                let (written, subs): (Vec<Written>, Vec<TxnOp>) =
                    claims.by_ref().take(self.subs_per_txn).collect::<Result<Vec<_>>>()?.into_iter().unzip();
                parts.push(written);
                txns.push(Txn::new().and_then(subs));
            }
            let sends = txns.into_iter().map(|txn| {
                let mut kv = self.kv.clone();
                async move {
                    let started = Instant::now();
                    let resp = kv.txn(txn).await?;
                    anyhow::Ok((resp, started.elapsed()))
                }
            });
            let results = tokio::time::timeout(CALL_TIMEOUT, futures_util::future::join_all(sends))
                .await
                .context("raw transaction timed out")?;
            let counts = window.counts(Instant::now());
            for (part, result) in parts.into_iter().zip(results) {
                let (resp, latency): (TxnResponse, Duration) = result?;
                let (applied, refused) = self.settle(part, &resp)?;
                committed += applied;
                if counts {
                    tally.claims += applied;
                    tally.conflicts += refused;
                    tally.txns += 1;
                    tally.latencies.push(latency);
                }
            }
        }
        Ok((tally, committed))
    }

    /// The sub-transaction claiming task `t` on node `n`, and what it writes.
    fn claim(&self, n: usize, t: usize, now: u64) -> Result<(Written, TxnOp)> {
        let (node, task) = (&self.nodes[n], &self.tasks[t]);
        let name = &node.ledger.node;
        let mut ledger = node.ledger.clone();
        ledger.add(task.task.resources);
        let placed = task.task.assigned(name, PLACED_BY, now);
        let assignment = Assignment::of(&placed, name, PLACED_BY, now, Vec::new());
        let (alloc_key, live_key) = (self.keys.alloc(name), self.keys.live(name));
        let (task_key, assign_key) = (self.keys.task(&placed.id), self.keys.assignment(name, &placed.id));
        let sub = Txn::new()
            .when([
                Compare::mod_revision(alloc_key.as_str(), CompareOp::Equal, node.rev),
                Compare::create_revision(live_key.as_str(), CompareOp::Greater, 0),
                Compare::mod_revision(task_key.as_str(), CompareOp::Equal, task.rev),
            ])
            .and_then([
                TxnOp::put(alloc_key.as_str(), encode(&alloc_key, &ledger)?, None),
                TxnOp::put(task_key.as_str(), encode(&task_key, &placed)?, None),
                TxnOp::put(assign_key.as_str(), encode(&assign_key, &assignment)?, None),
            ])
            .or_else([
                TxnOp::get(alloc_key.as_str(), None),
                TxnOp::get(live_key.as_str(), None),
                TxnOp::get(task_key.as_str(), None),
            ]);
        Ok((Written { node: n, task: t, ledger, placed }, TxnOp::txn(sub)))
    }

    /// Takes over what one outer transaction's claims wrote (or, refused, found). Returns (applied, refused).
    fn settle(&mut self, part: Vec<Written>, resp: &TxnResponse) -> Result<(u64, u64)> {
        let revision = resp.header().map(|h| h.revision()).context("txn response without header")?;
        let subs = resp.op_responses();
        ensure!(subs.len() == part.len(), "raw txn answered {} of {} sub-transactions", subs.len(), part.len());
        let (mut applied, mut refused) = (0, 0);
        for (w, sub) in part.into_iter().zip(subs) {
            let TxnOpResponse::Txn(sub) = sub else { bail!("nested transaction answered with a non-txn response") };
            let (node, task) = (&mut self.nodes[w.node], &mut self.tasks[w.task]);
            if sub.succeeded() {
                (node.ledger, node.rev) = (w.ledger, revision);
                (task.task, task.rev) = (w.placed, revision);
                applied += 1;
                continue;
            }
            refused += 1;
            let fresh: Vec<Option<KeyValue>> = sub
                .op_responses()
                .into_iter()
                .map(|r| match r {
                    TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                    _ => None,
                })
                .collect();
            // A key that is gone compares with revision 0 (the claim then fails on what else it compares).
            match fresh.first().cloned().flatten() {
                Some(kv) => (node.ledger, node.rev) = (decode(&kv)?, kv.mod_revision()),
                None => node.rev = 0,
            }
            match fresh.get(2).cloned().flatten() {
                Some(kv) => (task.task, task.rev) = (decode(&kv)?, kv.mod_revision()),
                None => task.rev = 0,
            }
        }
        Ok((applied, refused))
    }
}
