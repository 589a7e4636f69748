//! The engine: the container of the in-memory state every request touches
//! (catalog, the usage seam over the counters, entitlements cache, dedupe) and
//! its handles to the WAL and the stores. HTTP handlers and background tasks
//! share one `Arc<Engine>`. It knows no service: each service defines, in its
//! own module, a borrowed view of just the state it uses (`IngestPorts`,
//! `LimitReads` / `LimitsPorts`, `BackfillPorts`, `HistoryPorts`,
//! `CustomerPorts`, `FlushPorts`), built from the accessors below by one
//! `Engine::…_ports()` method, and works on that view (the fields are
//! private). Usage changes only through [`Engine::usage`] (see `crate::usage`).

use crate::answers::ConsumeAnswers;
/// Re-exported: callers have long found the clock here.
pub use crate::clock::now_ms;
use crate::config::{StrictWhenUnavailable, ValidConfig};
use crate::counters::Counters;
use crate::counters::Usage;
use crate::dedupe::Deduper;
use crate::duration::millis_i64;
use crate::entitlements::{EntitlementCache, EntitlementsError};
use crate::model::{Catalog, Meter, MeterId, WindowKind};
use crate::store::{EntitlementStore, Fold, StoreError, UsageQuery, UsageStore};
use crate::usage::{Origin, UsageObserver, UsageSeam};
use crate::wal::{OpenReport, Wal, WalBatch, WalConfig};
use std::sync::atomic::AtomicU8;
use std::sync::Arc;

/// Ids put back into the dedupe table per call at start (64 KiB of them).
const RESTORE_CHUNK: usize = 4096;

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Entitlements(#[from] EntitlementsError),
    #[error("cannot intern customer: {0}")]
    Intern(#[from] crate::counters::intern::InternError),
    #[error(transparent)]
    Wal(#[from] crate::wal::WalError),
    // Bounded dedupe (issue 15): the disk runs could not be opened.
    #[error(transparent)]
    Dedupe(#[from] crate::dedupe::DedupeError),
    // Reservations (issue 19): the hold journal could not be opened.
    #[error(transparent)]
    Holds(#[from] crate::holds::HoldError),
}

/// Limits the ingest path enforces, from `[ingest]`.
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    pub max_lateness_ms: i64,
    pub max_batch_events: usize,
    pub dedupe_window_ms: i64,
}

/// Everything in memory, shared by handlers and background tasks.
pub struct Engine {
    catalog: Arc<Catalog>,
    /// The counters, behind the seam every change of usage goes through.
    usage: UsageSeam,
    entitlements: EntitlementCache,
    deduper: Deduper,
    /// Remembered consume answers (bounded).
    consumes: ConsumeAnswers,
    usage_store: Arc<dyn UsageStore>,
    instance_id: String,
    limits: IngestLimits,
    /// Per meter: window kinds the config's plans use (rebuilt at start). Kinds
    /// only an override uses are seeded per customer when the override is set.
    plan_kinds: PlanKinds,
    /// The write-ahead log every accepted batch and consume goes through.
    wal: Wal,
    /// Past this many WAL bytes, writes are refused with 503 (the store is behind).
    max_wal_bytes: u64,
    /// `storage.max_pending_buckets`, and whether the minute buckets not yet
    /// stored passed it at the last look ([`Engine::note_pending_buckets`]).
    max_pending_buckets: u64,
    buckets_full: std::sync::atomic::AtomicBool,
    /// Serialize consumes of one (customer, meter) when several limits (or a
    /// gauge) must be decided and recorded together; held across the WAL write.
    consume_locks: ConsumeLocks,
    /// What the WAL replayed at start.
    wal_report: OpenReport,
    /// Redis, when instances share entitlements and totals.
    redis: Option<crate::redis_link::Redis>,
    /// `strict` limits while Redis is unreachable: allow (decide locally) or deny.
    strict_open_when_down: bool,
    /// `redis.entitlements_ttl` in milliseconds.
    redis_ttl_ms: i64,
    /// Where rows the usage store refuses are set aside (`data_dir/rejected`).
    rejected_dir: std::path::PathBuf,
    // Prepaid credits (issue 18): the balance book and where grants are stored.
    credits: Arc<crate::credits::CreditBook>,
    grant_store: Arc<dyn EntitlementStore>,
    // Reservations (issue 19): what reservations hold, journaled in data_dir/holds.
    holds: Arc<crate::holds::HoldBook>,
}

/// Read access to the state, for the services. None of these can change usage
/// except through [`Engine::usage`].
impl Engine {
    /// Meters and plans, from the config.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The seam every change of usage goes through.
    pub fn usage(&self) -> &UsageSeam {
        &self.usage
    }

    /// The counters, to read (writes go through [`Engine::usage`]).
    pub fn counters(&self) -> &Counters {
        self.usage.counters()
    }

    /// The entitlements cache.
    pub fn entitlements(&self) -> &EntitlementCache {
        &self.entitlements
    }

    /// Event and consume ids seen within the dedupe window.
    pub fn deduper(&self) -> &Deduper {
        &self.deduper
    }

    /// Remembered consume answers, by id hash.
    pub fn consumes(&self) -> &ConsumeAnswers {
        &self.consumes
    }

    /// Where minute aggregates go.
    pub fn usage_store(&self) -> &Arc<dyn UsageStore> {
        &self.usage_store
    }

    /// This instance's id (flushes, Redis parts).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// What ingest accepts (`[ingest]`).
    pub fn ingest_limits(&self) -> IngestLimits {
        self.limits
    }

    /// The window kinds the config's plans use, per meter.
    pub fn plan_kinds(&self) -> &PlanKinds {
        &self.plan_kinds
    }

    /// The write-ahead log.
    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// What the WAL replayed at start.
    pub fn wal_report(&self) -> &OpenReport {
        &self.wal_report
    }

    /// Redis, when configured.
    pub fn redis(&self) -> Option<&crate::redis_link::Redis> {
        self.redis.as_ref()
    }

    /// `strict` limits while Redis is unreachable: allow (decide locally) or deny.
    pub fn strict_open_when_down(&self) -> bool {
        self.strict_open_when_down
    }

    /// `redis.entitlements_ttl` in milliseconds.
    pub fn redis_ttl_ms(&self) -> i64 {
        self.redis_ttl_ms
    }

    /// Where rows the usage store refuses are set aside.
    pub fn rejected_dir(&self) -> &std::path::Path {
        &self.rejected_dir
    }

    /// The consume locks, striped by `(customer, meter)`.
    pub fn consume_locks(&self) -> &ConsumeLocks {
        &self.consume_locks
    }

    /// Whether writes are refused right now (the WAL and its size limit).
    /// Records how many minute buckets wait for the store (the flusher after
    /// each attempt, and every `/metrics` scrape): past
    /// `storage.max_pending_buckets`, writes are refused until a flush catches up.
    pub fn note_pending_buckets(&self, pending: usize) {
        let full = pending as u64 > self.max_pending_buckets;
        let was = self.buckets_full.swap(full, std::sync::atomic::Ordering::AcqRel);
        if full && !was {
            tracing::warn!(
                pending,
                cap = self.max_pending_buckets,
                "minute buckets waiting for the store passed storage.max_pending_buckets: ingest and consumes answer 503"
            );
        }
    }

    pub fn write_gate(&self) -> WriteGate<'_> {
        WriteGate {
            wal: &self.wal,
            max_wal_bytes: self.max_wal_bytes,
            buckets_full: self.buckets_full.load(std::sync::atomic::Ordering::Acquire).then_some(self.max_pending_buckets),
        }
    }

    // Prepaid credits (issue 18).
    /// The credit balance book.
    pub fn credits(&self) -> &Arc<crate::credits::CreditBook> {
        &self.credits
    }

    // Reservations (issue 19).
    /// The hold book.
    pub fn holds(&self) -> &Arc<crate::holds::HoldBook> {
        &self.holds
    }

    /// Where grants are stored (the entitlement store).
    pub fn grant_store(&self) -> &Arc<dyn EntitlementStore> {
        &self.grant_store
    }
}

/// Per meter id (up to the catalog's capacity), the window kinds the config's
/// plans use (one bit per kind).
pub struct PlanKinds(Vec<AtomicU8>);

impl PlanKinds {
    /// Whether the config's plans use `kind` for `meter`.
    pub fn tracks(&self, meter: crate::model::MeterId, kind: WindowKind) -> bool {
        self.0.get(usize::from(meter)).map(|b| b.load(std::sync::atomic::Ordering::Acquire) & (1 << kind.index()) != 0).unwrap_or(false)
    }

    /// Records that the plans use `kind` for `meter` (a meter added live).
    fn add(&self, meter: MeterId, kind: WindowKind) {
        if let Some(bits) = self.0.get(usize::from(meter)) {
            bits.fetch_or(1 << kind.index(), std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// The striped `(customer, meter)` consume locks.
pub struct ConsumeLocks(Box<[tokio::sync::Mutex<()>]>);

impl ConsumeLocks {
    fn new(stripes: usize) -> ConsumeLocks {
        ConsumeLocks((0..stripes).map(|_| tokio::sync::Mutex::new(())).collect())
    }

    /// The consume lock of `(customer, meter)`: one consume at a time.
    pub async fn lock(&self, customer: crate::counters::CustomerId, meter: crate::model::MeterId) -> ConsumeGuard<'_> {
        let stripe = (customer as usize).wrapping_mul(31).wrapping_add(usize::from(meter)) % self.0.len();
        ConsumeGuard { _held: self.0[stripe].lock().await, customer, meter }
    }
}

/// Whether writes (events, consumes) are refused: the WAL broke, or holds more
/// than `storage.max_wal_bytes`.
#[derive(Clone, Copy)]
pub struct WriteGate<'a> {
    wal: &'a Wal,
    max_wal_bytes: u64,
    /// `Some(cap)`: more than `storage.max_pending_buckets` buckets wait for the store.
    buckets_full: Option<u64>,
}

impl WriteGate<'_> {
    /// Whether the WAL holds more than the store may fall behind by.
    pub fn over_limit(&self) -> bool {
        self.wal.enabled() && self.wal.bytes() > self.max_wal_bytes
    }

    /// Why writes are refused right now, if they are.
    pub fn refusal(&self) -> Option<String> {
        if self.wal.stats.broken.load(std::sync::atomic::Ordering::Acquire) {
            return Some("the WAL could not recover from a write error; restart meterd".into());
        }
        if self.over_limit() {
            use std::sync::atomic::Ordering::Acquire;
            let (checkpoint, hold) = (self.wal.stats.checkpoint.load(Acquire), self.wal.stats.hold.load(Acquire));
            let behind = if hold < checkpoint { "the raw-events export is behind" } else { "the usage store is behind" };
            return Some(format!("{behind}: {} bytes of WAL exceed storage.max_wal_bytes ({})", self.wal.bytes(), self.max_wal_bytes));
        }
        if let Some(cap) = self.buckets_full {
            return Some(format!(
                "the usage store is behind: more than storage.max_pending_buckets ({cap}) minute buckets wait to be stored"
            ));
        }
        None
    }
}

/// Proof that the caller holds the consume lock of `(customer, meter)`: the
/// paths that decide several limits together take one as an argument.
pub struct ConsumeGuard<'a> {
    _held: tokio::sync::MutexGuard<'a, ()>,
    customer: crate::counters::CustomerId,
    meter: crate::model::MeterId,
}

impl ConsumeGuard<'_> {
    /// Whether this guard is the lock of `(customer, meter)`.
    pub fn covers(&self, customer: crate::counters::CustomerId, meter: crate::model::MeterId) -> bool {
        self.customer == customer && self.meter == meter
    }
}

impl Engine {
    /// Builds the engine: loads entitlements, rebuilds current-window counters from
    /// the usage store, then replays the WAL above the store's watermark.
    pub async fn start(
        config: &ValidConfig,
        instance_id: String,
        usage_store: Arc<dyn UsageStore>,
        entitlement_store: Arc<dyn EntitlementStore>,
        wal_config: WalConfig,
        redis: Option<crate::redis_link::Redis>,
    ) -> Result<Engine, EngineError> {
        Engine::start_observed(config, instance_id, usage_store, entitlement_store, wal_config, redis, Vec::new()).await
    }

    /// [`Engine::start`] with usage observers, fixed for the engine's life: they
    /// see the rebuild and the replay too.
    pub async fn start_observed(
        config: &ValidConfig,
        instance_id: String,
        usage_store: Arc<dyn UsageStore>,
        entitlement_store: Arc<dyn EntitlementStore>,
        wal_config: WalConfig,
        redis: Option<crate::redis_link::Redis>,
        mut observers: Vec<Arc<dyn UsageObserver>>,
    ) -> Result<Engine, EngineError> {
        let catalog = config.catalog.clone();
        // Prepaid credits (issue 18): the book sees every change of usage.
        let credits = Arc::new(crate::credits::CreditBook::new(catalog.clone()));
        // Issue 15: the ledgers keep per-minute usage only as far back as it may still arrive.
        credits.set_max_lateness(millis_i64(config.ingest.max_lateness));
        if credits.observes() {
            observers.push(credits.clone());
        }
        let grant_store = entitlement_store.clone();
        let removed = usage_store.recover(&instance_id).await?;
        if removed > 0 {
            tracing::warn!(flushes = removed, "removed flushes the usage store held in part; the WAL replays their usage");
        }
        let next_seq = usage_store.max_flush_seq(&instance_id).await? + 1;
        let counters = Counters::new(&catalog, next_seq);
        // Unique counts (issue 25): distinct values kept per window.
        counters.unique.set_cap(config.ingest.max_unique_values);
        if config.redis.is_some() {
            // Totals are shared: each instance counts its own usage locally.
            counters.windows.set_shared();
            // Unique sets are merged through Redis sets (`sync::unique`).
            counters.unique.set_shared();
        }
        // Laid out for meters added live too (config reload, issue 23).
        let plan_kinds = (0..catalog.capacity())
            .map(|m| {
                let bits = MeterId::try_from(m).map_or(0, |m| counters.tracked_kinds(m).fold(0u8, |b, k| b | (1 << k.index())));
                AtomicU8::new(bits)
            })
            .collect();
        let plan_kinds = PlanKinds(plan_kinds);
        let lazy_ttl = config.redis.as_ref().map(|r| r.entitlements_ttl);
        let entitlements = EntitlementCache::load(catalog.clone(), entitlement_store, &counters.interner, lazy_ttl).await?;
        let ingest = &config.ingest;
        // Bounded dedupe (issue 15): older ids in runs beside the WAL's id files.
        let deduper = Deduper::open(
            millis_i64(ingest.dedupe_window),
            crate::dedupe::SpillConfig {
                dir: wal_config.dir.join("dedupe"),
                ids_dir: wal_config.sync.is_some().then(|| wal_config.dir.join("ids")),
                memory_bytes: ingest.dedupe_memory,
                lag_minutes: crate::dedupe::SPILL_LAG_MINUTES,
                keep_existing: wal_config.sync.is_some(),
            },
            now_ms(),
        )?;
        // Reservations (issue 19): holds come back as they were journaled.
        let holds = Arc::new(
            crate::holds::HoldBook::open(&config.storage.data_dir.join("holds"), crate::holds::DEFAULT_CAP, now_ms(), |customer, meter| {
                Some((counters.interner.intern(customer).ok()?, catalog.meter_by_name(meter)?.id))
            })
            // With Redis, holds live there (`holds::shared`).
            .map(|book| if redis.is_some() { book.into_shared() } else { book })?,
        );
        let engine = Engine {
            catalog,
            usage: UsageSeam::new(counters, observers),
            entitlements,
            deduper,
            consumes: ConsumeAnswers::new(crate::answers::AnswerLimits::for_window(millis_i64(ingest.dedupe_window))),
            usage_store,
            instance_id,
            limits: IngestLimits {
                max_lateness_ms: millis_i64(ingest.max_lateness),
                max_batch_events: ingest.max_batch_events,
                dedupe_window_ms: millis_i64(ingest.dedupe_window),
            },
            plan_kinds,
            wal: Wal::disabled(),
            max_wal_bytes: config.storage.max_wal_bytes,
            max_pending_buckets: config.storage.max_pending_buckets,
            buckets_full: std::sync::atomic::AtomicBool::new(false),
            consume_locks: ConsumeLocks::new(1024),
            wal_report: OpenReport::default(),
            redis,
            strict_open_when_down: config.redis.as_ref().is_some_and(|r| r.strict_when_unavailable == StrictWhenUnavailable::Allow),
            rejected_dir: config.storage.data_dir.join("rejected"),
            redis_ttl_ms: config.redis.as_ref().map(|r| millis_i64(r.entitlements_ttl)).unwrap_or(i64::MAX),
            credits,
            grant_store,
            holds,
        };
        let mut engine = engine;
        engine.rebuild().await?;
        // Prepaid credits (issue 18): grants, then the stored usage of credits
        // meters; the WAL replay below adds the rest through the seam.
        let shared = engine.counters().windows.is_shared();
        crate::credits::load::track_overrides(&engine.credits, &engine.entitlements, &engine.counters().interner);
        crate::credits::load::load(
            &engine.credits,
            &*engine.grant_store,
            &*engine.usage_store,
            &engine.counters().interner,
            &engine.instance_id,
            shared,
        )
        .await?;
        let floor = engine.usage_store.wal_mark(&engine.instance_id).await?;
        let started = std::time::Instant::now();
        // Room for the ids that go back to RAM, made at once (`Deduper::reserve`).
        match Wal::ids_to_load(&wal_config, engine.deduper.unspilled_from_ms()) {
            Ok(n) => engine.deduper.reserve(n),
            Err(e) => tracing::warn!(error = %e, "cannot size the id files; the dedupe table grows as they are read"),
        }
        // The id files' ids go back in chunks (prefetched, see `Deduper::restore_batch`).
        let mut restoring = Vec::with_capacity(RESTORE_CHUNK);
        let mut restored = crate::dedupe::Restored::default();
        let restore = |id, at, seq| {
            restoring.push((id, at, seq));
            if restoring.len() >= RESTORE_CHUNK {
                restored += engine.deduper.restore_batch(&restoring);
                restoring.clear();
            }
        };
        let (wal, report) = Wal::open(&wal_config, &floor, restore, |_, batch| engine.replay(&batch))?;
        restored += engine.deduper.restore_batch(&restoring);
        if report.replayed_records > 0 || report.truncated.is_some() || report.ids_loaded > 0 {
            tracing::info!(
                records = report.replayed_records,
                events = report.replayed_events,
                ids = report.ids_loaded,
                ids_skipped = restored.skipped,
                ids_looked_up = restored.looked_up,
                ids_back_in_ram = restored.back,
                seconds = started.elapsed().as_secs_f64(),
                from = floor.upto,
                "replayed the WAL"
            );
        }
        engine.wal = wal;
        engine.wal_report = report;
        engine.credits.arm(|c, m| engine.entitlements.get(Some(c)).limits(m).and_then(|l| crate::credits::CreditBook::low_balance_of(l)));
        Ok(engine)
    }

    // Meters added live (config reload, issue 23).
    /// Adds `added` (numbered after the running meters, see
    /// [`Catalog::numbered_as`]) to the running catalog, laid out as if they had
    /// been configured at start: the window kinds `plans` (the reloaded
    /// catalog) limit them by are tracked, a credits limit makes one a credits
    /// meter, its metrics are registered at zero. All of that happens before
    /// the meter is visible, so its first event is counted in every window:
    /// nothing was counted for it before, so nothing needs seeding. Fails only
    /// when the catalog refuses (`prepare` checks that first).
    pub fn add_meters(&self, added: &[Meter], plans: &Catalog) -> Result<(), String> {
        if added.is_empty() {
            return Ok(());
        }
        for plan in plans.plans().iter() {
            for meter in added {
                for limit in plan.limits.get(&meter.id).into_iter().flat_map(|l| l.iter()) {
                    // As `Counters::new` and `CreditBook::new` do at start.
                    if limit.amount.is_credits() {
                        self.credits.track_meter(meter.id);
                    }
                    self.counters().track(meter.id, limit.window);
                    self.plan_kinds.add(meter.id, limit.window);
                }
            }
        }
        self.catalog.add_meters(added)?;
        crate::telemetry::register_meters(&added.iter().map(|m| (usize::from(m.id), m.name.as_str())).collect::<Vec<_>>());
        Ok(())
    }

    /// Folds one replayed WAL batch into the counters and the dedupe set.
    fn replay(&self, batch: &WalBatch) {
        // Names are stored once per batch: resolve each once.
        let meters: Vec<Option<&crate::model::Meter>> = batch.meters.iter().map(|m| self.catalog.meter_by_name(m)).collect();
        let customers: Vec<Option<u32>> = batch.customers.iter().map(|c| self.counters().interner.intern(c).ok()).collect();
        // Ids keep deduping for the rest of their window after a restart
        // (a replayed record's ids are looked up in the runs, never skipped).
        let ids: Vec<_> = batch.events.iter().map(|e| (e.id_hash, batch.accepted_ms, u64::MAX)).collect();
        self.deduper.restore_batch(&ids);
        let mut usages = Vec::with_capacity(batch.events.len());
        for e in &batch.events {
            let Some(meter) = meters.get(usize::from(e.meter)).copied().flatten() else {
                tracing::warn!(meter = %batch.meter(e), "a WAL event names a meter no longer configured; skipped");
                continue;
            };
            let Some(customer) = customers.get(e.customer as usize).copied().flatten() else {
                continue;
            };
            usages.push((customer, meter, e));
        }
        let props: Vec<Vec<(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)>> =
            usages.iter().map(|(_, _, e)| e.properties.iter().map(|(k, v)| (k.as_str().into(), v.as_str().into())).collect()).collect();
        let folded: Vec<Usage<'_>> = usages
            .iter()
            .zip(&props)
            .map(|((customer, meter, e), properties)| Usage {
                customer: *customer,
                meter,
                raw: e.raw,
                ts: e.ts,
                properties,
                props_hash: crate::counters::props_hash(properties),
                anchor: self.entitlements.get(Some(*customer)).billing_anchor,
            })
            .collect();
        self.usage.apply(&folded, Origin::Replay);
    }

    /// Why writes are refused right now, if they are.
    pub fn write_refusal(&self) -> Option<String> {
        self.write_gate().refusal()
    }

    /// Unique counts (issue 25): seeds each current window of a `unique_count`
    /// meter with the distinct values the store holds for it (every
    /// instance's rows: a value counted anywhere is counted once).
    async fn rebuild_unique(&self, meter: &crate::model::Meter, property: &str, now: i64) -> Result<(), EngineError> {
        for kind in self.counters().tracked_kinds(meter.id).collect::<Vec<_>>() {
            // Anchored billing cycles differ per customer: one query each.
            let anchored: Vec<u32> = if kind == WindowKind::BillingCycle {
                (0..u32::try_from(self.counters().interner.len()).unwrap_or(u32::MAX))
                    .filter(|&c| self.entitlements.get(Some(c)).billing_anchor_ms.is_some())
                    .collect()
            } else {
                Vec::new()
            };
            let mut queries = vec![(kind.bounds(now, Default::default()), None)];
            for c in anchored {
                let ent = self.entitlements.get(Some(c));
                if let Some(name) = self.counters().interner.name(c) {
                    queries.push((kind.bounds(now, ent.billing_anchor), Some(name)));
                }
            }
            for (window, customer) in queries {
                let query = UsageQuery::for_window(&self.instance_id, &meter.name, Fold::Sum, &window, customer.as_deref());
                let span = window.end_ms.saturating_sub(window.start_ms).max(1);
                let rows = self.usage_store.distinct_values(&query, span, property, None, usize::MAX).await?.data;
                let mut by_customer: std::collections::BTreeMap<String, Vec<u128>> = std::collections::BTreeMap::new();
                for row in rows {
                    by_customer.entry(row.customer).or_default().push(crate::counters::unique::hash_value(&row.value));
                }
                for (name, values) in by_customer {
                    let c = self.counters().interner.intern(&name)?;
                    let ent = self.entitlements.get(Some(c));
                    if customer.is_none() && kind == WindowKind::BillingCycle && ent.billing_anchor_ms.is_some() {
                        continue; // Rebuilt with its own anchor.
                    }
                    let key = Counters::key(c, meter.id, kind, now, ent.billing_anchor);
                    self.usage.merge_unique(key, values, Origin::Rebuild);
                }
            }
        }
        Ok(())
    }

    /// Seeds the current window of every tracked kind from the store. Runs before
    /// the server accepts anything, so nothing races it.
    async fn rebuild(&self) -> Result<(), EngineError> {
        let now = now_ms();
        // Override kinds first, so they are tracked and rebuilt like plan kinds.
        for customer in 0..u32::try_from(self.counters().interner.len()).unwrap_or(u32::MAX) {
            let ent = self.entitlements.get(Some(customer));
            for (meter, limits) in &ent.overrides {
                for l in limits.iter() {
                    self.counters().track(*meter, l.window);
                }
            }
        }
        for meter in self.catalog.meters() {
            if let Some(property) = meter.unique_property.as_deref() {
                self.rebuild_unique(meter, property, now).await?;
                continue;
            }
            let fold = Fold::from(meter.aggregation);
            for kind in self.counters().tracked_kinds(meter.id).collect::<Vec<_>>() {
                let window = kind.bounds(now, Default::default());
                let mut query = UsageQuery::for_window(&self.instance_id, &meter.name, fold, &window, None);
                query.own_only = self.counters().windows.is_shared();
                let rows = self.usage_store.aggregate(&query).await?.data;
                for row in rows {
                    let customer = self.counters().interner.intern(&row.customer)?;
                    let ent = self.entitlements.get(Some(customer));
                    if kind == WindowKind::BillingCycle && ent.billing_anchor_ms.is_some() {
                        continue; // Anchored customers are rebuilt one by one below.
                    }
                    let key = Counters::key(customer, meter.id, kind, now, ent.billing_anchor);
                    self.usage.set_window(key, row.value, row.last_ts, Origin::Rebuild);
                }
                if kind != WindowKind::BillingCycle {
                    continue;
                }
                for customer in 0..u32::try_from(self.counters().interner.len()).unwrap_or(u32::MAX) {
                    let ent = self.entitlements.get(Some(customer));
                    if ent.billing_anchor_ms.is_none() {
                        continue;
                    }
                    let Some(name) = self.counters().interner.name(customer) else {
                        continue;
                    };
                    let window = kind.bounds(now, ent.billing_anchor);
                    let mut query = UsageQuery::for_window(&self.instance_id, &meter.name, fold, &window, Some(&name));
                    query.own_only = self.counters().windows.is_shared();
                    if let Some(row) = self.usage_store.aggregate(&query).await?.data.into_iter().next() {
                        let key = Counters::key(customer, meter.id, kind, now, ent.billing_anchor);
                        self.usage.set_window(key, row.value, row.last_ts, Origin::Rebuild);
                    }
                }
            }
        }
        Ok(())
    }
}
