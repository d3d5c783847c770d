//! The UI's copy of the cell: the core's watch-fed [`CellState`] (exactly what a scheduler keeps), a watch on
//! the job statuses beside it (pending reasons live outside the cell range, so schedulers' caches do not pay
//! for them), and indexes kept up to date from the cache's per-batch change notices.
//!
//! One task owns all of it and publishes an immutable [`View`] after every change: the snapshot, the job
//! index, the zones and the statuses, each a persistent structure, so taking a view is a few reference counts
//! and a page renders from one consistent state without locking anything. Work per change is proportional to
//! what changed (a task's state moves its job's counts by one); only a reset of the watch (after compaction,
//! or a subscriber that fell too far behind) rebuilds the indexes from the whole snapshot.

use crate::error::Result;
use crate::history::History;
use crate::index::{reason_codes, Counts, JobIndex, JobRow, NO_SCHEDULER, WAITING};
use crate::zones::ZoneIndex;
use omega::cell_state::{CellChanges, CellObject, CellSnapshot, CellState, CellStateOptions, Name};
use omega::keys::{Key, Keys};
use omega::model::{now_ms, JobState, JobStatus, Task, TaskState};
use omega::store::{Store, DEFAULT_PAGE_SIZE};
use omega::watcher::{Change, WatchEvent, Watcher};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often scheduler counters are sampled (their instances publish every 2 s while they move).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// The cell as the UI shows it, at one moment: cheap to clone, never changes.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub snapshot: Arc<CellSnapshot>,
    pub jobs: JobIndex,
    pub zones: ZoneIndex,
    /// Job id -> its scheduler's last status (why tasks are pending).
    pub statuses: imbl::HashMap<Name, Arc<JobStatus>>,
    /// Counts the views published, so a subscriber can tell a new one from the one it rendered.
    pub generation: u64,
}

/// The running cache: a background task feeding views; dropping it stops the task and its watches.
pub struct UiCache {
    view: watch::Receiver<Arc<View>>,
    history: Arc<Mutex<History>>,
    task: Option<JoinHandle<()>>,
}

impl UiCache {
    /// Lists the cell and the statuses and starts following them. Returns once the first view is published.
    pub async fn start(store: Store) -> Result<UiCache> {
        let keys = store.keys().clone();
        let cell = CellState::start(store.clone(), CellStateOptions::default()).await?;
        // Subscribed before the first snapshot is read, so no change falls between the two.
        let mut changes = cell.subscribe_changes();
        let mut snapshots = cell.subscribe();
        let mut statuses = Watcher::new(store, keys.status_prefix(), DEFAULT_PAGE_SIZE);
        let history = Arc::new(Mutex::new(History::new(now_ms())));
        let mut indexer = Indexer::new(history.clone());
        // The statuses' first listing, so the first view already explains what is pending.
        indexer.apply_statuses(&keys, statuses.next().await);
        let snapshot = cell.snapshot();
        indexer.rebuild(&snapshot);
        history.lock().sample_schedulers(&snapshot, now_ms());
        let (tx, rx) = watch::channel(Arc::new(indexer.view(snapshot)));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    notice = changes.recv() => if !indexer.on_notice(&cell, notice) { return },
                    event = statuses.next() => {
                        let touched = indexer.apply_statuses(&keys, event);
                        let snapshot = cell.snapshot();
                        for job in touched {
                            indexer.refresh_job(&snapshot, &job);
                        }
                    }
                    _ = tick.tick() => indexer.history.lock().sample_schedulers(&cell.snapshot(), now_ms()),
                }
                // Notices already sent are applied before publishing, so a view lags its snapshot as little as
                // possible (a snapshot is published before its notice).
                loop {
                    match changes.try_recv() {
                        Ok(notice) => {
                            if !indexer.on_notice(&cell, Ok(notice)) {
                                return;
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Lagged(n)) => {
                            if !indexer.on_notice(&cell, Err(RecvError::Lagged(n))) {
                                return;
                            }
                        }
                        Err(TryRecvError::Closed) => return,
                    }
                }
                let snapshot = cell.snapshot();
                indexer.follow_schedulers(&snapshot);
                if tx.send(Arc::new(indexer.view(snapshot))).is_err() {
                    return;
                }
            }
        });
        Ok(UiCache { view: rx, history, task: Some(task) })
    }

    /// A cache that never changes, built from a snapshot and statuses in memory: for rendering tests and the
    /// pure rendering benchmark, with no etcd.
    pub fn fixed(snapshot: CellSnapshot, statuses: Vec<JobStatus>) -> UiCache {
        let history = Arc::new(Mutex::new(History::new(now_ms())));
        let mut indexer = Indexer::new(history.clone());
        for st in statuses {
            indexer.statuses.insert(Name::from(st.job.as_str()), Arc::new(st));
        }
        let snapshot = Arc::new(snapshot);
        indexer.rebuild(&snapshot);
        history.lock().sample_schedulers(&snapshot, now_ms());
        let (_tx, rx) = watch::channel(Arc::new(indexer.view(snapshot)));
        UiCache { view: rx, history, task: None }
    }

    /// The newest view.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// A receiver that wakes on every new view (for server-sent events).
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    pub fn history(&self) -> &Arc<Mutex<History>> {
        &self.history
    }
}

impl Drop for UiCache {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What the index needs of a task to keep its job's counts.
#[derive(Clone, Copy, Debug)]
struct TaskBrief {
    state: TaskState,
    placed: bool,
    healthy: bool,
}

impl TaskBrief {
    fn of(t: &Task) -> Self {
        let placed = t.state.holds_resources() || (t.state.is_terminal() && (t.node.is_some() || t.placements > 0));
        // A task of a job with checks carries a health from its start (`starting`); none means no checks.
        let healthy = t.state == TaskState::Running
            && t.health.as_ref().is_none_or(|h| h.status == omega::health::HealthStatus::Healthy);
        TaskBrief { state: t.state, placed, healthy }
    }

    /// Adds this task to (`add`) or takes it from a job's counts.
    fn count(&self, c: &mut Counts, add: bool) {
        let step = |n: &mut u32| *n = if add { n.saturating_add(1) } else { n.saturating_sub(1) };
        step(&mut c.present);
        if self.placed {
            step(&mut c.placed);
        }
        if self.healthy {
            step(&mut c.healthy);
        }
        match self.state {
            TaskState::Pending => step(&mut c.pending),
            TaskState::Assigned => step(&mut c.assigned),
            TaskState::Running => step(&mut c.running),
            TaskState::Succeeded => step(&mut c.succeeded),
            TaskState::Failed => step(&mut c.failed),
            TaskState::Lost | TaskState::Killed => step(&mut c.ended_other),
        }
    }
}

/// Keeps the indexes of one cache; owned by its task.
struct Indexer {
    jobs: JobIndex,
    zones: ZoneIndex,
    statuses: imbl::HashMap<Name, Arc<JobStatus>>,
    /// Task id -> (its job, what was counted for it).
    tasks: HashMap<Name, (Name, TaskBrief)>,
    counts: HashMap<Name, Counts>,
    /// Names of the schedulers with a live instance (a pending job's reason depends on it).
    scheduler_names: BTreeSet<String>,
    history: Arc<Mutex<History>>,
    generation: u64,
}

impl Indexer {
    fn new(history: Arc<Mutex<History>>) -> Self {
        Indexer {
            jobs: JobIndex::default(),
            zones: ZoneIndex::default(),
            statuses: imbl::HashMap::new(),
            tasks: HashMap::new(),
            counts: HashMap::new(),
            scheduler_names: BTreeSet::new(),
            history,
            generation: 0,
        }
    }

    fn view(&mut self, snapshot: Arc<CellSnapshot>) -> View {
        self.generation += 1;
        View {
            snapshot,
            jobs: self.jobs.clone(),
            zones: self.zones.clone(),
            statuses: self.statuses.clone(),
            generation: self.generation,
        }
    }

    /// Applies one change notice (or rebuilds after a reset or a lag). False: the cache stopped.
    fn on_notice(&mut self, cell: &CellState, notice: Result<Arc<CellChanges>, RecvError>) -> bool {
        let snapshot = cell.snapshot();
        match notice {
            Ok(n) => match &*n {
                CellChanges::All { .. } => self.rebuild(&snapshot),
                CellChanges::Objects { objects, .. } => self.apply(&snapshot, objects),
            },
            Err(RecvError::Lagged(_)) => self.rebuild(&snapshot),
            Err(RecvError::Closed) => return false,
        }
        true
    }

    /// Builds every index from the whole snapshot.
    fn rebuild(&mut self, s: &CellSnapshot) {
        self.jobs = JobIndex::default();
        self.zones = ZoneIndex::build(s);
        self.tasks.clear();
        self.counts.clear();
        self.scheduler_names = scheduler_names(s);
        for (id, t) in s.tasks.iter() {
            let brief = TaskBrief::of(&t.value);
            let job = Name::from(t.value.job.as_str());
            brief.count(self.counts.entry(job.clone()).or_default(), true);
            self.tasks.insert(id.clone(), (job, brief));
        }
        let ids: Vec<Name> = s.jobs.keys().cloned().collect();
        for id in ids {
            self.refresh_job(s, &id);
        }
        let now = now_ms();
        let mut history = self.history.lock();
        for name in s.nodes.keys() {
            history.observe_node(name, Some(s.live.contains_key(name.as_ref())), now);
        }
    }

    /// Applies the objects one batch of changes touched.
    fn apply(&mut self, s: &CellSnapshot, objects: &[CellObject]) {
        let mut jobs: BTreeSet<Name> = BTreeSet::new();
        let now = now_ms();
        for object in objects {
            match object {
                CellObject::Task(id) => {
                    if let Some((job, old)) = self.tasks.remove(id.as_str()) {
                        if let Some(c) = self.counts.get_mut(&job) {
                            old.count(c, false);
                            if c.present == 0 {
                                self.counts.remove(&job);
                            }
                        }
                        jobs.insert(job);
                    }
                    if let Some(t) = s.tasks.get(id.as_str()) {
                        let brief = TaskBrief::of(&t.value);
                        let job = Name::from(t.value.job.as_str());
                        brief.count(self.counts.entry(job.clone()).or_default(), true);
                        self.tasks.insert(Name::from(id.as_str()), (job.clone(), brief));
                        jobs.insert(job);
                    }
                }
                CellObject::Job(id) => {
                    jobs.insert(Name::from(id.as_str()));
                }
                CellObject::Node(name) => {
                    self.zones.update(s, name);
                    let alive = s.nodes.contains_key(name.as_str()).then(|| s.live.contains_key(name.as_str()));
                    self.history.lock().observe_node(name, alive, now);
                }
            }
        }
        for job in jobs {
            self.refresh_job(s, &job);
        }
    }

    /// Applies a status watch event; returns the jobs whose status changed.
    fn apply_statuses(&mut self, keys: &Keys, event: WatchEvent) -> Vec<Name> {
        let job_of = |key: &[u8]| match std::str::from_utf8(key).ok().and_then(|k| keys.parse(k)) {
            Some(Key::Status(job)) => Some(Name::from(job)),
            _ => None,
        };
        let mut touched = Vec::new();
        match event {
            WatchEvent::Reset { kvs, .. } => {
                touched.extend(self.statuses.keys().cloned());
                self.statuses = imbl::HashMap::new();
                for kv in &kvs {
                    if let (Some(job), Ok(st)) = (job_of(kv.key()), serde_json::from_slice::<JobStatus>(kv.value())) {
                        self.statuses.insert(job.clone(), Arc::new(st));
                        touched.push(job);
                    }
                }
            }
            WatchEvent::Changes { changes, .. } => {
                for change in changes {
                    match change {
                        Change::Put(kv) => {
                            let Some(job) = job_of(kv.key()) else { continue };
                            match serde_json::from_slice::<JobStatus>(kv.value()) {
                                Ok(st) => drop(self.statuses.insert(job.clone(), Arc::new(st))),
                                Err(e) => {
                                    tracing::warn!(job = %job, error = %e, "undecodable job status; ignored");
                                    self.statuses.remove(&job);
                                }
                            }
                            touched.push(job);
                        }
                        Change::Delete { key, .. } => {
                            let Some(job) = job_of(&key) else { continue };
                            self.statuses.remove(&job);
                            touched.push(job);
                        }
                    }
                }
            }
            WatchEvent::Progress { .. } => {}
        }
        touched
    }

    /// When a scheduler's last instance goes or its first one comes, the jobs waiting for it read otherwise.
    fn follow_schedulers(&mut self, s: &CellSnapshot) {
        let names = scheduler_names(s);
        if names == self.scheduler_names {
            return;
        }
        self.scheduler_names = names;
        let mut waiting: Vec<Name> = Vec::new();
        for code in [WAITING, NO_SCHEDULER] {
            if let Some(set) = self.jobs.by_reason.get(code) {
                waiting.extend(set.iter().cloned());
            }
        }
        for job in waiting {
            self.refresh_job(s, &job);
        }
    }

    /// Rewrites one job's row from the snapshot, its counts and its status (or drops it, if it is gone).
    fn refresh_job(&mut self, s: &CellSnapshot, id: &str) {
        let Some(job) = s.jobs.get(id) else {
            self.jobs.remove(id);
            self.history.lock().observe_job(id, None, now_ms(), false);
            return;
        };
        let job = &job.value;
        let counts = self.counts.get(id).copied().unwrap_or_default();
        let active = matches!(job.state, JobState::Pending | JobState::Running);
        let (reason, codes) = if active && counts.pending > 0 {
            let status = self.statuses.get(id).map(|s| &**s);
            let running = self.scheduler_names.contains(&job.scheduler);
            let words = status.filter(|st| st.pending > 0 && !st.reason.is_empty()).map(|st| st.reason.clone());
            // As `omctl jobs` says it: the scheduler's last word, else why no scheduler has spoken.
            let reason = words.unwrap_or_else(|| {
                if running {
                    format!("waiting for scheduler {}", job.scheduler)
                } else {
                    format!("no instance of scheduler {} is running", job.scheduler)
                }
            });
            (Some(reason), reason_codes(status, running))
        } else {
            (None, Vec::new())
        };
        let row = JobRow {
            id: Name::from(id),
            namespace: job.namespace.clone(),
            kind: job.kind,
            scheduler: job.scheduler.clone(),
            priority: job.priority,
            state: job.state,
            total: job.tasks,
            counts,
            reason,
            codes,
            owner: s.owners.get(id).map(|o| format!("{}/{}", o.value.scheduler, o.value.instance)),
            submitted_at_ms: job.submitted_at_ms,
            version: job.version,
        };
        let before_ui = job.submitted_at_ms < self.history.lock().started_ms;
        self.history.lock().observe_job(id, Some((job.tasks, counts)), now_ms(), before_ui);
        if self.jobs.rows.get(id) != Some(&row) {
            self.jobs.put(row);
        }
    }
}

fn scheduler_names(s: &CellSnapshot) -> BTreeSet<String> {
    s.schedulers.values().map(|i| i.value.scheduler.clone()).collect()
}
