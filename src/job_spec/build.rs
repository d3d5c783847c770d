//! From the file as read to a job, with errors located in the file.

use super::probe::{Probe, Seg, PROBE};
use super::raw::{CheckType, RawCheck, RawConstraint, RawJob, RawService};
use super::JobSpecError;
use crate::discovery::ServiceSpec;
use crate::health::{HealthCheck, Probe as CheckProbe};
use crate::model::{Constraint, Job, JobKind};
use crate::resources::Resources;
use serde::de::{DeserializeSeed, IgnoredAny};
use serde::Deserialize;

pub(super) struct Ctx<'a> {
    pub(super) source: &'a str,
    pub(super) text: &'a str,
    /// Which YAML document of `text` is the job.
    pub(super) doc: usize,
}

impl Ctx<'_> {
    pub(super) fn error(
        &self,
        at: Option<(usize, usize)>,
        field: Option<String>,
        message: impl Into<String>,
    ) -> JobSpecError {
        JobSpecError {
            source_name: self.source.to_string(),
            line: at.map(|(line, _)| line),
            column: at.map(|(_, column)| column),
            field,
            message: message.into(),
        }
    }

    /// An error about `field`, placed at the key or element `at`.
    pub(super) fn error_at(&self, at: &[Seg<'_>], field: String, message: impl Into<String>) -> JobSpecError {
        self.error(self.locate(at, 0), Some(field), message)
    }

    /// A required top-level field that is absent: there is no line to point at.
    fn missing(&self, field: &str, what: &str) -> JobSpecError {
        self.error(None, Some(field.to_string()), format!("missing required field: {what}"))
    }

    /// Finds the one non-empty document, checking the YAML syntax of all of them on the way.
    pub(super) fn select_document(&self) -> Result<usize, JobSpecError> {
        let mut found = None;
        for (index, document) in serde_norway::Deserializer::from_str(self.text).enumerate() {
            match Option::<IgnoredAny>::deserialize(document) {
                Err(err) => return Err(self.syntax_error(err)),
                Ok(None) => {}
                Ok(Some(_)) if found.is_none() => found = Some(index),
                Ok(Some(_)) => {
                    let at = Ctx { doc: index, ..*self }.locate(&[], 0);
                    return Err(self.error(
                        at,
                        None,
                        "a second YAML document starts here, but a job file holds one job; put each job in \
                         its own file",
                    ));
                }
            }
        }
        found.ok_or_else(|| {
            self.error(
                None,
                None,
                "the file has no job in it; a job file is a YAML mapping such as `name: web`, `kind: batch`, \
                 `tasks: 1`, `resources: {cpu: 500m, memory: 512Mi}`, `image: busybox`",
            )
        })
    }

    fn syntax_error(&self, err: serde_norway::Error) -> JobSpecError {
        let at = err.location().map(|l| (l.line(), l.column()));
        let mut message = err.to_string();
        if let Some((line, column)) = at {
            message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
            let source_line = self.text.lines().nth(line.saturating_sub(1)).unwrap_or("");
            if source_line.contains('\t') {
                message.push_str("; YAML indents with spaces, and this line has a tab");
            } else if message.contains("mapping values are not allowed") {
                message.push_str("; a value containing `: ` must be quoted, and a key needs a space after its `:`");
            }
        }
        self.error(at, None, format!("invalid YAML: {message}"))
    }

    /// Turns an error from reading the document into ours: the path serde_norway puts in front of the message
    /// becomes the field, and the messages serde writes for unknown and duplicate fields are reworded to name
    /// the field itself rather than the mapping it is in.
    pub(super) fn serde_error(&self, err: serde_norway::Error) -> JobSpecError {
        let at = err.location().map(|l| (l.line(), l.column()));
        let mut text = err.to_string();
        if let Some((line, column)) = at {
            if let Some(stripped) = text.strip_suffix(&format!(" at line {line} column {column}")) {
                text.truncate(stripped.len());
            }
        }
        let (path, message) = split_path(&text);
        if let Some((name, rest)) = message.strip_prefix("unknown field `").and_then(|r| r.split_once('`')) {
            let expected = rest.trim_start_matches([',', ' ']);
            let hint = if name == "<<" {
                " (YAML merge keys are not supported; write the fields out)".to_string()
            } else {
                did_you_mean(name, expected).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default()
            };
            return self.error(at, Some(join(path, name)), format!("unknown field{hint}; {expected}"));
        }
        if let Some((name, _)) = message.strip_prefix("duplicate field `").and_then(|r| r.split_once('`')) {
            // serde reports a repeated field at the start of its mapping; point at the repetition instead.
            let mut segments = path.map(parse_path).unwrap_or_default();
            segments.push(Seg::Key(name));
            let second = self.locate(&segments, 1).or(at);
            return self.error(second, Some(join(path, name)), "given twice; each field may appear only once");
        }
        // `key:` with nothing after it reaches serde as a unit value; say it in words.
        let message = message.replace("invalid type: unit value, expected", "no value given; expected");
        self.error(at, path.map(str::to_string), message)
    }

    /// Where the key (or list element) at `path` is in the document, by walking to it and failing there:
    /// serde_norway's errors are the only place it reports positions. `skip` passes over that many earlier
    /// occurrences of the last key.
    pub(super) fn locate(&self, path: &[Seg<'_>], skip: usize) -> Option<(usize, usize)> {
        let document = serde_norway::Deserializer::from_str(self.text).nth(self.doc)?;
        let err = Probe { path, skip }.deserialize(document).err()?;
        if !err.to_string().contains(PROBE) {
            return None;
        }
        err.location().map(|l| (l.line(), l.column()))
    }

    pub(super) fn build(&self, raw: RawJob) -> Result<Job, JobSpecError> {
        let name =
            raw.name.ok_or_else(|| self.missing("name", "the job's name, which becomes its id (`name: web`)"))?;
        let kind = raw.kind.ok_or_else(|| {
            self.missing("kind", "`batch` (runs to completion) or `service` (runs until stopped), e.g. `kind: batch`")
        })?;
        let tasks = match (raw.tasks, raw.replicas) {
            (Some(_), Some(_)) => {
                let tasks_at = self.locate(&[Seg::Key("tasks")], 0);
                let replicas_at = self.locate(&[Seg::Key("replicas")], 0);
                let (field, at) = if tasks_at > replicas_at { ("tasks", tasks_at) } else { ("replicas", replicas_at) };
                return Err(self.error(
                    at,
                    Some(field.to_string()),
                    "`tasks` and `replicas` are two names for the same number; give only one",
                ));
            }
            (None, Some(_)) if kind == JobKind::Batch => {
                return Err(self.error_at(
                    &[Seg::Key("replicas")],
                    "replicas".to_string(),
                    "a batch job counts `tasks`, not `replicas` (only a service may say `replicas`)",
                ));
            }
            (Some(n), None) | (None, Some(n)) => n,
            (None, None) => {
                let what = match kind {
                    JobKind::Batch => "how many tasks to run, e.g. `tasks: 3`",
                    JobKind::Service => "how many replicas to run, e.g. `replicas: 3` (or `tasks: 3`)",
                };
                return Err(self.missing("tasks", what));
            }
        };
        let resources = raw.resources.ok_or_else(|| {
            self.missing("resources", "what each task needs, e.g. `resources: {cpu: 500m, memory: 512Mi}`")
        })?;
        let cpu = resources.cpu.ok_or_else(|| {
            self.error_at(
                &[Seg::Key("resources")],
                "resources.cpu".to_string(),
                "missing required field: the CPU each task needs, in millicores (`cpu: 500m`) or cores (`cpu: 2`)",
            )
        })?;
        let memory = resources.memory.ok_or_else(|| {
            self.error_at(
                &[Seg::Key("resources")],
                "resources.memory".to_string(),
                "missing required field: the memory each task needs, e.g. `memory: 512Mi`",
            )
        })?;
        let image =
            raw.image.ok_or_else(|| self.missing("image", "the container image to run, e.g. `image: busybox`"))?;
        let constraints = raw
            .constraints
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, c)| self.constraint(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        if raw.gang == Some(true) && kind != JobKind::Batch {
            return Err(self.error_at(
                &[Seg::Key("gang")],
                "gang".to_string(),
                "`gang: true` is only for batch jobs (all tasks placed together or none); a service's replicas \
                 are placed one by one",
            ));
        }

        let mut job = Job::new(&name, kind, tasks, Resources::new(cpu, memory));
        if let Some(scheduler) = raw.scheduler {
            job.scheduler = scheduler;
        }
        if let Some(namespace) = raw.namespace {
            job.namespace = namespace;
        }
        job.priority = raw.priority.unwrap_or(0);
        job.image = image;
        job.command = raw.command.unwrap_or_default();
        job.args = raw.args.unwrap_or_default();
        job.env = raw.env.unwrap_or_default();
        job.constraints = constraints;
        job.spread = raw.spread;
        job.anti_affinity = raw.anti_affinity.unwrap_or(false);
        job.gang = raw.gang.unwrap_or(false);
        if let Some(restart) = raw.restart {
            if let Some(mode) = restart.policy {
                job.restart.mode = mode;
            }
            if let Some(max_restarts) = restart.max_restarts {
                job.restart.max_restarts = max_restarts;
            }
            if let Some(backoff_ms) = restart.backoff {
                job.restart.backoff_ms = backoff_ms;
            }
        }
        job.on_disconnect = raw.on_disconnect.unwrap_or_default();
        job.duration_ms = raw.duration;
        if let Some(update) = raw.update {
            if kind != JobKind::Service {
                return Err(self.error_at(
                    &[Seg::Key("update")],
                    "update".to_string(),
                    "`update` is only for services: a batch job runs to its end and is not rolled to a new version",
                ));
            }
            let mut policy = crate::deployment::UpdatePolicy::default();
            policy.max_parallel = update.max_parallel.unwrap_or(policy.max_parallel);
            policy.min_healthy_time_ms = update.min_healthy_time.unwrap_or(policy.min_healthy_time_ms);
            policy.healthy_deadline_ms = update.healthy_deadline.unwrap_or(policy.healthy_deadline_ms);
            policy.progress_deadline_ms = update.progress_deadline.unwrap_or(policy.progress_deadline_ms);
            policy.canary = update.canary.unwrap_or(0);
            policy.auto_promote = update.auto_promote.unwrap_or(false);
            policy.auto_revert = update.auto_revert.unwrap_or(false);
            if policy.canary > tasks {
                return Err(self.error_at(
                    &[Seg::Key("update"), Seg::Key("canary")],
                    "update.canary".to_string(),
                    format!(
                        "{} canaries for {tasks} replicas: at most one per replica (canary = replicas is blue/green)",
                        policy.canary
                    ),
                ));
            }
            job.update = Some(policy);
        }
        job.checks = self.checks(raw.check, raw.checks)?;
        job.ports = raw.ports.unwrap_or_default();
        job.services = self.services(&job.ports, raw.services.unwrap_or_default())?;
        Ok(job)
    }

    /// Each service complete, its port one of `ports`, names distinct.
    fn services(
        &self,
        ports: &std::collections::BTreeMap<String, u16>,
        raw: Vec<RawService>,
    ) -> Result<Vec<ServiceSpec>, JobSpecError> {
        let mut out: Vec<ServiceSpec> = Vec::with_capacity(raw.len());
        for (i, s) in raw.into_iter().enumerate() {
            let item = [Seg::Key("services"), Seg::Index(i)];
            let key = |k: &'static str| [&item[..], &[Seg::Key(k)]].concat();
            let Some(name) = s.name else {
                return Err(self.error_at(
                    &item,
                    format!("services[{i}].name"),
                    "missing `name`: what clients resolve, e.g. `{name: web, port: http}`",
                ));
            };
            let Some(port) = s.port else {
                return Err(self.error_at(
                    &item,
                    format!("services[{i}].port"),
                    "missing `port`: the name of one of the job's `ports`, e.g. `{name: web, port: http}`",
                ));
            };
            if !ports.contains_key(&port) {
                let declared = if ports.is_empty() {
                    "the job declares none; add `ports: {http: 8080}`".to_string()
                } else {
                    let names: Vec<String> = ports.keys().map(|p| format!("`{p}`")).collect();
                    format!("the job declares {}", names.join(", "))
                };
                return Err(self.error_at(
                    &key("port"),
                    format!("services[{i}].port"),
                    format!("port `{port}` is not one of the job's `ports`: {declared}"),
                ));
            }
            if out.iter().any(|earlier| earlier.name == name) {
                return Err(self.error_at(
                    &key("name"),
                    format!("services[{i}].name"),
                    format!("a second service named `{name}`; each service of a job needs its own name"),
                ));
            }
            out.push(ServiceSpec { name, port, tags: s.tags.unwrap_or_default() });
        }
        Ok(out)
    }

    /// `check:` (one) or `checks:` (a list), not both; every check complete for its type, names distinct.
    fn checks(&self, one: Option<RawCheck>, many: Option<Vec<RawCheck>>) -> Result<Vec<HealthCheck>, JobSpecError> {
        let raw: Vec<(Vec<Seg<'static>>, String, RawCheck)> = match (one, many) {
            (Some(_), Some(_)) => {
                let one_at = self.locate(&[Seg::Key("check")], 0);
                let many_at = self.locate(&[Seg::Key("checks")], 0);
                let (field, at) = if one_at > many_at { ("check", one_at) } else { ("checks", many_at) };
                return Err(self.error(
                    at,
                    Some(field.to_string()),
                    "give `check` (one check) or `checks` (a list), not both; put every check in `checks`",
                ));
            }
            (Some(c), None) => vec![(vec![Seg::Key("check")], "check".to_string(), c)],
            (None, Some(list)) => list
                .into_iter()
                .enumerate()
                .map(|(i, c)| (vec![Seg::Key("checks"), Seg::Index(i)], format!("checks[{i}]"), c))
                .collect(),
            (None, None) => return Ok(Vec::new()),
        };
        let mut out: Vec<HealthCheck> = Vec::with_capacity(raw.len());
        for (at, field, c) in raw {
            let named = c.name.is_some();
            let check = self.check(&at, &field, c)?;
            if out.iter().any(|earlier| earlier.name == check.name) {
                let (path, what) = if named {
                    ([at.as_slice(), &[Seg::Key("name")]].concat(), format!("{field}.name"))
                } else {
                    (at.clone(), field.clone())
                };
                return Err(self.error_at(
                    &path,
                    what,
                    format!(
                        "a second check named `{}` (a check is named after its type unless it says `name`); give \
                         each check its own `name`, since messages and events tell checks apart by it",
                        check.name
                    ),
                ));
            }
            out.push(check);
        }
        Ok(out)
    }

    /// One check at `at` (the path of its mapping), `field` being that path as written in errors.
    fn check(&self, at: &[Seg<'_>], field: &str, c: RawCheck) -> Result<HealthCheck, JobSpecError> {
        let key = |k: &'static str| [at, &[Seg::Key(k)]].concat();
        let Some(kind) = c.kind else {
            return Err(self.error_at(
                at,
                format!("{field}.type"),
                "missing `type`: `http` (a GET answered 2xx/3xx), `tcp` (a connection accepted) or `exec` (a command \
                 in the task's container exits 0), e.g. `{type: http, port: 8080, path: /health}`",
            ));
        };
        let not_for = |k: &'static str, which: &str| {
            self.error_at(
                &key(k),
                format!("{field}.{k}"),
                format!("`{k}` is only for {which} checks; this one is `type: {}`", kind.name()),
            )
        };
        if kind != CheckType::Http {
            if c.path.is_some() {
                return Err(not_for("path", "http"));
            }
            if c.expect_status.is_some() {
                return Err(not_for("expect_status", "http"));
            }
        }
        if kind == CheckType::Exec && c.port.is_some() {
            return Err(not_for("port", "http and tcp"));
        }
        if kind != CheckType::Exec && c.command.is_some() {
            return Err(not_for("command", "exec"));
        }
        let port = |c: &RawCheck| {
            c.port.ok_or_else(|| {
                self.error_at(
                    at,
                    format!("{field}.port"),
                    format!(
                        "missing `port`: the task's port the {} check connects to on its node (tasks share the \
                         node's network), e.g. `port: 8080`",
                        kind.name()
                    ),
                )
            })
        };
        let probe =
            match kind {
                CheckType::Http => CheckProbe::Http {
                    port: port(&c)?,
                    path: c.path.clone().unwrap_or_else(|| "/".to_string()),
                    expect_status: c.expect_status,
                },
                CheckType::Tcp => CheckProbe::Tcp { port: port(&c)? },
                CheckType::Exec => match c.command.clone() {
                    Some(command) if !command.is_empty() => CheckProbe::Exec { command },
                    Some(_) => return Err(self.error_at(
                        &key("command"),
                        format!("{field}.command"),
                        "the command is empty; give the program and its arguments, e.g. `[\"cat\", \"/tmp/ready\"]`",
                    )),
                    None => {
                        return Err(self.error_at(
                            at,
                            format!("{field}.command"),
                            "missing `command`: what to run in the task's container (exit 0 passes), e.g. \
                         `command: [\"cat\", \"/tmp/ready\"]`",
                        ))
                    }
                },
            };
        let mut check = HealthCheck::new(c.name.as_deref().unwrap_or(kind.name()), probe);
        if let Some(ms) = c.interval {
            check.interval_ms = ms;
        }
        if let Some(ms) = c.timeout {
            check.timeout_ms = ms;
        }
        if let Some(n) = c.healthy_threshold {
            check.healthy_threshold = n;
        }
        if let Some(n) = c.unhealthy_threshold {
            check.unhealthy_threshold = n;
        }
        if let Some(ms) = c.grace {
            check.grace_ms = ms;
        }
        if let Some(restart) = c.restart {
            check.restart = restart;
        }
        Ok(check)
    }

    fn constraint(&self, i: usize, raw: RawConstraint) -> Result<Constraint, JobSpecError> {
        let item = [Seg::Key("constraints"), Seg::Index(i)];
        let Some(label) = raw.label else {
            return Err(self.error_at(
                &item,
                format!("constraints[{i}].label"),
                "missing `label`: the node label the constraint tests, e.g. `{label: zone, equals: a}`",
            ));
        };
        let mut ops = Vec::new();
        if let Some(value) = raw.equals {
            ops.push(("equals", Constraint::Equals { label: label.clone(), value }));
        }
        if let Some(values) = raw.in_ {
            ops.push(("in", Constraint::In { label: label.clone(), values }));
        }
        if let Some(values) = raw.not_in {
            ops.push(("not_in", Constraint::NotIn { label, values }));
        }
        match ops.len() {
            0 => Err(self.error_at(
                &item,
                format!("constraints[{i}]"),
                "a constraint needs one of `equals`, `in` or `not_in`, e.g. `{label: zone, in: [a, b]}`",
            )),
            1 => Ok(ops.pop().expect("one").1),
            _ => {
                // Point at whichever operator comes last in the file: the one that was one too many.
                let (op, at) = ops
                    .iter()
                    .map(|(op, _)| (*op, self.locate(&[Seg::Key("constraints"), Seg::Index(i), Seg::Key(op)], 0)))
                    .max_by_key(|(_, at)| *at)
                    .expect("two or more");
                let others: Vec<String> = ops.iter().map(|(o, _)| format!("`{o}`")).collect();
                Err(self.error(
                    at,
                    Some(format!("constraints[{i}].{op}")),
                    format!(
                        "a constraint takes exactly one of `equals`, `in` or `not_in`, but this one has {}; write one \
                         constraint per condition",
                        others.join(" and ")
                    ),
                ))
            }
        }
    }
}

/// Splits serde_norway's `path: message` (it writes no path for the top level). Only a prefix that looks like a
/// path is taken, so a message that merely contains `: ` stays whole.
fn split_path(text: &str) -> (Option<&str>, &str) {
    if let Some((head, rest)) = text.split_once(": ") {
        if !head.is_empty() && head.chars().all(|c| c.is_ascii_alphanumeric() || "_-.[]?".contains(c)) {
            return (Some(head), rest);
        }
    }
    (None, text)
}

fn join(path: Option<&str>, name: &str) -> String {
    match path {
        Some(path) => format!("{path}.{name}"),
        None => name.to_string(),
    }
}

/// `constraints[0].in` -> `constraints`, `0`, `in`.
fn parse_path(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let mut pieces = part.split('[');
        if let Some(key) = pieces.next().filter(|k| !k.is_empty()) {
            out.push(Seg::Key(key));
        }
        for index in pieces {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                out.push(Seg::Index(i));
            }
        }
    }
    out
}

/// The expected name closest to `name`, if it is close enough to be a typo.
fn did_you_mean<'e>(name: &str, expected: &'e str) -> Option<&'e str> {
    let name = name.to_ascii_lowercase();
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|candidate| (edit_distance(&name, candidate), candidate))
        .filter(|(d, _)| *d <= 2 && *d < name.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}
