//! The HTTP targets (meterd, the bare-hyper ceiling and Limitador): request
//! bodies are rendered once into templates with fixed-width id slots, so each
//! request only copies its template and writes a fresh 16-hex-digit id suffix
//! into each slot; one hyper 1 client connection per worker, kept alive.

use crate::workload::{customer_name, OpKind, Workload};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;

/// Width of an id slot: 16 hex digits of (worker << 48 | sequence).
pub const SLOT_WIDTH: usize = 16;

/// A pre-rendered request body.
#[derive(Debug, Clone)]
pub struct Template {
    pub path: &'static str,
    pub body: Bytes,
    /// Byte offsets of the id slots to fill before sending (empty: send as is).
    pub slots: Vec<usize>,
    pub expect: StatusCode,
}

impl Template {
    /// The body with every slot set to `unique` (hex); a cheap clone when there are no slots.
    pub fn render(&self, unique: u64) -> Bytes {
        if self.slots.is_empty() {
            return self.body.clone();
        }
        let mut out = BytesMut::from(&self.body[..]);
        let hex = hex16(unique);
        for &at in &self.slots {
            out[at..at + SLOT_WIDTH].copy_from_slice(&hex);
        }
        out.freeze()
    }
}

pub fn hex16(v: u64) -> [u8; SLOT_WIDTH] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; SLOT_WIDTH];
    for (i, b) in out.iter_mut().enumerate() {
        *b = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// Renders every shape of `workload`. `nonce` makes ids unique across runs
/// against one long-lived server (8 hex digits are written before each slot).
pub fn templates(workload: &Workload, meter: &str, nonce: u32) -> Vec<Template> {
    workload
        .shapes
        .iter()
        .map(|shape| {
            let mut body = String::new();
            let mut slots = Vec::new();
            // Pushes `"<nonce><slot>-<suffix>"`, remembering where the slot is.
            let mut id = |body: &mut String, suffix: usize| {
                body.push('"');
                body.push_str(&format!("{nonce:08x}"));
                slots.push(body.len());
                body.push_str(&"0".repeat(SLOT_WIDTH));
                body.push_str(&format!("-{suffix}\""));
            };
            match shape.kind {
                OpKind::Ingest => {
                    let many = shape.customers.len() > 1;
                    if many {
                        body.push('[');
                    }
                    for (i, &c) in shape.customers.iter().enumerate() {
                        if i > 0 {
                            body.push(',');
                        }
                        body.push_str("{\"id\":");
                        id(&mut body, i);
                        body.push_str(&format!(",\"customer\":\"{}\",\"meter\":\"{meter}\",\"quantity\":1}}", customer_name(c)));
                    }
                    if many {
                        body.push(']');
                    }
                    Template { path: "/v1/events", body: Bytes::from(body), slots, expect: StatusCode::ACCEPTED }
                }
                OpKind::Check | OpKind::Consume => {
                    let c = shape.customers.first().copied().unwrap_or(0);
                    body.push_str(&format!("{{\"customer\":\"{}\",\"meter\":\"{meter}\",\"quantity\":1", customer_name(c)));
                    if shape.kind == OpKind::Consume {
                        body.push_str(",\"consume\":true,\"id\":");
                        id(&mut body, 0);
                    }
                    body.push('}');
                    Template { path: "/v1/check", body: Bytes::from(body), slots, expect: StatusCode::OK }
                }
            }
        })
        .collect()
}

/// The namespace of Limitador's limit in the bench's limits file.
pub const LIMITADOR_NAMESPACE: &str = "bench";

/// Renders `workload` for Limitador's HTTP API: a check is `POST /check`, a
/// consume `POST /check_and_report` (Limitador has no idempotency id), both
/// `{"namespace":…,"values":{"customer":…},"delta":1}` with the same customer
/// names meterd gets. None when the workload has ingests, which Limitador
/// cannot take (its `/report` has no per-event id and is not compared).
pub fn limitador_templates(workload: &Workload, namespace: &str) -> Option<Vec<Template>> {
    workload
        .shapes
        .iter()
        .map(|shape| {
            let path = match shape.kind {
                OpKind::Check => "/check",
                OpKind::Consume => "/check_and_report",
                OpKind::Ingest => return None,
            };
            let c = shape.customers.first().copied().unwrap_or(0);
            // serde_json escapes the namespace; customer names are `c<digits>`.
            let body = format!(
                "{{\"namespace\":{},\"values\":{{\"customer\":\"{}\"}},\"delta\":1}}",
                serde_json::Value::from(namespace),
                customer_name(c)
            );
            Some(Template { path, body: Bytes::from(body), slots: Vec::new(), expect: StatusCode::OK })
        })
        .collect()
}

/// Why one HTTP request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    #[error("request: {0}")]
    Request(hyper::Error),
    #[error("unexpected status {0}")]
    Status(StatusCode),
    #[error("building the request: {0}")]
    Build(#[from] hyper::http::Error),
}

/// One keep-alive connection.
pub struct HttpClient {
    addr: SocketAddr,
    templates: Arc<Vec<Template>>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr, templates: Arc<Vec<Template>>) -> Result<HttpClient, HttpError> {
        let mut c = HttpClient { addr, templates, sender: None };
        c.reconnect().await?;
        Ok(c)
    }

    async fn reconnect(&mut self) -> Result<(), HttpError> {
        self.sender = None;
        let stream = tokio::net::TcpStream::connect(self.addr).await.map_err(|e| HttpError::Connect(self.addr, e))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(HttpError::Handshake)?;
        tokio::spawn(conn);
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends template `index` with id suffix `unique`; reconnects once if the
    /// connection was closed.
    pub async fn send(&mut self, index: usize, unique: u64) -> Result<(), HttpError> {
        let t = &self.templates[index];
        let request = Request::post(t.path)
            .header(hyper::header::HOST, "meterd")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(t.render(unique)))?;
        let expect = t.expect;
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.reconnect().await?;
        }
        let Some(sender) = self.sender.as_mut() else {
            return Err(HttpError::Status(StatusCode::SERVICE_UNAVAILABLE));
        };
        if sender.ready().await.is_err() {
            self.reconnect().await?;
        }
        let Some(sender) = self.sender.as_mut() else {
            return Err(HttpError::Status(StatusCode::SERVICE_UNAVAILABLE));
        };
        let response = sender.send_request(request).await.map_err(HttpError::Request)?;
        let status = response.status();
        // Read the whole body so the connection can be reused.
        let _ = response.into_body().collect().await.map_err(HttpError::Request)?;
        if status != expect {
            return Err(HttpError::Status(status));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Distribution;
    use crate::workload::Scenario;

    #[test]
    fn rendered_batches_are_valid_json_with_distinct_ids() {
        let d = Distribution::uniform(50).unwrap();
        let w = Workload::build(Scenario::IngestBatch { size: 10 }, &d, 1);
        let t = &templates(&w, "tokens", 0xabcd)[0];
        let a: serde_json::Value = serde_json::from_slice(&t.render(1)).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&t.render(2)).unwrap();
        let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
        let (ia, ib) = (ids(&a), ids(&b));
        assert_eq!(ia.len(), 10);
        assert_eq!(ia[3], "0000abcd0000000000000001-3");
        assert!(ia.iter().all(|x| !ib.contains(x)));
        assert_eq!(a[0]["meter"], "tokens");
    }

    #[test]
    fn checks_have_no_slot_and_consumes_one() {
        let d = Distribution::uniform(5).unwrap();
        let check = &templates(&Workload::build(Scenario::Check, &d, 1), "m", 0)[0];
        assert!(check.slots.is_empty());
        let v: serde_json::Value = serde_json::from_slice(&check.render(9)).unwrap();
        assert!(v.get("id").is_none() && v["quantity"] == 1);
        let consume = &templates(&Workload::build(Scenario::CheckConsume, &d, 1), "m", 0)[0];
        let v: serde_json::Value = serde_json::from_slice(&consume.render(0xff)).unwrap();
        assert_eq!(v["id"], "0000000000000000000000ff-0");
        assert_eq!(v["consume"], true);
    }

    #[test]
    fn limitador_checks_and_consumes_name_the_same_customers() {
        let d = Distribution::uniform(10_000).unwrap();
        for (scenario, path) in [(Scenario::Check, "/check"), (Scenario::CheckConsume, "/check_and_report")] {
            let w = Workload::build(scenario, &d, 1);
            let meterd = templates(&w, "tokens", 0);
            let limitador = limitador_templates(&w, LIMITADOR_NAMESPACE).unwrap();
            assert_eq!(limitador.len(), meterd.len());
            for (l, m) in limitador.iter().zip(&meterd).take(100) {
                assert_eq!((l.path, l.expect, l.slots.is_empty()), (path, StatusCode::OK, true));
                let lv: serde_json::Value = serde_json::from_slice(&l.render(7)).unwrap();
                let mv: serde_json::Value = serde_json::from_slice(&m.render(7)).unwrap();
                assert_eq!(lv["namespace"], "bench");
                assert_eq!(lv["delta"], 1);
                assert_eq!(lv["values"]["customer"], mv["customer"]);
                assert_eq!(lv["values"].as_object().unwrap().len(), 1);
            }
        }
        let w = Workload::build(Scenario::Check, &d, 1);
        let body =
            format!("{{\"namespace\":\"n\\\"s\",\"values\":{{\"customer\":\"{}\"}},\"delta\":1}}", customer_name(w.shapes[0].customers[0]));
        assert_eq!(limitador_templates(&w, "n\"s").unwrap()[0].body.as_ref(), body.as_bytes());
    }

    #[test]
    fn limitador_refuses_ingest_workloads() {
        let d = Distribution::uniform(5).unwrap();
        assert!(limitador_templates(&Workload::build(Scenario::IngestSingle, &d, 1), "bench").is_none());
        assert!(limitador_templates(&Workload::build(Scenario::Mixed { check_percent: 80 }, &d, 1), "bench").is_none());
    }

    #[test]
    fn hex16_is_fixed_width() {
        assert_eq!(&hex16(0x1234), b"0000000000001234");
        assert_eq!(&hex16(u64::MAX), b"ffffffffffffffff");
    }
}
