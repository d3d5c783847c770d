//! The benchmark cell both sides of a comparison build: node names, what a node holds and a task asks for,
//! which nodes a worker owns, and writing many keys at once.
//!
//! Both the committer's run and the raw ceiling use these, so that they claim the same resources on nodes of
//! the same names, and a difference between them is never a difference of set-up.

use anyhow::Result;
use omega::resources::Resources;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// What every task asks for.
pub const REQUEST: Resources = Resources::new(10, 1 << 20);
/// What every node holds: room for millions of tasks, so a claim never fails for want of it.
pub const CAPACITY: Resources = Resources::new(1 << 40, 1 << 60);
/// Who places the benchmarks' tasks (`Task::placed_by`, `Assignment::placed_by`, the jobs' scheduler).
pub const PLACED_BY: &str = "bench";
/// One commit (or raw transaction) that takes longer than this fails the benchmark instead of hanging it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent requests while seeding a cell.
pub const SEED_STREAMS: usize = 16;

/// The name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// The indices of the nodes `worker` (of `workers`) owns among `nodes`: every `workers`-th one, so workers
/// never share a node and so never conflict.
pub fn worker_nodes(worker: usize, workers: usize, nodes: usize) -> Vec<usize> {
    (worker..nodes).step_by(workers.max(1)).collect()
}

/// Runs `f(i)` for every `i` in `0..n` over [`SEED_STREAMS`] concurrent streams; the first error fails it.
pub async fn in_streams<F, Fut>(n: usize, f: F) -> Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let f = Arc::new(f);
    let mut set = JoinSet::new();
    for s in 0..SEED_STREAMS.min(n.max(1)) {
        let f = f.clone();
        set.spawn(async move {
            for i in (s..n).step_by(SEED_STREAMS) {
                f(i).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_own_disjoint_nodes() {
        let all: Vec<usize> = (0..3).flat_map(|w| worker_nodes(w, 3, 10)).collect();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(worker_nodes(1, 3, 10), vec![1, 4, 7]);
    }
}
