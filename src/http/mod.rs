//! The HTTP server: hyper 1 over HTTP/1.1 with keep-alive, one task per
//! connection, and graceful shutdown (stop accepting, let in-flight requests
//! finish, close idle keep-alive connections).

pub mod auth;
pub mod body;
pub mod error;
pub mod handlers;
pub mod router;

use crate::engine::Engine;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

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

/// Accepts connections until `shutdown` turns true, then waits for every open
/// connection to finish its in-flight request and close.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>, routes: Routes, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let mut conn_shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move {
                    let started = Instant::now();
                    let route = router::route_name(req.uri().path());
                    let resp = if routes == Routes::OpsOnly && !matches!(route, "metrics" | "healthz" | "readyz") {
                        error::ApiError::not_found("this listener serves only /metrics, /healthz and /readyz").response()
                    } else {
                        router::route(&state, req).await
                    };
                    crate::telemetry::http_request(route, resp.status().as_u16(), started.elapsed().as_secs_f64());
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let conn = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = conn_shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}
