//! What each of the scheduler's Prometheus metrics means (served by `omega-scheduler --metrics-addr`, every
//! series labelled with `scheduler` and `instance`). The metrics themselves are recorded where they happen
//! (`scheduler`, `attempt`); this is their help text, and the counters that start at 0.

use crate::scheduler::FIRST_ATTEMPT_WAIT;
use metrics::{describe_counter, describe_gauge, describe_histogram};

/// Says what every metric means to the installed exporter and starts the unlabelled counters at 0, so that a
/// rate or an increase sees the first event too. Call once, after installing the exporter.
pub fn describe() {
    describe_counter!(
        "omega_scheduler_attempts_total",
        "Scheduling attempts: one job in one decision (each job of a batch attempt counts once)"
    );
    describe_counter!(
        "omega_scheduler_transactions_total",
        "Transactions (the Omega paper's): attempts that sent at least one claim to etcd"
    );
    describe_counter!(
        "omega_scheduler_attempts_conflicted_total",
        "Conflicted transactions: transactions any of whose claims was refused. The paper's conflict fraction is \
         this over the successful ones (transactions_total - attempts_conflicted_total)"
    );
    describe_counter!("omega_scheduler_placements_total", "Tasks placed: claims committed");
    describe_counter!(
        "omega_scheduler_conflicts_total",
        "Claims refused, by reason (node_changed, no_room_<resource>, task_changed, not_owner, ...)"
    );
    describe_counter!(
        "omega_scheduler_self_conflicts_total",
        "Claims compared against a ledger older than this scheduler's own write (0 by construction)"
    );
    describe_counter!(
        "omega_scheduler_replacement_rounds_total",
        "Re-placement rounds: conflicted claims decided again within their attempt, on the fresh state etcd returned"
    );
    describe_histogram!(
        "omega_scheduler_commit_txn_seconds",
        "Latency of one commit transaction: a round trip to etcd with a batch of claims"
    );
    describe_histogram!(
        "omega_scheduler_decision_seconds",
        "Time one decision round took (the first round includes the --t-job/--t-task decision time)"
    );
    describe_histogram!(FIRST_ATTEMPT_WAIT, "Wait from a job's submission to this scheduler's first attempt at it");
    describe_counter!(
        "omega_scheduler_busy_microseconds_total",
        "Time spent deciding, in microseconds (the paper's busyness: its rate / 1e6)"
    );
    describe_counter!("omega_scheduler_commit_microseconds_total", "Time spent committing, in microseconds");
    describe_counter!(
        "omega_scheduler_lock_wait_microseconds_total",
        "Time spent waiting for the cell lock (--lock only), in microseconds"
    );
    describe_counter!(
        "omega_scheduler_time_microseconds_total",
        "Wall time besides deciding and committing, in microseconds, by phase: idle (nothing ready), cache_wait \
         (for the cache to show this scheduler's own commits), claim_jobs, ready_jobs, status"
    );
    describe_gauge!(
        "omega_scheduler_queue_tasks",
        "Pending tasks of every job addressed to this scheduler, owned or not: each instance reports the whole \
         queue (aggregate with max by scheduler, not sum)"
    );
    describe_gauge!("omega_scheduler_owned_jobs", "Jobs this instance owns (places) now");
    describe_gauge!("omega_scheduler_tracked_jobs", "Jobs this instance keeps state for");
    for name in [
        "omega_scheduler_attempts_total",
        "omega_scheduler_transactions_total",
        "omega_scheduler_attempts_conflicted_total",
        "omega_scheduler_placements_total",
        "omega_scheduler_self_conflicts_total",
        "omega_scheduler_replacement_rounds_total",
        "omega_scheduler_busy_microseconds_total",
        "omega_scheduler_commit_microseconds_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    omega::backpressure::describe_metrics();
    omega::space::describe_metrics();
}
