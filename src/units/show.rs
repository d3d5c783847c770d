//! Numbers and times for people: cores, memory in binary units, percentages, durations, ages, UTC timestamps.
//!
//! One home for every rendering, so a quantity reads the same in `omctl`, in a job file printed back, and in a
//! log line. Exact forms (what a job file would say) and rounded forms (what a table has room for) are named
//! apart.

use crate::model::now_ms;

/// CPU millicores as the job file writes them: `4` for whole cores, else `1500m`.
pub fn cpu(millis: u64) -> String {
    if millis % 1000 == 0 {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// CPU millicores as cores with up to three decimals: `1.5`, `4`, `0.25`.
pub fn cores(millis: u64) -> String {
    let whole = millis / 1000;
    let frac = millis % 1000;
    if frac == 0 {
        whole.to_string()
    } else {
        let s = format!("{whole}.{frac:03}");
        s.trim_end_matches('0').to_string()
    }
}

/// Bytes, rounded for a table: the largest binary unit that keeps the number at least 1, with at most one
/// decimal: `512Mi`, `1.5Gi`, `8Gi`; below 1 KiB, plain bytes.
pub fn memory(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut unit = 0;
    let mut scale: u64 = 1024;
    while unit + 1 < UNITS.len() && bytes / scale >= 1024 {
        scale *= 1024;
        unit += 1;
    }
    let tenths = (bytes as u128 * 10 + scale as u128 / 2) / scale as u128;
    if tenths % 10 == 0 {
        format!("{}{}", tenths / 10, UNITS[unit])
    } else {
        format!("{}.{}{}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

/// Bytes exactly, as a job file writes them: the largest binary suffix that divides them (`512Mi`, `1536Mi`,
/// `3Ti`), else plain bytes (`1000`).
pub fn memory_exact(bytes: u64) -> String {
    for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes != 0 && bytes % (1u64 << shift) == 0 {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// `used` as a whole percentage of `capacity` (`-` when there is no capacity).
pub fn percent(used: u64, capacity: u64) -> String {
    if capacity == 0 {
        return "-".into();
    }
    format!("{}%", (used as u128 * 100 + capacity as u128 / 2) / capacity as u128)
}

/// A ratio as a percentage with one decimal (`-` when the denominator is zero).
pub fn ratio(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

/// A duration in its largest sensible unit: `850ms`, `12s`, `3m`, `2h`, `5d`.
pub fn span(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}s", ms / 1_000),
        60_000..3_600_000 => format!("{}m", ms / 60_000),
        3_600_000..86_400_000 => format!("{}h", ms / 3_600_000),
        _ => format!("{}d", ms / 86_400_000),
    }
}

/// A duration exactly, in the job file's syntax and its largest unit that divides it: `1h`, `90s`, `1500ms`,
/// `0s`.
pub fn duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// How long ago a record time was: `12s ago`; `-` for an unset time (0).
pub fn ago(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = now_ms();
    if ms + 1000 > now {
        return "just now".into();
    }
    format!("{} ago", span(now - ms))
}

/// A record time as RFC 3339 in UTC, to the second: `2026-11-23T05:15:23Z`; `-` for 0.
pub fn utc(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let (y, mo, d, h, mi, s, _) = civil(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Time of day in UTC with milliseconds, for event streams: `05:15:23.123`.
pub fn clock(ms: u64) -> String {
    let (_, _, _, h, mi, s, milli) = civil(ms);
    format!("{h:02}:{mi:02}:{s:02}.{milli:03}")
}

/// A time and how long ago it was: `2026-11-23T05:15:23Z (12s ago)`.
pub fn when(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    format!("{} ({})", utc(ms), ago(ms))
}

/// Seconds since the epoch as RFC 3339 in UTC (`2026-11-23T05:15:23Z`), for labels and APIs that want it
/// (containerd's `gc.expire`), 0 included.
pub fn rfc3339(secs: u64) -> String {
    let (y, mo, d, h, mi, s, _) = civil(secs.saturating_mul(1000));
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Milliseconds since the epoch -> (year, month, day, hour, minute, second, millisecond) in UTC, by Howard
/// Hinnant's days-to-civil algorithm.
fn civil(ms: u64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, (rem / 3600) as u32, ((rem % 3600) / 60) as u32, (rem % 60) as u32, (ms % 1000) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(cpu(4000), "4");
        assert_eq!(cpu(1500), "1500m");
        assert_eq!(cores(1500), "1.5");
        assert_eq!(cores(250), "0.25");
        assert_eq!(cores(4000), "4");
        assert_eq!(memory(512 << 20), "512Mi");
        assert_eq!(memory(3 << 29), "1.5Gi");
        assert_eq!(memory(8 << 30), "8Gi");
        assert_eq!(memory(100), "100");
        assert_eq!(memory(2048), "2Ki");
        assert_eq!(memory_exact(1536 << 20), "1536Mi");
        assert_eq!(memory_exact(3 << 40), "3Ti");
        assert_eq!(memory_exact(1000), "1000");
        assert_eq!(percent(1, 3), "33%");
        assert_eq!(percent(1, 0), "-");
        assert_eq!(ratio(1, 6), "16.7%");
    }

    #[test]
    fn times() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14T22:13:20Z");
        assert_eq!(clock(1_700_000_000_123), "22:13:20.123");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(span(59_999), "59s");
        assert_eq!(span(3_600_000), "1h");
        assert_eq!(
            [0, 1500, 2000, 90_000, 3_600_000].map(duration),
            ["0s", "1500ms", "2s", "90s", "1h"].map(String::from)
        );
    }
}
