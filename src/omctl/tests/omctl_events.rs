//! Task events through the real omctl binary against a real etcd: `omctl events` (listed, by job, followed)
//! and the Events section of `omctl job`.

mod omctl_support;

use omctl_support::*;
use omega::cell_state::Versioned;
use omega::events::EventKind;
use omega::model::{Task, TaskState};
use omega::release::update_task;
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::*;
use serde_json::Value;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

const NODE: Resources = Resources::new(4000, 8 << 30);

/// Rewrites task `id` with `change` applied, as the component recording an event would (one guarded write).
async fn write_task(store: &Store, id: &str, change: impl FnOnce(&mut Task)) {
    let (seen, rev) = store.get_json::<Task>(&store.keys().task(id)).await.unwrap().expect("the task exists");
    let mut new = seen.clone();
    change(&mut new);
    update_task(store, &Versioned::new(seen, rev), &new).await.unwrap().expect("the task did not change meanwhile");
}

/// A batch job of `tasks` tasks submitted through omctl.
async fn submit(etcd: &str, name: &str, tasks: u32) {
    omctl_with_input(etcd, &["submit", "-"], Some(&batch_file(name, tasks, "1"))).await.ok();
}

fn events(json: &Value) -> Vec<(String, String, String, u64)> {
    json["events"]
        .as_array()
        .expect("an events array")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("task"), s("kind"), s("message"), e["count"].as_u64().unwrap_or(0))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_listed_by_job_and_shown_with_the_job() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 2, NODE).await;
    let etcd = endpoint(&store);
    submit(&etcd, "ev", 2).await;
    submit(&etcd, "other", 1).await;
    place(&store, &[("ev/0", &node_name(0))]).await;
    write_task(&store, "ev/0", |t| {
        t.state = TaskState::Running;
        t.record_event(EventKind::Started, format!("on {}, placement 1, run 0", node_name(0)), 1_000);
        for at in [2_000, 3_000, 4_000] {
            t.record_event(EventKind::Restarted, "after exit 1", at);
        }
    })
    .await;
    write_task(&store, "ev/1", |t| {
        t.record_event(EventKind::Rescheduled, "replacing a replica that ended lost", 1_500)
    })
    .await;
    write_task(&store, "other/0", |t| t.record_event(EventKind::Stopped, "cancelled", 2_500)).await;

    let json = omctl(&etcd, &["events", "--job", "ev", "-o", "json"]).await.ok().json();
    let on = format!("on {}, placement 1, run 0", node_name(0));
    let placed = format!("on {} by test/t-1 (placement 1)", node_name(0));
    let want = [
        ("ev/0", "placed", placed.as_str(), 1),
        ("ev/0", "started", on.as_str(), 1),
        ("ev/1", "rescheduled", "replacing a replica that ended lost", 1),
        ("ev/0", "restarted", "after exit 1", 3),
    ];
    assert_eq!(events(&json), want.map(|(t, k, m, c)| (t.into(), k.into(), m.into(), c)), "sorted by time: {json}");
    assert_eq!(json["events"][0]["synthesized"], true, "the placement is read from the task's fields");
    assert_eq!(json["events"][3]["first_ms"], 2_000);
    assert!(json["revision"].as_i64().unwrap() > 0);

    let all = omctl(&etcd, &["events", "-o", "json"]).await.ok().json();
    assert_eq!(events(&all).len(), 5, "every job's: {all}");
    assert!(events(&all).iter().any(|(t, k, _, _)| t == "other/0" && k == "stopped"), "{all}");

    let table = omctl(&etcd, &["events", "--job", "ev"]).await.ok();
    let header = table.stdout.lines().next().unwrap_or_default();
    assert!(header.starts_with("AGE") && header.contains("TASK") && header.ends_with("MESSAGE"), "{table:?}");
    assert!(table.stdout.contains("after exit 1 ×3 over 2s"), "{}", table.stdout);

    let describe = omctl(&etcd, &["job", "ev"]).await.ok();
    let section = describe.stdout.split("\nEvents:\n").nth(1).unwrap_or_else(|| panic!("{}", describe.stdout));
    let lines: Vec<&str> = section.lines().collect();
    assert!(lines[0].trim_start().starts_with("AGE") && lines[0].contains("EVENT"), "{section}");
    assert_eq!(lines.len(), 5, "newest last: {section}");
    assert!(lines[1].contains("ev/0") && lines[1].contains("placed") && lines[1].contains(&placed), "{section}");
    assert!(lines[4].contains("restarted") && lines[4].ends_with("after exit 1 ×3 over 2s"), "{section}");
    let described = omctl(&etcd, &["job", "ev", "-o", "json"]).await.ok().json();
    assert_eq!(events(&described), events(&json));

    let quiet = omctl(&etcd, &["job", "other"]).await.ok();
    assert!(quiet.stdout.contains("Events:\n") && quiet.stdout.contains("cancelled"), "{}", quiet.stdout);
    let missing = omctl(&etcd, &["events", "--job", "nope"]).await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("job nope not found"), "{missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_prints_each_new_event_once_as_it_is_recorded() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 1, NODE).await;
    let etcd = endpoint(&store);
    submit(&etcd, "fo", 1).await;
    submit(&etcd, "else", 1).await;
    place(&store, &[("fo/0", &node_name(0))]).await;

    let mut child = omctl_command(&etcd, &["events", "--job", "fo", "-f", "-o", "json"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start omctl events -f");
    wait_until_following(&mut child).await;
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let first = next_line(&mut lines).await;
    assert_eq!((first["task"].as_str(), first["kind"].as_str()), (Some("fo/0"), Some("placed")), "{first}");

    // Recorded while omctl follows: each prints once; a coalesced repeat prints again with its count; another
    // job's events and writes that add no event print nothing.
    write_task(&store, "fo/0", |t| {
        t.state = TaskState::Running;
        t.record_event(EventKind::Started, "on node-0, placement 1, run 0", omega::model::now_ms());
    })
    .await;
    write_task(&store, "else/0", |t| t.record_event(EventKind::Stopped, "cancelled", omega::model::now_ms())).await;
    write_task(&store, "fo/0", |t| t.updated_at_ms += 1).await;
    for _ in 0..2 {
        write_task(&store, "fo/0", |t| t.record_event(EventKind::Restarted, "after exit 1", omega::model::now_ms()))
            .await;
    }
    let seen: Vec<(String, String, u64)> =
        [next_line(&mut lines).await, next_line(&mut lines).await, next_line(&mut lines).await]
            .iter()
            .map(|l| {
                (l["task"].as_str().unwrap_or_default().into(), l["kind"].as_str().unwrap_or_default().into(), {
                    l["count"].as_u64().unwrap_or(0)
                })
            })
            .collect();
    let want = [("fo/0", "started", 1), ("fo/0", "restarted", 1), ("fo/0", "restarted", 2)];
    assert_eq!(seen, want.map(|(t, k, c)| (t.to_string(), k.to_string(), c)));
    child.kill().await.expect("stop omctl events -f");
}

/// Waits until `events -f` has listed its range (it says so on stderr), so later writes arrive as changes.
async fn wait_until_following(child: &mut tokio::process::Child) {
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr).lines();
    let line = tokio::time::timeout(RUN_LIMIT, lines.next_line())
        .await
        .expect("the stream starts")
        .expect("read stderr")
        .expect("a line on stderr");
    assert!(line.starts_with("following events under "), "{line}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
}

/// The next NDJSON line, within [`RUN_LIMIT`].
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(RUN_LIMIT, lines.next_line())
        .await
        .expect("an event line in time")
        .expect("read stdout")
        .expect("omctl events -f is still running");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"))
}
