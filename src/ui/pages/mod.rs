//! The pages, one module each, and the route that names one page with its options.
//!
//! A page has two parts: the **live** part, rendered from a [`View`] alone (no etcd, no waiting), which the
//! server re-renders and pushes by server-sent events whenever the cell changes; and the **fixed** part,
//! rendered once per load: forms a person may be typing into, and what costs an etcd read (a job's kept
//! versions). The same [`Route`] names both, parsed from the page's path and query, so the event stream of a
//! page renders exactly what its first load rendered.

pub mod cell;
pub mod job;
pub mod jobs;
pub mod node;
pub mod schedulers;

use crate::cache::View;
use crate::error::{Error, Result};
use crate::heatmap;
use crate::history::History;
use std::collections::HashMap;

/// One page and its options.
#[derive(Clone, Debug)]
pub enum Route {
    Cell(heatmap::Options),
    Schedulers,
    Jobs(jobs::Query),
    Job { id: String, tasks_from: u32 },
    Node { name: String },
}

impl Route {
    /// The route of `path` with its `query` (without the `?`).
    pub fn parse(path: &str, query: &str) -> Result<Route> {
        let q = parse_query(query);
        let get = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let segments: Vec<String> = path.trim_matches('/').split('/').map(percent_decode).collect();
        match segments.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            [""] => {
                let metric = heatmap::Metric::parse(get("metric").unwrap_or(""))
                    .ok_or_else(|| Error::BadRequest("metric must be max, cpu or memory".into()))?;
                let number = |k: &str| {
                    get(k).map(|v| v.parse::<usize>().map_err(|_| Error::BadRequest(format!("{k} must be a number"))))
                };
                let range = match (number("from").transpose()?, number("to").transpose()?) {
                    (Some(a), Some(b)) => Some((a, b)),
                    _ => None,
                };
                Ok(Route::Cell(heatmap::Options {
                    metric,
                    zone: q.get("zone").cloned(),
                    range,
                    search: get("q").map(str::to_string),
                }))
            }
            ["schedulers"] => Ok(Route::Schedulers),
            ["jobs"] => Ok(Route::Jobs(jobs::Query::from_params(&q)?)),
            ["jobs", id] => {
                let tasks_from = match get("tasks_from") {
                    Some(v) => v.parse().map_err(|_| Error::BadRequest("tasks_from must be a number".into()))?,
                    None => 0,
                };
                Ok(Route::Job { id: id.to_string(), tasks_from })
            }
            ["nodes", name] => Ok(Route::Node { name: name.to_string() }),
            _ => Err(Error::NotFound(format!("page {path}"))),
        }
    }

    pub fn title(&self) -> String {
        match self {
            Route::Cell(_) => "Cell".into(),
            Route::Schedulers => "Schedulers".into(),
            Route::Jobs(_) => "Jobs".into(),
            Route::Job { id, .. } => format!("Job {id}"),
            Route::Node { name } => format!("Node {name}"),
        }
    }

    /// The live part of the page, from `view` alone.
    pub fn render_live(&self, view: &View, history: &parking_lot::Mutex<History>) -> Result<String> {
        match self {
            Route::Cell(options) => Ok(cell::render(view, options)),
            Route::Schedulers => Ok(schedulers::render(view, &history.lock())),
            Route::Jobs(query) => Ok(jobs::render(view, query)),
            Route::Job { id, tasks_from } => job::render(view, &history.lock(), id, *tasks_from),
            Route::Node { name } => node::render(view, &history.lock(), name),
        }
    }
}

/// `a=1&b=x%20y` -> {a: 1, b: "x y"} (`+` is a space, as forms send it). The last of repeated keys wins.
pub fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(&k.replace('+', " ")), percent_decode(&v.replace('+', " ")))
        })
        .collect()
}

/// Decodes `%XX` escapes; an invalid escape or a result that is not UTF-8 is kept as it was written.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_queries_parse() {
        assert_eq!(
            parse_query("a=1&b=x%20y+z&c"),
            HashMap::from([("a".into(), "1".into()), ("b".into(), "x y z".into()), ("c".into(), String::new())])
        );
        assert_eq!(percent_decode("%3Cb%3E%zz"), "<b>%zz");
        assert!(matches!(Route::parse("/jobs/web%2D1", ""), Ok(Route::Job { id, .. }) if id == "web-1"));
        assert!(matches!(Route::parse("/", "zone=a&from=0&to=10"), Ok(Route::Cell(o)) if o.range == Some((0, 10))));
        assert!(matches!(Route::parse("/nowhere", ""), Err(Error::NotFound(_))));
        assert!(matches!(Route::parse("/", "metric=heat"), Err(Error::BadRequest(_))));
    }
}
