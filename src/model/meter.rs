//! Meters: what is counted, how events combine, and at what precision.

use std::fmt;
use std::str::FromStr;

/// A meter's index in the catalog; small so counter keys stay small.
pub type MeterId = u16;

/// How the events of a window combine into its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregation {
    /// Quantities add up.
    Sum,
    /// Each event counts one unit; the quantity is ignored.
    Count,
    /// The largest quantity seen in the window.
    Max,
    /// The quantity of the newest event by timestamp (a gauge: storage, seats).
    Latest,
    /// The number of distinct values of the meter's `unique_property` in the
    /// window (issue 25); the quantity is ignored.
    UniqueCount,
}

impl Aggregation {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Count => "count",
            Aggregation::Max => "max",
            Aggregation::Latest => "latest",
            Aggregation::UniqueCount => "unique_count",
        }
    }

    /// Whether a check of `q` asks about `used + q` as a level (gauges) rather than
    /// about adding `q` to a running total. Both read the same way; the difference
    /// is how a consumed amount is recorded.
    pub fn is_gauge(self) -> bool {
        matches!(self, Aggregation::Max | Aggregation::Latest)
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text is not an aggregation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown aggregation {0:?} (expected sum, count, max, latest or unique_count)")]
pub struct UnknownAggregation(pub String);

impl FromStr for Aggregation {
    type Err = UnknownAggregation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sum" => Ok(Aggregation::Sum),
            "count" => Ok(Aggregation::Count),
            "max" => Ok(Aggregation::Max),
            "latest" => Ok(Aggregation::Latest),
            "unique_count" => Ok(Aggregation::UniqueCount),
            other => Err(UnknownAggregation(other.to_string())),
        }
    }
}

/// One configured meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    pub id: MeterId,
    pub name: String,
    pub aggregation: Aggregation,
    /// Decimal places kept exactly; raw units are `10^-precision`.
    pub precision: u8,
    /// The Stripe meter's event name, when this meter is billed through Stripe.
    pub stripe_event_name: Option<String>,
    /// The event property whose distinct values a `unique_count` meter counts
    /// (issue 25); `None` for every other aggregation.
    pub unique_property: Option<String>,
    /// The properties `/v1/usage` may group this meter's usage by (issue 25).
    pub group_by: Vec<String>,
}

impl Meter {
    /// Raw units of one whole unit.
    pub fn scale(&self) -> i64 {
        super::quantity::scale(self.precision)
    }

    /// The value a `unique_count` meter's event counts: its `unique_property`
    /// in `properties` (sorted by key), or `None` (every other meter, or an
    /// event without it).
    pub fn unique_value<'p, K: AsRef<str>, V: AsRef<str>>(&self, properties: &'p [(K, V)]) -> Option<&'p str> {
        let name = self.unique_property.as_deref()?;
        properties.iter().find(|(k, _)| k.as_ref() == name).map(|(_, v)| v.as_ref())
    }

    /// Whether `name` is a valid meter name: `[a-z0-9_]{1,64}`.
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }
}
