//! The durable outbox: one SQLite file (`data_dir/notifications.sqlite`) with a
//! row per (notification, endpoint). A notification is written here — committed,
//! with `synchronous = FULL` when `storage.durability = "fsync"` — before the
//! request whose usage caused it is answered, so it survives SIGKILL; the
//! delivery workers read due rows in pages (pending rows beyond a page stay on
//! disk) and record each attempt.
//!
//! Rows are inserted with `INSERT OR IGNORE` on the deterministic id, so
//! deciding the same crossing twice (two instances, a replay) stores it once.

use super::{Notification, NotifyError};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

/// What a threshold row also records, so a restart knows what was sent.
#[derive(Debug, Clone)]
pub struct ThresholdMark {
    /// `customer \0 meter \0 window \0 start_ms \0 limit_raw`.
    pub window_key: String,
    pub threshold: u16,
    pub window_end_ms: i64,
}

/// One row as `GET /v1/notifications` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    pub kind: String,
    pub endpoint: String,
    pub customer: String,
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub delivered_ms: Option<i64>,
    /// The exact body sent on every attempt.
    pub body: String,
    pub next_ms: i64,
    pub deadline_ms: i64,
}

/// One attempt's outcome.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// `pending`, `delivered` or `failed`.
    pub status: &'a str,
    /// Added to `attempts` (0: nothing was sent, e.g. another instance holds it).
    pub counted: i64,
    /// Kept as `last_error` (`None` keeps the previous one).
    pub error: Option<&'a str>,
    pub next_ms: i64,
    pub delivered_ms: Option<i64>,
}

/// Filters of a listing.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub customer: Option<String>,
    pub status: Option<String>,
    pub limit: usize,
}

/// The outbox file.
pub struct Outbox {
    /// Enqueues (on the request path; durable before the answer).
    writer: Mutex<Connection>,
    /// The workers' and the API's reads and attempt records.
    worker: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS notifications (
    id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    type TEXT NOT NULL,
    customer TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_ms INTEGER NOT NULL,
    next_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    delivered_ms INTEGER,
    window_key TEXT,
    threshold INTEGER,
    window_end_ms INTEGER,
    PRIMARY KEY (id, endpoint)
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (endpoint, status, next_ms);
CREATE INDEX IF NOT EXISTS notifications_created ON notifications (created_ms);
CREATE INDEX IF NOT EXISTS notifications_window ON notifications (window_end_ms) WHERE window_key IS NOT NULL;
";

const COLUMNS: &str = "id, type, endpoint, customer, status, attempts, last_error, created_ms, delivered_ms, body, next_ms, deadline_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        id: r.get(0)?,
        kind: r.get(1)?,
        endpoint: r.get(2)?,
        customer: r.get(3)?,
        status: r.get(4)?,
        attempts: r.get(5)?,
        last_error: r.get(6)?,
        created_ms: r.get(7)?,
        delivered_ms: r.get(8)?,
        body: r.get(9)?,
        next_ms: r.get(10)?,
        deadline_ms: r.get(11)?,
    })
}

fn open(path: &Path, full_sync: bool) -> Result<Connection, NotifyError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if full_sync { "FULL" } else { "NORMAL" })?;
    Ok(conn)
}

impl Outbox {
    /// Opens (creating) the outbox at `path`; `full_sync`: fsync every enqueue.
    pub fn open(path: &Path, full_sync: bool) -> Result<Outbox, NotifyError> {
        let writer = open(path, full_sync)?;
        writer.execute_batch(SCHEMA)?;
        let worker = open(path, false)?;
        Ok(Outbox { writer: Mutex::new(writer), worker: Mutex::new(worker) })
    }

    /// Stores `n` once per endpoint in `endpoints`, pending; returns how many
    /// rows are new (0: it was already there). Committed before it returns.
    pub fn insert(
        &self,
        n: &Notification,
        endpoints: &[&str],
        body: &str,
        now_ms: i64,
        retry_for_ms: i64,
        mark: Option<&ThresholdMark>,
    ) -> Result<usize, NotifyError> {
        let mut conn = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn.transaction()?;
        let mut new = 0;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO notifications (id, endpoint, type, customer, body, status, created_ms, next_ms, deadline_ms, window_key, threshold, window_end_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for endpoint in endpoints {
                new += stmt.execute(params![
                    n.id,
                    endpoint,
                    n.kind,
                    n.customer,
                    body,
                    now_ms,
                    now_ms.saturating_add(retry_for_ms),
                    mark.map(|m| m.window_key.as_str()),
                    mark.map(|m| m.threshold),
                    mark.map(|m| m.window_end_ms),
                ])?;
            }
        }
        tx.commit()?;
        Ok(new)
    }

    /// The highest threshold sent per window (for windows still open at `now_ms`).
    pub fn sent_thresholds(&self, now_ms: i64) -> Result<Vec<(String, u16)>, NotifyError> {
        let conn = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stmt = conn.prepare(
            "SELECT window_key, MAX(threshold) FROM notifications WHERE window_key IS NOT NULL AND window_end_ms > ?1 GROUP BY window_key",
        )?;
        let rows = stmt.query_map(params![now_ms], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u16>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Up to `limit` pending rows of `endpoint` due at `now_ms`, oldest first.
    pub fn due(&self, endpoint: &str, now_ms: i64, limit: usize) -> Result<Vec<Row>, NotifyError> {
        let conn = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM notifications WHERE endpoint = ?1 AND status = 'pending' AND next_ms <= ?2 ORDER BY next_ms LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![endpoint, now_ms, limit as i64], row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// When the next pending row of `endpoint` is due.
    pub fn next_due(&self, endpoint: &str) -> Result<Option<i64>, NotifyError> {
        let conn = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
        let next: Option<i64> = conn
            .query_row("SELECT MIN(next_ms) FROM notifications WHERE endpoint = ?1 AND status = 'pending'", params![endpoint], |r| r.get(0))
            .optional()?
            .flatten();
        Ok(next)
    }

    /// Records an attempt's outcome on the row of (`id`, `endpoint`).
    pub fn record(&self, id: &str, endpoint: &str, a: &Attempt<'_>) -> Result<(), NotifyError> {
        let Attempt { status, counted, error, next_ms, delivered_ms } = *a;
        let conn = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
        conn.prepare_cached(
            "UPDATE notifications SET status = ?3, attempts = attempts + ?4, last_error = COALESCE(?5, last_error), next_ms = ?6,
             delivered_ms = COALESCE(?7, delivered_ms) WHERE id = ?1 AND endpoint = ?2",
        )?
        .execute(params![id, endpoint, status, counted, error, next_ms, delivered_ms])?;
        Ok(())
    }

    /// Makes every row of `id` pending again, due now, with a fresh deadline;
    /// returns the rows touched (0: unknown id).
    pub fn redeliver(&self, id: &str, now_ms: i64, retry_for_ms: i64) -> Result<usize, NotifyError> {
        let conn = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(conn.execute(
            "UPDATE notifications SET status = 'pending', next_ms = ?2, deadline_ms = ?3 WHERE id = ?1",
            params![id, now_ms, now_ms.saturating_add(retry_for_ms)],
        )?)
    }

    /// The endpoints holding a row of `id`.
    pub fn endpoints_of(&self, id: &str) -> Result<Vec<String>, NotifyError> {
        let conn = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stmt = conn.prepare_cached("SELECT endpoint FROM notifications WHERE id = ?1 ORDER BY endpoint")?;
        let rows = stmt.query_map(params![id], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Rows newest first, filtered.
    pub fn list(&self, f: &Filter) -> Result<Vec<Row>, NotifyError> {
        let conn = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM notifications WHERE (?1 IS NULL OR customer = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY created_ms DESC, id, endpoint LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![f.customer, f.status, f.limit as i64], row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes settled rows (delivered or failed) created before `before_ms`
    /// whose window (if any) ended before `now_ms`: a window still open keeps
    /// its rows, so a restart still knows what it sent. Returns the rows deleted.
    pub fn prune(&self, before_ms: i64, now_ms: i64) -> Result<usize, NotifyError> {
        let conn = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(conn.execute(
            "DELETE FROM notifications WHERE status != 'pending' AND created_ms < ?1 AND (window_end_ms IS NULL OR window_end_ms < ?2)",
            params![before_ms, now_ms],
        )?)
    }

    /// Pending rows and the creation time of the oldest.
    pub fn pending(&self) -> Result<(i64, Option<i64>), NotifyError> {
        let conn = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(conn.query_row("SELECT COUNT(*), MIN(created_ms) FROM notifications WHERE status = 'pending'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: &str) -> Notification {
        Notification { id: id.into(), kind: "limit.threshold".into(), customer: "u".into(), data: serde_json::json!({}) }
    }

    #[test]
    fn inserts_once_pages_and_prunes() -> Result<(), NotifyError> {
        let dir = tempfile::tempdir().map_err(|e| NotifyError::Client(e.to_string()))?;
        let o = Outbox::open(&dir.path().join("o.sqlite"), false)?;
        let mark = ThresholdMark { window_key: "w".into(), threshold: 90, window_end_ms: 5_000 };
        assert_eq!(o.insert(&n("a"), &["x", "y"], "{}", 100, 1_000, Some(&mark))?, 2);
        assert_eq!(o.insert(&n("a"), &["x", "y"], "{}", 200, 1_000, Some(&mark))?, 0, "the same id is stored once");
        for i in 0..5 {
            o.insert(&n(&format!("b{i}")), &["x"], "{}", 300 + i, 1_000, None)?;
        }
        assert_eq!(o.sent_thresholds(4_999)?, vec![("w".to_string(), 90)]);
        assert_eq!(o.sent_thresholds(5_000)?, vec![], "an ended window is forgotten");
        assert_eq!(o.due("x", 10_000, 4)?.len(), 4, "a page, the rest stays on disk");
        assert_eq!(o.due("x", 250, 100)?.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a"]);
        let a = Attempt { status: "delivered", counted: 1, error: None, next_ms: 400, delivered_ms: Some(400) };
        o.record("a", "x", &a)?;
        assert_eq!(o.pending()?, (6, Some(100)));
        assert_eq!(o.prune(10_000, 4_000)?, 0, "its window is still open");
        assert_eq!(o.prune(10_000, 6_000)?, 1);
        assert_eq!(o.redeliver("a", 7_000, 1_000)?, 1, "only y is left of a");
        assert_eq!(o.endpoints_of("a")?, ["y"]);
        Ok(())
    }
}
