//! Rows the usage store refuses (bad data, never a transient failure) are set
//! aside here instead of being retried forever: one NDJSON file per flush in
//! `data_dir/rejected/`, written whole (temp file, fsync, rename), so a retry of
//! the same flush rewrites the same file and nothing is set aside twice. Each
//! line is the row as the store would have held it, plus the store's reason; a
//! human can fix and re-import them. A metric and an error log say it happened.

use crate::store::UsageRow;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why rows could not be set aside (the flush is then retried).
#[derive(Debug, thiserror::Error)]
#[error("cannot set rejected rows aside in {path}: {source}")]
pub struct RejectedError {
    path: String,
    source: std::io::Error,
}

/// Writes `rows` (each with its reason) for flush `(instance_id, seq)`.
pub fn set_aside(dir: &Path, instance_id: &str, seq: u64, rows: &[(&UsageRow, &str)]) -> Result<PathBuf, RejectedError> {
    let path = dir.join(format!("{instance_id}-{seq}.ndjson"));
    let err = |source| RejectedError { path: path.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(".{instance_id}-{seq}.ndjson.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    for (row, reason) in rows {
        let line = serde_json::json!({
            "meter": row.meter,
            "customer": row.customer,
            "minute_ms": row.minute_ms,
            "properties": row.properties,
            "value": row.value,
            "last_ts": row.last_ts,
            "reason": reason,
        });
        writeln!(file, "{line}").map_err(err)?;
    }
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_line_per_row_and_rewrites_on_retry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let row = UsageRow {
            meter: "m".into(),
            customer: "c".into(),
            minute_ms: 60_000,
            properties: vec![],
            value: 5,
            last_ts: 61_000,
            fold: crate::store::Fold::Sum,
        };
        let path = set_aside(dir.path(), "i", 7, &[(&row, "bad"), (&row, "worse")]).unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains(r#""reason":"worse""#), "{text}");
        set_aside(dir.path(), "i", 7, &[(&row, "bad")]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::read_to_string(&path).unwrap_or_default().lines().count(), 1, "a retry replaces the file");
    }
}
