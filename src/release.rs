//! Ending a task's hold on its node: the other half of the commit protocol.
//!
//! When a task finishes, is cancelled, or its node is lost, three things must change together or the cell
//! drifts: the task's state, its node's ledger (minus the task's resources) and its assignment (deleted).
//! [`release`] does that in one guarded group per node, compared on the ledger's and every task's
//! mod_revision, many nodes per round trip, exactly like claims (and through the same transaction layer,
//! [`crate::txn`]). A ledger changed by someone else (a claim landing on the node) is re-read from the refusal
//! and the release re-sent; a task changed by someone else is left alone and reported, so a task is never
//! released twice.
//!
//! Tasks that hold nothing (pending ones being cancelled) only get their state written, guarded the same way,
//! many per round trip.

use crate::cell_state::Versioned;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::model::{now_ms, Allocation, RunInfo, Task, TaskState};
use crate::store::{decode, encode, Store};
use crate::txn::{Group, Outcome, Sender};
use etcd_client::{Compare, CompareOp};
use std::collections::{BTreeMap, VecDeque};

/// A task to move to `state`, which must not hold resources (a terminal state, or `Pending` to be placed again).
#[derive(Clone, Debug)]
pub struct Release {
    /// The task as last seen; its mod_revision is compared.
    pub task: Versioned<Task>,
    pub state: TaskState,
    pub reason: Option<String>,
    /// What the agent learned about the process, if anything (replaces the task's `run`).
    pub run: Option<RunInfo>,
    /// What happened, for the task's timeline (kind and message): the release is the write that records it,
    /// so the event costs nothing (see [`crate::events`]). The caller says it, since only the caller knows
    /// whether a release to `pending` is a lost node, a drain or a replacement.
    pub event: Option<(EventKind, String)>,
}

/// What became of one release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Written at this revision.
    Done { revision: i64 },
    /// The task changed since it was seen; nothing was written for it.
    TaskChanged,
    /// Its node's ledger kept changing under it (claims landing) for every retry; nothing was written. Try
    /// again.
    Contention,
    /// A release of a lost node's tasks found the node alive again (its agent re-registered): nothing was
    /// written, the node keeps its tasks.
    NodeAlive,
    /// The request failed in transport or timed out: it may or may not have been applied. Read the task
    /// again before deciding anything.
    Unknown,
}

/// Ledger re-reads per node before giving up (each one means a claim landed on the node meanwhile).
const MAX_ROUNDS: usize = 32;
/// Round trips in flight at once for one call.
const IN_FLIGHT: usize = 4;

/// A leader's fence: writes apply only while the election key still has this create revision, so a deposed
/// leader (its key gone, or a new leader's key in its place) cannot write.
#[derive(Clone, Debug)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
}

impl Fence {
    pub fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.revision)
    }

    fn refused(&self) -> Error {
        Error::NotLeader(String::from_utf8_lossy(&self.key).into_owned())
    }
}

/// What must hold for a release to apply, beyond the tasks and ledgers being as seen.
#[derive(Clone, Copy, Debug, Default)]
pub struct Guard<'a> {
    /// The writer's leadership ([`Error::NotLeader`] if it is gone).
    pub fence: Option<&'a Fence>,
    /// The tasks' nodes must be down (their liveness key absent): for the controller giving up a lost node's
    /// tasks, so a node whose agent re-registered meanwhile keeps them ([`ReleaseOutcome::NodeAlive`]).
    pub nodes_down: bool,
}

/// Applies `releases`; returns one outcome per release, in order.
pub async fn release(store: &Store, releases: &[Release]) -> Result<Vec<ReleaseOutcome>> {
    release_guarded(store, releases, Guard::default()).await
}

/// [`release`], applied only while `fence` holds (else [`Error::NotLeader`]; what was applied before the
/// fence failed stays applied).
pub async fn release_fenced(store: &Store, releases: &[Release], fence: Option<&Fence>) -> Result<Vec<ReleaseOutcome>> {
    release_guarded(store, releases, Guard { fence, nodes_down: false }).await
}

/// [`release`] under a [`Guard`].
pub async fn release_guarded(store: &Store, releases: &[Release], guard: Guard<'_>) -> Result<Vec<ReleaseOutcome>> {
    for r in releases {
        if r.state.holds_resources() {
            return Err(Error::InvalidArgument(format!(
                "cannot release task {} into state {}",
                r.task.value.id, r.state
            )));
        }
    }
    let sender = Sender::new(store.clone(), IN_FLIGHT);
    let fence = guard.fence.map(Fence::compare);
    let mut outcomes = vec![ReleaseOutcome::Unknown; releases.len()];

    // What holds nothing: one guarded put each, many per round trip.
    let (mut holding, mut plain) = (BTreeMap::<String, Vec<usize>>::new(), Vec::new());
    for (i, r) in releases.iter().enumerate() {
        match (r.task.value.state.holds_resources(), r.task.value.node.clone()) {
            (true, Some(node)) => holding.entry(node).or_default().push(i),
            _ => plain.push(i),
        }
    }
    // A round trip refused as too large lowers the limit and sends its groups again (a few times at most:
    // the limit halves each time down to its floor).
    while !plain.is_empty() {
        let mut groups = Vec::with_capacity(plain.len());
        for &i in &plain {
            groups.push(task_group(store, &releases[i].task, &updated(&releases[i]))?);
        }
        let sent = sender.nested(groups, fence.as_ref()).await;
        let mut again = Vec::new();
        for (&i, outcome) in plain.iter().zip(sent.outcomes) {
            outcomes[i] = match outcome {
                Outcome::Applied { revision } => ReleaseOutcome::Done { revision },
                Outcome::Refused { .. } => ReleaseOutcome::TaskChanged,
                Outcome::Fenced => return Err(fenced(guard)),
                Outcome::Resend => {
                    again.push(i);
                    ReleaseOutcome::Unknown
                }
                Outcome::TooLarge { .. } | Outcome::Unknown(_) => ReleaseOutcome::Unknown,
            };
        }
        plain = again;
    }

    // Per node: one group (ledger compare + task compares), chunked to the op budget; a node's chunks go in
    // successive rounds, each against the ledger the previous one wrote.
    let per_group = sender.items_per_group(2, 2);
    let mut queues: BTreeMap<String, VecDeque<Vec<usize>>> =
        holding.into_iter().map(|(node, idx)| (node, idx.chunks(per_group).map(<[usize]>::to_vec).collect())).collect();
    let mut ledgers: BTreeMap<String, Option<Versioned<Allocation>>> = BTreeMap::new();
    for round in 0..MAX_ROUNDS {
        queues.retain(|_, q| !q.is_empty());
        if queues.is_empty() {
            break;
        }
        let unknown: Vec<String> = queues.keys().filter(|n| !ledgers.contains_key(*n)).cloned().collect();
        for (node, ledger) in read_ledgers(store, &unknown).await? {
            ledgers.insert(node, ledger);
        }
        let mut batch: Vec<(String, Vec<usize>)> = Vec::new();
        let mut groups = Vec::new();
        for (node, queue) in queues.iter_mut() {
            let Some(idx) = queue.pop_front() else { continue };
            let ledger = ledgers.get(node).and_then(Option::as_ref);
            groups.push(node_group(store, node, ledger, &idx, releases, guard.nodes_down)?);
            batch.push((node.clone(), idx));
        }
        let sent = sender.nested(groups, fence.as_ref()).await;
        let mut lost_races = 0;
        for ((node, idx), outcome) in batch.into_iter().zip(sent.outcomes) {
            match outcome {
                Outcome::Applied { revision } => {
                    for &i in &idx {
                        outcomes[i] = ReleaseOutcome::Done { revision };
                    }
                    let smaller = ledgers.get(&node).cloned().flatten().map(|l| {
                        let mut a = (*l.value).clone();
                        for &i in &idx {
                            a.remove(releases[i].task.value.resources);
                        }
                        Versioned::new(a, revision)
                    });
                    ledgers.insert(node, smaller);
                }
                Outcome::Refused { fresh } => {
                    // Fresh state: ledger, liveness, then each task. Changed tasks are dropped; the rest retried.
                    let mut fresh = fresh.into_iter();
                    let ledger = fresh
                        .next()
                        .flatten()
                        .map(|kv| decode::<Allocation>(&kv).map(|a| Versioned::new(a, kv.mod_revision())))
                        .transpose()?;
                    let alive = fresh.next().flatten().is_some();
                    if guard.nodes_down && alive {
                        for &i in &idx {
                            outcomes[i] = ReleaseOutcome::NodeAlive;
                        }
                        for rest in queues.get_mut(&node).map(std::mem::take).unwrap_or_default() {
                            for i in rest {
                                outcomes[i] = ReleaseOutcome::NodeAlive;
                            }
                        }
                        continue;
                    }
                    let mut retry = Vec::new();
                    for &i in &idx {
                        let fresh_task = fresh.next().flatten();
                        if fresh_task.is_some_and(|kv| kv.mod_revision() == releases[i].task.mod_revision) {
                            retry.push(i);
                        } else {
                            outcomes[i] = ReleaseOutcome::TaskChanged;
                        }
                    }
                    ledgers.insert(node.clone(), ledger);
                    if !retry.is_empty() {
                        lost_races += 1;
                        queues.entry(node).or_default().push_front(retry);
                    }
                }
                Outcome::Fenced => return Err(fenced(guard)),
                // Not sent: the limit is lower now; the node's queue cuts smaller groups next round.
                Outcome::Resend => {
                    let queue = queues.entry(node).or_default();
                    for part in idx.chunks(sender.items_per_group(2, 2)).rev() {
                        queue.push_front(part.to_vec());
                    }
                }
                Outcome::TooLarge { .. } | Outcome::Unknown(_) => {
                    for &i in &idx {
                        outcomes[i] = ReleaseOutcome::Unknown;
                    }
                    // Whether it landed is unknown: the ledger must be read again before its next chunk.
                    ledgers.remove(&node);
                }
            }
        }
        if lost_races > 0 && round + 1 < MAX_ROUNDS {
            // Lost a race on a ledger: back off a little, with jitter, so racing writers spread out.
            let pause = rand::random_range(1..=4u64) << (round.min(4));
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
    }
    let left: Vec<usize> = queues.into_values().flatten().flatten().collect();
    if !left.is_empty() {
        tracing::warn!(tasks = left.len(), "releases kept losing races on their nodes' ledgers; left for a retry");
        for i in left {
            outcomes[i] = ReleaseOutcome::Contention;
        }
    }
    Ok(outcomes)
}

/// The error for a refused fence (only a fenced call can see one).
fn fenced(guard: Guard<'_>) -> Error {
    guard.fence.map(Fence::refused).unwrap_or_else(|| Error::NotLeader("(no fence)".into()))
}

/// The ledgers of `nodes`, read in as few round trips as the op limit allows.
async fn read_ledgers(store: &Store, nodes: &[String]) -> Result<Vec<(String, Option<Versioned<Allocation>>)>> {
    let mut out = Vec::with_capacity(nodes.len());
    for chunk in nodes.chunks(store.limits().max_ops().max(1)) {
        let gets: Vec<etcd_client::TxnOp> =
            chunk.iter().map(|n| etcd_client::TxnOp::get(store.keys().alloc(n), None)).collect();
        let resp = store.client().kv_client().txn(etcd_client::Txn::new().and_then(gets)).await?;
        for (node, r) in chunk.iter().zip(resp.op_responses()) {
            let ledger = match r {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            };
            let ledger = ledger.map(|kv| decode::<Allocation>(&kv).map(|a| Versioned::new(a, kv.mod_revision())));
            out.push((node.clone(), ledger.transpose()?));
        }
    }
    Ok(out)
}

/// The new record of a released task.
fn updated(r: &Release) -> Task {
    let mut t = (*r.task.value).clone();
    t.state = r.state;
    t.reason = r.reason.clone();
    if let Some(run) = &r.run {
        t.run = Some(run.clone());
    }
    t.updated_at_ms = now_ms();
    if let Some((kind, message)) = &r.event {
        t.record_event(*kind, message.clone(), t.updated_at_ms);
    }
    t
}

/// A guarded put of one task's new record.
fn task_group(store: &Store, seen: &Versioned<Task>, new: &Task) -> Result<Group> {
    let key = store.keys().task(&new.id);
    let mut g = Group::new();
    g.compare(&key, Compare::mod_revision(key.as_str(), CompareOp::Equal, seen.mod_revision));
    g.put(&key, encode(&key, new)?);
    Ok(g)
}

/// One node's group: compare ledger and tasks (and, for a lost node, that it is still down); put the smaller
/// ledger and the tasks' new states; delete their assignments; else read the ledger, liveness and tasks back.
fn node_group(
    store: &Store,
    node: &str,
    ledger: Option<&Versioned<Allocation>>,
    idx: &[usize],
    releases: &[Release],
    node_down: bool,
) -> Result<Group> {
    let keys = store.keys();
    let alloc_key = keys.alloc(node);
    let live_key = keys.live(node);
    let mut g = Group::new();
    g.read(&alloc_key).read(&live_key);
    match ledger {
        Some(l) => {
            g.compare(&alloc_key, Compare::mod_revision(alloc_key.as_str(), CompareOp::Equal, l.mod_revision));
            let mut smaller = (*l.value).clone();
            for &i in idx {
                smaller.remove(releases[i].task.value.resources);
            }
            g.put(&alloc_key, encode(&alloc_key, &smaller)?);
        }
        // The node's ledger is gone (node removed): only the tasks change.
        None => drop(g.compare(&alloc_key, Compare::create_revision(alloc_key.as_str(), CompareOp::Equal, 0))),
    }
    if node_down {
        g.compare(&live_key, Compare::create_revision(live_key.as_str(), CompareOp::Equal, 0));
    }
    for &i in idx {
        let r = &releases[i];
        let task_key = keys.task(&r.task.value.id);
        g.compare(&task_key, Compare::mod_revision(task_key.as_str(), CompareOp::Equal, r.task.mod_revision));
        g.put(&task_key, encode(&task_key, &updated(r))?);
        g.delete(&keys.assignment(node, &r.task.value.id));
        g.read(&task_key);
    }
    Ok(g)
}

/// Writes a task's new record if it has not changed since `seen` (for transitions that keep resources, such as
/// assigned -> running). Returns the new revision, or `None` if the task changed meanwhile.
pub async fn update_task(store: &Store, seen: &Versioned<Task>, new: &Task) -> Result<Option<i64>> {
    let out = update_tasks(store, &[(seen.clone(), new.clone())]).await?;
    Ok(out.into_iter().next().flatten())
}

/// Writes many tasks' new records, each guarded by its own mod_revision compare, in as few round trips as the
/// server allows (one nested group per task). For transitions that keep resources; returns, per update in
/// order, the new revision or `None` where the task had changed. A request that failed in transport is an
/// error: whether it landed is unknown, so the caller reads the tasks again.
pub async fn update_tasks(store: &Store, updates: &[(Versioned<Task>, Task)]) -> Result<Vec<Option<i64>>> {
    for (seen, new) in updates {
        if seen.value.state.holds_resources() != new.state.holds_resources() {
            return Err(Error::InvalidArgument(format!(
                "task {}: {} -> {} changes what it holds; use release",
                new.id, seen.value.state, new.state
            )));
        }
    }
    let sender = Sender::new(store.clone(), IN_FLIGHT);
    let mut out = vec![None; updates.len()];
    let mut todo: Vec<usize> = (0..updates.len()).collect();
    while !todo.is_empty() {
        let mut groups = Vec::with_capacity(todo.len());
        for &i in &todo {
            groups.push(task_group(store, &updates[i].0, &updates[i].1)?);
        }
        let mut again = Vec::new();
        for (&i, outcome) in todo.iter().zip(sender.nested(groups, None).await.outcomes) {
            match outcome {
                Outcome::Applied { revision } => out[i] = Some(revision),
                Outcome::Refused { .. } | Outcome::Fenced | Outcome::TooLarge { .. } => {}
                Outcome::Resend => again.push(i),
                Outcome::Unknown(e) => return Err(Error::OutcomeUnknown("a task update".into(), e)),
            }
        }
        todo = again;
    }
    Ok(out)
}
