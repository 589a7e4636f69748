//! Routing: method and path to handler, 404 and 405 answers, percent-decoding of
//! path segments and query strings.

use super::error::ApiError;
use super::{handlers, HttpState};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response};
use std::collections::BTreeMap;

/// A route's name, for metrics labels (never a customer id).
pub fn route_name(path: &str) -> &'static str {
    match segments(path).as_slice() {
        ["v1", "events"] => "events",
        ["v1", "check"] => "check",
        ["v1", "usage"] => "usage_history",
        ["v1", "customers", _, "usage"] => "customer_usage",
        ["v1", "customers", _, "entitlements"] => "entitlements",
        ["v1", "stripe", "status"] => "stripe_status",
        ["metrics"] => "metrics",
        ["healthz"] => "healthz",
        ["readyz"] => "readyz",
        _ => "unknown",
    }
}

/// Most segments any route has.
const MAX_SEGMENTS: usize = 4;

/// A path's `/`-separated segments, without allocating (every request is
/// routed, and named for the metrics, through this).
struct Segments<'a> {
    parts: [&'a str; MAX_SEGMENTS],
    /// How many; `MAX_SEGMENTS + 1` when there are more (no route matches).
    len: usize,
}

impl<'a> Segments<'a> {
    /// The segments, or an empty slice (which no route matches) if there are
    /// too many.
    fn as_slice(&self) -> &[&'a str] {
        self.parts.get(..self.len).unwrap_or(&[])
    }
}

fn segments(path: &str) -> Segments<'_> {
    let mut parts = [""; MAX_SEGMENTS];
    let mut len = 0;
    for part in path.trim_start_matches('/').split('/') {
        if len == MAX_SEGMENTS {
            return Segments { parts, len: MAX_SEGMENTS + 1 };
        }
        parts[len] = part;
        len += 1;
    }
    Segments { parts, len }
}

fn not_allowed(allow: &str) -> Response<Full<Bytes>> {
    let mut r = ApiError::method_not_allowed(format!("this route allows {allow}")).response();
    if let Ok(v) = header::HeaderValue::from_str(allow) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

/// Dispatches one request.
pub async fn route(state: &HttpState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // The URI is shared, not copied: `req` moves into the handler below.
    let uri = req.uri().clone();
    let path = uri.path();
    let method = req.method().clone();
    let segments = segments(path);
    if state.shutting_down.load(std::sync::atomic::Ordering::Acquire) && segments.as_slice().first() == Some(&"v1") {
        return ApiError::unavailable("shutting down", 5).response();
    }
    let result = match (segments.as_slice(), &method) {
        (["v1", "events"], &Method::POST) => handlers::events(state, req).await,
        (["v1", "events"], _) => return not_allowed("POST"),
        (["v1", "check"], &Method::POST) => handlers::check(state, req).await,
        (["v1", "check"], _) => return not_allowed("POST"),
        (["v1", "usage"], &Method::GET) => {
            let query = parse_query(req.uri().query().unwrap_or(""));
            match query {
                Ok(q) => handlers::usage_history(state, req.headers(), &q).await,
                Err(e) => Err(e),
            }
        }
        (["v1", "usage"], _) => return not_allowed("GET"),
        (["v1", "customers", customer, "usage"], &Method::GET) => match decode(customer) {
            Ok(c) => handlers::customer_usage(state, req.headers(), &c).await,
            Err(e) => Err(e),
        },
        (["v1", "customers", _, "usage"], _) => return not_allowed("GET"),
        (["v1", "customers", customer, "entitlements"], m) if m == Method::GET || m == Method::PUT => match decode(customer) {
            Ok(c) if m == Method::GET => handlers::get_entitlements(state, req.headers(), &c).await,
            Ok(c) => handlers::put_entitlements(state, req, &c).await,
            Err(e) => Err(e),
        },
        (["v1", "customers", _, "entitlements"], _) => return not_allowed("GET, PUT"),
        (["v1", "stripe", "status"], &Method::GET) => handlers::stripe_status(state, req.headers()),
        (["v1", "stripe", "status"], _) => return not_allowed("GET"),
        (["metrics"], &Method::GET) => return handlers::metrics(state),
        (["healthz"], &Method::GET) => return handlers::healthz(),
        (["readyz"], &Method::GET) => return handlers::readyz(state),
        (["metrics"] | ["healthz"] | ["readyz"], _) => return not_allowed("GET"),
        _ => Err(ApiError::not_found(format!("no route for {method} {path}"))),
    };
    result.unwrap_or_else(|e| e.response())
}

/// Percent-decodes a path segment or query component (`+` is a space in queries
/// only, handled by the caller).
pub fn decode(text: &str) -> Result<String, ApiError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => return Err(ApiError::invalid_request(format!("bad percent-encoding in {text:?}"))),
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::invalid_request(format!("{text:?} is not UTF-8 once decoded")))
}

fn parse_query(query: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode(&k.replace('+', " "))?;
        let v = decode(&v.replace('+', " "))?;
        if out.insert(k.clone(), v).is_some() {
            return Err(ApiError::invalid_request(format!("query parameter {k:?} is given twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_named_by_their_segments_only() {
        let cases = [
            ("/v1/events", "events"),
            ("/v1/customers/a%2Fb/usage", "customer_usage"),
            ("/v1/customers/c/entitlements", "entitlements"),
            ("/v1/customers/c/usage/more", "unknown"),
            ("/v1/customers/c/usage/more/and/more", "unknown"),
            ("/v1/events/", "unknown"),
            ("/", "unknown"),
            ("", "unknown"),
            ("/healthz", "healthz"),
            ("//healthz", "healthz"),
        ];
        for (path, name) in cases {
            assert_eq!(route_name(path), name, "{path}");
        }
    }
}
