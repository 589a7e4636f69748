//! Durations written as strings in the config: `"200ms"`, `"1s"`, `"5m"`, `"24h"`,
//! `"35d"`. One unit per value keeps them unambiguous.

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

/// A config duration: deserializes from the string form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl<'de> serde::Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map(ConfigDuration).map_err(serde::de::Error::custom)
    }
}

impl ConfigDuration {
    pub fn from_millis(ms: u64) -> ConfigDuration {
        ConfigDuration(Duration::from_millis(ms))
    }

    pub fn as_millis_i64(&self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }
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
}
