//! A real etcd per test (free loopback port, temp data dir, killed on drop), helpers to seed a cell, a TCP
//! proxy that can cut a client off from etcd, and a convergence check.

use etcd_client::{PutOptions, Txn, TxnOp};
use omega::cell_state::{CellSnapshot, CellState};
use omega::etcd_process::{EtcdOptions, EtcdProcess};
use omega::keys::Keys;
use omega::model::{Allocation, Job, JobKind, Liveness, Node};
use omega::resources::Resources;
use omega::store::{encode, Store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
    });
}

/// A fresh etcd and a store connected to it.
pub async fn start_etcd() -> (EtcdProcess, Store) {
    start_etcd_with(EtcdOptions::default()).await
}

pub async fn start_etcd_with(options: EtcdOptions) -> (EtcdProcess, Store) {
    init_tracing();
    let etcd = EtcdProcess::start(options).await.expect("start etcd (is Debian's etcd-server installed?)");
    let store = Store::connect(&etcd.endpoints(), Keys::default()).await.expect("connect to etcd");
    (etcd, store)
}

pub fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// Registers `n` nodes of `capacity`, alive under one long lease (as simulated nodes share their process's
/// lease). Bulk puts, so that 10,000 nodes take seconds, not minutes.
pub async fn seed_nodes(store: &Store, n: usize, capacity: Resources) -> i64 {
    let lease = store.grant_lease(3600).await.expect("grant lease");
    let keys = store.keys().clone();
    let mut kv = store.client().kv_client();
    let mut ops = Vec::new();
    for i in 0..n {
        let name = node_name(i);
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("zone".to_string(), format!("zone-{}", i % 3));
        let node = Node { name: name.clone(), capacity, labels, address: None, registered_at_ms: 0 };
        let alloc = Allocation::empty(&name, capacity);
        let live = Liveness { node: name.clone(), lease: format!("{lease:x}"), since_ms: 0 };
        ops.push(TxnOp::put(keys.node(&name), encode(&name, &node).unwrap(), None));
        ops.push(TxnOp::put(keys.alloc(&name), encode(&name, &alloc).unwrap(), None));
        ops.push(TxnOp::put(
            keys.live(&name),
            encode(&name, &live).unwrap(),
            Some(PutOptions::new().with_lease(lease)),
        ));
        if ops.len() >= 120 || i + 1 == n {
            kv.txn(Txn::new().and_then(std::mem::take(&mut ops))).await.expect("seed nodes");
        }
    }
    lease
}

/// A batch job of `tasks` tasks asking `resources` each.
pub fn batch_job(id: &str, tasks: u32, resources: Resources) -> Job {
    Job::new(id, JobKind::Batch, tasks, resources)
}

/// Reads the cell range from etcd and waits until `cache` reflects that revision, then checks that the cache
/// holds exactly what etcd holds.
pub async fn assert_converged(store: &Store, cache: &CellState) -> Arc<CellSnapshot> {
    let (kvs, revision) = store.list(&store.keys().cell_prefix(), 1000, None).await.expect("list cell");
    let expected = CellSnapshot::from_kvs(store.keys(), &kvs, revision);
    let got = cache.wait_for_revision(revision, Duration::from_secs(30)).await.expect("cache reaches etcd's revision");
    assert_eq!(got.revision, revision, "cache moved past the listing; keep writers stopped while checking");
    assert_eq!(got.nodes, expected.nodes, "nodes differ");
    assert_eq!(got.live, expected.live, "liveness differs");
    assert_eq!(got.allocations, expected.allocations, "allocations differ");
    assert_eq!(got.jobs, expected.jobs, "jobs differ");
    assert_eq!(got.tasks, expected.tasks, "tasks differ");
    got
}

/// A loopback TCP proxy in front of etcd that a test can cut (dropping every connection and refusing new
/// ones) and restore, to take etcd away from one client while others keep writing.
pub struct Proxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let (gen_tx, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(gen_tx);
        let upstream = upstream.trim_start_matches("http://").to_string();
        let (open2, gen2) = (open.clone(), generation.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if !open2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = gen2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy { port, open, generation, accept }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drops every proxied connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
