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
}

impl TargetKind {
    pub fn parse(s: &str) -> Option<TargetKind> {
        Some(match s {
            "meterd" => TargetKind::Meterd,
            "ceiling" => TargetKind::Ceiling,
            "postgres" => TargetKind::Postgres,
            "redis" => TargetKind::Redis,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Meterd => "meterd",
            TargetKind::Ceiling => "ceiling",
            TargetKind::Postgres => "postgres",
            TargetKind::Redis => "redis",
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
}

impl Prepared {
    pub fn new(endpoint: &Endpoint, workload: &Workload, nonce: u32) -> Prepared {
        match endpoint.kind {
            TargetKind::Meterd | TargetKind::Ceiling => {
                Prepared::Http(endpoint.addr, Arc::new(crate::http::templates(workload, &endpoint.meter, nonce)))
            }
            TargetKind::Postgres => Prepared::Postgres(endpoint.pg.clone(), endpoint.meter.clone(), Arc::new(crate::pg::shapes(workload))),
            TargetKind::Redis => {
                Prepared::Redis(endpoint.redis.clone(), endpoint.limit, Arc::new(crate::redis_target::shapes(workload, &endpoint.meter)))
            }
        }
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
