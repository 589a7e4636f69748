//! The WAL writer thread. Requests arrive on a channel; the thread takes every
//! request waiting (a *group*), frames the appends with consecutive sequence
//! numbers, writes them with one `write`, makes them durable with one `fsync`
//! (in `fsync` mode), and only then answers each caller. Under load, in `fsync`
//! mode, it takes its groups no closer together than `storage.wal_sync_spacing`
//! (`spacing.rs`), so that each sync carries more records. It does no other
//! fsync on the way: the checkpoint file and the id files are made durable by
//! the flusher, off this thread (issue 24). A failed write (a full
//! disk) is cut back off the file so the segment never holds a half group, every
//! caller of the group gets the error, and the sequence numbers are reused.
//!
//! Records are written at their offset (`pwrite`), not appended: a segment
//! may start as a file of zeros prepared ahead (`spare.rs`), which the records
//! overwrite, so that syncing them writes no metadata. At rotation the writer
//! cuts the zeros left after the last record off the finished segment and
//! takes the prepared file as the next one, or starts an empty one if none is
//! ready.

use super::checkpoint;
use super::ids::IdLog;
use super::reclaim::Reclaimer;
use super::record::frame;
use super::segment;
use super::spacing::{self, Hold, Outcome, Recall, Spacing};
use super::spare::Spares;
use super::{SeqTracker, WalError, WalStats};
use crossbeam::channel::{Receiver, RecvTimeoutError};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Work for the writer thread.
pub enum Command {
    Append {
        /// The encoded batch, as rkyv made it (no copy into a `Vec`).
        payload: rkyv::util::AlignedVec,
        ids: Vec<u128>,
        accepted_ms: i64,
        reply: oneshot::Sender<Result<u64, WalError>>,
    },
    /// The store holds everything up to `seq`: the caller has written the
    /// checkpoint file already (off this thread); prune the segments below it.
    Checkpoint { seq: u64, reply: oneshot::Sender<Result<(), WalError>> },
    /// Hand out the id files to make durable (before the store takes a
    /// flush, or a dedupe spill), with the last record written so far; the
    /// caller syncs them, not this thread.
    SyncIds { reply: oneshot::Sender<Result<(super::ids::IdSync, u64), WalError>> },
    /// The raw-events export holds everything up to `seq`: move the hold on.
    Release { seq: u64, reply: oneshot::Sender<Result<(), WalError>> },
}

/// How the writer makes appends durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// fsync before answering.
    Always,
    /// Answer after the write; fsync every `interval`.
    Interval(Duration),
}

/// The writer's state: the open segment and the next sequence number.
pub struct Writer {
    pub dir: PathBuf,
    pub sync: Sync,
    pub segment_bytes: u64,
    pub next_seq: u64,
    /// (first seq, path, size) of every live segment, oldest first; the last is open.
    pub segments: Vec<(u64, PathBuf, u64)>,
    pub file: File,
    /// The open segment's length on disk: past its size (the last record's
    /// end) it holds zeros written ahead, which the next records overwrite.
    pub allocated: u64,
    /// The next segments, prepared ahead (`None`: every segment starts empty).
    pub spares: Option<Spares>,
    /// Takes pruned segments off the disk gradually (`None`: deleted at once).
    pub reclaimer: Option<Reclaimer>,
    pub tracker: Arc<SeqTracker>,
    pub stats: Arc<WalStats>,
    /// Ids of written records, for deduplication across restarts.
    pub ids: IdLog,
    /// The sync-time and group-size histograms.
    pub series: crate::telemetry::WalSeries,
    /// With `Sync::Always`: the least time between two busy groups' starts.
    pub spacing: Duration,
    /// How the senders wake a held writer.
    pub recall: Arc<Recall>,
}

/// Most requests taken in one group.
const MAX_GROUP: usize = 4096;

impl Writer {
    /// Opens (or creates) the segment that starts at `first_seq` for writing.
    pub fn open_segment(dir: &std::path::Path, first_seq: u64) -> Result<(PathBuf, File), WalError> {
        let path = dir.join(segment::name(first_seq));
        let file = OpenOptions::new().create(true).write(true).truncate(false).open(&path).map_err(|e| WalError::io(&path, e))?;
        checkpoint::sync_dir(dir).map_err(|e| WalError::io(dir, e))?;
        Ok((path, file))
    }

    /// Runs until every sender is gone, then syncs and returns.
    pub fn run(mut self, rx: Receiver<Command>) {
        let mut last_sync = Instant::now();
        let mut dirty = false;
        let mut buf = Vec::with_capacity(1 << 20);
        let mut spacing = Spacing::new(if self.sync == Sync::Always { self.spacing } else { Duration::ZERO });
        self.recall.writer_is_this_thread();
        loop {
            let first = match self.sync {
                Sync::Always => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Sync::Interval(every) => rx.recv_timeout(every.saturating_sub(last_sync.elapsed()).max(Duration::from_millis(1))),
            };
            let first = match first {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            // Under load, what arrives while the writer waits joins this group.
            let now = Instant::now();
            if let Some(hold) = spacing.hold(now) {
                let outcome = self.wait_out(hold, &rx);
                let end = Instant::now();
                spacing.ended(end, outcome);
                self.series.held(end.saturating_duration_since(now).as_secs_f64(), outcome as usize);
            }
            spacing.taken(Instant::now());
            let mut group: Vec<Command> = first.into_iter().collect();
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            let mut appends = Vec::new();
            let mut checkpoints = Vec::new();
            let mut id_syncs = Vec::new();
            let mut releases = Vec::new();
            let mut ids = Vec::new();
            buf.clear();
            for cmd in group {
                match cmd {
                    Command::Append { payload, ids: batch_ids, accepted_ms, reply } => {
                        let seq = self.next_seq + appends.len() as u64;
                        frame(&mut buf, seq, &payload);
                        appends.push((seq, reply));
                        ids.push((batch_ids, accepted_ms, seq));
                    }
                    Command::Checkpoint { seq, reply } => checkpoints.push((seq, reply)),
                    Command::SyncIds { reply } => id_syncs.push(reply),
                    Command::Release { seq, reply } => releases.push((seq, reply)),
                }
            }
            spacing.held(appends.len());
            if !appends.is_empty() {
                match self.write_group(&buf, &ids) {
                    Ok(()) => {
                        self.series.group(appends.len());
                        self.next_seq += appends.len() as u64;
                        dirty = self.sync != Sync::Always;
                        let seqs: Vec<u64> = appends.iter().map(|(s, _)| *s).collect();
                        if self.sync == Sync::Always {
                            self.stats.durable.store(self.next_seq - 1, Ordering::Release);
                        }
                        self.tracker.acked(&seqs);
                        for (seq, reply) in appends {
                            let _ = reply.send(Ok(seq));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "WAL write failed; the batch is refused");
                        for (_, reply) in appends {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
            if let Sync::Interval(every) = self.sync {
                if dirty && last_sync.elapsed() >= every {
                    match self.sync_data() {
                        Ok(()) => self.stats.durable.store(self.next_seq - 1, Ordering::Release),
                        Err(e) => tracing::error!(error = %e, "WAL fsync failed"),
                    }
                    dirty = false;
                    last_sync = Instant::now();
                }
            }
            for reply in id_syncs {
                let written = self.next_seq.saturating_sub(1);
                let _ = reply.send(self.ids.take_sync().map(|sync| (sync, written)).map_err(|e| WalError::Failed(e.to_string())));
            }
            for (seq, reply) in checkpoints {
                let _ = reply.send(self.checkpoint(seq));
            }
            for (seq, reply) in releases {
                self.stats.hold.fetch_max(seq, Ordering::AcqRel);
                let _ = reply.send(self.prune());
            }
            if let Err(e) = self.rotate_if_full() {
                tracing::error!(error = %e, "WAL segment rotation failed; writing on in the current segment");
            }
        }
        if let Some(mut spares) = self.spares.take() {
            spares.stop();
        }
        if let Some(mut reclaimer) = self.reclaimer.take() {
            reclaimer.stop();
        }
        match self.file.sync_all() {
            Ok(()) => self.stats.durable.store(self.next_seq - 1, Ordering::Release),
            Err(e) => tracing::error!(error = %e, "final WAL fsync failed"),
        }
        if let Err(e) = self.ids.sync() {
            tracing::error!(error = %e, "final id file fsync failed");
        }
    }

    /// Holds the group whose first record is in hand (`spacing.rs`).
    /// First until as many records as the last group held are in hand (a
    /// closed loop's clients are all back), or the hold is out; then, if
    /// arrivals keep coming during a grace, to the hold's end (independent
    /// clients, an open load); else the group is taken at once. A watch
    /// without arrivals ends the first wait too: a closed loop that lost a
    /// client (or a load that stopped) never brings the count back.
    fn wait_out(&self, hold: Hold, rx: &Receiver<Command>) -> Outcome {
        let want = hold.back.saturating_sub(1).max(1);
        self.recall.wait_for(want);
        let mut seen = rx.len();
        let mut watched_from = Instant::now();
        let mut back_at = None;
        let mut silent = false;
        loop {
            let now = Instant::now();
            let queued = rx.len();
            if queued >= want || self.recall.answered() {
                back_at = Some(now);
                break;
            }
            if now >= hold.until {
                break;
            }
            if queued != seen {
                seen = queued;
                watched_from = now;
            }
            let watched_to = watched_from + spacing::watch(hold.since, queued + 1, watched_from);
            if now >= watched_to {
                silent = true;
                break;
            }
            std::thread::park_timeout(hold.until.min(watched_to) - now);
        }
        self.recall.wait_for(0);
        if silent {
            return Outcome::Closed;
        }
        let Some(back_at) = back_at else { return Outcome::Out };
        let grace = spacing::grace(hold, back_at);
        loop {
            let seen = rx.len();
            let left = hold.until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Outcome::Open;
            }
            std::thread::sleep(grace.min(left));
            if rx.len() == seen {
                return Outcome::Closed;
            }
        }
    }

    /// Writes a group's records and (in `fsync` mode) makes them durable, then
    /// appends their ids. Records first: an id on disk whose record is not would
    /// make a client's retry of a lost batch look like a duplicate (and `open`
    /// forgets ids past the last durable record for the same reason). If anything
    /// fails, both are cut back to where the group began.
    fn write_group(&mut self, buf: &[u8], ids: &[(Vec<u128>, i64, u64)]) -> Result<(), WalError> {
        let Some((_, path, size)) = self.segments.last().cloned() else {
            return Err(WalError::Failed("no open segment".into()));
        };
        if self.stats.broken.load(Ordering::Acquire) {
            return Err(WalError::Failed("the WAL could not recover from an earlier write error; restart meterd".into()));
        }
        let written = self.file.write_all_at(buf, size).and_then(|()| if self.sync == Sync::Always { self.sync_data() } else { Ok(()) });
        let mut marks = Vec::new();
        // One write for the whole group's ids (not one per record).
        let result = written
            .map_err(|e| WalError::io(&path, e))
            .and_then(|()| self.ids.append_group(ids, &mut marks).map_err(|e| WalError::Failed(format!("cannot record event ids: {e}"))));
        match result {
            Ok(()) => {
                if let Some(last) = self.segments.last_mut() {
                    last.2 += buf.len() as u64;
                    self.allocated = self.allocated.max(last.2);
                }
                self.stats.bytes.fetch_add(buf.len() as u64, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                self.rollback_ids(&marks);
                // The zeros written ahead go with it: the segment goes on by appending.
                match self.file.set_len(size).and_then(|()| self.file.sync_data()) {
                    Ok(()) => self.allocated = size,
                    Err(cut) => {
                        tracing::error!(error = %cut, path = %path.display(), "cannot cut a failed write off the WAL; refusing further writes");
                        self.stats.broken.store(true, Ordering::Release);
                    }
                }
                Err(e)
            }
        }
    }

    /// `fdatasync` of the open segment, timed.
    fn sync_data(&self) -> std::io::Result<()> {
        let started = Instant::now();
        let synced = self.file.sync_data();
        self.series.synced(started.elapsed().as_secs_f64());
        synced
    }

    /// Cuts a refused group's ids back off, newest first.
    fn rollback_ids(&mut self, marks: &[super::ids::Mark]) {
        for mark in marks.iter().rev() {
            if let Err(e) = self.ids.rollback(*mark) {
                tracing::error!(error = %e, "cannot cut refused ids off an id file; refusing further writes");
                self.stats.broken.store(true, Ordering::Release);
            }
        }
    }

    /// Starts the next segment when this one is full, or earlier when this
    /// one is being appended to (no zeros ahead) and a prepared one is ready.
    fn rotate_if_full(&mut self) -> Result<(), WalError> {
        let Some(&(_, ref path, size)) = self.segments.last() else {
            return Ok(());
        };
        let appending = size >= self.allocated;
        if let Some(spares) = self.spares.as_mut() {
            // Written to in earnest: worth a segment of zeros (asked once).
            if size >= (self.segment_bytes / 8).min(1 << 20) {
                spares.want();
            }
        }
        let early = size > 0 && appending && self.spares.as_ref().is_some_and(Spares::is_ready);
        if size < self.segment_bytes && !early {
            return Ok(());
        }
        // Only the newest segment may end in zeros (the tail reader and the
        // backup take a segment with a newer one beside it as whole): cut them
        // off, durably, before the next segment exists.
        if self.allocated > size {
            self.file.set_len(size).map_err(|e| WalError::io(path, e))?;
            self.allocated = size;
        }
        let started = Instant::now();
        self.file.sync_all().map_err(|e| WalError::io(path, e))?;
        self.series.synced(started.elapsed().as_secs_f64());
        self.stats.durable.store(self.next_seq - 1, Ordering::Release);
        let (path, file, allocated) = self.next_segment()?;
        self.file = file;
        self.allocated = allocated;
        self.segments.push((self.next_seq, path, 0));
        Ok(())
    }

    /// The segment starting at `next_seq`: the prepared file if one is ready
    /// (with its length), else an empty one.
    fn next_segment(&mut self) -> Result<(PathBuf, File, u64), WalError> {
        let path = self.dir.join(segment::name(self.next_seq));
        if let Some(len) = self.spares.as_mut().and_then(|s| s.take_into(&path)) {
            let opened = OpenOptions::new().write(true).open(&path).and_then(|f| checkpoint::sync_dir(&self.dir).map(|()| f));
            match opened {
                Ok(file) => {
                    crate::telemetry::wal_segment_started(true);
                    return Ok((path, file, len));
                }
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "cannot open the prepared WAL segment; starting an empty one");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let (path, file) = Self::open_segment(&self.dir, self.next_seq)?;
        crate::telemetry::wal_segment_started(false);
        Ok((path, file, 0))
    }

    /// Records that the store holds everything up to `seq` (the caller wrote
    /// the checkpoint file already, off this thread), and deletes the segments
    /// nothing needs any more (see [`Writer::prune`]).
    fn checkpoint(&mut self, seq: u64) -> Result<(), WalError> {
        self.stats.checkpoint.fetch_max(seq, Ordering::AcqRel);
        self.prune()?;
        let now = crate::clock::now_ms();
        if let Err(e) = self.ids.expire(now) {
            tracing::warn!(error = %e, "cannot delete expired id files");
        }
        Ok(())
    }

    /// Deletes the segments wholly at or below both the checkpoint (the store
    /// holds them) and the hold (the raw-events export has them), never the
    /// open one.
    fn prune(&mut self) -> Result<(), WalError> {
        let upto = self.stats.checkpoint.load(Ordering::Acquire).min(self.stats.hold.load(Ordering::Acquire));
        while self.segments.len() > 1 {
            let next_first = self.segments[1].0;
            if next_first.saturating_sub(1) > upto {
                break;
            }
            let (first, path, size) = self.segments.remove(0);
            // Reclaimed: its bytes leave the count once the file is gone.
            match &self.reclaimer {
                Some(reclaimer) => reclaimer.reclaim(&self.dir, &path, first, size).map_err(|e| WalError::io(&path, e))?,
                None => {
                    std::fs::remove_file(&path).map_err(|e| WalError::io(&path, e))?;
                    self.stats.bytes.fetch_sub(size, Ordering::AcqRel);
                }
            }
        }
        Ok(())
    }
}
