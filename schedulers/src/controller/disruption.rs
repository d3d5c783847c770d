//! Eviction storms: when many nodes lapse at once, the likelier cause is etcd or the network, not the nodes.
//!
//! A node is alive while its agent renews a lease through etcd. When etcd is paused or overloaded (etcd 3.4
//! makes a renewal wait for the apply queue), or the network between the agents and etcd fails, many leases
//! lapse together while the nodes run on. Releasing all their tasks would restart the whole cell for nothing
//! and pile the re-placements onto an etcd that is already struggling. So, like Kubernetes' node lifecycle
//! controller (its unhealthy-zone threshold, secondary eviction rate and full-disruption mode), the
//! controller looks at how many nodes lapsed together before it gives a node's tasks up:
//!
//! - nodes are grouped into zones by their `zone` label (nodes without one form one zone, `""`); the cell is
//!   every node;
//! - a down node *counts as lapsed* while it still holds tasks (its release is waiting or held back), or
//!   while it went down less than `window` ago (about one agent lease TTL: how long a struggling etcd takes
//!   to let every lease lapse) and this leader saw it go. A down node that holds nothing and went down
//!   earlier counts for nothing: whatever took it has been dealt with;
//! - a zone, or the cell, is *disrupted* when at least `min_nodes` of its nodes lapsed and they are more than
//!   `threshold` of its nodes (those alive plus those lapsed);
//! - the cell disrupted: no node's tasks are released, until enough nodes come back;
//! - a zone disrupted (the cell not): its nodes' tasks are released at most `zone_rate` nodes a second
//!   (0: none), longest down first. A released node holds nothing, so it stops counting once out of the
//!   window: a zone that really died is drained at the rate until what is left of it no longer makes a
//!   disruption (fewer than `min_nodes`, or not more than `threshold`), and the rest go at once;
//! - otherwise a down node's tasks are released once it has been down for the grace, as they always were.
//!
//! A node that comes back keeps its tasks (every release is compared on its liveness key being absent). When
//! enough nodes are back the disruption ends, and the nodes still down are released like any other.
//!
//! Pure: it is given the nodes and the time, and keeps only what must outlive one decision (each zone's
//! state and rate budget, the nodes it holds back), so every rule is tested without etcd or a clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// The rules' settings (`omega-controller --unhealthy-zone-threshold, --disruption-min-nodes,
/// --disruption-window, --disrupted-zone-eviction-rate`).
#[derive(Clone, Debug, PartialEq)]
pub struct DisruptionPolicy {
    /// A zone or the cell is disrupted when more than this fraction of its nodes lapsed; 1 never.
    pub threshold: f64,
    /// ...and at least this many: two nodes of a three-node cell dying together is not an etcd problem.
    pub min_nodes: usize,
    /// Nodes that went down within this long of now count as lapsing together.
    pub window: Duration,
    /// Nodes a second whose tasks are released in a disrupted zone of a cell that is not; 0 holds them all.
    pub zone_rate: f64,
}

impl Default for DisruptionPolicy {
    fn default() -> Self {
        DisruptionPolicy {
            threshold: 1.0 / 3.0,
            min_nodes: 3,
            // The agents' default lease TTL.
            window: Duration::from_secs(15),
            zone_rate: 0.1,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("the unhealthy threshold {0} is not a fraction between 0 and 1")]
    Threshold(f64),
    #[error("the disrupted zones' eviction rate {0} is not a number of nodes per second (0 or more)")]
    Rate(f64),
    #[error("the disruption minimum must be at least one node")]
    MinNodes,
}

impl DisruptionPolicy {
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(PolicyError::Threshold(self.threshold));
        }
        if !self.zone_rate.is_finite() || self.zone_rate < 0.0 {
            return Err(PolicyError::Rate(self.zone_rate));
        }
        if self.min_nodes == 0 {
            return Err(PolicyError::MinNodes);
        }
        Ok(())
    }
}

impl std::fmt::Display for DisruptionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "disrupted past {:.0}% of a zone or the cell lapsed (at least {} nodes) within {:?}; \
             a disrupted zone evicts {} nodes/s, a disrupted cell none",
            self.threshold * 100.0,
            self.min_nodes,
            self.window,
            self.zone_rate
        )
    }
}

/// One node as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    pub name: &'a str,
    /// Its `zone` label, `""` without one.
    pub zone: &'a str,
    pub health: Health,
}

#[derive(Clone, Copy, Debug)]
pub enum Health {
    Alive,
    Down {
        /// When this leader first saw it down (the grace runs from here).
        since: Instant,
        /// Whether this leader saw it go, rather than finding it down when it took over (then when it went
        /// is unknown, and only its tasks make it count).
        witnessed: bool,
        /// Whether tasks are still placed on it.
        holds_tasks: bool,
    },
}

/// Nodes of a zone or of the cell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub nodes: usize,
    pub alive: usize,
    pub down: usize,
    pub lapsed: usize,
}

impl Count {
    fn add(&mut self, health: &Health, lapsed: bool) {
        self.nodes += 1;
        match health {
            Health::Alive => self.alive += 1,
            Health::Down { .. } => self.down += 1,
        }
        self.lapsed += usize::from(lapsed);
    }

    /// Nodes the threshold is a fraction of: those alive and those lapsed (not those long gone).
    pub fn considered(&self) -> usize {
        self.alive + self.lapsed
    }

    pub fn disrupted(&self, policy: &DisruptionPolicy) -> bool {
        // With slack, so that a third of nine nodes is not "more than a third" by a rounding error.
        self.lapsed >= policy.min_nodes && self.lapsed as f64 > policy.threshold * self.considered() as f64 + EPSILON
    }
}

/// Where a disruption is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Cell,
    Zone(String),
}

/// A zone or the cell became disrupted, or stopped being: what the controller logs, once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Disrupted(Scope, Count),
    Recovered(Scope, Count),
}

/// Look at the cell again after `after`, through `node` (a down node: a look at one is a look at all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wake {
    pub after: Duration,
    pub node: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZoneReport {
    pub count: Count,
    pub disrupted: bool,
}

/// What to do now.
#[derive(Debug, Default)]
pub struct Decision {
    /// Down past the grace, holding tasks: release them now.
    pub release: Vec<String>,
    /// Down past the grace, holding tasks, held back by a disruption.
    pub held: Vec<String>,
    /// When the answer changes with nothing else changing (a zone's rate allows one more release, or a lapse
    /// falls out of the window); `None`: only when nodes come back or go.
    pub look_again: Option<Wake>,
    pub changes: Vec<Change>,
    pub cell: Count,
    pub cell_disrupted: bool,
    /// Every zone with nodes, and for one decision a zone that has none any more (all zero).
    pub zones: BTreeMap<String, ZoneReport>,
    /// Nodes held back now that were not at the previous decision.
    pub newly_held: usize,
    /// Nodes held back at the previous decision that are alive now.
    pub returned: usize,
}

/// The rules and what they remember between decisions. One per leadership: a new leader starts afresh.
#[derive(Debug)]
pub struct Disruption {
    policy: DisruptionPolicy,
    grace: Duration,
    cell_disrupted: bool,
    zones: BTreeMap<String, ZoneMemory>,
    held: BTreeSet<String>,
}

#[derive(Debug)]
struct ZoneMemory {
    disrupted: bool,
    budget: Budget,
}

/// A token bucket holding at most one release: a disrupted zone starts empty, so its first release waits one
/// interval too (a storm is most often over within seconds).
#[derive(Debug)]
struct Budget {
    tokens: f64,
    at: Instant,
}

/// Rounding slack, so a wake-up computed to land on a whole token finds one.
const EPSILON: f64 = 1e-6;

impl Budget {
    fn empty(now: Instant) -> Budget {
        Budget { tokens: 0.0, at: now }
    }

    fn refill(&mut self, now: Instant, rate: f64) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(1.0);
        self.at = self.at.max(now);
    }

    fn take(&mut self, now: Instant, rate: f64) -> bool {
        self.refill(now, rate);
        if self.tokens + EPSILON >= 1.0 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            true
        } else {
            false
        }
    }

    /// How long until the next whole token (`None` at rate 0).
    fn until_next(&self, rate: f64) -> Option<Duration> {
        (rate > 0.0).then(|| Duration::from_secs_f64(((1.0 - self.tokens) / rate).max(0.0)) + Duration::from_millis(1))
    }
}

impl Disruption {
    pub fn new(policy: DisruptionPolicy, grace: Duration) -> Disruption {
        Disruption { policy, grace, cell_disrupted: false, zones: BTreeMap::new(), held: BTreeSet::new() }
    }

    pub fn policy(&self) -> &DisruptionPolicy {
        &self.policy
    }

    /// The zones it thinks disrupted now (to clear their gauges when this leader stands down).
    pub fn zones(&self) -> impl Iterator<Item = &str> {
        self.zones.keys().map(String::as_str)
    }

    /// Looks at every node of the cell and decides which down nodes' tasks may be released now.
    pub fn decide<'a>(&mut self, nodes: impl IntoIterator<Item = NodeView<'a>>, now: Instant) -> Decision {
        let policy = &self.policy;
        let mut cell = Count::default();
        let mut zones: BTreeMap<&str, Count> = BTreeMap::new();
        // Down past the grace and holding tasks: (since, name, zone).
        let mut candidates: Vec<(Instant, &str, &str)> = Vec::new();
        // The earliest time a node stops counting as lapsed on its own (leaves the window holding nothing).
        let mut expiry: Option<(Instant, &str)> = None;
        let mut alive: HashMap<&str, bool> = HashMap::new();
        for node in nodes {
            let lapsed = match node.health {
                Health::Alive => false,
                Health::Down { since, witnessed, holds_tasks } => {
                    let down_for = now.saturating_duration_since(since);
                    let recent = witnessed && down_for < policy.window;
                    if recent && !holds_tasks && expiry.is_none_or(|(e, _)| since + policy.window < e) {
                        expiry = Some((since + policy.window, node.name));
                    }
                    if holds_tasks && down_for >= self.grace {
                        candidates.push((since, node.name, node.zone));
                    }
                    holds_tasks || recent
                }
            };
            if self.held.contains(node.name) {
                alive.insert(node.name, matches!(node.health, Health::Alive));
            }
            cell.add(&node.health, lapsed);
            zones.entry(node.zone).or_default().add(&node.health, lapsed);
        }

        let mut decision = Decision { cell, ..Decision::default() };
        let cell_disrupted = cell.disrupted(policy);
        if cell_disrupted != self.cell_disrupted {
            let change = if cell_disrupted { Change::Disrupted } else { Change::Recovered };
            decision.changes.push(change(Scope::Cell, cell));
            self.cell_disrupted = cell_disrupted;
        }
        decision.cell_disrupted = cell_disrupted;
        for (zone, count) in &zones {
            let disrupted = count.disrupted(policy);
            let memory = self
                .zones
                .entry(zone.to_string())
                .or_insert_with(|| ZoneMemory { disrupted: false, budget: Budget::empty(now) });
            if disrupted && !memory.disrupted {
                memory.budget = Budget::empty(now);
                decision.changes.push(Change::Disrupted(Scope::Zone(zone.to_string()), *count));
            } else if !disrupted && memory.disrupted {
                decision.changes.push(Change::Recovered(Scope::Zone(zone.to_string()), *count));
            }
            memory.disrupted = disrupted;
            decision.zones.insert(zone.to_string(), ZoneReport { count: *count, disrupted });
        }
        let gone: Vec<String> = self.zones.keys().filter(|z| !zones.contains_key(z.as_str())).cloned().collect();
        for zone in gone {
            if self.zones.remove(&zone).is_some_and(|m| m.disrupted) {
                decision.changes.push(Change::Recovered(Scope::Zone(zone.clone()), Count::default()));
            }
            decision.zones.insert(zone, ZoneReport::default());
        }

        candidates.sort();
        let rate = policy.zone_rate;
        let mut limited: BTreeSet<&str> = BTreeSet::new();
        let mut held_zones: Vec<&str> = Vec::new();
        for (_, name, zone) in candidates {
            let memory = self.zones.get_mut(zone);
            let release = match memory {
                _ if cell_disrupted => false,
                Some(m) if m.disrupted => {
                    limited.insert(zone);
                    m.budget.take(now, rate)
                }
                _ => true,
            };
            if release {
                decision.release.push(name.to_string());
            } else {
                decision.held.push(name.to_string());
                held_zones.push(zone);
            }
        }

        let mut next = expiry.map(|(e, node)| (e.saturating_duration_since(now), node.to_string()));
        if !cell_disrupted {
            for zone in limited {
                let Some(m) = self.zones.get_mut(zone) else { continue };
                m.budget.refill(now, rate);
                let first_held = decision.held.iter().zip(&held_zones).find(|(_, z)| **z == zone);
                if let (Some(d), Some((node, _))) = (m.budget.until_next(rate), first_held) {
                    if next.as_ref().is_none_or(|(n, _)| d < *n) {
                        next = Some((d, node.clone()));
                    }
                }
            }
        }
        decision.look_again = next.map(|(after, node)| Wake { after, node });
        decision.returned = alive.values().filter(|a| **a).count();
        let held: BTreeSet<String> = decision.held.iter().cloned().collect();
        decision.newly_held = held.difference(&self.held).count();
        self.held = held;
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(2);

    fn policy() -> DisruptionPolicy {
        DisruptionPolicy { zone_rate: 0.5, ..DisruptionPolicy::default() }
    }

    /// A down node: when it went (after t0), whether the leader saw it go, whether it holds tasks.
    type Lapse = (Duration, bool, bool);

    struct Cell {
        t0: Instant,
        /// Name, zone, and how it is down (`None`: alive).
        nodes: Vec<(String, String, Option<Lapse>)>,
    }

    /// `zones` zones (`a`, `b`, ...) of `per_zone` nodes each (`a-0`, `a-1`, ...), all alive.
    fn cell(zones: usize, per_zone: usize) -> Cell {
        let mut nodes = Vec::new();
        for z in 0..zones {
            let zone = ((b'a' + z as u8) as char).to_string();
            for i in 0..per_zone {
                nodes.push((format!("{zone}-{i}"), zone.clone(), None));
            }
        }
        Cell { t0: Instant::now(), nodes }
    }

    impl Cell {
        /// `name` went down `at` after t0 (seen going), holding tasks.
        fn down(&mut self, name: &str, at: Duration) {
            self.set(name, Some((at, true, true)));
        }

        fn set(&mut self, name: &str, state: Option<Lapse>) {
            let node = self.nodes.iter_mut().find(|n| n.0 == name).expect("a node of the test cell");
            node.2 = state;
        }

        fn zone_down(&mut self, zone: &str, at: Duration) {
            let names: Vec<String> = self.nodes.iter().filter(|n| n.1 == zone).map(|n| n.0.clone()).collect();
            for n in names {
                self.down(&n, at);
            }
        }

        fn views(&self) -> Vec<NodeView<'_>> {
            self.nodes
                .iter()
                .map(|(name, zone, state)| NodeView {
                    name,
                    zone,
                    health: match state {
                        None => Health::Alive,
                        Some((at, witnessed, holds_tasks)) => {
                            Health::Down { since: self.t0 + *at, witnessed: *witnessed, holds_tasks: *holds_tasks }
                        }
                    },
                })
                .collect()
        }

        fn decide(&self, d: &mut Disruption, at: Duration) -> Decision {
            d.decide(self.views(), self.t0 + at)
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_node_down_alone_is_released_after_its_grace() {
        let mut c = cell(3, 4);
        let mut d = Disruption::new(policy(), GRACE);
        c.down("a-1", secs(0.0));
        let early = c.decide(&mut d, secs(1.0));
        assert!(early.release.is_empty() && early.held.is_empty(), "within the grace: {early:?}");
        let due = c.decide(&mut d, secs(2.0));
        assert_eq!(due.release, vec!["a-1"]);
        assert!(due.changes.is_empty() && !due.cell_disrupted);
        assert_eq!(due.cell, Count { nodes: 12, alive: 11, down: 1, lapsed: 1 });
    }

    #[test]
    fn too_few_nodes_are_no_disruption() {
        // Two of three: more than a third, but fewer than the minimum of three.
        let mut c = cell(1, 3);
        let mut d = Disruption::new(policy(), GRACE);
        c.down("a-0", secs(0.0));
        c.down("a-1", secs(0.0));
        let out = c.decide(&mut d, secs(3.0));
        assert_eq!(out.release, vec!["a-0", "a-1"]);
        assert!(!out.cell_disrupted);
    }

    #[test]
    fn a_third_exactly_is_no_disruption_more_is() {
        let mut c = cell(1, 9);
        let mut d = Disruption::new(policy(), GRACE);
        for i in 0..3 {
            c.down(&format!("a-{i}"), secs(0.0));
        }
        assert_eq!(c.decide(&mut d, secs(3.0)).release.len(), 3);
        let mut c = cell(1, 9);
        let mut d = Disruption::new(policy(), GRACE);
        for i in 0..4 {
            c.down(&format!("a-{i}"), secs(0.0));
        }
        let out = c.decide(&mut d, secs(3.0));
        assert!(out.cell_disrupted && out.release.is_empty());
        assert_eq!(out.held.len(), 4);
    }

    #[test]
    fn the_whole_cell_lapsing_holds_every_eviction_until_nodes_come_back() {
        let mut c = cell(3, 4);
        let mut d = Disruption::new(policy(), GRACE);
        for z in ["a", "b", "c"] {
            c.zone_down(z, secs(0.0));
        }
        let storm = c.decide(&mut d, secs(3.0));
        assert!(storm.cell_disrupted);
        assert!(storm.release.is_empty());
        assert_eq!(storm.held.len(), 12);
        assert_eq!(storm.newly_held, 12);
        assert_eq!(storm.look_again, None, "nothing but nodes coming back can end it");
        assert!(storm.changes.contains(&Change::Disrupted(Scope::Cell, storm.cell)));
        assert_eq!(storm.zones.values().filter(|z| z.disrupted).count(), 3);
        // Still held much later: the rate of a disrupted zone does not apply while the cell is disrupted.
        let later = c.decide(&mut d, secs(600.0));
        assert_eq!((later.release.len(), later.held.len(), later.newly_held), (0, 12, 0));
        assert!(later.changes.is_empty(), "a state is reported once: {:?}", later.changes);
        // Ten come back; the two still down are released at once, as any node would be.
        for z in ["a", "b"] {
            for i in 0..4 {
                c.set(&format!("{z}-{i}"), None);
            }
        }
        c.set("c-0", None);
        c.set("c-1", None);
        let back = c.decide(&mut d, secs(601.0));
        assert!(!back.cell_disrupted);
        assert_eq!(back.returned, 10);
        assert_eq!(back.release, vec!["c-2", "c-3"]);
        assert!(back.changes.contains(&Change::Recovered(Scope::Cell, back.cell)));
        assert!(back.changes.contains(&Change::Recovered(Scope::Zone("c".into()), back.zones["c"].count)));
    }

    #[test]
    fn a_disrupted_zone_is_released_at_its_rate_longest_down_first() {
        let mut c = cell(3, 4);
        let mut d = Disruption::new(policy(), GRACE);
        // Zone b: a third of the cell (not more), all of the zone.
        c.down("b-0", secs(0.3));
        c.down("b-1", secs(0.1));
        c.down("b-2", secs(0.2));
        c.down("b-3", secs(0.0));
        let first = c.decide(&mut d, secs(2.5));
        assert!(!first.cell_disrupted && first.zones["b"].disrupted && !first.zones["a"].disrupted);
        assert_eq!(first.changes, vec![Change::Disrupted(Scope::Zone("b".into()), first.zones["b"].count)]);
        assert!(first.release.is_empty(), "a disrupted zone's budget starts empty");
        assert_eq!(first.held, vec!["b-3", "b-1", "b-2", "b-0"], "longest down first");
        let wake = Wake { after: secs(2.0) + Duration::from_millis(1), node: "b-3".into() };
        assert_eq!(first.look_again, Some(wake), "one every 2 s at 0.5/s");
        let mut released = Vec::new();
        let mut t = 2.5;
        while released.len() < 4 {
            t += 2.0;
            let out = c.decide(&mut d, secs(t));
            assert_eq!(out.release.len(), 1, "one per interval at {t}: {out:?}");
            for n in &out.release {
                c.set(n, Some((secs(0.0), true, false)));
            }
            released.extend(out.release);
        }
        assert_eq!(released, vec!["b-3", "b-1", "b-2", "b-0"]);
        // Released nodes hold nothing and leave the count once out of the window: the zone recovers.
        let after = c.decide(&mut d, secs(15.0));
        assert!(!after.zones["b"].disrupted);
        assert_eq!(after.changes, vec![Change::Recovered(Scope::Zone("b".into()), after.zones["b"].count)]);
    }

    #[test]
    fn a_rate_of_zero_holds_a_disrupted_zone() {
        let mut c = cell(3, 4);
        let mut d = Disruption::new(DisruptionPolicy { zone_rate: 0.0, ..policy() }, GRACE);
        c.zone_down("b", secs(0.0));
        let out = c.decide(&mut d, secs(100.0));
        assert_eq!((out.release.len(), out.held.len(), out.look_again), (0, 4, None));
    }

    #[test]
    fn empty_nodes_count_only_within_the_window_and_only_if_seen_going() {
        let mut c = cell(1, 9);
        let mut d = Disruption::new(policy(), GRACE);
        // Three lapsed together holding nothing, one holding tasks: a disruption while they are recent.
        for i in 0..3 {
            c.set(&format!("a-{i}"), Some((secs(0.0), true, false)));
        }
        c.down("a-3", secs(0.0));
        let storm = c.decide(&mut d, secs(3.0));
        assert!(storm.cell_disrupted);
        assert_eq!(storm.held, vec!["a-3"]);
        let wake = Wake { after: secs(12.0), node: "a-0".into() };
        assert_eq!(storm.look_again, Some(wake), "when the empty ones leave the window");
        let later = c.decide(&mut d, secs(15.0));
        assert!(!later.cell_disrupted);
        assert_eq!(later.release, vec!["a-3"]);
        // A new leader finding empty nodes down does not know when they went: they do not count.
        let mut c = cell(1, 9);
        let mut d = Disruption::new(policy(), GRACE);
        for i in 0..4 {
            c.set(&format!("a-{i}"), Some((secs(0.0), false, false)));
        }
        c.set("a-4", Some((secs(0.0), false, true)));
        let out = c.decide(&mut d, secs(3.0));
        assert!(!out.cell_disrupted);
        assert_eq!(out.release, vec!["a-4"]);
        assert_eq!(out.cell.lapsed, 1);
    }

    #[test]
    fn a_node_that_comes_back_is_counted_and_forgotten() {
        let mut c = cell(1, 6);
        let mut d = Disruption::new(policy(), GRACE);
        for i in 0..4 {
            c.down(&format!("a-{i}"), secs(0.0));
        }
        assert_eq!(c.decide(&mut d, secs(3.0)).newly_held, 4);
        c.set("a-0", None);
        let out = c.decide(&mut d, secs(4.0));
        assert_eq!((out.returned, out.held.len(), out.newly_held), (1, 3, 0));
        assert!(out.cell_disrupted, "3 of 6 still lapsed");
    }

    #[test]
    fn a_zone_without_nodes_is_reported_once_and_forgotten() {
        let mut c = cell(2, 3);
        let mut d = Disruption::new(policy(), GRACE);
        c.decide(&mut d, secs(0.0));
        c.nodes.retain(|n| n.1 != "b");
        let out = c.decide(&mut d, secs(1.0));
        assert_eq!(out.zones.get("b"), Some(&ZoneReport::default()));
        assert!(!c.decide(&mut d, secs(2.0)).zones.contains_key("b"));
        assert_eq!(d.zones().collect::<Vec<_>>(), vec!["a"]);
    }

    #[test]
    fn policies_are_checked() {
        assert!(DisruptionPolicy::default().validate().is_ok());
        let bad = DisruptionPolicy { threshold: 1.5, ..DisruptionPolicy::default() };
        assert_eq!(bad.validate(), Err(PolicyError::Threshold(1.5)));
        let bad = DisruptionPolicy { zone_rate: -1.0, ..DisruptionPolicy::default() };
        assert_eq!(bad.validate(), Err(PolicyError::Rate(-1.0)));
        let bad = DisruptionPolicy { min_nodes: 0, ..DisruptionPolicy::default() };
        assert_eq!(bad.validate(), Err(PolicyError::MinNodes));
        // 1 turns the protection off: more than all of the nodes never lapse.
        let mut c = cell(1, 5);
        let mut d = Disruption::new(DisruptionPolicy { threshold: 1.0, ..policy() }, GRACE);
        c.zone_down("a", secs(0.0));
        assert_eq!(c.decide(&mut d, secs(3.0)).release.len(), 5);
    }
}
