//! Reading quantities and durations as people write them (job files, flags): exact decimal arithmetic, with
//! messages that say which forms are accepted.

use std::time::Duration;

/// Parses a CPU quantity into millicores: `500m`, or cores as `2`, `0.5`, `1.5` (= 1500).
///
/// Zero is accepted here (it is a quantity); whoever needs a positive amount checks for it. Refused, each with
/// a message that says what is accepted: empty, negative, exponent notation (`1e3`), other suffixes, less than
/// a millicore (`0.0005`), and more than `u64::MAX` millicores.
pub fn parse_cpu(s: &str) -> Result<u64, String> {
    const FORMS: &str = "CPU is millicores (`500m`) or cores (`2`, `0.5`, `1.5`)";
    let t = s.trim();
    let (number, suffix) = split_number(t);
    let multiplier = match suffix {
        "m" => 1,
        "" => 1000,
        _ => {
            return Err(match quantity_precheck(t, number, suffix) {
                Some(problem) => problem.describe(t, "a CPU quantity", FORMS),
                None => format!("`{t}` has an unknown suffix `{suffix}`; {FORMS}, and `m` is the only suffix"),
            })
        }
    };
    scaled(t, number, multiplier).map_err(|problem| match problem {
        Problem::NotWhole => format!("`{t}` is finer than a millicore; {FORMS}, to at most three decimals"),
        Problem::TooLarge => format!("`{t}` is too large: at most {}m", u64::MAX),
        other => other.describe(t, "a CPU quantity", FORMS),
    })
}

/// Parses a memory quantity into bytes: a plain integer, or a number with one of the suffixes `Ki`, `Mi`,
/// `Gi`, `Ti` (powers of 1024) or `k`/`K`, `M`, `G`, `T` (powers of 1000), such as `512Mi`, `1.5Gi`, `100M`.
///
/// The result must be a whole number of bytes (`1.5Gi` is, `1.5` is not). Zero is accepted here. `MB`, `GiB`,
/// `mi` and a lower-case `m` are refused with a hint, since each is a likely slip for one of the above.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    const FORMS: &str = "memory is bytes (`1073741824`) or a number with a suffix Ki, Mi, Gi, Ti (powers of \
                         1024) or k, M, G, T (powers of 1000), e.g. `512Mi`, `1.5Gi`, `100M`";
    let t = s.trim();
    let (number, suffix) = split_number(t);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000u128.pow(2),
        "G" => 1000u128.pow(3),
        "T" => 1000u128.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            if let Some(problem) = quantity_precheck(t, number, suffix) {
                return Err(problem.describe(t, "a memory quantity", FORMS));
            }
            return Err(memory_suffix_hint(t, number, suffix)
                .unwrap_or_else(|| format!("`{t}` has an unknown suffix `{suffix}`; {FORMS}")));
        }
    };
    scaled(t, number, multiplier).map_err(|problem| match problem {
        Problem::NotWhole => format!("`{t}` is not a whole number of bytes; {FORMS}"),
        Problem::TooLarge => format!("`{t}` is too large: at most {} bytes", u64::MAX),
        other => other.describe(t, "a memory quantity", FORMS),
    })
}

/// Parses a duration into milliseconds: `500ms`, `2s`, `1m`, `1h`, combinations such as `1m30s`, decimals
/// such as `1.5s`, or a bare integer meaning milliseconds.
///
/// Refused: empty, negative, a bare decimal (`1.5`: seconds or milliseconds?), unknown units (`d`, `us`), less
/// than a millisecond, and more than `u64::MAX` milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    const FORMS: &str = "a duration is `500ms`, `2s`, `1m`, `1h`, a combination such as `1m30s`, or whole \
                         milliseconds such as `1500`";
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("an empty duration; {FORMS}"));
    }
    if t.starts_with('-') {
        return Err(format!("`{t}` is negative; {FORMS}"));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<u64>().map_err(|_| format!("`{t}` is too large: at most {} milliseconds", u64::MAX));
    }
    let mut total: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let (number, after) = split_number(rest);
        let unit_len = after.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        if number.is_empty() {
            return Err(format!("`{t}` is not a duration; {FORMS}"));
        }
        let multiplier = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60 * 1000,
            "h" => 60 * 60 * 1000,
            "" if rest == t => {
                return Err(format!("`{t}` has no unit; a bare number is whole milliseconds; {FORMS}"));
            }
            "" => return Err(format!("`{t}` has no unit after `{number}`; {FORMS}")),
            _ => return Err(format!("`{t}` has an unknown unit `{unit}`; the units are ms, s, m and h; {FORMS}")),
        };
        let part = scaled(t, number, multiplier).map_err(|problem| match problem {
            Problem::NotWhole => format!("`{t}` is finer than a millisecond; {FORMS}"),
            Problem::TooLarge => format!("`{t}` is too large: at most {} milliseconds", u64::MAX),
            other => other.describe(t, "a duration", FORMS),
        })?;
        total = total.checked_add(part).ok_or_else(|| format!("`{t}` is too large: at most {} ms", u64::MAX))?;
        rest = next;
    }
    Ok(total)
}

/// [`parse_duration_ms`] as a [`Duration`]: the value parser of every duration flag (`--lease-ttl 10s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_ms(s).map(Duration::from_millis)
}

// ---------------------------------------------------------------------------------------------------------
// Numbers: exact decimal arithmetic shared by the quantity and duration parsers.

/// Why a number could not be read; each parser turns it into words with its own list of accepted forms.
#[derive(Debug, PartialEq, Eq)]
enum Problem {
    Empty,
    Negative,
    Exponent,
    Syntax,
    TooLarge,
    NotWhole,
}

impl Problem {
    fn describe(&self, text: &str, what: &str, forms: &str) -> String {
        match self {
            Problem::Empty => format!("an empty value is not {what}; {forms}"),
            Problem::Negative => format!("`{text}` is negative; {forms}"),
            Problem::Exponent => {
                format!("`{text}` uses exponent notation, which is not accepted; write the number out; {forms}")
            }
            Problem::Syntax | Problem::NotWhole => format!("`{text}` is not {what}; {forms}"),
            Problem::TooLarge => format!("`{text}` is too large"),
        }
    }
}

/// Splits `12.5Gi` into `12.5` and `Gi`.
fn split_number(t: &str) -> (&str, &str) {
    let end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    t.split_at(end)
}

/// What is wrong with a quantity whose suffix was not recognised, when the suffix is not the problem.
fn quantity_precheck(t: &str, number: &str, suffix: &str) -> Option<Problem> {
    if t.is_empty() {
        Some(Problem::Empty)
    } else if t.starts_with('-') {
        Some(Problem::Negative)
    } else if !number.is_empty()
        && suffix.len() > 1
        && suffix.starts_with(['e', 'E'])
        && suffix[1..].trim_start_matches(['+', '-']).bytes().all(|b| b.is_ascii_digit())
    {
        Some(Problem::Exponent)
    } else if number.is_empty() {
        Some(Problem::Syntax)
    } else {
        None
    }
}

/// A hint for memory suffixes that are slips for a real one: `MB`, `MiB`, `gi`, `m`.
fn memory_suffix_hint(t: &str, number: &str, suffix: &str) -> Option<String> {
    if suffix == "m" {
        return Some(format!(
            "`{t}`: `m` is not a memory suffix (Kubernetes reads it as thousandths of a byte); write \
             `{number}M` (10^6 bytes) or `{number}Mi` (2^20 bytes)"
        ));
    }
    let trimmed = suffix.strip_suffix(['B', 'b']).unwrap_or(suffix);
    let mut chars = trimmed.chars();
    let first = chars.next()?.to_ascii_uppercase();
    if !"KMGT".contains(first) {
        return None;
    }
    match chars.as_str() {
        "" => Some(format!(
            "`{t}` has an unknown suffix `{suffix}`; write `{number}{first}` (powers of 1000) or \
             `{number}{first}i` (powers of 1024); bytes are implied"
        )),
        "i" | "I" => Some(format!("`{t}` has an unknown suffix `{suffix}`; write `{number}{first}i`")),
        _ => None,
    }
}

/// Reads an unsigned decimal (`12`, `1.5`, `.5`) as `mantissa / 10^scale`, exactly.
fn decimal(number: &str) -> Result<(u128, u32), Problem> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(Problem::Syntax);
    }
    let fraction = fraction.trim_end_matches('0');
    let mut mantissa: u128 = 0;
    for b in whole.bytes().chain(fraction.bytes()) {
        if !b.is_ascii_digit() {
            return Err(Problem::Syntax);
        }
        mantissa =
            mantissa.checked_mul(10).and_then(|m| m.checked_add(u128::from(b - b'0'))).ok_or(Problem::TooLarge)?;
    }
    Ok((mantissa, fraction.len() as u32))
}

/// `number * multiplier` as a whole `u64`, or why not. `text` is the whole value, for the empty and sign checks.
fn scaled(text: &str, number: &str, multiplier: u128) -> Result<u64, Problem> {
    if text.is_empty() {
        return Err(Problem::Empty);
    }
    if text.starts_with('-') {
        return Err(Problem::Negative);
    }
    let (mantissa, scale) = decimal(number)?;
    let product = mantissa.checked_mul(multiplier).ok_or(Problem::TooLarge)?;
    let value = match 10u128.checked_pow(scale) {
        Some(divisor) if product % divisor == 0 => product / divisor,
        // More decimals than fit in a u128 with the last one non-zero: never a whole number.
        _ if mantissa == 0 => 0,
        _ => return Err(Problem::NotWhole),
    };
    u64::try_from(value).map_err(|_| Problem::TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities() {
        for (s, millis) in [("500m", 500), ("1500m", 1500), ("0.5", 500), ("1.5", 1500), ("2", 2000), (".25", 250)] {
            assert_eq!(parse_cpu(s), Ok(millis), "{s}");
        }
        assert_eq!(parse_cpu("0.5000"), Ok(500));
        assert_eq!(parse_cpu(" 3 "), Ok(3000));
        assert_eq!(parse_cpu("0"), Ok(0));
        assert_eq!(parse_cpu("18446744073709551615m"), Ok(u64::MAX));
        for (s, why) in [
            ("", "empty"),
            ("-1", "negative"),
            ("1e3", "exponent"),
            ("0.0005", "finer than a millicore"),
            ("1.5m", "finer than a millicore"),
            ("18446744073709551616", "too large"),
            ("18446744073709551616m", "too large"),
            ("500M", "unknown suffix"),
            ("abc", "not a CPU quantity"),
            ("1.2.3", "not a CPU quantity"),
            ("+1", "not a CPU quantity"),
            (".", "not a CPU quantity"),
            ("1 m", "unknown suffix"),
        ] {
            let e = parse_cpu(s).expect_err(s);
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    #[test]
    fn memory_quantities() {
        for (s, bytes) in [
            ("1073741824", 1u64 << 30),
            ("512Mi", 512 << 20),
            ("1.5Gi", 3 << 29),
            ("1Ki", 1024),
            ("2Ti", 2 << 40),
            ("100M", 100_000_000),
            ("1k", 1000),
            ("1K", 1000),
            ("1.5G", 1_500_000_000),
            ("3T", 3_000_000_000_000),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_memory(s), Ok(bytes), "{s}");
        }
        for (s, why) in [
            ("", "empty"),
            ("-1Gi", "negative"),
            ("1e9", "exponent"),
            ("1.5", "whole number of bytes"),
            ("0.1Ki", "whole number of bytes"),
            ("18446744073709551616", "too large"),
            ("16777216Ti", "too large"),
            ("512MB", "`512Mi`"),
            ("1GiB", "`1Gi`"),
            ("1gi", "`1Gi`"),
            ("500m", "`500Mi`"),
            ("5x", "unknown suffix `x`"),
            ("Gi", "not a memory quantity"),
        ] {
            let e = parse_memory(s).expect_err(s);
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("500ms", 500),
            ("2s", 2000),
            ("1m", 60_000),
            ("1h", 3_600_000),
            ("1500", 1500),
            ("0", 0),
            ("1.5s", 1500),
            ("1m30s", 90_000),
            ("1h0m1ms", 3_600_001),
        ] {
            assert_eq!(parse_duration_ms(s), Ok(ms), "{s}");
        }
        for (s, why) in [
            ("", "empty"),
            ("-1s", "negative"),
            ("1.5", "no unit"),
            ("1m30", "no unit after `30`"),
            ("2d", "unknown unit `d`"),
            ("1e3", "unknown unit `e`"),
            ("0.5ms", "finer than a millisecond"),
            ("s", "not a duration"),
            ("18446744073709551616", "too large"),
            ("5124095576030432h", "too large"),
            ("18446744073709551615ms1ms", "too large"),
        ] {
            let e = parse_duration_ms(s).expect_err(s);
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }
}
