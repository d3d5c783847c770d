//! Nodes grouped by zone, kept as nodes come and go, so the Cell page lays out its heat-map without sorting
//! 10,000 node names per request.
//!
//! A zone is the node's `zone` label, as the controller's disruption rules read it; nodes without one form
//! the zone `""`, shown as "(no zone)".

use imbl::{HashMap, OrdMap, OrdSet};
use omega::cell_state::{CellSnapshot, Name};

/// The label that names a node's zone.
pub const ZONE_LABEL: &str = "zone";

#[derive(Clone, Debug, Default)]
pub struct ZoneIndex {
    /// Zone -> its nodes, by name.
    pub zones: OrdMap<String, OrdSet<Name>>,
    node_zone: HashMap<Name, String>,
}

impl ZoneIndex {
    /// Builds the index from a whole snapshot.
    pub fn build(snapshot: &CellSnapshot) -> Self {
        let mut ix = ZoneIndex::default();
        for name in snapshot.nodes.keys() {
            ix.update(snapshot, name);
        }
        ix
    }

    /// Files `node` under its zone as the snapshot has it (or removes it when its record is gone).
    pub fn update(&mut self, snapshot: &CellSnapshot, node: &str) {
        let zone = snapshot.nodes.get(node).map(|n| n.value.labels.get(ZONE_LABEL).cloned().unwrap_or_default());
        let old = self.node_zone.get(node).cloned();
        if old == zone {
            return;
        }
        if let Some(old) = old {
            if let Some(set) = self.zones.get_mut(&old) {
                set.remove(node);
                if set.is_empty() {
                    self.zones.remove(&old);
                }
            }
            self.node_zone.remove(node);
        }
        if let Some(zone) = zone {
            let name = Name::from(node);
            self.zones.entry(zone.clone()).or_default().insert(name.clone());
            self.node_zone.insert(name, zone);
        }
    }

    pub fn zone_of(&self, node: &str) -> Option<&str> {
        self.node_zone.get(node).map(String::as_str)
    }
}

/// How a zone is shown.
pub fn zone_label(zone: &str) -> &str {
    if zone.is_empty() {
        "(no zone)"
    } else {
        zone
    }
}
