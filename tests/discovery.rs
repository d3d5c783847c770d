//! `omega::discovery::Resolver` against a real etcd: it lists a service's endpoints, then reports each
//! publication, replacement and withdrawal once, ignores other services (`web` is not `webx`) and values that do
//! not decode, and after being cut off while history is compacted reports just the difference.

use omega::discovery::{self, Endpoint, EndpointChange, Resolver};
use omega::keys::Keys;
use omega::store::Store;
use omega_testkit::*;
use std::time::Duration;

fn endpoint(service: &str, node: &str, task: &str, port: u16) -> Endpoint {
    Endpoint {
        service: service.into(),
        address: "10.0.0.1".into(),
        port,
        tags: vec![],
        job: task.split('/').next().unwrap_or_default().into(),
        task: task.into(),
        node: node.into(),
        version: 0,
        since_ms: 1,
    }
}

/// The next non-empty batch of changes, bounded.
async fn next(resolver: &mut Resolver) -> Vec<EndpointChange> {
    tokio::time::timeout(Duration::from_secs(30), resolver.changed()).await.expect("a change within 30 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_follows_one_service() {
    let (etcd, store) = start_etcd().await;
    let keys = store.keys().clone();
    let lease = store.grant_lease(30).await.unwrap();
    let a = endpoint("web", "n1", "web/0", 8080);
    discovery::publish(&store, std::slice::from_ref(&a), lease).await.unwrap();

    // The proxy lets the test cut the resolver off while history moves on.
    let proxy = Proxy::start(etcd.endpoint()).await;
    let resolver_store = Store::connect(&[proxy.endpoint()], Keys::default()).await.unwrap();
    let mut resolver = Resolver::new(resolver_store, "web").await.unwrap();
    assert_eq!(resolver.endpoints().values().collect::<Vec<_>>(), vec![&a]);

    // A publication, and a service whose name starts the same (not ours).
    let b = endpoint("web", "n2", "web/1", 8080);
    discovery::publish(&store, &[endpoint("webx", "n2", "webx/0", 9090), b.clone()], lease).await.unwrap();
    assert_eq!(next(&mut resolver).await, vec![EndpointChange::Insert(b.key(&keys), b.clone())]);
    // A value that does not decode is skipped; a replacement is an insert of the known key.
    let mut kv = store.client().kv_client();
    kv.put(discovery::endpoint_key(&keys, "web", "n3", "web/9"), "not json", None).await.unwrap();
    let mut b2 = b.clone();
    b2.since_ms = 2;
    discovery::publish(&store, std::slice::from_ref(&b2), lease).await.unwrap();
    assert_eq!(next(&mut resolver).await, vec![EndpointChange::Insert(b.key(&keys), b2.clone())]);
    // A withdrawal.
    discovery::withdraw(&store, &[a.key(&keys)]).await.unwrap();
    assert_eq!(next(&mut resolver).await, vec![EndpointChange::Remove(a.key(&keys))]);
    assert_eq!(resolver.endpoints().len(), 1);

    // Cut off while one endpoint goes and another comes, and history is compacted past the resolver.
    proxy.cut();
    let c = endpoint("web", "n4", "web/2", 8080);
    discovery::publish(&store, std::slice::from_ref(&c), lease).await.unwrap();
    discovery::withdraw(&store, &[b.key(&keys)]).await.unwrap();
    let rev = store.revision().await.unwrap();
    kv.compact(rev, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();
    proxy.restore();
    let mut changes = Vec::new();
    while resolver.endpoints().len() != 1 || !resolver.endpoints().contains_key(&c.key(&keys)) {
        changes.extend(next(&mut resolver).await);
    }
    assert!(changes.contains(&EndpointChange::Remove(b.key(&keys))), "{changes:?}");
    assert!(changes.contains(&EndpointChange::Insert(c.key(&keys), c.clone())), "{changes:?}");
    assert_eq!(changes.len(), 2, "only the difference: {changes:?}");
    assert!(resolver.revision() >= rev);

    // Lease-bound: revoking the lease withdraws everything.
    store.client().lease_client().revoke(lease).await.unwrap();
    assert_eq!(next(&mut resolver).await, vec![EndpointChange::Remove(c.key(&keys))]);
    assert!(resolver.endpoints().is_empty());
}
