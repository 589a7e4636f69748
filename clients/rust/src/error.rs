//! The client's one error type: an API error with the body's `code`,
//! `message` and `details`, or a failure to reach meterd.

/// Statuses that are retried: the same request may succeed later.
pub(crate) const RETRY_STATUSES: [u16; 5] = [408, 429, 502, 503, 504];

/// Everything a call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// meterd answered with a non-2xx status and `{"error": {"code", "message", "details"}}`.
    #[error("meterd: {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        details: Option<serde_json::Value>,
        /// Seconds from `Retry-After`.
        retry_after: Option<f64>,
    },
    /// No answer: connection refused or reset, a cut body.
    #[error("meterd: network error: {0}")]
    Network(String),
    /// No answer within the configured timeout.
    #[error("meterd: timed out")]
    Timeout,
    /// An answer that is not the JSON expected.
    #[error("meterd: unexpected answer: {0}")]
    Decode(String),
    /// An event refused before sending; names the field.
    #[error("meterd: {field}: {reason}")]
    InvalidEvent { field: &'static str, reason: &'static str },
    /// `track()` found the buffer full under [`crate::OnFull::Error`].
    #[error("meterd: the event buffer is full ({0} events)")]
    BufferFull(usize),
    /// `track()` after `close()`.
    #[error("meterd: the client is closed")]
    Closed,
    /// A bad base URL or TLS setup.
    #[error("meterd: setup: {0}")]
    Setup(String),
}

impl Error {
    /// The API's code (`invalid_event`, `rate_limited`, ...) or this crate's
    /// (`network_error`, `timeout`, `decode_error`, `invalid_event`,
    /// `buffer_full`, `closed`, `setup`).
    pub fn code(&self) -> &str {
        match self {
            Error::Api { code, .. } => code,
            Error::Network(_) => "network_error",
            Error::Timeout => "timeout",
            Error::Decode(_) => "decode_error",
            Error::InvalidEvent { .. } => "invalid_event",
            Error::BufferFull(_) => "buffer_full",
            Error::Closed => "closed",
            Error::Setup(_) => "setup",
        }
    }

    /// The HTTP status; 0 when meterd answered nothing.
    pub fn status(&self) -> u16 {
        match self {
            Error::Api { status, .. } => *status,
            _ => 0,
        }
    }

    /// The API's `details`, if any.
    pub fn details(&self) -> Option<&serde_json::Value> {
        match self {
            Error::Api { details, .. } => details.as_ref(),
            _ => None,
        }
    }

    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Api { status, .. } => RETRY_STATUSES.contains(status),
            Error::Network(_) | Error::Timeout => true,
            _ => false,
        }
    }

    pub(crate) fn retry_after(&self) -> Option<f64> {
        match self {
            Error::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
