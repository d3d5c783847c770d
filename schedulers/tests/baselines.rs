//! The Omega paper's baselines as real processes on a real etcd: the monolithic scheduler (one queue for both
//! kinds of jobs).

mod support;

use omega::audit;
use omega::model::{Job, JobKind, SchedulerKind, Task};
use omega::resources::Resources;
use omega_testkit::*;
use std::collections::{BTreeMap, BTreeSet};
use support::{all_placed, instance_record, metrics_addr, scheduler_process, scrape_when_up};

const CPU: u64 = 1000;
const MEM: u64 = 1 << 30;

fn zone_of(task: &Task) -> String {
    let node = task.node.as_deref().expect("placed on a node");
    format!("zone-{}", node.trim_start_matches("node-").parse::<usize>().unwrap() % 3)
}

/// One monolithic scheduler takes a batch and a service job addressed to it, and places each as its kind's
/// scheduler would: the batch job packed onto one node (best fit), the service spread over the zones; its
/// record says it is monolithic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monolithic_scheduler_places_each_job_as_its_kind_would() {
    let (etcd, store) = start_etcd().await;
    // Room on any one node for either job whole: only the placement options decide packing or spreading.
    seed_nodes(&store, 6, Resources::new(8 * CPU, 16 * MEM)).await; // zones: zone-0, zone-1, zone-2
    let m = metrics_addr();
    let _s = scheduler_process("monolithic", &etcd.endpoint(), "monolithic", "mono-1", &m, &[], &[]);
    scrape_when_up(&m).await;

    let crunch =
        Job { scheduler: "monolithic".into(), ..Job::new("crunch", JobKind::Batch, 4, Resources::new(CPU, MEM)) };
    let mut web = Job::new("web", JobKind::Service, 6, Resources::new(CPU / 2, MEM));
    web.scheduler = "monolithic".into();
    web.spread = Some("zone".into());
    store.create_job(&crunch, 128).await.unwrap();
    store.create_job(&web, 128).await.unwrap();
    let crunch = wait_for("crunch placed", 60, async || all_placed(&store, "crunch", 4).await).await;
    let web = wait_for("web placed", 60, async || all_placed(&store, "web", 6).await).await;

    let nodes: BTreeSet<&str> = crunch.iter().filter_map(|t| t.node.as_deref()).collect();
    assert_eq!(nodes.len(), 1, "the batch job packed by best fit: {nodes:?}");
    let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
    for t in &web {
        *per_zone.entry(zone_of(t)).or_default() += 1;
    }
    assert_eq!(
        per_zone.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "the service spread over zones: {per_zone:?}"
    );
    for t in crunch.iter().chain(&web) {
        assert_eq!(t.placed_by.as_deref(), Some("monolithic/mono-1"), "{t:?}");
    }
    let (record, _) = instance_record(&store, "monolithic", "mono-1").await.expect("the instance's record");
    assert_eq!(record.kind_of_scheduler(), SchedulerKind::Monolithic);
    assert_eq!(record.scheduler_kind, Some(SchedulerKind::Monolithic));
    assert!(audit::audit(&store).await.unwrap().is_ok());
}
