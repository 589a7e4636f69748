//! The Stripe client: meter events over v1 (one form-encoded event per request)
//! or v2 (a meter event session, then the high-throughput stream, up to 100
//! events per request), cancellations, and the sorting of Stripe's answers into
//! what the reporter must do about them.
//!
//! It speaks HTTPS (rustls, webpki roots) and plain HTTP (tests, or a local
//! TLS-terminating proxy) through one hyper client. Every request waits for the
//! rate limiter (`stripe.max_requests_per_second`), has a timeout
//! (`stripe.request_timeout`), and is retried with exponential backoff and jitter
//! when Stripe says it may be (429, 5xx, `Stripe-Should-Retry: true`, timeouts and
//! cut connections: a retry carries the same identifier, so it cannot count twice).
//!
//! The secret key goes into the `Authorization` header and nowhere else: it is
//! scrubbed from any message Stripe sends back before that message is kept.

use crate::config::{SecretKey, StripeSettings};
use bytes::Bytes;
use governor::{clock::DefaultClock, state::InMemoryState, state::NotKeyed, Quota, RateLimiter};
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// The API version sent with every request.
pub const STRIPE_VERSION: &str = "2025-03-31.basil";

/// Events per v2 stream request (Stripe's cap).
pub const MAX_STREAM_EVENTS: usize = 100;

/// Attempts per request before the reporter gives up until its next run.
const MAX_ATTEMPTS: u32 = 5;

/// Why a request did not succeed, sorted by what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The key is wrong or revoked: stop reporting.
    #[error("Stripe rejected the API key (HTTP 401, code {code:?}): {message}")]
    Unauthorized { code: String, message: String },
    /// v2: the session token expired; open a new session and resend.
    #[error("the meter event session expired")]
    SessionExpired,
    /// v1: an event with this identifier already exists: it was reported.
    #[error("Stripe already has an event with this identifier")]
    Duplicate,
    /// Stripe will not take this request, however often it is sent.
    #[error("Stripe refused the request (HTTP {status}, code {code:?}): {message}")]
    Rejected { status: u16, code: String, message: String },
    /// 429, 5xx or `Stripe-Should-Retry: true`.
    #[error("Stripe answered HTTP {status}: {message}")]
    Retryable { status: u16, message: String },
    /// No answer (connection refused or cut, timeout): Stripe may or may not
    /// have processed the request.
    #[error("no answer from Stripe: {0}")]
    Transport(String),
    /// A 2xx answer meterd cannot read.
    #[error("unreadable answer from Stripe: {0}")]
    Protocol(String),
    /// The client could not be built (TLS roots).
    #[error("cannot build the HTTPS client: {0}")]
    Setup(String),
}

impl ClientError {
    /// Whether sending the same request again may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, ClientError::Retryable { .. } | ClientError::Transport(_) | ClientError::Protocol(_))
    }
}

/// One meter event to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEvent {
    pub event_name: String,
    pub identifier: String,
    pub stripe_customer_id: String,
    /// Whole units.
    pub value: i64,
    /// Unix seconds.
    pub timestamp_s: i64,
}

/// What Stripe did with a v1 event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Accepted,
    /// It had the identifier already: reported before (an earlier attempt whose
    /// answer was lost).
    Duplicate,
}

/// A v2 meter event session.
#[derive(Clone)]
pub struct Session {
    token: SecretKey,
    /// Unix milliseconds.
    pub expires_at_ms: i64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("token", &self.token).field("expires_at_ms", &self.expires_at_ms).finish()
    }
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;
type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// An HTTP answer: status, `Stripe-Should-Retry`, body.
struct Answer {
    status: u16,
    should_retry: Option<bool>,
    body: Bytes,
}

/// Talks to Stripe for the reporter.
pub struct StripeClient {
    http: Client<Https, Full<Bytes>>,
    key: SecretKey,
    api_base: String,
    meter_events_base: String,
    timeout: Duration,
    limiter: Limiter,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient").field("api_base", &self.api_base).field("key", &self.key).finish_non_exhaustive()
    }
}

/// Percent-encodes a form component (everything but RFC 3986 unreserved bytes).
pub fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `k=v&k=v`, each part encoded.
pub fn form(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v))).collect::<Vec<_>>().join("&")
}

/// The `error.code` and `error.message` of a Stripe error body, with the key
/// (should Stripe ever echo it) replaced by `***`.
fn error_fields(body: &[u8], key: &str) -> (String, String) {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let code = value["error"]["code"].as_str().unwrap_or("").to_string();
    let message = match value["error"]["message"].as_str() {
        Some(m) => m.to_string(),
        None => String::from_utf8_lossy(&body[..body.len().min(200)]).to_string(),
    };
    let scrub = |s: String| if key.is_empty() { s } else { s.replace(key, "***") };
    (scrub(code), scrub(message))
}

/// Sorts an answer: `Ok` for 2xx, else the error saying what to do.
pub fn classify(status: u16, should_retry: Option<bool>, body: &[u8], key: &str) -> Result<(), ClientError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let (code, message) = error_fields(body, key);
    if status == 401 {
        if code == "billing_meter_event_session_expired" {
            return Err(ClientError::SessionExpired);
        }
        return Err(ClientError::Unauthorized { code, message });
    }
    if status == 400 && message.to_ascii_lowercase().contains("already exists") {
        return Err(ClientError::Duplicate);
    }
    match should_retry {
        Some(true) => Err(ClientError::Retryable { status, message }),
        Some(false) => Err(ClientError::Rejected { status, code, message }),
        None if status == 429 || status == 409 || status >= 500 => Err(ClientError::Retryable { status, message }),
        None => Err(ClientError::Rejected { status, code, message }),
    }
}

/// RFC 3339 (UTC, seconds) of Unix seconds.
fn rfc3339_s(seconds: i64) -> String {
    crate::model::window::rfc3339(seconds.saturating_mul(1000))
}

impl StripeClient {
    pub fn new(settings: &StripeSettings) -> Result<StripeClient, ClientError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| ClientError::Setup(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https);
        Ok(StripeClient {
            http,
            key: settings.api_key.clone(),
            api_base: settings.api_base.clone(),
            meter_events_base: settings.meter_events_base.clone(),
            timeout: settings.request_timeout,
            limiter: RateLimiter::direct(Quota::per_second(settings.max_requests_per_second)),
        })
    }

    /// One request, rate-limited and with the timeout; no retries.
    async fn request_once(
        &self,
        url: &str,
        bearer: &str,
        content_type: Option<&str>,
        body: &str,
        idempotency: Option<&str>,
    ) -> Result<Answer, ClientError> {
        self.limiter.until_ready().await;
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(header::AUTHORIZATION, format!("Bearer {bearer}"))
            .header("Stripe-Version", STRIPE_VERSION)
            .header(header::USER_AGENT, concat!("meterd/", env!("CARGO_PKG_VERSION")));
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        if let Some(key) = idempotency {
            builder = builder.header("Idempotency-Key", key);
        }
        let request =
            builder.body(Full::new(Bytes::from(body.to_string()))).map_err(|e| ClientError::Setup(format!("request to {url}: {e}")))?;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| ClientError::Transport(format!("{url}: {e}")))?;
            let status = response.status().as_u16();
            let should_retry =
                response.headers().get("Stripe-Should-Retry").and_then(|v| v.to_str().ok()).map(|v| v.eq_ignore_ascii_case("true"));
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Transport(format!("{url}: reading the answer: {e}")))?
                .to_bytes();
            Ok(Answer { status, should_retry, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(ClientError::Transport(format!("{url}: no answer within {:?}", self.timeout))),
        }
    }

    /// A request with retries: `classify`d, retried while [`ClientError::retryable`]
    /// with backoff (200 ms doubling, capped at 5 s, ±25 % jitter).
    async fn request(
        &self,
        url: &str,
        bearer: &str,
        content_type: Option<&str>,
        body: &str,
        idempotency: Option<&str>,
    ) -> Result<Bytes, ClientError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match self.request_once(url, bearer, content_type, body, idempotency).await {
                Ok(answer) => classify(answer.status, answer.should_retry, &answer.body, self.key.expose()).map(|()| answer.body),
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.retryable() && attempt < MAX_ATTEMPTS => {
                    let wait = crate::backoff::backoff(Duration::from_millis(100), attempt).min(Duration::from_secs(5));
                    crate::telemetry::stripe_retry();
                    tracing::warn!(error = %e, attempt, retry_in = ?wait, "Stripe request failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    /// v1: sends one meter event (the identifier doubles as the idempotency key).
    pub async fn send_v1(&self, event: &MeterEvent) -> Result<Delivery, ClientError> {
        let value = event.value.to_string();
        let timestamp = event.timestamp_s.to_string();
        let body = form(&[
            ("event_name", &event.event_name),
            ("payload[stripe_customer_id]", &event.stripe_customer_id),
            ("payload[value]", &value),
            ("identifier", &event.identifier),
            ("timestamp", &timestamp),
        ]);
        let url = format!("{}/v1/billing/meter_events", self.api_base);
        match self.request(&url, self.key.expose(), Some("application/x-www-form-urlencoded"), &body, Some(&event.identifier)).await {
            Ok(_) => Ok(Delivery::Accepted),
            Err(ClientError::Duplicate) => Ok(Delivery::Duplicate),
            Err(e) => Err(e),
        }
    }

    /// Cancels an event Stripe received in the last 24 h.
    pub async fn cancel(&self, event_name: &str, identifier: &str) -> Result<(), ClientError> {
        let body = form(&[("event_name", event_name), ("type", "cancel"), ("cancel[identifier]", identifier)]);
        let url = format!("{}/v1/billing/meter_event_adjustments", self.api_base);
        let idempotency = format!("cancel-{identifier}");
        self.request(&url, self.key.expose(), Some("application/x-www-form-urlencoded"), &body, Some(&idempotency)).await.map(|_| ())
    }

    /// v2: opens a meter event session.
    pub async fn open_session(&self) -> Result<Session, ClientError> {
        let url = format!("{}/v2/billing/meter_event_session", self.api_base);
        let body = self.request(&url, self.key.expose(), None, "", None).await?;
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(format!("session: {e}")))?;
        let token = value["authentication_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ClientError::Protocol("session: no authentication_token".into()))?;
        let expires_at_ms = match &value["expires_at"] {
            serde_json::Value::String(s) => crate::model::window::parse_rfc3339(s),
            serde_json::Value::Number(n) => n.as_i64().map(|s| s.saturating_mul(1000)),
            _ => None,
        }
        .ok_or_else(|| ClientError::Protocol("session: no readable expires_at".into()))?;
        Ok(Session { token: SecretKey::new(token.to_string()), expires_at_ms })
    }

    /// v2: sends up to [`MAX_STREAM_EVENTS`] events on the stream.
    pub async fn send_v2(&self, session: &Session, events: &[MeterEvent]) -> Result<(), ClientError> {
        if events.len() > MAX_STREAM_EVENTS {
            return Err(ClientError::Setup(format!("{} events in one stream request; at most {MAX_STREAM_EVENTS}", events.len())));
        }
        let events: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "event_name": e.event_name,
                    "identifier": e.identifier,
                    "timestamp": rfc3339_s(e.timestamp_s),
                    "payload": {"stripe_customer_id": e.stripe_customer_id, "value": e.value.to_string()},
                })
            })
            .collect();
        let body = serde_json::json!({ "events": events }).to_string();
        let url = format!("{}/v2/billing/meter_event_stream", self.meter_events_base);
        self.request(&url, session.token.expose(), Some("application/json"), &body, None).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_sorted_by_what_to_do() {
        let err = |code: &str, message: &str| {
            format!(r#"{{"error": {{"type": "invalid_request_error", "code": "{code}", "message": "{message}"}}}}"#)
        };
        assert!(classify(200, None, b"{}", "sk").is_ok());
        let dup = err("", "An event already exists with identifier x.");
        assert!(matches!(classify(400, Some(false), dup.as_bytes(), "sk"), Err(ClientError::Duplicate)));
        let old = err("timestamp_too_far_in_past", "Timestamp must be within the past 35 days");
        assert!(matches!(classify(400, Some(false), old.as_bytes(), "sk"), Err(ClientError::Rejected { status: 400, .. })));
        assert!(matches!(classify(400, None, old.as_bytes(), "sk"), Err(ClientError::Rejected { .. })));
        assert!(matches!(classify(429, None, b"", "sk"), Err(ClientError::Retryable { status: 429, .. })));
        assert!(matches!(classify(500, None, b"oops", "sk"), Err(ClientError::Retryable { status: 500, .. })));
        assert!(matches!(classify(503, Some(false), b"", "sk"), Err(ClientError::Rejected { .. })), "Stripe-Should-Retry: false wins");
        assert!(
            matches!(classify(400, Some(true), old.as_bytes(), "sk"), Err(ClientError::Retryable { .. })),
            "Stripe-Should-Retry: true wins"
        );
        let expired = err("billing_meter_event_session_expired", "expired");
        assert!(matches!(classify(401, None, expired.as_bytes(), "sk"), Err(ClientError::SessionExpired)));
        assert!(matches!(classify(401, None, err("", "bad key").as_bytes(), "sk"), Err(ClientError::Unauthorized { .. })));
        assert!(ClientError::Transport("x".into()).retryable());
        assert!(!ClientError::Duplicate.retryable());
    }

    #[test]
    fn the_key_never_shows() {
        let key = "sk_test_secret123";
        let body = format!(r#"{{"error": {{"code": "", "message": "Invalid API Key provided: {key}"}}}}"#);
        let e = classify(401, None, body.as_bytes(), key).err().map(|e| format!("{e} {e:?}")).unwrap_or_default();
        assert!(!e.contains(key) && e.contains("***"), "{e}");
        let settings_key = SecretKey::new(key.to_string());
        assert_eq!(format!("{settings_key:?}"), "SecretKey(***)");
    }

    #[test]
    fn forms_are_encoded() {
        assert_eq!(form(&[("payload[value]", "12"), ("event_name", "a b&c=d")]), "payload%5Bvalue%5D=12&event_name=a%20b%26c%3Dd");
        assert_eq!(form_encode("cus_AZaz09-._~"), "cus_AZaz09-._~");
    }
}
