//! Event-id deduplication within `ingest.dedupe_window`, exact, in bounded RAM
//! (`ingest.dedupe_memory`).
//!
//! Recent ids live in the RAM [`table`]. When it reaches its share of the
//! budget, housekeeping *spills* the oldest minutes: their ids are written as a
//! sorted, immutable [`run`] file (temp, fsync, rename), its Bloom filter and
//! sparse index are published, and only then are the ids dropped from RAM. A
//! probe looks in the table, then in the runs young enough to matter: an event
//! with an explicit `timestamp` was first accepted no earlier than the timestamp
//! minus the 5 minutes of allowed clock skew, so runs wholly older than that are
//! skipped; an event without one searches every live run. Runs are dropped
//! whole once their newest id has left the window.
//!
//! Only ids whose WAL records are written are spilled (the caller syncs the WAL
//! first, and ids of the last [`SPILL_LAG_MINUTES`] stay in RAM), so a crash
//! never leaves a run holding the id of a lost batch. A spill that fails (disk
//! full) keeps the ids in RAM and, while the table is over budget, ingest is
//! refused ([`Deduper::refusal`], a 503) rather than an id being forgotten.
//!
//! Expired runs leave the disk in steps, on a thread of their own, once no probe
//! reads them any more (`crate::wal::reclaim`): deleting one at once stalled
//! the WAL's syncs.
//!
//! Restart reads each run's header, filter and index, not its ids; the WAL's id
//! files of spilled minutes are deleted once a run holds them, so only the
//! un-spilled tail is loaded back into the table.

pub mod bloom;
pub mod gate;
mod pages;
pub mod run;
pub mod table;

use crate::wal::reclaim::{self, Reclaimer};
use gate::Gate;
use run::{Run, RunError};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use table::{minute_of, tag, Table};

/// A 128-bit id hash.
pub type IdHash = u128;

/// Hashes an event id: one xxh3-128 pass (fixed seed: the hash is stored in
/// the WAL and the id files, so it must not change between runs).
pub fn hash_id(id: &str) -> IdHash {
    xxhash_rust::xxh3::xxh3_128_with_seed(id.as_bytes(), 0x6d65_7465_7264)
}

/// Ids accepted in the last minutes stay in RAM: their batches may still be on
/// their way to the WAL.
pub const SPILL_LAG_MINUTES: u32 = 2;
/// A timestamp may be this far ahead of the time it was received (API.md).
const SKEW_MS: i64 = 5 * 60_000;
/// Id files of minutes at least this far below the spill watermark are deleted:
/// the slack covers a batch slow to reach the WAL.
const ID_FILE_SLACK_MINUTES: u32 = 10;
/// How many ids ahead a batch prefetches the runs' filter blocks.
const RUN_PREFETCH_AHEAD: usize = 4;
/// Worst-case bytes of table per id: 16-byte slots at most half full, doubled
/// while a shard grows.
const TABLE_BYTES_PER_ID: u64 = 64;

/// Why the dedupe store failed.
#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("dedupe directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("id files: {0}")]
    Ids(#[from] crate::wal::ids::IdsError),
}

/// Where and how much: the disk side of a [`Deduper`].
#[derive(Debug, Clone)]
pub struct SpillConfig {
    /// Directory of the runs.
    pub dir: PathBuf,
    /// The WAL's id files, trimmed of spilled minutes (`None`: no WAL).
    pub ids_dir: Option<PathBuf>,
    /// `ingest.dedupe_memory`: RAM for the table, the filters and the indexes.
    pub memory_bytes: u64,
    /// Ids accepted in the last this-many minutes are never spilled
    /// ([`SPILL_LAG_MINUTES`]; tests use 0).
    pub lag_minutes: u32,
    /// Keep the runs found on disk (`false` without a WAL: ids are not kept
    /// across restarts then, as before).
    pub keep_existing: bool,
}

/// The published runs; `version` grows with every spill.
#[derive(Default)]
struct RunSet {
    version: u64,
    runs: Vec<Arc<Run>>,
    /// One filter in front of the covered runs' own (see [`gate`]).
    gate: Option<Arc<Gate>>,
    /// Every run is covered by the gate.
    all_gated: bool,
}

impl RunSet {
    fn new(version: u64, runs: Vec<Arc<Run>>, gate: Option<Arc<Gate>>) -> RunSet {
        let all_gated = gate.as_ref().is_some_and(|g| runs.iter().all(|r| g.covers(r.seq)));
        RunSet { version, runs, gate, all_gated }
    }

    /// Whether the run may hold `t`, given the gate's answer for `t`.
    fn gated_out(&self, run: &Run, gate_says_no: bool) -> bool {
        gate_says_no && (self.all_gated || self.gate.as_ref().is_some_and(|g| g.covers(run.seq)))
    }
}

struct Spill {
    config: SpillConfig,
    runs: RwLock<Arc<RunSet>>,
    /// Newest minute whose ids have all left the table for runs.
    watermark: AtomicU32,
    next_seq: AtomicU64,
    /// The last spill failed: refuse ingest while the table is over budget.
    failing: AtomicBool,
    /// One spill at a time.
    spilling: Mutex<()>,
    /// Spilled ids removed afterwards (a batch refused after its ids were
    /// spilled, which needs a batch slower than [`SPILL_LAG_MINUTES`]).
    revoked: Mutex<HashSet<u128>>,
    has_revoked: AtomicBool,
    /// Set to stop a gate rebuild between runs (shutdown).
    gate_cancel: AtomicBool,
    /// The runs' indexes alone pass the filters' share of the budget: refuse
    /// ingest (see [`Deduper::refusal`]).
    index_full: AtomicBool,
    /// Takes expired runs off the disk a few MiB at a time once their last
    /// prober lets them go (`None`: deleted at once).
    reclaimer: Mutex<Option<Reclaimer>>,
}

impl Spill {
    /// Records whether the indexes of `runs` alone pass the filters' share.
    fn note_index(&self, runs: &[Arc<Run>]) {
        let index: u64 = runs.iter().map(|r| Run::index_bytes_for(r.len())).sum();
        self.index_full.store(index > filter_share(self.config.memory_bytes), Ordering::Release);
    }
}

/// What [`Deduper::restore_batch`] did with the ids it was given.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Of spilled minutes, known to be in a run: not read.
    pub skipped: u64,
    /// Looked up in the runs (found there, or put back).
    pub looked_up: u64,
    /// Put back into the table.
    pub back: u64,
}

impl std::ops::AddAssign for Restored {
    fn add_assign(&mut self, other: Restored) {
        self.skipped += other.skipped;
        self.looked_up += other.looked_up;
        self.back += other.back;
    }
}

/// What a [`Deduper::spill`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpillReport {
    pub ids: usize,
    pub upto_minute: u32,
}

/// Ids accepted within the window: recent ones in RAM, older ones on disk.
pub struct Deduper {
    table: Table,
    window_minutes: u32,
    spill: Option<Spill>,
}

impl Deduper {
    /// A RAM-only deduper (no budget: used without a data directory and in tests).
    pub fn new(window_ms: i64) -> Deduper {
        Deduper { table: Table::new(window_ms), window_minutes: window_minutes(window_ms), spill: None }
    }

    /// A deduper whose older ids go to runs in `config.dir`; opens the runs
    /// found there (deleting leftovers of an interrupted spill and runs wholly
    /// older than the window).
    pub fn open(window_ms: i64, config: SpillConfig, now_ms: i64) -> Result<Deduper, DedupeError> {
        let dir = &config.dir;
        let dir_err = |source| DedupeError::Dir { path: dir.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        let window_minutes = window_minutes(window_ms);
        let now_minute = minute_of(now_ms);
        let mut runs = Vec::new();
        let mut next_seq = 1;
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(dir_err)? {
            let path = entry.map_err(dir_err)?.path();
            // An expired run being cut (left by a stop or a crash) is the
            // reclaimer's, which finishes it in steps.
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let reclaiming = reclaim::is_reclaim_name(file_name);
            if let Some(seq) = reclaim::seq_of_name(file_name) {
                // Named by its run's sequence number: a new run must not reuse it.
                next_seq = next_seq.max(seq.saturating_add(1));
            }
            match path.extension().and_then(|e| e.to_str()) {
                Some("tmp") if !reclaiming => std::fs::remove_file(&path).map_err(dir_err)?,
                Some("run") => paths.push(path),
                _ => {}
            }
        }
        // Newest first (names start with the oldest minute held): the newest
        // runs keep their filters when not all fit the budget.
        paths.sort_unstable_by(|a, b| b.cmp(a));
        let mut filter_room = filter_share(config.memory_bytes);
        for path in paths {
            // Expired by its name, deleted unread: a backup taken while it was
            // being cut holds it short.
            let expired = |hi: u32| hi.saturating_add(window_minutes) < now_minute;
            if !config.keep_existing || Run::hi_of_name(&path).is_some_and(expired) {
                std::fs::remove_file(&path).map_err(dir_err)?;
                continue;
            }
            let run = Run::open(&path, true)?;
            if expired(run.hi) {
                std::fs::remove_file(&path).map_err(dir_err)?;
                continue;
            }
            next_seq = next_seq.max(run.seq + 1);
            let need = run.ram_bytes() as u64;
            let run = if need <= filter_room {
                filter_room -= need;
                run
            } else {
                filter_room = filter_room.saturating_sub(Run::index_bytes_for(run.len()));
                run.without_filter()
            };
            runs.push(Arc::new(run));
        }
        runs.sort_by_key(|r| r.hi);
        let watermark = runs.iter().map(|r| r.hi).max().unwrap_or(0);
        let reclaimer = match Reclaimer::start_named(dir, "meterd-run-recl", Box::new(|_| {})) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "expired dedupe runs will be deleted at once");
                None
            }
        };
        let spill = Spill {
            config,
            reclaimer: Mutex::new(reclaimer),
            // The gate is rebuilt by housekeeping (`rebuild_gate`), not here:
            // a restart does not wait for the runs' entries to be read.
            runs: RwLock::new(Arc::new(RunSet::new(0, runs, None))),
            watermark: AtomicU32::new(watermark),
            next_seq: AtomicU64::new(next_seq),
            failing: AtomicBool::new(false),
            spilling: Mutex::new(()),
            revoked: Mutex::new(HashSet::new()),
            has_revoked: AtomicBool::new(false),
            gate_cancel: AtomicBool::new(false),
            index_full: AtomicBool::new(false),
        };
        spill.note_index(&spill.runs.read().unwrap_or_else(|p| p.into_inner()).runs);
        Ok(Deduper { table: Table::new(window_ms), window_minutes, spill: Some(spill) })
    }

    fn expired(&self, minute: u32, now_minute: u32) -> bool {
        minute.saturating_add(self.window_minutes) < now_minute
    }

    /// Records `id` as accepted at `now_ms`; `false` if it already was (within the
    /// window). Atomic: of two racing callers exactly one gets `true`. A run
    /// that cannot be read counts the id as a duplicate (logged); ingest uses
    /// [`Deduper::admit_batch`], which refuses the batch instead.
    pub fn insert(&self, id: IdHash, now_ms: i64) -> bool {
        // The answer inline: a consume's dedupe allocates nothing (issue 24).
        match self.admit_batch::<smallvec::SmallVec<[bool; 1]>>(&[id], &[], now_ms) {
            Ok(fresh) => fresh.first().copied().unwrap_or(false),
            Err(e) => {
                tracing::error!(error = %e, "a dedupe run could not be read; the id is treated as a duplicate");
                false
            }
        }
    }

    /// [`Deduper::insert`] for a batch, searching the whole window for each id.
    pub fn insert_batch(&self, ids: &[IdHash], now_ms: i64) -> Vec<bool> {
        match self.admit_batch(ids, &[], now_ms) {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::error!(error = %e, "a dedupe run could not be read; the batch is treated as duplicates");
                vec![false; ids.len()]
            }
        }
    }

    /// Records a batch of ids as accepted at `now_ms`, per id whether it is
    /// new. `since_ms[k]`, when given, is the earliest time `ids[k]` could have
    /// been accepted before (its timestamp minus the allowed skew, see
    /// [`Deduper::since_of_timestamp`]); runs wholly older are not searched.
    /// On a run read error nothing of the batch is recorded.
    pub fn admit_batch<C: FromIterator<bool> + AsRef<[bool]>>(
        &self,
        ids: &[IdHash],
        since_ms: &[i64],
        now_ms: i64,
    ) -> Result<C, DedupeError> {
        let Some(spill) = &self.spill else {
            return Ok(self.table.insert_batch_with(ids, now_ms, |_, _, _| false));
        };
        let now_minute = minute_of(now_ms);
        let mut set = spill.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut error = None;
        let fresh: C = self.table.insert_batch_with(ids, now_ms, |k, id, version| {
            if version > set.version {
                set = spill.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
            }
            // The runs' filter blocks of an id a few places ahead: their cache
            // misses overlap instead of adding up, one per run.
            if let Some(&ahead) = ids.get(k + RUN_PREFETCH_AHEAD) {
                let t = tag(ahead);
                if let Some(gate) = &set.gate {
                    gate.prefetch(t);
                }
                if !set.all_gated {
                    let since = since_ms.get(k + RUN_PREFETCH_AHEAD).map_or(0, |&ms| minute_of(ms.max(0)));
                    for run in set.runs.iter().filter(|r| r.hi >= since && !self.expired(r.hi, now_minute)) {
                        run.prefetch(t);
                    }
                }
            }
            let since = since_ms.get(k).map_or(0, |&ms| minute_of(ms.max(0)));
            match self.in_runs(spill, &set, id, since, now_minute) {
                Ok(found) => found,
                Err(e) => {
                    error.get_or_insert(e);
                    true
                }
            }
        });
        if let Some(e) = error {
            for (&id, &f) in ids.iter().zip(fresh.as_ref()) {
                if f {
                    self.table.remove(id);
                }
            }
            return Err(e);
        }
        if spill.has_revoked.load(Ordering::Acquire) {
            let mut revoked = spill.revoked.lock().unwrap_or_else(|p| p.into_inner());
            for (&id, &f) in ids.iter().zip(fresh.as_ref()) {
                if f {
                    revoked.remove(&id);
                }
            }
        }
        Ok(fresh)
    }

    /// The earliest acceptance time of an earlier copy of an event with this
    /// explicit timestamp: a timestamp is at most 5 minutes ahead of receipt.
    pub fn since_of_timestamp(ts_ms: i64) -> i64 {
        ts_ms.saturating_sub(SKEW_MS)
    }

    /// Whether `id` is live in a run of `set` newer than minute `since`.
    fn in_runs(&self, spill: &Spill, set: &RunSet, id: IdHash, since: u32, now_minute: u32) -> Result<bool, DedupeError> {
        if spill.has_revoked.load(Ordering::Acquire) && spill.revoked.lock().unwrap_or_else(|p| p.into_inner()).contains(&id) {
            return Ok(false);
        }
        let t = tag(id);
        let gate_says_no = set.gate.as_ref().is_some_and(|g| !g.may_contain(t));
        if gate_says_no && set.all_gated {
            return Ok(false);
        }
        for run in set.runs.iter().rev() {
            if run.hi < since || self.expired(run.hi, now_minute) || set.gated_out(run, gate_says_no) {
                continue;
            }
            if let Some(minute) = run.find(t)? {
                if !self.expired(minute, now_minute) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Forgets `id` (a batch or consume that was refused and so recorded nothing).
    pub fn remove(&self, id: IdHash) {
        if self.table.remove(id) {
            return;
        }
        if let Some(spill) = &self.spill {
            let set = spill.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
            // Minute 0 as "now": held at all, expired or not.
            if matches!(self.in_runs(spill, &set, id, 0, 0), Ok(true)) {
                spill.revoked.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
                spill.has_revoked.store(true, Ordering::Release);
            }
        }
    }

    /// Puts back ids at start, each `(id, accepted_ms, record_seq)` (from the
    /// id files, or a replayed WAL record with `u64::MAX`), into the table,
    /// except those a run holds already.
    ///
    /// Most need no look at the runs. A spill takes every id the table holds
    /// of the minutes it covers, after the WAL wrote (and synced the ids of)
    /// every record up to some sequence number, which the run keeps
    /// ([`Run::wal_upto`]); an id was in the table from its admission on,
    /// before its record was written. So an id of minute `m` whose record is
    /// at or below the `wal_upto` of a run whose newest minute is `m` or later
    /// was spilled, to that run or an older one: it is skipped when some live
    /// run spans `m` (a run file gone missing leaves its minutes unspanned).
    /// Any other id at or below the watermark — admitted after the spill of
    /// its minute (a clock stepped back), or of an unspanned minute — is
    /// looked up in the runs and put back if absent, as every id once was:
    /// that made a restart read the disk once per id of the ten minutes of id
    /// files kept below the watermark (20 M ids: 40 s, issue 24).
    pub fn restore_batch(&self, entries: &[(IdHash, i64, u64)]) -> Restored {
        let Some(spill) = &self.spill else {
            self.table.insert_each_at(&entries.iter().map(|&(id, at, _)| (id, at)).collect::<Vec<_>>());
            return Restored { back: entries.len() as u64, ..Restored::default() };
        };
        let mut counts = Restored::default();
        let watermark = spill.watermark.load(Ordering::Acquire);
        let set = spill.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Per minute (the entries come minute by minute): whether a run
        // spans it, and the newest WAL mark of the runs reaching it.
        let mut known: Option<(u32, bool, u64)> = None;
        let mut back = Vec::with_capacity(entries.len());
        for &(id, at_ms, seq) in entries {
            let minute = minute_of(at_ms);
            if minute > watermark {
                back.push((id, at_ms));
                continue;
            }
            let (spanned, reached) = match known {
                Some((m, spanned, reached)) if m == minute => (spanned, reached),
                _ => {
                    let spanned = set.runs.iter().any(|r| r.lo <= minute && minute <= r.hi);
                    let reached = set.runs.iter().filter(|r| r.hi >= minute).map(|r| r.wal_upto).max().unwrap_or(0);
                    known = Some((minute, spanned, reached));
                    (spanned, reached)
                }
            };
            if spanned && seq <= reached {
                counts.skipped += 1;
                continue;
            }
            counts.looked_up += 1;
            if !matches!(self.in_runs(spill, &set, id, minute, minute), Ok(true)) {
                back.push((id, at_ms));
            }
        }
        counts.back = back.len() as u64;
        self.table.insert_each_at(&back);
        counts
    }

    /// The first acceptance time (ms) of the minutes not spilled to runs: of
    /// the ids a restart reads back, only those from here on are sure to go
    /// back to RAM (0 without runs).
    pub fn unspilled_from_ms(&self) -> i64 {
        self.spill.as_ref().map_or(0, |s| (i64::from(s.watermark.load(Ordering::Acquire)) + 1) * 60_000)
    }

    /// Makes room in the table at once for `n` ids about to be put back
    /// (a restart), at most the table's share of the budget: the table grows
    /// to its size in one step instead of doubling its way there.
    pub fn reserve(&self, n: u64) {
        let cap = self.spill.as_ref().map_or(usize::MAX, |s| self.table_cap(s));
        self.table.reserve(usize::try_from(n).unwrap_or(usize::MAX).min(cap));
    }

    /// Drops ids older than the window: table entries one by one, runs whole.
    pub fn sweep(&self, now_ms: i64) {
        self.table.sweep(now_ms);
        let Some(spill) = &self.spill else { return };
        let now_minute = minute_of(now_ms);
        let mut guard = spill.runs.write().unwrap_or_else(|p| p.into_inner());
        let (old, live): (Vec<_>, Vec<_>) = guard.runs.iter().cloned().partition(|r| self.expired(r.hi, now_minute));
        if old.is_empty() {
            return;
        }
        // Dropped runs stay in the gate as stale bits until `rebuild_gate`.
        let gate = if live.is_empty() { None } else { guard.gate.clone() };
        spill.note_index(&live);
        *guard = Arc::new(RunSet::new(guard.version, live, gate));
        drop(guard);
        let reclaimer = spill.reclaimer.lock().unwrap_or_else(|p| p.into_inner());
        for run in old {
            let (path, seq) = (run.path.clone(), run.seq);
            // Deleting a run of hundreds of MiB at once stalls the WAL's syncs
            // (`crate::wal::reclaim`): renamed out of view here, cut in steps
            // once the last prober holding it (through its open file) is done.
            let holder = Arc::downgrade(&run) as std::sync::Weak<dyn std::any::Any + Send + Sync>;
            drop(run);
            let gone = match reclaimer.as_ref() {
                Some(r) => r.reclaim_held(&spill.config.dir, &path, seq, 0, Some(holder)),
                None => std::fs::remove_file(&path),
            };
            if let Err(e) = gone {
                tracing::warn!(file = %path.display(), error = %e, "could not delete an expired dedupe run");
            }
        }
        drop(reclaimer);
        if spill.runs.read().unwrap_or_else(|p| p.into_inner()).runs.is_empty() {
            spill.revoked.lock().unwrap_or_else(|p| p.into_inner()).clear();
            spill.has_revoked.store(false, Ordering::Release);
        }
    }

    /// How many ids the table may hold before a spill.
    fn table_cap(&self, spill: &Spill) -> usize {
        let filters = self.run_ram_bytes() as u64;
        let budget = spill.config.memory_bytes.saturating_sub(filters).max(spill.config.memory_bytes / 8);
        usize::try_from(budget / TABLE_BYTES_PER_ID).unwrap_or(usize::MAX).max(1024)
    }

    /// Whether the table is over its share of `dedupe_memory`.
    pub fn needs_spill(&self) -> bool {
        self.spill.as_ref().is_some_and(|s| self.table.len() >= self.table_cap(s))
    }

    /// Moves the oldest ids (at most up to [`SPILL_LAG_MINUTES`] ago) from the
    /// table to a new run, down to half the table's share of the budget. Call
    /// after the WAL has written (and synced the id files of) every record so
    /// far. On an error nothing left RAM and ingest is refused while the table
    /// is over budget; the next spill retries.
    pub fn spill(&self, now_ms: i64, wal_upto: u64) -> Result<SpillReport, DedupeError> {
        let Some(spill) = &self.spill else { return Ok(SpillReport::default()) };
        let _one = spill.spilling.lock().unwrap_or_else(|p| p.into_inner());
        let len = self.table.len();
        let cap = self.table_cap(spill);
        if len < cap {
            spill.failing.store(false, Ordering::Release);
            return Ok(SpillReport::default());
        }
        let limit = minute_of(now_ms).saturating_sub(spill.config.lag_minutes);
        let target = len - cap / 2;
        let mut upto = None;
        let mut moved = 0;
        for (minute, n) in self.table.minutes() {
            if minute > limit {
                break;
            }
            moved += n;
            upto = Some(minute);
            if moved >= target {
                break;
            }
        }
        let Some(upto) = upto else {
            tracing::warn!(
                ids = len,
                cap,
                "the dedupe table is over its memory share with ids of the last minutes only; nothing to spill yet"
            );
            return Ok(SpillReport::default());
        };
        let result = self.spill_upto(spill, upto, wal_upto);
        spill.failing.store(result.is_err(), Ordering::Release);
        result
    }

    /// Spills every id accepted at or before `upto_minute`, whatever the budget
    /// (tests and benches).
    pub fn spill_upto_minute(&self, upto_minute: u32, wal_upto: u64) -> Result<SpillReport, DedupeError> {
        let Some(spill) = &self.spill else { return Ok(SpillReport::default()) };
        let _one = spill.spilling.lock().unwrap_or_else(|p| p.into_inner());
        self.spill_upto(spill, upto_minute, wal_upto)
    }

    fn spill_upto(&self, spill: &Spill, upto: u32, wal_upto: u64) -> Result<SpillReport, DedupeError> {
        let slots = self.table.collect_upto(upto);
        let ids = slots.len();
        if ids == 0 {
            return Ok(SpillReport::default());
        }
        let seq = spill.next_seq.fetch_add(1, Ordering::AcqRel);
        // A gate covering every run with room for these ids takes them too;
        // otherwise the run stays ungated until `rebuild_gate`.
        let current = spill.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
        let gate = match &current.gate {
            Some(g) if current.all_gated && g.has_room(ids as u64) => {
                let mut g = Gate::clone(g);
                for &s in &slots {
                    g.insert(table::slot_tag(s));
                }
                g.cover(seq);
                Some(Arc::new(g))
            }
            other => other.clone(),
        };
        // The run keeps its filter in RAM only while the runs' filters and the
        // gate stay within their share of the budget; past it, lookups in
        // this run read the disk (exact, slower) until older runs expire.
        let held = current.runs.iter().map(|r| r.ram_bytes() as u64).sum::<u64>() + gate.as_ref().map_or(0, |g| g.bytes() as u64);
        let keep_filter = held.saturating_add(Run::ram_bytes_for(ids as u64)) <= filter_share(spill.config.memory_bytes);
        if !keep_filter {
            tracing::warn!(
                ids,
                held_bytes = held,
                dedupe_memory = spill.config.memory_bytes,
                "the dedupe runs' filters fill their share of ingest.dedupe_memory: this run is kept without one \
                 (exact, but its lookups read the disk); raise ingest.dedupe_memory or shorten ingest.dedupe_window"
            );
        }
        drop(current);
        let run = Arc::new(Run::write(&spill.config.dir, seq, slots, keep_filter, wal_upto)?);
        // Publish the run, then let the ids go from RAM: a prober always finds
        // an id in one or the other (see `Table::insert_with`).
        let version = {
            let mut guard = spill.runs.write().unwrap_or_else(|p| p.into_inner());
            let mut runs = guard.runs.clone();
            runs.push(run);
            runs.sort_by_key(|r| r.hi);
            spill.note_index(&runs);
            let version = guard.version + 1;
            *guard = Arc::new(RunSet::new(version, runs, gate));
            version
        };
        spill.watermark.fetch_max(upto, Ordering::AcqRel);
        self.table.drop_upto(upto, version);
        if let Some(ids_dir) = &spill.config.ids_dir {
            let below = i64::from(upto.saturating_sub(ID_FILE_SLACK_MINUTES)) * 60_000;
            crate::wal::ids::drop_before(ids_dir, below)?;
        }
        tracing::info!(ids, upto_minute = upto, "spilled dedupe ids to disk");
        Ok(SpillReport { ids, upto_minute: upto })
    }

    /// The gate's size for the live runs, if it fits the budget beside their
    /// own filters and indexes (three quarters of `dedupe_memory` at most, so
    /// the table keeps a share).
    fn gate_capacity(&self, spill: &Spill, runs: &[Arc<Run>]) -> Option<u64> {
        let live: u64 = runs.iter().map(|r| r.len()).sum();
        let capacity = live + live / 2 + 1024;
        let own: u64 = runs.iter().map(|r| r.ram_bytes() as u64).sum();
        (own + Gate::bytes_for(capacity) <= spill.config.memory_bytes / 4 * 3).then_some(capacity)
    }

    /// Whether [`Deduper::rebuild_gate`] has work: a live run the gate does not
    /// cover (a restart, a full gate), or more stale fingerprints than live ones.
    pub fn needs_gate(&self) -> bool {
        let Some(spill) = &self.spill else { return false };
        let set = spill.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
        if set.runs.is_empty() || self.gate_capacity(spill, &set.runs).is_none() {
            return false;
        }
        let live: u64 = set.runs.iter().map(|r| r.len()).sum();
        match &set.gate {
            None => true,
            Some(g) => !set.all_gated || g.inserted() > 2 * live + 1024,
        }
    }

    /// Builds the gate anew from the live runs' entries on disk (a sequential
    /// read of 16 bytes per spilled id) and publishes it. Spills go on
    /// meanwhile; runs they add are read in at the end, with spills held off.
    /// Returns the fingerprints inserted (0: none built: over budget, or
    /// cancelled by [`Deduper::cancel_gate`]). One caller at a time.
    pub fn rebuild_gate(&self) -> Result<u64, DedupeError> {
        let Some(spill) = &self.spill else { return Ok(0) };
        let set = spill.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(capacity) = self.gate_capacity(spill, &set.runs) else { return Ok(0) };
        let mut gate = Gate::with_capacity(capacity);
        for run in &set.runs {
            if spill.gate_cancel.load(Ordering::Acquire) {
                return Ok(0);
            }
            run.for_each_tag(|t| gate.insert(t))?;
            gate.cover(run.seq);
        }
        let _one = spill.spilling.lock().unwrap_or_else(|p| p.into_inner());
        let now = spill.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
        let missing: Vec<Arc<Run>> = now.runs.iter().filter(|r| !gate.covers(r.seq)).cloned().collect();
        for run in missing {
            if !gate.has_room(run.len()) {
                break; // left ungated: the next upkeep rebuilds bigger
            }
            run.for_each_tag(|t| gate.insert(t))?;
            gate.cover(run.seq);
        }
        let inserted = gate.inserted();
        let gate = Arc::new(gate);
        let mut guard = spill.runs.write().unwrap_or_else(|p| p.into_inner());
        // Runs swept meanwhile are gone from `guard`; none were added (spills wait).
        *guard = Arc::new(RunSet::new(guard.version, guard.runs.clone(), (!guard.runs.is_empty()).then_some(gate)));
        Ok(inserted)
    }

    /// Stops a running [`Deduper::rebuild_gate`] at its next run (shutdown).
    pub fn cancel_gate(&self) {
        if let Some(spill) = &self.spill {
            spill.gate_cancel.store(true, Ordering::Release);
        }
    }

    /// Stops the thread deleting expired runs, within one of its steps
    /// (shutdown); a run not yet gone is finished by the next start.
    pub fn stop_reclaiming(&self) {
        if let Some(spill) = &self.spill {
            if let Some(mut reclaimer) = spill.reclaimer.lock().unwrap_or_else(|p| p.into_inner()).take() {
                reclaimer.stop();
            }
        }
    }

    /// Why ingest must be refused now: the table is over budget and its ids
    /// cannot be spilled.
    pub fn refusal(&self) -> Option<String> {
        let spill = self.spill.as_ref()?;
        if spill.index_full.load(Ordering::Acquire) {
            return Some(
                "the event ids of ingest.dedupe_window no longer fit ingest.dedupe_memory, even with their filters on disk: \
                 raise ingest.dedupe_memory or shorten ingest.dedupe_window"
                    .to_string(),
            );
        }
        (spill.failing.load(Ordering::Acquire) && self.table.len() >= self.table_cap(spill))
            .then(|| "event ids cannot be spilled to disk (is the disk full?) and ingest.dedupe_memory is used up".to_string())
    }

    /// Number of ids remembered in RAM.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids held in disk runs (some may have expired within a live run).
    pub fn spilled(&self) -> u64 {
        self.runs().iter().map(|r| r.len()).sum()
    }

    fn runs(&self) -> Vec<Arc<Run>> {
        self.spill.as_ref().map(|s| s.runs.read().unwrap_or_else(|p| p.into_inner()).runs.clone()).unwrap_or_default()
    }

    /// Bytes of RAM for ids: the table's slots plus the runs' filters and indexes.
    pub fn ram_bytes(&self) -> usize {
        self.table.bytes() + self.run_ram_bytes()
    }

    /// Bytes of RAM of the table alone.
    pub fn table_bytes(&self) -> usize {
        self.table.bytes()
    }

    /// The runs' filters and indexes, and the gate.
    fn run_ram_bytes(&self) -> usize {
        let Some(spill) = &self.spill else { return 0 };
        let set = spill.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
        set.runs.iter().map(|r| r.ram_bytes()).sum::<usize>() + set.gate.as_ref().map_or(0, |g| g.bytes())
    }

    /// The directory of the runs, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.spill.as_ref().map(|s| s.config.dir.as_path())
    }
}

/// The part of `ingest.dedupe_memory` the runs' filters and indexes and the
/// gate may use; the rest (at least 1/8) is the table's.
fn filter_share(memory_bytes: u64) -> u64 {
    memory_bytes - memory_bytes / 8
}

fn window_minutes(window_ms: i64) -> u32 {
    u32::try_from(window_ms.div_euclid(60_000).max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
