//! The credits routes (issue 18): grants and balances. Thin: read the request,
//! call the grants service, shape the answer.

use super::body::read_limited;
use super::error::{json, ApiError};
use super::{HttpState, RequestBody};
use crate::config::Scope;
use crate::grants::GrantError;
use crate::model::grant::GrantSpec;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::json as j;
use std::collections::BTreeMap;

type Resp = Result<Response<Full<Bytes>>, ApiError>;

fn error(e: GrantError) -> ApiError {
    match e {
        GrantError::Invalid(p) => {
            ApiError { details: Some(j!([{"field": p.field, "reason": p.reason}])), ..ApiError::invalid_request(p.to_string()) }
        }
        GrantError::Conflict(id) => ApiError::conflict(format!("grant {id:?} exists with another body")),
        GrantError::NotFound(id) => ApiError::not_found(format!("no grant {id:?}")),
        GrantError::Full => ApiError::unavailable("customer table is full", 5),
        GrantError::Store(e) => {
            tracing::error!(error = %e, "storing a grant failed");
            ApiError::unavailable(format!("could not store the grant: {e}"), 1)
        }
    }
}

/// `POST /v1/customers/{c}/grants` (admin): 201 new, 200 repeated, 409 changed.
pub async fn create(state: &HttpState, req: Request<RequestBody>, customer: &str) -> Resp {
    state.auth.authorize(req.headers(), &[Scope::Admin])?;
    let media = req.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !media.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") {
        return Err(ApiError::unsupported_media_type(format!("Content-Type must be application/json (got {media:?})")));
    }
    let (parts, body) = req.into_parts();
    let body = read_limited(&parts.headers, body, 64 * 1024).await?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid_json(format!("body is not valid JSON: {e}")))?;
    let spec = GrantSpec::from_json(&value).map_err(|p| error(GrantError::Invalid(p)))?;
    let (grant, created) = state.engine.grant_ports().create_grant(customer, spec).await.map_err(error)?;
    Ok(json(if created { StatusCode::CREATED } else { StatusCode::OK }, &grant))
}

/// `GET /v1/customers/{c}/grants[?meter=M]` (read).
pub fn list(state: &HttpState, headers: &HeaderMap, customer: &str, query: &BTreeMap<String, String>) -> Resp {
    state.auth.authorize(headers, &[Scope::Read])?;
    if let Some(k) = query.keys().find(|k| k.as_str() != "meter") {
        return Err(ApiError::invalid_request(format!("{k}: unknown query parameter")));
    }
    let grants = state.engine.grant_ports().list(customer, query.get("meter").map(String::as_str)).map_err(error)?;
    Ok(json(StatusCode::OK, &j!({ "grants": grants })))
}

/// `DELETE /v1/customers/{c}/grants/{id}` (admin): voids the remainder.
pub async fn void(state: &HttpState, req: Request<RequestBody>, customer: &str) -> Resp {
    state.auth.authorize(req.headers(), &[Scope::Admin])?;
    let id = super::routes::decode(req.uri().path().trim_start_matches('/').split('/').nth(4).unwrap_or(""))?;
    let grant = state.engine.grant_ports().void_grant(customer, &id).await.map_err(error)?;
    Ok(json(StatusCode::OK, &grant))
}

/// `GET /v1/customers/{c}/balances` (check or read).
pub async fn balances(state: &HttpState, headers: &HeaderMap, customer: &str) -> Resp {
    // A portal token for this customer may read its balances too (issue 20).
    state.auth.authorize_customer(headers, &[Scope::Check, Scope::Read], customer, &state.portal)?;
    // With Redis, the customer's entitlements (which meters are credits) load on first sight.
    if !customer.is_empty() && customer.len() <= 256 {
        state.engine.ensure_customer(customer).await;
    }
    let balances = state.engine.grant_ports().balances(customer).map_err(error)?;
    Ok(json(StatusCode::OK, &balances))
}
