//! One scheduling attempt, top to bottom: decide -> commit -> learn -> (again, for what conflicted) -> explain.
//!
//! - **decide**: place every job's pending tasks on the attempt's private *view* of the cell (one node table
//!   per decision, so jobs decided together do not double-book);
//! - **commit**: send the claims (incremental; each gang on its own, all or nothing), fenced on the jobs'
//!   ownership, against the same view they were decided on;
//! - **learn**: bring the view up to what the commit wrote or read back (the fresh ledgers of refused nodes),
//!   so the next round decides on it, never against the attempt's first snapshot (which would make every claim
//!   on a node this scheduler just used conflict with its own commit);
//! - **explain**: what is left pending gets a reason a person can act on; permanent refusals (a gang larger
//!   than one etcd transaction can carry) say so and are not retried.

use omega::cell_state::{CellSnapshot, Versioned};
use omega::commit::{Claim, ClaimOutcome, CommitKind, CommitReport, Committer, Conflict};
use omega::model::{Job, Task, TaskState};
use omega::placement::{self, explain::Explanation, PlacementOptions};
use rand::Rng;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// Placements decided in one round.
#[derive(Default)]
pub struct Decision {
    pub incremental: Vec<Claim>,
    /// Each gang's claims, committed all or nothing.
    pub gangs: Vec<(String, Vec<Claim>)>,
    pub took: Duration,
}

/// Why a job's tasks stay pending after an attempt.
#[derive(Clone, Debug)]
pub enum Leftover {
    /// Some nodes could not take them; counts by reason.
    Unplaceable(Explanation),
    /// They fit, but lost every race (or were not tried again this attempt).
    LostRaces,
    /// They can never be committed as they are; the text says why and what to change.
    Permanent(String),
}

/// What an attempt learned, per job.
#[derive(Default)]
pub struct Learned {
    /// Jobs any of whose claims conflicted (the paper's conflicted transactions).
    pub conflicted_jobs: HashSet<String>,
    /// Jobs at least one of whose claims was sent (the paper's transactions; the conflicted ones among them).
    pub claimed_jobs: HashSet<String>,
    /// Jobs the instance turned out not to own any more (their ownership fence failed).
    pub lost_jobs: HashSet<String>,
    /// Jobs refused for good, with the reason.
    pub permanent: HashMap<String, String>,
    pub claims: u64,
    pub claims_conflicted: u64,
    pub placed: u64,
    /// Claims that may still succeed when re-placed this attempt.
    pub retryable: usize,
}

/// Decides placements for `jobs` on `view`.
pub fn decide(
    view: &CellSnapshot,
    jobs: &[std::sync::Arc<Job>],
    pending: &BTreeMap<String, Vec<Versioned<Task>>>,
    options: &PlacementOptions,
    rng: &mut impl Rng,
    explanations: &mut HashMap<String, Explanation>,
) -> Decision {
    let started = Instant::now();
    let mut decision = Decision::default();
    // One node table for every job of this decision: what one job takes, the next sees taken.
    let mut table = placement::NodeTable::new(view);
    for job in jobs {
        let tasks = pending.get(&job.id).map(Vec::as_slice).unwrap_or(&[]);
        if tasks.is_empty() {
            continue;
        }
        // Fence every claim on this instance's ownership of the job, as the view saw it.
        let Some(owner) = view.owners.get(job.id.as_str()).map(|o| o.mod_revision) else { continue };
        let p = placement::place_in(&mut table, view, job, tasks, options, rng);
        if let Some(e) = p.explanation {
            explanations.insert(job.id.clone(), e);
        }
        let claims: Vec<Claim> = p.claims.into_iter().map(|c| c.owned_at(owner)).collect();
        if job.gang {
            if !claims.is_empty() {
                decision.gangs.push((job.id.clone(), claims));
            }
        } else {
            decision.incremental.extend(claims);
        }
    }
    decision.took = started.elapsed();
    decision
}

/// What one commit returned: the claims, and the report or the reason none of them could be sent.
pub type Committed = Vec<(Vec<Claim>, Result<CommitReport, omega::Error>)>;

/// Commits a decision against the view it was decided on.
pub async fn commit(committer: &Committer, view: &CellSnapshot, decision: Decision) -> Committed {
    let mut out = Vec::new();
    if !decision.incremental.is_empty() {
        let report = committer.commit(view, &decision.incremental, CommitKind::Incremental).await;
        out.push((decision.incremental, report));
    }
    for (_, gang) in decision.gangs {
        let report = committer.commit(view, &gang, CommitKind::Gang).await;
        out.push((gang, report));
    }
    out
}

/// Brings `view` and `pending` up to what the commits did, and counts.
pub fn learn(
    view: &mut CellSnapshot,
    pending: &mut BTreeMap<String, Vec<Versioned<Task>>>,
    committed: &Committed,
) -> Learned {
    let mut learned = Learned::default();
    for (claims, report) in committed {
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                // Nothing of it was sent: a gang that can never fit one transaction, or a caller's mistake.
                for c in claims {
                    learned.permanent.insert(c.task.value.job.clone(), e.to_string());
                    if let Some(list) = pending.get_mut(&c.task.value.job) {
                        list.retain(|t| t.value.id != c.task.value.id);
                    }
                }
                continue;
            }
        };
        for l in &report.latencies {
            metrics::histogram!("omega_scheduler_commit_txn_seconds").record(l.as_secs_f64());
        }
        metrics::counter!("omega_scheduler_self_conflicts_total").increment(report.self_conflicts as u64);
        apply_report(view, claims, report);
        for (claim, outcome) in claims.iter().zip(&report.outcomes) {
            let job = &claim.task.value.job;
            learned.claims += 1;
            learned.claimed_jobs.insert(job.clone());
            let list = pending.entry(job.clone()).or_default();
            match outcome {
                ClaimOutcome::Committed { .. } => {
                    learned.placed += 1;
                    metrics::counter!("omega_scheduler_placements_total").increment(1);
                    list.retain(|t| t.value.id != claim.task.value.id);
                }
                ClaimOutcome::Conflicted(c) => {
                    learned.claims_conflicted += 1;
                    metrics::counter!("omega_scheduler_conflicts_total", "reason" => omega::commit::conflict_label(*c))
                        .increment(1);
                    learned.conflicted_jobs.insert(job.clone());
                    match c {
                        // Someone else has it, or its state is unknown until the cache shows it: not ours
                        // to re-place in this attempt.
                        Conflict::TaskChanged | Conflict::Duplicate | Conflict::Unknown => {
                            list.retain(|t| t.value.id != claim.task.value.id);
                        }
                        Conflict::NotOwner => {
                            learned.lost_jobs.insert(job.clone());
                            list.clear();
                        }
                        Conflict::TooLarge => {
                            learned.permanent.insert(job.clone(), too_large(claim));
                            list.retain(|t| t.value.id != claim.task.value.id);
                        }
                        _ => learned.retryable += 1,
                    }
                }
            }
        }
    }
    learned
}

fn too_large(claim: &Claim) -> String {
    format!(
        "the claim for {} (with {} evictions) needs more operations or bytes in one transaction than etcd accepts; \
         raise etcd's --max-txn-ops (and the scheduler's) or make the task smaller",
        claim.task.value.id,
        claim.preempts.len()
    )
}

/// Brings a view up to what a commit learned: the ledgers it wrote or read back, its placed tasks and the
/// tasks it evicted.
fn apply_report(view: &mut CellSnapshot, claims: &[Claim], report: &CommitReport) {
    for (node, ledger) in &report.ledgers {
        match ledger {
            Some(l) => drop(view.allocations.insert(node.clone().into(), l.clone())),
            None => drop(view.allocations.remove(node.as_str())),
        }
    }
    for (claim, outcome) in claims.iter().zip(&report.outcomes) {
        if let ClaimOutcome::Committed { revision } = outcome {
            let mut t = (*claim.task.value).clone();
            t.state = TaskState::Assigned;
            t.node = Some(claim.node.clone());
            t.placements += 1;
            view.put_task(Versioned::new(t, *revision));
            for v in &claim.preempts {
                let mut e = (*v.value).clone();
                e.state = TaskState::Pending;
                view.put_task(Versioned::new(e, *revision));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega::model::{Allocation, JobKind};
    use omega::resources::Resources;

    #[test]
    fn a_view_learns_the_ledgers_and_tasks_a_commit_wrote() {
        let mut view = CellSnapshot::default();
        let job = Job::new("j", JobKind::Batch, 1, Resources::new(1, 1));
        let task = Versioned::new(Task::pending(&job, 0), 5);
        view.put_task(task.clone());
        let claim = Claim::new(task, "n1");
        let mut ledger = Allocation::empty("n1", Resources::new(10, 10));
        ledger.add(Resources::new(1, 1));
        let report = CommitReport {
            outcomes: vec![ClaimOutcome::Committed { revision: 9 }],
            ledgers: [("n1".to_string(), Some(Versioned::new(ledger.clone(), 9)))].into(),
            ..Default::default()
        };
        apply_report(&mut view, std::slice::from_ref(&claim), &report);
        assert_eq!(view.allocations.get("n1").map(|l| l.mod_revision), Some(9), "the next round compares against 9");
        let placed = view.tasks.get("j/0").expect("task");
        assert_eq!((placed.value.state, placed.mod_revision), (TaskState::Assigned, 9));
        assert_eq!(view.tasks_on("n1").count(), 1);

        let mut pending: BTreeMap<String, Vec<Versioned<Task>>> = [("j".to_string(), vec![claim.task.clone()])].into();
        let learned = learn(&mut view, &mut pending, &vec![(vec![claim], Ok(report))]);
        assert_eq!((learned.placed, learned.claims_conflicted), (1, 0));
        assert!(pending["j"].is_empty());
    }
}
