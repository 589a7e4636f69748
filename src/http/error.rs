//! API errors and their JSON bodies: `{"error": {"code", "message", "details"}}`,
//! with the status codes of docs/api.md.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Response, StatusCode};
use serde::Serialize;

/// Every error code the API answers with, and its status: the `Error` schema of
/// `docs/openapi.json` lists exactly these (tests/openapi.rs).
pub const CODES: &[(&str, u16)] = &[
    ("invalid_json", 400),
    ("invalid_event", 400),
    ("invalid_request", 400),
    ("invalid_signature", 400),
    ("unauthorized", 401),
    ("forbidden", 403),
    ("not_found", 404),
    ("method_not_allowed", 405),
    ("request_timeout", 408),
    ("conflict", 409),
    ("payload_too_large", 413),
    ("unsupported_media_type", 415),
    ("rate_limited", 429),
    ("internal", 500),
    ("unavailable", 503),
];

/// Every error the API answers with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<serde_json::Value>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        debug_assert!(CODES.contains(&(code, status.as_u16())), "{code} {status} is not in CODES");
        ApiError { status, code, message: message.into(), details: None, retry_after: None }
    }
    pub fn invalid_json(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", m)
    }
    pub fn invalid_event(m: impl Into<String>, details: serde_json::Value) -> ApiError {
        ApiError { details: Some(details), ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_event", m) }
    }
    pub fn invalid_request(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    pub fn method_not_allowed(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", m)
    }
    pub fn payload_too_large(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m)
    }
    pub fn unsupported_media_type(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", m)
    }
    pub fn rate_limited(retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "this key's rate limit is exhausted")
        }
    }
    pub fn unavailable(m: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError { retry_after: Some(retry_after), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m) }
    }
    /// An idempotency id reused with another body, or a state that forbids the change.
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", m)
    }
    /// A Stripe webhook whose `Stripe-Signature` does not verify.
    pub fn invalid_signature(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_signature", m)
    }
    /// A bug (a response that could not be serialized).
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
    }
    /// A request body that did not arrive within `server.body_read_timeout`;
    /// the connection is closed after the answer.
    pub fn request_timeout(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", m)
    }

    /// The JSON body alone.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            details: Option<&'a serde_json::Value>,
        }
        serde_json::to_vec(&Body { error: Inner { code: self.code, message: &self.message, details: self.details.as_ref() } })
            .unwrap_or_default()
    }

    /// The HTTP response.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut builder =
            Response::builder().status(self.status).header(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after {
            builder = builder.header(header::RETRY_AFTER, secs.to_string());
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            builder = builder.header(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        builder.body(Full::new(Bytes::from(self.body()))).unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

/// The capacity a JSON response body starts with.
const JSON_BODY_START: usize = 512;

/// A JSON response with `status`, through serde (a check's answer has its
/// own writer: `CheckAnswer::to_json`, then [`json_written`]).
/// Written into a buffer with room for most answers (a usage summary, an
/// error): grown from empty it took three allocations and two copies per
/// answer (issue 24).
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let mut body = Vec::with_capacity(JSON_BODY_START);
    json_written(status, serde_json::to_writer(&mut body, value).map(|()| body))
}

/// A JSON response with `status` from a body already written (a check's
/// answer, `CheckAnswer::to_json`), or a `500` naming why it could not be.
pub fn json_written(status: StatusCode, body: Result<Vec<u8>, serde_json::Error>) -> Response<Full<Bytes>> {
    match body {
        Ok(body) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        Err(e) => ApiError::internal(e.to_string()).response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_constructor_answers_a_listed_code_and_status() {
        let all = [
            ApiError::invalid_json("m"),
            ApiError::invalid_event("m", serde_json::json!([])),
            ApiError::invalid_request("m"),
            ApiError::invalid_signature("m"),
            ApiError::unauthorized("m"),
            ApiError::forbidden("m"),
            ApiError::not_found("m"),
            ApiError::method_not_allowed("m"),
            ApiError::request_timeout("m"),
            ApiError::conflict("m"),
            ApiError::payload_too_large("m"),
            ApiError::unsupported_media_type("m"),
            ApiError::rate_limited(1),
            ApiError::internal("m"),
            ApiError::unavailable("m", 1),
        ];
        let made: Vec<_> = all.iter().map(|e| (e.code, e.status.as_u16())).collect();
        assert_eq!(made, CODES);
    }
}
