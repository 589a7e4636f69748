//! A disk run: the ids spilled from the RAM table at one time, sorted and
//! immutable, with its Bloom filter and a sparse index kept in RAM.
//!
//! File `{lo}-{hi}-{seq}.run` (lo/hi: the oldest and newest acceptance minute
//! it holds), written as `*.tmp`, fsynced, renamed, directory fsynced: a run is
//! either whole or absent. Layout, little-endian:
//!
//! | bytes | what |
//! |---|---|
//! | 64 | header: magic, entry count, lo, hi, filter words, index keys, checksum of filter + index, the last WAL record whose ids the spill saw (0: unknown, as in runs written before it was kept), a check of that number (0 for 0; older builds ignore both) |
//! | 16 × count | entries: fingerprint (96 bits) << 32 \| acceptance minute, ascending |
//! | 8 × words | the Bloom filter |
//! | 8 × keys | sparse index: top 64 bits of every `STRIDE`-th entry's fingerprint |
//!
//! Opening reads the header, filter and index only (about 1.4 bytes per id),
//! never the entries: a lookup reads one or two 1 KiB blocks with `pread`.
//! A run may be opened *unfiltered* (its filter left on disk) when the runs'
//! filters would pass their share of `ingest.dedupe_memory`: every lookup then
//! reads the disk (slower, still exact), and only the index stays in RAM
//! (1/8 byte per id).

use super::bloom::Bloom;
use super::table::{slot_minute, slot_tag};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"MDDRUN01";
const HEADER: usize = 64;
const ENTRY: usize = 16;
/// Entries per sparse-index key (one 1 KiB block).
const STRIDE: usize = 64;

/// Why a run could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("dedupe run {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("dedupe run {path} is damaged: {reason}")]
    Damaged { path: String, reason: &'static str },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io { path: path.display().to_string(), source }
}

/// Bytes of a run written between two syncs while it is written.
const SYNC_STEP: usize = 1 << 20;

/// A run's file as it is written: synced every [`SYNC_STEP`] bytes, so that
/// the disk never has more than a step of it queued ahead of the WAL's own
/// `fdatasync` (as `crate::wal::spare` writes a segment ahead). Written whole
/// and then synced, a run of ~70 MB held a concurrent `fdatasync` for 25–62 ms
/// on this project's VM; in 1 MiB steps, 1.4–2.4 ms
/// (`loadtest/probes/delete_stall.py`, BENCHMARKS.md).
struct SyncedSteps {
    file: File,
    unsynced: usize,
    /// Steps synced so far.
    syncs: u64,
}

impl Write for SyncedSteps {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n;
        if self.unsynced >= SYNC_STEP {
            self.file.sync_data()?;
            self.unsynced = 0;
            self.syncs += 1;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// An open run.
#[derive(Debug)]
pub struct Run {
    pub path: PathBuf,
    /// The sequence number in its name (unique within the directory).
    pub seq: u64,
    file: File,
    count: u64,
    /// Oldest and newest acceptance minute held.
    pub lo: u32,
    pub hi: u32,
    /// Every WAL record up to this sequence number had its ids in the table
    /// (or in an older run) when this run was spilled: its ids of minutes up
    /// to `hi` are here or in an older run (0: not known).
    pub wal_upto: u64,
    /// `None`: unfiltered (see above).
    bloom: Option<Bloom>,
    index: Vec<u64>,
}

fn key_of(tag: u128) -> u64 {
    (tag >> 32) as u64
}

/// The check of a run's WAL mark: 0 for 0, so runs written before the mark
/// was kept (zeros there) still check.
fn mix(wal_upto: u64) -> u64 {
    wal_upto.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn checksum(bloom: &[u64], index: &[u64]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for w in bloom.iter().chain(index) {
        h.update(&w.to_le_bytes());
    }
    h.digest()
}

/// Syncs a directory, so a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), RunError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Run {
    /// Writes `slots` (non-empty; sorted here) as run number `seq` in `dir`,
    /// durably, and opens it; `wal_upto` as [`Run::wal_upto`].
    pub fn write(dir: &Path, seq: u64, mut slots: Vec<u128>, keep_filter: bool, wal_upto: u64) -> Result<Run, RunError> {
        slots.sort_unstable();
        let lo = slots.iter().map(|&s| slot_minute(s)).min().unwrap_or(0);
        let hi = slots.iter().map(|&s| slot_minute(s)).max().unwrap_or(0);
        let mut bloom = Bloom::with_keys(slots.len());
        for &s in &slots {
            bloom.insert(slot_tag(s));
        }
        let index: Vec<u64> = slots.iter().step_by(STRIDE).map(|&s| key_of(slot_tag(s))).collect();
        let path = dir.join(format!("{lo:010}-{hi:010}-{seq:016}.run"));
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<File> {
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
            let mut out = BufWriter::with_capacity(SYNC_STEP, SyncedSteps { file, unsynced: 0, syncs: 0 });
            let mut header = [0u8; HEADER];
            header[..8].copy_from_slice(MAGIC);
            header[8..16].copy_from_slice(&(slots.len() as u64).to_le_bytes());
            header[16..20].copy_from_slice(&lo.to_le_bytes());
            header[20..24].copy_from_slice(&hi.to_le_bytes());
            header[24..32].copy_from_slice(&(bloom.words().len() as u64).to_le_bytes());
            header[32..40].copy_from_slice(&(index.len() as u64).to_le_bytes());
            header[40..48].copy_from_slice(&checksum(bloom.words(), &index).to_le_bytes());
            header[48..56].copy_from_slice(&wal_upto.to_le_bytes());
            header[56..64].copy_from_slice(&mix(wal_upto).to_le_bytes());
            out.write_all(&header)?;
            for s in &slots {
                out.write_all(&s.to_le_bytes())?;
            }
            for w in bloom.words().iter().chain(&index) {
                out.write_all(&w.to_le_bytes())?;
            }
            let file = out.into_inner().map_err(|e| e.into_error())?.file;
            file.sync_all()?;
            Ok(file)
        };
        let file = match write() {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io(&tmp)(e));
            }
        };
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&path)(e));
        }
        sync_dir(dir)?;
        let bloom = keep_filter.then_some(bloom);
        Ok(Run { path, seq, file, count: slots.len() as u64, lo, hi, wal_upto, bloom, index })
    }

    /// The newest acceptance minute a run's file name gives (`{lo}-{hi}-{seq}.run`),
    /// read without opening it: an expired run is deleted unread, whole or not
    /// (a backup may have copied one while it was being cut, see `crate::wal::reclaim`).
    pub fn hi_of_name(path: &Path) -> Option<u32> {
        Self::name_parts(path).map(|(_, hi, _)| hi)
    }

    /// The oldest and newest acceptance minutes and the sequence number a
    /// run's file name carries (`{lo}-{hi}-{seq}.run`, as [`Run::write`] names it).
    fn name_parts(path: &Path) -> Option<(u32, u32, u64)> {
        let stem = path.file_stem()?.to_str()?;
        let mut parts = stem.split('-');
        let (lo, hi, seq) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Some((lo.parse().ok()?, hi.parse().ok()?, seq.parse().ok()?))
    }

    /// Opens a run written by [`Run::write`]: reads its header, filter and index
    /// (the filter is checked, and kept only with `keep_filter`).
    pub fn open(path: &Path, keep_filter: bool) -> Result<Run, RunError> {
        let damaged = |reason| RunError::Damaged { path: path.display().to_string(), reason };
        let (_, _, seq) = Self::name_parts(path).ok_or_else(|| damaged("its name is not {lo}-{hi}-{seq}.run"))?;
        let file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let mut header = [0u8; HEADER];
        file.read_exact_at(&mut header, 0).map_err(io(path))?;
        if &header[..8] != MAGIC {
            return Err(damaged("not a dedupe run"));
        }
        let count = u64_at(&header, 8);
        let (lo, hi) = (u32_at(&header, 16), u32_at(&header, 20));
        let (words, keys) = (u64_at(&header, 24), u64_at(&header, 32));
        let tail_at = (HEADER as u64).checked_add(count.checked_mul(ENTRY as u64).ok_or_else(|| damaged("bad count"))?);
        let tail_len = words.checked_add(keys).and_then(|n| n.checked_mul(8));
        let (Some(tail_at), Some(tail_len)) = (tail_at, tail_len) else { return Err(damaged("bad sizes")) };
        if tail_at.checked_add(tail_len) != Some(len) || keys != count.div_ceil(STRIDE as u64) {
            return Err(damaged("its size does not match its header"));
        }
        let mut tail = vec![0u8; usize::try_from(tail_len).map_err(|_| damaged("too large"))?];
        file.read_exact_at(&mut tail, tail_at).map_err(io(path))?;
        let all: Vec<u64> = tail.chunks_exact(8).map(|c| u64_at(c, 0)).collect();
        let (bloom, index) = all.split_at(words as usize);
        if checksum(bloom, index) != u64_at(&header, 40) {
            return Err(damaged("its filter or index fails the checksum"));
        }
        let wal_upto = u64_at(&header, 48);
        if mix(wal_upto) != u64_at(&header, 56) {
            return Err(damaged("its WAL mark fails its check"));
        }
        let bloom = Bloom::from_words(bloom).ok_or_else(|| damaged("bad filter size"))?;
        let bloom = keep_filter.then_some(bloom);
        Ok(Run { path: path.to_path_buf(), seq, file, count, lo, hi, wal_upto, bloom, index: index.to_vec() })
    }

    /// The newest acceptance minute of fingerprint `tag` in this run, if it is here.
    pub fn find(&self, tag: u128) -> Result<Option<u32>, RunError> {
        if self.bloom.as_ref().is_some_and(|b| !b.may_contain(tag)) {
            return Ok(None);
        }
        let key = key_of(tag);
        // Equal keys may start in the block before the first whose key is >= key.
        let first = self.index.partition_point(|&k| k < key).saturating_sub(1);
        let end = self.index.partition_point(|&k| k <= key);
        if end <= first {
            return Ok(None);
        }
        let from = first * STRIDE;
        let to = (end * STRIDE).min(self.count as usize);
        let mut buf = vec![0u8; (to - from) * ENTRY];
        self.file.read_exact_at(&mut buf, (HEADER + from * ENTRY) as u64).map_err(io(&self.path))?;
        let mut found = None;
        for c in buf.chunks_exact(ENTRY) {
            let mut x = [0u8; 16];
            x.copy_from_slice(c);
            let s = u128::from_le_bytes(x);
            if slot_tag(s) == tag {
                found = found.max(Some(slot_minute(s)));
            }
        }
        Ok(found)
    }

    /// Calls `f` with every fingerprint of the run, reading its entries from
    /// disk in 1 MiB pieces (to rebuild the gate).
    pub fn for_each_tag(&self, mut f: impl FnMut(u128)) -> Result<(), RunError> {
        const PIECE: usize = 65_536;
        let mut buf = vec![0u8; PIECE * ENTRY];
        let mut at = 0usize;
        let count = usize::try_from(self.count).unwrap_or(usize::MAX);
        while at < count {
            let n = PIECE.min(count - at);
            let piece = &mut buf[..n * ENTRY];
            self.file.read_exact_at(piece, (HEADER + at * ENTRY) as u64).map_err(io(&self.path))?;
            for c in piece.chunks_exact(ENTRY) {
                let mut x = [0u8; 16];
                x.copy_from_slice(c);
                f(slot_tag(u128::from_le_bytes(x)));
            }
            at += n;
        }
        Ok(())
    }

    /// Starts loading the filter block of `tag` (see [`Bloom::prefetch`]).
    pub fn prefetch(&self, tag: u128) {
        if let Some(b) = &self.bloom {
            b.prefetch(tag);
        }
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of RAM held for this run (filter and index).
    pub fn ram_bytes(&self) -> usize {
        self.bloom.as_ref().map_or(0, Bloom::bytes) + self.index.len() * 8
    }

    /// The same run with its filter dropped from RAM.
    pub fn without_filter(mut self) -> Run {
        self.bloom = None;
        self
    }

    /// Whether the run's filter is in RAM.
    pub fn filtered(&self) -> bool {
        self.bloom.is_some()
    }

    /// Bytes of RAM a filtered run of `ids` ids holds (its filter and index).
    pub fn ram_bytes_for(ids: u64) -> u64 {
        ids.saturating_mul(super::bloom::BITS_PER_KEY as u64).div_ceil(512) * 64 + Self::index_bytes_for(ids)
    }

    /// Bytes of RAM of the index alone for a run of `ids` ids.
    pub fn index_bytes_for(ids: u64) -> u64 {
        ids.div_ceil(STRIDE as u64) * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedupe::table::{slot, tag};

    #[test]
    fn a_run_is_written_synced_a_step_at_a_time() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = tmp.path().join("steps");
        let file = File::create(&path).expect("create");
        let mut out = BufWriter::with_capacity(SYNC_STEP, SyncedSteps { file, unsynced: 0, syncs: 0 });
        let bytes: Vec<u8> = (0..SYNC_STEP * 3 + SYNC_STEP / 2).map(|i| (i % 251) as u8).collect();
        for entry in bytes.chunks(ENTRY) {
            out.write_all(entry).expect("write");
        }
        let steps = out.into_inner().map_err(|e| e.into_error()).expect("flush");
        assert_eq!(steps.syncs, 3, "one sync per whole step written");
        assert!(std::fs::read(&path).expect("read") == bytes, "every byte in order");
    }

    #[test]
    fn writes_opens_and_finds() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ids: Vec<u128> = (0..10_000u64).map(|i| crate::dedupe::hash_id(&format!("r-{i}"))).collect();
        let slots: Vec<u128> = ids.iter().enumerate().map(|(i, &id)| slot(tag(id), 100 + (i % 7) as u32)).collect();
        let run = Run::write(tmp.path(), 1, slots, true, 0).unwrap_or_else(|e| panic!("write: {e}"));
        assert_eq!((run.lo, run.hi, run.len()), (100, 106, 10_000));
        assert_eq!(run.ram_bytes() as u64, Run::ram_bytes_for(10_000));
        let reopened = Run::open(&run.path, true).unwrap_or_else(|e| panic!("open: {e}"));
        // Unfiltered, the same run answers the same from the disk alone.
        let unfiltered = Run::open(&run.path, false).unwrap_or_else(|e| panic!("open: {e}"));
        assert!(reopened.filtered() && !unfiltered.filtered());
        assert_eq!(unfiltered.ram_bytes() as u64, Run::index_bytes_for(10_000));
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(reopened.find(tag(id)).ok().flatten(), Some(100 + (i % 7) as u32));
            assert_eq!(unfiltered.find(tag(id)).ok().flatten(), Some(100 + (i % 7) as u32));
        }
        let strangers_unfiltered =
            (0..10_000u64).filter(|i| unfiltered.find(tag(crate::dedupe::hash_id(&format!("x-{i}")))).ok().flatten().is_some()).count();
        assert_eq!(strangers_unfiltered, 0);
        let strangers =
            (0..10_000u64).filter(|i| run.find(tag(crate::dedupe::hash_id(&format!("x-{i}")))).ok().flatten().is_some()).count();
        assert_eq!(strangers, 0);
        // A damaged filter is refused.
        let len = std::fs::metadata(&run.path).map(|m| m.len()).unwrap_or(0);
        let f = std::fs::OpenOptions::new().write(true).open(&run.path).expect("open for write");
        f.write_all_at(&[0xff; 8], len - 8).expect("damage");
        assert!(matches!(Run::open(&run.path, true), Err(RunError::Damaged { .. })));
        assert!(!tmp.path().join("x.tmp").exists());
    }

    #[test]
    fn the_wal_mark_is_kept_and_checked_and_old_runs_still_open() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let slots = vec![slot(tag(crate::dedupe::hash_id("w")), 7)];
        let run = Run::write(tmp.path(), 1, slots.clone(), true, 123_456).unwrap_or_else(|e| panic!("write: {e}"));
        assert_eq!(Run::open(&run.path, true).map(|r| r.wal_upto).ok(), Some(123_456));
        // A run written before the mark was kept: zeros there.
        let old = Run::write(tmp.path(), 2, slots, true, 0).unwrap_or_else(|e| panic!("write: {e}"));
        assert_eq!(Run::open(&old.path, true).map(|r| r.wal_upto).ok(), Some(0));
        // A damaged mark is refused, not trusted.
        let f = std::fs::OpenOptions::new().write(true).open(&run.path).expect("open for write");
        f.write_all_at(&999_999u64.to_le_bytes(), 48).expect("damage");
        assert!(matches!(Run::open(&run.path, true), Err(RunError::Damaged { .. })));
    }
}
