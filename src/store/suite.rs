//! Shared store test suite: scenarios every [`UsageStore`] / [`EntitlementStore`]
//! implementation must pass, written against the traits so each backend's tests
//! call the same functions.
//!
//! Every scenario takes a namespace `ns` and prefixes its instance ids, meters and
//! customers with it, so scenarios can share one store (a ClickHouse database,
//! say) without seeing each other's data. Scenarios panic on failure.
//!
//! [`store_suite!`] instantiates every scenario for one backend, so a scenario
//! added here runs against SQLite, ClickHouse and Redis alike; [`require`] decides
//! what a test does when its server is missing (skip, or fail under
//! `METERD_TEST_REQUIRE_SERVICES`).

use super::{
    Aggregate, DistinctValue, EntitlementStore, FlushBatch, Fold, GroupedPoint, LedgerKind, LedgerRow, LedgerStore, SeriesPoint,
    StoreError, Stored, UsageQuery, UsageRow, UsageStore,
};
use crate::model::EntitlementsDoc;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The integration tests' service helper, the same file (see its doc).
#[path = "../../tests/common/require.rs"]
pub mod require;

/// A backend under test, opened by the function [`store_suite!`] is given.
#[allow(async_fn_in_trait)]
pub trait Fixture {
    type Store: Clone + 'static;

    fn store(&self) -> &Self::Store;

    /// Cleans up after the test (a ClickHouse database is dropped).
    async fn finish(self)
    where
        Self: Sized,
    {
    }
}

/// `store_suite!(open; usage, ledger, entitlements)` in a backend's test module:
/// a module `scenarios` with a `#[tokio::test]` for every scenario of each trait
/// named (`scenarios::usage::sum_aggregate`, …), and `scenarios::share_one_store`,
/// which runs them all on one store, each in a namespace of its own (the ledger
/// and entitlement scenarios twice).
///
/// `open` is a function of that test module, `async fn open(tag: &str) ->
/// Need<F>` with `F: Fixture` whose store implements the traits named; `tag`
/// names the test (for a database or key prefix of its own). A scenario is
/// added once, to its trait's list below.
macro_rules! store_suite {
    ($open:ident; $($part:ident),+ $(,)?) => {
        mod scenarios {
            $( $crate::store::suite::store_suite!(@part $open, $part); )+

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn share_one_store() {
                let fixture = $crate::store::suite::require::need!(super::$open("shared").await);
                let store = $crate::store::suite::Fixture::store(&fixture);
                $( $part::all(store, concat!("s1-", stringify!($part))).await; )+
                // The same scenarios again in other namespaces, among the first run's
                // data (not the usage ones: concurrent_flushes takes ~30 s on ClickHouse).
                $( $crate::store::suite::store_suite!(@again $part, store); )+
                $crate::store::suite::Fixture::finish(fixture).await;
            }
        }
    };
    (@again usage, $store:ident) => {};
    (@again $part:ident, $store:ident) => {
        $part::all($store, concat!("s2-", stringify!($part))).await;
    };
    (@part $open:ident, usage) => {
        $crate::store::suite::store_suite!(@scenarios $open, usage [$crate::store::UsageStore + Clone + 'static]:
            sum_aggregate, duplicate_flush, max_and_latest, series_granularity, concurrent_flushes, grouped_and_distinct);
    };
    (@part $open:ident, ledger) => {
        $crate::store::suite::store_suite!(@scenarios $open, ledger [$crate::store::LedgerStore]: ledger);
    };
    (@part $open:ident, entitlements) => {
        $crate::store::suite::store_suite!(@scenarios $open, entitlements [$crate::store::EntitlementStore]: entitlements);
    };
    (@scenarios $open:ident, $part:ident [$($bound:tt)+]: $($scenario:ident),+) => {
        mod $part {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    let fixture = $crate::store::suite::require::need!(super::super::$open(stringify!($scenario)).await);
                    $crate::store::suite::$scenario($crate::store::suite::Fixture::store(&fixture), stringify!($scenario)).await;
                    $crate::store::suite::Fixture::finish(fixture).await;
                }
            )+

            /// Every scenario of this trait on `store`, each in a namespace below `ns`.
            pub(super) async fn all<S: $($bound)+>(store: &S, ns: &str) {
                $( $crate::store::suite::$scenario(store, &format!("{ns}-{}", stringify!($scenario))).await; )+
            }
        }
    };
}
pub(crate) use store_suite;

pub const MINUTE: i64 = 60_000;
pub const HOUR: i64 = 60 * MINUTE;
pub const DAY: i64 = 24 * HOUR;
/// A day-aligned base time (2023-12-09T00:00:00Z).
pub const T0: i64 = 19_700 * DAY;

pub fn row(meter: &str, customer: &str, minute_ms: i64, properties: &[(&str, &str)], value: i64, last_ts: i64) -> UsageRow {
    UsageRow {
        meter: meter.to_owned(),
        customer: customer.to_owned(),
        minute_ms,
        properties: properties.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        value,
        last_ts,
        fold: Fold::Sum,
    }
}

pub fn flush(instance_id: &str, seq: u64, rows: Vec<UsageRow>) -> FlushBatch {
    FlushBatch {
        instance_id: instance_id.to_owned(),
        seq,
        // A distinct watermark per flush, so tests can check which one is kept.
        wal_seq: seq * 10,
        wal_extras: vec![(seq * 10 + 2, seq * 10 + 3)],
        rows,
    }
}

pub fn query(instance_id: &str, meter: &str, fold: Fold, from_ms: i64, to_ms: i64, customer: Option<&str>) -> UsageQuery {
    UsageQuery {
        instance_id: instance_id.to_owned(),
        meter: meter.to_owned(),
        fold,
        from_ms,
        to_ms,
        customer: customer.map(str::to_owned),
        own_only: false,
    }
}

fn agg(customer: &str, value: i64, last_ts: i64) -> Aggregate {
    Aggregate { customer: customer.to_owned(), value, last_ts }
}

fn point(customer: &str, start_ms: i64, value: i64, last_ts: i64) -> SeriesPoint {
    SeriesPoint { customer: customer.to_owned(), start_ms, value, last_ts }
}

async fn aggregate(store: &dyn UsageStore, q: &UsageQuery) -> Stored<Vec<Aggregate>> {
    match store.aggregate(q).await {
        Ok(a) => a,
        Err(e) => panic!("aggregate {q:?} failed: {e}"),
    }
}

async fn series(store: &dyn UsageStore, q: &UsageQuery, granularity_ms: i64, limit: usize) -> Stored<Vec<SeriesPoint>> {
    match store.series(q, granularity_ms, limit).await {
        Ok(s) => s,
        Err(e) => panic!("series {q:?} at {granularity_ms} ms, limit {limit} failed: {e}"),
    }
}

async fn write(store: &dyn UsageStore, batch: &FlushBatch) {
    if let Err(e) = store.write_flush(batch).await {
        panic!("write_flush {}#{} failed: {e}", batch.instance_id, batch.seq);
    }
}

async fn max_seq(store: &dyn UsageStore, instance_id: &str) -> u64 {
    match store.max_flush_seq(instance_id).await {
        Ok(s) => s,
        Err(e) => panic!("max_flush_seq {instance_id} failed: {e}"),
    }
}

/// 1. Sum over a range: exact per-customer sums across minutes and property rows,
///    range bounds `[from, to)`, other meters excluded, customer filter, stored_seq.
pub async fn sum_aggregate(store: &dyn UsageStore, ns: &str) {
    let inst = format!("{ns}-inst");
    let meter = format!("{ns}.api_calls");
    let other_meter = format!("{ns}.storage");
    let (c1, c2, c3) = (format!("{ns}-c1"), format!("{ns}-c2"), format!("{ns}-c3"));
    let rows = vec![
        row(&meter, &c1, T0, &[], 5, T0 + 10),
        row(&meter, &c1, T0, &[("region", "eu")], 7, T0 + 20),
        row(&meter, &c1, T0 + MINUTE, &[("region", "eu"), ("tier", "gold")], 11, T0 + MINUTE + 5),
        row(&meter, &c2, T0, &[("region", "us")], 3, T0 + 30),
        // At `to`: excluded from [T0, T0 + 2m).
        row(&meter, &c2, T0 + 2 * MINUTE, &[], 100, T0 + 2 * MINUTE + 1),
        // Before `from`.
        row(&meter, &c1, T0 - MINUTE, &[], 1000, T0 - MINUTE + 1),
        // Only outside the range: must not appear at all.
        row(&meter, &c3, T0 + 5 * MINUTE, &[], 9, T0 + 5 * MINUTE + 1),
        // Another meter.
        row(&other_meter, &c1, T0, &[], 50_000, T0 + 40),
    ];
    write(store, &flush(&inst, 7, rows)).await;

    let q = query(&inst, &meter, Fold::Sum, T0, T0 + 2 * MINUTE, None);
    assert_eq!(
        aggregate(store, &q).await,
        Stored { data: vec![agg(&c1, 23, T0 + MINUTE + 5), agg(&c2, 3, T0 + 30)], stored_seq: 7 },
        "sum over [T0, T0+2m)"
    );

    let wide = query(&inst, &meter, Fold::Sum, T0 - MINUTE, T0 + 3 * MINUTE, None);
    assert_eq!(
        aggregate(store, &wide).await.data,
        vec![agg(&c1, 1023, T0 + MINUTE + 5), agg(&c2, 103, T0 + 2 * MINUTE + 1)],
        "sum over [T0-1m, T0+3m)"
    );

    let only_c2 = query(&inst, &meter, Fold::Sum, T0, T0 + 2 * MINUTE, Some(&c2));
    assert_eq!(aggregate(store, &only_c2).await, Stored { data: vec![agg(&c2, 3, T0 + 30)], stored_seq: 7 }, "customer filter");

    let c3_in_range = query(&inst, &meter, Fold::Sum, T0, T0 + 2 * MINUTE, Some(&c3));
    assert_eq!(aggregate(store, &c3_in_range).await, Stored { data: vec![], stored_seq: 7 }, "no rows in range");

    let other = query(&inst, &other_meter, Fold::Sum, T0, T0 + 2 * MINUTE, None);
    assert_eq!(aggregate(store, &other).await.data, vec![agg(&c1, 50_000, T0 + 40)], "other meter");

    // An instance that wrote nothing sees the same rows with stored_seq 0.
    let stranger = query(&format!("{ns}-stranger"), &meter, Fold::Sum, T0, T0 + 2 * MINUTE, None);
    assert_eq!(
        aggregate(store, &stranger).await,
        Stored { data: vec![agg(&c1, 23, T0 + MINUTE + 5), agg(&c2, 3, T0 + 30)], stored_seq: 0 },
        "stored_seq of an instance without flushes"
    );
}

/// 2. A flush is stored at most once per `(instance_id, seq)`, even when rewritten
///    with different rows; stored_seq and max_flush_seq are per instance.
pub async fn duplicate_flush(store: &dyn UsageStore, ns: &str) {
    let a = format!("{ns}-a");
    let b = format!("{ns}-b");
    let meter = format!("{ns}.api_calls");
    let (c1, c2) = (format!("{ns}-c1"), format!("{ns}-c2"));
    let q = query(&a, &meter, Fold::Sum, T0, T0 + HOUR, None);

    assert_eq!(max_seq(store, &a).await, 0, "nothing written yet");
    write(store, &flush(&a, 1, vec![row(&meter, &c1, T0, &[], 10, T0 + 1)])).await;
    // Same seq, different rows: a no-op.
    write(store, &flush(&a, 1, vec![row(&meter, &c1, T0, &[], 999, T0 + 2), row(&meter, &c2, T0, &[], 5, T0 + 3)])).await;
    assert_eq!(aggregate(store, &q).await, Stored { data: vec![agg(&c1, 10, T0 + 1)], stored_seq: 1 }, "after duplicate");
    assert_eq!(max_seq(store, &a).await, 1);

    write(store, &flush(&a, 2, vec![row(&meter, &c1, T0 + MINUTE, &[], 1, T0 + MINUTE + 1)])).await;
    write(store, &flush(&a, 1, vec![row(&meter, &c1, T0, &[], 10, T0 + 1)])).await;
    write(store, &flush(&a, 2, vec![row(&meter, &c1, T0 + MINUTE, &[], 1, T0 + MINUTE + 1)])).await;
    assert_eq!(aggregate(store, &q).await, Stored { data: vec![agg(&c1, 11, T0 + MINUTE + 1)], stored_seq: 2 }, "after seq 2 and retries");
    assert_eq!(max_seq(store, &a).await, 2);

    // Another instance: its rows count, its seq is its own.
    write(store, &flush(&b, 50, vec![row(&meter, &c1, T0, &[], 100, T0 + 4)])).await;
    assert_eq!(
        aggregate(store, &q).await,
        Stored { data: vec![agg(&c1, 111, T0 + MINUTE + 1)], stored_seq: 2 },
        "instance a after instance b's flush"
    );
    let qb = query(&b, &meter, Fold::Sum, T0, T0 + HOUR, None);
    assert_eq!(aggregate(store, &qb).await.stored_seq, 50, "instance b's stored_seq");
    assert_eq!(max_seq(store, &a).await, 2);
    assert_eq!(max_seq(store, &b).await, 50);

    // Out of order: both stored, max is the highest.
    write(store, &flush(&a, 4, vec![row(&meter, &c2, T0, &[], 6, T0 + 5)])).await;
    write(store, &flush(&a, 3, vec![row(&meter, &c2, T0, &[], 8, T0 + 6)])).await;
    assert_eq!(
        aggregate(store, &q).await,
        Stored { data: vec![agg(&c1, 111, T0 + MINUTE + 1), agg(&c2, 14, T0 + 6)], stored_seq: 4 },
        "after out-of-order seqs"
    );
    assert_eq!(max_seq(store, &a).await, 4);
    assert_eq!(max_seq(store, &format!("{ns}-nobody")).await, 0);

    // The WAL mark stored with each flush: the latest flush's per instance, and
    // a duplicate flush does not replace it (`flush()` stores seq × 10 and the
    // extras seq × 10 + 2 ..= seq × 10 + 3).
    let wal = |inst: String| async move { store.wal_mark(&inst).await.unwrap_or_else(|e| panic!("wal_mark: {e}")) };
    let mark = |upto: u64| crate::wal::WalMark { upto, extras: vec![(upto + 2, upto + 3)] };
    assert_eq!(wal(a.clone()).await, mark(40));
    assert_eq!(wal(b.clone()).await, mark(500));
    let dup = flush(&a, 4, vec![row(&meter, &c2, T0, &[], 6, T0 + 5)]);
    write(store, &dup).await;
    assert_eq!(wal(a.clone()).await, mark(40), "a duplicate flush keeps the stored mark");
    // Another flush under a stored number (a different watermark) is refused,
    // never taken for the stored one.
    let mut other = flush(&a, 4, vec![row(&meter, &c2, T0, &[], 6, T0 + 5)]);
    other.wal_seq = 9_999;
    assert!(matches!(store.write_flush(&other).await, Err(StoreError::Corrupt(_))));
    assert_eq!(wal(a.clone()).await, mark(40));
    assert_eq!(wal(format!("{ns}-nobody")).await, crate::wal::WalMark::default());
}

/// 3. Max and Latest folds. Latest takes the value of the row with the greatest
///    `last_ts`, whatever the order rows were written in.
pub async fn max_and_latest(store: &dyn UsageStore, ns: &str) {
    let inst = format!("{ns}-inst");
    let meter = format!("{ns}.seats");
    let (c1, c2) = (format!("{ns}-c1"), format!("{ns}-c2"));
    // c1's newest row is written first, in its own earlier flush.
    write(store, &flush(&inst, 1, vec![row(&meter, &c1, T0 + 2 * MINUTE, &[], 25, T0 + 2 * MINUTE + 30_000)])).await;
    write(
        store,
        &flush(
            &inst,
            2,
            vec![
                row(&meter, &c1, T0, &[], 40, T0 + 50_000),
                row(&meter, &c1, T0 + MINUTE, &[], 10, T0 + MINUTE + 10_000),
                // Same minute, two property rows: the first written is the newest.
                row(&meter, &c2, T0, &[("k", "a")], 3, T0 + 50_000),
                row(&meter, &c2, T0, &[("k", "b")], 8, T0 + 10_000),
            ],
        ),
    )
    .await;

    let all = |fold| query(&inst, &meter, fold, T0, T0 + HOUR, None);
    assert_eq!(
        aggregate(store, &all(Fold::Max)).await,
        Stored { data: vec![agg(&c1, 40, T0 + 2 * MINUTE + 30_000), agg(&c2, 8, T0 + 50_000)], stored_seq: 2 },
        "max"
    );
    assert_eq!(
        aggregate(store, &all(Fold::Latest)).await,
        Stored { data: vec![agg(&c1, 25, T0 + 2 * MINUTE + 30_000), agg(&c2, 3, T0 + 50_000)], stored_seq: 2 },
        "latest"
    );
    assert_eq!(
        aggregate(store, &all(Fold::Sum)).await.data,
        vec![agg(&c1, 75, T0 + 2 * MINUTE + 30_000), agg(&c2, 11, T0 + 50_000)],
        "sum of the same rows"
    );
    // The range cuts off c1's newest row: latest is then the minute-1 row.
    let early = query(&inst, &meter, Fold::Latest, T0, T0 + 2 * MINUTE, Some(&c1));
    assert_eq!(aggregate(store, &early).await.data, vec![agg(&c1, 10, T0 + MINUTE + 10_000)], "latest in a cut range");
    let early_max = query(&inst, &meter, Fold::Max, T0 + MINUTE, T0 + HOUR, Some(&c1));
    assert_eq!(aggregate(store, &early_max).await.data, vec![agg(&c1, 25, T0 + 2 * MINUTE + 30_000)], "max in a cut range");
}

/// 4. Series at minute, hour and day granularity: epoch-aligned bucket starts,
///    folded values, order by customer then start, and `limit`.
pub async fn series_granularity(store: &dyn UsageStore, ns: &str) {
    let inst = format!("{ns}-inst");
    let meter = format!("{ns}.api_calls");
    let (c1, c2) = (format!("{ns}-c1"), format!("{ns}-c2"));
    let m = |offset: i64| T0 + offset;
    // Written out of order on purpose.
    let rows = vec![
        row(&meter, &c2, m(2 * HOUR + 30 * MINUTE), &[], 64, m(2 * HOUR + 30 * MINUTE) + 1000),
        row(&meter, &c1, m(DAY + 3 * HOUR + 7 * MINUTE), &[], 16, m(DAY + 3 * HOUR + 7 * MINUTE) + 1000),
        row(&meter, &c1, m(HOUR), &[], 8, m(HOUR) + 1000),
        row(&meter, &c1, m(59 * MINUTE), &[], 4, m(59 * MINUTE) + 1000),
        row(&meter, &c1, m(MINUTE), &[("x", "1")], 100, m(MINUTE) + 2000),
        row(&meter, &c1, m(MINUTE), &[], 2, m(MINUTE) + 1000),
        row(&meter, &c1, m(0), &[], 1, m(0) + 1000),
        row(&meter, &c2, m(MINUTE), &[], 32, m(MINUTE) + 1000),
        // Outside [T0, T0 + 2d).
        row(&meter, &c1, m(2 * DAY), &[], 4096, m(2 * DAY) + 1000),
    ];
    write(store, &flush(&inst, 9, rows)).await;
    let q = query(&inst, &meter, Fold::Sum, T0, T0 + 2 * DAY, None);

    assert_eq!(
        series(store, &q, MINUTE, 100).await,
        Stored {
            data: vec![
                point(&c1, m(0), 1, m(0) + 1000),
                point(&c1, m(MINUTE), 102, m(MINUTE) + 2000),
                point(&c1, m(59 * MINUTE), 4, m(59 * MINUTE) + 1000),
                point(&c1, m(HOUR), 8, m(HOUR) + 1000),
                point(&c1, m(DAY + 3 * HOUR + 7 * MINUTE), 16, m(DAY + 3 * HOUR + 7 * MINUTE) + 1000),
                point(&c2, m(MINUTE), 32, m(MINUTE) + 1000),
                point(&c2, m(2 * HOUR + 30 * MINUTE), 64, m(2 * HOUR + 30 * MINUTE) + 1000),
            ],
            stored_seq: 9,
        },
        "minute series"
    );

    let hourly = vec![
        point(&c1, m(0), 107, m(59 * MINUTE) + 1000),
        point(&c1, m(HOUR), 8, m(HOUR) + 1000),
        point(&c1, m(DAY + 3 * HOUR), 16, m(DAY + 3 * HOUR + 7 * MINUTE) + 1000),
        point(&c2, m(0), 32, m(MINUTE) + 1000),
        point(&c2, m(2 * HOUR), 64, m(2 * HOUR + 30 * MINUTE) + 1000),
    ];
    assert_eq!(series(store, &q, HOUR, 100).await, Stored { data: hourly.clone(), stored_seq: 9 }, "hour series");

    assert_eq!(
        series(store, &q, DAY, 100).await.data,
        vec![
            point(&c1, m(0), 115, m(HOUR) + 1000),
            point(&c1, m(DAY), 16, m(DAY + 3 * HOUR + 7 * MINUTE) + 1000),
            point(&c2, m(0), 96, m(2 * HOUR + 30 * MINUTE) + 1000),
        ],
        "day series"
    );

    // Limit truncates in order.
    for limit in [0, 1, 3, 4, 5] {
        let got = series(store, &q, HOUR, limit).await;
        assert_eq!(got.data, hourly[..limit], "hour series, limit {limit}");
        assert_eq!(got.stored_seq, 9);
    }

    // Buckets stay epoch-aligned when the range starts mid-bucket.
    let mid = query(&inst, &meter, Fold::Sum, T0 + HOUR, T0 + 2 * DAY, None);
    assert_eq!(
        series(store, &mid, DAY, 100).await.data,
        vec![
            point(&c1, m(0), 8, m(HOUR) + 1000),
            point(&c1, m(DAY), 16, m(DAY + 3 * HOUR + 7 * MINUTE) + 1000),
            point(&c2, m(0), 64, m(2 * HOUR + 30 * MINUTE) + 1000),
        ],
        "day series from mid-day"
    );

    // Customer filter and other folds.
    let only_c2 = query(&inst, &meter, Fold::Sum, T0, T0 + 2 * DAY, Some(&c2));
    assert_eq!(series(store, &only_c2, HOUR, 100).await.data, hourly[3..], "hour series for c2");
    let latest = query(&inst, &meter, Fold::Latest, T0, T0 + 2 * DAY, Some(&c1));
    assert_eq!(
        series(store, &latest, HOUR, 2).await.data,
        vec![point(&c1, m(0), 4, m(59 * MINUTE) + 1000), point(&c1, m(HOUR), 8, m(HOUR) + 1000)],
        "latest hour series"
    );
    let max = query(&inst, &meter, Fold::Max, T0, T0 + 2 * DAY, Some(&c1));
    assert_eq!(
        series(store, &max, DAY, 100).await.data,
        vec![point(&c1, m(0), 100, m(HOUR) + 1000), point(&c1, m(DAY), 16, m(DAY + 3 * HOUR + 7 * MINUTE) + 1000),],
        "max day series"
    );
}

/// Issue 25: series grouped by a property (rows without it in a `None`
/// group), and the distinct values of a property per bucket counted from
/// `from_ms`, with values that need escaping in the stored JSON.
pub async fn grouped_and_distinct(store: &dyn UsageStore, ns: &str) {
    let inst = format!("{ns}-inst");
    let meter = format!("{ns}.tokens");
    let (c1, c2) = (format!("{ns}-c1"), format!("{ns}-c2"));
    let m = |offset: i64| T0 + offset;
    let odd = "quote \" back \\ ünï ? [\"x\",\"y\"]";
    let rows = vec![
        row(&meter, &c1, m(0), &[("model", "a"), ("user", "u1")], 1, m(0) + 1),
        row(&meter, &c1, m(MINUTE), &[("model", "a"), ("user", "u2")], 2, m(MINUTE) + 1),
        row(&meter, &c1, m(2 * MINUTE), &[("model", odd), ("user", "u1")], 4, m(2 * MINUTE) + 1),
        row(&meter, &c1, m(3 * MINUTE), &[("user", odd)], 8, m(3 * MINUTE) + 1),
        row(&meter, &c1, m(2 * HOUR), &[("model", ""), ("user", "u1")], 16, m(2 * HOUR) + 1),
        row(&meter, &c2, m(0), &[("model", "a")], 32, m(0) + 1),
        row(&meter, &c2, m(MINUTE), &[], 64, m(MINUTE) + 1),
    ];
    write(store, &flush(&inst, 3, rows)).await;
    let q = query(&inst, &meter, Fold::Sum, T0, T0 + DAY, None);
    let g = |customer: &str, start_ms: i64, group: Option<&str>, value: i64, last_ts: i64| GroupedPoint {
        customer: customer.to_owned(),
        start_ms,
        group: group.map(str::to_owned),
        value,
        last_ts,
    };
    let got = store.series_grouped(&q, HOUR, "model", 100).await.unwrap_or_else(|e| panic!("series_grouped: {e}"));
    let mut data = got.data;
    data.sort_by(|a, b| (&a.customer, a.start_ms, &a.group).cmp(&(&b.customer, b.start_ms, &b.group)));
    assert_eq!(
        data,
        vec![
            g(&c1, m(0), None, 8, m(3 * MINUTE) + 1),
            g(&c1, m(0), Some("a"), 3, m(MINUTE) + 1),
            g(&c1, m(0), Some(odd), 4, m(2 * MINUTE) + 1),
            g(&c1, m(2 * HOUR), Some(""), 16, m(2 * HOUR) + 1),
            g(&c2, m(0), None, 64, m(MINUTE) + 1),
            g(&c2, m(0), Some("a"), 32, m(0) + 1),
        ],
        "grouped by model"
    );
    assert_eq!(got.stored_seq, 3);

    let d = |customer: &str, start_ms: i64, group: Option<&str>, value: &str| DistinctValue {
        customer: customer.to_owned(),
        start_ms,
        group: group.map(str::to_owned),
        value: value.to_owned(),
    };
    let sorted = |mut v: Vec<DistinctValue>| {
        v.sort();
        v
    };
    // The whole range as one bucket: u1 counted once.
    let all = store.distinct_values(&q, DAY, "user", None, 100).await.unwrap_or_else(|e| panic!("distinct_values: {e}"));
    assert_eq!(sorted(all.data), sorted(vec![d(&c1, T0, None, odd), d(&c1, T0, None, "u1"), d(&c1, T0, None, "u2")]));
    // By hour and model, from a range starting mid-hour.
    let mid = query(&inst, &meter, Fold::Sum, T0 + MINUTE, T0 + DAY, Some(&c1));
    let by = store.distinct_values(&mid, HOUR, "user", Some("model"), 100).await.unwrap_or_else(|e| panic!("distinct_values: {e}"));
    assert_eq!(
        sorted(by.data),
        sorted(vec![
            d(&c1, m(MINUTE), Some("a"), "u2"),
            d(&c1, m(MINUTE), Some(odd), "u1"),
            d(&c1, m(MINUTE), None, odd),
            d(&c1, m(MINUTE + HOUR), Some(""), "u1"),
        ]),
        "distinct users by hour (counted from the range's start) and model"
    );
}

/// 5. Entitlements: missing → None, put/get round trip, put replaces, list sorted.
pub async fn entitlements(store: &dyn EntitlementStore, ns: &str) {
    let (a, b, c) = (format!("{ns}-a"), format!("{ns}-b"), format!("{ns}-c"));
    let get = |customer: String| async move {
        match store.get(&customer).await {
            Ok(d) => d,
            Err(e) => panic!("get {customer} failed: {e}"),
        }
    };
    let put = |customer: String, doc: EntitlementsDoc| async move {
        if let Err(e) = store.put(&customer, &doc).await {
            panic!("put {customer} failed: {e}");
        }
    };

    let first = EntitlementsDoc {
        plan: Some("pro".to_owned()),
        overrides: BTreeMap::from([("api_calls".to_owned(), serde_json::json!({"limit": "1000", "window": "month", "hard": false}))]),
        features: BTreeMap::from([("sso".to_owned(), true), ("beta".to_owned(), false)]),
        stripe_customer_id: Some("cus_123".to_owned()),
        billing_anchor: Some("2024-01-15".to_owned()),
    };
    let second = EntitlementsDoc {
        plan: Some("enterprise".to_owned()),
        features: BTreeMap::from([("sso".to_owned(), false)]),
        ..EntitlementsDoc::default()
    };
    let third = EntitlementsDoc::default();

    assert_eq!(get(b.clone()).await, None, "missing customer");
    put(b.clone(), first.clone()).await;
    assert_eq!(get(b.clone()).await, Some(first.clone()), "after put");
    put(b.clone(), second.clone()).await;
    assert_eq!(get(b.clone()).await, Some(second.clone()), "put replaces");
    put(c.clone(), third.clone()).await;
    put(a.clone(), first.clone()).await;

    let all = match store.list().await {
        Ok(l) => l,
        Err(e) => panic!("list failed: {e}"),
    };
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "list sorted by customer: {all:?}");
    let prefix = format!("{ns}-");
    let mine: Vec<_> = all.into_iter().filter(|(customer, _)| customer.starts_with(&prefix)).collect();
    assert_eq!(mine, vec![(a.clone(), first), (b, second), (c, third)], "list");

    // Delete (issue 20): gone from get and list; deleting again is no error.
    for _ in 0..2 {
        if let Err(e) = store.delete(&a).await {
            panic!("delete {a} failed: {e}");
        }
    }
    assert_eq!(get(a.clone()).await, None, "after delete");
    let listed = match store.list().await {
        Ok(l) => l,
        Err(e) => panic!("list failed: {e}"),
    };
    assert!(!listed.iter().any(|(customer, _)| *customer == a), "a deleted customer is not listed");
}

/// 7. Concurrent writers: 8 tasks × 50 flushes with distinct seqs (each task also
///    retries its first flush): totals exact, every seq stored once.
pub async fn concurrent_flushes<S: UsageStore + Clone + 'static>(store: &S, ns: &str) {
    let store: Arc<dyn UsageStore> = Arc::new(store.clone());
    const TASKS: u64 = 8;
    const FLUSHES: u64 = 50;
    let inst = format!("{ns}-inst");
    let meter = format!("{ns}.api_calls");
    let customer = |t: u64| format!("{ns}-c{}", t % 3);
    let make = move |inst: &str, meter: &str, customer: &str, t: u64, i: u64| {
        let seq = t * FLUSHES + i + 1;
        let minute = T0 + i64::try_from(i % 5).unwrap_or(0) * MINUTE;
        let value = i64::try_from(seq).unwrap_or(0);
        flush(
            inst,
            seq,
            vec![row(meter, customer, minute, &[], value, minute + 1), row(meter, customer, minute, &[("p", "x")], 1, minute + 2)],
        )
    };

    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        let (inst, meter, customer) = (inst.clone(), meter.clone(), customer(t));
        tasks.spawn(async move {
            for i in 0..FLUSHES {
                let batch = make(&inst, &meter, &customer, t, i);
                store.write_flush(&batch).await.map_err(|e| format!("task {t} flush {i}: {e}"))?;
            }
            let retry = make(&inst, &meter, &customer, t, 0);
            store.write_flush(&retry).await.map_err(|e| format!("task {t} retry: {e}"))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(e) => panic!("writer task failed: {e}"),
        }
    }

    // Expected: each flush adds seq + 1 to its task's customer.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for t in 0..TASKS {
        for i in 0..FLUSHES {
            let seq = i64::try_from(t * FLUSHES + i + 1).unwrap_or(0);
            *expected.entry(customer(t)).or_default() += seq + 1;
        }
    }
    let expected: Vec<Aggregate> = expected.into_iter().map(|(c, v)| agg(&c, v, T0 + 4 * MINUTE + 2)).collect();
    let total: i64 = expected.iter().map(|a| a.value).sum();
    assert_eq!(total, (1..=400).sum::<i64>() + 400, "reference totals");

    let q = query(&inst, &meter, Fold::Sum, T0, T0 + HOUR, None);
    assert_eq!(
        aggregate(store.as_ref(), &q).await,
        Stored { data: expected, stored_seq: TASKS * FLUSHES },
        "totals after concurrent flushes"
    );
    assert_eq!(max_seq(store.as_ref(), &inst).await, TASKS * FLUSHES);
    let per_minute = series(store.as_ref(), &q, MINUTE, 1000).await;
    assert_eq!(per_minute.data.len(), 3 * 5, "3 customers × 5 minutes");
    assert_eq!(per_minute.data.iter().map(|p| p.value).sum::<i64>(), total, "series total");
}

#[allow(clippy::too_many_arguments)]
fn ledger_row(
    meter: &str,
    customer: &str,
    period_start_ms: i64,
    n: u32,
    kind: LedgerKind,
    value: i64,
    at_ms: i64,
    fence: u64,
) -> LedgerRow {
    LedgerRow {
        meter: meter.to_owned(),
        customer: customer.to_owned(),
        period_start_ms,
        n,
        identifier: format!("{meter}:{customer}:{period_start_ms}:{n}"),
        kind,
        value,
        stripe_customer_id: format!("cus_{customer}"),
        at_ms,
        fence,
    }
}

async fn append(store: &dyn LedgerStore, rows: &[LedgerRow], fence: u64) -> Result<(), StoreError> {
    store.append_ledger(rows, fence).await
}

async fn ledger_rows(store: &dyn LedgerStore, meter: &str, from_ms: i64, to_ms: i64) -> Vec<LedgerRow> {
    match store.ledger_rows(meter, from_ms, to_ms).await {
        Ok(r) => r,
        Err(e) => panic!("ledger_rows {meter} failed: {e}"),
    }
}

/// 6. The Stripe ledger: rows round-trip in order, `[from, to)` by period start,
///    an `(identifier, kind)` is stored once, kinds are kept apart, a writer with
///    an older fence is refused and fence 0 is unfenced.
pub async fn ledger(store: &dyn LedgerStore, ns: &str) {
    let meter = format!("{ns}.tokens");
    let other = format!("{ns}.other");
    let (c1, c2) = (format!("{ns}-c1"), format!("{ns}-c2"));
    // Fences are global to the ledger: start above anything an earlier scenario wrote.
    let base = u64::try_from(crate::clock::now_ms()).unwrap_or(1) * 10;
    let sent0 = ledger_row(&meter, &c1, T0, 0, LedgerKind::Sent, 5, T0 + 1, base + 1);
    let sent1 = ledger_row(&meter, &c1, T0, 1, LedgerKind::Sent, 2, T0 + 2, base + 1);
    let cancel0 = LedgerRow { kind: LedgerKind::Cancelled, value: -5, at_ms: T0 + 3, fence: base + 2, ..sent0.clone() };
    let failed = ledger_row(&meter, &c2, T0 + HOUR, 0, LedgerKind::Failed, 9, T0 + 4, base + 1);
    let later = ledger_row(&meter, &c1, T0 + 2 * HOUR, 0, LedgerKind::Sent, 1, T0 + 5, base + 1);
    let elsewhere = ledger_row(&other, &c1, T0, 0, LedgerKind::Sent, 100, T0 + 6, base + 1);

    assert!(ledger_rows(store, &meter, T0, T0 + DAY).await.is_empty(), "empty ledger");
    append(store, &[later.clone(), sent1.clone(), failed.clone(), elsewhere.clone()], base + 1).await.unwrap_or_else(|e| panic!("{e}"));
    append(store, std::slice::from_ref(&sent0), base + 1).await.unwrap_or_else(|e| panic!("{e}"));
    // A retry of the same rows (even with another time and value) changes nothing.
    let retry = LedgerRow { at_ms: T0 + 99, ..sent0.clone() };
    append(store, &[retry, sent1.clone()], base + 1).await.unwrap_or_else(|e| panic!("{e}"));
    // The same identifier with another kind is another row.
    append(store, std::slice::from_ref(&cancel0), base + 2).await.unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(
        ledger_rows(store, &meter, T0, T0 + DAY).await,
        vec![cancel0.clone(), sent0.clone(), sent1.clone(), later.clone(), failed.clone()],
        "all rows, ordered by customer, period, n, kind"
    );
    assert_eq!(ledger_rows(store, &meter, T0, T0 + HOUR).await, vec![cancel0.clone(), sent0.clone(), sent1.clone()], "[T0, T0+1h)");
    assert_eq!(ledger_rows(store, &meter, T0 + HOUR, T0 + 2 * HOUR).await, vec![failed.clone()], "[T0+1h, T0+2h)");
    assert_eq!(ledger_rows(store, &other, T0, T0 + DAY).await, vec![elsewhere], "other meter");

    // A superseded holder (older fence) is refused and writes nothing.
    let stale = ledger_row(&meter, &c2, T0 + 3 * HOUR, 0, LedgerKind::Sent, 7, T0 + 7, base + 1);
    match append(store, std::slice::from_ref(&stale), base + 1).await {
        Err(StoreError::Fenced(_)) => {}
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(ledger_rows(store, &meter, T0 + 3 * HOUR, T0 + 4 * HOUR).await.is_empty(), "a fenced write stores nothing");
    // The current holder and an unfenced writer are not.
    append(store, std::slice::from_ref(&stale), base + 2).await.unwrap_or_else(|e| panic!("{e}"));
    let unfenced = ledger_row(&meter, &c2, T0 + 3 * HOUR, 1, LedgerKind::Sent, 1, T0 + 8, 0);
    append(store, std::slice::from_ref(&unfenced), 0).await.unwrap_or_else(|e| panic!("{e}"));
    let got = ledger_rows(store, &meter, T0 + 3 * HOUR, T0 + 4 * HOUR).await;
    assert_eq!(got.iter().map(|r| (r.n, r.value)).collect::<Vec<_>>(), vec![(0, 7), (1, 1)], "fenced holder and unfenced writer");
}
