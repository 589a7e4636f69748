//! The ingest path: parse and validate a body, drop duplicates, fold the rest into
//! the counters. Everything before the fold can refuse the batch; nothing after
//! it can, so a batch is all-or-nothing.

use super::parse::{parse_batch, ParseError, Rules};
use crate::counters::{Counters, Usage};
use crate::dedupe::{hash_id, Deduper};
use crate::engine::{now_ms, Engine, IngestLimits, WriteGate};
use crate::entitlements::EntitlementCache;
use crate::model::{Catalog, WindowKind};
use crate::redis_link::Redis;
use crate::sync::customer::CustomerPorts;
use crate::usage::{Origin, UsageSeam};
use crate::wal::{RecordBuilder, Wal};

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Ndjson,
}

/// The `202` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IngestOutcome {
    pub accepted: usize,
    pub duplicates: usize,
}

/// Why a batch was refused; nothing of it was recorded.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("customer table is full")]
    Full,
    /// Writes are refused for now (store behind, WAL write failed): retry later.
    #[error("{0}")]
    Unavailable(String),
}

/// What ingest needs of the engine: the catalog to validate against, the
/// interner and the usage seam to fold into, the dedupe set (and Redis, to
/// share it), the WAL and its write gate, the billing anchors of the
/// entitlements (loading unseen customers from Redis first), and `[ingest]`.
#[derive(Clone, Copy)]
pub struct IngestPorts<'a> {
    pub catalog: &'a Catalog,
    pub usage: &'a UsageSeam,
    pub entitlements: &'a EntitlementCache,
    pub deduper: &'a Deduper,
    pub wal: &'a Wal,
    pub write_gate: WriteGate<'a>,
    pub redis: Option<&'a Redis>,
    pub instance_id: &'a str,
    pub limits: IngestLimits,
    /// Loads customers first seen here (with Redis).
    pub customers: CustomerPorts<'a>,
}

impl Engine {
    /// Ingest's narrow view of the state.
    pub fn ingest_ports(&self) -> IngestPorts<'_> {
        IngestPorts {
            catalog: self.catalog(),
            usage: self.usage(),
            entitlements: self.entitlements(),
            deduper: self.deduper(),
            wal: self.wal(),
            write_gate: self.write_gate(),
            redis: self.redis(),
            instance_id: self.instance_id(),
            limits: self.ingest_limits(),
            customers: self.customer_ports(),
        }
    }

    /// [`IngestPorts::ingest`] on this engine.
    pub async fn ingest(&self, body: &[u8], kind: BodyKind) -> Result<IngestOutcome, IngestError> {
        self.ingest_ports().ingest(body, kind).await
    }
}

impl IngestPorts<'_> {
    fn counters(&self) -> &Counters {
        self.usage.counters()
    }

    /// Ingests one body: answers once the accepted events are as durable as
    /// `storage.durability` says and folded into the counters.
    ///
    /// Run it to completion (the HTTP handler spawns it): once the WAL has a
    /// record, the fold must happen even if the client went away.
    pub async fn ingest(&self, body: &[u8], kind: BodyKind) -> Result<IngestOutcome, IngestError> {
        let now = now_ms();
        let rules = Rules { now_ms: now, max_lateness_ms: self.limits.max_lateness_ms, max_batch_events: self.limits.max_batch_events };
        let events = match parse_batch(body, kind == BodyKind::Ndjson, self.catalog, &rules) {
            Ok(e) => e,
            Err(e) => {
                if let ParseError::Invalid { events, .. } = &e {
                    crate::telemetry::events_rejected(*events);
                }
                return Err(e.into());
            }
        };
        self.ingest_events(&events, now).await
    }

    /// Unique counts (issue 25): refuses the whole batch (400, naming each
    /// event's property) when a value new to a window would pass
    /// `ingest.max_unique_values` there.
    fn check_unique_cap(&self, events: &[super::parse::Event<'_>], ids: &[crate::counters::CustomerId]) -> Result<(), IngestError> {
        use crate::counters::unique::hash_value;
        let sets = &self.counters().unique;
        // Each window's values not counted yet, in the batch's order: (event,
        // its value, the property, the window kind and its place among the
        // meter's, the meter's name). A counted value stays counted while its
        // window lives, so it needs no second look.
        type Seen<'m> = Vec<(usize, u128, &'m str, (WindowKind, usize), &'m str)>;
        let mut by_key: std::collections::HashMap<crate::counters::CounterKey, Seen<'_>, crate::keyhash::KeyHash> =
            std::collections::HashMap::with_hasher(crate::keyhash::KeyHash);
        for (index, (event, &customer)) in events.iter().zip(ids).enumerate() {
            let Some(meter) = self.catalog.meter(event.meter) else { continue };
            let (Some(property), Some(value)) = (meter.unique_property.as_deref(), meter.unique_value(&event.properties)) else {
                continue;
            };
            let value = hash_value(value);
            let anchor = if self.counters().is_tracked(meter.id, WindowKind::BillingCycle) {
                self.entitlements.get(Some(customer)).billing_anchor
            } else {
                Default::default()
            };
            for (place, kind) in self.counters().tracked_kinds(meter.id).enumerate() {
                let key = crate::counters::Counters::key(customer, meter.id, kind, event.ts, anchor);
                if !sets.contains(&key, value) {
                    by_key.entry(key).or_default().push((index, value, property, (kind, place), &meter.name));
                }
            }
        }
        // One decision per window, under its lock (`UniqueSets::refused`); an
        // event refused in several windows is named once, for the meter's first.
        let mut refused = Vec::new();
        for (key, seen) in &by_key {
            let values: Vec<u128> = seen.iter().map(|s| s.1).collect();
            let (positions, size) = sets.refused(key, &values);
            for at in positions {
                let (index, _, property, (kind, place), meter) = seen[at];
                let reason = format!(
                    "a new value would pass ingest.max_unique_values ({}) in the {} window of meter {meter:?}, which counts {size} distinct values",
                    sets.cap(),
                    kind.as_str(),
                );
                refused.push((index, place, super::parse::Detail { index, field: format!("properties.{property}"), reason }));
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        refused.sort_by_key(|r| (r.0, r.1));
        refused.dedup_by_key(|r| r.0);
        let mut details: Vec<super::parse::Detail> = refused.into_iter().map(|r| r.2).collect();
        crate::telemetry::unique_refused(details.len());
        crate::telemetry::events_rejected(details.len());
        let n = details.len();
        details.truncate(super::parse::MAX_DETAILS);
        Err(IngestError::Parse(ParseError::Invalid { details, total: n, events: n }))
    }

    /// Ingests events already validated (the body's, or an adjustment's, whose
    /// `raw` may be negative: issue 19): intern, dedupe, log to the WAL, fold.
    pub async fn ingest_events(&self, events: &[super::parse::Event<'_>], now: i64) -> Result<IngestOutcome, IngestError> {
        crate::telemetry::batch_size(events.len());
        // Intern before dedupe: interning is the last step that can fail, and a
        // customer id assigned for a refused batch costs nothing.
        let ids = self.counters().interner.intern_batch(events.iter().map(|e| e.customer.as_ref())).map_err(|_| IngestError::Full)?;
        if let Some(reason) = self.write_gate.refusal() {
            return Err(IngestError::Unavailable(reason));
        }
        if self.catalog.meters().iter().any(|m| m.aggregation == crate::model::Aggregation::UniqueCount) {
            self.check_unique_cap(events, &ids)?;
        }
        if self.redis.is_some() && self.catalog.meters().iter().any(|m| self.counters().is_tracked(m.id, WindowKind::BillingCycle)) {
            // Billing cycles follow each customer's anchor: load customers never
            // seen here first (concurrently, one round trip each).
            let mut names: Vec<&str> = events.iter().map(|e| e.customer.as_ref()).collect();
            names.sort_unstable();
            names.dedup();
            futures_util::future::join_all(names.into_iter().map(|n| self.customers.ensure_loaded(n))).await;
        }
        // Bounded dedupe (issue 15): refused while ids can neither stay in RAM
        // nor go to disk; an event with its own timestamp need not search runs
        // older than it (see `dedupe`).
        if let Some(reason) = self.deduper.refusal() {
            return Err(IngestError::Unavailable(reason));
        }
        let hashes: Vec<_> = events.iter().map(|e| hash_id(&e.id)).collect();
        let since: Vec<i64> = events.iter().map(|e| if e.ts == now { 0 } else { Deduper::since_of_timestamp(e.ts) }).collect();
        let mut fresh: Vec<bool> = self.deduper.admit_batch(&hashes, &since, now).map_err(|e| IngestError::Unavailable(e.to_string()))?;
        let mut claimed = Vec::new();
        if let Some(redis) = self.redis {
            // New here: ask the other instances too (see `shared_dedupe`).
            let local: Vec<usize> = (0..hashes.len()).filter(|&i| fresh[i]).collect();
            let ids: Vec<u128> = local.iter().map(|&i| hashes[i]).collect();
            // Boxed, as the other Redis round trips on the request path are: kept
            // out of the local path's future.
            if let Ok(new) = Box::pin(super::shared_dedupe::claim(redis, self.instance_id, &ids, self.limits.dedupe_window_ms)).await {
                for (&i, new) in local.iter().zip(new) {
                    fresh[i] = new;
                }
                claimed = ids;
            }
        }
        let mut usages = Vec::with_capacity(events.len());
        // The customer names the WAL stores, taken from the body (not from the
        // interner, whose shared lock and refcounts cost more than the copy).
        let mut names: Vec<&str> = Vec::with_capacity(events.len());
        let mut duplicates = 0;
        for ((event, customer), &fresh) in events.iter().zip(ids).zip(&fresh) {
            if !fresh {
                duplicates += 1;
                continue;
            }
            let Some(meter) = self.catalog.meter(event.meter) else { continue };
            names.push(&event.customer);
            let anchor = if self.counters().is_tracked(meter.id, WindowKind::BillingCycle) {
                self.entitlements.get(Some(customer)).billing_anchor
            } else {
                Default::default()
            };
            usages.push(Usage {
                customer,
                meter,
                raw: event.raw,
                ts: event.ts,
                properties: &event.properties,
                props_hash: event.props_hash(),
                anchor,
            });
        }
        if !usages.is_empty() && !self.wal.enabled() {
            // `durability = "none"`: nothing to log.
            self.usage.apply(&usages, Origin::Live);
        } else if !usages.is_empty() {
            // The builder is handed over before the await, in its own scope: kept
            // across it, it would be part of this future (issue 24).
            let appended = {
                let mut builder = RecordBuilder::new(now, usages.len());
                let fresh_hashes = hashes.iter().zip(&fresh).filter(|(_, f)| **f).map(|(h, _)| *h);
                for ((u, id_hash), name) in usages.iter().zip(fresh_hashes).zip(&names) {
                    builder.push(id_hash, u.customer, name, u.meter.id, &u.meter.name, u.raw, u.ts, u.properties);
                }
                self.wal.append(builder)
            };
            match appended.await {
                Ok(seq) => self.usage.apply_then(&usages, Origin::Live, || self.wal.tracker.folded(seq)),
                Err(e) => {
                    // Nothing was recorded: the ids may be sent again.
                    for (h, f) in hashes.iter().zip(&fresh) {
                        if *f {
                            self.deduper.remove(*h);
                        }
                    }
                    if let Some(redis) = self.redis {
                        Box::pin(super::shared_dedupe::release(redis, &claimed)).await;
                    }
                    return Err(IngestError::Unavailable(format!("could not write the WAL: {e}")));
                }
            }
        }
        crate::telemetry::events("accepted", usages.iter().map(|u| (usize::from(u.meter.id), u.meter.name.as_str())));
        if duplicates > 0 {
            let meters = events.iter().zip(&fresh).filter(|(_, f)| !**f).filter_map(|(e, _)| self.catalog.meter(e.meter));
            crate::telemetry::events("duplicate", meters.map(|m| (usize::from(m.id), m.name.as_str())));
        }
        Ok(IngestOutcome { accepted: usages.len(), duplicates })
    }
}
