//! Job files (YAML) -> validated jobs.
//!
//! A job file is what a person writes and `omctl submit FILE` reads. It is YAML because people can comment it,
//! and its fields follow Kubernetes and Nomad where those are familiar, so a job file reads like what its
//! author already knows. One file holds one job (one YAML document); empty documents, such as a trailing
//! `---`, are ignored.
//!
//! ```yaml
//! # web.yaml: three replicas of a web server.
//! name: web                 # required; becomes the job id (1-128 of a-z A-Z 0-9 - _ .)
//! kind: service             # required: batch (runs to completion) | service (runs until stopped)
//! scheduler: service        # optional; default: the scheduler named like the kind (like schedulerName)
//! priority: 100             # optional, default 0; may be negative
//! replicas: 3               # required: `tasks:` (any kind) or `replicas:` (services only), 1-100000
//! resources:                # required; what each task asks for
//!   cpu: 500m               # millicores `500m`, or cores `2`, `0.5`, `1.5`; more than 0
//!   memory: 512Mi           # bytes `1073741824`, or Ki Mi Gi Ti (powers of 1024), k K M G T (of 1000)
//! image: busybox            # required
//! command: ["sh", "-c"]     # optional; replaces the image's entrypoint
//! args: ["echo hi && sleep 3600"]
//! env:                      # optional; values are taken as written: PORT: 8080 is the string "8080"
//!   GREETING: hello
//!   PORT: 8080
//! constraints:              # optional; each has a `label` and exactly one of equals / in / not_in
//!   - {label: zone, in: [a, b]}
//!   - label: disk
//!     not_in: [hdd]         # holds on nodes without the label too
//! spread: zone              # optional; spread the tasks evenly over the values of this node label
//! anti_affinity: true       # optional; no two tasks of this job on one node
//! restart:                  # optional
//!   policy: on_failure      # never | on_failure | always; default never (batch) or always (service)
//!   max_restarts: 3         # default 0 (with `always`: unlimited)
//!   backoff: 2s             # default 1s; doubles after each restart, up to a minute
//! duration: 30s             # optional; how long a task runs on a simulated node
//! ```
//!
//! A batch job counts `tasks` and may ask for `gang: true` (all its tasks are placed together or none is):
//!
//! ```yaml
//! name: train
//! kind: batch
//! tasks: 8
//! gang: true
//! resources: {cpu: 4, memory: 16Gi}
//! image: trainer:1.2
//! ```
//!
//! Choices, and why:
//!
//! - **Unknown fields are errors.** A misspelt `replica: 3` silently dropped would run a job with the wrong
//!   number of tasks; the error names the field, its line and the fields allowed (and suggests the closest).
//! - **`tasks` or `replicas`, not both.** Services are usually sized in replicas, so a service may use either
//!   word; a batch job has tasks, so `replicas` there is an error rather than a synonym nobody expects.
//! - **`gang` only for batch jobs.** Gang placement is all-or-nothing start of a computation; a service's
//!   replicas come and go one by one. `gang: false` is accepted anywhere, since it asks for nothing.
//! - **Quantities follow Kubernetes** (`500m`, `0.5`, `512Mi`, `1.5Gi`, `100M`), with three deliberate
//!   differences that each stop a likely mistake: exponent notation (`1e3`) is refused (write the number out);
//!   a lower-case `m` on memory is refused (Kubernetes reads `500m` as half a byte; you meant `M` or `Mi`); and
//!   `MB`/`GB`/`MiB` are refused with a hint, since they are ambiguous between powers of 1000 and 1024. Values
//!   must be exact: `0.0005` cores (below a millicore) or `1.5` bytes is an error, never rounded.
//! - **Durations** are `500ms`, `2s`, `1m`, `1h`, combinations such as `1m30s`, decimals such as `1.5s`, or a
//!   bare integer meaning milliseconds. Note that `m` is minutes here but millicores in `cpu`.
//! - **Scalars are taken as written.** Quantities, durations, names and env values are read from the text of
//!   the YAML scalar, not from what YAML would make of it: `PORT: 8080` is `"8080"`, `VERSION: 1.10` stays
//!   `"1.10"` (not `1.1`), `cpu: 0.5` is exactly 500 millicores. The flip side: `~` and `null` are not special
//!   in string fields (`image: null` names an image called `null`).
//! - **Anchors and aliases work; merge keys (`<<`) do not** (they are reported as an unknown field).
//!
//! # Where errors point
//!
//! Every [`JobSpecError`] names the file, the line and column when known, and the field as a path such as
//! `resources.cpu` or `constraints[1].in`. Errors found while reading the YAML (syntax, unknown or duplicate
//! fields, wrong types, bad quantities, names, durations, empty lists) carry the position serde_norway reports
//! for the offending key or value. Checks across fields (both `tasks` and `replicas`, `gang` on a service, a
//! constraint with two operators) run after reading; they find their position by walking the document again
//! to the offending key and reading the position serde_norway reports for it, which is exact even for flow
//! style (`{label: zone, equals: a, in: [b]}`) where scanning lines for a key would not be. A field that is
//! missing has no line of its own: a missing top-level field has no line, and a missing nested field
//! (`resources.cpu`) points at its parent's key.

use crate::keys::validate_name;
use crate::model::{Constraint, Job, JobKind, RestartMode};
use crate::resources::Resources;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The most tasks one job may ask for. A job is written as one key per task, so a typo such as `tasks: 30000000`
/// would otherwise flood etcd before anyone noticed.
pub const MAX_TASKS: u32 = 100_000;

/// A job file that cannot become a job, located as precisely as the file allows.
///
/// The parts are kept apart (not only formatted) so that tools can point at the spot (an editor jumping to the
/// line, a web form highlighting the field); `Display` gives the compiler-style `file:line:col: field: message`
/// that people read in a terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpecError {
    /// What the caller called the text, usually the file path.
    pub source_name: String,
    /// 1-based; `None` when the problem has no place in the file (a required field that is missing).
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    /// The field as a path, such as `resources.cpu` or `constraints[1].in`; `None` for problems of the whole
    /// file (YAML syntax, an empty file).
    pub field: Option<String>,
    /// What is wrong and what is allowed instead.
    pub message: String,
}

impl fmt::Display for JobSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut located = false;
        if !self.source_name.is_empty() {
            f.write_str(&self.source_name)?;
            located = true;
        }
        if let Some(line) = self.line {
            if located {
                f.write_str(":")?;
            }
            write!(f, "{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
            located = true;
        }
        if located {
            f.write_str(": ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobSpecError {}

/// Parses one job file into a pending job submitted now.
///
/// `source_name` is only used in errors (pass the path the user typed, so the error points where they look).
/// The job is fully validated: a job this returns can be written to the cell as is.
pub fn parse_job(source_name: &str, text: &str) -> Result<Job, JobSpecError> {
    let mut ctx = Ctx { source: source_name, text, doc: 0 };
    ctx.doc = ctx.select_document()?;
    let document = serde_norway::Deserializer::from_str(text).nth(ctx.doc).expect("the document was just read");
    let raw = RawJob::deserialize(document).map_err(|err| ctx.serde_error(err))?;
    ctx.build(raw)
}

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
        duration: job.duration_ms.map(render_duration),
    };
    serde_norway::to_string(&out).expect("a job always renders as YAML")
}

/// Parses a CPU quantity into millicores: `500m`, or cores as `2`, `0.5`, `1.5` (= 1500).
///
/// Zero is accepted here (it is a quantity); whoever needs a positive amount checks for it. Refused, each with
/// a message that says what is accepted: empty, negative, exponent notation (`1e3`), other suffixes, less than
/// a millicore (`0.0005`), and more than `u64::MAX` millicores.
pub fn parse_quantity_cpu(s: &str) -> Result<u64, String> {
    const FORMS: &str = "CPU is millicores (`500m`) or cores (`2`, `0.5`, `1.5`)";
    let t = s.trim();
    let (number, suffix) = split_number(t);
    let multiplier = match suffix {
        "m" => 1,
        "" => 1000,
        _ => {
            return Err(match quantity_precheck(t, number, suffix) {
                Some(problem) => problem.describe(t, "a CPU quantity", FORMS),
                None => format!("`{t}` has an unknown suffix `{suffix}`; {FORMS}, and `m` is the only suffix"),
            })
        }
    };
    scaled(t, number, multiplier).map_err(|problem| match problem {
        Problem::NotWhole => format!("`{t}` is finer than a millicore; {FORMS}, to at most three decimals"),
        Problem::TooLarge => format!("`{t}` is too large: at most {}m", u64::MAX),
        other => other.describe(t, "a CPU quantity", FORMS),
    })
}

/// Parses a memory quantity into bytes: a plain integer, or a number with one of the suffixes `Ki`, `Mi`,
/// `Gi`, `Ti` (powers of 1024) or `k`/`K`, `M`, `G`, `T` (powers of 1000), such as `512Mi`, `1.5Gi`, `100M`.
///
/// The result must be a whole number of bytes (`1.5Gi` is, `1.5` is not). Zero is accepted here. `MB`, `GiB`,
/// `mi` and a lower-case `m` are refused with a hint, since each is a likely slip for one of the above.
pub fn parse_quantity_memory(s: &str) -> Result<u64, String> {
    const FORMS: &str = "memory is bytes (`1073741824`) or a number with a suffix Ki, Mi, Gi, Ti (powers of \
                         1024) or k, M, G, T (powers of 1000), e.g. `512Mi`, `1.5Gi`, `100M`";
    let t = s.trim();
    let (number, suffix) = split_number(t);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000u128.pow(2),
        "G" => 1000u128.pow(3),
        "T" => 1000u128.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            if let Some(problem) = quantity_precheck(t, number, suffix) {
                return Err(problem.describe(t, "a memory quantity", FORMS));
            }
            return Err(memory_suffix_hint(t, number, suffix)
                .unwrap_or_else(|| format!("`{t}` has an unknown suffix `{suffix}`; {FORMS}")));
        }
    };
    scaled(t, number, multiplier).map_err(|problem| match problem {
        Problem::NotWhole => format!("`{t}` is not a whole number of bytes; {FORMS}"),
        Problem::TooLarge => format!("`{t}` is too large: at most {} bytes", u64::MAX),
        other => other.describe(t, "a memory quantity", FORMS),
    })
}

/// Parses a duration into milliseconds: `500ms`, `2s`, `1m`, `1h`, combinations such as `1m30s`, decimals
/// such as `1.5s`, or a bare integer meaning milliseconds.
///
/// Refused: empty, negative, a bare decimal (`1.5`: seconds or milliseconds?), unknown units (`d`, `us`), less
/// than a millisecond, and more than `u64::MAX` milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    const FORMS: &str = "a duration is `500ms`, `2s`, `1m`, `1h`, a combination such as `1m30s`, or whole \
                         milliseconds such as `1500`";
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("an empty duration; {FORMS}"));
    }
    if t.starts_with('-') {
        return Err(format!("`{t}` is negative; {FORMS}"));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<u64>().map_err(|_| format!("`{t}` is too large: at most {} milliseconds", u64::MAX));
    }
    let mut total: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let (number, after) = split_number(rest);
        let unit_len = after.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        if number.is_empty() {
            return Err(format!("`{t}` is not a duration; {FORMS}"));
        }
        let multiplier = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60 * 1000,
            "h" => 60 * 60 * 1000,
            "" if rest == t => {
                return Err(format!("`{t}` has no unit; a bare number is whole milliseconds; {FORMS}"));
            }
            "" => return Err(format!("`{t}` has no unit after `{number}`; {FORMS}")),
            _ => return Err(format!("`{t}` has an unknown unit `{unit}`; the units are ms, s, m and h; {FORMS}")),
        };
        let part = scaled(t, number, multiplier).map_err(|problem| match problem {
            Problem::NotWhole => format!("`{t}` is finer than a millisecond; {FORMS}"),
            Problem::TooLarge => format!("`{t}` is too large: at most {} milliseconds", u64::MAX),
            other => other.describe(t, "a duration", FORMS),
        })?;
        total = total.checked_add(part).ok_or_else(|| format!("`{t}` is too large: at most {} ms", u64::MAX))?;
        rest = next;
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------------------
// Numbers: exact decimal arithmetic shared by the quantity and duration parsers.

/// Why a number could not be read; each parser turns it into words with its own list of accepted forms.
#[derive(Debug, PartialEq, Eq)]
enum Problem {
    Empty,
    Negative,
    Exponent,
    Syntax,
    TooLarge,
    NotWhole,
}

impl Problem {
    fn describe(&self, text: &str, what: &str, forms: &str) -> String {
        match self {
            Problem::Empty => format!("an empty value is not {what}; {forms}"),
            Problem::Negative => format!("`{text}` is negative; {forms}"),
            Problem::Exponent => {
                format!("`{text}` uses exponent notation, which is not accepted; write the number out; {forms}")
            }
            Problem::Syntax | Problem::NotWhole => format!("`{text}` is not {what}; {forms}"),
            Problem::TooLarge => format!("`{text}` is too large"),
        }
    }
}

/// Splits `12.5Gi` into `12.5` and `Gi`.
fn split_number(t: &str) -> (&str, &str) {
    let end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    t.split_at(end)
}

/// What is wrong with a quantity whose suffix was not recognised, when the suffix is not the problem.
fn quantity_precheck(t: &str, number: &str, suffix: &str) -> Option<Problem> {
    if t.is_empty() {
        Some(Problem::Empty)
    } else if t.starts_with('-') {
        Some(Problem::Negative)
    } else if !number.is_empty()
        && suffix.len() > 1
        && suffix.starts_with(['e', 'E'])
        && suffix[1..].trim_start_matches(['+', '-']).bytes().all(|b| b.is_ascii_digit())
    {
        Some(Problem::Exponent)
    } else if number.is_empty() {
        Some(Problem::Syntax)
    } else {
        None
    }
}

/// A hint for memory suffixes that are slips for a real one: `MB`, `MiB`, `gi`, `m`.
fn memory_suffix_hint(t: &str, number: &str, suffix: &str) -> Option<String> {
    if suffix == "m" {
        return Some(format!(
            "`{t}`: `m` is not a memory suffix (Kubernetes reads it as thousandths of a byte); write \
             `{number}M` (10^6 bytes) or `{number}Mi` (2^20 bytes)"
        ));
    }
    let trimmed = suffix.strip_suffix(['B', 'b']).unwrap_or(suffix);
    let mut chars = trimmed.chars();
    let first = chars.next()?.to_ascii_uppercase();
    if !"KMGT".contains(first) {
        return None;
    }
    match chars.as_str() {
        "" => Some(format!(
            "`{t}` has an unknown suffix `{suffix}`; write `{number}{first}` (powers of 1000) or \
             `{number}{first}i` (powers of 1024); bytes are implied"
        )),
        "i" | "I" => Some(format!("`{t}` has an unknown suffix `{suffix}`; write `{number}{first}i`")),
        _ => None,
    }
}

/// Reads an unsigned decimal (`12`, `1.5`, `.5`) as `mantissa / 10^scale`, exactly.
fn decimal(number: &str) -> Result<(u128, u32), Problem> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(Problem::Syntax);
    }
    let fraction = fraction.trim_end_matches('0');
    let mut mantissa: u128 = 0;
    for b in whole.bytes().chain(fraction.bytes()) {
        if !b.is_ascii_digit() {
            return Err(Problem::Syntax);
        }
        mantissa =
            mantissa.checked_mul(10).and_then(|m| m.checked_add(u128::from(b - b'0'))).ok_or(Problem::TooLarge)?;
    }
    Ok((mantissa, fraction.len() as u32))
}

/// `number * multiplier` as a whole `u64`, or why not. `text` is the whole value, for the empty and sign checks.
fn scaled(text: &str, number: &str, multiplier: u128) -> Result<u64, Problem> {
    if text.is_empty() {
        return Err(Problem::Empty);
    }
    if text.starts_with('-') {
        return Err(Problem::Negative);
    }
    let (mantissa, scale) = decimal(number)?;
    let product = mantissa.checked_mul(multiplier).ok_or(Problem::TooLarge)?;
    let value = match 10u128.checked_pow(scale) {
        Some(divisor) if product % divisor == 0 => product / divisor,
        // More decimals than fit in a u128 with the last one non-zero: never a whole number.
        _ if mantissa == 0 => 0,
        _ => return Err(Problem::NotWhole),
    };
    u64::try_from(value).map_err(|_| Problem::TooLarge)
}

// ---------------------------------------------------------------------------------------------------------
// The file as read: every field optional, so that a missing one is reported in our words, not serde's.

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a job: a mapping with `name`, `kind`, `tasks` (or `replicas`), `resources` and `image`"
)]
struct RawJob {
    #[serde(default, deserialize_with = "de_job_name")]
    name: Option<String>,
    #[serde(default, deserialize_with = "de_kind")]
    kind: Option<JobKind>,
    #[serde(default, deserialize_with = "de_scheduler")]
    scheduler: Option<String>,
    #[serde(default, deserialize_with = "de_priority")]
    priority: Option<i32>,
    #[serde(default, deserialize_with = "de_count")]
    tasks: Option<u32>,
    #[serde(default, deserialize_with = "de_count")]
    replicas: Option<u32>,
    #[serde(default)]
    resources: Option<RawResources>,
    #[serde(default, deserialize_with = "de_image")]
    image: Option<String>,
    #[serde(default, deserialize_with = "de_list")]
    command: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_list")]
    args: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_env")]
    env: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "de_constraints")]
    constraints: Option<Vec<RawConstraint>>,
    #[serde(default, deserialize_with = "de_label")]
    spread: Option<String>,
    #[serde(default, deserialize_with = "de_bool")]
    anti_affinity: Option<bool>,
    #[serde(default, deserialize_with = "de_bool")]
    gang: Option<bool>,
    #[serde(default)]
    restart: Option<RawRestart>,
    #[serde(default, deserialize_with = "de_duration")]
    duration: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `cpu` and `memory`, e.g. `{cpu: 500m, memory: 512Mi}`")]
struct RawResources {
    #[serde(default, deserialize_with = "de_cpu")]
    cpu: Option<u64>,
    #[serde(default, deserialize_with = "de_memory")]
    memory: Option<u64>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a constraint: a mapping with `label` and one of `equals`, `in`, `not_in`, e.g. \
                 `{label: zone, equals: a}`"
)]
struct RawConstraint {
    #[serde(default, deserialize_with = "de_label")]
    label: Option<String>,
    #[serde(default, deserialize_with = "de_text")]
    equals: Option<String>,
    #[serde(default, rename = "in", deserialize_with = "de_values")]
    in_: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_values")]
    not_in: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `policy`, `max_restarts` and `backoff`, e.g. `{policy: on_failure, max_restarts: 3}`"
)]
struct RawRestart {
    #[serde(default, deserialize_with = "de_policy")]
    policy: Option<RestartMode>,
    #[serde(default, deserialize_with = "de_max_restarts")]
    max_restarts: Option<u32>,
    #[serde(default, deserialize_with = "de_duration")]
    backoff: Option<u64>,
}

// ---------------------------------------------------------------------------------------------------------
// Field readers. Each checks its value while serde_norway still knows where the value is, so that the error
// carries its line and column.

/// Any scalar, read as its text, then checked. Scalars are read as written (see the module doc).
struct Scalar<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<'de, T> Visitor<'de> for Scalar<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

impl<'de, T> DeserializeSeed<'de> for Scalar<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

macro_rules! scalar_field {
    ($name:ident, $ty:ty, $expecting:expr, $parse:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$ty>, D::Error> {
            d.deserialize_str(Scalar::<$ty> { expecting: $expecting, parse: $parse }).map(Some)
        }
    };
}

scalar_field!(de_job_name, String, "a job name such as `web`", |s| checked_name("job", s));
scalar_field!(de_scheduler, String, "a scheduler name such as `batch`", |s| checked_name("scheduler", s));
scalar_field!(de_image, String, "a container image such as `busybox`", image);
scalar_field!(de_label, String, "a node label name such as `zone`", label);
scalar_field!(de_text, String, "a string", |s| Ok(s.to_string()));
scalar_field!(de_kind, JobKind, "`batch` or `service`", kind);
scalar_field!(de_policy, RestartMode, "`never`, `on_failure` or `always`", policy);
scalar_field!(de_cpu, u64, "a CPU quantity such as `500m` or `2`", cpu_request);
scalar_field!(de_memory, u64, "a memory quantity such as `512Mi`", memory_request);
scalar_field!(de_duration, u64, "a duration such as `2s` or `500ms`", parse_duration_ms);

fn checked_name(what: &str, s: &str) -> Result<String, String> {
    validate_name(what, s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

fn image(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("the image must not be empty; name a container image such as `busybox`".to_string())
    } else if s.chars().any(char::is_whitespace) {
        Err(format!("image {s:?} contains whitespace; put the command in `command` and `args`"))
    } else {
        Ok(s.to_string())
    }
}

fn label(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("a label name must not be empty; name a node label such as `zone`".to_string())
    } else {
        Ok(s.to_string())
    }
}

fn kind(s: &str) -> Result<JobKind, String> {
    match s {
        "batch" => Ok(JobKind::Batch),
        "service" => Ok(JobKind::Service),
        _ => {
            Err(format!("unknown kind `{s}`, expected `batch` (runs to completion) or `service` (runs until stopped)"))
        }
    }
}

fn policy(s: &str) -> Result<RestartMode, String> {
    match s {
        "never" => Ok(RestartMode::Never),
        "on_failure" => Ok(RestartMode::OnFailure),
        "always" => Ok(RestartMode::Always),
        _ => Err(format!("unknown restart policy `{s}`, expected `never`, `on_failure` or `always`")),
    }
}

fn cpu_request(s: &str) -> Result<u64, String> {
    match parse_quantity_cpu(s)? {
        0 => Err("CPU must be more than 0; write millicores (`100m`) or cores (`0.5`, `2`)".to_string()),
        millis => Ok(millis),
    }
}

fn memory_request(s: &str) -> Result<u64, String> {
    match parse_quantity_memory(s)? {
        0 => Err("memory must be more than 0; write e.g. `512Mi` or `1Gi`".to_string()),
        bytes => Ok(bytes),
    }
}

/// A whole number in a range. Reads any scalar, so that a quoted `"3"` works and a wrong value gets our words.
struct Int {
    expecting: &'static str,
    min: i64,
    max: i64,
}

impl Int {
    fn check<E: de::Error>(&self, v: i128) -> Result<i64, E> {
        if v < i128::from(self.min) || v > i128::from(self.max) {
            Err(E::custom(format!("{v} is out of range; expected {}", self.expecting)))
        } else {
            Ok(v as i64)
        }
    }
}

impl<'de> Visitor<'de> for Int {
    type Value = i64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        self.check(i128::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        self.check(i128::from(v))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<i64, E> {
        self.check(v)
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<i64, E> {
        self.check(i128::try_from(v).unwrap_or(i128::MAX))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
        Err(E::custom(format!("{v} is not a whole number; expected {}", self.expecting)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
        match v.trim().parse::<i128>() {
            Ok(n) => self.check(n),
            Err(_) => Err(E::custom(format!("`{v}` is not a whole number; expected {}", self.expecting))),
        }
    }
}

fn de_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    const EXPECTING: &str = "a number of tasks from 1 to 100000";
    const _: () = assert!(MAX_TASKS == 100_000, "update EXPECTING");
    let n = d.deserialize_any(Int { expecting: EXPECTING, min: 1, max: i64::from(MAX_TASKS) })?;
    Ok(Some(n as u32))
}

fn de_priority<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    const EXPECTING: &str = "a priority from -2147483648 to 2147483647";
    let n = d.deserialize_any(Int { expecting: EXPECTING, min: i32::MIN.into(), max: i32::MAX.into() })?;
    Ok(Some(n as i32))
}

fn de_max_restarts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    const EXPECTING: &str = "a number of restarts from 0 to 4294967295";
    let n = d.deserialize_any(Int { expecting: EXPECTING, min: 0, max: u32::MAX.into() })?;
    Ok(Some(n as u32))
}

struct Bool;

impl<'de> Visitor<'de> for Bool {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`true` or `false`")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }
}

fn de_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    d.deserialize_bool(Bool).map(Some)
}

/// A list of scalars, each read as written.
struct List {
    expecting: &'static str,
    non_empty: bool,
}

impl<'de> Visitor<'de> for List {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element_seed(Scalar { expecting: "a string", parse: |s| Ok(s.to_string()) })? {
            out.push(item);
        }
        if self.non_empty && out.is_empty() {
            return Err(de::Error::custom("the list is empty; give at least one value, e.g. `[a, b]`"));
        }
        Ok(out)
    }
}

fn de_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    d.deserialize_seq(List { expecting: "a list of strings, e.g. `[\"sh\", \"-c\"]`", non_empty: false }).map(Some)
}

fn de_values<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    d.deserialize_seq(List { expecting: "a list of label values, e.g. `[a, b]`", non_empty: true }).map(Some)
}

struct Constraints;

impl<'de> Visitor<'de> for Constraints {
    type Value = Vec<RawConstraint>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of constraints, e.g. `[{label: zone, equals: a}]`")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<RawConstraint>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element()? {
            out.push(item);
        }
        Ok(out)
    }
}

fn de_constraints<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<RawConstraint>>, D::Error> {
    d.deserialize_seq(Constraints).map(Some)
}

/// The `env` mapping. Read by hand so that a bad or repeated name is reported at the name itself (YAML forbids
/// repeated keys, but a plain map would silently keep the last).
struct Env;

impl<'de> Visitor<'de> for Env {
    type Value = BTreeMap<String, String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of variable names to values, e.g. `{GREETING: hello}`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut env = BTreeMap::new();
        while let Some(name) = map.next_key_seed(EnvName(&env))? {
            let value =
                map.next_value_seed(Scalar { expecting: "a string, number or boolean", parse: |s| Ok(s.to_string()) })?;
            env.insert(name, value);
        }
        Ok(env)
    }
}

struct EnvName<'a>(&'a BTreeMap<String, String>);

impl<'de> DeserializeSeed<'de> for EnvName<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for EnvName<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a variable name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if v.is_empty() {
            Err(E::custom("a variable name must not be empty"))
        } else if v.contains('=') {
            Err(E::custom(format!("variable name `{v}` contains `=`, which no variable name may")))
        } else if self.0.contains_key(v) {
            Err(E::custom(format!("variable `{v}` is set twice; each may appear once")))
        } else {
            Ok(v.to_string())
        }
    }
}

fn de_env<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    d.deserialize_map(Env).map(Some)
}

// ---------------------------------------------------------------------------------------------------------
// From the file as read to a job, with errors located in the file.

struct Ctx<'a> {
    source: &'a str,
    text: &'a str,
    /// Which YAML document of `text` is the job.
    doc: usize,
}

impl Ctx<'_> {
    fn error(&self, at: Option<(usize, usize)>, field: Option<String>, message: impl Into<String>) -> JobSpecError {
        JobSpecError {
            source_name: self.source.to_string(),
            line: at.map(|(line, _)| line),
            column: at.map(|(_, column)| column),
            field,
            message: message.into(),
        }
    }

    /// An error about `field`, placed at the key or element `at`.
    fn error_at(&self, at: &[Seg<'_>], field: String, message: impl Into<String>) -> JobSpecError {
        self.error(self.locate(at, 0), Some(field), message)
    }

    /// A required top-level field that is absent: there is no line to point at.
    fn missing(&self, field: &str, what: &str) -> JobSpecError {
        self.error(None, Some(field.to_string()), format!("missing required field: {what}"))
    }

    /// Finds the one non-empty document, checking the YAML syntax of all of them on the way.
    fn select_document(&self) -> Result<usize, JobSpecError> {
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
    fn serde_error(&self, err: serde_norway::Error) -> JobSpecError {
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
    fn locate(&self, path: &[Seg<'_>], skip: usize) -> Option<(usize, usize)> {
        let document = serde_norway::Deserializer::from_str(self.text).nth(self.doc)?;
        let err = Probe { path, skip }.deserialize(document).err()?;
        if !err.to_string().contains(PROBE) {
            return None;
        }
        err.location().map(|l| (l.line(), l.column()))
    }

    fn build(&self, raw: RawJob) -> Result<Job, JobSpecError> {
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
        job.duration_ms = raw.duration;
        Ok(job)
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

// ---------------------------------------------------------------------------------------------------------
// Locating a key after the fact: walk the document to it and fail there, so serde_norway marks the spot.

/// The message of the walk's deliberate failure, told apart from real errors (a path that is not there).
const PROBE: &str = "\u{1}omega-job-spec-probe";

#[derive(Clone, Copy, Debug)]
enum Seg<'k> {
    Key(&'k str),
    Index(usize),
}

struct Probe<'p, 'k> {
    path: &'p [Seg<'k>],
    skip: usize,
}

impl<'de> DeserializeSeed<'de> for Probe<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            // Any value, failed at its own position (the visitor accepts nothing).
            None => d.deserialize_any(Found),
            Some((Seg::Key(key), rest)) => d.deserialize_map(MapProbe { key, rest, skip: self.skip }),
            Some((Seg::Index(index), rest)) => d.deserialize_seq(SeqProbe { index: *index, rest, skip: self.skip }),
        }
    }
}

struct Found;

impl Visitor<'_> for Found {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PROBE)
    }
}

struct MapProbe<'p, 'k> {
    key: &'k str,
    rest: &'p [Seg<'k>],
    skip: usize,
}

impl<'de> Visitor<'de> for MapProbe<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let last = self.rest.is_empty();
        let mut seen = 0;
        while let Some(hit) = map.next_key_seed(KeyProbe { key: self.key, fail: last && seen == self.skip })? {
            if hit && !last {
                map.next_value_seed(Probe { path: self.rest, skip: self.skip })?;
            } else {
                seen += usize::from(hit);
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A mapping key: whether it is the one sought, failing on it (at the key's position) when `fail`.
struct KeyProbe<'k> {
    key: &'k str,
    fail: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyProbe<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        match (v == self.key, self.fail) {
            (true, true) => Err(E::custom(PROBE)),
            (hit, _) => Ok(hit),
        }
    }
}

struct SeqProbe<'p, 'k> {
    index: usize,
    rest: &'p [Seg<'k>],
    skip: usize,
}

impl<'de> Visitor<'de> for SeqProbe<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let more = if i == self.index {
                seq.next_element_seed(Probe { path: self.rest, skip: self.skip })?.is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Rendering.

#[derive(Serialize)]
struct OutJob<'a> {
    name: &'a str,
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
    duration: Option<String>,
}

#[derive(Serialize)]
struct OutResources {
    cpu: Quantity,
    memory: Quantity,
}

/// A number when the canonical form is a bare number, so the YAML does not quote it.
#[derive(Serialize)]
#[serde(untagged)]
enum Quantity {
    Number(u64),
    Text(String),
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

/// `1500` -> `1500m`, `2000` -> `2` (whole cores).
fn render_cpu(millis: u64) -> Quantity {
    if millis % 1000 == 0 {
        Quantity::Number(millis / 1000)
    } else {
        Quantity::Text(format!("{millis}m"))
    }
}

/// The largest binary suffix that is exact (`512Mi`, `1536Mi`), else bytes.
fn render_memory(bytes: u64) -> Quantity {
    for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes != 0 && bytes % (1u64 << shift) == 0 {
            return Quantity::Text(format!("{}{suffix}", bytes >> shift));
        }
    }
    Quantity::Number(bytes)
}

/// The largest unit that is exact (`1h`, `90s`, `1500ms`).
fn render_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobState, RestartPolicy};

    const FULL: &str = "\
# web.yaml: three replicas of a web server.
name: web
kind: service
scheduler: service
priority: 100
replicas: 3
resources:
  cpu: 500m
  memory: 512Mi
image: busybox
command: [\"sh\", \"-c\"]
args: [\"echo hi && sleep 3600\"]
env:
  GREETING: hello
  PORT: 8080
  VERSION: 1.10
  DEBUG: true
constraints:
  - {label: zone, in: [a, b]}
  - label: disk
    not_in: [hdd]
  - {label: arch, equals: amd64}
spread: zone
anti_affinity: true
restart:
  policy: on_failure
  max_restarts: 3
  backoff: 2s
duration: 30s
";

    const MINIMAL: &str = "\
name: train
kind: batch
tasks: 8
resources: {cpu: 4, memory: 16Gi}
image: trainer
";

    fn err(text: &str) -> JobSpecError {
        match parse_job("job.yaml", text) {
            Ok(job) => panic!("expected an error, got {job:?}"),
            Err(e) => e,
        }
    }

    /// Asserts line and field, and that the message mentions each of `mentions`.
    fn assert_err(text: &str, line: Option<usize>, field: Option<&str>, mentions: &[&str]) -> JobSpecError {
        let e = err(text);
        assert_eq!((e.line, e.field.as_deref()), (line, field), "{e}");
        for m in mentions {
            assert!(e.message.contains(m), "{:?} does not mention {m:?}", e.message);
        }
        assert!(!e.message.contains(PROBE), "{e}");
        e
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn full_example_parses_to_the_expected_job() {
        let job = parse_job("web.yaml", FULL).unwrap();
        let mut expected = Job::new("web", JobKind::Service, 3, Resources::new(500, 512 << 20));
        expected.submitted_at_ms = job.submitted_at_ms;
        expected.priority = 100;
        expected.image = "busybox".into();
        expected.command = strs(&["sh", "-c"]);
        expected.args = strs(&["echo hi && sleep 3600"]);
        expected.env = [("GREETING", "hello"), ("PORT", "8080"), ("VERSION", "1.10"), ("DEBUG", "true")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        expected.constraints = vec![
            Constraint::In { label: "zone".into(), values: strs(&["a", "b"]) },
            Constraint::NotIn { label: "disk".into(), values: strs(&["hdd"]) },
            Constraint::Equals { label: "arch".into(), value: "amd64".into() },
        ];
        expected.spread = Some("zone".into());
        expected.anti_affinity = true;
        expected.restart = RestartPolicy { mode: RestartMode::OnFailure, max_restarts: 3, backoff_ms: 2000 };
        expected.duration_ms = Some(30_000);
        assert_eq!(job, expected);
        assert_eq!(job.state, JobState::Pending);
        assert!(job.submitted_at_ms > 0);
    }

    /// The examples in the module documentation are real job files.
    #[test]
    fn documented_examples_parse() {
        let doc: Vec<&str> = include_str!("job_spec.rs")
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .map(|l| l.strip_prefix("//!").unwrap().strip_prefix(' ').unwrap_or(""))
            .collect();
        let mut examples = Vec::new();
        let mut current: Option<String> = None;
        for line in doc {
            match (line, current.as_mut()) {
                ("```yaml", None) => current = Some(String::new()),
                ("```", Some(_)) => examples.push(current.take().unwrap()),
                (line, Some(text)) => text.push_str(&format!("{line}\n")),
                _ => {}
            }
        }
        assert_eq!(examples.len(), 2);
        let web = parse_job("web.yaml", &examples[0]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((web.tasks, web.constraints.len(), web.env["PORT"].as_str()), (3, 2, "8080"));
        let train = parse_job("train.yaml", &examples[1]).unwrap_or_else(|e| panic!("{e}"));
        assert!(train.gang && train.resources == Resources::new(4000, 16 << 30));
    }

    #[test]
    fn defaults_follow_the_kind() {
        let job = parse_job("train.yaml", &format!("{MINIMAL}gang: true\n")).unwrap();
        assert_eq!((job.kind, job.scheduler.as_str(), job.tasks, job.gang), (JobKind::Batch, "batch", 8, true));
        assert_eq!(job.resources, Resources::new(4000, 16 << 30));
        assert_eq!(job.restart, RestartPolicy { mode: RestartMode::Never, max_restarts: 0, backoff_ms: 1000 });
        assert_eq!((job.priority, job.anti_affinity, job.duration_ms, job.spread.clone()), (0, false, None, None));
        assert!(job.command.is_empty() && job.args.is_empty() && job.env.is_empty() && job.constraints.is_empty());

        let service = "name: api\nkind: service\ntasks: 2\nresources: {cpu: '0.25', memory: 100M}\nimage: nginx\n\
                       scheduler: fast-lane\npriority: -5\nrestart: {backoff: 1500}\n";
        let job = parse_job("api.yaml", service).unwrap();
        assert_eq!((job.kind, job.tasks, job.scheduler.as_str(), job.priority), (JobKind::Service, 2, "fast-lane", -5));
        assert_eq!(job.resources, Resources::new(250, 100_000_000));
        assert_eq!(job.restart, RestartPolicy { mode: RestartMode::Always, max_restarts: 0, backoff_ms: 1500 });
        // `gang: false` asks for nothing, so a service may say it.
        assert!(parse_job("api.yaml", &format!("{service}gang: false\n")).is_ok());
        // A trailing or leading document marker and comments are fine.
        assert!(parse_job("t.yaml", &format!("# c\n---\n{MINIMAL}---\n")).is_ok());
    }

    #[test]
    fn round_trip() {
        let mut odd = parse_job("train.yaml", MINIMAL).unwrap();
        odd.env = [("A", "yes"), ("B", "007"), ("C", ""), ("D", "x: y"), ("E", "~")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        odd.command = strs(&["-c", "#not a comment", "[x]", "null"]);
        odd.resources = Resources::new(1, 1536 << 20);
        odd.gang = true;
        odd.restart.backoff_ms = 90_500;
        odd.duration_ms = Some(0);
        odd.constraints = vec![Constraint::Equals { label: "zone".into(), value: "1.10".into() }];
        for job in [parse_job("web.yaml", FULL).unwrap(), parse_job("train.yaml", MINIMAL).unwrap(), odd] {
            let yaml = to_yaml(&job);
            let mut back = parse_job("rendered.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            back.submitted_at_ms = job.submitted_at_ms;
            assert_eq!(back, job, "{yaml}");
        }
    }

    #[test]
    fn to_yaml_renders_canonical_forms() {
        let yaml = to_yaml(&parse_job("web.yaml", FULL).unwrap());
        for line in ["name: web\n", "replicas: 3\n", "  cpu: 500m\n", "  memory: 512Mi\n", "  backoff: 2s\n"] {
            assert!(yaml.contains(line), "{line:?} not in\n{yaml}");
        }
        assert!(yaml.contains("PORT: '8080'") || yaml.contains("PORT: \"8080\""), "{yaml}");
        assert!(!yaml.contains("tasks:") && !yaml.contains("gang") && !yaml.contains("submitted"), "{yaml}");
        let yaml = to_yaml(&parse_job("train.yaml", MINIMAL).unwrap());
        assert!(yaml.contains("tasks: 8\n") && yaml.contains("  cpu: 4\n") && yaml.contains("memory: 16Gi"), "{yaml}");
        assert!(yaml.contains("policy: never") && !yaml.contains("priority"), "{yaml}");

        assert!(matches!(render_cpu(1500), Quantity::Text(s) if s == "1500m"));
        assert!(matches!(render_cpu(2000), Quantity::Number(2)));
        assert!(matches!(render_memory(1536 << 20), Quantity::Text(s) if s == "1536Mi"));
        assert!(matches!(render_memory(3 << 40), Quantity::Text(s) if s == "3Ti"));
        assert!(matches!(render_memory(1000), Quantity::Number(1000)));
        assert_eq!(
            [0, 1500, 2000, 90_000, 3_600_000].map(render_duration),
            ["0s", "1500ms", "2s", "90s", "1h"].map(String::from)
        );
    }

    #[test]
    fn unknown_fields_are_errors_with_the_expected_list() {
        let text = MINIMAL.replace("tasks: 8", "tasks: 8\nreplica: 3");
        let e = assert_err(&text, Some(4), Some("replica"), &["did you mean `replicas`?", "`name`, `kind`"]);
        assert_eq!(e.column, Some(1));
        assert!(e.to_string().starts_with("job.yaml:4:1: replica: unknown field (did you mean"), "{e}");

        let text = "name: a\nkind: batch\ntasks: 1\nimage: x\nresources:\n  cpu: 1\n  gpu: 1\n  memory: 1Gi\n";
        let e = assert_err(text, Some(7), Some("resources.gpu"), &["expected `cpu` or `memory`"]);
        assert_eq!(e.column, Some(3));

        let text = format!("{MINIMAL}constraints:\n  - {{label: zone, equals: a}}\n  - {{label: zone, value: a}}\n");
        let e = assert_err(&text, Some(8), Some("constraints[1].value"), &["`label`, `equals`, `in`, `not_in`"]);
        assert_eq!(e.column, Some(19));

        let text = format!("{MINIMAL}restart:\n  policy: always\n  max_retries: 2\n");
        assert_err(&text, Some(8), Some("restart.max_retries"), &["`max_restarts`"]);
        assert_err(&format!("{MINIMAL}<<: {{priority: 1}}\n"), Some(6), Some("<<"), &["merge keys"]);
    }

    #[test]
    fn bad_values_point_at_the_value() {
        let cpu = MINIMAL.replace("cpu: 4", "cpu: 5x");
        let e = assert_err(&cpu, Some(4), Some("resources.cpu"), &["`5x`", "`500m`", "`0.5`"]);
        assert_eq!(e.column, Some(18));
        let text = "name: a\nkind: batch\ntasks: 1\nimage: x\nresources:\n  cpu: 0\n  memory: 1Gi\n";
        assert_err(text, Some(6), Some("resources.cpu"), &["more than 0"]);
        let text = "name: a\nkind: batch\ntasks: 1\nimage: x\nresources:\n  cpu: 1\n  memory: 512MB\n";
        assert_err(text, Some(7), Some("resources.memory"), &["`512M`", "`512Mi`"]);
        let text = "name: a\nkind: batch\ntasks: 1\nimage: x\nresources:\n  cpu: 1\n  memory: [1]\n";
        assert_err(text, Some(7), Some("resources.memory"), &["invalid type: sequence", "`512Mi`"]);

        assert_err(&MINIMAL.replace("tasks: 8", "tasks: 0"), Some(3), Some("tasks"), &["1 to 100000"]);
        assert_err(&MINIMAL.replace("tasks: 8", "tasks: 100001"), Some(3), Some("tasks"), &["out of range"]);
        assert_err(&MINIMAL.replace("tasks: 8", "tasks: many"), Some(3), Some("tasks"), &["`many`"]);
        assert_err(&MINIMAL.replace("tasks: 8", "tasks:"), Some(3), Some("tasks"), &["no value given; expected"]);
        assert_err(&MINIMAL.replace("tasks: 8", "tasks: -1"), Some(3), Some("tasks"), &["-1 is out of range"]);
        assert_err(&MINIMAL.replace("tasks: 8", "tasks: 2.5"), Some(3), Some("tasks"), &["whole number"]);
        assert_eq!(parse_job("t", &MINIMAL.replace("tasks: 8", "tasks: \"8\"")).unwrap().tasks, 8);
        assert_err(&MINIMAL.replace("name: train", "name: a/b"), Some(1), Some("name"), &["job name \"a/b\""]);
        assert_err(&MINIMAL.replace("kind: batch", "kind: cron"), Some(2), Some("kind"), &["`batch`", "`service`"]);
        assert_err(&MINIMAL.replace("image: trainer", "image:"), Some(5), Some("image"), &["must not be empty"]);
        assert_err(&format!("{MINIMAL}gang: yes\n"), Some(6), Some("gang"), &["`true` or `false`"]);
        assert_err(&format!("{MINIMAL}spread: ''\n"), Some(6), Some("spread"), &["must not be empty"]);
        assert_err(&format!("{MINIMAL}command: echo hi\n"), Some(6), Some("command"), &["a list of strings"]);
        assert_err(
            &format!("{MINIMAL}restart: {{policy: sometimes}}\n"),
            Some(6),
            Some("restart.policy"),
            &["`on_failure`"],
        );
        assert_err(&format!("{MINIMAL}duration: 5 minutes\n"), Some(6), Some("duration"), &["`1m30s`"]);
        assert_err(
            &format!("{MINIMAL}constraints:\n- {{label: zone, in: []}}\n"),
            Some(7),
            Some("constraints[0].in"),
            &["at least one value"],
        );
        assert_err(
            &format!("{MINIMAL}constraints: {{label: zone}}\n"),
            Some(6),
            Some("constraints"),
            &["a list of constraints"],
        );
    }

    #[test]
    fn env_values_are_taken_as_written_and_names_checked() {
        let job = parse_job("t", &format!("{MINIMAL}env: {{A: 1, B: false, C: 0x10, D: '', E: 1e3}}\n")).unwrap();
        let values: Vec<&str> = job.env.values().map(String::as_str).collect();
        assert_eq!(values, ["1", "false", "0x10", "", "1e3"]);
        assert_err(&format!("{MINIMAL}env:\n  A=B: 1\n"), Some(7), Some("env"), &["`A=B`", "`=`"]);
        assert_err(&format!("{MINIMAL}env:\n  A: 1\n  A: 2\n"), Some(8), Some("env"), &["`A` is set twice"]);
        assert_err(&format!("{MINIMAL}env:\n  A: [1]\n"), Some(7), Some("env.A"), &["invalid type: sequence"]);
    }

    #[test]
    fn missing_fields_are_named() {
        let e = assert_err(&MINIMAL.replace("image: trainer\n", ""), None, Some("image"), &["`image: busybox`"]);
        assert_eq!(e.to_string(), format!("job.yaml: image: {}", e.message));
        assert_err(&MINIMAL.replace("name: train\n", ""), None, Some("name"), &["missing"]);
        assert_err(&MINIMAL.replace("kind: batch\n", ""), None, Some("kind"), &["`batch`"]);
        assert_err(&MINIMAL.replace("tasks: 8\n", ""), None, Some("tasks"), &["`tasks: 3`"]);
        assert_err(&MINIMAL.replace("resources: {cpu: 4, memory: 16Gi}\n", ""), None, Some("resources"), &["cpu"]);
        let text = "name: a\nkind: batch\ntasks: 1\nresources:\n  memory: 1Gi\nimage: x\n";
        assert_err(text, Some(4), Some("resources.cpu"), &["millicores"]);
        let text = "name: a\nkind: batch\ntasks: 1\nresources: {cpu: 1}\nimage: x\n";
        assert_err(text, Some(4), Some("resources.memory"), &["512Mi"]);
    }

    #[test]
    fn cross_field_rules_point_at_the_offending_key() {
        let text = "name: web\nkind: service\nreplicas: 2\nresources: {cpu: 1, memory: 1Gi}\n\
                    image: x\ngang: true\n";
        let e = assert_err(text, Some(6), Some("gang"), &["only for batch"]);
        assert_eq!(e.column, Some(1));
        // The gang comes before the kind: still found.
        let text = "gang: true\nname: web\nkind: service\nreplicas: 2\nresources: {cpu: 1, memory: 1Gi}\nimage: x\n";
        assert_err(text, Some(1), Some("gang"), &["only for batch"]);

        let text = "name: web\nkind: service\nreplicas: 2\nresources: {cpu: 1, memory: 1Gi}\nimage: x\ntasks: 2\n";
        assert_err(text, Some(6), Some("tasks"), &["give only one"]);
        assert_err(&format!("{MINIMAL}replicas: 8\n"), Some(6), Some("replicas"), &["give only one"]);
        assert_err(&MINIMAL.replace("tasks: 8", "replicas: 8"), Some(3), Some("replicas"), &["batch job counts"]);
    }

    #[test]
    fn constraint_rules() {
        let two_ops = format!("{MINIMAL}constraints:\n  - label: zone\n    equals: a\n    in: [a, b]\n");
        let e = assert_err(&two_ops, Some(9), Some("constraints[0].in"), &["exactly one", "`equals` and `in`"]);
        assert_eq!(e.column, Some(5));
        let flow = format!(
            "{MINIMAL}constraints:\n  - {{label: zone, equals: a}}\n  - {{not_in: [c], label: z, equals: b}}\n"
        );
        let e = assert_err(&flow, Some(8), Some("constraints[1].equals"), &["`equals` and `not_in`"]);
        assert_eq!(e.column, Some(29));
        assert_err(
            &format!("{MINIMAL}constraints:\n  - {{label: zone}}\n"),
            Some(7),
            Some("constraints[0]"),
            &["needs one of"],
        );
        assert_err(
            &format!("{MINIMAL}constraints:\n  - {{equals: a}}\n"),
            Some(7),
            Some("constraints[0].label"),
            &["missing `label`"],
        );
        assert_err(
            &format!("{MINIMAL}constraints:\n  - {{label: '', equals: a}}\n"),
            Some(7),
            Some("constraints[0].label"),
            &["must not be empty"],
        );
    }

    #[test]
    fn duplicate_fields_point_at_the_repetition() {
        assert_err(&format!("{MINIMAL}name: again\n"), Some(6), Some("name"), &["given twice"]);
        let text = "name: a\nkind: batch\ntasks: 1\nimage: x\nresources:\n  cpu: 1\n  memory: 1Gi\n  cpu: 2\n";
        assert_err(text, Some(8), Some("resources.cpu"), &["given twice"]);
    }

    #[test]
    fn file_level_errors() {
        let e = assert_err("name: a\nkind: batch\n  tasks: 1\n", Some(3), None, &["invalid YAML"]);
        assert!(e.column.is_some());
        assert!(e.to_string().starts_with("job.yaml:3:"), "{e}");
        let e = assert_err("name: a\nkind:\tbatch\n\ttasks: 1\n", Some(3), None, &["invalid YAML", "tab"]);
        assert!(!e.message.contains("line 3"), "{e}");
        assert_err("name: [a\n", Some(2), None, &["invalid YAML"]);
        assert_err("", None, None, &["no job"]);
        assert_err("# just a comment\n---\n", None, None, &["no job"]);
        assert_err(&format!("{MINIMAL}---\n{MINIMAL}"), Some(7), None, &["second YAML document"]);
        assert_err("- name: a\n", Some(1), None, &["invalid type: sequence", "a job: a mapping"]);
    }

    #[test]
    fn display_omits_what_is_unknown() {
        let mut e = JobSpecError {
            source_name: "jobs.yaml".into(),
            line: Some(7),
            column: Some(3),
            field: Some("resources.cpu".into()),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "jobs.yaml:7:3: resources.cpu: bad");
        e.column = None;
        assert_eq!(e.to_string(), "jobs.yaml:7: resources.cpu: bad");
        e.field = None;
        assert_eq!(e.to_string(), "jobs.yaml:7: bad");
        e.line = None;
        assert_eq!(e.to_string(), "jobs.yaml: bad");
        e.source_name.clear();
        assert_eq!(e.to_string(), "bad");
    }

    #[test]
    fn cpu_quantities() {
        for (s, millis) in [("500m", 500), ("1500m", 1500), ("0.5", 500), ("1.5", 1500), ("2", 2000), (".25", 250)] {
            assert_eq!(parse_quantity_cpu(s), Ok(millis), "{s}");
        }
        assert_eq!(parse_quantity_cpu("0.5000"), Ok(500));
        assert_eq!(parse_quantity_cpu(" 3 "), Ok(3000));
        assert_eq!(parse_quantity_cpu("0"), Ok(0));
        assert_eq!(parse_quantity_cpu("18446744073709551615m"), Ok(u64::MAX));
        for (s, why) in [
            ("", "empty"),
            ("-1", "negative"),
            ("1e3", "exponent"),
            ("0.0005", "finer than a millicore"),
            ("1.5m", "finer than a millicore"),
            ("18446744073709551616", "too large"),
            ("18446744073709551616m", "too large"),
            ("500M", "unknown suffix"),
            ("abc", "not a CPU quantity"),
            ("1.2.3", "not a CPU quantity"),
            ("+1", "not a CPU quantity"),
            (".", "not a CPU quantity"),
            ("1 m", "unknown suffix"),
        ] {
            let e = parse_quantity_cpu(s).expect_err(s);
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    #[test]
    fn memory_quantities() {
        for (s, bytes) in [
            ("1073741824", 1u64 << 30),
            ("512Mi", 512 << 20),
            ("1.5Gi", 3 << 29),
            ("1Ki", 1024),
            ("2Ti", 2 << 40),
            ("100M", 100_000_000),
            ("1k", 1000),
            ("1K", 1000),
            ("1.5G", 1_500_000_000),
            ("3T", 3_000_000_000_000),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_quantity_memory(s), Ok(bytes), "{s}");
        }
        for (s, why) in [
            ("", "empty"),
            ("-1Gi", "negative"),
            ("1e9", "exponent"),
            ("1.5", "whole number of bytes"),
            ("0.1Ki", "whole number of bytes"),
            ("18446744073709551616", "too large"),
            ("16777216Ti", "too large"),
            ("512MB", "`512Mi`"),
            ("1GiB", "`1Gi`"),
            ("1gi", "`1Gi`"),
            ("500m", "`500Mi`"),
            ("5x", "unknown suffix `x`"),
            ("Gi", "not a memory quantity"),
        ] {
            let e = parse_quantity_memory(s).expect_err(s);
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("500ms", 500),
            ("2s", 2000),
            ("1m", 60_000),
            ("1h", 3_600_000),
            ("1500", 1500),
            ("0", 0),
            ("1.5s", 1500),
            ("1m30s", 90_000),
            ("1h0m1ms", 3_600_001),
        ] {
            assert_eq!(parse_duration_ms(s), Ok(ms), "{s}");
        }
        for (s, why) in [
            ("", "empty"),
            ("-1s", "negative"),
            ("1.5", "no unit"),
            ("1m30", "no unit after `30`"),
            ("2d", "unknown unit `d`"),
            ("1e3", "unknown unit `e`"),
            ("0.5ms", "finer than a millisecond"),
            ("s", "not a duration"),
            ("18446744073709551616", "too large"),
            ("5124095576030432h", "too large"),
            ("18446744073709551615ms1ms", "too large"),
        ] {
            let e = parse_duration_ms(s).expect_err(s);
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }
}
