//! Delivery: one loop per endpoint, so a slow or dead endpoint delays only
//! itself. Each loop reads a page of due rows from the outbox (the rest stay on
//! disk), sends up to [`CONCURRENCY`] at once, and records each attempt:
//! a 2xx is `delivered`; anything else or a timeout is retried after an
//! exponential backoff with jitter ([`retry_delay`]) until the row's deadline
//! (`created + retry_for`), then it is `failed` (metric and a warning).
//!
//! Every attempt carries the same `webhook-id` and body, a fresh
//! `webhook-timestamp` and its signature.
//!
//! **One sender with Redis.** Before an attempt, a script claims
//! `P{notify}:<id>:<endpoint>` for this instance (or renews its own claim)
//! for as long as the attempt and the wait before the next one; a delivered
//! or failed notification's key records that for `retry_for`. Another instance
//! holding the same row sees the claim, waits, and marks its row as settled
//! elsewhere. Duplicates happen only when a claim expires while its holder is
//! stalled mid-attempt (the ambiguous case), and carry the same `webhook-id`.
//! While Redis is unreachable nothing is sent (rows wait; `retry_for` is long).

use super::outbox::Row;
use super::{Notifier, NotifyError};
use crate::config::EndpointSettings;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Rows read per page (pending rows beyond it stay on disk).
pub const PAGE: usize = 64;
/// Attempts in flight per endpoint.
pub const CONCURRENCY: usize = 8;
/// The first retry's delay; doubled per failure up to [`MAX_DELAY`].
const FIRST_DELAY_MS: i64 = 500;
const MAX_DELAY_MS: i64 = 3_600_000;
/// How long a loop sleeps at most when nothing is due (new rows also wake it).
const IDLE_MS: i64 = 1_000;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;
type HttpClient = Client<Https, Full<Bytes>>;

/// The delay before retry number `attempts` (≥ 1), ±25 % jitter.
pub fn retry_delay(attempts: i64) -> i64 {
    let exp = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let base = FIRST_DELAY_MS.saturating_mul(1i64 << exp).min(MAX_DELAY_MS);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let spread = (u64::from(nanos).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % 501;
    base * (750 + spread as i64) / 1000
}

fn client() -> Result<HttpClient, NotifyError> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .map_err(|e| NotifyError::Client(e.to_string()))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https))
}

/// Claims in Redis (one sender across instances).
pub struct Claims {
    conn: crate::redis_link::Conn,
    prefix: String,
    holder: String,
    claim: redis::Script,
    settle: redis::Script,
}

/// KEYS[1] claim; ARGV[1] holder, ARGV[2] ttl ms. "mine", or who/what holds it.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'mine'
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'mine'
end
return v
";

/// KEYS[1] claim; ARGV[1] outcome, ARGV[2] ttl ms.
const SETTLE: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// What a claim answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Mine,
    /// Settled by some instance: `done:delivered` or `done:failed`.
    Settled(String),
    /// Another instance is sending.
    Elsewhere,
}

impl Claims {
    pub fn new(conn: crate::redis_link::Conn, prefix: &str, instance_id: &str) -> Claims {
        Claims {
            conn,
            prefix: prefix.to_string(),
            holder: format!("i:{instance_id}"),
            claim: redis::Script::new(CLAIM),
            settle: redis::Script::new(SETTLE),
        }
    }

    fn key(&self, id: &str, endpoint: &str) -> String {
        format!("{}{{notify}}:{id}:{endpoint}", self.prefix)
    }

    async fn call<T: redis::FromRedisValue>(&self, inv: redis::ScriptInvocation<'_>) -> Result<T, NotifyError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(Duration::from_secs(2), inv.invoke_async(&mut conn)).await {
            Ok(r) => r.map_err(|e| NotifyError::Redis(e.to_string())),
            Err(_) => Err(NotifyError::Redis("timed out".into())),
        }
    }

    pub async fn claim(&self, id: &str, endpoint: &str, ttl_ms: i64) -> Result<Claim, NotifyError> {
        let mut inv = self.claim.prepare_invoke();
        inv.key(self.key(id, endpoint)).arg(&self.holder).arg(ttl_ms.max(1));
        let v: String = self.call(inv).await?;
        Ok(match v.as_str() {
            "mine" => Claim::Mine,
            s if s.starts_with("done:") => Claim::Settled(s.trim_start_matches("done:").to_string()),
            _ => Claim::Elsewhere,
        })
    }

    pub async fn settle(&self, id: &str, endpoint: &str, outcome: &str, ttl_ms: i64) -> Result<(), NotifyError> {
        let mut inv = self.settle.prepare_invoke();
        inv.key(self.key(id, endpoint)).arg(format!("done:{outcome}")).arg(ttl_ms.max(1));
        let _: i64 = self.call(inv).await?;
        Ok(())
    }

    /// Forgets a settlement (a redelivery).
    pub async fn reset(&self, id: &str, endpoint: &str) -> Result<(), NotifyError> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("DEL").arg(self.key(id, endpoint)).to_owned();
        match tokio::time::timeout(Duration::from_secs(2), cmd.query_async::<i64>(&mut conn)).await {
            Ok(r) => r.map(|_| ()).map_err(|e| NotifyError::Redis(e.to_string())),
            Err(_) => Err(NotifyError::Redis("timed out".into())),
        }
    }
}

/// The delivery task: runs every endpoint's loop and the housekeeping (gauges,
/// the detector's sweep) until `stop`; restarts the loops when the endpoints
/// are swapped.
pub async fn run(notifier: Arc<Notifier>, mut stop: watch::Receiver<bool>) -> Result<(), NotifyError> {
    let http = client()?;
    let claims = notifier.claims.get().cloned();
    let mut changed = notifier.endpoints_changed.subscribe();
    loop {
        let endpoints = notifier.endpoints();
        let loops = endpoints.0.iter().map(|ep| endpoint_loop(&notifier, ep, &http, claims.as_deref()));
        let all = futures_util::future::join_all(loops);
        tokio::select! {
            _ = all => {}
            _ = housekeeping(&notifier) => {}
            _ = changed.changed() => continue,
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// Settled rows are kept this long (then pruned, unless their window is open).
pub const KEEP_SETTLED_MS: i64 = 30 * 86_400_000;

/// Every second: the pending gauges and the detector's sweep; every hour, the
/// pruning of old settled rows.
async fn housekeeping(notifier: &Notifier) {
    let mut last_prune = i64::MIN;
    loop {
        let now = crate::clock::now_ms();
        if now.saturating_sub(last_prune) >= 3_600_000 {
            last_prune = now;
            match notifier.outbox.prune(now - KEEP_SETTLED_MS, now) {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "pruned settled notifications"),
                Err(e) => tracing::warn!(error = %e, "cannot prune the notification outbox"),
            }
        }
        match notifier.outbox.pending() {
            Ok((count, oldest)) => {
                let now = crate::clock::now_ms();
                crate::telemetry::notifications_pending(count, oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0));
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the notification outbox"),
        }
        if let Some(engine) = notifier.engine() {
            notifier.detector.sweep(notifier, &engine);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn endpoint_loop(notifier: &Notifier, ep: &EndpointSettings, http: &HttpClient, claims: Option<&Claims>) {
    loop {
        let now = crate::clock::now_ms();
        let rows = match notifier.outbox.due(&ep.name, now, PAGE) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(endpoint = %ep.name, error = %e, "cannot read the notification outbox");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if rows.is_empty() {
            let wake = notifier.wake.notified();
            let next = notifier.outbox.next_due(&ep.name).ok().flatten();
            let wait = next.map_or(IDLE_MS, |t| (t - now).clamp(0, IDLE_MS));
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
            }
            continue;
        }
        futures_util::stream::iter(rows).for_each_concurrent(CONCURRENCY, |row| attempt(notifier, ep, http, claims, row)).await;
    }
}

/// How long a claim is held: this attempt plus the wait before the next one.
fn hold_ms(notifier: &Notifier, wait_ms: i64) -> i64 {
    i64::try_from(notifier.timeout.as_millis()).unwrap_or(i64::MAX).saturating_add(wait_ms).saturating_add(30_000)
}

async fn attempt(notifier: &Notifier, ep: &EndpointSettings, http: &HttpClient, claims: Option<&Claims>, row: Row) {
    let now = crate::clock::now_ms();
    let retry_ms = i64::try_from(notifier.retry_for.as_millis()).unwrap_or(i64::MAX);
    let record = |status: &str, counted: i64, error: Option<&str>, next: i64, delivered: Option<i64>| {
        let a = super::outbox::Attempt { status, counted, error, next_ms: next, delivered_ms: delivered };
        if let Err(e) = notifier.outbox.record(&row.id, &row.endpoint, &a) {
            tracing::warn!(id = %row.id, endpoint = %ep.name, error = %e, "cannot record a delivery attempt");
        }
    };
    if let Some(claims) = claims {
        match claims.claim(&row.id, &ep.name, hold_ms(notifier, 0)).await {
            Ok(Claim::Mine) => {}
            Ok(Claim::Settled(outcome)) => {
                let status = if outcome == "failed" { "failed" } else { "delivered" };
                record(status, 0, Some("settled by another instance"), now, (status == "delivered").then_some(now));
                return;
            }
            Ok(Claim::Elsewhere) => {
                record("pending", 0, None, now + 5_000, None);
                return;
            }
            Err(e) => {
                record("pending", 0, Some(&format!("cannot claim in redis: {e}")), now + 5_000, None);
                return;
            }
        }
    }
    let ts = now.div_euclid(1000);
    let signature = super::sign::signature(ep.secret.expose(), &row.id, ts, row.body.as_bytes());
    let request = hyper::Request::post(ep.url.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, concat!("meterd/", env!("CARGO_PKG_VERSION")))
        .header("webhook-id", row.id.as_str())
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(Full::new(Bytes::from(row.body.clone())));
    let outcome = match request {
        Err(e) => Err(format!("cannot build the request: {e}")),
        Ok(request) => match tokio::time::timeout(notifier.timeout, http.request(request)).await {
            Err(_) => Err(format!("timed out after {:?}", notifier.timeout)),
            Ok(Err(e)) => Err(format!("no answer: {e}")),
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(format!("HTTP {}", resp.status().as_u16())),
        },
    };
    let labels = [("type", row.kind.clone()), ("endpoint", ep.name.clone())];
    let done = crate::clock::now_ms();
    match outcome {
        Ok(()) => {
            record("delivered", 1, None, done, Some(done));
            metrics::counter!(crate::telemetry::NOTIFICATIONS_SENT_TOTAL, &labels).increment(1);
            tracing::info!(id = %row.id, endpoint = %ep.name, attempts = row.attempts + 1, "notification delivered");
            if let Some(claims) = claims {
                if let Err(e) = claims.settle(&row.id, &ep.name, "delivered", retry_ms).await {
                    tracing::warn!(id = %row.id, error = %e, "cannot record the delivery in redis");
                }
            }
        }
        Err(error) => {
            let attempts = row.attempts + 1;
            let wait = retry_delay(attempts);
            if done.saturating_add(wait) > row.deadline_ms {
                record("failed", 1, Some(&error), done, None);
                metrics::counter!(crate::telemetry::NOTIFICATIONS_FAILED_TOTAL, &labels).increment(1);
                tracing::warn!(id = %row.id, endpoint = %ep.name, attempts, error = %error, "notification failed: retry_for is over");
                if let Some(claims) = claims {
                    let _ = claims.settle(&row.id, &ep.name, "failed", retry_ms).await;
                }
            } else {
                record("pending", 1, Some(&error), done + wait, None);
                metrics::counter!(crate::telemetry::NOTIFICATIONS_RETRIES_TOTAL, &labels).increment(1);
                tracing::debug!(id = %row.id, endpoint = %ep.name, attempts, error = %error, retry_in_ms = wait, "notification attempt failed");
                if let Some(claims) = claims {
                    let _ = claims.claim(&row.id, &ep.name, hold_ms(notifier, wait)).await;
                }
            }
        }
    }
}

/// Makes `id` pending again on every endpoint (and forgets its settlement in
/// Redis); `false` when the id is unknown here.
pub async fn redeliver(notifier: &Notifier, claims: Option<&Claims>, id: &str) -> Result<bool, NotifyError> {
    let retry_ms = i64::try_from(notifier.retry_for.as_millis()).unwrap_or(i64::MAX);
    let endpoints = notifier.outbox.endpoints_of(id)?;
    if endpoints.is_empty() {
        return Ok(false);
    }
    if let Some(claims) = claims {
        for ep in &endpoints {
            claims.reset(id, ep).await?;
        }
    }
    notifier.outbox.redeliver(id, crate::clock::now_ms(), retry_ms)?;
    notifier.wake.notify_waiters();
    Ok(true)
}
