//! Configuration: the TOML file of docs/api.md, its defaults, and `validate()`, which
//! reports every problem with its key path before anything binds or opens a file.
//!
//! Parsing rejects unknown keys (serde `deny_unknown_fields`), naming the key and
//! the file. Validation then checks meaning (names, ranges, references between
//! plans and meters, key material) and resolves the config into the runtime
//! [`Catalog`] and API keys.

use crate::duration::ConfigDuration;
use crate::model::{plan::parse_limits, Aggregation, Catalog, Meter, MeterId, Plan};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The config used when no file is given: the example SaaS setup shipped in
/// `config/meterd.toml`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/meterd.toml");

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), render(problems))]
    Invalid { path: String, problems: Vec<ConfigProblem> },
}

fn render(problems: &[ConfigProblem]) -> String {
    problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
}

/// One problem: the key path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    pub redis: Option<RedisConfig>,
    pub clickhouse: Option<ClickHouseConfig>,
    pub stripe: Option<StripeConfig>,
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub meters: Vec<MeterConfig>,
    #[serde(default)]
    pub plans: Vec<PlanConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Keys the file has that meterd does not know, found by `parse`.
    #[serde(skip)]
    pub unknown_keys: Vec<ConfigProblem>,
}

/// The keys each table may hold: `(key, sub-schema)`; a sub-schema applies to a
/// table or to every table of an array. Tables whose keys are free-form (plan
/// features and limits) have no sub-schema: their contents are checked by
/// `validate`. Kept beside the structs above; a test checks they agree.
#[derive(Debug)]
struct Schema(&'static [(&'static str, Option<&'static Schema>)]);

const SCHEMA: &Schema = &Schema(&[
    ("server", Some(&Schema(&[("listen", None), ("instance_id", None), ("shutdown_grace", None)]))),
    (
        "storage",
        Some(&Schema(&[
            ("data_dir", None),
            ("durability", None),
            ("flush_interval", None),
            ("wal_sync_interval", None),
            ("wal_segment_bytes", None),
            ("max_wal_bytes", None),
        ])),
    ),
    ("ingest", Some(&Schema(&[("max_body_bytes", None), ("max_batch_events", None), ("max_lateness", None), ("dedupe_window", None)]))),
    (
        "redis",
        Some(&Schema(&[
            ("url", None),
            ("urls", None),
            ("key_prefix", None),
            ("sync_interval", None),
            ("timeout", None),
            ("entitlements_ttl", None),
            ("strict_when_unavailable", None),
        ])),
    ),
    ("clickhouse", Some(&Schema(&[("url", None), ("database", None), ("flush_interval", None), ("raw_events", None)]))),
    (
        "stripe",
        Some(&Schema(&[
            ("api_key_env", None),
            ("api_base", None),
            ("meter_events_base", None),
            ("mode", None),
            ("period", None),
            ("grace", None),
            ("interval", None),
            ("max_requests_per_second", None),
            ("request_timeout", None),
        ])),
    ),
    ("metrics", Some(&Schema(&[("listen", None)]))),
    ("meters", Some(&Schema(&[("name", None), ("aggregation", None), ("precision", None), ("stripe_event_name", None)]))),
    ("plans", Some(&Schema(&[("name", None), ("default", None), ("features", None), ("limits", None)]))),
    (
        "auth",
        Some(&Schema(&[(
            "keys",
            Some(&Schema(&[
                ("name", None),
                ("key_sha256", None),
                ("key_env", None),
                ("scopes", None),
                ("rate_limit_per_second", None),
                ("rate_limit_burst", None),
            ])),
        )])),
    ),
]);

/// Removes keys not in `schema` from `table` (recursively), recording their paths.
fn strip_unknown(table: &mut toml::Table, schema: &Schema, prefix: &str, unknown: &mut Vec<String>) {
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        let Some((_, sub)) = schema.0.iter().find(|(name, _)| *name == key) else {
            unknown.push(path);
            table.remove(&key);
            continue;
        };
        let Some(sub) = sub else { continue };
        match table.get_mut(&key) {
            Some(toml::Value::Table(t)) => strip_unknown(t, sub, &path, unknown),
            Some(toml::Value::Array(items)) => {
                for (i, item) in items.iter_mut().enumerate() {
                    if let toml::Value::Table(t) = item {
                        strip_unknown(t, sub, &format!("{path}[{i}]"), unknown);
                    }
                }
            }
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Unique per instance sharing one Redis; generated once and kept in data_dir.
    pub instance_id: Option<String>,
    /// How long shutdown may take before in-flight work is abandoned.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: ConfigDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: default_listen(), instance_id: None, shutdown_grace: default_shutdown_grace() }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8480".into()
}
fn default_shutdown_grace() -> ConfigDuration {
    ConfigDuration::from_millis(30_000)
}

/// When a 202 is sent relative to the write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    Fsync,
    Buffered,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// How often minute aggregates go to the embedded usage store.
    #[serde(default = "default_flush_interval")]
    pub flush_interval: ConfigDuration,
    /// With `durability = "buffered"`: how often the WAL is fsynced.
    #[serde(default = "default_wal_sync_interval")]
    pub wal_sync_interval: ConfigDuration,
    /// WAL segment files rotate at this size.
    #[serde(default = "default_wal_segment_bytes")]
    pub wal_segment_bytes: u64,
    /// Past this much WAL not yet in the store, ingest answers 503 (the store is
    /// behind) while checks go on.
    #[serde(default = "default_max_wal_bytes")]
    pub max_wal_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: default_data_dir(),
            durability: default_durability(),
            flush_interval: default_flush_interval(),
            wal_sync_interval: default_wal_sync_interval(),
            wal_segment_bytes: default_wal_segment_bytes(),
            max_wal_bytes: default_max_wal_bytes(),
        }
    }
}

fn default_wal_sync_interval() -> ConfigDuration {
    ConfigDuration::from_millis(100)
}
fn default_wal_segment_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_wal_bytes() -> u64 {
    1024 * 1024 * 1024
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
fn default_durability() -> Durability {
    Durability::Fsync
}
fn default_flush_interval() -> ConfigDuration {
    ConfigDuration::from_millis(1_000)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    #[serde(default = "default_max_batch")]
    pub max_batch_events: usize,
    #[serde(default = "default_max_lateness")]
    pub max_lateness: ConfigDuration,
    #[serde(default = "default_dedupe_window")]
    pub dedupe_window: ConfigDuration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_body_bytes: default_max_body(),
            max_batch_events: default_max_batch(),
            max_lateness: default_max_lateness(),
            dedupe_window: default_dedupe_window(),
        }
    }
}

fn default_max_body() -> u64 {
    8 * 1024 * 1024
}
fn default_max_batch() -> usize {
    10_000
}
fn default_max_lateness() -> ConfigDuration {
    ConfigDuration::from_millis(35 * 86_400_000)
}
fn default_dedupe_window() -> ConfigDuration {
    ConfigDuration::from_millis(86_400_000)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Option<String>,
    pub urls: Option<Vec<String>>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_sync_interval")]
    pub sync_interval: ConfigDuration,
    /// How long one Redis call may take before it counts as a failure.
    #[serde(default = "default_redis_timeout")]
    pub timeout: ConfigDuration,
    /// Cached entitlements are re-read this often (pub/sub invalidation is the
    /// fast path; this is the safety net for a missed message).
    #[serde(default = "default_entitlements_ttl")]
    pub entitlements_ttl: ConfigDuration,
    /// `strict` limits while Redis is unreachable: `deny` (reason `unavailable`)
    /// or `allow` (decided from local state).
    #[serde(default = "default_strict_when_unavailable")]
    pub strict_when_unavailable: String,
}

fn default_redis_timeout() -> ConfigDuration {
    ConfigDuration::from_millis(1000)
}
fn default_entitlements_ttl() -> ConfigDuration {
    ConfigDuration::from_millis(60_000)
}
fn default_strict_when_unavailable() -> String {
    "deny".into()
}

impl RedisConfig {
    /// The configured server urls (one, or a cluster's seeds).
    pub fn all_urls(&self) -> Vec<String> {
        self.url.iter().chain(self.urls.iter().flatten()).cloned().collect()
    }
}

fn default_key_prefix() -> String {
    "meterd:".into()
}
fn default_sync_interval() -> ConfigDuration {
    ConfigDuration::from_millis(200)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    pub url: String,
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default = "default_flush_interval")]
    pub flush_interval: ConfigDuration,
    /// Also copy every accepted event, as accepted, to `{database}.raw_events`
    /// (audit and backfill), exported from the WAL by `crate::raw_export`.
    #[serde(default)]
    pub raw_events: bool,
}

fn default_database() -> String {
    "meterd".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    #[serde(default = "default_api_key_env")]
    pub api_key_env: String,
    #[serde(default = "default_api_base")]
    pub api_base: String,
    #[serde(default = "default_meter_events_base")]
    pub meter_events_base: String,
    #[serde(default = "default_stripe_mode")]
    pub mode: String,
    #[serde(default = "default_stripe_period")]
    pub period: String,
    #[serde(default = "default_stripe_grace")]
    pub grace: ConfigDuration,
    #[serde(default = "default_stripe_interval")]
    pub interval: ConfigDuration,
    #[serde(default = "default_stripe_rps")]
    pub max_requests_per_second: u32,
    /// How long one request to Stripe may take before it counts as failed (and is
    /// retried with the same identifier).
    #[serde(default = "default_stripe_request_timeout")]
    pub request_timeout: ConfigDuration,
}

/// How meter events are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeMode {
    /// `POST /v1/billing/meter_events`, one form-encoded event per request.
    V1,
    /// A meter event session and the v2 stream, up to 100 events per request.
    V2,
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

/// `[stripe]` after validation.
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
    pub grace: std::time::Duration,
    pub interval: std::time::Duration,
    pub max_requests_per_second: NonZeroU32,
    pub request_timeout: std::time::Duration,
}

fn default_api_key_env() -> String {
    "STRIPE_API_KEY".into()
}
fn default_api_base() -> String {
    "https://api.stripe.com".into()
}
fn default_meter_events_base() -> String {
    "https://meter-events.stripe.com".into()
}
fn default_stripe_mode() -> String {
    "v1".into()
}
fn default_stripe_period() -> String {
    "hour".into()
}
fn default_stripe_grace() -> ConfigDuration {
    ConfigDuration::from_millis(300_000)
}
fn default_stripe_interval() -> ConfigDuration {
    ConfigDuration::from_millis(30_000)
}
fn default_stripe_rps() -> u32 {
    50
}
fn default_stripe_request_timeout() -> ConfigDuration {
    ConfigDuration::from_millis(10_000)
}

/// Whether `url` is an `http://` or `https://` base URL hyper can parse.
fn valid_base_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://")) && url.parse::<hyper::Uri>().is_ok_and(|u| u.host().is_some())
}

/// Validates `[stripe]`; the key is read from its variable here and named only by
/// the variable in problems.
fn stripe_settings(s: &StripeConfig, p: &mut impl FnMut(&str, String)) -> Option<StripeSettings> {
    let mode = match s.mode.as_str() {
        "v1" => Some(StripeMode::V1),
        "v2" => Some(StripeMode::V2),
        other => {
            p("stripe.mode", format!("{other:?} must be v1 or v2"));
            None
        }
    };
    let period = match s.period.as_str() {
        "minute" => Some(StripePeriod::Minute),
        "hour" => Some(StripePeriod::Hour),
        "day" => Some(StripePeriod::Day),
        other => {
            p("stripe.period", format!("{other:?} must be minute, hour or day"));
            None
        }
    };
    let env_name_ok = !s.api_key_env.is_empty() && s.api_key_env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let key = if !env_name_ok {
        p("stripe.api_key_env", format!("{:?} must be the name of an environment variable ([A-Za-z0-9_]+)", s.api_key_env));
        None
    } else {
        match std::env::var(&s.api_key_env) {
            Ok(key) if !key.trim().is_empty() => Some(SecretKey::new(key.trim().to_string())),
            _ => {
                p(
                    "stripe.api_key_env",
                    format!("environment variable {} is not set or empty (it must hold the Stripe secret key)", s.api_key_env),
                );
                None
            }
        }
    };
    for (name, url) in [("stripe.api_base", &s.api_base), ("stripe.meter_events_base", &s.meter_events_base)] {
        if !valid_base_url(url) {
            p(name, format!("{url:?} must be an http:// or https:// URL"));
        }
    }
    if s.interval.0.is_zero() {
        p("stripe.interval", "must be more than zero".into());
    }
    if s.request_timeout.0.is_zero() {
        p("stripe.request_timeout", "must be more than zero".into());
    }
    if s.grace.0 > std::time::Duration::from_secs(7 * 86_400) {
        p("stripe.grace", "must be at most 7d (Stripe accepts events for 35 days)".into());
    }
    let rps = NonZeroU32::new(s.max_requests_per_second);
    if rps.is_none() || s.max_requests_per_second > 10_000 {
        p("stripe.max_requests_per_second", "must be between 1 and 10000".into());
    }
    Some(StripeSettings {
        api_key_env: s.api_key_env.clone(),
        api_key: key?,
        api_base: s.api_base.trim_end_matches('/').to_string(),
        meter_events_base: s.meter_events_base.trim_end_matches('/').to_string(),
        mode: mode?,
        period: period?,
        grace: s.grace.0,
        interval: s.interval.0,
        max_requests_per_second: rps?,
        request_timeout: s.request_timeout.0,
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` on this address instead of the API listener.
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    pub name: String,
    #[serde(default = "default_aggregation")]
    pub aggregation: String,
    #[serde(default)]
    pub precision: u8,
    pub stripe_event_name: Option<String>,
}

fn default_aggregation() -> String {
    "sum".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub name: String,
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub features: BTreeMap<String, bool>,
    #[serde(default)]
    pub limits: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub name: String,
    pub key_sha256: Option<String>,
    pub key_env: Option<String>,
    pub scopes: Vec<String>,
    /// Requests per second this key may make; absent = unlimited.
    pub rate_limit_per_second: Option<u32>,
    /// Burst above the rate; default = one second's worth.
    pub rate_limit_burst: Option<u32>,
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
    fn parse(s: &str) -> Option<Scope> {
        match s {
            "ingest" => Some(Scope::Ingest),
            "check" => Some(Scope::Check),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A validated API key: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    pub sha256: [u8; 32],
    scopes: u8,
    pub rate_per_second: Option<NonZeroU32>,
    pub burst: Option<NonZeroU32>,
}

impl ApiKey {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes & scope.bit() != 0
    }
}

/// The config after validation: the raw sections plus what was resolved from them.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub raw: Config,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub catalog: Arc<Catalog>,
    pub keys: Vec<ApiKey>,
    /// `[stripe]`, resolved (with the secret key), when reporting is configured.
    pub stripe: Option<StripeSettings>,
    /// Where the config came from, for messages.
    pub source: String,
}

impl Config {
    /// Parses TOML text; `source` names the file in messages.
    ///
    /// Unknown keys are collected first, all of them, each named with its path;
    /// they are then set aside so that `validate` can still report every other
    /// problem of the file in the same run (`Config::problems` holds them).
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let parse_error = |message: String| ConfigError::Parse { path: source.to_string(), message };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
        let mut unknown = Vec::new();
        strip_unknown(&mut table, SCHEMA, "", &mut unknown);
        let mut config: Config = table.try_into().map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
        config.unknown_keys = unknown.into_iter().map(|key| ConfigProblem { key, reason: format!("unknown key in {source}") }).collect();
        Ok(config)
    }

    /// Reads and parses `path`, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<(Config, String), ConfigError> {
        match path {
            None => Ok((Config::parse(EMBEDDED_DEFAULT, "<embedded default>")?, "<embedded default>".to_string())),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?;
                let source = p.display().to_string();
                Ok((Config::parse(&text, &source)?, source))
            }
        }
    }

    /// Checks every rule and resolves the runtime pieces; returns every problem.
    pub fn validate(self, source: &str) -> Result<ValidConfig, ConfigError> {
        let mut problems = self.unknown_keys.clone();
        let mut p = |key: &str, reason: String| problems.push(ConfigProblem { key: key.to_string(), reason });

        let listen_text = std::env::var("METERD_LISTEN").unwrap_or_else(|_| self.server.listen.clone());
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                p("server.listen", format!("{listen_text:?} is not an address like \"127.0.0.1:8480\""));
                None
            }
        };
        if let Some(id) = &self.server.instance_id {
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                p("server.instance_id", "must be 1-64 characters of [A-Za-z0-9_-]".into());
            }
        }
        if self.server.shutdown_grace.0.is_zero() {
            p("server.shutdown_grace", "must be more than zero".into());
        }
        if self.storage.flush_interval.0.is_zero() {
            p("storage.flush_interval", "must be more than zero".into());
        }
        if self.storage.wal_sync_interval.0.is_zero() {
            p("storage.wal_sync_interval", "must be more than zero".into());
        }
        if self.storage.wal_segment_bytes < 4096 {
            p("storage.wal_segment_bytes", "must be at least 4096".into());
        }
        if self.storage.max_wal_bytes < self.storage.wal_segment_bytes.saturating_mul(2) {
            p("storage.max_wal_bytes", "must be at least twice storage.wal_segment_bytes".into());
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            p("storage.data_dir", "must not be empty".into());
        }
        if self.ingest.max_body_bytes < 1024 {
            p("ingest.max_body_bytes", "must be at least 1024".into());
        }
        if self.ingest.max_batch_events == 0 || self.ingest.max_batch_events > 1_000_000 {
            p("ingest.max_batch_events", "must be between 1 and 1000000".into());
        }
        if self.ingest.max_lateness.0.is_zero() {
            p("ingest.max_lateness", "must be more than zero".into());
        }
        if self.ingest.dedupe_window.0.is_zero() {
            p("ingest.dedupe_window", "must be more than zero".into());
        }
        if let Some(redis) = &self.redis {
            match (&redis.url, &redis.urls) {
                (None, None) => p("redis", "needs url (one server) or urls (a cluster's nodes)".into()),
                (Some(_), Some(_)) => p("redis.urls", "give either url or urls, not both".into()),
                (None, Some(urls)) if urls.is_empty() => p("redis.urls", "must list at least one node".into()),
                _ => {}
            }
            for (i, url) in redis.all_urls().iter().enumerate() {
                let at = if redis.url.is_some() { "redis.url".to_string() } else { format!("redis.urls[{i}]") };
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    p(&at, format!("{url:?} must be a redis:// or rediss:// URL"));
                }
            }
            if redis.key_prefix.len() > 64 || redis.key_prefix.contains(['{', '}']) {
                p("redis.key_prefix", "must be at most 64 characters without { or } (they are hash tags)".into());
            }
            if redis.sync_interval.0 < std::time::Duration::from_millis(10) {
                p("redis.sync_interval", "must be at least 10ms".into());
            }
            if redis.timeout.0.is_zero() {
                p("redis.timeout", "must be more than zero".into());
            }
            if redis.entitlements_ttl.0 < std::time::Duration::from_secs(1) {
                p("redis.entitlements_ttl", "must be at least 1s".into());
            }
            if !matches!(redis.strict_when_unavailable.as_str(), "deny" | "allow") {
                p("redis.strict_when_unavailable", format!("{:?} must be \"deny\" or \"allow\"", redis.strict_when_unavailable));
            }
        }
        if let Some(ch) = &self.clickhouse {
            if !(ch.url.starts_with("http://") || ch.url.starts_with("https://")) {
                p("clickhouse.url", format!("{:?} must be an http:// or https:// URL (the HTTP interface, port 8123 by default)", ch.url));
            }
            if ch.database.is_empty() || ch.database.len() > 64 || !ch.database.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                p("clickhouse.database", "must be 1-64 characters of [A-Za-z0-9_]".into());
            }
            if ch.flush_interval.0.is_zero() {
                p("clickhouse.flush_interval", "must be more than zero".into());
            }
            if ch.raw_events && self.storage.durability == Durability::None {
                p(
                    "clickhouse.raw_events",
                    "needs the WAL, which storage.durability = \"none\" turns off: the raw events are exported from it \
                     (use \"fsync\" or \"buffered\", or set raw_events = false)"
                        .into(),
                );
            }
        }
        let stripe = self.stripe.as_ref().and_then(|s| stripe_settings(s, &mut p));
        let metrics_listen = match self.metrics.as_ref().and_then(|m| m.listen.as_ref()) {
            None => None,
            Some(text) => match text.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    p("metrics.listen", format!("{text:?} is not an address like \"127.0.0.1:9480\""));
                    None
                }
            },
        };

        // Meters.
        let mut meters = Vec::new();
        let mut seen = HashSet::new();
        if self.meters.len() > usize::from(MeterId::MAX) {
            p("meters", format!("at most {} meters", MeterId::MAX));
        }
        for (i, m) in self.meters.iter().enumerate() {
            let at = format!("meters[{i}]");
            if !Meter::valid_name(&m.name) {
                p(&format!("{at}.name"), format!("{:?} must match [a-z0-9_]{{1,64}}", m.name));
            }
            if !seen.insert(m.name.clone()) {
                p(&format!("{at}.name"), format!("meter {:?} is defined twice", m.name));
            }
            let aggregation = match m.aggregation.parse::<Aggregation>() {
                Ok(a) => a,
                Err(e) => {
                    p(&format!("{at}.aggregation"), e.to_string());
                    Aggregation::Sum
                }
            };
            if m.precision > crate::model::quantity::MAX_PRECISION {
                p(&format!("{at}.precision"), format!("must be between 0 and {}", crate::model::quantity::MAX_PRECISION));
            }
            if let Some(ev) = &m.stripe_event_name {
                if ev.is_empty() || ev.len() > 100 {
                    p(&format!("{at}.stripe_event_name"), "must be 1-100 characters".into());
                }
            }
            meters.push(Meter {
                id: MeterId::try_from(i).unwrap_or(MeterId::MAX),
                name: m.name.clone(),
                aggregation,
                precision: m.precision.min(crate::model::quantity::MAX_PRECISION),
                stripe_event_name: m.stripe_event_name.clone(),
            });
        }
        let meter_by_name: HashMap<&str, &Meter> = meters.iter().map(|m| (m.name.as_str(), m)).collect();

        // Plans.
        let mut plans = Vec::new();
        let mut plan_names = HashSet::new();
        let mut defaults = Vec::new();
        if self.plans.is_empty() {
            p("plans", "at least one plan is required (exactly one with default = true)".into());
        }
        for (i, plan) in self.plans.iter().enumerate() {
            let at = format!("plans[{i}]");
            if plan.name.is_empty() || plan.name.len() > 64 {
                p(&format!("{at}.name"), "must be 1-64 characters".into());
            }
            if !plan_names.insert(plan.name.clone()) {
                p(&format!("{at}.name"), format!("plan {:?} is defined twice", plan.name));
            }
            if plan.default {
                defaults.push(i);
            }
            let mut limits = HashMap::new();
            for (meter_name, spec) in &plan.limits {
                let key = format!("{at}.limits.{meter_name}");
                let Some(meter) = meter_by_name.get(meter_name.as_str()) else {
                    p(&key, format!("unknown meter {meter_name:?} (not in [[meters]])"));
                    continue;
                };
                let json = match serde_json::to_value(spec) {
                    Ok(v) => v,
                    Err(e) => {
                        p(&key, e.to_string());
                        continue;
                    }
                };
                match parse_limits(&json, meter) {
                    Ok(l) => {
                        limits.insert(meter.id, Arc::from(l));
                    }
                    Err(ps) => {
                        for sp in ps {
                            p(&format!("{key}{}", sp.path), sp.reason);
                        }
                    }
                }
            }
            plans.push(Plan { name: plan.name.clone(), features: plan.features.clone(), limits });
        }
        if !self.plans.is_empty() && defaults.len() != 1 {
            p("plans", format!("exactly one plan must have default = true (found {})", defaults.len()));
        }

        // Auth keys.
        let mut keys = Vec::new();
        for (i, k) in self.auth.keys.iter().enumerate() {
            let at = format!("auth.keys[{i}]");
            let sha = match (&k.key_sha256, &k.key_env) {
                (Some(_), Some(_)) | (None, None) => {
                    p(&at, "give exactly one of key_sha256 or key_env".into());
                    None
                }
                (Some(hex_text), None) => match hex::decode(hex_text) {
                    Ok(bytes) if bytes.len() == 32 => {
                        let mut out = [0u8; 32];
                        out.copy_from_slice(&bytes);
                        Some(out)
                    }
                    _ => {
                        p(&format!("{at}.key_sha256"), "must be 64 hex characters (the SHA-256 of the key)".into());
                        None
                    }
                },
                (None, Some(var)) => match std::env::var(var) {
                    Ok(secret) if !secret.is_empty() => Some(sha256_of(secret.as_bytes())),
                    _ => {
                        p(&format!("{at}.key_env"), format!("environment variable {var} is not set or empty"));
                        None
                    }
                },
            };
            let mut scopes = 0u8;
            if k.scopes.is_empty() {
                p(&format!("{at}.scopes"), "must name at least one of ingest, check, read, admin".into());
            }
            for s in &k.scopes {
                match Scope::parse(s) {
                    Some(scope) => scopes |= scope.bit(),
                    None => p(&format!("{at}.scopes"), format!("unknown scope {s:?} (expected ingest, check, read or admin)")),
                }
            }
            let rate = match k.rate_limit_per_second {
                Some(0) => {
                    p(&format!("{at}.rate_limit_per_second"), "must be more than zero (omit it for no limit)".into());
                    None
                }
                other => other.and_then(NonZeroU32::new),
            };
            if k.rate_limit_burst == Some(0) {
                p(&format!("{at}.rate_limit_burst"), "must be more than zero".into());
            }
            if let Some(sha256) = sha {
                keys.push(ApiKey {
                    name: k.name.clone(),
                    sha256,
                    scopes,
                    rate_per_second: rate,
                    burst: k.rate_limit_burst.and_then(NonZeroU32::new),
                });
            }
        }
        if let Some(addr) = listen {
            if self.auth.keys.is_empty() && !addr.ip().is_loopback() {
                p("server.listen", format!("{addr} is not a loopback address and [[auth.keys]] is empty: add keys or listen on 127.0.0.1"));
            }
        }

        match (problems.is_empty(), listen, defaults.first()) {
            (true, Some(listen), Some(&default_plan)) => Ok(ValidConfig {
                catalog: Arc::new(Catalog::new(meters, plans, default_plan)),
                raw: self,
                listen,
                metrics_listen,
                keys,
                stripe,
                source: source.to_string(),
            }),
            _ => Err(ConfigError::Invalid { path: source.to_string(), problems }),
        }
    }
}

/// Loads and validates in one step.
pub fn load_valid(path: Option<&Path>) -> Result<ValidConfig, ConfigError> {
    let (config, source) = Config::load(path)?;
    config.validate(&source)
}

/// SHA-256 of a key, as stored in `key_sha256`.
pub fn sha256_of(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, "t.toml").and_then(|c| c.validate("t.toml")) {
            Ok(_) => vec![],
            Err(ConfigError::Invalid { problems, .. }) => problems.into_iter().map(|p| p.key).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        assert_eq!(problems(EMBEDDED_DEFAULT), Vec::<String>::new());
    }

    #[test]
    fn unknown_keys_are_reported_with_every_other_problem() {
        let text = "[server]\nlisen = 3\nlisten = \"0.0.0.0:1\"\n[[meters]]\nname = \"m\"\ncolour = 1\n[[plans]]\nname = \"p\"\n";
        let err = problems(text);
        for key in ["server.lisen", "meters[0].colour", "server.listen", "plans"] {
            assert!(err.iter().any(|k| k == key), "missing {key} in {err:?}");
        }
    }

    #[test]
    fn schema_knows_every_field_of_the_embedded_default() {
        let mut table: toml::Table = EMBEDDED_DEFAULT.parse().unwrap_or_default();
        let mut unknown = Vec::new();
        strip_unknown(&mut table, SCHEMA, "", &mut unknown);
        assert!(unknown.is_empty(), "{unknown:?}");
        // Every schema key deserializes: a table with all of them set parses.
        let all = r#"
[server]
listen = "127.0.0.1:1"
instance_id = "a"
shutdown_grace = "1s"
[storage]
data_dir = "d"
durability = "none"
flush_interval = "1s"
wal_sync_interval = "10ms"
wal_segment_bytes = 4096
max_wal_bytes = 8192
[ingest]
max_body_bytes = 2048
max_batch_events = 1
max_lateness = "1d"
dedupe_window = "1h"
[redis]
url = "redis://x"
urls = ["redis://y"]
key_prefix = "k"
sync_interval = "1s"
timeout = "1s"
entitlements_ttl = "1m"
strict_when_unavailable = "allow"
[clickhouse]
url = "http://x"
database = "d"
flush_interval = "1s"
raw_events = true
[stripe]
api_key_env = "K"
api_base = "http://x"
meter_events_base = "http://y"
mode = "v1"
period = "hour"
grace = "1m"
interval = "1s"
max_requests_per_second = 1
request_timeout = "1s"
[metrics]
listen = "127.0.0.1:2"
[[meters]]
name = "m"
aggregation = "sum"
precision = 0
stripe_event_name = "m"
[[plans]]
name = "p"
default = true
features = {}
limits = {}
[[auth.keys]]
name = "k"
key_env = "X"
scopes = ["read"]
rate_limit_per_second = 1
rate_limit_burst = 1
"#;
        let parsed = Config::parse(all, "all.toml");
        assert!(parsed.as_ref().map(|c| c.unknown_keys.is_empty()).unwrap_or(false), "{:?}", parsed.err());
    }

    #[test]
    fn redis_settings_are_checked() {
        let base = "[[plans]]\nname = \"p\"\ndefault = true\n";
        let ok = format!("[redis]\nurl = \"redis://127.0.0.1:6379/0\"\n{base}");
        assert!(Config::parse(&ok, "r.toml").and_then(|c| c.validate("r.toml")).is_ok());
        let cluster = format!("[redis]\nurls = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\n{base}");
        assert!(Config::parse(&cluster, "r.toml").and_then(|c| c.validate("r.toml")).is_ok());
        let bad = format!(
            "[redis]\nurl = \"http://x\"\nurls = [\"redis://y\"]\nkey_prefix = \"{{x}}\"\nsync_interval = \"1ms\"\nstrict_when_unavailable = \"maybe\"\n{base}"
        );
        let err = problems(&bad).join("\n");
        for field in ["redis.urls", "redis.url", "redis.key_prefix", "redis.sync_interval", "redis.strict_when_unavailable"] {
            assert!(err.contains(field), "{field} missing from {err}");
        }
        assert_eq!(problems(&format!("[redis]\n{base}")), vec!["redis".to_string()]);
    }

    #[test]
    fn unknown_keys_name_key_and_file() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n[[plans]]\nname = \"p\"\ndefault = true\n";
        let err = Config::parse(text, "t.toml").and_then(|c| c.validate("t.toml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("server.lisen: unknown key in t.toml"), "{err}");
        assert!(err.contains("1 problem"), "{err}");
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let text = r#"
[server]
listen = "nowhere"
[ingest]
max_lateness = "3 weeks"
"#;
        // A duration error is a parse error (it names the key).
        let err = problems(text);
        assert!(err[0].contains("max_lateness"), "{err:?}");

        let text = r#"
[server]
listen = "nowhere"
[[meters]]
name = "Bad Name"
aggregation = "avg"
[[meters]]
name = "ok"
precision = 12
[[plans]]
name = "a"
[plans.limits]
ok = { limit = 5, window = "week" }
ghost = { limit = 1, window = "day" }
[[auth.keys]]
name = "k"
key_sha256 = "abc"
scopes = ["ingest", "fly"]
"#;
        let err = problems(text);
        for key in [
            "server.listen",
            "meters[0].name",
            "meters[0].aggregation",
            "meters[1].precision",
            "plans[0].limits.ok.window",
            "plans[0].limits.ghost",
            "plans",
            "auth.keys[0].key_sha256",
            "auth.keys[0].scopes",
        ] {
            assert!(err.iter().any(|k| k == key), "missing {key} in {err:?}");
        }
    }

    const PLAN: &str = "[[plans]]\nname = \"p\"\ndefault = true\n";

    #[test]
    fn stripe_is_validated_and_the_key_comes_from_the_environment() {
        std::env::set_var("METERD_TEST_STRIPE_KEY_OK", "sk_test_value_never_shown");
        let good =
            format!("[stripe]\napi_key_env = \"METERD_TEST_STRIPE_KEY_OK\"\nmode = \"v2\"\nperiod = \"minute\"\ngrace = \"0s\"\n{PLAN}");
        let valid = Config::parse(&good, "t.toml").and_then(|c| c.validate("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        let stripe = valid.stripe.as_ref().unwrap_or_else(|| panic!("stripe settings"));
        assert_eq!(
            (stripe.mode, stripe.period, stripe.api_key.expose()),
            (StripeMode::V2, StripePeriod::Minute, "sk_test_value_never_shown")
        );
        assert_eq!(stripe.api_base, "https://api.stripe.com");
        let debug = format!("{valid:?}");
        assert!(!debug.contains("sk_test_value_never_shown") && debug.contains("***"), "the key leaks through Debug");

        let bad = format!(
            "[stripe]\napi_key_env = \"METERD_TEST_STRIPE_KEY_UNSET\"\nmode = \"v3\"\nperiod = \"week\"\napi_base = \"ftp://x\"\ninterval = \"0s\"\nmax_requests_per_second = 0\n{PLAN}"
        );
        let err = problems(&bad);
        for key in
            ["stripe.api_key_env", "stripe.mode", "stripe.period", "stripe.api_base", "stripe.interval", "stripe.max_requests_per_second"]
        {
            assert!(err.iter().any(|k| k == key), "missing {key} in {err:?}");
        }
        let bad_name = format!("[stripe]\napi_key_env = \"NOT A NAME\"\n{PLAN}");
        assert_eq!(problems(&bad_name), vec!["stripe.api_key_env".to_string()]);
    }

    #[test]
    fn stripe_key_value_is_never_in_a_message() {
        std::env::set_var("METERD_TEST_STRIPE_KEY_MSG", "sk_live_do_not_print");
        let text = format!("[stripe]\napi_key_env = \"METERD_TEST_STRIPE_KEY_MSG\"\nmode = \"v9\"\n{PLAN}");
        let err = Config::parse(&text, "t.toml").and_then(|c| c.validate("t.toml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("stripe.mode") && !err.contains("sk_live_do_not_print"), "{err}");
    }

    #[test]
    fn raw_events_need_the_wal() {
        let ch = "[clickhouse]\nurl = \"http://127.0.0.1:8123\"\nraw_events = true\n";
        let valid = Config::parse(&format!("{ch}{PLAN}"), "t.toml").and_then(|c| c.validate("t.toml"));
        assert!(valid.as_ref().is_ok_and(|v| v.raw.clickhouse.as_ref().is_some_and(|c| c.raw_events)), "{:?}", valid.err());
        let buffered = format!("[storage]\ndurability = \"buffered\"\n{ch}{PLAN}");
        assert_eq!(problems(&buffered), Vec::<String>::new());
        let none = format!("[storage]\ndurability = \"none\"\n{ch}{PLAN}");
        assert_eq!(problems(&none), vec!["clickhouse.raw_events".to_string()]);
        let err = Config::parse(&none, "t.toml").and_then(|c| c.validate("t.toml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("clickhouse.raw_events") && err.contains("durability"), "{err}");
        // Off by default.
        let off = Config::parse(&format!("[clickhouse]\nurl = \"http://x\"\n{PLAN}"), "t.toml").and_then(|c| c.validate("t.toml"));
        assert!(off.is_ok_and(|v| v.raw.clickhouse.is_some_and(|c| !c.raw_events)));
    }

    #[test]
    fn refuses_open_listen_without_keys() {
        let text = "[server]\nlisten = \"0.0.0.0:8480\"\n[[plans]]\nname = \"p\"\ndefault = true\n";
        assert_eq!(problems(text), vec!["server.listen".to_string()]);
    }
}
