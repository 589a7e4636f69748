//! The export's watermark: `wal/raw_export`, the highest WAL sequence whose
//! events are all in `raw_events`. It is written after ClickHouse acknowledged
//! them (never before), atomically, in the checkpoint's format
//! (`crate::wal::checkpoint`), and the WAL keeps every segment holding a record
//! above it. A crash between the INSERT and this file leaves it behind
//! ClickHouse, which is safe: the export asks ClickHouse what it holds before
//! sending again. Missing (the export never ran here, or the file was deleted),
//! the export starts from the oldest record the WAL still has and sends only
//! what `raw_events` lacks.

use crate::wal::checkpoint::{self, CheckpointError};
use std::path::Path;

/// Why the watermark could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WatermarkError {
    #[error("raw-events export watermark {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "raw-events export watermark {path} is damaged (bad length or checksum); delete it: the export then reads \
         the WAL from its oldest record and sends only the events raw_events does not hold yet"
    )]
    Damaged { path: String },
}

/// The file's name in the WAL directory.
pub const FILE: &str = "raw_export";

fn convert(e: CheckpointError) -> WatermarkError {
    match e {
        CheckpointError::Io { path, source } => WatermarkError::Io { path, source },
        CheckpointError::Damaged { path } => WatermarkError::Damaged { path },
    }
}

/// The watermark in the WAL directory `dir`; `None` when there is none.
pub fn read(dir: &Path) -> Result<Option<u64>, WatermarkError> {
    checkpoint::read_file(dir, FILE).map_err(convert)
}

/// Records that every event of the records up to `seq` is in `raw_events`.
pub fn write(dir: &Path, seq: u64) -> Result<(), WatermarkError> {
    checkpoint::write_file(dir, FILE, seq).map_err(convert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_beside_the_checkpoint_and_detects_damage() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(read(dir.path()).ok(), Some(None), "none yet");
        write(dir.path(), 42).expect("write");
        checkpoint::write(dir.path(), 7).expect("checkpoint");
        assert_eq!(read(dir.path()).ok(), Some(Some(42)), "its own file");
        assert_eq!(checkpoint::read(dir.path()).ok(), Some(7));
        write(dir.path(), 43).expect("write");
        assert_eq!(read(dir.path()).ok(), Some(Some(43)));
        std::fs::write(dir.path().join(FILE), b"\x2b\0\0\0\0\0\0\0\0\0\0\0").expect("damage");
        let err = read(dir.path()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("damaged") && err.contains("raw_export") && err.contains("delete it"), "{err}");
    }
}
