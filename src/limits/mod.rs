//! Limit checks and consumes (`POST /v1/check`) and the usage summary.
//!
//! A plain check reads window counters and decides; it interns nothing, so
//! checking unknown customers costs no memory. A consume decides and records in
//! one step: with a single hard limit on a `sum`/`count` meter it adds with a
//! compare-and-swap that refuses to pass the limit; with several limits (all must
//! allow, atomically) or a gauge it holds the `(customer, meter)` stripe lock.
//! Either way concurrent consumes can never together pass a hard limit, and the
//! last unit is still granted.

pub mod backfill;
pub mod decide;
pub mod fresh;
pub mod leased;
pub mod strict;
pub mod summary;
pub mod unique;

pub use crate::model::{CheckAnswer, LimitView, LimitViews};
pub use decide::{decide, LimitState, LimitStates, Reason, Verdict};

use crate::answers::{AnswerCell, ConsumeAnswers};
use crate::counters::{Counters, CustomerId, Usage};
use crate::dedupe::{hash_id, Deduper, IdHash};
use crate::engine::{now_ms, ConsumeGuard, ConsumeLocks, Engine, WriteGate};
use crate::entitlements::EntitlementCache;
use crate::model::{window::Rfc3339, Aggregation, Catalog, Decimal, Entitlements, Limit, LimitAmount, Meter};
use crate::redis_link::Redis;
use crate::usage::{Origin, UsageSeam};
use crate::wal::{RecordBuilder, Wal};
use compact_str::{CompactString, ToCompactString};
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;

/// A check request that failed validation: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("customer table is full")]
    Full,
    /// Writes are refused for now (store behind, WAL write failed): retry later.
    #[error("{0}")]
    Unavailable(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> CheckError {
    CheckError::Invalid { field, reason: reason.into() }
}

/// A parsed check request. Its strings are inline up to 24 bytes (issue 24:
/// five allocations per consume when they were `String`s).
#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub customer: CompactString,
    pub meter: CompactString,
    pub quantity_text: Option<CompactString>,
    pub consume: bool,
    pub id: Option<CompactString>,
    /// Unique counts (issue 25): the value a `unique_count` check asks about.
    pub value: Option<CompactString>,
}

impl CheckRequest {
    /// Reads the JSON body, naming the first bad field.
    pub fn from_json(body: &[u8]) -> Result<CheckRequest, CheckError> {
        // A well-formed body is read straight into its fields; anything the
        // typed read refuses (a wrong type, an unknown or repeated field, bad
        // JSON) is read again the slow way, which names the problem.
        match serde_json::from_slice::<Fields<'_>>(body) {
            Ok(f) => Ok(CheckRequest {
                customer: f.customer.as_ref().into(),
                meter: f.meter.as_ref().into(),
                quantity_text: f.quantity.map(|n| n.to_compact_string()),
                consume: f.consume.unwrap_or(false),
                id: f.id,
                value: f.value,
            }),
            Err(_) => CheckRequest::from_json_naming_errors(body),
        }
    }

    /// [`CheckRequest::from_json`] through a `serde_json::Value`: slower
    /// (~0.6 µs against ~0.2 µs for a consume), but it names the bad field.
    fn from_json_naming_errors(body: &[u8]) -> Result<CheckRequest, CheckError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| CheckError::Json(e.to_string()))?;
        let Value::Object(map) = value else {
            return Err(invalid("body", "must be a JSON object"));
        };
        for key in map.keys() {
            if !matches!(key.as_str(), "customer" | "meter" | "quantity" | "consume" | "id" | "value") {
                return Err(CheckError::Invalid { field: "body", reason: format!("unknown field {key:?}") });
            }
        }
        let string = |field: &'static str| -> Result<Option<CompactString>, CheckError> {
            match map.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str().into())),
                Some(_) => Err(invalid(field, "must be a string")),
            }
        };
        let customer = string("customer")?.ok_or_else(|| invalid("customer", "is required"))?;
        let meter = string("meter")?.ok_or_else(|| invalid("meter", "is required"))?;
        let quantity_text = match map.get("quantity") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.to_compact_string()),
            Some(_) => return Err(invalid("quantity", "must be a number")),
        };
        let consume = match map.get("consume") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("consume", "must be true or false")),
        };
        let id = string("id")?;
        let value = string("value")?;
        Ok(CheckRequest { customer, meter, quantity_text, consume, id, value })
    }
}

/// The fields of a well-formed check body, borrowed from it where no escape
/// needs decoding. What it accepts, the slow read accepts the same way.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields<'a> {
    #[serde(borrow)]
    customer: Cow<'a, str>,
    #[serde(borrow)]
    meter: Cow<'a, str>,
    #[serde(default)]
    quantity: Option<serde_json::Number>,
    #[serde(default)]
    consume: Option<bool>,
    // Read inline when short (a `Cow` inside an `Option` is never borrowed).
    #[serde(default)]
    id: Option<CompactString>,
    #[serde(default)]
    value: Option<CompactString>,
}

/// A consume being decided: who, what, how much, under which id, when.
#[derive(Clone, Copy)]
pub(crate) struct Consume<'a> {
    pub name: &'a str,
    pub customer: CustomerId,
    pub meter: &'a Meter,
    pub ent: &'a Entitlements,
    pub limits: &'a [Limit],
    pub quantity: i64,
    pub id_hash: u128,
    pub now: i64,
}

/// Renders one limit state.
pub fn view(state: &LimitState, meter: &Meter) -> LimitView {
    let d = |raw| Decimal { raw, precision: meter.precision };
    // Credits (issue 18): window "credits", resets at the next expiry.
    if let LimitAmount::Credits { granted, .. } = state.limit.amount {
        return LimitView {
            window: "credits",
            limit: Some(d(granted)),
            used: d(state.used),
            held: d(state.held),
            remaining: state.remaining().map(d),
            resets_at: (state.window.end_ms != i64::MAX).then_some(Rfc3339(state.window.end_ms)),
            hard: state.limit.hard,
        };
    }
    LimitView {
        window: state.limit.window.as_str(),
        limit: match state.limit.amount {
            LimitAmount::Finite(l) => Some(d(l)),
            LimitAmount::Unlimited | LimitAmount::Credits { .. } => None,
        },
        used: d(state.used),
        held: d(state.held),
        remaining: state.remaining().map(d),
        resets_at: state.window.resets_at().map(Rfc3339),
        hard: state.limit.hard,
    }
}

pub(crate) fn answer(customer: &str, meter: &Meter, quantity: i64, states: &[LimitState], verdict: Verdict) -> CheckAnswer {
    let d = |raw| Decimal { raw, precision: meter.precision };
    let limits: LimitViews = states.iter().map(|s| view(s, meter)).collect();
    match limits.get(verdict.primary).cloned() {
        Some(p) => CheckAnswer {
            allowed: verdict.allowed,
            customer: customer.into(),
            meter: meter.name.as_str().into(),
            quantity: d(quantity),
            used: p.used,
            held: p.held,
            limit: p.limit,
            remaining: p.remaining,
            window: Some(p.window),
            resets_at: p.resets_at,
            hard: p.hard,
            reason: verdict.reason,
            limits,
        },
        // Not entitled: nothing may be used.
        None => CheckAnswer {
            allowed: false,
            customer: customer.into(),
            meter: meter.name.as_str().into(),
            quantity: d(quantity),
            used: d(0),
            held: d(0),
            limit: Some(d(0)),
            remaining: Some(d(0)),
            window: None,
            resets_at: None,
            hard: true,
            reason: Reason::NotEntitled,
            limits,
        },
    }
}

/// The limit a consume may take with compare-and-swap: a single hard, finite
/// limit on a `sum`/`count` meter.
fn cas_limit(c: &Consume<'_>) -> Option<(Limit, i64)> {
    match (c.limits, c.meter.aggregation) {
        ([only], Aggregation::Sum | Aggregation::Count) if only.hard => match only.amount {
            LimitAmount::Finite(l) => Some((*only, l)),
            LimitAmount::Unlimited | LimitAmount::Credits { .. } => None,
        },
        _ => None,
    }
}

/// A consume's WAL record of `raw` units.
fn consume_record(c: &Consume<'_>, raw: i64) -> RecordBuilder {
    let mut b = RecordBuilder::new(c.now, 1);
    b.push::<&str, &str>(c.id_hash, c.customer, c.name, c.meter.id, &c.meter.name, raw, c.now, &[]);
    b
}

/// A consume's usage of `raw` units, to fold.
fn consume_usage<'a>(c: &Consume<'a>, raw: i64) -> Usage<'a> {
    Usage { customer: c.customer, meter: c.meter, raw, ts: c.now, properties: &[], props_hash: 0, anchor: c.ent.billing_anchor }
}

/// What reading limits needs: the meters, the window counters, the
/// entitlements. Plain checks and the usage summary need no more.
#[derive(Clone, Copy)]
pub struct LimitReads<'a> {
    pub catalog: &'a Catalog,
    pub counters: &'a Counters,
    pub entitlements: &'a EntitlementCache,
    /// Credit balances (issue 18).
    pub credits: &'a crate::credits::CreditBook,
    /// What reservations hold (issue 19).
    pub holds: &'a crate::holds::HoldBook,
}

/// What checks and consumes need of the engine. A consume decides and records
/// in one step, so this is most of the engine: the reads above, the usage seam
/// to record through, the dedupe set and the remembered answers (ids), the WAL
/// and its write gate, the consume locks, and Redis for `strict` limits. What
/// it leaves out: the usage store, the entitlement store and the start-up state.
#[derive(Clone, Copy)]
pub struct LimitsPorts<'a> {
    pub reads: LimitReads<'a>,
    pub usage: &'a UsageSeam,
    pub deduper: &'a Deduper,
    pub consumes: &'a ConsumeAnswers,
    pub wal: &'a Wal,
    pub write_gate: WriteGate<'a>,
    pub consume_locks: &'a ConsumeLocks,
    pub redis: Option<&'a Redis>,
    /// `strict` limits while Redis is unreachable: allow (decide locally) or deny.
    pub strict_open_when_down: bool,
    pub instance_id: &'a str,
    /// How long ids are claimed (`ingest.dedupe_window`); remembered consume
    /// answers keep their own lifetimes (`crate::answers`).
    pub dedupe_window_ms: i64,
}

impl Engine {
    /// The limit readers' narrow view of the state.
    pub fn limit_reads(&self) -> LimitReads<'_> {
        LimitReads {
            catalog: self.catalog(),
            counters: self.counters(),
            entitlements: self.entitlements(),
            credits: self.credits(),
            holds: self.holds(),
        }
    }

    /// Checks' and consumes' view of the state.
    pub fn limits_ports(&self) -> LimitsPorts<'_> {
        LimitsPorts {
            reads: self.limit_reads(),
            usage: self.usage(),
            deduper: self.deduper(),
            consumes: self.consumes(),
            wal: self.wal(),
            write_gate: self.write_gate(),
            consume_locks: self.consume_locks(),
            redis: self.redis(),
            strict_open_when_down: self.strict_open_when_down(),
            instance_id: self.instance_id(),
            dedupe_window_ms: self.ingest_limits().dedupe_window_ms,
        }
    }

    /// [`LimitReads::evaluate`] on this engine.
    pub fn evaluate(&self, customer: &str, meter: &Meter, quantity: i64, now: i64) -> (LimitStates, Verdict) {
        self.limit_reads().evaluate(customer, meter, quantity, now)
    }

    /// [`LimitsPorts::check`] on this engine.
    pub async fn check(&self, req: CheckRequest) -> Result<Arc<CheckAnswer>, CheckError> {
        self.limits_ports().check(&req).await
    }
}

impl LimitReads<'_> {
    /// The state of each limit now, for a customer that may not exist yet.
    pub fn limit_states(&self, customer: Option<CustomerId>, meter: &Meter, ent: &Entitlements, limits: &[Limit], now: i64) -> LimitStates {
        limits
            .iter()
            .map(|&limit| {
                if let LimitAmount::Credits { low_balance, .. } = limit.amount {
                    return self.credit_state(customer, meter, limit, low_balance, now);
                }
                let window = limit.window.bounds(now, ent.billing_anchor);
                let used = customer
                    .map(|c| {
                        let key =
                            crate::counters::CounterKey { customer: c, meter: meter.id, kind: limit.window, start_ms: window.start_ms };
                        self.counters.windows.read(&key)
                    })
                    .unwrap_or(0);
                // Reservations (issue 19): holds count against every limit.
                let held = customer.map_or(0, |c| self.holds.held(c, meter.id));
                LimitState { limit, window, used, held }
            })
            .collect()
    }

    /// A credits limit as it stands (issue 18): `limit` = granted of the
    /// active grants, `used` = granted − balance, the window ending at the next
    /// expiry.
    pub fn credit_state(
        &self,
        customer: Option<CustomerId>,
        meter: &Meter,
        limit: Limit,
        low_balance: Option<i64>,
        now: i64,
    ) -> LimitState {
        // The balance first, then the held total: with Redis the held total a
        // script answered is recorded before the usage answered with it is
        // learned (`grants::redis_consume`), so read in this order a settled
        // hold is never seen both as used and as still held.
        let b = self.credits.balance(customer, meter.id, low_balance, now);
        let held = customer.map_or(0, |c| self.holds.held(c, meter.id));
        let end_ms = b.next_expiry.map_or(i64::MAX, |(_, at)| at);
        LimitState {
            limit: Limit { amount: LimitAmount::Credits { granted: b.granted, low_balance }, ..limit },
            window: crate::model::Window { kind: crate::model::WindowKind::Total, start_ms: 0, end_ms },
            used: b.granted.saturating_sub(b.balance),
            held,
        }
    }

    /// A check without consume, from memory only: the state of each limit and the
    /// verdict. Embedded, it interns nothing, so unknown customers cost no memory.
    pub fn evaluate(&self, customer: &str, meter: &Meter, quantity: i64, now: i64) -> (LimitStates, Verdict) {
        let id = if self.counters.windows.is_shared() {
            // Other instances may hold this customer's usage: track it so the
            // syncer fetches its totals.
            self.counters.interner.intern(customer).ok()
        } else {
            self.counters.interner.lookup(customer)
        };
        let ent = self.entitlements.get(id);
        let states = match ent.limits(meter.id) {
            Some(limits) => self.limit_states(id, meter, &ent, limits, now),
            None => LimitStates::new(),
        };
        let verdict = decide(&states, quantity);
        (states, verdict)
    }
}

/// A consume's id hashed, if the request is a consume with a valid id.
fn consume_id(req: &CheckRequest) -> Option<IdHash> {
    match &req.id {
        Some(id) if req.consume && !id.is_empty() && id.len() <= 128 => Some(hash_id(id)),
        _ => None,
    }
}

impl LimitsPorts<'_> {
    /// A consume's id checked and its slot: the remembered answer a retry of
    /// the same id gets (created empty on first sight), with the id's hash and now.
    /// `hashed` is [`consume_id`]'s result, taken by `check` for its prefetch
    /// (`None`: the id is missing or invalid).
    fn consume_slot(&self, req: &CheckRequest, hashed: Option<IdHash>) -> Result<(IdHash, i64, AnswerCell), CheckError> {
        let Some(id_hash) = hashed else {
            return Err(match &req.id {
                Some(_) => invalid("id", "must be 1-128 bytes"),
                None => invalid("id", "is required when consume is true"),
            });
        };
        let now = now_ms();
        Ok((id_hash, now, self.consumes.cell(id_hash, now)))
    }

    /// Answers `/v1/check`. The request is borrowed, not moved in: an async
    /// function keeps its arguments twice in its future, and this future is
    /// part of the one a request's handler boxes (issue 24).
    pub async fn check(&self, req: &CheckRequest) -> Result<Arc<CheckAnswer>, CheckError> {
        // The one cache miss a new consume's remembered answer costs is taken
        // while the request is validated, not after (issue 24).
        let hashed = consume_id(req);
        if let Some(id_hash) = hashed {
            self.consumes.prefetch(id_hash);
        }
        let meter =
            self.reads.catalog.meter_by_name(&req.meter).ok_or_else(|| invalid("meter", format!("unknown meter {:?}", req.meter)))?;
        if req.customer.is_empty() || req.customer.len() > 256 || req.customer.chars().any(char::is_control) {
            return Err(invalid("customer", "must be 1-256 bytes without control characters"));
        }
        if meter.aggregation == Aggregation::UniqueCount {
            return Box::pin(self.check_unique(req, meter, hashed)).await;
        }
        if req.value.is_some() {
            return Err(invalid("value", format!("is only for unique_count meters; {:?} is {}", meter.name, meter.aggregation)));
        }
        let quantity = match &req.quantity_text {
            None => meter.scale(),
            Some(text) => crate::model::quantity::parse_decimal(text, meter.precision).map_err(|e| invalid("quantity", e.to_string()))?,
        };
        // Issue 16: no decision on a shared total older than two sync intervals.
        if self.redis.is_some() {
            // Boxed: a Redis round trip's future, only built with Redis.
            Box::pin(self.refresh_stale(&req.customer, meter)).await;
        }
        if !req.consume {
            let (states, verdict) = self.reads.evaluate(&req.customer, meter, quantity, now_ms());
            crate::telemetry::decision(verdict.reason.as_str(), false, meter.id.into(), &meter.name);
            return Ok(Arc::new(answer(&req.customer, meter, quantity, &states, verdict)));
        }
        let (id_hash, now, cell) = self.consume_slot(req, hashed)?;
        // Exactly one caller per id decides; a retry (or a racing duplicate) gets
        // the same answer and records nothing.
        let answer = cell
            .get_or_try_init(|| async {
                match self.consumes.denial(id_hash, now) {
                    Some(reason) => Ok(Arc::new(self.denied_again(&req.customer, meter, quantity, reason, now))),
                    None => self.consume(&req.customer, meter, quantity, id_hash, now).await.map(Arc::new),
                }
            })
            .await?;
        self.consumes.decided(id_hash, now, answer);
        Ok(answer.clone())
    }

    /// The answer to a retry of a consume that was denied, once its whole
    /// answer is no longer held (`crate::answers`): denied again for the same
    /// reason, with the figures as they stand; nothing is recorded.
    pub(super) fn denied_again(&self, customer: &str, meter: &Meter, quantity: i64, reason: Reason, now: i64) -> CheckAnswer {
        let (states, verdict) = self.reads.evaluate(customer, meter, quantity, now);
        crate::telemetry::decision(reason.as_str(), true, meter.id.into(), &meter.name);
        answer(customer, meter, quantity, &states, Verdict { allowed: false, reason, ..verdict })
    }

    /// Decides and records a consume. The record goes through the WAL before the
    /// answer, so an allowed consume survives a crash like any event.
    async fn consume(&self, name: &str, meter: &Meter, quantity: i64, id_hash: u128, now: i64) -> Result<CheckAnswer, CheckError> {
        let customer = self.reads.counters.interner.intern(name).map_err(|_| CheckError::Full)?;
        let ent = self.reads.entitlements.get(Some(customer));
        let Some(limits) = ent.limits(meter.id).cloned() else {
            crate::telemetry::decision(Reason::NotEntitled.as_str(), true, meter.id.into(), &meter.name);
            return Ok(answer(name, meter, quantity, &[], decide(&[], quantity)));
        };
        if let Some(reason) = self.write_gate.refusal() {
            return Err(CheckError::Unavailable(reason));
        }
        // Claim the id first: if it was already ingested as an event, that usage is
        // counted; answer with the state as it stands and record nothing more.
        // This is also where a retry of an allowed consume lands once its whole
        // answer is no longer held (`crate::answers`): allowed again, whatever
        // the figures say now, since its usage is the one counted.
        if !self.deduper.insert(id_hash, now) {
            let states = self.reads.limit_states(Some(customer), meter, &ent, &limits, now);
            let verdict = match decide(&states, 0) {
                v if v.allowed => v,
                v => Verdict { allowed: true, reason: Reason::WithinLimit, primary: v.primary },
            };
            crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
            return Ok(answer(name, meter, quantity, &states, verdict));
        }
        let c = Consume { name, customer, meter, ent: &ent, limits: &limits, quantity, id_hash, now };
        if let (true, Some(redis)) = (strict::applies(self, meter, &limits), self.redis) {
            // Cached and strict limits are decided together: one consume of this
            // (customer, meter) at a time, here and across the round trip.
            // Boxed, here and below: the Redis paths' futures are large, and
            // inline they would be copied with every local consume (issue 24).
            return Box::pin(async {
                let guard = self.consume_locks.lock(customer, meter.id).await;
                self.consume_strict(&guard, redis, &c).await
            })
            .await;
        }
        if let (true, Some(redis)) = (leased::applies(self, meter, &limits), self.redis) {
            // Issue 16: decided inside this instance's slice of the quota.
            return Box::pin(async {
                if let Some(answer) = self.consume_leased_fast(redis, &c).await {
                    return answer;
                }
                let guard = self.consume_locks.lock(customer, meter.id).await;
                self.consume_leased_single(&guard, redis, &c).await
            })
            .await;
        }
        self.consume_local(&c, None).await
    }

    /// Decides a consume from local state and records it; the id is claimed.
    /// A single hard limit on a `sum`/`count` meter needs no lock (compare and
    /// swap); anything else runs under the consume lock: `held` when the caller
    /// has it already (a strict consume deciding locally), else taken here.
    async fn consume_local(&self, c: &Consume<'_>, held: Option<&ConsumeGuard<'_>>) -> Result<CheckAnswer, CheckError> {
        let (states, verdict) = match cas_limit(c) {
            Some((limit, max)) => self.consume_cas(c, limit, max).await?,
            // Boxed: the serial path holds its limits (inline) across its
            // awaits, which inline here would push the compare-and-swap
            // path's future past the allocator's per-thread cache (issue 24).
            None => match held {
                Some(guard) => Box::pin(self.consume_serial(guard, c)).await?,
                None => {
                    let guard = self.consume_locks.lock(c.customer, c.meter.id).await;
                    Box::pin(self.consume_serial(&guard, c)).await?
                }
            },
        };
        if !verdict.allowed {
            // Nothing was recorded under this id; an event may still use it.
            self.deduper.remove(c.id_hash);
        }
        crate::telemetry::decision(verdict.reason.as_str(), true, c.meter.id.into(), &c.meter.name);
        Ok(answer(c.name, c.meter, c.quantity, &states, verdict))
    }

    /// One hard limit: reserve with compare-and-swap, make it durable, then fold
    /// the rest; if the WAL refuses, give the reservation back.
    async fn consume_cas(&self, c: &Consume<'_>, limit: Limit, max: i64) -> Result<(LimitStates, Verdict), CheckError> {
        let Consume { customer, meter, ent, quantity, id_hash, now, .. } = *c;
        let window = limit.window.bounds(now, ent.billing_anchor);
        let key = Counters::key(customer, meter.id, limit.window, now, ent.billing_anchor);
        // Reservations (issue 19): what is held is not available to consume.
        let held = self.reads.holds.held(customer, meter.id);
        match self.usage.reserve_within(key, quantity, max.saturating_sub(held)) {
            Ok(after) => {
                // Reservations (issue 19): a hold taken meanwhile. The reservation
                // re-checks once its hold is visible, this once the units are: one
                // of the two sees the other (hence the fences), never neither.
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                let held_now = self.reads.holds.held(customer, meter.id);
                if held_now > held && after.saturating_add(held_now) > max {
                    self.usage.give_back(key, quantity);
                    let states = smallvec::smallvec![LimitState { limit, window, used: after.saturating_sub(quantity), held: held_now }];
                    let verdict = decide(&states, quantity);
                    return Ok((states, verdict));
                }
                let seq = match self.wal.append_with(|| consume_record(c, quantity)).await {
                    Ok(seq) => seq,
                    Err(e) => {
                        self.usage.give_back(key, quantity);
                        return Err(self.wal_refused(id_hash, e));
                    }
                };
                // Folded and marked under one guard (see `Counters::apply_then`).
                self.usage.fold(&consume_usage(c, quantity), Some(limit.window), Origin::Live, || self.wal.tracker.folded(seq));
                let states = smallvec::smallvec![LimitState { limit, window, used: after, held }];
                Ok((states, Verdict { allowed: true, reason: Reason::WithinLimit, primary: 0 }))
            }
            Err(current) => {
                let states = smallvec::smallvec![LimitState { limit, window, used: current, held }];
                let verdict = decide(&states, quantity);
                Ok((states, verdict))
            }
        }
    }

    /// Several limits (all or nothing) or a gauge: decided and recorded under
    /// the `(customer, meter)` consume lock, held until the record is durable
    /// and folded.
    async fn consume_serial(&self, guard: &ConsumeGuard<'_>, c: &Consume<'_>) -> Result<(LimitStates, Verdict), CheckError> {
        let Consume { customer, meter, ent, limits, quantity, id_hash, now, .. } = *c;
        debug_assert!(guard.covers(customer, meter.id), "the consume lock of another (customer, meter)");
        let mut states = self.reads.limit_states(Some(customer), meter, ent, limits, now);
        let mut verdict = decide(&states, quantity);
        // Prepaid credits (issue 18): with Redis, a hard credits limit is
        // decided there too: inside a slice of the balance (`leased`, the
        // default: issue 16), or taken per consume (`strict`).
        let taken = match (verdict.allowed, self.redis) {
            (true, Some(redis)) if crate::grants::redis_consume::applies(limits) => {
                // Boxed: Redis round trips, kept out of the local path's future.
                if crate::grants::redis_consume::leased(limits) && Box::pin(self.lease_credits(redis, c, &mut states, &mut verdict)).await {
                    None
                } else {
                    let taken = Box::pin(self.take_credits(redis, c, &mut states, &mut verdict)).await;
                    taken.map(|t| (redis, t))
                }
            }
            _ => None,
        };
        if verdict.allowed {
            // Gauges record the new level; totals record the amount.
            let raw = if meter.aggregation.is_gauge() {
                states.iter().map(|s| s.used).max().unwrap_or(0).saturating_add(quantity)
            } else {
                quantity
            };
            let seq = match self.wal.append_with(|| consume_record(c, raw)).await {
                Ok(seq) => seq,
                Err(e) => {
                    if let Some((redis, t)) = &taken {
                        Box::pin(crate::grants::redis_consume::give_back(self.reads.credits, redis, t)).await;
                    }
                    return Err(self.wal_refused(id_hash, e));
                }
            };
            self.usage.fold(&consume_usage(c, raw), None, Origin::Live, || self.wal.tracker.folded(seq));
            for s in &mut states {
                s.used = s.used.saturating_add(quantity);
            }
            if let Some((_, t)) = &taken {
                crate::grants::redis_consume::settle(self.reads.credits, t, now);
                for s in states.iter_mut().filter(|s| s.limit.amount.is_credits()) {
                    let low = crate::credits::CreditBook::low_balance_of(std::slice::from_ref(&s.limit));
                    *s = self.reads.credit_state(Some(customer), meter, s.limit, low, now);
                }
            }
        }
        Ok((states, verdict))
    }

    /// Prepaid credits (issue 18): takes a consume's quantity of a hard
    /// credits balance in Redis (see `crate::grants::redis_consume`); a refusal
    /// or an unreachable Redis turns `verdict` into a denial.
    async fn take_credits(
        &self,
        redis: &Redis,
        c: &Consume<'_>,
        states: &mut [LimitState],
        verdict: &mut Verdict,
    ) -> Option<crate::grants::redis_consume::Taken> {
        use crate::grants::redis_consume::{take, Outcome};
        let index = states.iter().position(|s| s.limit.hard && s.limit.amount.is_credits()).unwrap_or(0);
        match take(self.reads.credits, self.reads.holds, redis, self.instance_id, (c.name, c.customer), c.meter, c.quantity, c.now).await {
            Outcome::Taken(t) => Some(t),
            Outcome::Refused { balance } => {
                if let Some(s) = states.get_mut(index) {
                    if let LimitAmount::Credits { granted, .. } = s.limit.amount {
                        s.used = granted.saturating_sub(balance);
                    }
                }
                *verdict = Verdict { allowed: false, reason: Reason::InsufficientCredits, primary: index };
                None
            }
            Outcome::Down(e) if self.strict_open_when_down => {
                tracing::debug!(error = %e, "credits decided locally: redis is unreachable (strict_when_unavailable = allow)");
                None
            }
            Outcome::Down(e) => {
                tracing::warn!(error = %e, "a hard credits consume is refused: redis is unreachable");
                *verdict = Verdict { allowed: false, reason: Reason::Unavailable, primary: index };
                None
            }
        }
    }

    /// Leased hard credits (issues 16, 18): decides the consume inside a slice
    /// of the balance (`crate::grants::slices`). True when decided (allowed, or
    /// refused in `verdict`); false when Redis recovers from a restart and the
    /// consume is to be taken per call instead.
    async fn lease_credits(&self, redis: &Redis, c: &Consume<'_>, states: &mut [LimitState], verdict: &mut Verdict) -> bool {
        use crate::grants::slices::{take, Outcome};
        let index = states.iter().position(|s| s.limit.hard && s.limit.amount.is_credits()).unwrap_or(0);
        match take(self.reads.credits, self.reads.holds, redis, self.instance_id, (c.name, c.customer), c.meter, c.quantity, c.now).await {
            Outcome::Inside => true,
            Outcome::Refused => {
                if let Some(s) = states.get_mut(index) {
                    let low = crate::credits::CreditBook::low_balance_of(std::slice::from_ref(&s.limit));
                    *s = self.reads.credit_state(Some(c.customer), c.meter, s.limit, low, c.now);
                }
                // Others' slices may hold what the balance shows: the verdict is the script's.
                *verdict = Verdict { allowed: false, reason: Reason::InsufficientCredits, primary: index };
                true
            }
            Outcome::Recovering => false,
            Outcome::Down(e) if self.strict_open_when_down => {
                tracing::debug!(error = %e, "credits decided locally: redis is unreachable (strict_when_unavailable = allow)");
                true
            }
            Outcome::Down(e) => {
                tracing::warn!(error = %e, "a hard credits consume is refused: no slice of the balance could be had");
                *verdict = Verdict { allowed: false, reason: Reason::Unavailable, primary: index };
                true
            }
        }
    }

    /// The WAL refused a consume's record: release its id.
    fn wal_refused(&self, id_hash: u128, e: crate::wal::WalError) -> CheckError {
        self.deduper.remove(id_hash);
        CheckError::Unavailable(format!("could not write the WAL: {e}"))
    }

    /// Forgets consume answers past their lifetime or their cap (`crate::answers`).
    pub fn sweep_consumes(&self, now: i64) {
        self.consumes.sweep(now);
    }
}

#[cfg(test)]
mod tests {
    use super::CheckRequest;

    /// The typed read and the slow one agree on every body: the same request,
    /// or the same error naming the same field.
    #[test]
    fn the_fast_read_of_a_check_body_agrees_with_the_slow_one() {
        let bodies: &[&str] = &[
            r#"{"customer":"c1","meter":"m","quantity":1,"consume":true,"id":"x"}"#,
            r#"{"customer":"c1","meter":"m"}"#,
            r#"{"customer":"c\u00e9\n","meter":"m","quantity":12.50,"consume":false,"id":null,"value":"v"}"#,
            r#"{"customer":"c1","meter":"m","quantity":1e3,"consume":null}"#,
            r#"{"customer":"c1","meter":"m","quantity":18446744073709551616}"#,
            r#"{"customer":"c1","meter":"m","quantity":-0.0}"#,
            r#"{"customer":null,"meter":"m"}"#,
            r#"{"meter":"m"}"#,
            r#"{"customer":"c1"}"#,
            r#"{"customer":1,"meter":"m"}"#,
            r#"{"customer":"c1","meter":"m","quantity":"5"}"#,
            r#"{"customer":"c1","meter":"m","consume":"yes"}"#,
            r#"{"customer":"c1","meter":"m","id":5}"#,
            r#"{"customer":"c1","meter":"m","extra":1}"#,
            r#"{"customer":"a","customer":"b","meter":"m"}"#,
            r#"{"customer":"c1","meter":"m","consume":true,"consume":false}"#,
            r#"["customer"]"#,
            r#"{"customer":"c1","meter":"m""#,
            r#""#,
            r#"{"customer":"c1","meter":"m"} trailing"#,
        ];
        for body in bodies {
            let fast = format!("{:?}", CheckRequest::from_json(body.as_bytes()));
            let slow = format!("{:?}", CheckRequest::from_json_naming_errors(body.as_bytes()));
            assert_eq!(fast, slow, "body {body}");
        }
    }
}
