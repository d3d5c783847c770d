//! The controller's work queue: objects due for a look, each at most once, with backoff per object.
//!
//! Like kube-runtime's controller queue: a change puts its object in the queue (due now, or kept at its
//! earlier due time if already there); a reconciler can ask to look again later (a grace period running out);
//! an object whose reconcile failed comes back after a backoff that doubles with each failure and resets on
//! success, so one object that keeps failing neither spins nor holds up the others.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct WorkQueue<K: Clone + Eq + Hash + Ord> {
    /// Due times, earliest first; an entry is stale if `due` holds another time for its key.
    heap: BinaryHeap<Reverse<(Instant, K)>>,
    due: HashMap<K, Instant>,
    failures: HashMap<K, u32>,
}

impl<K: Clone + Eq + Hash + Ord> Default for WorkQueue<K> {
    fn default() -> Self {
        WorkQueue { heap: BinaryHeap::new(), due: HashMap::new(), failures: HashMap::new() }
    }
}

impl<K: Clone + Eq + Hash + Ord> WorkQueue<K> {
    /// Due now.
    pub fn add(&mut self, key: K) {
        self.add_at(key, Instant::now());
    }

    /// Due after `delay` (an earlier due time already set wins).
    pub fn add_after(&mut self, key: K, delay: Duration) {
        self.add_at(key, Instant::now() + delay);
    }

    fn add_at(&mut self, key: K, at: Instant) {
        match self.due.get(&key) {
            Some(existing) if *existing <= at => {}
            _ => {
                self.due.insert(key.clone(), at);
                self.heap.push(Reverse((at, key)));
            }
        }
    }

    /// Takes every object due by `now`.
    pub fn pop_due(&mut self, now: Instant) -> Vec<K> {
        let mut out = Vec::new();
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.heap.pop() else { break };
            if self.due.get(&key) == Some(&at) {
                self.due.remove(&key);
                out.push(key);
            }
        }
        out
    }

    /// When the next object is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.iter().map(|Reverse((at, _))| *at).min()
    }

    pub fn len(&self) -> usize {
        self.due.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }

    /// The reconcile of `key` failed: look again after its backoff.
    pub fn failed(&mut self, key: K) -> Duration {
        let n = self.failures.entry(key.clone()).or_default();
        *n += 1;
        let backoff = FIRST_BACKOFF.saturating_mul(1 << (*n - 1).min(16)).min(MAX_BACKOFF);
        self.add_after(key, backoff);
        backoff
    }

    /// The reconcile of `key` succeeded: its backoff starts over.
    pub fn succeeded(&mut self, key: &K) {
        self.failures.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_due_once_at_their_earliest_time() {
        let mut q = WorkQueue::default();
        q.add_after("a", Duration::from_secs(60));
        q.add("a");
        q.add("b");
        q.add("b");
        let mut due = q.pop_due(Instant::now());
        due.sort();
        assert_eq!(due, vec!["a", "b"]);
        assert!(q.is_empty());
        q.add_after("c", Duration::from_secs(60));
        assert!(q.pop_due(Instant::now()).is_empty());
        assert!(q.next_due().is_some_and(|t| t > Instant::now()));
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let mut q = WorkQueue::default();
        assert_eq!(q.failed("x"), Duration::from_millis(100));
        assert_eq!(q.failed("x"), Duration::from_millis(200));
        assert_eq!(q.failed("x"), Duration::from_millis(400));
        for _ in 0..20 {
            q.failed("x");
        }
        assert_eq!(q.failed("x"), MAX_BACKOFF);
        q.succeeded(&"x");
        assert_eq!(q.failed("x"), Duration::from_millis(100));
    }
}
