//! How many transactions a sender keeps in flight: a fixed bound, or a window that adapts to etcd.
//!
//! etcd 3.4 serves lease renewals through the same apply queue as writes, and gives a renewal about a
//! second: a scheduler that keeps etcd's queue long makes node heartbeats fail, and then the leases of whole
//! hosts lapse. So a scheduler's committer does not send as fast as it can; it keeps the commit latency
//! under a target, the way TCP keeps a queue short: the window grows by one transaction per window of
//! answers that came back under the target (additive increase), shrinks to three quarters when one came
//! back slower, and halves when etcd says it is overloaded ("too many requests", a timeout) — at most once
//! per target interval, so one slow burst is not punished as many times as it had transactions in flight.
//! The window never leaves `1..=max`; it starts at `max`, so an idle etcd sees no difference.

use parking_lot::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A bound on transactions in flight.
pub struct Window {
    max: usize,
    /// `None`: a fixed bound of `max`.
    target: Option<Duration>,
    state: Mutex<State>,
    freed: Notify,
}

struct State {
    limit: usize,
    in_flight: usize,
    /// Answers under the target since the window last grew.
    good: usize,
    last_cut: Option<Instant>,
}

/// What an answer said about etcd's load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Answered in this time.
    Answered(Duration),
    /// etcd said it is overloaded, or the request timed out.
    Overloaded,
    /// Anything else (a refusal that says nothing about load).
    Neutral,
}

/// One transaction's place in the window; give it back with [`Permit::done`] (dropping it frees the place
/// without a signal).
pub struct Permit<'a> {
    window: &'a Window,
}

/// Says what the commit window's metrics mean to the process's metrics exporter, and starts the cuts at 0 for
/// each reason (so that the first cut shows in a rate). Call once, after installing the exporter.
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "omega_commit_window",
        "Commit transactions this process lets be in flight at once now: --max-in-flight, less while etcd \
         answers slower than --commit-latency-target or says it is overloaded"
    );
    metrics::describe_counter!(
        "omega_commit_window_cuts_total",
        "Times the commit window was cut, by reason: latency (an answer slower than --commit-latency-target) or \
         overloaded (etcd said so)"
    );
    for reason in ["latency", "overloaded"] {
        metrics::counter!("omega_commit_window_cuts_total", "reason" => reason).increment(0);
    }
}

impl Window {
    /// A fixed bound of `max` in flight.
    pub fn fixed(max: usize) -> Self {
        Self::new(max, None)
    }

    /// A window of at most `max` that keeps answers under `target`.
    pub fn adaptive(max: usize, target: Duration) -> Self {
        Self::new(max, Some(target))
    }

    fn new(max: usize, target: Option<Duration>) -> Self {
        let max = max.max(1);
        if target.is_some() {
            metrics::gauge!("omega_commit_window").set(max as f64);
        }
        Window {
            max,
            target,
            state: Mutex::new(State { limit: max, in_flight: 0, good: 0, last_cut: None }),
            freed: Notify::new(),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.state.lock().limit
    }

    /// Waits for a place in the window.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            {
                let mut s = self.state.lock();
                if s.in_flight < s.limit {
                    s.in_flight += 1;
                    return Permit { window: self };
                }
            }
            // `notify_one` keeps a wake-up for a waiter that has not started waiting yet: none is lost.
            self.freed.notified().await;
        }
    }

    fn release(&self, signal: Signal) {
        let mut s = self.state.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        let before = s.limit;
        if let Some(target) = self.target {
            adapt(&mut s, self.max, target, signal, Instant::now());
        }
        let grew = s.limit > before;
        if s.limit != before {
            metrics::gauge!("omega_commit_window").set(s.limit as f64);
            if s.limit < before {
                let reason = if signal == Signal::Overloaded { "overloaded" } else { "latency" };
                metrics::counter!("omega_commit_window_cuts_total", "reason" => reason).increment(1);
            }
        }
        drop(s);
        self.freed.notify_one();
        if grew {
            self.freed.notify_one();
        }
    }
}

/// The window's rule (see the module's doc).
fn adapt(s: &mut State, max: usize, target: Duration, signal: Signal, now: Instant) {
    let cut = |s: &mut State, to: usize| {
        if s.last_cut.is_none_or(|t| now.duration_since(t) >= target) {
            s.limit = to.clamp(1, max);
            s.good = 0;
            s.last_cut = Some(now);
        }
    };
    match signal {
        Signal::Overloaded => cut(s, s.limit / 2),
        Signal::Answered(latency) if latency > target => cut(s, s.limit * 3 / 4),
        Signal::Answered(_) => {
            s.good += 1;
            if s.good >= s.limit && s.limit < max {
                s.limit += 1;
                s.good = 0;
            }
        }
        Signal::Neutral => {}
    }
}

impl Permit<'_> {
    pub fn done(self, signal: Signal) {
        let window = self.window;
        std::mem::forget(self);
        window.release(signal);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.window.release(Signal::Neutral);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(100);

    fn state(limit: usize) -> State {
        State { limit, in_flight: 0, good: 0, last_cut: None }
    }

    #[test]
    fn slow_answers_shrink_the_window_once_per_interval_and_fast_ones_grow_it_back() {
        let t0 = Instant::now();
        let mut s = state(8);
        adapt(&mut s, 8, TARGET, Signal::Answered(Duration::from_millis(300)), t0);
        assert_eq!(s.limit, 6);
        // The other slow answers of the same burst do not cut again within the interval.
        adapt(&mut s, 8, TARGET, Signal::Answered(Duration::from_millis(300)), t0 + Duration::from_millis(10));
        assert_eq!(s.limit, 6);
        adapt(&mut s, 8, TARGET, Signal::Overloaded, t0 + TARGET);
        assert_eq!(s.limit, 3);
        for _ in 0..3 {
            adapt(&mut s, 8, TARGET, Signal::Answered(Duration::from_millis(5)), t0 + TARGET);
        }
        assert_eq!(s.limit, 4, "one more after a window's worth of fast answers");
        let mut later = t0 + TARGET;
        for _ in 0..100 {
            later += TARGET;
            adapt(&mut s, 8, TARGET, Signal::Overloaded, later);
        }
        assert_eq!(s.limit, 1, "never below one");
        for _ in 0..1000 {
            adapt(&mut s, 8, TARGET, Signal::Answered(Duration::from_millis(5)), later);
        }
        assert_eq!(s.limit, 8, "never above the maximum");
    }

    #[tokio::test]
    async fn a_fixed_window_bounds_what_is_in_flight() {
        let w = std::sync::Arc::new(Window::fixed(2));
        let a = w.acquire().await;
        let _b = w.acquire().await;
        let w2 = w.clone();
        let third = tokio::spawn(async move {
            let p = w2.acquire().await;
            p.done(Signal::Neutral);
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "a third waits while two are in flight");
        a.done(Signal::Answered(Duration::from_secs(10)));
        third.await.unwrap();
        assert_eq!(w.limit(), 2, "a fixed window does not adapt");
    }
}
