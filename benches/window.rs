//! The measurement window every worker of one measurement shares, what a measurement counts in it, and the
//! CPU etcd and this process used while it was open.
//!
//! Claims count for commits that *complete* inside the window, which opens after a warm-up: connections are
//! up and etcd's caches warm before anything is counted. On a small machine etcd and the benchmark share the
//! cores, so the CPU each used in the window (from `/proc`) says where the time went.

use std::time::{Duration, Instant};

/// When counting starts and stops.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub open: Instant,
    pub close: Instant,
}

impl Window {
    /// A window that opens `warmup` from now and stays open for `measure`.
    pub fn after(warmup: Duration, measure: Duration) -> Window {
        let open = Instant::now() + warmup;
        Window { open, close: open + measure }
    }

    pub fn length(&self) -> Duration {
        self.close - self.open
    }

    /// Whether a call that completed at `done` counts.
    pub fn counts(&self, done: Instant) -> bool {
        done >= self.open && done <= self.close
    }

    /// Measures the CPU time etcd (its pid, when known) and this process use between `open` and `close`.
    /// `None` where `/proc` cannot tell.
    pub fn meter_cpu(&self, etcd_pid: Option<u32>) -> tokio::task::JoinHandle<Option<Cpu>> {
        let w = *self;
        tokio::spawn(async move {
            tokio::time::sleep_until(w.open.into()).await;
            let (e0, p0) = (etcd_pid.and_then(cpu_seconds), cpu_seconds(std::process::id())?);
            tokio::time::sleep_until(w.close.into()).await;
            let (e1, p1) = (etcd_pid.and_then(cpu_seconds), cpu_seconds(std::process::id())?);
            Some(Cpu { etcd: e0.zip(e1).map(|(a, b)| b - a), process: p1 - p0 })
        })
    }
}

/// CPU seconds (user + system, all threads) used during a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// By etcd, when its pid is known (an etcd this process started).
    pub etcd: Option<f64>,
    /// By this process.
    pub process: f64,
}

/// User + system CPU seconds of a process, all threads (`/proc/<pid>/stat`, in USER_HZ = 100 ticks/s).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(stat: &str) -> Option<f64> {
    // Fields after the command name (which may hold spaces, so split after its closing parenthesis):
    // state is field 3, utime 14 and stime 15.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// What one measurement counted in its window: the same figures for Omega's committer and for the raw
/// ceiling, so they can stand side by side.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Claims committed by calls that completed in the window.
    pub claims: u64,
    /// Claims refused by a compare, in the window.
    pub conflicts: u64,
    /// etcd transactions completed in the window.
    pub txns: u64,
    /// How long the window was open.
    pub window: Duration,
    /// The latency of each of those transactions.
    pub latencies: Vec<Duration>,
    /// CPU used in the window, where `/proc` told.
    pub cpu: Option<Cpu>,
}

impl Tally {
    pub fn claims_per_sec(&self) -> f64 {
        self.claims as f64 / self.window.as_secs_f64()
    }

    /// Adds another worker's counts (the window and CPU are the measurement's, set once).
    pub fn merge(&mut self, other: Tally) {
        self.claims += other.claims;
        self.conflicts += other.conflicts;
        self.txns += other.txns;
        self.latencies.extend(other.latencies);
    }

    /// p50 and p99 of the transaction latencies, in milliseconds (NaN without any).
    pub fn percentiles_ms(&self) -> (f64, f64) {
        if self.latencies.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let at = |q: usize| sorted[(sorted.len() * q / 100).min(sorted.len() - 1)].as_secs_f64() * 1e3;
        (at(50), at(99))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_user_plus_system_seconds() {
        let stat = "42 (etcd (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat(stat), Some(3.0));
        assert_eq!(parse_stat("42 (etcd"), None);
        assert!(cpu_seconds(std::process::id()).is_some());
    }

    #[test]
    fn percentiles_and_rates() {
        let t = Tally {
            claims: 50,
            window: Duration::from_secs(2),
            latencies: (1..=100).rev().map(Duration::from_millis).collect(),
            ..Default::default()
        };
        assert_eq!(t.claims_per_sec(), 25.0);
        assert_eq!(t.percentiles_ms(), (51.0, 100.0));
        assert!(Tally::default().percentiles_ms().0.is_nan());
    }
}
