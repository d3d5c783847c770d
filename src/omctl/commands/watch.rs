//! `omctl watch`: a live stream of changes, one line each (NDJSON with `-o json`).
//!
//! Built on `omega::watcher::Watcher`, which lists the range, watches from the next revision, resumes after
//! a broken stream and re-lists after compaction. The listing seeds the last-known value of every key, so
//! each change can be summarised against what it replaced.

use crate::cli::{Cli, WatchArgs, WatchKind};
use crate::exit::Code;
use crate::output::{write_out, Format};
use crate::summary::{self, Summary};
use crate::units;
use omega::keys::Keys;
use omega::model::now_ms;
use omega::store::DEFAULT_PAGE_SIZE;
use omega::watcher::{Change, WatchEvent, Watcher};
use serde::Serialize;
use std::collections::HashMap;
use tokio::time::Instant;

/// One line of `omctl watch -o json` (NDJSON).
#[derive(Serialize)]
pub struct WatchLine {
    /// When omctl received the change (ms since the epoch).
    pub time_ms: u64,
    /// The etcd revision of the change (for `resync`: of the new listing).
    pub revision: i64,
    /// `put`, `delete`, or `resync` (the watch fell behind a compaction and re-listed the range).
    pub event: &'static str,
    /// `task`, `job`, `node`, `live`, `alloc`, `owner`, `scheduler`, `status`, `assign`, `other` (empty for resync).
    pub kind: &'static str,
    pub name: String,
    pub summary: String,
    pub key: String,
    /// The new value as JSON (`null` for deletes and values that are not JSON).
    pub value: Option<serde_json::Value>,
}

/// The key range a kind of record lives in.
pub fn range(keys: &Keys, kind: WatchKind) -> String {
    match kind {
        WatchKind::All => keys.prefix().to_string(),
        WatchKind::Cell => keys.cell_prefix(),
        WatchKind::Jobs => keys.jobs_prefix(),
        WatchKind::Tasks => keys.tasks_prefix(),
        WatchKind::Nodes => keys.nodes_prefix(),
        WatchKind::Live => keys.live(""),
        WatchKind::Alloc => keys.alloc(""),
        WatchKind::Owners => keys.owner(""),
        WatchKind::Schedulers => keys.schedulers_prefix(),
        WatchKind::Status => keys.status_prefix(),
        WatchKind::Assign => keys.assignments_prefix(),
    }
}

pub async fn run(cli: &Cli, args: &WatchArgs) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    let keys = store.keys().clone();
    let prefix = range(&keys, args.prefix_kind);
    if args.count == Some(0) {
        return Ok(Code::Ok);
    }
    let deadline = args.duration.map(|d| Instant::now() + d);
    let mut watcher = Watcher::new(store, prefix.clone(), DEFAULT_PAGE_SIZE);
    let mut known: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut listed = false;
    let mut printed = 0u64;
    loop {
        let next = watcher.next();
        let event = match deadline {
            Some(d) => match tokio::time::timeout_at(d, next).await {
                Ok(e) => e,
                Err(_) => break,
            },
            None => next.await,
        };
        match event {
            WatchEvent::Reset { kvs, revision } => {
                known = kvs.iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())).collect();
                if !listed {
                    listed = true;
                    // On stderr, so stdout stays one record per line; also tells a script the watch is live.
                    eprintln!(
                        "watching {prefix} from revision {} ({} keys now); Ctrl-C to stop",
                        revision + 1,
                        known.len()
                    );
                } else {
                    let line = WatchLine {
                        time_ms: now_ms(),
                        revision,
                        event: "resync",
                        kind: "",
                        name: String::new(),
                        summary: format!(
                            "fell behind a compaction; re-listed {prefix} at revision {revision} ({} keys); \
                             changes in between are summarised by the new state only",
                            known.len()
                        ),
                        key: prefix.clone(),
                        value: None,
                    };
                    if !print_line(cli.output, &line)? {
                        return Ok(Code::Ok);
                    }
                }
            }
            WatchEvent::Changes { changes, .. } => {
                for change in changes {
                    let line = match change {
                        Change::Put(kv) => {
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            let prev = known.insert(kv.key().to_vec(), kv.value().to_vec());
                            let s = summary::describe(&keys, &key, prev.as_deref(), Some(kv.value()));
                            line(kv.mod_revision(), "put", s, key, serde_json::from_slice(kv.value()).ok())
                        }
                        Change::Delete { key, mod_revision, .. } => {
                            let prev = known.remove(&key);
                            let key = String::from_utf8_lossy(&key).into_owned();
                            let s = summary::describe(&keys, &key, prev.as_deref(), None);
                            line(mod_revision, "delete", s, key, None)
                        }
                    };
                    if !print_line(cli.output, &line)? {
                        return Ok(Code::Ok);
                    }
                    printed += 1;
                    if args.count.is_some_and(|n| printed >= n) {
                        return Ok(Code::Ok);
                    }
                }
            }
            WatchEvent::Progress { .. } => {}
        }
    }
    Ok(Code::Ok)
}

fn line(revision: i64, event: &'static str, s: Summary, key: String, value: Option<serde_json::Value>) -> WatchLine {
    WatchLine { time_ms: now_ms(), revision, event, kind: s.kind, name: s.name, summary: s.text, key, value }
}

/// Prints one line; `false` once nobody reads the output any more.
fn print_line(format: Format, line: &WatchLine) -> anyhow::Result<bool> {
    let text = match format {
        Format::Table => {
            format!("{}  {:>8}  {:<9}  {}\n", units::clock(line.time_ms), line.revision, line.kind, line.summary)
        }
        Format::Json => serde_json::to_string(line)? + "\n",
        Format::Yaml => format!("---\n{}", serde_norway::to_string(line)?),
    };
    Ok(write_out(&text)?)
}
