//! The route table: every route's path, name (the `route` label of the request
//! metrics), methods and handlers, in one place. [`Table`] serves a listener's
//! share of it: a path matches a row segment by segment (`{customer}` matches
//! any one segment, percent-decoded before the handler sees it); a method the
//! row does not list is a 405 whose `Allow` is made from the same row.
//!
//! Also: percent-decoding of path segments and query strings (strict: a bad
//! escape or non-UTF-8 is a 400), duplicate query parameters refused.

use super::error::ApiError;
use super::finish::Finish;
use super::{billing, handlers, ui, HttpState, RequestBody, Routes};
use crate::telemetry::RouteMetrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::Method;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

type Request = hyper::Request<RequestBody>;
type Response = hyper::Response<Full<Bytes>>;

/// What a handler returns: its answer, later, in one box. A handler that
/// writes (an ingest, a consume) is finished even if hyper drops it (the client
/// went away); the others are [`Finish::cancellable`].
pub type Pending = Finish<Result<Response, ApiError>>;

/// A route's handler for one method: the shared state, the request, and the
/// route's percent-decoded `{customer}` segment ("" on routes without one).
pub type Handler = fn(Arc<HttpState>, Request, String) -> Pending;

/// One route.
pub struct Route {
    /// Its `route` label in `meterd_http_requests_total` and the latency histogram.
    pub name: &'static str,
    /// The path; a `{…}` segment matches any one segment, percent-decoded.
    pub path: &'static str,
    /// Served by the `metrics.listen` listener too ([`Routes::OpsOnly`]).
    pub ops: bool,
    /// The methods it answers, each with its handler; any other method is a
    /// 405 whose `Allow` lists these.
    pub methods: &'static [(Method, Handler)],
}

/// The `route` label of requests that match no route.
pub const UNKNOWN: &str = "unknown";

/// Every route meterd serves (API.md part 1).
pub static ROUTES: &[Route] = &[
    Route { name: "events", path: "/v1/events", ops: false, methods: &[(Method::POST, |s, req, _| handlers::events(s, req))] },
    Route { name: "check", path: "/v1/check", ops: false, methods: &[(Method::POST, |s, req, _| handlers::check(s, req))] },
    Route {
        name: "usage_history",
        path: "/v1/usage",
        ops: false,
        methods: &[(Method::GET, |s, req, _| {
            Pending::cancellable(async move {
                let query = parse_query(req.uri().query().unwrap_or(""))?;
                handlers::usage_history(&s, req.headers(), &query).await
            })
        })],
    },
    Route {
        name: "customer_usage",
        path: "/v1/customers/{customer}/usage",
        ops: false,
        methods: &[(Method::GET, |s, req, c| Pending::cancellable(async move { handlers::customer_usage(&s, req.headers(), &c).await }))],
    },
    Route {
        name: "entitlements",
        path: "/v1/customers/{customer}/entitlements",
        ops: false,
        methods: &[
            (Method::GET, |s, req, c| Pending::cancellable(async move { handlers::get_entitlements(&s, req.headers(), &c).await })),
            (Method::PUT, |s, req, c| Pending::cancellable(async move { handlers::put_entitlements(&s, req, &c).await })),
            // Issue 20: back to the default plan.
            (Method::DELETE, |s, req, c| Pending::cancellable(async move { billing::delete_entitlements(&s, req.headers(), &c).await })),
        ],
    },
    // Prepaid credits and grants (issue 18).
    Route {
        name: "grants",
        path: "/v1/customers/{customer}/grants",
        ops: false,
        methods: &[
            (Method::GET, |s, req, c| {
                Pending::cancellable(async move {
                    let query = parse_query(req.uri().query().unwrap_or(""))?;
                    super::credits::list(&s, req.headers(), &c, &query)
                })
            }),
            (Method::POST, |s, req, c| Pending::cancellable(async move { super::credits::create(&s, req, &c).await })),
        ],
    },
    Route {
        name: "grant",
        path: "/v1/customers/{customer}/grants/{id}",
        ops: false,
        methods: &[(Method::DELETE, |s, req, c| Pending::cancellable(async move { super::credits::void(&s, req, &c).await }))],
    },
    Route {
        name: "balances",
        path: "/v1/customers/{customer}/balances",
        ops: false,
        methods: &[(Method::GET, |s, req, c| Pending::cancellable(async move { super::credits::balances(&s, req.headers(), &c).await }))],
    },
    // Reservations (issue 19).
    Route {
        name: "reservations",
        path: "/v1/reservations",
        ops: false,
        methods: &[
            (Method::GET, |s, req, _| {
                Pending::cancellable(async move {
                    let query = parse_query(req.uri().query().unwrap_or(""))?;
                    super::reservations::list(&s, req.headers(), &query).await
                })
            }),
            (Method::POST, |s, req, _| Pending::cancellable(async move { super::reservations::reserve(&s, req).await })),
        ],
    },
    Route {
        name: "reservation",
        path: "/v1/reservations/{id}",
        ops: false,
        methods: &[(Method::GET, |s, req, id| Pending::cancellable(async move { super::reservations::get(&s, req.headers(), &id).await }))],
    },
    Route {
        name: "reservation_settle",
        path: "/v1/reservations/{id}/settle",
        ops: false,
        methods: &[(Method::POST, |s, req, id| Pending::cancellable(async move { super::reservations::settle(&s, req, id).await }))],
    },
    Route {
        name: "reservation_release",
        path: "/v1/reservations/{id}/release",
        ops: false,
        methods: &[(Method::POST, |s, req, id| {
            Pending::cancellable(async move { super::reservations::release(&s, req.headers(), id).await })
        })],
    },
    Route {
        name: "stripe_status",
        path: "/v1/stripe/status",
        ops: false,
        methods: &[(Method::GET, |s, req, _| Pending::cancellable(std::future::ready(handlers::stripe_status(&s, req.headers()))))],
    },
    // Stripe subscription sync, customers and portal tokens (issue 20).
    Route {
        name: "stripe_webhook",
        path: "/v1/webhooks/stripe",
        ops: false,
        methods: &[(Method::POST, |s, req, _| Pending::cancellable(billing::stripe_webhook(s, req)))],
    },
    Route {
        name: "customers",
        path: "/v1/customers",
        ops: false,
        methods: &[(Method::GET, |s, req, _| {
            Pending::cancellable(async move {
                let query = parse_query(req.uri().query().unwrap_or(""))?;
                billing::list_customers(&s, req.headers(), &query).await
            })
        })],
    },
    Route {
        name: "plans",
        path: "/v1/plans",
        ops: false,
        methods: &[(Method::GET, |s, req, _| Pending::cancellable(std::future::ready(billing::plans(&s, req.headers()))))],
    },
    Route {
        name: "meters",
        path: "/v1/meters",
        ops: false,
        methods: &[(Method::GET, |s, req, _| Pending::cancellable(std::future::ready(billing::meters(&s, req.headers()))))],
    },
    Route {
        name: "portal_tokens",
        path: "/v1/customers/{customer}/portal-tokens",
        ops: false,
        methods: &[(Method::POST, |s, req, c| Pending::cancellable(async move { billing::portal_token(&s, req, &c).await }))],
    },
    // Threshold notifications (issue 17).
    Route {
        name: "notifications",
        path: "/v1/notifications",
        ops: false,
        methods: &[(Method::GET, |s, req, _| {
            Pending::cancellable(std::future::ready(
                parse_query(req.uri().query().unwrap_or("")).and_then(|query| super::notifications::list(&s, req.headers(), &query)),
            ))
        })],
    },
    Route {
        name: "notification_redeliver",
        path: "/v1/notifications/{id}/redeliver",
        ops: false,
        methods: &[(Method::POST, |s, req, id| {
            Pending::cancellable(async move { super::notifications::redeliver(&s, req.headers(), &id).await })
        })],
    },
    // Adjustments (issue 19).
    Route {
        name: "adjustments",
        path: "/v1/adjustments",
        ops: false,
        methods: &[
            (Method::POST, |s, req, _| Pending::cancellable(async move { super::adjustments::create(&s, req).await })),
            (Method::GET, |s, req, _| {
                Pending::cancellable(async move {
                    let query = parse_query(req.uri().query().unwrap_or(""))?;
                    super::adjustments::list(&s, req.headers(), &query).await
                })
            }),
        ],
    },
    // The operator console and the usage widget (issue 22).
    Route {
        name: "ui_redirect",
        path: "/ui",
        ops: false,
        methods: &[(Method::GET, |_, _, _| Pending::cancellable(std::future::ready(Ok(ui::to_index()))))],
    },
    Route {
        name: "ui",
        path: "/ui/{file}",
        ops: false,
        methods: &[(Method::GET, |s, req, file| Pending::cancellable(std::future::ready(ui::answer(&s, req.headers(), &file))))],
    },
    // The OpenAPI document (issue 21): no key, API listener only.
    Route {
        name: "openapi",
        path: "/openapi.json",
        ops: false,
        methods: &[(Method::GET, |_, _, _| Pending::cancellable(std::future::ready(Ok(handlers::openapi()))))],
    },
    Route {
        name: "metrics",
        path: "/metrics",
        ops: true,
        methods: &[(Method::GET, |s, _, _| Pending::cancellable(std::future::ready(Ok(handlers::metrics(&s)))))],
    },
    Route {
        name: "healthz",
        path: "/healthz",
        ops: true,
        methods: &[(Method::GET, |_, _, _| Pending::cancellable(std::future::ready(Ok(handlers::healthz()))))],
    },
    Route {
        name: "readyz",
        path: "/readyz",
        ops: true,
        methods: &[(Method::GET, |s, _, _| Pending::cancellable(std::future::ready(Ok(handlers::readyz(&s)))))],
    },
];

/// The routes one listener serves, from [`ROUTES`].
///
/// Make it after `telemetry::prometheus()` installed the recorder: the request
/// metrics' handles are registered here.
pub struct Table {
    served: Vec<Served>,
    unknown: RouteMetrics,
    routes: Routes,
    state: Arc<HttpState>,
}

impl Table {
    pub fn new(state: Arc<HttpState>, routes: Routes) -> Table {
        let served = ROUTES.iter().filter(|r| routes == Routes::All || r.ops).map(|r| Served::new(r, routes)).collect();
        Table { served, unknown: RouteMetrics::new(UNKNOWN), routes, state }
    }

    /// Answers one request and counts it in the request metrics.
    pub async fn answer(&self, req: Request) -> Response {
        let path = req.uri().path();
        match self.served.iter().find(|s| matches(&s.pattern, path)) {
            Some(served) => served.answer(self.state.clone(), req).await,
            None => {
                let started = Instant::now();
                let response = no_route(&self.state, self.routes, &req).response();
                self.unknown.record(response.status().as_u16(), started.elapsed().as_secs_f64());
                response
            }
        }
    }
}

/// A row of the table as one listener serves it.
struct Served {
    route: &'static Route,
    /// Its path's segments.
    pattern: Vec<&'static str>,
    /// The `Allow` header of its 405.
    allow: String,
    /// Which segment is the `{customer}` capture, if any.
    capture: Option<usize>,
    /// Answered 503 while shutting down (the `/v1/` routes of the API listener).
    gated: bool,
    /// Readable from any origin (the widget's routes, [`ui::CROSS_ORIGIN_ROUTES`]).
    cross_origin: bool,
    metrics: RouteMetrics,
}

impl Served {
    fn new(route: &'static Route, routes: Routes) -> Served {
        let allow = route.methods.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join(", ");
        let capture = segments(route.path).position(|s| s.starts_with('{'));
        let gated = routes == Routes::All && first_segment(route.path) == "v1";
        let cross_origin = routes == Routes::All && ui::CROSS_ORIGIN_ROUTES.contains(&route.name);
        let pattern = segments(route.path).collect();
        Served { route, pattern, allow, capture, gated, cross_origin, metrics: RouteMetrics::new(route.name) }
    }

    async fn answer(&self, state: Arc<HttpState>, req: Request) -> Response {
        let started = Instant::now();
        let mut response = self.respond(state, req).await.unwrap_or_else(|e| e.response());
        if self.cross_origin {
            ui::allow_any_origin(&mut response);
        }
        self.metrics.record(response.status().as_u16(), started.elapsed().as_secs_f64());
        response
    }

    async fn respond(&self, state: Arc<HttpState>, req: Request) -> Result<Response, ApiError> {
        if self.gated && state.shutting_down.load(Ordering::Acquire) {
            return Err(ApiError::unavailable("shutting down", 5));
        }
        let Some((_, handler)) = self.route.methods.iter().find(|(m, _)| m == req.method()) else {
            if self.cross_origin && req.method() == Method::OPTIONS {
                return Ok(ui::preflight(&self.allow));
            }
            return Ok(self.not_allowed());
        };
        let customer = match self.capture {
            Some(i) => decode(segments(req.uri().path()).nth(i).unwrap_or(""))?,
            None => String::new(),
        };
        handler(state, req, customer).await
    }

    fn not_allowed(&self) -> Response {
        let mut r = ApiError::method_not_allowed(format!("this route allows {}", self.allow)).response();
        if let Ok(v) = HeaderValue::from_str(&self.allow) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        r
    }
}

/// The answer to a request no route matches.
fn no_route(state: &HttpState, routes: Routes, req: &Request) -> ApiError {
    let path = req.uri().path();
    match routes {
        Routes::OpsOnly => ApiError::not_found("this listener serves only /metrics, /healthz and /readyz"),
        Routes::All if first_segment(path) == "v1" && state.shutting_down.load(Ordering::Acquire) => {
            ApiError::unavailable("shutting down", 5)
        }
        Routes::All => ApiError::not_found(format!("no route for {} {path}", req.method())),
    }
}

/// Whether `path` has the segments of `pattern` (a `{…}` segment matches any one).
fn matches(pattern: &[&str], path: &str) -> bool {
    let mut got = segments(path);
    pattern.iter().all(|p| got.next().is_some_and(|g| p.starts_with('{') || *p == g)) && got.next().is_none()
}

/// A path's `/`-separated segments, after its leading slashes.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.trim_start_matches('/').split('/')
}

fn first_segment(path: &str) -> &str {
    segments(path).next().unwrap_or("")
}

/// Percent-decodes a path segment or query component (`+` is a space in queries
/// only, handled by the caller).
pub fn decode(text: &str) -> Result<String, ApiError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => return Err(ApiError::invalid_request(format!("bad percent-encoding in {text:?}"))),
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::invalid_request(format!("{text:?} is not UTF-8 once decoded")))
}

fn parse_query(query: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode(&k.replace('+', " "))?;
        let v = decode(&v.replace('+', " "))?;
        if out.insert(k.clone(), v).is_some() {
            return Err(ApiError::invalid_request(format!("query parameter {k:?} is given twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_table_names_each_route_once_and_paths_are_distinct() {
        let names: HashSet<_> = ROUTES.iter().map(|r| r.name).collect();
        let paths: HashSet<_> = ROUTES.iter().map(|r| r.path).collect();
        assert_eq!(names.len(), ROUTES.len());
        assert_eq!(paths.len(), ROUTES.len());
        assert!(!names.contains(UNKNOWN));
        let ops: Vec<_> = ROUTES.iter().filter(|r| r.ops).map(|r| r.path).collect();
        assert_eq!(ops, ["/metrics", "/healthz", "/readyz"]);
        for route in ROUTES {
            assert!(!route.methods.is_empty(), "{}", route.name);
            let api = route.path.starts_with("/v1/") || route.path.starts_with("/ui");
            assert!(!(route.ops && api), "{}: the ops listener never serves the API or the console", route.name);
        }
    }

    #[test]
    fn paths_match_segment_by_segment() {
        let row = |path: &str| ROUTES.iter().find(|r| matches(&segments(r.path).collect::<Vec<_>>(), path)).map(|r| r.name);
        let cases = [
            ("/v1/events", Some("events")),
            ("/v1/customers/a%2Fb/usage", Some("customer_usage")),
            ("/v1/customers/c/entitlements", Some("entitlements")),
            // An empty customer is routed, and refused by its handler (400).
            ("/v1/customers//usage", Some("customer_usage")),
            ("/v1/customers/c/usage/more", None),
            ("/v1/customers/c", None),
            ("/v1/events/", None),
            ("/v1//events", None),
            ("/v1/%65vents", None),
            ("/", None),
            ("", None),
            ("/healthz", Some("healthz")),
            ("//healthz", Some("healthz")),
            ("/ui", Some("ui_redirect")),
            ("/ui/", Some("ui")),
            ("/ui/widget.js", Some("ui")),
            ("/ui/a/b", None),
            ("/v1/ui/", None),
        ];
        for name in ui::CROSS_ORIGIN_ROUTES {
            assert!(ROUTES.iter().any(|r| r.name == *name), "{name} is not in the table");
        }
        for (path, name) in cases {
            assert_eq!(row(path), name, "{path}");
        }
    }

    #[test]
    fn decode_is_strict() {
        assert_eq!(decode("a%2Fb%20c").as_deref(), Ok("a/b c"));
        assert_eq!(decode("%C3%A9").as_deref(), Ok("é"));
        assert_eq!(decode("%zz").map_err(|e| e.code), Err("invalid_request"));
        assert_eq!(decode("%4").map_err(|e| e.code), Err("invalid_request"));
        assert_eq!(decode("%FF").map_err(|e| e.code), Err("invalid_request"));
    }

    #[test]
    fn query_parameters_decode_and_may_not_repeat() {
        let q = parse_query("meter=a+b&from=1%2B1&&to").unwrap_or_default();
        assert_eq!(q.get("meter").map(String::as_str), Some("a b"));
        assert_eq!(q.get("from").map(String::as_str), Some("1+1"));
        assert_eq!(q.get("to").map(String::as_str), Some(""));
        let twice = parse_query("meter=a&meter=b").map_err(|e| e.message);
        assert_eq!(twice, Err("query parameter \"meter\" is given twice".to_string()));
    }
}
