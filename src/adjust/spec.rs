//! The body of `POST /v1/adjustments`, validated: every field's rule from
//! API.md part 2 ("Adjustments"), with the problems named by field. A
//! quantity is parsed from its decimal text (never an `f64`) and may be
//! negative; `count` meters take whole counts.

use crate::model::quantity::{self, QuantityError};
use crate::model::{window, Aggregation, Catalog, Meter};
use serde_json::value::RawValue;

/// The longest `reason`, in bytes.
pub const MAX_REASON: usize = 256;
/// How far ahead of now a timestamp may be (as for events).
const MAX_AHEAD_MS: i64 = 5 * 60_000;

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError { field: field.to_owned(), reason: reason.into() }
}

/// The body as sent.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Body<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    customer: Option<&'a RawValue>,
    #[serde(borrow)]
    meter: Option<&'a RawValue>,
    #[serde(borrow)]
    quantity: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    reason: Option<&'a RawValue>,
}

/// A valid adjustment, before it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdjustmentSpec {
    pub id: String,
    pub customer: String,
    pub meter: String,
    /// Signed raw units at the meter's precision.
    pub raw: i64,
    pub ts: i64,
    /// Whether the body gave the timestamp (a retry without one gets a new "now").
    pub ts_given: bool,
    pub reason: String,
}

fn string(raw: Option<&RawValue>, field: &str, max: usize) -> Result<String, SpecError> {
    let raw = raw.ok_or_else(|| bad(field, "is required"))?;
    let s: String = serde_json::from_str(raw.get()).map_err(|_| bad(field, "must be a string"))?;
    if s.is_empty() || s.len() > max {
        return Err(bad(field, format!("must be 1-{max} bytes")));
    }
    Ok(s)
}

/// Signed raw units of `text` for `meter`.
fn signed_quantity(text: &str, meter: &Meter) -> Result<i64, SpecError> {
    let (negative, abs) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let precision = if meter.aggregation == Aggregation::Count { 0 } else { meter.precision };
    let units = quantity::parse_decimal(abs, precision).map_err(|e| match e {
        QuantityError::TooPrecise { .. } if meter.aggregation == Aggregation::Count => {
            bad("quantity", "must be a whole count on a count meter")
        }
        e => bad("quantity", e.to_string()),
    })?;
    // A count meter counts one whole unit per event.
    let raw = if meter.aggregation == Aggregation::Count {
        units.checked_mul(meter.scale()).ok_or_else(|| bad("quantity", "is too large"))?
    } else {
        units
    };
    if raw == 0 {
        return Err(bad("quantity", "must not be zero"));
    }
    Ok(if negative { -raw } else { raw })
}

impl AdjustmentSpec {
    /// Validates `body` against the catalog at `now_ms`; the first problem found.
    pub fn parse(body: &[u8], catalog: &Catalog, now_ms: i64, max_lateness_ms: i64) -> Result<AdjustmentSpec, SpecError> {
        let body: Body<'_> = serde_json::from_slice(body).map_err(|e| bad("body", e.to_string()))?;
        let id = string(body.id, "id", 128)?;
        let customer = string(body.customer, "customer", 256)?;
        if customer.chars().any(char::is_control) {
            return Err(bad("customer", "must not contain control characters"));
        }
        let meter_name = string(body.meter, "meter", 64)?;
        let meter = catalog.meter_by_name(&meter_name).ok_or_else(|| bad("meter", format!("unknown meter {meter_name:?}")))?;
        if !matches!(meter.aggregation, Aggregation::Sum | Aggregation::Count) {
            return Err(bad("meter", "adjustments apply to sum and count meters only"));
        }
        let quantity = body.quantity.ok_or_else(|| bad("quantity", "is required"))?;
        let raw = signed_quantity(quantity.get(), meter)?;
        let ts = match &body.timestamp {
            None => now_ms,
            Some(t) => {
                let text = t.get();
                let parsed = if text.starts_with('"') {
                    serde_json::from_str::<String>(text).ok().and_then(|s| window::parse_rfc3339(&s))
                } else {
                    text.parse::<i64>().ok()
                };
                parsed.ok_or_else(|| bad("timestamp", "must be an RFC 3339 timestamp or integer Unix milliseconds"))?
            }
        };
        if ts > now_ms + MAX_AHEAD_MS {
            return Err(bad("timestamp", "is more than 5 minutes in the future"));
        }
        if ts < now_ms - max_lateness_ms {
            return Err(bad("timestamp", "is older than ingest.max_lateness"));
        }
        let reason = string(body.reason, "reason", MAX_REASON)?;
        Ok(AdjustmentSpec { id, customer, meter: meter_name, raw, ts, ts_given: body.timestamp.is_some(), reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(aggregation: Aggregation, precision: u8) -> Meter {
        Meter { id: 0, name: "m".into(), aggregation, precision, stripe_event_name: None, unique_property: None, group_by: Vec::new() }
    }

    #[test]
    fn quantities_are_signed_and_exact() {
        let m = meter(Aggregation::Sum, 2);
        assert_eq!(signed_quantity("-12.5", &m), Ok(-1250));
        assert_eq!(signed_quantity("0.01", &m), Ok(1));
        assert_eq!(signed_quantity("-0.001", &m).unwrap_err().field, "quantity");
        assert_eq!(signed_quantity("0", &m).unwrap_err().reason, "must not be zero");
        assert_eq!(signed_quantity("--1", &m).unwrap_err().field, "quantity");
        let c = meter(Aggregation::Count, 0);
        assert_eq!(signed_quantity("-3", &c), Ok(-3));
        assert_eq!(signed_quantity("1.5", &c).unwrap_err().reason, "must be a whole count on a count meter");
    }
}
