//! The Jobs page: jobs per state, the pending work of the whole cell grouped by reason, and a page of jobs,
//! filtered and paginated on the server from the job index (never a scan of every job per request).

use crate::cache::View;
use crate::error::{Error, Result};
use crate::html::{count, escape, job_link, table, url_encode};
use crate::index::{self, Cursor, JobFilter, JobRow, NO_SCHEDULER, OTHER, STATES, WAITING};
use omega::model::{JobKind, JobState};
use omega::units::show;
use std::collections::HashMap;
use std::fmt::Write;

/// Jobs per page unless the query says otherwise, and the most it may say.
pub const PAGE: usize = 50;
pub const MAX_PAGE: usize = 500;

/// The Jobs page's query: filters, where the page starts, and how long it is.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub filter: JobFilter,
    pub cursor: Cursor,
    pub limit: usize,
}

impl Query {
    pub fn from_params(q: &HashMap<String, String>) -> Result<Query> {
        let get = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let state = match get("state") {
            Some(s) => Some(
                STATES
                    .into_iter()
                    .find(|st| index::state_name(*st) == s)
                    .ok_or_else(|| Error::BadRequest(format!("unknown job state {s:?}")))?,
            ),
            None => None,
        };
        let kind = match get("kind") {
            Some("batch") => Some(JobKind::Batch),
            Some("service") => Some(JobKind::Service),
            Some(k) => return Err(Error::BadRequest(format!("unknown job kind {k:?}"))),
            None => None,
        };
        let cursor = match (get("after"), get("before")) {
            (Some(a), _) => Cursor::After(a.to_string()),
            (None, Some(b)) => Cursor::Before(b.to_string()),
            (None, None) => Cursor::Start,
        };
        let limit = match get("limit") {
            Some(l) => {
                l.parse::<usize>().map_err(|_| Error::BadRequest("limit must be a number".into()))?.clamp(1, MAX_PAGE)
            }
            None => PAGE,
        };
        Ok(Query {
            filter: JobFilter {
                state,
                kind,
                scheduler: get("scheduler").map(str::to_string),
                namespace: get("namespace").map(str::to_string),
                reason: get("reason").map(str::to_string),
                prefix: get("q").map(str::to_string),
            },
            cursor,
            limit,
        })
    }

    /// The URL of this query with `cursor` (filters kept).
    pub fn url(&self, cursor: &Cursor) -> String {
        let f = &self.filter;
        let mut parts: Vec<String> = Vec::new();
        if let Some(s) = f.state {
            parts.push(format!("state={}", index::state_name(s)));
        }
        if let Some(k) = f.kind {
            parts.push(format!("kind={}", index::kind_name(k)));
        }
        for (k, v) in
            [("scheduler", &f.scheduler), ("namespace", &f.namespace), ("reason", &f.reason), ("q", &f.prefix)]
        {
            if let Some(v) = v {
                parts.push(format!("{k}={}", url_encode(v)));
            }
        }
        if self.limit != PAGE {
            parts.push(format!("limit={}", self.limit));
        }
        match cursor {
            Cursor::Start => {}
            Cursor::After(a) => parts.push(format!("after={}", url_encode(a))),
            Cursor::Before(b) => parts.push(format!("before={}", url_encode(b))),
        }
        if parts.is_empty() {
            "/jobs".into()
        } else {
            format!("/jobs?{}", parts.join("&"))
        }
    }
}

/// The filter form (fixed: a person types into it). The schedulers listed are those with jobs.
pub fn form(view: &View, query: &Query) -> String {
    let f = &query.filter;
    let select = |name: &str, current: Option<&str>, options: &[(String, String)]| {
        let mut s = format!("<select name=\"{name}\"><option value=\"\">any</option>");
        for (value, label) in options {
            let selected = if current == Some(value.as_str()) { " selected" } else { "" };
            let _ = write!(s, "<option value=\"{}\"{selected}>{}</option>", escape(value), escape(label));
        }
        s.push_str("</select>");
        s
    };
    let states: Vec<(String, String)> =
        STATES.iter().map(|s| (index::state_name(*s).to_string(), index::state_name(*s).to_string())).collect();
    let kinds = [("batch".to_string(), "batch".to_string()), ("service".to_string(), "service".to_string())];
    let schedulers: Vec<(String, String)> = view.jobs.by_scheduler.keys().map(|s| (s.clone(), s.clone())).collect();
    let reasons: Vec<(String, String)> = view.jobs.by_reason.keys().map(|r| (r.clone(), r.clone())).collect();
    let namespaces: Vec<(String, String)> = view.jobs.by_namespace.keys().map(|n| (n.clone(), n.clone())).collect();
    format!(
        "<form class=\"filters\" method=\"get\" action=\"/jobs\">\
         <label>Job id starts with<input type=\"search\" name=\"q\" value=\"{}\"></label>\
         <label>Namespace{}</label><label>State{}</label><label>Kind{}</label><label>Scheduler{}</label>\
         <label>Pending for{}</label>\
         <button type=\"submit\">Filter</button> <a href=\"/jobs\">clear</a></form>",
        escape(f.prefix.as_deref().unwrap_or("")),
        select("namespace", f.namespace.as_deref(), &namespaces),
        select("state", f.state.map(index::state_name), &states),
        select("kind", f.kind.map(index::kind_name), &kinds),
        select("scheduler", f.scheduler.as_deref(), &schedulers),
        select("reason", f.reason.as_deref(), &reasons),
    )
}

/// What a reason code means, for the "pending work and why" table.
fn meaning(code: &str) -> &'static str {
    match code {
        "insufficient_cpu" => "no node has the cpu left",
        "insufficient_memory" => "no node has the memory left",
        "constraint" => "nodes ruled out by the job's constraints",
        "anti_affinity" => "nodes ruled out because they already run a task of the job",
        "not_schedulable" => "nodes down or drained",
        "too_large" => "a gang too large for one etcd transaction (never tried again until the job changes)",
        WAITING => "no scheduler has looked at it yet",
        NO_SCHEDULER => "no instance of its scheduler is running",
        OTHER => "a reason without a code (see the job)",
        _ => "",
    }
}

pub fn render(view: &View, query: &Query) -> String {
    let ix = &view.jobs;
    let mut out = String::new();
    out.push_str("<div class=\"cards\">");
    let all = Query { filter: JobFilter::default(), ..query.clone() };
    let _ = write!(
        out,
        "<div class=\"card\"><div class=\"muted\">jobs</div><div class=\"big\"><a href=\"{}\">{}</a></div></div>",
        escape(&all.url(&Cursor::Start)),
        count(ix.rows.len() as u64)
    );
    for st in STATES {
        let n = ix.by_state.get(index::state_name(st)).map_or(0, |s| s.len());
        let q = Query { filter: JobFilter { state: Some(st), ..Default::default() }, ..query.clone() };
        let _ = write!(
            out,
            "<div class=\"card\"><div class=\"muted\">{}</div><div class=\"big state-{}\"><a href=\"{}\">{}</a></div></div>",
            index::state_name(st),
            index::state_name(st),
            escape(&q.url(&Cursor::Start)),
            count(n as u64)
        );
    }
    out.push_str("</div>");

    out.push_str("<h2>Pending work and why</h2>");
    let groups = ix.pending_by_reason();
    if groups.is_empty() {
        out.push_str("<p class=\"muted\">Nothing is pending.</p>");
    } else {
        let rows = groups.iter().map(|(code, g)| {
            let q = Query { filter: JobFilter { reason: Some(code.clone()), ..Default::default() }, ..query.clone() };
            vec![
                format!(
                    "<a class=\"reason\" data-reason=\"{0}\" href=\"{1}\">{0}</a>",
                    escape(code),
                    escape(&q.url(&Cursor::Start))
                ),
                count(g.jobs),
                count(g.tasks),
                escape(meaning(code)),
            ]
        });
        out.push_str(&table(&["reason", "jobs", "pending tasks", "what it means"], rows, "pending-reasons"));
        out.push_str(
            "<p class=\"muted\">A job pending for several reasons (some nodes short of memory, others ruled out by a \
             constraint) counts under each.</p>",
        );
    }

    let page = ix.page(&query.filter, &query.cursor, query.limit);
    let filtered = query.filter != JobFilter::default();
    let _ = write!(
        out,
        "<h2>{} <span class=\"muted\" id=\"matching\">({} {})</span></h2>",
        if filtered { "Jobs matching the filter" } else { "All jobs" },
        count(page.total as u64),
        if page.total == 1 { "job" } else { "jobs" }
    );
    if page.rows.is_empty() {
        out.push_str("<p class=\"muted\">No jobs here.</p>");
    } else {
        out.push_str(&table(
            &[
                "id",
                "namespace",
                "kind",
                "scheduler",
                "priority",
                "state",
                "placed",
                "running",
                "pending",
                "pending reason",
                "owner",
                "submitted",
            ],
            page.rows.iter().map(row),
            "jobs",
        ));
    }
    out.push_str("<p class=\"pager\">");
    if let Some(prev) = &page.prev {
        let _ = write!(
            out,
            "<a rel=\"prev\" href=\"{}\">&larr; previous</a>",
            escape(&query.url(&Cursor::Before(prev.to_string())))
        );
    }
    if let Some(next) = &page.next {
        let _ = write!(
            out,
            "<a rel=\"next\" href=\"{}\">next &rarr;</a>",
            escape(&query.url(&Cursor::After(next.to_string())))
        );
    }
    out.push_str("</p>");
    out
}

fn row(r: &JobRow) -> Vec<String> {
    let state = index::state_name(r.state);
    vec![
        job_link(&r.id),
        escape(&r.namespace),
        index::kind_name(r.kind).into(),
        escape(&r.scheduler),
        r.priority.to_string(),
        format!("<span class=\"state-{state}\">{state}</span>"),
        format!("{}/{}", r.counts.placed, r.total),
        r.counts.running.to_string(),
        r.counts.pending.to_string(),
        r.reason.as_deref().map(|s| escape(&truncate(s, 90))).unwrap_or_default(),
        r.owner.as_deref().map(escape).unwrap_or_default(),
        show::ago(r.submitted_at_ms),
    ]
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// Whether a state is one a job is still being placed or run in (for the pages' wording).
pub fn is_active(s: JobState) -> bool {
    matches!(s, JobState::Pending | JobState::Running)
}
