//! `omctl nodes`: every node with its liveness, schedulability and what is claimed on it.

use crate::cell;
use crate::cli::Cli;
use crate::exit::Code;
use crate::output::{emit, Table};
use crate::units;
use omega::resources::Resources;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// `omctl nodes -o json`.
#[derive(Serialize)]
pub struct NodesOutput {
    pub revision: i64,
    pub nodes: Vec<NodeRow>,
    /// Sums over every node's ledger.
    pub total: Totals,
}

#[derive(Serialize)]
pub struct NodeRow {
    pub name: String,
    /// Its agent's lease-bound liveness key exists.
    pub alive: bool,
    /// New claims may land on it now: alive, and its ledger accepts claims.
    pub schedulable: bool,
    /// Its ledger refuses new claims (drained or marked down).
    pub drained: bool,
    /// From the ledger (the node record's when there is no ledger).
    pub capacity: Resources,
    pub used: Resources,
    pub free: Resources,
    /// Tasks holding resources on it, per its ledger.
    pub tasks: u32,
    pub labels: BTreeMap<String, String>,
    pub address: Option<String>,
    pub registered_at_ms: u64,
    /// Whether a node record / a ledger exists (both do for a registered node).
    pub has_record: bool,
    pub has_ledger: bool,
}

#[derive(Serialize, Default)]
pub struct Totals {
    pub nodes: usize,
    pub alive: usize,
    pub schedulable: usize,
    pub capacity: Resources,
    pub used: Resources,
    pub tasks: u64,
}

pub async fn run(cli: &Cli) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    let keys = store.keys();
    // Ledgers first: they change most and fix the revision.
    let read = cell::read(&store, &[keys.alloc(""), keys.nodes_prefix(), keys.live("")]).await?;
    let s = &read.snapshot;
    let names: BTreeSet<&omega::cell_state::Name> = s.nodes.keys().chain(s.allocations.keys()).collect();
    let mut total = Totals::default();
    let mut rows = Vec::new();
    for name in names {
        let node = s.nodes.get(&**name).map(|n| &n.value);
        let ledger = s.allocations.get(&**name).map(|a| &a.value);
        let capacity = ledger.map(|l| l.capacity).or(node.map(|n| n.capacity)).unwrap_or_default();
        let used = ledger.map(|l| l.used).unwrap_or_default();
        let row = NodeRow {
            name: name.to_string(),
            alive: s.live.contains_key(&**name),
            schedulable: s.is_schedulable(name),
            drained: ledger.is_some_and(|l| !l.schedulable),
            capacity,
            used,
            free: Resources::free(capacity, used),
            tasks: ledger.map(|l| l.tasks).unwrap_or(0),
            labels: node.map(|n| n.labels.clone()).unwrap_or_default(),
            address: node.and_then(|n| n.address.clone()),
            registered_at_ms: node.map(|n| n.registered_at_ms).unwrap_or(0),
            has_record: node.is_some(),
            has_ledger: ledger.is_some(),
        };
        total.nodes += 1;
        total.alive += usize::from(row.alive);
        total.schedulable += usize::from(row.schedulable);
        total.capacity = total.capacity.saturating_add(row.capacity);
        total.used = total.used.saturating_add(row.used);
        total.tasks += u64::from(row.tasks);
        rows.push(row);
    }
    let out = NodesOutput { revision: read.revision, nodes: rows, total };
    emit(cli.output, &out, || render(&out))?;
    Ok(Code::Ok)
}

fn cpu_cell(used: u64, capacity: u64) -> String {
    format!("{}/{} ({})", units::cores(used), units::cores(capacity), units::percent(used, capacity))
}

fn memory_cell(used: u64, capacity: u64) -> String {
    format!("{}/{} ({})", units::memory(used), units::memory(capacity), units::percent(used, capacity))
}

fn render(out: &NodesOutput) -> String {
    if out.nodes.is_empty() {
        return "No nodes registered. Nodes join when their agent starts.\n".into();
    }
    let mut t = Table::new(&["NAME", "ALIVE", "SCHEDULABLE", "CPU", "MEMORY", "TASKS", "LABELS"]);
    for n in &out.nodes {
        let schedulable = match (n.schedulable, n.drained, n.alive, n.has_ledger) {
            (true, ..) => "yes",
            (false, _, _, false) => "no (no ledger)",
            (false, true, _, _) => "no (drained)",
            (false, _, false, _) => "no (down)",
            _ => "no",
        };
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        t.row(vec![
            n.name.clone(),
            if n.alive { "yes" } else { "no" }.into(),
            schedulable.into(),
            cpu_cell(n.used.cpu_millis, n.capacity.cpu_millis),
            memory_cell(n.used.memory_bytes, n.capacity.memory_bytes),
            n.tasks.to_string(),
            labels.join(","),
        ]);
    }
    let tot = &out.total;
    let mut text = t.render();
    text.push_str(&format!(
        "\n{} nodes ({} alive, {} schedulable); cpu {}; memory {}; {} tasks\n",
        tot.nodes,
        tot.alive,
        tot.schedulable,
        cpu_cell(tot.used.cpu_millis, tot.capacity.cpu_millis),
        memory_cell(tot.used.memory_bytes, tot.capacity.memory_bytes),
        tot.tasks
    ));
    text
}
