//! The reporter task: every `stripe.interval` it takes (or renews) the lease,
//! plans each Stripe meter over the closed periods still within reach, sends the
//! deltas, and writes the ledger after each success.
//!
//! Order of a send: a `pending` ledger row (identifier and value), the request
//! to Stripe, then a `sent` row. A crash or a lost answer between the two leaves
//! the event pending; the next run resends it with the same identifier *and the
//! same value* before planning anything new for its period, and Stripe answers
//! "already exists" (v1) or drops it (v2), which the ledger then confirms. So
//! Stripe's totals equal the stored totals after any crash or retry, as long as
//! the resend comes within Stripe's 24 h identifier memory (the reporter retries
//! every interval, so it does).

use super::client::{ClientError, Delivery, MeterEvent, Session, StripeClient, MAX_STREAM_EVENTS};
use super::lease::{Lease, LeaseError};
use super::plan::{plan_meter, Delta, MeterPlan, MeterSummary};
use super::status::{State, StatusBoard};
use crate::clock::now_ms;
use crate::config::{StripeMode, StripeSettings};
use crate::engine::Engine;
use crate::model::Meter;
use crate::store::{Fold, LedgerKind, LedgerRow, LedgerStore, StoreError, UsageQuery};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Why a run did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("the reporter lease was lost to another instance")]
    LeaseLost,
}

/// Most series points one meter's plan reads (customers × periods in reach).
const MAX_POINTS: usize = 10_000_000;

/// The reporter and what it keeps between runs.
pub struct Reporter {
    engine: Arc<Engine>,
    ledger: Arc<dyn LedgerStore>,
    lease: Arc<dyn Lease>,
    client: StripeClient,
    settings: StripeSettings,
    status: Arc<StatusBoard>,
    /// How far back periods are planned: late events are accepted this far back.
    lookback_ms: i64,
    /// The lease's fencing token while held.
    fence: Option<u64>,
    lease_renewed: Instant,
    lease_ttl: Duration,
    /// v2 only.
    session: Option<Session>,
    /// Overreports already logged (each is logged and counted once per process).
    overreports_logged: HashSet<(String, String, i64)>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Reporter {
    pub fn new(
        engine: Arc<Engine>,
        ledger: Arc<dyn LedgerStore>,
        lease: Arc<dyn Lease>,
        client: StripeClient,
        settings: StripeSettings,
        status: Arc<StatusBoard>,
        lease_ttl: Duration,
    ) -> Reporter {
        let lookback_ms = engine.ingest_limits().max_lateness_ms.saturating_add(ms(settings.grace)).saturating_add(settings.period.ms());
        Reporter {
            engine,
            ledger,
            lease,
            client,
            settings,
            status,
            lookback_ms,
            fence: None,
            lease_renewed: Instant::now(),
            lease_ttl,
            session: None,
            overreports_logged: HashSet::new(),
        }
    }

    /// Runs until `shutdown` turns true, or until Stripe refuses the key.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let interval = self.settings.interval;
        let mut failures: u32 = 0;
        let mut first = true;
        loop {
            let wait = if first { Duration::ZERO } else { crate::backoff::backoff(interval, failures) };
            first = false;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => break,
            }
            // A run cut short by shutdown is safe: unrecorded sends are resent
            // with the same identifiers by the next start.
            let outcome = tokio::select! {
                r = self.run_once() => r,
                _ = shutdown.changed() => break,
            };
            match outcome {
                Ok(()) => {
                    failures = 0;
                    self.status.set_error(None);
                }
                Err(ReportError::Client(e @ ClientError::Unauthorized { .. })) => {
                    tracing::error!(
                        error = %e,
                        api_key_env = %self.settings.api_key_env,
                        "Stripe refused the API key: the Stripe reporter has stopped (ingest and checks go on); fix the key and restart meterd"
                    );
                    crate::telemetry::stripe_unauthorized(true);
                    crate::telemetry::stripe_leader(false);
                    self.status.set_state(State::Unauthorized, None);
                    self.status.set_error(Some(e.to_string()));
                    break;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    crate::telemetry::stripe_run_failed();
                    if matches!(e, ReportError::LeaseLost | ReportError::Store(StoreError::Fenced(_)) | ReportError::Lease(_)) {
                        self.fence = None;
                        crate::telemetry::stripe_leader(false);
                    }
                    tracing::warn!(error = %e, failures, retry_in = ?crate::backoff::backoff(interval, failures), "Stripe report run failed; retrying");
                    self.status.set_error(Some(e.to_string()));
                }
            }
        }
        if let Some(token) = self.fence.take() {
            if let Err(e) = self.lease.release(token).await {
                tracing::warn!(error = %e, "could not release the reporter lease; it expires on its own");
            }
        }
        if self.status.state() != State::Unauthorized {
            self.status.set_state(State::Stopped, None);
        }
        tracing::info!("Stripe reporter stopped");
    }

    /// Takes or renews the lease; the fencing token while held.
    async fn hold_lease(&mut self) -> Result<Option<u64>, ReportError> {
        if let Some(token) = self.fence {
            if self.lease.renew(token).await? {
                self.lease_renewed = Instant::now();
                return Ok(Some(token));
            }
            tracing::warn!(fence = token, "the reporter lease was lost; standing by");
            self.fence = None;
        }
        let token = self.lease.acquire().await?;
        if let Some(t) = token {
            tracing::info!(fence = t, lease = self.lease.kind(), "this instance now reports to Stripe");
            self.lease_renewed = Instant::now();
        }
        self.fence = token;
        Ok(token)
    }

    /// Renews the lease when a third of its time has passed (long runs).
    async fn keep_lease(&mut self, fence: u64) -> Result<(), ReportError> {
        if self.lease_renewed.elapsed() < self.lease_ttl / 3 {
            return Ok(());
        }
        if !self.lease.renew(fence).await? {
            return Err(ReportError::LeaseLost);
        }
        self.lease_renewed = Instant::now();
        Ok(())
    }

    /// One run over every Stripe meter.
    pub async fn run_once(&mut self) -> Result<(), ReportError> {
        let fence = self.hold_lease().await?;
        crate::telemetry::stripe_leader(fence.is_some());
        self.status.set_state(if fence.is_some() { State::Reporting } else { State::Standby }, fence);
        let now = now_ms();
        let period = self.settings.period.ms();
        let to = (now - ms(self.settings.grace)).div_euclid(period) * period;
        let from = (to - self.lookback_ms).div_euclid(period) * period;
        let meters: Vec<Meter> = self.engine.catalog().meters().iter().filter(|m| m.stripe_event_name.is_some()).cloned().collect();
        let mut summaries = BTreeMap::new();
        for meter in &meters {
            let event_name = meter.stripe_event_name.clone().unwrap_or_default();
            let mut plan = self.plan(meter, from, to, now).await?;
            if let Some(fence) = fence {
                let acted = !(plan.sends.is_empty() && plan.resends.is_empty() && plan.too_old.is_empty() && plan.cancels.is_empty());
                self.execute(&meter.name, &event_name, &plan, fence).await?;
                if acted {
                    plan = self.plan(meter, from, to, now_ms()).await?;
                }
            }
            self.note_overreports(meter, &plan);
            summaries.insert(meter.name.clone(), (event_name, plan.summary));
        }
        let oldest = summaries.values().filter_map(|(_, s): &(String, MeterSummary)| s.oldest_pending_ms).min();
        let lag = oldest.map(|start| ((now - (start + period)) as f64 / 1000.0).max(0.0)).unwrap_or(0.0);
        let overreported: i64 = summaries.values().map(|(_, s)| s.overreported).sum();
        crate::telemetry::stripe_gauges(lag, overreported);
        self.status.set_run(now, (from, to), summaries);
        Ok(())
    }

    /// Reads one meter's stored totals and ledger over `[from, to)` and plans it.
    async fn plan(&self, meter: &Meter, from: i64, to: i64, now: i64) -> Result<MeterPlan, ReportError> {
        let query = UsageQuery {
            instance_id: self.engine.instance_id().to_string(),
            meter: meter.name.clone(),
            fold: Fold::from(meter.aggregation),
            from_ms: from,
            to_ms: to,
            customer: None,
            own_only: false,
        };
        let points = self.engine.usage_store().series(&query, self.settings.period.ms(), MAX_POINTS).await?.data;
        if self.engine.redis().is_some() {
            // Entitlements (the Stripe customer ids) are loaded on first sight with
            // Redis: load every customer this meter has usage for.
            let mut names: Vec<&str> = points.iter().map(|p| p.customer.as_str()).collect();
            names.dedup();
            let customers = self.engine.customer_ports();
            for name in names {
                customers.ensure_loaded(name).await;
            }
        }
        let ledger = self.ledger.ledger_rows(&meter.name, from, to).await?;
        let engine = &self.engine;
        let stripe_id = |customer: &str| {
            let id = engine.counters().interner.lookup(customer)?;
            engine.entitlements().get(Some(id)).stripe_customer_id.clone()
        };
        Ok(plan_meter(&meter.name, meter.scale(), &points, &ledger, &stripe_id, now))
    }

    fn note_overreports(&mut self, meter: &Meter, plan: &MeterPlan) {
        for o in &plan.overreports {
            if self.overreports_logged.insert((meter.name.clone(), o.customer.clone(), o.period_start_ms)) {
                crate::telemetry::stripe_overreport();
                tracing::error!(
                    meter = %meter.name,
                    customer = %o.customer,
                    period = %crate::model::window::rfc3339(o.period_start_ms),
                    excess = o.excess,
                    "Stripe holds more than is stored for this period and the events are too old to cancel; correct it by hand (a credit note)"
                );
            }
        }
    }

    fn row(&self, meter: &str, d: &Delta, kind: LedgerKind, fence: u64) -> LedgerRow {
        LedgerRow {
            meter: meter.to_string(),
            customer: d.customer.clone(),
            period_start_ms: d.period_start_ms,
            n: d.n,
            identifier: d.identifier.clone(),
            kind,
            value: d.value,
            stripe_customer_id: d.stripe_customer_id.clone(),
            at_ms: now_ms(),
            fence,
        }
    }

    fn event(event_name: &str, d: &Delta) -> MeterEvent {
        MeterEvent {
            event_name: event_name.to_string(),
            identifier: d.identifier.clone(),
            stripe_customer_id: d.stripe_customer_id.clone(),
            value: d.value,
            timestamp_s: d.period_start_ms.div_euclid(1000),
        }
    }

    /// Records a delta Stripe will not take.
    async fn fail(&self, meter: &str, d: &Delta, fence: u64, reason: &'static str, why: &str) -> Result<(), ReportError> {
        self.ledger.append_ledger(&[self.row(meter, d, LedgerKind::Failed, fence)], fence).await?;
        crate::telemetry::stripe_failed(reason, 1);
        tracing::error!(
            meter = %meter,
            customer = %d.customer,
            period = %crate::model::window::rfc3339(d.period_start_ms),
            value = d.value,
            identifier = %d.identifier,
            reason,
            why,
            "a Stripe delta was recorded as failed and will not be retried"
        );
        Ok(())
    }

    async fn execute(&mut self, meter: &str, event_name: &str, plan: &MeterPlan, fence: u64) -> Result<(), ReportError> {
        let meter = meter.to_string();
        for d in &plan.too_old {
            self.fail(&meter, d, fence, "too_old", "the period is older than Stripe accepts (35 days)").await?;
        }
        for c in &plan.cancels {
            self.keep_lease(fence).await?;
            match self.client.cancel(event_name, &c.identifier).await {
                Ok(()) => {
                    let row = LedgerRow {
                        meter: meter.clone(),
                        customer: c.customer.clone(),
                        period_start_ms: c.period_start_ms,
                        n: c.n,
                        identifier: c.identifier.clone(),
                        kind: LedgerKind::Cancelled,
                        value: -c.value,
                        stripe_customer_id: c.stripe_customer_id.clone(),
                        at_ms: now_ms(),
                        fence,
                    };
                    self.ledger.append_ledger(&[row], fence).await?;
                    crate::telemetry::stripe_cancelled();
                    tracing::info!(meter = %meter, customer = %c.customer, identifier = %c.identifier, value = c.value, "cancelled a meter event after a decrease");
                }
                Err(ClientError::Rejected { status, code, message }) => {
                    crate::telemetry::stripe_failed("cancel_rejected", 1);
                    tracing::error!(meter = %meter, customer = %c.customer, identifier = %c.identifier, status, code = %code, message = %message, "Stripe refused to cancel a meter event");
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Unconfirmed events first, exactly as recorded; then new ones, each
        // recorded as pending before it is sent.
        for (deltas, new) in [(&plan.resends, false), (&plan.sends, true)] {
            match self.settings.mode {
                StripeMode::V1 => self.send_v1(&meter, event_name, deltas, fence, new).await?,
                StripeMode::V2 => self.send_v2(&meter, event_name, deltas, fence, new).await?,
            }
        }
        Ok(())
    }

    /// Records events as pending before their first send.
    async fn record_pending(&self, meter: &str, deltas: &[Delta], fence: u64) -> Result<(), ReportError> {
        let rows: Vec<LedgerRow> = deltas.iter().map(|d| self.row(meter, d, LedgerKind::Pending, fence)).collect();
        Ok(self.ledger.append_ledger(&rows, fence).await?)
    }

    async fn send_v1(&mut self, meter: &str, event_name: &str, sends: &[Delta], fence: u64, new: bool) -> Result<(), ReportError> {
        for d in sends {
            self.keep_lease(fence).await?;
            if new {
                self.record_pending(meter, std::slice::from_ref(d), fence).await?;
            }
            match self.client.send_v1(&Self::event(event_name, d)).await {
                Ok(delivery) => {
                    self.ledger.append_ledger(&[self.row(meter, d, LedgerKind::Sent, fence)], fence).await?;
                    crate::telemetry::stripe_sent(1, delivery == Delivery::Duplicate);
                }
                Err(ClientError::Rejected { status, code, message }) => {
                    self.fail(meter, d, fence, "rejected", &format!("HTTP {status} {code}: {message}")).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The open session, or a new one when none is open or it expires within a minute.
    async fn session(&mut self) -> Result<Session, ReportError> {
        match &self.session {
            Some(s) if s.expires_at_ms > now_ms() + 60_000 => Ok(s.clone()),
            _ => {
                let s = self.client.open_session().await?;
                tracing::debug!(expires_at = %crate::model::window::rfc3339(s.expires_at_ms), "opened a Stripe meter event session");
                self.session = Some(s.clone());
                Ok(s)
            }
        }
    }

    /// Sends one stream request, opening a new session once if it expired.
    async fn stream(&mut self, events: &[MeterEvent]) -> Result<(), ReportError> {
        let session = self.session().await?;
        match self.client.send_v2(&session, events).await {
            Err(ClientError::SessionExpired) => {
                tracing::info!("the Stripe meter event session expired; opening a new one");
                self.session = None;
                let session = self.session().await?;
                Ok(self.client.send_v2(&session, events).await?)
            }
            other => Ok(other?),
        }
    }

    async fn send_v2(&mut self, meter: &str, event_name: &str, sends: &[Delta], fence: u64, new: bool) -> Result<(), ReportError> {
        for chunk in sends.chunks(MAX_STREAM_EVENTS) {
            self.keep_lease(fence).await?;
            if new {
                self.record_pending(meter, chunk, fence).await?;
            }
            let events: Vec<MeterEvent> = chunk.iter().map(|d| Self::event(event_name, d)).collect();
            match self.stream(&events).await {
                Ok(()) => {
                    let rows: Vec<LedgerRow> = chunk.iter().map(|d| self.row(meter, d, LedgerKind::Sent, fence)).collect();
                    self.ledger.append_ledger(&rows, fence).await?;
                    crate::telemetry::stripe_sent(rows.len(), false);
                }
                Err(ReportError::Client(ClientError::Rejected { .. })) if chunk.len() > 1 => {
                    // Find the event Stripe refuses: one at a time.
                    for (d, e) in chunk.iter().zip(&events) {
                        match self.stream(std::slice::from_ref(e)).await {
                            Ok(()) => {
                                self.ledger.append_ledger(&[self.row(meter, d, LedgerKind::Sent, fence)], fence).await?;
                                crate::telemetry::stripe_sent(1, false);
                            }
                            Err(ReportError::Client(ClientError::Rejected { status, code, message })) => {
                                self.fail(meter, d, fence, "rejected", &format!("HTTP {status} {code}: {message}")).await?;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(ReportError::Client(ClientError::Rejected { status, code, message })) => {
                    if let Some(d) = chunk.first() {
                        self.fail(meter, d, fence, "rejected", &format!("HTTP {status} {code}: {message}")).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
