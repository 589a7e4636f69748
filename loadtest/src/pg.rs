//! The PostgreSQL baseline: the row-per-user design (`track_usage` upserts a
//! monthly usage row per event, `can_use` compares it with the plan's limit),
//! driven through tokio-postgres with prepared statements, one connection per
//! worker. The schema is `loadtest/sql/schema.sql`.

use crate::workload::{customer_name, OpKind, Workload};
use std::sync::Arc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

pub const SCHEMA: &str = include_str!("../sql/schema.sql");

/// One request's calls: customer names sorted, so concurrent batch
/// transactions lock rows in one order and cannot deadlock.
#[derive(Debug, Clone)]
pub struct PgShape {
    pub kind: OpKind,
    pub customers: Vec<String>,
}

pub fn shapes(workload: &Workload) -> Vec<PgShape> {
    workload
        .shapes
        .iter()
        .map(|s| {
            let mut customers: Vec<String> = s.customers.iter().map(|&c| customer_name(c)).collect();
            customers.sort();
            PgShape { kind: s.kind, customers }
        })
        .collect()
}

/// Creates the schema and sets the default plan's monthly limit for `meter`.
pub async fn setup(conn: &str, meter: &str, limit: i64) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    let task = tokio::spawn(connection);
    client.batch_execute(SCHEMA).await?;
    client
        .execute(
            "INSERT INTO plan_limits (plan, meter, monthly_limit) VALUES ('default', $1, $2)
             ON CONFLICT (plan, meter) DO UPDATE SET monthly_limit = EXCLUDED.monthly_limit",
            &[&meter, &limit],
        )
        .await?;
    drop(client);
    let _ = task.await;
    Ok(())
}

/// One connection with its prepared statements.
pub struct PgClient {
    client: Client,
    track: Statement,
    can: Statement,
    meter: String,
    shapes: Arc<Vec<PgShape>>,
}

/// What a PostgreSQL request came back with, besides success.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("postgres: {0}")]
    Db(#[from] tokio_postgres::Error),
}

impl PgClient {
    pub async fn connect(conn: &str, meter: &str, shapes: Arc<Vec<PgShape>>) -> Result<PgClient, PgError> {
        let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
        tokio::spawn(connection);
        let track = client.prepare("SELECT track_usage($1, $2, $3)").await?;
        let can = client.prepare("SELECT can_use($1, $2, $3)").await?;
        Ok(PgClient { client, track, can, meter: meter.to_string(), shapes })
    }

    /// Runs shape `index`: one `track_usage` per event (a batch in one
    /// transaction, its calls pipelined), `can_use` for a check, and for a
    /// consume `can_use` then `track_usage` in one transaction. Returns whether
    /// the check allowed.
    pub async fn run(&mut self, index: usize) -> Result<bool, PgError> {
        let shapes = self.shapes.clone();
        let shape = &shapes[index];
        let one: i64 = 1;
        let meter = self.meter.as_str();
        match shape.kind {
            OpKind::Ingest if shape.customers.len() == 1 => {
                self.client.query_one(&self.track, &[&shape.customers[0], &meter, &one]).await?;
                Ok(true)
            }
            OpKind::Ingest => {
                let tx = self.client.transaction().await?;
                let params: Vec<[&(dyn ToSql + Sync); 3]> =
                    shape.customers.iter().map(|c| [c as &(dyn ToSql + Sync), &meter, &one]).collect();
                let calls = params.iter().map(|p| tx.query_one(&self.track, p));
                for r in futures_util::future::join_all(calls).await {
                    r?;
                }
                tx.commit().await?;
                Ok(true)
            }
            OpKind::Check => {
                let row = self.client.query_one(&self.can, &[&shape.customers[0], &meter, &one]).await?;
                Ok(row.get::<_, bool>(0))
            }
            OpKind::Consume => {
                let tx = self.client.transaction().await?;
                let allowed = tx.query_one(&self.can, &[&shape.customers[0], &meter, &one]).await?.get::<_, bool>(0);
                if allowed {
                    tx.query_one(&self.track, &[&shape.customers[0], &meter, &one]).await?;
                }
                tx.commit().await?;
                Ok(allowed)
            }
        }
    }
}
