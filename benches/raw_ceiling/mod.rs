//! etcd's own ceiling for the claim write shape: claims per second when the claim transactions are built by
//! hand with `etcd_client` and sent with nothing deciding, checking or packing them, on a given etcd.
//!
//! This is what Omega's committer is measured against. The transactions are shaped like the committer's
//! incremental commit with one claim per node: an outer transaction without compares holding one nested
//! sub-transaction per claim,
//!
//! ```text
//! compare  cell/alloc/<node>  mod_revision == as last written     put cell/alloc/<node>        ledger + request
//!          cell/live/<node>   create_revision > 0                     cell/tasks/<task>        assigned to node
//!          cell/tasks/<task>  mod_revision == as last written         assign/<node>/<task>     the assignment
//! else     get the three compared keys
//! ```
//!
//! at most `max_txn_ops - 3` sub-transactions per outer transaction (etcd gives a nested transaction the
//! outer one's leftover op budget, and each sub-transaction has three ops of each kind), the outer
//! transactions of one commit call sent concurrently. Keys come from [`omega::keys::Keys`] and values are the
//! core's records ([`Allocation`](omega::model::Allocation), [`Task`](omega::model::Task),
//! [`Assignment`](omega::model::Assignment), with [`Node`](omega::model::Node) and
//! [`Liveness`](omega::model::Liveness) written up front) encoded by [`omega::store::encode`], so the keys and
//! bytes etcd handles are the ones Omega writes, and they follow the layout and the records when those change.
//!
//! W workers own disjoint nodes and tasks and track the mod_revisions they wrote locally, so no compare
//! fails and nothing is read: conflicts stay at zero and this measures throughput, not contention. Each claim
//! adds the task's request to its node's ledger with [`Allocation::add`](omega::model::Allocation::add), as
//! a commit does; the ledger holds sums, so it keeps its size (digits aside) however many claims land on it,
//! as Omega's does.
//!
//! Everything is written under the caller's `prefix`, which must hold no key when the measurement starts
//! (it is refused otherwise), and deleted afterwards when [`RawOptions::clean`] asks: so it can run against an
//! etcd that also holds a live cell under another prefix. Before cleaning, the ledgers and tasks are read back
//! with the core's reader and must account for exactly the claims the workers saw committed.
//!
//! What still differs from a claim through [`omega::commit::Committer`]:
//!
//! - nothing decides: no snapshot is read, no fit is checked, claims are not grouped per node, the request's
//!   bytes are not budgeted (at 125 claims an outer transaction is about 100 KiB, far below etcd's 1.5 MiB),
//!   nothing bounds the transactions in flight, and refusals are only counted, never retried;
//! - a worker claims its `tasks_per_worker` tasks round-robin again and again, so a task already assigned is
//!   assigned again (its `placements` keeps growing, and the assignment keys of every node and task pair
//!   met stay behind), where a commit places a pending task once;
//! - there is no ownership fence (`cell/owners/<job>`), as in commits whose claims carry none;
//! - nothing watches the cell unless [`RawOptions::watch`] asks, where a scheduler's cache always does.
//!
//! Over TLS ([`RawOptions::tls`]) the claims go with one identity and the cell is seeded, read back and
//! deleted with another: once etcd's authentication is on, the identity measured (a scheduler's) may not write
//! nodes.

mod seed;
mod worker;

use crate::cell::CALL_TIMEOUT;
use crate::window::{Tally, Window};
use anyhow::{bail, ensure, Context, Result};
use etcd_client::{Client, ConnectOptions, WatchOptions};
use omega::keys::Keys;
use omega::store::{Store, StoreOptions, DEFAULT_MAX_TXN_OPS};
use omega::tls::TlsFiles;
use std::str::FromStr;
use std::time::Duration;
use tokio::task::JoinSet;

/// How to measure.
#[derive(Clone, Debug)]
pub struct RawOptions {
    /// Concurrent workers, each with its own nodes and tasks.
    pub workers: usize,
    /// Live nodes in all, shared out among the workers (each needs at least `batch`).
    pub nodes: usize,
    /// Claims per commit call, one per node: a call sends `ceil(batch / subs_per_txn)` transactions at once.
    pub batch: usize,
    /// Time before the window opens (not counted).
    pub warmup: Duration,
    /// How long the window stays open.
    pub measure: Duration,
    /// Tasks per worker, claimed round-robin again and again (at least `batch`: a task goes once per call).
    pub tasks_per_worker: usize,
    /// The server's `--max-txn-ops`; sub-transactions per outer transaction are this less 3.
    pub max_txn_ops: usize,
    /// etcd's process id, to meter its CPU in the window (an etcd on this machine).
    pub etcd_pid: Option<u32>,
    /// Watch the cell range while measuring, as a scheduler's cache would.
    pub watch: RawWatch,
    /// Delete everything under the prefix afterwards (and revoke the liveness lease).
    pub clean: bool,
    /// TLS to etcd (https endpoints); `None`: plain text.
    pub tls: Option<RawTls>,
}

/// The identities of a measurement over TLS.
#[derive(Clone, Debug)]
pub struct RawTls {
    /// Seeds the cell, watches it if asked, reads it back and deletes it.
    pub admin: TlsFiles,
    /// Sends the claims.
    pub claims: TlsFiles,
}

impl Default for RawOptions {
    fn default() -> Self {
        RawOptions {
            workers: 4,
            nodes: 2000,
            batch: 16,
            warmup: Duration::from_millis(500),
            measure: Duration::from_secs(5),
            tasks_per_worker: 4096,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            etcd_pid: None,
            watch: RawWatch::None,
            clean: true,
            tls: None,
        }
    }
}

impl RawOptions {
    /// Sub-transactions (claims) per outer transaction: each holds three compares, puts and gets, and etcd
    /// gives a nested transaction the outer one's leftover op budget, so `subs + 3 <= max_txn_ops`.
    pub fn subs_per_txn(&self) -> usize {
        self.max_txn_ops.saturating_sub(3).max(1)
    }

    /// Whether the options make a measurement.
    pub fn check(&self) -> Result<()> {
        ensure!(self.workers >= 1, "need at least one worker");
        ensure!(self.batch >= 1, "the batch size must be at least 1");
        ensure!(
            self.batch <= self.nodes / self.workers,
            "batch size {} needs {} distinct nodes per worker, but {} workers share only {} nodes",
            self.batch,
            self.batch,
            self.workers,
            self.nodes
        );
        ensure!(
            self.tasks_per_worker >= self.batch && u32::try_from(self.tasks_per_worker).is_ok(),
            "tasks per worker ({}) must be at least the batch size ({}): a task may appear once per commit",
            self.tasks_per_worker,
            self.batch
        );
        ensure!(self.max_txn_ops >= 4, "max_txn_ops {} leaves no room for a sub-transaction", self.max_txn_ops);
        ensure!(!self.measure.is_zero(), "the measurement window must not be empty");
        Ok(())
    }
}

/// A watch on the cell range during the measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RawWatch {
    #[default]
    None,
    /// Events without previous values (what Omega's cache asks for).
    Plain,
    /// Events with previous values (etcd then reads every event's old value).
    PrevKv,
}

impl FromStr for RawWatch {
    type Err = anyhow::Error;

    /// `none` (or empty), `plain` or `prev_kv`.
    fn from_str(s: &str) -> Result<RawWatch> {
        match s {
            "" | "none" => Ok(RawWatch::None),
            "plain" => Ok(RawWatch::Plain),
            "prev_kv" => Ok(RawWatch::PrevKv),
            other => bail!("{other:?}: use none, plain or prev_kv"),
        }
    }
}

/// What a measurement found.
#[derive(Clone, Debug, Default)]
pub struct RawOutcome {
    /// Claims, conflicts, transactions, latencies and CPU of the window.
    pub tally: Tally,
    /// Claims committed in all, warm-up and calls completing after the window included.
    pub committed: u64,
}

impl RawOutcome {
    pub fn claims_per_sec(&self) -> f64 {
        self.tally.claims_per_sec()
    }
}

/// Measures etcd's ceiling for the claim write shape on the etcd at `endpoints`: writes a cell of
/// `opts.nodes` live nodes and `opts.tasks_per_worker` tasks per worker under `prefix` (which must hold no
/// key), runs the workers through the warm-up and the window, checks the ledgers and tasks account for every
/// committed claim, and deletes the prefix if `opts.clean` (also when the measurement failed).
pub async fn measure(endpoints: &[String], prefix: &str, opts: &RawOptions) -> Result<RawOutcome> {
    opts.check()?;
    let admin = StoreOptions::with_tls(opts.tls.as_ref().map(|t| t.admin.clone()));
    let store = Store::connect_with(endpoints, Keys::new(prefix)?, admin, Duration::ZERO)
        .await
        .context("connecting to etcd")?;
    let prefix = store.keys().prefix();
    let present = store.count(prefix).await?;
    ensure!(present == 0, "prefix {prefix} already holds {present} keys; the raw ceiling needs a fresh prefix");
    let mut lease = None;
    let result = run(&store, endpoints, opts, &mut lease).await;
    if opts.clean {
        let cleaned = seed::clean(&store, lease).await.with_context(|| format!("deleting {prefix}"));
        let outcome = result?;
        cleaned?;
        return Ok(outcome);
    }
    result
}

async fn run(store: &Store, endpoints: &[String], opts: &RawOptions, lease: &mut Option<i64>) -> Result<RawOutcome> {
    let cell = seed::write(store, opts, lease).await.context("writing the raw cell")?;
    // The claims go over a plain client, without the store's per-request deadline (which costs a little on
    // each request, on both ends): the ceiling is etcd's, not a client configuration's.
    let connect = match &opts.tls {
        Some(tls) => Some(ConnectOptions::new().with_tls(tls.claims.load()?)),
        None => None,
    };
    let client = Client::connect(endpoints, connect).await.context("connecting to etcd")?;
    // Dropping the set (at the end, or on an error) stops the watch.
    let mut watch = JoinSet::new();
    if opts.watch != RawWatch::None {
        let mut w = WatchOptions::new().with_prefix();
        if opts.watch == RawWatch::PrevKv {
            w = w.with_prev_key();
        }
        let mut stream = store
            .stream_client()
            .watch_client()
            .max_decoding_message_size(64 << 20)
            .watch(store.keys().cell_prefix(), Some(w))
            .await
            .context("watching the raw cell")?;
        watch.spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
    }
    let window = Window::after(opts.warmup, opts.measure);
    let cpu = window.meter_cpu(opts.etcd_pid);
    let mut set = JoinSet::new();
    for (nodes, tasks) in cell.workers {
        let worker = worker::Worker::new(client.kv_client(), store.keys().clone(), nodes, tasks, opts.subs_per_txn());
        set.spawn(worker.run(opts.batch, window));
    }
    let mut out = RawOutcome { tally: Tally { window: window.length(), ..Default::default() }, committed: 0 };
    while let Some(r) = set.join_next().await {
        let (tally, committed) = r??;
        out.tally.merge(tally);
        out.committed += committed;
    }
    out.tally.cpu = cpu.await?;
    watch.abort_all();
    tokio::time::timeout(CALL_TIMEOUT, seed::check(store, out.committed))
        .await
        .context("reading the raw cell back timed out")??;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        assert!(RawOptions::default().check().is_ok());
        assert_eq!(RawOptions::default().subs_per_txn(), 125);
        let too_few_nodes = RawOptions { nodes: 10, workers: 4, batch: 3, ..Default::default() };
        assert!(too_few_nodes.check().is_err());
        let too_few_tasks = RawOptions { tasks_per_worker: 8, batch: 16, ..Default::default() };
        assert!(too_few_tasks.check().is_err());
        assert!(RawOptions { max_txn_ops: 3, ..Default::default() }.check().is_err());
    }

    #[test]
    fn watch_modes_parse() {
        assert_eq!("".parse::<RawWatch>().ok(), Some(RawWatch::None));
        assert_eq!("prev_kv".parse::<RawWatch>().ok(), Some(RawWatch::PrevKv));
        assert!("prev-kv".parse::<RawWatch>().is_err());
    }
}
