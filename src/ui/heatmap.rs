//! The node heat-map: one square per node, grouped by zone, colored by how much of it is allocated.
//!
//! Usable at 10,000 nodes (Nomad's topology view hides node names past 50, nomad #10040): a zone with more
//! nodes than fit in [`MAX_CELLS`] squares is drawn as buckets of consecutive nodes (by name), each colored by
//! its nodes' mean and outlined when any of them is down, draining or matches the search; a bucket links to a
//! zoomed view of just its nodes, where each square links to its node's page. Down nodes are dark, draining
//! ones outlined in orange, search matches in blue. All server-side SVG: the page needs no script to draw it.

use crate::cache::View;
use crate::html::{escape, heat_color, url_encode};
use crate::zones::zone_label;
use omega::cell_state::Name;
use omega::model::DrainState;
use omega::units::show;
use std::fmt::Write;

/// Squares per zone before nodes are drawn in buckets.
pub const MAX_CELLS: usize = 768;
const COLUMNS: usize = 64;
const SIZE: usize = 11;
const GAP: usize = 2;
const DOWN: &str = "#34393d";

/// What the heat-map colors by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Metric {
    /// The larger of the cpu and memory fractions: how full the node is for the next task.
    #[default]
    Max,
    Cpu,
    Memory,
}

impl Metric {
    pub fn parse(s: &str) -> Option<Metric> {
        match s {
            "max" | "" => Some(Metric::Max),
            "cpu" => Some(Metric::Cpu),
            "memory" => Some(Metric::Memory),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Max => "max",
            Metric::Cpu => "cpu",
            Metric::Memory => "memory",
        }
    }
}

/// What part of the cell to draw, and how.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub metric: Metric,
    /// Only this zone (zoomed in).
    pub zone: Option<String>,
    /// Within the zone, nodes `from..to` by name order (zoomed into a bucket).
    pub range: Option<(usize, usize)>,
    /// Outline nodes whose name contains this.
    pub search: Option<String>,
}

impl Options {
    /// The query string of these options, for links (`?metric=cpu&zone=a`), with `zone`/`range` replaced.
    pub fn query(&self, zone: Option<&str>, range: Option<(usize, usize)>) -> String {
        let mut parts = Vec::new();
        if self.metric != Metric::Max {
            parts.push(format!("metric={}", self.metric.name()));
        }
        if let Some(z) = zone {
            parts.push(format!("zone={}", url_encode(z)));
        }
        if let Some((a, b)) = range {
            parts.push(format!("from={a}&to={b}"));
        }
        if let Some(q) = self.search.as_deref().filter(|q| !q.is_empty()) {
            parts.push(format!("q={}", url_encode(q)));
        }
        if parts.is_empty() {
            "/".into()
        } else {
            format!("/?{}", parts.join("&"))
        }
    }
}

/// One node as the map draws it.
#[derive(Clone, Debug)]
pub struct NodeCell {
    pub name: Name,
    pub cpu: (u64, u64),
    pub memory: (u64, u64),
    pub tasks: u32,
    pub down: bool,
    pub draining: bool,
    pub matched: bool,
}

impl NodeCell {
    fn fraction(used: u64, cap: u64) -> f64 {
        if cap == 0 {
            0.0
        } else {
            used as f64 / cap as f64
        }
    }

    pub fn value(&self, metric: Metric) -> f64 {
        let cpu = Self::fraction(self.cpu.0, self.cpu.1);
        let mem = Self::fraction(self.memory.0, self.memory.1);
        match metric {
            Metric::Max => cpu.max(mem),
            Metric::Cpu => cpu,
            Metric::Memory => mem,
        }
    }
}

/// Sums over a zone (or the cell).
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub nodes: u64,
    pub down: u64,
    pub draining: u64,
    pub tasks: u64,
    pub cpu: (u64, u64),
    pub memory: (u64, u64),
}

impl Totals {
    pub fn add(&mut self, n: &NodeCell) {
        self.nodes += 1;
        self.down += u64::from(n.down);
        self.draining += u64::from(n.draining);
        self.tasks += u64::from(n.tasks);
        self.cpu = (self.cpu.0 + n.cpu.0, self.cpu.1 + n.cpu.1);
        self.memory = (self.memory.0 + n.memory.0, self.memory.1 + n.memory.1);
    }

    pub fn merge(&mut self, o: &Totals) {
        self.nodes += o.nodes;
        self.down += o.down;
        self.draining += o.draining;
        self.tasks += o.tasks;
        self.cpu = (self.cpu.0 + o.cpu.0, self.cpu.1 + o.cpu.1);
        self.memory = (self.memory.0 + o.memory.0, self.memory.1 + o.memory.1);
    }
}

/// One zone's nodes, in name order, and their sums.
pub struct ZoneNodes {
    pub zone: String,
    pub nodes: Vec<NodeCell>,
    pub totals: Totals,
}

/// The nodes of every zone (or the one zone `options` names), read from the view.
pub fn zones(view: &View, options: &Options) -> Vec<ZoneNodes> {
    let s = &view.snapshot;
    let search = options.search.as_deref().filter(|q| !q.is_empty());
    let mut out = Vec::new();
    for (zone, names) in view.zones.zones.iter() {
        if options.zone.as_deref().is_some_and(|z| z != zone) {
            continue;
        }
        let mut z = ZoneNodes { zone: zone.clone(), nodes: Vec::with_capacity(names.len()), totals: Totals::default() };
        for name in names.iter() {
            let node = s.nodes.get(name);
            let ledger = s.allocations.get(name);
            let capacity = ledger.map(|l| l.value.capacity).or(node.map(|n| n.value.capacity)).unwrap_or_default();
            let used = ledger.map(|l| l.value.used).unwrap_or_default();
            let drain = s.drains.get(name).is_some_and(|d| d.value.state == DrainState::Draining);
            let cell = NodeCell {
                name: name.clone(),
                cpu: (used.cpu_millis, capacity.cpu_millis),
                memory: (used.memory_bytes, capacity.memory_bytes),
                tasks: ledger.map_or(0, |l| l.value.tasks),
                down: !s.live.contains_key(name),
                draining: drain || ledger.is_some_and(|l| !l.value.schedulable),
                matched: search.is_some_and(|q| name.contains(q)),
            };
            z.totals.add(&cell);
            z.nodes.push(cell);
        }
        out.push(z);
    }
    out
}

/// The SVG of one zone: a square per node, or per bucket of nodes when there are too many.
pub fn zone_svg(z: &ZoneNodes, options: &Options) -> String {
    let (lo, hi) = match options.range {
        Some((a, b)) if options.zone.is_some() => {
            (a.min(z.nodes.len()), b.min(z.nodes.len()).max(a.min(z.nodes.len())))
        }
        _ => (0, z.nodes.len()),
    };
    let nodes = &z.nodes[lo..hi];
    let per_cell = nodes.len().div_ceil(MAX_CELLS).max(1);
    let cells = nodes.len().div_ceil(per_cell);
    let rows = cells.div_ceil(COLUMNS).max(1);
    let width = COLUMNS.min(cells.max(1)) * (SIZE + GAP);
    let height = rows * (SIZE + GAP);
    let mut svg = format!(
        "<svg class=\"heatmap\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" \
         aria-label=\"nodes of {}\">",
        escape(zone_label(&z.zone))
    );
    for (i, chunk) in nodes.chunks(per_cell).enumerate() {
        let x = (i % COLUMNS) * (SIZE + GAP);
        let y = (i / COLUMNS) * (SIZE + GAP);
        let down = chunk.iter().filter(|n| n.down).count();
        let draining = chunk.iter().filter(|n| n.draining).count();
        let matched = chunk.iter().filter(|n| n.matched).count();
        let mean = chunk.iter().map(|n| n.value(options.metric)).sum::<f64>() / chunk.len() as f64;
        let fill = if down == chunk.len() { DOWN.to_string() } else { heat_color(mean) };
        let stroke = if matched > 0 {
            "stroke=\"#1060d0\" stroke-width=\"2\""
        } else if draining > 0 {
            "stroke=\"#e07000\" stroke-width=\"2\""
        } else if down > 0 {
            "stroke=\"#34393d\" stroke-width=\"2\""
        } else {
            "stroke=\"none\""
        };
        let (href, title) = if let [n] = chunk {
            let state = if n.down {
                ", down"
            } else if n.draining {
                ", draining"
            } else {
                ""
            };
            (
                format!("/nodes/{}", url_encode(&n.name)),
                format!(
                    "{}: cpu {}/{} ({}), memory {}/{} ({}), {} tasks{state}",
                    n.name,
                    show::cores(n.cpu.0),
                    show::cores(n.cpu.1),
                    show::percent(n.cpu.0, n.cpu.1),
                    show::memory(n.memory.0),
                    show::memory(n.memory.1),
                    show::percent(n.memory.0, n.memory.1),
                    n.tasks
                ),
            )
        } else {
            let (a, b) = (lo + i * per_cell, lo + i * per_cell + chunk.len());
            let (first, last) = (&chunk[0].name, &chunk[chunk.len() - 1].name);
            (
                options.query(Some(&z.zone), Some((a, b))),
                format!(
                    "{} nodes, {first} .. {last}: mean {:.0}%{}{}{}",
                    chunk.len(),
                    mean * 100.0,
                    if down > 0 { format!(", {down} down") } else { String::new() },
                    if draining > 0 { format!(", {draining} draining") } else { String::new() },
                    if matched > 0 { format!(", {matched} match the search") } else { String::new() },
                ),
            )
        };
        let _ = write!(
            svg,
            "<a href=\"{}\"><rect x=\"{x}\" y=\"{y}\" width=\"{SIZE}\" height=\"{SIZE}\" rx=\"1.5\" fill=\"{fill}\" \
             {stroke}><title>{}</title></rect></a>",
            escape(&href),
            escape(&title)
        );
    }
    svg.push_str("</svg>");
    if per_cell > 1 {
        let _ = write!(
            svg,
            "<div class=\"muted\">{} nodes, {per_cell} per square (their mean); click a square to zoom in</div>",
            nodes.len()
        );
    }
    svg
}

/// The legend under the map.
pub fn legend(metric: Metric) -> String {
    let what = match metric {
        Metric::Max => "the larger of cpu and memory allocated",
        Metric::Cpu => "cpu allocated",
        Metric::Memory => "memory allocated",
    };
    format!(
        "<div class=\"legend muted\">Color: {what}: <span style=\"background:{}\"></span>0% \
         <span style=\"background:{}\"></span>50% <span style=\"background:{}\"></span>100% \
         <span style=\"background:{DOWN}\"></span>down <span style=\"border:2px solid #e07000\"></span>draining \
         <span style=\"border:2px solid #1060d0\"></span>matches the search</div>",
        heat_color(0.0),
        heat_color(0.5),
        heat_color(1.0)
    )
}
