//! Service discovery through the store: which healthy instances serve a name, kept in etcd by the agents.
//!
//! A job names its ports (`ports: {http: 8080}`) and the services its tasks offer on them (`services: [{name:
//! web, port: http}]`). The agent running a task publishes one key per service while the task is running and
//! healthy (or running, when its job has no checks), and withdraws it before anything stops the task:
//!
//! `<prefix>services/<service>/<node>/<job>/<index>` -> [`Endpoint`] (JSON), bound to the node's lease.
//!
//! Why this shape:
//! - **Only healthy instances.** The agent is the one that knows the checks' verdicts, so it is the one that
//!   publishes; a name never resolves to an instance that fails its checks (Nomad's native discovery does,
//!   because its servers never learn check results: nomad #15603).
//! - **Bound to the node's lease**, the one the node's liveness key uses: a crashed agent's endpoints vanish
//!   with its lease, within the TTL, with nobody left to clean up after it.
//! - **Outside `cell/`**, so that service churn does not fan out to every scheduler's cache.
//! - **One key per endpoint under the service's prefix**, etcd's own pattern (its endpoints manager): a
//!   client lists and watches one range, and `etcdctl watch --prefix /omega/services/web/` reads as JSON.
//!
//! [`Resolver`] follows one service's range for a client: the endpoints now, then each change as
//! [`EndpointChange::Insert`] / [`EndpointChange::Remove`]. It is built on [`crate::watcher::Watcher`], so a
//! broken watch resumes and a compacted one re-lists without losing a change.
//!
//! # As a gRPC load-balancing source
//!
//! tonic's `Channel::balance_channel(capacity)` returns a channel and a sender of `tower::discover::Change`;
//! feed it the resolver's changes, keyed by [`EndpointChange`]'s key:
//!
//! ```ignore
//! let (channel, tx) = tonic::transport::Channel::balance_channel::<String>(64);
//! let mut resolver = omega::discovery::Resolver::new(store, "web").await?;
//! for (key, e) in resolver.endpoints() {
//!     let ep = tonic::transport::Endpoint::from_shared(format!("http://{}:{}", e.address, e.port))?;
//!     tx.send(tower::discover::Change::Insert(key.clone(), ep)).await?;
//! }
//! tokio::spawn(async move {
//!     loop {
//!         for change in resolver.changed().await {
//!             let sent = match change {
//!                 EndpointChange::Insert(key, e) => match tonic::transport::Endpoint::from_shared(
//!                     format!("http://{}:{}", e.address, e.port)) {
//!                     Ok(ep) => tx.send(tower::discover::Change::Insert(key, ep)).await,
//!                     Err(_) => continue,
//!                 },
//!                 EndpointChange::Remove(key) => tx.send(tower::discover::Change::Remove(key)).await,
//!             };
//!             if sent.is_err() { return; } // the channel is gone
//!         }
//!     }
//! });
//! // `channel` now spreads requests over the healthy instances of `web`.
//! ```
//!
//! An insert for a key already held replaces its endpoint (a restarted run, a new `since_ms`); tonic's
//! balancer does the same for an `Insert` of a known key.

use crate::error::Result;
use crate::keys::Keys;
use crate::model::{Job, Task};
use crate::store::{encode, Store};
use crate::watcher::{Change, WatchEvent, Watcher};
use etcd_client::{KeyValue, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A service a job's tasks offer: its name and the job port it is served on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// What clients resolve (a name like a job name).
    pub name: String,
    /// One of the job's named `ports`.
    pub port: String,
    /// Free-form words a client may select on (`primary`, `v2`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// One healthy instance of a service, the value of its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub service: String,
    /// Host name or IP the node advertises (its record's address host; `127.0.0.1` for simulated nodes).
    pub address: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    pub job: String,
    /// The task id, `<job>/<index>`.
    pub task: String,
    pub node: String,
    /// The job version the instance runs.
    #[serde(default)]
    pub version: u32,
    /// When it was published (turned healthy).
    #[serde(default)]
    pub since_ms: u64,
}

impl Endpoint {
    /// Its key.
    pub fn key(&self, keys: &Keys) -> String {
        endpoint_key(keys, &self.service, &self.node, &self.task)
    }
}

/// `<prefix>services/`: every service.
pub fn services_prefix(keys: &Keys) -> String {
    keys.services_prefix()
}

/// `<prefix>services/<service>/`: one service's endpoints. The trailing `/` keeps `web` from matching `webx`.
pub fn service_prefix(keys: &Keys, service: &str) -> String {
    keys.service(service)
}

/// `<prefix>services/<service>/<node>/<task>`.
pub fn endpoint_key(keys: &Keys, service: &str, node: &str, task: &str) -> String {
    keys.endpoint(service, node, task)
}

/// The host part of a node's advertised address (`host:port`, `http://host:port`, `[::1]:7000`), or the
/// address itself when it has no port.
pub fn address_host(address: &str) -> String {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_string();
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => host.to_string(),
        _ => rest.to_string(),
    }
}

/// The endpoints task `task` (an id) of `job` (the spec it runs) serves on `node` reachable at `address`, one
/// per service of the job.
pub fn endpoints_of(job: &Job, task: &str, node: &str, address: &str, since_ms: u64) -> Vec<Endpoint> {
    job.services
        .iter()
        .filter_map(|s| {
            Some(Endpoint {
                service: s.name.clone(),
                address: address.to_string(),
                // A service's port names a declared port (the job file is checked); a record built otherwise
                // publishes nothing for it rather than a wrong port.
                port: *job.ports.get(&s.port)?,
                tags: s.tags.clone(),
                job: job.id.clone(),
                task: task.to_string(),
                node: node.to_string(),
                version: job.version,
                since_ms,
            })
        })
        .collect()
}

/// The puts that publish `endpoints` under `lease`.
pub fn publish_ops(keys: &Keys, endpoints: &[Endpoint], lease: i64) -> Result<Vec<TxnOp>> {
    endpoints
        .iter()
        .map(|e| {
            let key = e.key(keys);
            Ok(TxnOp::put(key.as_str(), encode(&key, e)?, Some(PutOptions::new().with_lease(lease))))
        })
        .collect()
}

/// Publishes `endpoints` under `lease`, as few transactions as the op limit allows.
pub async fn publish(store: &Store, endpoints: &[Endpoint], lease: i64) -> Result<()> {
    let ops = publish_ops(store.keys(), endpoints, lease)?;
    send(store, ops).await
}

/// Deletes `keys` (absent ones cost nothing).
pub async fn withdraw(store: &Store, keys: &[String]) -> Result<()> {
    send(store, keys.iter().map(|k| TxnOp::delete(k.as_str(), None)).collect()).await
}

/// Withdraws whatever `tasks` of `job` may have published, ahead of a write that stops them.
///
/// The agent running a task withdraws its endpoints before it stops the task, but it learns of the stop only
/// from the release that records it, so for a moment the record says `killed` while the endpoint is still
/// there. Whoever decides a stop (the controller retiring a replica in an update, a cancel) calls this first,
/// so a client never holds an endpoint whose task record is already stopped. Service names come from the
/// job and from each task's own version (an update may rename them). For tasks of the job's current version
/// and a job without services it costs no request at all.
pub async fn withdraw_tasks(store: &Store, job: &Job, tasks: &[&Task]) -> Result<()> {
    let mut names: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut keys = Vec::new();
    for t in tasks {
        let Some(node) = t.node.as_deref() else { continue };
        if let std::collections::btree_map::Entry::Vacant(slot) = names.entry(t.version) {
            let spec = if t.version == job.version { None } else { store.job_version(&job.id, t.version).await? };
            let mut of_version: Vec<String> = job.services.iter().map(|s| s.name.clone()).collect();
            of_version.extend(spec.iter().flat_map(|j| j.services.iter().map(|s| s.name.clone())));
            of_version.sort();
            of_version.dedup();
            slot.insert(of_version);
        }
        for name in names.get(&t.version).into_iter().flatten() {
            keys.push(endpoint_key(store.keys(), name, node, &t.id));
        }
    }
    if keys.is_empty() {
        return Ok(());
    }
    withdraw(store, &keys).await
}

async fn send(store: &Store, ops: Vec<TxnOp>) -> Result<()> {
    let mut kv = store.client().kv_client();
    let per_txn = store.limits().max_ops().max(1);
    let mut ops = ops;
    while !ops.is_empty() {
        let rest = ops.split_off(ops.len().min(per_txn));
        kv.txn(Txn::new().and_then(ops)).await?;
        ops = rest;
    }
    Ok(())
}

/// Every service's endpoints now, by service (what `omctl services` shows). Values that do not decode are
/// skipped with a warning rather than failing the whole listing.
pub async fn list(store: &Store, service: Option<&str>) -> Result<BTreeMap<String, Vec<Endpoint>>> {
    let keys = store.keys();
    let prefix = match service {
        Some(s) => service_prefix(keys, s),
        None => services_prefix(keys),
    };
    let (kvs, _) = store.list(&prefix, 1000, None).await?;
    let mut out: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
    for kv in &kvs {
        if let Some(e) = decode_endpoint(kv) {
            out.entry(e.service.clone()).or_default().push(e);
        }
    }
    Ok(out)
}

fn decode_endpoint(kv: &KeyValue) -> Option<Endpoint> {
    match serde_json::from_slice::<Endpoint>(kv.value()) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "skipping an endpoint that does not decode");
            None
        }
    }
}

/// A change to the set of endpoints a [`Resolver`] holds, keyed by the endpoint's etcd key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointChange {
    /// A new endpoint, or a new value for one already held (replace it).
    Insert(String, Endpoint),
    Remove(String),
}

/// Follows one service's endpoints: [`Resolver::endpoints`] now, [`Resolver::changed`] for what changes.
pub struct Resolver {
    watcher: Watcher,
    endpoints: BTreeMap<String, Endpoint>,
    revision: i64,
}

impl Resolver {
    /// Lists `service`'s endpoints and starts following them.
    pub async fn new(store: Store, service: &str) -> Result<Resolver> {
        crate::keys::validate_name("service", service)?;
        let prefix = service_prefix(store.keys(), service);
        let mut resolver =
            Resolver { watcher: Watcher::new(store, prefix, 1000), endpoints: BTreeMap::new(), revision: 0 };
        // The watcher's first event is the listing.
        while resolver.revision == 0 {
            let event = resolver.watcher.next().await;
            resolver.apply(event);
        }
        Ok(resolver)
    }

    /// The endpoints held now, by key.
    pub fn endpoints(&self) -> &BTreeMap<String, Endpoint> {
        &self.endpoints
    }

    /// The etcd revision the held endpoints are consistent with.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Waits for the next change to the endpoints and returns it (never empty), already applied to
    /// [`Resolver::endpoints`]. Cancel-safe: a cancelled call loses nothing (the watcher keeps its stream).
    pub async fn changed(&mut self) -> Vec<EndpointChange> {
        loop {
            let event = self.watcher.next().await;
            let changes = self.apply(event);
            if !changes.is_empty() {
                return changes;
            }
        }
    }

    fn apply(&mut self, event: WatchEvent) -> Vec<EndpointChange> {
        let mut out = Vec::new();
        match event {
            WatchEvent::Reset { kvs, revision } => {
                let mut fresh = BTreeMap::new();
                for kv in &kvs {
                    if let (Ok(key), Some(e)) = (kv.key_str(), decode_endpoint(kv)) {
                        fresh.insert(key.to_string(), e);
                    }
                }
                for key in self.endpoints.keys().filter(|k| !fresh.contains_key(*k)) {
                    out.push(EndpointChange::Remove(key.clone()));
                }
                for (key, e) in &fresh {
                    if self.endpoints.get(key) != Some(e) {
                        out.push(EndpointChange::Insert(key.clone(), e.clone()));
                    }
                }
                self.endpoints = fresh;
                self.revision = revision.max(1);
            }
            WatchEvent::Changes { changes, revision } => {
                for change in changes {
                    match change {
                        Change::Put(kv) => {
                            let (Ok(key), Some(e)) = (kv.key_str(), decode_endpoint(&kv)) else { continue };
                            if self.endpoints.get(key) != Some(&e) {
                                self.endpoints.insert(key.to_string(), e.clone());
                                out.push(EndpointChange::Insert(key.to_string(), e));
                            }
                        }
                        Change::Delete { key, .. } => {
                            let key = String::from_utf8_lossy(&key).into_owned();
                            if self.endpoints.remove(&key).is_some() {
                                out.push(EndpointChange::Remove(key));
                            }
                        }
                    }
                }
                self.revision = revision;
            }
            WatchEvent::Progress { revision } => self.revision = self.revision.max(revision),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_taken_from_addresses() {
        assert_eq!(address_host("10.0.0.3:7000"), "10.0.0.3");
        assert_eq!(address_host("https://node-3.example:7000/"), "node-3.example");
        assert_eq!(address_host("[fd00::3]:7000"), "fd00::3");
        assert_eq!(address_host("node-3"), "node-3");
    }

    #[test]
    fn keys_name_service_node_and_task() {
        let k = Keys::default();
        assert_eq!(endpoint_key(&k, "web", "node-3", "web/0"), "/omega/services/web/node-3/web/0");
        assert!(endpoint_key(&k, "web", "n", "t/0").starts_with(&service_prefix(&k, "web")));
        assert!(!endpoint_key(&k, "webx", "n", "t/0").starts_with(&service_prefix(&k, "web")));
        assert!(!services_prefix(&k).starts_with(&k.cell_prefix()));
    }
}
