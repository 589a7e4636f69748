//! Durations written as strings in the config: `"200ms"`, `"1s"`, `"5m"`, `"24h"`,
//! `"35d"`. One unit per value keeps them unambiguous. A leaf: used by the config
//! layer, depends on nothing of meterd.

use std::time::Duration;

/// The text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration (write a whole number with a unit: ms, s, m, h or d, e.g. \"200ms\", \"5m\", \"35d\")")]
pub struct DurationError(pub String);

/// Parses `"<whole number><unit>"` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(text.to_string());
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| err())?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(err()),
    };
    n.checked_mul(ms_per_unit).map(Duration::from_millis).ok_or_else(err)
}

/// Writes `d` in the largest unit that keeps it whole (`"90s"`, `"5m"`, `"1500ms"`).
pub fn format(d: Duration) -> String {
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
        for bad in ["", "5", "ms", "5 m", "1.5s", "5w", "-1s", "99999999999999999999d"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_in_the_largest_whole_unit_and_parses_back() {
        for (ms, text) in [(0, "0ms"), (10, "10ms"), (1_500, "1500ms"), (90_000, "90s"), (300_000, "5m"), (86_400_000, "1d")] {
            assert_eq!(format(Duration::from_millis(ms)), text);
            assert_eq!(parse(text), Ok(Duration::from_millis(ms)));
        }
        assert_eq!(millis_i64(Duration::MAX), i64::MAX);
        assert_eq!(millis_i64(Duration::from_secs(2)), 2_000);
    }
}
