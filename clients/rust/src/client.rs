//! The HTTP client and the background batcher.
//!
//! One batch is in flight at a time, in tracking order. The batcher's state
//! (buffer, in-flight batch, failures) sits behind one mutex; the sender task
//! is woken by a `Notify`, and flushes and blocked `track()` calls wait on a
//! `watch` counter bumped at every change, so no wake-up is missed.

use crate::error::Error;
use crate::types::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

type Http = hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Retries: exponential backoff with jitter (half fixed, half random), or the
/// server's `Retry-After` when longer (honoured up to 60 s).
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Retry {
    /// The wait before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32, retry_after: Option<f64>) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.max_delay);
        let jittered = cap / 2 + cap.mul_f64(fastrand::f64() / 2.0);
        match retry_after {
            Some(s) if s.is_finite() && s > jittered.as_secs_f64() => Duration::from_secs_f64(s.min(60.0)),
            _ => jittered,
        }
    }
}

/// What `track()` does when `max_buffer_size` events are waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Drop the oldest waiting event (counted in `Stats::dropped`).
    DropOldest,
    /// Wait for room.
    Block,
    /// Return [`Error::BufferFull`].
    Error,
}

/// The client's settings; `Config::new(url)` gives the defaults.
#[derive(Debug, Clone)]
pub struct Config {
    pub base_url: String,
    pub api_key: Option<String>,
    /// One attempt's time limit (default 10 s).
    pub timeout: Duration,
    /// Direct calls (default 3 attempts, 100 ms base, 10 s cap).
    pub retry: Retry,
    /// Background batches and `ingest()` (default 12 attempts: about a minute).
    pub batch_retry: Retry,
    /// Send when this many events wait (default 1,000; at most 10,000).
    pub batch_size: usize,
    /// Send what waits this long after the oldest (default 1 s).
    pub flush_interval: Duration,
    /// Waiting events, the batch in flight excluded (default 100,000).
    pub max_buffer_size: usize,
    pub on_full: OnFull,
}

impl Config {
    pub fn new(base_url: impl Into<String>) -> Config {
        Config {
            base_url: base_url.into(),
            api_key: None,
            timeout: Duration::from_secs(10),
            retry: Retry { max_attempts: 3, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(10) },
            batch_retry: Retry { max_attempts: 12, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(10) },
            batch_size: 1000,
            flush_interval: Duration::from_secs(1),
            max_buffer_size: 100_000,
            on_full: OnFull::DropOldest,
        }
    }
    pub fn api_key(mut self, key: impl Into<String>) -> Config {
        self.api_key = Some(key.into());
        self
    }
}

/// Counters since the client was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub tracked: u64,
    /// Events meterd accepted (first seen).
    pub accepted: u64,
    /// Events meterd already had: a retry of a batch whose answer was lost.
    pub duplicates: u64,
    /// Events given up on.
    pub failed: u64,
    pub dropped: u64,
    pub batches: u64,
    /// Retried attempts (any call).
    pub retries: u64,
    pub buffered: u64,
    pub in_flight: u64,
}

enum Pushed {
    Done,
    Full,
}

struct Entry {
    seq: u64,
    event: Event,
    at: Instant,
}

#[derive(Default)]
struct State {
    buffer: VecDeque<Entry>,
    in_flight: Vec<u64>,
    seq: u64,
    drain_upto: u64,
    closed: bool,
    failures: Vec<(u64, Error)>,
    stats: Stats,
}

impl State {
    fn pending_min(&self) -> u64 {
        let a = self.in_flight.first().copied().unwrap_or(u64::MAX);
        let b = self.buffer.front().map(|e| e.seq).unwrap_or(u64::MAX);
        a.min(b)
    }
}

struct Shared {
    config: Config,
    http: Http,
    state: Mutex<State>,
    wake: Notify,
    progress: watch::Sender<u64>,
}

/// A meterd client; cheap to clone (one shared buffer and sender task).
/// Made inside a Tokio runtime, which runs its sender task.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The event as it will be sent: id (UUIDv7) and timestamp (now, Unix ms)
/// filled in when absent, so that every retry carries the same ones.
pub(crate) fn normalize(mut e: Event) -> Result<Event, Error> {
    if e.customer.is_empty() {
        return Err(Error::InvalidEvent { field: "customer", reason: "must not be empty" });
    }
    if e.meter.is_empty() {
        return Err(Error::InvalidEvent { field: "meter", reason: "must not be empty" });
    }
    if let Some(q) = e.quantity {
        if !q.is_finite() || q < 0.0 {
            return Err(Error::InvalidEvent { field: "quantity", reason: "must be a finite number, not negative" });
        }
    }
    if e.id.is_none() {
        e.id = Some(uuid::Uuid::now_v7().to_string());
    }
    if e.timestamp.is_none() {
        e.timestamp = Some(serde_json::Value::from(now_ms()));
    }
    Ok(e)
}

impl Client {
    /// A client and its sender task (spawned on the current Tokio runtime).
    pub fn new(config: Config) -> Result<Client, Error> {
        if config.batch_size == 0 || config.batch_size > 10_000 {
            return Err(Error::Setup("batch_size must be from 1 to 10000".into()));
        }
        if config.max_buffer_size == 0 {
            return Err(Error::Setup("max_buffer_size must be positive".into()));
        }
        let handle = tokio::runtime::Handle::try_current().map_err(|_| Error::Setup("Client::new needs a Tokio runtime".into()))?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| Error::Setup(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .build();
        let http =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https);
        let mut config = config;
        config.base_url = config.base_url.trim_end_matches('/').to_string();
        let shared =
            Arc::new(Shared { config, http, state: Mutex::new(State::default()), wake: Notify::new(), progress: watch::Sender::new(0) });
        handle.spawn(sender(Arc::downgrade(&shared)));
        Ok(Client { shared })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    /// Counters since the client was made.
    pub fn stats(&self) -> Stats {
        let s = self.lock();
        Stats { buffered: s.buffer.len() as u64, in_flight: s.in_flight.len() as u64, ..s.stats }
    }

    // ---------------------------------------------------------------------
    // Direct calls

    /// Any API call with the direct-call retries: the parsed JSON answer.
    pub async fn request<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<&impl Serialize>) -> Result<T, Error> {
        let bytes = match body {
            Some(b) => Some(Bytes::from(serde_json::to_vec(b).map_err(|e| Error::Decode(e.to_string()))?)),
            None => None,
        };
        request(&self.shared, method, path, bytes, self.shared.config.retry).await
    }

    /// Whether `customer` may use `quantity` (default 1) more of `meter`; records nothing.
    pub async fn check(&self, customer: &str, meter: &str, quantity: Option<f64>) -> Result<CheckResult, Error> {
        let body = serde_json::json!({"customer": customer, "meter": meter, "quantity": quantity.unwrap_or(1.0)});
        self.request(Method::POST, "/v1/check", Some(&body)).await
    }

    /// Check and record in one step as event `id` (a new UUIDv7 when `None`;
    /// this call's retries reuse it, so it is recorded once).
    pub async fn consume(&self, customer: &str, meter: &str, quantity: Option<f64>, id: Option<&str>) -> Result<CheckResult, Error> {
        let id = id.map(str::to_string).unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let body =
            serde_json::json!({"customer": customer, "meter": meter, "quantity": quantity.unwrap_or(1.0), "consume": true, "id": id});
        self.request(Method::POST, "/v1/check", Some(&body)).await
    }

    /// Holds `quantity` until settled, released or expired (`expires_in`:
    /// `"2h"`; `None`: until released).
    pub async fn reserve(&self, id: &str, customer: &str, meter: &str, quantity: f64, expires_in: Option<&str>) -> Result<Reserved, Error> {
        let body = serde_json::json!({"id": id, "customer": customer, "meter": meter, "quantity": quantity, "expires_in": expires_in});
        self.request(Method::POST, "/v1/reservations", Some(&body)).await
    }

    /// Records the actual quantity (`None`: the quantity held) and releases the hold.
    pub async fn settle(&self, id: &str, quantity: Option<f64>) -> Result<Reservation, Error> {
        let body = match quantity {
            Some(q) => serde_json::json!({"quantity": q}),
            None => serde_json::json!({}),
        };
        let r: ReservationBody = self.request(Method::POST, &format!("/v1/reservations/{}/settle", seg(id)), Some(&body)).await?;
        Ok(r.reservation)
    }

    /// Releases a hold without recording usage.
    pub async fn release(&self, id: &str) -> Result<Reservation, Error> {
        let r: ReservationBody =
            self.request(Method::POST, &format!("/v1/reservations/{}/release", seg(id)), Some(&serde_json::json!({}))).await?;
        Ok(r.reservation)
    }

    pub async fn reservation(&self, id: &str) -> Result<Reservation, Error> {
        let r: ReservationBody = self.request(Method::GET, &format!("/v1/reservations/{}", seg(id)), None::<&()>).await?;
        Ok(r.reservation)
    }

    /// Usage over time (`GET /v1/usage`).
    pub async fn usage(&self, q: &UsageQuery) -> Result<UsageSeries, Error> {
        let mut path = format!("/v1/usage?meter={}&from={}&to={}", seg(&q.meter), seg(&q.from), seg(&q.to));
        for (k, v) in [("granularity", &q.granularity), ("customer", &q.customer), ("group_by", &q.group_by)] {
            if let Some(v) = v {
                path.push_str(&format!("&{k}={}", seg(v)));
            }
        }
        self.request(Method::GET, &path, None::<&()>).await
    }

    /// A customer's limits, usage and features.
    pub async fn customer_usage(&self, customer: &str) -> Result<CustomerUsage, Error> {
        self.request(Method::GET, &format!("/v1/customers/{}/usage", seg(customer)), None::<&()>).await
    }

    pub async fn balances(&self, customer: &str) -> Result<Balances, Error> {
        self.request(Method::GET, &format!("/v1/customers/{}/balances", seg(customer)), None::<&()>).await
    }

    pub async fn grants(&self, customer: &str) -> Result<Vec<Grant>, Error> {
        let g: GrantsBody = self.request(Method::GET, &format!("/v1/customers/{}/grants", seg(customer)), None::<&()>).await?;
        Ok(g.grants)
    }

    /// Grants credits (scope `admin`); the same id again changes nothing.
    pub async fn create_grant(&self, customer: &str, grant: &GrantRequest) -> Result<Grant, Error> {
        self.request(Method::POST, &format!("/v1/customers/{}/grants", seg(customer)), Some(grant)).await
    }

    pub async fn void_grant(&self, customer: &str, id: &str) -> Result<Grant, Error> {
        self.request(Method::DELETE, &format!("/v1/customers/{}/grants/{}", seg(customer), seg(id)), None::<&()>).await
    }

    /// The resolved entitlements view (JSON, as docs/api.md shows it).
    pub async fn entitlements(&self, customer: &str) -> Result<serde_json::Value, Error> {
        self.request(Method::GET, &format!("/v1/customers/{}/entitlements", seg(customer)), None::<&()>).await
    }

    /// Replaces a customer's entitlements (scope `admin`).
    pub async fn set_entitlements(&self, customer: &str, doc: &serde_json::Value) -> Result<serde_json::Value, Error> {
        self.request(Method::PUT, &format!("/v1/customers/{}/entitlements", seg(customer)), Some(doc)).await
    }

    /// Sends events now (not buffered), ids and timestamps filled in, retried like batches.
    pub async fn ingest(&self, events: Vec<Event>) -> Result<Ingested, Error> {
        let events = events.into_iter().map(normalize).collect::<Result<Vec<_>, _>>()?;
        let body = Bytes::from(serde_json::to_vec(&events).map_err(|e| Error::Decode(e.to_string()))?);
        request(&self.shared, Method::POST, "/v1/events", Some(body), self.shared.config.batch_retry).await
    }

    // ---------------------------------------------------------------------
    // Background batching

    /// Buffers one event for the sender task, which sends when `batch_size`
    /// events wait or `flush_interval` after the oldest. Returns at once
    /// unless `OnFull::Block` and the buffer is full.
    pub async fn track(&self, event: Event) -> Result<(), Error> {
        let mut event = Some(normalize(event)?);
        let mut progress = self.shared.progress.subscribe();
        loop {
            match self.try_push(&mut event)? {
                Pushed::Done => return Ok(()),
                Pushed::Full => {
                    self.shared.wake.notify_one();
                    if progress.changed().await.is_err() {
                        return Err(Error::Closed);
                    }
                }
            }
        }
    }

    /// One attempt to buffer the event (taken out of `event` when buffered).
    fn try_push(&self, event: &mut Option<Event>) -> Result<Pushed, Error> {
        let cfg = &self.shared.config;
        let mut s = self.lock();
        if s.closed {
            return Err(Error::Closed);
        }
        if s.buffer.len() >= cfg.max_buffer_size {
            match cfg.on_full {
                OnFull::Error => return Err(Error::BufferFull(cfg.max_buffer_size)),
                OnFull::DropOldest => {
                    s.buffer.pop_front();
                    s.stats.dropped += 1;
                }
                OnFull::Block => {
                    s.drain_upto = s.drain_upto.max(s.seq);
                    return Ok(Pushed::Full);
                }
            }
        }
        let Some(event) = event.take() else { return Ok(Pushed::Done) };
        s.seq += 1;
        s.stats.tracked += 1;
        let seq = s.seq;
        s.buffer.push_back(Entry { seq, event, at: Instant::now() });
        let wake = s.buffer.len() == 1 || s.buffer.len() >= cfg.batch_size;
        drop(s);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(Pushed::Done)
    }

    /// Sends every event tracked before the call; returns when each is
    /// acknowledged, or the first error among those given up on.
    pub async fn flush(&self) -> Result<(), Error> {
        let mut progress = self.shared.progress.subscribe();
        let upto = {
            let mut s = self.lock();
            s.drain_upto = s.drain_upto.max(s.seq);
            s.seq
        };
        self.shared.wake.notify_one();
        loop {
            if let Some(result) = self.flushed(upto) {
                return result;
            }
            if progress.changed().await.is_err() {
                return Err(Error::Closed);
            }
        }
    }

    /// `Some` once every event up to `upto` is settled: the first failure among them, if any.
    fn flushed(&self, upto: u64) -> Option<Result<(), Error>> {
        let mut s = self.lock();
        if s.pending_min() <= upto {
            return None;
        }
        let (failed, kept): (Vec<_>, Vec<_>) = s.failures.drain(..).partition(|(seq, _)| *seq <= upto);
        s.failures = kept;
        Some(match failed.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        })
    }

    /// Flushes; `track()` fails with [`Error::Closed`] afterwards.
    pub async fn close(&self) -> Result<(), Error> {
        self.lock().closed = true;
        self.flush().await
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// One call with retries.
async fn request<T: DeserializeOwned>(shared: &Shared, method: Method, path: &str, body: Option<Bytes>, retry: Retry) -> Result<T, Error> {
    let mut attempt = 1;
    loop {
        match once(shared, method.clone(), path, body.clone()).await {
            Ok(bytes) => {
                return serde_json::from_slice(if bytes.is_empty() { b"null" } else { &bytes }).map_err(|e| Error::Decode(e.to_string()));
            }
            Err(e) if e.retryable() && attempt < retry.max_attempts => {
                lock(shared).stats.retries += 1;
                tokio::time::sleep(retry.delay(attempt, e.retry_after())).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn once(shared: &Shared, method: Method, path: &str, body: Option<Bytes>) -> Result<Bytes, Error> {
    let mut req =
        Request::builder().method(method).uri(format!("{}{}", shared.config.base_url, path)).header(header::ACCEPT, "application/json");
    if let Some(key) = &shared.config.api_key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(body.unwrap_or_default())).map_err(|e| Error::Setup(e.to_string()))?;
    let call = async {
        let res = shared.http.request(req).await.map_err(|e| Error::Network(format!("{e:?}")))?;
        let status = res.status().as_u16();
        let retry_after = res.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<f64>().ok());
        let bytes = res.into_body().collect().await.map_err(|e| Error::Network(e.to_string()))?.to_bytes();
        Ok::<_, Error>((status, retry_after, bytes))
    };
    let (status, retry_after, bytes) = tokio::time::timeout(shared.config.timeout, call).await.map_err(|_| Error::Timeout)??;
    if (200..300).contains(&status) {
        return Ok(bytes);
    }
    let err: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    let e = &err["error"];
    let fallback = if crate::error::RETRY_STATUSES.contains(&status) { "unavailable" } else { "http_error" };
    Err(Error::Api {
        status,
        code: e["code"].as_str().unwrap_or(fallback).to_string(),
        message: e["message"].as_str().map(str::to_string).unwrap_or_else(|| format!("HTTP {status}")),
        details: e.get("details").cloned(),
        retry_after,
    })
}

/// The sender task: ends when the client is dropped (its last clone) and
/// nothing is left to send.
async fn sender(weak: std::sync::Weak<Shared>) {
    loop {
        let Some(shared) = weak.upgrade() else { return };
        enum Next {
            Send(Vec<Entry>),
            Wait(Duration),
        }
        let next = {
            let mut s = lock(&shared);
            let cfg = &shared.config;
            match s.buffer.front() {
                Some(head) if s.buffer.len() >= cfg.batch_size || head.seq <= s.drain_upto || head.at.elapsed() >= cfg.flush_interval => {
                    let n = cfg.batch_size.min(s.buffer.len());
                    let batch: Vec<Entry> = s.buffer.drain(..n).collect();
                    s.in_flight = batch.iter().map(|e| e.seq).collect();
                    Next::Send(batch)
                }
                Some(head) => Next::Wait(cfg.flush_interval.saturating_sub(head.at.elapsed())),
                // Wake up now and then to notice a dropped client.
                None => Next::Wait(Duration::from_secs(1)),
            }
        };
        let batch = match next {
            Next::Send(batch) => batch,
            Next::Wait(wait) => {
                let _ = tokio::time::timeout(wait, shared.wake.notified()).await;
                continue;
            }
        };
        shared.progress.send_modify(|v| *v += 1); // room for blocked track() calls
        send(&shared, batch).await;
        lock(&shared).in_flight.clear();
        shared.progress.send_modify(|v| *v += 1);
    }
}

/// Sends one batch until acknowledged or failed for good: invalid events (a
/// 400 `invalid_event` names them) are dropped and the rest re-sent; a 413
/// splits the batch in halves.
fn send(shared: &Arc<Shared>, batch: Vec<Entry>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        if batch.is_empty() {
            return;
        }
        let events: Vec<&Event> = batch.iter().map(|e| &e.event).collect();
        let body = match serde_json::to_vec(&events) {
            Ok(b) => Bytes::from(b),
            Err(e) => return fail(shared, Error::Decode(e.to_string()), &batch),
        };
        match request::<Ingested>(shared, Method::POST, "/v1/events", Some(body), shared.config.batch_retry).await {
            Ok(r) => {
                let mut s = lock(shared);
                s.stats.batches += 1;
                s.stats.accepted += r.accepted;
                s.stats.duplicates += r.duplicates;
            }
            Err(e) => {
                if e.code() == "invalid_event" {
                    let bad: std::collections::HashSet<usize> = e
                        .details()
                        .and_then(|d| d.as_array())
                        .map(|a| a.iter().filter_map(|d| d["index"].as_u64()).map(|i| i as usize).collect())
                        .unwrap_or_default();
                    if !bad.is_empty() {
                        let (invalid, valid): (Vec<_>, Vec<_>) = batch.into_iter().enumerate().partition(|(i, _)| bad.contains(i));
                        fail(shared, e, &invalid.into_iter().map(|(_, x)| x).collect::<Vec<_>>());
                        send(shared, valid.into_iter().map(|(_, x)| x).collect()).await;
                        return;
                    }
                }
                if e.status() == 413 && batch.len() > 1 {
                    let mut first = batch;
                    let second = first.split_off(first.len().div_ceil(2));
                    send(shared, first).await;
                    send(shared, second).await;
                    return;
                }
                fail(shared, e, &batch);
            }
        }
    })
}

fn fail(shared: &Shared, error: Error, entries: &[Entry]) {
    let Some(first) = entries.first() else { return };
    let mut s = lock(shared);
    s.stats.failed += entries.len() as u64;
    s.failures.push((first.seq, error));
}
