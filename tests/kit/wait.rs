//! Waiting for a condition, bounded: tests on a loaded 2-core machine wait for what they need, never for a
//! fixed time that stands in for it.

use std::time::{Duration, Instant};

/// Polls `check` every 100 ms until it returns `Some`, and returns that; panics after `secs` seconds saying
/// what it waited for.
pub async fn wait_for<T>(what: &str, secs: u64, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs}s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
