//! `omctl job ID`: one job in full: spec, state, tasks, the scheduler's status, preemptions, and its tasks'
//! recent events (like `kubectl describe`'s).

use crate::cell::{self, TaskCounts};
use crate::cli::{Cli, JobArgs};
use crate::exit::{user, Code};
use crate::output::{emit, Fields, Table};
use crate::timeline::{self, EventRow};
use crate::units;
use omega::cell_state::{CellSnapshot, Versioned};
use omega::model::{Job, JobOwner, JobStatus, RestartMode, SchedulerInstance, Task};
use serde::Serialize;
use std::fmt::Write as _;

/// Tasks listed in the human description; the rest are counted (all are in JSON).
const MAX_TASK_ROWS: usize = 50;
/// Events listed in the human description, the newest; the earlier are counted (all are in JSON).
const MAX_EVENT_ROWS: usize = 20;

/// `omctl job ID -o json`.
#[derive(Serialize)]
pub struct JobDescription {
    pub revision: i64,
    /// The job record as stored.
    pub job: Job,
    pub tasks: TaskCounts,
    /// Why tasks are still pending; `null` when none is.
    pub pending_reason: Option<String>,
    /// The job's status record as its scheduler wrote it (`null` if none has).
    pub status: Option<JobStatus>,
    /// The scheduler instance placing the job now.
    pub owner: Option<JobOwner>,
    pub preemptions: Preemptions,
    /// Every task record, by index.
    pub task_list: Vec<Task>,
    /// The tasks' events, oldest first (as `omctl events --job ID` lists them).
    pub events: Vec<EventRow>,
}

/// Both sides of preemption, as far as this job's tasks record them.
#[derive(Serialize, Default)]
pub struct Preemptions {
    /// Tasks of this job whose placement evicted other tasks.
    pub evicted_others: Vec<EvictedOthers>,
    /// Tasks of this job that were evicted ("preempted by ..." reasons).
    pub evicted: Vec<Evicted>,
}

#[derive(Serialize)]
pub struct EvictedOthers {
    pub task: String,
    pub victims: Vec<String>,
}

#[derive(Serialize)]
pub struct Evicted {
    pub task: String,
    pub state: String,
    pub reason: String,
}

pub async fn run(cli: &Cli, args: &JobArgs) -> anyhow::Result<Code> {
    cell::check_job_id(&args.id)?;
    let store = crate::connect::connect(cli).await?;
    let keys = store.keys();
    // Tasks first: their listing fixes the revision every other read is pinned to.
    let read = cell::read(&store, &[keys.tasks_of_job(&args.id), keys.schedulers_prefix()]).await?;
    let Some((job, _)) = cell::get_at::<Job>(&store, &keys.job(&args.id), read.revision).await? else {
        return Err(user(format!("job {} not found; `omctl jobs` lists the jobs", args.id)));
    };
    let status = cell::get_at::<JobStatus>(&store, &keys.status(&args.id), read.revision).await?.map(|(s, _)| s);
    let owner = cell::get_at::<JobOwner>(&store, &keys.owner(&args.id), read.revision).await?.map(|(o, _)| o);
    let tasks: Vec<Task> = cell::sorted(read.snapshot.tasks.values()).into_iter().map(|t| (*t.value).clone()).collect();
    let counts = TaskCounts::of(job.tasks, tasks.iter());
    let pending_reason = super::jobs::pending_reason(&read.snapshot, &job, &counts, status.as_ref());
    let desc = JobDescription {
        revision: read.revision,
        preemptions: preemptions(&tasks),
        job,
        tasks: counts,
        pending_reason,
        status,
        owner,
        events: timeline::of_tasks(&tasks),
        task_list: tasks,
    };
    emit(cli.output, &desc, || render(&desc, &read.snapshot))?;
    Ok(Code::Ok)
}

fn preemptions(tasks: &[Task]) -> Preemptions {
    let mut p = Preemptions::default();
    for t in tasks {
        if !t.preempted.is_empty() {
            p.evicted_others.push(EvictedOthers { task: t.id.clone(), victims: t.preempted.clone() });
        }
        if let Some(reason) = t.reason.as_deref().filter(|r| r.starts_with("preempted by")) {
            p.evicted.push(Evicted { task: t.id.clone(), state: t.state.to_string(), reason: reason.to_string() });
        }
    }
    p
}

fn render(d: &JobDescription, snapshot: &CellSnapshot) -> String {
    let job = &d.job;
    let mut f = Fields::new();
    f.add("Job", &job.id)
        .add("Namespace", &job.namespace)
        .add("Kind", units::name(&job.kind))
        .add("Scheduler", scheduler_line(job, snapshot))
        .add("Priority", job.priority.to_string())
        .add("State", units::name(&job.state))
        .add("Submitted", units::when(job.submitted_at_ms))
        .add("Tasks", format!("{} placed of {} ({})", d.tasks.placed, d.tasks.total, d.tasks.describe()));
    if job.version > 0 || job.deployment.is_some() {
        f.add("Version", format!("{}{}", job.version, if job.stable { " (stable)" } else { "" }));
    }
    if let Some(dep) = &job.deployment {
        let mut line = format!("version {}: {}", dep.version, dep.state);
        if !dep.message.is_empty() {
            line.push_str(&format!(" ({})", dep.message));
        }
        f.add("Rollout", line);
    }
    let r = job.resources;
    f.add(
        "Resources",
        format!(
            "cpu {}, memory {} per task ({} cpu, {} memory for all)",
            units::cpu(r.cpu_millis),
            units::memory(r.memory_bytes),
            units::cpu(r.cpu_millis.saturating_mul(job.tasks as u64)),
            units::memory(r.memory_bytes.saturating_mul(job.tasks as u64)),
        ),
    );
    f.add("Image", if job.image.is_empty() { "-".to_string() } else { job.image.clone() });
    if !job.command.is_empty() || !job.args.is_empty() {
        let words: Vec<String> = job.command.iter().chain(&job.args).map(|w| shell_word(w)).collect();
        f.add("Command", words.join(" "));
    }
    if !job.env.is_empty() {
        let env: Vec<String> = job.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.add("Env", env.join(", "));
    }
    let constraints: Vec<String> = job.constraints.iter().map(|c| c.to_string()).collect();
    f.add("Constraints", if constraints.is_empty() { "none".into() } else { constraints.join("; ") });
    f.add("Spread", job.spread.clone().unwrap_or_else(|| "none".into()));
    f.add("Anti-affinity", yes_no(job.anti_affinity));
    f.add("Gang", yes_no(job.gang));
    f.add("Restart", restart_line(job));
    if let Some(ms) = job.duration_ms {
        f.add("Duration", units::duration(ms));
    }
    let owner = match &d.owner {
        Some(o) => format!("{}/{} (since {})", o.scheduler, o.instance, units::ago(o.since_ms)),
        None => "none".into(),
    };
    f.add("Owner", owner);
    let mut out = f.render(0);

    out.push_str("\nScheduling status:\n");
    let mut s = Fields::new();
    s.add("Pending reason", d.pending_reason.clone().unwrap_or_else(|| "-".into()));
    match &d.status {
        Some(st) => {
            s.add("Pending (last attempt)", st.pending.to_string());
            if !st.reason.is_empty() && d.pending_reason.as_deref() != Some(st.reason.as_str()) {
                s.add("Last reason", &st.reason);
            }
            if !st.reasons.is_empty() {
                let codes: Vec<String> = st.reasons.iter().map(|(k, v)| format!("{k}={v}")).collect();
                s.add("Reason codes", codes.join(", "));
            }
            s.add("Attempts", st.attempts.to_string());
            s.add("Conflicts", format!("{} ({} of attempts)", st.conflicts, units::ratio(st.conflicts, st.attempts)));
            s.add("Last attempt", units::when(st.last_attempt_ms));
            if !st.scheduler_instance.is_empty() {
                s.add("Written by", &st.scheduler_instance);
            }
        }
        None if d.pending_reason.is_some() => {
            s.add("Status", "none yet (a scheduler writes one after an attempt leaves tasks pending)");
        }
        None => {
            s.add("Status", "none (schedulers write one only while tasks wait)");
        }
    }
    out.push_str(&s.render(2));

    out.push_str("\nTasks:\n");
    if d.task_list.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut t = Table::new(&["TASK", "STATE", "NODE", "PLACED BY", "PLACEMENTS", "REASON"]);
        for task in d.task_list.iter().take(MAX_TASK_ROWS) {
            t.row(vec![
                task.id.clone(),
                task.state.to_string(),
                task.node.clone().unwrap_or_else(|| "-".into()),
                task.placed_by.clone().unwrap_or_else(|| "-".into()),
                task.placements.to_string(),
                task.reason.clone().unwrap_or_default(),
            ]);
        }
        for line in t.render().lines() {
            let _ = writeln!(out, "  {line}");
        }
        if d.task_list.len() > MAX_TASK_ROWS {
            let _ = writeln!(
                out,
                "  ... {} more; `omctl tasks --job {}` lists them all",
                d.task_list.len() - MAX_TASK_ROWS,
                job.id
            );
        }
    }

    let p = &d.preemptions;
    if !p.evicted_others.is_empty() || !p.evicted.is_empty() {
        out.push_str("\nPreemptions:\n");
        for e in &p.evicted_others {
            let _ = writeln!(out, "  {} preempted {}", e.task, e.victims.join(", "));
        }
        for e in &p.evicted {
            let _ = writeln!(out, "  {} ({}) was {}", e.task, e.state, e.reason);
        }
    }

    out.push_str("\nEvents:\n");
    if d.events.is_empty() {
        out.push_str("  none\n");
    } else {
        let earlier = d.events.len().saturating_sub(MAX_EVENT_ROWS);
        if earlier > 0 {
            let _ = writeln!(out, "  ({earlier} earlier; `omctl events --job {}` lists them all)", job.id);
        }
        for line in timeline::table(&d.events[earlier..], omega::model::now_ms()).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

fn scheduler_line(job: &Job, snapshot: &CellSnapshot) -> String {
    let live: Vec<&Versioned<SchedulerInstance>> =
        snapshot.schedulers.values().filter(|i| i.value.scheduler == job.scheduler).collect();
    match live.len() {
        0 => format!("{} (no instance running)", job.scheduler),
        1 => format!("{} (1 instance running)", job.scheduler),
        n => format!("{} ({n} instances running)", job.scheduler),
    }
}

fn restart_line(job: &Job) -> String {
    let r = job.restart;
    let limit = match (r.mode, r.max_restarts) {
        (RestartMode::Never, _) => return "never".into(),
        (RestartMode::Always, 0) => "unlimited".to_string(),
        (_, n) => format!("at most {n}"),
    };
    format!(
        "{}, {limit} restarts, backoff {} (doubling, up to 1m)",
        units::name(&r.mode),
        units::duration(r.backoff_ms)
    )
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// A word as a shell would need it quoted: as is when plain, else in single quotes.
fn shell_word(w: &str) -> String {
    let plain = !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}
