//! Omega's monitoring, checked by Prometheus' own tool and against real processes:
//!
//! - `deploy/prometheus/prometheus.yml` and `rules.yml` pass `promtool check`, and `rules_test.yml` passes
//!   `promtool test rules`; every alert has a `for:`, a summary, and a runbook entry that README.md has;
//! - `deploy/grafana/omega.json` is a dashboard whose every query parses as PromQL;
//! - every component (a scheduler of each kind, the controller, a simulated-node agent) serves metrics that
//!   `promtool check metrics` accepts, and every metric name the rules and the dashboard use is one that those
//!   components, etcd or the rules themselves really produce, with the labels their selectors match on.
//!
//! promtool comes with Debian's `prometheus` package (`deploy/install-deps.sh`); without it these tests fail.

use omega::etcd_process::free_port;
use omega::model::{Job, JobKind, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::metrics::{metric, metric_where, scrape};
use omega_testkit::procs::Proc;
use omega_testkit::*;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The one lint the components are allowed: Prometheus wants durations in seconds, but the `metrics` crate's
/// counters are integers, so the schedulers count their time in microseconds (whole seconds would lose every
/// attempt shorter than one). The names say the unit; dashboards and rules divide by 1e6.
const ALLOWED_LINTS: &[&str] = &[
    r#"omega_scheduler_busy_microseconds_total use base unit "seconds" instead of "microseconds""#,
    r#"omega_scheduler_commit_microseconds_total use base unit "seconds" instead of "microseconds""#,
    r#"omega_scheduler_lock_wait_microseconds_total use base unit "seconds" instead of "microseconds""#,
    r#"omega_scheduler_time_microseconds_total use base unit "seconds" instead of "microseconds""#,
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Runs `promtool args` in the workspace (with `stdin` fed to it, if given). promtool missing is a failure
/// that says how to install it, never a skip.
fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): it comes with Debian's `prometheus` package; run ./deploy/install-deps.sh"
            )
        });
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).expect("write to promtool");
    }
    child.wait_with_output().expect("promtool's output")
}

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn promtool_ok(args: &[&str]) {
    let out = promtool(args, None);
    assert!(out.status.success(), "promtool {}: {}\n{}", args.join(" "), out.status, said(&out));
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    record: Option<String>,
    alert: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn rules() -> Vec<Rule> {
    let file: RuleFile = serde_norway::from_str(&read("deploy/prometheus/rules.yml")).expect("rules.yml parses");
    file.groups.into_iter().flat_map(|g| g.rules).collect()
}

/// Every query of the dashboard (panels and template variables), with the panel's title, Grafana's
/// variables replaced by what PromQL accepts.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = read("deploy/grafana/omega.json");
    let d: serde_json::Value = serde_json::from_str(&text).expect("omega.json parses as JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = format!("panel {:?} {}", p["title"].as_str().unwrap_or(""), t["refId"].as_str().unwrap_or(""));
            out.push((title, grafana_to_promql(t["expr"].as_str().expect("a target's expr"))));
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().expect("a variable's query");
            // label_values(METRIC, LABEL) is Grafana's, not PromQL: its metric is what must exist.
            let metric = q.strip_prefix("label_values(").and_then(|r| r.split(',').next()).expect("label_values");
            out.push((format!("variable {}", v["name"]), metric.trim().to_string()));
        }
    }
    out
}

fn grafana_to_promql(expr: &str) -> String {
    let e = expr
        .replace("$__rate_interval", "5m")
        .replace("$__range", "1h")
        .replace("$scheduler", ".*")
        .replace("$job", ".*");
    assert!(!e.contains('$'), "unknown Grafana variable in {expr:?}");
    e
}

/// The metric names a PromQL expression reads: identifiers that are Omega's, etcd's or recorded (with a colon),
/// outside strings.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut code = String::new();
    let mut in_string = false;
    for c in expr.chars() {
        if c == '"' {
            in_string = !in_string;
            code.push(' ');
        } else if !in_string {
            code.push(c);
        }
    }
    code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with(|c: char| c.is_ascii_alphabetic()))
        .filter(|w| w.starts_with("omega_") || w.starts_with("etcd_") || w.contains(':'))
        .map(str::to_string)
        .collect()
}

/// The selectors of a PromQL expression that name a metric and match on labels: `(metric, [label, ...])`,
/// e.g. `omega_job_replicas_healthy{job=~".*"}` gives `("omega_job_replicas_healthy", ["job"])`.
fn selectors_in(expr: &str) -> Vec<(String, Vec<String>)> {
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_string = |mut i: usize| {
        // At a quote: past the closing one (backslash escapes honoured).
        let quote = chars[i];
        i += 1;
        while i < chars.len() && chars[i] != quote {
            i += if chars[i] == '\\' && quote != '`' { 2 } else { 1 };
        }
        i + 1
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(i);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            if chars.get(i) != Some(&'{') {
                continue;
            }
            let mut labels = Vec::new();
            i += 1;
            while i < chars.len() && chars[i] != '}' {
                if matches!(chars[i], '"' | '\'' | '`') {
                    i = skip_string(i);
                } else if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
                    let start = i;
                    while i < chars.len() && ident(chars[i]) {
                        i += 1;
                    }
                    labels.push(chars[start..i].iter().collect());
                } else {
                    i += 1;
                }
            }
            out.push((name, labels));
        } else {
            i += 1;
        }
    }
    out
}

/// The metrics in a scrape (sample names: histograms' `_bucket`, `_sum`, `_count`), each with the label names
/// its samples carry.
fn series_served(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        // A sample line is itself a selector: `name{label="value",...} value`.
        let labels = selectors_in(line).into_iter().find(|(n, _)| n == name).map(|(_, l)| l).unwrap_or_default();
        out.entry(name.to_string()).or_default().extend(labels);
    }
    out
}

#[test]
fn selectors_and_names_are_read_from_promql_and_scrapes() {
    let expr = r#"sum by (scheduler) (rate(omega_a_total{scheduler=~"x,y}", reason!='a\'b'}[5m])) / on () omega_b
        + label_replace(etcd_c{instance="z"}, "to", "$1", `from`, "(.*)")"#;
    let found = selectors_in(expr);
    assert_eq!(
        found,
        [
            ("omega_a_total".into(), vec!["scheduler".to_string(), "reason".into()]),
            ("etcd_c".into(), vec!["instance".into()])
        ]
    );
    let names: Vec<String> = names_in(expr).into_iter().collect();
    assert_eq!(names, ["etcd_c", "omega_a_total", "omega_b"]);
    let scrape = "# HELP omega_a_total A\n# TYPE omega_a_total counter\nomega_a_total{scheduler=\"b\",reason=\"x\"} 3\nomega_b 1\n";
    let served = series_served(scrape);
    assert_eq!(served["omega_a_total"], ["reason".to_string(), "scheduler".into()].into());
    assert!(served["omega_b"].is_empty());
}

#[test]
fn prometheus_config_rules_and_rule_tests_pass_promtool() {
    promtool_ok(&["check", "config", "deploy/prometheus/prometheus.yml"]);
    promtool_ok(&["check", "rules", "deploy/prometheus/rules.yml"]);
    promtool_ok(&["test", "rules", "deploy/prometheus/rules_test.yml"]);

    // Every alert waits (`for:`), says what happened, and names its runbook entry, which README.md has.
    let readme = read("README.md");
    let monitoring = readme.split("\n## Monitoring").nth(1).expect("README.md has a Monitoring section");
    let monitoring = monitoring.split("\n## ").next().unwrap();
    let rules = rules();
    let alerts: Vec<&Rule> = rules.iter().filter(|r| r.alert.is_some()).collect();
    assert!(alerts.len() >= 9, "{} alerts", alerts.len());
    for r in alerts {
        let name = r.alert.as_deref().unwrap();
        assert!(r.for_.is_some(), "{name} has no for:");
        assert!(r.annotations.get("summary").is_some_and(|s| !s.is_empty()), "{name} has no summary");
        let description = r.annotations.get("description").map(String::as_str).unwrap_or("");
        assert!(
            description.contains(&format!("Runbook: README.md, Monitoring, {name}")),
            "{name}'s description names no runbook entry: {description:?}"
        );
        assert!(monitoring.contains(&format!("`{name}`")), "README.md's Monitoring section says nothing of {name}");
    }
}

#[test]
fn the_dashboard_is_grafana_json_and_every_query_parses() {
    let d: serde_json::Value = serde_json::from_str(&read("deploy/grafana/omega.json")).expect("omega.json parses");
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion {}", d["schemaVersion"]);
    let vars: BTreeMap<&str, &serde_json::Value> = d["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| (v["name"].as_str().expect("a variable's name"), v))
        .collect();
    assert_eq!(vars.get("datasource").map(|v| &v["type"]), Some(&"datasource".into()), "a datasource variable");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    for name in ["scheduler", "job"] {
        assert!(vars.get(name).is_some_and(|v| v["type"] == "query"), "a {name} variable");
    }

    let mut ids = BTreeSet::new();
    let mut rows = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().expect("a panel's title");
        assert!(ids.insert(p["id"].as_u64().expect("a panel's id")), "panel id {} twice", p["id"]);
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().expect("gridPos.x"), g["w"].as_u64().expect("gridPos.w"));
        assert!(x + w <= 24 && g["h"].as_u64().is_some() && g["y"].as_u64().is_some(), "{title}: gridPos {g}");
        if p["type"] == "row" {
            rows.push(title);
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: its datasource is the variable");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{title}: no query"));
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}: its query's datasource is the variable");
        }
    }
    assert_eq!(rows, ["Schedulers", "Services", "Agents and nodes", "etcd"]);

    // PromQL parses: each query as a recording rule, checked by promtool.
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in dashboard_queries().iter().enumerate() {
        file.push_str(&format!("      - record: dashboard:query_{i}\n        expr: {}\n", serde_json::json!(expr)));
    }
    let tmp = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
    std::fs::write(tmp.path(), &file).unwrap();
    let out = promtool(&["check", "rules", tmp.path().to_str().unwrap()], None);
    assert!(out.status.success(), "a dashboard query does not parse:\n{}\n{file}", said(&out));
}

fn metrics_addr() -> String {
    format!("127.0.0.1:{}", free_port().unwrap())
}

/// The body of a scrape, once the listener answers 200.
async fn metrics_body(addr: &str) -> String {
    wait_for(&format!("metrics on {addr}"), 60, async || {
        tokio::net::TcpStream::connect(addr).await.ok()?;
        let response = scrape(addr).await;
        let (head, body) = response.split_once("\r\n\r\n")?;
        // The status line's code (the version is the request's: HTTP/1.0, which `scrape` sends).
        (head.split(' ').nth(1) == Some("200")).then(|| body.to_string())
    })
    .await
}

async fn running_or_done(store: &Store, job: &str, n: usize) -> Option<()> {
    let (kvs, _) = store.list(&store.keys().tasks_of_job(job), 1000, None).await.ok()?;
    let placed = kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<omega::model::Task>(kv.value()).ok())
        .filter(|t| matches!(t.state, TaskState::Running | TaskState::Succeeded))
        .count();
    (placed == n).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_serves_metrics_promtool_accepts_and_the_rules_and_dashboard_use_only_real_ones() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let sched = |kind: &str, instance: &str, addr: &str, extra: &[&str]| {
        let mut args = vec!["--etcd", &ep, "--kind", kind, "--instance", instance, "--metrics-addr", addr];
        args.extend(extra);
        Proc::start("omega-scheduler", &args, &format!("monitoring-{instance}"))
    };
    let (batch, service, mono, controller, agent) =
        (metrics_addr(), metrics_addr(), metrics_addr(), metrics_addr(), metrics_addr());
    let _batch = sched("batch", "b-1", &batch, &[]);
    let _service = sched("service", "s-1", &service, &[]);
    // The monolithic baseline, locking too, so that the lock's metric is served and checked as well.
    let _mono = sched("monolithic", "m-1", &mono, &["--lock"]);
    // Compacting every second: etcd's size is published soon.
    let controller_args =
        ["--etcd", &ep, "--instance", "ctl-1", "--compact-every", "1s", "--metrics-addr", &controller];
    let _controller = Proc::start("omega-controller", &controller_args, "monitoring-controller");
    let agent_args = ["--etcd", &ep, "--simulate", "3", "--sim-prefix", "mon", "--sim-cpu", "4", "--sim-memory", "8Gi"];
    let _agent =
        Proc::start("omega-agent", &[&agent_args[..], &["--metrics-addr", &agent]].concat(), "monitoring-agent");
    // One more node, in a zone of its own and too small for any task here, that is lost later: the controller
    // serves the down-node and per-zone series (which OmegaNodesDown and OmegaZoneDisrupted read) only once a
    // node has gone down.
    let lost_args = ["--etcd", &ep, "--simulate", "1", "--sim-prefix", "lost", "--label", "zone=lost"];
    let tiny = ["--sim-cpu", "100m", "--sim-memory", "64Mi", "--lease-ttl", "2s"];
    let mut lost = Proc::start("omega-agent", &[&lost_args[..], &tiny[..]].concat(), "monitoring-lost-agent");

    // A little of everything, so that counters move: a batch job, a service, a job for the monolithic one.
    let small = Resources::new(500, 256 << 20);
    let mut crunch = Job::new("crunch", JobKind::Batch, 2, small);
    crunch.duration_ms = Some(500);
    let web = Job::new("web", JobKind::Service, 2, small);
    let mut legacy = Job::new("legacy", JobKind::Batch, 1, small);
    legacy.scheduler = "monolithic".into();
    legacy.duration_ms = Some(500);
    for job in [&crunch, &web, &legacy] {
        store.create_job(job, 128).await.unwrap();
    }
    for (job, n) in [("crunch", 2), ("web", 2), ("legacy", 1)] {
        wait_for(&format!("{job}'s tasks running"), 60, async || running_or_done(&store, job, n).await).await;
    }
    for (addr, n) in [(&batch, 2.0), (&service, 2.0), (&mono, 1.0)] {
        wait_for(&format!("the placements counted on {addr}"), 30, async || {
            (metric(&metrics_body(addr).await, "omega_scheduler_placements_total") >= n).then_some(())
        })
        .await;
    }
    wait_for("the controller to count web's replicas and publish etcd's size", 60, async || {
        let text = metrics_body(&controller).await;
        let ok = metric_where(&text, "omega_job_replicas_healthy", r#"job="web""#) == 2.0
            && metric(&text, "omega_controller_compactions_total") >= 1.0
            && metric(&text, "omega_etcd_db_size_bytes") > 0.0
            && metric(&text, "omega_controller_leader") == 1.0
            && metric(&text, "omega_controller_nodes") == 4.0;
        ok.then_some(())
    })
    .await;
    lost.kill();
    wait_for("the controller to count the lost node down, by zone", 60, async || {
        let text = metrics_body(&controller).await;
        let ok = metric(&text, "omega_controller_nodes_down") == 1.0
            && text.lines().any(|l| l.starts_with("omega_controller_zone_disrupted{") && l.contains(r#"zone="lost""#));
        ok.then_some(())
    })
    .await;

    // promtool's lint on each component's metrics.
    let mut served: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (component, addr) in [
        ("batch scheduler", &batch),
        ("service scheduler", &service),
        ("monolithic scheduler (--lock)", &mono),
        ("controller", &controller),
        ("agent", &agent),
    ] {
        let text = metrics_body(addr).await;
        for (name, labels) in series_served(&text) {
            served.entry(name).or_default().extend(labels);
        }
        let out = promtool(&["check", "metrics"], Some(&text));
        let report = said(&out);
        // 0: clean; 3: lint problems (listed); anything else: promtool could not read the text at all.
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "promtool check metrics on the {component}: {report}\n{text}"
        );
        for line in report.lines().filter(|l| !l.trim().is_empty()) {
            if !ALLOWED_LINTS.contains(&line.trim()) {
                problems.push(format!("{component}: {line}"));
            }
        }
    }
    assert!(problems.is_empty(), "promtool check metrics found problems:\n{}", problems.join("\n"));
    // Served from the start by every component (the rules' alerts rely on them).
    for name in ["omega_etcd_space_exceeded", "omega_agent_fencings_total", "omega_controller_rollouts_failed_total"] {
        assert!(served.contains_key(name), "{name} not served");
    }

    // Every name the rules and the dashboard read exists: served by a component or etcd, or recorded; and every
    // label a selector matches on is one that metric's samples carry (not a label Prometheus adds at the scrape:
    // none of the queries needs one).
    let etcd_metrics = metrics_body(ep.trim_start_matches("http://")).await;
    for (name, labels) in series_served(&etcd_metrics) {
        served.entry(name).or_default().extend(labels);
    }
    let rules = rules();
    let recorded: BTreeSet<String> = rules.iter().filter_map(|r| r.record.clone()).collect();
    let mut unknown = Vec::new();
    let queries = rules
        .iter()
        .map(|r| (format!("rule {}", r.record.as_ref().or(r.alert.as_ref()).unwrap()), r.expr.clone()))
        .chain(dashboard_queries().into_iter().map(|(what, expr)| (format!("dashboard {what}"), expr)));
    let mut checked = 0;
    for (what, expr) in queries {
        checked += 1;
        for name in names_in(&expr) {
            if !served.contains_key(&name) && !recorded.contains(&name) {
                unknown.push(format!("{what}: {name}"));
            }
        }
        for (name, labels) in selectors_in(&expr) {
            let Some(has) = served.get(&name) else { continue };
            for label in labels.iter().filter(|l| !has.contains(*l)) {
                unknown.push(format!("{what}: {name} has no label {label:?} (it has {has:?})"));
            }
        }
    }
    assert!(checked > 40, "{checked} queries");
    assert!(unknown.is_empty(), "metrics or labels that nothing serves or records:\n{}", unknown.join("\n"));
}
