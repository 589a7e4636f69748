//! The hold journal: one JSON line per change of a reservation (its whole
//! state after the change), appended and fsynced before the change is applied.
//! At open the last line of each id wins; a torn last line (a crash mid-write)
//! is ignored; the file is then rewritten with what is kept, so it grows only
//! between compactions.
//!
//! Holds have their own journal rather than WAL records: WAL segments are
//! dropped once their usage is in the store, while an allocation is held for
//! as long as the seat exists.

use super::Reservation;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

const FILE: &str = "holds.jsonl";

/// The open journal.
pub struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
}

impl Journal {
    /// Reads the journal in `dir` (created if missing), keeps the reservations
    /// `keep` accepts, and rewrites the file with them.
    pub fn open(dir: &Path, keep: impl Fn(&Reservation) -> bool) -> std::io::Result<(Journal, Vec<Reservation>)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let mut latest: HashMap<String, Reservation> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).lines() {
                let line = line?;
                match serde_json::from_str::<Reservation>(&line) {
                    Ok(r) => {
                        if !latest.contains_key(&r.id) {
                            order.push(r.id.clone());
                        }
                        latest.insert(r.id.clone(), r);
                    }
                    Err(e) => tracing::warn!(error = %e, "an unreadable hold journal line (a torn write) is skipped"),
                }
            }
        }
        let kept: Vec<Reservation> = order.into_iter().filter_map(|id| latest.remove(&id)).filter(|r| keep(r)).collect();
        let file = rewrite(&path, &kept)?;
        Ok((Journal { path, file, lines: kept.len() }, kept))
    }

    /// Appends one reservation's state, durably.
    pub fn append(&mut self, r: &Reservation) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.lines += 1;
        Ok(())
    }

    /// Lines written since the last rewrite.
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// Rewrites the journal with `live` only.
    pub fn compact(&mut self, live: &[Reservation]) -> std::io::Result<()> {
        self.file = rewrite(&self.path, live)?;
        self.lines = live.len();
        Ok(())
    }
}

/// Writes `rs` to a temporary file, fsyncs, renames it over `path`, and
/// returns it open for appending.
fn rewrite(path: &Path, rs: &[Reservation]) -> std::io::Result<File> {
    let tmp = path.with_extension("jsonl.tmp");
    {
        let mut f = File::create(&tmp)?;
        for r in rs {
            let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
            line.push(b'\n');
            f.write_all(&line)?;
        }
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    OpenOptions::new().append(true).open(path)
}
