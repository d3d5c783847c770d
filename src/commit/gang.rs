//! Gang commits: every claim of the gang in one flat transaction, all landing or none.
//!
//! The whole gang is checked against what we believe before anything is sent (a gang that does not fit its
//! own view is not worth a round trip). A refused gang tells, claim by claim, what changed: coarse detection
//! aborts on any change to its nodes; fine detection re-checks the whole gang against the fresh state and
//! re-sends it while it still fits, a bounded number of times.

use super::quota::QuotaBase;
use super::unit::{node_conflict, task_conflict, task_moved, NodeBase, Unit};
use super::{Claim, ClaimOutcome, CommitReport, Committer, Conflict, Detection};
use crate::cell_state::{CellSnapshot, Versioned};
use crate::error::{Error, Result};
use crate::model::{Task, TaskState};
use crate::txn::Outcome;
use std::collections::{BTreeMap, HashSet};

pub(super) async fn commit(c: &Committer, snapshot: &CellSnapshot, claims: &[Claim]) -> Result<CommitReport> {
    let n = claims.len();
    let mut report = CommitReport::default();
    let abort = |culprits: Vec<(usize, Conflict)>, mut report: CommitReport| {
        report.outcomes = vec![ClaimOutcome::Conflicted(Conflict::GangAborted); n];
        for (i, c) in culprits {
            report.outcomes[i] = ClaimOutcome::Conflicted(c);
        }
        report
    };
    let mut seen = HashSet::new();
    if let Some(dup) = claims.iter().position(|c| !seen.insert(c.task.value.id.as_str())) {
        return Ok(abort(vec![(dup, Conflict::Duplicate)], report));
    }
    if claims.iter().any(|c| !c.preempts.is_empty()) {
        return Err(Error::InvalidArgument("gang commits do not preempt; commit evictions incrementally".into()));
    }
    let mut tasks: Vec<Versioned<Task>> = claims.iter().map(|c| c.task.clone()).collect();
    let mut bases: BTreeMap<String, NodeBase> = BTreeMap::new();
    for claim in claims {
        bases.entry(claim.node.clone()).or_insert_with(|| NodeBase::from_snapshot(snapshot, &claim.node));
    }
    // A gang is one job: its namespace's quota, if any, is compared and rewritten with the gang's ledgers.
    let quota = claims.first().and_then(|c| QuotaBase::from_snapshot(snapshot, &c.task.value.namespace));
    loop {
        report.rounds += 1;
        // Check the whole gang against what we believe; any refusal aborts it before sending.
        let mut unit = Unit { quota: quota.clone(), ..Unit::default() };
        let mut culprits = Vec::new();
        for (i, claim) in claims.iter().enumerate() {
            let base = &bases[&claim.node];
            if let Some(why) = base.refusal() {
                culprits.push((i, why));
                continue;
            }
            let Some(ledger) = base.ledger.as_ref() else { continue };
            let entry = unit
                .ledgers
                .entry(claim.node.clone())
                .or_insert_with(|| (ledger.mod_revision, (*ledger.value).clone()));
            let t = &tasks[i].value;
            if t.state != TaskState::Pending {
                culprits.push((i, Conflict::TaskChanged));
                continue;
            }
            if let Some(q) = unit.quota.as_mut() {
                if let Err(d) = q.take(t, std::iter::empty()) {
                    culprits.push((i, Conflict::OverQuota(d)));
                    continue;
                }
            }
            match entry.1.fits(t.resources) {
                Ok(()) => {
                    entry.1.add(t.resources);
                    unit.claims.push(i);
                }
                Err(d) => culprits.push((i, Conflict::NoRoom(d))),
            }
        }
        if !culprits.is_empty() {
            return Ok(abort(culprits, report));
        }
        let group = unit.group(c, claims, &tasks)?;
        let size = (group.compares(), group.writes());
        let (outcome, latency) = c.sender.flat(group).await;
        report.transactions += u32::from(latency.is_some());
        report.latencies.extend(latency);
        match outcome {
            Outcome::Applied { revision } => {
                report.outcomes = vec![ClaimOutcome::Committed { revision }; n];
                for (node, (_, ledger)) in unit.ledgers {
                    c.wrote(&node, revision);
                    report.ledgers.insert(node, Some(Versioned::new(ledger, revision)));
                }
                return Ok(report);
            }
            Outcome::TooLarge { .. } => return Err(too_large(c, &unit, size)),
            // The server's limit turned out lower; the gang is checked against it at the top of the loop.
            Outcome::Resend => continue,
            Outcome::Fenced | Outcome::Unknown(_) => {
                report.outcomes = vec![ClaimOutcome::Conflicted(Conflict::Unknown); n];
                return Ok(report);
            }
            Outcome::Refused { fresh } => {
                report.failed_node_txns += 1;
                let fresh = match unit.fresh(claims, &tasks, fresh) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot decode the fresh state of a refused gang");
                        report.outcomes = vec![ClaimOutcome::Conflicted(Conflict::Unknown); n];
                        return Ok(report);
                    }
                };
                if fresh.quota_changed(&unit) {
                    let all = (0..n).map(|i| (i, Conflict::QuotaChanged)).collect();
                    return Ok(abort(all, report));
                }
                let coarse = c.config.detection == Detection::Coarse;
                let mut culprits = Vec::new();
                for (k, &i) in unit.claims.iter().enumerate() {
                    let (ledger, live) = fresh.ledgers.get(&claims[i].node).cloned().unwrap_or((None, false));
                    let node_changed =
                        ledger.as_ref().map(|l| l.mod_revision) != Some(unit.ledgers[&claims[i].node].0) || !live;
                    if fresh.lost_owner(&claims[i], &tasks[i].value) {
                        culprits.push((i, Conflict::NotOwner));
                    } else if let Some(conflict) = task_conflict(&tasks[i], &fresh.tasks[k]) {
                        culprits.push((i, conflict));
                    } else if coarse && task_moved(&tasks[i], &fresh.tasks[k]) {
                        culprits.push((i, Conflict::TaskChanged));
                    } else if coarse && node_changed {
                        culprits.push((i, node_conflict(&ledger, live)));
                    }
                    if let Some(t) = &fresh.tasks[k] {
                        tasks[i] = t.clone();
                    }
                }
                for (node, (ledger, live)) in fresh.ledgers {
                    if unit.ledgers.get(&node).is_some_and(|(base, _)| c.behind_own_write(&node, *base)) {
                        report.self_conflicts += 1;
                    }
                    report.ledgers.insert(node.clone(), ledger.clone());
                    bases.insert(node, NodeBase { ledger, live });
                }
                if !culprits.is_empty() {
                    return Ok(abort(culprits, report));
                }
                if report.rounds > c.config.max_fine_retries {
                    report.outcomes = vec![ClaimOutcome::Conflicted(Conflict::Contention); n];
                    return Ok(report);
                }
                // Fine detection: re-check the whole gang against the fresh state at the top of the loop.
                report.retried_claims += n as u32;
            }
        }
    }
}

fn too_large(c: &Committer, unit: &Unit, (compares, writes): (usize, usize)) -> Error {
    Error::GangTooLarge {
        claims: unit.claims.len(),
        nodes: unit.ledgers.len(),
        compares,
        writes,
        max_txn_ops: c.sender.max_ops(),
    }
}
