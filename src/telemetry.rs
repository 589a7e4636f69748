//! Metric names, in one place, and the helpers that record them; the Prometheus
//! exporter; tracing setup. No customer id is ever a label; meter names are (the
//! config bounds them). A leaf: it knows no domain type, callers pass labels.
//!
//! Every series meterd documents is registered at zero when an instance starts
//! ([`register_known`]), so a dashboard or alert sees `0`, not "no data", until
//! the first increment; series of a part that is not configured (Redis, Stripe,
//! the raw-events export) are left out rather than shown as a misleading 0.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const EVENTS_TOTAL: &str = "meterd_events_total";
pub const BATCH_SIZE: &str = "meterd_ingest_batch_size";
pub const DECISIONS_TOTAL: &str = "meterd_decisions_total";
pub const HTTP_REQUESTS_TOTAL: &str = "meterd_http_requests_total";
pub const HTTP_DURATION: &str = "meterd_http_request_duration_seconds";
pub const HTTP_CONNECTIONS_OPEN: &str = "meterd_http_connections_open";
pub const HTTP_THREAD_CONNECTIONS: &str = "meterd_http_thread_connections";
pub const HTTP_CONNECTIONS_REFUSED_TOTAL: &str = "meterd_http_connections_refused_total";
pub const HTTP_TIMEOUTS_TOTAL: &str = "meterd_http_timeouts_total";
pub const HTTP_DETACHED_TOTAL: &str = "meterd_http_detached_total";
pub const FLUSH_DURATION: &str = "meterd_flush_duration_seconds";
pub const FLUSH_ROWS_TOTAL: &str = "meterd_flush_rows_total";
pub const FLUSH_ERRORS_TOTAL: &str = "meterd_flush_errors_total";
pub const FLUSH_REJECTED_ROWS_TOTAL: &str = "meterd_flush_rejected_rows_total";
pub const FLUSH_LAG: &str = "meterd_flush_lag_seconds";
pub const ACTIVE_COUNTERS: &str = "meterd_active_counters";
pub const CUSTOMERS: &str = "meterd_customers";
pub const PENDING_BUCKETS: &str = "meterd_pending_buckets";
pub const DEDUPE_IDS: &str = "meterd_dedupe_ids";
pub const RATE_LIMITED_TOTAL: &str = "meterd_rate_limited_total";
// Stripe subscription sync (issue 20).
/// Stripe webhook deliveries by `outcome`.
pub const STRIPE_WEBHOOKS_TOTAL: &str = "meterd_stripe_webhooks_total";
/// The `outcome` labels of [`STRIPE_WEBHOOKS_TOTAL`].
pub const STRIPE_WEBHOOK_OUTCOMES: [&str; 6] = ["applied", "duplicate", "stale", "ignored", "invalid_signature", "failed"];
pub const WAL_BYTES: &str = "meterd_wal_bytes";
pub const WAL_CHECKPOINT: &str = "meterd_wal_checkpoint";
/// Segments started, by `start`: `prepared` (zeros written ahead, renamed into
/// place) or `empty` (none was ready: its syncs also write metadata).
pub const WAL_SEGMENTS_TOTAL: &str = "meterd_wal_segments_total";
/// Each fsync of the WAL writer (a group's, the buffered interval's, a rotation's).
pub const WAL_SYNC_DURATION: &str = "meterd_wal_sync_duration_seconds";
/// Records per group written (requests that shared one write and one fsync).
pub const WAL_GROUP_RECORDS: &str = "meterd_wal_group_records";
/// Each wait of the WAL writer before taking a group (`storage.wal_sync_spacing`).
pub const WAL_SYNC_HOLD: &str = "meterd_wal_sync_hold_seconds";
/// Holds of the WAL writer by how they ended (`ended`: `spacing` when the
/// spacing ran out before the last group's count was back, `open` when more
/// records kept coming to its end, `closed` when none came after the last
/// group's count was back and the group was taken at once).
pub const WAL_SYNC_HOLDS_TOTAL: &str = "meterd_wal_sync_holds_total";
/// The `ended` values of [`WAL_SYNC_HOLDS_TOTAL`].
pub const WAL_HOLD_ENDS: [&str; 3] = ["spacing", "open", "closed"];
pub const WRITES_REFUSED: &str = "meterd_writes_refused";
pub const REDIS_UP: &str = "meterd_redis_up";
pub const REDIS_SYNC_DURATION: &str = "meterd_redis_sync_duration_seconds";
pub const REDIS_SYNC_KEYS_TOTAL: &str = "meterd_redis_sync_keys_total";
/// `leased` consumes decided inside a held slice (`where="local"`) or with a
/// round trip (`where="redis"`): the share of local decisions (issue 16).
pub const LEASED_DECISIONS_TOTAL: &str = "meterd_leased_decisions_total";
pub const REDIS_SYNC_ERRORS_TOTAL: &str = "meterd_redis_sync_errors_total";
pub const REDIS_PENDING_KEYS: &str = "meterd_redis_pending_keys";
pub const REDIS_PENDING_UNITS: &str = "meterd_redis_pending_units";
pub const ENTITLEMENT_RELOADS_TOTAL: &str = "meterd_entitlement_reloads_total";
pub const STRIPE_SENT_TOTAL: &str = "meterd_stripe_events_sent_total";
pub const STRIPE_DUPLICATES_TOTAL: &str = "meterd_stripe_duplicates_total";
pub const STRIPE_FAILED_TOTAL: &str = "meterd_stripe_events_failed_total";
pub const STRIPE_CANCELLED_TOTAL: &str = "meterd_stripe_events_cancelled_total";
pub const STRIPE_RETRIES_TOTAL: &str = "meterd_stripe_retries_total";
pub const STRIPE_RUN_ERRORS_TOTAL: &str = "meterd_stripe_run_errors_total";
pub const STRIPE_OVERREPORTS_TOTAL: &str = "meterd_stripe_overreports_total";
pub const STRIPE_LAG: &str = "meterd_stripe_lag_seconds";
pub const STRIPE_OVERREPORTED: &str = "meterd_stripe_overreported_units";
pub const STRIPE_UNAUTHORIZED: &str = "meterd_stripe_unauthorized";
pub const STRIPE_LEADER: &str = "meterd_stripe_leader";
pub const RAW_EXPORT_ROWS_TOTAL: &str = "meterd_raw_export_rows_total";
pub const RAW_EXPORT_ERRORS_TOTAL: &str = "meterd_raw_export_errors_total";
pub const RAW_EXPORT_MISSING_TOTAL: &str = "meterd_raw_export_missing_records_total";
pub const RAW_EXPORT_WATERMARK: &str = "meterd_raw_export_watermark";
pub const RAW_EXPORT_LAG_RECORDS: &str = "meterd_raw_export_lag_records";
pub const RAW_EXPORT_LAG: &str = "meterd_raw_export_lag_seconds";
pub const BUILD_INFO: &str = "meterd_build_info";
pub const TASK_RUNNING: &str = "meterd_task_running";
pub const TASK_RESTARTS_TOTAL: &str = "meterd_task_restarts_total";
// Prepaid credits (issue 18): per meter, in meter units, over every customer.
pub const CREDITS_GRANTED: &str = "meterd_credits_granted_units";
pub const CREDITS_SPENT: &str = "meterd_credits_spent_units";
// Credit ledger bound (issue 15): per-minute log entries kept over every
// ledger, entries folded into the ledgers' base states, and changes that came
// from before a ledger's compacted horizon (applied at the horizon).
pub const CREDIT_LEDGER_MINUTES: &str = "meterd_credit_ledger_minutes";
pub const CREDIT_MINUTES_COMPACTED_TOTAL: &str = "meterd_credit_minutes_compacted_total";
pub const CREDIT_LATE_CHANGES_TOTAL: &str = "meterd_credit_late_changes_total";
// Threshold notifications (issue 17): `type` and `endpoint` labels (both bounded by the config).
pub const NOTIFICATIONS_CREATED_TOTAL: &str = "meterd_notifications_created_total";
pub const NOTIFICATIONS_SENT_TOTAL: &str = "meterd_notifications_sent_total";
pub const NOTIFICATIONS_FAILED_TOTAL: &str = "meterd_notifications_failed_total";
pub const NOTIFICATIONS_RETRIES_TOTAL: &str = "meterd_notifications_retries_total";
pub const NOTIFICATIONS_PENDING: &str = "meterd_notifications_pending";
pub const NOTIFICATIONS_OLDEST_PENDING: &str = "meterd_notifications_oldest_pending_seconds";
// Adjustments (issue 19): by `result` (no customer or meter labels).
/// Adjustments asked for, by `result`.
pub const ADJUSTMENTS_TOTAL: &str = "meterd_adjustments_total";
/// The `result` labels of [`ADJUSTMENTS_TOTAL`]: applied, a repeated id,
/// refused below zero, an id taken by an event.
pub const ADJUSTMENT_RESULTS: [&str; 4] = ["applied", "duplicate", "below_zero", "conflict"];

/// Registers the adjustment series at zero.
pub fn register_adjustments() {
    for result in ADJUSTMENT_RESULTS {
        metrics::counter!(ADJUSTMENTS_TOTAL, "result" => result).increment(0);
    }
}

/// One adjustment and what became of it.
pub fn adjustment(result: &'static str) {
    metrics::counter!(ADJUSTMENTS_TOTAL, "result" => result).increment(1);
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static HOT: OnceLock<Hot> = OnceLock::new();
/// The per-meter handles, indexed by meter id (see [`MeterSeries`]).
static METERS: [OnceLock<MeterSeries>; MAX_METER_LABELS] = [const { OnceLock::new() }; MAX_METER_LABELS];
/// `process_*` series, read from the OS on every render ([`collect_process`]).
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// The `result` values of the events counter that carry a meter; `rejected` has
/// none (a refused batch is counted whole, with `meter=""`).
const EVENT_RESULTS: [&str; 2] = ["accepted", "duplicate"];
const REASONS: [&str; 7] =
    ["within_limit", "limit_exceeded", "soft_limit_exceeded", "unlimited", "not_entitled", "insufficient_credits", "unavailable"];
/// Status codes 100..=599, one lazily registered counter each per route.
const STATUSES: usize = 500;
/// Meter ids below this have pre-registered handles; a meter beyond (a config
/// with more meters) is counted through the `counter!` macro, correct but slower.
const MAX_METER_LABELS: usize = 256;
/// `trigger` values of the entitlement reloads counter.
const RELOAD_TRIGGERS: [&str; 2] = ["load", "message"];
/// `reason` values of the Stripe failures counter.
const STRIPE_FAILURES: [&str; 3] = ["too_old", "rejected", "cancel_rejected"];

/// Handles of the metrics recorded on every request, registered once the
/// recorder is installed. The `counter!` macros build the metric's key (its
/// labels, a `String` for the status) and look it up in the registry on every
/// call: a third of the allocations of a single-event request were that.
struct Hot {
    batch_size: metrics::Histogram,
}

impl Hot {
    fn register() -> Hot {
        Hot { batch_size: metrics::histogram!(BATCH_SIZE) }
    }
}

/// The handles of one meter's series, registered once at start: counting an
/// event or a decision by meter costs no allocation and no registry lookup.
struct MeterSeries {
    /// The label; a caller's name is compared with it, so that two instances
    /// with different configs in one process (tests) never share a label.
    name: Box<str>,
    /// By [`EVENT_RESULTS`].
    events: [metrics::Counter; 2],
    /// By reason ([`REASONS`]), then consume (false, true).
    decisions: [[metrics::Counter; 2]; 7],
}

impl MeterSeries {
    fn register(name: &str) -> MeterSeries {
        let label = || name.to_string();
        MeterSeries {
            name: name.into(),
            events: EVENT_RESULTS.map(|r| metrics::counter!(EVENTS_TOTAL, "meter" => label(), "result" => r)),
            decisions: REASONS
                .map(|r| ["false", "true"].map(|c| metrics::counter!(DECISIONS_TOTAL, "meter" => label(), "reason" => r, "consume" => c))),
        }
    }

    /// The registered handles of meter `id` if they carry `name`.
    fn of(id: usize, name: &str) -> Option<&'static MeterSeries> {
        METERS.get(id)?.get().filter(|m| &*m.name == name)
    }
}

/// What an instance runs: the series of each are registered at zero by
/// [`register_known`].
#[derive(Debug, Clone, Default)]
pub struct Known<'a> {
    /// The configured meters, `(id, name)`; ids are small and dense.
    pub meters: Vec<(usize, &'a str)>,
    pub redis: bool,
    pub stripe: bool,
    pub raw_events: bool,
}

/// Registers every documented series of what `known` says runs, at zero (a
/// gauge already set keeps its value), plus `meterd_build_info` and the
/// `process_*` series; installs the recorder if need be. Call it at start.
pub fn register_known(known: &Known<'_>) {
    register_dedupe();
    register_holds(); // Reservations (issue 19).
                      // Registering is taking a handle: `increment(0)` keeps a value already there.
    let _ = prometheus();
    register_meters(&known.meters);
    metrics::counter!(EVENTS_TOTAL, "meter" => "", "result" => "rejected").increment(0);
    metrics::gauge!(CREDIT_LEDGER_MINUTES).increment(0.0);
    metrics::counter!(CREDIT_MINUTES_COMPACTED_TOTAL).increment(0);
    metrics::counter!(CREDIT_LATE_CHANGES_TOTAL).increment(0);
    for name in [FLUSH_ROWS_TOTAL, FLUSH_ERRORS_TOTAL, FLUSH_REJECTED_ROWS_TOTAL, RATE_LIMITED_TOTAL] {
        metrics::counter!(name).increment(0);
    }
    for name in [ACTIVE_COUNTERS, CUSTOMERS, PENDING_BUCKETS, DEDUPE_IDS, FLUSH_LAG, WAL_BYTES, WAL_CHECKPOINT, WRITES_REFUSED] {
        metrics::gauge!(name).increment(0.0);
    }
    let _ = metrics::histogram!(FLUSH_DURATION);
    for start in ["prepared", "empty"] {
        metrics::counter!(WAL_SEGMENTS_TOTAL, "start" => start).increment(0);
    }
    let _ = metrics::histogram!(WAL_SYNC_DURATION);
    let _ = metrics::histogram!(WAL_GROUP_RECORDS);
    let _ = metrics::histogram!(WAL_SYNC_HOLD);
    for ended in WAL_HOLD_ENDS {
        metrics::counter!(WAL_SYNC_HOLDS_TOTAL, "ended" => ended).increment(0);
    }
    metrics::gauge!(HTTP_CONNECTIONS_OPEN, "listener" => "api").increment(0.0);
    metrics::counter!(HTTP_CONNECTIONS_REFUSED_TOTAL, "listener" => "api").increment(0);
    for phase in ["header", "body", "idle"] {
        metrics::counter!(HTTP_TIMEOUTS_TOTAL, "phase" => phase).increment(0);
    }
    metrics::counter!(HTTP_DETACHED_TOTAL).increment(0);
    if known.redis {
        for name in [REDIS_SYNC_KEYS_TOTAL, REDIS_SYNC_ERRORS_TOTAL] {
            metrics::counter!(name).increment(0);
        }
        for place in ["local", "redis"] {
            metrics::counter!(LEASED_DECISIONS_TOTAL, "where" => place).increment(0);
        }
        for name in [REDIS_UP, REDIS_PENDING_KEYS, REDIS_PENDING_UNITS] {
            metrics::gauge!(name).increment(0.0);
        }
        let _ = metrics::histogram!(REDIS_SYNC_DURATION);
        for trigger in RELOAD_TRIGGERS {
            metrics::counter!(ENTITLEMENT_RELOADS_TOTAL, "trigger" => trigger).increment(0);
        }
    }
    if known.stripe {
        let counters = [
            STRIPE_SENT_TOTAL,
            STRIPE_DUPLICATES_TOTAL,
            STRIPE_CANCELLED_TOTAL,
            STRIPE_RETRIES_TOTAL,
            STRIPE_RUN_ERRORS_TOTAL,
            STRIPE_OVERREPORTS_TOTAL,
        ];
        for name in counters {
            metrics::counter!(name).increment(0);
        }
        for reason in STRIPE_FAILURES {
            metrics::counter!(STRIPE_FAILED_TOTAL, "reason" => reason).increment(0);
        }
        for name in [STRIPE_LAG, STRIPE_OVERREPORTED, STRIPE_UNAUTHORIZED, STRIPE_LEADER] {
            metrics::gauge!(name).increment(0.0);
        }
    }
    if known.raw_events {
        for name in [RAW_EXPORT_ROWS_TOTAL, RAW_EXPORT_ERRORS_TOTAL, RAW_EXPORT_MISSING_TOTAL] {
            metrics::counter!(name).increment(0);
        }
        for name in [RAW_EXPORT_WATERMARK, RAW_EXPORT_LAG_RECORDS, RAW_EXPORT_LAG] {
            metrics::gauge!(name).increment(0.0);
        }
    }
    // Adjustments (issue 19).
    register_adjustments();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    collect_process();
}

/// Reads the `process_*` series (resident and virtual memory, CPU seconds,
/// open and max fds, start time, threads) from the OS: call it before each
/// render. CPU seconds are whole seconds (the collector's counter is an integer).
pub fn collect_process() {
    PROCESS
        .get_or_init(|| {
            let collector = metrics_process::Collector::default();
            collector.describe();
            collector
        })
        .collect();
}

/// Drains the histograms' recorded samples into their buckets. The exporter
/// keeps every sample until the next render or upkeep, so without a scrape
/// (no Prometheus, or a slow one) they grew without bound: one per request.
/// The flusher calls this every tick.
pub fn upkeep() {
    if let Some(handle) = HANDLE.get() {
        handle.run_upkeep();
    }
}

/// Installs the global recorder once per process and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = builder
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(BATCH_SIZE.into()),
                        &[1.0, 10.0, 100.0, 1000.0, 10000.0],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(WAL_GROUP_RECORDS.into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0],
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            let _ = HOT.set(Hot::register());
            handle
        })
        .clone()
}

fn describe() {
    describe_dedupe();
    metrics::describe_counter!(
        EVENTS_TOTAL,
        "Events received, by meter and result (accepted, duplicate; rejected, with meter=\"\", for the events of a refused batch)"
    );
    metrics::describe_histogram!(BATCH_SIZE, "Events per accepted ingest request");
    metrics::describe_counter!(DECISIONS_TOTAL, "Limit decisions, by meter, reason and whether they consumed");
    // Prepaid credits (issue 18).
    metrics::describe_gauge!(CREDITS_GRANTED, "Credits granted on a meter, over every customer (meter units)");
    metrics::describe_gauge!(CREDITS_SPENT, "Usage charged to credit balances on a meter, over every customer (meter units)");
    metrics::describe_gauge!(CREDIT_LEDGER_MINUTES, "Per-minute usage entries the credit ledgers keep for replays (bounded by compaction)");
    metrics::describe_counter!(CREDIT_MINUTES_COMPACTED_TOTAL, "Per-minute credit ledger entries folded into the ledgers' base states");
    metrics::describe_counter!(
        CREDIT_LATE_CHANGES_TOTAL,
        "Usage or grants dated before a credit ledger's compacted horizon, applied at the horizon"
    );
    metrics::describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests, by route and status");
    metrics::describe_histogram!(HTTP_DURATION, "HTTP request latency, by route");
    metrics::describe_gauge!(HTTP_CONNECTIONS_OPEN, "Open HTTP connections, by listener (api, ops)");
    metrics::describe_gauge!(HTTP_THREAD_CONNECTIONS, "Open HTTP connections on each connection thread (server.connection_threads)");
    metrics::describe_counter!(
        HTTP_CONNECTIONS_REFUSED_TOTAL,
        "Connections answered 503 and closed because the listener had server.max_connections open, by listener"
    );
    metrics::describe_counter!(
        HTTP_TIMEOUTS_TOTAL,
        "Connections cut by a timeout, by phase (header: request head too slow; body: request body too slow, answered 408; idle: keep-alive unused)"
    );
    metrics::describe_counter!(
        HTTP_DETACHED_TOTAL,
        "Ingest and consume calls whose client went away before the answer; each finished in a task of its own"
    );
    metrics::describe_histogram!(FLUSH_DURATION, "Time to write one flush to the usage store");
    metrics::describe_counter!(FLUSH_ROWS_TOTAL, "Minute rows written to the usage store");
    metrics::describe_counter!(FLUSH_ERRORS_TOTAL, "Failed flush attempts (retried)");
    metrics::describe_counter!(FLUSH_REJECTED_ROWS_TOTAL, "Rows the usage store refused, set aside in data_dir/rejected");
    metrics::describe_gauge!(FLUSH_LAG, "Age of the oldest usage not yet in the store");
    metrics::describe_gauge!(ACTIVE_COUNTERS, "Window counters in memory");
    metrics::describe_gauge!(CUSTOMERS, "Customers known to this instance");
    metrics::describe_gauge!(PENDING_BUCKETS, "Minute buckets not yet in the store");
    metrics::describe_gauge!(DEDUPE_IDS, "Event ids remembered for deduplication");
    metrics::describe_counter!(RATE_LIMITED_TOTAL, "Requests refused by a key's rate limit");
    metrics::describe_gauge!(WAL_BYTES, "Bytes of WAL segments on disk: live ones, and pruned ones not yet deleted");
    metrics::describe_gauge!(WAL_CHECKPOINT, "Highest WAL sequence the usage store holds");
    metrics::describe_counter!(
        WAL_SEGMENTS_TOTAL,
        "WAL segments started, by start: prepared (zeros written ahead) or empty (none was ready; its syncs are slower)"
    );
    metrics::describe_histogram!(
        WAL_SYNC_DURATION,
        "Time of each fsync the WAL writer makes (a group's, the buffered interval's, a rotation's); appends wait on it"
    );
    metrics::describe_histogram!(WAL_GROUP_RECORDS, "Records written to the WAL per group (requests that share one write and one fsync)");
    metrics::describe_histogram!(
        WAL_SYNC_HOLD,
        "Time the WAL writer waited before taking a group, so that syncs stay storage.wal_sync_spacing apart under load"
    );
    metrics::describe_counter!(
        WAL_SYNC_HOLDS_TOTAL,
        "Holds of the WAL writer by how they ended: the spacing ran out, more records kept coming (open), or none came after the last group's count was back (closed: taken at once, holds paused)"
    );
    metrics::describe_gauge!(REDIS_UP, "1 while Redis answers");
    metrics::describe_histogram!(REDIS_SYNC_DURATION, "Time of one counter sync round with Redis");
    metrics::describe_counter!(REDIS_SYNC_KEYS_TOTAL, "Window counters pushed to Redis");
    metrics::describe_counter!(
        LEASED_DECISIONS_TOTAL,
        "Consumes on leased limits decided inside a held slice (local) or with a round trip to Redis (redis)"
    );
    metrics::describe_counter!(REDIS_SYNC_ERRORS_TOTAL, "Failed counter sync rounds (retried)");
    metrics::describe_gauge!(REDIS_PENDING_KEYS, "Window counters with usage not yet in Redis");
    metrics::describe_gauge!(REDIS_PENDING_UNITS, "Usage (raw units) not yet in Redis");
    metrics::describe_counter!(ENTITLEMENT_RELOADS_TOTAL, "Entitlements read from Redis, by trigger (load, message)");
    metrics::describe_gauge!(TASK_RUNNING, "1 while the background task runs, by task (see /readyz for why one does not)");
    metrics::describe_counter!(TASK_RESTARTS_TOTAL, "Background tasks started again after a failure or panic, by task");
    metrics::describe_gauge!(BUILD_INFO, "Always 1; the version label is the running meterd's");
    metrics::describe_gauge!(WRITES_REFUSED, "1 while ingest and consumes are refused (store behind or WAL broken)");
    metrics::describe_counter!(STRIPE_SENT_TOTAL, "Meter events Stripe took (including identifiers it already had)");
    metrics::describe_counter!(
        STRIPE_DUPLICATES_TOTAL,
        "Meter events Stripe answered as already existing (an earlier attempt got through)"
    );
    metrics::describe_counter!(
        STRIPE_FAILED_TOTAL,
        "Deltas recorded as failed and not retried, by reason (too_old, rejected, cancel_rejected)"
    );
    metrics::describe_counter!(STRIPE_CANCELLED_TOTAL, "Meter events cancelled after a decrease");
    metrics::describe_counter!(STRIPE_RETRIES_TOTAL, "Stripe requests retried (429, 5xx, timeouts, cut connections)");
    metrics::describe_counter!(STRIPE_RUN_ERRORS_TOTAL, "Reporter runs that failed and were retried");
    metrics::describe_counter!(STRIPE_OVERREPORTS_TOTAL, "Periods found reported above their stored total, too old to cancel");
    metrics::describe_gauge!(STRIPE_LAG, "Age of the oldest closed period with usage not yet reported to Stripe");
    metrics::describe_gauge!(STRIPE_OVERREPORTED, "Units Stripe holds above the stored totals that cannot be cancelled");
    metrics::describe_gauge!(STRIPE_UNAUTHORIZED, "1 when Stripe refused the API key and the reporter stopped");
    metrics::describe_gauge!(STRIPE_LEADER, "1 while this instance holds the reporter lease");
    metrics::describe_counter!(RAW_EXPORT_ROWS_TOTAL, "Events inserted into raw_events");
    metrics::describe_counter!(RAW_EXPORT_ERRORS_TOTAL, "Failed raw-events export passes (retried)");
    metrics::describe_counter!(
        RAW_EXPORT_MISSING_TOTAL,
        "WAL records the raw-events export found gone (deleted while raw_events was off, or dropped by a repair)"
    );
    metrics::describe_gauge!(RAW_EXPORT_WATERMARK, "Highest WAL sequence whose events are all in raw_events");
    metrics::describe_gauge!(RAW_EXPORT_LAG_RECORDS, "Durable WAL records not yet in raw_events");
    metrics::describe_gauge!(RAW_EXPORT_LAG, "Age of the oldest accepted event not yet in raw_events");
}

/// Registers the series of `meters` (`(id, name)`) at zero: at start, and for
/// meters added by a config reload (issue 23).
pub fn register_meters(meters: &[(usize, &str)]) {
    for &(id, name) in meters {
        match METERS.get(id) {
            Some(slot) => {
                slot.get_or_init(|| MeterSeries::register(name));
            }
            None => {
                for r in EVENT_RESULTS {
                    metrics::counter!(EVENTS_TOTAL, "meter" => name.to_string(), "result" => r).increment(0);
                }
            }
        }
        // Prepaid credits (issue 18).
        metrics::gauge!(CREDITS_GRANTED, "meter" => name.to_string()).increment(0.0);
        metrics::gauge!(CREDITS_SPENT, "meter" => name.to_string()).increment(0.0);
    }
}

/// Counts events by meter and result (`accepted` or `duplicate`): `meters`
/// yields each event's meter as `(id, name)`; a run of one meter is counted at
/// once (a batch is mostly one meter).
pub fn events<'a>(result: &'static str, meters: impl IntoIterator<Item = (usize, &'a str)>) {
    let Some(r) = EVENT_RESULTS.iter().position(|x| *x == result) else {
        return;
    };
    let count = |(id, name): (usize, &str), n: u64| match MeterSeries::of(id, name) {
        Some(m) => m.events[r].increment(n),
        None => metrics::counter!(EVENTS_TOTAL, "meter" => name.to_string(), "result" => result).increment(n),
    };
    let mut run: Option<((usize, &str), u64)> = None;
    for meter in meters {
        run = match run {
            Some((m, n)) if m.0 == meter.0 => Some((m, n + 1)),
            Some((m, n)) => {
                count(m, n);
                Some((meter, 1))
            }
            None => Some((meter, 1)),
        };
    }
    if let Some((m, n)) = run {
        count(m, n);
    }
}

/// Counts the events of a refused batch (`result="rejected"`, `meter=""`: a
/// refused event's meter may be no configured one).
pub fn events_rejected(n: usize) {
    if n > 0 {
        metrics::counter!(EVENTS_TOTAL, "meter" => "", "result" => "rejected").increment(n as u64);
    }
}

pub fn batch_size(n: usize) {
    match HOT.get() {
        Some(hot) => hot.batch_size.record(n as f64),
        None => metrics::histogram!(BATCH_SIZE).record(n as f64),
    }
}

// Prepaid credits (issue 18).
/// Sets the credit totals of `meter` (raw units at `precision`).
pub fn credit_totals(meter: &str, granted_raw: i64, spent_raw: i64, precision: u8) {
    let scale = 10f64.powi(i32::from(precision));
    metrics::gauge!(CREDITS_GRANTED, "meter" => meter.to_string()).set(granted_raw as f64 / scale);
    metrics::gauge!(CREDITS_SPENT, "meter" => meter.to_string()).set(spent_raw as f64 / scale);
}

/// Credit ledgers (issue 15): `minutes` entries more (or fewer) kept,
/// `compacted` folded, `late` changes applied at a horizon.
pub fn credit_ledgers(minutes: i64, compacted: u64, late: u64) {
    if minutes != 0 {
        metrics::gauge!(CREDIT_LEDGER_MINUTES).increment(minutes as f64);
    }
    if compacted > 0 {
        metrics::counter!(CREDIT_MINUTES_COMPACTED_TOTAL).increment(compacted);
    }
    if late > 0 {
        metrics::counter!(CREDIT_LATE_CHANGES_TOTAL).increment(late);
    }
}

/// Counts one check decision on meter `(meter_id, meter)`; `reason` is its
/// label (`within_limit`, …): the telemetry knows no domain type.
pub fn decision(reason: &'static str, consume: bool, meter_id: usize, meter: &str) {
    // A label outside the known set is counted as `unavailable` (never panics).
    let i = REASONS.iter().position(|r| *r == reason).unwrap_or(REASONS.len() - 1);
    match MeterSeries::of(meter_id, meter) {
        Some(m) => m.decisions[i][usize::from(consume)].increment(1),
        None => {
            let consume = if consume { "true" } else { "false" };
            metrics::counter!(DECISIONS_TOTAL, "meter" => meter.to_string(), "reason" => REASONS[i], "consume" => consume).increment(1)
        }
    }
}

/// The request metrics of one HTTP route: its latency histogram and a request
/// counter per status code (registered on first use). The HTTP edge makes one
/// per route of its route table, after [`prometheus`] installed the recorder:
/// the `counter!` macros build the metric's key (its labels, a `String` for
/// the status) and look it up on every call, a third of the allocations of a
/// single-event request when it was done per request.
pub struct RouteMetrics {
    route: &'static str,
    latency: metrics::Histogram,
    /// Status codes 100..=599.
    statuses: Box<[OnceLock<metrics::Counter>]>,
}

impl RouteMetrics {
    pub fn new(route: &'static str) -> RouteMetrics {
        RouteMetrics {
            route,
            latency: metrics::histogram!(HTTP_DURATION, "route" => route),
            statuses: (0..STATUSES).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Counts one request answered with `status` after `seconds`.
    pub fn record(&self, status: u16, seconds: f64) {
        let route = self.route;
        let counter = || metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => route, "status" => status.to_string());
        match usize::from(status).checked_sub(100).and_then(|i| self.statuses.get(i)) {
            Some(slot) => slot.get_or_init(counter).increment(1),
            None => counter().increment(1),
        }
        self.latency.record(seconds);
    }
}

/// A connection opened (`delta` 1) or closed (-1) on `listener`.
pub fn connections_open(listener: &'static str, delta: f64) {
    metrics::gauge!(HTTP_CONNECTIONS_OPEN, "listener" => listener).increment(delta);
}

/// The open-connection count of connection thread `index` (a handle: taken
/// once per thread, moved by each connection that opens or closes there).
pub fn thread_connections(index: usize) -> metrics::Gauge {
    let gauge = metrics::gauge!(HTTP_THREAD_CONNECTIONS, "thread" => index.to_string());
    // Shown at zero from the start.
    gauge.increment(0.0);
    gauge
}

/// A connection refused because `listener` was at its connection cap.
pub fn connection_refused(listener: &'static str) {
    metrics::counter!(HTTP_CONNECTIONS_REFUSED_TOTAL, "listener" => listener).increment(1);
}

/// A connection cut by its `phase`'s timeout (`header`, `body` or `idle`).
pub fn http_timeout(phase: &'static str) {
    metrics::counter!(HTTP_TIMEOUTS_TOTAL, "phase" => phase).increment(1);
}

/// A `/v1/events` or `/v1/check` handler was dropped unfinished by hyper (the
/// client went away) and finishes in a task of its own.
pub fn handler_detached() {
    metrics::counter!(HTTP_DETACHED_TOTAL).increment(1);
}

/// Whether a supervised background task runs (its restart counter is
/// registered at zero with it).
pub fn task_running(task: &'static str, running: bool) {
    metrics::gauge!(TASK_RUNNING, "task" => task).set(if running { 1.0 } else { 0.0 });
    metrics::counter!(TASK_RESTARTS_TOTAL, "task" => task).increment(0);
}

/// A supervised background task is started again.
pub fn task_restart(task: &'static str) {
    metrics::counter!(TASK_RESTARTS_TOTAL, "task" => task).increment(1);
}

/// Registers the Stripe webhook series at zero (issue 20; only when
/// `[stripe.webhooks]` is configured, like every optional part's series).
pub fn register_stripe_webhooks() {
    for outcome in STRIPE_WEBHOOK_OUTCOMES {
        metrics::counter!(STRIPE_WEBHOOKS_TOTAL, "outcome" => outcome).increment(0);
    }
}

/// One Stripe webhook delivery and what became of it (issue 20).
pub fn stripe_webhook(outcome: &'static str) {
    metrics::counter!(STRIPE_WEBHOOKS_TOTAL, "outcome" => outcome).increment(1);
}

pub fn rate_limited() {
    metrics::counter!(RATE_LIMITED_TOTAL).increment(1);
}

pub fn flush_done(rows: usize, seconds: f64) {
    metrics::counter!(FLUSH_ROWS_TOTAL).increment(rows as u64);
    metrics::histogram!(FLUSH_DURATION).record(seconds);
}

/// Rows the usage store refused, set aside in `data_dir/rejected`.
pub fn flush_rejected(rows: usize) {
    metrics::counter!(FLUSH_REJECTED_ROWS_TOTAL).increment(rows as u64);
}

pub fn flush_failed() {
    metrics::counter!(FLUSH_ERRORS_TOTAL).increment(1);
}

pub fn gauges(active_counters: usize, customers: usize, pending_buckets: usize, dedupe_ids: usize, flush_lag_seconds: f64) {
    metrics::gauge!(ACTIVE_COUNTERS).set(active_counters as f64);
    metrics::gauge!(CUSTOMERS).set(customers as f64);
    metrics::gauge!(PENDING_BUCKETS).set(pending_buckets as f64);
    metrics::gauge!(DEDUPE_IDS).set(dedupe_ids as f64);
    metrics::gauge!(FLUSH_LAG).set(flush_lag_seconds);
}

// Bounded dedupe (issue 15): ids on disk, RAM used for ids, failed spills.
pub const DEDUPE_SPILLED_IDS: &str = "meterd_dedupe_spilled_ids";
pub const DEDUPE_RAM_BYTES: &str = "meterd_dedupe_ram_bytes";
pub const DEDUPE_SPILL_FAILURES_TOTAL: &str = "meterd_dedupe_spill_failures_total";

// Bounded state (issue 15, point 4): window counters evicted once their
// windows ended, new customers refused at the interner's cap.
pub const WINDOWS_EVICTED_TOTAL: &str = "meterd_window_counters_evicted_total";
pub const CUSTOMERS_REFUSED_TOTAL: &str = "meterd_customers_refused_total";

// Remembered consume answers (`crate::answers`): held, and dropped early at a cap.
pub const CONSUME_ANSWERS: &str = "meterd_consume_answers";
pub const CONSUME_ANSWERS_EVICTED_TOTAL: &str = "meterd_consume_answers_evicted_total";

pub fn consume_answers(recent: usize, denied: usize, evicted_recent: usize, evicted_denied: usize) {
    metrics::gauge!(CONSUME_ANSWERS, "kind" => "answer").set(recent as f64);
    metrics::gauge!(CONSUME_ANSWERS, "kind" => "denial").set(denied as f64);
    metrics::counter!(CONSUME_ANSWERS_EVICTED_TOTAL, "kind" => "answer").increment(evicted_recent as u64);
    metrics::counter!(CONSUME_ANSWERS_EVICTED_TOTAL, "kind" => "denial").increment(evicted_denied as u64);
}

pub fn windows_evicted(n: usize) {
    metrics::counter!(WINDOWS_EVICTED_TOTAL).increment(n as u64);
}

pub fn customer_refused() {
    metrics::counter!(CUSTOMERS_REFUSED_TOTAL).increment(1);
}

// Unique counts (issue 25): distinct values held in the windows' sets, values
// refused at `ingest.max_unique_values`, sets dropped with their windows.
pub const UNIQUE_VALUES: &str = "meterd_unique_values";
pub const UNIQUE_REFUSED_TOTAL: &str = "meterd_unique_values_refused_total";
pub const UNIQUE_SETS_EVICTED_TOTAL: &str = "meterd_unique_sets_evicted_total";

pub fn unique_values(values: usize) {
    metrics::gauge!(UNIQUE_VALUES).set(values as f64);
}

pub fn unique_refused(n: usize) {
    metrics::counter!(UNIQUE_REFUSED_TOTAL).increment(n as u64);
}

pub fn unique_sets_evicted(n: usize) {
    metrics::counter!(UNIQUE_SETS_EVICTED_TOTAL).increment(n as u64);
}

fn register_dedupe() {
    for name in [DEDUPE_SPILLED_IDS, DEDUPE_RAM_BYTES] {
        metrics::gauge!(name).increment(0.0);
    }
    metrics::counter!(DEDUPE_SPILL_FAILURES_TOTAL).increment(0);
    for name in [WINDOWS_EVICTED_TOTAL, CUSTOMERS_REFUSED_TOTAL, UNIQUE_REFUSED_TOTAL, UNIQUE_SETS_EVICTED_TOTAL] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!(UNIQUE_VALUES).increment(0.0);
    for kind in ["answer", "denial"] {
        metrics::gauge!(CONSUME_ANSWERS, "kind" => kind).increment(0.0);
        metrics::counter!(CONSUME_ANSWERS_EVICTED_TOTAL, "kind" => kind).increment(0);
    }
}

fn describe_dedupe() {
    metrics::describe_gauge!(DEDUPE_SPILLED_IDS, "Event ids held in the dedupe's disk runs");
    metrics::describe_gauge!(
        DEDUPE_RAM_BYTES,
        "RAM for event ids: the table plus the runs' filters and indexes (ingest.dedupe_memory caps it)"
    );
    metrics::describe_counter!(
        DEDUPE_SPILL_FAILURES_TOTAL,
        "Dedupe spills to disk that failed (ids kept in RAM; ingest refused while over budget)"
    );
    metrics::describe_counter!(WINDOWS_EVICTED_TOTAL, "Window counters dropped because their window ended (idle customers keep none)");
    metrics::describe_counter!(CUSTOMERS_REFUSED_TOTAL, "New customers refused (503) because the customer table is at its cap");
    metrics::describe_gauge!(UNIQUE_VALUES, "Distinct values held in the windows of unique_count meters");
    metrics::describe_counter!(
        UNIQUE_REFUSED_TOTAL,
        "Events and consumes refused because their value would pass ingest.max_unique_values in a window"
    );
    metrics::describe_counter!(UNIQUE_SETS_EVICTED_TOTAL, "Distinct-value sets dropped because their window ended");
    metrics::describe_gauge!(
        CONSUME_ANSWERS,
        "Remembered consume answers: whole answers (kind=answer, ~10 minutes) and denials (kind=denial, the dedupe window)"
    );
    metrics::describe_counter!(
        CONSUME_ANSWERS_EVICTED_TOTAL,
        "Remembered consume answers dropped early to make room (the oldest of a set of four whole answers, the oldest of a shard of denials)"
    );
}

pub fn dedupe(spilled_ids: u64, ram_bytes: usize) {
    metrics::gauge!(DEDUPE_SPILLED_IDS).set(spilled_ids as f64);
    metrics::gauge!(DEDUPE_RAM_BYTES).set(ram_bytes as f64);
}

pub fn dedupe_spill_failed() {
    metrics::counter!(DEDUPE_SPILL_FAILURES_TOTAL).increment(1);
}

pub fn wal(bytes: u64, checkpoint: u64, refusing: bool) {
    metrics::gauge!(WAL_BYTES).set(bytes as f64);
    metrics::gauge!(WAL_CHECKPOINT).set(checkpoint as f64);
    metrics::gauge!(WRITES_REFUSED).set(if refusing { 1.0 } else { 0.0 });
}

/// Handles of the WAL writer's series, taken once by its thread (no registry
/// lookup per group).
pub struct WalSeries {
    sync: metrics::Histogram,
    group: metrics::Histogram,
    hold: metrics::Histogram,
    /// By [`WAL_HOLD_ENDS`].
    ends: [metrics::Counter; 3],
}

impl WalSeries {
    pub fn register() -> WalSeries {
        WalSeries {
            sync: metrics::histogram!(WAL_SYNC_DURATION),
            group: metrics::histogram!(WAL_GROUP_RECORDS),
            hold: metrics::histogram!(WAL_SYNC_HOLD),
            ends: WAL_HOLD_ENDS.map(|ended| metrics::counter!(WAL_SYNC_HOLDS_TOTAL, "ended" => ended)),
        }
    }

    /// One fsync of the writer took `seconds`.
    pub fn synced(&self, seconds: f64) {
        self.sync.record(seconds);
    }

    /// One group of `records` was written.
    pub fn group(&self, records: usize) {
        self.group.record(records as f64);
    }

    /// The writer waited `seconds` before taking a group (sync spacing); the
    /// hold ended as `WAL_HOLD_ENDS[ended]` says.
    pub fn held(&self, seconds: f64, ended: usize) {
        self.hold.record(seconds);
        if let Some(counter) = self.ends.get(ended) {
            counter.increment(1);
        }
    }
}

/// The WAL writer started a segment: a prepared one, or an empty one.
pub fn wal_segment_started(prepared: bool) {
    metrics::counter!(WAL_SEGMENTS_TOTAL, "start" => if prepared { "prepared" } else { "empty" }).increment(1);
}

/// The lease book's decision counts so far (set absolutely each sync round).
pub fn leased_decisions(local: u64, remote: u64) {
    metrics::counter!(LEASED_DECISIONS_TOTAL, "where" => "local").absolute(local);
    metrics::counter!(LEASED_DECISIONS_TOTAL, "where" => "redis").absolute(remote);
}

pub fn redis_up(up: bool) {
    metrics::gauge!(REDIS_UP).set(if up { 1.0 } else { 0.0 });
}

/// One sync round: keys pushed, how long it took, or that it failed.
pub fn redis_sync(keys: usize, seconds: f64, ok: bool) {
    if ok {
        metrics::counter!(REDIS_SYNC_KEYS_TOTAL).increment(keys as u64);
        metrics::histogram!(REDIS_SYNC_DURATION).record(seconds);
    } else {
        metrics::counter!(REDIS_SYNC_ERRORS_TOTAL).increment(1);
    }
}

/// Usage not yet in Redis: window counters with unsynced units, and the units.
pub fn redis_pending(keys: usize, units: i64) {
    metrics::gauge!(REDIS_PENDING_KEYS).set(keys as f64);
    metrics::gauge!(REDIS_PENDING_UNITS).set(units as f64);
}

/// Entitlements read from Redis: `trigger` is `load` or `message`.
pub fn entitlement_reload(trigger: &'static str, n: usize) {
    metrics::counter!(ENTITLEMENT_RELOADS_TOTAL, "trigger" => trigger).increment(n as u64);
}

pub fn stripe_sent(n: usize, duplicate: bool) {
    metrics::counter!(STRIPE_SENT_TOTAL).increment(n as u64);
    if duplicate {
        metrics::counter!(STRIPE_DUPLICATES_TOTAL).increment(n as u64);
    }
}

pub fn stripe_failed(reason: &'static str, n: usize) {
    metrics::counter!(STRIPE_FAILED_TOTAL, "reason" => reason).increment(n as u64);
}

pub fn stripe_cancelled() {
    metrics::counter!(STRIPE_CANCELLED_TOTAL).increment(1);
}

pub fn stripe_retry() {
    metrics::counter!(STRIPE_RETRIES_TOTAL).increment(1);
}

pub fn stripe_run_failed() {
    metrics::counter!(STRIPE_RUN_ERRORS_TOTAL).increment(1);
}

pub fn stripe_overreport() {
    metrics::counter!(STRIPE_OVERREPORTS_TOTAL).increment(1);
}

pub fn stripe_gauges(lag_seconds: f64, overreported_units: i64) {
    metrics::gauge!(STRIPE_LAG).set(lag_seconds);
    metrics::gauge!(STRIPE_OVERREPORTED).set(overreported_units as f64);
}

pub fn stripe_unauthorized(stopped: bool) {
    metrics::gauge!(STRIPE_UNAUTHORIZED).set(if stopped { 1.0 } else { 0.0 });
}

pub fn stripe_leader(leader: bool) {
    metrics::gauge!(STRIPE_LEADER).set(if leader { 1.0 } else { 0.0 });
}

/// Events the raw-events export stored.
pub fn raw_export_rows(n: usize) {
    if n > 0 {
        metrics::counter!(RAW_EXPORT_ROWS_TOTAL).increment(n as u64);
    }
}

pub fn raw_export_failed() {
    metrics::counter!(RAW_EXPORT_ERRORS_TOTAL).increment(1);
}

/// WAL records the export found gone.
pub fn raw_export_missing(records: u64) {
    metrics::counter!(RAW_EXPORT_MISSING_TOTAL).increment(records);
}

/// The export's watermark and lag; `lag_seconds` is `None` when unknown (the
/// gauge then keeps its last value).
pub fn raw_export_gauges(watermark: u64, lag_records: u64, lag_seconds: Option<f64>) {
    metrics::gauge!(RAW_EXPORT_WATERMARK).set(watermark as f64);
    metrics::gauge!(RAW_EXPORT_LAG_RECORDS).set(lag_records as f64);
    if let Some(seconds) = lag_seconds {
        metrics::gauge!(RAW_EXPORT_LAG).set(seconds);
    }
}

/// Sets up structured logs: `RUST_LOG` filters (default `info`),
/// `METERD_LOG_FORMAT=json` switches to JSON lines.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("METERD_LOG_FORMAT").map(|v| v == "json").unwrap_or(false);
    // Colour only on a terminal: redirected to a file, escape codes are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

// --- Threshold notifications (issue 17) ---

/// Registers the notification series at zero, when `[notifications]` is
/// configured: per type, and per (type, endpoint) the endpoint takes.
pub fn register_notifications(endpoints: &[(&str, Vec<&str>)], types: &[&str]) {
    let _ = prometheus();
    for &t in types {
        metrics::counter!(NOTIFICATIONS_CREATED_TOTAL, "type" => t.to_string()).increment(0);
    }
    for (endpoint, types) in endpoints {
        for &t in types {
            for name in [NOTIFICATIONS_SENT_TOTAL, NOTIFICATIONS_FAILED_TOTAL, NOTIFICATIONS_RETRIES_TOTAL] {
                metrics::counter!(name, "type" => t.to_string(), "endpoint" => endpoint.to_string()).increment(0);
            }
        }
    }
    notifications_pending(0, 0.0);
}

/// The outbox's pending rows and the age of the oldest, in seconds.
pub fn notifications_pending(count: i64, oldest_age_s: f64) {
    metrics::gauge!(NOTIFICATIONS_PENDING).set(count as f64);
    metrics::gauge!(NOTIFICATIONS_OLDEST_PENDING).set(oldest_age_s);
}

// Reservations (issue 19): the hold book's size and its refusals.
pub const HOLDS_RESERVATIONS: &str = "meterd_reservations";
pub const HOLDS_REFUSED_TOTAL: &str = "meterd_reservations_refused_total";
pub const HOLDS_CHANGES_TOTAL: &str = "meterd_reservations_total";
/// The reservation statuses (the `status` label).
const HOLD_STATUSES: [&str; 5] = ["held", "settled", "released", "expired", "denied"];

fn register_holds() {
    metrics::describe_gauge!(HOLDS_RESERVATIONS, "Reservations the hold book remembers (held, and finished ones kept for their answers)");
    metrics::describe_counter!(HOLDS_REFUSED_TOTAL, "Reservations refused because the hold book was full (answered 503)");
    metrics::describe_counter!(HOLDS_CHANGES_TOTAL, "Reservations reaching a status (held, denied, settled, released, expired)");
    metrics::gauge!(HOLDS_RESERVATIONS).increment(0.0);
    metrics::counter!(HOLDS_REFUSED_TOTAL).increment(0);
    for s in HOLD_STATUSES {
        metrics::counter!(HOLDS_CHANGES_TOTAL, "status" => s).increment(0);
    }
}

/// Sets the number of reservations remembered.
pub fn holds_gauge(n: usize) {
    metrics::gauge!(HOLDS_RESERVATIONS).set(n as f64);
}

/// Counts a reservation refused by a full book.
pub fn holds_refused() {
    metrics::counter!(HOLDS_REFUSED_TOTAL).increment(1);
}

/// Counts a reservation reaching `status`.
pub fn hold_status(status: &'static str) {
    metrics::counter!(HOLDS_CHANGES_TOTAL, "status" => status).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series whose line starts with `series` (0 if absent).
    fn value(text: &str, series: &str) -> f64 {
        text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
    }

    #[test]
    fn upkeep_drains_histogram_samples_without_losing_them() {
        let handle = prometheus();
        let h = metrics::histogram!("meterd_test_upkeep_seconds");
        for _ in 0..1000 {
            h.record(0.001);
        }
        upkeep();
        for _ in 0..500 {
            h.record(0.002);
        }
        upkeep();
        let text = handle.render();
        assert_eq!(value(&text, "meterd_test_upkeep_seconds_count"), 1500.0, "{text}");
        assert_eq!(value(&text, r#"meterd_test_upkeep_seconds_bucket{le="0.001"}"#), 1000.0, "{text}");
    }

    #[test]
    fn cached_handles_record_the_same_series_as_the_macros() {
        let handle = prometheus();
        assert!(HOT.get().is_some(), "registered with the recorder");
        let before = handle.render();
        let route = RouteMetrics::new("stripe_status");
        route.record(418, 0.001);
        route.record(418, 0.002);
        route.record(999, 0.001); // outside the cached range
        let after = handle.render();
        let teapots = r#"meterd_http_requests_total{route="stripe_status",status="418"}"#;
        assert_eq!(value(&after, teapots), value(&before, teapots) + 2.0, "{after}");
        let odd = r#"meterd_http_requests_total{route="stripe_status",status="999"}"#;
        assert_eq!(value(&after, odd), value(&before, odd) + 1.0);
        let latency = r#"meterd_http_request_duration_seconds_count{route="stripe_status"}"#;
        assert!(value(&after, latency) >= value(&before, latency) + 3.0);
    }

    #[test]
    fn meters_are_labelled_from_registered_handles_and_from_the_macros_alike() {
        let handle = prometheus();
        // Meter ids no other test uses; the last is beyond the handle table.
        let (a, b, far) = ((200, "tm_a"), (201, "tm_b"), (MAX_METER_LABELS + 3, "tm_far"));
        register_known(&Known { meters: vec![a, b, far], ..Known::default() });
        let zero = handle.render();
        for series in [
            r#"meterd_events_total{meter="tm_a",result="accepted"} 0"#,
            r#"meterd_events_total{meter="tm_b",result="duplicate"} 0"#,
            r#"meterd_events_total{meter="tm_far",result="accepted"} 0"#,
            r#"meterd_decisions_total{meter="tm_a",reason="not_entitled",consume="true"} 0"#,
            r#"meterd_events_total{meter="",result="rejected"}"#,
        ] {
            assert!(zero.lines().any(|l| l.starts_with(series)), "{series} missing:\n{zero}");
        }
        events("accepted", [a, a, b, a, far, far]);
        events("duplicate", [b]);
        events("accepted", []);
        events_rejected(5);
        decision("within_limit", false, a.0, a.1);
        decision("unavailable", true, b.0, b.1);
        // Same id, another name (another config in this process): not tm_a's.
        decision("within_limit", false, a.0, "tm_other");
        let after = handle.render();
        let at = |series: &str| value(&after, series);
        assert_eq!(at(r#"meterd_events_total{meter="tm_a",result="accepted"}"#), 3.0, "{after}");
        assert_eq!(at(r#"meterd_events_total{meter="tm_b",result="accepted"}"#), 1.0);
        assert_eq!(at(r#"meterd_events_total{meter="tm_far",result="accepted"}"#), 2.0);
        assert_eq!(at(r#"meterd_events_total{meter="tm_b",result="duplicate"}"#), 1.0);
        let rejected = r#"meterd_events_total{meter="",result="rejected"}"#;
        assert!(at(rejected) >= value(&zero, rejected) + 5.0);
        assert_eq!(at(r#"meterd_decisions_total{meter="tm_a",reason="within_limit",consume="false"}"#), 1.0);
        assert_eq!(at(r#"meterd_decisions_total{meter="tm_b",reason="unavailable",consume="true"}"#), 1.0);
        assert_eq!(at(r#"meterd_decisions_total{meter="tm_other",reason="within_limit",consume="false"}"#), 1.0);
    }

    #[test]
    fn known_parts_are_registered_at_zero_with_build_info_and_process_series() {
        let handle = prometheus();
        register_known(&Known { meters: vec![], redis: true, stripe: true, raw_events: true });
        let text = handle.render();
        let names = [
            FLUSH_ROWS_TOTAL,
            FLUSH_ERRORS_TOTAL,
            FLUSH_REJECTED_ROWS_TOTAL,
            RATE_LIMITED_TOTAL,
            ACTIVE_COUNTERS,
            UNIQUE_VALUES,
            UNIQUE_REFUSED_TOTAL,
            WAL_BYTES,
            WRITES_REFUSED,
            REDIS_UP,
            REDIS_SYNC_KEYS_TOTAL,
            REDIS_PENDING_UNITS,
            STRIPE_SENT_TOTAL,
            STRIPE_LEADER,
            RAW_EXPORT_LAG,
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
            "process_cpu_seconds_total",
        ];
        for series in [
            r#"meterd_http_connections_open{listener="api"}"#,
            r#"meterd_http_timeouts_total{phase="header"}"#,
            r#"meterd_wal_segments_total{start="prepared"}"#,
            r#"meterd_wal_segments_total{start="empty"}"#,
        ] {
            assert!(text.lines().any(|l| l.starts_with(series)), "{series} missing:\n{text}");
        }
        for name in names {
            assert!(text.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing:\n{text}");
        }
        for series in [
            r#"meterd_entitlement_reloads_total{trigger="message"}"#,
            r#"meterd_stripe_events_failed_total{reason="too_old"}"#,
            r#"meterd_redis_sync_duration_seconds_count"#,
        ] {
            assert!(text.lines().any(|l| l.starts_with(series)), "{series} missing:\n{text}");
        }
        let build = format!("meterd_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert!(text.lines().any(|l| l == build), "{build} missing:\n{text}");
        assert!(value(&text, "process_resident_memory_bytes ") > 0.0);
    }
}
