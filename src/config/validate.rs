//! Validation: checks the meaning of every value of a raw [`Config`] and resolves
//! it into [`ValidConfig`], collecting every problem with its key path instead of
//! stopping at the first. A bad value is reported and replaced by its default so
//! that the checks that depend on it (cross-field rules) still run.

use super::raw::{self, Config};
use super::schema::{element_paths, segment};
use super::settings::*;
use super::{ConfigError, ConfigProblem, Overrides, LISTEN_VAR};
use crate::duration;
use crate::model::{plan::parse_limits, Aggregation, Catalog, Meter, MeterId, Plan};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
const fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Collects problems; its readers return the default after reporting a bad value.
struct Checker {
    problems: Vec<ConfigProblem>,
}

impl Checker {
    fn add(&mut self, key: &str, reason: impl Into<String>) {
        self.problems.push(ConfigProblem { key: key.to_string(), reason: reason.into() });
    }

    /// A duration of at least `min` (which is at least 1ms: zero is never allowed).
    fn duration(&mut self, key: &str, value: &Option<String>, default: Duration, min: Duration) -> Duration {
        let Some(text) = value else { return default };
        match duration::parse(text) {
            Ok(d) if d >= min.max(millis(1)) => d,
            Ok(_) if min <= millis(1) => {
                self.add(key, "must be more than zero");
                default
            }
            Ok(_) => {
                self.add(key, format!("must be at least {}", duration::format(min)));
                default
            }
            Err(e) => {
                self.add(key, e.to_string());
                default
            }
        }
    }

    /// An integer in `min..=max`.
    fn int(&mut self, key: &str, value: Option<i64>, default: u64, min: u64, max: u64) -> u64 {
        let Some(n) = value else { return default };
        match u64::try_from(n) {
            Ok(n) if (min..=max).contains(&n) => n,
            _ if max == u64::MAX => {
                self.add(key, format!("must be at least {min}"));
                default
            }
            _ => {
                self.add(key, format!("must be between {min} and {max}"));
                default
            }
        }
    }

    /// One of `options`, by name.
    fn choice<T: Copy>(&mut self, key: &str, value: &Option<String>, default: T, options: &[(&str, T)]) -> T {
        let Some(text) = value else { return default };
        match options.iter().find(|(name, _)| name == text) {
            Some(&(_, v)) => v,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.add(key, format!("{text:?} must be one of {}", names.join(", ")));
                default
            }
        }
    }

    fn address(&mut self, key: &str, text: &str, example: &str, note: &str) -> Option<SocketAddr> {
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.add(key, format!("{text:?} is not an address like \"{example}\"{note}"));
                None
            }
        }
    }
}

/// Checks every rule and resolves the settings; returns every problem.
pub(super) fn validate(mut raw: Config, source: &str, overrides: &Overrides) -> Result<ValidConfig, ConfigError> {
    let mut c = Checker { problems: std::mem::take(&mut raw.problems) };
    let server = server(&mut c, &raw.server, overrides);
    let storage = storage(&mut c, &raw.storage);
    let ingest = ingest(&mut c, &raw.ingest);
    let redis = raw.redis.as_ref().map(|r| redis(&mut c, r));
    let clickhouse = raw.clickhouse.as_ref().map(|ch| clickhouse(&mut c, ch, storage.durability));
    let stripe = raw.stripe.as_ref().filter(|s| s.reports()).and_then(|s| stripe(&mut c, s));
    let notifications = raw.notifications.as_ref().and_then(|n| notifications(&mut c, n));
    let metrics_listen =
        raw.metrics.as_ref().and_then(|m| m.listen.as_ref()).and_then(|text| c.address("metrics.listen", text, "127.0.0.1:9480", ""));
    let meters = meters(&mut c, &raw.meters);
    let (plans, default_plan) = plans(&mut c, &raw.plans, &meters);
    // Issue 16: Redis scripts count in Lua doubles, exact to 2^53 raw units.
    if redis.is_some() {
        for plan in &plans {
            for meter in &meters {
                let too_big = plan.limits.get(&meter.id).is_some_and(|ls| {
                    ls.iter().any(|l| matches!(l.amount, crate::model::LimitAmount::Finite(v) if v > crate::model::plan::REDIS_EXACT_MAX))
                });
                if too_big {
                    c.add(
                        &format!("plans.{}.limits.{}", plan.name, meter.name),
                        format!(
                            "a limit above {} raw units (2^53 - 1, at precision {}) cannot be kept exact in Redis; lower it or the meter's precision",
                            crate::model::plan::REDIS_EXACT_MAX,
                            meter.precision
                        ),
                    );
                }
            }
        }
    }
    let keys = keys(&mut c, &raw.auth.keys);
    // Stripe subscription sync and portal tokens (issue 20).
    let stripe_webhooks = raw.stripe.as_ref().and_then(|s| s.webhooks.as_ref()).and_then(|w| stripe_webhooks(&mut c, w, &plans));
    let portal_secret = raw
        .server
        .portal_secret_env
        .as_ref()
        .and_then(|env| secret_from_env(&mut c, "server.portal_secret_env", env, "the portal-token signing key"));
    if let Some((listen, key)) = &server {
        if raw.auth.keys.is_empty() && !listen.listen.ip().is_loopback() {
            c.add(key, format!("{} is not a loopback address and [[auth.keys]] is empty: add keys or listen on 127.0.0.1", listen.listen));
        }
    }
    match (c.problems.is_empty(), server, default_plan) {
        (true, Some((server, _)), Some(default_plan)) => Ok(ValidConfig {
            server,
            storage,
            ingest,
            redis,
            clickhouse,
            stripe,
            notifications,
            metrics_listen,
            catalog: Arc::new(Catalog::new(meters, plans, default_plan)),
            keys,
            source: source.to_string(),
            stripe_webhooks,
            portal_secret,
        }),
        _ => {
            // Grouped by key (the walk and the checks find them in different orders).
            let mut problems = c.problems;
            problems.sort_by(|a, b| a.key.cmp(&b.key));
            Err(ConfigError::Invalid { path: source.to_string(), problems })
        }
    }
}

/// `[server]`, with the key the listen address came from (`server.listen` or
/// `METERD_LISTEN`), to blame it in later problems. `None` when the address is bad.
fn server(c: &mut Checker, s: &raw::Server, overrides: &Overrides) -> Option<(ServerSettings, &'static str)> {
    let (listen_key, listen_text, note) = match &overrides.listen {
        Some(text) => (LISTEN_VAR, text.as_str(), " (METERD_LISTEN overrides server.listen)"),
        None => ("server.listen", s.listen.as_deref().unwrap_or("127.0.0.1:8480"), ""),
    };
    let listen = c.address(listen_key, listen_text, "127.0.0.1:8480", note);
    if let Some(id) = &s.instance_id {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            c.add("server.instance_id", "must be 1-64 characters of [A-Za-z0-9_-]");
        }
    }
    let settings = ServerSettings {
        listen: listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
        instance_id: s.instance_id.clone(),
        shutdown_grace: c.duration("server.shutdown_grace", &s.shutdown_grace, secs(30), Duration::ZERO),
        header_read_timeout: c.duration("server.header_read_timeout", &s.header_read_timeout, secs(10), Duration::ZERO),
        body_read_timeout: c.duration("server.body_read_timeout", &s.body_read_timeout, secs(30), Duration::ZERO),
        idle_timeout: c.duration("server.idle_timeout", &s.idle_timeout, secs(60), Duration::ZERO),
        max_connections: c.int("server.max_connections", s.max_connections, 10_000, 1, 1_000_000) as usize,
        connection_threads: s.connection_threads.map(|_| c.int("server.connection_threads", s.connection_threads, 1, 1, 256) as usize),
    };
    listen.map(|_| (settings, listen_key))
}

fn storage(c: &mut Checker, s: &raw::Storage) -> StorageSettings {
    let data_dir = PathBuf::from(s.data_dir.as_deref().unwrap_or("./data"));
    if data_dir.as_os_str().is_empty() {
        c.add("storage.data_dir", "must not be empty");
    }
    let durability = c.choice(
        "storage.durability",
        &s.durability,
        Durability::Fsync,
        &[("fsync", Durability::Fsync), ("buffered", Durability::Buffered), ("none", Durability::None)],
    );
    let wal_segment_bytes = c.int("storage.wal_segment_bytes", s.wal_segment_bytes, 64 << 20, 4096, u64::MAX);
    let max_wal_bytes = c.int("storage.max_wal_bytes", s.max_wal_bytes, 1 << 30, 0, u64::MAX);
    if max_wal_bytes < wal_segment_bytes.saturating_mul(2) {
        c.add("storage.max_wal_bytes", "must be at least twice storage.wal_segment_bytes");
    }
    StorageSettings {
        data_dir,
        durability,
        flush_interval: c.duration("storage.flush_interval", &s.flush_interval, secs(1), Duration::ZERO),
        wal_sync_interval: c.duration("storage.wal_sync_interval", &s.wal_sync_interval, millis(100), Duration::ZERO),
        wal_sync_spacing: wal_sync_spacing(c, &s.wal_sync_spacing),
        wal_segment_bytes,
        max_wal_bytes,
        max_pending_buckets: c.int("storage.max_pending_buckets", s.max_pending_buckets, 5_000_000, 1, u64::MAX),
    }
}

/// The default `storage.wal_sync_spacing`: off. Spacing saves CPU for many
/// independent clients at the price of median latency, an operator's choice
/// (BENCHMARKS.md, issue 24's seventh and eighth passes).
const DEFAULT_WAL_SYNC_SPACING: Duration = Duration::ZERO;

// Issue 24: `storage.wal_sync_spacing`, zero (off) to 10ms, in microseconds or
// coarser. Longer would hold every consume of a busy instance that long.
fn wal_sync_spacing(c: &mut Checker, value: &Option<String>) -> Duration {
    const KEY: &str = "storage.wal_sync_spacing";
    let Some(text) = value else { return DEFAULT_WAL_SYNC_SPACING };
    match duration::parse_fine(text) {
        Ok(d) if d <= millis(10) => d,
        Ok(_) => {
            c.add(KEY, "must be at most 10ms (every consume of a busy instance may wait that long)");
            DEFAULT_WAL_SYNC_SPACING
        }
        Err(e) => {
            c.add(KEY, e.to_string());
            DEFAULT_WAL_SYNC_SPACING
        }
    }
}

fn ingest(c: &mut Checker, s: &raw::Ingest) -> IngestSettings {
    IngestSettings {
        max_body_bytes: c.int("ingest.max_body_bytes", s.max_body_bytes, 8 << 20, 1024, u64::MAX),
        max_batch_events: c.int("ingest.max_batch_events", s.max_batch_events, 10_000, 1, 1_000_000) as usize,
        max_lateness: c.duration("ingest.max_lateness", &s.max_lateness, secs(35 * 86_400), Duration::ZERO),
        dedupe_window: c.duration("ingest.dedupe_window", &s.dedupe_window, secs(86_400), Duration::ZERO),
        dedupe_memory: dedupe_memory(c, &s.dedupe_memory),
        max_unique_values: c.int("ingest.max_unique_values", s.max_unique_values, 100_000, 1, 10_000_000) as usize,
    }
}

// Bounded dedupe (issue 15): `ingest.dedupe_memory`, a size such as "512MB"
// (units B, KB, MB, GB, TB in powers of 1024; KiB… also accepted), at least 1MB.
fn dedupe_memory(c: &mut Checker, value: &Option<String>) -> u64 {
    const KEY: &str = "ingest.dedupe_memory";
    const DEFAULT: u64 = 512 << 20;
    let Some(text) = value else { return DEFAULT };
    match parse_size(text) {
        Some(n) if n >= 1 << 20 => n,
        Some(_) => {
            c.add(KEY, "must be at least 1MB");
            DEFAULT
        }
        None => {
            c.add(KEY, "must be a size such as \"512MB\" (a whole number and B, KB, MB, GB or TB)");
            DEFAULT
        }
    }
}

/// "512MB" → bytes (binary units).
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

fn redis(c: &mut Checker, r: &raw::Redis) -> RedisSettings {
    match (&r.url, &r.urls) {
        (None, None) => c.add("redis", "needs url (one server) or urls (a cluster's nodes)"),
        (Some(_), Some(_)) => c.add("redis.urls", "give either url or urls, not both"),
        (None, Some(urls)) if urls.is_empty() => c.add("redis.urls", "must list at least one node"),
        _ => {}
    }
    let urls: Vec<String> = r.url.iter().chain(r.urls.iter().flatten()).cloned().collect();
    for (i, url) in urls.iter().enumerate() {
        let at =
            if r.url.is_some() && i == 0 { "redis.url".to_string() } else { format!("redis.urls[{}]", i - usize::from(r.url.is_some())) };
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            c.add(&at, format!("{url:?} must be a redis:// or rediss:// URL"));
        }
    }
    let key_prefix = r.key_prefix.clone().unwrap_or_else(|| "meterd:".into());
    if key_prefix.len() > 64 || key_prefix.contains(['{', '}']) {
        c.add("redis.key_prefix", "must be at most 64 characters without { or } (they are hash tags)");
    }
    RedisSettings {
        urls,
        key_prefix,
        sync_interval: c.duration("redis.sync_interval", &r.sync_interval, millis(200), millis(10)),
        timeout: c.duration("redis.timeout", &r.timeout, secs(1), Duration::ZERO),
        entitlements_ttl: c.duration("redis.entitlements_ttl", &r.entitlements_ttl, secs(60), secs(1)),
        strict_when_unavailable: c.choice(
            "redis.strict_when_unavailable",
            &r.strict_when_unavailable,
            StrictWhenUnavailable::Deny,
            &[("deny", StrictWhenUnavailable::Deny), ("allow", StrictWhenUnavailable::Allow)],
        ),
    }
}

fn clickhouse(c: &mut Checker, ch: &raw::ClickHouse, durability: Durability) -> ClickHouseSettings {
    let url = match &ch.url {
        None => {
            c.add("clickhouse.url", "is required (the HTTP interface, e.g. \"http://127.0.0.1:8123\")");
            String::new()
        }
        Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
            c.add("clickhouse.url", format!("{url:?} must be an http:// or https:// URL (the HTTP interface, port 8123 by default)"));
            url.clone()
        }
        Some(url) => url.clone(),
    };
    let database = ch.database.clone().unwrap_or_else(|| "meterd".into());
    if database.is_empty() || database.len() > 64 || !database.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        c.add("clickhouse.database", "must be 1-64 characters of [A-Za-z0-9_]");
    }
    let raw_events = ch.raw_events.unwrap_or(false);
    if raw_events && durability == Durability::None {
        c.add(
            "clickhouse.raw_events",
            "needs the WAL, which storage.durability = \"none\" turns off: the raw events are exported from it \
             (use \"fsync\" or \"buffered\", or set raw_events = false)",
        );
    }
    ClickHouseSettings {
        url,
        database,
        flush_interval: c.duration("clickhouse.flush_interval", &ch.flush_interval, secs(1), Duration::ZERO),
        raw_events,
    }
}

/// Whether `url` is an `http://` or `https://` base URL hyper can parse.
fn valid_base_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://")) && url.parse::<hyper::Uri>().is_ok_and(|u| u.host().is_some())
}

/// `[stripe]`; the key is read from its variable here and named only by the
/// variable in problems.
fn stripe(c: &mut Checker, s: &raw::Stripe) -> Option<StripeSettings> {
    let mode = c.choice("stripe.mode", &s.mode, StripeMode::V1, &[("v1", StripeMode::V1), ("v2", StripeMode::V2)]);
    let period = c.choice(
        "stripe.period",
        &s.period,
        StripePeriod::Hour,
        &[("minute", StripePeriod::Minute), ("hour", StripePeriod::Hour), ("day", StripePeriod::Day)],
    );
    let api_key_env = s.api_key_env.clone().unwrap_or_else(|| "STRIPE_API_KEY".into());
    let env_name_ok = !api_key_env.is_empty() && api_key_env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let key = if !env_name_ok {
        c.add("stripe.api_key_env", format!("{api_key_env:?} must be the name of an environment variable ([A-Za-z0-9_]+)"));
        None
    } else {
        match std::env::var(&api_key_env) {
            Ok(key) if !key.trim().is_empty() => Some(SecretKey::new(key.trim().to_string())),
            _ => {
                c.add(
                    "stripe.api_key_env",
                    format!("environment variable {api_key_env} is not set or empty (it must hold the Stripe secret key)"),
                );
                None
            }
        }
    };
    let api_base = s.api_base.clone().unwrap_or_else(|| "https://api.stripe.com".into());
    let meter_events_base = s.meter_events_base.clone().unwrap_or_else(|| "https://meter-events.stripe.com".into());
    for (name, url) in [("stripe.api_base", &api_base), ("stripe.meter_events_base", &meter_events_base)] {
        if !valid_base_url(url) {
            c.add(name, format!("{url:?} must be an http:// or https:// URL"));
        }
    }
    let grace = match &s.grace {
        None => secs(300),
        Some(text) => match duration::parse(text) {
            Ok(d) if d <= secs(7 * 86_400) => d,
            Ok(_) => {
                c.add("stripe.grace", "must be at most 7d (Stripe accepts events for 35 days)");
                secs(300)
            }
            Err(e) => {
                c.add("stripe.grace", e.to_string());
                secs(300)
            }
        },
    };
    let interval = c.duration("stripe.interval", &s.interval, secs(30), Duration::ZERO);
    let request_timeout = c.duration("stripe.request_timeout", &s.request_timeout, secs(10), Duration::ZERO);
    let rps = c.int("stripe.max_requests_per_second", s.max_requests_per_second, 50, 1, 10_000);
    Some(StripeSettings {
        api_key_env,
        api_key: key?,
        api_base: api_base.trim_end_matches('/').to_string(),
        meter_events_base: meter_events_base.trim_end_matches('/').to_string(),
        mode,
        period,
        grace,
        interval,
        max_requests_per_second: NonZeroU32::new(u32::try_from(rps).ok()?)?,
        request_timeout,
    })
}

// Stripe subscription sync and portal tokens (issue 20).

/// A secret read from the environment variable `env` names (problems name the
/// key and the variable, never the value).
fn secret_from_env(c: &mut Checker, key: &str, env: &str, what: &str) -> Option<SecretKey> {
    if env.is_empty() || !env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        c.add(key, format!("{env:?} must be the name of an environment variable ([A-Za-z0-9_]+)"));
        return None;
    }
    match std::env::var(env) {
        Ok(value) if !value.trim().is_empty() => Some(SecretKey::new(value.trim().to_string())),
        _ => {
            c.add(key, format!("environment variable {env} is not set or empty (it must hold {what})"));
            None
        }
    }
}

/// `[stripe.webhooks]`: the signing secret, the tolerance, and prices mapped to
/// plans that exist.
fn stripe_webhooks(c: &mut Checker, w: &raw::StripeWebhooks, plans: &[Plan]) -> Option<StripeWebhookSettings> {
    let secret_env = w.secret_env.clone().unwrap_or_else(|| "STRIPE_WEBHOOK_SECRET".into());
    let secret = secret_from_env(c, "stripe.webhooks.secret_env", &secret_env, "the endpoint's whsec_... signing secret");
    let tolerance = c.duration("stripe.webhooks.tolerance", &w.tolerance, secs(300), Duration::ZERO);
    let mut mapped = std::collections::BTreeMap::new();
    for (price, plan) in &w.plans {
        let key = format!("stripe.webhooks.plans.{}", segment(price));
        match plan.as_str() {
            Some(name) if plans.iter().any(|p| p.name == name) => {
                mapped.insert(price.clone(), name.to_string());
            }
            Some(name) => c.add(&key, format!("plan {name:?} is not configured")),
            None => c.add(&key, "must be a plan name (a string)"),
        }
        if price.is_empty() {
            c.add(&key, "a price id or lookup_key must not be empty");
        }
    }
    Some(StripeWebhookSettings { secret_env, secret: secret?, tolerance, plans: mapped })
}

// --- Threshold notifications (issue 17) ---

/// `[notifications]`: thresholds, timings and every endpoint (names unique, URLs
/// http(s), secrets read from their variables as `whsec_` + base64 of 24 to 64
/// bytes, types known). Secrets are named only by their variable in problems.
fn notifications(c: &mut Checker, n: &raw::Notifications) -> Option<NotificationSettings> {
    use base64::Engine as _;
    let thresholds = match &n.thresholds {
        None => crate::model::Thresholds::new(&[75, 90, 100]).ok()?,
        Some(pcts) => match crate::model::Thresholds::new(pcts) {
            Ok(t) => t,
            Err(reason) => {
                c.add("notifications.thresholds", reason);
                crate::model::Thresholds::NONE
            }
        },
    };
    let retry_for = c.duration("notifications.retry_for", &n.retry_for, secs(72 * 3600), secs(1));
    let timeout = c.duration("notifications.timeout", &n.timeout, secs(10), Duration::ZERO);
    let paths = element_paths("notifications.endpoints", &n.endpoints.iter().map(|e| e.name.as_deref()).collect::<Vec<_>>());
    let mut seen = HashSet::new();
    let mut endpoints = Vec::new();
    let mut ok = true;
    for (e, at) in n.endpoints.iter().zip(paths) {
        let before = c.problems.len();
        let name = e.name.clone().unwrap_or_default();
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            c.add(&format!("{at}.name"), format!("{name:?} must match [a-z0-9_-]{{1,64}}"));
        } else if !seen.insert(name.clone()) {
            c.add(&format!("{at}.name"), format!("endpoint {name:?} is defined twice"));
        }
        let url = e.url.clone().unwrap_or_default();
        if !valid_base_url(&url) {
            c.add(&format!("{at}.url"), format!("{url:?} must be an http:// or https:// URL"));
        }
        let secret_env = e.secret_env.clone().unwrap_or_default();
        let mut secret = None;
        if secret_env.is_empty() || !secret_env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            c.add(&format!("{at}.secret_env"), format!("{secret_env:?} must be the name of an environment variable ([A-Za-z0-9_]+)"));
        } else {
            let value = std::env::var(&secret_env).unwrap_or_default();
            let key = value.trim().strip_prefix("whsec_").and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
            match key {
                Some(k) if (24..=64).contains(&k.len()) => secret = Some(WebhookSecret::new(k)),
                _ => c.add(
                    &format!("{at}.secret_env"),
                    format!("environment variable {secret_env} must hold \"whsec_\" + base64 of a 24 to 64 byte key"),
                ),
            }
        }
        if let Some(types) = &e.types {
            for (i, t) in types.iter().enumerate() {
                if !NOTIFICATION_TYPES.contains(&t.as_str()) {
                    c.add(&format!("{at}.types[{i}]"), format!("{t:?} must be one of {}", NOTIFICATION_TYPES.join(", ")));
                }
            }
        }
        match secret {
            Some(secret) if c.problems.len() == before => {
                endpoints.push(EndpointSettings { name, url, secret_env, secret, types: e.types.clone() })
            }
            _ => ok = false,
        }
    }
    ok.then(|| NotificationSettings { thresholds, retry_for, timeout, endpoints: Arc::new(Endpoints(endpoints)) })
}

fn meters(c: &mut Checker, raw: &[raw::Meter]) -> Vec<Meter> {
    let max_precision = crate::model::quantity::MAX_PRECISION;
    if raw.len() > usize::from(MeterId::MAX) {
        c.add("meters", format!("at most {} meters", MeterId::MAX));
    }
    let paths = element_paths("meters", &raw.iter().map(|m| m.name.as_deref()).collect::<Vec<_>>());
    let mut seen = HashSet::new();
    let mut meters = Vec::new();
    for (i, (m, at)) in raw.iter().zip(paths).enumerate() {
        let name = m.name.clone().unwrap_or_default();
        if m.name.is_none() {
            c.add(&format!("{at}.name"), "is required");
        } else if !Meter::valid_name(&name) {
            c.add(&format!("{at}.name"), format!("{name:?} must match [a-z0-9_]{{1,64}}"));
        }
        if m.name.is_some() && !seen.insert(name.clone()) {
            c.add(&format!("{at}.name"), format!("meter {name:?} is defined twice"));
        }
        let aggregation = match m.aggregation.as_deref().unwrap_or("sum").parse::<Aggregation>() {
            Ok(a) => a,
            Err(e) => {
                c.add(&format!("{at}.aggregation"), e.to_string());
                Aggregation::Sum
            }
        };
        let precision = c.int(&format!("{at}.precision"), m.precision, 0, 0, u64::from(max_precision));
        if let Some(ev) = &m.stripe_event_name {
            if ev.is_empty() || ev.len() > 100 {
                c.add(&format!("{at}.stripe_event_name"), "must be 1-100 characters");
            }
        }
        let (unique_property, group_by) = meter_properties(c, &at, m, aggregation, precision);
        meters.push(Meter {
            id: MeterId::try_from(i).unwrap_or(MeterId::MAX),
            name,
            aggregation,
            precision: u8::try_from(precision).unwrap_or(max_precision),
            stripe_event_name: m.stripe_event_name.clone(),
            unique_property,
            group_by,
        });
    }
    meters
}

/// Unique counts and group-by (issue 25): a meter's `unique_property` (required
/// for, and only for, `unique_count`) and its `group_by` properties.
fn meter_properties(c: &mut Checker, at: &str, m: &raw::Meter, aggregation: Aggregation, precision: u64) -> (Option<String>, Vec<String>) {
    let valid = |p: &str| !p.is_empty() && p.len() <= 64;
    let unique = aggregation == Aggregation::UniqueCount;
    match (&m.unique_property, unique) {
        (None, true) => c.add(
            &format!("{at}.unique_property"),
            "is required for aggregation = \"unique_count\" (the event property whose distinct values are counted)",
        ),
        (Some(_), false) => c.add(&format!("{at}.unique_property"), "is only for aggregation = \"unique_count\""),
        (Some(p), true) if !valid(p) => c.add(&format!("{at}.unique_property"), "must be a property key of 1-64 bytes"),
        _ => {}
    }
    if unique && precision != 0 {
        c.add(&format!("{at}.precision"), "a unique_count meter counts whole values: leave precision at 0");
    }
    if unique && m.stripe_event_name.is_some() {
        c.add(
            &format!("{at}.stripe_event_name"),
            "a unique_count meter cannot be reported to Stripe (distinct counts do not add up over a period's meter events)",
        );
    }
    let group_by = m.group_by.clone().unwrap_or_default();
    let mut seen = HashSet::new();
    for p in &group_by {
        if !valid(p) {
            c.add(&format!("{at}.group_by"), format!("{p:?} must be a property key of 1-64 bytes"));
        } else if !seen.insert(p.as_str()) {
            c.add(&format!("{at}.group_by"), format!("{p:?} is listed twice"));
        }
    }
    if group_by.len() > 32 {
        c.add(&format!("{at}.group_by"), "at most 32 properties (an event carries at most 32)");
    }
    (if unique { m.unique_property.clone() } else { None }, group_by)
}

/// The plans, and the index of the default one when there is exactly one.
fn plans(c: &mut Checker, raw: &[raw::Plan], meters: &[Meter]) -> (Vec<Plan>, Option<usize>) {
    let meter_by_name: HashMap<&str, &Meter> = meters.iter().map(|m| (m.name.as_str(), m)).collect();
    if raw.is_empty() {
        c.add("plans", "at least one plan is required (exactly one with default = true)");
    }
    let paths = element_paths("plans", &raw.iter().map(|p| p.name.as_deref()).collect::<Vec<_>>());
    let mut plans = Vec::new();
    let mut names = HashSet::new();
    let mut defaults = Vec::new();
    for (i, (plan, at)) in raw.iter().zip(paths).enumerate() {
        let name = plan.name.clone().unwrap_or_default();
        if plan.name.is_none() {
            c.add(&format!("{at}.name"), "is required");
        } else if name.is_empty() || name.len() > 64 {
            c.add(&format!("{at}.name"), "must be 1-64 characters");
        }
        if plan.name.is_some() && !names.insert(name.clone()) {
            c.add(&format!("{at}.name"), format!("plan {name:?} is defined twice"));
        }
        if plan.default == Some(true) {
            defaults.push(i);
        }
        let mut limits = HashMap::new();
        for (meter_name, spec) in &plan.limits {
            let key = format!("{at}.limits.{}", segment(meter_name));
            let Some(meter) = meter_by_name.get(meter_name.as_str()) else {
                c.add(&key, format!("unknown meter {meter_name:?} (not in [[meters]])"));
                continue;
            };
            let json = match serde_json::to_value(spec) {
                Ok(v) => v,
                Err(e) => {
                    c.add(&key, e.to_string());
                    continue;
                }
            };
            match parse_limits(&json, meter) {
                Ok(l) => {
                    limits.insert(meter.id, Arc::from(l));
                }
                Err(problems) => {
                    for sp in problems {
                        c.add(&format!("{key}{}", sp.path), sp.reason);
                    }
                }
            }
        }
        plans.push(Plan { name, features: plan.features.clone(), limits });
    }
    if !raw.is_empty() && defaults.len() != 1 {
        c.add("plans", format!("exactly one plan must have default = true (found {})", defaults.len()));
    }
    let default_plan = if defaults.len() == 1 { defaults.first().copied() } else { None };
    (plans, default_plan)
}

fn keys(c: &mut Checker, raw: &[raw::Key]) -> Vec<ApiKey> {
    let paths = element_paths("auth.keys", &raw.iter().map(|k| k.name.as_deref()).collect::<Vec<_>>());
    let mut keys = Vec::new();
    for (k, at) in raw.iter().zip(paths) {
        if k.name.as_deref().is_none_or(str::is_empty) {
            c.add(&format!("{at}.name"), "is required (it names the key in logs)");
        }
        let sha = match (&k.key_sha256, &k.key_env) {
            (Some(_), Some(_)) | (None, None) => {
                c.add(&at, "give exactly one of key_sha256 or key_env");
                None
            }
            (Some(hex_text), None) => match hex::decode(hex_text) {
                Ok(bytes) if bytes.len() == 32 => {
                    let mut out = [0u8; 32];
                    out.copy_from_slice(&bytes);
                    Some(out)
                }
                _ => {
                    c.add(&format!("{at}.key_sha256"), "must be 64 hex characters (the SHA-256 of the key)");
                    None
                }
            },
            (None, Some(var)) => match std::env::var(var) {
                Ok(secret) if !secret.is_empty() => Some(sha256_of(secret.as_bytes())),
                _ => {
                    c.add(&format!("{at}.key_env"), format!("environment variable {var} is not set or empty"));
                    None
                }
            },
        };
        let scopes_key = format!("{at}.scopes");
        let scope_names = k.scopes.as_deref().unwrap_or_default();
        if scope_names.is_empty() {
            c.add(&scopes_key, "must name at least one of ingest, check, read, admin");
        }
        let mut scopes = 0u8;
        for s in scope_names {
            match Scope::parse(s) {
                Some(scope) => scopes |= scope.bit(),
                None => c.add(&scopes_key, format!("unknown scope {s:?} (expected ingest, check, read or admin)")),
            }
        }
        let rate = match k.rate_limit_per_second {
            None => None,
            Some(n) => {
                let rate = u32::try_from(n).ok().and_then(NonZeroU32::new);
                if rate.is_none() {
                    c.add(&format!("{at}.rate_limit_per_second"), "must be between 1 and 4294967295 (omit it for no limit)");
                }
                rate
            }
        };
        let burst = match k.rate_limit_burst {
            None => None,
            Some(n) => {
                let burst = u32::try_from(n).ok().and_then(NonZeroU32::new);
                if burst.is_none() {
                    c.add(&format!("{at}.rate_limit_burst"), "must be between 1 and 4294967295");
                }
                burst
            }
        };
        if let Some(sha256) = sha {
            keys.push(ApiKey { name: k.name.clone().unwrap_or_default(), sha256, scopes, rate_per_second: rate, burst });
        }
    }
    keys
}
