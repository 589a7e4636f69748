//! Reading the WAL while the writer appends to it: the records above a
//! watermark, in sequence order, straight from the segment files. The
//! raw-events export (`crate::raw_export`) is its reader; replay at start reads
//! whole segments instead (`segment::scan`).
//!
//! Only records at or below a bound the caller gives are returned (the WAL's
//! durable sequence): anything above it may be a write in progress, or one the
//! writer is about to cut off again after a failure (its numbers are reused).
//!
//! **Rotation.** The segment list is read *before* the current segment: a
//! segment with a newer one beside it was complete when the list was read
//! (the writer rotates after a group is written and never writes the old file
//! again), so reading it to its end misses nothing. A segment that is not the
//! newest and ends in bytes that are not a whole, checksummed record is damage,
//! reported as an error; the newest may end in a write in progress, which is
//! simply not read yet.
//!
//! **Gaps.** Sequence numbers above the watermark that no segment holds (a
//! `meterd wal repair` dropped them, or they were deleted while nothing held
//! them) are reported to the caller, which says so; reading goes on after them.

use super::record::{self, checksum, WalBatch, HEADER_LEN, MAX_PAYLOAD};
use super::segment;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Why the WAL could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Segment(#[from] segment::SegmentError),
    #[error("WAL {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("WAL {path} is damaged at byte offset {offset}: {reason}; run `meterd wal verify`")]
    Damaged { path: String, offset: u64, reason: String },
}

/// What one [`Tail::read`] found.
#[derive(Debug, Default)]
pub struct TailRead {
    /// `(seq, batch)` in ascending order, each above the previous read's last.
    pub records: Vec<(u64, WalBatch)>,
    /// Inclusive ranges of sequence numbers skipped because no segment has them.
    pub gaps: Vec<(u64, u64)>,
}

/// A reader's position in the WAL.
#[derive(Debug)]
pub struct Tail {
    dir: PathBuf,
    /// The last sequence returned (or the watermark it started after).
    last: u64,
    /// The segment being read (its first sequence and path) and the offset of
    /// the next record in it; `None` until the first read finds one.
    at: Option<(u64, PathBuf, u64)>,
}

/// What reading one record at an offset found.
enum Frame {
    /// A whole, checksummed record: its sequence, payload, and length on disk.
    Record(u64, Vec<u8>, u64),
    /// Nothing more yet: the end of the file, or a record still being written.
    End,
    /// Bytes that are not a record.
    Bad(String),
}

impl Tail {
    /// A reader of the records above `after` in the WAL directory `dir`.
    pub fn after(dir: &Path, after: u64) -> Tail {
        Tail { dir: dir.to_path_buf(), last: after, at: None }
    }

    /// The last sequence returned (or the starting watermark).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Reads the records above the last one returned and at or below `upto`,
    /// in order, stopping once `max_events` events were read (at least one
    /// record is returned when there is one, whatever its size). After an
    /// error nothing counts as read: the next call starts where this one did.
    pub fn read(&mut self, upto: u64, max_events: usize) -> Result<TailRead, TailError> {
        let last = self.last;
        let read = self.read_inner(upto, max_events);
        if read.is_err() {
            self.last = last;
            self.at = None;
        }
        read
    }

    fn read_inner(&mut self, upto: u64, max_events: usize) -> Result<TailRead, TailError> {
        let mut out = TailRead::default();
        if self.last >= upto {
            return Ok(out);
        }
        // Listed before reading the current segment: see the module docs.
        let segments = segment::list(&self.dir)?;
        let (mut first, mut path, mut offset) = match self.at.take() {
            Some(at) => at,
            None => {
                // The segment holding `last + 1`: the newest starting at or below it,
                // or the oldest if every segment starts above it (a gap).
                let Some((first, path)) = segments.iter().rev().find(|(f, _)| *f <= self.last + 1).or(segments.first()).cloned() else {
                    return Ok(out);
                };
                (first, path, 0)
            }
        };
        let mut events = 0usize;
        loop {
            let mut file = File::open(&path).map_err(|source| TailError::Io { path: path.display().to_string(), source })?;
            loop {
                match read_frame(&mut file, &path, offset)? {
                    Frame::Record(seq, _, _) if seq > upto => {
                        self.at = Some((first, path, offset));
                        return Ok(out);
                    }
                    Frame::Record(seq, payload, len) => {
                        offset += len;
                        if seq <= self.last {
                            continue; // At or below the watermark, in its segment.
                        }
                        if seq > self.last + 1 {
                            out.gaps.push((self.last + 1, seq - 1));
                        }
                        let batch = record::decode(&payload).map_err(|e| TailError::Damaged {
                            path: path.display().to_string(),
                            offset: offset - len,
                            reason: e.to_string(),
                        })?;
                        self.last = seq;
                        events += batch.events.len();
                        out.records.push((seq, batch));
                        if events >= max_events {
                            self.at = Some((first, path, offset));
                            return Ok(out);
                        }
                    }
                    Frame::End | Frame::Bad(_) if !segments.iter().any(|(f, _)| *f > first) => {
                        // The newest segment: the rest is not written yet.
                        self.at = Some((first, path, offset));
                        return Ok(out);
                    }
                    Frame::Bad(reason) => return Err(TailError::Damaged { path: path.display().to_string(), offset, reason }),
                    Frame::End => break,
                }
            }
            // This segment is complete: go on with the next one.
            let Some((next_first, next_path)) = segments.iter().find(|(f, _)| *f > first).cloned() else {
                self.at = Some((first, path, offset));
                return Ok(out);
            };
            (first, path, offset) = (next_first, next_path, 0);
        }
    }
}

/// Reads the record at `offset` of `file`.
fn read_frame(file: &mut File, path: &Path, offset: u64) -> Result<Frame, TailError> {
    let io = |source| TailError::Io { path: path.display().to_string(), source };
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut header = [0u8; HEADER_LEN];
    if !read_full(file, &mut header).map_err(io)? {
        return Ok(Frame::End);
    }
    let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (len, crc) = (word(0) as usize, word(4));
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&header[8..16]);
    let seq = u64::from_le_bytes(seq);
    if len == 0 || len > MAX_PAYLOAD {
        return Ok(Frame::Bad(format!("impossible record length {len}")));
    }
    let mut payload = vec![0u8; len];
    if !read_full(file, &mut payload).map_err(io)? {
        return Ok(Frame::End);
    }
    if checksum(seq, &payload) != crc {
        return Ok(Frame::Bad("checksum mismatch".into()));
    }
    Ok(Frame::Record(seq, payload, (HEADER_LEN + len) as u64))
}

/// Fills `buf`; `false` when the file ends first.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::{encode, frame, BatchBuilder};
    use std::io::Write;

    fn batch(events: usize, tag: i64) -> Vec<u8> {
        let mut b = BatchBuilder::new(1_700_000_000_000 + tag, events);
        for i in 0..events {
            b.push(i as u128, 0, || "c".to_string(), 0, "m", tag, tag, vec![]);
        }
        encode(&b.finish()).map(|v| v.to_vec()).unwrap_or_default()
    }

    /// Writes records `seqs` (each with `events` events) to the segment starting at `first`.
    fn write_segment(dir: &Path, first: u64, seqs: impl IntoIterator<Item = u64>, events: usize) {
        let mut out = Vec::new();
        for seq in seqs {
            frame(&mut out, seq, &batch(events, seq as i64));
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(segment::name(first))).expect("segment");
        f.write_all(&out).expect("write");
    }

    fn seqs(read: &TailRead) -> Vec<u64> {
        read.records.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn reads_in_order_across_segments_up_to_the_bound() {
        let dir = tempfile::tempdir().expect("dir");
        write_segment(dir.path(), 1, 1..=4, 2);
        write_segment(dir.path(), 5, 5..=7, 2);
        let mut tail = Tail::after(dir.path(), 2);
        let r = tail.read(6, usize::MAX).expect("read");
        assert_eq!(seqs(&r), vec![3, 4, 5, 6], "above the watermark, at or below the bound");
        assert!(r.gaps.is_empty());
        assert_eq!(tail.read(6, usize::MAX).expect("read").records.len(), 0, "nothing new below the bound");
        assert_eq!(seqs(&tail.read(100, usize::MAX).expect("read")), vec![7]);
        // Appended later to the newest segment: read from where it stopped.
        write_segment(dir.path(), 5, 8..=9, 2);
        assert_eq!(seqs(&tail.read(100, usize::MAX).expect("read")), vec![8, 9]);
        assert_eq!(tail.last(), 9);
    }

    #[test]
    fn stops_after_max_events_and_resumes() {
        let dir = tempfile::tempdir().expect("dir");
        write_segment(dir.path(), 1, 1..=10, 3);
        let mut tail = Tail::after(dir.path(), 0);
        assert_eq!(seqs(&tail.read(10, 7).expect("read")), vec![1, 2, 3], "stops once 7 events are read");
        assert_eq!(seqs(&tail.read(10, 1).expect("read")), vec![4], "one record at least");
        assert_eq!(seqs(&tail.read(10, usize::MAX).expect("read")), (5..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_record_being_written_is_not_read_yet() {
        let dir = tempfile::tempdir().expect("dir");
        write_segment(dir.path(), 1, 1..=2, 1);
        let mut partial = Vec::new();
        frame(&mut partial, 3, &batch(1, 3));
        let path = dir.path().join(segment::name(1));
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&partial[..partial.len() / 2]).expect("write");
        let mut tail = Tail::after(dir.path(), 0);
        assert_eq!(seqs(&tail.read(3, usize::MAX).expect("read")), vec![1, 2]);
        f.write_all(&partial[partial.len() / 2..]).expect("write");
        assert_eq!(seqs(&tail.read(3, usize::MAX).expect("read")), vec![3]);
    }

    #[test]
    fn gaps_are_reported_and_damage_in_a_finished_segment_is_an_error() {
        let dir = tempfile::tempdir().expect("dir");
        write_segment(dir.path(), 10, 10..=12, 1);
        write_segment(dir.path(), 20, 20..=21, 1);
        // The watermark's segment is gone (deleted while nothing held it).
        let mut tail = Tail::after(dir.path(), 3);
        let r = tail.read(100, usize::MAX).expect("read");
        assert_eq!(seqs(&r), vec![10, 11, 12, 20, 21]);
        assert_eq!(r.gaps, vec![(4, 9), (13, 19)]);

        let bad = tempfile::tempdir().expect("dir");
        write_segment(bad.path(), 1, 1..=3, 1);
        write_segment(bad.path(), 4, 4..=5, 1);
        let path = bad.path().join(segment::name(1));
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let mut tail = Tail::after(bad.path(), 0);
        match tail.read(100, usize::MAX) {
            Err(TailError::Damaged { reason, .. }) => assert!(reason.contains("checksum"), "{reason}"),
            other => panic!("expected damage, got {other:?}"),
        }
        // Records 1 and 2 were read before the damage, but nothing counts as
        // read after an error: once repaired, the next read starts at 1 again.
        assert_eq!(tail.last(), 0);
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).expect("repair");
        assert_eq!(seqs(&tail.read(100, usize::MAX).expect("read")), vec![1, 2, 3, 4, 5]);
    }
}
