//! Which task runners are alive on this agent.
//!
//! A preempting task may start only once the runners of the tasks it evicted have stopped their containers and
//! ended ([`crate::preemption`]), so "is a runner of task X still here" must be answerable from anywhere in
//! the agent, and waitable. Runners register when the agent creates them, before they touch containerd, and
//! leave when their supervisor ends: through a guard's drop, so a runner aborted at shutdown leaves too.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The live runners, shared by the agent loop, the runners and whoever waits on them. Cheap to clone.
#[derive(Clone)]
pub struct Runners {
    inner: Arc<Inner>,
}

struct Inner {
    /// task -> (token, placement) of each live runner of it (two while a re-placed task's old runner stops).
    live: Mutex<HashMap<String, Vec<(u64, u32)>>>,
    next_token: Mutex<u64>,
    /// Bumped on every change.
    changed: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only plain maps are behind these locks; a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for Runners {
    fn default() -> Self {
        Runners {
            inner: Arc::new(Inner {
                live: Mutex::new(HashMap::new()),
                next_token: Mutex::new(0),
                changed: watch::channel(0).0,
            }),
        }
    }
}

impl Runners {
    pub fn new() -> Self {
        Runners::default()
    }

    /// Records a runner of `task`'s `placement`; it stays recorded until the guard is dropped.
    pub fn register(&self, task: &str, placement: u32) -> RunnerGuard {
        let token = {
            let mut next = lock(&self.inner.next_token);
            *next += 1;
            *next
        };
        lock(&self.inner.live).entry(task.to_string()).or_default().push((token, placement));
        self.inner.changed.send_modify(|v| *v += 1);
        RunnerGuard { runners: self.clone(), task: task.to_string(), token }
    }

    /// Placements of `task` that have a live runner here.
    pub fn placements(&self, task: &str) -> Vec<u32> {
        lock(&self.inner.live).get(task).map(|v| v.iter().map(|(_, p)| *p).collect()).unwrap_or_default()
    }

    /// Whether a runner of `task`'s `placement` is alive here.
    pub fn has(&self, task: &str, placement: u32) -> bool {
        self.placements(task).contains(&placement)
    }

    /// Every live runner: task -> placements.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u32>> {
        lock(&self.inner.live).iter().map(|(t, v)| (t.clone(), v.iter().map(|(_, p)| *p).collect())).collect()
    }

    /// Wakes on every registration and every runner's end.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }
}

/// A runner's registration; dropping it (the runner ended, or was aborted) removes it.
pub struct RunnerGuard {
    runners: Runners,
    task: String,
    token: u64,
}

impl Drop for RunnerGuard {
    fn drop(&mut self) {
        let mut live = lock(&self.runners.inner.live);
        if let Some(v) = live.get_mut(&self.task) {
            v.retain(|(t, _)| *t != self.token);
            if v.is_empty() {
                live.remove(&self.task);
            }
        }
        drop(live);
        self.runners.inner.changed.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runners_leave_when_their_guard_drops() {
        let runners = Runners::new();
        let changed = runners.changed();
        let a = runners.register("j/0", 1);
        let b = runners.register("j/0", 2);
        assert_eq!(runners.placements("j/0"), vec![1, 2]);
        drop(a);
        assert!(!runners.has("j/0", 1) && runners.has("j/0", 2));
        drop(b);
        assert!(runners.snapshot().is_empty());
        assert!(changed.has_changed().unwrap_or(false));
    }
}
