//! Standard Webhooks signatures: `v1,` + base64 of HMAC-SHA256 over
//! `"{webhook-id}.{webhook-timestamp}.{body}"` under the endpoint's key.
//!
//! HMAC comes from [`crate::mac`]; the test checks the specification's
//! published example, and `tests/notifications.rs` verifies every delivery
//! with the reference `standardwebhooks` crate.

use crate::mac::hmac_sha256;
use base64::Engine as _;

/// The `webhook-signature` header value for one attempt.
pub fn signature(key: &[u8], id: &str, timestamp_s: i64, body: &[u8]) -> String {
    let ts = timestamp_s.to_string();
    let mac = hmac_sha256(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specification_example() {
        // standard-webhooks spec: secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw.
        let key = base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_or_default();
        let sig = signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
