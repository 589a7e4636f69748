//! Segment files: `wal/{first_seq:020}.wal`, each a run of framed records with
//! consecutive sequence numbers, then possibly zeros written ahead of them
//! (`spare.rs`: the *padding*, which the next records overwrite). Reading a
//! segment tells a torn tail (a crash in the middle of the last write: an
//! incomplete record, a bad one with nothing valid after it, or a bad one
//! holding a sector the disk never wrote) from corruption (a bad record
//! followed by more data), because the first may be truncated safely and the
//! second must stop the start.
//!
//! **Power loss.** A group's records overwrite zeros (or extend the file) and
//! are acknowledged only once synced; a power cut before the sync may keep any
//! subset of the group's sectors. The newest segment can then read "records,
//! a lost sector (zeros), more of the unsynced group, zeros". Everything from
//! the first bad record on was never synced, so when that record spans a
//! sector that reads as zeros from the record's start (or the sector's) to
//! the sector's end, it is the tear, not damage: the rest is cut off with it.
//! (etcd's WAL reads a torn write the same way.) A bad record with no zero
//! sector in it is still corruption.

use super::record::{checksum, HEADER_LEN, MAX_PAYLOAD};
use std::path::{Path, PathBuf};

/// Why a segment could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("WAL {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("WAL {path} is corrupt at byte offset {offset}: {reason}; stop meterd and run `meterd wal verify` / `meterd wal repair`")]
    Corrupt { path: String, offset: u64, reason: String },
}

/// One record read from a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub seq: u64,
    pub offset: u64,
    pub payload: Vec<u8>,
}

/// What reading a segment found.
#[derive(Debug, Default)]
pub struct SegmentScan {
    pub records: Vec<RawRecord>,
    /// Where a torn tail starts, and why, if the segment ends with one.
    pub torn_at: Option<(u64, String)>,
    /// Length of the valid prefix.
    pub valid_len: u64,
    /// Zeros after the last record, from `valid_len` to the end: space written
    /// ahead for the next records, not damage.
    pub padding: u64,
}

/// The file name of the segment starting at `first_seq`.
pub fn name(first_seq: u64) -> String {
    format!("{first_seq:020}.wal")
}

/// Segments in `dir`, sorted by first sequence number.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SegmentError> {
    let io = |source| SegmentError::Io { path: dir.display().to_string(), source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let file = entry.file_name();
        let Some(stem) = file.to_str().and_then(|n| n.strip_suffix(".wal")) else {
            continue;
        };
        if let Ok(first) = stem.parse::<u64>() {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every record of a segment. `is_last` says whether a bad end may be a
/// torn tail (only the newest segment can be mid-write during a crash).
pub fn scan(path: &Path, is_last: bool) -> Result<SegmentScan, SegmentError> {
    let bytes = std::fs::read(path).map_err(|source| SegmentError::Io { path: path.display().to_string(), source })?;
    scan_bytes(&bytes, path, is_last)
}

/// [`scan`] over bytes already read.
pub fn scan_bytes(bytes: &[u8], path: &Path, is_last: bool) -> Result<SegmentScan, SegmentError> {
    let mut scan = SegmentScan::default();
    let mut at = 0usize;
    while at < bytes.len() {
        let bad = |reason: String| (at as u64, reason);
        // Sequence continuity is checked by the caller, which knows the gaps a
        // repair left on purpose.
        let problem = match parse_at(bytes, at) {
            Ok((seq, payload_len)) => {
                let start = at + HEADER_LEN;
                scan.records.push(RawRecord { seq, offset: at as u64, payload: bytes[start..start + payload_len].to_vec() });
                at = start + payload_len;
                scan.valid_len = at as u64;
                None
            }
            Err(_) if bytes[at..].iter().all(|&b| b == 0) => {
                scan.padding = (bytes.len() - at) as u64;
                return Ok(scan);
            }
            Err(reason) => Some(bad(reason)),
        };
        let Some((offset, reason)) = problem else { continue };
        if is_last && torn_tail(bytes, at) {
            scan.torn_at = Some((offset, reason));
            return Ok(scan);
        }
        return Err(SegmentError::Corrupt { path: path.display().to_string(), offset, reason });
    }
    Ok(scan)
}

/// The unit a disk writes whole: a write lost in a power cut loses whole
/// sectors (a page is eight of them).
const SECTOR: usize = 512;

/// Whether a bad record at `at` is what a crash mid-write leaves: a record cut
/// short by the end of the file, one followed only by zeros (space the file
/// system allocated before the data landed), or one spanning a sector the disk
/// never wrote ([`lost_sector`]). Anything else means the damage is not at the
/// tail.
fn torn_tail(bytes: &[u8], at: usize) -> bool {
    let zeros_from = |i: usize| bytes.get(i..).is_none_or(|rest| rest.iter().all(|&b| b == 0));
    let Some(header) = bytes.get(at..at + HEADER_LEN) else {
        return true; // not even a whole header
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let end = at + HEADER_LEN + len;
    if len == 0 || len > MAX_PAYLOAD {
        return zeros_from(at) || lost_sector(bytes, at, at + HEADER_LEN);
    }
    end > bytes.len() || zeros_from(end) || lost_sector(bytes, at, end)
}

/// Whether a sector overlapping the record at `[at, end)` reads as zeros from
/// where the record (or the sector) starts to where the sector (or the file)
/// ends: a write of the record that never reached the disk. The bytes before
/// `at` in its first sector belong to the synced record before it.
fn lost_sector(bytes: &[u8], at: usize, end: usize) -> bool {
    let end = end.min(bytes.len());
    let mut from = at;
    while from < end {
        let sector_end = ((from / SECTOR) + 1) * SECTOR;
        if bytes[from..sector_end.min(bytes.len())].iter().all(|&b| b == 0) {
            return true;
        }
        from = sector_end;
    }
    false
}

/// What a lenient read of a damaged segment keeps and drops.
#[derive(Debug, Default)]
pub struct Salvage {
    pub records: Vec<RawRecord>,
    /// Byte ranges `[start, end)` that held no intact record, and why.
    pub dropped: Vec<(u64, u64, String)>,
}

/// Reads every intact record, passing over damage by searching for the next record
/// whose checksum holds. Offline repair only: the search may be slow on large
/// damaged regions.
pub fn salvage(bytes: &[u8]) -> Salvage {
    let mut out = Salvage::default();
    let mut at = 0usize;
    while at < bytes.len() {
        match parse_at(bytes, at) {
            Ok((seq, len)) => {
                let start = at + HEADER_LEN;
                out.records.push(RawRecord { seq, offset: at as u64, payload: bytes[start..start + len].to_vec() });
                at = start + len;
            }
            Err(reason) => {
                let next = (at + 1..bytes.len()).find(|&i| parse_at(bytes, i).is_ok()).unwrap_or(bytes.len());
                out.dropped.push((at as u64, next as u64, reason));
                at = next;
            }
        }
    }
    out
}

/// Parses the record at `at`: its sequence number and payload length.
fn parse_at(bytes: &[u8], at: usize) -> Result<(u64, usize), String> {
    let header = bytes.get(at..at + HEADER_LEN).ok_or_else(|| format!("incomplete header ({} bytes)", bytes.len() - at))?;
    let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let len = word(0) as usize;
    let crc = word(4);
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&header[8..16]);
    let seq = u64::from_le_bytes(seq_bytes);
    if len == 0 || len > MAX_PAYLOAD {
        return Err(format!("impossible record length {len}"));
    }
    let payload = bytes.get(at + HEADER_LEN..at + HEADER_LEN + len).ok_or_else(|| format!("incomplete record ({len} bytes announced)"))?;
    if checksum(seq, payload) != crc {
        return Err("checksum mismatch".to_string());
    }
    Ok((seq, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::frame;
    use proptest::prelude::*;

    fn segment(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in 1..=n {
            let payload = vec![seq as u8; 20 + (seq as usize % 7)];
            frame(&mut out, seq, &payload);
        }
        out
    }

    #[test]
    fn reads_every_record() {
        let bytes = segment(5);
        let scan = scan_bytes(&bytes, Path::new("t"), true).map_err(|e| e.to_string());
        let scan = scan.unwrap_or_default();
        assert_eq!(scan.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(scan.valid_len, bytes.len() as u64);
        assert!(scan.torn_at.is_none());
    }

    #[test]
    fn salvage_keeps_records_on_both_sides_of_damage() {
        let mut bytes = segment(6);
        let second = scan_bytes(&bytes, Path::new("t"), true).map(|s| s.records[1].offset as usize).unwrap_or(0);
        bytes[second + HEADER_LEN + 2] ^= 0xff;
        let s = salvage(&bytes);
        assert_eq!(s.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3, 4, 5, 6]);
        assert_eq!(s.dropped.len(), 1);
        assert_eq!(s.dropped[0].0, second as u64);
    }

    #[test]
    fn flipped_bit_in_the_middle_is_corruption() {
        let mut bytes = segment(5);
        bytes[HEADER_LEN + 3] ^= 0x10;
        let err = scan_bytes(&bytes, Path::new("seg"), true).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("corrupt at byte offset 0") && err.contains("checksum"), "{err}");
        // Not the last segment: a torn end is corruption too.
        let mut tail = segment(5);
        tail.truncate(tail.len() - 3);
        assert!(scan_bytes(&tail, Path::new("seg"), false).is_err());
    }

    #[test]
    fn zeros_after_the_last_record_are_padding_in_any_segment() {
        let mut bytes = segment(4);
        let records_len = bytes.len() as u64;
        bytes.extend(std::iter::repeat_n(0u8, 5000));
        for is_last in [true, false] {
            let scan = scan_bytes(&bytes, Path::new("t"), is_last).map_err(|e| e.to_string());
            let scan = scan.unwrap_or_default();
            assert_eq!(scan.records.len(), 4);
            assert_eq!((scan.valid_len, scan.padding), (records_len, 5000));
            assert!(scan.torn_at.is_none());
        }
        // A segment of zeros only (prepared, nothing written yet).
        let scan = scan_bytes(&[0u8; 4096], Path::new("t"), true).map_err(|e| e.to_string()).unwrap_or_default();
        assert_eq!((scan.records.len(), scan.valid_len, scan.padding), (0, 0, 4096));
        // Zeros then data after the records: in the newest segment, a power cut
        // that kept a later sector of an unsynced write and lost the one before
        // (a tear, cut off); in any other segment, damage.
        let last = bytes.len() - 1;
        bytes[last] = 1;
        let scan = scan_bytes(&bytes, Path::new("t"), true).map_err(|e| e.to_string()).unwrap_or_default();
        assert_eq!((scan.records.len(), scan.valid_len, scan.padding), (4, records_len, 0));
        assert_eq!(scan.torn_at.map(|(at, _)| at), Some(records_len));
        assert!(scan_bytes(&bytes, Path::new("t"), false).is_err());
    }

    /// Records of ~100 bytes, so that a sector holds several and records straddle sectors.
    fn long_segment(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in 1..=n {
            frame(&mut out, seq, &vec![(seq % 251) as u8 + 1; 90 + (seq as usize % 13)]);
        }
        out
    }

    #[test]
    fn a_lost_sector_in_the_newest_segment_is_a_tear_elsewhere_damage() {
        let mut bytes = long_segment(60);
        bytes.extend(std::iter::repeat_n(0u8, 4096)); // written ahead
        let all = scan_bytes(&bytes, Path::new("t"), true).map_err(|e| e.to_string()).unwrap_or_default();
        assert_eq!(all.records.len(), 60);
        // The power cut lost sector 9 and kept sectors 10 and 11.
        let lost = 9 * SECTOR;
        bytes[lost..lost + SECTOR].fill(0);
        let first_bad = all.records.iter().find(|r| r.offset as usize + HEADER_LEN + r.payload.len() > lost).map(|r| r.offset);
        let scan = scan_bytes(&bytes, Path::new("t"), true).map_err(|e| e.to_string()).unwrap_or_default();
        assert_eq!(scan.torn_at.as_ref().map(|(at, _)| *at), first_bad);
        assert_eq!(Some(scan.valid_len), first_bad);
        assert!(scan.records.iter().zip(&all.records).all(|(a, b)| a == b));
        assert!(scan.records.len() < 60 && scan.records.len() >= lost / 110);
        let err = scan_bytes(&bytes, Path::new("seg"), false).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("corrupt at byte offset"), "{err}");
        // Bytes changed to something other than zeros: damage, even in the newest segment.
        let mut flipped = long_segment(60);
        flipped[lost + 40] ^= 0x5a;
        let err = scan_bytes(&flipped, Path::new("seg"), true).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("checksum"), "{err}");
    }

    proptest! {
        /// A power cut before a group's sync keeps any subset of its sectors, from
        /// some point on (what was synced before that point is whole), over zeros
        /// written ahead or past the file's end. The newest segment then always
        /// reads as its unchanged records followed by a tear, never as damage.
        #[test]
        fn power_cuts_are_tears(n in 1_u64..60, first_lost_frac in 0.0_f64..1.0, kept in proptest::collection::vec(any::<bool>(), 16), ahead in 0_usize..3000, cut_end in any::<bool>()) {
            let whole = long_segment(n);
            let mut bytes = whole.clone();
            bytes.extend(std::iter::repeat_n(0u8, ahead));
            let first = ((whole.len() as f64 * first_lost_frac) as usize) / SECTOR;
            let sectors = bytes.len().div_ceil(SECTOR);
            for (k, s) in (first..sectors).enumerate() {
                if k == 0 || !kept[k % kept.len()] {
                    let end = ((s + 1) * SECTOR).min(bytes.len());
                    bytes[s * SECTOR..end].fill(0);
                }
            }
            if cut_end && ahead == 0 {
                // The file's size, not only its data, may be behind.
                bytes.truncate((first * SECTOR + SECTOR / 2).min(bytes.len()));
            }
            let all = scan_bytes(&whole, Path::new("t"), true).map_err(|e| e.to_string());
            let all = all.unwrap_or_default();
            let unchanged: Vec<&RawRecord> = all.records.iter().take_while(|r| {
                let end = r.offset as usize + HEADER_LEN + r.payload.len();
                bytes.get(r.offset as usize..end) == Some(&whole[r.offset as usize..end])
            }).collect();
            match scan_bytes(&bytes, Path::new("t"), true) {
                Ok(scan) => {
                    prop_assert_eq!(scan.records.iter().collect::<Vec<_>>(), unchanged);
                    let rest_is_zero = bytes[scan.valid_len as usize..].iter().all(|&b| b == 0);
                    prop_assert!(scan.torn_at.is_some() || rest_is_zero);
                }
                Err(e) => prop_assert!(false, "power cut read as damage: {e}"),
            }
        }

        /// Cutting the newest segment anywhere (a crash mid-write) loses only the
        /// records the cut touches: every complete record before it is read, and
        /// the cut is reported as a torn tail at the start of the first lost one.
        #[test]
        fn torn_tails_anywhere(n in 1_u64..20, cut_frac in 0.0_f64..1.0, zeros in 0_usize..40) {
            let full = segment(n);
            let cut = ((full.len() as f64) * cut_frac) as usize;
            let mut bytes = full[..cut].to_vec();
            bytes.extend(std::iter::repeat_n(0u8, zeros));
            let full_scan = scan_bytes(&full, Path::new("t"), true).map_err(|e| e.to_string());
            let full_scan = full_scan.unwrap_or_default();
            let intact: Vec<u64> = full_scan.records.iter().filter(|r| r.offset as usize + HEADER_LEN + r.payload.len() <= cut).map(|r| r.seq).collect();
            match scan_bytes(&bytes, Path::new("t"), true) {
                Ok(scan) => {
                    let got: Vec<u64> = scan.records.iter().map(|r| r.seq).collect();
                    // Exactly the intact records; zeros never pass as one.
                    prop_assert_eq!(&got, &intact);
                    // What is left is a torn record, or zeros alone (padding).
                    let rest = bytes.len() as u64 - scan.valid_len;
                    let only_zeros = bytes[scan.valid_len as usize..].iter().all(|&b| b == 0);
                    prop_assert_eq!(scan.padding, if scan.torn_at.is_none() { rest } else { 0 });
                    prop_assert!(scan.torn_at.is_some() != (only_zeros), "torn {:?} with only zeros left: {}", scan.torn_at, only_zeros);
                }
                Err(e) => prop_assert!(false, "torn tail reported as corruption: {e}"),
            }
        }
    }
}
