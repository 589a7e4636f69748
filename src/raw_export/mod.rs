//! The raw-events export: with `clickhouse.raw_events = true`, every accepted
//! event goes to `{database}.raw_events` (`crate::store::raw_events`) as it was
//! accepted, for audit and backfill, exactly once.
//!
//! # Where the events come from
//!
//! From the WAL, not from the ingest path: a background task reads the records
//! above its watermark from the segment files (`crate::wal::tail`), in order,
//! and only those at or below [`crate::wal::Wal::durable_seq`]. A record that is
//! durable is part of the usage whatever happens next (a crash replays it), so
//! it belongs in `raw_events` even when its `202` never reached the client; a
//! record that is not durable yet (`buffered`, before the next fsync) could
//! vanish in a power cut and its sequence number be reused, so it waits. The
//! WAL keeps every segment holding a record above the export's watermark
//! ([`crate::wal::Wal::release`]), so nothing is deleted before it is exported,
//! even while the usage store is ahead. Ingest never waits for the export.
//!
//! # Exactly once
//!
//! A row's key is `(instance_id, wal_seq, idx)`: the WAL record and the event's
//! place in it, the same after any number of restarts. Records are sent in
//! chunks of at most [`MAX_CHUNK_ROWS`] rows (`chunk.rs`), one INSERT each. A
//! failed INSERT may have stored all of its rows (the answer was lost), none,
//! or a part (ClickHouse 18.16 keeps the part of a body that arrived before a
//! connection was cut; a chunk spanning two months is two parts). So:
//!
//! * ClickHouse acknowledged a chunk: its records leave the queue, and the
//!   watermark file (`watermark.rs`) is moved past the last whole record before
//!   the WAL may drop its segment. A crash in between leaves the file behind
//!   ClickHouse, never ahead.
//! * Any chunk that may overlap rows an earlier attempt could have stored is
//!   sent only after asking ClickHouse which of its keys it holds, and then
//!   only the missing rows. "May overlap" is tracked as a sequence number: at
//!   start, the highest `wal_seq` the table holds for this instance (the
//!   previous run may have stored beyond its watermark file); after a failed
//!   INSERT, the failed chunk's last record. Chunks above it cannot overlap
//!   anything (only this task writes this instance's rows) and are sent
//!   without the question, so a healthy export costs one INSERT per chunk.
//! * An attempt still running on the server when its retry asks would make
//!   the answer stale. Both statements of a chunk carry the query id
//!   `meterd-raw:{db}:{instance}:{seq}.{idx}` (its first event), and
//!   ClickHouse refuses a query whose id is running, so a retry fails until the
//!   earlier attempt is over; at start, the export waits until no query with
//!   the instance's prefix is running (the killed run's may be).
//!
//! If `raw_events` holds a sequence number of this instance above the WAL's
//! end (the data directory was replaced, reset or repaired), new records would
//! reuse those numbers and be taken for stored rows: meterd refuses to start
//! and says so.
//!
//! # The task
//!
//! It wakes every `clickhouse.flush_interval`, exports everything durable, and
//! on failure retries with [`backoff`]; ingest is unaffected, and the held WAL
//! counts toward `storage.max_wal_bytes` like a lagging usage store. On
//! shutdown it stops waiting on ClickHouse at once (a hanging server must not
//! eat the grace period) and makes a final pass, bounded in time (what it
//! cannot send stays in the WAL for the next start).

pub mod chunk;
pub mod watermark;

use crate::backoff::backoff;
use crate::engine::{now_ms, Engine};
use crate::store::raw_events::{RawEventRow, RawEventsTable};
use crate::store::StoreError;
use crate::wal::tail::{Tail, TailError};
use crate::wal::WalBatch;
use chunk::Pos;
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Rows per INSERT at most (a WAL record may hold more; it is split).
pub const MAX_CHUNK_ROWS: usize = 20_000;

/// Why the export could not start or a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Watermark(#[from] watermark::WatermarkError),
    #[error(transparent)]
    Tail(#[from] TailError),
    #[error("cannot let exported WAL segments go: {0}")]
    Wal(#[from] crate::wal::WalError),
    #[error(
        "clickhouse.raw_events: raw_events already holds WAL record {stored} of instance {instance_id}, but the WAL here \
         ends at {wal_end}, so new records would reuse those numbers and be taken for stored ones; the data directory \
         was replaced, reset or repaired: give it a new server.instance_id, or delete this instance's rows above \
         {wal_end} from raw_events"
    )]
    AheadOfWal { instance_id: String, stored: u64, wal_end: u64 },
    #[error("raw-events export task failed: {0}")]
    Task(String),
    /// Shutdown began while a pass waited on ClickHouse.
    #[error("the raw-events export pass was stopped by shutdown")]
    Stopped,
}

/// The export's state: the records read and not yet stored, and how far the
/// table and the watermark file are.
pub struct Exporter {
    engine: Arc<Engine>,
    table: RawEventsTable,
    /// The WAL directory (segments and the watermark file).
    dir: PathBuf,
    /// `None` only while a read runs on the blocking pool (or if it panicked:
    /// then it is recreated after the last record read).
    tail: Option<Tail>,
    /// Records read from the WAL whose events are not all stored, in order.
    waiting: VecDeque<(u64, WalBatch)>,
    /// The first event of `waiting[0]` not stored yet.
    start: usize,
    /// Every record at or below this is stored.
    exported: u64,
    /// What the watermark file says (and the WAL's hold).
    persisted: u64,
    /// Records at or below this may have rows stored by an earlier attempt.
    suspect_upto: u64,
    max_rows: usize,
    /// No watermark file at start: the export begins with the oldest record
    /// the WAL has, and the numbers before it are history, not a gap.
    from_scratch: bool,
    /// Meters no longer configured that events named (warned about once).
    unknown_meters: HashSet<String>,
}

impl Exporter {
    /// Prepares the export of the WAL in `dir` to `table`: waits for the
    /// previous run's inserts to end on the server, reads the watermark and
    /// what the table holds. Call before anything is ingested.
    pub async fn start(engine: Arc<Engine>, table: RawEventsTable, dir: &Path, max_rows: usize) -> Result<Exporter, ExportError> {
        let instance_id = engine.instance_id().to_string();
        table.wait_for_earlier_run(&instance_id).await?;
        let persisted = watermark::read(dir)?;
        let stored = table.max_seq(&instance_id).await?;
        let wal_end = engine.wal_report().last_seq;
        if stored > wal_end {
            return Err(ExportError::AheadOfWal { instance_id: instance_id.to_string(), stored, wal_end });
        }
        let from = persisted.unwrap_or(0);
        tracing::info!(watermark = from, stored_up_to = stored, wal_end, "raw-events export: starting");
        Ok(Exporter {
            engine,
            table,
            dir: dir.to_path_buf(),
            tail: Some(Tail::after(dir, from)),
            waiting: VecDeque::new(),
            start: 0,
            exported: from,
            persisted: from,
            suspect_upto: stored,
            max_rows: max_rows.max(1),
            from_scratch: persisted.is_none(),
            unknown_meters: HashSet::new(),
        })
    }

    /// Exports every durable record not stored yet, chunk by chunk; returns
    /// the rows sent. Once `stop` says so, it stops between chunks, and a wait
    /// on ClickHouse ends at once with [`ExportError::Stopped`] (an INSERT cut
    /// short that way is handled like any failed one).
    pub async fn export_available(&mut self, stop: Option<&watch::Receiver<bool>>) -> Result<usize, ExportError> {
        let mut rows = 0;
        loop {
            self.persist().await?;
            if stop.is_some_and(|s| *s.borrow()) {
                return Ok(rows);
            }
            self.fill().await?;
            if self.waiting.is_empty() {
                return Ok(rows);
            }
            rows += self.send_chunk(stop).await?;
        }
    }

    /// The last record read from the WAL.
    fn last_read(&self) -> u64 {
        self.waiting.back().map_or(self.exported, |(seq, _)| *seq)
    }

    /// Reads durable records until a chunk's worth of events waits (or none are left).
    async fn fill(&mut self) -> Result<(), ExportError> {
        let events: usize = self.waiting.iter().map(|(_, b)| b.events.len()).sum();
        let waiting = events.saturating_sub(self.start);
        if waiting >= self.max_rows {
            return Ok(());
        }
        let upto = self.engine.wal().durable_seq();
        let want = self.max_rows - waiting;
        let mut tail = self.tail.take().unwrap_or_else(|| Tail::after(&self.dir, self.last_read()));
        let (tail, read) = tokio::task::spawn_blocking(move || {
            let read = tail.read(upto, want);
            (tail, read)
        })
        .await
        .map_err(|e| ExportError::Task(format!("reading the WAL: {e}")))?;
        self.tail = Some(tail);
        let read = read?;
        for &(a, b) in &read.gaps {
            if self.from_scratch && a == 1 {
                tracing::info!(before = b + 1, "raw-events export: starting with the oldest record the WAL holds");
                continue;
            }
            crate::telemetry::raw_export_missing(b - a + 1);
            tracing::warn!(
                from = a,
                to = b,
                "raw-events export: these WAL records are gone (deleted while raw_events was off, or dropped by \
                 `meterd wal repair`); their events are not in raw_events"
            );
        }
        self.waiting.extend(read.records);
        Ok(())
    }

    /// Sends the next chunk (only its missing rows, when an earlier attempt
    /// may have stored some) and drops the records it completes.
    async fn send_chunk(&mut self, stop: Option<&watch::Receiver<bool>>) -> Result<usize, ExportError> {
        let counts: Vec<usize> = self.waiting.iter().map(|(_, b)| b.events.len()).collect();
        let start = Pos { record: 0, event: self.start };
        let end = chunk::end(&counts, start, self.max_rows);
        let places: Vec<(usize, usize)> = chunk::events(&counts, start, end).collect();
        let keys: Vec<(u64, u32)> = places.iter().map(|&(r, e)| (self.waiting.get(r).map_or(0, |w| w.0), idx(e))).collect();
        let mut sent = 0;
        if let (Some(&(first_seq, first_idx)), Some(&(last_seq, _))) = (keys.first(), keys.last()) {
            let instance_id = self.engine.instance_id().to_string();
            let query_id = self.table.query_id(&instance_id, first_seq, first_idx);
            let stored = if first_seq <= self.suspect_upto {
                or_stop(stop, self.table.stored(&instance_id, first_seq, last_seq, &query_id)).await?
            } else {
                HashSet::new()
            };
            let send = chunk::missing(&keys, &stored);
            let mut rows = Vec::with_capacity(places.len());
            let (waiting, catalog, unknown) = (&self.waiting, self.engine.catalog(), &mut self.unknown_meters);
            for (&(r, e), _) in places.iter().zip(&send).filter(|(_, send)| **send) {
                let Some((seq, batch)) = waiting.get(r) else { continue };
                let Some(event) = batch.events.get(e) else { continue };
                let precision = precision(catalog, unknown, batch.meter(event));
                rows.push(RawEventRow::of(&instance_id, *seq, idx(e), batch, event, precision));
            }
            if rows.is_empty() {
                tracing::warn!(
                    first_seq,
                    last_seq,
                    rows = keys.len(),
                    "raw-events export: an earlier attempt stored this chunk; nothing to send"
                );
            } else if rows.len() < keys.len() {
                tracing::warn!(
                    first_seq,
                    last_seq,
                    stored = keys.len() - rows.len(),
                    sending = rows.len(),
                    "raw-events export: an earlier attempt stored part of this chunk; sending the missing rows"
                );
            }
            if !rows.is_empty() {
                // Until it is acknowledged, the INSERT may store any part of
                // the chunk (also if this future is dropped): ask next time.
                let before = self.suspect_upto;
                self.suspect_upto = before.max(last_seq);
                or_stop(stop, self.table.insert(&rows, &query_id)).await?;
                self.suspect_upto = before;
            }
            sent = rows.len();
            crate::telemetry::raw_export_rows(sent);
            tracing::debug!(first_seq, last_seq, rows = sent, "raw-events chunk stored");
        }
        for _ in 0..end.record {
            if let Some((seq, _)) = self.waiting.pop_front() {
                self.exported = seq;
            }
        }
        self.start = end.event;
        Ok(sent)
    }

    /// Writes the watermark once records were completed since the last write,
    /// then lets the WAL drop what it no longer needs to keep.
    async fn persist(&mut self) -> Result<(), ExportError> {
        if self.exported <= self.persisted {
            return Ok(());
        }
        let (dir, seq) = (self.dir.clone(), self.exported);
        tokio::task::spawn_blocking(move || watermark::write(&dir, seq))
            .await
            .map_err(|e| ExportError::Task(format!("writing the watermark: {e}")))??;
        self.persisted = seq;
        self.engine.wal().release(seq).await?;
        Ok(())
    }

    /// Sets the export's gauges.
    pub fn gauges(&self) {
        let lag_records = self.engine.wal().durable_seq().saturating_sub(self.exported);
        let lag_seconds = match self.waiting.front() {
            Some((_, batch)) => Some(((now_ms() - batch.accepted_ms) as f64 / 1000.0).max(0.0)),
            None if lag_records == 0 => Some(0.0),
            None => None, // Not read yet: unknown, the gauge keeps its value.
        };
        crate::telemetry::raw_export_gauges(self.persisted, lag_records, lag_seconds);
    }
}

/// Runs a ClickHouse call, or gives up on it once `stop` turns true.
async fn or_stop<T>(
    stop: Option<&watch::Receiver<bool>>,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, ExportError> {
    let Some(stop) = stop else {
        return Ok(call.await?);
    };
    let mut stop = stop.clone();
    tokio::select! {
        result = call => Ok(result?),
        // A dropped sender counts as a stop too.
        _ = stop.wait_for(|stopping| *stopping) => Err(ExportError::Stopped),
    }
}

/// A meter's precision, for a row's `value` (`None`: no longer configured;
/// warned about once per meter).
fn precision(catalog: &crate::model::Catalog, unknown: &mut HashSet<String>, meter: &str) -> Option<u8> {
    let precision = catalog.meter_by_name(meter).map(|m| m.precision);
    if precision.is_none() && unknown.insert(meter.to_owned()) {
        tracing::warn!(meter, "raw-events export: events of a meter no longer configured are exported with precision 0");
    }
    precision
}

/// An event's index within its record as stored (`UInt32`; a batch holds at most
/// `ingest.max_batch_events`, ≤ 1,000,000).
fn idx(event: usize) -> u32 {
    u32::try_from(event).unwrap_or(u32::MAX)
}

/// Runs until `shutdown` turns true, then makes a final pass of at most
/// `final_limit`. A failed pass is retried with [`backoff`].
pub async fn run(mut exporter: Exporter, interval: Duration, mut shutdown: watch::Receiver<bool>, final_limit: Duration) {
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(backoff(interval, failures)) => {}
            _ = shutdown.changed() => break,
        }
        match exporter.export_available(Some(&shutdown)).await {
            Ok(_) => failures = 0,
            Err(ExportError::Stopped) => break,
            Err(e) => {
                failures = failures.saturating_add(1);
                crate::telemetry::raw_export_failed();
                tracing::warn!(error = %e, failures, retry_in = ?backoff(interval, failures), "raw-events export failed; retrying");
            }
        }
        exporter.gauges();
    }
    match tokio::time::timeout(final_limit, exporter.export_available(None)).await {
        Ok(Ok(rows)) => tracing::info!(rows, watermark = exporter.persisted, "final raw-events export done"),
        Ok(Err(e)) => {
            crate::telemetry::raw_export_failed();
            tracing::warn!(error = %e, "final raw-events export failed; the WAL keeps the records for the next start");
        }
        Err(_) => tracing::warn!(limit = ?final_limit, "final raw-events export cut short; the WAL keeps the rest for the next start"),
    }
    exporter.gauges();
}
