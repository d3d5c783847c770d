//! The cell-state cache: a process-local copy of everything under `<prefix>cell/`, fed by a [`Watcher`].
//!
//! Schedulers decide on this copy, not on etcd. The copy is held in persistent maps (`imbl`), so publishing a
//! new version after every batch of changes is O(1) and a reader's [`CellSnapshot`] is an immutable value it
//! can score against for as long as it likes without blocking the writer or other readers. Each snapshot
//! says which etcd revision it reflects; commits compare against the mod_revisions it carries.

use crate::error::{Error, Result};
use crate::keys::{Key, Keys};
use crate::model::{
    Allocation, Drain, Job, JobOwner, Liveness, NamespaceUse, Node, Quota, SchedulerInstance, Task, TaskState,
};
use crate::store::{Store, DEFAULT_PAGE_SIZE};
use crate::watcher::{Change, WatchEvent, Watcher, WatcherStats};
use etcd_client::KeyValue;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A decoded value and the revision at which it was last written (what a compare-and-swap compares).
#[derive(Debug)]
pub struct Versioned<T> {
    pub value: Arc<T>,
    pub mod_revision: i64,
}

impl<T> Clone for Versioned<T> {
    fn clone(&self) -> Self {
        Versioned { value: Arc::clone(&self.value), mod_revision: self.mod_revision }
    }
}

impl<T> Versioned<T> {
    pub fn new(value: T, mod_revision: i64) -> Self {
        Versioned { value: Arc::new(value), mod_revision }
    }
}

impl<T: PartialEq> PartialEq for Versioned<T> {
    fn eq(&self, other: &Self) -> bool {
        self.mod_revision == other.mod_revision && self.value == other.value
    }
}

/// Keys of the cache's maps. A persistent map copies the nodes on the path of every change while a snapshot
/// still shares them, and a node holds up to 32 entries: with `String` keys each copy allocated every key
/// again (malloc was the largest cost of a scheduler placing 6,000 tasks/s); an `Arc<str>` is a count.
pub type Name = Arc<str>;

type Map<T> = imbl::HashMap<Name, Versioned<T>>;

/// The cell as of one etcd revision. Cloning is cheap (structural sharing).
#[derive(Clone, Debug, Default)]
pub struct CellSnapshot {
    /// Every change up to and including this revision is reflected, and none after it.
    pub revision: i64,
    pub nodes: Map<Node>,
    pub live: Map<Liveness>,
    pub allocations: Map<Allocation>,
    pub jobs: Map<Job>,
    pub tasks: Map<Task>,
    /// Job id -> the scheduler instance placing it.
    pub owners: Map<JobOwner>,
    /// `<scheduler>/<instance>` -> a live scheduler instance.
    pub schedulers: Map<SchedulerInstance>,
    /// Node -> its drain, while one is recorded.
    pub drains: Map<Drain>,
    /// Namespace -> its quota, where one is set.
    pub quotas: Map<Quota>,
    /// Namespace -> what its tasks hold now (derived from `tasks`: a claim checks its namespace's quota
    /// against it without summing every task).
    pub namespace_use: imbl::HashMap<Name, NamespaceUse>,
    /// Node -> ids of the tasks holding resources there (derived from `tasks`; for anti-affinity, spread and
    /// choosing preemption victims without scanning every task).
    pub node_tasks: imbl::HashMap<Name, imbl::HashSet<Name>>,
    /// Job -> ids of its pending tasks (derived from `tasks`): a scheduler asks "what is left to place?" of
    /// every job on every pass, and walking each job's tasks to answer made a pass cost O(all tasks).
    pub pending: imbl::HashMap<Name, imbl::HashSet<Name>>,
    /// Values under the cell prefix that could not be decoded (logged and left out).
    pub undecodable: u64,
}

impl CellSnapshot {
    /// Builds a snapshot from a full listing at `revision`.
    pub fn from_kvs(keys: &Keys, kvs: &[KeyValue], revision: i64) -> Self {
        let mut s = CellSnapshot { revision, ..Default::default() };
        for kv in kvs {
            s.apply_put(keys, kv);
        }
        s
    }

    /// Applies one put from etcd.
    pub fn apply_put(&mut self, keys: &Keys, kv: &KeyValue) {
        self.apply_put_bytes(keys, kv.key(), kv.value(), kv.mod_revision());
    }

    /// Applies one put given as raw key and value (what [`apply_put`](Self::apply_put) unpacks; also for
    /// tests and benchmarks that have no etcd `KeyValue`).
    pub fn apply_put_bytes(&mut self, keys: &Keys, key: &[u8], value: &[u8], mod_revision: i64) {
        let Ok(key) = std::str::from_utf8(key) else { return };
        let ok = match keys.parse(key) {
            Some(Key::Node(name)) => put(&mut self.nodes, name, key, value, mod_revision),
            Some(Key::Live(name)) => put(&mut self.live, name, key, value, mod_revision),
            Some(Key::Alloc(name)) => put(&mut self.allocations, name, key, value, mod_revision),
            Some(Key::Job(name)) => put(&mut self.jobs, name, key, value, mod_revision),
            Some(Key::Task(id)) => {
                self.unindex_task(id);
                let ok = put(&mut self.tasks, id, key, value, mod_revision);
                self.index_task(id);
                ok
            }
            Some(Key::Owner(job)) => put(&mut self.owners, job, key, value, mod_revision),
            Some(Key::Scheduler(name)) => put(&mut self.schedulers, name, key, value, mod_revision),
            Some(Key::Drain(node)) => put(&mut self.drains, node, key, value, mod_revision),
            Some(Key::Quota(ns)) => put(&mut self.quotas, ns, key, value, mod_revision),
            Some(Key::Assignment { .. } | Key::Status(_) | Key::Submission(_)) | None => true,
        };
        if !ok {
            self.undecodable += 1;
        }
    }

    /// Applies one delete.
    pub fn apply_delete(&mut self, keys: &Keys, key: &[u8]) {
        let Ok(key) = std::str::from_utf8(key) else { return };
        match keys.parse(key) {
            Some(Key::Node(name)) => drop(self.nodes.remove(name)),
            Some(Key::Live(name)) => drop(self.live.remove(name)),
            Some(Key::Alloc(name)) => drop(self.allocations.remove(name)),
            Some(Key::Job(name)) => drop(self.jobs.remove(name)),
            Some(Key::Task(id)) => {
                self.unindex_task(id);
                self.tasks.remove(id);
            }
            Some(Key::Owner(job)) => drop(self.owners.remove(job)),
            Some(Key::Scheduler(name)) => drop(self.schedulers.remove(name)),
            Some(Key::Drain(node)) => drop(self.drains.remove(node)),
            Some(Key::Quota(ns)) => drop(self.quotas.remove(ns)),
            Some(Key::Assignment { .. } | Key::Status(_) | Key::Submission(_)) | None => {}
        }
    }

    /// Replaces a task in this snapshot (keeping the node index right). For a scheduler's private view: what
    /// it reserved during a decision or learned from its own commit, before its cache shows it.
    pub fn put_task(&mut self, task: Versioned<Task>) {
        let id = task.value.id.clone();
        self.unindex_task(&id);
        self.tasks.insert(Name::from(id.as_str()), task);
        self.index_task(&id);
    }

    fn unindex_task(&mut self, id: &str) {
        let Some(old) = self.tasks.get(id) else { return };
        if old.value.state == TaskState::Pending {
            if let Some(set) = self.pending.get_mut(old.value.job.as_str()) {
                set.remove(id);
                if set.is_empty() {
                    self.pending.remove(old.value.job.as_str());
                }
            }
        }
        if old.value.state.holds_resources() {
            let ns = old.value.namespace.as_str();
            let resources = old.value.resources;
            if let Some(u) = self.namespace_use.get_mut(ns) {
                u.remove(resources);
                if u.tasks == 0 {
                    self.namespace_use.remove(ns);
                }
            }
        }
        if let (true, Some(node)) = (old.value.state.holds_resources(), old.value.node.as_deref()) {
            if let Some(set) = self.node_tasks.get_mut(node) {
                set.remove(id);
                if set.is_empty() {
                    self.node_tasks.remove(node);
                }
            }
        }
    }

    fn index_task(&mut self, id: &str) {
        let Some(new) = self.tasks.get(id) else { return };
        if new.value.state == TaskState::Pending {
            self.pending.entry(Name::from(new.value.job.as_str())).or_default().insert(Name::from(id));
        }
        if new.value.state.holds_resources() {
            self.namespace_use.entry(Name::from(new.value.namespace.as_str())).or_default().add(new.value.resources);
        }
        if let (true, Some(node)) = (new.value.state.holds_resources(), new.value.node.as_deref()) {
            self.node_tasks.entry(Name::from(node)).or_default().insert(Name::from(id));
        }
    }

    /// The tasks holding resources on `node`.
    pub fn tasks_on(&self, node: &str) -> impl Iterator<Item = &Versioned<Task>> {
        self.node_tasks.get(node).into_iter().flat_map(|ids| ids.iter().filter_map(|id| self.tasks.get(id)))
    }

    /// What namespace `ns`'s tasks hold now.
    pub fn use_of(&self, ns: &str) -> NamespaceUse {
        self.namespace_use.get(ns).copied().unwrap_or_default()
    }

    /// How many tasks of job `job` are pending.
    pub fn pending_count(&self, job: &str) -> usize {
        self.pending.get(job).map_or(0, imbl::HashSet::len)
    }

    /// The pending tasks of job `job`, by index (the order `tasks_of` gives), without walking the others.
    pub fn pending_of(&self, job: &str) -> Vec<&Versioned<Task>> {
        let mut out: Vec<&Versioned<Task>> =
            self.pending.get(job).into_iter().flat_map(|ids| ids.iter().filter_map(|id| self.tasks.get(id))).collect();
        out.sort_by_key(|t| t.value.index);
        out
    }

    /// The tasks of a job, by index: ids `<job>/0 .. <job>/<index_end-1>`, with gaps where an update retired
    /// replicas.
    pub fn tasks_of<'a>(&'a self, job: &'a Job) -> impl Iterator<Item = &'a Versioned<Task>> + 'a {
        (0..job.index_end()).filter_map(move |i| self.tasks.get(crate::keys::task_id(&job.id, i).as_str()))
    }

    /// Applies a batch of watch changes and moves to `revision`.
    pub fn apply_changes(&mut self, keys: &Keys, changes: &[Change], revision: i64) {
        for change in changes {
            match change {
                Change::Put(kv) => self.apply_put(keys, kv),
                Change::Delete { key, .. } => self.apply_delete(keys, key),
            }
        }
        self.revision = self.revision.max(revision);
    }

    /// Whether a node is registered, alive (its lease-bound key exists) and accepting claims.
    pub fn is_schedulable(&self, node: &str) -> bool {
        self.live.contains_key(node) && self.allocations.get(node).is_some_and(|a| a.value.schedulable)
    }
}

/// The objects a batch of changes touched, each once.
fn changed_objects(keys: &Keys, changes: &[Change]) -> Vec<CellObject> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for change in changes {
        let key = match change {
            Change::Put(kv) => kv.key(),
            Change::Delete { key, .. } => key.as_slice(),
        };
        let Some(object) = std::str::from_utf8(key).ok().and_then(|k| keys.parse(k)).and_then(CellObject::of) else {
            continue;
        };
        if seen.insert(object.clone()) {
            out.push(object);
        }
    }
    out
}

/// Decodes and stores; a value that does not decode is logged and its entry removed, so the cache never
/// holds a stale value for a key whose current value it cannot read.
fn put<T: DeserializeOwned>(map: &mut Map<T>, name: &str, key: &str, value: &[u8], rev: i64) -> bool {
    match serde_json::from_slice::<T>(value) {
        Ok(v) => {
            map.insert(Name::from(name), Versioned::new(v, rev));
            true
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "undecodable value in the cell; ignored");
            map.remove(name);
            false
        }
    }
}

/// Options of the cache.
#[derive(Clone, Debug)]
pub struct CellStateOptions {
    /// Keys per page when (re)listing the cell.
    pub page_size: i64,
}

impl Default for CellStateOptions {
    fn default() -> Self {
        CellStateOptions { page_size: DEFAULT_PAGE_SIZE }
    }
}

/// Counters of the cache's life, for metrics and tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct CellStateStats {
    pub watcher: WatcherStats,
    pub change_batches: u64,
    pub resets: u64,
}

/// An object of the cell, as consumers that react per object (the controller) name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CellObject {
    /// A node: its record, its liveness key or its ledger changed.
    Node(String),
    /// A job: its record or its owner changed.
    Job(String),
    /// A task, by id (`<job>/<index>`).
    Task(String),
}

impl CellObject {
    /// The object a key of the cell belongs to (`None` for keys no per-object consumer follows).
    pub fn of(key: Key<'_>) -> Option<CellObject> {
        match key {
            Key::Node(n) | Key::Live(n) | Key::Alloc(n) | Key::Drain(n) => Some(CellObject::Node(n.to_string())),
            Key::Quota(_) => None,
            Key::Job(j) | Key::Owner(j) => Some(CellObject::Job(j.to_string())),
            Key::Task(t) => Some(CellObject::Task(t.to_string())),
            Key::Scheduler(_) | Key::Assignment { .. } | Key::Status(_) | Key::Submission(_) => None,
        }
    }
}

/// What one published snapshot changed.
#[derive(Debug)]
pub enum CellChanges {
    /// The cache was rebuilt from a listing: anything may have changed.
    All { revision: i64 },
    /// These objects changed (a key of theirs was written or deleted), up to `revision`.
    Objects { revision: i64, objects: Vec<CellObject> },
}

/// Change notices kept for slow subscribers before they are told to start over ([`CellChanges::All`] is
/// then what they must assume).
const CHANGE_BACKLOG: usize = 1024;

/// The running cache: a background task applying watch events, and channels of published snapshots and of
/// what each one changed.
pub struct CellState {
    rx: watch::Receiver<Arc<CellSnapshot>>,
    changes: tokio::sync::broadcast::Sender<Arc<CellChanges>>,
    stats: watch::Receiver<CellStateStats>,
    task: JoinHandle<()>,
}

impl CellState {
    /// Lists the cell and starts watching it. Returns once the first full snapshot is published, retrying
    /// etcd for as long as it takes (the watcher logs each failure).
    pub async fn start(store: Store, options: CellStateOptions) -> Result<CellState> {
        let keys = store.keys().clone();
        let mut watcher = Watcher::new(store, keys.cell_prefix(), options.page_size);
        let first = watcher.next().await;
        let mut snapshot = match first {
            WatchEvent::Reset { kvs, revision } => CellSnapshot::from_kvs(&keys, &kvs, revision),
            // A new watcher always lists first.
            _ => CellSnapshot::default(),
        };
        let (tx, rx) = watch::channel(Arc::new(snapshot.clone()));
        let (changes_tx, _) = tokio::sync::broadcast::channel(CHANGE_BACKLOG);
        let mut stats = CellStateStats { resets: 1, watcher: watcher.stats(), ..Default::default() };
        let (stats_tx, stats_rx) = watch::channel(stats);
        let notices = changes_tx.clone();
        let task = tokio::spawn(async move {
            loop {
                let notice = match watcher.next().await {
                    WatchEvent::Reset { kvs, revision } => {
                        snapshot = CellSnapshot::from_kvs(&keys, &kvs, revision);
                        stats.resets += 1;
                        Some(CellChanges::All { revision })
                    }
                    WatchEvent::Changes { changes, revision } => {
                        snapshot.apply_changes(&keys, &changes, revision);
                        stats.change_batches += 1;
                        // Worked out only for someone who listens (the controller; schedulers do not).
                        let objects =
                            if notices.receiver_count() > 0 { changed_objects(&keys, &changes) } else { Vec::new() };
                        (!objects.is_empty()).then_some(CellChanges::Objects { revision, objects })
                    }
                    WatchEvent::Progress { revision } => {
                        if revision <= snapshot.revision {
                            continue;
                        }
                        snapshot.revision = revision;
                        None
                    }
                };
                stats.watcher = watcher.stats();
                let _ = stats_tx.send(stats);
                // Published before the notice, so a subscriber woken by a notice reads a snapshot holding it.
                let published = tx.send(Arc::new(snapshot.clone()));
                if let Some(notice) = notice {
                    // No subscriber is not an error: most consumers only read snapshots.
                    let _ = notices.send(Arc::new(notice));
                }
                if published.is_err() {
                    // Every reader is gone.
                    return;
                }
            }
        });
        Ok(CellState { rx, changes: changes_tx, stats: stats_rx, task })
    }

    /// Notices of what each published snapshot changed, from now on. A subscriber that falls more than
    /// [`CHANGE_BACKLOG`] notices behind gets `Lagged` from the channel and must assume everything changed.
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<Arc<CellChanges>> {
        self.changes.subscribe()
    }

    /// The newest snapshot. Cheap: an `Arc` clone.
    pub fn snapshot(&self) -> Arc<CellSnapshot> {
        self.rx.borrow().clone()
    }

    /// A receiver that wakes on every new snapshot (for loops that react to changes).
    pub fn subscribe(&self) -> watch::Receiver<Arc<CellSnapshot>> {
        self.rx.clone()
    }

    pub fn stats(&self) -> CellStateStats {
        *self.stats.borrow()
    }

    /// Waits until the cache reflects at least `revision` (for example one's own commit), up to `timeout`.
    pub async fn wait_for_revision(&self, revision: i64, timeout: Duration) -> Result<Arc<CellSnapshot>> {
        let mut rx = self.rx.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|s| s.revision >= revision)).await;
        match waited {
            Ok(Ok(s)) => Ok(s.clone()),
            Ok(Err(_)) => Err(Error::CacheStopped),
            Err(_) => Err(Error::Timeout(timeout, format!("the cell-state cache to reach revision {revision}"))),
        }
    }
}

impl Drop for CellState {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Allocation;
    use crate::resources::Resources;

    #[test]
    fn the_pending_index_follows_every_change_to_a_task() {
        let keys = Keys::default();
        let mut s = CellSnapshot::default();
        let job = crate::model::Job::new("j", crate::model::JobKind::Batch, 3, Resources::new(1, 1));
        for i in [2, 0, 1] {
            let t = crate::model::Task::pending(&job, i);
            s.apply_put_bytes(&keys, keys.task(&t.id).as_bytes(), &serde_json::to_vec(&t).unwrap(), 3);
        }
        let indices = |s: &CellSnapshot| s.pending_of("j").iter().map(|t| t.value.index).collect::<Vec<_>>();
        assert_eq!((s.pending_count("j"), indices(&s)), (3, vec![0, 1, 2]));
        // Placed through the watch, placed in a private view, deleted: each leaves the index.
        let mut placed = crate::model::Task::pending(&job, 1);
        placed.state = TaskState::Assigned;
        placed.node = Some("n1".into());
        s.apply_put_bytes(&keys, keys.task("j/1").as_bytes(), &serde_json::to_vec(&placed).unwrap(), 4);
        let before = s.clone();
        let mut view = s.clone();
        let mut zero = crate::model::Task::pending(&job, 0);
        zero.state = TaskState::Assigned;
        view.put_task(Versioned::new(zero, 5));
        assert_eq!(indices(&view), vec![2]);
        assert_eq!(indices(&before), vec![0, 2], "a clone keeps its own index");
        s.apply_delete(&keys, keys.task("j/2").as_bytes());
        assert_eq!(indices(&s), vec![0]);
        // Back to pending (a lost node's task, re-queued), and the last one gone: the job leaves the index.
        s.apply_put_bytes(
            &keys,
            keys.task("j/1").as_bytes(),
            &serde_json::to_vec(&crate::model::Task::pending(&job, 1)).unwrap(),
            6,
        );
        assert_eq!(indices(&s), vec![0, 1]);
        s.apply_delete(&keys, keys.task("j/0").as_bytes());
        s.apply_delete(&keys, keys.task("j/1").as_bytes());
        assert!(s.pending.is_empty() && s.pending_count("j") == 0);
    }

    #[test]
    fn puts_deletes_and_garbage() {
        let keys = Keys::default();
        let mut s = CellSnapshot::default();
        let ledger = serde_json::to_vec(&Allocation::empty("n1", Resources::new(1, 2))).unwrap();
        s.apply_put_bytes(&keys, keys.alloc("n1").as_bytes(), &ledger, 7);
        s.apply_put_bytes(&keys, keys.node("n2").as_bytes(), b"not json", 8);
        s.apply_put_bytes(&keys, keys.assignment("n1", "j/0").as_bytes(), b"{}", 9);
        assert_eq!(s.allocations.get("n1").map(|v| v.mod_revision), Some(7));
        assert!(s.nodes.is_empty());
        assert_eq!(s.undecodable, 1);
        // Not schedulable without a liveness key.
        assert!(!s.is_schedulable("n1"));
        s.apply_delete(&keys, keys.alloc("n1").as_bytes());
        assert!(s.allocations.is_empty());
    }

    #[test]
    fn a_clone_is_unaffected_by_later_changes() {
        let keys = Keys::default();
        let mut s = CellSnapshot::default();
        let job = crate::model::Job::new("j", crate::model::JobKind::Batch, 1, Resources::new(1, 1));
        let mut task = crate::model::Task::pending(&job, 0);
        s.apply_put_bytes(&keys, keys.task("j/0").as_bytes(), &serde_json::to_vec(&task).unwrap(), 3);
        let before = s.clone();
        task.state = TaskState::Assigned;
        s.apply_put_bytes(&keys, keys.task("j/0").as_bytes(), &serde_json::to_vec(&task).unwrap(), 4);
        assert_eq!(before.tasks.get("j/0").unwrap().value.state, TaskState::Pending);
        assert_eq!(s.tasks.get("j/0").unwrap().value.state, TaskState::Assigned);
    }
}
