//! CPU cost of the cell-state cache's in-memory work, on synthetic data (no etcd).
//!
//! The cache's own entry points (`CellSnapshot::apply_put`, `from_kvs`, `apply_changes`) take
//! `etcd_client::KeyValue`, which etcd-client 0.21 only lets its own code construct (its constructor is
//! `pub(crate)`, and the protobuf type is public only with the `pub-response-field` feature). So this measures
//! the same work through what is public: serde_json on the records, and the snapshot's pub `imbl` maps.
//!
//! - `json/*`: encode and decode of a [`Task`] and of an [`Allocation`] holding 32 tasks.
//! - `build/10k_nodes_100k_tasks`: a snapshot filled with 10,000 ledgers and 100,000 tasks.
//! - `snapshot/publish_10k_nodes_100k_tasks`: `Arc::new(snapshot.clone())`, what the cache does per batch.
//! - `apply/*`: one watch batch (128 task updates, optionally with their 128 ledgers, optionally decoded from
//!   JSON as the cache does) applied to that state, then published.
//!
//! Run with `cargo bench --bench cell_snapshot`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use omega::cell_state::{CellSnapshot, Versioned};
use omega::model::{Allocation, Task, TaskState};
use omega::resources::Resources;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const NODES: usize = 10_000;
const TASKS: usize = 100_000;
const TASKS_PER_JOB: usize = 1_000;
const BATCH: usize = 128;
const LEDGER_TASKS: usize = 32;

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

fn task_id(i: usize) -> String {
    format!("job-{:04}/{}", i / TASKS_PER_JOB, i % TASKS_PER_JOB)
}

fn request() -> Resources {
    Resources::new(250, 512 << 20)
}

/// A task as a scheduler sees it after placement (every optional field set, so the JSON is full size).
fn task(i: usize, revision: i64) -> Task {
    let id = task_id(i);
    Task {
        job: id.split_once('/').map(|(j, _)| j.to_string()).unwrap_or_default(),
        index: (i % TASKS_PER_JOB) as u32,
        namespace: omega::model::DEFAULT_NAMESPACE.to_string(),
        id,
        resources: request(),
        state: TaskState::Assigned,
        node: Some(node_name(i % NODES)),
        placed_by: Some("batch-scheduler-0".into()),
        priority: 100,
        placements: 1,
        reason: None,
        preempted: Vec::new(),
        run: None,
        updated_at_ms: 1_700_000_000_000 + revision as u64,
        version: 0,
        health: None,
        events: Default::default(),
    }
}

/// A node's ledger holding `tasks` claims.
fn ledger(node: usize, tasks: usize) -> Allocation {
    let mut a = Allocation::empty(&node_name(node), Resources::new(64_000, 256 << 30));
    for _ in 0..tasks {
        a.add(request());
    }
    a
}

fn json(c: &mut Criterion) {
    let t = task(12_345, 1);
    let t_json = serde_json::to_vec(&t).unwrap();
    let a = ledger(42, LEDGER_TASKS);
    let a_json = serde_json::to_vec(&a).unwrap();

    let mut g = c.benchmark_group("json");
    g.throughput(Throughput::Bytes(t_json.len() as u64));
    g.bench_function("task_encode", |b| b.iter(|| serde_json::to_vec(black_box(&t)).unwrap()));
    g.bench_function("task_decode", |b| b.iter(|| serde_json::from_slice::<Task>(black_box(&t_json)).unwrap()));
    g.bench_function("task_roundtrip", |b| {
        b.iter(|| {
            let bytes = serde_json::to_vec(black_box(&t)).unwrap();
            serde_json::from_slice::<Task>(&bytes).unwrap()
        })
    });
    g.throughput(Throughput::Bytes(a_json.len() as u64));
    g.bench_function("allocation32_encode", |b| b.iter(|| serde_json::to_vec(black_box(&a)).unwrap()));
    g.bench_function("allocation32_decode", |b| {
        b.iter(|| serde_json::from_slice::<Allocation>(black_box(&a_json)).unwrap())
    });
    g.bench_function("allocation32_roundtrip", |b| {
        b.iter(|| {
            let bytes = serde_json::to_vec(black_box(&a)).unwrap();
            serde_json::from_slice::<Allocation>(&bytes).unwrap()
        })
    });
    g.finish();
}

/// The records of a 10k-node / 100k-task cell, keyed as the cache keys them, ready to insert.
struct Cell {
    allocations: Vec<(String, Versioned<Allocation>)>,
    tasks: Vec<(String, Versioned<Task>)>,
}

fn cell() -> Cell {
    let per_node = TASKS / NODES;
    let allocations = (0..NODES).map(|n| (node_name(n), Versioned::new(ledger(n, per_node), 1 + n as i64))).collect();
    let tasks = (0..TASKS).map(|i| (task_id(i), Versioned::new(task(i, 1), (NODES + 1 + i) as i64))).collect();
    Cell { allocations, tasks }
}

fn build(cell: &Cell) -> CellSnapshot {
    let mut s = CellSnapshot { revision: (NODES + TASKS) as i64, ..Default::default() };
    for (name, a) in &cell.allocations {
        s.allocations.insert(name.clone().into(), a.clone());
    }
    for (id, t) in &cell.tasks {
        s.tasks.insert(id.clone().into(), t.clone());
    }
    s
}

fn state(c: &mut Criterion) {
    let cell = cell();
    let base = build(&cell);
    assert_eq!(base.allocations.len(), NODES);
    assert_eq!(base.tasks.len(), TASKS);

    let mut g = c.benchmark_group("build");
    g.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements((NODES + TASKS) as u64));
    g.bench_function("10k_nodes_100k_tasks", |b| b.iter(|| build(black_box(&cell))));
    g.finish();

    let mut g = c.benchmark_group("snapshot");
    g.bench_function("publish_10k_nodes_100k_tasks", |b| b.iter(|| Arc::new(black_box(&base).clone())));
    g.finish();

    // One watch batch: BATCH tasks spread over the cell, and (for a commit's batch) their BATCH ledgers.
    let rev = base.revision + 1;
    let picked: Vec<usize> = (0..BATCH).map(|k| (k * 7919 + 13) % TASKS).collect();
    let task_updates: Vec<(String, Versioned<Task>)> =
        picked.iter().map(|&i| (task_id(i), Versioned::new(task(i, rev), rev))).collect();
    let ledger_updates: Vec<(String, Versioned<Allocation>)> = picked
        .iter()
        .map(|&i| {
            let n = i % NODES;
            (node_name(n), Versioned::new(ledger(n, TASKS / NODES + 1), rev))
        })
        .collect();
    let task_json: Vec<(String, Vec<u8>)> =
        task_updates.iter().map(|(id, t)| (id.clone(), serde_json::to_vec(&*t.value).unwrap())).collect();
    let ledger_json: Vec<(String, Vec<u8>)> =
        ledger_updates.iter().map(|(n, a)| (n.clone(), serde_json::to_vec(&*a.value).unwrap())).collect();

    let mut g = c.benchmark_group("apply");
    g.throughput(Throughput::Elements(BATCH as u64));
    // The setup clone is O(1) and shares all structure with `base`, as the cache's state shares it with the
    // snapshot it published last: every insert path-copies, which is the cost being measured.
    g.bench_function("128_tasks_then_publish", |b| {
        b.iter_batched(
            || base.clone(),
            |mut s| {
                for (id, t) in &task_updates {
                    s.tasks.insert(id.clone().into(), t.clone());
                }
                s.revision = rev;
                Arc::new(s.clone())
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("128_claims_then_publish", |b| {
        b.iter_batched(
            || base.clone(),
            |mut s| {
                for ((id, t), (n, a)) in task_updates.iter().zip(&ledger_updates) {
                    s.tasks.insert(id.clone().into(), t.clone());
                    s.allocations.insert(n.clone().into(), a.clone());
                }
                s.revision = rev;
                Arc::new(s.clone())
            },
            BatchSize::SmallInput,
        )
    });
    // What `apply_changes` does for a commit's batch: decode every value, insert it, then publish.
    g.bench_function("128_claims_decoded_then_publish", |b| {
        b.iter_batched(
            || base.clone(),
            |mut s| {
                for ((id, t), (n, a)) in task_json.iter().zip(&ledger_json) {
                    let t: Task = serde_json::from_slice(t).unwrap();
                    s.tasks.insert(id.to_string().into(), Versioned::new(t, rev));
                    let a: Allocation = serde_json::from_slice(a).unwrap();
                    s.allocations.insert(n.to_string().into(), Versioned::new(a, rev));
                }
                s.revision = rev;
                Arc::new(s.clone())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = json, state
}
criterion_main!(benches);
