//! Reaching etcd: a clear error when it is not there, and a client that waits for it when asked to.

use omega::etcd_process::{free_port, EtcdOptions, EtcdProcess};
use omega::keys::Keys;
use omega::model::{Allocation, Node};
use omega::resources::Resources;
use omega::store::Store;
use omega::Error;
use omega_testkit::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_etcd_is_a_clear_error() {
    init_tracing();
    let endpoint = format!("http://127.0.0.1:{}", free_port().unwrap());
    let err =
        Store::connect(std::slice::from_ref(&endpoint), Keys::default()).await.expect_err("nothing listens there");
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&endpoint) && msg.contains("is it running?"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_started_before_etcd_waits_for_it() {
    init_tracing();
    let port = free_port().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let waiting =
        tokio::spawn(
            async move { Store::connect_with_retry(&[endpoint], Keys::default(), Duration::from_secs(60)).await },
        );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _etcd = EtcdProcess::start(EtcdOptions { client_port: Some(port), ..Default::default() }).await.unwrap();
    let store = waiting.await.unwrap().expect("connected once etcd came up");
    assert!(store.revision().await.unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_while_etcd_is_down_and_work_again_after() {
    let (mut etcd, store) = start_etcd().await;
    etcd.kill();
    let err = tokio::time::timeout(Duration::from_secs(20), store.revision()).await.expect("fails, not hangs");
    assert!(err.is_err());
    etcd.restart().await.unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if store.revision().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the same client works again after etcd returns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_node_keeps_its_claims_and_follows_its_capacity() {
    let (_etcd, store) = start_etcd().await;
    let mut node = Node {
        name: "n1".into(),
        capacity: Resources::new(4000, 8 << 30),
        labels: Default::default(),
        address: None,
        registered_at_ms: 0,
    };
    store.register_node(&node).await.unwrap();
    let key = store.keys().alloc("n1");
    let (mut ledger, _) = store.get_json::<Allocation>(&key).await.unwrap().unwrap();
    ledger.add(Resources::new(1000, 1 << 30));
    store.client().kv_client().put(key.as_str(), serde_json::to_vec(&ledger).unwrap(), None).await.unwrap();
    node.capacity = Resources::new(8000, 16 << 30);
    store.register_node(&node).await.unwrap();
    let (after, _) = store.get_json::<Allocation>(&key).await.unwrap().unwrap();
    assert_eq!(after.capacity, node.capacity);
    assert_eq!(after.used, Resources::new(1000, 1 << 30), "existing claims survive re-registration");
    assert!(store.register_node(&Node { name: "bad/name".into(), ..node }).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_is_taken_once() {
    let (_etcd, store) = start_etcd().await;
    let job = batch_job("once", 300, Resources::new(100, 1 << 20));
    store.create_job(&job, 128).await.unwrap();
    let err = store.create_job(&job, 128).await.expect_err("second create");
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    let (tasks, _) = store.list(&store.keys().tasks_of_job("once"), 50, None).await.unwrap();
    assert_eq!(tasks.len(), 300, "all tasks written, read back in pages");
}
