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
pub async fn read_limited(headers: &HeaderMap, mut body: RequestBody, max: u64) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::payload_too_large(format!("body is larger than ingest.max_body_bytes ({max} bytes)"));
    let declared = headers.get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
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
