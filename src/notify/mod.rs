//! Threshold notifications (issue 17): signed webhooks when a customer's usage
//! reaches 75 / 90 / 100 % (or a limit's own `notify` percents) of a finite
//! limit, once per (customer, meter, window, window start, limit value,
//! threshold), delivered with retries for days, surviving crashes.
//!
//! How it hangs together:
//!
//! - [`detect`]: a [`crate::usage::UsageObserver`] on the usage seam. Per window
//!   counter it keeps the raw usage at which the next armed threshold fires; the
//!   hot path is one map lookup and one comparison. A crossing is decided on the
//!   thread that applied the usage, and its row is committed to the outbox before
//!   the seam returns — so before the request is answered.
//! - [`outbox`]: the durable queue (SQLite in `data_dir`), one row per
//!   (notification, endpoint), keyed by a deterministic id (the `webhook-id`).
//! - [`deliver`]: one loop per endpoint (a slow endpoint delays only itself),
//!   pages of due rows, Standard Webhooks signing ([`sign`]), exponential backoff
//!   with jitter until `retry_for`, then `failed`. With Redis, a per-delivery
//!   claim (`SET NX`-style script) makes one instance send.
//!
//! **Other notification types** (credits): build a [`Notification`] with a
//! deterministic `id` (the same id for the same fact, so a retry or a replay is
//! stored once) and call [`Notifier::enqueue`]. It is durable when it returns
//! and goes to every endpoint whose `types` include `kind`:
//!
//! ```ignore
//! notifier.enqueue(&Notification {
//!     id: format!("ntf_credits_low_{customer}_{grant}_{level}"),
//!     kind: "credits.low".into(),
//!     customer: customer.into(),
//!     data: serde_json::json!({"customer": customer, "balance": 12.5}),
//! })?;
//! ```

pub mod deliver;
pub mod detect;
pub mod outbox;
pub mod sign;

use crate::config::{Endpoints, NotificationSettings};
use crate::model::Thresholds;
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

pub use detect::ThresholdObserver;
pub use outbox::{Filter, Outbox, Row};

/// Why a notification could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notification outbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
    #[error("redis claim: {0}")]
    Redis(String),
}

/// One notification of any type.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// Deterministic: the same fact always has the same id (the `webhook-id`).
    pub id: String,
    /// `limit.threshold`, `credits.low`, `credits.depleted`.
    pub kind: String,
    /// The customer it is about (for `GET /v1/notifications?customer=`).
    pub customer: String,
    /// The body's `data`.
    pub data: serde_json::Value,
}

/// The id of a `credits.low` / `credits.depleted` notification: one per
/// (type, customer, meter, episode), where the episode names one fall of the
/// balance (see `crate::credits::CreditAlert::episode`).
pub fn credit_notification_id(kind: &str, customer: &str, meter: &str, episode: i64) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{kind}\u{0}{customer}\u{0}{meter}\u{0}{episode}").as_bytes());
    format!("ntf_{}", hex::encode(&digest[..16]))
}

/// The notifications service: the outbox, the endpoints (swappable on reload),
/// the detector's bindings and the workers' wake-up.
pub struct Notifier {
    outbox: Outbox,
    endpoints: RwLock<Arc<Endpoints>>,
    /// Bumped when endpoints are swapped, so the delivery loops restart.
    endpoints_changed: tokio::sync::watch::Sender<u64>,
    thresholds: Thresholds,
    retry_for: Duration,
    timeout: Duration,
    wake: tokio::sync::Notify,
    /// The engine, once started (the observer exists before it).
    engine: OnceLock<Weak<crate::engine::Engine>>,
    detector: Arc<detect::Detector>,
    /// With Redis: the claims that make one instance send.
    claims: OnceLock<Arc<deliver::Claims>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

impl Notifier {
    /// Opens the outbox in `data_dir`; `full_sync` when every enqueue must be
    /// fsynced (`storage.durability = "fsync"`).
    pub fn open(settings: &NotificationSettings, data_dir: &std::path::Path, full_sync: bool) -> Result<Arc<Notifier>, NotifyError> {
        let outbox = Outbox::open(&data_dir.join("notifications.sqlite"), full_sync)?;
        let sent = outbox.sent_thresholds(crate::clock::now_ms())?;
        Ok(Arc::new(Notifier {
            outbox,
            endpoints: RwLock::new(settings.endpoints.clone()),
            endpoints_changed: tokio::sync::watch::channel(0).0,
            thresholds: settings.thresholds,
            retry_for: settings.retry_for,
            timeout: settings.timeout,
            wake: tokio::sync::Notify::new(),
            engine: OnceLock::new(),
            detector: Arc::new(detect::Detector::new(sent)),
            claims: OnceLock::new(),
        }))
    }

    /// The usage observer to register with `AppHandle::start_observed`.
    pub fn observer(self: &Arc<Self>) -> Arc<dyn crate::usage::UsageObserver> {
        Arc::new(ThresholdObserver::new(Arc::downgrade(self)))
    }

    /// Binds the started engine: detection begins (changes before this — the
    /// rebuild and the replay at start — are judged at the next change).
    pub fn bind(&self, engine: &Arc<crate::engine::Engine>, redis_prefix: Option<&str>) {
        if let (Some(redis), Some(prefix)) = (engine.redis(), redis_prefix) {
            let _ = self.claims.set(Arc::new(deliver::Claims::new(redis.conn(), prefix, engine.instance_id())));
        }
        let _ = self.engine.set(Arc::downgrade(engine));
    }

    pub(crate) fn claims(&self) -> Option<&deliver::Claims> {
        self.claims.get().map(|c| &**c)
    }

    /// Sends `id` again (same `webhook-id`) to every endpoint that had it;
    /// `false` when no notification has this id here.
    pub async fn redeliver(&self, id: &str) -> Result<bool, NotifyError> {
        deliver::redeliver(self, self.claims(), id).await
    }

    pub(crate) fn engine(&self) -> Option<Arc<crate::engine::Engine>> {
        self.engine.get().and_then(Weak::upgrade)
    }

    /// The endpoints now.
    pub fn endpoints(&self) -> Arc<Endpoints> {
        self.endpoints.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Swaps the endpoints (a config reload); the delivery loops restart on them.
    pub fn set_endpoints(&self, endpoints: Arc<Endpoints>) {
        *self.endpoints.write().unwrap_or_else(std::sync::PoisonError::into_inner) = endpoints;
        self.endpoints_changed.send_modify(|v| *v += 1);
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn retry_for(&self) -> Duration {
        self.retry_for
    }

    /// Stores `n` for every endpoint that takes its type (durable on return)
    /// and wakes the workers. Returns the rows that are new.
    pub fn enqueue(&self, n: &Notification) -> Result<usize, NotifyError> {
        self.enqueue_marked(n, None)
    }

    fn enqueue_marked(&self, n: &Notification, mark: Option<&outbox::ThresholdMark>) -> Result<usize, NotifyError> {
        let endpoints = self.endpoints();
        let names: Vec<&str> = endpoints.0.iter().filter(|e| e.wants(&n.kind)).map(|e| e.name.as_str()).collect();
        if names.is_empty() {
            return Ok(0);
        }
        let now = crate::clock::now_ms();
        let body = serde_json::json!({
            "type": n.kind,
            "timestamp": crate::model::window::rfc3339(now.div_euclid(1000) * 1000),
            "data": n.data,
        })
        .to_string();
        let retry_ms = i64::try_from(self.retry_for.as_millis()).unwrap_or(i64::MAX);
        let new = self.outbox.insert(n, &names, &body, now, retry_ms, mark)?;
        if new > 0 {
            metrics::counter!(crate::telemetry::NOTIFICATIONS_CREATED_TOTAL, "type" => n.kind.clone()).increment(new as u64);
            tracing::info!(id = %n.id, kind = %n.kind, customer = %n.customer, endpoints = new, "notification queued");
            self.wake.notify_waiters();
        }
        Ok(new)
    }
}
