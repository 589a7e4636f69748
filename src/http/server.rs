//! Accepting connections: the connection cap, one task per connection running
//! hyper's HTTP/1.1 over the route [`Table`] on one of the
//! [`ConnectionThreads`], the timeouts of [`super::timeouts`], and graceful
//! shutdown.
//!
//! **Over the cap** a new connection is accepted, answered
//! `503 {"error": {"code": "unavailable", …}}` with `Retry-After: 1` and
//! `Connection: close`, and closed (counted in
//! `meterd_http_connections_refused_total`). Refusing, rather than leaving it in
//! the kernel's accept backlog, tells the client (or its load balancer) at once
//! to go elsewhere, where a queued connection would wait unseen behind clients
//! that may be stalled for a whole header timeout.

use super::error::ApiError;
use super::routes::Table;
use super::threads::ConnectionThreads;
use super::timeouts::{DeadlineBody, Phase, TimedIo, Watchdog};
use super::{HttpState, Routes};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// The edge's limits (`[server]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeConfig {
    /// A request head must arrive whole within this: from the accept on a new
    /// connection, from its first byte on a keep-alive one. Else the
    /// connection is closed without an answer.
    pub header_read_timeout: Duration,
    /// A request body must arrive whole within this after its handler first
    /// waits for it (in practice, after its head). Else the request is
    /// answered `408 request_timeout` and the connection closed.
    pub body_read_timeout: Duration,
    /// A keep-alive connection with no request under way is closed after this.
    pub idle_timeout: Duration,
    /// Open connections per listener; one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for EdgeConfig {
    fn default() -> EdgeConfig {
        EdgeConfig {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
        }
    }
}

/// How long a refused connection may take to receive its 503 and close.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Accepts connections until `shutdown` turns true, then waits for every open
/// connection to finish its in-flight request and close. Connections run on
/// `threads`; the accepting, and the refusals over the cap, on the caller's
/// runtime.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    routes: Routes,
    mut shutdown: watch::Receiver<bool>,
    edge: EdgeConfig,
    threads: Arc<ConnectionThreads>,
) {
    let label = routes.listener();
    let table = Arc::new(Table::new(state, routes));
    let slots = Arc::new(Semaphore::new(edge.max_connections.min(Semaphore::MAX_PERMITS)));
    let refusal: Arc<[u8]> = refusal(edge.max_connections).into();
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
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let connection = Connection { table: table.clone(), edge, label, _slot: slot };
                let shutdown = shutdown.clone();
                threads.spawn(&mut connections, stream, move |stream| connection.run(stream, shutdown));
            }
            Err(_) => {
                crate::telemetry::connection_refused(label);
                tracing::debug!(listener = label, max_connections = edge.max_connections, "connection refused: at the cap");
                tokio::spawn(refuse(stream, refusal.clone()));
            }
        }
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    // Stop accepting: connections would otherwise queue in the backlog unserved.
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// The bytes of the answer to a connection over the cap.
fn refusal(max_connections: usize) -> Vec<u8> {
    let body = ApiError::unavailable(format!("too many open connections (server.max_connections = {max_connections})"), 1).body();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    [head.into_bytes(), body].concat()
}

/// Answers a connection over the cap and closes it once the client has read
/// the answer (closing with its request unread would reset the connection and
/// could destroy the answer before the client reads it).
async fn refuse(mut stream: TcpStream, answer: Arc<[u8]>) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// One accepted connection, holding one of its listener's slots.
struct Connection {
    table: Arc<Table>,
    edge: EdgeConfig,
    label: &'static str,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(self, stream: TcpStream, mut shutdown: watch::Receiver<bool>) {
        let _open = OpenGauge::new(self.label);
        let watchdog = Arc::new(Watchdog::new(self.edge.header_read_timeout, self.edge.idle_timeout));
        // Per request: the connection's clocks move (busy, then idle once the
        // answer is ready) and the body gets its deadline.
        let (table, clocks, body_read_timeout) = (self.table, watchdog.clone(), self.edge.body_read_timeout);
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            clocks.busy();
            let req = req.map(|body| DeadlineBody::new(body, body_read_timeout));
            let (table, clocks) = (table.clone(), clocks.clone());
            async move {
                let response = table.answer(req).await;
                clocks.idle();
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let io = TokioIo::new(TimedIo::new(stream, watchdog.clone()));
        let conn = http1::Builder::new().keep_alive(true).serve_connection(io, service);
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = shutdown.changed(), if !draining => {
                    // Idle connections close now; a request under way is finished.
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                phase = watchdog.expired() => {
                    // Dropping the connection closes the socket.
                    crate::telemetry::http_timeout(phase.label());
                    tracing::debug!(listener = self.label, phase = phase.label(), "connection timed out");
                    debug_assert_ne!(phase, Phase::Busy);
                    return;
                }
            }
        }
    }
}

/// Counts a connection in `meterd_http_connections_open` while it lives.
struct OpenGauge(&'static str);

impl OpenGauge {
    fn new(label: &'static str) -> OpenGauge {
        crate::telemetry::connections_open(label, 1.0);
        OpenGauge(label)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        crate::telemetry::connections_open(self.0, -1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_one_whole_http_response() {
        let bytes = refusal(7);
        let text = String::from_utf8(bytes).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!(json["error"]["code"], "unavailable");
        assert!(json["error"]["message"].as_str().unwrap_or("").contains("max_connections = 7"), "{body}");
    }
}
