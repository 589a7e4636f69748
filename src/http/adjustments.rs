//! The adjustment routes (issue 19): `POST /v1/adjustments` applies a signed
//! correction (scope `admin`); `GET /v1/adjustments?customer=C[&meter=M][&limit=N]`
//! lists a customer's (scope `read`). Thin: read the request, call the
//! adjustments service, shape the answer.

use super::body::read_limited;
use super::error::{json, ApiError};
use super::{HttpState, RequestBody};
use crate::adjust::AdjustError;
use crate::config::Scope;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::json as j;
use std::collections::BTreeMap;

type Resp = Result<Response<Full<Bytes>>, ApiError>;

/// Rows per listing by default.
const DEFAULT_LIMIT: usize = 100;

fn invalid(field: &str, reason: impl std::fmt::Display) -> ApiError {
    ApiError {
        details: Some(j!([{"field": field, "reason": reason.to_string()}])),
        ..ApiError::invalid_request(format!("{field}: {reason}"))
    }
}

fn error(e: AdjustError) -> ApiError {
    match e {
        AdjustError::Invalid(p) => invalid(&p.field, &p.reason),
        e @ AdjustError::BelowZero { .. } => {
            let message = e.to_string();
            invalid("quantity", message.trim_start_matches("quantity: "))
        }
        e @ (AdjustError::Conflict(_) | AdjustError::Changed(_)) => ApiError::conflict(e.to_string()),
        AdjustError::Full => ApiError::unavailable("customer table is full", 60),
        AdjustError::Unavailable(reason) => ApiError::unavailable(reason, 1),
        AdjustError::Audit(e) => {
            tracing::error!(error = %e, "adjustments audit list");
            ApiError::unavailable("the adjustments audit list cannot be written or read", 1)
        }
    }
}

/// `POST /v1/adjustments` (admin): 202 with the adjustment (`duplicate`: it was
/// applied before under this id).
pub async fn create(state: &HttpState, req: Request<RequestBody>) -> Resp {
    state.auth.authorize(req.headers(), &[Scope::Admin])?;
    let media = req.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !media.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") {
        return Err(ApiError::unsupported_media_type(format!("Content-Type must be application/json (got {media:?})")));
    }
    let (parts, body) = req.into_parts();
    let body = read_limited(&parts.headers, body, 64 * 1024).await?;
    // Once the WAL holds the adjustment it must be recorded, even if this
    // client disconnects and hyper drops the handler.
    let (adjustments, engine) = (state.adjustments.clone(), state.engine.clone());
    let applied = super::finish::finish(async move { adjustments.apply(&engine, &body).await }).await.map_err(error)?;
    Ok(json(StatusCode::ACCEPTED, &applied))
}

/// `GET /v1/adjustments?customer=C[&meter=M][&limit=N]` (read): oldest first.
pub async fn list(state: &HttpState, headers: &HeaderMap, query: &BTreeMap<String, String>) -> Resp {
    state.auth.authorize(headers, &[Scope::Read])?;
    if let Some(k) = query.keys().find(|k| !matches!(k.as_str(), "customer" | "meter" | "limit")) {
        return Err(ApiError::invalid_request(format!("{k}: unknown query parameter")));
    }
    let customer = query.get("customer").filter(|c| !c.is_empty()).ok_or_else(|| invalid("customer", "is required"))?;
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=crate::adjust::MAX_LIST).contains(&n) => n,
            _ => return Err(invalid("limit", format_args!("must be an integer from 1 to {}", crate::adjust::MAX_LIST))),
        },
    };
    let adjustments = state.adjustments.list(customer, query.get("meter").map(String::as_str), limit).await.map_err(error)?;
    Ok(json(StatusCode::OK, &j!({ "adjustments": adjustments })))
}
