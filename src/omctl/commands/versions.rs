//! Versions of a running service: submitting a changed file (a new version and its rollout), `omctl job
//! history ID`, `omctl promote ID`, `omctl revert ID [VERSION]`, and waiting for a rollout to end.

use crate::cli::Cli;
use crate::exit::{user, Code};
use crate::output::{emit, Fields};
use crate::units;
use omega::deployment::{self, Deployment, DeploymentState, FieldChange};
use omega::model::{now_ms, Job, JobKind};
use omega::store::Store;
use serde::Serialize;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// `omctl submit` of a job that exists, `-o json`.
#[derive(Serialize)]
pub struct UpdateOutput {
    pub job: String,
    /// The new version; equal to the current one when nothing changed.
    pub version: u32,
    pub changed: bool,
    pub changes: Vec<FieldChange>,
    /// Replicas relabelled (count, priority or policy changes) rather than replaced.
    pub in_place: bool,
    pub revision: Option<i64>,
    /// With `--wait`: how the rollout ended.
    pub deployment: Option<Deployment>,
}

/// Why `job` cannot become a new version of `current`, if it cannot.
pub fn refuse(current: &Job, job: &Job, source: &str) -> Option<String> {
    let id = &job.id;
    if current.state.is_final() {
        return Some(format!(
            "job {id} already exists and is {}; give the new one another `name:` in {source}, or wait until it is \
             collected",
            serde_json::to_value(current.state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        ));
    }
    if current.kind != JobKind::Service || job.kind != JobKind::Service {
        return Some(format!(
            "job {id} already exists and only services take new versions (a batch job runs to its end); cancel it \
             with `omctl cancel {id}` or give the new one another `name:` in {source}"
        ));
    }
    None
}

/// Submits `job` as the next version of the running `current` (read at `mod_revision`).
pub async fn submit(
    cli: &Cli,
    store: &Store,
    current: &Job,
    mod_revision: i64,
    job: &Job,
    wait: Option<Duration>,
) -> anyhow::Result<Code> {
    let changes = deployment::diff(current, job);
    let mut out = UpdateOutput {
        job: job.id.clone(),
        version: current.version,
        changed: !changes.is_empty(),
        in_place: deployment::runs_same(current, job),
        changes,
        revision: None,
        deployment: None,
    };
    if !out.changed {
        emit(cli.output, &out, || {
            format!("job {}: unchanged (version {}); nothing submitted\n", job.id, current.version)
        })?;
        return Ok(Code::Ok);
    }
    let next = deployment::next_version(current, job, now_ms());
    out.version = next.version;
    out.revision = store.put_next_version(current, mod_revision, &next, None).await?;
    if out.revision.is_none() {
        return Err(user(format!(
            "job {} changed while this version was being submitted (another submission, or its rollout moved on); \
             run the command again",
            job.id
        )));
    }
    let Some(timeout) = wait else {
        emit(cli.output, &out, || render_submitted(&out, &next))?;
        return Ok(Code::Ok);
    };
    eprint!("{}", render_submitted(&out, &next));
    let d = wait_rollout(store, &job.id, next.version, timeout).await?;
    let code = match d.as_ref().map(|d| d.state) {
        Some(DeploymentState::Succeeded) => Code::Ok,
        Some(DeploymentState::Running | DeploymentState::AwaitingPromotion) => Code::WaitTimedOut,
        _ => Code::TaskFailed,
    };
    out.deployment = d;
    emit(cli.output, &out, || match &out.deployment {
        Some(d) => format!("version {} of {}: {} ({})\n", out.version, out.job, d.state, d.message),
        None => format!("version {} of {} was replaced by a newer one\n", out.version, out.job),
    })?;
    Ok(code)
}

fn render_submitted(out: &UpdateOutput, next: &Job) -> String {
    let mut s = format!("job {}: version {} submitted\n", out.job, out.version);
    s.push_str(&render_changes(&out.changes));
    let p = next.update.unwrap_or_default();
    let how = match next.deployment.as_ref() {
        _ if out.in_place => {
            "its replicas run the same containers: they are kept (relabelled), none is replaced".to_string()
        }
        Some(d) if d.canaries > 0 => format!(
            "{} canar{} start beside the {} running replicas; the rest waits for `omctl promote {}`{}",
            d.canaries,
            if d.canaries == 1 { "y" } else { "ies" },
            next.tasks,
            out.job,
            if p.auto_promote { " (or promotes itself once they are healthy)" } else { "" }
        ),
        _ => format!(
            "{} replicas are replaced, {} at a time: each new one starts beside the old ones, and an old one stops \
             only once a new one has been healthy for {}{}",
            next.tasks,
            p.max_parallel,
            units::span(p.min_healthy_time_ms),
            if p.auto_revert { "; a failed rollout goes back to the last stable version" } else { "" }
        ),
    };
    let _ = writeln!(s, "  {how}\n  follow it with `omctl job {}`", out.job);
    s
}

/// The changed fields, as `- old` / `+ new` lines of the job file.
pub fn render_changes(changes: &[FieldChange]) -> String {
    let mut s = String::new();
    for c in changes {
        for line in c.old.lines() {
            let _ = writeln!(s, "  - {line}");
        }
        for line in c.new.lines() {
            let _ = writeln!(s, "  + {line}");
        }
    }
    s
}

/// Polls the job until the rollout of `version` ends (or a newer version replaces it), or `timeout` passes.
async fn wait_rollout(store: &Store, id: &str, version: u32, timeout: Duration) -> anyhow::Result<Option<Deployment>> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let Some((job, _)) = store.get_json::<Job>(&store.keys().job(id)).await? else {
            return Err(user(format!("job {id} disappeared while waiting for its rollout")));
        };
        if job.version != version {
            // Replaced: by an automatic revert, or by another submission.
            let line = match job.deployment.as_ref().and_then(|d| d.reverts) {
                Some(to) => {
                    format!("version {version} failed and was reverted to version {to} (as version {})", job.version)
                }
                None => format!("version {version} was replaced by version {}", job.version),
            };
            eprintln!("  {:>6.1}s  {line}", started.elapsed().as_secs_f64());
            let kept = store.job_version(id, version).await?;
            return Ok(kept.and_then(|j| j.deployment).map(|mut d| {
                if d.state.is_active() {
                    d.state = DeploymentState::Superseded;
                }
                d
            }));
        }
        let d = job.deployment.clone();
        let line = d.as_ref().map(|d| format!("{}: {}", d.state, d.message)).unwrap_or_default();
        if line != last {
            eprintln!("  {:>6.1}s  {line}", started.elapsed().as_secs_f64());
            last = line;
        }
        if d.as_ref().is_none_or(|d| !d.state.is_active()) || started.elapsed() >= timeout {
            return Ok(d);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `omctl job history ID -o json`: one entry per kept version, newest first.
#[derive(Serialize)]
pub struct HistoryEntry {
    pub version: u32,
    pub current: bool,
    pub stable: bool,
    pub submitted_at_ms: u64,
    pub deployment: Option<Deployment>,
    /// What changed from the version before it (empty for the oldest kept).
    pub changes: Vec<FieldChange>,
}

pub async fn history(cli: &Cli, id: &str) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    let Some((current, _)) = store.get_json::<Job>(&store.keys().job(id)).await? else {
        return Err(user(format!("job {id} not found")));
    };
    let mut all = store.earlier_versions(id).await?;
    all.push(current);
    let mut out: Vec<HistoryEntry> = Vec::with_capacity(all.len());
    for (i, v) in all.iter().enumerate() {
        out.push(HistoryEntry {
            version: v.version,
            current: i + 1 == all.len(),
            stable: v.stable,
            submitted_at_ms: v.submitted_at_ms,
            deployment: v.deployment.clone(),
            changes: if i == 0 { Vec::new() } else { deployment::diff(&all[i - 1], v) },
        });
    }
    out.reverse();
    emit(cli.output, &out, || {
        let mut s = String::new();
        for e in &out {
            let mut tags = Vec::new();
            if e.current {
                tags.push("current".to_string());
            }
            if e.stable {
                tags.push("stable".to_string());
            }
            if let Some(d) = &e.deployment {
                tags.push(format!("rollout {}", d.state));
                if let Some(to) = d.reverts {
                    tags.push(format!("reverts to {to}"));
                }
            }
            let age = units::span(now_ms().saturating_sub(e.submitted_at_ms));
            let _ = writeln!(
                s,
                "version {}  ({age} ago{})",
                e.version,
                tags.iter().map(|t| format!(", {t}")).collect::<String>()
            );
            if let Some(d) = e.deployment.as_ref().filter(|d| !d.message.is_empty()) {
                let _ = writeln!(s, "  {}", d.message);
            }
            s.push_str(&render_changes(&e.changes));
        }
        s
    })?;
    Ok(Code::Ok)
}

/// `omctl promote ID`: lets a canary rollout continue.
pub async fn promote(cli: &Cli, id: &str) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    for _ in 0..8 {
        let Some((mut job, rev)) = store.get_json::<Job>(&store.keys().job(id)).await? else {
            return Err(user(format!("job {id} not found")));
        };
        let version = job.version;
        let Some(d) = job.deployment.as_mut().filter(|d| d.state.is_active() && d.version == version) else {
            return Err(user(format!("job {id} has no rollout in progress to promote")));
        };
        if d.canaries == 0 || d.promoted {
            return Err(user(format!(
                "the rollout of version {} of {id} has no canaries waiting for promotion",
                d.version
            )));
        }
        d.promoted = true;
        d.state = DeploymentState::Running;
        d.message = "promoted: replacing the remaining replicas".into();
        if store.put_job_if(&job, rev, None).await?.is_some() {
            let mut f = Fields::new();
            f.add("Promoted", format!("version {version} of {id}: the remaining replicas are now replaced"));
            emit(cli.output, &serde_json::json!({"job": id, "version": version, "promoted": true}), || f.render(0))?;
            return Ok(Code::Ok);
        }
    }
    Err(user(format!("job {id} kept changing while promoting it; run the command again")))
}

/// `omctl revert ID [VERSION]`: submits a copy of an earlier version (default: the one before the current) as
/// a new version, which keeps that version's surviving replicas and skips the canary phase.
pub async fn revert(cli: &Cli, id: &str, to: Option<u32>) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    let Some((current, rev)) = store.get_json::<Job>(&store.keys().job(id)).await? else {
        return Err(user(format!("job {id} not found")));
    };
    let earlier = store.earlier_versions(id).await?;
    let target = match to {
        Some(v) if v == current.version => {
            return Err(user(format!("version {v} is the current version of {id}; nothing to revert")))
        }
        Some(v) => earlier.iter().find(|j| j.version == v).ok_or_else(|| {
            let kept: Vec<String> = earlier.iter().map(|j| j.version.to_string()).collect();
            user(format!(
                "job {id} has no version {v} kept (kept: {})",
                if kept.is_empty() { "none".into() } else { kept.join(", ") }
            ))
        })?,
        None => earlier.last().ok_or_else(|| user(format!("job {id} has no earlier version to revert to")))?,
    };
    if let Some(why) = refuse(&current, target, "the kept version") {
        return Err(user(why));
    }
    let next = deployment::revert_version(&current, target, now_ms());
    if store.put_next_version(&current, rev, &next, None).await?.is_none() {
        return Err(user(format!("job {id} changed while reverting it; run the command again")));
    }
    let changes = deployment::diff(&current, &next);
    emit(
        cli.output,
        &serde_json::json!({"job": id, "version": next.version, "reverts": target.version, "changes": changes}),
        || {
            format!(
                "job {id}: version {} submitted, a copy of version {}\n{}  its replicas still running version {} are \
                 kept; the others are replaced, without a canary phase\n",
                next.version,
                target.version,
                render_changes(&changes),
                target.version
            )
        },
    )?;
    Ok(Code::Ok)
}
