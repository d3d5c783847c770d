//! Watching the cell's tasks from outside, as a user would: when each task was first placed.
//!
//! Placement times come from the task records themselves (the `updated_at_ms` a scheduler writes with an
//! `assigned` task, in the claim's transaction), so an observer that falls behind under load does not stretch
//! them; a task first seen past `assigned` (its placement was compacted away or overwritten before the watch
//! delivered it) is timed when seen. One watch on the tasks range only: the observer must cost etcd little.

use omega::keys::Keys;
use omega::model::{now_ms, Task, TaskState};
use omega::store::{decode, Store, DEFAULT_PAGE_SIZE};
use omega::watcher::{Change, WatchEvent, Watcher};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::task::JoinHandle;

#[derive(Default)]
pub struct Seen {
    /// Task id -> when it was first placed (ms since the epoch).
    pub placed_at: HashMap<String, u64>,
    /// Job id -> (tasks placed, when the last of them was placed).
    pub jobs: HashMap<String, (u32, u64)>,
    /// Watch events applied, and full listings the watch had to take.
    pub events: u64,
    pub resets: u64,
    pub undecodable: u64,
}

impl Seen {
    fn saw(&mut self, task: &Task, seen_ms: u64) {
        // A task counts as placed once a claim for it committed (a cancelled task that never ran does not).
        if task.placements == 0 || self.placed_at.contains_key(&task.id) {
            return;
        }
        let at = match task.state {
            TaskState::Assigned if task.updated_at_ms > 0 => task.updated_at_ms,
            _ => seen_ms,
        };
        self.placed_at.insert(task.id.clone(), at);
        let job = self.jobs.entry(task.job.clone()).or_insert((0, 0));
        job.0 += 1;
        job.1 = job.1.max(at);
    }

    /// Tasks placed in `[from, to)` (ms), and per whole second from `from`.
    pub fn placed_between(&self, from: u64, to: u64) -> (u64, Vec<u64>) {
        let secs = to.saturating_sub(from).div_ceil(1000) as usize;
        let mut series = vec![0u64; secs];
        let mut n = 0;
        for &at in self.placed_at.values() {
            if at >= from && at < to {
                n += 1;
                series[((at - from) / 1000) as usize] += 1;
            }
        }
        (n, series)
    }
}

pub struct Observer {
    pub seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Observer {
    pub fn start(store: &Store, keys: &Keys) -> Observer {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut watcher = Watcher::new(store.clone(), keys.tasks_prefix(), DEFAULT_PAGE_SIZE);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let event = watcher.next().await;
                let now = now_ms();
                let mut seen = s.lock();
                match event {
                    WatchEvent::Reset { kvs, .. } => {
                        seen.resets += 1;
                        for kv in &kvs {
                            match decode::<Task>(kv) {
                                Ok(t) => seen.saw(&t, now),
                                Err(_) => seen.undecodable += 1,
                            }
                        }
                    }
                    WatchEvent::Changes { changes, .. } => {
                        for change in changes {
                            seen.events += 1;
                            if let Change::Put(kv) = change {
                                match decode::<Task>(&kv) {
                                    Ok(t) => seen.saw(&t, now),
                                    Err(_) => seen.undecodable += 1,
                                }
                            }
                        }
                    }
                    WatchEvent::Progress { .. } => {}
                }
            }
        });
        Observer { seen, task }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
