//! The Omega paper's baselines as real processes on a real etcd: the monolithic scheduler (one queue for both
//! kinds of jobs) and pessimistic concurrency (`--lock`: every attempt holds one etcd lock).

mod support;

use etcd_client::{EventType, WatchOptions};
use omega::audit;
use omega::keys::prefix_end;
use omega::model::{Job, JobKind, SchedulerKind, Task};
use omega::resources::Resources;
use omega_testkit::metrics::{metric, scrape};
use omega_testkit::*;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
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
    assert_eq!((record.scheduler_kind, record.lock), (Some(SchedulerKind::Monolithic), None));
    assert!(audit::audit(&store).await.unwrap().is_ok());
}

/// The lock's holders over time, as etcd's lock API orders them: among the keys under the lock, the one
/// created first holds it. Follows a watch on the lock's keys and records the lease of every holder seen.
async fn watch_holders(store: &omega::store::Store, lock: String) -> Arc<Mutex<HashSet<i64>>> {
    // From the revision now, so no holder is missed however late the watch is set up.
    let from = store.revision().await.unwrap() + 1;
    let holders = Arc::new(Mutex::new(HashSet::new()));
    let seen = holders.clone();
    let mut client = store.stream_client().watch_client();
    tokio::spawn(async move {
        let prefix = format!("{lock}/");
        let options = WatchOptions::new().with_range(prefix_end(prefix.as_bytes())).with_start_revision(from);
        let mut stream = client.watch(prefix.as_str(), Some(options)).await.expect("watch the lock");
        // Key -> (create revision, lease) of every holder or waiter.
        let mut keys: BTreeMap<Vec<u8>, (i64, i64)> = BTreeMap::new();
        while let Ok(Some(resp)) = stream.message().await {
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => drop(keys.insert(kv.key().to_vec(), (kv.create_revision(), kv.lease()))),
                    EventType::Delete => drop(keys.remove(kv.key())),
                }
                if let Some(&(_, lease)) = keys.values().min() {
                    seen.lock().insert(lease);
                }
            }
        }
    });
    holders
}

/// Two `--lock` schedulers race for the same few nodes with a decision time and coarse detection (without
/// the lock the same race conflicts: `rounds_decide_on_what_earlier_rounds_committed` in
/// scheduler_faults.rs). Each attempt decides under the lock, on a cache that has seen every commit made
/// before it was granted: not one claim conflicts, and each scheduler held the lock in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_schedulers_racing_for_the_same_nodes_never_conflict() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    seed_nodes(&store, 3, Resources::new(16 * CPU, 64 * MEM)).await;
    let holders = watch_holders(&store, store.keys().lock("cell")).await;
    let (ma, mb) = (metrics_addr(), metrics_addr());
    let racing = ["--lock", "--detection", "coarse", "--t-job", "30ms", "--batch-claims", "40"];
    let _a = scheduler_process("batch", &ep, "a", "a-1", &ma, &racing, &[]);
    let _b = scheduler_process("batch", &ep, "b", "b-1", &mb, &racing, &[]);
    scrape_when_up(&ma).await;
    scrape_when_up(&mb).await;
    let (jobs, tasks): (u32, u32) = (20, 10);
    let task = Resources::new(CPU / 10, MEM / 16);
    for i in 0..jobs {
        for side in ["a", "b"] {
            let job = Job { scheduler: side.into(), ..Job::new(&format!("{side}{i}"), JobKind::Batch, tasks, task) };
            store.create_job(&job, 128).await.unwrap();
        }
    }
    for i in 0..jobs {
        for side in ["a", "b"] {
            let id = format!("{side}{i}");
            wait_for(&format!("{id} placed"), 120, async || all_placed(&store, &id, tasks as usize).await).await;
        }
    }

    let mut leases = Vec::new();
    for (name, instance, addr) in [("a", "a-1", &ma), ("b", "b-1", &mb)] {
        let (record, lease) = wait_for("the placements published", 30, async || {
            instance_record(&store, name, instance).await.filter(|(r, _)| r.stats.placed == u64::from(jobs * tasks))
        })
        .await;
        let stats = record.stats;
        eprintln!("{instance}: {stats:?}");
        assert_eq!(record.lock.as_deref(), Some("cell"), "the record says it locks");
        assert_eq!((stats.attempts_conflicted, stats.claims_conflicted), (0, 0), "{instance}: {stats:?}");
        assert!(stats.transactions > 0);
        let text = scrape(addr).await;
        assert_eq!(metric(&text, "omega_scheduler_conflicts_total"), 0.0, "{instance}: no claim conflicted");
        assert!(text.contains("omega_scheduler_lock_wait_microseconds_total"), "lock wait counted");
        leases.push(lease);
    }
    let holders = holders.lock().clone();
    for lease in leases {
        assert!(holders.contains(&lease), "lease {lease:x} held the lock at some point; holders {holders:x?}");
    }
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.violations);
    assert_eq!(report.placed_tasks, (2 * jobs * tasks) as usize);
}
