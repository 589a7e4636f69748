//! An in-process fake of Stripe's meter event API (STRIPE.md): v1 meter events,
//! cancels, v2 sessions and the stream. It checks what Stripe checks (auth
//! header, required fields and formats, whole-number values, the timestamp
//! window, identifier uniqueness with the duplicate answer, the 100-event cap,
//! session expiry) and records every breach as a *violation* for the test to
//! assert on. Faults can be queued: an HTTP status, a connection closed after the
//! request was processed (the ambiguous case), a slow answer.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;

/// A fault for the next request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer this status (429, 500, 503...) without processing.
    Status(u16),
    /// Process the request, then close the connection without answering.
    CloseAfterProcessing,
    /// Process the request, then answer after this long.
    Slow(Duration),
}

/// An event the fake holds.
#[derive(Debug, Clone)]
pub struct FakeEvent {
    pub event_name: String,
    pub customer: String,
    pub value: i64,
    pub timestamp_s: i64,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub key: String,
    /// By identifier.
    pub events: BTreeMap<String, FakeEvent>,
    pub cancelled: HashSet<String>,
    pub faults: VecDeque<Fault>,
    /// Every answer waits this long after its request was processed.
    pub delay: Duration,
    /// Requests processed and then held for a second or more (answer pending).
    pub held: u64,
    /// Once this many events are held, every answer is held for 30 s after its
    /// request was processed (where a crash makes the ambiguous case).
    pub hold_from_events: Option<usize>,
    pub violations: Vec<String>,
    pub duplicates: u64,
    pub unauthorized: u64,
    pub requests: u64,
    /// When each request arrived.
    pub request_times: Vec<std::time::Instant>,
    pub sessions: HashMap<String, bool>,
    pub sessions_opened: u64,
    pub stream_requests: u64,
    pub max_batch: usize,
    /// After this many successful stream requests, every session expires.
    pub expire_sessions_after: Option<u64>,
}

impl FakeState {
    /// Sum of held, not cancelled, values per (event name, Stripe customer).
    pub fn totals(&self) -> BTreeMap<(String, String), i64> {
        let mut out = BTreeMap::new();
        for (id, e) in &self.events {
            if !self.cancelled.contains(id) {
                *out.entry((e.event_name.clone(), e.customer.clone())).or_insert(0) += e.value;
            }
        }
        out
    }
}

/// The running fake.
pub struct StripeFake {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<FakeState>>,
}

impl StripeFake {
    pub async fn start(key: &str) -> StripeFake {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let addr = listener.local_addr().expect("fake addr");
        let state = Arc::new(Mutex::new(FakeState { key: key.to_string(), ..FakeState::default() }));
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                });
            }
        });
        StripeFake { addr, state }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn totals(&self) -> BTreeMap<(String, String), i64> {
        self.lock().totals()
    }

    pub fn fault(&self, faults: &[Fault]) {
        self.lock().faults.extend(faults.iter().cloned());
    }
}

type Answer = Result<Response<Full<Bytes>>, Box<dyn std::error::Error + Send + Sync>>;

fn respond(status: u16, body: Value, should_retry: Option<bool>) -> Response<Full<Bytes>> {
    let mut r = Response::builder().status(status).header("content-type", "application/json");
    if let Some(s) = should_retry {
        r = r.header("Stripe-Should-Retry", if s { "true" } else { "false" });
    }
    r.body(Full::new(Bytes::from(body.to_string()))).expect("fake response")
}

fn error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    respond(status, json!({"error": {"type": "invalid_request_error", "code": code, "message": message}}), Some(false))
}

fn decode(text: &str) -> String {
    let bytes = text.replace('+', " ").into_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&bytes[i + 1..i + 3]), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

fn parse_form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn whole_number(text: &str) -> Option<i64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Checks the timestamp window: the past 35 days, at most 5 minutes ahead.
fn timestamp_ok(ts: i64) -> bool {
    let now = Utc::now().timestamp();
    ts >= now - 35 * 86_400 && ts <= now + 300
}

/// Validates one event; `Err` names the problem.
fn validate(
    event_name: Option<&str>,
    customer: Option<&str>,
    value: Option<&str>,
    identifier: Option<&str>,
    ts: Option<i64>,
) -> Result<FakeEvent, String> {
    let event_name = event_name.filter(|e| !e.is_empty() && e.len() <= 100).ok_or("event_name missing or too long")?;
    let customer = customer.filter(|c| c.starts_with("cus_")).ok_or("payload[stripe_customer_id] missing or malformed")?;
    let value = value.and_then(whole_number).ok_or("payload[value] is not a whole number")?;
    let identifier = identifier.ok_or("identifier missing")?;
    if identifier.is_empty() || identifier.len() > 100 {
        return Err("identifier longer than 100".into());
    }
    let ts = ts.ok_or("timestamp missing or malformed")?;
    if !timestamp_ok(ts) {
        return Err(format!("timestamp {ts} outside the accepted window"));
    }
    Ok(FakeEvent { event_name: event_name.into(), customer: customer.into(), value, timestamp_s: ts })
}

fn bearer(req_headers: &hyper::HeaderMap) -> Option<String> {
    let v = req_headers.get("authorization")?.to_str().ok()?;
    let token = v.strip_prefix("Bearer ")?;
    (!token.is_empty() && !token.contains(' ')).then(|| token.to_string())
}

async fn handle(state: Arc<Mutex<FakeState>>, req: Request<Incoming>) -> Answer {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let fault = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.requests += 1;
        s.request_times.push(std::time::Instant::now());
        s.faults.pop_front()
    };
    if let Some(Fault::Status(status)) = fault {
        return Ok(respond(status, json!({"error": {"type": "api_error", "message": "injected"}}), None));
    }
    let answer = process(&state, &parts, &body);
    // Processed, answer not yet given: the ambiguous window a crash can hit.
    let delay = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let delay = if s.hold_from_events.is_some_and(|n| s.events.len() >= n) { Duration::from_secs(30) } else { s.delay };
        if delay >= Duration::from_secs(1) {
            s.held += 1;
        }
        delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match fault {
        Some(Fault::CloseAfterProcessing) => Err("closing after processing (injected)".into()),
        Some(Fault::Slow(d)) => {
            tokio::time::sleep(d).await;
            Ok(answer)
        }
        _ => Ok(answer),
    }
}

fn process(state: &Arc<Mutex<FakeState>>, parts: &hyper::http::request::Parts, body: &[u8]) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let path = parts.uri.path().to_string();
    let Some(token) = bearer(&parts.headers) else {
        s.violations.push(format!("{path}: malformed or missing Authorization header"));
        return error(401, "", "You did not provide an API key.");
    };
    if parts.headers.get("stripe-version").is_none() {
        s.violations.push(format!("{path}: no Stripe-Version header"));
    }
    if parts.method != hyper::Method::POST {
        s.violations.push(format!("{path}: method {}", parts.method));
        return error(405, "", "method");
    }
    let content_type = parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let is_secret_route = path != "/v2/billing/meter_event_stream";
    if is_secret_route && token != s.key {
        s.unauthorized += 1;
        return error(401, "", "Invalid API Key provided: sk_****");
    }
    match path.as_str() {
        "/v1/billing/meter_events" => {
            if content_type != "application/x-www-form-urlencoded" {
                s.violations.push(format!("meter_events: content type {content_type:?}"));
            }
            let f = parse_form(body);
            let ts = f.get("timestamp").and_then(|t| t.parse::<i64>().ok());
            let event = match validate(
                f.get("event_name").map(String::as_str),
                f.get("payload[stripe_customer_id]").map(String::as_str),
                f.get("payload[value]").map(String::as_str),
                f.get("identifier").map(String::as_str),
                ts,
            ) {
                Ok(e) => e,
                Err(why) => {
                    s.violations.push(format!("meter_events: {why}"));
                    return error(400, "parameter_invalid", &why);
                }
            };
            let identifier = f.get("identifier").cloned().unwrap_or_default();
            if s.events.contains_key(&identifier) {
                s.duplicates += 1;
                return error(400, "", &format!("An event already exists with identifier {identifier}."));
            }
            s.events.insert(identifier.clone(), event.clone());
            respond(
                200,
                json!({"object": "billing.meter_event", "event_name": event.event_name, "identifier": identifier,
                       "payload": {"stripe_customer_id": event.customer, "value": event.value.to_string()},
                       "timestamp": event.timestamp_s, "created": Utc::now().timestamp(), "livemode": false}),
                None,
            )
        }
        "/v1/billing/meter_event_adjustments" => {
            let f = parse_form(body);
            let id = f.get("cancel[identifier]").cloned().unwrap_or_default();
            if f.get("type").map(String::as_str) != Some("cancel") || !s.events.contains_key(&id) {
                s.violations.push(format!("adjustment: bad cancel of {id:?}"));
                return error(400, "parameter_invalid", "no such event");
            }
            s.cancelled.insert(id);
            respond(200, json!({"object": "billing.meter_event_adjustment", "status": "pending", "type": "cancel"}), None)
        }
        "/v2/billing/meter_event_session" => {
            s.sessions_opened += 1;
            let token = format!("ek_test_{}", s.sessions_opened);
            s.sessions.insert(token.clone(), true);
            let expires = (Utc::now() + chrono::Duration::minutes(15)).format("%Y-%m-%dT%H:%M:%S.000Z").to_string();
            respond(
                200,
                json!({"id": format!("mes_{}", s.sessions_opened), "object": "v2.billing.meter_event_session",
                       "authentication_token": token, "created": Utc::now().to_rfc3339(), "expires_at": expires}),
                None,
            )
        }
        "/v2/billing/meter_event_stream" => {
            match s.sessions.get(&token) {
                Some(true) => {}
                Some(false) => return error(401, "billing_meter_event_session_expired", "The session has expired."),
                None => {
                    s.violations.push("stream: unknown session token".into());
                    return error(401, "", "unknown token");
                }
            }
            if content_type != "application/json" {
                s.violations.push(format!("stream: content type {content_type:?}"));
            }
            let value: Value = serde_json::from_slice(body).unwrap_or_default();
            let Some(events) = value["events"].as_array() else {
                s.violations.push("stream: no events array".into());
                return error(400, "parameter_invalid", "events");
            };
            if events.len() > 100 || events.is_empty() {
                s.violations.push(format!("stream: {} events in one request", events.len()));
                return error(400, "parameter_invalid", "at most 100 events");
            }
            let mut parsed = Vec::new();
            for e in events {
                let ts = e["timestamp"].as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.timestamp());
                match validate(
                    e["event_name"].as_str(),
                    e["payload"]["stripe_customer_id"].as_str(),
                    e["payload"]["value"].as_str(),
                    e["identifier"].as_str(),
                    ts,
                ) {
                    Ok(ev) => parsed.push((e["identifier"].as_str().unwrap_or("").to_string(), ev)),
                    Err(why) => {
                        s.violations.push(format!("stream: {why}"));
                        return error(400, "parameter_invalid", &why);
                    }
                }
            }
            s.max_batch = s.max_batch.max(parsed.len());
            for (id, ev) in parsed {
                // v2 validates asynchronously: a repeated identifier is dropped.
                match s.events.entry(id) {
                    std::collections::btree_map::Entry::Occupied(_) => s.duplicates += 1,
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(ev);
                    }
                }
            }
            s.stream_requests += 1;
            if s.expire_sessions_after.is_some_and(|n| s.stream_requests >= n) {
                s.expire_sessions_after = None;
                for live in s.sessions.values_mut() {
                    *live = false;
                }
            }
            respond(200, json!({}), None)
        }
        other => {
            s.violations.push(format!("unknown route {other}"));
            error(404, "", "unknown route")
        }
    }
}
