//! The jobs, indexed for the Jobs page: one summary row per job, sorted by id, and a set of ids per filter
//! value, kept up to date as the cell changes rather than worked out per request.
//!
//! At 100,000 jobs a page that walked every job (and every task, to count them) would cost a scan of the cell
//! per request, and one more per open browser on every change. Here a request walks only the rows it shows:
//! it starts from the smallest set among its filters, in id order from its cursor, and stops after a page.
//! The sets are persistent (`imbl`), so every published view holds its own consistent copy for free.
//!

use imbl::{OrdMap, OrdSet};
use omega::cell_state::Name;
use omega::model::{JobKind, JobState};
use std::collections::BTreeMap;

/// Task counts of one job, by what the pages show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Task records present.
    pub present: u32,
    pub pending: u32,
    /// Put on a node by a scheduler at some point (holding resources now, or finished after being placed).
    pub placed: u32,
    pub assigned: u32,
    pub running: u32,
    /// Running and passing their checks (or running without checks).
    pub healthy: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// Lost or killed.
    pub ended_other: u32,
}

/// One job as the Jobs page lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRow {
    pub id: Name,
    pub namespace: String,
    pub kind: JobKind,
    pub scheduler: String,
    pub priority: i32,
    pub state: JobState,
    /// Tasks the job asks for.
    pub total: u32,
    pub counts: Counts,
    /// Why tasks are pending, in words (its scheduler's status, or why no scheduler has looked yet).
    pub reason: Option<String>,
    /// Stable reason codes this job is pending for (see [`reason_codes`]); empty when nothing is pending.
    pub codes: Vec<String>,
    /// The instance placing it now (`<scheduler>/<instance>`).
    pub owner: Option<String>,
    pub submitted_at_ms: u64,
    pub version: u32,
}

/// Codes of pending work no scheduler has explained yet.
pub const WAITING: &str = "waiting_for_scheduler";
pub const NO_SCHEDULER: &str = "no_scheduler";
/// A scheduler gave a reason in words but no code.
pub const OTHER: &str = "other";

/// What a job is pending for, as stable codes: its status's codes when its scheduler wrote some, else why no
/// scheduler has (one of the constants above).
pub fn reason_codes(status: Option<&omega::model::JobStatus>, scheduler_running: bool) -> Vec<String> {
    match status.filter(|s| s.pending > 0) {
        Some(s) if !s.reasons.is_empty() => s.reasons.keys().cloned().collect(),
        Some(s) if !s.reason.is_empty() => vec![OTHER.to_string()],
        _ if scheduler_running => vec![WAITING.to_string()],
        _ => vec![NO_SCHEDULER.to_string()],
    }
}

/// What the Jobs page can filter on. Every field narrows; `None` leaves it open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub kind: Option<JobKind>,
    pub scheduler: Option<String>,
    pub namespace: Option<String>,
    /// A pending reason code (`insufficient_memory`, [`WAITING`], ...).
    pub reason: Option<String>,
    /// Job ids starting with this.
    pub prefix: Option<String>,
}

impl JobFilter {
    pub fn matches(&self, row: &JobRow) -> bool {
        self.state.is_none_or(|s| row.state == s)
            && self.kind.is_none_or(|k| row.kind == k)
            && self.scheduler.as_deref().is_none_or(|s| row.scheduler == s)
            && self.namespace.as_deref().is_none_or(|n| row.namespace == n)
            && self.reason.as_deref().is_none_or(|r| row.codes.iter().any(|c| c == r))
            && self.prefix.as_deref().is_none_or(|p| row.id.starts_with(p))
    }
}

/// Where a page starts: after a job id (the next page), before one (the previous page), or at the start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Cursor {
    #[default]
    Start,
    After(String),
    Before(String),
}

/// One page of jobs.
#[derive(Debug)]
pub struct JobPage {
    pub rows: Vec<JobRow>,
    /// Jobs matching the filter, all pages together.
    pub total: usize,
    /// The cursor of the next page, when there is one.
    pub next: Option<Name>,
    /// The cursor of the previous page, when there is one.
    pub prev: Option<Name>,
}

/// Pending work for one reason code, across the cell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReasonGroup {
    pub jobs: u64,
    pub tasks: u64,
}

/// Every job's row and the sets the filters use.
#[derive(Clone, Debug, Default)]
pub struct JobIndex {
    pub rows: OrdMap<Name, JobRow>,
    pub by_state: BTreeMap<&'static str, OrdSet<Name>>,
    pub by_kind: BTreeMap<&'static str, OrdSet<Name>>,
    pub by_scheduler: BTreeMap<String, OrdSet<Name>>,
    pub by_namespace: BTreeMap<String, OrdSet<Name>>,
    pub by_reason: BTreeMap<String, OrdSet<Name>>,
    /// Pending tasks per reason code (a job pending for two codes counts under both).
    pub reason_tasks: BTreeMap<String, u64>,
}

/// The name of a state or kind, as URLs and the index write it.
pub fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Pending => "pending",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

pub fn kind_name(k: JobKind) -> &'static str {
    match k {
        JobKind::Batch => "batch",
        JobKind::Service => "service",
    }
}

/// Every job state, in the order the page lists them.
pub const STATES: [JobState; 5] =
    [JobState::Pending, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];

impl JobIndex {
    /// Puts (or replaces) a job's row, moving it between sets as its fields changed.
    pub fn put(&mut self, row: JobRow) {
        let id = row.id.clone();
        self.remove(&id);
        add(self.by_state.entry(state_name(row.state)).or_default(), &id);
        add(self.by_kind.entry(kind_name(row.kind)).or_default(), &id);
        add(self.by_scheduler.entry(row.scheduler.clone()).or_default(), &id);
        add(self.by_namespace.entry(row.namespace.clone()).or_default(), &id);
        for code in &row.codes {
            add(self.by_reason.entry(code.clone()).or_default(), &id);
            *self.reason_tasks.entry(code.clone()).or_default() += u64::from(row.counts.pending);
        }
        self.rows.insert(id, row);
    }

    /// Removes a job's row from the rows and every set.
    pub fn remove(&mut self, id: &str) {
        let Some(old) = self.rows.remove(id) else { return };
        drop_from(&mut self.by_state, state_name(old.state), id);
        drop_from(&mut self.by_kind, kind_name(old.kind), id);
        drop_from(&mut self.by_scheduler, old.scheduler.as_str(), id);
        drop_from(&mut self.by_namespace, old.namespace.as_str(), id);
        for code in &old.codes {
            drop_from(&mut self.by_reason, code.as_str(), id);
            if let Some(n) = self.reason_tasks.get_mut(code.as_str()) {
                *n = n.saturating_sub(u64::from(old.counts.pending));
                if !self.by_reason.contains_key(code.as_str()) {
                    self.reason_tasks.remove(code.as_str());
                }
            }
        }
    }

    /// Pending work grouped by reason code, most pending tasks first.
    pub fn pending_by_reason(&self) -> Vec<(String, ReasonGroup)> {
        let mut out: Vec<(String, ReasonGroup)> = self
            .by_reason
            .iter()
            .map(|(code, jobs)| {
                let tasks = self.reason_tasks.get(code).copied().unwrap_or(0);
                (code.clone(), ReasonGroup { jobs: jobs.len() as u64, tasks })
            })
            .collect();
        out.sort_by(|a, b| b.1.tasks.cmp(&a.1.tasks).then(a.0.cmp(&b.0)));
        out
    }

    /// The set a filter field narrows to (`None`: the field is open). An unknown value narrows to nothing.
    fn sets<'a>(&'a self, filter: &JobFilter, empty: &'a OrdSet<Name>) -> Vec<&'a OrdSet<Name>> {
        let mut sets = Vec::new();
        if let Some(s) = filter.state {
            sets.push(self.by_state.get(state_name(s)).unwrap_or(empty));
        }
        if let Some(k) = filter.kind {
            sets.push(self.by_kind.get(kind_name(k)).unwrap_or(empty));
        }
        if let Some(s) = &filter.scheduler {
            sets.push(self.by_scheduler.get(s).unwrap_or(empty));
        }
        if let Some(n) = &filter.namespace {
            sets.push(self.by_namespace.get(n).unwrap_or(empty));
        }
        if let Some(r) = &filter.reason {
            sets.push(self.by_reason.get(r).unwrap_or(empty));
        }
        sets
    }

    /// One page of `limit` jobs matching `filter`, in id order from `cursor`. Walks the smallest set among the
    /// filter's, from the cursor, until the page is full: a page costs about what it shows unless the
    /// filters' sets barely overlap.
    pub fn page(&self, filter: &JobFilter, cursor: &Cursor, limit: usize) -> JobPage {
        let empty = OrdSet::new();
        let sets = self.sets(filter, &empty);
        let smallest = sets.iter().min_by_key(|s| s.len()).copied();
        let single = sets.len() <= 1 && filter.prefix.is_none();
        let total = match smallest {
            Some(set) if single => set.len(),
            None if single => self.rows.len(),
            _ => self.ids_from(smallest, filter, &Cursor::Start).filter(|id| self.matches(id, filter)).count(),
        };
        let limit = limit.max(1);
        let mut ids: Vec<Name> =
            self.ids_from(smallest, filter, cursor).filter(|id| self.matches(id, filter)).take(limit + 1).collect();
        let backwards = matches!(cursor, Cursor::Before(_));
        let more = ids.len() > limit;
        ids.truncate(limit);
        if backwards {
            ids.reverse();
        }
        let rows: Vec<JobRow> = ids.iter().filter_map(|id| self.rows.get(id).cloned()).collect();
        let (first, last) = (rows.first().map(|r| r.id.clone()), rows.last().map(|r| r.id.clone()));
        // Going forward, there is a page before unless this one started at the start; going back, the
        // other way round.
        let (next, prev) = match cursor {
            Cursor::Start => (last.filter(|_| more), None),
            Cursor::After(_) => (last.filter(|_| more), first),
            Cursor::Before(_) => (last, first.filter(|_| more)),
        };
        JobPage { rows, total, next, prev }
    }

    fn matches(&self, id: &Name, filter: &JobFilter) -> bool {
        self.rows.get(id).is_some_and(|r| filter.matches(r))
    }

    /// Ids of `set` (or of every job) in the filter's prefix range, from the cursor on (backwards for
    /// [`Cursor::Before`]).
    fn ids_from<'a>(
        &'a self,
        set: Option<&'a OrdSet<Name>>,
        filter: &JobFilter,
        cursor: &Cursor,
    ) -> Box<dyn Iterator<Item = Name> + 'a> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let prefix = filter.prefix.clone().unwrap_or_default();
        let lower: std::ops::Bound<String> = match cursor {
            Cursor::After(a) if a.as_str() >= prefix.as_str() => Excluded(a.clone()),
            _ if prefix.is_empty() => Unbounded,
            _ => Included(prefix.clone()),
        };
        let upper: std::ops::Bound<String> = match cursor {
            Cursor::Before(b) => Excluded(b.clone()),
            _ => Unbounded,
        };
        let bounds = (as_str(&lower), as_str(&upper));
        let in_prefix = move |id: &Name| id.starts_with(prefix.as_str());
        let backwards = matches!(cursor, Cursor::Before(_));
        match (set, backwards) {
            (Some(s), false) => Box::new(s.range::<_, str>(bounds).cloned().take_while(in_prefix)),
            (Some(s), true) => Box::new(s.range::<_, str>(bounds).rev().cloned().take_while(in_prefix)),
            (None, false) => Box::new(self.rows.range::<_, str>(bounds).map(|(k, _)| k).cloned().take_while(in_prefix)),
            (None, true) => {
                Box::new(self.rows.range::<_, str>(bounds).rev().map(|(k, _)| k).cloned().take_while(in_prefix))
            }
        }
    }
}

fn as_str(b: &std::ops::Bound<String>) -> std::ops::Bound<&str> {
    match b {
        std::ops::Bound::Included(s) => std::ops::Bound::Included(s.as_str()),
        std::ops::Bound::Excluded(s) => std::ops::Bound::Excluded(s.as_str()),
        std::ops::Bound::Unbounded => std::ops::Bound::Unbounded,
    }
}

fn add(set: &mut OrdSet<Name>, id: &Name) {
    set.insert(id.clone());
}

fn drop_from<K: Ord + std::borrow::Borrow<str>>(map: &mut BTreeMap<K, OrdSet<Name>>, key: &str, id: &str) {
    if let Some(set) = map.get_mut(key) {
        set.remove(id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, state: JobState, scheduler: &str, codes: &[&str], pending: u32) -> JobRow {
        JobRow {
            id: Name::from(id),
            namespace: omega::model::DEFAULT_NAMESPACE.into(),
            kind: JobKind::Batch,
            scheduler: scheduler.into(),
            priority: 0,
            state,
            total: 1,
            counts: Counts { pending, ..Default::default() },
            reason: None,
            codes: codes.iter().map(|c| c.to_string()).collect(),
            owner: None,
            submitted_at_ms: 0,
            version: 0,
        }
    }

    fn ids(p: &JobPage) -> Vec<&str> {
        p.rows.iter().map(|r| &*r.id).collect()
    }

    #[test]
    fn pages_walk_forward_and_back_through_a_filter() {
        let mut ix = JobIndex::default();
        for i in 0..10 {
            let state = if i % 2 == 0 { JobState::Pending } else { JobState::Running };
            let codes: &[&str] = if i % 2 == 0 { &["insufficient_memory"] } else { &[] };
            ix.put(row(&format!("j{i}"), state, "batch", codes, if i % 2 == 0 { 3 } else { 0 }));
        }
        let pending = JobFilter { state: Some(JobState::Pending), ..Default::default() };
        let first = ix.page(&pending, &Cursor::Start, 2);
        assert_eq!((ids(&first), first.total), (vec!["j0", "j2"], 5));
        assert!(first.prev.is_none());
        let second = ix.page(&pending, &Cursor::After(first.next.clone().unwrap().to_string()), 2);
        assert_eq!(ids(&second), vec!["j4", "j6"]);
        let back = ix.page(&pending, &Cursor::Before(second.prev.clone().unwrap().to_string()), 2);
        assert_eq!(ids(&back), vec!["j0", "j2"]);
        let last = ix.page(&pending, &Cursor::After("j6".into()), 2);
        assert_eq!((ids(&last), last.next.is_none()), (vec!["j8"], true));

        // Two filters, a prefix, and a reason.
        let both =
            JobFilter { reason: Some("insufficient_memory".into()), prefix: Some("j".into()), ..pending.clone() };
        assert_eq!(ix.page(&both, &Cursor::Start, 100).total, 5);
        let groups = ix.pending_by_reason();
        assert_eq!(groups, vec![("insufficient_memory".to_string(), ReasonGroup { jobs: 5, tasks: 15 })]);

        // A job placed at last leaves the pending sets and the reason group.
        ix.put(row("j0", JobState::Running, "batch", &[], 0));
        assert_eq!(ix.page(&pending, &Cursor::Start, 100).total, 4);
        assert_eq!(ix.pending_by_reason()[0].1, ReasonGroup { jobs: 4, tasks: 12 });
        ix.remove("j2");
        ix.remove("j4");
        ix.remove("j6");
        ix.remove("j8");
        assert!(ix.pending_by_reason().is_empty() && !ix.by_state.contains_key("pending"));
        let ns = JobFilter { namespace: Some(omega::model::DEFAULT_NAMESPACE.into()), ..Default::default() };
        assert_eq!(ix.page(&ns, &Cursor::Start, 100).total, ix.rows.len(), "every test row is in `default`");
        let other = JobFilter { namespace: Some("team-a".into()), ..Default::default() };
        assert_eq!(ix.page(&other, &Cursor::Start, 100).total, 0);
        let unknown = JobFilter { scheduler: Some("nope".into()), ..Default::default() };
        assert_eq!(ix.page(&unknown, &Cursor::Start, 10).total, 0);
    }
}
