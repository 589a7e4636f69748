//! The audit list of adjustments: every applied adjustment, with its reason,
//! in the SQLite file `data_dir/adjustments.sqlite` (table `adjustments`,
//! keyed by id). A row is written *pending* before the adjustment goes to the
//! WAL and marked applied after, so a crash in between leaves a pending row
//! that a retry of the same id completes (see `adjust`). Read by `GET
//! /v1/adjustments` (applied rows, bounded by a limit) and by a repeated
//! `POST` (idempotency by id).

use rusqlite::{Connection, OptionalExtension};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Why the audit list could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("adjustments audit (sqlite) {op}: {source}")]
    Sql { op: &'static str, source: rusqlite::Error },
    #[error("adjustments audit task failed: {0}")]
    Task(String),
}

/// One recorded adjustment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub id: String,
    pub customer: String,
    pub meter: String,
    /// Signed raw units at `precision`.
    pub raw: i64,
    pub precision: u8,
    pub ts: i64,
    pub reason: String,
    /// When meterd applied it, Unix ms.
    pub created_ms: i64,
    /// False while it is being applied (or if meterd stopped meanwhile).
    pub applied: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS adjustments (
    id         TEXT PRIMARY KEY,
    customer   TEXT NOT NULL,
    meter      TEXT NOT NULL,
    raw        INTEGER NOT NULL, -- signed raw units at `precision`
    precision  INTEGER NOT NULL,
    ts         INTEGER NOT NULL, -- unix ms
    reason     TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    applied    INTEGER NOT NULL  -- 0: pending (being applied), 1: applied
);
CREATE INDEX IF NOT EXISTS adjustments_by_customer ON adjustments (customer, meter, created_ms);
";

/// The audit list.
#[derive(Clone)]
pub struct AuditLog {
    conn: Arc<Mutex<Connection>>,
}

fn sql(op: &'static str) -> impl Fn(rusqlite::Error) -> AuditError {
    move |source| AuditError::Sql { op, source }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Recorded> {
    Ok(Recorded {
        id: r.get(0)?,
        customer: r.get(1)?,
        meter: r.get(2)?,
        raw: r.get(3)?,
        precision: r.get(4)?,
        ts: r.get(5)?,
        reason: r.get(6)?,
        created_ms: r.get(7)?,
        applied: r.get(8)?,
    })
}

const COLUMNS: &str = "id, customer, meter, raw, precision, ts, reason, created_ms, applied";

impl AuditLog {
    /// Opens (creating) the file; `full_sync` makes every commit an fsync.
    pub fn open(path: &Path, full_sync: bool) -> Result<AuditLog, AuditError> {
        let conn = Connection::open(path).map_err(sql("open"))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sql("open"))?;
        conn.pragma_update(None, "synchronous", if full_sync { "FULL" } else { "NORMAL" }).map_err(sql("open"))?;
        conn.execute_batch(SCHEMA).map_err(sql("create"))?;
        Ok(AuditLog { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, AuditError> + Send + 'static,
    ) -> Result<R, AuditError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| AuditError::Task(e.to_string()))?
    }

    /// The adjustment with this id, if recorded.
    pub async fn get(&self, id: &str) -> Result<Option<Recorded>, AuditError> {
        let id = id.to_owned();
        self.with(move |c| {
            c.query_row(&format!("SELECT {COLUMNS} FROM adjustments WHERE id = ?1"), [&id], row).optional().map_err(sql("get"))
        })
        .await
    }

    /// Records `r` unless its id is there (then false).
    pub async fn insert(&self, r: Recorded) -> Result<bool, AuditError> {
        self.with(move |c| {
            let n = c
                .execute(
                    &format!("INSERT OR IGNORE INTO adjustments ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                    rusqlite::params![r.id, r.customer, r.meter, r.raw, r.precision, r.ts, r.reason, r.created_ms, r.applied],
                )
                .map_err(sql("insert"))?;
            Ok(n == 1)
        })
        .await
    }

    /// Marks a pending adjustment applied.
    pub async fn mark_applied(&self, id: &str) -> Result<(), AuditError> {
        let id = id.to_owned();
        self.with(move |c| c.execute("UPDATE adjustments SET applied = 1 WHERE id = ?1", [&id]).map(|_| ()).map_err(sql("mark applied")))
            .await
    }

    /// Forgets a pending adjustment that was not applied.
    pub async fn forget_pending(&self, id: &str) -> Result<(), AuditError> {
        let id = id.to_owned();
        self.with(move |c| c.execute("DELETE FROM adjustments WHERE id = ?1 AND applied = 0", [&id]).map(|_| ()).map_err(sql("forget")))
            .await
    }

    /// A customer's applied adjustments (of one meter, when given), oldest first, at
    /// most `limit`.
    pub async fn list(&self, customer: &str, meter: Option<&str>, limit: usize) -> Result<Vec<Recorded>, AuditError> {
        let customer = customer.to_owned();
        let meter = meter.map(str::to_owned);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM adjustments WHERE customer = ?1 AND (?2 IS NULL OR meter = ?2) AND applied = 1 \
                     ORDER BY created_ms, id LIMIT ?3"
                ))
                .map_err(sql("list"))?;
            let rows = stmt.query_map(rusqlite::params![customer, meter, limit], row).map_err(sql("list"))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sql("list"))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, meter: &str, raw: i64, created_ms: i64) -> Recorded {
        Recorded {
            id: id.into(),
            customer: "c".into(),
            meter: meter.into(),
            raw,
            precision: 2,
            ts: 5,
            reason: "r".into(),
            created_ms,
            applied: true,
        }
    }

    #[tokio::test]
    async fn records_once_lists_bounded_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        let log = AuditLog::open(&path, true).unwrap();
        assert!(log.insert(rec("a", "m", -5, 1)).await.unwrap());
        assert!(!log.insert(rec("a", "m", -9, 2)).await.unwrap());
        assert!(log.insert(rec("b", "n", 7, 3)).await.unwrap());
        assert!(log.insert(rec("c", "m", 1, 4)).await.unwrap());
        drop(log);
        let log = AuditLog::open(&path, true).unwrap();
        assert_eq!(log.get("a").await.unwrap(), Some(rec("a", "m", -5, 1)));
        let ids = |v: Vec<Recorded>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(log.list("c", None, 10).await.unwrap()), ["a", "b", "c"]);
        assert_eq!(ids(log.list("c", Some("m"), 10).await.unwrap()), ["a", "c"]);
        assert_eq!(ids(log.list("c", None, 2).await.unwrap()), ["a", "b"]);
        assert!(log.list("other", None, 10).await.unwrap().is_empty());
        // Pending rows are not listed until marked applied; forgetting spares applied rows.
        assert!(log.insert(Recorded { applied: false, ..rec("p", "m", -1, 5) }).await.unwrap());
        assert_eq!(ids(log.list("c", None, 10).await.unwrap()), ["a", "b", "c"]);
        log.mark_applied("p").await.unwrap();
        assert_eq!(ids(log.list("c", None, 10).await.unwrap()), ["a", "b", "c", "p"]);
        assert!(log.insert(Recorded { applied: false, ..rec("q", "m", -1, 6) }).await.unwrap());
        log.forget_pending("q").await.unwrap();
        log.forget_pending("a").await.unwrap();
        assert_eq!(log.get("q").await.unwrap(), None);
        assert!(log.get("a").await.unwrap().is_some());
    }
}
