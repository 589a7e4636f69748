//! Request and answer bodies of the API (docs/api.md). Answers keep unknown
//! fields out of the way: new fields meterd adds do not break the client.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A usage event. `id` and `timestamp` are filled in by `track()` when absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub customer: String,
    pub meter: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<f64>,
    /// An RFC 3339 string or Unix milliseconds; default: when tracked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

impl Event {
    /// One unit of `meter` for `customer`, now.
    pub fn new(customer: impl Into<String>, meter: impl Into<String>) -> Event {
        Event { id: None, customer: customer.into(), meter: meter.into(), quantity: None, timestamp: None, properties: None }
    }
    pub fn quantity(mut self, q: f64) -> Event {
        self.quantity = Some(q);
        self
    }
    pub fn id(mut self, id: impl Into<String>) -> Event {
        self.id = Some(id.into());
        self
    }
    pub fn property(mut self, k: impl Into<String>, v: impl Into<String>) -> Event {
        self.properties.get_or_insert_with(BTreeMap::new).insert(k.into(), v.into());
        self
    }
}

/// `202` of `POST /v1/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Ingested {
    pub accepted: u64,
    pub duplicates: u64,
}

/// One limit in a check answer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LimitState {
    pub window: String,
    pub limit: Option<f64>,
    pub used: f64,
    #[serde(default)]
    pub held: f64,
    pub remaining: Option<f64>,
    pub resets_at: Option<String>,
    pub hard: bool,
}

/// The answer of `POST /v1/check` (and the check part of a reservation).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CheckResult {
    pub allowed: bool,
    pub customer: String,
    pub meter: String,
    pub quantity: f64,
    pub used: f64,
    #[serde(default)]
    pub held: f64,
    pub limit: Option<f64>,
    pub remaining: Option<f64>,
    pub window: Option<String>,
    pub resets_at: Option<String>,
    pub hard: bool,
    /// `within_limit`, `limit_exceeded`, `soft_limit_exceeded`, `unlimited`,
    /// `not_entitled`, `insufficient_credits`, `unavailable`.
    pub reason: String,
    #[serde(default)]
    pub limits: Vec<LimitState>,
}

/// A reservation as meterd shows it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Reservation {
    pub id: String,
    #[serde(default)]
    pub customer: String,
    #[serde(default)]
    pub meter: String,
    /// `held`, `denied`, `settled`, `released`, `expired`.
    pub status: String,
    pub quantity: f64,
    pub expires_at: Option<String>,
    #[serde(default)]
    pub settled_quantity: Option<f64>,
}

/// The answer of `POST /v1/reservations`: a check answer and the reservation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Reserved {
    #[serde(flatten)]
    pub check: CheckResult,
    pub reservation: Reservation,
}

#[derive(Deserialize)]
pub(crate) struct ReservationBody {
    pub reservation: Reservation,
}

/// One row of `GET /v1/customers/{c}/usage`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UsageRow {
    pub meter: String,
    pub window: String,
    pub used: f64,
    #[serde(default)]
    pub held: f64,
    pub limit: Option<f64>,
    pub remaining: Option<f64>,
    pub percent: Option<f64>,
    pub resets_at: Option<String>,
    pub hard: bool,
}

/// `GET /v1/customers/{c}/usage`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CustomerUsage {
    pub customer: String,
    pub plan: String,
    pub meters: Vec<UsageRow>,
    #[serde(default)]
    pub features: BTreeMap<String, bool>,
}

/// One point of `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UsagePoint {
    pub customer: String,
    pub start: String,
    pub end: String,
    pub value: f64,
    #[serde(default)]
    pub group: Option<BTreeMap<String, Option<String>>>,
}

/// `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UsageSeries {
    pub meter: String,
    pub granularity: String,
    pub data: Vec<UsagePoint>,
    #[serde(default)]
    pub truncated: bool,
}

/// The query of `GET /v1/usage`: `from` and `to` are RFC 3339 or Unix ms.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub meter: String,
    pub from: String,
    pub to: String,
    pub granularity: Option<String>,
    pub customer: Option<String>,
    pub group_by: Option<String>,
}

/// A credit balance.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Balance {
    pub meter: String,
    pub balance: f64,
    pub granted: f64,
    pub used: f64,
    pub next_expiry: Option<serde_json::Value>,
}

/// `GET /v1/customers/{c}/balances`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Balances {
    pub customer: String,
    pub balances: Vec<Balance>,
}

/// `POST /v1/customers/{c}/grants`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GrantRequest {
    pub id: String,
    pub meter: String,
    pub amount: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A grant as meterd shows it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Grant {
    pub id: String,
    pub meter: String,
    pub amount: f64,
    pub remaining: f64,
    pub priority: i64,
    pub effective_at: String,
    pub expires_at: Option<String>,
    /// `active`, `pending`, `expired`, `spent`, `voided`.
    pub status: String,
    pub reason: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct GrantsBody {
    pub grants: Vec<Grant>,
}
