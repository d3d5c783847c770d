//! What the scheduler tests share: a scheduler process on a test's etcd, its metrics, and reading what it
//! placed and published. Each test binary uses part of it.
#![allow(dead_code)]

use omega::etcd_process::free_port;
use omega::model::{SchedulerInstance, Task, TaskState};
use omega::store::Store;
use omega_testkit::metrics::scrape;
use omega_testkit::procs::Proc;
use omega_testkit::wait_for;

/// An `omega-scheduler --kind <kind>` named `name` on `etcd`, with a short lease (2 s) and steal delay so tests
/// see takeovers quickly, serving metrics on `metrics`; `extra` flags and `env` on top.
pub fn scheduler_process(
    kind: &str,
    etcd: &str,
    name: &str,
    instance: &str,
    metrics: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut args = vec!["--etcd", etcd, "--kind", kind, "--name", name, "--instance", instance];
    args.extend(["--lease-ttl", "2s", "--steal-after", "500ms", "--metrics-addr", metrics]);
    args.extend(extra);
    Proc::start_with_env("omega-scheduler", &args, instance, env)
}

/// A free loopback address for a process's metrics.
pub fn metrics_addr() -> String {
    format!("127.0.0.1:{}", free_port().unwrap())
}

/// Scrapes `addr` once its listener is up.
pub async fn scrape_when_up(addr: &str) -> String {
    wait_for("the metrics listener", 30, async || {
        tokio::net::TcpStream::connect(addr).await.ok()?;
        Some(())
    })
    .await;
    scrape(addr).await
}

pub async fn tasks(store: &Store, job: &str) -> Vec<Task> {
    let (kvs, _) = store.list(&store.keys().tasks_of_job(job), 1000, None).await.unwrap();
    kvs.iter().map(|kv| serde_json::from_slice(kv.value()).unwrap()).collect()
}

/// The job's `n` tasks, once all of them are placed.
pub async fn all_placed(store: &Store, job: &str, n: usize) -> Option<Vec<Task>> {
    let ts = tasks(store, job).await;
    (ts.len() == n && ts.iter().all(|t| t.state == TaskState::Assigned)).then_some(ts)
}

/// An instance's record as it published it last, and the lease it is bound to.
pub async fn instance_record(store: &Store, scheduler: &str, instance: &str) -> Option<(SchedulerInstance, i64)> {
    let key = store.keys().scheduler(scheduler, instance);
    let resp = store.client().kv_client().get(key.as_str(), None).await.ok()?;
    let kv = resp.kvs().first()?;
    Some((serde_json::from_slice(kv.value()).ok()?, kv.lease()))
}
