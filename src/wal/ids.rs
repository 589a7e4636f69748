//! Id files: the ids of accepted events, so deduplication survives restarts for
//! the whole `dedupe_window`, not just for the records the WAL still replays.
//!
//! The WAL writer appends each record's id hashes to `ids/{start_ms}.m10.ids`
//! (one file per 10 minutes; `{hour_start_ms}.ids` hourly files of earlier
//! versions are still read)
//! (28 bytes an entry: the 128-bit hash, the acceptance minute, and the WAL
//! sequence of the record, so a repair can forget the ids of records it had to
//! drop) when it writes
//! the record, without an fsync of its own. Before the usage store takes a flush
//! (after which the record may leave the WAL), the flusher has the writer fsync
//! the id files, so every id whose record is gone from the WAL is on disk. On
//! start, files younger than the window are loaded. Files older than the window
//! (plus an hour) are deleted. A torn last entry (a crash mid-append) is ignored.
//! Files whose ids the dedupe has spilled to its disk runs are deleted early
//! ([`drop_before`], ten minutes of slack below the spilled minutes), so a
//! restart reads the un-spilled tail and that slack, whose spilled ids it skips
//! (`crate::dedupe::Deduper::restore_batch`). Files are read a piece at a time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Bytes per entry.
pub const ENTRY: usize = 28;
const HOUR_MS: i64 = 3_600_000;
/// Span of the files written now.
const FILE_MS: i64 = 600_000;

/// Why an id file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    #[error("id file {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> IdsError + '_ {
    move |source| IdsError::Io { path: path.display().to_string(), source }
}

/// One entry per id: hash, acceptance minute, record sequence (little-endian).
fn encode(buf: &mut Vec<u8>, ids: &[u128], accepted_ms: i64, seq: u64) {
    let minute = u32::try_from(accepted_ms.div_euclid(60_000)).unwrap_or(u32::MAX);
    buf.reserve(ids.len() * ENTRY);
    for id in ids {
        buf.extend_from_slice(&id.to_le_bytes());
        buf.extend_from_slice(&minute.to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
    }
}

/// Where an id file stood before an append, to cut a refused group back off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    hour: i64,
    len: u64,
}

/// The appender the WAL writer owns.
/// Id files written since the last sync, to be made durable with [`IdSync::run`].
#[derive(Debug)]
pub struct IdSync {
    /// Each file's path, and a handle on it when it is the open one.
    files: Vec<(PathBuf, Option<File>)>,
}

impl IdSync {
    /// Makes the files durable.
    pub fn run(self) -> Result<(), IdsError> {
        for (path, open) in self.files {
            match open {
                Some(file) => file.sync_data().map_err(io(&path))?,
                // Gone: deleted by `drop_before`, its ids are in a dedupe run.
                None => match File::open(&path).and_then(|f| f.sync_all()) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    r => r.map_err(io(&path))?,
                },
            }
        }
        Ok(())
    }
}

pub struct IdLog {
    dir: PathBuf,
    /// The open hour file and its length.
    open: Option<(i64, File, u64)>,
    /// Files written since the last sync.
    dirty: Vec<i64>,
    window_ms: i64,
}

impl IdLog {
    pub fn new(dir: PathBuf, window_ms: i64) -> Result<IdLog, IdsError> {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(IdLog { dir, open: None, dirty: Vec::new(), window_ms })
    }

    fn path(&self, start: i64) -> PathBuf {
        self.dir.join(format!("{start}.m10.ids"))
    }

    /// Appends ids accepted at `accepted_ms` (no fsync); returns where the file
    /// stood before, for [`IdLog::rollback`].
    pub fn append(&mut self, ids: &[u128], accepted_ms: i64, seq: u64) -> Result<Mark, IdsError> {
        let mut buf = Vec::with_capacity(ids.len() * ENTRY);
        encode(&mut buf, ids, accepted_ms, seq);
        self.write(accepted_ms.div_euclid(FILE_MS) * FILE_MS, &buf)
    }

    /// Appends the ids of a group of records `(ids, accepted_ms, seq)` with one
    /// write per hour file (one, unless the group spans an hour's end), pushing
    /// a mark per write onto `marks`; on an error, `marks` holds those of the
    /// writes that succeeded, for [`IdLog::rollback`].
    pub fn append_group(&mut self, records: &[(Vec<u128>, i64, u64)], marks: &mut Vec<Mark>) -> Result<(), IdsError> {
        let hour_of = |ms: i64| ms.div_euclid(FILE_MS) * FILE_MS;
        let mut buf = Vec::new();
        let mut start = 0;
        while start < records.len() {
            let hour = hour_of(records[start].1);
            let end = records[start..].iter().position(|r| hour_of(r.1) != hour).map_or(records.len(), |n| start + n);
            buf.clear();
            for (ids, accepted_ms, seq) in &records[start..end] {
                encode(&mut buf, ids, *accepted_ms, *seq);
            }
            marks.push(self.write(hour, &buf)?);
            start = end;
        }
        Ok(())
    }

    /// Appends encoded entries to the file of `hour` (opening it if needed).
    fn write(&mut self, hour: i64, buf: &[u8]) -> Result<Mark, IdsError> {
        if self.open.as_ref().map(|(h, _, _)| *h) != Some(hour) {
            let path = self.path(hour);
            let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
            // A crash mid-append may have left a partial entry: cut it, or every
            // later entry would be read misaligned.
            let len = file.metadata().map_err(io(&path))?.len();
            let whole = len - len % ENTRY as u64;
            if whole != len {
                file.set_len(whole).map_err(io(&path))?;
            }
            self.open = Some((hour, file, whole));
        }
        let Some((_, file, len)) = self.open.as_mut() else {
            let path = self.path(hour);
            return Err(IdsError::Io { path: path.display().to_string(), source: std::io::Error::other("no open id file") });
        };
        let mark = Mark { hour, len: *len };
        if let Err(e) = file.write_all(buf) {
            let _ = file.set_len(mark.len);
            let path = self.path(hour);
            return Err(io(&path)(e));
        }
        *len += buf.len() as u64;
        if !self.dirty.contains(&hour) {
            self.dirty.push(hour);
        }
        Ok(mark)
    }

    /// Cuts the ids appended since `mark` back off (their group was refused).
    pub fn rollback(&mut self, mark: Mark) -> Result<(), IdsError> {
        let path = self.path(mark.hour);
        match self.open.as_mut() {
            Some((hour, file, len)) if *hour == mark.hour => {
                file.set_len(mark.len).map_err(io(&path))?;
                *len = mark.len;
                Ok(())
            }
            _ => OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(mark.len)).map_err(io(&path)),
        }
    }

    /// Makes every id appended so far durable.
    pub fn sync(&mut self) -> Result<(), IdsError> {
        self.take_sync()?.run()
    }

    /// What [`IdLog::sync`] would sync, to be synced by another thread (issue
    /// 24: the WAL writer hands this out rather than stall every append behind
    /// the fsyncs). Everything written so far is covered: the open file's
    /// handle is a duplicate of this one's.
    pub fn take_sync(&mut self) -> Result<IdSync, IdsError> {
        let mut files = Vec::new();
        for hour in std::mem::take(&mut self.dirty) {
            let path = self.path(hour);
            let open = match &self.open {
                Some((h, file, _)) if *h == hour => Some(file.try_clone().map_err(io(&path))?),
                _ => None,
            };
            files.push((path, open));
        }
        Ok(IdSync { files })
    }

    /// Deletes files wholly older than the window (and an hour of slack).
    pub fn expire(&mut self, now_ms: i64) -> Result<(), IdsError> {
        let cutoff = now_ms - self.window_ms - HOUR_MS;
        for (start, span, path) in list(&self.dir)? {
            if start + span < cutoff && self.open.as_ref().map(|(h, _, _)| *h) != Some(start) {
                remove(&path)?;
            }
        }
        Ok(())
    }
}

/// Deletes a file; one already gone is fine.
fn remove(path: &Path) -> Result<(), IdsError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// Deletes the files holding only ids accepted before `before_ms` (the dedupe
/// has them in its disk runs); returns how many were deleted.
pub fn drop_before(dir: &Path, before_ms: i64) -> Result<usize, IdsError> {
    let mut n = 0;
    for (start, span, path) in list(dir)? {
        if start + span <= before_ms {
            remove(&path)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Id files in `dir`: (start, span, path), by start.
fn list(dir: &Path) -> Result<Vec<(i64, i64, PathBuf)>, IdsError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".ids")) else { continue };
        let (start, span) = match stem.strip_suffix(".m10") {
            Some(start) => (start, FILE_MS),
            None => (stem, HOUR_MS),
        };
        if let Ok(start) = start.parse::<i64>() {
            out.push((start, span, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// One entry: (id, accepted_ms, seq).
fn entry(bytes: &[u8]) -> (u128, i64, u64) {
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[..16]);
    let mut minute = [0u8; 4];
    minute.copy_from_slice(&bytes[16..20]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[20..28]);
    (u128::from_le_bytes(id), i64::from(u32::from_le_bytes(minute)) * 60_000, u64::from_le_bytes(seq))
}

/// Calls `each(id, accepted_ms, record_seq)` for every id accepted within
/// `window_ms` of `now_ms`; returns how many were read.
pub fn load(dir: &Path, now_ms: i64, window_ms: i64, mut each: impl FnMut(u128, i64, u64)) -> Result<u64, IdsError> {
    let mut n = 0;
    for (start, span, path) in list(dir)? {
        if start + span < now_ms - window_ms {
            continue;
        }
        for_each_entry(&path, |chunk| {
            let (id, at, seq) = entry(chunk);
            each(id, at, seq);
            n += 1;
        })?;
    }
    Ok(n)
}

/// How many entries [`load`] would read (by the files' sizes) from the files
/// that reach past `from_ms`: a bound on the ids a restart puts back in RAM,
/// known before reading any.
pub fn count(dir: &Path, now_ms: i64, window_ms: i64, from_ms: i64) -> Result<u64, IdsError> {
    let mut n = 0;
    for (start, span, path) in list(dir)? {
        if start + span < now_ms - window_ms || start + span <= from_ms {
            continue;
        }
        n += std::fs::metadata(&path).map_err(io(&path))?.len() / ENTRY as u64;
    }
    Ok(n)
}

/// Bytes read from an id file at a time (whole entries, about 1 MiB).
const PIECE: usize = ENTRY * 37_449;

/// Calls `f` with every whole entry of the file at `path` (a torn last one is
/// left out), reading it a piece at a time: a file holds ten minutes of ids,
/// 17 GB at a million events a second, so it is never read whole.
fn for_each_entry(path: &Path, mut f: impl FnMut(&[u8])) -> Result<(), IdsError> {
    let mut file = File::open(path).map_err(io(path))?;
    let mut buf = vec![0u8; PIECE];
    let mut filled = 0;
    loop {
        let n = match file.read(&mut buf[filled..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(path)(e)),
        };
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let whole = filled - filled % ENTRY;
        buf[..whole].chunks_exact(ENTRY).for_each(&mut f);
        buf.copy_within(whole..filled, 0);
        filled -= whole;
    }
}

/// Removes the ids of records whose sequence lies in one of `ranges`
/// (inclusive): those records were lost, so their events may be sent again.
/// Returns how many ids were forgotten. A file is read once to count them and
/// rewritten (a piece at a time) only if it holds any.
pub fn forget(dir: &Path, ranges: &[(u64, u64)]) -> Result<u64, IdsError> {
    let lost = |chunk: &[u8]| {
        let (_, _, seq) = entry(chunk);
        ranges.iter().any(|&(a, b)| a <= seq && seq <= b)
    };
    let mut forgotten = 0;
    for (_, _, path) in list(dir)? {
        let mut here = 0;
        for_each_entry(&path, |chunk| here += u64::from(lost(chunk)))?;
        if here == 0 {
            continue;
        }
        forgotten += here;
        let tmp = path.with_extension("tmp");
        let mut out = std::io::BufWriter::with_capacity(PIECE, File::create(&tmp).map_err(io(&tmp))?);
        let mut written = Ok(());
        for_each_entry(&path, |chunk| {
            if written.is_ok() && !lost(chunk) {
                written = out.write_all(chunk);
            }
        })?;
        written.and_then(|()| out.into_inner().map_err(|e| e.into_error())).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    Ok(forgotten)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    /// An id log with a DAY's window in a temp dir (kept alive by the first).
    fn day_log() -> (tempfile::TempDir, PathBuf, IdLog) {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("ids");
        let log = IdLog::new(dir.clone(), DAY).unwrap_or_else(|e| panic!("open the id log: {e}"));
        (tmp, dir, log)
    }

    #[test]
    fn appends_loads_and_expires() {
        let (_tmp, dir, mut log) = day_log();
        let t0 = 100 * DAY;
        assert!(log.append(&[1, 2, 3], t0, 1).is_ok());
        assert!(log.append(&[4], t0 + 2 * HOUR_MS, 2).is_ok());
        assert!(log.sync().is_ok());
        let mut seen = Vec::new();
        let n = load(&dir, t0 + 3 * HOUR_MS, DAY, |id, at, _| seen.push((id, at))).unwrap_or(0);
        assert_eq!(n, 4);
        assert_eq!(seen[0], (1, t0));
        assert_eq!(seen[3], (4, t0 + 2 * HOUR_MS));
        // A torn last entry is ignored, and cut when the file is appended to again.
        drop(log);
        let torn = dir.join(format!("{}.m10.ids", t0 + 2 * HOUR_MS));
        OpenOptions::new().append(true).open(&torn).and_then(|mut f| f.write_all(&[9; 7])).expect("tear the last entry");
        assert_eq!(load(&dir, t0, DAY, |_, _, _| {}).unwrap_or(0), 4);
        // Counted by size before reading: whole entries of the files reaching
        // past the given time (the second file only, from an hour on).
        assert_eq!(count(&dir, t0, DAY, 0).unwrap_or(0), 4);
        assert_eq!(count(&dir, t0, DAY, t0 + HOUR_MS).unwrap_or(0), 1);
        assert_eq!(count(&dir, t0, DAY, t0 + 3 * HOUR_MS).unwrap_or(99), 0);
        assert_eq!(count(&dir, t0 + 3 * DAY, DAY, 0).unwrap_or(99), 0, "past the window");
        let mut log = IdLog::new(dir.clone(), DAY).unwrap_or_else(|e| panic!("open the id log: {e}"));
        let mark = log.append(&[5], t0 + 2 * HOUR_MS, 3);
        let mut seen = Vec::new();
        load(&dir, t0, DAY, |id, _, _| seen.push(id)).unwrap_or_else(|e| panic!("load: {e}"));
        assert_eq!(seen, vec![1, 2, 3, 4, 5], "the new entry is aligned");
        // A rollback removes what a refused group appended.
        let mark2 = log.append(&[6, 7], t0 + 2 * HOUR_MS, 4).unwrap_or_else(|e| panic!("append: {e}"));
        assert!(log.rollback(mark2).is_ok());
        assert_eq!(load(&dir, t0, DAY, |_, _, _| {}).unwrap_or(0), 5);
        assert!(mark.is_ok());
        // Past the window, loading skips and expiry deletes the old file.
        assert_eq!(load(&dir, t0 + 3 * DAY, DAY, |_, _, _| {}).unwrap_or(99), 0);
        assert!(log.expire(t0 + 3 * DAY).is_ok());
        assert_eq!(list(&dir).map(|l| l.len()).unwrap_or(99), 1, "only the open file is kept");
        // Forgetting the ids of records 2..=3 (a repair dropped them).
        drop(log);
        assert_eq!(forget(&dir, &[(2, 3)]).unwrap_or(0), 2);
        let mut left = Vec::new();
        load(&dir, t0, DAY, |id, _, _| left.push(id)).unwrap_or_else(|e| panic!("load: {e}"));
        assert!(left.is_empty(), "ids 4 and 5 (records 2, 3) forgotten: {left:?}");
    }

    #[test]
    fn spilled_files_are_dropped_and_old_hourly_files_still_read() {
        let (_tmp, dir, mut log) = day_log();
        let t0 = 100 * DAY;
        // Ten-minute files at t0, t0+10m, t0+20m.
        for k in 0..3 {
            assert!(log.append(&[k as u128 + 1], t0 + k * FILE_MS, k as u64 + 1).is_ok());
        }
        // An hourly file of an earlier version, an hour before.
        std::fs::write(dir.join(format!("{}.ids", t0 - HOUR_MS)), {
            let mut b = Vec::new();
            encode(&mut b, &[9], t0 - HOUR_MS + 5 * 60_000, 0);
            b
        })
        .expect("old file");
        assert!(log.sync().is_ok());
        let mut seen = Vec::new();
        load(&dir, t0 + HOUR_MS, DAY, |id, _, _| seen.push(id)).unwrap_or_else(|e| panic!("load: {e}"));
        assert_eq!(seen, vec![9, 1, 2, 3]);
        // Spilled up to t0+20m: the old hourly file (ends at t0) and the first two
        // ten-minute files go; the one holding t0+20m stays.
        assert_eq!(drop_before(&dir, t0 + 2 * FILE_MS).unwrap_or(0), 3);
        let mut seen = Vec::new();
        load(&dir, t0 + HOUR_MS, DAY, |id, _, _| seen.push(id)).unwrap_or_else(|e| panic!("load: {e}"));
        assert_eq!(seen, vec![3]);
        // A sync after a dirty file was dropped is fine.
        assert!(log.append(&[4], t0 + 2 * FILE_MS, 4).is_ok());
        assert!(log.sync().is_ok());
    }

    #[test]
    fn a_group_is_one_write_per_hour_and_rolls_back_whole() {
        let (_tmp, dir, mut log) = day_log();
        let t0 = 100 * DAY + HOUR_MS - 1;
        // Three records, the last past the hour's end: two writes, two marks.
        let group = vec![(vec![1, 2], t0, 1), (vec![3], t0, 2), (vec![4, 5], t0 + 1, 3)];
        let mut marks = Vec::new();
        assert!(log.append_group(&group, &mut marks).is_ok());
        assert_eq!(marks.len(), 2);
        let mut seen = Vec::new();
        load(&dir, t0 + 1, DAY, |id, at, _| seen.push((id, at))).unwrap_or_else(|e| panic!("load: {e}"));
        seen.sort();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!((seen[0].1, seen[3].1), (t0 + 1 - 60_000, t0 + 1), "entries keep their own minute");
        // Rolling both marks back (newest first) removes the group.
        for m in marks.iter().rev() {
            assert!(log.rollback(*m).is_ok());
        }
        assert_eq!(load(&dir, t0 + 1, DAY, |_, _, _| {}).unwrap_or(99), 0);
    }

    #[test]
    fn files_larger_than_a_piece_are_read_and_rewritten_whole_entry_by_entry() {
        let (_tmp, dir, mut log) = day_log();
        let t0 = 100 * DAY;
        // Two and a half pieces' worth, one record per 1,000 ids.
        let n = (PIECE / ENTRY) as u128 * 5 / 2;
        let ids: Vec<u128> = (0..n).collect();
        for (k, chunk) in ids.chunks(1_000).enumerate() {
            assert!(log.append(chunk, t0, k as u64 + 1).is_ok());
        }
        assert!(log.sync().is_ok());
        drop(log);
        // A torn last entry.
        let file = dir.join(format!("{t0}.m10.ids"));
        OpenOptions::new().append(true).open(&file).and_then(|mut f| f.write_all(&[7; 11])).expect("tear");
        let mut seen = Vec::new();
        assert_eq!(load(&dir, t0, DAY, |id, _, seq| seen.push((id, seq))).unwrap_or(0), n as u64);
        assert!(seen.iter().enumerate().all(|(i, &(id, seq))| id == i as u128 && seq == i as u64 / 1_000 + 1));
        // Records 2 and 40..=60 lost: their ids go, the rest stay in order.
        let lost = |seq: u64| seq == 2 || (40..=60).contains(&seq);
        let expect: Vec<u128> = seen.iter().filter(|&&(_, seq)| !lost(seq)).map(|&(id, _)| id).collect();
        assert_eq!(forget(&dir, &[(2, 2), (40, 60)]).unwrap_or(0), (n as usize - expect.len()) as u64);
        let mut left = Vec::new();
        assert!(load(&dir, t0, DAY, |id, _, _| left.push(id)).is_ok());
        assert_eq!(left, expect);
        assert_eq!(forget(&dir, &[(2, 2)]).unwrap_or(99), 0, "nothing left to forget: the file is not rewritten");
    }
}
