//! The answer to a limit check, as the API returns it: plain values, so the
//! state layer (a consume's remembered answer) can hold one without knowing the
//! service that computes it.

use super::window::Rfc3339;
use super::Decimal;
use compact_str::CompactString;
use serde::Serialize;
use smallvec::SmallVec;

/// An answer's limits: nearly always one, held inline (issue 24: a consume's
/// answer is remembered, and each allocation of its own is one more malloc on
/// the request and one more cold free when it is forgotten).
pub type LimitViews = SmallVec<[LimitView; 1]>;

/// Why a check was answered as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    WithinLimit,
    LimitExceeded,
    SoftLimitExceeded,
    Unlimited,
    NotEntitled,
    /// A `strict` limit could not be decided: Redis is unreachable (fail-closed).
    Unavailable,
    /// A hard credits limit: the balance is below the quantity (issue 18).
    InsufficientCredits,
}

impl Reason {
    /// The snake-case label (as serialized; the metrics' `reason` label).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WithinLimit => "within_limit",
            Reason::LimitExceeded => "limit_exceeded",
            Reason::SoftLimitExceeded => "soft_limit_exceeded",
            Reason::Unlimited => "unlimited",
            Reason::NotEntitled => "not_entitled",
            Reason::Unavailable => "unavailable",
            Reason::InsufficientCredits => "insufficient_credits",
        }
    }
}

/// One limit in an answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitView {
    pub window: &'static str,
    pub limit: Option<Decimal>,
    pub used: Decimal,
    /// Held by reservations (issue 19): counted against the limit, not usage.
    pub held: Decimal,
    pub remaining: Option<Decimal>,
    pub resets_at: Option<Rfc3339>,
    pub hard: bool,
}

/// The `200` body of `/v1/check`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckAnswer {
    pub allowed: bool,
    /// Inline up to 24 bytes (most customer and meter names): see [`LimitViews`].
    pub customer: CompactString,
    pub meter: CompactString,
    pub quantity: Decimal,
    pub used: Decimal,
    /// Held by reservations (issue 19): counted against the limit, not usage.
    pub held: Decimal,
    pub limit: Option<Decimal>,
    pub remaining: Option<Decimal>,
    pub window: Option<&'static str>,
    pub resets_at: Option<Rfc3339>,
    pub hard: bool,
    pub reason: Reason,
    pub limits: LimitViews,
}

#[cfg(test)]
impl CheckAnswer {
    /// An answer with zero figures and no limits, for unit tests.
    pub fn bare(allowed: bool, reason: Reason) -> CheckAnswer {
        let d = Decimal { raw: 0, precision: 0 };
        CheckAnswer {
            allowed,
            customer: "c".into(),
            meter: "m".into(),
            quantity: d,
            used: d,
            held: d,
            limit: None,
            remaining: None,
            window: None,
            resets_at: None,
            hard: true,
            reason,
            limits: LimitViews::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_match_the_serialized_names() {
        for r in [
            Reason::WithinLimit,
            Reason::LimitExceeded,
            Reason::SoftLimitExceeded,
            Reason::Unlimited,
            Reason::NotEntitled,
            Reason::Unavailable,
            Reason::InsufficientCredits,
        ] {
            assert_eq!(serde_json::to_value(r).ok(), Some(serde_json::Value::String(r.as_str().into())));
        }
    }
}
