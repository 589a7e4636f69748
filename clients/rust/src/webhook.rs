//! Verifying meterd's notifications (Standard Webhooks): `webhook-signature`
//! is `v1,` + base64 HMAC-SHA256 of `"{webhook-id}.{webhook-timestamp}.{body}"`
//! under the endpoint's key (the secret is `whsec_` + base64 of the key),
//! compared in constant time; the timestamp must be within the tolerance
//! (default 5 minutes) of now.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a webhook does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook secret is not whsec_ + base64")]
    BadSecret,
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not Unix seconds")]
    BadTimestamp,
    #[error("message timestamp too old")]
    TooOld,
    #[error("message timestamp too new")]
    TooNew,
    #[error("no matching signature")]
    NoMatch,
}

/// Verifies (and makes) signatures for one endpoint secret.
#[derive(Clone)]
pub struct Webhook {
    key: Vec<u8>,
    /// Seconds a timestamp may be from now (default 300).
    pub tolerance: i64,
}

impl Webhook {
    /// From `whsec_...` (or bare base64).
    pub fn new(secret: &str) -> Result<Webhook, WebhookError> {
        let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| WebhookError::BadSecret)?;
        if key.is_empty() {
            return Err(WebhookError::BadSecret);
        }
        Ok(Webhook { key, tolerance: 300 })
    }

    fn mac(&self, id: &str, ts: i64, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length: new_from_slice cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value (`v1,<base64>`).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(self.mac(id, timestamp, body).finalize().into_bytes()))
    }

    /// Checks the three headers against the raw body at the current time.
    /// `header` looks a header up by its lower-case name.
    pub fn verify<'a>(&self, body: &[u8], header: impl Fn(&str) -> Option<&'a str>) -> Result<(), WebhookError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        self.verify_at(body, header, now)
    }

    /// [`Webhook::verify`] at `now` (Unix seconds).
    pub fn verify_at<'a>(&self, body: &[u8], header: impl Fn(&str) -> Option<&'a str>, now: i64) -> Result<(), WebhookError> {
        let id = header("webhook-id").ok_or(WebhookError::MissingHeader("webhook-id"))?;
        let ts_text = header("webhook-timestamp").ok_or(WebhookError::MissingHeader("webhook-timestamp"))?;
        let sigs = header("webhook-signature").ok_or(WebhookError::MissingHeader("webhook-signature"))?;
        if ts_text.is_empty() || ts_text.len() > 15 || !ts_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(WebhookError::BadTimestamp);
        }
        let ts: i64 = ts_text.parse().map_err(|_| WebhookError::BadTimestamp)?;
        if ts < now - self.tolerance {
            return Err(WebhookError::TooOld);
        }
        if ts > now + self.tolerance {
            return Err(WebhookError::TooNew);
        }
        for part in sigs.split(' ') {
            let Some(("v1", sig)) = part.split_once(',') else { continue };
            let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(sig) else { continue };
            if self.mac(id, ts, body).verify_slice(&sig).is_ok() {
                return Ok(());
            }
        }
        Err(WebhookError::NoMatch)
    }
}
