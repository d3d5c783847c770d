//! The cell-state cache converges to exactly what etcd holds: across paginated listing, etcd restarts,
//! broken watches, and compaction past the cache's revision.

use omega::cell_state::{CellState, CellStateOptions};
use omega::keys::Keys;
use omega::model::{Node, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::*;
use std::time::Duration;

const CAP: Resources = Resources::new(4000, 16 << 30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_ten_thousand_nodes_in_pages() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 10_000, CAP).await;
    let cache = CellState::start(store.clone(), CellStateOptions { page_size: 500 }).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    assert_eq!(snap.nodes.len(), 10_000);
    assert_eq!(snap.allocations.len(), 10_000);
    assert_eq!(snap.live.len(), 10_000);
    assert!(snap.is_schedulable(&node_name(9_999)));
    assert_eq!(snap.undecodable, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_while_others_write_is_one_consistent_cut() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 3_000, CAP).await;
    // A writer keeps registering nodes while the cache lists in small pages.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 3_000..3_400 {
                let node = Node {
                    name: node_name(i),
                    capacity: CAP,
                    labels: Default::default(),
                    address: None,
                    registered_at_ms: 0,
                };
                store.register_node(&node).await.unwrap();
            }
        })
    };
    let cache = CellState::start(store.clone(), CellStateOptions { page_size: 100 }).await.unwrap();
    writer.await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    assert_eq!(snap.nodes.len(), 3_400);
    assert_eq!(snap.allocations.len(), 3_400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_puts_deletes_and_skips_undecodable_values() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 10, CAP).await;
    store.create_job(&batch_job("web", 5, Resources::new(100, 1 << 20)), 128).await.unwrap();
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    assert_eq!(cache.snapshot().tasks.len(), 5);

    let mut kv = store.client().kv_client();
    let keys = store.keys().clone();
    kv.delete(keys.node(&node_name(3)), None).await.unwrap();
    kv.put(keys.node("junk"), "this is not json", None).await.unwrap();
    store.create_job(&batch_job("db", 3, Resources::new(100, 1 << 20)), 128).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    assert_eq!(snap.nodes.len(), 9, "a deleted node is gone, an undecodable one left out");
    assert!(!snap.nodes.contains_key("junk"));
    assert!(snap.undecodable >= 1);
    assert_eq!(snap.tasks.len(), 8);
    assert!(snap.tasks.values().all(|t| t.value.state == TaskState::Pending));
    // Assignments are outside the cache's range.
    kv.put(keys.assignment(&node_name(0), "web/0"), "{}", None).await.unwrap();
    kv.put(keys.job("later"), serde_json::to_vec(&batch_job("later", 0, CAP)).unwrap(), None).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    assert_eq!(snap.jobs.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_an_etcd_restart_mid_watch() {
    let (mut etcd, store) = start_etcd().await;
    seed_nodes(&store, 50, CAP).await;
    let cache = CellState::start(store.clone(), CellStateOptions::default()).await.unwrap();
    assert_converged(&store, &cache).await;

    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart().await.expect("restart etcd");
    // Writes after the restart reach the cache through a resumed watch.
    for j in 0..5 {
        store.create_job(&batch_job(&format!("after-{j}"), 10, Resources::new(100, 1 << 20)), 128).await.unwrap();
    }
    let mut kv = store.client().kv_client();
    kv.delete(store.keys().alloc(&node_name(7)), None).await.unwrap();
    let snap = assert_converged(&store, &cache).await;
    assert_eq!(snap.tasks.len(), 50);
    assert_eq!(snap.allocations.len(), 49);
    assert!(cache.stats().watcher.rewatches >= 2, "the watch was re-established: {:?}", cache.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilds_after_compaction_past_its_revision() {
    let (etcd, store) = start_etcd().await;
    seed_nodes(&store, 20, CAP).await;
    // The cache reaches etcd through a proxy we can cut; the test's own client goes direct.
    let proxy = Proxy::start(etcd.endpoint()).await;
    let cached_store = Store::connect(&[proxy.endpoint()], Keys::default()).await.unwrap();
    let cache = CellState::start(cached_store, CellStateOptions::default()).await.unwrap();
    assert_converged(&store, &cache).await;
    let resets_before = cache.stats().resets;

    proxy.cut();
    // While the cache is cut off: puts, deletes, then compaction of all history up to now.
    store.create_job(&batch_job("while-away", 30, Resources::new(100, 1 << 20)), 128).await.unwrap();
    let mut kv = store.client().kv_client();
    for i in 0..5 {
        kv.delete(store.keys().node(&node_name(i)), None).await.unwrap();
    }
    let rev = store.revision().await.unwrap();
    kv.compact(rev, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();

    let snap = assert_converged(&store, &cache).await;
    assert_eq!(snap.tasks.len(), 30);
    assert_eq!(snap.nodes.len(), 15);
    let stats = cache.stats();
    assert!(stats.watcher.compactions_seen >= 1, "the watch saw the compaction: {stats:?}");
    assert!(stats.resets > resets_before, "the cache re-listed: {stats:?}");
}
