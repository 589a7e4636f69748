//! Prepaid credit grants (API.md part 2, "Prepaid credits and grants"): the
//! request that creates one, validated field by field, and the document stored
//! with the entitlements. Plain data, so the stores (state) and the credit book
//! can share it without knowing the service that makes grants.

use super::quantity::parse_decimal;
use super::window::parse_rfc3339;
use super::Catalog;
use serde_json::Value;

/// The default `priority` of a grant (lower is spent first).
pub const DEFAULT_PRIORITY: i64 = 10;

/// A grant as stored: what was asked for, when it was made, whether it was
/// voided. `amount` is kept as the decimal text given, so a change of the
/// meter's precision reads it back in the new units.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantDoc {
    pub id: String,
    pub meter: String,
    pub amount: String,
    pub priority: i64,
    pub effective_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voided_at_ms: Option<i64>,
    /// Raw units the void took away (what was left then): the grant counts as
    /// `amount` minus this from then on, so what it paid stays paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voided_raw: Option<i64>,
    /// The request's fields as given (canonical JSON): a repeat with the same
    /// body is the same grant, another body under the same id a conflict.
    pub request: String,
}

/// A grant to make, from code (the Stripe webhooks) or from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSpec {
    pub id: String,
    pub meter: String,
    /// Decimal text in meter units (> 0, at most the meter's precision).
    pub amount: String,
    pub priority: Option<i64>,
    pub effective_at_ms: Option<i64>,
    pub expires_at_ms: Option<i64>,
    pub reason: Option<String>,
}

/// A bad grant field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct GrantProblem {
    pub field: &'static str,
    pub reason: String,
}

fn problem(field: &'static str, reason: impl Into<String>) -> GrantProblem {
    GrantProblem { field, reason: reason.into() }
}

impl GrantSpec {
    /// Reads a `POST /v1/customers/{c}/grants` body, naming the first bad field.
    pub fn from_json(value: &Value) -> Result<GrantSpec, GrantProblem> {
        let Value::Object(map) = value else {
            return Err(problem("body", "must be a JSON object"));
        };
        for key in map.keys() {
            if !matches!(key.as_str(), "id" | "meter" | "amount" | "priority" | "effective_at" | "expires_at" | "reason") {
                return Err(problem("body", format!("unknown field {key:?}")));
            }
        }
        let string = |field: &'static str| -> Result<Option<String>, GrantProblem> {
            match map.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(problem(field, "must be a string")),
            }
        };
        let time = |field: &'static str| -> Result<Option<i64>, GrantProblem> {
            match string(field)? {
                None => Ok(None),
                Some(t) => parse_rfc3339(&t).map(Some).ok_or_else(|| problem(field, "must be an RFC 3339 timestamp")),
            }
        };
        let id = string("id")?.ok_or_else(|| problem("id", "is required"))?;
        let meter = string("meter")?.ok_or_else(|| problem("meter", "is required"))?;
        let amount = match map.get("amount") {
            None | Some(Value::Null) => return Err(problem("amount", "is required")),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => return Err(problem("amount", "must be a number")),
        };
        let priority = match map.get("priority") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_i64().ok_or_else(|| problem("priority", "must be an integer"))?),
            Some(_) => return Err(problem("priority", "must be an integer")),
        };
        Ok(GrantSpec {
            id,
            meter,
            amount,
            priority,
            effective_at_ms: time("effective_at")?,
            expires_at_ms: time("expires_at")?,
            reason: string("reason")?,
        })
    }

    /// Checks every field against the catalog and makes the document to store
    /// (`now` fills a missing `effective_at`). Returns the amount in raw units.
    pub fn validate(&self, catalog: &Catalog, now: i64) -> Result<(GrantDoc, i64), GrantProblem> {
        if self.id.is_empty() || self.id.len() > 128 || self.id.chars().any(char::is_control) {
            return Err(problem("id", "must be 1-128 bytes without control characters"));
        }
        let meter = catalog.meter_by_name(&self.meter).ok_or_else(|| problem("meter", format!("unknown meter {:?}", self.meter)))?;
        let raw = parse_decimal(&self.amount, meter.precision).map_err(|e| problem("amount", e.to_string()))?;
        if raw <= 0 {
            return Err(problem("amount", "must be greater than 0"));
        }
        let priority = self.priority.unwrap_or(DEFAULT_PRIORITY);
        if !(0..=1_000_000).contains(&priority) {
            return Err(problem("priority", "must be between 0 and 1000000"));
        }
        let effective_at_ms = self.effective_at_ms.unwrap_or(now);
        if let Some(expires) = self.expires_at_ms {
            if expires <= effective_at_ms {
                return Err(problem("expires_at", "must be after effective_at"));
            }
        }
        if let Some(reason) = &self.reason {
            if reason.len() > 256 || reason.chars().any(char::is_control) {
                return Err(problem("reason", "must be at most 256 bytes without control characters"));
            }
        }
        let request = serde_json::json!({
            "id": self.id, "meter": self.meter, "amount": raw, "priority": priority,
            "effective_at": self.effective_at_ms, "expires_at": self.expires_at_ms, "reason": self.reason,
        })
        .to_string();
        let doc = GrantDoc {
            id: self.id.clone(),
            meter: self.meter.clone(),
            amount: self.amount.clone(),
            priority,
            effective_at_ms,
            expires_at_ms: self.expires_at_ms,
            reason: self.reason.clone(),
            created_at_ms: now,
            voided_at_ms: None,
            voided_raw: None,
            request,
        };
        Ok((doc, raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Aggregation, Meter};
    use serde_json::json;

    fn catalog() -> Catalog {
        let m = Meter {
            id: 0,
            name: "ai_tokens".into(),
            aggregation: Aggregation::Sum,
            precision: 0,
            stripe_event_name: None,
            unique_property: None,
            group_by: Vec::new(),
        };
        Catalog::new(vec![m], Vec::new(), 0)
    }

    #[test]
    fn names_the_bad_field() {
        let c = catalog();
        let bad = |v: Value| GrantSpec::from_json(&v).and_then(|s| s.validate(&c, 0).map(|_| ())).err().map(|p| p.field);
        assert_eq!(bad(json!({"meter": "ai_tokens", "amount": 1})), Some("id"));
        assert_eq!(bad(json!({"id": "g", "meter": "nope", "amount": 1})), Some("meter"));
        assert_eq!(bad(json!({"id": "g", "meter": "ai_tokens", "amount": 0})), Some("amount"));
        assert_eq!(bad(json!({"id": "g", "meter": "ai_tokens", "amount": 1.5})), Some("amount"));
        assert_eq!(bad(json!({"id": "g", "meter": "ai_tokens", "amount": 1, "expires_at": "soon"})), Some("expires_at"));
        assert_eq!(bad(json!({"id": "g", "meter": "ai_tokens", "amount": 1, "colour": 1})), Some("body"));
        assert_eq!(bad(json!({"id": "g", "meter": "ai_tokens", "amount": 1})), None);
    }

    #[test]
    fn same_body_same_request_text() {
        let c = catalog();
        let spec = GrantSpec::from_json(&json!({"id": "g", "meter": "ai_tokens", "amount": 5})).map_err(|e| e.to_string());
        let spec = spec.unwrap_or_else(|e| panic!("{e}"));
        let a = spec.validate(&c, 1).map(|(d, _)| d.request);
        let b = spec.validate(&c, 2).map(|(d, _)| d.request);
        assert_eq!(a, b, "a missing effective_at is not part of the request");
    }
}
