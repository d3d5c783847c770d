//! Rendering a job back into the job-file format.

use crate::health::{HealthCheck, Probe};
use crate::model::{Constraint, Job, JobKind, OnDisconnect, RestartMode};
use crate::units;
use serde::Serialize;
use std::collections::BTreeMap;

/// Renders a job in the job file format, so that what `parse_job` reads back is the same job.
///
/// Quantities and durations come out in their canonical form (`500m`, `2`, `512Mi`, `90s`) rather than as raw
/// numbers, so the output is what a person would have written. `restart` and `scheduler` are always written
/// out, since they are what an operator looking at a job most often wants to check; other fields only when
/// they differ from their default. What is not part of the file (state, submission time) is left out. A job
/// that `parse_job` would refuse (say, one built in code with an empty image) renders as a file it refuses.
pub fn to_yaml(job: &Job) -> String {
    let (tasks, replicas) = match job.kind {
        JobKind::Batch => (Some(job.tasks), None),
        JobKind::Service => (None, Some(job.tasks)),
    };
    let out = OutJob {
        name: &job.id,
        namespace: (job.namespace != crate::model::DEFAULT_NAMESPACE).then_some(job.namespace.as_str()),
        kind: kind_name(job.kind),
        scheduler: &job.scheduler,
        priority: job.priority,
        tasks,
        replicas,
        resources: OutResources {
            cpu: render_cpu(job.resources.cpu_millis),
            memory: render_memory(job.resources.memory_bytes),
        },
        image: &job.image,
        command: &job.command,
        args: &job.args,
        env: &job.env,
        constraints: job
            .constraints
            .iter()
            .map(|c| match c {
                Constraint::Equals { label, value } => {
                    OutConstraint { label, equals: Some(value), ..Default::default() }
                }
                Constraint::In { label, values } => OutConstraint { label, r#in: Some(values), ..Default::default() },
                Constraint::NotIn { label, values } => {
                    OutConstraint { label, not_in: Some(values), ..Default::default() }
                }
            })
            .collect(),
        spread: job.spread.as_deref(),
        anti_affinity: job.anti_affinity,
        gang: job.gang,
        restart: OutRestart {
            policy: policy_name(job.restart.mode),
            max_restarts: job.restart.max_restarts,
            backoff: render_duration(job.restart.backoff_ms),
        },
        on_disconnect: match job.on_disconnect {
            OnDisconnect::Stop => None,
            OnDisconnect::KeepRunning => Some("keep_running"),
        },
        duration: job.duration_ms.map(render_duration),
        update: job.update.map(|u| OutUpdate {
            max_parallel: u.max_parallel,
            min_healthy_time: render_duration(u.min_healthy_time_ms),
            healthy_deadline: render_duration(u.healthy_deadline_ms),
            progress_deadline: render_duration(u.progress_deadline_ms),
            canary: u.canary,
            auto_promote: u.auto_promote,
            auto_revert: u.auto_revert,
        }),
        checks: job.checks.iter().map(render_check).collect(),
        ports: &job.ports,
        services: &job.services,
    };
    serde_norway::to_string(&out).expect("a job always renders as YAML")
}
// ---------------------------------------------------------------------------------------------------------
// Rendering.

#[derive(Serialize)]
struct OutJob<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    kind: &'static str,
    scheduler: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    priority: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tasks: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<u32>,
    resources: OutResources,
    #[serde(skip_serializing_if = "str::is_empty")]
    image: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    command: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    args: &'a [String],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    constraints: Vec<OutConstraint<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spread: Option<&'a str>,
    #[serde(skip_serializing_if = "is_false")]
    anti_affinity: bool,
    #[serde(skip_serializing_if = "is_false")]
    gang: bool,
    restart: OutRestart,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_disconnect: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checks: Vec<OutCheck<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    update: Option<OutUpdate>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    ports: &'a BTreeMap<String, u16>,
    #[serde(skip_serializing_if = "<[crate::discovery::ServiceSpec]>::is_empty")]
    services: &'a [crate::discovery::ServiceSpec],
}

#[derive(Serialize)]
struct OutUpdate {
    max_parallel: u32,
    min_healthy_time: String,
    healthy_deadline: String,
    progress_deadline: String,
    canary: u32,
    auto_promote: bool,
    auto_revert: bool,
}

/// A check with only what differs from the defaults written (its name only when it is not its type's).
#[derive(Serialize)]
struct OutCheck<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expect_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    healthy_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unhealthy_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart: Option<bool>,
}

/// `value` when it is not the default (what the file need not say).
fn differs<T: PartialEq>(value: T, default: T) -> Option<T> {
    (value != default).then_some(value)
}

fn render_check(c: &HealthCheck) -> OutCheck<'_> {
    let defaults = HealthCheck::new(&c.name, c.probe.clone());
    let (kind, port, path, expect_status, command) = match &c.probe {
        Probe::Http { port, path, expect_status } => {
            ("http", Some(*port), (path != "/").then_some(path.as_str()), *expect_status, None)
        }
        Probe::Tcp { port } => ("tcp", Some(*port), None, None, None),
        Probe::Exec { command } => ("exec", None, None, None, Some(command.as_slice())),
    };
    OutCheck {
        name: (c.name != kind).then_some(c.name.as_str()),
        kind,
        port,
        path,
        expect_status,
        command,
        interval: differs(c.interval_ms, defaults.interval_ms).map(render_duration),
        timeout: differs(c.timeout_ms, defaults.timeout_ms).map(render_duration),
        healthy_threshold: differs(c.healthy_threshold, defaults.healthy_threshold),
        unhealthy_threshold: differs(c.unhealthy_threshold, defaults.unhealthy_threshold),
        grace: differs(c.grace_ms, defaults.grace_ms).map(render_duration),
        restart: differs(c.restart, defaults.restart),
    }
}

#[derive(Serialize)]
struct OutResources {
    cpu: Quantity,
    memory: Quantity,
}

/// A number when the canonical form is a bare number, so the YAML does not quote it.
#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum Quantity {
    Number(u64),
    Text(String),
}

impl Quantity {
    /// A rendered quantity as YAML writes it best: a plain number where it is one (`2`, `1000`), else text.
    fn of(text: String) -> Quantity {
        match text.parse::<u64>() {
            Ok(n) => Quantity::Number(n),
            Err(_) => Quantity::Text(text),
        }
    }
}

#[derive(Default, Serialize)]
struct OutConstraint<'a> {
    label: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    equals: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    r#in: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_in: Option<&'a [String]>,
}

#[derive(Serialize)]
struct OutRestart {
    policy: &'static str,
    max_restarts: u32,
    backoff: String,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Batch => "batch",
        JobKind::Service => "service",
    }
}

fn policy_name(mode: RestartMode) -> &'static str {
    match mode {
        RestartMode::Never => "never",
        RestartMode::OnFailure => "on_failure",
        RestartMode::Always => "always",
    }
}

/// CPU as a job file writes it ([`units::cpu`]): whole cores as a number, else `1500m`.
pub(super) fn render_cpu(millis: u64) -> Quantity {
    Quantity::of(units::cpu(millis))
}

/// Memory exactly ([`units::memory_exact`]): `1536Mi`, or a number of bytes.
pub(super) fn render_memory(bytes: u64) -> Quantity {
    Quantity::of(units::memory_exact(bytes))
}

/// A duration exactly, in its largest unit ([`units::duration`]).
pub(super) fn render_duration(ms: u64) -> String {
    units::duration(ms)
}
