//! Durations written as strings in the config: `"200ms"`, `"1s"`, `"5m"`, `"24h"`,
//! `"35d"` (and `"800us"` where a key takes microseconds). One unit per value
//! keeps them unambiguous. A leaf: used by the config
//! layer, depends on nothing of meterd.

use std::time::Duration;

/// The text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration (write a whole number with a unit: ms, s, m, h or d, e.g. \"200ms\", \"5m\", \"35d\")")]
pub struct DurationError(pub String);

/// The text is not a duration in microseconds or coarser.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration (write a whole number with a unit: us, ms, s, m, h or d, e.g. \"800us\", \"2ms\")")]
pub struct FineDurationError(pub String);

/// Parses `"<whole number><unit>"` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(text.to_string());
    if text.ends_with("us") {
        return Err(err());
    }
    parse_fine(text).map_err(|_| err())
}

/// [`parse`], and microseconds too (`"800us"`): for the few settings finer
/// than a millisecond. Requests never take them.
pub fn parse_fine(text: &str) -> Result<Duration, FineDurationError> {
    let err = || FineDurationError(text.to_string());
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| err())?;
    let us_per_unit: u64 = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(us_per_unit).map(Duration::from_micros).ok_or_else(err)
}

/// Writes `d` in the largest unit that keeps it whole (`"90s"`, `"5m"`,
/// `"1500ms"`, `"800us"`); what is below a microsecond is dropped.
pub fn format(d: Duration) -> String {
    if !d.subsec_micros().is_multiple_of(1_000) {
        return format!("{}us", d.as_micros());
    }
    let ms = d.as_millis();
    let (n, unit) = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1_000, "s")]
        .into_iter()
        .find(|&(per, _)| ms >= per && ms.is_multiple_of(per))
        .map(|(per, unit)| (ms / per, unit))
        .unwrap_or((ms, "ms"));
    format!("{n}{unit}")
}

/// `d` in whole milliseconds, saturating (the engine keeps times as i64 ms).
pub fn millis_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("35d"), Ok(Duration::from_secs(35 * 86_400)));
        for bad in ["", "5", "ms", "5 m", "1.5s", "5w", "-1s", "99999999999999999999d", "800us"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fine_durations_take_microseconds_too() {
        assert_eq!(parse_fine("800us"), Ok(Duration::from_micros(800)));
        assert_eq!(parse_fine("0us"), Ok(Duration::ZERO));
        assert_eq!(parse_fine("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_fine("35d"), Ok(Duration::from_secs(35 * 86_400)));
        for bad in ["", "us", "1.5ms", "5µs", "5ns", "-1us", "999999999999999d"] {
            assert!(parse_fine(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_in_the_largest_whole_unit_and_parses_back() {
        for (ms, text) in [(0, "0ms"), (10, "10ms"), (1_500, "1500ms"), (90_000, "90s"), (300_000, "5m"), (86_400_000, "1d")] {
            assert_eq!(format(Duration::from_millis(ms)), text);
            assert_eq!(parse(text), Ok(Duration::from_millis(ms)));
        }
        for (us, text) in [(800, "800us"), (1_500, "1500us"), (2_000, "2ms")] {
            assert_eq!(format(Duration::from_micros(us)), text);
            assert_eq!(parse_fine(text), Ok(Duration::from_micros(us)));
        }
        assert_eq!(millis_i64(Duration::MAX), i64::MAX);
        assert_eq!(millis_i64(Duration::from_secs(2)), 2_000);
    }
}
