//! Small time-series charts as inline SVG: one line per series, a zero-based y axis labelled with its top,
//! gaps where a value is undefined (a conflict fraction over an interval without transactions).

use crate::html::escape;
use std::fmt::Write;

const W: f64 = 260.0;
const H: f64 = 64.0;
const PAD_TOP: f64 = 4.0;

/// A chart of `points` (time in ms, value), titled `title`; `fmt` writes a value for people.
pub fn line_chart(title: &str, points: &[(u64, Option<f64>)], fmt: impl Fn(f64) -> String) -> String {
    let values: Vec<f64> = points.iter().filter_map(|(_, v)| *v).filter(|v| v.is_finite()).collect();
    let latest = points.iter().rev().find_map(|(_, v)| *v).filter(|v| v.is_finite());
    let top = nice_top(values.iter().copied().fold(0.0, f64::max));
    let (t0, t1) = match (points.first(), points.last()) {
        (Some(a), Some(b)) => (a.0, b.0.max(a.0 + 1)),
        _ => (0, 1),
    };
    let x = |t: u64| (t.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * W;
    let y = |v: f64| PAD_TOP + (H - PAD_TOP) * (1.0 - (v / top).clamp(0.0, 1.0));
    let mut paths = String::new();
    let mut segment = String::new();
    for (t, v) in points {
        match v.filter(|v| v.is_finite()) {
            Some(v) => {
                let _ = write!(segment, "{:.1},{:.1} ", x(*t), y(v));
            }
            None => flush(&mut segment, &mut paths),
        }
    }
    flush(&mut segment, &mut paths);
    let span_s = (t1 - t0) / 1000;
    let now = latest.map_or_else(|| "-".to_string(), &fmt);
    format!(
        "<div class=\"chart\"><div class=\"t\">{title}: <b>{now}</b></div>\
         <svg width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" role=\"img\" aria-label=\"{title}\">\
         <rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"#fafbfc\" stroke=\"#e0e4e7\"/>{paths}\
         <text x=\"2\" y=\"11\" font-size=\"9\" fill=\"#6b7780\">{top_label}</text>\
         <text x=\"2\" y=\"{zero_y}\" font-size=\"9\" fill=\"#6b7780\">0</text>\
         <text x=\"{W}\" y=\"{axis_y}\" font-size=\"9\" fill=\"#6b7780\" text-anchor=\"end\">last {span}</text>\
         </svg></div>",
        title = escape(title),
        h = H + 12.0,
        top_label = escape(&fmt(top)),
        zero_y = H - 2.0,
        axis_y = H + 10.0,
        span = if points.len() < 2 { "-".to_string() } else { omega::units::show::span(span_s * 1000) },
    )
}

/// Ends a run of points: a line through them, or a dot for a lone point between gaps (so it is not lost).
fn flush(segment: &mut String, paths: &mut String) {
    let points = segment.trim();
    if points.contains(' ') {
        let _ = write!(paths, "<polyline fill=\"none\" stroke=\"#1f5f8b\" stroke-width=\"1.5\" points=\"{points}\"/>");
    } else if let Some((cx, cy)) = points.split_once(',') {
        let _ = write!(paths, "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"1.5\" fill=\"#1f5f8b\"/>");
    }
    segment.clear();
}

/// A round number at or above `max` for the top of the axis (1, 2, 5 times a power of ten).
fn nice_top(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if step * magnitude >= max {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_tops_are_round_and_gaps_split_the_line() {
        assert_eq!((nice_top(0.0), nice_top(0.3), nice_top(7.0), nice_top(120.0)), (1.0, 0.5, 10.0, 200.0));
        let svg =
            line_chart("x", &[(0, Some(1.0)), (1000, Some(2.0)), (2000, None), (3000, Some(1.0))], |v| format!("{v}"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 1);
    }
}
