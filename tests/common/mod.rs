//! Test harness shared by the integration tests: start meterd in-process on
//! 127.0.0.1:0 with a temp data dir, restart it on the same dir, and a small HTTP
//! client over real TCP connections.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use meterd::config::Config;
use meterd::AppHandle;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
        let valid = Config::parse(&config, "test.toml")
            .and_then(|c| c.validate("test.toml"))
            .expect("valid test config");
        let app = AppHandle::start(valid).await.expect("meterd starts");
        TestServer {
            addr: app.addr,
            app: Some(app),
            dir,
            config: toml.to_string(),
        }
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
        Client {
            addr: self.addr,
            token: None,
        }
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
        Client {
            addr: self.addr,
            token: Some(token.to_string()),
        }
    }

    /// Sends a request with an optional content type and body.
    pub async fn send(&self, method: Method, path: &str, content_type: Option<&str>, body: impl Into<Bytes>) -> Resp {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", "localhost");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(body.into())).expect("request");
        let resp = sender.send_request(req).await.expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
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
