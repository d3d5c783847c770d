//! `omctl events [--job ID] [-f]`: what happened to tasks (started, restarted, exited, preempted, lost, ...),
//! sorted by time; with `-f`, each new event as it is recorded.
//!
//! Events live in the task records ([`omega::events`]), so following them is watching the tasks range
//! (`omega::watcher::Watcher`, which resumes after broken streams and re-lists after compaction) and printing
//! what each changed record adds to what was printed of it: a coalesced repeat prints again with its count.

use crate::cell;
use crate::cli::{Cli, EventsArgs};
use crate::exit::{user, Code};
use crate::output::{emit, write_out, Format};
use crate::timeline::{self, EventRow, Printed};
use crate::units;
use omega::model::{now_ms, Job, Task};
use omega::store::{decode, Store, DEFAULT_PAGE_SIZE};
use omega::watcher::{Change, WatchEvent, Watcher};
use serde::Serialize;
use std::collections::HashSet;

/// `omctl events -o json`.
#[derive(Serialize)]
pub struct EventsOutput {
    pub revision: i64,
    /// Every event the tasks keep (and each placed task's placement), oldest first.
    pub events: Vec<EventRow>,
}

pub async fn run(cli: &Cli, args: &EventsArgs) -> anyhow::Result<Code> {
    if let Some(job) = &args.job {
        cell::check_job_id(job)?;
    }
    let store = crate::connect::connect(cli).await?;
    let keys = store.keys();
    let range = match &args.job {
        Some(job) => keys.tasks_of_job(job),
        None => keys.tasks_prefix(),
    };
    if args.follow {
        return follow(cli, store, range).await;
    }
    let read = cell::read(&store, &[range]).await?;
    if let Some(job) = &args.job {
        if read.snapshot.tasks.is_empty() && cell::get_at::<Job>(&store, &keys.job(job), read.revision).await?.is_none()
        {
            return Err(user(format!("job {job} not found; `omctl jobs` lists the jobs")));
        }
    }
    let tasks = cell::sorted(read.snapshot.tasks.values());
    let out = EventsOutput { revision: read.revision, events: timeline::of_tasks(tasks.iter().map(|t| &*t.value)) };
    emit(cli.output, &out, || {
        if out.events.is_empty() {
            "No events found.\n".into()
        } else {
            timeline::table(&out.events, now_ms())
        }
    })?;
    Ok(Code::Ok)
}

/// Prints the events the range's tasks keep now, then every new one as it is recorded, until Ctrl-C or
/// until nobody reads the output.
async fn follow(cli: &Cli, store: Store, range: String) -> anyhow::Result<Code> {
    let mut watcher = Watcher::new(store, range.clone(), DEFAULT_PAGE_SIZE);
    let mut printed = Printed::default();
    let mut listed = false;
    loop {
        let rows = match watcher.next().await {
            WatchEvent::Reset { kvs, revision } => {
                if !listed {
                    listed = true;
                    // On stderr, so stdout stays one event per line; also tells a script the stream is live.
                    eprintln!("following events under {range} from revision {}; Ctrl-C to stop", revision + 1);
                }
                // The first listing, or a re-listing after the watch fell behind a compaction: what it adds
                // to what was printed, oldest first.
                let keys: HashSet<Vec<u8>> = kvs.iter().map(|kv| kv.key().to_vec()).collect();
                printed.retain(&keys);
                let mut tasks: Vec<(Vec<u8>, Task)> =
                    kvs.iter().filter_map(|kv| Some((kv.key().to_vec(), decode::<Task>(kv).ok()?))).collect();
                tasks.sort_by(|a, b| a.1.job.cmp(&b.1.job).then(a.1.index.cmp(&b.1.index)));
                let mut rows: Vec<EventRow> = tasks.iter().flat_map(|(key, t)| printed.fresh(key, t)).collect();
                rows.sort_by_key(|r| r.at_ms);
                rows
            }
            WatchEvent::Changes { changes, .. } => {
                let mut rows = Vec::new();
                for change in changes {
                    match change {
                        Change::Put(kv) => {
                            // A record that does not decode is left out, as every reader of the cell leaves it.
                            if let Ok(task) = decode::<Task>(&kv) {
                                rows.extend(printed.fresh(kv.key(), &task));
                            }
                        }
                        Change::Delete { key, .. } => printed.forget(&key),
                    }
                }
                rows
            }
            WatchEvent::Progress { .. } => continue,
        };
        for row in &rows {
            if !print_row(cli.output, row)? {
                return Ok(Code::Ok);
            }
        }
    }
}

/// Prints one streamed event; `false` once nobody reads the output any more.
fn print_row(format: Format, row: &EventRow) -> anyhow::Result<bool> {
    let text = match format {
        Format::Table => {
            format!("{}  {:<12}  {:<11}  {}\n", units::clock(row.at_ms), row.task, row.kind, row.message_with_count())
        }
        Format::Json => serde_json::to_string(row)? + "\n",
        Format::Yaml => format!("---\n{}", serde_norway::to_string(row)?),
    };
    Ok(write_out(&text)?)
}
