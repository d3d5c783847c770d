//! Why a task fits nowhere, in the aggregate form people can act on:
//! `0/120 nodes available: 80 insufficient memory, 40 constraint zone=b`.
//!
//! Each node is counted once, under the first filter that rejected it, so the counts add up to the number
//! of nodes. Reason codes are stable strings for scripts and metrics.

use crate::resources::Dimension;
use std::collections::BTreeMap;
use std::fmt;

/// Why one node was rejected for one task.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Down (no liveness key), drained, or without a ledger.
    NotSchedulable,
    /// A job constraint does not hold; carries the constraint as written (`zone=b`).
    Constraint(String),
    /// Anti-affinity: a task of the same job is already there.
    AntiAffinity,
    /// Not enough free room in this dimension.
    Insufficient(Dimension),
}

impl Reason {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::NotSchedulable => "not_schedulable",
            Reason::Constraint(_) => "constraint",
            Reason::AntiAffinity => "anti_affinity",
            Reason::Insufficient(Dimension::Cpu) => "insufficient_cpu",
            Reason::Insufficient(Dimension::Memory) => "insufficient_memory",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotSchedulable => f.write_str("not schedulable"),
            Reason::Constraint(c) => write!(f, "constraint {c}"),
            Reason::AntiAffinity => f.write_str("anti-affinity"),
            Reason::Insufficient(d) => write!(f, "insufficient {d}"),
        }
    }
}

/// The aggregate answer to "why is it pending?". Scripts get [`Explanation::codes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Explanation {
    /// Nodes considered.
    pub nodes: usize,
    /// Nodes rejected, by reason.
    pub rejected: BTreeMap<Reason, usize>,
    /// The job's namespace has no room left under its quota: no node was even considered.
    pub quota: Option<QuotaShortfall>,
}

/// Why a namespace's quota stops a task: which limit, how much of it is used, what one task asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaShortfall {
    pub namespace: String,
    pub dimension: crate::model::QuotaDimension,
    /// In the dimension's unit (millicores, bytes, tasks).
    pub used: u64,
    pub limit: u64,
    pub asks: u64,
}

impl fmt::Display for QuotaShortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::model::QuotaDimension as D;
        use crate::units::show;
        let (used, limit, asks) = match self.dimension {
            D::Cpu => (show::cpu(self.used), show::cpu(self.limit), show::cpu(self.asks)),
            D::Memory => (show::memory(self.used), show::memory(self.limit), show::memory(self.asks)),
            D::Tasks => (self.used.to_string(), self.limit.to_string(), "1".to_string()),
        };
        write!(
            f,
            "quota of namespace {}: {} {used} of {limit} in use, a task asks {asks} (raise it with `omctl quota set`, \
             or wait for its tasks to finish)",
            self.namespace, self.dimension
        )
    }
}

impl Explanation {
    pub fn reject(&mut self, reason: Reason) {
        *self.rejected.entry(reason).or_default() += 1;
    }

    /// Counts by stable code (several constraints add up under `constraint`).
    pub fn codes(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        if let Some(q) = &self.quota {
            out.insert(format!("over_quota_{}", q.dimension), 1);
            return out;
        }
        for (r, n) in &self.rejected {
            *out.entry(r.code().to_string()).or_default() += *n as u32;
        }
        out
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(q) = &self.quota {
            return q.fmt(f);
        }
        let available = self.nodes.saturating_sub(self.rejected.values().sum::<usize>());
        write!(f, "{available}/{} nodes available", self.nodes)?;
        let mut reasons: Vec<(&Reason, &usize)> = self.rejected.iter().collect();
        // Most common first; ties in a stable order.
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (i, (reason, n)) in reasons.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { ", " })?;
            write!(f, "{n} {reason}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_like_nomad() {
        let mut e = Explanation { nodes: 120, ..Default::default() };
        for _ in 0..80 {
            e.reject(Reason::Insufficient(Dimension::Memory));
        }
        for _ in 0..40 {
            e.reject(Reason::Constraint("zone=b".into()));
        }
        assert_eq!(e.to_string(), "0/120 nodes available: 80 insufficient memory, 40 constraint zone=b");
        assert_eq!(e.codes().get("insufficient_memory"), Some(&80));
        assert_eq!(e.codes().get("constraint"), Some(&40));
        assert_eq!(Explanation { nodes: 3, ..Default::default() }.to_string(), "3/3 nodes available");
    }
}
