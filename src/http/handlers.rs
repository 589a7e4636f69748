//! One function per route: read the request, call the engine, shape the answer.

use super::body::{declared_length, read_declared, read_limited};
use super::error::{json, json_written, ApiError};
use super::finish::{finish, Finish};
use super::HttpState;
use super::RequestBody;
use crate::config::Scope;
use crate::entitlements::EntitlementsError;
use crate::history::{Granularity, HistoryError};
use crate::ingest::parse::ParseError;
use crate::ingest::{BodyKind, IngestError};
use crate::limits::CheckError;
use crate::model::{plan::limits_to_json, window::rfc3339, EntitlementsDoc};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, HeaderMap, Request, Response, StatusCode};
use serde_json::json as j;
use std::collections::BTreeMap;
use std::sync::Arc;

type Resp = Result<Response<Full<Bytes>>, ApiError>;

/// The media type of the request's `Content-Type`, parameters cut, as sent
/// (compare with [`is_type`]: checked per request, so not lowercased into a
/// new string).
fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(|v| v.split(';').next().unwrap_or("").trim())
}

fn is_type(got: Option<&str>, want: &str) -> bool {
    got.is_some_and(|g| g.eq_ignore_ascii_case(want))
}

/// What an unsupported media type error says was sent.
fn sent_type(got: Option<&str>) -> String {
    got.map_or_else(|| "none".to_string(), str::to_ascii_lowercase)
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let got = content_type(headers);
    if is_type(got, "application/json") {
        return Ok(());
    }
    Err(ApiError::unsupported_media_type(format!("Content-Type must be application/json (got {})", sent_type(got))))
}

/// `POST /v1/events`. Finished even if the client goes away (see [`finish`]):
/// once the WAL holds the batch its fold must run.
pub fn events(state: Arc<HttpState>, req: Request<RequestBody>) -> Finish<Resp> {
    let kind = match events_kind(&state, req.headers()) {
        Ok(kind) => kind,
        Err(e) => return Finish::cancellable(std::future::ready(Err(e))),
    };
    // Only the body goes into the future: it is boxed per request (issue 24).
    let (parts, body) = req.into_parts();
    let declared = declared_length(&parts.headers);
    finish(ingest(state, body, declared, kind))
}

/// What [`events`] boxes: the body read and ingested.
async fn ingest(state: Arc<HttpState>, body: RequestBody, declared: Option<u64>, kind: BodyKind) -> Resp {
    let body = read_declared(declared, body, state.max_body).await?;
    match state.engine.ingest_ports().ingest(&body, kind).await {
        Ok(outcome) => Ok(json(StatusCode::ACCEPTED, &outcome)),
        Err(IngestError::Parse(ParseError::InvalidJson(m))) => Err(ApiError::invalid_json(m)),
        Err(IngestError::Parse(e @ ParseError::TooManyEvents { .. })) => Err(ApiError::payload_too_large(e.to_string())),
        Err(IngestError::Parse(ParseError::Invalid { details, total, events })) => {
            let message = format!("{events} invalid event(s), {total} problem(s); nothing was accepted");
            Err(ApiError::invalid_event(message, serde_json::to_value(&details).unwrap_or_default()))
        }
        Err(IngestError::Full) => Err(ApiError::unavailable("customer table is full", 60)),
        Err(IngestError::Unavailable(reason)) => Err(ApiError::unavailable(reason, 1)),
    }
}

/// An ingest request's scope and body kind, checked before its body is read.
fn events_kind(state: &HttpState, headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    state.auth.authorize(headers, &[Scope::Ingest])?;
    let got = content_type(headers);
    if is_type(got, "application/json") {
        Ok(BodyKind::Json)
    } else if is_type(got, "application/x-ndjson") {
        Ok(BodyKind::Ndjson)
    } else {
        Err(ApiError::unsupported_media_type(format!(
            "Content-Type must be application/json or application/x-ndjson (got {})",
            sent_type(got)
        )))
    }
}

/// `POST /v1/check`. Finished even if the client goes away (see [`finish`]),
/// as ingest is: once a consume's WAL record is written, its fold must not be
/// cancelled. A plain check writes nothing; it is finished too, since it comes
/// in the same box.
pub fn check(state: Arc<HttpState>, req: Request<RequestBody>) -> Finish<Resp> {
    let admitted = state.auth.authorize(req.headers(), &[Scope::Check]).and_then(|()| require_json(req.headers()));
    if let Err(e) = admitted {
        return Finish::cancellable(std::future::ready(Err(e)));
    }
    // Only the body goes into the future: it is boxed per request (issue 24).
    let (parts, body) = req.into_parts();
    let declared = declared_length(&parts.headers);
    finish(decide(state, body, declared))
}

/// What [`check`] boxes: the body read, then the check or consume.
async fn decide(state: Arc<HttpState>, body: RequestBody, declared: Option<u64>) -> Resp {
    let body = read_declared(declared, body, 64 * 1024).await?;
    let request = crate::limits::CheckRequest::from_json(&body).map_err(check_error)?;
    drop(body);
    if valid_customer(&request.customer).is_ok() {
        // With Redis: the one round trip a customer never seen here costs.
        state.engine.ensure_customer(&request.customer).await;
    }
    // Boxed on its own: with the handler's state around it, one box would
    // be past the allocator's per-thread cache (see the test below).
    let answer = Box::pin(state.engine.limits_ports().check(&request)).await.map_err(check_error)?;
    Ok(json_written(StatusCode::OK, answer.to_json()))
}

fn check_error(e: CheckError) -> ApiError {
    match e {
        CheckError::Invalid { field: "body", reason } => ApiError::invalid_request(reason),
        CheckError::Invalid { field, reason } => ApiError::invalid_request(format!("{field}: {reason}")),
        CheckError::Json(m) => ApiError::invalid_json(format!("body is not valid JSON: {m}")),
        CheckError::Full => ApiError::unavailable("customer table is full", 60),
        CheckError::Unavailable(reason) => ApiError::unavailable(reason, 1),
    }
}

pub async fn customer_usage(state: &HttpState, headers: &HeaderMap, customer: &str) -> Resp {
    state.auth.authorize_customer(headers, &[Scope::Check, Scope::Read], customer, &state.portal)?;
    valid_customer(customer)?;
    state.engine.ensure_customer(customer).await;
    Ok(json(StatusCode::OK, &state.engine.limit_reads().summary(customer)))
}

pub(super) fn valid_customer(customer: &str) -> Result<(), ApiError> {
    if customer.is_empty() || customer.len() > 256 || customer.chars().any(char::is_control) {
        return Err(ApiError::invalid_request("customer: must be 1-256 bytes without control characters"));
    }
    Ok(())
}

pub(super) fn entitlements_view(state: &HttpState, customer: &str) -> serde_json::Value {
    let reads = state.engine.limit_reads();
    let id = reads.counters.interner.lookup(customer);
    let ent = reads.entitlements.get(id);
    let doc = reads.entitlements.doc(id).unwrap_or_default();
    let mut limits = BTreeMap::new();
    for meter in reads.catalog.meters() {
        if let Some(l) = ent.limits(meter.id) {
            limits.insert(meter.name.clone(), limits_to_json(l, meter));
        }
    }
    j!({
        "customer": customer,
        "plan": ent.plan.name,
        "overrides": doc.overrides,
        "features": ent.features,
        "stripe_customer_id": ent.stripe_customer_id,
        "billing_anchor": ent.billing_anchor_ms.map(rfc3339),
        "limits": limits,
    })
}

pub async fn get_entitlements(state: &HttpState, headers: &HeaderMap, customer: &str) -> Resp {
    state.auth.authorize(headers, &[Scope::Read, Scope::Admin])?;
    valid_customer(customer)?;
    state.engine.ensure_customer(customer).await;
    Ok(json(StatusCode::OK, &entitlements_view(state, customer)))
}

pub async fn put_entitlements(state: &HttpState, req: Request<RequestBody>, customer: &str) -> Resp {
    state.auth.authorize(req.headers(), &[Scope::Admin])?;
    require_json(req.headers())?;
    valid_customer(customer)?;
    let (parts, body) = req.into_parts();
    let body = read_limited(&parts.headers, body, 1024 * 1024).await?;
    let bad = |e: serde_json::Error| {
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        ApiError::invalid_request(format!("entitlements: {msg}"))
    };
    // Only an object: serde would also read a struct from an array (`["premium"]`).
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid_json(format!("body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid_request("entitlements: must be a JSON object"));
    }
    let doc: EntitlementsDoc = serde_json::from_value(value).map_err(bad)?;
    // Loaded first (with Redis), so the change is compared with what is stored.
    state.engine.ensure_customer(customer).await;
    match state.engine.backfill_ports().set_entitlements(customer, doc).await {
        Ok(_) => {
            // Prepaid credits (issue 18): an override may make a meter credits.
            crate::credits::load::track_overrides_of(
                state.engine.credits(),
                &state.engine.entitlements().get(state.engine.counters().interner.lookup(customer)),
            );
            Ok(json(StatusCode::OK, &entitlements_view(state, customer)))
        }
        Err(EntitlementsError::Invalid(problems)) => {
            let message = problems.iter().map(|p| format!("{}: {}", p.path, p.reason)).collect::<Vec<_>>().join("; ");
            let details: Vec<_> = problems.iter().map(|p| j!({"field": p.path, "reason": p.reason})).collect();
            Err(ApiError { details: Some(j!(details)), ..ApiError::invalid_request(message) })
        }
        Err(e) => {
            tracing::error!(error = %e, customer = %customer, "storing entitlements failed");
            Err(ApiError::unavailable(format!("could not store entitlements: {e}"), 1))
        }
    }
}

pub async fn usage_history(state: &HttpState, headers: &HeaderMap, query: &BTreeMap<String, String>) -> Resp {
    // A portal token reads the history of its own customer only (issue 20).
    match query.get("customer") {
        Some(customer) => state.auth.authorize_customer(headers, &[Scope::Read], customer, &state.portal)?,
        None => state.auth.authorize(headers, &[Scope::Read])?,
    }
    for key in query.keys() {
        if !matches!(key.as_str(), "meter" | "from" | "to" | "granularity" | "customer" | "group_by") {
            return Err(ApiError::invalid_request(format!("unknown query parameter {key:?}")));
        }
    }
    let get = |k: &str| query.get(k).map(String::as_str);
    let meter = get("meter").ok_or_else(|| ApiError::invalid_request("meter: is required"))?;
    let time = |k: &'static str| -> Result<i64, ApiError> {
        let text = get(k).ok_or_else(|| ApiError::invalid_request(format!("{k}: is required")))?;
        crate::model::window::parse_rfc3339(text)
            .or_else(|| text.parse::<i64>().ok())
            .ok_or_else(|| ApiError::invalid_request(format!("{k}: must be an RFC 3339 timestamp or Unix milliseconds")))
    };
    let (from, to) = (time("from")?, time("to")?);
    let granularity = match get("granularity") {
        None => Granularity::Hour,
        Some(g) => Granularity::parse(g).ok_or_else(|| ApiError::invalid_request("granularity: must be minute, hour or day"))?,
    };
    let customer = get("customer");
    if let Some(c) = customer {
        valid_customer(c)?;
    }
    // Issue 25: one series per value of a property the meter lists in `group_by`.
    let group_by = get("group_by");
    match state.engine.history_ports().usage_series(meter, from, to, granularity, customer, group_by).await {
        Ok(series) => Ok(json(StatusCode::OK, &series)),
        Err(HistoryError::Invalid { field, reason }) => Err(ApiError::invalid_request(format!("{field}: {reason}"))),
        Err(HistoryError::Store(e)) => {
            tracing::error!(error = %e, "usage query failed");
            Err(ApiError::unavailable(format!("usage store: {e}"), 1))
        }
    }
}

/// `GET /v1/stripe/status` (admin): the reporter's state and, per Stripe meter,
/// stored vs reported totals over the periods it still looks at.
pub fn stripe_status(state: &HttpState, headers: &HeaderMap) -> Resp {
    state.auth.authorize(headers, &[Scope::Admin])?;
    Ok(match &state.stripe {
        Some(board) => json(StatusCode::OK, &board.to_json()),
        None => json(StatusCode::OK, &j!({"enabled": false})),
    })
}

pub fn metrics(state: &HttpState) -> Response<Full<Bytes>> {
    crate::flush::housekeeping_gauges(&state.engine);
    crate::telemetry::collect_process();
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(state.prometheus.render())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// The OpenAPI 3.1 document of every route (issue 21): `docs/openapi.json`,
/// compiled in. tests/openapi.rs holds it to the route table, the error codes,
/// the scopes and real answers, so it cannot drift from the code.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// `GET /openapi.json` (no key).
pub fn openapi() -> Response<Full<Bytes>> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(OPENAPI.as_bytes())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

pub fn healthz() -> Response<Full<Bytes>> {
    json(StatusCode::OK, &j!({"status": "ok"}))
}

pub fn readyz(state: &HttpState) -> Response<Full<Bytes>> {
    if state.shutting_down.load(std::sync::atomic::Ordering::Acquire) {
        return ApiError::unavailable("shutting down", 5).response();
    }
    if let Some(reason) = state.engine.write_refusal() {
        return ApiError::unavailable(reason, 1).response();
    }
    if let Some(reason) = state.health.not_ready() {
        return ApiError::unavailable(reason, 5).response();
    }
    if let Some(reason) = state.health.degraded() {
        return json(StatusCode::OK, &j!({"status": "degraded", "reason": reason}));
    }
    match state.engine.redis() {
        // Checks and ingest go on from local state; say so.
        Some(redis) if !redis.is_up() => json(
            StatusCode::OK,
            &j!({"status": "degraded", "reason": "redis is unreachable: limits are decided from local state and usage is pushed when it returns"}),
        ),
        _ => json(StatusCode::OK, &j!({"status": "ready"})),
    }
}

#[cfg(test)]
mod tests {
    /// The size of the future `f` returns (its arguments in a tuple).
    fn future_size<A, F>(_f: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    // Issue 24: a request's handler future is boxed, one box per request; the
    // Redis paths (kilobytes) are boxed where they are taken so the local path
    // stays small. glibc serves an allocation of up to 1,032 bytes from the
    // thread's cache; a larger one goes to the arena's bins and first
    // consolidates its fast bins, a slow path profiles showed on every consume.
    // The handler and its engine call were 4,592 and 3,472 bytes, then 1,456
    // and 1,840 in two boxes. The daemon now allocates with mimalloc
    // (`src/allocator.rs`), whose small-object classes end near the same size;
    // the bound also keeps each poll's moves of the future short.
    #[test]
    fn the_check_path_futures_stay_small() {
        type State = std::sync::Arc<super::HttpState>;
        type Body = super::RequestBody;
        let handler = future_size(|(s, b, d): (State, Body, Option<u64>)| super::decide(s, b, d));
        let ingest = future_size(|(s, b, d, k): (State, Body, Option<u64>, super::BodyKind)| super::ingest(s, b, d, k));
        let check = future_size(|(p, r): (&crate::limits::LimitsPorts<'_>, &crate::limits::CheckRequest)| p.check(r));
        assert!(handler <= 1032, "the check handler's future is {handler} bytes");
        assert!(check <= 1032, "LimitsPorts::check's future is {check} bytes");
        assert!(ingest <= 1032, "the events handler's future is {ingest} bytes");
    }
}
