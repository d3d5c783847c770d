//! A hung etcd member (alive, connected, answering nothing) costs a request its deadline, not the whole
//! HTTP/2 keep-alive timeout: every unary call fails with a timeout the caller can retry or report.

use omega::keys::Keys;
use omega::store::{Store, StoreOptions};
use omega_testkit::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_hung_member_end_at_their_deadline() {
    let (etcd, _) = start_etcd().await;
    // Keep-alive far longer than the test's bound: only the request deadline can end the calls below.
    let options = StoreOptions {
        request_timeout: Duration::from_millis(500),
        keep_alive: (Duration::from_secs(300), Duration::from_secs(300)),
        ..Default::default()
    };
    let store = Store::connect_with(&etcd.endpoints(), Keys::default(), options, Duration::ZERO).await.unwrap();
    store.client().kv_client().put("/omega/probe", "1", None).await.unwrap();

    etcd.pause().unwrap();
    let bound = Duration::from_secs(60);
    let read = tokio::time::timeout(bound, store.get_json::<serde_json::Value>("/omega/probe")).await;
    let write = tokio::time::timeout(bound, store.client().kv_client().put("/omega/probe", "2", None)).await;
    let lease = tokio::time::timeout(bound, store.grant_lease(10)).await;
    etcd.resume().unwrap();

    let read = read.expect("the read ended by its deadline, not the test's bound");
    let err = read.expect_err("a hung member answers nothing");
    assert!(err.to_string().to_lowercase().contains("timeout") || err.to_string().contains("timed out"), "{err}");
    assert!(write.expect("the write ended by its deadline").is_err());
    assert!(lease.expect("the lease grant ended by its deadline").is_err());
    // And the same store works once the member answers again.
    let back = tokio::time::timeout(bound, async {
        loop {
            if let Ok(Some((v, _))) = store.get_json::<serde_json::Value>("/omega/probe").await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the store recovers");
    assert!(back == serde_json::json!(1) || back == serde_json::json!(2), "{back}");
}
