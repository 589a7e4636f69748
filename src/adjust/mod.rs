//! Adjustments (issue 19, API.md part 2): signed corrections of `sum` and
//! `count` usage, with a reason, for the operator's "a dropped call refunded, a
//! double-charged job reversed".
//!
//! An adjustment *is* an event as far as durability and totals go: it is
//! ingested through the normal path ([`crate::ingest`]) with its signed raw
//! units and the property `meterd.adjustment = <id>` as its marker. So it
//! shares the event id space (the dedupe makes it idempotent), is in the WAL
//! (it survives SIGKILL and replays like any event), changes the window
//! counters through the usage seam, is flushed to the usage store as its own
//! row (negative for a decrease: `sum(value)` stays exact), shows in
//! `/v1/usage`, and lowers the period totals the Stripe reporter plans from
//! (its decrease path cancels, or surfaces the overreport).
//!
//! A decrease is refused when it would take any tracked window total it
//! belongs to (the windows its timestamp falls in) below zero; a meter with no
//! tracked window (credits, no limit) is checked on its calendar month. Adjustments are
//! applied one at a time ([`Adjustments::apply`] holds a lock from the check
//! through the fold): other writers only add usage, so the check stays true.
//! Adjustments are recorded in the audit list ([`audit`]): pending before the
//! WAL write, applied after; a retry of an id left pending by a crash
//! completes it (a duplicate answer from the dedupe then means the earlier
//! attempt reached the WAL).

pub mod audit;
pub mod spec;

use crate::counters::Counters;
use crate::engine::Engine;
use crate::ingest::parse::Event;
use crate::ingest::IngestError;
use crate::model::quantity::Decimal;
use crate::model::window::rfc3339;
use audit::{AuditError, AuditLog, Recorded};
use spec::{AdjustmentSpec, SpecError};
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

/// The property that marks an adjustment's usage (its value: the adjustment id).
pub const MARKER: &str = "meterd.adjustment";
/// The most adjustments one `GET` lists.
pub const MAX_LIST: usize = 1000;

/// Why an adjustment was not applied (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum AdjustError {
    #[error(transparent)]
    Invalid(#[from] SpecError),
    /// The decrease would take a window total below zero.
    #[error("quantity: would take the {window} window total ({total}) below zero")]
    BelowZero { window: &'static str, total: Decimal },
    /// The id was taken by an event that is not an adjustment.
    #[error("id {0:?} is already used by an accepted event")]
    Conflict(String),
    /// The id names an adjustment with another body.
    #[error("adjustment {0:?} exists with another body")]
    Changed(String),
    #[error("customer table is full")]
    Full,
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// An adjustment as listed and answered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdjustmentView {
    pub id: String,
    pub customer: String,
    pub meter: String,
    pub quantity: Decimal,
    pub timestamp: String,
    pub reason: String,
    pub created_at: String,
}

impl From<&Recorded> for AdjustmentView {
    fn from(r: &Recorded) -> AdjustmentView {
        AdjustmentView {
            id: r.id.clone(),
            customer: r.customer.clone(),
            meter: r.meter.clone(),
            quantity: Decimal { raw: r.raw, precision: r.precision },
            timestamp: rfc3339(r.ts),
            reason: r.reason.clone(),
            created_at: rfc3339(r.created_ms),
        }
    }
}

/// The answer of a `POST`: the adjustment, and whether it was applied before.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    #[serde(flatten)]
    pub adjustment: AdjustmentView,
    pub duplicate: bool,
}

/// The adjustments service: the audit list and the lock that applies one
/// adjustment at a time.
pub struct Adjustments {
    audit: AuditLog,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Adjustments {
    /// Opens the audit list in `data_dir`.
    pub fn open(data_dir: &Path, full_sync: bool) -> Result<Arc<Adjustments>, AdjustError> {
        let audit = AuditLog::open(&data_dir.join("adjustments.sqlite"), full_sync)?;
        Ok(Arc::new(Adjustments { audit, one_at_a_time: tokio::sync::Mutex::new(()) }))
    }

    /// Validates and applies the adjustment in `body`. Run it to completion
    /// (the handler spawns it): once the WAL has it, it must be recorded.
    pub async fn apply(&self, engine: &Arc<Engine>, body: &[u8]) -> Result<Applied, AdjustError> {
        let now = crate::clock::now_ms();
        let spec = AdjustmentSpec::parse(body, engine.catalog(), now, engine.ingest_limits().max_lateness_ms)?;
        // With Redis: the customer's anchor (billing-cycle windows) loads first.
        engine.ensure_customer(&spec.customer).await;
        let _one = self.one_at_a_time.lock().await;
        let existing = self.audit.get(&spec.id).await?;
        if let Some(r) = &existing {
            if !spec.same_as(r) {
                crate::telemetry::adjustment("conflict");
                return Err(AdjustError::Changed(spec.id));
            }
            if r.applied {
                crate::telemetry::adjustment("duplicate");
                return Ok(Applied { adjustment: AdjustmentView::from(r), duplicate: true });
            }
        }
        // A pending row: an earlier attempt stopped between writing it and
        // marking it applied; it may or may not have reached the WAL.
        let resumed = existing.is_some();
        let catalog = engine.catalog();
        let meter =
            catalog.meter_by_name(&spec.meter).ok_or_else(|| SpecError { field: "meter".into(), reason: "unknown meter".into() })?;
        let recorded = match existing {
            Some(r) => r,
            None => Recorded {
                id: spec.id.clone(),
                customer: spec.customer.clone(),
                meter: spec.meter.clone(),
                raw: spec.raw,
                precision: meter.precision,
                ts: spec.ts,
                reason: spec.reason.clone(),
                created_ms: now,
                applied: false,
            },
        };
        if spec.raw < 0 && engine.redis().is_some() {
            // With Redis: the current windows' totals of every instance are read
            // first, the way a check reads them (a plain check of 0 changes nothing).
            let read = crate::limits::CheckRequest {
                customer: spec.customer.as_str().into(),
                meter: spec.meter.as_str().into(),
                quantity_text: Some("0".into()),
                consume: false,
                id: None,
                value: None,
            };
            if let Err(e) = engine.check(read).await {
                tracing::warn!(error = %e, "reading the shared totals before an adjustment failed; deciding on what this instance has");
            }
        }
        if spec.raw < 0 {
            if let Err(e) = below_zero(engine, &spec, meter).await {
                crate::telemetry::adjustment("below_zero");
                self.forget(&recorded.id).await;
                return Err(e);
            }
        }
        if !resumed {
            self.audit.insert(recorded.clone()).await?;
        }
        let event = Event {
            id: Cow::Borrowed(&recorded.id),
            customer: Cow::Borrowed(&recorded.customer),
            meter: meter.id,
            raw: recorded.raw,
            ts: recorded.ts,
            properties: vec![(Cow::Borrowed(MARKER), Cow::Borrowed(&recorded.id))],
        };
        let outcome = match engine.ingest_ports().ingest_events(std::slice::from_ref(&event), now).await {
            Ok(o) => o,
            Err(e) => {
                // Nothing was recorded in the WAL.
                self.forget(&recorded.id).await;
                return Err(match e {
                    IngestError::Full => AdjustError::Full,
                    IngestError::Unavailable(r) => AdjustError::Unavailable(r),
                    IngestError::Parse(p) => AdjustError::Unavailable(p.to_string()),
                });
            }
        };
        // A duplicate id on a resumed row is the earlier attempt's WAL record.
        if outcome.accepted == 0 && !resumed {
            crate::telemetry::adjustment("conflict");
            self.forget(&recorded.id).await;
            return Err(AdjustError::Conflict(recorded.id));
        }
        if let Err(e) = self.audit.mark_applied(&recorded.id).await {
            // Applied (in the WAL and the counters) but still pending: a retry completes it.
            tracing::error!(error = %e, id = %recorded.id, "an applied adjustment could not be marked in the audit list");
            return Err(e.into());
        }
        crate::telemetry::adjustment("applied");
        tracing::info!(id = %recorded.id, meter = %recorded.meter, raw = recorded.raw, ts = recorded.ts, resumed, "adjustment applied");
        let recorded = Recorded { applied: true, ..recorded };
        Ok(Applied { adjustment: AdjustmentView::from(&recorded), duplicate: false })
    }

    /// Drops a pending row of an adjustment that was not applied (logged if
    /// that fails: a retry resumes it).
    async fn forget(&self, id: &str) {
        if let Err(e) = self.audit.forget_pending(id).await {
            tracing::warn!(error = %e, id, "could not drop a pending adjustment from the audit list");
        }
    }

    /// A customer's adjustments, oldest first, at most `limit` (≤ [`MAX_LIST`]).
    pub async fn list(&self, customer: &str, meter: Option<&str>, limit: usize) -> Result<Vec<AdjustmentView>, AdjustError> {
        let rows = self.audit.list(customer, meter, limit.min(MAX_LIST)).await?;
        Ok(rows.iter().map(AdjustmentView::from).collect())
    }
}

impl AdjustmentSpec {
    /// Whether a repeat of the recorded adjustment (the timestamp compared
    /// only when this one gives it).
    fn same_as(&self, r: &Recorded) -> bool {
        self.customer == r.customer
            && self.meter == r.meter
            && self.raw == r.raw
            && self.reason == r.reason
            && (!self.ts_given || self.ts == r.ts)
    }
}

/// Refuses a decrease that would take a tracked window it belongs to below zero.
async fn below_zero(engine: &Engine, spec: &AdjustmentSpec, meter: &crate::model::Meter) -> Result<(), AdjustError> {
    let counters = engine.usage().counters();
    let customer = counters.interner.lookup(&spec.customer);
    let anchor = engine.entitlements().get(customer).billing_anchor;
    let mut kinds: Vec<_> = counters.tracked_kinds(meter.id).collect();
    if kinds.is_empty() {
        // No limit windows the meter (credits, or no limit): its calendar
        // month, as the store holds it, still may not go below zero.
        kinds.push(crate::model::WindowKind::Month);
    }
    for kind in kinds {
        let held = customer.and_then(|c| counters.windows.get(&Counters::key(c, meter.id, kind, spec.ts, anchor), |cell| cell.used()));
        let total = match held {
            Some(total) => total,
            // Not held here (a past window after a restart): what the store and
            // the unflushed minutes say of it.
            None => stored_total(engine, spec, meter, kind.bounds(spec.ts, anchor)).await?,
        };
        if total.saturating_add(spec.raw) < 0 {
            return Err(AdjustError::BelowZero { window: kind.as_str(), total: Decimal { raw: total, precision: meter.precision } });
        }
    }
    Ok(())
}

/// The customer's usage of `meter` over `window` from the history query (the
/// store plus unflushed minutes); 0 for a window it cannot ask about (unbounded).
async fn stored_total(
    engine: &Engine,
    spec: &AdjustmentSpec,
    meter: &crate::model::Meter,
    window: crate::model::window::Window,
) -> Result<i64, AdjustError> {
    use crate::history::{Granularity, MAX_POINTS};
    let span = window.end_ms.saturating_sub(window.start_ms);
    let fits = |g: Granularity| {
        let ms = g.millis();
        window.start_ms.rem_euclid(ms) == 0 && window.end_ms.rem_euclid(ms) == 0 && span / ms <= MAX_POINTS as i64
    };
    let Some(g) = [Granularity::Day, Granularity::Hour, Granularity::Minute].into_iter().find(|&g| fits(g)) else {
        return Ok(0);
    };
    let series = engine
        .history_ports()
        .usage_series(&meter.name, window.start_ms, window.end_ms, g, Some(&spec.customer), None)
        .await
        .map_err(|e| AdjustError::Unavailable(format!("could not read the usage of the window: {e}")))?;
    Ok(series.data.iter().map(|p| p.value.raw).fold(0i64, i64::saturating_add))
}
