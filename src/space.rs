//! etcd's space quota, as this process has seen it.
//!
//! When etcd's backend reaches `--quota-backend-bytes` it raises the NOSPACE alarm and refuses every request
//! that adds data until an operator compacts, defragments and disarms it. Two things would make that worse:
//!
//! - etcd 3.4 prices a transaction by the puts at its top level only (`costTxn` in its quota check and in the
//!   applier it switches to once the alarm is raised). A transaction whose writes all sit in nested
//!   sub-transactions costs nothing, so it passes both and is applied while plain writes are refused: claims
//!   and releases kept landing and the database grew ~20% past its quota. The [`crate::txn`] layer therefore
//!   gives every such transaction a price (see there), and etcd refuses it like any other write.
//! - Every writer retrying at full speed against a full etcd turns refusals into load and log noise. [`Space`]
//!   remembers that etcd is full: it says so once (an error line with the commands that recover, and the
//!   `omega_etcd_space_exceeded` gauge), lets one write per [`PROBE_EVERY`] through to learn whether room is
//!   back, refuses the others here without a round trip ([`Error::NoSpace`]), and says once when etcd has room
//!   again. Deletes, reads and lease renewals are never held: etcd takes them while full, and deleting is how
//!   room comes back.

use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Says what `omega_etcd_space_exceeded` means to the process's metrics exporter and starts it at 0, so that
/// every component serves it from the start (a gauge that appears only once etcd is full cannot be told apart
/// from a component that is not scraped). Call once, after installing the exporter.
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "omega_etcd_space_exceeded",
        "1 while etcd is out of space (NOSPACE alarm) as this process sees it: writes that add data are held, \
         nothing is lost; free space and disarm the alarm (README, Troubleshooting)"
    );
    metrics::gauge!("omega_etcd_space_exceeded").set(0.0);
}

/// How often one held write goes to etcd to find out whether it has room again.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// What this process knows about etcd's space; shared by every clone of a [`crate::store::Store`].
pub struct Space {
    endpoints: String,
    /// [`PROBE_EVERY`], shorter in unit tests.
    every: Duration,
    state: Mutex<State>,
    /// Held by the one write that goes to etcd as the probe while it is full.
    probe: tokio::sync::Mutex<()>,
    held: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Since when etcd has been refusing writes for lack of space (`None`: it has room, as far as we know).
    full_since: Option<Instant>,
    /// When etcd last refused a write for lack of space.
    refused_at: Option<Instant>,
    /// How many writes etcd refused for lack of space (a write that waited learns whether a probe was
    /// refused meanwhile).
    refusals: u64,
}

/// Lets one write through to etcd while it is full; the next probe waits until this one has its answer.
pub struct Probe<'a>(#[allow(dead_code)] tokio::sync::MutexGuard<'a, ()>);

impl Space {
    pub fn new(endpoints: &[String]) -> Self {
        Self::probing_every(endpoints, PROBE_EVERY)
    }

    fn probing_every(endpoints: &[String], every: Duration) -> Self {
        Space {
            endpoints: endpoints.join(","),
            every,
            state: Mutex::new(State::default()),
            probe: tokio::sync::Mutex::new(()),
            held: AtomicU64::new(0),
        }
    }

    /// Whether etcd refused the last write it was sent for lack of space.
    pub fn is_full(&self) -> bool {
        self.state.lock().full_since.is_some()
    }

    /// How long etcd has been full, if it is.
    pub fn full_for(&self) -> Option<Duration> {
        self.state.lock().full_since.map(|t| t.elapsed())
    }

    /// Writes refused here, without a round trip, while etcd was full.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Waits for a write's turn. `Ok(None)`: etcd has room, send. `Ok(Some(probe))`: etcd is full and this
    /// write goes as the probe (hold the probe until its answer is [observed](Self::observe)).
    /// `Err(NoSpace)`: a probe sent while this write waited found etcd still full. Waits at most about
    /// [`PROBE_EVERY`] plus one request.
    pub async fn admit(&self) -> Result<Option<Probe<'_>>> {
        if !self.is_full() {
            return Ok(None);
        }
        let seen = self.state.lock().refusals;
        let guard = self.probe.lock().await;
        let refused_at = {
            let state = self.state.lock();
            if state.full_since.is_none() {
                return Ok(None);
            }
            if state.refusals > seen {
                self.held.fetch_add(1, Ordering::Relaxed);
                return Err(Error::NoSpace);
            }
            state.refused_at
        };
        if let Some(refused) = refused_at {
            tokio::time::sleep_until(refused + self.every).await;
        }
        if !self.is_full() {
            return Ok(None);
        }
        Ok(Some(Probe(guard)))
    }

    /// Learns from the answer to a write that adds data.
    pub fn observe<T>(&self, result: &Result<T>) {
        match result {
            Ok(_) => self.has_room(),
            Err(e) if e.is_no_space() => self.refused(),
            Err(_) => {}
        }
    }

    fn refused(&self) {
        let mut state = self.state.lock();
        let now = Instant::now();
        state.refused_at = Some(now);
        state.refusals += 1;
        if state.full_since.is_none() {
            state.full_since = Some(now);
            metrics::gauge!("omega_etcd_space_exceeded").set(1.0);
            tracing::error!(
                endpoints = %self.endpoints,
                "etcd is out of space (NOSPACE alarm): writes that add data are held here and one is tried every \
                 {every:?}; nothing is lost. To recover, free space and disarm (README, Troubleshooting): \
                 etcdctl --endpoints {e} compact <revision> --physical; etcdctl --endpoints {e} defrag; \
                 etcdctl --endpoints {e} alarm disarm",
                e = self.endpoints,
                every = self.every
            );
        }
    }

    fn has_room(&self) {
        let mut state = self.state.lock();
        if let Some(since) = state.full_since.take() {
            metrics::gauge!("omega_etcd_space_exceeded").set(0.0);
            tracing::warn!(endpoints = %self.endpoints, full_for = ?since.elapsed(), held = self.held(),
                "etcd has room again; writes resume");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn no_space() -> Result<()> {
        Err(Error::NoSpace)
    }

    const EVERY: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn while_full_one_write_probes_and_those_waiting_for_it_are_refused_here() {
        let space = Arc::new(Space::probing_every(&["http://127.0.0.1:1".to_string()], EVERY));
        assert!(space.admit().await.unwrap().is_none(), "room: send at once");
        space.observe(&no_space());
        assert!(space.is_full());

        // The first write after a refusal waits out the probe interval and goes as the probe.
        let started = Instant::now();
        let probe = space.admit().await.unwrap().expect("a probe");
        assert!(started.elapsed() >= EVERY);
        // A write asking meanwhile waits for the probe's answer; the answer is "still full": refused here.
        let other = space.clone();
        let waiter = tokio::spawn(async move { other.admit().await.map(|p| p.is_some()) });
        tokio::task::yield_now().await;
        space.observe(&no_space());
        drop(probe);
        assert!(matches!(waiter.await.unwrap(), Err(Error::NoSpace)));
        assert_eq!(space.held(), 1);

        // The next probe finds room: every write goes at once again.
        let probe = space.admit().await.unwrap().expect("the next probe");
        space.observe(&Ok(()));
        drop(probe);
        assert!(!space.is_full());
        assert!(space.admit().await.unwrap().is_none());
    }
}
