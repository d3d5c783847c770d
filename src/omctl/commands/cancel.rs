//! `omctl cancel ID`: mark a job cancelled, then kill its tasks and free the nodes they hold
//! ([`omega::ops::cancel`] does it; this renders what it did).

use crate::cell;
use crate::cli::{CancelArgs, Cli};
use crate::exit::{user, Code};
use crate::output::emit;
use omega::ops::{cancel_job, CancelReport};

/// `omctl cancel ID -o json`.
pub type CancelOutput = CancelReport;

pub async fn run(cli: &Cli, args: &CancelArgs) -> anyhow::Result<Code> {
    cell::check_job_id(&args.id)?;
    let store = crate::connect::connect(cli).await?;
    let out = match cancel_job(&store, &args.id).await {
        Ok(out) => out,
        Err(omega::Error::NotFound(_)) => {
            return Err(user(format!("job {} not found; `omctl jobs` lists the jobs", args.id)))
        }
        Err(omega::Error::KeptChanging(what)) => {
            return Err(user(format!("{what} kept changing while cancelling it; run `omctl cancel {}` again", args.id)))
        }
        Err(e) => return Err(e.into()),
    };
    emit(cli.output, &out, || render(&out))?;
    if !out.not_killed.is_empty() {
        return Err(user(format!(
            "{} task(s) of job {} kept changing and are not killed yet ({}); run `omctl cancel {}` again",
            out.not_killed.len(),
            out.job,
            out.not_killed.join(", "),
            out.job
        )));
    }
    Ok(Code::Ok)
}

fn render(out: &CancelOutput) -> String {
    if out.already_finished {
        return format!("job {} already {}; nothing to cancel\n", out.job, out.state);
    }
    let mut parts = Vec::new();
    if out.killed_pending > 0 {
        parts.push(format!("{} pending {} killed", out.killed_pending, plural(out.killed_pending, "task", "tasks")));
    }
    if out.released > 0 {
        parts.push(format!(
            "{} running or assigned {} killed and released from {} (ledger freed, assignment removed)",
            out.released,
            plural(out.released, "task", "tasks"),
            plural(out.released, "its node", "their nodes"),
        ));
    }
    if out.already_done > 0 {
        parts.push(format!("{} already finished", out.already_done));
    }
    let what = if parts.is_empty() { "no tasks".to_string() } else { parts.join("; ") };
    if out.already_cancelled {
        let note = if out.killed_pending + out.released == 0 { "; nothing left to do" } else { "" };
        format!("job {} was already cancelled (note: cancelling again is harmless): {what}{note}\n", out.job)
    } else {
        format!("job {} cancelled: {what}\n", out.job)
    }
}

fn plural<'a>(n: u32, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}
