//! SVG plots of a preset's results, drawn with plotters: the paper's conflict-fraction and busyness curves
//! against the swept value (log x for t_job, as the paper plots it), placement rate against the swept value,
//! and every run's placement rate over time.

use crate::cli::Preset;
use crate::result::RunResult;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const SIZE: (u32, u32) = (900, 520);
const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// How the runs of a preset spread along x.
enum XAxis {
    /// log10 of the swept value (t_job in seconds).
    Log(&'static str),
    Linear(&'static str),
    /// One position per run, named by its label.
    Runs(Vec<String>),
}

impl XAxis {
    fn of(preset: Preset, results: &[RunResult]) -> XAxis {
        match preset {
            Preset::TjobSweep => XAxis::Log("service scheduler t_job (s, log scale)"),
            Preset::ScaleBatch => XAxis::Linear("batch schedulers"),
            _ => XAxis::Runs(results.iter().map(|r| r.spec.label.clone()).collect()),
        }
    }

    fn x(&self, i: usize, r: &RunResult) -> f64 {
        match self {
            XAxis::Log(_) => r.spec.x.max(1e-3).log10(),
            XAxis::Linear(_) => r.spec.x,
            XAxis::Runs(_) => i as f64,
        }
    }

    fn label(&self) -> &str {
        match self {
            XAxis::Log(l) | XAxis::Linear(l) => l,
            XAxis::Runs(_) => "run",
        }
    }

    fn tick(&self, v: f64) -> String {
        match self {
            XAxis::Log(_) => {
                let s = 10f64.powf(v);
                if s >= 1.0 {
                    format!("{s:.0}")
                } else {
                    format!("{s:.2}")
                }
            }
            XAxis::Linear(_) => format!("{v:.0}"),
            XAxis::Runs(labels) => {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            }
        }
    }
}

type Series = (String, Vec<(f64, f64)>);

fn chart(path: &Path, title: &str, axis: &XAxis, y_label: &str, series: &[Series], x_range: (f64, f64)) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let y_max = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).filter(|y| y.is_finite()).fold(0.0f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let (lo, hi) = if x_range.1 > x_range.0 { x_range } else { (x_range.0 - 0.5, x_range.0 + 0.5) };
    let pad = (hi - lo) * 0.05;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((lo - pad)..(hi + pad), 0.0..y_max)
        .map_err(|e| err(&e))?;
    let n_labels = match axis {
        XAxis::Runs(l) => l.len().max(2),
        _ => 10,
    };
    c.configure_mesh()
        .x_desc(axis.label())
        .y_desc(y_label)
        .x_labels(n_labels)
        .x_label_formatter(&|v| axis.tick(*v))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
        c.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        c.draw_series(PointSeries::of_element(points, 4, color, &|p, s, st| Circle::new(p, s, st.filled())))
            .map_err(|e| err(&e))?;
    }
    c.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// One series per scheduler name: `value` of its total in each run, against the run's x.
fn per_scheduler(
    results: &[RunResult],
    axis: &XAxis,
    value: impl Fn(&crate::result::SchedulerResult) -> Option<f64>,
) -> Vec<Series> {
    let mut names: Vec<String> =
        results.iter().flat_map(|r| r.schedulers.iter().map(|s| s.scheduler.clone())).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let points = results
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((axis.x(i, r), value(r.scheduler(&name)?)?)))
                .collect();
            (name, points)
        })
        .collect()
}

/// Draws the preset's plots into `out`; returns the files written.
pub fn draw(out: &Path, preset: Preset, results: &[RunResult]) -> Result<Vec<PathBuf>> {
    let axis = XAxis::of(preset, results);
    let xs: Vec<f64> = results.iter().enumerate().map(|(i, r)| axis.x(i, r)).collect();
    let x_range =
        (xs.iter().copied().fold(f64::INFINITY, f64::min), xs.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    let mut written = Vec::new();

    let p = out.join("conflict_fraction.svg");
    chart(
        &p,
        "Conflict fraction (conflicted / successful transactions)",
        &axis,
        "conflict fraction",
        &per_scheduler(results, &axis, |s| s.conflict_fraction),
        x_range,
    )?;
    written.push(p);

    let p = out.join("busyness.svg");
    let mut busy = per_scheduler(results, &axis, |s| Some(s.busyness));
    for (name, _) in busy.iter_mut() {
        name.push_str(" (decision)");
    }
    busy.extend(
        per_scheduler(results, &axis, |s| Some(s.commit_share)).into_iter().map(|(n, p)| (format!("{n} (commit)"), p)),
    );
    chart(
        &p,
        "Scheduler busyness (time deciding / wall time) and commit time",
        &axis,
        "fraction of wall time",
        &busy,
        x_range,
    )?;
    written.push(p);

    let p = out.join("throughput.svg");
    let mut rates: Vec<Series> = vec![(
        "placed tasks/s".into(),
        results.iter().enumerate().map(|(i, r)| (axis.x(i, r), r.placement_rate)).collect(),
    )];
    rates.push((
        "best second".into(),
        results.iter().enumerate().map(|(i, r)| (axis.x(i, r), r.placement_rate_best_second)).collect(),
    ));
    if results.iter().any(|r| r.raw_ceiling_claims_per_sec.is_some()) {
        rates.push((
            "etcd raw ceiling (claims/s)".into(),
            results
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((axis.x(i, r), r.raw_ceiling_claims_per_sec?)))
                .collect(),
        ));
    }
    chart(&p, "Placement throughput", &axis, "tasks per second", &rates, x_range)?;
    written.push(p);

    let p = out.join("placement_rate.svg");
    let over_time: Vec<Series> = results
        .iter()
        .map(|r| {
            (r.spec.label.clone(), r.placement_series.iter().enumerate().map(|(t, &n)| (t as f64, n as f64)).collect())
        })
        .collect();
    let longest = results.iter().map(|r| r.placement_series.len()).max().unwrap_or(1) as f64;
    chart(
        &p,
        "Placement rate over time",
        &XAxis::Linear("seconds into the run"),
        "tasks placed per second",
        &over_time,
        (0.0, longest),
    )?;
    written.push(p);

    // etcd's database over time, with the placement rate it carried (the soak's picture).
    if results.iter().any(|r| r.health_samples.len() > 1) {
        let p = out.join("etcd_db.svg");
        let mut series: Vec<Series> = Vec::new();
        for r in results {
            let mb = |b: i64| b as f64 / (1 << 20) as f64;
            series.push((
                format!("{}: db MB", r.spec.label),
                r.health_samples.iter().map(|h| (h.t, mb(h.db_size_bytes))).collect(),
            ));
            series.push((
                format!("{}: db in use MB", r.spec.label),
                r.health_samples.iter().map(|h| (h.t, mb(h.db_in_use_bytes))).collect(),
            ));
            series.push((
                format!("{}: placed/s / 10", r.spec.label),
                r.health_samples.iter().map(|h| (h.t, h.placed_per_sec / 10.0)).collect(),
            ));
        }
        let longest = results.iter().filter_map(|r| r.health_samples.last().map(|h| h.t)).fold(1.0, f64::max);
        chart(
            &p,
            "etcd's database size and the placement rate over time",
            &XAxis::Linear("seconds into the run"),
            "MB (placements: tasks/s / 10)",
            &series,
            (0.0, longest),
        )?;
        written.push(p);
    }
    Ok(written)
}
