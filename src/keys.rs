//! The etcd key layout, in one place.
//!
//! Everything a scheduler's cache needs lives under `<prefix>cell/`, so a cache watches one contiguous range
//! and gets a consistent cut of it at every revision. What only agents read (their assignments) lives under
//! `<prefix>assign/<node>/`, outside that range, so claim traffic does not fan out to every scheduler twice.
//!
//! | key                                   | value                                  |
//! |---------------------------------------|----------------------------------------|
//! | `<prefix>cell/nodes/<node>`           | [`crate::model::Node`]                 |
//! | `<prefix>cell/live/<node>`            | [`crate::model::Liveness`], lease-bound|
//! | `<prefix>cell/alloc/<node>`           | [`crate::model::Allocation`]           |
//! | `<prefix>cell/jobs/<job>`             | [`crate::model::Job`]                  |
//! | `<prefix>cell/tasks/<job>/<index>`    | [`crate::model::Task`]                 |
//! | `<prefix>cell/owners/<job>`           | [`crate::model::JobOwner`], lease-bound|
//! | `<prefix>cell/drains/<node>`          | [`crate::model::Drain`], while a node is drained |
//! | `<prefix>cell/schedulers/<name>/<id>` | [`crate::model::SchedulerInstance`], lease-bound |
//! | `<prefix>status/<job>`                | [`crate::model::JobStatus`]            |
//! | `<prefix>assign/<node>/<job>/<index>` | [`crate::model::Assignment`]           |
//! | `<prefix>services/<service>/<node>/<job>/<index>` | [`crate::discovery::Endpoint`], lease-bound, while the task is healthy |
//! | `<prefix>submissions/<job>`           | [`crate::store::SubmissionMarker`], while a large job is written |
//! | `<prefix>versions/<job>/<version>`    | [`crate::model::Job`]: an earlier version of the job, as it was |
//! | `<prefix>controller/<lease>`          | the controller's election key (etcd's election API) |
//! | `<prefix>locks/<name>/<lease>`        | a `--lock` scheduler's place in the cell lock (etcd's lock API), lease-bound |

use crate::error::{Error, Result};

/// The default prefix of every key Omega writes.
pub const DEFAULT_PREFIX: &str = "/omega/";

/// Builds and parses keys under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// A key of the layout, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key<'a> {
    Node(&'a str),
    Live(&'a str),
    Alloc(&'a str),
    Job(&'a str),
    /// A task, by its id `<job>/<index>`.
    Task(&'a str),
    Assignment {
        node: &'a str,
        task: &'a str,
    },
    /// Which scheduler instance owns a job's placements.
    Owner(&'a str),
    /// A live scheduler instance, by `<scheduler>/<instance>`.
    Scheduler(&'a str),
    /// A node being drained.
    Drain(&'a str),
    /// A namespace's quota.
    Quota(&'a str),
    /// A job's placement status (pending reasons), outside the cached range.
    Status(&'a str),
    /// A submission in progress (a job written in several transactions), outside the cached range.
    Submission(&'a str),
}

impl Default for Keys {
    fn default() -> Self {
        Keys { prefix: DEFAULT_PREFIX.to_string() }
    }
}

impl Keys {
    /// A layout under `prefix`, which must start with `/`; a trailing `/` is added when missing.
    pub fn new(prefix: &str) -> Result<Self> {
        if !prefix.starts_with('/') || prefix.contains("//") || prefix.chars().any(char::is_whitespace) {
            return Err(Error::InvalidArgument(format!(
                "key prefix {prefix:?} must start with '/' and contain no empty segment or whitespace"
            )));
        }
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Keys { prefix })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The range a scheduler's cache watches.
    pub fn cell_prefix(&self) -> String {
        format!("{}cell/", self.prefix)
    }
    pub fn nodes_prefix(&self) -> String {
        format!("{}cell/nodes/", self.prefix)
    }
    pub fn node(&self, node: &str) -> String {
        format!("{}cell/nodes/{node}", self.prefix)
    }
    pub fn live(&self, node: &str) -> String {
        format!("{}cell/live/{node}", self.prefix)
    }
    pub fn alloc(&self, node: &str) -> String {
        format!("{}cell/alloc/{node}", self.prefix)
    }
    pub fn jobs_prefix(&self) -> String {
        format!("{}cell/jobs/", self.prefix)
    }
    pub fn job(&self, job: &str) -> String {
        format!("{}cell/jobs/{job}", self.prefix)
    }
    pub fn tasks_prefix(&self) -> String {
        format!("{}cell/tasks/", self.prefix)
    }
    /// All tasks of one job. The trailing `/` keeps job `a` from matching job `ab`.
    pub fn tasks_of_job(&self, job: &str) -> String {
        format!("{}cell/tasks/{job}/", self.prefix)
    }
    pub fn task(&self, task_id: &str) -> String {
        format!("{}cell/tasks/{task_id}", self.prefix)
    }
    pub fn owner(&self, job: &str) -> String {
        format!("{}cell/owners/{job}", self.prefix)
    }
    pub fn drain(&self, node: &str) -> String {
        format!("{}cell/drains/{node}", self.prefix)
    }
    pub fn quotas_prefix(&self) -> String {
        format!("{}cell/quotas/", self.prefix)
    }
    pub fn quota(&self, namespace: &str) -> String {
        format!("{}cell/quotas/{namespace}", self.prefix)
    }
    pub fn schedulers_prefix(&self) -> String {
        format!("{}cell/schedulers/", self.prefix)
    }
    pub fn scheduler(&self, scheduler: &str, instance: &str) -> String {
        format!("{}cell/schedulers/{scheduler}/{instance}", self.prefix)
    }
    pub fn status_prefix(&self) -> String {
        format!("{}status/", self.prefix)
    }
    pub fn status(&self, job: &str) -> String {
        format!("{}status/{job}", self.prefix)
    }
    pub fn assignments_prefix(&self) -> String {
        format!("{}assign/", self.prefix)
    }
    /// What one node's agent watches.
    pub fn assignments_of(&self, node: &str) -> String {
        format!("{}assign/{node}/", self.prefix)
    }
    pub fn assignment(&self, node: &str, task_id: &str) -> String {
        format!("{}assign/{node}/{task_id}", self.prefix)
    }
    pub fn submissions_prefix(&self) -> String {
        format!("{}submissions/", self.prefix)
    }
    /// The marker of a job being submitted in several transactions (its tasks first, its record last).
    pub fn submission(&self, job: &str) -> String {
        format!("{}submissions/{job}", self.prefix)
    }
    /// Earlier versions of a job (the current one is the job record). Outside `cell/`: only agents running
    /// an old version's task, the controller reverting, and omctl read them.
    pub fn versions_of(&self, job: &str) -> String {
        format!("{}versions/{job}/", self.prefix)
    }
    pub fn version(&self, job: &str, version: u32) -> String {
        format!("{}versions/{job}/{version}", self.prefix)
    }
    /// Every service's endpoints ([`crate::discovery`]). Outside `cell/`: service churn does not reach the
    /// schedulers' caches.
    pub fn services_prefix(&self) -> String {
        format!("{}services/", self.prefix)
    }
    /// One service's endpoints. The trailing `/` keeps service `web` from matching `webx`.
    pub fn service(&self, service: &str) -> String {
        format!("{}services/{service}/", self.prefix)
    }
    /// One endpoint: `task` (`<job>/<index>`) of service `service` on `node`.
    pub fn endpoint(&self, service: &str, node: &str, task: &str) -> String {
        format!("{}services/{service}/{node}/{task}", self.prefix)
    }
    /// The controller replicas' election (etcd's election API keys `<this>/<lease>` under it).
    pub fn controller_election(&self) -> String {
        format!("{}controller", self.prefix)
    }

    /// The put that prices a transaction of nested writes for etcd's space quota (see `txn`): it sits in the
    /// failure branch, so it is written only when a fenced transaction's fence fails. Its value is empty.
    pub fn space_check(&self) -> String {
        format!("{}space-check", self.prefix)
    }

    /// The lock `--lock` schedulers (the pessimistic baseline) hold around each attempt: etcd's lock API keys
    /// each holder or waiter `<this>/<lease>` under it. Outside `cell/`, so waiting for the lock costs the
    /// schedulers' caches nothing.
    pub fn lock(&self, name: &str) -> String {
        format!("{}locks/{name}", self.prefix)
    }

    /// Parses a key of this layout; `None` for anything else under (or outside) the prefix.
    pub fn parse<'a>(&self, key: &'a str) -> Option<Key<'a>> {
        let rest = key.strip_prefix(self.prefix.as_str())?;
        if let Some(cell) = rest.strip_prefix("cell/") {
            let (kind, name) = cell.split_once('/')?;
            if name.is_empty() {
                return None;
            }
            return match kind {
                "nodes" => Some(Key::Node(name)),
                "live" => Some(Key::Live(name)),
                "alloc" => Some(Key::Alloc(name)),
                "jobs" => Some(Key::Job(name)),
                "tasks" => name.contains('/').then_some(Key::Task(name)),
                "owners" => Some(Key::Owner(name)),
                "schedulers" => name.contains('/').then_some(Key::Scheduler(name)),
                "drains" => Some(Key::Drain(name)),
                "quotas" => Some(Key::Quota(name)),
                _ => None,
            };
        }
        if let Some(job) = rest.strip_prefix("status/") {
            return (!job.is_empty()).then_some(Key::Status(job));
        }
        if let Some(job) = rest.strip_prefix("submissions/") {
            return (!job.is_empty() && !job.contains('/')).then_some(Key::Submission(job));
        }
        let assign = rest.strip_prefix("assign/")?;
        let (node, task) = assign.split_once('/')?;
        (!node.is_empty() && task.contains('/')).then_some(Key::Assignment { node, task })
    }
}

/// The end of the range of all keys starting with `prefix` (etcd's `[key, range_end)` convention).
///
/// Computed by hand rather than with `GetOptions::with_prefix()`, because that derives the end from the key
/// passed, which is wrong for the second page of a paginated scan.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range runs to the end of the keyspace.
    vec![0]
}

/// Checks a node or job name: it becomes a key segment and a container name, so keep it plain.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{kind} name {name:?} must be 1-128 characters of a-z, A-Z, 0-9, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// The id of task `index` of `job`.
pub fn task_id(job: &str, index: u32) -> String {
    format!("{job}/{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let k = Keys::new("/omega").unwrap();
        assert_eq!(k.prefix(), "/omega/");
        assert_eq!(k.parse(&k.node("n1")), Some(Key::Node("n1")));
        assert_eq!(k.parse(&k.live("n1")), Some(Key::Live("n1")));
        assert_eq!(k.parse(&k.alloc("n1")), Some(Key::Alloc("n1")));
        assert_eq!(k.parse(&k.job("j")), Some(Key::Job("j")));
        assert_eq!(k.parse(&k.task("j/3")), Some(Key::Task("j/3")));
        assert_eq!(k.parse(&k.assignment("n1", "j/3")), Some(Key::Assignment { node: "n1", task: "j/3" }));
        assert_eq!(k.parse(&k.owner("j")), Some(Key::Owner("j")));
        assert_eq!(k.parse(&k.scheduler("batch", "b-1")), Some(Key::Scheduler("batch/b-1")));
        assert_eq!(k.parse(&k.status("j")), Some(Key::Status("j")));
        assert_eq!(k.parse(&k.drain("n1")), Some(Key::Drain("n1")));
        assert_eq!(k.parse(&k.submission("j")), Some(Key::Submission("j")));
        assert!(!k.submission("j").starts_with(&k.cell_prefix()));
        assert!(!k.status("j").starts_with(&k.cell_prefix()));
        assert_eq!(k.parse("/omega/cell/tasks/j"), None);
        assert_eq!(k.parse("/omega/cell/bogus/x"), None);
        assert_eq!(k.parse("/other/cell/nodes/x"), None);
        assert!(k.task("j/1").starts_with(&k.tasks_of_job("j")));
        assert!(!k.task("jj/1").starts_with(&k.tasks_of_job("j")));
        assert!(!k.assignment("n", "j/1").starts_with(&k.cell_prefix()));
        assert_eq!(k.lock("cell"), "/omega/locks/cell");
        assert!(!k.lock("cell").starts_with(&k.cell_prefix()), "waiting for the lock wakes no cache");
    }

    #[test]
    fn bad_prefixes_are_refused() {
        assert!(Keys::new("omega").is_err());
        assert!(Keys::new("/a//b").is_err());
        assert!(Keys::new("/a b").is_err());
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/omega/"), b"/omega0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("node", "node-1.zone_a").is_ok());
        assert!(validate_name("node", "").is_err());
        assert!(validate_name("node", "a/b").is_err());
        assert!(validate_name("node", ".hidden").is_err());
    }
}
