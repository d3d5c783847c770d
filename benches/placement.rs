//! One placement decision over a 10,000-node cell, for each scheduler's strategy.
//!
//! Targets: batch under 100 us per task, service under 2 ms per task (on this project's 2-core machines).
//! The cell is 10,000 nodes in 10 zones, 40% used by 40,000 running tasks, so that feasibility, scoring and
//! the node index all do real work. A decision = building the node table once (`node_table`, shared by all
//! jobs decided together) + placing each job on it (`batch_binpack/N`, `service_spread/N`: one job of N
//! tasks; criterion's throughput line gives the per-task cost).

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use omega::cell_state::{CellSnapshot, Versioned};
use omega::keys::{task_id, Keys};
use omega::model::{Allocation, Constraint, Job, JobKind, Liveness, Node, Task, TaskState};
use omega::placement::{place_in, NodeTable, PlacementOptions};
use omega::resources::Resources;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

const NODES: usize = 10_000;
const GI: u64 = 1 << 30;

fn cell() -> CellSnapshot {
    let keys = Keys::default();
    let mut s = CellSnapshot::default();
    let mut rev = 1;
    let mut put = |s: &mut CellSnapshot, key: String, value: Vec<u8>| {
        rev += 1;
        s.apply_put_bytes(&keys, key.as_bytes(), &value, rev);
    };
    let capacity = Resources::new(16_000, 64 * GI);
    let filler = Job::new("filler", JobKind::Batch, (NODES * 4) as u32, Resources::new(1600, 6 * GI));
    for i in 0..NODES {
        let name = format!("node-{i:05}");
        let labels: BTreeMap<String, String> = [
            ("zone".to_string(), format!("zone-{}", i % 10)),
            ("disk".to_string(), if i % 4 == 0 { "hdd" } else { "ssd" }.to_string()),
        ]
        .into();
        let node = Node { name: name.clone(), capacity, labels, address: None, registered_at_ms: 0 };
        put(&mut s, keys.node(&name), serde_json::to_vec(&node).unwrap());
        let mut ledger = Allocation::empty(&name, capacity);
        for k in 0..4 {
            let mut t = Task::pending(&filler, (i * 4 + k) as u32);
            t.state = TaskState::Running;
            t.node = Some(name.clone());
            ledger.add(t.resources);
            put(&mut s, keys.task(&t.id), serde_json::to_vec(&t).unwrap());
        }
        put(&mut s, keys.alloc(&name), serde_json::to_vec(&ledger).unwrap());
        let live = Liveness { node: name.clone(), lease: "1".into(), since_ms: 0 };
        put(&mut s, keys.live(&name), serde_json::to_vec(&live).unwrap());
    }
    s
}

fn pending(s: &mut CellSnapshot, job: &Job) -> Vec<Versioned<Task>> {
    let keys = Keys::default();
    for i in 0..job.tasks {
        let t = Task::pending(job, i);
        s.apply_put_bytes(&keys, keys.task(&task_id(&job.id, i)).as_bytes(), &serde_json::to_vec(&t).unwrap(), 1);
    }
    s.tasks_of(job).cloned().collect()
}

fn placement(c: &mut Criterion) {
    let mut s = cell();
    let mut g = c.benchmark_group("place_10k_nodes");
    g.sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    g.bench_function("node_table", |b| b.iter(|| black_box(NodeTable::new(&s).entries.len())));

    for tasks in [1u32, 100, 1000] {
        let job = Job::new(&format!("batch-{tasks}"), JobKind::Batch, tasks, Resources::new(500, GI));
        let p = pending(&mut s, &job);
        g.throughput(Throughput::Elements(tasks as u64));
        g.bench_with_input(BenchmarkId::new("batch_binpack", tasks), &p, |b, p| {
            let mut rng = StdRng::seed_from_u64(1);
            b.iter_batched(
                || NodeTable::new(&s),
                |mut table| black_box(place_in(&mut table, &s, &job, p, &PlacementOptions::batch(), &mut rng)),
                BatchSize::LargeInput,
            )
        });
    }
    for tasks in [1u32, 10, 50] {
        let mut job = Job::new(&format!("svc-{tasks}"), JobKind::Service, tasks, Resources::new(500, GI));
        job.spread = Some("zone".into());
        job.anti_affinity = true;
        job.constraints = vec![Constraint::Equals { label: "disk".into(), value: "ssd".into() }];
        let p = pending(&mut s, &job);
        g.throughput(Throughput::Elements(tasks as u64));
        g.bench_with_input(BenchmarkId::new("service_spread", tasks), &p, |b, p| {
            let mut rng = StdRng::seed_from_u64(1);
            b.iter_batched(
                || NodeTable::new(&s),
                |mut table| black_box(place_in(&mut table, &s, &job, p, &PlacementOptions::service(), &mut rng)),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
