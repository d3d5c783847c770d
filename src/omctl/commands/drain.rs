//! `omctl drain NODE [--undo]`: stop placements on a node and move its services away ([`omega::ops::drain`]
//! does it; this renders what it did).

use crate::cli::{Cli, DrainArgs};
use crate::exit::{user, Code};
use crate::output::emit;
use omega::ops::{drain_node, undrain_node, DrainReport};

/// `omctl drain -o json`.
pub type DrainOutput = DrainReport;

pub async fn run(cli: &Cli, args: &DrainArgs) -> anyhow::Result<Code> {
    omega::keys::validate_name("node", &args.node).map_err(|e| user(e.to_string()))?;
    let store = crate::connect::connect(cli).await?;
    let result = if args.undo { undrain_node(&store, &args.node).await } else { drain_node(&store, &args.node).await };
    let out = match result {
        Ok(out) => out,
        Err(omega::Error::NotFound(_)) => {
            return Err(user(format!("node {} not found; `omctl nodes` lists the nodes", args.node)))
        }
        Err(omega::Error::KeptChanging(what)) => {
            return Err(user(format!("{what} kept changing; run the command again")))
        }
        Err(e) => return Err(e.into()),
    };
    emit(cli.output, &out, || render(&out))?;
    Ok(Code::Ok)
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
