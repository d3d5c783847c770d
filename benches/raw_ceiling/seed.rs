//! The raw cell: written under the measurement's prefix before it starts, read back and deleted after it.
//!
//! The records are the core's, made the way the core makes them ([`Allocation::empty`], [`Task::pending`],
//! [`Job::new`]) and encoded by [`encode`]; written in transactions of at most `max_txn_ops` puts over
//! concurrent streams, each key's mod_revision noted so the workers' first compares hold.

use super::worker::{RawNode, RawTask};
use super::RawOptions;
use crate::cell::{in_streams, node_name, worker_nodes, CAPACITY, PLACED_BY, REQUEST};
use anyhow::{ensure, Context, Result};
use etcd_client::{DeleteOptions, PutOptions, Txn, TxnOp};
use omega::cell_state::CellSnapshot;
use omega::model::{now_ms, Allocation, Job, JobKind, Liveness, Node, Task};
use omega::store::{encode, Store, DEFAULT_PAGE_SIZE};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Seconds the liveness lease lasts: longer than any measurement, never kept alive.
const LEASE_TTL_SECS: i64 = 600;

/// What each worker starts from: its nodes and its tasks, with their mod_revisions.
pub(super) struct Seeded {
    pub workers: Vec<(Vec<RawNode>, Vec<RawTask>)>,
}

/// An encoded record and its key, to put.
type Record = (Vec<u8>, String);

/// How many keys there are under `prefix`.
/// Writes nodes, their ledgers and liveness (bound to a new lease, noted in `lease` at once so a failure
/// after it still revokes it), and each worker's job and pending tasks.
pub(super) async fn write(store: &Store, opts: &RawOptions, lease: &mut Option<i64>) -> Result<Seeded> {
    let (keys, max_ops, now) = (store.keys(), opts.max_txn_ops, now_ms());
    let names: Vec<String> = (0..opts.nodes).map(node_name).collect();
    let mut nodes = Vec::with_capacity(names.len());
    for name in &names {
        let (key, labels) = (keys.node(name), BTreeMap::new());
        let node = Node { name: name.clone(), capacity: CAPACITY, labels, address: None, registered_at_ms: now };
        nodes.push((encode(&key, &node)?, key));
    }
    put_all(store, nodes, None, max_ops).await.context("writing nodes")?;
    let ledgers: Vec<Allocation> = names.iter().map(|name| Allocation::empty(name, CAPACITY)).collect();
    let mut records = Vec::with_capacity(ledgers.len());
    for ledger in &ledgers {
        let key = keys.alloc(&ledger.node);
        records.push((encode(&key, ledger)?, key));
    }
    let ledger_revs = put_all(store, records, None, max_ops).await.context("writing ledgers")?;
    let id = store.grant_lease(LEASE_TTL_SECS).await?;
    *lease = Some(id);
    let mut live = Vec::with_capacity(names.len());
    for name in &names {
        let key = keys.live(name);
        live.push((encode(&key, &Liveness { node: name.clone(), lease: format!("{id:x}"), since_ms: now })?, key));
    }
    put_all(store, live, Some(id), max_ops).await.context("writing liveness")?;

    // Worker w's tasks are job `raw<w>`'s.
    let per_worker = u32::try_from(opts.tasks_per_worker).context("tasks per worker")?;
    let mut jobs = Vec::with_capacity(opts.workers);
    let mut tasks = Vec::with_capacity(opts.workers * opts.tasks_per_worker);
    for w in 0..opts.workers {
        let job =
            Job { scheduler: PLACED_BY.into(), ..Job::new(&format!("raw{w}"), JobKind::Batch, per_worker, REQUEST) };
        tasks.extend((0..job.tasks).map(|i| Task::pending(&job, i)));
        let key = keys.job(&job.id);
        jobs.push((encode(&key, &job)?, key));
    }
    put_all(store, jobs, None, max_ops).await.context("writing jobs")?;
    let mut records = Vec::with_capacity(tasks.len());
    for task in &tasks {
        let key = keys.task(&task.id);
        records.push((encode(&key, task)?, key));
    }
    let task_revs = put_all(store, records, None, max_ops).await.context("writing tasks")?;

    let mut ledgers: Vec<Option<RawNode>> =
        ledgers.into_iter().zip(ledger_revs).map(|(ledger, rev)| Some(RawNode { ledger, rev })).collect();
    let mut tasks = tasks.into_iter().zip(task_revs).map(|(task, rev)| RawTask { task, rev });
    let workers = (0..opts.workers)
        .map(|w| {
            let nodes = worker_nodes(w, opts.workers, opts.nodes).into_iter().filter_map(|i| ledgers[i].take());
            (nodes.collect(), tasks.by_ref().take(opts.tasks_per_worker).collect())
        })
        .collect();
    Ok(Seeded { workers })
}

/// Puts `records` in transactions of at most `max_ops` puts, over concurrent streams. Returns each key's
/// mod_revision, in order (all puts of one transaction get its revision).
async fn put_all(store: &Store, records: Vec<Record>, lease: Option<i64>, max_ops: usize) -> Result<Vec<i64>> {
    let mut records = records.into_iter().peekable();
    let mut chunks = Vec::new();
    while records.peek().is_some() {
        chunks.push(records.by_ref().take(max_ops).collect::<Vec<Record>>());
    }
    let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
    let chunks = Arc::new(chunks);
    let revs = Arc::new(parking_lot::Mutex::new(vec![0i64; chunks.len()]));
    let (client, r) = (store.client(), revs.clone());
    in_streams(chunks.len(), move |i| {
        let (mut kv, r, chunks) = (client.kv_client(), r.clone(), chunks.clone());
        async move {
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            let ops: Vec<TxnOp> =
                chunks[i].iter().map(|(v, k)| TxnOp::put(k.as_str(), v.clone(), opts.clone())).collect();
            let resp = kv.txn(Txn::new().and_then(ops)).await?;
            r.lock()[i] = resp.header().map(|h| h.revision()).context("txn response without header")?;
            Ok(())
        }
    })
    .await?;
    let revs = revs.lock();
    Ok(sizes.iter().zip(revs.iter()).flat_map(|(&n, &rev)| std::iter::repeat_n(rev, n)).collect())
}

/// Reads the cell back with the core's reader: every record decodes, and the ledgers' task counts and the
/// tasks' placements each add up to the claims the workers saw committed.
pub(super) async fn check(store: &Store, committed: u64) -> Result<()> {
    let keys = store.keys();
    let (kvs, revision) = store.list(&keys.cell_prefix(), DEFAULT_PAGE_SIZE, None).await?;
    let cell = CellSnapshot::from_kvs(keys, &kvs, revision);
    ensure!(cell.undecodable == 0, "{} records of the raw cell do not decode", cell.undecodable);
    let on_ledgers: u64 = cell.allocations.values().map(|l| u64::from(l.value.tasks)).sum();
    let placements: u64 = cell.tasks.values().map(|t| u64::from(t.value.placements)).sum();
    ensure!(
        on_ledgers == committed && placements == committed,
        "the raw cell's ledgers count {on_ledgers} claims and its tasks {placements} placements, but the \
         workers saw {committed} committed"
    );
    Ok(())
}

/// Deletes everything under the prefix and revokes the liveness lease.
pub(super) async fn clean(store: &Store, lease: Option<i64>) -> Result<()> {
    let mut client = store.client();
    client.delete(store.keys().prefix(), Some(DeleteOptions::new().with_prefix())).await?;
    if let Some(id) = lease {
        client.lease_revoke(id).await.context("revoking the liveness lease")?;
    }
    Ok(())
}
