//! The command line: global options and one subcommand per thing people do with a cell.

use crate::output::Format;
use clap::{Args, Parser, Subcommand, ValueEnum};
use omega::model::TaskState;
use omega::units::parse_duration;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "omctl",
    version,
    about = "Submit, inspect and cancel jobs on an Omega cell; watch and audit its state in etcd",
    long_about = "omctl talks to the cell's etcd directly: every Omega component shares its state there, so omctl \
needs no server of its own. Read commands take one consistent cut of the cell (a single etcd revision).\n\n\
Exit codes: 0 ok; 1 user error (not found, bad job file, already exists, bad arguments); 2 the audit found \
violations; 3 etcd cannot be reached (or a request to it failed); 4 `submit --wait` timed out with tasks still \
pending; 5 `logs -f`: the task did not succeed; 6 etcd is out of space (it refuses every write until an operator \
compacts, defragments and disarms its alarm; the message gives the commands).",
    after_help = "Examples:\n  omctl submit web.yaml --wait\n  omctl jobs\n  omctl job web\n  \
omctl tasks --job web --state pending\n  omctl events --job web -f\n  omctl nodes -o json\n  \
omctl watch --prefix-kind tasks\n  omctl cancel web"
)]
pub struct Cli {
    /// etcd endpoints, comma-separated.
    #[arg(long, global = true, env = "OMEGA_ETCD", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd: Vec<String>,
    /// Key prefix of the cell in etcd.
    #[arg(long, global = true, env = "OMEGA_PREFIX", default_value = omega::keys::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Output format: aligned tables for people, or json / yaml with a stable schema for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// How long to keep trying to reach etcd before giving up (exit code 3).
    #[arg(long, global = true, default_value = "3s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// The etcd server's --max-txn-ops: larger values let `submit` write bigger jobs in one transaction.
    #[arg(long, global = true, env = "OMEGA_MAX_TXN_OPS", default_value_t = omega::store::DEFAULT_MAX_TXN_OPS,
          value_parser = parse_max_txn_ops)]
    pub max_txn_ops: usize,
    /// The namespace: where `submit` puts a job whose file names none, which jobs `jobs` lists (default:
    /// `default`; `jobs -A` lists all).
    #[arg(short = 'n', long, global = true, env = "OMEGA_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub tls: omega::tls::TlsArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Submit a job file (YAML), or check it with --dry-run.
    #[command(long_about = "Submit a job file (YAML; `-` reads standard input). The file is validated first: a \
mistake is reported as file:line:column: field: message, and nothing is written. --dry-run validates, prints \
the job as it would be stored, and says where its tasks could go right now (like `nomad job plan`). --wait \
waits until every task has left `pending`, printing progress.\n\n\
A job appears whole or not at all: its tasks are written first and its record last, so no scheduler ever sees \
part of it. If a submission fails midway, omctl deletes what it wrote and says so; submitting the same file again \
replaces anything a failed attempt left and completes.")]
    Submit(SubmitArgs),
    /// List jobs: kind, scheduler, priority, state, placed tasks, why the rest are pending.
    Jobs(JobsArgs),
    /// Namespaces' quotas: each namespace's use against its limits; `quota set NS --cpu 8 --memory 16Gi
    /// --tasks 20`, `quota rm NS`.
    #[command(long_about = "Show each namespace's quota: what its tasks hold now (assigned or running) against \
its limits, and how many of its tasks wait. `quota set NS --cpu 8 --memory 16Gi --tasks 20` sets or changes one \
(claims check it in the same transaction that takes the room, so racing schedulers cannot pass it); work over \
the quota stays pending with a reason naming the limit. `quota rm NS` removes it.")]
    Quota(QuotaArgs),
    /// Describe one job: its spec, state, tasks, scheduling status, preemptions and recent events.
    Job(JobArgs),
    /// List tasks, optionally of one job, in one state, or on one node.
    Tasks(TasksArgs),
    /// List nodes: liveness, schedulability, CPU and memory claimed, tasks, labels.
    Nodes,
    /// Cancel a job: mark it cancelled and kill its tasks, freeing the nodes they hold.
    #[command(long_about = "Cancel a job: set its state to `cancelled` (compare-and-swap on the job record), then \
kill every task that has not finished: pending tasks become `killed` with reason \"cancelled\"; tasks holding \
resources are released from their nodes (ledger, task and assignment change in one transaction) and become \
`killed`. Cancelling a cancelled job succeeds and sweeps any task a previous cancel left behind.")]
    Cancel(CancelArgs),
    /// Check the cell's invariants at one revision (exit code 2 if any is broken).
    #[command(long_about = "Check the cell's invariants on one consistent read: no ledger over capacity; each \
ledger equal to the tasks placed on its node; each placed task in its node's ledger and with its assignment; \
each assignment naming a task placed on that node; every job record with all its tasks and none beyond; no gang \
job holding resources with some tasks while others are pending. Exit code 0 if clean, 2 if violations were \
found.")]
    Audit,
    /// Stream changes to the cell as they happen, one line each (NDJSON with -o json).
    #[command(long_about = "Stream changes under the cell's prefix as they happen, one line per change: time, \
kind, name, and what changed (e.g. `task web/2 pending -> assigned on node-3`). With -o json (or yaml) each \
change is one JSON object per line (NDJSON). The watch resumes by itself after connection losses and re-lists \
after compaction. Stops after --count changes or --for a duration, or on Ctrl-C.")]
    Watch(WatchArgs),
    /// List live scheduler instances, what each is, the jobs they own, their attempts, transactions and conflicts.
    Schedulers,
    /// List services with healthy endpoints (what discovery hands out): how many, which jobs and versions.
    Services,
    /// One service's healthy endpoints (address:port, node, task, version, tags); --watch follows them.
    #[command(long_about = "One service's healthy endpoints, as clients resolve them: the keys \
<prefix>services/NAME/<node>/<task> that agents publish while a task is running and passing its checks, bound \
to the node's lease. --watch prints them, then each change as it happens (`+` published, `-` withdrawn; one \
JSON object per line with -o json), until Ctrl-C.")]
    Service(ServiceArgs),
    /// Drain a node: no new placements there, and its service tasks move to other nodes, migrating first.
    #[command(long_about = "Drain a node: mark its ledger unschedulable (so no scheduler can commit a claim there) \
and move its service replicas away, migrating first: the controller starts a replacement elsewhere for each (at \
most the job's update.max_parallel at a time) and stops the old one only once its replacement is healthy. Batch \
tasks are left to finish. At --deadline whatever is still on the node is stopped: services go back to their \
scheduler, batch tasks end as on a lost node. --wait shows progress until the drain completes. --force stops \
the services at once instead (no migration first). --undo makes the node schedulable again and cancels a drain \
in progress (replacements not yet healthy are stopped).")]
    Drain(DrainArgs),
    /// Print a task's log (stdout and stderr); with -f, follow it until the task ends.
    #[command(long_about = "Print a task's log, as its container wrote it to stdout and stderr, streamed from the \
agent of the node it runs (or ran) on. With -f, keep printing what it writes until the task ends, then report \
its final state and exit code on standard error, and exit 0 if it succeeded or 5 if it did not.")]
    Logs(LogsArgs),
    /// Let a canary rollout go on: replace the remaining replicas with the new version.
    Promote(PromoteArgs),
    /// Submit a copy of an earlier version as a new version (default: the version before the current).
    #[command(long_about = "Submit a copy of an earlier version of a service as its next version (`omctl job \
history ID` lists the kept ones; default: the version before the current). Replicas still running that version \
are kept, the others are replaced as in any rollout, without a canary phase.")]
    Revert(RevertArgs),
    /// List what happened to tasks (started, restarted, exited, preempted, lost, ...); -f follows new events.
    #[command(long_about = "List the events tasks keep (each task keeps its last 16, with repeats coalesced into \
one event with a count, for as long as the task exists), sorted by time, with where each placed task is placed \
now. --job lists one job's. With -f, print them, then each new event as it is recorded (a coalesced repeat \
again with its new count) until Ctrl-C; with -o json each event is one JSON object per line (NDJSON).")]
    Events(EventsArgs),
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// The job id.
    pub id: String,
}

#[derive(Args, Debug)]
pub struct RevertArgs {
    /// The job id.
    pub id: String,
    /// The version to go back to.
    pub version: Option<u32>,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only events of this job's tasks.
    #[arg(long)]
    pub job: Option<String>,
    /// Keep printing new events as they are recorded.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

#[derive(Args, Debug)]
pub struct ServiceArgs {
    /// The service's name.
    pub name: String,
    /// Keep printing changes as endpoints are published and withdrawn.
    #[arg(short = 'w', long)]
    pub watch: bool,
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The node's name.
    pub node: String,
    /// Stop whatever is still on the node this long after the drain starts.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Hand the services back to their schedulers at once, without migrating them first.
    #[arg(long)]
    pub force: bool,
    /// Show progress until the drain completes.
    #[arg(long)]
    pub wait: bool,
    /// Make the node schedulable again.
    #[arg(long)]
    pub undo: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// The task, `<job>/<index>` (e.g. `web/0`).
    pub task: String,
    /// Follow the log until the task ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The job file (`-` for standard input).
    pub file: String,
    /// Validate only: print the job and where its tasks could go now; write nothing.
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
    /// After submitting, wait until no task is pending (exit code 4 on timeout).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "60s", value_parser = parse_duration, requires = "wait")]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Only jobs in this state.
    #[arg(long, value_enum)]
    pub state: Option<JobStateArg>,
    /// Jobs of every namespace, not only `-n`'s (or `default`).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(Args, Debug)]
pub struct QuotaArgs {
    #[command(subcommand)]
    pub action: Option<QuotaAction>,
}

#[derive(Subcommand, Debug)]
pub enum QuotaAction {
    /// Set (or change) a namespace's quota; a limit not given stays as it was (`none` removes it).
    Set(QuotaSetArgs),
    /// Remove a namespace's quota: its tasks are no longer limited.
    Rm { namespace: String },
}

#[derive(Args, Debug)]
pub struct QuotaSetArgs {
    pub namespace: String,
    /// CPU its tasks may hold at once: cores `8`, millicores `7500m`, or `none`.
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory its tasks may hold at once: `16Gi`, or `none`.
    #[arg(long)]
    pub memory: Option<String>,
    /// Tasks holding resources at once, or `none`.
    #[arg(long)]
    pub tasks: Option<String>,
    /// The guaranteed share: other namespaces' work never preempts its tasks below this much CPU, or `none`.
    #[arg(long)]
    pub guaranteed_cpu: Option<String>,
    /// The guaranteed share of memory, or `none`.
    #[arg(long)]
    pub guaranteed_memory: Option<String>,
}

#[derive(Args, Debug)]
pub struct JobArgs {
    /// The job id (its `name:` in the job file), or `history` followed by the job id: its kept versions and
    /// what changed between them.
    pub id: String,
    /// With `history`: the job id.
    pub job: Option<String>,
}

#[derive(Args, Debug)]
pub struct TasksArgs {
    /// Only tasks of this job.
    #[arg(long)]
    pub job: Option<String>,
    /// Only tasks in this state.
    #[arg(long, value_enum)]
    pub state: Option<TaskStateArg>,
    /// Only tasks on (or last on) this node.
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The job id.
    pub id: String,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Which records to watch.
    #[arg(long, value_enum, default_value_t = WatchKind::All)]
    pub prefix_kind: WatchKind,
    /// Stop after this many changes.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long (e.g. `30s`, `5m`).
    #[arg(long = "for", value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

/// The ranges `omctl watch` can follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WatchKind {
    /// Everything under the prefix.
    All,
    /// Everything schedulers cache (`cell/`).
    Cell,
    Jobs,
    Tasks,
    Nodes,
    /// Node liveness keys.
    Live,
    /// Node ledgers.
    Alloc,
    /// Job ownership by scheduler instances.
    Owners,
    /// Scheduler instances.
    Schedulers,
    /// Job statuses (pending reasons).
    Status,
    /// Assignments to node agents.
    Assign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TaskStateArg {
    Pending,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Lost,
    Killed,
}

impl TaskStateArg {
    pub fn state(self) -> TaskState {
        match self {
            TaskStateArg::Pending => TaskState::Pending,
            TaskStateArg::Assigned => TaskState::Assigned,
            TaskStateArg::Running => TaskState::Running,
            TaskStateArg::Succeeded => TaskState::Succeeded,
            TaskStateArg::Failed => TaskState::Failed,
            TaskStateArg::Lost => TaskState::Lost,
            TaskStateArg::Killed => TaskState::Killed,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum JobStateArg {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStateArg {
    pub fn state(self) -> omega::model::JobState {
        use omega::model::JobState;
        match self {
            JobStateArg::Pending => JobState::Pending,
            JobStateArg::Running => JobState::Running,
            JobStateArg::Succeeded => JobState::Succeeded,
            JobStateArg::Failed => JobState::Failed,
            JobStateArg::Cancelled => JobState::Cancelled,
        }
    }
}

/// `--max-txn-ops`: at least what one transaction with a few guards needs.
fn parse_max_txn_ops(s: &str) -> Result<usize, String> {
    let min = omega::store::MIN_TXN_OPS;
    match s.trim().parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of at least {min} (etcd's default is 128)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
