//! The resolved settings: what the rest of meterd reads from the config. Every
//! value is final (defaults applied, durations as `Duration`, choices as enums,
//! addresses parsed, API keys hashed); nothing here is compared as a string at
//! run time.

use crate::model::Catalog;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A config that passed validation.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub ingest: IngestSettings,
    /// `[redis]`, when entitlements and counters are shared through Redis.
    pub redis: Option<RedisSettings>,
    /// `[clickhouse]`, when usage goes to ClickHouse instead of SQLite.
    pub clickhouse: Option<ClickHouseSettings>,
    /// `[stripe]`, resolved (with the secret key), when reporting is configured.
    pub stripe: Option<StripeSettings>,
    /// `[notifications]` (issue 17), when threshold webhooks are configured.
    pub notifications: Option<NotificationSettings>,
    /// `metrics.listen`: serve `/metrics` there instead of on the API listener.
    pub metrics_listen: Option<SocketAddr>,
    pub catalog: Arc<Catalog>,
    pub keys: Vec<ApiKey>,
    /// Where the config came from, for messages.
    pub source: String,
    // Stripe subscription sync and portal tokens (issue 20).
    /// `[stripe.webhooks]`, when `POST /v1/webhooks/stripe` is served.
    pub stripe_webhooks: Option<StripeWebhookSettings>,
    /// The portal-token signing key read from `server.portal_secret_env`
    /// (`None`: generated once and kept in data_dir).
    pub portal_secret: Option<SecretKey>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// `server.listen`, or `METERD_LISTEN` when set.
    pub listen: SocketAddr,
    /// Unique per instance sharing one Redis; `None`: generated once and kept in data_dir.
    pub instance_id: Option<String>,
    /// How long shutdown may take before in-flight work is abandoned.
    pub shutdown_grace: Duration,
    /// A client must send a request's headers within this long.
    pub header_read_timeout: Duration,
    /// A client must send a request's body within this long.
    pub body_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Open connections at most (on the API listener).
    pub max_connections: usize,
    /// Threads that run HTTP connections; `None`: one per CPU.
    pub connection_threads: Option<usize>,
}

/// When a 202 is sent relative to the write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After the WAL write is fsynced.
    Fsync,
    /// After the WAL write; fsynced every `wal_sync_interval`.
    Buffered,
    /// No WAL: after the counters are updated.
    None,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Buffered => "buffered",
            Durability::None => "none",
        }
    }
}

/// `[storage]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSettings {
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// How often minute aggregates go to the embedded usage store.
    pub flush_interval: Duration,
    /// With `Durability::Buffered`: how often the WAL is fsynced.
    pub wal_sync_interval: Duration,
    /// With `Durability::Fsync`: after a group of more than one record, the
    /// next group's sync starts no sooner than this after that one's
    /// (zero: at once). Fewer, larger groups under load; a lone record is
    /// never held.
    pub wal_sync_spacing: Duration,
    /// WAL segment files rotate at this size.
    pub wal_segment_bytes: u64,
    /// Past this much WAL not yet in the store, ingest answers 503.
    pub max_wal_bytes: u64,
    /// Past this many minute buckets not yet in the store, ingest and consumes
    /// answer 503 (bounds memory while the store is down, WAL or not).
    pub max_pending_buckets: u64,
}

/// `[ingest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestSettings {
    pub max_body_bytes: u64,
    pub max_batch_events: usize,
    /// Events older than this are rejected.
    pub max_lateness: Duration,
    pub dedupe_window: Duration,
    // Bounded dedupe (issue 15): `ingest.dedupe_memory` in bytes.
    pub dedupe_memory: u64,
    /// Unique counts (issue 25): distinct values kept per window of a
    /// `unique_count` meter (`ingest.max_unique_values`).
    pub max_unique_values: usize,
}

/// `redis.strict_when_unavailable`: how `strict` limits are decided while Redis
/// is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrictWhenUnavailable {
    /// Denied with reason `unavailable`.
    Deny,
    /// Decided from local state.
    Allow,
}

/// `[redis]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// One server's url, or a cluster's seed nodes (more than one).
    pub urls: Vec<String>,
    pub key_prefix: String,
    pub sync_interval: Duration,
    /// How long one Redis call may take before it counts as a failure.
    pub timeout: Duration,
    /// Cached entitlements are re-read this often (pub/sub invalidation is the
    /// fast path; this is the safety net for a missed message).
    pub entitlements_ttl: Duration,
    pub strict_when_unavailable: StrictWhenUnavailable,
}

/// `[clickhouse]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouseSettings {
    pub url: String,
    pub database: String,
    pub flush_interval: Duration,
    /// Also copy every accepted event to `{database}.raw_events`, exported from the WAL.
    pub raw_events: bool,
}

/// How meter events are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeMode {
    /// `POST /v1/billing/meter_events`, one form-encoded event per request.
    V1,
    /// A meter event session and the v2 stream, up to 100 events per request.
    V2,
}

impl StripeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StripeMode::V1 => "v1",
            StripeMode::V2 => "v2",
        }
    }
}

/// The granularity of reported totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripePeriod {
    Minute,
    Hour,
    Day,
}

impl StripePeriod {
    /// The period's length in milliseconds (periods are aligned to the Unix epoch, UTC).
    pub fn ms(self) -> i64 {
        match self {
            StripePeriod::Minute => 60_000,
            StripePeriod::Hour => 3_600_000,
            StripePeriod::Day => 86_400_000,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StripePeriod::Minute => "minute",
            StripePeriod::Hour => "hour",
            StripePeriod::Day => "day",
        }
    }
}

/// The Stripe secret key. It is read from the environment variable the config
/// names and is never printed: `Debug` shows `***`, and there is no `Display`.
#[derive(Clone)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(key: String) -> SecretKey {
        SecretKey(key)
    }

    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

/// `[stripe]`.
#[derive(Debug, Clone)]
pub struct StripeSettings {
    /// The variable the key came from (safe to print).
    pub api_key_env: String,
    pub api_key: SecretKey,
    /// Without a trailing slash.
    pub api_base: String,
    /// Without a trailing slash.
    pub meter_events_base: String,
    pub mode: StripeMode,
    pub period: StripePeriod,
    pub grace: Duration,
    pub interval: Duration,
    pub max_requests_per_second: NonZeroU32,
    pub request_timeout: Duration,
}

/// `[stripe.webhooks]` (Stripe subscription sync, issue 20).
#[derive(Debug, Clone)]
pub struct StripeWebhookSettings {
    /// The variable the signing secret came from (safe to print).
    pub secret_env: String,
    /// The endpoint's `whsec_...` signing secret, used whole as the HMAC key.
    pub secret: SecretKey,
    /// How far a signature's `t` may be from now.
    pub tolerance: Duration,
    /// Stripe price id or price lookup_key → a configured plan name.
    pub plans: std::collections::BTreeMap<String, String>,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Ingest,
    Check,
    Read,
    Admin,
}

impl Scope {
    pub(super) fn parse(s: &str) -> Option<Scope> {
        match s {
            "ingest" => Some(Scope::Ingest),
            "check" => Some(Scope::Check),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub(super) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A validated API key: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    pub sha256: [u8; 32],
    pub(super) scopes: u8,
    pub rate_per_second: Option<NonZeroU32>,
    pub burst: Option<NonZeroU32>,
}

impl ApiKey {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes & scope.bit() != 0
    }
}

/// SHA-256 of a key, as stored in `key_sha256`.
pub fn sha256_of(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

// --- Threshold notifications (issue 17) ---

/// Every notification type an endpoint may subscribe to.
pub const NOTIFICATION_TYPES: &[&str] = &["limit.threshold", "credits.low", "credits.depleted"];

/// `[notifications]`.
#[derive(Debug, Clone)]
pub struct NotificationSettings {
    /// Default percents for every finite limit without its own `notify`.
    pub thresholds: crate::model::Thresholds,
    /// A delivery is retried this long, then the notification is `failed`.
    pub retry_for: Duration,
    /// One delivery attempt.
    pub timeout: Duration,
    /// The endpoints, as one value so a reload can swap them whole.
    pub endpoints: Arc<Endpoints>,
}

/// `[[notifications.endpoints]]`, all of them.
#[derive(Debug, Clone, Default)]
pub struct Endpoints(pub Vec<EndpointSettings>);

/// One webhook endpoint.
#[derive(Debug, Clone)]
pub struct EndpointSettings {
    /// `[a-z0-9_-]{1,64}`, unique.
    pub name: String,
    pub url: String,
    /// The variable the secret came from (safe to print).
    pub secret_env: String,
    pub secret: WebhookSecret,
    /// The types sent here; `None`: every type.
    pub types: Option<Vec<String>>,
}

impl EndpointSettings {
    /// Whether notifications of `kind` go to this endpoint.
    pub fn wants(&self, kind: &str) -> bool {
        self.types.as_ref().is_none_or(|t| t.iter().any(|x| x == kind))
    }
}

/// A Standard Webhooks signing key (decoded from `whsec_` + base64). Never
/// printed: `Debug` shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    pub fn new(key: Vec<u8>) -> WebhookSecret {
        WebhookSecret(key)
    }

    /// The key bytes, for signing only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}
