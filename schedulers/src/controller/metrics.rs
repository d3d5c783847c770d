//! The controller's Prometheus metrics (served by `omega-controller --metrics-addr`).
//!
//! The counters and gauges of the cell are the leader's: a replica that waits reports
//! `omega_controller_leader 0` and its gauges at zero, so a dashboard can sum over replicas.

use super::disruption::{Decision, Scope};
use super::Reconciled;

/// Says what every metric means to the installed exporter, and starts the unlabelled counters and the cell's
/// gauges at 0 (this replica does not lead yet), so that alerts and rates see the first event too. Call once,
/// after installing the exporter.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    let counters = [
        ("omega_controller_lost_tasks_total", "Tasks of lost nodes released (made pending again, or failed)"),
        ("omega_controller_replaced_replicas_total", "Service replicas created to keep services at their count"),
        ("omega_controller_finished_jobs_total", "Jobs marked succeeded or failed"),
        ("omega_controller_collected_jobs_total", "Finished jobs deleted (past --gc-after or --keep-finished-tasks)"),
        ("omega_controller_collected_nodes_total", "Nodes forgotten after being down past --node-gc-after"),
        ("omega_controller_collected_orphans_total", "Tasks of submissions that died, deleted"),
        ("omega_controller_rollout_replicas_started_total", "Replicas of a new version started by rollouts"),
        ("omega_controller_rollout_replicas_retired_total", "Replicas of an old version stopped by rollouts"),
        ("omega_controller_rollouts_succeeded_total", "Rollouts that finished with every replica on the new version"),
        ("omega_controller_rollouts_failed_total", "Rollouts that failed (new replicas not healthy in time)"),
        ("omega_controller_rollbacks_total", "Rollouts rolled back to the previous version"),
        ("omega_controller_drain_replicas_moved_total", "Replicas moved off draining nodes (replacement first)"),
        ("omega_controller_drain_tasks_forced_total", "Tasks stopped on draining nodes at the drain's deadline"),
        ("omega_controller_evictions_total", "Nodes whose tasks were released because the node was lost"),
        (
            "omega_controller_evictions_held_total",
            "Nodes whose eviction was held back (a disruption), each once per hold",
        ),
        ("omega_controller_held_nodes_returned_total", "Held-back nodes that came back with their tasks"),
        (
            "omega_controller_cell_disruptions_total",
            "Times the whole cell was found disrupted (many nodes lapsed at once)",
        ),
        ("omega_controller_compactions_total", "Compactions of etcd's history"),
        ("omega_controller_compaction_failures_total", "Compactions of etcd's history that failed"),
    ];
    for (name, help) in counters {
        describe_counter!(name, help);
        metrics::counter!(name).increment(0);
    }
    describe_counter!(
        "omega_controller_zone_disruptions_total",
        "Times a zone was found disrupted (many of its nodes lapsed at once), by zone"
    );
    let gauges = [
        ("omega_controller_leader", "1 on the replica that leads; the cell's gauges are 0 on the others"),
        ("omega_controller_nodes", "Nodes registered"),
        ("omega_controller_nodes_down", "Registered nodes whose liveness lapsed"),
        ("omega_controller_nodes_lapsed", "Nodes that lapsed within the disruption window"),
        ("omega_controller_nodes_held", "Nodes down past their grace whose tasks are held back (a disruption)"),
        ("omega_controller_cell_disrupted", "1 while the whole cell is disrupted: every eviction is held back"),
        ("omega_controller_zones_disrupted", "Zones disrupted now (their evictions slowed down)"),
        ("omega_controller_rollouts_in_progress", "Service rollouts in progress"),
        ("omega_controller_drains_in_progress", "Node drains in progress"),
    ];
    for (name, help) in gauges {
        describe_gauge!(name, help);
        metrics::gauge!(name).set(0.0);
    }
    describe_gauge!("omega_controller_zone_disrupted", "1 while the zone is disrupted, by zone");
    describe_gauge!("omega_controller_zone_nodes_lapsed", "The zone's nodes that lapsed within the window, by zone");
    describe_gauge!("omega_controller_compacted_revision", "The revision etcd's history was last compacted to");
    describe_gauge!("omega_etcd_db_size_bytes", "etcd's database file size, measured at each compaction");
    describe_gauge!(
        "omega_etcd_db_size_in_use_bytes",
        "The part of etcd's database file in use (the rest is reclaimed by a defrag), measured at each compaction"
    );
    describe_gauge!("omega_job_replicas_healthy", "A service's running replicas that are healthy, by job");
    describe_gauge!("omega_job_replicas_unhealthy", "A service's running replicas that are not healthy, by job");
    describe_gauge!("omega_job_replicas_wanted", "The replicas a service asks for, by job");
    describe_gauge!("omega_job_rollout_in_progress", "1 while a rollout of the service's current version runs, by job");
    omega::space::describe_metrics();
}

/// 1 while this replica leads.
pub fn leading(yes: bool) {
    metrics::gauge!("omega_controller_leader").set(if yes { 1.0 } else { 0.0 });
}

/// What a reconcile pass did.
pub fn reconciled(done: &Reconciled) {
    let counters = [
        ("omega_controller_lost_tasks_total", done.lost_tasks),
        ("omega_controller_replaced_replicas_total", done.replaced_replicas),
        ("omega_controller_finished_jobs_total", done.finished_jobs),
        ("omega_controller_collected_jobs_total", done.collected_jobs),
        ("omega_controller_collected_nodes_total", done.collected_nodes),
        ("omega_controller_collected_orphans_total", done.collected_orphans),
        ("omega_controller_rollout_replicas_started_total", done.deployments.created),
        ("omega_controller_rollout_replicas_retired_total", done.deployments.retired),
        ("omega_controller_rollouts_succeeded_total", done.deployments.succeeded),
        ("omega_controller_rollouts_failed_total", done.deployments.failed),
        ("omega_controller_rollbacks_total", done.deployments.reverts),
        ("omega_controller_drain_replicas_moved_total", done.drains.moved),
        ("omega_controller_drain_tasks_forced_total", done.drains.forced),
    ];
    for (name, n) in counters {
        if n > 0 {
            metrics::counter!(name).increment(n as u64);
        }
    }
}

/// The services' replicas by health and the rollouts in progress, per job. Returns the jobs it labelled, so
/// that a job that went away is set to zero on the next call (a gauge cannot be unregistered).
pub fn services(
    snapshot: &omega::cell_state::CellSnapshot,
    labelled_before: &std::collections::BTreeSet<String>,
) -> std::collections::BTreeSet<String> {
    use omega::model::{JobKind, TaskState};
    let mut labelled = std::collections::BTreeSet::new();
    let (mut rolling, mut draining) = (0u32, 0u32);
    for job in snapshot.jobs.values().filter(|j| j.value.kind == JobKind::Service && !j.value.state.is_final()) {
        let j = &job.value;
        let has_checks = !j.checks.is_empty();
        let (mut healthy, mut unhealthy) = (0u32, 0u32);
        for t in snapshot.tasks_of(j).filter(|t| t.value.state == TaskState::Running) {
            if t.value.is_healthy(has_checks) {
                healthy += 1;
            } else {
                unhealthy += 1;
            }
        }
        let in_progress = j.deployment.as_ref().is_some_and(|d| d.state.is_active() && d.version == j.version);
        rolling += u32::from(in_progress);
        metrics::gauge!("omega_job_replicas_healthy", "job" => j.id.clone()).set(f64::from(healthy));
        metrics::gauge!("omega_job_replicas_unhealthy", "job" => j.id.clone()).set(f64::from(unhealthy));
        metrics::gauge!("omega_job_replicas_wanted", "job" => j.id.clone()).set(f64::from(j.tasks));
        metrics::gauge!("omega_job_rollout_in_progress", "job" => j.id.clone()).set(f64::from(u8::from(in_progress)));
        labelled.insert(j.id.clone());
    }
    for gone in labelled_before.difference(&labelled) {
        for name in [
            "omega_job_replicas_healthy",
            "omega_job_replicas_unhealthy",
            "omega_job_replicas_wanted",
            "omega_job_rollout_in_progress",
        ] {
            metrics::gauge!(name, "job" => gone.clone()).set(0.0);
        }
    }
    for d in snapshot.drains.values() {
        draining += u32::from(d.value.state == omega::model::DrainState::Draining);
    }
    metrics::gauge!("omega_controller_rollouts_in_progress").set(f64::from(rolling));
    metrics::gauge!("omega_controller_drains_in_progress").set(f64::from(draining));
    labelled
}

/// Nodes registered and down, as this leader sees them.
pub fn nodes(registered: usize, down: usize) {
    metrics::gauge!("omega_controller_nodes").set(registered as f64);
    metrics::gauge!("omega_controller_nodes_down").set(down as f64);
}

/// Nodes whose tasks were released (some tasks of each, at least).
pub fn evicted(nodes: usize) {
    if nodes > 0 {
        metrics::counter!("omega_controller_evictions_total").increment(nodes as u64);
    }
}

/// What the disruption rules decided.
pub fn decided(decision: &Decision) {
    metrics::gauge!("omega_controller_cell_disrupted").set(f64::from(u8::from(decision.cell_disrupted)));
    let mut disrupted = 0;
    for (zone, report) in &decision.zones {
        disrupted += usize::from(report.disrupted);
        metrics::gauge!("omega_controller_zone_disrupted", "zone" => zone.clone())
            .set(f64::from(u8::from(report.disrupted)));
        metrics::gauge!("omega_controller_zone_nodes_lapsed", "zone" => zone.clone()).set(report.count.lapsed as f64);
    }
    metrics::gauge!("omega_controller_zones_disrupted").set(disrupted as f64);
    metrics::gauge!("omega_controller_nodes_lapsed").set(decision.cell.lapsed as f64);
    metrics::gauge!("omega_controller_nodes_held").set(decision.held.len() as f64);
    if decision.newly_held > 0 {
        metrics::counter!("omega_controller_evictions_held_total").increment(decision.newly_held as u64);
    }
    if decision.returned > 0 {
        metrics::counter!("omega_controller_held_nodes_returned_total").increment(decision.returned as u64);
    }
    for change in &decision.changes {
        if let super::disruption::Change::Disrupted(scope, _) = change {
            match scope {
                Scope::Cell => metrics::counter!("omega_controller_cell_disruptions_total").increment(1),
                Scope::Zone(zone) => {
                    metrics::counter!("omega_controller_zone_disruptions_total", "zone" => zone.clone()).increment(1)
                }
            }
        }
    }
}

/// This replica stops leading: the cell's gauges are someone else's now.
pub fn stood_down<'a>(zones: impl Iterator<Item = &'a str>) {
    leading(false);
    for zone in zones {
        metrics::gauge!("omega_controller_zone_disrupted", "zone" => zone.to_string()).set(0.0);
        metrics::gauge!("omega_controller_zone_nodes_lapsed", "zone" => zone.to_string()).set(0.0);
    }
    for name in [
        "omega_controller_cell_disrupted",
        "omega_controller_zones_disrupted",
        "omega_controller_nodes_lapsed",
        "omega_controller_nodes_held",
        "omega_controller_nodes",
        "omega_controller_nodes_down",
    ] {
        metrics::gauge!(name).set(0.0);
    }
}
