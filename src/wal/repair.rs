//! `meterd wal verify` and `meterd wal repair`: the state of every segment, and
//! a way back to a startable WAL after damage. Repair keeps every intact record,
//! rewrites the damaged segment atomically, and records the sequence numbers it
//! could not keep in `dropped`, so that the next start accepts exactly those
//! gaps (and still refuses any other). Run them only while meterd is stopped.

use super::checkpoint;
use super::record::{frame, HEADER_LEN};
use super::segment;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

/// Why verify or repair could not run.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Segment(#[from] segment::SegmentError),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RepairError + '_ {
    move |source| RepairError::Io { path: path.display().to_string(), source }
}

/// The file listing sequence ranges a repair dropped.
pub const DROPPED: &str = "dropped";

/// Reads the dropped ranges (inclusive) a repair recorded.
pub fn dropped_ranges(dir: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(dir.join(DROPPED)).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (a, b) = l.split_once('-')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// Reports the state of every segment; `Ok(true)` when nothing is damaged
/// (a torn tail, which a start cuts off by itself, counts as undamaged).
pub fn verify(dir: &Path, out: &mut String) -> Result<bool, RepairError> {
    let cp = checkpoint::read(dir).map(|c| c.to_string()).unwrap_or_else(|e| format!("unreadable ({e})"));
    let _ = writeln!(out, "WAL {}: checkpoint {cp}", dir.display());
    let segments = segment::list(dir)?;
    if segments.is_empty() {
        let _ = writeln!(out, "  no segments");
    }
    let mut healthy = true;
    let count = segments.len();
    let repaired = dropped_ranges(dir);
    let mut prev_last: Option<u64> = None;
    for (i, (first, path)) in segments.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(io(path))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        match segment::scan_bytes(&bytes, path, i + 1 == count) {
            Ok(scan) => {
                for r in &scan.records {
                    if let Some(p) = prev_last {
                        let repaired_gap = repaired.iter().any(|&(a, b)| a == p + 1 && b + 1 == r.seq);
                        if r.seq != p + 1 && !repaired_gap {
                            healthy = false;
                            let _ = writeln!(out, "  {name}: DAMAGED: sequence {} follows {p} (records are missing)", r.seq);
                        }
                    }
                    prev_last = Some(r.seq);
                }
                let last = scan.records.last().map(|r| r.seq.to_string()).unwrap_or_else(|| "-".into());
                let _ = write!(out, "  {name}: ok, {} records, seq {first}..{last}, {} bytes", scan.records.len(), bytes.len());
                if scan.padding > 0 {
                    let _ = write!(out, "; {} bytes of zeros written ahead of the next records", scan.padding);
                }
                if let Some((offset, reason)) = scan.torn_at {
                    let _ = write!(out, "; torn tail at byte {offset} ({reason}), cut off at the next start");
                }
                let _ = writeln!(out);
            }
            Err(e) => {
                healthy = false;
                let s = segment::salvage(&bytes);
                let lost: u64 = s.dropped.iter().map(|(a, b, _)| b - a).sum();
                let _ = writeln!(out, "  {name}: DAMAGED: {e}; {} intact records, {lost} bytes unreadable", s.records.len());
            }
        }
    }
    let _ = writeln!(out, "{}", if healthy { "verdict: ok" } else { "verdict: damaged; stop meterd and run `meterd wal repair`" });
    Ok(healthy)
}

/// Rewrites damaged segments with their intact records; reports what it dropped.
pub fn repair(dir: &Path, out: &mut String) -> Result<(), RepairError> {
    let segments = segment::list(dir)?;
    let count = segments.len();
    let mut dropped_seqs = Vec::new();
    let mut prev_last: Option<u64> = None;
    for (i, (_, path)) in segments.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(io(path))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        let s = segment::salvage(&bytes);
        let torn_only = segment::scan_bytes(&bytes, path, i + 1 == count).is_ok();
        // Gaps in sequence numbers (between intact records, or across segments).
        for r in &s.records {
            if let Some(p) = prev_last {
                if r.seq > p + 1 {
                    dropped_seqs.push((p + 1, r.seq - 1));
                }
            }
            prev_last = Some(r.seq);
        }
        if s.dropped.is_empty() || torn_only {
            let _ = writeln!(out, "  {name}: kept as is ({} records)", s.records.len());
            continue;
        }
        let mut rewritten = Vec::with_capacity(bytes.len());
        for r in &s.records {
            frame(&mut rewritten, r.seq, &r.payload);
        }
        let tmp = path.with_extension("repair");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&rewritten).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        for (a, b, reason) in &s.dropped {
            let _ = writeln!(out, "  {name}: dropped bytes {a}..{b} ({reason})");
        }
        let _ = writeln!(
            out,
            "  {name}: rewritten with {} intact records ({} bytes of headers and payloads)",
            s.records.len(),
            rewritten.len()
        );
        debug_assert!(rewritten.len() >= s.records.len() * HEADER_LEN);
    }
    if dropped_seqs.is_empty() {
        let _ = writeln!(out, "no records were lost");
    } else {
        let mut all = dropped_ranges(dir);
        all.extend(dropped_seqs.iter().copied());
        let text: String = all.iter().map(|(a, b)| format!("{a}-{b}\n")).collect();
        std::fs::write(dir.join(DROPPED), text).map_err(io(dir))?;
        for (a, b) in &dropped_seqs {
            let _ = writeln!(
                out,
                "LOST records with sequence {a}..={b} (their usage is not in meterd; see the logs of the clients that sent it)"
            );
        }
        let forgotten = super::ids::forget(&dir.join("ids"), &dropped_seqs)
            .map_err(|e| RepairError::Io { path: dir.join("ids").display().to_string(), source: std::io::Error::other(e.to_string()) })?;
        let _ = writeln!(out, "forgot {forgotten} event ids of the lost records, so their events are accepted when sent again");
    }
    checkpoint::sync_dir(dir).map_err(io(dir))?;
    Ok(())
}
