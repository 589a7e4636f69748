//! Which system is under load, and one worker's connection to it: the same
//! workload is turned into HTTP templates, PostgreSQL calls or Redis commands,
//! so every target sees the same customers in the same order.

use crate::http::{HttpClient, Template};
use crate::pg::{PgClient, PgShape};
use crate::redis_target::{RedisClient, RedisShape};
use crate::workload::Workload;
use std::net::SocketAddr;
use std::sync::Arc;

/// The system under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Meterd,
    Ceiling,
    Postgres,
    Redis,
    /// Kuadrant's Limitador (`limitador-server`, HTTP API): checks and consumes only.
    Limitador,
}

impl TargetKind {
    pub fn parse(s: &str) -> Option<TargetKind> {
        Some(match s {
            "meterd" => TargetKind::Meterd,
            "ceiling" => TargetKind::Ceiling,
            "postgres" => TargetKind::Postgres,
            "redis" => TargetKind::Redis,
            "limitador" => TargetKind::Limitador,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Meterd => "meterd",
            TargetKind::Ceiling => "ceiling",
            TargetKind::Postgres => "postgres",
            TargetKind::Redis => "redis",
            TargetKind::Limitador => "limitador",
        }
    }
}

/// Where to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub kind: TargetKind,
    pub addr: SocketAddr,
    pub pg: String,
    pub redis: String,
    pub meter: String,
    pub limit: i64,
}

/// A workload rendered for one target, shared by all workers.
pub enum Prepared {
    Http(SocketAddr, Arc<Vec<Template>>),
    Postgres(String, String, Arc<Vec<PgShape>>),
    Redis(String, i64, Arc<Vec<RedisShape>>),
}

/// Why a worker could not connect or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Postgres(#[from] crate::pg::PgError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{target} takes only the check and check-consume scenarios (it has no ingest endpoint to compare), not {scenario}")]
    Unsupported { target: &'static str, scenario: String },
}

impl Prepared {
    /// Renders `workload` for `endpoint`; refuses workloads the target cannot take.
    pub fn new(endpoint: &Endpoint, workload: &Workload, nonce: u32) -> Result<Prepared, TargetError> {
        Ok(match endpoint.kind {
            TargetKind::Meterd | TargetKind::Ceiling => {
                Prepared::Http(endpoint.addr, Arc::new(crate::http::templates(workload, &endpoint.meter, nonce)))
            }
            TargetKind::Postgres => Prepared::Postgres(endpoint.pg.clone(), endpoint.meter.clone(), Arc::new(crate::pg::shapes(workload))),
            TargetKind::Redis => {
                Prepared::Redis(endpoint.redis.clone(), endpoint.limit, Arc::new(crate::redis_target::shapes(workload, &endpoint.meter)))
            }
            TargetKind::Limitador => {
                let templates = crate::http::limitador_templates(workload, crate::http::LIMITADOR_NAMESPACE)
                    .ok_or_else(|| TargetError::Unsupported { target: "limitador", scenario: workload.scenario.to_string() })?;
                Prepared::Http(endpoint.addr, Arc::new(templates))
            }
        })
    }

    pub fn len(&self) -> usize {
        match self {
            Prepared::Http(_, t) => t.len(),
            Prepared::Postgres(_, _, s) => s.len(),
            Prepared::Redis(_, _, s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub async fn connect(&self) -> Result<Client, TargetError> {
        Ok(match self {
            Prepared::Http(addr, t) => Client::Http(HttpClient::connect(*addr, t.clone()).await?),
            Prepared::Postgres(conn, meter, s) => Client::Postgres(PgClient::connect(conn, meter, s.clone()).await?),
            Prepared::Redis(url, limit, s) => Client::Redis(RedisClient::connect(url, *limit, s.clone()).await?),
        })
    }
}

/// One worker's connection.
pub enum Client {
    Http(HttpClient),
    Postgres(PgClient),
    Redis(RedisClient),
}

impl Client {
    /// Performs request `index` of the pool; `unique` makes its ids fresh.
    pub async fn execute(&mut self, index: usize, unique: u64) -> Result<(), TargetError> {
        match self {
            Client::Http(c) => c.send(index, unique).await?,
            Client::Postgres(c) => {
                c.run(index).await?;
            }
            Client::Redis(c) => {
                c.run(index).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Distribution;
    use crate::workload::Scenario;

    fn endpoint(kind: TargetKind) -> Endpoint {
        Endpoint {
            kind,
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            pg: String::new(),
            redis: String::new(),
            meter: "tokens".into(),
            limit: 1,
        }
    }

    #[test]
    fn limitador_takes_checks_and_refuses_ingest_by_name() {
        let d = Distribution::uniform(10).unwrap();
        let e = endpoint(TargetKind::parse("limitador").unwrap());
        let check = Prepared::new(&e, &Workload::build(Scenario::CheckConsume, &d, 1), 0).unwrap();
        assert!(matches!(&check, Prepared::Http(_, t) if t[0].path == "/check_and_report"));
        let batch = Workload::build(Scenario::IngestBatch { size: 10 }, &d, 1);
        let Err(err) = Prepared::new(&e, &batch, 0) else { panic!("ingest accepted") };
        assert_eq!(
            err.to_string(),
            "limitador takes only the check and check-consume scenarios (it has no ingest endpoint to compare), not ingest-batch-10"
        );
        assert!(Prepared::new(&endpoint(TargetKind::Meterd), &batch, 0).is_ok());
    }
}
