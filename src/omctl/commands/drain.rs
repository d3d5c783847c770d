//! `omctl drain NODE [--deadline D] [--wait] [--force] [--undo]`: stop placements on a node and move its
//! services away ([`omega::ops::drain`] records it; the controller migrates; this renders progress).

use crate::cli::{Cli, DrainArgs};
use crate::exit::{user, Code};
use crate::output::emit;
use crate::units;
use omega::model::{now_ms, Drain, DrainState};
use omega::ops::{drain_node, start_drain, undrain_node, DrainReport};
use std::time::{Duration, Instant};

/// `omctl drain -o json`.
pub type DrainOutput = DrainReport;

pub async fn run(cli: &Cli, args: &DrainArgs) -> anyhow::Result<Code> {
    omega::keys::validate_name("node", &args.node).map_err(|e| user(e.to_string()))?;
    let store = crate::connect::connect(cli).await?;
    let result = if args.undo {
        undrain_node(&store, &args.node).await
    } else if args.force {
        drain_node(&store, &args.node).await
    } else {
        start_drain(&store, &args.node, args.deadline).await
    };
    let mut out = match result {
        Ok(out) => out,
        Err(omega::Error::NotFound(_)) => {
            return Err(user(format!("node {} not found; `omctl nodes` lists the nodes", args.node)))
        }
        Err(omega::Error::KeptChanging(what)) => {
            return Err(user(format!("{what} kept changing; run the command again")))
        }
        Err(e) => return Err(e.into()),
    };
    if args.wait && out.drain.is_some() {
        eprint!("{}", render(&out));
        out.drain = Some(wait(&store, &args.node, args.deadline + Duration::from_secs(60)).await?);
    }
    emit(cli.output, &out, || render(&out))?;
    Ok(Code::Ok)
}

/// Polls the drain record, printing each change of progress, until it is complete (or gone).
async fn wait(store: &omega::store::Store, node: &str, timeout: Duration) -> anyhow::Result<Drain> {
    let started = Instant::now();
    let (mut last, mut seen) = (String::new(), None);
    loop {
        let Some((d, _)) = store.get_json::<Drain>(&store.keys().drain(node)).await? else {
            return seen.ok_or_else(|| user(format!("the drain of node {node} was removed (an undo?)")));
        };
        let line = progress(&d);
        if line != last {
            eprintln!("  {:>6.1}s  {line}", started.elapsed().as_secs_f64());
            last = line;
        }
        if d.state != DrainState::Draining || started.elapsed() >= timeout {
            return Ok(d);
        }
        seen = Some(d);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn progress(d: &Drain) -> String {
    let left = d.deadline_ms.saturating_sub(now_ms());
    let mut s =
        format!("{}: {} moved, {} migrating, {} still on the node", d.state, d.moved, d.migrations.len(), d.remaining);
    if d.state == DrainState::Draining {
        s.push_str(&format!("; deadline in {}", units::span(left)));
    }
    if d.forced > 0 {
        s.push_str(&format!("; {} stopped at the deadline", d.forced));
    }
    if !d.message.is_empty() {
        s.push_str(&format!(" ({})", d.message));
    }
    s
}

fn render(out: &DrainOutput) -> String {
    if out.schedulable {
        return format!("node {} is schedulable again\n", out.node);
    }
    let mut s = format!("node {} drained: no new placements there\n", out.node);
    if let Some(d) = &out.drain {
        if d.state == DrainState::Draining && d.moved == 0 && d.migrations.is_empty() {
            s.push_str(&format!(
                "  its service replicas move to other nodes, each stopped once its replacement is healthy; whatever \
                 is left by {} is stopped\n  follow it with `omctl drain {} --wait` or `omctl nodes`\n",
                units::span(d.deadline_ms.saturating_sub(now_ms())),
                out.node
            ));
        } else {
            s.push_str(&format!("  {}\n", progress(d)));
        }
        return s;
    }
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
