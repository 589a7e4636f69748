//! The write-ahead log: a `202` (and an allowed consume) is a promise, kept
//! through crashes as far as `storage.durability` says.
//!
//! # Design
//!
//! Every accepted batch becomes one record (`record.rs`: an rkyv payload in a
//! frame with length, CRC32C and a sequence number) appended by one writer thread
//! that group-commits (`writer.rs`): many batches, one `write`, one `fsync`. The
//! request is answered only after its record is durable (`fsync`), written
//! (`buffered`, fsync every interval), or at once (`none`: no WAL).
//!
//! Records live in segment files (`segment.rs`) that rotate by size. After the
//! usage store holds everything up to a sequence number, a checkpoint
//! (`checkpoint.rs`) records it and the segments wholly below it are deleted.
//! With the raw-events export on (`clickhouse.raw_events`), the export holds
//! segments too: a segment goes only once it is wholly at or below both the
//! checkpoint and the export's watermark ([`Wal::release`]). The export reads
//! records from the segment files (`tail.rs`), and only those at or below
//! [`Wal::durable_seq`]: a record that is written but not yet fsynced
//! (`buffered`) could still vanish in a power loss, and its sequence number
//! would then be reused.
//!
//! **Which sequence does a flush cover?** Batches are folded into the counters
//! after their record is durable, in whatever order their callers wake up. The
//! [`SeqTracker`] knows which durable batches are not folded yet. When the flusher
//! swaps the bucket epoch it holds the epoch's exclusive lock, so no fold is in
//! flight, and every sequence below the lowest unfolded one is in the swapped
//! epoch or an older one: that is the epoch's watermark. Records above it that
//! were folded out of order (a group commit wakes its writers in any order) are
//! named too, as the mark's extras (`mark.rs`). The store writes the mark in the
//! same transaction as the epoch's rows, so the store itself says how far it is;
//! start-up replays every record above the larger of the store's watermark and
//! the checkpoint file, except the extras. Nothing is counted twice, and nothing
//! acknowledged is missed.
//!
//! **Damage.** The newest segment may end in a torn record (a crash mid-write,
//! or a power cut that lost some sectors of the last, unsynced group: see
//! `segment.rs`): it is cut off, with whatever follows it, with a warning naming
//! the file and offset. A bad record anywhere else stops the start with an
//! error; `meterd wal verify` and `meterd wal repair` deal with it by hand.

pub mod checkpoint;
pub mod ids;
pub mod mark;
pub mod reclaim;
pub mod record;
pub mod repair;
pub mod segment;
pub mod spacing;
pub mod spare;
pub mod tail;
pub mod writer;

pub use mark::WalMark;
pub use record::{Record, RecordBuilder, WalBatch, WalEvent};

use crossbeam::channel::Sender;
use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;
pub use writer::Sync;
use writer::{Command, Writer};

/// Why the WAL refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    #[error("WAL I/O on {path}: {message}")]
    Io { path: String, message: String, no_space: bool },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Segment(Arc<segment::SegmentError>),
    #[error("the WAL writer has stopped")]
    Stopped,
}

impl WalError {
    fn io(path: &Path, e: std::io::Error) -> WalError {
        WalError::Io { path: path.display().to_string(), message: e.to_string(), no_space: e.raw_os_error() == Some(28) }
    }
}

/// Shared counters about the WAL, for backpressure, `/readyz` and metrics.
#[derive(Debug)]
pub struct WalStats {
    /// Bytes in live segments, and in pruned ones not yet deleted (`reclaim.rs`).
    pub bytes: AtomicU64,
    /// The last checkpoint written.
    pub checkpoint: AtomicU64,
    /// Set when a failed write could not be cut off: appends are refused.
    pub broken: AtomicBool,
    /// The highest sequence on disk for good (fsynced): what may be copied
    /// elsewhere without risk that a crash takes it back.
    pub durable: AtomicU64,
    /// Segments holding a record above this are kept whatever the checkpoint
    /// says (the raw-events export has not taken them yet); `u64::MAX`: no hold.
    pub hold: AtomicU64,
}

impl Default for WalStats {
    fn default() -> WalStats {
        WalStats {
            bytes: AtomicU64::new(0),
            checkpoint: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            durable: AtomicU64::new(0),
            hold: AtomicU64::new(u64::MAX),
        }
    }
}

/// Durable batches not yet folded into the counters (see the module doc).
#[derive(Debug, Default)]
pub struct SeqTracker {
    inner: Mutex<TrackerState>,
}

#[derive(Debug, Default)]
struct TrackerState {
    unfolded: BTreeSet<u64>,
    max_acked: u64,
}

impl SeqTracker {
    /// Starts above `seq` (everything up to it is folded or stored).
    pub fn starting_at(seq: u64) -> SeqTracker {
        SeqTracker { inner: Mutex::new(TrackerState { unfolded: BTreeSet::new(), max_acked: seq }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer made these durable (before their callers learn it).
    pub fn acked(&self, seqs: &[u64]) {
        let mut s = self.state();
        s.unfolded.extend(seqs.iter().copied());
        if let Some(&max) = seqs.iter().max() {
            s.max_acked = s.max_acked.max(max);
        }
    }

    /// The batch `seq` is in the counters (or was refused after all: either way
    /// it no longer holds the watermark back).
    pub fn folded(&self, seq: u64) {
        self.state().unfolded.remove(&seq);
    }

    /// Exactly which sequences are folded: the watermark plus the records folded
    /// above it. Call under the epoch's exclusive lock for the answer to describe
    /// that epoch.
    pub fn mark(&self) -> WalMark {
        let s = self.state();
        WalMark::of(s.max_acked, s.unfolded.iter().copied())
    }
}

/// WAL settings from `[storage]`.
#[derive(Debug, Clone)]
pub struct WalConfig {
    pub dir: PathBuf,
    /// `None` disables the WAL (`durability = "none"`).
    pub sync: Option<Sync>,
    pub segment_bytes: u64,
    /// Ids are kept on disk this long (`ingest.dedupe_window`).
    pub dedupe_window_ms: i64,
    /// `Some(seq)`: something downstream (the raw-events export) has taken the
    /// records up to `seq` only; segments holding later ones are kept, whatever
    /// the checkpoint, until [`Wal::release`] moves it on. `None`: no hold.
    pub hold: Option<u64>,
    /// With `Sync::Always`: after a group of several records, the next sync
    /// starts no sooner than this after that group's (`spacing.rs`).
    pub sync_spacing: Duration,
}

impl WalConfig {
    /// A WAL that is off (`durability = "none"`): nothing is written or
    /// replayed, and only `dir` is read (the engine keeps its dedupe runs in
    /// `dir/dedupe`); the other fields are unused.
    pub fn off(dir: PathBuf) -> WalConfig {
        WalConfig { dir, sync: None, segment_bytes: 0, dedupe_window_ms: 0, hold: None, sync_spacing: Duration::ZERO }
    }
}

/// What opening the WAL found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub segments: usize,
    pub replayed_records: u64,
    pub replayed_events: u64,
    /// (file, offset) of a torn tail that was cut off.
    pub truncated: Option<(String, u64)>,
    pub last_seq: u64,
    /// Ids loaded from the id files.
    pub ids_loaded: u64,
}

/// A handle on the WAL.
pub struct Wal {
    /// The segments' directory (empty when disabled).
    dir: PathBuf,
    /// Serialises [`Wal::checkpoint`]s (they write one temporary file).
    checkpointing: tokio::sync::Mutex<()>,
    tx: Mutex<Option<Sender<Command>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Wakes the writer when it holds for records (`spacing.rs`).
    recall: Arc<spacing::Recall>,
    pub tracker: Arc<SeqTracker>,
    pub stats: Arc<WalStats>,
    enabled: bool,
}

impl Wal {
    /// How many ids [`Wal::open`] will hand back from the id files that reach
    /// past `from_ms` (by their sizes, before reading them; 0 with the WAL
    /// off), so the caller can make room for them first.
    pub fn ids_to_load(config: &WalConfig, from_ms: i64) -> Result<u64, WalError> {
        if config.sync.is_none() {
            return Ok(0);
        }
        ids::count(&config.dir.join("ids"), crate::clock::now_ms(), config.dedupe_window_ms, from_ms)
            .map_err(|e| WalError::Failed(e.to_string()))
    }

    /// Opens the WAL in `config.dir`: loads the ids accepted within the dedupe
    /// window through `id` (id, accepted ms, its record's sequence number),
    /// cuts a torn tail, replays every record above `max(floor, checkpoint
    /// file)` through `replay` in sequence order (except the floor's extras,
    /// which the store holds already), then starts the writer. A disabled WAL
    /// loads and replays nothing.
    pub fn open(
        config: &WalConfig,
        floor: &WalMark,
        id: impl FnMut(u128, i64, u64),
        mut replay: impl FnMut(u64, WalBatch),
    ) -> Result<(Wal, OpenReport), WalError> {
        let Some(sync) = config.sync else {
            return Ok((Wal::disabled(), OpenReport::default()));
        };
        let dir = &config.dir;
        std::fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
        let now = crate::clock::now_ms();
        let ids_dir = dir.join("ids");
        let checkpointed = checkpoint::read(dir).map_err(|e| WalError::Failed(e.to_string()))?;
        // The store's mark wins unless the checkpoint is ahead of it (a store
        // rebuilt from elsewhere): then only the checkpoint is known.
        let floor = if checkpointed > floor.upto { WalMark::upto(checkpointed) } else { floor.clone() };
        let from = floor.upto;
        let found = segment::list(dir).map_err(|e| WalError::Segment(Arc::new(e)))?;
        let dropped = repair::dropped_ranges(dir);
        let mut report = OpenReport { segments: found.len(), last_seq: from, ..OpenReport::default() };
        let stats = Arc::new(WalStats::default());
        stats.hold.store(config.hold.unwrap_or(u64::MAX), Ordering::Release);
        // The highest record the segments hold (not the floor, which may be above it).
        let mut newest_record = 0;
        let mut segments = Vec::new();
        // The newest segment's length on disk, zeros written ahead included.
        let mut allocated = 0;
        let count = found.len();
        for (i, (first, path)) in found.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let scan = segment::scan(&path, is_last).map_err(|e| WalError::Segment(Arc::new(e)))?;
            if let Some((offset, reason)) = &scan.torn_at {
                tracing::warn!(file = %path.display(), offset, reason = %reason, "WAL ends in a torn record (a crash mid-write); cutting it off");
                let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| WalError::io(&path, e))?;
                file.set_len(scan.valid_len).and_then(|()| file.sync_all()).map_err(|e| WalError::io(&path, e))?;
                report.truncated = Some((path.display().to_string(), *offset));
            }
            for record in scan.records {
                newest_record = newest_record.max(record.seq);
                if record.seq <= from {
                    continue;
                }
                let gap_was_repaired = dropped.iter().any(|&(a, b)| a == report.last_seq + 1 && b + 1 == record.seq);
                if record.seq != report.last_seq + 1 && !gap_was_repaired {
                    return Err(WalError::Failed(format!(
                        "WAL {} skips from sequence {} to {}: records are missing (run `meterd wal verify`)",
                        path.display(),
                        report.last_seq,
                        record.seq
                    )));
                }
                let batch = record::decode(&record.payload)
                    .map_err(|e| WalError::Failed(format!("WAL {} at byte offset {}: {e}", path.display(), record.offset)))?;
                report.last_seq = record.seq;
                if floor.covers(record.seq) {
                    continue; // Folded above the store's watermark and stored with it.
                }
                report.replayed_records += 1;
                report.replayed_events += batch.events.len() as u64;
                replay(record.seq, batch);
            }
            if scan.padding > 0 && !is_last {
                // Zeros written ahead that a rotation did not get to cut (only the
                // newest segment may have them: see `writer::rotate_if_full`).
                let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| WalError::io(&path, e))?;
                file.set_len(scan.valid_len).and_then(|()| file.sync_all()).map_err(|e| WalError::io(&path, e))?;
            }
            stats.bytes.fetch_add(scan.valid_len, Ordering::AcqRel);
            allocated = scan.valid_len + scan.padding;
            segments.push((first, path, scan.valid_len));
        }
        let next_seq = report.last_seq + 1;
        // Ids whose record never became durable (a crash between the two writes,
        // or a power loss that kept the id file's pages but not the segment's)
        // would turn a retry of a lost batch into a "duplicate": forget them.
        let phantoms = ids::forget(&ids_dir, &[(next_seq, u64::MAX)]).map_err(|e| WalError::Failed(e.to_string()))?;
        if phantoms > 0 {
            tracing::warn!(ids = phantoms, "forgot event ids whose WAL records were never written");
        }
        report.ids_loaded = ids::load(&ids_dir, now, config.dedupe_window_ms, id).map_err(|e| WalError::Failed(e.to_string()))?;
        let id_log = ids::IdLog::new(ids_dir, config.dedupe_window_ms).map_err(|e| WalError::Failed(e.to_string()))?;
        let file = match segments.last() {
            Some((_, path, _)) => {
                let file = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| WalError::io(path, e))?;
                // With `buffered`, a killed process leaves its last writes in
                // the page cache only: make them durable before anything
                // (the raw-events export) treats them as such.
                file.sync_all().map_err(|e| WalError::io(path, e))?;
                file
            }
            None => {
                let (path, file) = Writer::open_segment(dir, next_seq)?;
                segments.push((next_seq, path, 0));
                allocated = 0;
                file
            }
        };
        let spares = match spare::Spares::start(dir, config.segment_bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "WAL segments will start empty");
                None
            }
        };
        let reclaimer = match reclaim::Reclaimer::start(dir, stats.clone()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "pruned WAL segments will be deleted at once, on the writer's thread");
                None
            }
        };
        stats.checkpoint.store(from, Ordering::Release);
        stats.durable.store(newest_record, Ordering::Release);
        let tracker = Arc::new(SeqTracker::starting_at(report.last_seq));
        let recall = Arc::new(spacing::Recall::default());
        let writer = Writer {
            dir: dir.clone(),
            sync,
            segment_bytes: config.segment_bytes,
            next_seq,
            segments,
            file,
            allocated,
            spares,
            reclaimer,
            tracker: tracker.clone(),
            stats: stats.clone(),
            ids: id_log,
            series: crate::telemetry::WalSeries::register(),
            spacing: config.sync_spacing,
            recall: recall.clone(),
        };
        let (tx, rx) = crossbeam::channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("meterd-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| WalError::Failed(format!("cannot start the WAL writer: {e}")))?;
        let wal = Wal {
            dir: dir.clone(),
            checkpointing: tokio::sync::Mutex::new(()),
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            recall,
            tracker,
            stats,
            enabled: true,
        };
        Ok((wal, report))
    }

    /// A WAL that writes nothing (`durability = "none"`).
    pub fn disabled() -> Wal {
        Wal {
            dir: PathBuf::new(),
            checkpointing: tokio::sync::Mutex::new(()),
            tx: Mutex::new(None),
            thread: Mutex::new(None),
            recall: Arc::default(),
            tracker: Arc::new(SeqTracker::default()),
            stats: Arc::new(WalStats::default()),
            enabled: false,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Sends the writer the command built around a reply channel, and waits for
    /// the answer.
    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<Result<T, WalError>>) -> Command) -> Result<T, WalError> {
        let rx = self.send(command)?;
        rx.await.map_err(|_| WalError::Stopped)?
    }

    /// Sends the writer the command built around a reply channel; the answer
    /// comes on the returned receiver. The sender is used under its lock rather
    /// than cloned out of it (sending on the unbounded channel never blocks): no
    /// reference-count traffic per request.
    fn send<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, WalError>>) -> Command,
    ) -> Result<oneshot::Receiver<Result<T, WalError>>, WalError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let tx = tx.as_ref().ok_or(WalError::Stopped)?;
        tx.send(command(reply)).map_err(|_| WalError::Stopped)?;
        self.recall.queued(|| tx.len());
        Ok(rx)
    }

    /// Appends a batch; resolves once it is as durable as configured. A disabled
    /// WAL answers 0 at once. See [`Wal::append_with`]: the record goes to the
    /// writer when this is called, not when the future is first polled.
    pub fn append(&self, record: RecordBuilder) -> Appended {
        self.append_with(|| record)
    }

    /// [`Wal::append`] of a record built only when the WAL is on: with
    /// `durability = "none"` a consume encodes nothing.
    ///
    /// The record is built and handed to the writer here, at the call; the
    /// future only waits for the writer's answer. So it holds a reply channel
    /// and nothing of the record, and borrows nothing: awaited inside a
    /// consume's future, the record's builder (a few hundred bytes) would be
    /// part of that future, which is boxed per request, and push it past the
    /// allocator's per-thread cache (issue 24).
    pub fn append_with(&self, build: impl FnOnce() -> RecordBuilder) -> Appended {
        if !self.enabled {
            return Appended::Ready(Some(Ok(0)));
        }
        let sent = build()
            .finish()
            .map_err(|e| WalError::Failed(e.to_string()))
            .and_then(|Record { payload, ids, accepted_ms }| self.send(|reply| Command::Append { payload, ids, accepted_ms, reply }));
        match sent {
            Ok(rx) => Appended::Waiting(rx),
            Err(e) => Appended::Ready(Some(Err(e))),
        }
    }

    /// Makes the ids of every record written so far durable; call before the
    /// store takes a flush that lets records leave the WAL. Returns the last
    /// record written (0 without a WAL).
    pub async fn sync_ids(&self) -> Result<u64, WalError> {
        if !self.enabled {
            return Ok(0);
        }
        // The writer hands out the files; they are synced here, on a blocking
        // thread, so appends do not wait behind these fsyncs (issue 24).
        let (sync, written) = self.ask(|reply| Command::SyncIds { reply }).await?;
        tokio::task::spawn_blocking(move || sync.run())
            .await
            .map_err(|e| WalError::Failed(format!("id file sync task: {e}")))?
            .map_err(|e| WalError::Failed(e.to_string()))?;
        Ok(written)
    }

    /// Records that the store holds everything up to `seq`; deletes old segments.
    pub async fn checkpoint(&self, seq: u64) -> Result<(), WalError> {
        if !self.enabled || seq <= self.stats.checkpoint.load(Ordering::Acquire) {
            return Ok(());
        }
        // The file (two fsyncs and a rename) is written here, on a blocking
        // thread, not by the writer, which would hold every append meanwhile
        // (issue 24); the writer then prunes. One checkpoint at a time: they
        // share a temporary file.
        let _one = self.checkpointing.lock().await;
        if seq <= self.stats.checkpoint.load(Ordering::Acquire) {
            return Ok(());
        }
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || checkpoint::write(&dir, seq))
            .await
            .map_err(|e| WalError::Failed(format!("checkpoint task: {e}")))?
            .map_err(|e| WalError::Failed(e.to_string()))?;
        self.ask(|reply| Command::Checkpoint { seq, reply }).await
    }

    /// Records that the raw-events export holds everything up to `seq` (its
    /// watermark file says so): segments wholly at or below both `seq` and the
    /// checkpoint are deleted. Only called when [`WalConfig::hold`] was set.
    pub async fn release(&self, seq: u64) -> Result<(), WalError> {
        if !self.enabled || seq <= self.stats.hold.load(Ordering::Acquire) {
            return Ok(());
        }
        self.ask(|reply| Command::Release { seq, reply }).await
    }

    /// The highest sequence that is on disk for good (fsynced); records above
    /// it may still be lost to a power cut (`buffered`) and their numbers reused.
    pub fn durable_seq(&self) -> u64 {
        self.stats.durable.load(Ordering::Acquire)
    }

    /// Stops the writer after it has written and synced everything queued.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if thread.join().is_err() {
                tracing::error!("the WAL writer thread panicked");
            }
        }
    }

    /// Bytes in live segments, and in pruned ones not yet deleted.
    pub fn bytes(&self) -> u64 {
        self.stats.bytes.load(Ordering::Acquire)
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

/// What [`Wal::append`] returns: the sequence number of the record once it is
/// as durable as configured. A small future of its own (an answer or a reply
/// channel) rather than an `async` block, which would also keep the channel's
/// result and the refusal it may carry: this one is part of every consume's
/// future (issue 24).
pub enum Appended {
    /// Answered at once: the WAL is off, or the record could not be sent.
    Ready(Option<Result<u64, WalError>>),
    /// Sent: the writer answers on the channel.
    Waiting(oneshot::Receiver<Result<u64, WalError>>),
}

impl Future for Appended {
    type Output = Result<u64, WalError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            // Polled again after it answered: the WAL has nothing more to say.
            Appended::Ready(answer) => Poll::Ready(answer.take().unwrap_or(Err(WalError::Stopped))),
            Appended::Waiting(rx) => Pin::new(rx).poll(cx).map(|reply| reply.unwrap_or(Err(WalError::Stopped))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn batch(n: usize, tag: i64) -> WalBatch {
        // Now, so the id files are within the dedupe window.
        let mut b = record::BatchBuilder::new(crate::engine::now_ms() + tag, n);
        for i in 0..n {
            b.push(((tag as u128) << 8) | i as u128, i as u32, || format!("c{i}"), 0, "m", tag, tag, vec![]);
        }
        b.finish()
    }

    fn record(n: usize, tag: i64) -> RecordBuilder {
        RecordBuilder::of(&batch(n, tag))
    }

    fn config(dir: &Path, segment_bytes: u64) -> WalConfig {
        WalConfig {
            dir: dir.to_path_buf(),
            sync: Some(Sync::Always),
            segment_bytes,
            dedupe_window_ms: 86_400_000,
            hold: None,
            sync_spacing: Duration::ZERO,
        }
    }

    /// A WAL in `dir` holding `n` records of 3 events each (batch tags 0..n), closed.
    async fn written(dir: &Path, n: i64) -> WalConfig {
        let cfg = config(dir, 1 << 20);
        let (wal, _) = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
        for t in 0..n {
            let _ = wal.append(record(3, t)).await;
        }
        wal.close();
        cfg
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_replay_checkpoint_and_rotate() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let cfg = config(tmp.path(), 300);
        let (wal, report) =
            Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |_, _| {}).map_err(|e| e.to_string()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.last_seq, 0);
        // Concurrent appends get distinct, consecutive sequence numbers.
        let wal = Arc::new(wal);
        let mut handles = Vec::new();
        for t in 0..20 {
            let wal = wal.clone();
            handles.push(tokio::spawn(async move { wal.append(record(2, t)).await.ok() }));
        }
        let mut seqs = Vec::new();
        for h in handles {
            seqs.push(h.await.ok().flatten().unwrap_or(0));
        }
        seqs.sort();
        assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
        // More appends in separate groups, so the small segments rotate.
        for t in 20..30 {
            assert_eq!(wal.append(record(2, t)).await.ok(), Some(t as u64 + 1));
        }
        // The concurrent appends may share one group and one segment (1..=20 at
        // most); a checkpoint at 22 frees that segment whatever the grouping.
        assert!(wal.checkpoint(22).await.is_ok());
        wal.close();
        let live = segment::list(tmp.path()).unwrap_or_default();
        assert!(live.len() > 1, "small segments rotate");
        assert!(live[0].0 <= 23, "the segment holding 23 is kept: {live:?}");
        assert!(live[0].0 > 1, "segments wholly at or below the checkpoint are deleted: {live:?}");
        drop(wal);
        // Replay starts above the checkpoint, in order.
        let mut replayed = Vec::new();
        let (wal, report) = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |seq, b| replayed.push((seq, b.events.len())))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(replayed.iter().map(|r| r.0).collect::<Vec<_>>(), (23..=30).collect::<Vec<u64>>());
        assert_eq!(report.replayed_events, 16);
        // A floor from the store above the checkpoint wins.
        wal.close();
        drop(wal);
        let mut n = 0;
        let (wal, _) = Wal::open(&cfg, &WalMark::upto(26), |_, _, _| {}, |_, _| n += 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 4);
        assert_eq!(wal.append(record(1, 99)).await.ok(), Some(31));
        wal.close();
        drop(wal);
        // Records the store holds above its watermark (its mark's extras) are skipped.
        let mut seqs = Vec::new();
        let floor = WalMark { upto: 24, extras: vec![(26, 27), (30, 30)] };
        let (wal, report) = Wal::open(&cfg, &floor, |_, _, _| {}, |seq, _| seqs.push(seq)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seqs, vec![25, 28, 29, 31]);
        assert_eq!(report.last_seq, 31);
        assert_eq!(wal.append(record(1, 99)).await.ok(), Some(32));
    }

    /// Copies the WAL directory as it is now (segments and id files), as a
    /// crash would leave it.
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
            let dst = to.join(entry.file_name());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                copy_dir(&entry.path(), &dst);
            } else {
                std::fs::copy(entry.path(), &dst).expect("copy");
            }
        }
    }

    /// Rotations take the segment prepared ahead (zeros the records overwrite)
    /// and cut the zeros off the segment they finish; a start after a crash
    /// reads the newest segment's zeros as room, not as a torn record, replays
    /// every record, and writes on into the zeros.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prepared_segments_are_written_into_and_survive_a_crash() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let cfg = config(tmp.path(), 4096);
        let (wal, _) = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut last = 0;
        // Until the newest segment is a prepared one with records in it and room after them.
        let (live, newest_len) = loop {
            last = wal.append(record(2, last as i64 + 1)).await.unwrap_or_else(|e| panic!("{e}"));
            let live = segment::list(tmp.path()).unwrap_or_default();
            let newest = live.last().map(|(_, p)| p.clone()).unwrap_or_default();
            let scan = segment::scan(&newest, true).unwrap_or_else(|e| panic!("{e}"));
            if !scan.records.is_empty() && scan.padding > 512 && live.len() > 2 {
                break (live, scan.valid_len + scan.padding);
            }
            assert!(std::time::Instant::now() < deadline, "no record landed in a prepared segment");
        };
        assert_eq!(newest_len, 4096, "a prepared segment is the segment size, in zeros first");
        for (_, path) in &live[..live.len() - 1] {
            let scan = segment::scan(path, false).unwrap_or_else(|e| panic!("{e}"));
            let on_disk = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            assert_eq!((scan.padding, on_disk), (0, scan.valid_len), "a finished segment ends at its last record: {path:?}");
        }
        let crashed = tempfile::tempdir().expect("temp dir");
        copy_dir(tmp.path(), crashed.path());
        wal.close();
        drop(wal);

        let cfg = config(crashed.path(), 4096);
        let mut replayed = Vec::new();
        let (wal, report) =
            Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |seq, _| replayed.push(seq)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(replayed, (1..=last).collect::<Vec<u64>>(), "every record, in order");
        assert_eq!(report.truncated, None, "zeros are not a torn record");
        assert_eq!(wal.append(record(2, 0)).await.ok(), Some(last + 1));
        let newest = segment::list(crashed.path()).unwrap_or_default().last().map(|(_, p)| p.clone()).unwrap_or_default();
        assert_eq!(std::fs::metadata(&newest).map(|m| m.len()).ok(), Some(4096), "written into the zeros, not appended");
        wal.close();
        drop(wal);
        let mut replayed = Vec::new();
        let (_wal, report) =
            Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |seq, _| replayed.push(seq)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(replayed.last(), Some(&(last + 1)));
        assert_eq!((replayed.len() as u64, report.truncated), (last + 1, None));
        drop(_wal);
        // Started again with smaller segments: the newest is full with zeros
        // left after its records, which its rotation cuts off.
        let small = config(crashed.path(), 256);
        let (wal, _) = Wal::open(&small, &WalMark::default(), |_, _, _| {}, |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
        for t in 0..4 {
            assert_eq!(wal.append(record(2, t)).await.ok(), Some(last + 2 + t as u64));
        }
        wal.close();
        let live = segment::list(crashed.path()).unwrap_or_default();
        assert!(live.iter().any(|(first, _)| *first > last + 1), "rotated: {live:?}");
        for (_, path) in &live[..live.len() - 1] {
            let scan = segment::scan(path, false).unwrap_or_else(|e| panic!("{e}"));
            let on_disk = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            assert_eq!((scan.padding, on_disk), (0, scan.valid_len), "a finished segment ends at its last record: {path:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_are_kept_until_both_checkpoint_and_hold_pass_them() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let cfg = WalConfig { hold: Some(0), ..config(tmp.path(), 300) };
        let (wal, _) = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
        for t in 0..30 {
            assert_eq!(wal.append(record(2, t)).await.ok(), Some(t as u64 + 1));
        }
        assert_eq!(wal.durable_seq(), 30, "fsync mode: every acknowledged record is durable");
        let all = segment::list(tmp.path()).unwrap_or_default();
        assert!(all.len() > 3, "small segments rotate: {all:?}");
        // The store has everything, the export nothing yet: every segment stays.
        assert!(wal.checkpoint(30).await.is_ok());
        // (A segment may have rotated in since: the writer rotates after answering.)
        let after: Vec<_> = segment::list(tmp.path()).unwrap_or_default().into_iter().take(all.len()).collect();
        assert_eq!(after, all, "held for the export");
        // The export moves on: segments wholly at or below it go.
        assert!(wal.release(12).await.is_ok());
        let live = segment::list(tmp.path()).unwrap_or_default();
        assert!(live.len() < all.len(), "released segments are deleted");
        assert!(live[0].0 <= 13 && live[0].0 > 1, "the segment holding 13 is kept: {live:?}");
        // The export ahead of the checkpoint: the checkpoint decides.
        assert!(wal.release(30).await.is_ok());
        let live = segment::list(tmp.path()).unwrap_or_default();
        assert_eq!(live.len(), 1, "only the open segment is left: {live:?}");
        // The pruned files leave the disk too (`reclaim.rs`), off the writer.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let reclaiming = || {
            std::fs::read_dir(tmp.path())
                .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(reclaim::PREFIX)).count())
                .unwrap_or(usize::MAX)
        };
        while reclaiming() > 0 {
            assert!(std::time::Instant::now() < deadline, "pruned segments still on disk after 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        wal.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buffered_records_are_durable_only_once_synced() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let cfg = WalConfig { sync: Some(Sync::Interval(Duration::from_secs(3600))), ..config(tmp.path(), 1 << 20) };
        let (wal, _) = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
        for t in 0..5 {
            assert_eq!(wal.append(record(1, t)).await.ok(), Some(t as u64 + 1));
        }
        assert_eq!(wal.durable_seq(), 0, "written, not fsynced: could still vanish in a power cut");
        let stats = wal.stats.clone();
        wal.close();
        assert_eq!(stats.durable.load(Ordering::Acquire), 5, "the final fsync makes them durable");
        drop(wal);
        // Opening syncs what it finds: it is durable from the start.
        let (wal, _) = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(wal.durable_seq(), 5);
    }

    /// A power cut before the last group's sync, over zeros written ahead:
    /// the disk kept a later sector of the group and lost an earlier one. The
    /// start cuts the group off as a tear (none of it was acknowledged), keeps
    /// every record before it, forgets nothing else, and writes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_power_cut_inside_the_last_group_is_cut_as_a_tear() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let cfg = written(tmp.path(), 40).await;
        let path = segment::list(tmp.path()).unwrap_or_default().last().map(|(_, p)| p.clone()).unwrap_or_default();
        let whole = std::fs::read(&path).unwrap_or_default();
        let offsets: Vec<usize> =
            segment::scan_bytes(&whole, &path, true).map(|s| s.records.iter().map(|r| r.offset as usize).collect()).unwrap_or_default();
        assert_eq!(offsets.len(), 40);
        // Say the last, unsynced group began at record 31: the sector after the
        // one it starts in was lost, everything after it kept, then zeros
        // written ahead.
        let group_at = offsets[30];
        let lost = (group_at / 512 + 1) * 512;
        assert!(lost + 512 < whole.len(), "the test needs records after the lost sector");
        let mut bytes = whole.clone();
        bytes[lost..lost + 512].fill(0);
        bytes.extend(std::iter::repeat_n(0u8, 8192));
        std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
        // Records kept: those the lost sector left unchanged, up to the first it changed.
        let ends: Vec<usize> = offsets.iter().skip(1).copied().chain([whole.len()]).collect();
        let kept = offsets.iter().zip(&ends).take_while(|&(&a, &b)| bytes[a..b] == whole[a..b]).count();
        assert!((30..40).contains(&kept), "the tear is inside the last group: {kept}");
        let mut seqs = Vec::new();
        let (wal, report) = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |s, _| seqs.push(s)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seqs, (1..=kept as u64).collect::<Vec<_>>(), "the records before the lost sector, in order");
        assert_eq!(report.truncated.as_ref().map(|(_, at)| *at as usize), Some(offsets[kept]));
        assert_eq!(std::fs::metadata(&path).map(|m| m.len() as usize).ok(), Some(offsets[kept]), "cut at the tear");
        assert_eq!(wal.append(record(1, 99)).await.ok(), Some(kept as u64 + 1));
        wal.close();
        drop(wal);
        let mut seqs = Vec::new();
        let (_wal, report) = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |s, _| seqs.push(s)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((seqs.len(), report.truncated), (kept + 1, None));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn torn_tail_is_cut_and_corruption_stops() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let cfg = written(tmp.path(), 5).await;
        let segs = segment::list(tmp.path()).unwrap_or_default();
        let path = segs[0].1.clone();
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        // Tear the last record.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap_or_else(|e| panic!("{e}"));
        let _ = f.set_len(len - 7);
        drop(f);
        let mut seqs = Vec::new();
        let mut ids = Vec::new();
        let (wal, report) =
            Wal::open(&cfg, &WalMark::default(), |id, _, _| ids.push(id), |s, _| seqs.push(s)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        assert!(report.truncated.is_some());
        // The torn record's ids (batch tag 4) are forgotten: a retry of it counts.
        ids.sort();
        let expected: Vec<u128> = (0..4u128).flat_map(|t| (0..3u128).map(move |i| (t << 8) | i)).collect();
        assert_eq!(ids, expected);
        // The next append reuses the torn record's sequence number.
        assert_eq!(wal.append(record(1, 9)).await.ok(), Some(5));
        wal.close();
        drop(wal);
        // Flip a bit in the first record: the start stops with a clear error.
        let mut bytes = std::fs::read(&path).unwrap_or_default();
        bytes[20] ^= 0x01;
        let _ = std::fs::write(&path, &bytes);
        let err = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |_, _| {}).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("corrupt at byte offset 0"), "{err}");
    }

    /// A WAL in a temporary directory whose syncs are spaced by `spacing`.
    fn spaced(spacing: Duration) -> (tempfile::TempDir, Wal) {
        let tmp = tempfile::tempdir().expect("temp dir");
        let cfg = WalConfig { sync_spacing: spacing, ..config(tmp.path(), 1 << 20) };
        let (wal, _) = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
        (tmp, wal)
    }

    /// Sends an append straight to the writer without waiting for it.
    fn send(wal: &Wal, tag: i64) -> oneshot::Receiver<Result<u64, WalError>> {
        let (reply, rx) = oneshot::channel();
        let record = record(1, tag).finish().unwrap_or_else(|e| panic!("{e}"));
        let tx = wal.tx.lock().unwrap_or_else(|p| p.into_inner());
        let sent = tx.as_ref().map(|tx| {
            let sent = tx.send(Command::Append { payload: record.payload, ids: record.ids, accepted_ms: record.accepted_ms, reply });
            wal.recall.queued(|| tx.len());
            sent
        });
        assert!(matches!(sent, Some(Ok(()))), "the writer takes appends");
        rx
    }

    /// A record held by the writer: sent alone 300 ms after a group of two
    /// (retried in the rare case the writer took the two apart), and still
    /// unanswered 100 ms later. The pause makes the mean gap since that
    /// group, and so the writer's watch for more arrivals (four of them),
    /// long: about 1.2 s.
    async fn held_probe(wal: &Wal) -> oneshot::Receiver<Result<u64, WalError>> {
        for attempt in 0..20 {
            let (a, b) = (send(wal, 3 * attempt), send(wal, 3 * attempt + 1));
            assert!(matches!(a.await, Ok(Ok(_))) && matches!(b.await, Ok(Ok(_))));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut probe = send(wal, 3 * attempt + 2);
            tokio::time::sleep(Duration::from_millis(100)).await;
            match probe.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return probe,
                done => assert!(matches!(done, Ok(Ok(_))), "{done:?}"),
            }
        }
        panic!("a record after a group of two was never held")
    }

    /// Issue 24: once a group held several records, the next is held (what
    /// arrives meanwhile joins it) until the spacing is out or the last
    /// group's count is back and nothing more comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_wal_spaces_its_syncs() {
        let (_tmp, wal) = spaced(Duration::from_secs(2));
        let probe = held_probe(&wal).await;
        // Sent while the probe is held: it brings the count of the last group
        // (two) back, so the writer watches a while for more and, none
        // coming, writes both together.
        let joined = send(&wal, 100);
        let both = tokio::time::timeout(Duration::from_secs(30), async { (probe.await, joined.await) }).await;
        let Ok((Ok(Ok(p)), Ok(Ok(j)))) = both else { panic!("held records are written after the spacing: {both:?}") };
        assert_eq!(j, p + 1);
        assert!(wal.stats.durable.load(Ordering::Acquire) >= j, "and synced");
        wal.close();
    }

    /// A held record that nothing joins (a closed loop that lost a client, a
    /// load that stopped) is written once the writer's watch for arrivals
    /// passes empty, not at the end of a spacing of a minute: the count of
    /// the last group never comes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_nothing_joins_ends_with_its_watch() {
        let (_tmp, wal) = spaced(Duration::from_secs(60));
        let probe = held_probe(&wal).await;
        let alone = tokio::time::timeout(Duration::from_secs(30), probe).await;
        assert!(matches!(alone, Ok(Ok(Ok(_)))), "a held record nothing joined waited for the spacing: {alone:?}");
        wal.close();
    }

    /// Clients that each send again as soon as answered (a closed loop) are
    /// not held: once they are all back and nothing more comes, the group is
    /// taken at once, and holds pause. With a spacing of a minute, four such
    /// clients (whose records share groups) finish 25 rounds each; a hold
    /// that waited the spacing out would stop them for a minute a round.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_loop_is_not_held() {
        let (_tmp, wal) = spaced(Duration::from_secs(60));
        let wal = Arc::new(wal);
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let wal = wal.clone();
                tokio::spawn(async move {
                    for t in 0..25 {
                        if wal.append(record(1, c * 100 + t)).await.is_err() {
                            return false;
                        }
                    }
                    true
                })
            })
            .collect();
        let all = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(clients)).await;
        let Ok(done) = all else { panic!("a closed loop waited out the spacing") };
        assert!(done.iter().all(|d| matches!(d, Ok(true))), "{done:?}");
        assert_eq!(wal.stats.durable.load(Ordering::Acquire), 100, "every record written and synced");
        wal.close();
    }

    /// Arrivals that keep coming while a hold waits (independent clients)
    /// keep it: records sent every 2 ms for 300 ms after a group of several
    /// (and a pause) are all still unanswered at the end, then written
    /// together once they stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn independent_arrivals_keep_the_hold() {
        let (_tmp, wal) = spaced(Duration::from_secs(5));
        for attempt in 0..20 {
            let (a, b) = (send(&wal, 1000 * attempt), send(&wal, 1000 * attempt + 1));
            assert!(matches!(a.await, Ok(Ok(_))) && matches!(b.await, Ok(Ok(_))));
            // A pause first, so the mean gap (counted from the last group)
            // is long and the watch too (about 800 ms): a slow test
            // machine's late sends are not taken for silence.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let mut stream = Vec::new();
            for t in 0..150 {
                stream.push(send(&wal, 1000 * attempt + 2 + t));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Answered at the end of the stream: a prefix at most (a hold that
            // began once a slow sync let two stream records share a group),
            // never a record after one still held.
            let answered: Vec<bool> =
                stream.iter_mut().map(|r| !matches!(r.try_recv(), Err(oneshot::error::TryRecvError::Empty))).collect();
            let first_held = answered.iter().position(|a| !a).unwrap_or(answered.len());
            if answered.len() - first_held < 50 && answered[first_held..].iter().all(|a| !a) && attempt < 19 {
                // The writer took the two alone, and the stream's records one
                // at a time: no hold began, or only near the stream's end (a
                // sync slow enough on a loaded machine to let two of them
                // share a group), too late to tell a hold from records in
                // flight. Wait for those, then try again.
                let late: Vec<_> = stream.into_iter().skip(first_held).collect();
                let _ = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(late)).await;
                continue;
            }
            assert!(
                answered[first_held..].iter().all(|a| !a),
                "a record of a stream that kept coming was answered during the hold: {answered:?}"
            );
            assert!(answered.len() - first_held >= 50, "held for most of the stream, not a moment: {answered:?}");
            let held: Vec<_> = stream.into_iter().skip(first_held).collect();
            let all = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(held)).await;
            let Ok(all) = all else { panic!("the stream is written once it stops") };
            let seqs: Vec<u64> = all.into_iter().filter_map(|r| r.ok().and_then(|r| r.ok())).collect();
            assert_eq!(seqs.len(), 150 - first_held);
            assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "every record written, in order: {seqs:?}");
            wal.close();
            return;
        }
        panic!("two records sent back to back never shared a group");
    }

    /// A light load is never held: records one at a time, each a group of
    /// one, are written at once even with a spacing of a minute.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_record_is_never_held() {
        let (_tmp, wal) = spaced(Duration::from_secs(60));
        let one_at_a_time = async {
            for t in 0..5 {
                assert_eq!(wal.append(record(1, t)).await.ok(), Some(t as u64 + 1));
            }
        };
        assert!(tokio::time::timeout(Duration::from_secs(30), one_at_a_time).await.is_ok(), "a lone record waited for the spacing");
        wal.close();
    }
}
