//! Test harness shared by the integration tests: start meterd in-process on
//! 127.0.0.1:0 with a temp data dir, restart it on the same dir, and a small HTTP
//! client over real TCP connections.
#![allow(dead_code)]

pub mod ch;
pub mod engine;
pub mod load;
pub mod mount;
pub mod ports;
pub mod process;
pub mod redis_server;
pub mod require;
pub mod stripe_fake;

use bytes::Bytes;
use chrono::{Datelike, TimeZone, Utc};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use meterd::config::Config;
use meterd::AppHandle;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpStream;

/// The interview platform of the issue: starter (default) 300 min/month, 3
/// interviews/day, 5 analyses/month; professional; premium unlimited.
pub const INTERVIEW: &str = include_str!("../../config/examples/interview-platform.toml");

/// Rewrites `[server] listen` and `[storage] data_dir` of a config text.
pub fn with_dirs(toml: &str, data_dir: &Path) -> String {
    let mut value: toml::Table = toml.parse().expect("test config parses");
    let server = value.entry("server").or_insert_with(|| toml::Value::Table(Default::default()));
    if let toml::Value::Table(t) = server {
        t.insert("listen".into(), toml::Value::String("127.0.0.1:0".into()));
    }
    let storage = value.entry("storage").or_insert_with(|| toml::Value::Table(Default::default()));
    if let toml::Value::Table(t) = storage {
        t.insert("data_dir".into(), toml::Value::String(data_dir.display().to_string()));
    }
    toml::to_string(&value).expect("test config serializes")
}

/// A running in-process meterd and its data dir.
pub struct TestServer {
    pub app: Option<AppHandle>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: String,
}

impl TestServer {
    /// Starts meterd with `toml` (listen and data_dir are filled in).
    pub async fn start(toml: &str) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(toml, dir).await
    }

    pub async fn start_in(toml: &str, dir: tempfile::TempDir) -> TestServer {
        let config = with_dirs(toml, dir.path());
        let valid = Config::parse(&config, "test.toml").and_then(|c| c.validate("test.toml")).expect("valid test config");
        let app = AppHandle::start(valid).await.expect("meterd starts");
        TestServer { addr: app.addr, app: Some(app), dir, config: toml.to_string() }
    }

    /// Graceful shutdown, then a fresh start on the same data dir.
    pub async fn restart(mut self) -> TestServer {
        if let Some(app) = self.app.take() {
            app.shutdown().await.expect("clean shutdown");
        }
        let config = self.config.clone();
        TestServer::start_in(&config, self.dir).await
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await.expect("clean shutdown");
        }
    }

    pub fn app(&self) -> &AppHandle {
        self.app.as_ref().expect("running")
    }

    pub fn client(&self) -> Client {
        Client { addr: self.addr, token: None }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

/// An HTTP/1.1 client; one connection per request.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

/// A connection to `addr` if a server listens there. Connecting to a loopback
/// port nobody listens on can still succeed when Linux picks that same port as
/// the source (TCP simultaneous open: the socket connects to itself), which
/// would make a server look up before it is; such a connection is refused too.
pub async fn connect_listening(addr: impl tokio::net::ToSocketAddrs) -> Option<TcpStream> {
    let stream = TcpStream::connect(addr).await.ok()?;
    (stream.local_addr().ok()? != stream.peer_addr().ok()?).then_some(stream)
}

/// A response: status, headers, and the body parsed as JSON (Null if not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    /// The `error.code` of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Client {
    pub fn with_token(&self, token: &str) -> Client {
        Client { addr: self.addr, token: Some(token.to_string()) }
    }

    /// Sends a request with an optional content type and body; panics, naming
    /// the step, if the exchange fails.
    pub async fn send(&self, method: Method, path: &str, content_type: Option<&str>, body: impl Into<Bytes>) -> Resp {
        self.try_send(method, path, content_type, body).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Client::send`], with a failed exchange (no server yet, a cut
    /// connection) an error instead of a panic.
    pub async fn try_send(&self, method: Method, path: &str, content_type: Option<&str>, body: impl Into<Bytes>) -> Result<Resp, String> {
        let stream = connect_listening(self.addr).await.ok_or_else(|| format!("connect: nothing listens on {}", self.addr))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", "localhost");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(body.into())).map_err(|e| format!("request: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| format!("response: {e}"))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Resp { status, headers, body, text })
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.send(Method::POST, path, Some("application/json"), body.to_string()).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, path, None, Bytes::new()).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Resp {
        self.send(Method::PUT, path, Some("application/json"), body.to_string()).await
    }

    /// POST /v1/events with a JSON body; asserts nothing.
    pub async fn events(&self, body: &Value) -> Resp {
        self.post_json("/v1/events", body).await
    }

    /// POST /v1/check.
    pub async fn check(&self, body: &Value) -> Resp {
        self.post_json("/v1/check", body).await
    }
}

/// A unique event id.
pub fn uid(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// time

/// One hour in milliseconds.
pub const HOUR: i64 = 3_600_000;

/// One day in milliseconds.
pub const DAY: i64 = 86_400_000;

/// The current time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// RFC 3339 as meterd renders it (`2026-12-01T00:00:00Z`).
pub fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms).unwrap().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The start (UTC) of the calendar month after the one `ms` falls in.
pub fn next_month_start(ms: i64) -> i64 {
    let at = Utc.timestamp_millis_opt(ms).unwrap();
    let (y, m) = if at.month() == 12 { (at.year() + 1, 1) } else { (at.year(), at.month() + 1) };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap().timestamp_millis()
}

/// Sleeps past a multiple of `period` ms if "now" is within 5 s after or 20 s before one.
async fn away_from_boundary(period: i64) {
    let now = now_ms();
    let into = now.rem_euclid(period);
    let left = period - into;
    if into < 5_000 {
        tokio::time::sleep(Duration::from_millis((5_000 - into + 100) as u64)).await;
    } else if left < 20_000 {
        tokio::time::sleep(Duration::from_millis((left + 5_100) as u64)).await;
    }
}

/// Keeps a test away from a UTC hour (and day, month) boundary, so "now" stays in one hour window.
pub async fn away_from_hour_boundary() {
    away_from_boundary(HOUR).await
}

/// Keeps a test away from a UTC day (and month) boundary, so "now" stays in one day window.
pub async fn away_from_day_boundary() {
    away_from_boundary(DAY).await
}

// ---------------------------------------------------------------------------
// API calls

/// The `error.message` of an error body ("" if there is none).
pub fn message(r: &Resp) -> &str {
    r.body["error"]["message"].as_str().unwrap_or("")
}

/// An event with a fresh id for `customer`, `meter` and `quantity`.
pub fn event(customer: &str, meter: &str, quantity: impl Into<Value>) -> Value {
    json!({"id": uid("e"), "customer": customer, "meter": meter, "quantity": quantity.into()})
}

/// POST /v1/events; asserts 202 and returns the body.
pub async fn ingest(c: &Client, body: Value) -> Value {
    let r = c.events(&body).await;
    assert_eq!(r.status, 202, "{}", r.text);
    r.body
}

/// POST /v1/check without consuming; asserts 200 and returns the body.
pub async fn check(c: &Client, customer: &str, meter: &str, quantity: impl Into<Value>) -> Value {
    let r = c.check(&json!({"customer": customer, "meter": meter, "quantity": quantity.into()})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

/// PUT /v1/customers/{customer}/entitlements; asserts nothing.
pub async fn put(c: &Client, customer: &str, doc: Value) -> Resp {
    c.put_json(&format!("/v1/customers/{customer}/entitlements"), &doc).await
}
