//! Reading the cell for display: several key ranges at one revision, decoded into the library's snapshot,
//! plus the job statuses that live outside the cached range.
//!
//! Every read command takes one consistent cut: the first range fixes the revision and the others are read
//! pinned to it, so a table never mixes a task placed after its ledger was read.

use etcd_client::GetOptions;
use omega::cell_state::{CellSnapshot, Versioned};
use omega::model::{JobStatus, Task, TaskState};
use omega::store::{decode, Store, DEFAULT_PAGE_SIZE};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;

/// What one consistent read returned.
pub struct CellRead {
    pub revision: i64,
    pub snapshot: CellSnapshot,
    /// Job id -> its status record (only when the status range was read).
    pub statuses: BTreeMap<String, JobStatus>,
}

/// Reads `prefixes` (each a range under the cell prefix, or the status range) at one revision.
pub async fn read(store: &Store, prefixes: &[String]) -> anyhow::Result<CellRead> {
    let keys = store.keys();
    let mut revision = None;
    let mut kvs = Vec::new();
    for prefix in prefixes {
        let (mut got, rev) = store.list(prefix, DEFAULT_PAGE_SIZE, revision).await?;
        revision.get_or_insert(rev);
        kvs.append(&mut got);
    }
    let revision = revision.unwrap_or(0);
    let mut statuses = BTreeMap::new();
    let status_prefix = keys.status_prefix();
    for kv in &kvs {
        let Ok(key) = std::str::from_utf8(kv.key()) else { continue };
        if let Some(job) = key.strip_prefix(status_prefix.as_str()) {
            // A status that does not decode is left out, as the cache leaves out undecodable cell records.
            if let Ok(status) = decode::<JobStatus>(kv) {
                statuses.insert(job.to_string(), status);
            }
        }
    }
    let snapshot = CellSnapshot::from_kvs(keys, &kvs, revision);
    Ok(CellRead { revision, snapshot, statuses })
}

/// Reads and decodes one key as of `revision`; `None` when absent. Also returns its mod_revision.
pub async fn get_at<T: DeserializeOwned>(store: &Store, key: &str, revision: i64) -> anyhow::Result<Option<(T, i64)>> {
    let opts = (revision > 0).then(|| GetOptions::new().with_revision(revision));
    let resp = store.client().kv_client().get(key, opts).await?;
    match resp.kvs().first() {
        None => Ok(None),
        Some(kv) => Ok(Some((decode(kv)?, kv.mod_revision()))),
    }
}

/// Whether a scheduler has put the task on a node at some point: it holds resources now, or it finished
/// after being placed. A pending task, or one killed before it was ever placed, is not placed.
pub fn is_placed(task: &Task) -> bool {
    task.state.holds_resources() || (task.state.is_terminal() && (task.node.is_some() || task.placements > 0))
}

/// Tasks sorted by job, then by index as a number (`web/2` before `web/10`).
pub fn sorted<'a>(tasks: impl Iterator<Item = &'a Versioned<Task>>) -> Vec<&'a Versioned<Task>> {
    let mut out: Vec<&Versioned<Task>> = tasks.collect();
    out.sort_by(|a, b| a.value.job.cmp(&b.value.job).then(a.value.index.cmp(&b.value.index)));
    out
}

/// Counts of a job's tasks, as tables and JSON show them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TaskCounts {
    /// Tasks the job asks for.
    pub total: u32,
    /// Task records present (equals `total` once submission finished).
    pub present: u32,
    /// Tasks a scheduler has put on a node (see [`is_placed`]).
    pub placed: u32,
    /// Tasks per state (only states with at least one task).
    pub by_state: BTreeMap<String, u32>,
}

impl TaskCounts {
    pub fn of<'a>(total: u32, tasks: impl Iterator<Item = &'a Task>) -> Self {
        let mut c = TaskCounts { total, ..Default::default() };
        for t in tasks {
            c.present += 1;
            if is_placed(t) {
                c.placed += 1;
            }
            *c.by_state.entry(t.state.to_string()).or_default() += 1;
        }
        c
    }

    pub fn in_state(&self, state: TaskState) -> u32 {
        self.by_state.get(&state.to_string()).copied().unwrap_or(0)
    }

    /// `2 running, 1 pending` (most common first).
    pub fn describe(&self) -> String {
        let mut states: Vec<(&String, &u32)> = self.by_state.iter().collect();
        states.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = states.iter().map(|(s, n)| format!("{n} {s}")).collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Checks a job id given on the command line, so that a typo cannot match another job's key range.
pub fn check_job_id(id: &str) -> anyhow::Result<()> {
    omega::keys::validate_name("job", id).map_err(|e| crate::exit::user(e.to_string()))
}
