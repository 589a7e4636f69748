//! The HTTP edge: axum over hyper's HTTP/1.1 with keep-alive, one task per
//! connection, timeouts and a connection cap ([`EdgeConfig`]), and graceful
//! shutdown (stop accepting, let in-flight requests finish, close idle
//! keep-alive connections).
//!
//! [`routes`] is the one route table (paths, methods, handlers and the names the
//! request metrics use); [`server`] accepts connections and enforces the limits
//! with the help of [`timeouts`]; [`handlers`] turn requests into engine calls.

pub mod auth;
pub mod body;
pub mod error;
pub mod handlers;
pub mod routes;
pub mod server;
pub mod timeouts;

pub use server::{serve, EdgeConfig};

use crate::engine::Engine;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What every handler shares.
pub struct HttpState {
    pub engine: Arc<Engine>,
    pub auth: auth::Auth,
    pub max_body: u64,
    pub prometheus: PrometheusHandle,
    /// Set when shutdown begins: `/readyz` turns 503 and new API requests too.
    pub shutting_down: AtomicBool,
    /// The Stripe reporter's status, when `[stripe]` is configured.
    pub stripe: Option<Arc<crate::report::StatusBoard>>,
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    /// The API and the operational routes.
    All,
    /// Only `/metrics`, `/healthz` and `/readyz` (the `metrics.listen` address,
    /// which may face a scraper network and must never expose the API).
    OpsOnly,
}

impl Routes {
    /// The `listener` label of the connection metrics.
    pub fn listener(self) -> &'static str {
        match self {
            Routes::All => "api",
            Routes::OpsOnly => "ops",
        }
    }
}
