//! Authentication and per-key rate limits.
//!
//! Keys are configured by their SHA-256 (or read from an env var and hashed), so
//! the process never holds plain keys it does not need; a presented key is hashed
//! and compared in constant time against every configured hash. With no keys
//! configured, every request is allowed (config validation has already refused a
//! non-loopback listen address in that case).

use super::error::ApiError;
use crate::config::{ApiKey, Scope};
use governor::{clock::DefaultClock, state::InMemoryState, state::NotKeyed, Quota, RateLimiter};
use hyper::HeaderMap;

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// The key table: each key with its limiter (shared across reloads).
type KeyTable = Vec<(ApiKey, Option<std::sync::Arc<Limiter>>)>;

/// Builds the key table of `keys`, each with a fresh limiter.
fn table(keys: &[ApiKey]) -> KeyTable {
    keys.iter()
        .map(|k| {
            let limiter = k.rate_per_second.map(|rate| {
                let quota = Quota::per_second(rate).allow_burst(k.burst.unwrap_or(rate));
                std::sync::Arc::new(RateLimiter::direct(quota))
            });
            (k.clone(), limiter)
        })
        .collect()
}

/// The configured keys and their limiters; swapped whole on a config reload
/// (`crate::reload`), so a request sees the old table or the new one.
pub struct Auth {
    keys: arc_swap::ArcSwap<KeyTable>,
}

/// SHA-256 of a presented key.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    crate::config::sha256_of(bytes)
}

impl Auth {
    pub fn new(keys: &[ApiKey]) -> Auth {
        Auth { keys: arc_swap::ArcSwap::from_pointee(table(keys)) }
    }

    /// Whether any key is configured.
    pub fn enabled(&self) -> bool {
        !self.keys.load().is_empty()
    }

    // Config reload (issue 23): swap the key table atomically.
    /// Replaces the key table (config reload). A key whose hash, rate and burst
    /// are unchanged keeps its limiter, so a reload does not refill its bucket.
    pub fn replace(&self, keys: &[ApiKey]) {
        let old = self.keys.load_full();
        let mut next = table(keys);
        for (key, limiter) in next.iter_mut() {
            let kept = old.iter().find(|(k, _)| k.sha256 == key.sha256 && k.rate_per_second == key.rate_per_second && k.burst == key.burst);
            if let Some((_, Some(old_limiter))) = kept {
                *limiter = Some(old_limiter.clone());
            }
        }
        self.keys.store(std::sync::Arc::new(next));
    }

    /// Checks the bearer key, its scope (any of `scopes`) and its rate limit.
    pub fn authorize(&self, headers: &HeaderMap, scopes: &[Scope]) -> Result<(), ApiError> {
        let keys = self.keys.load();
        if keys.is_empty() {
            return Ok(());
        }
        let header = headers
            .get(hyper::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <key> header"))?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization header must be \"Bearer <key>\""))?;
        let digest = sha256(presented.as_bytes());
        // Compare against every key so timing does not reveal which one matched.
        let mut found = None;
        for (i, (key, _)) in keys.iter().enumerate() {
            if crate::mac::ct_eq(&key.sha256, &digest) {
                found = Some(i);
            }
        }
        let (key, limiter) = found.and_then(|i| keys.get(i)).ok_or_else(|| ApiError::unauthorized("unknown key"))?;
        if !scopes.iter().any(|s| key.allows(*s)) {
            let names: Vec<&str> = scopes.iter().map(|s| scope_name(*s)).collect();
            return Err(ApiError::forbidden(format!("key {:?} lacks the {} scope", key.name, names.join(" or "))));
        }
        if let Some(limiter) = limiter {
            if let Err(not_until) = limiter.check() {
                crate::telemetry::rate_limited();
                let wait = not_until.wait_time_from(governor::clock::Clock::now(&DefaultClock::default()));
                return Err(ApiError::rate_limited(wait.as_secs().max(1)));
            }
        }
        Ok(())
    }
}

fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Ingest => "ingest",
        Scope::Check => "check",
        Scope::Read => "read",
        Scope::Admin => "admin",
    }
}

// Portal tokens (issue 20): a bearer `mpt_...` token reads one customer's
// usage, balances, reservations and history, and nothing else. Routes that
// read one customer call `authorize_customer`; every other route goes through
// `authorize`, where a portal token is an unknown key (401).

/// The presented bearer, when it is a portal token.
pub fn portal_bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && token.starts_with(super::portal::PREFIX)).then_some(token)
}

impl Auth {
    /// Like [`Auth::authorize`], for a route that reads `customer` only: a
    /// portal token for that customer is accepted too; one for another
    /// customer is 403, an expired or forged one 401.
    pub fn authorize_customer(
        &self,
        headers: &HeaderMap,
        scopes: &[Scope],
        customer: &str,
        portal: &super::portal::PortalTokens,
    ) -> Result<(), ApiError> {
        let Some(token) = portal_bearer(headers) else { return self.authorize(headers, scopes) };
        let owner = portal.verify(token, crate::clock::now_ms()).map_err(|e| ApiError::unauthorized(e.to_string()))?;
        if owner != customer {
            return Err(ApiError::forbidden("this portal token reads another customer"));
        }
        Ok(())
    }
}
