//! `omctl drain NODE [--undo]`: stop placements on a node and move its services away.

use crate::cli::{Cli, DrainArgs};
use crate::exit::{user, Code};
use crate::output::emit;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use omega::cell_state::Versioned;
use omega::model::{Allocation, Job, JobKind, Task};
use omega::release::{release, Release, ReleaseOutcome};
use omega::store::{encode, Store};
use serde::Serialize;

/// `omctl drain -o json`.
#[derive(Serialize)]
pub struct DrainOutput {
    pub node: String,
    pub schedulable: bool,
    /// Service tasks handed back to their scheduler.
    pub moved: Vec<String>,
    /// Batch tasks left to finish where they are.
    pub left_running: Vec<String>,
}

pub async fn run(cli: &Cli, args: &DrainArgs) -> anyhow::Result<Code> {
    omega::keys::validate_name("node", &args.node).map_err(|e| user(e.to_string()))?;
    let store = crate::connect::connect(cli).await?;
    set_schedulable(&store, &args.node, args.undo).await?;
    let mut out = DrainOutput { node: args.node.clone(), schedulable: args.undo, moved: vec![], left_running: vec![] };
    if !args.undo {
        let (kvs, _) = store.list(&store.keys().tasks_prefix(), 2000, None).await?;
        let mut releases = Vec::new();
        for kv in &kvs {
            let Ok(task) = serde_json::from_slice::<Task>(kv.value()) else { continue };
            if !task.state.holds_resources() || task.node.as_deref() != Some(args.node.as_str()) {
                continue;
            }
            let kind = store.get_json::<Job>(&store.keys().job(&task.job)).await?.map(|(j, _)| j.kind);
            if kind == Some(JobKind::Service) {
                let reason = Some(format!("node {} drained; moving", args.node));
                releases.push(Release {
                    task: Versioned::new(task, kv.mod_revision()),
                    state: omega::model::TaskState::Pending,
                    reason,
                    run: None,
                });
            } else {
                out.left_running.push(task.id);
            }
        }
        for (r, o) in releases.iter().zip(release(&store, &releases).await?) {
            if matches!(o, ReleaseOutcome::Done { .. }) {
                out.moved.push(r.task.value.id.clone());
            }
        }
    }
    emit(cli.output, &out, || render(&out))?;
    Ok(Code::Ok)
}

/// Compare-and-swap the ledger's `schedulable` flag (claims rewrite the ledger all the time: retry).
async fn set_schedulable(store: &Store, node: &str, schedulable: bool) -> anyhow::Result<()> {
    let key = store.keys().alloc(node);
    for _ in 0..20 {
        let Some((mut ledger, rev)) = store.get_json::<Allocation>(&key).await? else {
            return Err(user(format!("node {node} not found; `omctl nodes` lists the nodes")));
        };
        if ledger.schedulable == schedulable {
            return Ok(());
        }
        ledger.schedulable = schedulable;
        let txn = Txn::new().when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)]).and_then([TxnOp::put(
            key.as_str(),
            encode(&key, &ledger)?,
            None,
        )]);
        if store.client().kv_client().txn(txn).await?.succeeded() {
            return Ok(());
        }
    }
    anyhow::bail!("node {node}'s ledger kept changing; run the command again")
}

fn render(out: &DrainOutput) -> String {
    if out.schedulable {
        return format!("node {} is schedulable again\n", out.node);
    }
    let mut s = format!("node {} drained: no new placements there\n", out.node);
    s.push_str(&format!("  {} service task(s) handed back to their scheduler to run elsewhere\n", out.moved.len()));
    if !out.left_running.is_empty() {
        s.push_str(&format!(
            "  {} batch task(s) left to finish there: {}\n",
            out.left_running.len(),
            out.left_running.join(", ")
        ));
    }
    s
}
