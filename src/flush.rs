//! The flusher: every `flush_interval` it swaps the minute-bucket epoch and writes
//! the old one to the usage store as one flush `(instance_id, seq)`. A failed write
//! leaves the epoch pending and is retried with the same sequence number, which the
//! store writes at most once. It also runs housekeeping (dedupe and counter
//! expiry, gauges) and makes a final flush on shutdown.

use crate::backoff::backoff;
use crate::counters::buckets::bucket_value;
use crate::counters::Counters;
use crate::counters::Epoch;
use crate::engine::{now_ms, Engine};
use crate::model::Catalog;
use crate::model::WindowKind;
use crate::store::{FlushBatch, Fold, StoreError, UsageRow, UsageStore};
use crate::wal::Wal;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Why a flush did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot make event ids durable before the flush: {0}")]
    Ids(#[from] crate::wal::WalError),
    #[error(transparent)]
    Rejected(#[from] crate::rejected::RejectedError),
    #[error("turning the epoch into rows: {0}")]
    Background(String),
}

/// What the flusher needs of the engine, and nothing else: the minute-bucket
/// epochs to drain (and the names their keys intern), the WAL they let go of,
/// the store they go to.
#[derive(Clone, Copy)]
pub struct FlushPorts<'a> {
    pub catalog: &'a Catalog,
    pub counters: &'a Counters,
    pub wal: &'a Wal,
    pub usage_store: &'a dyn UsageStore,
    pub instance_id: &'a str,
    /// Where rows the usage store refuses are set aside.
    pub rejected_dir: &'a std::path::Path,
}

impl Engine {
    /// The flusher's narrow view of the state.
    pub fn flush_ports(&self) -> FlushPorts<'_> {
        FlushPorts {
            catalog: self.catalog(),
            counters: self.counters(),
            wal: self.wal(),
            usage_store: self.usage_store().as_ref(),
            instance_id: self.instance_id(),
            rejected_dir: self.rejected_dir(),
        }
    }
}

/// Converts an epoch to store rows.
fn rows_of(ports: &FlushPorts<'_>, epoch: &Epoch) -> Vec<UsageRow> {
    let mut rows = Vec::with_capacity(epoch.buckets.len());
    // Run on a lowered thread: give the CPU to a waiting request worker often.
    let mut yielder = crate::priority::Yielder::new(64);
    epoch.buckets.for_each(|key, bucket| {
        yielder.step();
        let (Some(meter), Some(customer)) = (ports.catalog.meter(key.meter), ports.counters.interner.name(key.customer)) else {
            return;
        };
        let (value, last_ts) = bucket_value(bucket);
        let properties =
            bucket.properties.get().map(|p| p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap_or_default();
        rows.push(UsageRow {
            meter: meter.name.clone(),
            customer: customer.to_string(),
            minute_ms: key.minute * 60_000,
            properties,
            value,
            last_ts,
            fold: Fold::from(meter.aggregation),
        });
    });
    rows
}

/// Writes the pending epoch, or swaps and writes the current one. Returns the
/// number of rows written (0 when there was nothing to flush).
pub async fn flush_once(engine: &Engine) -> Result<usize, FlushError> {
    flush_epoch(&engine.flush_ports()).await
}

/// [`flush_once`] on the flusher's narrow view of the engine.
pub async fn flush_epoch(ports: &FlushPorts<'_>) -> Result<usize, FlushError> {
    let Some(epoch) = ports.counters.buckets.take_for_flush(|| ports.wal.tracker.mark()) else {
        return Ok(0);
    };
    let started = Instant::now();
    let mark = epoch.wal_mark.get().cloned().unwrap_or_default();
    // Rows the store can never hold are set aside, not retried forever.
    // Milliseconds of work for thousands of rows: on a lowered thread, and off
    // the runtime's worker meanwhile (issue 24: it held up requests once a second).
    let (rows, unstorable): (Vec<UsageRow>, Vec<UsageRow>) =
        crate::priority::lowered_scoped(|| rows_of(ports, &epoch).into_iter().partition(|r| ports.usage_store.unstorable(r).is_none()))
            .map_err(|e| FlushError::Background(e.to_string()))?;
    if !unstorable.is_empty() {
        let reasons: Vec<String> = unstorable.iter().map(|r| ports.usage_store.unstorable(r).unwrap_or_default()).collect();
        let listed: Vec<(&UsageRow, &str)> = unstorable.iter().zip(reasons.iter().map(String::as_str)).collect();
        set_aside(ports, epoch.seq, &listed)?;
    }
    let batch =
        FlushBatch { instance_id: ports.instance_id.to_string(), seq: epoch.seq, wal_seq: mark.upto, wal_extras: mark.extras, rows };
    // The flush lets WAL records go; their ids must be on disk first, so that
    // dedupe still knows them after a restart.
    if let Err(e) = ports.wal.sync_ids().await {
        crate::telemetry::flush_failed();
        return Err(e.into());
    }
    match ports.usage_store.write_flush(&batch).await {
        Ok(()) => {
            ports.counters.buckets.flushed(epoch.seq);
            crate::telemetry::flush_done(batch.rows.len(), started.elapsed().as_secs_f64());
            // The store now says how far it is; the checkpoint only lets old
            // segments go, so a failure here costs disk, not correctness.
            if let Err(e) = ports.wal.checkpoint(batch.wal_seq).await {
                tracing::warn!(error = %e, wal_seq = batch.wal_seq, "WAL checkpoint failed; segments are kept until the next one");
            }
            tracing::debug!(seq = epoch.seq, rows = batch.rows.len(), "flushed");
            let rows = batch.rows.len();
            // The stored epoch and its rows are freed on a lowered thread: that
            // too takes milliseconds with thousands of buckets (issue 24).
            let _ = crate::priority::lowered_scoped(move || drop((epoch, batch)));
            Ok(rows)
        }
        Err(StoreError::Rejected(reason)) => {
            // The store refuses the flush as a whole: keep it on disk and go on,
            // so the WAL does not grow behind it forever.
            crate::telemetry::flush_failed();
            let listed: Vec<(&UsageRow, &str)> = batch.rows.iter().map(|r| (r, reason.as_str())).collect();
            set_aside(ports, epoch.seq, &listed)?;
            ports.counters.buckets.flushed(epoch.seq);
            if let Err(e) = ports.wal.checkpoint(batch.wal_seq).await {
                tracing::warn!(error = %e, wal_seq = batch.wal_seq, "WAL checkpoint failed; segments are kept until the next one");
            }
            Ok(0)
        }
        Err(e) => {
            crate::telemetry::flush_failed();
            Err(e.into())
        }
    }
}

/// Sets rows aside in `data_dir/rejected` and says so.
fn set_aside(ports: &FlushPorts<'_>, seq: u64, rows: &[(&UsageRow, &str)]) -> Result<(), FlushError> {
    let path = crate::rejected::set_aside(ports.rejected_dir, ports.instance_id, seq, rows)?;
    crate::telemetry::flush_rejected(rows.len());
    tracing::error!(
        rows = rows.len(),
        flush_seq = seq,
        file = %path.display(),
        reason = rows.first().map(|r| r.1).unwrap_or_default(),
        "the usage store refuses these rows; they are set aside for a human and not retried"
    );
    Ok(())
}

/// Flushes until nothing is pending (the pending epoch, then the current one).
pub async fn flush_all(engine: &Engine) -> Result<usize, FlushError> {
    let ports = engine.flush_ports();
    let mut total = 0;
    for _ in 0..3 {
        let n = flush_epoch(&ports).await?;
        total += n;
        if n == 0 && ports.counters.buckets.flushing().is_none() {
            break;
        }
    }
    Ok(total)
}

/// Expires what is older than anything ingest still accepts, and sets gauges.
pub fn housekeeping(engine: &Engine) {
    let now = now_ms();
    engine.deduper().sweep(now);
    engine.limits_ports().sweep_consumes(now);
    let cutoff = now - engine.ingest_limits().max_lateness_ms;
    let end_of = |k: &crate::counters::CounterKey| match k.kind {
        WindowKind::Total => i64::MAX,
        // A billing cycle is at most 31 days long.
        WindowKind::BillingCycle => k.start_ms.saturating_add(31 * 86_400_000),
        kind => kind.bounds(k.start_ms, Default::default()).end_ms,
    };
    let evicted = engine.counters().windows.retain_ending_after(cutoff, end_of);
    crate::telemetry::windows_evicted(evicted);
    // Unique counts (issue 25): a window's distinct values leave with it.
    crate::telemetry::unique_sets_evicted(engine.counters().unique.retain_ending_after(cutoff, end_of));
    crate::telemetry::unique_values(engine.counters().unique.values());
    housekeeping_gauges(engine);
}

/// Sets the state gauges (also refreshed on every scrape).
pub fn housekeeping_gauges(engine: &Engine) {
    let now = now_ms();
    let mut oldest: Option<i64> = None;
    for epoch in engine.counters().buckets.unflushed() {
        epoch.buckets.for_each(|k, _| oldest = Some(oldest.map_or(k.minute, |o| o.min(k.minute))));
    }
    let lag = oldest.map(|m| ((now - m * 60_000) as f64 / 1000.0).max(0.0)).unwrap_or(0.0);
    crate::telemetry::wal(
        engine.wal().bytes(),
        engine.wal().stats.checkpoint.load(std::sync::atomic::Ordering::Acquire),
        engine.write_refusal().is_some(),
    );
    let pending = engine.counters().buckets.pending_len();
    engine.note_pending_buckets(pending);
    crate::telemetry::gauges(engine.counters().windows.len(), engine.counters().interner.len(), pending, engine.deduper().len(), lag);
    crate::telemetry::dedupe(engine.deduper().spilled(), engine.deduper().ram_bytes());
}

// Bounded dedupe (issue 15): ids over `ingest.dedupe_memory` go to disk runs,
// once the WAL has written every batch so far and synced their id files (so no
// run holds the id of a batch a crash could lose).
async fn spill_dedupe(engine: &Arc<Engine>) {
    if !engine.deduper().needs_spill() {
        return;
    }
    let written = match engine.wal().sync_ids().await {
        Ok(written) => written,
        Err(e) => {
            tracing::warn!(error = %e, "dedupe spill postponed: the WAL could not sync its id files");
            return;
        }
    };
    let e = engine.clone();
    match crate::priority::background(move || e.deduper().spill(now_ms(), written)).await {
        Ok(Ok(report)) => tracing::debug!(ids = report.ids, upto_minute = report.upto_minute, "dedupe spill"),
        Ok(Err(e)) => {
            crate::telemetry::dedupe_spill_failed();
            tracing::error!(error = %e, "dedupe spill failed; the ids stay in RAM and ingest is refused while over budget")
        }
        Err(e) => tracing::error!(error = %e, "dedupe spill task failed"),
    }
}

// The dedupe gate (one filter over every disk run) is rebuilt on a blocking
// thread when runs are not covered (after a restart, a full gate) or it holds
// more stale ids than live ones; until then the runs' own filters answer. A
// rebuild reads every run (seconds at 100M ids), so the flusher does not wait
// for it: it checks the handle each tick and, at shutdown, cancels and joins it.
type GateRebuild = tokio::task::JoinHandle<Result<Result<u64, crate::dedupe::DedupeError>, crate::priority::PriorityError>>;

async fn gate_upkeep(engine: &Arc<Engine>, running: &mut Option<(GateRebuild, std::time::Instant)>) {
    if let Some((task, started)) = running.take_if(|(task, _)| task.is_finished()) {
        match task.await {
            Ok(Ok(Ok(0))) => {}
            Ok(Ok(Ok(ids))) => tracing::info!(ids, seconds = started.elapsed().as_secs_f64(), "dedupe gate rebuilt"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "dedupe gate rebuild failed; the runs' own filters answer"),
            Ok(Err(e)) => tracing::error!(error = %e, "dedupe gate rebuild did not finish"),
            Err(e) => tracing::error!(error = %e, "dedupe gate task failed"),
        }
    }
    if running.is_none() && engine.deduper().needs_gate() {
        let e = engine.clone();
        // A thread of its own, lowered (see `crate::priority`): it reads every
        // run, seconds of work that must not take a core from requests.
        let rebuild = tokio::task::spawn(crate::priority::background(move || e.deduper().rebuild_gate()));
        *running = Some((rebuild, std::time::Instant::now()));
    }
}

/// Runs until `shutdown` turns true, then makes a final flush. A failed flush
/// keeps its epoch pending and is retried with [`backoff`].
pub async fn run(engine: Arc<Engine>, interval: Duration, mut shutdown: watch::Receiver<bool>) -> Result<(), FlushError> {
    let mut failures: u32 = 0;
    let mut ticks: u64 = 0;
    let mut gate: Option<(GateRebuild, std::time::Instant)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(backoff(interval, failures)) => {}
            _ = shutdown.changed() => break,
        }
        ticks += 1;
        match flush_once(&engine).await {
            Ok(_) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, failures, retry_in = ?backoff(interval, failures), "flush failed; the epoch stays pending and is retried");
            }
        }
        engine.note_pending_buckets(engine.counters().buckets.pending_len());
        crate::telemetry::upkeep();
        if ticks % 10 == 1 {
            // Sweeps of every table: off the worker, so requests queued on it
            // move to another thread meanwhile (issue 24).
            crate::priority::off_the_workers(|| housekeeping(&engine));
        }
        spill_dedupe(&engine).await;
        gate_upkeep(&engine, &mut gate).await;
    }
    if let Some((task, _)) = gate {
        engine.deduper().cancel_gate();
        let _ = task.await;
    }
    crate::priority::off_the_workers(|| engine.deduper().stop_reclaiming());
    let flushed = flush_all(&engine).await?;
    tracing::info!(rows = flushed, "final flush done");
    Ok(())
}
