//! Usage history (`GET /v1/usage`): store rows merged with the in-memory epochs the
//! store does not hold yet, so freshly ingested usage shows at once and nothing
//! shows twice (epochs the store already has are recognised by sequence number).

use crate::counters::buckets::{bucket_property, bucket_value};
use crate::counters::Counters;
use crate::engine::Engine;
use crate::model::{window::rfc3339, Catalog, Decimal};
use crate::store::{Fold, StoreError, UsageQuery, UsageStore};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// At most this many points in one answer.
pub const MAX_POINTS: usize = 10_000;

/// Unique counts (issue 25): at most this many distinct (point, value) pairs
/// read from the store for one answer; past it the answer says `truncated`.
pub const MAX_DISTINCT: usize = 1_000_000;

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
    /// With `group_by` (issue 25): `{property: value}`, the value `null` for
    /// usage without the property.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<BTreeMap<String, Option<String>>>,
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
    /// Usage of `meter` over `[from_ms, to_ms)` by `granularity`, grouped by
    /// the property `group_by` when given (issue 25).
    pub async fn usage_series(
        &self,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
        granularity: Granularity,
        customer: Option<&str>,
        group_by: Option<&str>,
    ) -> Result<Series, HistoryError> {
        let meter = self
            .catalog
            .meter_by_name(meter)
            .ok_or_else(|| HistoryError::Invalid { field: "meter", reason: format!("unknown meter {meter:?}") })?;
        if let Some(g) = group_by {
            if !meter.group_by.iter().any(|p| p == g) {
                let listed = if meter.group_by.is_empty() { "none".to_string() } else { meter.group_by.join(", ") };
                return Err(HistoryError::Invalid {
                    field: "group_by",
                    reason: format!("meter {:?} cannot be grouped by {g:?} (its group_by lists: {listed})", meter.name),
                });
            }
        }
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
        if let Some(property) = meter.unique_property.as_deref() {
            return self.unique_series(meter, &query, granularity, property, group_by).await;
        }
        if let Some(group_by) = group_by {
            return self.grouped_series(meter, &query, granularity, group_by).await;
        }
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
                group: None,
            })
            .collect();
        Ok(Series { meter: meter.name.clone(), granularity: granularity.as_str(), data, truncated })
    }

    /// The unflushed buckets of `meter` in the query's range that the store
    /// (at `stored_seq`) does not hold: `f(customer name, bucket start, bucket)`.
    fn each_unflushed(
        &self,
        meter: &crate::model::Meter,
        query: &UsageQuery,
        epochs: &[std::sync::Arc<crate::counters::Epoch>],
        stored_seq: u64,
        g: i64,
        mut f: impl FnMut(std::sync::Arc<str>, i64, &crate::counters::buckets::Bucket),
    ) {
        let customer_id = query.customer.as_deref().map(|c| self.counters.interner.lookup(c));
        for epoch in epochs {
            if epoch.seq <= stored_seq {
                continue;
            }
            epoch.buckets.for_each(|k, bucket| {
                if k.meter != meter.id || customer_id.is_some_and(|want| want != Some(k.customer)) {
                    return;
                }
                let minute_ms = k.minute * 60_000;
                if minute_ms < query.from_ms || minute_ms >= query.to_ms {
                    return;
                }
                let Some(name) = self.counters.interner.name(k.customer) else { return };
                f(name, query.from_ms + (minute_ms - query.from_ms).div_euclid(g) * g, bucket);
            });
        }
    }

    /// Issue 25: one series per value of `group_by`.
    async fn grouped_series(
        &self,
        meter: &crate::model::Meter,
        query: &UsageQuery,
        granularity: Granularity,
        group_by: &str,
    ) -> Result<Series, HistoryError> {
        let g = granularity.millis();
        let epochs = self.counters.buckets.unflushed();
        let stored = self.usage_store.series_grouped(query, g, group_by, MAX_POINTS + 1).await?;
        let mut points: BTreeMap<(String, i64, Option<String>), (i64, i64)> = BTreeMap::new();
        for p in stored.data {
            points.insert((p.customer, p.start_ms, p.group), (p.value, p.last_ts));
        }
        self.each_unflushed(meter, query, &epochs, stored.stored_seq, g, |name, start, bucket| {
            let group = bucket_property(bucket, group_by).map(str::to_string);
            let slot = points.entry((name.to_string(), start, group)).or_insert((0, i64::MIN));
            *slot = query.fold.combine(*slot, bucket_value(bucket));
        });
        let truncated = points.len() > MAX_POINTS;
        let data = points
            .into_iter()
            .take(MAX_POINTS)
            .map(|((customer, start, group), (value, _))| Point {
                customer,
                start: rfc3339(start),
                end: rfc3339(start + g),
                value: Decimal { raw: value, precision: meter.precision },
                group: Some(BTreeMap::from([(group_by.to_string(), group)])),
            })
            .collect();
        Ok(Series { meter: meter.name.clone(), granularity: granularity.as_str(), data, truncated })
    }

    /// Issue 25: a `unique_count` meter's value per point is the number of
    /// distinct values of its property in the point's range (not a sum of
    /// minutes: a value seen in two minutes of an hour counts once in it).
    async fn unique_series(
        &self,
        meter: &crate::model::Meter,
        query: &UsageQuery,
        granularity: Granularity,
        property: &str,
        group_by: Option<&str>,
    ) -> Result<Series, HistoryError> {
        let g = granularity.millis();
        let epochs = self.counters.buckets.unflushed();
        let stored = self.usage_store.distinct_values(query, g, property, group_by, MAX_DISTINCT + 1).await?;
        let mut truncated = stored.data.len() > MAX_DISTINCT;
        let mut sets: BTreeMap<(String, i64, Option<String>), BTreeSet<String>> = BTreeMap::new();
        for d in stored.data.into_iter().take(MAX_DISTINCT) {
            sets.entry((d.customer, d.start_ms, d.group)).or_default().insert(d.value);
        }
        self.each_unflushed(meter, query, &epochs, stored.stored_seq, g, |name, start, bucket| {
            let Some(value) = bucket_property(bucket, property) else { return };
            let group = group_by.and_then(|p| bucket_property(bucket, p)).map(str::to_string);
            sets.entry((name.to_string(), start, group)).or_default().insert(value.to_string());
        });
        truncated |= sets.len() > MAX_POINTS;
        let data = sets
            .into_iter()
            .take(MAX_POINTS)
            .map(|((customer, start, group), values)| Point {
                customer,
                start: rfc3339(start),
                end: rfc3339(start + g),
                value: Decimal { raw: i64::try_from(values.len()).unwrap_or(i64::MAX), precision: meter.precision },
                group: group_by.map(|p| BTreeMap::from([(p.to_string(), group)])),
            })
            .collect();
        Ok(Series { meter: meter.name.clone(), granularity: granularity.as_str(), data, truncated })
    }
}
