//! Usage history (`GET /v1/usage`): store rows merged with the in-memory epochs the
//! store does not hold yet, so freshly ingested usage shows at once and nothing
//! shows twice (epochs the store already has are recognised by sequence number).

use crate::counters::buckets::bucket_value;
use crate::counters::Counters;
use crate::engine::Engine;
use crate::model::{window::rfc3339, Catalog, Decimal};
use crate::store::{Fold, StoreError, UsageQuery, UsageStore};
use serde::Serialize;
use std::collections::BTreeMap;

/// At most this many points in one answer.
pub const MAX_POINTS: usize = 10_000;

/// Why a history query failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Bucket size of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub fn parse(s: &str) -> Option<Granularity> {
        match s {
            "minute" => Some(Granularity::Minute),
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
    pub fn millis(self) -> i64 {
        match self {
            Granularity::Minute => 60_000,
            Granularity::Hour => 3_600_000,
            Granularity::Day => 86_400_000,
        }
    }
}

/// One point of the answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    pub customer: String,
    pub start: String,
    pub end: String,
    pub value: Decimal,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    pub meter: String,
    pub granularity: &'static str,
    pub data: Vec<Point>,
    /// True when the answer was cut at [`MAX_POINTS`].
    pub truncated: bool,
}

/// What the history query needs of the engine: the meters, the counters'
/// unflushed epochs (and the names their keys intern), the store's series.
#[derive(Clone, Copy)]
pub struct HistoryPorts<'a> {
    pub catalog: &'a Catalog,
    pub counters: &'a Counters,
    pub usage_store: &'a dyn UsageStore,
    pub instance_id: &'a str,
}

impl Engine {
    /// The history query's narrow view of the state.
    pub fn history_ports(&self) -> HistoryPorts<'_> {
        HistoryPorts {
            catalog: self.catalog(),
            counters: self.counters(),
            usage_store: self.usage_store().as_ref(),
            instance_id: self.instance_id(),
        }
    }
}

impl HistoryPorts<'_> {
    /// Usage of `meter` over `[from_ms, to_ms)` by `granularity`.
    pub async fn usage_series(
        &self,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
        granularity: Granularity,
        customer: Option<&str>,
    ) -> Result<Series, HistoryError> {
        let meter = self
            .catalog
            .meter_by_name(meter)
            .ok_or_else(|| HistoryError::Invalid { field: "meter", reason: format!("unknown meter {meter:?}") })?;
        if from_ms >= to_ms {
            return Err(HistoryError::Invalid { field: "from", reason: "must be before to".into() });
        }
        let g = granularity.millis();
        let from_ms = from_ms.div_euclid(g) * g;
        if (to_ms - from_ms) / g > MAX_POINTS as i64 {
            return Err(HistoryError::Invalid {
                field: "to",
                reason: format!("the range spans more than {MAX_POINTS} {} buckets; use a coarser granularity", granularity.as_str()),
            });
        }
        let fold = Fold::from(meter.aggregation);
        let query = UsageQuery {
            instance_id: self.instance_id.to_string(),
            meter: meter.name.clone(),
            fold,
            from_ms,
            to_ms,
            customer: customer.map(str::to_string),
            own_only: false,
        };
        let customer_id = customer.map(|c| self.counters.interner.lookup(c));
        // Epochs are taken before the store answers: an epoch stored meanwhile is
        // in the store answer (and skipped here by its sequence number); one that
        // was stored before is no longer in memory. So each is counted once.
        let epochs = self.counters.buckets.unflushed();
        let stored = self.usage_store.series(&query, g, MAX_POINTS + 1).await?;
        let mut points: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
        for p in stored.data {
            points.insert((p.customer, p.start_ms), (p.value, p.last_ts));
        }
        for epoch in &epochs {
            if epoch.seq <= stored.stored_seq {
                continue;
            }
            epoch.buckets.for_each(|k, bucket| {
                if k.meter != meter.id {
                    return;
                }
                if let Some(want) = customer_id {
                    if want != Some(k.customer) {
                        return;
                    }
                }
                let minute_ms = k.minute * 60_000;
                if minute_ms < from_ms || minute_ms >= to_ms {
                    return;
                }
                let Some(name) = self.counters.interner.name(k.customer) else {
                    return;
                };
                let slot = points.entry((name.to_string(), minute_ms.div_euclid(g) * g)).or_insert((0, i64::MIN));
                *slot = fold.combine(*slot, bucket_value(bucket));
            });
        }
        let truncated = points.len() > MAX_POINTS;
        let data = points
            .into_iter()
            .take(MAX_POINTS)
            .map(|((customer, start), (value, _))| Point {
                customer,
                start: rfc3339(start),
                end: rfc3339(start + g),
                value: Decimal { raw: value, precision: meter.precision },
            })
            .collect();
        Ok(Series { meter: meter.name.clone(), granularity: granularity.as_str(), data, truncated })
    }
}
