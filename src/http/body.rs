//! Reading request bodies under a byte limit, frame by frame: a body over the
//! limit is refused as soon as the limit is crossed (or at once, from its
//! Content-Length), never buffered whole.

use super::error::ApiError;
use super::timeouts::BodyTimedOut;
use super::RequestBody;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::HeaderMap;

/// Reads the whole body, refusing it with 413 past `max` bytes (and with 408
/// when it does not arrive within `server.body_read_timeout`).
pub async fn read_limited(headers: &HeaderMap, body: RequestBody, max: u64) -> Result<Bytes, ApiError> {
    read_declared(declared_length(headers), body, max).await
}

/// The body's length as its `Content-Length` declares it (none when absent or unreadable).
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}

/// [`read_limited`] given the declared length instead of the headers, for a
/// handler that lets go of the request's head before it reads the body (its
/// future, boxed per request, then does not hold the head: issue 24).
pub async fn read_declared(declared: Option<u64>, mut body: RequestBody, max: u64) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::payload_too_large(format!("body is larger than ingest.max_body_bytes ({max} bytes)"));
    if declared.is_some_and(|len| len > max) {
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(8192).min(max) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match e.downcast_ref::<BodyTimedOut>() {
            Some(timed_out) => ApiError::request_timeout(timed_out.to_string()),
            None => ApiError::invalid_request(format!("could not read the body: {e}")),
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() as u64 + data.len() as u64 > max {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}
