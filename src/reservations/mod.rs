//! Reservations (issue 19): hold quantity before the work, settle the actual
//! after it, release the rest, or let the hold expire. With no expiry a
//! reservation is an allocation (a seat, a project), held until released.
//!
//! A reservation is decided like a consume — every hard limit and credit
//! balance must fit `used + held + quantity` — under the `(customer, meter)`
//! consume lock, so racing reservations never hold past a hard limit. The hold
//! itself lives in the hold book ([`crate::holds`]), never in the counters: it
//! is not usage. A settle records its quantity as usage exactly like a consume
//! (the reservation id is the event id: claimed in the dedupe set, written to
//! the WAL, folded through the usage seam), then finishes the reservation; a
//! crash between the two is repaired by the retry, which finds the id already
//! used and records nothing more.
//!
//! With Redis the reservations and held totals live there instead (see
//! `shared`): holds count on every instance and any instance settles,
//! releases or expires them.

mod shared;

use crate::counters::{CustomerId, Usage};
use crate::dedupe::hash_id;
use crate::engine::{now_ms, Engine};
use crate::holds::{HoldBook, HoldError, Reservation, Status};
use crate::limits::{answer, decide, CheckAnswer, LimitsPorts};
use crate::model::window::{parse_rfc3339, rfc3339};
use crate::model::{Aggregation, Decimal, Meter};
use crate::usage::Origin;
use crate::wal::RecordBuilder;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// How often expired holds are released and finished reservations swept.
pub const EXPIRY_INTERVAL: Duration = Duration::from_millis(500);

/// Why a reservation request failed.
#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("no reservation {0:?}")]
    NotFound(String),
    /// The id exists with another body, or cannot be settled any more.
    #[error("{0}")]
    Conflict(String),
    #[error("customer table is full")]
    CustomersFull,
    #[error("the reservation table is full ({0} reservations)")]
    Full(usize),
    /// Writes are refused for now (store behind, WAL or journal write failed).
    #[error("{0}")]
    Unavailable(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ReservationError {
    ReservationError::Invalid { field, reason: reason.into() }
}

impl From<HoldError> for ReservationError {
    fn from(e: HoldError) -> Self {
        match e {
            HoldError::Full(n) => ReservationError::Full(n),
            HoldError::Journal(e) => ReservationError::Unavailable(format!("could not write the hold journal: {e}")),
        }
    }
}

/// A parsed `POST /v1/reservations` body.
#[derive(Debug, Clone)]
pub struct ReserveRequest {
    pub id: String,
    pub customer: String,
    pub meter: String,
    pub quantity_text: Option<String>,
    /// `None`: an allocation.
    pub expires_in: Option<Duration>,
}

/// A parsed settle body.
#[derive(Debug, Clone, Default)]
pub struct SettleRequest {
    /// `None`: the quantity held.
    pub quantity_text: Option<String>,
    /// Unix ms of the usage; `None`: now.
    pub timestamp: Option<i64>,
}

fn object(body: &[u8], known: &[&str]) -> Result<serde_json::Map<String, Value>, ReservationError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| ReservationError::Json(e.to_string()))?;
    let Value::Object(map) = value else { return Err(invalid("body", "must be a JSON object")) };
    if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(invalid("body", format!("unknown field {k:?}")));
    }
    Ok(map)
}

fn string(map: &serde_json::Map<String, Value>, field: &'static str) -> Result<Option<String>, ReservationError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(field, "must be a string")),
    }
}

fn number(map: &serde_json::Map<String, Value>, field: &'static str) -> Result<Option<String>, ReservationError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(invalid(field, "must be a number")),
    }
}

impl ReserveRequest {
    /// Reads the JSON body, naming the first bad field.
    pub fn from_json(body: &[u8]) -> Result<ReserveRequest, ReservationError> {
        let map = object(body, &["id", "customer", "meter", "quantity", "expires_in"])?;
        let id = string(&map, "id")?.ok_or_else(|| invalid("id", "is required"))?;
        if id.is_empty() || id.len() > 128 {
            return Err(invalid("id", "must be 1-128 bytes"));
        }
        let customer = string(&map, "customer")?.ok_or_else(|| invalid("customer", "is required"))?;
        if customer.is_empty() || customer.len() > 256 || customer.chars().any(char::is_control) {
            return Err(invalid("customer", "must be 1-256 bytes without control characters"));
        }
        let meter = string(&map, "meter")?.ok_or_else(|| invalid("meter", "is required"))?;
        let quantity_text = number(&map, "quantity")?;
        let expires_in = match string(&map, "expires_in")? {
            None => None,
            Some(text) => match crate::duration::parse(&text) {
                Ok(d) if !d.is_zero() => Some(d),
                Ok(_) => return Err(invalid("expires_in", "must be positive (omit it or use null for an allocation)")),
                Err(e) => return Err(invalid("expires_in", e.to_string())),
            },
        };
        Ok(ReserveRequest { id, customer, meter, quantity_text, expires_in })
    }
}

impl SettleRequest {
    /// Reads the JSON body (may be empty).
    pub fn from_json(body: &[u8]) -> Result<SettleRequest, ReservationError> {
        let map = object(body, &["quantity", "timestamp"])?;
        let quantity_text = number(&map, "quantity")?;
        let timestamp = match string(&map, "timestamp")? {
            None => None,
            Some(t) => Some(parse_rfc3339(&t).ok_or_else(|| invalid("timestamp", "must be an RFC 3339 time"))?),
        };
        Ok(SettleRequest { quantity_text, timestamp })
    }
}

/// Reservations per listing by default, and at most.
pub const DEFAULT_LIST_LIMIT: usize = 100;
pub const MAX_LIST_LIMIT: usize = 1000;

/// A parsed `GET /v1/reservations` query.
#[derive(Debug, Clone, PartialEq)]
pub struct ListRequest {
    pub customer: String,
    pub meter: Option<String>,
    pub status: Option<Status>,
    pub limit: usize,
}

impl ListRequest {
    /// Reads the query parameters, naming the first bad one.
    pub fn from_query(query: &std::collections::BTreeMap<String, String>) -> Result<ListRequest, ReservationError> {
        if let Some(k) = query.keys().find(|k| !matches!(k.as_str(), "customer" | "meter" | "status" | "limit")) {
            return Err(ReservationError::Invalid { field: "query", reason: format!("unknown query parameter {k:?}") });
        }
        let customer = query.get("customer").cloned().ok_or_else(|| invalid("customer", "is required"))?;
        if customer.is_empty() || customer.len() > 256 || customer.chars().any(char::is_control) {
            return Err(invalid("customer", "must be 1-256 bytes without control characters"));
        }
        let meter = match query.get("meter") {
            Some(m) if m.is_empty() => return Err(invalid("meter", "must not be empty")),
            m => m.cloned(),
        };
        let status = match query.get("status") {
            None => None,
            Some(text) => Some(Status::parse(text).ok_or_else(|| invalid("status", "must be held, settled, released, expired or denied"))?),
        };
        let limit = match query.get("limit") {
            None => DEFAULT_LIST_LIMIT,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => n,
                _ => return Err(invalid("limit", format!("must be an integer between 1 and {MAX_LIST_LIMIT}"))),
            },
        };
        Ok(ListRequest { customer, meter, status, limit })
    }

    fn keeps(&self, r: &Reservation) -> bool {
        self.meter.as_ref().is_none_or(|m| *m == r.meter) && self.status.is_none_or(|s| s == r.status)
    }
}

/// A reservation as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReservationView {
    pub id: String,
    pub customer: String,
    pub meter: String,
    pub status: Status,
    pub quantity: Decimal,
    pub expires_at: Option<String>,
    pub settled_quantity: Option<Decimal>,
}

impl ReservationView {
    fn of(r: &Reservation, precision: u8) -> ReservationView {
        let d = |raw| Decimal { raw, precision };
        ReservationView {
            id: r.id.clone(),
            customer: r.customer.clone(),
            meter: r.meter.clone(),
            status: r.status,
            quantity: d(r.quantity),
            expires_at: r.expires_at.map(rfc3339),
            settled_quantity: r.settled_quantity.map(d),
        }
    }
}

/// The answer to `POST /v1/reservations`: a check answer plus the reservation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReserveAnswer {
    #[serde(flatten)]
    pub check: CheckAnswer,
    pub reservation: ReservationView,
}

/// The answer to `GET /v1/reservations`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReservationList {
    pub reservations: Vec<ReservationView>,
}

/// The answer to settle, release and get.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReservationAnswer {
    pub reservation: ReservationView,
}

/// What reservations need of the engine: the limits' ports (decisions, the
/// consume locks, the dedupe set, the WAL, the usage seam) and the hold book.
#[derive(Clone, Copy)]
pub struct ReservationPorts<'a> {
    pub limits: LimitsPorts<'a>,
    pub holds: &'a HoldBook,
}

impl Engine {
    /// Reservations' view of the state.
    pub fn reservation_ports(&self) -> ReservationPorts<'_> {
        ReservationPorts { limits: self.limits_ports(), holds: self.holds() }
    }
}

impl ReservationPorts<'_> {
    fn meter(&self, name: &str) -> Result<&Meter, ReservationError> {
        self.limits.reads.catalog.meter_by_name(name).ok_or_else(|| invalid("meter", format!("unknown meter {name:?}")))
    }

    fn precision_of(&self, r: &Reservation) -> u8 {
        self.limits.reads.catalog.meter_by_name(&r.meter).map_or(0, |m| m.precision)
    }

    fn view(&self, r: &Reservation) -> ReservationAnswer {
        ReservationAnswer { reservation: ReservationView::of(r, self.precision_of(r)) }
    }

    /// `POST /v1/reservations`: decides and, when allowed, holds.
    pub async fn reserve(&self, req: ReserveRequest) -> Result<ReserveAnswer, ReservationError> {
        let meter = self.meter(&req.meter)?;
        if !matches!(meter.aggregation, Aggregation::Sum | Aggregation::Count) {
            return Err(invalid("meter", format!("{:?} is not a sum or count meter: only those can be reserved", meter.name)));
        }
        let quantity = match &req.quantity_text {
            None => meter.scale(),
            Some(text) => crate::model::quantity::parse_decimal(text, meter.precision).map_err(|e| invalid("quantity", e.to_string()))?,
        };
        if quantity <= 0 {
            return Err(invalid("quantity", "must be positive"));
        }
        if let Some(redis) = self.shared() {
            return self.reserve_shared(redis, &req, meter, quantity).await;
        }
        if let Some(answer) = self.repeated(&req, meter, quantity)? {
            return Ok(answer);
        }
        let customer = self.limits.reads.counters.interner.intern(&req.customer).map_err(|_| ReservationError::CustomersFull)?;
        if let Some(reason) = self.limits.write_gate.refusal() {
            return Err(ReservationError::Unavailable(reason));
        }
        let ent = self.limits.reads.entitlements.get(Some(customer));
        let limits = ent.limits(meter.id).cloned().unwrap_or_default();
        let guard = self.limits.consume_locks.lock(customer, meter.id).await;
        // A racing request with the same id may have decided while we waited.
        if let Some(answer) = self.repeated(&req, meter, quantity)? {
            return Ok(answer);
        }
        let now = now_ms();
        let mut states = self.limits.reads.limit_states(Some(customer), meter, &ent, &limits, now);
        let verdict = decide(&states, quantity);
        let status = if verdict.allowed { Status::Held } else { Status::Denied };
        let expires_at = req.expires_in.map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
        let r = Reservation {
            id: req.id.clone(),
            customer: req.customer.clone(),
            meter: meter.name.clone(),
            quantity,
            expires_at,
            status,
            settled_quantity: None,
            created_ms: now,
            finished_ms: if verdict.allowed { 0 } else { now },
        };
        if verdict.allowed {
            for s in &mut states {
                s.held = s.held.saturating_add(quantity);
            }
        }
        let check = Arc::new(answer(&req.customer, meter, quantity, &states, verdict));
        self.holds.insert(r.clone(), customer, meter.id, check.clone())?;
        // A consume decided without the lock (one hard limit, compare-and-swap)
        // may have passed meanwhile: re-checked once the hold is visible (see
        // `LimitsPorts::consume_cas`, which re-checks the other way round).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let (r, check) = if verdict.allowed { self.withdraw_if_over(r, check, (customer, meter, &ent, &limits), now)? } else { (r, check) };
        drop(guard);
        crate::telemetry::hold_status(r.status.as_str());
        tracing::debug!(id = %r.id, status = r.status.as_str(), "reservation decided");
        Ok(ReserveAnswer { check: (*check).clone(), reservation: ReservationView::of(&r, meter.precision) })
    }

    /// Withdraws a hold just taken if, with it, a hard limit is passed: a
    /// consume won the race. The reservation is then denied.
    fn withdraw_if_over(
        &self,
        r: Reservation,
        check: Arc<CheckAnswer>,
        (customer, meter, ent, limits): (CustomerId, &Meter, &crate::model::Entitlements, &[crate::model::Limit]),
        now: i64,
    ) -> Result<(Reservation, Arc<CheckAnswer>), ReservationError> {
        let mut states = self.limits.reads.limit_states(Some(customer), meter, ent, limits, now);
        if !states.iter().any(|s| s.limit.hard && s.exceeded_by(0)) {
            return Ok((r, check));
        }
        for s in &mut states {
            s.held = s.held.saturating_sub(r.quantity);
        }
        let verdict = decide(&states, r.quantity);
        let check = Arc::new(answer(&r.customer, meter, r.quantity, &states, verdict));
        let r = self.holds.finish(&r.id, Status::Denied, None, now)?.unwrap_or(r);
        self.holds.set_answer(&r.id, check.clone());
        tracing::debug!(id = %r.id, "a hold was withdrawn: a consume passed the limit meanwhile");
        Ok((r, check))
    }

    /// The answer to a reservation id seen before: the first answer (or, after
    /// a restart, the state now) with the reservation as it stands; a
    /// different body under the same id is a conflict.
    fn repeated(&self, req: &ReserveRequest, meter: &Meter, quantity: i64) -> Result<Option<ReserveAnswer>, ReservationError> {
        let Some((r, first)) = self.holds.get_answered(&req.id) else { return Ok(None) };
        if r.customer != req.customer || r.meter != meter.name || r.quantity != quantity {
            return Err(ReservationError::Conflict(format!("reservation {:?} exists with another customer, meter or quantity", req.id)));
        }
        let check = match first {
            Some(a) => (*a).clone(),
            None => {
                let (states, mut verdict) = self.limits.reads.evaluate(&r.customer, meter, 0, now_ms());
                verdict.allowed = r.status != Status::Denied;
                answer(&r.customer, meter, quantity, &states, verdict)
            }
        };
        Ok(Some(ReserveAnswer { check, reservation: ReservationView::of(&r, meter.precision) }))
    }

    /// `GET /v1/reservations/{id}`.
    pub async fn get(&self, id: &str) -> Result<ReservationAnswer, ReservationError> {
        if let Some(redis) = self.shared() {
            return self.get_shared(redis, id).await;
        }
        let r = self.holds.get(id).ok_or_else(|| ReservationError::NotFound(id.to_string()))?;
        Ok(self.view(&r))
    }

    /// `GET /v1/reservations?customer=C`: the customer's reservations newest
    /// first (held ones, and finished ones within the retention). With Redis
    /// from Redis, so a hold taken on any instance is listed.
    pub async fn list(&self, req: &ListRequest) -> Result<ReservationList, ReservationError> {
        if let Some(m) = &req.meter {
            self.meter(m)?;
        }
        let found = match self.shared() {
            Some(redis) => crate::holds::shared::list(redis, &req.customer, |r| req.keeps(r), req.limit).await?,
            None => self.holds.list(&req.customer, |r| req.keeps(r), req.limit),
        };
        Ok(ReservationList { reservations: found.iter().map(|r| ReservationView::of(r, self.precision_of(r))).collect() })
    }

    /// `POST /v1/reservations/{id}/settle`: records the quantity as usage under
    /// the reservation's id and releases the hold. Settled already: the first
    /// result, nothing recorded.
    pub async fn settle(&self, id: &str, req: SettleRequest) -> Result<ReservationAnswer, ReservationError> {
        if let Some(redis) = self.shared() {
            return self.settle_shared(redis, id, req).await;
        }
        let r = self.holds.get(id).ok_or_else(|| ReservationError::NotFound(id.to_string()))?;
        let meter = self.meter(&r.meter)?;
        let quantity = match &req.quantity_text {
            None => r.quantity,
            Some(text) => crate::model::quantity::parse_decimal(text, meter.precision).map_err(|e| invalid("quantity", e.to_string()))?,
        };
        if quantity < 0 {
            return Err(invalid("quantity", "must not be negative"));
        }
        let now = now_ms();
        let ts = req.timestamp.unwrap_or(now);
        if ts > now + 5 * 60_000 {
            return Err(invalid("timestamp", "is more than 5 minutes in the future"));
        }
        let Some((customer, _)) = self.holds.ids_of(id) else { return Err(ReservationError::NotFound(id.to_string())) };
        let _guard = self.limits.consume_locks.lock(customer, meter.id).await;
        let r = self.holds.get(id).ok_or_else(|| ReservationError::NotFound(id.to_string()))?;
        match r.status {
            Status::Held => {}
            Status::Settled => return Ok(self.view(&r)),
            other => return Err(ReservationError::Conflict(format!("reservation {id:?} is {}: it cannot be settled", other.as_str()))),
        }
        if let Some(reason) = self.limits.write_gate.refusal() {
            return Err(ReservationError::Unavailable(reason));
        }
        if quantity > 0 {
            self.record(&r, customer, meter, quantity, ts, now, None).await?;
        }
        let done = self.holds.finish(id, Status::Settled, Some(quantity), now_ms())?;
        crate::telemetry::hold_status(Status::Settled.as_str());
        Ok(self.view(&done.unwrap_or(r)))
    }

    /// Records a settle's usage like a consume: the id claimed (with Redis:
    /// also in the shared dedupe claim, as events' ids are), the WAL written,
    /// the usage folded through the seam. An id already used (a settle that
    /// crashed after recording, or one recorded on another instance) records
    /// nothing more.
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        r: &Reservation,
        customer: CustomerId,
        meter: &Meter,
        raw: i64,
        ts: i64,
        now: i64,
        redis: Option<&crate::redis_link::Redis>,
    ) -> Result<(), ReservationError> {
        let id_hash = hash_id(&r.id);
        if !self.limits.deduper.insert(id_hash, now) {
            tracing::info!(id = %r.id, "a settle's usage was recorded before; nothing more is recorded");
            return Ok(());
        }
        if let Some(redis) = redis {
            match crate::ingest::shared_dedupe::claim(redis, self.limits.instance_id, &[id_hash], self.limits.dedupe_window_ms).await {
                // Recorded by another instance: the id stays used here too.
                Ok(new) if new.first() == Some(&false) => {
                    tracing::info!(id = %r.id, "a settle's usage was recorded on another instance; nothing more is recorded");
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    self.limits.deduper.remove(id_hash);
                    return Err(ReservationError::Unavailable(format!("could not claim the settle's id in redis: {e}")));
                }
            }
        }
        let mut b = RecordBuilder::new(now, 1);
        b.push::<&str, &str>(id_hash, customer, &r.customer, meter.id, &meter.name, raw, ts, &[]);
        let seq = match self.limits.wal.append(b).await {
            Ok(seq) => seq,
            Err(e) => {
                self.limits.deduper.remove(id_hash);
                return Err(ReservationError::Unavailable(format!("could not write the WAL: {e}")));
            }
        };
        let ent = self.limits.reads.entitlements.get(Some(customer));
        let usage = Usage { customer, meter, raw, ts, properties: &[], props_hash: 0, anchor: ent.billing_anchor };
        self.limits.usage.fold(&usage, None, Origin::Live, || self.limits.wal.tracker.folded(seq));
        Ok(())
    }

    /// `POST /v1/reservations/{id}/release`: the hold is released, nothing is
    /// recorded. A reservation no longer held is answered as it stands.
    pub async fn release(&self, id: &str) -> Result<ReservationAnswer, ReservationError> {
        if let Some(redis) = self.shared() {
            return self.release_shared(redis, id).await;
        }
        self.finish(id, Status::Released).await
    }

    async fn finish(&self, id: &str, status: Status) -> Result<ReservationAnswer, ReservationError> {
        let Some((customer, meter)) = self.holds.ids_of(id) else { return Err(ReservationError::NotFound(id.to_string())) };
        let _guard = self.limits.consume_locks.lock(customer, meter).await;
        let r = match self.holds.finish(id, status, None, now_ms())? {
            Some(r) => {
                crate::telemetry::hold_status(r.status.as_str());
                r
            }
            None => self.holds.get(id).ok_or_else(|| ReservationError::NotFound(id.to_string()))?,
        };
        Ok(self.view(&r))
    }

    /// Releases every hold whose expiry passed (also those that passed while
    /// meterd was down) and forgets old finished reservations.
    pub async fn expire(&self, now: i64) -> Result<usize, ReservationError> {
        if let Some(redis) = self.shared() {
            return self.expire_shared(redis, now).await;
        }
        let due = self.holds.due(now);
        let n = due.len();
        for (id, _, _) in due {
            self.finish(&id, Status::Expired).await?;
            tracing::debug!(id = %id, "a reservation expired; its hold is released");
        }
        self.holds.sweep(now)?;
        Ok(n)
    }
}

/// The expiry task: every [`EXPIRY_INTERVAL`], releases expired holds. Runs
/// under `health::supervise` until `stop`.
pub async fn run_expiry(engine: Arc<Engine>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if let Err(e) = engine.reservation_ports().expire(now_ms()).await {
            tracing::warn!(error = %e, "releasing expired holds failed; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(EXPIRY_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}
