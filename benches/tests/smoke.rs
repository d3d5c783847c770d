//! The benchmark's smoke preset end to end, as CI runs it: real etcd, the project's own scheduler, agent and
//! controller processes, a seeded workload; then the results files are read back and checked for internal
//! consistency (what the bench itself asserts, and what a reader of its files relies on).

use omega_testkit::procs::bin;
use std::process::Command;

#[test]
fn smoke_preset_runs_and_accounts_for_every_task() {
    let out = tempfile::tempdir().unwrap();
    let bin_dir = bin("omega-scheduler").parent().unwrap().to_path_buf();
    let status = Command::new(env!("CARGO_BIN_EXE_omega-bench"))
        .args(["--preset", "smoke", "--out"])
        .arg(out.path())
        .arg("--bin-dir")
        .arg(&bin_dir)
        .status()
        .expect("omega-bench starts");
    assert!(status.success(), "omega-bench --preset smoke failed: {status}");

    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap()).unwrap();
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "smoke runs arrivals on a pre-filled cell and a backlog on an empty one");
    for run in runs {
        let label = run["spec"]["label"].as_str().unwrap();
        for check in run["checks"].as_array().unwrap() {
            assert_eq!(check["ok"], true, "{label}: {check}");
        }
        let submitted = run["tasks_submitted"].as_u64().unwrap();
        assert!(submitted > 0, "{label}: nothing submitted");
        assert_eq!(run["tasks_placed"].as_u64(), Some(submitted), "{label}");
        let series: u64 = run["placement_series"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum();
        assert!(series > 0 && series <= submitted, "{label}: the per-second series holds {series} of {submitted}");
        let mut placed_by_schedulers = 0.0;
        for s in run["schedulers"].as_array().unwrap() {
            let c = &s["counters"];
            let f = |k: &str| c[k].as_f64().unwrap();
            assert!(
                f("transactions_conflicted") <= f("transactions") && f("transactions") <= f("attempts"),
                "{label}: {s}"
            );
            assert!(f("busy_secs") > 0.0, "{label}: a scheduler that placed work spent no time deciding: {s}");
            placed_by_schedulers += f("placed");
        }
        // A run ending with every task placed, restart-free: each committed claim placed one task once.
        assert_eq!(placed_by_schedulers as u64, submitted, "{label}");
        assert!(run["raw_ceiling_claims_per_sec"].as_f64().unwrap() > 0.0, "{label}: no raw ceiling");
    }
    for file in ["results.csv", "table.md"] {
        assert!(std::fs::metadata(out.path().join(file)).unwrap().len() > 0, "{file} is empty");
    }
    for plot in ["conflict_fraction.svg", "busyness.svg", "throughput.svg", "placement_rate.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<text"), "{plot} is not an SVG plot with labels");
    }
}
