//! `omctl submit` with input that must be refused, and with an etcd that fails it midway: bad files are
//! refused before etcd is needed, naming file:line:column and the limit; a full etcd is said plainly with the
//! commands that recover it; a submission that fails or dies midway leaves nothing half-written, and the next
//! one completes it.

mod omctl_support;

use omctl_support::*;
use omega::etcd_process::{free_port, EtcdOptions};
use omega::failpoint;
use omega::model::{Job, TaskState};
use omega::store::submission::{marker_key, FAILPOINT_AFTER_TASKS};
use omega::store::Store;
use omega_testkit::*;
use serde_json::Value;
use std::path::Path;

fn gang_file(name: &str, tasks: u32) -> String {
    format!("{}gang: true\n", batch_file(name, tasks, "100m"))
}

/// What `omctl jobs -o json` lists: job ids, and ids with tasks but no job record.
async fn listed(etcd: &str) -> (Vec<String>, Vec<(String, u64)>) {
    let json = omctl(etcd, &["jobs", "-o", "json"]).await.ok().json();
    let ids = json["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    let incomplete = json["incomplete_submissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["job"].as_str().unwrap().to_string(), s["tasks"].as_u64().unwrap()))
        .collect();
    (ids, incomplete)
}

/// The job record (if any) and how many task records `job` has in etcd now.
async fn stored(store: &Store, job: &str) -> (Option<Job>, usize) {
    let record = store.get_json::<Job>(&store.keys().job(job)).await.unwrap().map(|(j, _)| j);
    let (tasks, _) = store.list(&store.keys().tasks_of_job(job), 1000, None).await.unwrap();
    (record, tasks.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_job_files_are_refused_before_etcd_is_needed() {
    let nowhere = format!("http://127.0.0.1:{}", free_port().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let base = batch_file("bad", 1, "1");

    // 100,000 `[` in 200 KB: refused at once, at the bracket that goes one level too deep.
    let deep = write_file(dir.path(), "deep.yaml", &format!("{base}args: {}\n", "[ ".repeat(100_000)));
    for args in [vec!["submit", deep.as_str()], vec!["submit", "--dry-run", deep.as_str()]] {
        let run = omctl(&nowhere, &args).await;
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.stderr.contains(&format!("{deep}:6:69: the file nests deeper than 32 levels")), "{run:?}");
    }
    let deep = write_file(dir.path(), "block.yaml", &format!("{base}args:\n{}x\n", "- ".repeat(50_000)));
    let run = omctl(&nowhere, &["submit", &deep]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains(&format!("{deep}:7:")) && run.stderr.contains("deeper than 32 levels"), "{run:?}");
    let huge = write_file(dir.path(), "huge.yaml", &format!("{base}# {}\n", "x".repeat(5 << 20)));
    let run = omctl(&nowhere, &["submit", &huge]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("larger than 4194304 bytes"), "{run:?}");
    let run = omctl_with_input(&nowhere, &["submit", "-"], Some(&format!("{base}# {}\n", "x".repeat(5 << 20)))).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("<stdin>: larger than 4194304 bytes"), "{run:?}");

    // NUL and other control characters where no process could receive them.
    let nul = write_file(dir.path(), "nul.yaml", &format!("{base}env:\n  GREETING: \"hello\\0world\"\n"));
    let run = omctl(&nowhere, &["submit", &nul]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "{nul}:7:13: env.GREETING: the value \"hello\\0world\" contains NUL (U+0000) at character 6, which no \
             process can receive"
        )),
        "{run:?}"
    );
    let name = write_file(dir.path(), "name.yaml", &format!("{base}env:\n  \"A\\0B\": x\n"));
    let run = omctl(&nowhere, &["submit", "--dry-run", &name]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains(&format!("{name}:7:3: env: variable name \"A\\0B\" contains NUL")), "{run:?}");
    let escape = write_file(dir.path(), "esc.yaml", &format!("{base}env:\n  A: \"\\e[31m\"\n"));
    let run = omctl(&nowhere, &["submit", &escape]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("env.A: the value \"\\u{1b}[31m\" contains the control character U+001B"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_endpoints_are_user_errors_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "ok.yaml", &batch_file("ok", 1, "1"));
    // A connect timeout longer than a run may take: a retry loop would not finish in time.
    for (endpoint, says) in [
        ("http://127.0.0.1:99999", "has the port \"99999\", not a number from 0 to 65535"),
        ("ftp://127.0.0.1:2379", "has the scheme \"ftp\", not http or https"),
        ("http://", "names no host"),
    ] {
        for args in [vec!["jobs"], vec!["submit", file.as_str()], vec!["submit", "--dry-run", file.as_str()]] {
            let mut all = vec!["--connect-timeout", "120s"];
            all.extend(args);
            let run = omctl(endpoint, &all).await;
            assert_eq!(run.code, 1, "{endpoint} {all:?}: {run:?}");
            assert!(run.stderr.contains(&format!("--etcd: etcd endpoint {endpoint:?} {says}")), "{run:?}");
            assert!(!run.stderr.contains("stopped answering"), "{run:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_too_large_for_one_etcd_request_is_refused_by_dry_run_and_submit() {
    let (_etcd, store) = start_etcd().await;
    let etcd = endpoint(&store);
    let dir = tempfile::tempdir().unwrap();
    let base = batch_file("big", 2, "1");
    let file = write_file(dir.path(), "big.yaml", &format!("{base}env:\n  BLOB: {}\n", "x".repeat(1_600_000)));
    for args in [vec!["submit", "--dry-run", file.as_str()], vec!["submit", file.as_str()]] {
        let run = omctl(&etcd, &args).await;
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
        let said =
            format!("{file}:7:3: env.BLOB: the job would be stored as a 1.53 MiB record, more than fits one etcd");
        assert!(run.stderr.contains(&said), "{run:?}");
        assert!(run.stderr.contains("1.44 MiB: etcd's --max-request-bytes"), "{run:?}");
    }
    assert_eq!(listed(&etcd).await, (vec![], vec![]), "nothing was written");
    // Just under the budget, the real etcd takes it.
    let file = write_file(dir.path(), "fits.yaml", &format!("{base}env:\n  BLOB: {}\n", "x".repeat(1_400_000)));
    omctl(&etcd, &["submit", &file]).await.ok();
    assert_eq!(stored(&store, "big").await.1, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_etcd_is_said_plainly_with_the_commands_that_recover_it() {
    let (_etcd, store) =
        start_etcd_with(EtcdOptions { quota_backend_bytes: Some(8 << 20), ..Default::default() }).await;
    let etcd = endpoint(&store);
    fill_until_no_space(&store).await;
    for (job, extra) in [("whole", None), ("parts", Some("16"))] {
        let mut args = vec!["submit", "-"];
        if let Some(ops) = extra {
            args.extend(["--max-txn-ops", ops]);
        }
        let run = omctl_with_input(&etcd, &args, Some(&gang_file(job, 300))).await;
        assert_eq!(run.code, 6, "{run:?}");
        for said in [
            "etcd is out of space".to_string(),
            format!("job {job} was not submitted (nothing was written)"),
            format!("etcdctl --endpoints {etcd} compact "),
            "--physical".into(),
            format!("etcdctl --endpoints {etcd} defrag"),
            format!("etcdctl --endpoints {etcd} alarm disarm"),
        ] {
            assert!(run.stderr.contains(&said), "{said:?} in {run:?}");
        }
        assert!(!run.stderr.contains("stopped answering") && !run.stderr.contains("grpc"), "{run:?}");
        assert_eq!(stored(&store, job).await, (None, 0));
    }
    assert_eq!(listed(&etcd).await, (vec![], vec![]), "nothing half-written");
    let audit = omctl(&etcd, &["audit"]).await.ok();
    assert!(!audit.stdout.contains("no job record"), "{audit:?}");

    free_space(&store).await;
    omctl_with_input(&etcd, &["submit", "-", "--max-txn-ops", "16"], Some(&gang_file("parts", 300))).await.ok();
    assert_eq!(stored(&store, "parts").await.1, 300);
}

/// Starts `omctl submit` of a 300-task gang through `etcd`, in transactions of at most 16 operations, paused
/// between its tasks and its job record; returns once it is there.
async fn start_paused(etcd: &str, job: &str, fp_dir: &Path) -> tokio::process::Child {
    let mut child = omctl_command(etcd, &["submit", "-", "--max-txn-ops", "16"])
        .env(failpoint::ENV_POINTS, format!("{FAILPOINT_AFTER_TASKS}=pause"))
        .env(failpoint::ENV_DIR, fp_dir)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("start omctl");
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, gang_file(job, 300).as_bytes()).await.unwrap();
    drop(stdin);
    wait_for_failpoint(fp_dir, FAILPOINT_AFTER_TASKS).await;
    child
}

fn release(fp_dir: &Path) {
    std::fs::remove_file(failpoint::marker(fp_dir, FAILPOINT_AFTER_TASKS)).expect("release the failpoint");
}

async fn finish(child: tokio::process::Child) -> Run {
    let out = tokio::time::timeout(RUN_LIMIT, child.wait_with_output()).await.expect("omctl ends").unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_killed_midway_is_completed_by_the_next() {
    let (_etcd, store) = start_etcd().await;
    let etcd = endpoint(&store);
    let fp = tempfile::tempdir().unwrap();
    let mut child = start_paused(&etcd, "train", fp.path()).await;
    // Every task is written, the record is not: schedulers see nothing of the job.
    assert_eq!(stored(&store, "train").await, (None, 300));
    assert_eq!(listed(&etcd).await, (vec![], vec![("train".to_string(), 300)]));
    child.kill().await.unwrap();

    let audit = omctl(&etcd, &["audit"]).await.ok();
    assert!(audit.stdout.contains("300 tasks have no job record"), "{audit:?}");
    let run = omctl_with_input(&etcd, &["submit", "-"], Some(&gang_file("train", 300))).await.ok();
    assert!(run.stdout.contains("job train submitted: 300 tasks"), "{run:?}");
    let (job, tasks) = stored(&store, "train").await;
    assert!(job.is_some_and(|j| j.gang && j.tasks == 300));
    assert_eq!(tasks, 300);
    assert_eq!(listed(&etcd).await, (vec!["train".to_string()], vec![]));
    assert!(store.get_json::<Value>(&marker_key(store.keys(), "train")).await.unwrap().is_none());
    let json = omctl(&etcd, &["tasks", "--job", "train", "-o", "json"]).await.ok().json();
    let states: Vec<&Value> = json["tasks"].as_array().unwrap().iter().map(|t| &t["state"]).collect();
    assert!(states.len() == 300 && states.iter().all(|s| *s == TaskState::Pending.to_string().as_str()));
    omctl(&etcd, &["audit"]).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_failing_midway_deletes_what_it_wrote_and_says_so() {
    let (_etcd, store) =
        start_etcd_with(EtcdOptions { quota_backend_bytes: Some(8 << 20), ..Default::default() }).await;
    let etcd = endpoint(&store);
    let fp = tempfile::tempdir().unwrap();
    let child = start_paused(&etcd, "midway", fp.path()).await;
    assert_eq!(stored(&store, "midway").await, (None, 300));
    // etcd fills up before the job record is written.
    fill_until_no_space(&store).await;
    release(fp.path());
    let run = finish(child).await;
    assert_eq!(run.code, 6, "{run:?}");
    assert!(
        run.stderr.contains("job midway was not submitted (the 300 tasks it had written were deleted again"),
        "{run:?}"
    );
    assert!(run.stderr.contains("alarm disarm"), "{run:?}");
    assert_eq!(stored(&store, "midway").await, (None, 0));
    assert_eq!(listed(&etcd).await, (vec![], vec![]));
    assert!(store.orphan_tasks().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_etcd_midway_says_what_may_remain_and_a_retry_completes() {
    let (_etcd, store) = start_etcd().await;
    let proxy = Proxy::start(endpoint(&store)).await;
    let fp = tempfile::tempdir().unwrap();
    let child = start_paused(&proxy.endpoint(), "cut", fp.path()).await;
    proxy.cut();
    release(fp.path());
    let run = finish(child).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("job cut was not submitted ("), "{run:?}");
    assert!(run.stderr.contains("submitting the same job again"), "{run:?}");
    // Its tasks are still there (it could not delete them), but no job record: nothing a scheduler places.
    assert_eq!(stored(&store, "cut").await, (None, 300));

    proxy.restore();
    omctl_with_input(&proxy.endpoint(), &["submit", "-"], Some(&gang_file("cut", 300))).await.ok();
    let (job, tasks) = stored(&store, "cut").await;
    assert!(job.is_some() && tasks == 300);
    let (kvs, _) = store.list(&marker_key(store.keys(), ""), 10, None).await.unwrap();
    assert!(kvs.is_empty(), "no submission marker left");
}
