//! Reading request bodies under a byte limit, frame by frame: a body over the
//! limit is refused as soon as the limit is crossed (or at once, from its
//! Content-Length), never buffered whole.

use super::error::ApiError;
use super::timeouts::BodyTimedOut;
use super::RequestBody;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::HeaderMap;

/// The largest body [`read_declared`] keeps without a copy: hyper's smallest
/// read buffer.
const SMALL_BODY: u64 = 8192;

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
pub async fn read_declared<B>(declared: Option<u64>, mut body: B, max: u64) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>> + Unpin,
{
    let too_large = || ApiError::payload_too_large(format!("body is larger than ingest.max_body_bytes ({max} bytes)"));
    if declared.is_some_and(|len| len > max) {
        return Err(too_large());
    }
    // A small body whose first frame is all of it (as its Content-Length says:
    // a single event's, a check's) is kept as it came: no copy, no allocation
    // (it holds on to hyper's 8 KiB read buffer, which hyper renews for the
    // next read anyway while a request is in flight). Any other, a batch's, is
    // copied frame by frame at once, as before, so hyper can reuse its larger
    // read buffer instead of allocating another (issue 24).
    let (mut first, mut gathered, mut len) = (None::<Bytes>, None::<BytesMut>, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match e.downcast_ref::<BodyTimedOut>() {
            Some(timed_out) => ApiError::request_timeout(timed_out.to_string()),
            None => ApiError::invalid_request(format!("could not read the body: {e}")),
        })?;
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            if len > max {
                return Err(too_large());
            }
            match gathered.as_mut() {
                Some(buf) => buf.extend_from_slice(&data),
                None if first.is_none() && declared == Some(len) && len <= SMALL_BODY => first = Some(data),
                None => {
                    let mut buf = BytesMut::with_capacity(declared.unwrap_or(8192).max(len).min(max) as usize);
                    if let Some(earlier) = first.take() {
                        buf.extend_from_slice(&earlier);
                    }
                    buf.extend_from_slice(&data);
                    gathered = Some(buf);
                }
            }
        }
    }
    Ok(gathered.map(BytesMut::freeze).or(first).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Error>>>;

    fn body(frames: Vec<Bytes>) -> StreamBody<Frames> {
        let frames: Vec<Result<Frame<Bytes>, Error>> = frames.into_iter().map(|b| Ok(Frame::data(b))).collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_small_body_in_one_frame_is_kept_without_a_copy() {
        let frame = Bytes::from_static(br#"{"customer":"c"}"#);
        let read = read_declared(Some(frame.len() as u64), body(vec![frame.clone()]), 1024).await.expect("read");
        assert_eq!(read, frame);
        assert_eq!(read.as_ptr(), frame.as_ptr(), "the frame itself, not a copy");
    }

    #[tokio::test]
    async fn other_bodies_are_gathered_into_a_copy() {
        let (a, b) = (Bytes::from_static(b"{\"customer\""), Bytes::from_static(b":\"c\"}"));
        let read = read_declared(Some(16), body(vec![a.clone(), b]), 1024).await.expect("two frames");
        assert_eq!(&read[..], br#"{"customer":"c"}"#);
        // No declared length, or a body past the small size: copied too.
        let read = read_declared(None, body(vec![a.clone()]), 1024).await.expect("undeclared");
        assert_eq!((read.clone(), read.as_ptr() == a.as_ptr()), (a, false));
        let big = Bytes::from(vec![b'x'; SMALL_BODY as usize + 1]);
        let read = read_declared(Some(big.len() as u64), body(vec![big.clone()]), 1 << 20).await.expect("big");
        assert_eq!((read.clone(), read.as_ptr() == big.as_ptr()), (big, false));
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_refused_whether_declared_or_not() {
        let frames = vec![Bytes::from_static(b"12345"), Bytes::from_static(b"6789")];
        let declared = read_declared(Some(9), body(frames.clone()), 8).await.expect_err("declared too large");
        assert_eq!(declared.status, hyper::StatusCode::PAYLOAD_TOO_LARGE);
        let sent = read_declared(Some(4), body(frames), 8).await.expect_err("sent too much");
        assert_eq!(sent.status, hyper::StatusCode::PAYLOAD_TOO_LARGE);
    }
}
