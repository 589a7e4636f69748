//! Portal tokens: short-lived bearer tokens that read one customer's usage,
//! balances, reservations and history, for a usage widget in a product's own
//! UI. A token is `mpt_<hex payload>.<hex HMAC-SHA256(key, payload)>`, the
//! payload `{"c": customer, "exp": unix milliseconds}`; nothing is stored, so any
//! instance with the same key accepts it. The key comes from
//! `server.portal_secret_env`, or is generated once and kept in
//! `data_dir/portal_secret` (then tokens hold only on this instance's data
//! dir: set the variable when instances share customers).

use crate::mac::{ct_eq, hmac_sha256};
use std::io::Read;
use std::path::Path;

/// Every portal token starts with this.
pub const PREFIX: &str = "mpt_";

/// Why a token is not accepted (answered `401 unauthorized`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortalError {
    #[error("malformed portal token")]
    Malformed,
    #[error("portal token signature does not verify")]
    BadSignature,
    #[error("portal token expired")]
    Expired,
    #[error("portal key file {path}: {reason}")]
    Key { path: String, reason: String },
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    c: String,
    exp: i64,
}

/// Issues and verifies portal tokens under one key.
pub struct PortalTokens {
    key: Vec<u8>,
}

impl PortalTokens {
    pub fn new(key: Vec<u8>) -> PortalTokens {
        PortalTokens { key }
    }

    /// The configured key, else the one kept in `data_dir` (made on first use).
    pub fn load(configured: Option<&str>, data_dir: &Path) -> Result<PortalTokens, PortalError> {
        if let Some(key) = configured {
            return Ok(PortalTokens::new(key.as_bytes().to_vec()));
        }
        let path = data_dir.join("portal_secret");
        let fail = |reason: String| PortalError::Key { path: path.display().to_string(), reason };
        match std::fs::read_to_string(&path) {
            Ok(text) => return hex::decode(text.trim()).map(PortalTokens::new).map_err(|e| fail(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key)).map_err(|e| fail(format!("no randomness: {e}")))?;
        let tmp = data_dir.join("portal_secret.tmp");
        write_private(&tmp, hex::encode(key).as_bytes()).map_err(|e| fail(e.to_string()))?;
        std::fs::rename(&tmp, &path).map_err(|e| fail(e.to_string()))?;
        Ok(PortalTokens::new(key.to_vec()))
    }

    /// A token for `customer` valid until `expires_at_ms` (Unix milliseconds).
    pub fn issue(&self, customer: &str, expires_at_ms: i64) -> String {
        let payload = serde_json::to_vec(&Claims { c: customer.to_string(), exp: expires_at_ms }).unwrap_or_default();
        format!("{PREFIX}{}.{}", hex::encode(&payload), hex::encode(hmac_sha256(&self.key, &[&payload])))
    }

    /// The customer a token reads, if it verifies and has not expired at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<String, PortalError> {
        let (payload, mac) = token.strip_prefix(PREFIX).and_then(|t| t.split_once('.')).ok_or(PortalError::Malformed)?;
        let payload = hex::decode(payload).map_err(|_| PortalError::Malformed)?;
        let mac = hex::decode(mac).map_err(|_| PortalError::Malformed)?;
        if !ct_eq(&hmac_sha256(&self.key, &[&payload]), &mac) {
            return Err(PortalError::BadSignature);
        }
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| PortalError::Malformed)?;
        if now_ms >= claims.exp {
            return Err(PortalError::Expired);
        }
        Ok(claims.c)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_customer_until_it_expires() {
        let tokens = PortalTokens::new(b"k1".to_vec());
        let token = tokens.issue("u_1", 1_000);
        assert!(token.starts_with(PREFIX));
        assert_eq!(tokens.verify(&token, 999), Ok("u_1".to_string()));
        assert_eq!(tokens.verify(&token, 1_000), Err(PortalError::Expired));
        assert_eq!(PortalTokens::new(b"k2".to_vec()).verify(&token, 0), Err(PortalError::BadSignature), "another key");
        // The payload changed to another customer: the signature no longer matches.
        let (_, mac) = token.split_once('.').unwrap_or_default();
        let forged = format!("{PREFIX}{}.{mac}", hex::encode(br#"{"c":"u_2","exp":1000}"#));
        assert_eq!(tokens.verify(&forged, 0), Err(PortalError::BadSignature));
        for bad in ["", "mpt_", "mpt_zz.00", "key-123", "mpt_00"] {
            assert_eq!(tokens.verify(bad, 0), Err(PortalError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn the_generated_key_is_kept_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let first = PortalTokens::load(None, dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let token = first.issue("u", i64::MAX);
        let again = PortalTokens::load(None, dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.verify(&token, 0), Ok("u".to_string()), "same key after a restart");
        let other = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let fresh = PortalTokens::load(None, other.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fresh.verify(&token, 0), Err(PortalError::BadSignature), "another data dir, another key");
        let configured = PortalTokens::load(Some("shared"), other.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(PortalTokens::new(b"shared".to_vec()).verify(&configured.issue("u", i64::MAX), 0), Ok("u".to_string()));
    }
}
