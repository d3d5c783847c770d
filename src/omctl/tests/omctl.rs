//! `omctl`, the real binary, against a real etcd: every command, its JSON, and its error paths and exit codes.

mod omctl_support;

use etcd_client::PutOptions;
use omctl_support::*;
use omega::commit::{Claim, CommitConfig, CommitKind, Committer};
use omega::model::{
    Allocation, JobKind, JobOwner, JobStatus, SchedulerInstance, SchedulerKind, SchedulerStats, TaskState,
};
use omega::resources::Resources;
use omega::store::encode;
use omega_testkit::*;
use serde_json::Value;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const NODE: Resources = Resources::new(4000, 8 << 30);
const WEB: &str = "\
# three replicas in two zones
name: web
kind: service
priority: 100
replicas: 3
resources: {cpu: 500m, memory: 512Mi}
image: busybox
command: [sh, -c]
args: ['echo hi && sleep 3600']
constraints:
  - {label: zone, in: [zone-0, zone-1]}
spread: zone
anti_affinity: true
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_list_describe_tasks_and_nodes() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 3, NODE).await;
    let etcd = endpoint(&store);
    let dir = tempfile::tempdir().unwrap();
    let web = write_file(dir.path(), "web.yaml", WEB);

    let run = omctl(&etcd, &["submit", &web]).await.ok();
    assert!(run.stdout.contains("job web submitted: 3 tasks for scheduler service"), "{run:?}");
    // The same service file again is the same version: nothing is written.
    let again = omctl(&etcd, &["submit", &web]).await.ok();
    assert!(again.stdout.contains("job web: unchanged (version 0); nothing submitted"), "{again:?}");

    // Another job from stdin, placed in part by hand.
    omctl_with_input(&etcd, &["submit", "-"], Some(&batch_file("batch-a", 2, "1"))).await.ok();
    let again = omctl_with_input(&etcd, &["submit", "-"], Some(&batch_file("batch-a", 2, "1"))).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("job batch-a already exists and only services take new versions"), "{again:?}");
    place(&store, &[("batch-a/0", &node_name(1))]).await;

    let jobs = omctl(&etcd, &["jobs"]).await.ok();
    let lines: Vec<&str> = jobs.stdout.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("PENDING REASON"), "{jobs:?}");
    assert!(lines[1].starts_with("batch-a ") && lines[1].contains(" 1/2 "), "{jobs:?}");
    assert!(lines[2].starts_with("web ") && lines[2].contains(" 0/3 "), "{jobs:?}");
    assert!(lines[2].contains("no instance of scheduler service is running"), "{jobs:?}");

    let json = omctl(&etcd, &["jobs", "-o", "json"]).await.ok().json();
    let ids: Vec<&str> = json["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["batch-a", "web"]);
    let web_row = &json["jobs"][1];
    assert_eq!(web_row["kind"], "service");
    assert_eq!(web_row["priority"], 100);
    assert_eq!(web_row["state"], "pending");
    assert_eq!(web_row["tasks"]["total"], 3);
    assert_eq!(web_row["tasks"]["placed"], 0);
    assert_eq!(web_row["tasks"]["by_state"]["pending"], 3);
    assert!(json["revision"].as_i64().unwrap() > 0);
    let yaml = omctl(&etcd, &["jobs", "--state", "pending", "-o", "yaml"]).await.ok();
    let from_yaml: Value = serde_norway::from_str(&yaml.stdout).expect("jobs -o yaml parses");
    assert_eq!(from_yaml["jobs"].as_array().unwrap().len(), 2);

    let describe = omctl(&etcd, &["job", "web"]).await.ok();
    for expected in [
        "Job:",
        "service (no instance running)",
        "cpu 500m, memory 512Mi per task",
        "sh -c 'echo hi && sleep 3600'",
        "zone in (zone-0,zone-1)",
        "Anti-affinity:  yes",
        "always, unlimited restarts",
        "Scheduling status:",
        "TASK   STATE    NODE  PLACED BY  PLACEMENTS  REASON",
        "web/2  pending",
    ] {
        assert!(describe.stdout.contains(expected), "missing {expected:?} in:\n{}", describe.stdout);
    }
    let described = omctl(&etcd, &["job", "batch-a", "-o", "json"]).await.ok().json();
    assert_eq!(described["job"]["id"], "batch-a");
    assert_eq!(described["job"]["resources"]["cpu_millis"], 1000);
    assert_eq!(described["tasks"]["placed"], 1);
    assert_eq!(described["task_list"].as_array().unwrap().len(), 2);
    assert_eq!(described["task_list"][0]["state"], "assigned");
    assert_eq!(described["task_list"][0]["node"], node_name(1));
    assert_eq!(described["task_list"][0]["placed_by"], "test/t-1");
    assert!(described["status"].is_null());

    let tasks = omctl(&etcd, &["tasks"]).await.ok();
    let rows: Vec<&str> = tasks.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 5, "{tasks:?}");
    assert!(rows[0].starts_with("batch-a/0") && rows[0].contains("assigned") && rows[0].contains(&node_name(1)));
    let pending = omctl(&etcd, &["tasks", "--state", "pending", "-o", "json"]).await.ok().json();
    assert_eq!(pending["tasks"].as_array().unwrap().len(), 4);
    let on_node = omctl(&etcd, &["tasks", "--node", &node_name(1), "-o", "json"]).await.ok().json();
    assert_eq!(on_node["tasks"][0]["id"], "batch-a/0");
    let of_web = omctl(&etcd, &["tasks", "--job", "web", "--state", "assigned", "-o", "json"]).await.ok().json();
    assert!(of_web["tasks"].as_array().unwrap().is_empty());
    let none = omctl(&etcd, &["tasks", "--job", "nope"]).await;
    assert_eq!(none.code, 1, "{none:?}");
    assert!(none.stderr.contains("job nope not found"), "{none:?}");

    let nodes = omctl(&etcd, &["nodes"]).await.ok();
    let header = nodes.stdout.lines().next().unwrap();
    for column in ["NAME", "ALIVE", "SCHEDULABLE", "CPU", "MEMORY", "TASKS", "LABELS"] {
        assert!(header.contains(column), "{header}");
    }
    let node1 = nodes.stdout.lines().find(|l| l.starts_with(&node_name(1))).unwrap();
    assert!(node1.contains("1/4 (25%)") && node1.contains("1Gi/8Gi (13%)") && node1.contains("zone=zone-1"), "{node1}");
    // The endpoint from the environment works as well as --etcd.
    let out = Command::new(env!("CARGO_BIN_EXE_omctl"))
        .args(["nodes", "-o", "json"])
        .env("OMEGA_ETCD", &etcd)
        .env_remove("OMEGA_PREFIX")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(RUN_LIMIT, out).await.unwrap().unwrap();
    assert!(out.status.success());
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(json["nodes"][1]["alive"], true);
    assert_eq!(json["nodes"][1]["schedulable"], true);
    assert_eq!(json["nodes"][1]["used"]["cpu_millis"], 1000);
    assert_eq!(json["nodes"][1]["capacity"]["memory_bytes"], 8u64 << 30);
    assert_eq!(json["nodes"][1]["tasks"], 1);
    assert_eq!(json["total"]["tasks"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_plans_without_writing() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 6, NODE).await;
    let etcd = endpoint(&store);
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "zoned.yaml",
        "name: zoned\nkind: batch\ntasks: 5\nresources: {cpu: 3, memory: 1Gi}\nimage: busybox\n\
         constraints: [{label: zone, equals: zone-0}]\n",
    );
    let run = omctl(&etcd, &["submit", "--dry-run", &file]).await.ok();
    assert!(run.stdout.contains("# zoned: valid; nothing was written"), "{run:?}");
    assert!(run.stdout.contains("\nname: zoned\n") && run.stdout.contains("\ntasks: 5\n"), "{}", run.stdout);
    assert!(run.stdout.contains("2 nodes (2/6 nodes available: 4 constraint zone=zone-0)"), "{}", run.stdout);
    assert!(run.stdout.contains("2 of 5 tasks would be placed now"), "{}", run.stdout);

    let json = omctl(&etcd, &["submit", "--dry-run", &file, "-o", "json"]).await.ok().json();
    assert_eq!(json["dry_run"], true);
    assert_eq!(json["job"]["id"], "zoned");
    assert_eq!(json["nodes"], 6);
    assert_eq!(json["feasible_nodes"], 2);
    assert_eq!(json["reasons"]["constraint"], 4);
    assert_eq!(json["placeable_tasks"], 2);
    assert_eq!(json["already_exists"], false);
    assert!(json["unplaced_reason"].as_str().unwrap().contains("nodes available"), "{json}");
    let reparsed = omega::job_spec::parse_job("job_file", json["job_file"].as_str().unwrap()).expect("job_file parses");
    assert_eq!(reparsed.tasks, 5);

    let jobs = omctl(&etcd, &["jobs", "-o", "json"]).await.ok().json();
    assert!(jobs["jobs"].as_array().unwrap().is_empty(), "a dry run writes nothing: {jobs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_pending_tasks_and_frees_placed_ones() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 2, NODE).await;
    let etcd = endpoint(&store);
    omctl_with_input(&etcd, &["submit", "-"], Some(&batch_file("doomed", 4, "1"))).await.ok();
    omctl_with_input(&etcd, &["submit", "-"], Some(&batch_file("bystander", 1, "1"))).await.ok();
    place(&store, &[("doomed/0", &node_name(0)), ("doomed/1", &node_name(1)), ("bystander/0", &node_name(0))]).await;
    omctl(&etcd, &["audit"]).await.ok();

    let run = omctl(&etcd, &["cancel", "doomed", "-o", "json"]).await.ok();
    let json = run.json();
    assert_eq!(json["state"], "cancelled");
    assert_eq!(json["already_cancelled"], false);
    assert_eq!(json["killed_pending"], 2);
    assert_eq!(json["released"], 2);
    assert!(json["not_killed"].as_array().unwrap().is_empty());

    for i in 0..4 {
        let t = task(&store, &format!("doomed/{i}")).await;
        assert_eq!(t.state, TaskState::Killed, "{t:?}");
        assert_eq!(t.reason.as_deref(), Some("cancelled"));
    }
    let (ledger0, _) = store.get_json::<Allocation>(&store.keys().alloc(&node_name(0))).await.unwrap().unwrap();
    assert_eq!((ledger0.used, ledger0.tasks), (Resources::new(1000, 1 << 30), 1), "only the bystander is left");
    let (ledger1, _) = store.get_json::<Allocation>(&store.keys().alloc(&node_name(1))).await.unwrap().unwrap();
    assert_eq!((ledger1.used, ledger1.tasks), (Resources::ZERO, 0));
    assert!(store.get_json::<Value>(&store.keys().assignment(&node_name(1), "doomed/1")).await.unwrap().is_none());
    assert_eq!(task(&store, "bystander/0").await.state, TaskState::Assigned);
    let audit = omctl(&etcd, &["audit"]).await;
    assert_eq!(audit.code, 0, "the ledgers are exact after the cancel: {audit:?}");
    let jobs = omctl(&etcd, &["jobs", "--state", "cancelled", "-o", "json"]).await.ok().json();
    assert_eq!(jobs["jobs"][0]["id"], "doomed");

    // Idempotent.
    let again = omctl(&etcd, &["cancel", "doomed"]).await.ok();
    assert!(again.stdout.contains("already cancelled"), "{again:?}");
    assert!(again.stdout.contains("4 already finished"), "{again:?}");
    let missing = omctl(&etcd, &["cancel", "nope"]).await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("job nope not found"), "{missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_is_clean_then_reports_a_corrupted_ledger() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 2, NODE).await;
    let etcd = endpoint(&store);
    omctl_with_input(&etcd, &["submit", "-"], Some(&batch_file("a", 1, "1"))).await.ok();
    place(&store, &[("a/0", &node_name(0))]).await;
    let clean = omctl(&etcd, &["audit"]).await.ok();
    assert!(clean.stdout.contains("2 nodes, 1 jobs, 1 tasks (1 placed, 1 assignments)"), "{clean:?}");
    assert!(clean.stdout.contains("OK"), "{clean:?}");

    // A ledger that claims more than the tasks on its node hold.
    let key = store.keys().alloc(&node_name(1));
    let mut corrupt = Allocation::empty(&node_name(1), NODE);
    corrupt.add(Resources::new(500, 1 << 20));
    store.client().kv_client().put(key.as_str(), encode(&key, &corrupt).unwrap(), None).await.unwrap();

    let broken = omctl(&etcd, &["audit"]).await;
    assert_eq!(broken.code, 2, "{broken:?}");
    assert!(broken.stdout.contains("1 violation:"), "{broken:?}");
    assert!(broken.stdout.contains(&format!("node {}: ledger says 1 tasks", node_name(1))), "{broken:?}");
    let json = omctl(&etcd, &["audit", "-o", "json"]).await;
    assert_eq!(json.code, 2);
    let json = json.json();
    assert_eq!(json["ok"], false);
    assert_eq!(json["violations"][0]["kind"], "ledger_mismatch");
    assert_eq!(json["violations"][0]["node"], node_name(1));
    assert_eq!(json["placed_tasks"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_a_half_held_gang_and_a_job_missing_tasks() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 3, NODE).await;
    let etcd = endpoint(&store);
    let gang = "name: g\nkind: batch\ntasks: 3\ngang: true\nresources: {cpu: 1, memory: 1Gi}\nimage: busybox\n";
    omctl_with_input(&etcd, &["submit", "-"], Some(gang)).await.ok();
    omctl_with_input(&etcd, &["submit", "-"], Some(&batch_file("short", 3, "1"))).await.ok();
    omctl(&etcd, &["audit"]).await.ok();

    // Two of the gang's three tasks placed on their own (not as a gang), one left pending.
    place(&store, &[("g/0", &node_name(0)), ("g/1", &node_name(1))]).await;
    // A job record whose task was deleted behind its back.
    store.client().kv_client().delete(store.keys().task("short/1"), None).await.unwrap();

    let broken = omctl(&etcd, &["audit"]).await;
    assert_eq!(broken.code, 2, "{broken:?}");
    assert!(broken.stdout.contains("2 violations:"), "{broken:?}");
    assert!(
        broken
            .stdout
            .contains("gang job g: 2 tasks hold resources while 1 is pending; a gang is placed whole or not at all"),
        "{broken:?}"
    );
    assert!(broken.stdout.contains("job short: has 2 of its 3 tasks; missing short/1"), "{broken:?}");
    let json = omctl(&etcd, &["audit", "-o", "json"]).await;
    assert_eq!(json.code, 2);
    let kinds: Vec<String> =
        json.json()["violations"].as_array().unwrap().iter().map(|v| v["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["gang_split", "job_incomplete"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_changes_as_lines_and_ndjson() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 2, NODE).await;
    let etcd = endpoint(&store);

    // NDJSON of task changes: two created, then one placed.
    let mut child =
        omctl_command(&etcd, &["watch", "--prefix-kind", "tasks", "--count", "3", "--for", "30s", "-o", "json"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start omctl watch");
    wait_until_watching(&mut child).await;
    store.create_job(&batch_job("w", 2, Resources::new(1000, 1 << 30)), 128).await.unwrap();
    place(&store, &[("w/1", &node_name(0))]).await;
    let mut stdout = String::new();
    let mut pipe = child.stdout.take().unwrap();
    let status = tokio::time::timeout(RUN_LIMIT, async {
        pipe.read_to_string(&mut stdout).await.unwrap();
        child.wait().await.unwrap()
    })
    .await
    .expect("watch --count 3 ends after three changes");
    assert!(status.success());
    let lines: Vec<Value> =
        stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines.iter().all(|l| l["kind"] == "task" && l["event"] == "put"), "{stdout}");
    assert_eq!(lines[0]["summary"], "task w/0 created (pending)");
    assert_eq!(lines[2]["name"], "w/1");
    assert_eq!(lines[2]["value"]["state"], "assigned");
    assert_eq!(
        lines[2]["summary"].as_str().unwrap(),
        format!("task w/1 pending -> assigned on {} by test/t-1", node_name(0))
    );

    // Lines for people: a job submitted.
    let mut child = omctl_command(&etcd, &["watch", "--prefix-kind", "jobs", "--count", "1", "--for", "30s"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start omctl watch");
    wait_until_watching(&mut child).await;
    let mut job = batch_job("w2", 1, Resources::new(1000, 1 << 30));
    job.priority = 7;
    store.create_job(&job, 128).await.unwrap();
    let out = tokio::time::timeout(RUN_LIMIT, child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("job w2 submitted: batch, 1 tasks, priority 7, scheduler batch"), "{text}");

    // Bounded in time when nothing happens.
    let started = Instant::now();
    let quiet = omctl(&etcd, &["watch", "--prefix-kind", "schedulers", "--for", "1s"]).await.ok();
    assert!(quiet.stdout.is_empty(), "{quiet:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Waits until a watch has listed its range (it says so on stderr), so later writes arrive as changes.
async fn wait_until_watching(child: &mut tokio::process::Child) {
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr).lines();
    let line = tokio::time::timeout(RUN_LIMIT, lines.next_line())
        .await
        .expect("the watch starts")
        .expect("read stderr")
        .expect("a line on stderr");
    assert!(line.starts_with("watching "), "{line}");
    // Keep draining, so a later line on stderr never meets a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedulers_show_instances_owned_jobs_and_conflicts() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 1, NODE).await;
    let etcd = endpoint(&store);
    let empty = omctl(&etcd, &["schedulers"]).await.ok();
    assert!(empty.stdout.contains("No scheduler instances are running"), "{empty:?}");

    omctl_with_input(&etcd, &["submit", "-"], Some(&batch_file("huge", 2, "64"))).await.ok();
    // What scheduler instances write: their records (one publishing its counters, one of an older scheduler
    // that publishes none) and the job's owner (all on their lease), and the job's status.
    let lease = store.grant_lease(60).await.unwrap();
    let keys = store.keys().clone();
    let mut kv = store.client().kv_client();
    let started = omega::model::now_ms() - 100_000;
    let counted = SchedulerInstance {
        scheduler: "batch".into(),
        instance: "b-1".into(),
        kind: JobKind::Batch,
        scheduler_kind: Some(SchedulerKind::Batch),
        lock: None,
        started_ms: started,
        metrics: Some("127.0.0.1:9101".into()),
        stats: SchedulerStats {
            attempts: 50,
            transactions: 40,
            attempts_conflicted: 8,
            claims: 500,
            claims_conflicted: 20,
            placed: 480,
            busy_ms: 12_300,
            commit_ms: 4_500,
            first_attempt_wait_ms_sum: 900,
            first_attempts: 3,
            updated_ms: started + 100_000,
            ..Default::default()
        },
    };
    let uncounted = SchedulerInstance {
        instance: "b-2".into(),
        metrics: None,
        stats: Default::default(),
        started_ms: omega::model::now_ms(),
        ..counted.clone()
    };
    // A monolithic scheduler holding the cell lock, whose record `kind` says `batch` for older readers.
    let pessimistic = SchedulerInstance {
        scheduler: "monolithic".into(),
        instance: "m-1".into(),
        scheduler_kind: Some(SchedulerKind::Monolithic),
        lock: Some("cell".into()),
        stats: SchedulerStats { lock_wait_ms: 700, updated_ms: omega::model::now_ms(), ..Default::default() },
        ..uncounted.clone()
    };
    let owner = JobOwner { job: "huge".into(), scheduler: "batch".into(), instance: "b-2".into(), since_ms: 1 };
    let status = JobStatus {
        job: "huge".into(),
        pending: 2,
        reason: "0/1 nodes available: 1 insufficient cpu".into(),
        reasons: [("insufficient_cpu".to_string(), 1)].into(),
        attempts: 10,
        conflicts: 3,
        last_attempt_ms: omega::model::now_ms(),
        scheduler_instance: "batch/b-2".into(),
    };
    let with_lease = || Some(PutOptions::new().with_lease(lease));
    for instance in [&counted, &uncounted, &pessimistic] {
        let k = keys.scheduler(&instance.scheduler, &instance.instance);
        kv.put(k.as_str(), encode(&k, instance).unwrap(), with_lease()).await.unwrap();
    }
    let k = keys.owner("huge");
    kv.put(k.as_str(), encode(&k, &owner).unwrap(), with_lease()).await.unwrap();
    let k = keys.status("huge");
    kv.put(k.as_str(), encode(&k, &status).unwrap(), None).await.unwrap();

    let table = omctl(&etcd, &["schedulers"]).await.ok();
    let header = table.stdout.lines().next().unwrap();
    let counters = ["ATTEMPTS", "TRANSACTIONS", "CONFLICTED", "CONFLICT FRACTION", "PLACED", "CLAIMS (CONFLICTED)"];
    for column in counters.into_iter().chain(["BUSY", "COMMITTING"]) {
        assert!(header.contains(column), "{column} in {header}");
    }
    let row = table.stdout.lines().nth(1).expect("two instances");
    // The paper's conflict fraction: 8 conflicted of 40 transactions (of 50 attempts) is 8 per 32 successful ones.
    for expected in ["b-1", "127.0.0.1:9101", " 50 ", " 40 ", " 8 ", "0.25", "480", "500 (20)", "12.3s (12.3%)", "4.5s"]
    {
        assert!(row.contains(expected), "missing {expected:?} in {row:?}");
    }
    let row = table.stdout.lines().nth(2).expect("two instances");
    // No counters of its own: the sums of the statuses it wrote (3 conflicted of 10: 3 per 7 successful).
    for expected in ["b-2", "1 (huge)", " 10 ", " 3 ", "0.43"] {
        assert!(row.contains(expected), "missing {expected:?} in {row:?}");
    }
    assert!(table.stdout.contains("publish no counters of their own"), "{}", table.stdout);
    let row = table.stdout.lines().nth(3).expect("three instances");
    assert!(row.contains("m-1") && row.contains("monolithic (lock cell)"), "{row:?}");

    let json = omctl(&etcd, &["schedulers", "-o", "json"]).await.ok().json();
    let s = &json["schedulers"][0];
    assert_eq!(
        (s["scheduler"].as_str(), s["instance"].as_str(), s["kind"].as_str()),
        (Some("batch"), Some("b-1"), Some("batch"))
    );
    assert_eq!(s["counters_from"], "instance");
    assert_eq!(
        (s["attempts"].as_u64(), s["transactions"].as_u64(), s["conflicts"].as_u64()),
        (Some(50), Some(40), Some(8))
    );
    assert!((s["conflict_fraction"].as_f64().unwrap() - 0.25).abs() < 1e-9);
    assert_eq!(s["mean_first_attempt_wait_ms"].as_f64(), Some(300.0));
    assert!(s["lock"].is_null() && s["lock_wait_ms"].is_null());
    assert_eq!(
        (s["placed"].as_u64(), s["claims"].as_u64(), s["claims_conflicted"].as_u64()),
        (Some(480), Some(500), Some(20))
    );
    assert_eq!((s["busy_ms"].as_u64(), s["commit_ms"].as_u64()), (Some(12_300), Some(4_500)));
    assert!((s["busyness"].as_f64().unwrap() - 0.123).abs() < 1e-9);
    assert_eq!(s["metrics"], "127.0.0.1:9101");
    let s = &json["schedulers"][1];
    assert_eq!(s["counters_from"], "job_statuses");
    assert_eq!(s["jobs_owned"][0], "huge");
    assert_eq!((s["attempts"].as_u64(), s["conflicts"].as_u64(), s["statuses"].as_u64()), (Some(10), Some(3), Some(1)));
    assert!((s["conflict_fraction"].as_f64().unwrap() - 3.0 / 7.0).abs() < 1e-9);
    assert!(s["placed"].is_null() && s["busy_ms"].is_null() && s["transactions"].is_null());
    let s = &json["schedulers"][2];
    assert_eq!(
        (s["kind"].as_str(), s["lock"].as_str(), s["lock_wait_ms"].as_u64()),
        (Some("monolithic"), Some("cell"), Some(700))
    );
    let yaml = omctl(&etcd, &["schedulers", "-o", "yaml"]).await.ok();
    let from_yaml: Value = serde_norway::from_str(&yaml.stdout).expect("schedulers -o yaml parses");
    assert_eq!(from_yaml["schedulers"][0]["placed"], 480);
    assert_eq!(from_yaml["schedulers"][1]["counters_from"], "job_statuses");

    // The status shows in the job's listing and description.
    let jobs = omctl(&etcd, &["jobs", "-o", "json"]).await.ok().json();
    assert_eq!(jobs["jobs"][0]["pending_reason"], "0/1 nodes available: 1 insufficient cpu");
    assert_eq!(jobs["jobs"][0]["reasons"]["insufficient_cpu"], 1);
    assert_eq!(jobs["jobs"][0]["owner"], "batch/b-2");
    let describe = omctl(&etcd, &["job", "huge"]).await.ok();
    for expected in [
        "Pending reason:",
        "0/1 nodes available: 1 insufficient cpu",
        "insufficient_cpu=1",
        "Attempts:",
        "3 (30.0% of attempts)",
        "Written by:",
        "batch/b-2",
        "Owner:",
    ] {
        assert!(describe.stdout.contains(expected), "missing {expected:?} in:\n{}", describe.stdout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_both_sides_of_a_preemption() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 1, Resources::new(1000, 8 << 30)).await;
    let etcd = endpoint(&store);
    omctl_with_input(&etcd, &["submit", "-"], Some(&batch_file("low", 1, "1"))).await.ok();
    place(&store, &[("low/0", &node_name(0))]).await;
    let high = "name: high\nkind: service\npriority: 50\nreplicas: 1\nresources: {cpu: 1, memory: 1Gi}\nimage: x\n";
    omctl_with_input(&etcd, &["submit", "-"], Some(high)).await.ok();
    let snap = snapshot(&store).await;
    let claim = Claim::preempting(
        snap.tasks.get("high/0").unwrap().clone(),
        node_name(0),
        vec![snap.tasks.get("low/0").unwrap().clone()],
    );
    let report = Committer::new(store.clone(), CommitConfig::default())
        .commit(&snap, &[claim], CommitKind::Incremental)
        .await
        .unwrap();
    assert_eq!(report.committed(), 1, "{:?}", report.outcomes);

    let preemptor = omctl(&etcd, &["job", "high"]).await.ok();
    assert!(preemptor.stdout.contains("Preemptions:\n  high/0 preempted low/0"), "{}", preemptor.stdout);
    let victim = omctl(&etcd, &["job", "low"]).await.ok();
    assert!(victim.stdout.contains("low/0 (pending) was preempted by high/0"), "{}", victim.stdout);
    let json = omctl(&etcd, &["job", "low", "-o", "json"]).await.ok().json();
    assert_eq!(json["preemptions"]["evicted"][0]["task"], "low/0");
    // The eviction's write put it in the victim's timeline too.
    let last = json["events"].as_array().and_then(|e| e.last()).cloned().unwrap_or_default();
    assert_eq!((&last["kind"], &last["message"]), (&"preempted".into(), &"by high/0 (priority 50)".into()), "{json}");
    let json = omctl(&etcd, &["job", "high", "-o", "json"]).await.ok().json();
    assert_eq!(json["preemptions"]["evicted_others"][0]["victims"][0], "low/0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_reports_progress_or_times_out_with_the_reason() {
    let (_etcd, store) = start_etcd().await;
    seed_nodes(&store, 2, NODE).await;
    let etcd = endpoint(&store);

    // Nobody schedules: the wait times out (exit 4) and says why.
    let started = Instant::now();
    let run =
        omctl_with_input(&etcd, &["submit", "-", "--wait", "--timeout", "1s"], Some(&batch_file("stuck", 2, "1")))
            .await;
    assert_eq!(run.code, 4, "{run:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(run.stdout.contains("timed out after 1s: 2 of 2 tasks still pending"), "{run:?}");
    assert!(run.stdout.contains("no instance of scheduler batch is running"), "{run:?}");
    assert!(run.stderr.contains("stuck: 0/2 placed (2 pending)"), "progress: {run:?}");

    // A "scheduler" (this test) places the tasks while omctl waits.
    let mut child = omctl_command(&etcd, &["submit", "-", "--wait", "--timeout", "30s", "-o", "json"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("start omctl");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(batch_file("placed", 2, "1").as_bytes()).await.unwrap();
    drop(stdin);
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        let snap = snapshot(&store).await;
        if snap.tasks.contains_key("placed/0") && snap.tasks.contains_key("placed/1") {
            break;
        }
        assert!(Instant::now() < deadline, "omctl never submitted the job");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    place(&store, &[("placed/0", &node_name(0)), ("placed/1", &node_name(1))]).await;
    let out = tokio::time::timeout(RUN_LIMIT, child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["job"], "placed");
    assert_eq!(json["wait"]["done"], true);
    assert_eq!(json["wait"]["tasks"]["placed"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_is_wrong_with_their_exit_codes() {
    // Nothing listens on this port.
    let port = omega::etcd_process::free_port().unwrap();
    let nowhere = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();

    let started = Instant::now();
    let run = omctl(&nowhere, &["jobs"]).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(run.stderr.contains(&format!("cannot reach etcd at {nowhere}")), "{run:?}");
    assert!(run.stderr.contains("is it running?") && run.stderr.contains("etcd --data-dir"), "{run:?}");

    // Job files are checked before etcd is needed.
    let bad_yaml = write_file(dir.path(), "bad.yaml", "name: x\nkind: batch\ntasks: 2\n  resources: {cpu: 1}\n");
    let run = omctl(&nowhere, &["submit", &bad_yaml]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains(&format!("{bad_yaml}:4:")), "the line is named: {run:?}");
    let unknown = write_file(
        dir.path(),
        "unknown.yaml",
        "name: x\nkind: batch\nreplica: 2\nresources: {cpu: 1, memory: 1Gi}\nimage: busybox\n",
    );
    let run = omctl(&nowhere, &["submit", &unknown]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains(&format!("{unknown}:3:1: replica: unknown field")), "{run:?}");
    assert!(run.stderr.contains("did you mean `replicas`"), "{run:?}");
    let run = omctl(&nowhere, &["submit", &dir.path().join("missing.yaml").to_string_lossy()]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("cannot read job file"), "{run:?}");
    let run = omctl_with_input(&nowhere, &["submit", "-"], Some("name: x\nkind: cron\n")).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("<stdin>:2:"), "{run:?}");

    // Usage mistakes are user errors (1), not clap's 2, which means audit violations here.
    let run = omctl(&nowhere, &["frobnicate"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    let run = omctl(&nowhere, &["tasks", "--state", "sleeping"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    for command in ["submit", "jobs", "job", "tasks", "nodes", "cancel", "audit", "watch", "schedulers"] {
        let run = omctl(&nowhere, &[command, "--help"]).await.ok();
        assert!(run.stdout.contains("Usage: omctl"), "{command}: {run:?}");
    }

    // Against a live etcd: unknown ids.
    let (_etcd, store) = start_etcd().await;
    let etcd = endpoint(&store);
    let run = omctl(&etcd, &["job", "nope"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("job nope not found"), "{run:?}");
    let run = omctl(&etcd, &["jobs"]).await.ok();
    assert!(run.stdout.contains("No jobs"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_placements_and_moves_services_away() {
    let (_etcd, store) = start_etcd().await;
    let etcd = endpoint(&store);
    seed_nodes(&store, 2, Resources::new(4000, 8 << 30)).await;
    let svc = omega::model::Job::new("svc", omega::model::JobKind::Service, 2, Resources::new(500, 1 << 28));
    store.create_job(&svc, 128).await.unwrap();
    store.create_job(&batch_job("crunch", 1, Resources::new(500, 1 << 28)), 128).await.unwrap();
    let (n0, n1) = (node_name(0), node_name(1));
    place(&store, &[("svc/0", n0.as_str()), ("svc/1", n1.as_str()), ("crunch/0", n0.as_str())]).await;

    let out = omctl(&etcd, &["drain", &n0, "--force", "-o", "json"]).await.ok().json();
    assert_eq!(out["schedulable"], false);
    assert_eq!(out["moved"], serde_json::json!(["svc/0"]));
    assert_eq!(out["left_running"], serde_json::json!(["crunch/0"]));
    let moved = task(&store, "svc/0").await;
    assert_eq!(moved.state, TaskState::Pending);
    assert!(moved.reason.unwrap().contains("drained"));
    assert_eq!(task(&store, "svc/1").await.state, TaskState::Assigned, "other nodes untouched");
    assert_eq!(task(&store, "crunch/0").await.state, TaskState::Assigned, "batch work left to finish");
    let snap = snapshot(&store).await;
    assert!(!snap.is_schedulable(&n0), "no new placements on a drained node");
    assert!(omctl(&etcd, &["nodes"]).await.ok().stdout.lines().any(|l| l.starts_with(&n0) && l.contains("no")));
    assert_eq!(omctl(&etcd, &["audit"]).await.code, 0);

    let out = omctl(&etcd, &["drain", &n0, "--undo"]).await.ok();
    assert!(out.stdout.contains("schedulable again"), "{out:?}");
    assert!(snapshot(&store).await.is_schedulable(&n0));
    assert_eq!(omctl(&etcd, &["drain", "no-such-node"]).await.code, 1);
}
