//! The reservation routes (issue 19): take, settle, release and read holds;
//! list a customer's (issue 22).
//! Thin: read the request, call the reservations service, shape the answer.
//! Writes are spawned like consumes: once a journal or WAL record is written,
//! the change must complete even if the client goes away.

use super::body::read_limited;
use super::error::{json, ApiError};
use super::finish::finish;
use super::{HttpState, RequestBody};
use crate::config::Scope;
use crate::reservations::{ListRequest, ReservationError, ReserveRequest, SettleRequest};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{HeaderMap, Request, Response, StatusCode};
use std::collections::BTreeMap;
use std::sync::Arc;

type Resp = Result<Response<Full<Bytes>>, ApiError>;

fn error(e: ReservationError) -> ApiError {
    match e {
        ReservationError::Invalid { field: "body", reason } => ApiError::invalid_request(reason),
        ReservationError::Invalid { field, reason } => ApiError::invalid_request(format!("{field}: {reason}")),
        ReservationError::Json(m) => ApiError::invalid_json(format!("body is not valid JSON: {m}")),
        ReservationError::NotFound(id) => ApiError::not_found(format!("no reservation {id:?}")),
        ReservationError::Conflict(message) => ApiError::conflict(message),
        ReservationError::CustomersFull => ApiError::unavailable("customer table is full", 60),
        e @ ReservationError::Full(_) => ApiError::unavailable(e.to_string(), 60),
        ReservationError::Unavailable(reason) => ApiError::unavailable(reason, 1),
    }
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let media = headers.get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !media.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") {
        return Err(ApiError::unsupported_media_type(format!("Content-Type must be application/json (got {media:?})")));
    }
    Ok(())
}

/// `POST /v1/reservations` (check).
pub async fn reserve(state: &Arc<HttpState>, req: Request<RequestBody>) -> Resp {
    state.auth.authorize(req.headers(), &[Scope::Check])?;
    require_json(req.headers())?;
    let (parts, body) = req.into_parts();
    let body = read_limited(&parts.headers, body, 64 * 1024).await?;
    let request = ReserveRequest::from_json(&body).map_err(error)?;
    // With Redis: the one round trip a customer never seen here costs.
    state.engine.ensure_customer(&request.customer).await;
    let engine = state.engine.clone();
    let answer = finish(async move { engine.reservation_ports().reserve(request).await }).await.map_err(error)?;
    Ok(json(StatusCode::OK, &answer))
}

/// `POST /v1/reservations/{id}/settle` (check).
pub async fn settle(state: &Arc<HttpState>, req: Request<RequestBody>, id: String) -> Resp {
    state.auth.authorize(req.headers(), &[Scope::Check])?;
    let (parts, body) = req.into_parts();
    let body = read_limited(&parts.headers, body, 64 * 1024).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        require_json(&parts.headers)?;
    }
    let request = SettleRequest::from_json(&body).map_err(error)?;
    let engine = state.engine.clone();
    let answer = finish(async move { engine.reservation_ports().settle(&id, request).await }).await.map_err(error)?;
    Ok(json(StatusCode::OK, &answer))
}

/// `POST /v1/reservations/{id}/release` (check).
pub async fn release(state: &Arc<HttpState>, headers: &HeaderMap, id: String) -> Resp {
    state.auth.authorize(headers, &[Scope::Check])?;
    let engine = state.engine.clone();
    let answer = finish(async move { engine.reservation_ports().release(&id).await }).await.map_err(error)?;
    Ok(json(StatusCode::OK, &answer))
}

/// `GET /v1/reservations/{id}` (check or read; a portal token of its customer).
pub async fn get(state: &HttpState, headers: &HeaderMap, id: &str) -> Resp {
    let answer = state.engine.reservation_ports().get(id).await;
    let customer = match &answer {
        Ok(a) => a.reservation.customer.clone(),
        Err(_) => String::new(),
    };
    // Authorized before a 404 tells anything about the id.
    if customer.is_empty() {
        state.auth.authorize(headers, &[Scope::Check, Scope::Read])?;
    } else {
        state.auth.authorize_customer(headers, &[Scope::Check, Scope::Read], &customer, &state.portal)?;
    }
    Ok(json(StatusCode::OK, &answer.map_err(error)?))
}

/// `GET /v1/reservations?customer=C[&meter=M][&status=S][&limit=N]` (check or
/// read; a portal token of that customer).
pub async fn list(state: &HttpState, headers: &HeaderMap, query: &BTreeMap<String, String>) -> Resp {
    // Authorized before the parameters are judged (a portal token without
    // `customer` reads no customer of its own: 403).
    let customer = query.get("customer").map_or("", String::as_str);
    state.auth.authorize_customer(headers, &[Scope::Check, Scope::Read], customer, &state.portal)?;
    let request = ListRequest::from_query(query).map_err(error)?;
    let answer = state.engine.reservation_ports().list(&request).await.map_err(error)?;
    Ok(json(StatusCode::OK, &answer))
}
