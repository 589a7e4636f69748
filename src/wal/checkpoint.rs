//! The checkpoint file: the highest WAL sequence the usage store holds, so
//! segments wholly at or below it can be deleted and replay can skip them.
//! Written to a temporary file, fsynced, renamed over the old one, and the
//! directory fsynced: a crash leaves the old checkpoint or the new one, never a
//! mix. It is an optimisation: the store records the same watermark with each
//! flush, and start-up takes the larger of the two.

use std::io::Write;
use std::path::Path;

/// Why the checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("WAL checkpoint {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("WAL checkpoint {path} is damaged (bad length or checksum); delete it to replay from the store's watermark")]
    Damaged { path: String },
}

const FILE: &str = "checkpoint";

/// Reads the checkpoint; 0 when there is none.
pub fn read(dir: &Path) -> Result<u64, CheckpointError> {
    Ok(read_file(dir, FILE)?.unwrap_or(0))
}

/// Reads a sequence number kept in `dir/name` the way the checkpoint is kept
/// (other watermarks, such as the raw-events export's, use the same format);
/// `None` when the file does not exist.
pub fn read_file(dir: &Path, name: &str) -> Result<Option<u64>, CheckpointError> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CheckpointError::Io { path: path.display().to_string(), source }),
    };
    let damaged = || CheckpointError::Damaged { path: path.display().to_string() };
    if bytes.len() != 12 {
        return Err(damaged());
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[..8]);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[8..]);
    if crc32c::crc32c(&seq) != u32::from_le_bytes(crc) {
        return Err(damaged());
    }
    Ok(Some(u64::from_le_bytes(seq)))
}

/// Writes the checkpoint atomically.
pub fn write(dir: &Path, seq: u64) -> Result<(), CheckpointError> {
    write_file(dir, FILE, seq)
}

/// Writes `seq` to `dir/name` atomically (see [`read_file`]).
pub fn write_file(dir: &Path, name: &str, seq: u64) -> Result<(), CheckpointError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let io = |source| CheckpointError::Io { path: path.display().to_string(), source };
    let mut bytes = seq.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&seq.to_le_bytes()).to_le_bytes());
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    sync_dir(dir).map_err(io)
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(read(dir.path()).ok(), Some(0));
        assert!(write(dir.path(), 42).is_ok());
        assert_eq!(read(dir.path()).ok(), Some(42));
        let _ = std::fs::write(dir.path().join(FILE), b"\x01\x02\x03");
        assert!(matches!(read(dir.path()), Err(CheckpointError::Damaged { .. })));
    }
}
