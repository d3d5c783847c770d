//! What only a watcher that stays can know, kept in memory by the UI server: each scheduler instance's
//! counters over time (its record holds only the latest), each node's comings and goings, and when each job
//! reached each stage of its placement.
//!
//! Nothing here is in etcd, so it starts empty when the server starts and says so: times the UI did not see
//! are shown as "before the UI started", never guessed.

use omega::cell_state::{CellSnapshot, Name};
use omega::model::SchedulerStats;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Samples kept per scheduler instance: ten minutes at the instances' 2 s publishing period.
pub const MAX_SAMPLES: usize = 300;
/// Liveness changes kept per node.
pub const MAX_TRANSITIONS: usize = 32;
/// How long an instance that went away stays on the Schedulers page.
pub const GONE_KEPT_MS: u64 = 10 * 60 * 1000;
/// An instance that has not published for this long is idle (it publishes every 2 s while its counters move):
/// the UI then records a sample of its unchanged counters, so its rates fall to zero on the charts.
const IDLE_AFTER_MS: u64 = 4_000;

/// One instance's counters, as published at `at_ms`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    pub stats: SchedulerStats,
    /// Recorded by the UI for an instance that did not publish (its counters did not move).
    pub idle: bool,
}

/// Rates over the interval between two samples, ending at `at_ms`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub at_ms: u64,
    /// The Omega paper's conflict fraction over the interval: conflicted transactions per successful one
    /// (`None` when the interval had no successful transaction).
    pub conflict_fraction: Option<f64>,
    pub attempts_per_s: f64,
    pub placements_per_s: f64,
    /// The fraction of the interval the instance spent deciding (the paper's busyness).
    pub busyness: f64,
    /// Mean commit time per transaction in the interval (`None` without transactions).
    pub commit_ms: Option<f64>,
}

/// The samples of one instance.
#[derive(Clone, Debug, Default)]
pub struct InstanceHistory {
    pub samples: VecDeque<Sample>,
    /// When the UI last saw the instance's record; `None` while it is there.
    pub gone_since_ms: Option<u64>,
}

impl InstanceHistory {
    /// Rates between consecutive samples, oldest first.
    pub fn points(&self) -> Vec<Point> {
        let s = &self.samples;
        (1..s.len()).filter_map(|i| point(&s[i - 1], &s[i])).collect()
    }
}

/// The rates between two samples (`None` when no time passed between them).
pub fn point(a: &Sample, b: &Sample) -> Option<Point> {
    let dt_ms = b.at_ms.checked_sub(a.at_ms).filter(|d| *d > 0)?;
    let secs = dt_ms as f64 / 1000.0;
    let (x, y) = (&a.stats, &b.stats);
    let d = |new: u64, old: u64| new.saturating_sub(old);
    let transactions = d(y.transactions, x.transactions);
    let conflicted = d(y.attempts_conflicted, x.attempts_conflicted);
    Some(Point {
        at_ms: b.at_ms,
        conflict_fraction: omega::model::conflict_fraction(conflicted, transactions),
        attempts_per_s: d(y.attempts, x.attempts) as f64 / secs,
        placements_per_s: d(y.placed, x.placed) as f64 / secs,
        busyness: (d(y.busy_ms, x.busy_ms) as f64 / dt_ms as f64).min(1.0),
        commit_ms: (transactions > 0).then(|| d(y.commit_ms, x.commit_ms) as f64 / transactions as f64),
    })
}

/// A node's liveness as the UI saw it change.
#[derive(Clone, Debug, Default)]
pub struct NodeLiveness {
    /// (when, alive) for each change the UI saw, oldest first; the first entry is what it found at start.
    pub changes: VecDeque<(u64, bool)>,
}

/// When a job reached each stage of its placement, as the UI saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Milestones {
    /// The job was already there when the UI started: earlier stages happened before it looked.
    pub before_ui: bool,
    pub first_placed_ms: Option<u64>,
    pub all_placed_ms: Option<u64>,
    pub first_running_ms: Option<u64>,
    pub all_running_ms: Option<u64>,
    pub first_healthy_ms: Option<u64>,
    pub all_healthy_ms: Option<u64>,
}

/// Everything the UI remembers over time.
#[derive(Debug, Default)]
pub struct History {
    /// `<scheduler>/<instance>` -> its samples.
    pub schedulers: BTreeMap<String, InstanceHistory>,
    pub nodes: HashMap<Name, NodeLiveness>,
    pub jobs: HashMap<Name, Milestones>,
    /// When the UI started watching.
    pub started_ms: u64,
}

impl History {
    pub fn new(now_ms: u64) -> Self {
        History { started_ms: now_ms, ..Default::default() }
    }

    /// Records each instance's counters if it published since the last sample, or an idle sample if it has
    /// been quiet; marks instances that went away, and forgets those gone long ago.
    pub fn sample_schedulers(&mut self, snapshot: &CellSnapshot, now_ms: u64) {
        for (key, instance) in snapshot.schedulers.iter() {
            let stats = instance.value.stats;
            let h = self.schedulers.entry(key.to_string()).or_default();
            h.gone_since_ms = None;
            match h.samples.back().copied() {
                Some(last) if !last.idle && last.stats.updated_ms == stats.updated_ms => {
                    if now_ms.saturating_sub(stats.updated_ms) >= IDLE_AFTER_MS
                        && now_ms.saturating_sub(last.at_ms) >= IDLE_AFTER_MS / 2
                    {
                        h.samples.push_back(Sample { at_ms: now_ms, stats, idle: true });
                    }
                }
                Some(last) if last.idle && last.stats.updated_ms == stats.updated_ms => {
                    if now_ms.saturating_sub(last.at_ms) >= IDLE_AFTER_MS / 2 {
                        h.samples.push_back(Sample { at_ms: now_ms, stats, idle: true });
                    }
                }
                Some(last) => {
                    // A publication that reached the UI after an idle sample taken about when it was made:
                    // the idle sample would make a rate over a few milliseconds of it.
                    if last.idle && stats.updated_ms <= last.at_ms + 1000 {
                        h.samples.pop_back();
                    }
                    let after = h.samples.back().map_or(0, |s| s.at_ms + 1);
                    h.samples.push_back(Sample { at_ms: stats.updated_ms.max(after), stats, idle: false });
                }
                None => h.samples.push_back(Sample { at_ms: stats.updated_ms.max(1), stats, idle: false }),
            }
            while h.samples.len() > MAX_SAMPLES {
                h.samples.pop_front();
            }
        }
        for (key, h) in self.schedulers.iter_mut() {
            if !snapshot.schedulers.contains_key(key.as_str()) && h.gone_since_ms.is_none() {
                h.gone_since_ms = Some(now_ms);
            }
        }
        self.schedulers.retain(|_, h| h.gone_since_ms.is_none_or(|t| now_ms.saturating_sub(t) < GONE_KEPT_MS));
    }

    /// Records a node's liveness if it changed (or the UI sees the node for the first time); `None`: the node
    /// is gone from the cell, and its history with it.
    pub fn observe_node(&mut self, node: &str, alive: Option<bool>, now_ms: u64) {
        let Some(alive) = alive else {
            self.nodes.remove(node);
            return;
        };
        let h = self.nodes.entry(Name::from(node)).or_default();
        if h.changes.back().is_none_or(|(_, was)| *was != alive) {
            h.changes.push_back((now_ms, alive));
            while h.changes.len() > MAX_TRANSITIONS {
                h.changes.pop_front();
            }
        }
    }

    /// Records the stages a job reached, from its task counts now (`None`: the job is gone).
    pub fn observe_job(&mut self, job: &str, counts: Option<(u32, crate::index::Counts)>, now_ms: u64, at_start: bool) {
        let Some((total, c)) = counts else {
            self.jobs.remove(job);
            return;
        };
        let m = self
            .jobs
            .entry(Name::from(job))
            .or_insert_with(|| Milestones { before_ui: at_start, ..Default::default() });
        let total = total.max(1);
        let mark = |slot: &mut Option<u64>, reached: bool| {
            if reached && slot.is_none() {
                *slot = Some(now_ms);
            }
        };
        mark(&mut m.first_placed_ms, c.placed > 0);
        mark(&mut m.all_placed_ms, c.placed >= total);
        let ran = c.running + c.succeeded + c.failed;
        mark(&mut m.first_running_ms, ran > 0);
        mark(&mut m.all_running_ms, ran >= total);
        mark(&mut m.first_healthy_ms, c.healthy > 0);
        mark(&mut m.all_healthy_ms, c.healthy >= total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(
        attempts: u64,
        transactions: u64,
        conflicted: u64,
        placed: u64,
        busy: u64,
        commit: u64,
        at: u64,
    ) -> SchedulerStats {
        SchedulerStats {
            attempts,
            transactions,
            attempts_conflicted: conflicted,
            placed,
            busy_ms: busy,
            commit_ms: commit,
            updated_ms: at,
            ..Default::default()
        }
    }

    #[test]
    fn rates_between_samples_follow_the_papers_definitions() {
        let a = Sample { at_ms: 10_000, stats: stats(100, 50, 10, 400, 500, 200, 10_000), idle: false };
        let b = Sample { at_ms: 12_000, stats: stats(140, 70, 15, 600, 1500, 400, 12_000), idle: false };
        let p = point(&a, &b).unwrap();
        assert_eq!(p.conflict_fraction, Some(5.0 / 15.0), "5 conflicted per 15 successful transactions");
        assert_eq!((p.attempts_per_s, p.placements_per_s, p.busyness), (20.0, 100.0, 0.5));
        assert_eq!(p.commit_ms, Some(10.0));
        assert!(point(&b, &b).is_none());
    }
}
