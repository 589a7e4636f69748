//! The config file as written: serde structs in which every key is optional and
//! every value keeps the TOML type it was written with (durations, enums and
//! addresses are still strings). Nothing here judges a value; `validate` does.

use super::schema;
use super::{ConfigError, ConfigProblem};
use serde::Deserialize;
use std::collections::BTreeMap;

/// The whole file. Sections that are always in effect default to empty; the
/// optional services (`redis`, `clickhouse`, `stripe`, `metrics`) are `None`
/// when absent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub ingest: Ingest,
    pub redis: Option<Redis>,
    pub clickhouse: Option<ClickHouse>,
    pub stripe: Option<Stripe>,
    /// Threshold notifications (issue 17).
    pub notifications: Option<Notifications>,
    pub metrics: Option<Metrics>,
    #[serde(default)]
    pub meters: Vec<Meter>,
    #[serde(default)]
    pub plans: Vec<Plan>,
    #[serde(default)]
    pub auth: Auth,
    /// What reading found before validation: unknown keys and values of the
    /// wrong TOML type (both set aside so that the rest could be read).
    #[serde(skip)]
    pub problems: Vec<ConfigProblem>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub listen: Option<String>,
    pub instance_id: Option<String>,
    pub shutdown_grace: Option<String>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
    pub connection_threads: Option<i64>,
    // Portal tokens (issue 20): the variable holding their signing key.
    pub portal_secret_env: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    pub data_dir: Option<String>,
    pub durability: Option<String>,
    pub flush_interval: Option<String>,
    pub wal_sync_interval: Option<String>,
    // Issue 24: the least time between two WAL syncs' starts under load.
    pub wal_sync_spacing: Option<String>,
    pub wal_segment_bytes: Option<i64>,
    pub max_wal_bytes: Option<i64>,
    pub max_pending_buckets: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ingest {
    pub max_body_bytes: Option<i64>,
    pub max_batch_events: Option<i64>,
    pub max_lateness: Option<String>,
    pub dedupe_window: Option<String>,
    // Bounded dedupe (issue 15): RAM for remembered ids, e.g. "512MB".
    pub dedupe_memory: Option<String>,
    // Unique counts (issue 25): distinct values kept per window.
    pub max_unique_values: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    pub url: Option<String>,
    pub urls: Option<Vec<String>>,
    pub key_prefix: Option<String>,
    pub sync_interval: Option<String>,
    pub timeout: Option<String>,
    pub entitlements_ttl: Option<String>,
    pub strict_when_unavailable: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouse {
    pub url: Option<String>,
    pub database: Option<String>,
    pub flush_interval: Option<String>,
    pub raw_events: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stripe {
    pub api_key_env: Option<String>,
    pub api_base: Option<String>,
    pub meter_events_base: Option<String>,
    pub mode: Option<String>,
    pub period: Option<String>,
    pub grace: Option<String>,
    pub interval: Option<String>,
    pub max_requests_per_second: Option<i64>,
    pub request_timeout: Option<String>,
    // Stripe subscription sync (issue 20): `[stripe.webhooks]`.
    pub webhooks: Option<StripeWebhooks>,
}

/// `[stripe.webhooks]` (Stripe subscription sync, issue 20).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeWebhooks {
    pub secret_env: Option<String>,
    pub tolerance: Option<String>,
    /// Price id or lookup_key → plan name (values checked by `validate`).
    #[serde(default)]
    pub plans: BTreeMap<String, toml::Value>,
}

impl Stripe {
    /// Whether reporting is configured: `[stripe]` holds some key besides
    /// `webhooks`, or nothing at all (a `[stripe]` holding only
    /// `[stripe.webhooks]` syncs plans and reports nothing).
    pub fn reports(&self) -> bool {
        let Stripe {
            api_key_env,
            api_base,
            meter_events_base,
            mode,
            period,
            grace,
            interval,
            max_requests_per_second,
            request_timeout,
            webhooks,
        } = self;
        webhooks.is_none()
            || api_key_env.is_some()
            || api_base.is_some()
            || meter_events_base.is_some()
            || mode.is_some()
            || period.is_some()
            || grace.is_some()
            || interval.is_some()
            || max_requests_per_second.is_some()
            || request_timeout.is_some()
    }
}

// --- Threshold notifications (issue 17) ---
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notifications {
    pub thresholds: Option<Vec<i64>>,
    pub retry_for: Option<String>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<NotificationEndpoint>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationEndpoint {
    pub name: Option<String>,
    pub url: Option<String>,
    pub secret_env: Option<String>,
    pub types: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meter {
    pub name: Option<String>,
    pub aggregation: Option<String>,
    pub precision: Option<i64>,
    pub stripe_event_name: Option<String>,
    // Unique counts and group-by (issue 25).
    pub unique_property: Option<String>,
    pub group_by: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: Option<String>,
    pub default: Option<bool>,
    #[serde(default)]
    pub features: BTreeMap<String, bool>,
    /// Meter name → a limit spec or an array of them (checked by `model::plan`).
    #[serde(default)]
    pub limits: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    #[serde(default)]
    pub keys: Vec<Key>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Key {
    pub name: Option<String>,
    pub key_sha256: Option<String>,
    pub key_env: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub rate_limit_per_second: Option<i64>,
    pub rate_limit_burst: Option<i64>,
}

/// Parses `text`: a syntax error fails (TOML parsers stop at the first); unknown
/// keys and mistyped values are set aside as problems and the rest is read.
pub(super) fn read(text: &str, source: &str) -> Result<Config, ConfigError> {
    let parse_error = |message: String| ConfigError::Parse { path: source.to_string(), message };
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
    let mut problems = Vec::new();
    schema::check(&mut table, schema::ROOT, "", source, &mut problems);
    // Every value left has the type its field expects, so this fails only if the
    // schema and the structs above disagree (a test keeps them in step).
    let mut config: Config = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
    config.problems = problems;
    Ok(config)
}
