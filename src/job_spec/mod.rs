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
//! namespace: team-a         # optional, default `default`: whose quota its tasks count against
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
//! on_disconnect: stop       # stop (default) | keep_running: what a task does while its node is cut off
//!                           # from etcd (see below)
//! duration: 30s             # optional; how long a task runs on a simulated node
//! update:                   # optional, services only: how a new version replaces the running one
//!   max_parallel: 2         # default 1: new replicas started at once beside the old ones
//!   min_healthy_time: 10s   # default 10s: how long a new replica must be healthy to count
//!   healthy_deadline: 5m    # default 5m: a new replica not healthy by then fails the update
//!   progress_deadline: 10m  # default 10m: no replica turned healthy for this long fails the update
//!   canary: 1               # default 0: new replicas run beside all old ones until `omctl promote`
//!   auto_promote: false     # promote the canaries once they are healthy
//!   auto_revert: true       # a failed update goes back to the last stable version
//! checks:                   # optional; what the node's agent probes (healthy: every check passes)
//!   - type: http            # http: GET 127.0.0.1:<port><path>, any 2xx/3xx passes | tcp | exec
//!     port: 8080            # the task's port on its node (tasks share the node's network)
//!     path: /health         # default /; `expect_status: 204` to want one status
//!     interval: 5s          # default 10s; also timeout (2s), healthy_threshold (1),
//!     unhealthy_threshold: 2  # unhealthy_threshold (3), grace (0s) and restart (true)
//!   - {name: ready, type: exec, command: [cat, /tmp/ready], restart: false}
//! ports:                    # optional; named host ports the tasks listen on (nothing is allocated: tasks
//!   http: 8080              # share the node's network), 1-65535
//! services:                 # optional; published for discovery while a task is running and healthy
//!   - name: web             # what clients resolve (a name like a job name)
//!     port: http            # one of `ports`
//!     tags: [v2]            # optional words a client may select on
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
//! - **`on_disconnect: stop` by default.** A node agent that cannot renew its lease stops its tasks before
//!   the lease can expire, because once it has expired (and the controller's grace has passed) the tasks are
//!   placed elsewhere, and a task running twice (two writers, two leaders) is the worse failure for most jobs.
//!   `keep_running` (Nomad's `stop_after_client_disconnect` left unset) suits a job for which an hour of
//!   network trouble must not mean an outage and two copies for a while do no harm: its tasks run on through
//!   the disconnect, and if it outlasts the lease a replacement runs beside them until the agent is back and
//!   stops the old one.
//! - **Health checks**: `check:` (one mapping) or `checks:` (a list), not both. A check is named after its
//!   type unless it says `name` (two checks need two names: messages and events tell them apart by it).
//!   After `unhealthy_threshold` consecutive failures (those within `grace` of the run's start do not count)
//!   the task is unhealthy, and with `restart: true` (the default) its agent restarts it under the job's
//!   restart policy; once the restarts are spent it ends `failed`, and a service replica is placed again,
//!   preferably on another node. `restart: false` only reports. Fields of another type's check (`path` on a
//!   `tcp` check, `port` on an `exec` one) are errors, not ignored.
//! - **Anchors and aliases work; merge keys (`<<`) do not** (they are reported as an unknown field).
//! - **Limits are checked before anything is written.** A file of at most 4 MiB, nested at most 32 levels deep,
//!   checked by a linear scan before parsing, since the YAML parser's time grows with the square of the nesting
//!   depth. A job whose stored record fits one etcd request (1.5 MiB by default), or the error points at the
//!   largest field, rather than submission failing later with a transport error. No control characters in
//!   names, images and labels; in values and arguments none but tab, newline and carriage return; NUL nowhere
//!   (a process receives its arguments and environment as C strings, cut at the first NUL).
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

mod build;
mod prescan;
mod probe;
mod raw;
mod render;
mod size;
#[cfg(test)]
mod tests;

use crate::model::Job;
use crate::store::DEFAULT_MAX_REQUEST_BYTES;
use build::Ctx;
use raw::RawJob;
use serde::Deserialize;
use std::fmt;

pub use prescan::{MAX_DEPTH, MAX_FILE_BYTES};
pub use render::to_yaml;

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
    prescan::check(text).map_err(|refused| ctx.error(refused.at, None, refused.message))?;
    ctx.doc = ctx.select_document()?;
    let Some(document) = serde_norway::Deserializer::from_str(text).nth(ctx.doc) else {
        return Err(ctx.error(None, None, "the job's YAML document could not be read twice"));
    };
    let raw = RawJob::deserialize(document).map_err(|err| ctx.serde_error(err))?;
    let job = ctx.build(raw)?;
    ctx.check_size(&job, DEFAULT_MAX_REQUEST_BYTES)?;
    Ok(job)
}
