//! Placement on hand-built snapshots: pure logic, no etcd.

use super::*;
use crate::keys::Keys;
use crate::model::{Allocation, Constraint, Job, JobKind, Liveness, Node, TaskState};
use crate::resources::{Dimension, Resources};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;

const GI: u64 = 1 << 30;

struct Cell {
    keys: Keys,
    snap: CellSnapshot,
    rev: i64,
}

impl Cell {
    fn new() -> Self {
        Cell { keys: Keys::default(), snap: CellSnapshot::default(), rev: 1 }
    }

    fn put<T: serde::Serialize>(&mut self, key: String, value: &T) {
        self.rev += 1;
        self.snap.apply_put_bytes(&self.keys, key.as_bytes(), &serde_json::to_vec(value).unwrap(), self.rev);
    }

    fn node(&mut self, name: &str, cpu: u64, mem: u64, zone: &str) {
        let labels: BTreeMap<String, String> = [("zone".to_string(), zone.to_string())].into();
        let capacity = Resources::new(cpu, mem);
        self.put(
            self.keys.node(name),
            &Node { name: name.into(), capacity, labels, address: None, registered_at_ms: 0 },
        );
        self.put(self.keys.alloc(name), &Allocation::empty(name, capacity));
        self.put(self.keys.live(name), &Liveness { node: name.into(), lease: "1".into(), since_ms: 0 });
    }

    fn job(&mut self, job: &Job) -> Vec<Versioned<Task>> {
        self.put(self.keys.job(&job.id), job);
        for i in 0..job.tasks {
            self.put(self.keys.task(&crate::keys::task_id(&job.id, i)), &Task::pending(job, i));
        }
        self.snap.tasks_of(job).cloned().collect()
    }

    /// Records `task` as running on `node`, with the ledger updated.
    fn run(&mut self, task: &Versioned<Task>, node: &str) {
        let mut t = (*task.value).clone();
        t.state = TaskState::Running;
        t.node = Some(node.into());
        self.put(self.keys.task(&t.id), &t);
        let mut ledger = (*self.snap.allocations.get(node).unwrap().value).clone();
        ledger.add(t.resources);
        self.put(self.keys.alloc(node), &ledger);
    }
}

fn job(id: &str, kind: JobKind, tasks: u32, cpu: u64, mem: u64) -> Job {
    Job::new(id, kind, tasks, Resources::new(cpu, mem))
}

fn nodes_of(p: &Placement) -> Vec<String> {
    p.claims.iter().map(|c| c.node.clone()).collect()
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(7)
}

#[test]
fn bin_packing_fills_the_fullest_node_first() {
    let mut cell = Cell::new();
    for n in ["a", "b", "c"] {
        cell.node(n, 4000, 16 * GI, "z");
    }
    let filler = cell.job(&job("filler", JobKind::Batch, 1, 2000, GI));
    cell.run(&filler[0], "b");
    let pending = cell.job(&job("j", JobKind::Batch, 3, 1000, GI));
    let opts = PlacementOptions { top_k: 1, ..PlacementOptions::batch() };
    let p = place(&cell.snap, &cell.snap.jobs.get("j").unwrap().value, &pending, &opts, &mut rng());
    // b has 2000 free: two tasks fill it, the third goes elsewhere.
    assert_eq!(&nodes_of(&p)[..2], ["b", "b"]);
    assert_ne!(nodes_of(&p)[2], "b");
    assert!(p.unplaced.is_empty());
}

#[test]
fn constraints_filter_and_are_explained() {
    let mut cell = Cell::new();
    cell.node("a1", 4000, 16 * GI, "a");
    cell.node("a2", 4000, 16 * GI, "a");
    cell.node("b1", 1000, 16 * GI, "b");
    let mut j = job("j", JobKind::Service, 2, 1000, GI);
    j.constraints = vec![Constraint::Equals { label: "zone".into(), value: "b".into() }];
    let pending = cell.job(&j);
    let p = place(&cell.snap, &j, &pending, &PlacementOptions::service(), &mut rng());
    assert_eq!(nodes_of(&p), ["b1"]);
    assert_eq!(p.unplaced.len(), 1);
    let e = p.explanation.unwrap();
    assert_eq!(e.to_string(), "0/3 nodes available: 2 constraint zone=b, 1 insufficient cpu");
}

#[test]
fn anti_affinity_puts_one_task_per_node() {
    let mut cell = Cell::new();
    for n in ["a", "b", "c"] {
        cell.node(n, 64_000, 64 * GI, "z");
    }
    let mut j = job("j", JobKind::Service, 5, 100, GI);
    j.anti_affinity = true;
    let pending = cell.job(&j);
    let p = place(&cell.snap, &j, &pending, &PlacementOptions::service(), &mut rng());
    let mut placed = nodes_of(&p);
    placed.sort();
    assert_eq!(placed, ["a", "b", "c"]);
    assert_eq!(p.unplaced.len(), 2);
    assert_eq!(p.explanation.unwrap().to_string(), "0/3 nodes available: 3 anti-affinity");
}

#[test]
fn spread_balances_tasks_over_label_values() {
    let mut cell = Cell::new();
    for (n, z) in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"), ("c2", "c")] {
        cell.node(n, 64_000, 64 * GI, z);
    }
    let mut j = job("j", JobKind::Service, 6, 100, GI);
    j.spread = Some("zone".into());
    let pending = cell.job(&j);
    let p = place(&cell.snap, &j, &pending, &PlacementOptions::service(), &mut rng());
    let mut per_zone: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &p.claims {
        let zone = cell.snap.nodes.get(c.node.as_str()).unwrap().value.labels["zone"].clone();
        *per_zone
            .entry(if zone == "a" {
                "a"
            } else if zone == "b" {
                "b"
            } else {
                "c"
            })
            .or_default() += 1;
    }
    assert_eq!(per_zone.values().copied().collect::<Vec<_>>(), [2, 2, 2], "{per_zone:?}");
}

#[test]
fn down_and_drained_nodes_are_not_used() {
    let mut cell = Cell::new();
    cell.node("up", 1000, GI, "z");
    cell.node("down", 64_000, 64 * GI, "z");
    cell.node("drained", 64_000, 64 * GI, "z");
    cell.snap.apply_delete(&cell.keys, cell.keys.live("down").as_bytes());
    let mut ledger = (*cell.snap.allocations.get("drained").unwrap().value).clone();
    ledger.schedulable = false;
    cell.put(cell.keys.alloc("drained"), &ledger);
    let pending = cell.job(&job("j", JobKind::Batch, 2, 1000, GI));
    let p =
        place(&cell.snap, &cell.snap.jobs.get("j").unwrap().value, &pending, &PlacementOptions::batch(), &mut rng());
    assert_eq!(nodes_of(&p), ["up"]);
    let e = p.explanation.unwrap();
    assert_eq!(e.to_string(), "0/3 nodes available: 2 not schedulable, 1 insufficient cpu");
    assert_eq!(e.codes().get("not_schedulable"), Some(&2));
}

#[test]
fn a_gang_that_does_not_fit_whole_proposes_nothing() {
    let mut cell = Cell::new();
    cell.node("a", 2000, 16 * GI, "z");
    let mut j = job("g", JobKind::Batch, 3, 1000, GI);
    j.gang = true;
    let pending = cell.job(&j);
    let p = place(&cell.snap, &j, &pending, &PlacementOptions::batch(), &mut rng());
    assert!(p.claims.is_empty());
    assert_eq!(p.unplaced.len(), 3);
    assert_eq!(p.explanation.unwrap().codes().get("insufficient_cpu"), Some(&1));
}

/// Another namespace's work never preempts a namespace below its guaranteed share; its own work may.
#[test]
fn preemption_leaves_another_namespace_its_guaranteed_share() {
    let mut cell = Cell::new();
    cell.node("a", 4000, 16 * GI, "z");
    // Namespace b holds the whole node (4 tasks of 1000m) and is guaranteed 3000m of it.
    let mut low = job("low", JobKind::Batch, 4, 1000, GI);
    low.namespace = "b".into();
    let low = cell.job(&low);
    for t in &low {
        cell.run(t, "a");
    }
    let mut quota = crate::model::Quota::new("b");
    quota.guaranteed_cpu_millis = Some(3000);
    cell.put(cell.keys.quota("b"), &quota);

    // Namespace a's high-priority 2000m task would need two of b's tasks: b would drop to 2000m. Refused.
    let mut big = job("big", JobKind::Service, 1, 2000, GI);
    big.namespace = "a".into();
    big.priority = 100;
    let pending = cell.job(&big);
    let p = place(&cell.snap, &big, &pending, &PlacementOptions::service(), &mut rng());
    assert!(p.claims.is_empty(), "{:?}", p.claims.iter().map(|c| c.preempts.len()).collect::<Vec<_>>());
    // A 1000m task takes one: b keeps exactly its 3000m.
    let mut small = job("small", JobKind::Service, 1, 1000, GI);
    small.namespace = "a".into();
    small.priority = 100;
    let pending = cell.job(&small);
    let p = place(&cell.snap, &small, &pending, &PlacementOptions::service(), &mut rng());
    assert_eq!(p.claims.len(), 1);
    assert_eq!(p.claims[0].preempts.len(), 1);
    // b's own higher-priority work may take it below: the guarantee is against other namespaces.
    let mut own = job("own", JobKind::Service, 1, 2000, GI);
    own.namespace = "b".into();
    own.priority = 100;
    let pending = cell.job(&own);
    let p = place(&cell.snap, &own, &pending, &PlacementOptions::service(), &mut rng());
    assert_eq!(p.claims.len(), 1);
    assert_eq!(p.claims[0].preempts.len(), 2);
}

#[test]
fn preemption_evicts_the_cheapest_lower_priority_set() {
    let mut cell = Cell::new();
    cell.node("a", 4000, 16 * GI, "z");
    cell.node("b", 4000, 16 * GI, "z");
    // a: two low-priority tasks of 2000; b: one priority-50 task of 4000.
    let low = cell.job(&job("low", JobKind::Batch, 2, 2000, GI));
    cell.run(&low[0], "a");
    cell.run(&low[1], "a");
    let mut mid = job("mid", JobKind::Batch, 1, 4000, GI);
    mid.priority = 50;
    let mid = cell.job(&mid);
    cell.run(&mid[0], "b");

    let mut high = job("high", JobKind::Service, 1, 2000, GI);
    high.priority = 100;
    let pending = cell.job(&high);
    let p = place(&cell.snap, &high, &pending, &PlacementOptions::service(), &mut rng());
    assert_eq!(p.claims.len(), 1);
    let claim = &p.claims[0];
    assert_eq!(claim.node, "a", "evicting one priority-0 task beats evicting a priority-50 one");
    assert_eq!(claim.preempts.len(), 1);
    assert_eq!(claim.preempts[0].value.job, "low");

    // Equal priority never preempts.
    let mut peer = job("peer", JobKind::Service, 1, 2000, GI);
    peer.priority = 0;
    let pending = cell.job(&peer);
    let p = place(&cell.snap, &peer, &pending, &PlacementOptions::service(), &mut rng());
    assert!(p.claims.is_empty());
    assert_eq!(p.explanation.unwrap().codes().get("insufficient_cpu"), Some(&2));
}

#[test]
fn identical_schedulers_do_not_all_pick_the_same_node() {
    let mut cell = Cell::new();
    for i in 0..20 {
        cell.node(&format!("n{i:02}"), 4000, 16 * GI, "z");
    }
    let j = job("j", JobKind::Batch, 1, 1000, GI);
    let pending = cell.job(&j);
    let picks: std::collections::HashSet<String> = (0..16)
        .map(|seed| {
            let p = place(&cell.snap, &j, &pending, &PlacementOptions::batch(), &mut StdRng::seed_from_u64(seed));
            p.claims[0].node.clone()
        })
        .collect();
    assert!(picks.len() > 1, "random choice among equally good nodes: {picks:?}");
}

#[test]
fn tasks_larger_than_any_node_are_explained() {
    let mut cell = Cell::new();
    cell.node("a", 1000, GI, "z");
    let j = job("j", JobKind::Batch, 1, 500, 2 * GI);
    let pending = cell.job(&j);
    let p = place(&cell.snap, &j, &pending, &PlacementOptions::batch(), &mut rng());
    assert_eq!(p.explanation.unwrap().rejected.get(&Reason::Insufficient(Dimension::Memory)), Some(&1));
}

#[test]
fn a_sample_that_misses_the_only_free_node_falls_back_to_every_node() {
    let mut cell = Cell::new();
    for i in 0..50 {
        cell.node(&format!("n{i:02}"), 1000, 16 * GI, "z");
    }
    let filler = cell.job(&job("filler", JobKind::Batch, 49, 1000, GI));
    for (i, t) in filler.iter().enumerate() {
        cell.run(t, &format!("n{:02}", if i >= 17 { i + 1 } else { i }));
    }
    // Only n17 has room; a sample of 2 nodes almost never contains it.
    let j = job("j", JobKind::Batch, 1, 1000, GI);
    let pending = cell.job(&j);
    for seed in 0..10 {
        let opts = PlacementOptions { sample: Some(2), ..PlacementOptions::batch() };
        let p = place(&cell.snap, &j, &pending, &opts, &mut StdRng::seed_from_u64(seed));
        assert_eq!(nodes_of(&p), ["n17"], "seed {seed}");
    }
    // And a task that fits nowhere is explained over every node, not over the sample.
    let big = job("big", JobKind::Batch, 1, 2000, GI);
    let pending = cell.job(&big);
    let opts = PlacementOptions { sample: Some(2), ..PlacementOptions::batch() };
    let p = place(&cell.snap, &big, &pending, &opts, &mut rng());
    assert_eq!(p.explanation.unwrap().to_string(), "0/50 nodes available: 50 insufficient cpu");
}

#[test]
fn jobs_decided_on_one_table_do_not_double_book() {
    let mut cell = Cell::new();
    cell.node("only", 1000, 16 * GI, "z");
    let a = job("a", JobKind::Batch, 1, 1000, GI);
    let b = job("b", JobKind::Batch, 1, 1000, GI);
    let (pa, pb) = (cell.job(&a), cell.job(&b));
    let mut table = NodeTable::new(&cell.snap);
    let first = place_in(&mut table, &cell.snap, &a, &pa, &PlacementOptions::batch(), &mut rng());
    let second = place_in(&mut table, &cell.snap, &b, &pb, &PlacementOptions::batch(), &mut rng());
    assert_eq!(nodes_of(&first), ["only"]);
    assert!(second.claims.is_empty(), "the room the first job took is gone for the second");
    assert_eq!(second.explanation.unwrap().to_string(), "0/1 nodes available: 1 insufficient cpu");
}

#[test]
fn the_random_pick_never_trades_spread_for_variety() {
    // Zone a has one free node left; zone b's nodes are free but already hold a replica each.
    let mut cell = Cell::new();
    cell.node("a1", 1000, 16 * GI, "a");
    cell.node("a2", 0, 16 * GI, "a");
    cell.node("b1", 8000, 16 * GI, "b");
    cell.node("b2", 8000, 16 * GI, "b");
    let mut j = job("j", JobKind::Service, 3, 1000, GI);
    j.spread = Some("zone".into());
    let pending = cell.job(&j);
    cell.run(&pending[0], "b1");
    for seed in 0..32 {
        let p = place(&cell.snap, &j, &pending[1..2], &PlacementOptions::service(), &mut StdRng::seed_from_u64(seed));
        assert_eq!(nodes_of(&p), ["a1"], "seed {seed}: the least-used zone wins even when it has one node left");
    }
}

/// Preempting for a spread service follows the spread, as normal placement would: a full cell over three
/// zones, five high-priority replicas, land 2/2/1 (the cheapest victims alone would put them all in one zone).
#[test]
fn preemption_follows_the_spread() {
    let mut cell = Cell::new();
    for (i, zone) in ["a", "a", "b", "b", "c", "c"].iter().enumerate() {
        cell.node(&format!("n{i}"), 2000, 8 * GI, zone);
    }
    // Every node full of low-priority work; zone a's is the cheapest to evict (priority 0 vs 10).
    for i in 0..6 {
        let mut low = job(&format!("low{i}"), JobKind::Batch, 1, 2000, GI);
        low.priority = if i < 2 { 0 } else { 10 };
        let t = cell.job(&low);
        cell.run(&t[0], &format!("n{i}"));
    }
    let mut high = job("high", JobKind::Service, 5, 1000, GI);
    high.priority = 100;
    high.spread = Some("zone".into());
    let pending = cell.job(&high);
    let p = place(&cell.snap, &high, &pending, &PlacementOptions::service(), &mut rng());
    assert_eq!(p.claims.len(), 5, "{:?}", p.explanation);
    let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
    for c in &p.claims {
        let zone = cell.snap.nodes.get(c.node.as_str()).unwrap().value.labels["zone"].clone();
        *per_zone.entry(zone).or_default() += 1;
    }
    let mut counts: Vec<usize> = per_zone.values().copied().collect();
    counts.sort();
    assert_eq!(counts, vec![1, 2, 2], "{per_zone:?}");
}

/// A gang is evicted whole: preempting one of its tasks takes all of them, wherever they run.
#[test]
fn a_gang_is_preempted_whole() {
    let mut cell = Cell::new();
    cell.node("a", 2000, 8 * GI, "z");
    cell.node("b", 2000, 8 * GI, "z");
    let mut gang = job("gang", JobKind::Batch, 2, 2000, GI);
    gang.gang = true;
    let g = cell.job(&gang);
    cell.run(&g[0], "a");
    cell.run(&g[1], "b");
    let mut high = job("high", JobKind::Service, 1, 1000, GI);
    high.priority = 100;
    let pending = cell.job(&high);
    let p = place(&cell.snap, &high, &pending, &PlacementOptions::service(), &mut rng());
    assert_eq!(p.claims.len(), 1);
    let mut victims: Vec<&str> = p.claims[0].preempts.iter().map(|v| v.value.id.as_str()).collect();
    victims.sort();
    assert_eq!(victims, vec!["gang/0", "gang/1"], "the whole gang, on both nodes");
    assert_eq!(preempt::freed_on(&p.claims[0].preempts, &p.claims[0].node), Resources::new(2000, GI));

    // A gang with a member of equal or higher priority is not evictable at all.
    let mut peer = job("peer", JobKind::Service, 1, 1000, GI);
    peer.priority = 0;
    let pending = cell.job(&peer);
    assert!(place(&cell.snap, &peer, &pending, &PlacementOptions::service(), &mut rng()).claims.is_empty());
}

/// Randomized first fit (the Omega paper's placement): on a cell where best fit sends every decision to the
/// one fullest node, first fit starts anywhere, so concurrent deciders pick different nodes; a job still fills
/// each node it takes before moving on.
#[test]
fn first_fit_starts_anywhere_and_fills_each_node_it_takes() {
    let mut cell = Cell::new();
    // Fewer nodes than the batch sample: best fit sees them all.
    for i in 0..200 {
        cell.node(&format!("n{i:03}"), 4000, 16 * GI, "z");
    }
    let filler = cell.job(&job("filler", JobKind::Batch, 1, 2000, GI));
    cell.run(&filler[0], "n150");
    let j = job("j", JobKind::Batch, 4, 1000, GI);
    let pending = cell.job(&j);
    let first_fit = PlacementOptions { strategy: Strategy::FirstFit, ..PlacementOptions::batch() };
    let firsts = |opts: &PlacementOptions| -> std::collections::HashSet<String> {
        (0..16)
            .map(|seed| place(&cell.snap, &j, &pending, opts, &mut StdRng::seed_from_u64(seed)).claims[0].node.clone())
            .collect()
    };
    assert_eq!(firsts(&PlacementOptions::batch()), ["n150".to_string()].into(), "best fit: the fullest node, always");
    assert!(firsts(&first_fit).len() > 8, "first fit: wherever the sample starts: {:?}", firsts(&first_fit));
    let p = place(&cell.snap, &j, &pending, &first_fit, &mut rng());
    assert!(p.unplaced.is_empty());
    let nodes = nodes_of(&p);
    assert!(nodes.iter().all(|n| n == &nodes[0]), "four 1-cpu tasks fill one empty 4-cpu node: {nodes:?}");
}

#[test]
fn a_task_handed_back_avoids_the_node_it_last_ran_on() {
    let mut cell = Cell::new();
    for n in ["a", "b", "c"] {
        cell.node(n, 4000, 16 * GI, "z");
    }
    // b is the fullest (the best fit), a the emptiest (spread's pick), c in between, and the service's other
    // replica is on b: each strategy's favourite is a node the task failed on once, and c its second choice.
    let filler = cell.job(&job("filler", JobKind::Batch, 3, 1000, GI));
    cell.run(&filler[0], "b");
    cell.run(&filler[1], "b");
    cell.run(&filler[2], "c");
    let back = |cell: &mut Cell, j: &Job, node: &str| {
        let mut t = Task::pending(j, 0);
        t.placements = 1;
        t.node = Some(node.into());
        t.reason = Some("replacing a replica that ended failed".into());
        cell.put(cell.keys.task(&t.id), &t);
        vec![cell.snap.tasks.get(t.id.as_str()).unwrap().clone()]
    };
    let batch = job("batch", JobKind::Batch, 1, 1000, GI);
    cell.job(&batch);
    let pending = back(&mut cell, &batch, "b");
    let service = job("svc", JobKind::Service, 2, 1000, GI);
    let replicas = cell.job(&service);
    cell.run(&replicas[1], "b");
    let pending_service = back(&mut cell, &service, "a");
    for seed in 0..16 {
        let mut rng = StdRng::seed_from_u64(seed);
        let p = place(&cell.snap, &batch, &pending, &PlacementOptions::batch(), &mut rng);
        assert_eq!(nodes_of(&p), ["c"], "the fullest node but b, where it failed");
        let p = place(&cell.snap, &service, &pending_service, &PlacementOptions::service(), &mut rng);
        assert_eq!(nodes_of(&p), ["c"], "the emptiest node but a, where it failed");
    }
    // A task never placed has no last node, whatever its record says.
    let mut fresh = (*pending[0].value).clone();
    fresh.placements = 0;
    assert_eq!(score::last_node(&fresh), None);
    assert_eq!(score::last_node(&pending[0].value), Some("b"));

    // Where nothing else fits, the last node still takes it.
    let big = job("big", JobKind::Service, 1, 3500, GI);
    cell.job(&big);
    let pending_big = back(&mut cell, &big, "a");
    let p = place(&cell.snap, &big, &pending_big, &PlacementOptions::service(), &mut rng());
    assert_eq!(nodes_of(&p), ["a"], "a is the only node with 3.5 free cores");
}
