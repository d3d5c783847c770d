//! Reading a scheduler process's counters from its Prometheus endpoint: one scrape gives every counter at
//! one instant (the instance record in etcd is republished only every few seconds), and histograms give
//! latency distributions. Runs measure the difference between two scrapes.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET /metrics over HTTP/1.0 on loopback (the exporter answers plain text and closes).
pub async fn scrape(addr: &str) -> Result<String> {
    let fetch = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await?;
        anyhow::Ok(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .with_context(|| format!("scraping {addr} timed out"))?
        .with_context(|| format!("scraping {addr}"))?;
    if !body.starts_with("HTTP/1.") || !body.lines().next().is_some_and(|l| l.contains(" 200")) {
        bail!("scraping {addr}: {}", body.lines().next().unwrap_or("no answer"));
    }
    Ok(body)
}

/// A metric's name at the start of a sample line, followed by its labels or its value.
fn is_sample_of(line: &str, name: &str) -> bool {
    line.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
}

fn value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}

/// The sum of a counter's samples over all label sets (0 when it was never incremented).
pub fn counter(text: &str, name: &str) -> f64 {
    text.lines().filter(|l| is_sample_of(l, name)).filter_map(value).sum()
}

/// The sum of a counter's samples whose labels include `label` (e.g. `phase="idle"`).
pub fn counter_where(text: &str, name: &str, label: &str) -> f64 {
    text.lines().filter(|l| is_sample_of(l, name) && l.contains(label)).filter_map(value).sum()
}

/// A cumulative histogram: upper bounds with the count of samples at or below each, the sum and count.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    pub fn parse(text: &str, name: &str) -> Histogram {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for line in text.lines().filter(|l| is_sample_of(l, &bucket)) {
            let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
            let (Some(v), false) = (value(line), le.is_nan()) else { continue };
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += v,
                None => buckets.push((le, v)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Histogram {
            buckets,
            sum: counter(text, &format!("{name}_sum")),
            count: counter(text, &format!("{name}_count")),
        }
    }

    /// What was recorded after `before` was taken.
    pub fn since(&self, before: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|&(le, c)| {
                let b = before.buckets.iter().find(|(l, _)| *l == le).map(|(_, c)| *c).unwrap_or(0.0);
                (le, (c - b).max(0.0))
            })
            .collect();
        Histogram { buckets, sum: (self.sum - before.sum).max(0.0), count: (self.count - before.count).max(0.0) }
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The q-quantile, interpolated linearly inside its bucket as Prometheus' `histogram_quantile` does
    /// (so it is an estimate, as good as the buckets); the highest finite bound when it falls past them.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map(|b| b.1).filter(|&t| t > 0.0)?;
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, c) in &self.buckets {
            if c >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let span = c - lower.1;
                let frac = if span > 0.0 { (rank - lower.1) / span } else { 1.0 };
                return Some(lower.0 + (le - lower.0) * frac);
            }
            lower = (le, c);
        }
        Some(lower.0)
    }

    /// Adds another process's histogram with the same buckets (for totals over instances).
    pub fn add(&mut self, other: &Histogram) {
        for &(le, c) in &other.buckets {
            match self.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some((_, mine)) => *mine += c,
                None => self.buckets.push((le, c)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.sum += other.sum;
        self.count += other.count;
    }
}

const TIME: &str = "omega_scheduler_time_microseconds_total";

/// One scheduler process's counters at one instant (see `schedulers/src/scheduler.rs` for what each counts).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SchedulerCounters {
    pub attempts: f64,
    /// The paper's transactions: jobs in attempts that sent claims.
    pub transactions: f64,
    pub transactions_conflicted: f64,
    pub placed: f64,
    pub claims_conflicted: f64,
    pub busy_secs: f64,
    pub commit_secs: f64,
    pub lock_wait_secs: f64,
    /// Wall time with nothing ready to attempt, waiting for the cache to show the scheduler's own commits,
    /// and in bookkeeping (ownership, finding ready jobs, status writes).
    pub idle_secs: f64,
    pub cache_wait_secs: f64,
    pub bookkeeping_secs: f64,
    pub commit_txn: Histogram,
    pub first_attempt_wait: Histogram,
}

impl SchedulerCounters {
    pub fn parse(text: &str) -> SchedulerCounters {
        SchedulerCounters {
            attempts: counter(text, "omega_scheduler_attempts_total"),
            transactions: counter(text, "omega_scheduler_transactions_total"),
            transactions_conflicted: counter(text, "omega_scheduler_attempts_conflicted_total"),
            placed: counter(text, "omega_scheduler_placements_total"),
            claims_conflicted: counter(text, "omega_scheduler_conflicts_total"),
            busy_secs: counter(text, "omega_scheduler_busy_microseconds_total") / 1e6,
            commit_secs: counter(text, "omega_scheduler_commit_microseconds_total") / 1e6,
            lock_wait_secs: counter(text, "omega_scheduler_lock_wait_microseconds_total") / 1e6,
            idle_secs: counter_where(text, TIME, "phase=\"idle\"") / 1e6,
            cache_wait_secs: counter_where(text, TIME, "phase=\"cache_wait\"") / 1e6,
            bookkeeping_secs: ["claim_jobs", "ready_jobs", "status"]
                .iter()
                .map(|p| counter_where(text, TIME, &format!("phase=\"{p}\"")))
                .sum::<f64>()
                / 1e6,
            commit_txn: Histogram::parse(text, "omega_scheduler_commit_txn_seconds"),
            first_attempt_wait: Histogram::parse(text, "omega_scheduler_job_wait_first_attempt_seconds"),
        }
    }

    pub fn since(&self, b: &SchedulerCounters) -> SchedulerCounters {
        SchedulerCounters {
            attempts: self.attempts - b.attempts,
            transactions: self.transactions - b.transactions,
            transactions_conflicted: self.transactions_conflicted - b.transactions_conflicted,
            placed: self.placed - b.placed,
            claims_conflicted: self.claims_conflicted - b.claims_conflicted,
            busy_secs: self.busy_secs - b.busy_secs,
            commit_secs: self.commit_secs - b.commit_secs,
            lock_wait_secs: self.lock_wait_secs - b.lock_wait_secs,
            idle_secs: self.idle_secs - b.idle_secs,
            cache_wait_secs: self.cache_wait_secs - b.cache_wait_secs,
            bookkeeping_secs: self.bookkeeping_secs - b.bookkeeping_secs,
            commit_txn: self.commit_txn.since(&b.commit_txn),
            first_attempt_wait: self.first_attempt_wait.since(&b.first_attempt_wait),
        }
    }

    pub fn add(&mut self, o: &SchedulerCounters) {
        self.attempts += o.attempts;
        self.transactions += o.transactions;
        self.transactions_conflicted += o.transactions_conflicted;
        self.placed += o.placed;
        self.claims_conflicted += o.claims_conflicted;
        self.busy_secs += o.busy_secs;
        self.commit_secs += o.commit_secs;
        self.lock_wait_secs += o.lock_wait_secs;
        self.idle_secs += o.idle_secs;
        self.cache_wait_secs += o.cache_wait_secs;
        self.bookkeeping_secs += o.bookkeeping_secs;
        self.commit_txn.add(&o.commit_txn);
        self.first_attempt_wait.add(&o.first_attempt_wait);
    }

    /// Claims sent: each either committed or conflicted.
    pub fn claims(&self) -> f64 {
        self.placed + self.claims_conflicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# TYPE omega_scheduler_attempts_total counter
omega_scheduler_attempts_total{scheduler=\"batch\",instance=\"b0\"} 10
omega_scheduler_conflicts_total{scheduler=\"batch\",instance=\"b0\",reason=\"node_changed\"} 3
omega_scheduler_conflicts_total{scheduler=\"batch\",instance=\"b0\",reason=\"no_room\"} 2
omega_scheduler_commit_txn_seconds_bucket{scheduler=\"batch\",le=\"0.001\"} 0
omega_scheduler_commit_txn_seconds_bucket{scheduler=\"batch\",le=\"0.01\"} 50
omega_scheduler_commit_txn_seconds_bucket{scheduler=\"batch\",le=\"0.1\"} 100
omega_scheduler_commit_txn_seconds_bucket{scheduler=\"batch\",le=\"+Inf\"} 100
omega_scheduler_commit_txn_seconds_sum{scheduler=\"batch\"} 2.5
omega_scheduler_commit_txn_seconds_count{scheduler=\"batch\"} 100
";

    #[test]
    fn counters_sum_over_label_sets_and_never_match_a_longer_name() {
        assert_eq!(counter(TEXT, "omega_scheduler_conflicts_total"), 5.0);
        assert_eq!(counter(TEXT, "omega_scheduler_attempts_total"), 10.0);
        assert_eq!(counter(TEXT, "omega_scheduler_attempts"), 0.0);
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let h = Histogram::parse(TEXT, "omega_scheduler_commit_txn_seconds");
        assert_eq!(h.count, 100.0);
        assert_eq!(h.mean(), Some(0.025));
        // Half the samples are at or below 0.01: the median is that bucket's upper bound.
        assert!((h.quantile(0.5).unwrap() - 0.01).abs() < 1e-12);
        // p90 is 80% of the way through the (0.01, 0.1] bucket.
        assert!((h.quantile(0.9).unwrap() - 0.082).abs() < 1e-9);
        let empty = h.since(&h);
        assert_eq!((empty.count, empty.quantile(0.5)), (0.0, None));
    }
}
