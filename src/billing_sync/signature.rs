//! `Stripe-Signature` verification, as Stripe documents it: the header is
//! `t=<unix seconds>,v1=<hex>[,v1=<hex>...]` (other schemes such as `v0` are
//! ignored); a `v1` is the hex HMAC-SHA256, under the endpoint's whole
//! `whsec_...` secret, of `"{t}.{raw body}"`. Any one matching `v1` (compared
//! in constant time) verifies, provided `t` is within the tolerance of now.
//!
//! HMAC and the comparison come from [`crate::mac`]; the test vector made by
//! Stripe's own library checks the whole.

use crate::mac::{ct_eq, hmac_sha256};

/// Why a signature does not verify (all answered `400 invalid_signature`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Stripe-Signature header")]
    Missing,
    #[error("the Stripe-Signature header has no t=<unix seconds>")]
    NoTimestamp,
    #[error("the Stripe-Signature header has no v1 signature")]
    NoSignature,
    #[error("no v1 signature matches the body under the configured secret")]
    Mismatch,
    #[error("the signature timestamp is {0} s away from now (more than the tolerance)")]
    Stale(i64),
}

/// The `Stripe-Signature` header for `body` at `t` (what Stripe sends; tests
/// and the operator docs use it).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let mac = hmac_sha256(secret.as_bytes(), &[t.to_string().as_bytes(), b".", body]);
    format!("t={t},v1={}", hex::encode(mac))
}

/// Verifies `header` for `body` at `now` (Unix seconds); returns the signed `t`.
pub fn verify(header: Option<&str>, body: &[u8], secret: &str, tolerance_secs: i64, now: i64) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut t = None;
    let mut candidates = Vec::new();
    for item in header.split(',') {
        let Some((key, value)) = item.trim().split_once('=') else { continue };
        match key {
            "t" => t = value.parse::<i64>().ok(),
            "v1" => candidates.push(value),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::NoTimestamp)?;
    if candidates.is_empty() {
        return Err(SignatureError::NoSignature);
    }
    let expected = hex::encode(hmac_sha256(secret.as_bytes(), &[t.to_string().as_bytes(), b".", body]));
    // Every candidate is compared (no early exit that would time the match).
    let matched = candidates.iter().fold(false, |m, c| m | ct_eq(expected.as_bytes(), c.as_bytes()));
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    let skew = now.saturating_sub(t);
    if skew.saturating_abs() > tolerance_secs {
        return Err(SignatureError::Stale(skew));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header made once by Stripe's official Python library (see
    /// tests/vectors/make_stripe_signature.py).
    #[derive(serde::Deserialize)]
    struct Vector {
        secret: String,
        timestamp: i64,
        payload: String,
        header: String,
    }

    fn vector() -> Vector {
        let text = include_str!("../../tests/vectors/stripe_signature.json");
        serde_json::from_str(text).unwrap_or_else(|e| panic!("vector: {e}"))
    }

    #[test]
    fn the_header_stripes_library_made_verifies() {
        let v = vector();
        let body = v.payload.as_bytes();
        assert_eq!(verify(Some(&v.header), body, &v.secret, 300, v.timestamp + 10), Ok(v.timestamp));
        assert_eq!(sign(&v.secret, v.timestamp, body), v.header, "our signer makes the same header");
        // One byte of the body changed, or another secret: no match.
        let mut changed = body.to_vec();
        changed[10] ^= 1;
        assert_eq!(verify(Some(&v.header), &changed, &v.secret, 300, v.timestamp), Err(SignatureError::Mismatch));
        assert_eq!(verify(Some(&v.header), body, "whsec_other", 300, v.timestamp), Err(SignatureError::Mismatch));
    }

    #[test]
    fn several_v1_values_any_one_matches_and_other_schemes_are_ignored() {
        let v = vector();
        let good = v.header.split_once(",v1=").map(|(_, sig)| sig.to_string()).unwrap_or_default();
        let bad = "0".repeat(64);
        let header = format!("t={},v0={good},v1={bad},v1={good}", v.timestamp);
        assert_eq!(verify(Some(&header), v.payload.as_bytes(), &v.secret, 300, v.timestamp), Ok(v.timestamp));
        let only_v0 = format!("t={},v0={good}", v.timestamp);
        assert_eq!(verify(Some(&only_v0), v.payload.as_bytes(), &v.secret, 300, v.timestamp), Err(SignatureError::NoSignature));
        let all_bad = format!("t={},v1={bad},v1=zz", v.timestamp);
        assert_eq!(verify(Some(&all_bad), v.payload.as_bytes(), &v.secret, 300, v.timestamp), Err(SignatureError::Mismatch));
    }

    #[test]
    fn the_timestamp_must_be_within_the_tolerance_either_way() {
        let v = vector();
        let body = v.payload.as_bytes();
        let at = |now| verify(Some(&v.header), body, &v.secret, 300, now);
        assert_eq!(at(v.timestamp + 300), Ok(v.timestamp));
        assert_eq!(at(v.timestamp + 301), Err(SignatureError::Stale(301)));
        assert_eq!(at(v.timestamp - 301), Err(SignatureError::Stale(-301)));
        assert_eq!(verify(None, body, &v.secret, 300, v.timestamp), Err(SignatureError::Missing));
        assert_eq!(verify(Some("v1=abc"), body, &v.secret, 300, v.timestamp), Err(SignatureError::NoTimestamp));
        assert_eq!(verify(Some("t=x,v1=abc"), body, &v.secret, 300, v.timestamp), Err(SignatureError::NoTimestamp));
        // A timestamp changed in the header no longer matches its signature.
        let moved = v.header.replacen(&v.timestamp.to_string(), &(v.timestamp + 1).to_string(), 1);
        assert_eq!(verify(Some(&moved), body, &v.secret, 300, v.timestamp), Err(SignatureError::Mismatch));
    }
}
