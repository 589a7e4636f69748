//! The operator console (`/ui/`) and the embeddable usage widget
//! (`/ui/widget.js`), issue 22: static files under `ui/`, compiled into the
//! binary, so there is no build step and nothing to deploy beside meterd.
//!
//! The files hold no data and need no key: the console's JavaScript asks the
//! JSON API for everything, with the key the operator pastes (or none when no
//! keys are configured, which meterd allows on loopback only; it learns which
//! from `/ui/settings.json`), and the widget with a portal token.
//!
//! Each file is answered with its `Content-Type`, a strong `ETag` (from its
//! SHA-256; `If-None-Match` gets `304`), `Cache-Control: no-cache` (revalidate:
//! a new binary is seen at once) and, for the pages, a Content-Security-Policy
//! that allows only meterd's own scripts, styles and API (no inline script, no
//! other origin, no framing).
//!
//! The widget runs on a product's own pages, another origin: `widget.js` and
//! the routes a portal token reads ([`CROSS_ORIGIN_ROUTES`]) allow any origin.
//! That exposes nothing a cookie could leak: meterd reads bearer keys only, so
//! a cross-origin caller must already hold a key or a token.

use super::error::{json, ApiError};
use super::HttpState;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use std::sync::OnceLock;

type Resp = Response<Full<Bytes>>;

/// The console's policy: meterd's own files and API only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The routes (by name in the route table) that a portal token reads, and so
/// the widget calls from another origin: they answer `OPTIONS` preflights and
/// carry `Access-Control-Allow-Origin: *`.
pub const CROSS_ORIGIN_ROUTES: &[&str] = &["customer_usage", "balances", "usage_history", "reservation"];

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// Every file under `/ui/`; `""` (the directory itself) is the console's page.
static ASSETS: &[Asset] = &[
    Asset { name: "index.html", content_type: "text/html; charset=utf-8", body: include_bytes!("../../ui/index.html") },
    Asset { name: "console.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("../../ui/console.js") },
    Asset { name: "console.css", content_type: "text/css; charset=utf-8", body: include_bytes!("../../ui/console.css") },
    Asset { name: "widget.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("../../ui/widget.js") },
    Asset { name: "favicon.svg", content_type: "image/svg+xml", body: include_bytes!("../../ui/favicon.svg") },
];

/// Each asset's ETag, in [`ASSETS`] order, computed on first use.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| ASSETS.iter().map(|a| format!("\"{}\"", hex::encode(&crate::config::sha256_of(a.body)[..12]))).collect())
}

/// `GET /ui/{file}`: an embedded file, or `settings.json`: whether API calls
/// need a key (`{"keys_required": bool}`), so the console asks for one before
/// its first call rather than after a `401`.
pub fn answer(state: &HttpState, headers: &HeaderMap, file: &str) -> Result<Resp, ApiError> {
    if file == "settings.json" {
        let mut r = json(StatusCode::OK, &serde_json::json!({"keys_required": state.auth.enabled()}));
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(r);
    }
    asset(headers, file)
}

/// An embedded file, or `304` when `If-None-Match` names its ETag.
fn asset(headers: &HeaderMap, file: &str) -> Result<Resp, ApiError> {
    let wanted = if file.is_empty() { "index.html" } else { file };
    let (asset, etag) = ASSETS
        .iter()
        .zip(etags())
        .find(|(a, _)| a.name == wanted)
        .ok_or_else(|| ApiError::not_found(format!("no console file {wanted:?}")))?;
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut builder = Response::builder()
        .header(header::ETAG, etag.as_str())
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer");
    builder = if asset.name == "widget.js" {
        builder.header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*").header("cross-origin-resource-policy", "cross-origin")
    } else {
        builder.header(header::CONTENT_SECURITY_POLICY, CSP).header(header::X_FRAME_OPTIONS, "DENY")
    };
    let response = if fresh {
        builder.status(StatusCode::NOT_MODIFIED).body(Full::new(Bytes::new()))
    } else {
        builder.header(header::CONTENT_TYPE, asset.content_type).body(Full::new(Bytes::from_static(asset.body)))
    };
    response.map_err(|e| ApiError::internal(format!("console response: {e}")))
}

/// `GET /ui`: to `/ui/`, where the page's relative links resolve.
pub fn to_index() -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    r.headers_mut().insert(header::LOCATION, HeaderValue::from_static("/ui/"));
    r
}

/// The answer to a CORS preflight of a [`CROSS_ORIGIN_ROUTES`] route.
pub fn preflight(allow: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    if let Ok(v) = HeaderValue::from_str(allow) {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    r
}

/// Lets a page of any origin read `response` (errors included, so the widget
/// can say why it shows nothing).
pub fn allow_any_origin(response: &mut Resp) {
    response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_answer_with_their_type_and_revalidate_by_etag() {
        let page = asset(&HeaderMap::new(), "").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(page.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(page.headers()[header::CONTENT_SECURITY_POLICY].to_str().is_ok_and(|v| v.contains("script-src 'self'")));
        let etag = page.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag);
        let cached = asset(&again, "index.html").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
        let widget = asset(&again, "widget.js").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(widget.status(), StatusCode::OK, "another file, another ETag");
        assert_eq!(widget.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(widget.headers()[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert!(asset(&HeaderMap::new(), "../Cargo.toml").is_err_and(|e| e.status == StatusCode::NOT_FOUND));
    }

    #[test]
    fn the_widget_stays_small() {
        let widget = ASSETS.iter().find(|a| a.name == "widget.js").map_or(usize::MAX, |a| a.body.len());
        assert!(widget <= 30 * 1024, "widget.js is {widget} bytes, over 30 KB");
    }
}
