//! The routes of Stripe subscription sync and the customer directory (issue
//! 20): `POST /v1/webhooks/stripe`, `GET /v1/customers`, `GET /v1/plans`,
//! `GET /v1/meters`, `DELETE /v1/customers/{c}/entitlements` and
//! `POST /v1/customers/{c}/portal-tokens`.

use super::body::read_limited;
use super::error::{json, ApiError};
use super::handlers::{entitlements_view, valid_customer};
use super::{HttpState, RequestBody};
use crate::billing_sync::event::EventError;
use crate::billing_sync::{Outcome, WebhookError};
use crate::config::Scope;
use crate::model::plan::limits_to_json;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::json as j;
use std::collections::BTreeMap;
use std::sync::Arc;

type Resp = Result<Response<Full<Bytes>>, ApiError>;

/// Customers per page of `GET /v1/customers`: the default and the most.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;
/// The longest portal token asked for.
const PORTAL_MAX_SECS: u64 = 30 * 86_400;

/// `POST /v1/webhooks/stripe`: authenticated by `Stripe-Signature`, not a key.
pub async fn stripe_webhook(state: Arc<HttpState>, req: Request<RequestBody>) -> Resp {
    let Some(webhooks) = state.stripe_webhooks.clone() else {
        return Err(ApiError::not_found("Stripe webhooks are not configured ([stripe.webhooks])"));
    };
    let (parts, body) = req.into_parts();
    let body = read_limited(&parts.headers, body, state.max_body).await?;
    let header = parts.headers.get("stripe-signature").and_then(|v| v.to_str().ok()).map(str::to_string);
    // Once an event is claimed it must be applied or released, even if
    // Stripe hangs up.
    let engine = state.engine.clone();
    let outcome =
        super::finish::finish(async move { webhooks.receive(&engine, &body, header.as_deref(), crate::clock::now_ms()).await }).await;
    match outcome {
        Ok(outcome) => Ok(json(StatusCode::OK, &j!({"received": true, "applied": outcome == Outcome::Applied}))),
        Err(WebhookError::Signature(e)) => Err(ApiError::invalid_signature(e.to_string())),
        Err(WebhookError::Event(EventError::Json(m))) => Err(ApiError::invalid_json(format!("body is not valid JSON: {m}"))),
        Err(WebhookError::Event(e)) => Err(ApiError::invalid_request(format!("event: {e}"))),
        Err(e @ WebhookError::InFlight(_)) => Err(ApiError::unavailable(e.to_string(), 5)),
        Err(e) => Err(ApiError::unavailable(format!("could not apply the event: {e}"), 1)),
    }
}

/// `GET /v1/customers?prefix&limit&after` (read).
pub async fn list_customers(state: &HttpState, headers: &HeaderMap, query: &BTreeMap<String, String>) -> Resp {
    state.auth.authorize(headers, &[Scope::Read])?;
    if let Some(key) = query.keys().find(|k| !matches!(k.as_str(), "prefix" | "limit" | "after")) {
        return Err(ApiError::invalid_request(format!("unknown query parameter {key:?}")));
    }
    let limit = match query.get("limit") {
        None => PAGE_DEFAULT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=PAGE_MAX).contains(n))
            .ok_or_else(|| ApiError::invalid_request(format!("limit: must be an integer from 1 to {PAGE_MAX}")))?,
    };
    let prefix = query.get("prefix").map(String::as_str).unwrap_or("");
    let after = query.get("after").map(String::as_str);
    match crate::billing_sync::customers::page(&state.engine, prefix, after, limit).await {
        Ok(page) => Ok(json(StatusCode::OK, &page)),
        Err(e) => {
            tracing::error!(error = %e, "listing customers failed");
            Err(ApiError::unavailable(format!("could not list customers: {e}"), 1))
        }
    }
}

/// `GET /v1/plans` (read): each plan with its limits shaped as entitlements.
pub fn plans(state: &HttpState, headers: &HeaderMap) -> Resp {
    state.auth.authorize(headers, &[Scope::Read])?;
    let catalog = state.engine.catalog();
    let default = &catalog.default_plan().name;
    let plans: Vec<_> = catalog
        .plans()
        .iter()
        .map(|plan| {
            let limits: BTreeMap<_, _> =
                catalog.meters().iter().filter_map(|m| plan.limits.get(&m.id).map(|l| (m.name.clone(), limits_to_json(l, m)))).collect();
            j!({"name": plan.name, "default": &plan.name == default, "features": plan.features, "limits": limits})
        })
        .collect();
    Ok(json(StatusCode::OK, &j!({"plans": plans})))
}

/// `GET /v1/meters` (read).
pub fn meters(state: &HttpState, headers: &HeaderMap) -> Resp {
    state.auth.authorize(headers, &[Scope::Read])?;
    let meters: Vec<_> = state
        .engine
        .catalog()
        .meters()
        .iter()
        .map(|m| j!({"name": m.name, "aggregation": m.aggregation.as_str(), "precision": m.precision, "stripe_event_name": m.stripe_event_name}))
        .collect();
    Ok(json(StatusCode::OK, &j!({"meters": meters})))
}

/// `DELETE /v1/customers/{c}/entitlements` (admin): back to the default plan,
/// on every instance (the same message a PUT sends).
pub async fn delete_entitlements(state: &HttpState, headers: &HeaderMap, customer: &str) -> Resp {
    state.auth.authorize(headers, &[Scope::Admin])?;
    valid_customer(customer)?;
    state.engine.ensure_customer(customer).await;
    let done = async {
        state.engine.entitlements().delete(customer).await?;
        state.engine.backfill_ports().refresh_entitlements(customer, None).await
    };
    if let Err(e) = done.await {
        tracing::error!(error = %e, customer = %customer, "deleting entitlements failed");
        return Err(ApiError::unavailable(format!("could not delete entitlements: {e}"), 1));
    }
    Ok(json(StatusCode::OK, &entitlements_view(state, customer)))
}

/// `POST /v1/customers/{c}/portal-tokens` (admin) `{"expires_in": "1h"}`.
pub async fn portal_token(state: &HttpState, req: Request<RequestBody>, customer: &str) -> Resp {
    state.auth.authorize(req.headers(), &[Scope::Admin])?;
    valid_customer(customer)?;
    let (parts, body) = req.into_parts();
    let body = read_limited(&parts.headers, body, 4096).await?;
    let expires_in = if body.iter().all(u8::is_ascii_whitespace) {
        std::time::Duration::from_secs(3600)
    } else {
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::invalid_json(format!("body is not valid JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else { return Err(ApiError::invalid_request("body: must be a JSON object")) };
        if let Some(key) = map.keys().find(|k| k.as_str() != "expires_in") {
            return Err(ApiError::invalid_request(format!("{key}: unknown field")));
        }
        match map.get("expires_in") {
            None | Some(serde_json::Value::Null) => std::time::Duration::from_secs(3600),
            Some(serde_json::Value::String(text)) => crate::duration::parse(text)
                .ok()
                .filter(|d| d.as_secs() >= 1 && d.as_secs() <= PORTAL_MAX_SECS)
                .ok_or_else(|| ApiError::invalid_request("expires_in: must be a duration from 1s to 30d, such as \"1h\""))?,
            Some(_) => return Err(ApiError::invalid_request("expires_in: must be a duration string such as \"1h\"")),
        }
    };
    let expires_at = crate::clock::now_ms().saturating_add(i64::try_from(expires_in.as_millis()).unwrap_or(i64::MAX));
    let token = state.portal.issue(customer, expires_at);
    Ok(json(StatusCode::OK, &j!({"token": token, "customer": customer, "expires_at": crate::model::window::rfc3339(expires_at)})))
}
