//! Eviction storms, with real processes: when many nodes lapse at once (etcd paused, a zone's host gone), the
//! controller holds back or slows down releasing their tasks, and says so in its metrics; a node that dies
//! alone is still released after its grace.

mod support;

use omega::audit;
use omega::model::{Job, JobKind, Task, TaskState};
use omega::resources::Resources;
use omega::store::Store;
use omega_testkit::metrics::{metric, metric_where, scrape};
use omega_testkit::procs::Proc;
use omega_testkit::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::{metrics_addr, scrape_when_up, tasks};

/// The simulated nodes' lease TTL.
const TTL: Duration = Duration::from_secs(3);

/// A process hosting `nodes` simulated nodes `<prefix>-000..` (4 CPU, 8 GiB each), all in `zone`, under one
/// shared lease of [`TTL`].
fn host(etcd: &str, prefix: &str, nodes: usize, zone: &str) -> Proc {
    let (n, ttl, label) = (nodes.to_string(), format!("{}s", TTL.as_secs()), format!("zone={zone}"));
    let args = ["--etcd", etcd, "--simulate", &n, "--sim-prefix", prefix, "--lease-ttl", &ttl, "--label", &label];
    Proc::start("omega-agent", &[&args[..], &["--sim-cpu", "4", "--sim-memory", "8Gi"]].concat(), prefix)
}

/// A controller replica with leadership lease `lease`, a short grace, the disruption window at the nodes'
/// lease TTL, serving metrics on `metrics`; `extra` flags on top.
fn controller(etcd: &str, name: &str, lease: &str, metrics: &str, extra: &[&str]) -> Proc {
    let window = format!("{}s", TTL.as_secs());
    let mut args = vec!["--etcd", etcd, "--instance", name, "--lease-ttl", lease, "--grace", "500ms"];
    args.extend(["--disruption-window", &window, "--metrics-addr", metrics]);
    args.extend(extra);
    Proc::start("omega-controller", &args, name)
}

/// A service scheduler instance `name` (also its log's name: unique per test, as tests run in parallel).
fn service_scheduler(etcd: &str, name: &str) -> Proc {
    Proc::start("omega-scheduler", &["--etcd", etcd, "--kind", "service", "--instance", name], name)
}

/// Live nodes and the lease each liveness key is bound to.
async fn live(store: &Store) -> BTreeMap<String, i64> {
    let prefix = format!("{}cell/live/", store.keys().prefix());
    let Ok((kvs, _)) = store.list(&prefix, 1000, None).await else { return BTreeMap::new() };
    kvs.iter().map(|kv| (kv.key_str().unwrap_or("").trim_start_matches(&prefix).to_string(), kv.lease())).collect()
}

/// A service of `n` replicas, one per node (anti-affinity), placed and running.
async fn one_replica_per_node(store: &Store, id: &str, n: u32) -> Vec<Task> {
    let mut web = Job::new(id, JobKind::Service, n, Resources::new(1000, 1 << 30));
    web.anti_affinity = true;
    store.create_job(&web, 128).await.unwrap();
    wait_for(&format!("{n} replicas running"), 60, async || {
        let ts = tasks(store, id).await;
        (ts.iter().filter(|t| t.state == TaskState::Running).count() == n as usize).then_some(ts)
    })
    .await
}

/// Each task's node and placement count: what a release or a re-placement would change.
fn placements(ts: &[Task]) -> BTreeMap<String, (Option<String>, u32)> {
    ts.iter().map(|t| (t.id.clone(), (t.node.clone(), t.placements))).collect()
}

/// The controller's metrics, once `check` holds for them.
async fn metrics_when(addr: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    scrape_when_up(addr).await;
    wait_for(what, 60, async || {
        let text = scrape(addr).await;
        check(&text).then_some(text)
    })
    .await
}

/// etcd frozen for twice the nodes' lease TTL: every lease lapses at once. First with the node host frozen
/// too until the controller has seen the whole cell down past its grace (so the storm is certain to be seen):
/// it holds every eviction, and the nodes come back with their tasks. Then etcd alone, as it happens: the
/// nodes re-register under new leases, and again no task moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_paused_past_every_lease_moves_no_task() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let nodes = 12;
    let host = host(&ep, "p", nodes, "zone-a");
    let _service = service_scheduler(&ep, "svc-pause");
    let m = metrics_addr();
    // Its leadership lapses with everything else (and a new leadership finds the nodes down).
    let ctl = controller(&ep, "ctl-pause", "2s", &m, &[]);
    wait_for("12 nodes alive", 30, async || (live(&store).await.len() == nodes).then_some(())).await;
    let before = placements(&one_replica_per_node(&store, "web", nodes as u32).await);

    for round in ["with the node host frozen until the controller holds", "etcd alone"] {
        let leases = live(&store).await;
        let text = scrape_when_up(&m).await;
        let (held0, evicted0) =
            (metric(&text, "omega_controller_evictions_held_total"), metric(&text, "omega_controller_evictions_total"));
        let frozen_host = round.starts_with("with");
        etcd.pause().unwrap();
        if frozen_host {
            host.signal("-STOP");
        }
        // The fault itself lasts this long; nothing is waited for here.
        tokio::time::sleep(2 * TTL).await;
        etcd.resume().unwrap();
        if frozen_host {
            let text = metrics_when(&m, "the controller to hold every node", |t| {
                metric(t, "omega_controller_nodes_held") == nodes as f64
            })
            .await;
            assert_eq!(metric(&text, "omega_controller_cell_disrupted"), 1.0);
            assert_eq!(metric(&text, "omega_controller_evictions_total"), evicted0, "nothing released while held");
            assert_eq!(placements(&tasks(&store, "web").await), before);
            eprintln!("{round}: {nodes} nodes lapsed together; the controller held all {nodes} (cell disrupted)");
            host.signal("-CONT");
        }
        let agents_resumed = Instant::now();
        // Back: every node alive again under a new lease (so the old ones did lapse).
        wait_for("every node back under a new lease", 60, async || {
            let now = live(&store).await;
            (now.len() == nodes && now.iter().all(|(n, l)| leases.get(n) != Some(l))).then_some(())
        })
        .await;
        let took = agents_resumed.elapsed();
        let text = metrics_when(&m, "the controller to hold nothing", |t| {
            metric(t, "omega_controller_nodes_held") == 0.0 && metric(t, "omega_controller_cell_disrupted") == 0.0
        })
        .await;
        eprintln!(
            "{round}: all {nodes} nodes back {took:?} after their agents could renew again; held {} node(s), evicted {}",
            metric(&text, "omega_controller_evictions_held_total") - held0,
            metric(&text, "omega_controller_evictions_total") - evicted0,
        );
        assert_eq!(metric(&text, "omega_controller_evictions_total"), evicted0, "no node's tasks released");
        let after = wait_for("every replica running", 60, async || {
            let ts = tasks(&store, "web").await;
            ts.iter().all(|t| t.state == TaskState::Running).then_some(ts)
        })
        .await;
        assert_eq!(placements(&after), before, "no replica moved or was placed again ({round})");
        let report = audit::audit(&store).await.unwrap();
        assert!(report.is_ok(), "{:#?}", report.violations);
        assert_eq!(report.placed_tasks, nodes);
    }
    // Said once per state change, not per node or pass: within one leadership (the controller's own lease
    // lapsed too), a disruption is not said again before it was said to be over.
    let log = ctl.log();
    let mut said = Vec::new();
    for line in log.lines() {
        for what in ["leading the cell", "cell disrupted", "cell disruption over"] {
            if line.contains(what) {
                said.push(what);
            }
        }
    }
    assert!(said.contains(&"cell disrupted") && said.contains(&"cell disruption over"), "{said:?}");
    assert!(!said.windows(2).any(|w| w[0] == w[1] && w[0] != "leading the cell"), "{said:?}");
}

/// One node dies alone in a healthy cell: released after its grace. Then a whole zone's host dies (4 of 12
/// nodes: the zone disrupted, the cell not): its nodes are held, then released one at a time at the
/// disrupted-zone rate, and the metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_lapsing_at_once_is_released_at_its_rate_and_a_lone_node_at_once() {
    let (etcd, store) = start_etcd().await;
    let ep = etcd.endpoint();
    let _a = host(&ep, "a", 4, "a");
    let mut b = host(&ep, "b", 4, "b");
    let _c = host(&ep, "c", 4, "c");
    let mut solo = host(&ep, "solo", 1, "a");
    let _service = service_scheduler(&ep, "svc-zones");
    let m = metrics_addr();
    let ctl = controller(&ep, "ctl-zones", "10s", &m, &["--disrupted-zone-eviction-rate", "0.5"]);
    wait_for("13 nodes alive", 30, async || (live(&store).await.len() == 13).then_some(())).await;
    let placed = one_replica_per_node(&store, "web", 13).await;
    // Tasks placed on the nodes named `prefix*` (a released task keeps its last node, but holds nothing there).
    let on = |ts: &[Task], prefix: &str| -> Vec<String> {
        let placed_there =
            |t: &&Task| t.state.holds_resources() && t.node.as_deref().is_some_and(|n| n.starts_with(prefix));
        ts.iter().filter(placed_there).map(|t| t.id.clone()).collect()
    };
    assert_eq!(on(&placed, "solo-").len(), 1);
    assert_eq!(on(&placed, "b-").len(), 4);

    // The lone node: released after its grace, nothing held.
    solo.kill();
    let killed = Instant::now();
    wait_for("solo's replica released", 60, async || on(&tasks(&store, "web").await, "solo-").is_empty().then_some(()))
        .await;
    eprintln!("lone node killed -> its replica released {:?} later (lease TTL 3 s, grace 0.5 s)", killed.elapsed());
    let text = metrics_when(&m, "the lone node's lapse to leave the window", |t| {
        metric(t, "omega_controller_evictions_total") == 1.0 && metric(t, "omega_controller_nodes_lapsed") == 0.0
    })
    .await;
    assert_eq!(metric(&text, "omega_controller_evictions_held_total"), 0.0);
    assert_eq!(metric(&text, "omega_controller_zone_disruptions_total"), 0.0);

    // Zone b's host: 4 nodes at once, all of zone b, a third of the cell's 12 (not more).
    b.kill();
    let killed = Instant::now();
    let mut seen: Vec<(Duration, f64, f64)> = Vec::new();
    let text = wait_for("zone b's 4 nodes released", 90, async || {
        let t = scrape(&m).await;
        let (evicted, held) =
            (metric(&t, "omega_controller_evictions_total"), metric(&t, "omega_controller_nodes_held"));
        if seen.last().is_none_or(|(_, e, h)| (*e, *h) != (evicted - 1.0, held)) {
            seen.push((killed.elapsed(), evicted - 1.0, held));
        }
        (evicted == 5.0).then_some(t)
    })
    .await;
    eprintln!("zone b killed -> (time, b nodes evicted, nodes held) as they changed: {seen:?}");
    assert_eq!(metric_where(&text, "omega_controller_zone_disruptions_total", "zone=\"b\""), 1.0);
    assert_eq!(metric(&text, "omega_controller_zone_disruptions_total"), 1.0, "only zone b");
    assert_eq!(metric(&text, "omega_controller_cell_disruptions_total"), 0.0);
    assert_eq!(
        metric(&text, "omega_controller_evictions_held_total"),
        4.0,
        "every node of zone b waited for the zone's rate (its budget starts empty)"
    );
    let ts = tasks(&store, "web").await;
    assert!(on(&ts, "b-").is_empty(), "zone b's replicas were released: {ts:?}");
    // Released nodes leave the count once out of the window: the zone recovers.
    metrics_when(&m, "zone b to recover", |t| {
        metric_where(t, "omega_controller_zone_disrupted", "zone=\"b\"") == 0.0
            && metric(t, "omega_controller_nodes_lapsed") == 0.0
    })
    .await;
    let log = ctl.log();
    assert_eq!(log.matches("zone disrupted").count(), 1, "said once:\n{log}");
    assert_eq!(log.matches("zone disruption over").count(), 1, "said once:\n{log}");
    assert!(!log.contains("cell disrupted"));
    let report = audit::audit(&store).await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.violations);
}
