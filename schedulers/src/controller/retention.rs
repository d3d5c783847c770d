//! How much finished work the cell keeps, by count as well as by age.
//!
//! Finished jobs stay readable (`omctl job`, their tasks' final states and exit codes) for `gc_after`. An age
//! alone does not bound etcd's data: a cell finishing thousands of tasks a second would hold millions of
//! them for an hour and fill etcd's quota long before the hour is out. So the tasks of finished jobs are
//! also capped (like Kubernetes' job history limits): past the cap, the oldest finished jobs are collected
//! first, whatever their age.

use omega::cell_state::{CellSnapshot, Versioned};
use omega::model::{Job, JobState};

/// Finished jobs to collect so that at most `cap` tasks of finished jobs remain: the oldest first (by when
/// they finished), skipping any whose tasks still hold resources (they are being stopped).
pub fn beyond_cap(snapshot: &CellSnapshot, cap: usize) -> Vec<Versioned<Job>> {
    let mut finished: Vec<&Versioned<Job>> =
        snapshot.jobs.values().filter(|j| !matches!(j.value.state, JobState::Pending | JobState::Running)).collect();
    let total: usize = finished.iter().map(|j| j.value.tasks as usize).sum();
    if total <= cap {
        return Vec::new();
    }
    // Oldest first; a job without a finish time (cancelled before it had one) counts as oldest.
    finished.sort_by_key(|j| (j.value.finished_at_ms.unwrap_or(0), j.value.id.clone()));
    let mut excess = total - cap;
    let mut collect = Vec::new();
    for job in finished {
        if excess == 0 {
            break;
        }
        if snapshot.tasks_of(&job.value).any(|t| t.value.state.holds_resources()) {
            continue;
        }
        excess = excess.saturating_sub(job.value.tasks as usize);
        collect.push(job.clone());
    }
    collect
}
