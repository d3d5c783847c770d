//! `omctl tasks`: tasks across jobs, filtered by job, state or node.

use crate::cell;
use crate::cli::{Cli, TasksArgs};
use crate::exit::{user, Code};
use crate::output::{emit, Table};
use crate::units;
use omega::model::{Job, Task};
use serde::Serialize;

/// `omctl tasks -o json`.
#[derive(Serialize)]
pub struct TasksOutput {
    pub revision: i64,
    /// The task records as stored, sorted by job and index.
    pub tasks: Vec<Task>,
}

pub async fn run(cli: &Cli, args: &TasksArgs) -> anyhow::Result<Code> {
    if let Some(job) = &args.job {
        cell::check_job_id(job)?;
    }
    let store = crate::connect::connect(cli).await?;
    let keys = store.keys();
    let range = match &args.job {
        Some(job) => keys.tasks_of_job(job),
        None => keys.tasks_prefix(),
    };
    let read = cell::read(&store, &[range]).await?;
    if let Some(job) = &args.job {
        if read.snapshot.tasks.is_empty() && cell::get_at::<Job>(&store, &keys.job(job), read.revision).await?.is_none()
        {
            return Err(user(format!("job {job} not found; `omctl jobs` lists the jobs")));
        }
    }
    let tasks: Vec<Task> = cell::sorted(read.snapshot.tasks.values())
        .into_iter()
        .filter(|t| args.state.is_none_or(|s| t.value.state == s.state()))
        .filter(|t| args.node.as_ref().is_none_or(|n| t.value.node.as_ref() == Some(n)))
        .map(|t| (*t.value).clone())
        .collect();
    let out = TasksOutput { revision: read.revision, tasks };
    emit(cli.output, &out, || render(&out))?;
    Ok(Code::Ok)
}

fn render(out: &TasksOutput) -> String {
    if out.tasks.is_empty() {
        return "No tasks found.\n".into();
    }
    let mut t = Table::new(&["TASK", "STATE", "NODE", "PLACED BY", "PLACEMENTS", "CPU", "MEMORY", "UPDATED", "REASON"]);
    for task in &out.tasks {
        t.row(vec![
            task.id.clone(),
            task.state.to_string(),
            task.node.clone().unwrap_or_else(|| "-".into()),
            task.placed_by.clone().unwrap_or_else(|| "-".into()),
            task.placements.to_string(),
            units::cpu(task.resources.cpu_millis),
            units::memory(task.resources.memory_bytes),
            units::ago(task.updated_at_ms),
            units::truncate(task.reason.as_deref().unwrap_or(""), 80),
        ]);
    }
    t.render()
}
