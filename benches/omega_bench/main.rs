//! `omega-bench`: the Omega paper's experiments rerun on the real system (see `cli.rs` for the presets and
//! parameters, `run.rs` for what one run does, the README's results section for what they showed).

mod cell;
mod cli;
mod health;
mod observe;
mod plot;
mod report;
mod result;
mod run;
mod scrape;
mod spec;
mod submit;
mod workload;

use anyhow::{bail, Context, Result};
use cli::{Cli, Preset};
use std::path::PathBuf;

/// The check that an overloaded run may fail as a result rather than as a fault (work left unplaced when
/// the drain ran out); every other check failing is a fault in any preset.
const LOAD_DEPENDENT_CHECK: &str = "every submitted task was placed";

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let matches = <Cli as clap::CommandFactory>::command().after_long_help(spec::defaults_table()).get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
    let runs = spec::runs(&cli);
    for r in &runs {
        spec::validate(r).map_err(|e| anyhow::anyhow!("run {:?}: {e}", r.label))?;
    }
    let bin_dir = cell::bin_dir(cli.bin_dir.as_deref())?;
    let out = cli.out.clone().unwrap_or_else(|| default_out(cli.preset));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let env = report::Environment::here();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut results = Vec::new();
    for (i, spec) in runs.iter().enumerate() {
        let ctx = run::RunContext {
            bin_dir: bin_dir.clone(),
            logs: run::logs_dir(&out, i, &spec.label),
            title: format!("[{}/{} {}]", i + 1, runs.len(), spec.label),
        };
        let result = runtime
            .block_on(run::run(spec, &ctx))
            .with_context(|| format!("run {:?} failed (process logs in {})", spec.label, ctx.logs.display()))?;
        results.push(result);
        // Write as we go: a long preset interrupted later keeps what it measured.
        report::write(&out, &env, &results)?;
    }
    let tables = report::tables(&results);
    println!("{tables}");
    let plots = plot::draw(&out, cli.preset, &results)?;
    eprintln!("results: {} (results.json, results.csv, table.md, {} plots)", out.display(), plots.len());

    let mut faults = Vec::new();
    for r in &results {
        for c in r.failed_checks() {
            if cli.preset == Preset::Smoke || c.name != LOAD_DEPENDENT_CHECK {
                faults.push(format!("{}: {}: {}", r.spec.label, c.name, c.detail));
            } else {
                eprintln!("note: {}: {} ({})", r.spec.label, c.name, c.detail);
            }
        }
    }
    if !faults.is_empty() {
        bail!("consistency checks failed:\n{}", faults.join("\n"));
    }
    Ok(())
}

fn default_out(preset: Preset) -> PathBuf {
    let name = serde_json::to_value(preset).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    PathBuf::from("target").join("omega-bench").join(name)
}
