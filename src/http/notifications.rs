//! The notification routes (issue 17): `GET /v1/notifications` lists the
//! outbox newest first; `POST /v1/notifications/{id}/redeliver` sends one again
//! with the same `webhook-id`.

use super::error::{json, ApiError};
use super::HttpState;
use crate::config::Scope;
use crate::model::window::rfc3339;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{HeaderMap, Response, StatusCode};
use serde_json::json as j;
use std::collections::BTreeMap;

type Resp = Result<Response<Full<Bytes>>, ApiError>;

/// Rows per listing by default, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

fn internal(e: crate::notify::NotifyError) -> ApiError {
    tracing::error!(error = %e, "notification outbox");
    ApiError::internal("the notification outbox cannot be read")
}

/// `GET /v1/notifications?customer=C&status=pending|delivered|failed&limit=N`.
pub fn list(state: &HttpState, headers: &HeaderMap, query: &BTreeMap<String, String>) -> Resp {
    state.auth.authorize(headers, &[Scope::Read])?;
    for key in query.keys() {
        if !matches!(key.as_str(), "customer" | "status" | "limit") {
            return Err(ApiError::invalid_request(format!("unknown query parameter {key:?}")));
        }
    }
    let status = query.get("status").cloned();
    if let Some(s) = &status {
        if !matches!(s.as_str(), "pending" | "delivered" | "failed") {
            return Err(ApiError::invalid_request("status: must be pending, delivered or failed"));
        }
    }
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(ApiError::invalid_request(format!("limit: must be an integer between 1 and {MAX_LIMIT}"))),
        },
    };
    let Some(notifier) = &state.notifier else { return Ok(json(StatusCode::OK, &j!({"notifications": []}))) };
    let filter = crate::notify::Filter { customer: query.get("customer").cloned(), status, limit };
    let rows = notifier.outbox().list(&filter).map_err(internal)?;
    let items: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|r| {
            let data =
                serde_json::from_str::<serde_json::Value>(&r.body).ok().and_then(|mut b| b.get_mut("data").map(serde_json::Value::take));
            j!({
                "id": r.id,
                "type": r.kind,
                "endpoint": r.endpoint,
                "status": r.status,
                "attempts": r.attempts,
                "last_error": r.last_error,
                "created_at": rfc3339(r.created_ms),
                "delivered_at": r.delivered_ms.map(rfc3339),
                "data": data,
            })
        })
        .collect();
    Ok(json(StatusCode::OK, &j!({ "notifications": items })))
}

/// `POST /v1/notifications/{id}/redeliver` → 202.
pub async fn redeliver(state: &HttpState, headers: &HeaderMap, id: &str) -> Resp {
    state.auth.authorize(headers, &[Scope::Admin])?;
    let unknown = || ApiError::not_found(format!("no notification {id:?}"));
    let Some(notifier) = &state.notifier else { return Err(unknown()) };
    match notifier.redeliver(id).await {
        Ok(true) => Ok(json(StatusCode::ACCEPTED, &j!({"id": id, "status": "pending"}))),
        Ok(false) => Err(unknown()),
        Err(crate::notify::NotifyError::Redis(e)) => Err(ApiError::unavailable(format!("redis: {e}"), 5)),
        Err(e) => Err(internal(e)),
    }
}
