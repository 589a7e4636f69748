//! Load for the crash tests: a deterministic PRNG and a send that tells an
//! answer from a connection that died (the in-doubt case).

use super::Client;
use serde_json::Value;

/// A tiny deterministic PRNG (xorshift64*), so a failing round can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Posts a batch; `None` when the connection failed (the server died).
pub async fn try_send(c: &Client, body: &Value) -> Option<u16> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(c.addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::post("/v1/events")
        .header("host", "x")
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.ok()?;
    Some(status)
}
