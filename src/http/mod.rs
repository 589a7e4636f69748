//! The HTTP edge: hyper 1 over HTTP/1.1 with keep-alive, one task per
//! connection on a thread of [`threads`], timeouts and a connection cap ([`EdgeConfig`]), and graceful
//! shutdown (stop accepting, let in-flight requests finish, close idle
//! keep-alive connections).
//!
//! [`routes`] is the one route table (paths, methods, handlers and the names the
//! request metrics use); [`server`] accepts connections and enforces the limits
//! with the help of [`timeouts`]; [`handlers`] turn requests into engine calls.
//!
//! Not axum: the same edge on axum 0.8 (with tower-http's panic layer) was
//! built and measured against this one in same-run A/Bs: 4–8 % fewer check
//! requests/s and 12–15 % more server CPU per check and per single event, over
//! the 5 % the project allows for a framework. The one route table is what it
//! would have brought, and [`routes`] has it without (see BENCHMARKS.md).

// Adjustments (issue 19).
pub mod adjustments;
pub mod auth;
// Stripe subscription sync, customers and portal tokens (issue 20).
pub mod billing;
pub mod body;
// Prepaid credits and grants (issue 18).
pub mod credits;
pub mod error;
pub mod finish;
pub mod handlers;
pub mod portal;
// Threshold notifications (issue 17).
pub mod notifications;
// Reservations (issue 19).
pub mod reservations;
pub mod routes;
pub mod server;
pub mod threads;
pub mod timeouts;
// The operator console and the usage widget (issue 22).
pub mod ui;

pub use server::{serve, EdgeConfig};
pub use threads::ConnectionThreads;

use crate::engine::Engine;

/// A request body as handlers read it: hyper's, under the body-read deadline.
pub type RequestBody = timeouts::DeadlineBody<hyper::body::Incoming>;
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
    /// The background tasks' states: `/readyz` names one that died.
    pub health: crate::health::Health,
    // Stripe subscription sync and portal tokens (issue 20).
    /// The Stripe webhook receiver, when `[stripe.webhooks]` is configured.
    pub stripe_webhooks: Option<Arc<crate::billing_sync::StripeWebhooks>>,
    /// Issues and verifies portal tokens.
    pub portal: Arc<portal::PortalTokens>,
    /// Threshold notifications (issue 17), with `[notifications]`.
    pub notifier: Option<Arc<crate::notify::Notifier>>,
    /// Adjustments (issue 19): the service and its audit list.
    pub adjustments: Arc<crate::adjust::Adjustments>,
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
