//! Storage traits: where entitlements and flushed usage live. The embedded SQLite
//! implementation serves single-instance deployments; Redis (entitlements) and
//! ClickHouse (usage) implementations slot in behind the same traits.
//!
//! Usage is stored as minute rows written in *flushes*. Each flush carries the
//! writing instance's id and a sequence number, and is written atomically and at
//! most once: writing a flush whose `(instance_id, seq)` is already stored is a
//! no-op. Queries report the highest sequence stored for the asking instance, so
//! callers can merge in-memory epochs that the store does not hold yet without
//! counting anything twice.
//!
//! The Stripe reporter's ledger ([`LedgerStore`]) lives beside the usage it
//! reports, in the same backend, so "stored" and "reported" are read from one place.

pub mod clickhouse;
// Prepaid credit grants (issue 18).
pub mod grants;
pub mod raw_events;
pub mod redis;
pub mod sqlite;
// Stripe subscription sync (issue 20): which webhook events were applied.
pub mod stripe_events;
#[cfg(test)]
pub mod suite;

use crate::model::{Aggregation, EntitlementsDoc};
use async_trait::async_trait;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
    #[error("store task failed: {0}")]
    Task(String),
    /// The store refuses this data itself (not a transient failure): retrying
    /// the same rows cannot help, so the flusher sets them aside.
    #[error("the store refuses the data: {0}")]
    Rejected(String),
    /// A ledger write by a lease holder that has been superseded.
    #[error("fenced off: {0}")]
    Fenced(String),
}

/// One flushed aggregate: a (meter, customer, minute, properties) bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub meter: String,
    pub customer: String,
    /// Start of the minute, Unix milliseconds.
    pub minute_ms: i64,
    /// Sorted by key; empty when the events had none.
    pub properties: Vec<(String, String)>,
    /// Raw units at the meter's precision.
    pub value: i64,
    /// Timestamp of the newest event folded in (what `latest` compares).
    pub last_ts: i64,
    /// How the meter folds values: a store that keeps one row per key (SQLite)
    /// merges a later flush's row of the same key into it this way.
    pub fold: Fold,
}

/// One flush: written all together or not at all.
#[derive(Debug, Clone)]
pub struct FlushBatch {
    pub instance_id: String,
    pub seq: u64,
    /// Every WAL record up to this sequence is in this flush or an earlier one;
    /// stored with the flush, atomically, so start-up knows where replay begins.
    pub wal_seq: u64,
    /// WAL records above `wal_seq` that are in this flush or an earlier one
    /// (see [`crate::wal::WalMark`]).
    pub wal_extras: Vec<(u64, u64)>,
    pub rows: Vec<UsageRow>,
}

/// How rows combine: `count` meters store counts, so they fold like `sum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    Sum,
    Max,
    Latest,
}

impl From<Aggregation> for Fold {
    fn from(a: Aggregation) -> Fold {
        match a {
            // A unique_count meter's rows count events; distinct values are
            // read with `UsageStore::distinct_values` (issue 25).
            Aggregation::Sum | Aggregation::Count | Aggregation::UniqueCount => Fold::Sum,
            Aggregation::Max => Fold::Max,
            Aggregation::Latest => Fold::Latest,
        }
    }
}

impl Fold {
    /// Combines `(value, last_ts)` pairs the way the store does.
    pub fn combine(self, a: (i64, i64), b: (i64, i64)) -> (i64, i64) {
        match self {
            Fold::Sum => (a.0.saturating_add(b.0), a.1.max(b.1)),
            Fold::Max => (a.0.max(b.0), a.1.max(b.1)),
            Fold::Latest => {
                if b.1 >= a.1 {
                    b
                } else {
                    a
                }
            }
        }
    }
}

/// A query answer with the highest flush sequence of the asking instance that
/// the answer includes (0 when none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<T> {
    pub data: T,
    pub stored_seq: u64,
}

/// One customer's folded value over a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    pub customer: String,
    pub value: i64,
    pub last_ts: i64,
}

/// One point of a usage series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesPoint {
    pub customer: String,
    /// Start of the granularity bucket, Unix milliseconds.
    pub start_ms: i64,
    pub value: i64,
    pub last_ts: i64,
}

/// One point of a usage series grouped by a property (issue 25).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupedPoint {
    pub customer: String,
    /// Start of the granularity bucket, Unix milliseconds.
    pub start_ms: i64,
    /// The property's value; `None` for rows without the property.
    pub group: Option<String>,
    pub value: i64,
    pub last_ts: i64,
}

/// One distinct value of a property in a bucket (issue 25: unique counts).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DistinctValue {
    pub customer: String,
    /// Start of the bucket: `from_ms` plus a whole number of granularities.
    pub start_ms: i64,
    /// The group-by property's value, when grouped (`None`: not grouped, or
    /// rows without it).
    pub group: Option<String>,
    pub value: String,
}

/// A usage query: one meter over `[from_ms, to_ms)`, optionally one customer.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub instance_id: String,
    pub meter: String,
    pub fold: Fold,
    pub from_ms: i64,
    pub to_ms: i64,
    pub customer: Option<String>,
    /// Only the asking instance's own rows (a store shared by instances that
    /// share totals through Redis: each counts its own usage).
    pub own_only: bool,
}

impl UsageQuery {
    /// One meter over one window, for this instance, optionally one customer.
    pub fn for_window(instance_id: &str, meter: &str, fold: Fold, window: &crate::model::Window, customer: Option<&str>) -> UsageQuery {
        UsageQuery {
            instance_id: instance_id.to_string(),
            meter: meter.to_string(),
            fold,
            from_ms: window.start_ms,
            to_ms: window.end_ms,
            customer: customer.map(str::to_string),
            own_only: false,
        }
    }
}

/// Where flushed usage lives.
#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// Writes a flush atomically; a flush already stored is not written again.
    async fn write_flush(&self, batch: &FlushBatch) -> Result<(), StoreError>;
    /// Why this store can never hold `row` (checked before a flush, so one bad
    /// row is set aside instead of blocking every flush), or `None`.
    fn unstorable(&self, _row: &UsageRow) -> Option<String> {
        None
    }
    /// Repairs what a crash may have left before the WAL replays (flushes stored
    /// in part); returns how many were removed. Stores with atomic writes have
    /// nothing to do.
    async fn recover(&self, _instance_id: &str) -> Result<u64, StoreError> {
        Ok(0)
    }
    /// The highest flush sequence stored for `instance_id` (0 when none).
    async fn max_flush_seq(&self, instance_id: &str) -> Result<u64, StoreError>;
    /// The WAL records the stored flushes of `instance_id` cover: the mark of its
    /// latest complete flush (nothing when none).
    async fn wal_mark(&self, instance_id: &str) -> Result<crate::wal::WalMark, StoreError>;
    /// Per customer, the rows of the query folded together.
    async fn aggregate(&self, query: &UsageQuery) -> Result<Stored<Vec<Aggregate>>, StoreError>;
    /// Per customer and `granularity_ms` bucket (aligned to the Unix epoch), the
    /// rows folded together, ordered by customer then start; at most `limit` points.
    async fn series(&self, query: &UsageQuery, granularity_ms: i64, limit: usize) -> Result<Stored<Vec<SeriesPoint>>, StoreError>;
    /// Like [`UsageStore::series`], one point per value of the property
    /// `group_by` too (issue 25), ordered by customer, start, group.
    async fn series_grouped(
        &self,
        query: &UsageQuery,
        granularity_ms: i64,
        group_by: &str,
        limit: usize,
    ) -> Result<Stored<Vec<GroupedPoint>>, StoreError>;
    /// Unique counts (issue 25): per customer, bucket of `granularity_ms`
    /// counted from `query.from_ms`, and value of `group_by` (when given), the
    /// distinct values of `property` in the rows; at most `limit`.
    async fn distinct_values(
        &self,
        query: &UsageQuery,
        granularity_ms: i64,
        property: &str,
        group_by: Option<&str>,
        limit: usize,
    ) -> Result<Stored<Vec<DistinctValue>>, StoreError>;
}

/// Where per-customer entitlements live.
#[async_trait]
pub trait EntitlementStore: Send + Sync + 'static {
    async fn get(&self, customer: &str) -> Result<Option<EntitlementsDoc>, StoreError>;
    async fn put(&self, customer: &str, doc: &EntitlementsDoc) -> Result<(), StoreError>;
    /// Every stored customer (embedded mode loads them all at start).
    async fn list(&self) -> Result<Vec<(String, EntitlementsDoc)>, StoreError>;
    // Customers and portal tokens (issue 20).
    /// Removes a customer's document (the default plan applies again);
    /// removing one that is not stored is not an error.
    async fn delete(&self, customer: &str) -> Result<(), StoreError>;

    // Prepaid credit grants (issue 18), stored with the entitlements.
    /// Stores a grant unless one with its id exists for the customer: `None`
    /// when stored, else the stored one (unchanged).
    async fn insert_grant(
        &self,
        _customer: &str,
        _doc: &crate::model::grant::GrantDoc,
    ) -> Result<Option<crate::model::grant::GrantDoc>, StoreError> {
        Err(StoreError::Rejected("this store keeps no grants".into()))
    }
    /// Replaces a stored grant (a void).
    async fn update_grant(&self, _customer: &str, _doc: &crate::model::grant::GrantDoc) -> Result<(), StoreError> {
        Err(StoreError::Rejected("this store keeps no grants".into()))
    }
    /// Every stored grant, by customer.
    async fn list_grants(&self) -> Result<Vec<(String, crate::model::grant::GrantDoc)>, StoreError> {
        Ok(Vec::new())
    }
    /// A number that changes whenever a grant does (instances sharing the store
    /// reload their grants when it moves); 0 when the store is not shared.
    async fn grants_version(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// What a Stripe ledger row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LedgerKind {
    /// A meter event about to be sent, written *before* the request: if the
    /// answer is lost, the event is resent with exactly this identifier and value
    /// (never a recomputed one), so what Stripe holds is what the ledger says.
    Pending,
    /// A meter event Stripe accepted (or already had: a duplicate identifier).
    Sent,
    /// A sent event cancelled through a meter event adjustment; `value` is minus
    /// the cancelled event's value, `identifier` the cancelled event's.
    Cancelled,
    /// A delta Stripe will not take (a period older than it accepts, or a request
    /// it refuses as invalid): recorded so it is not retried forever; never sent.
    Failed,
}

impl LedgerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Pending => "pending",
            LedgerKind::Sent => "sent",
            LedgerKind::Cancelled => "cancelled",
            LedgerKind::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<LedgerKind> {
        match text {
            "pending" => Some(LedgerKind::Pending),
            "sent" => Some(LedgerKind::Sent),
            "cancelled" => Some(LedgerKind::Cancelled),
            "failed" => Some(LedgerKind::Failed),
            _ => None,
        }
    }
}

/// One row of the Stripe ledger: a delta of one (meter, customer, period).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub meter: String,
    pub customer: String,
    /// Start of the reporting period, Unix milliseconds.
    pub period_start_ms: i64,
    /// The delta's number within its period (0, 1, ...): part of the identifier.
    pub n: u32,
    /// The meter event identifier sent to Stripe.
    pub identifier: String,
    pub kind: LedgerKind,
    /// Whole units (negative for a cancellation).
    pub value: i64,
    pub stripe_customer_id: String,
    /// When the row was written, Unix milliseconds (for `Sent`: when Stripe took it,
    /// which decides whether it can still be cancelled).
    pub at_ms: i64,
    /// The writer's lease fencing token (0: unfenced, the embedded single reporter).
    pub fence: u64,
}

/// Where the Stripe reporter records what it sent.
#[async_trait]
pub trait LedgerStore: Send + Sync + 'static {
    /// Appends `rows`; a row whose `(identifier, kind)` is already stored is not
    /// stored again (so a retried append after an ambiguous failure is harmless).
    /// With `fence > 0`, fails with [`StoreError::Fenced`] when a row with a higher
    /// fence is stored: a newer lease holder has taken over.
    async fn append_ledger(&self, rows: &[LedgerRow], fence: u64) -> Result<(), StoreError>;
    /// The rows of `meter` whose period starts in `[from_ms, to_ms)`, ordered by
    /// customer, period, n, kind.
    async fn ledger_rows(&self, meter: &str, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError>;
}
