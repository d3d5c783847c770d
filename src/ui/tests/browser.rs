//! The UI in a real headless browser (Debian's chromium through chromedriver) against a real cell: etcd,
//! a batch and a service scheduler, the controller and simulated nodes in three zones, each a process.
//!
//! It checks what a person would: every page loads; the heat-map shows every zone; a job submitted while the
//! Jobs page is open appears on it without a reload (the page's server-sent events); a job that cannot fit
//! shows why, on the Jobs page's "pending work and why" and on its own page; a job's command is shown as the
//! text it is, not as markup. On the way it saves a screenshot of each page to `deploy/ui/screenshots/`,
//! which the README shows.
//!
//! Needs the workspace's binaries built (`cargo build --workspace --bins`), etcd, chromium and chromedriver.

mod support;

use omega::model::{Job, JobKind};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::procs::Proc;
use omega_testkit::*;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Instant;
use support::http;
use support::webdriver::{Driver, Session};

const GI: u64 = 1 << 30;

/// Where the screenshots go: `$OMEGA_UI_SCREENSHOTS` (the README's are made with
/// `OMEGA_UI_SCREENSHOTS=deploy/ui/screenshots`), else the target directory's scratch space, so that a test
/// run does not rewrite files the repository tracks.
fn screenshots() -> PathBuf {
    let dir = match std::env::var_os("OMEGA_UI_SCREENSHOTS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"),
    };
    std::fs::create_dir_all(&dir).expect("the screenshot directory");
    dir
}

/// A job of `tasks` tasks asking `cpu_millis` and `memory` each, that simulated nodes run for ten minutes.
fn job(id: &str, kind: JobKind, tasks: u32, cpu_millis: u64, memory: u64) -> Job {
    let mut j = Job::new(id, kind, tasks, Resources::new(cpu_millis, memory));
    j.image = "omega.local/busybox:latest".into();
    j.command = vec!["sh".into(), "-c".into(), "echo serving; sleep 600".into()];
    if kind == JobKind::Batch {
        j.duration_ms = Some(600_000);
    }
    j
}

/// Waits until `script` (run in the page) returns something other than null/false, and returns it.
async fn until(session: &Session, what: &str, script: &str) -> Value {
    wait_for(what, 60, async || {
        let v = session.eval(script).await;
        (!v.is_null() && v != Value::Bool(false)).then_some(v)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_in_a_browser_against_a_real_cell() {
    let started = Instant::now();
    let (_etcd, store) = start_etcd().await;
    let ep = _etcd.endpoints().join(",");
    let _nodes = Proc::start(
        "omega-agent",
        &[
            "--etcd",
            &ep,
            "--simulate",
            "12",
            "--sim-prefix",
            "node",
            "--sim-zones",
            "3",
            "--sim-cpu",
            "4",
            "--sim-memory",
            "8Gi",
        ],
        "ui-nodes",
    );
    let _batch =
        Proc::start("omega-scheduler", &["--etcd", &ep, "--kind", "batch", "--instance", "batch-1"], "ui-batch");
    let _service =
        Proc::start("omega-scheduler", &["--etcd", &ep, "--kind", "service", "--instance", "service-1"], "ui-service");
    let _ctl = Proc::start("omega-controller", &["--etcd", &ep, "--instance", "ctl-1"], "ui-ctl");
    let port = omega::etcd_process::free_port().expect("a free port for the UI");
    let ui_addr = format!("127.0.0.1:{port}");
    let ui = Proc::start("omega-ui", &["--etcd", &ep, "--listen", &ui_addr], "ui");
    wait_for("the UI to answer", 60, async || {
        http::get(&ui_addr, "/healthz").await.ok().filter(|r| r.status == 200).map(|_| ())
    })
    .await;
    wait_for("12 simulated nodes alive", 60, async || {
        (store.count(&store.keys().live("")).await.ok()? == 12).then_some(())
    })
    .await;

    // Work for the cell: a service, a batch job, a job that fits nowhere, and a command full of markup.
    submit(&store, &job("web", JobKind::Service, 3, 500, GI)).await;
    submit(&store, &job("crunch", JobKind::Batch, 8, 1000, 2 * GI)).await;
    submit(&store, &job("too-big", JobKind::Batch, 2, 1000, 64 * GI)).await;
    let mut markup = job("markup", JobKind::Batch, 1, 100, GI / 4);
    markup.command = vec!["echo".into(), "<b>not bold</b><script>window.__pwned=1</script>".into()];
    submit(&store, &markup).await;

    let driver = Driver::start();
    wait_for("chromedriver to answer", 60, async || {
        http::get(&driver.addr, "/status").await.ok().filter(|r| r.status == 200).map(|_| ())
    })
    .await;
    let session = driver.session().await;
    let url = |path: &str| format!("http://{ui_addr}{path}");

    // Cell: every zone on the heat-map, each with its four nodes.
    session.goto(&url("/")).await;
    let zones = until(
        &session,
        "the heat-map to show three zones of four nodes",
        "var z = Array.from(document.querySelectorAll('.zone[data-zone]'));\
         var ok = z.length === 3 && z.every(e => e.querySelectorAll('svg.heatmap rect').length === 4);\
         return ok ? z.map(e => e.dataset.zone) : null;",
    )
    .await;
    assert_eq!(zones, serde_json::json!(["zone-0", "zone-1", "zone-2"]));
    until(
        &session,
        "the crunch job's cpu on the map",
        "return document.querySelector('.totals') && !document.body.innerText.includes('0 of 48 cores')",
    )
    .await;
    session.screenshot(&screenshots().join("cell.png")).await;

    // Jobs: the job that cannot fit is explained, grouped by its reason code.
    session.goto(&url("/jobs")).await;
    until(
        &session,
        "insufficient memory among the pending reasons",
        "return document.querySelector('[data-reason=\"insufficient_memory\"]') !== null",
    )
    .await;
    // A job submitted now shows up without a reload: the marker set on this document survives.
    session.eval("window.__marker = 'this document'; return true").await;
    submit(&store, &job("arrives-live", JobKind::Service, 1, 100, GI / 4)).await;
    until(
        &session,
        "the new job on the open Jobs page",
        "return document.querySelector('a[href=\"/jobs/arrives-live\"]') !== null",
    )
    .await;
    let same = session.eval("return [window.__marker, Number(document.body.dataset.updates || 0)]").await;
    assert_eq!(same[0], "this document", "the page was reloaded instead of updated");
    assert!(same[1].as_u64().unwrap_or(0) >= 1, "no server-sent update reached the page: {same}");
    session.screenshot(&screenshots().join("jobs.png")).await;

    // The pending job's own page says why.
    session.goto(&url("/jobs/too-big")).await;
    let reason = until(&session, "too-big's pending reason", "var e = document.getElementById('pending-reason'); return e && e.innerText.includes('insufficient memory') ? e.innerText : null").await;
    assert!(reason.as_str().unwrap_or("").contains("0/12 nodes"), "{reason}");
    session.screenshot(&screenshots().join("job-pending.png")).await;

    // A job's command is text: shown as written, never run as markup.
    session.goto(&url("/jobs/markup")).await;
    let shown = until(
        &session,
        "the markup job's command",
        "var c = document.querySelector('code'); return c ? c.innerText : null",
    )
    .await;
    assert!(shown.as_str().unwrap_or("").contains("<b>not bold</b><script>"), "{shown}");
    assert_eq!(
        session
            .eval("return [document.querySelectorAll('main b, main script').length, window.__pwned === undefined]")
            .await,
        serde_json::json!([0, true])
    );

    // A running service: its waterfall reaches running, and its versions are listed.
    session.goto(&url("/jobs/web")).await;
    until(&session, "web running 3/3 on its page", "return Array.from(document.querySelectorAll('.waterfall tr')).some(r => r.innerText.startsWith('running') && r.innerText.includes('3/3'))").await;
    until(&session, "web's versions", "return document.querySelector('table.versions') !== null").await;
    session.screenshot(&screenshots().join("job.png")).await;

    // Schedulers: both instances, with charts of their counters over time.
    session.goto(&url("/schedulers")).await;
    until(
        &session,
        "both scheduler instances, with charts of five samples or more",
        "var h = Array.from(document.querySelectorAll('h2.instance')).map(e => e.dataset.instance);\
         var long = Array.from(document.querySelectorAll('.chart polyline')).filter(p => p.getAttribute('points').split(' ').length >= 5);\
         return h.includes('batch/batch-1') && h.includes('service/service-1') && long.length >= 2",
    )
    .await;
    session.screenshot(&screenshots().join("schedulers.png")).await;

    // Node: one running part of crunch, with its ledger and its liveness as the UI saw it.
    let node = wait_for("a node running a task of crunch", 60, async || {
        let (kvs, _) = store.list(&store.keys().tasks_of_job("crunch"), 100, None).await.ok()?;
        kvs.iter()
            .filter_map(|kv| serde_json::from_slice::<omega::model::Task>(kv.value()).ok())
            .find(|t| t.state.holds_resources())
            .and_then(|t| t.node)
    })
    .await;
    session.goto(&url(&format!("/nodes/{node}"))).await;
    until(
        &session,
        "the node alive, holding a crunch task",
        "var l = document.getElementById('liveness'); return l && l.innerText === 'alive' && document.body.innerText.includes('crunch/')",
    )
    .await;
    session.screenshot(&screenshots().join("node.png")).await;
    session.close().await;
    drop(driver);
    drop(ui);
    eprintln!("browser test: {:.1}s", started.elapsed().as_secs_f64());
}

async fn submit(store: &Store, job: &Job) {
    store.create_job(job, 128).await.unwrap_or_else(|e| panic!("submit {}: {e}", job.id));
}
