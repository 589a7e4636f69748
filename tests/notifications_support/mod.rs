//! A webhook receiver for the notification tests: a real HTTP server on
//! 127.0.0.1:0 that verifies every request's Standard Webhooks signature with
//! the reference `standardwebhooks` crate, records what it got, and can be told
//! to fail the first N deliveries of each `webhook-id`.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A 32-byte key, as `whsec_` + base64.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=";

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub timestamp: String,
    pub body: Value,
    /// The signature verified (always true: a bad one fails the test at once).
    pub verified: bool,
    /// What the receiver answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    got: Mutex<Vec<Delivery>>,
    /// Fail this many deliveries of each id before answering 2xx.
    fail_first: AtomicU32,
    /// Answer 503 to everything.
    down: AtomicBool,
    bad_signatures: Mutex<Vec<String>>,
    seen: Mutex<HashMap<String, u32>>,
}

/// The receiver; dropped, it stops.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let webhook = Arc::new(standardwebhooks::Webhook::new(SECRET).expect("secret"));
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (s, webhook) = (s.clone(), webhook.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (s, webhook) = (s.clone(), webhook.clone());
                        async move { Ok::<_, std::convert::Infallible>(handle(&s, &webhook, req).await) }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                });
            }
        });
        Receiver { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn fail_first(&self, n: u32) {
        self.state.fail_first.store(n, Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Every request so far.
    pub fn all(&self) -> Vec<Delivery> {
        self.state.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The requests answered 2xx.
    pub fn delivered(&self) -> Vec<Delivery> {
        self.all().into_iter().filter(|d| d.status < 300).collect()
    }

    pub fn bad_signatures(&self) -> Vec<String> {
        self.state.bad_signatures.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `pred` holds over the deliveries (2xx), or `limit` passes.
    pub async fn wait_for(&self, limit: Duration, pred: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        let deadline = Instant::now() + limit;
        loop {
            let d = self.delivered();
            if pred(&d) || Instant::now() > deadline {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn handle(s: &State, webhook: &standardwebhooks::Webhook, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let headers = req.headers().clone();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let timestamp = headers.get("webhook-timestamp").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let verified = webhook.verify(&body, &headers).is_ok();
    if !verified {
        s.bad_signatures.lock().unwrap_or_else(|p| p.into_inner()).push(id.clone());
    }
    let json_ok = headers.get("content-type").and_then(|v| v.to_str().ok()) == Some("application/json");
    let seen = {
        let mut seen = s.seen.lock().unwrap_or_else(|p| p.into_inner());
        let n = seen.entry(id.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let status = if !verified || !json_ok {
        StatusCode::BAD_REQUEST
    } else if s.down.load(Ordering::SeqCst) || seen <= s.fail_first.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::NO_CONTENT
    };
    let parsed = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.got.lock().unwrap_or_else(|p| p.into_inner()).push(Delivery { id, timestamp, body: parsed, verified, status: status.as_u16() });
    Response::builder().status(status).body(Full::new(Bytes::new())).unwrap_or_default()
}

/// A `[notifications]` section sending everything to `url`.
pub fn notifications(url: &str, env: &str, extra: &str) -> String {
    std::env::set_var(env, SECRET);
    format!("[notifications]\n{extra}\n[[notifications.endpoints]]\nname = \"app\"\nurl = \"{url}\"\nsecret_env = \"{env}\"\n")
}

/// The thresholds of `limit.threshold` deliveries, in order.
pub fn thresholds(d: &[Delivery], customer: &str) -> Vec<i64> {
    d.iter()
        .filter(|d| d.body["type"] == "limit.threshold" && d.body["data"]["customer"] == customer)
        .map(|d| d.body["data"]["threshold"].as_i64().unwrap_or(-1))
        .collect()
}
