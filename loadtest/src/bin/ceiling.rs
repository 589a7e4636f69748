//! `meterd-ceiling`: the throughput ceiling meterd is measured against. A bare
//! hyper 1 server on the same runtime and HTTP settings as meterd that does the
//! unavoidable minimum of each request: `POST /v1/events` reads the body and
//! runs meterd's own parser and validator on it (`ingest::parse::parse_batch`,
//! the same serde_json pass meterd does), then adds the quantities to one
//! atomic; `POST /v1/check` parses the check with meterd's `CheckRequest` and
//! compares that atomic with a limit. No dedupe, WAL, counters or windows.
//!
//! usage: meterd-ceiling --config FILE [--listen ADDR]

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use meterd::ingest::parse::{parse_batch, Rules};
use meterd::model::Catalog;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

struct State {
    catalog: Arc<Catalog>,
    max_lateness_ms: i64,
    max_batch_events: usize,
    total: AtomicI64,
    limit: i64,
}

fn answer(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let ndjson = req.headers().get(hyper::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/x-ndjson"));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return answer(StatusCode::BAD_REQUEST, format!("{{\"error\":{:?}}}", e.to_string())),
    };
    match path.as_str() {
        "/v1/events" => {
            let rules =
                Rules { now_ms: meterd::clock::now_ms(), max_lateness_ms: state.max_lateness_ms, max_batch_events: state.max_batch_events };
            match parse_batch(&body, ndjson, &state.catalog, &rules) {
                Ok(events) => {
                    let sum: i64 = events.iter().map(|e| e.raw).sum();
                    state.total.fetch_add(sum, Ordering::Relaxed);
                    answer(StatusCode::ACCEPTED, format!("{{\"accepted\":{},\"duplicates\":0}}", events.len()))
                }
                Err(e) => answer(StatusCode::BAD_REQUEST, format!("{{\"error\":{:?}}}", e.to_string())),
            }
        }
        "/v1/check" => match meterd::limits::CheckRequest::from_json(&body) {
            Ok(check) => {
                let used = state.total.load(Ordering::Relaxed);
                let allowed = used.saturating_add(1) <= state.limit;
                if allowed && check.consume {
                    state.total.fetch_add(1, Ordering::Relaxed);
                }
                answer(
                    StatusCode::OK,
                    format!(
                        "{{\"allowed\":{allowed},\"customer\":{:?},\"meter\":{:?},\"used\":{used},\"limit\":{}}}",
                        check.customer, check.meter, state.limit
                    ),
                )
            }
            Err(e) => answer(StatusCode::BAD_REQUEST, format!("{{\"error\":{:?}}}", e.to_string())),
        },
        "/healthz" => answer(StatusCode::OK, "{}".into()),
        _ => answer(StatusCode::NOT_FOUND, "{}".into()),
    }
}

fn parse_args() -> anyhow::Result<(std::path::PathBuf, Option<SocketAddr>)> {
    let (mut config, mut listen) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => config = Some(args.next().context("--config needs a file")?.into()),
            "--listen" => listen = Some(args.next().context("--listen needs an address")?.parse().context("--listen: not an address")?),
            other => bail!("unknown argument {other:?}\nusage: meterd-ceiling --config FILE [--listen ADDR]"),
        }
    }
    Ok((config.context("usage: meterd-ceiling --config FILE [--listen ADDR]")?, listen))
}

fn main() -> anyhow::Result<()> {
    let (config_path, listen) = parse_args()?;
    let valid = meterd::config::load_valid(Some(&config_path)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listen = listen.unwrap_or(valid.server.listen);
    let state = Arc::new(State {
        catalog: valid.catalog.clone(),
        max_lateness_ms: meterd::duration::millis_i64(valid.ingest.max_lateness),
        max_batch_events: valid.ingest.max_batch_events,
        total: AtomicI64::new(0),
        limit: i64::MAX,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
        eprintln!("meterd-ceiling listening on {listen}");
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => a?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(state, req).await) }
                });
                let _ = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}
