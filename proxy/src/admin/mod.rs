//! Admin API (loopback by default), in the spirit of Envoy's: readiness, the
//! loaded configuration with each client cluster's effective policy, cluster
//! stats in Envoy's text form (or JSON), endpoints as `istioctl proxy-config
//! endpoint` shows them, counter reset and the log level. A second, minimal
//! listener answers readiness probes only (Istio's port 15021).
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /ready`, `GET /healthz/ready` | `200 LIVE` once serving every pod to enroll, else `503 NOT READY` |
//! | `GET /healthz/live` | `200 LIVE` |
//! | `GET /config_dump` | JSON: generation, reload error, object counts, per client cluster the effective policy and its DestinationRule |
//! | `GET /stats[?filter=RE][&source=W][&format=json]` | `cluster.<name>.<stat>: <value>` lines, summed over client pods |
//! | `POST /reset_counters` | zeroes counters (gauges keep their value) |
//! | `GET /endpoints[?cluster=NAME][&source=W][&format=json]` | `ENDPOINT STATUS OUTLIER CHECK CLUSTER SOURCE` |
//! | `POST /logging?level=LEVEL` | changes the log filter at run time |
//!
//! Metrics for Prometheus are served on their own port (`--metrics-addr`).

pub mod cli;
mod dump;
pub mod logging;
pub mod metrics;
pub mod query;
mod stats;
mod table;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::net::accept_loop;
use crate::proxy::Proxy;
use crate::status::ConfigStatus;

pub use query::{Query, percent_encode};
pub use table::render_table;
/// The draining signal [`serve_readiness`] takes.
pub use tokio_util::sync::CancellationToken;

/// What the admin API serves, for `GET /help` and unknown paths.
const HELP: &str = "\
admin commands are:
  GET  /ready, /healthz/ready       readiness (every pod to enroll is served)
  GET  /healthz/live                liveness
  GET  /redirect                    eBPF data path: attached programs and their ids, enrolled pods (JSON)
  GET  /config_dump                 configuration and each client cluster's effective policy (JSON)
  GET  /stats                       cluster stats, Envoy text form; ?filter=REGEX ?source=WORKLOAD ?format=json
  POST /reset_counters              zero all counters (gauges keep their value)
  GET  /endpoints                   endpoints and their outlier state; ?cluster=NAME ?source=WORKLOAD ?format=json
  POST /logging?level=LEVEL         change the log level (error, warn, info, debug, trace, or a tracing filter)
";

pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    status: Arc<ConfigStatus>,
    shutdown: CancellationToken,
) {
    serve_http(listener, "admin", Some(shutdown), move |req| {
        let reply = handle(&req, &proxy, &status);
        async move { reply }
    })
    .await;
}

/// Readiness probes only (`GET /healthz/ready`, also `/ready`), for a
/// listener reachable by the kubelet (Istio's `0.0.0.0:15021`) while the
/// admin API stays on loopback. Answers `503 DRAINING` once `draining` is
/// cancelled (SIGTERM), so the endpoint leaves Services before the process
/// stops.
pub async fn serve_readiness(
    listener: TcpListener,
    status: Arc<ConfigStatus>,
    draining: CancellationToken,
) {
    serve_http(
        listener,
        "readiness",
        None,
        move |req: Request<Incoming>| {
            let reply = match (req.method(), req.uri().path()) {
                (&Method::GET | &Method::HEAD, "/healthz/ready" | "/ready") => {
                    readiness(&status, draining.is_cancelled())
                }
                // Liveness: the process serves HTTP (readiness may be off
                // for a while, e.g. a pod that cannot be enrolled).
                (&Method::GET | &Method::HEAD, "/healthz/live") => text(StatusCode::OK, "LIVE\n"),
                _ => text(
                    StatusCode::NOT_FOUND,
                    "readiness: GET /healthz/ready; liveness: GET /healthz/live\n",
                ),
            };
            async move { reply }
        },
    )
    .await;
}

/// `200 LIVE` once serving every pod it should (see [`ConfigStatus::ready`]),
/// `503 NOT READY` before, `503 DRAINING` from SIGTERM on.
fn readiness(status: &ConfigStatus, draining: bool) -> Response<Full<Bytes>> {
    if draining {
        text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
    } else if status.is_ready() {
        text(StatusCode::OK, "LIVE\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "NOT READY\n")
    }
}

/// How long the admin, metrics and readiness servers wait for a request's
/// headers (a silent or half-sent connection is closed after it).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 on `listener`, each request answered by `handle`, until
/// `stop` is cancelled (`None`: for the life of the process).
async fn serve_http<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    stop: Option<CancellationToken>,
    handle: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    accept_loop(listener, what, stop, move |stream, _| {
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let reply = handle(req);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    })
    .await;
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn text(code: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    reply(code, "text/plain; charset=utf-8", body.into())
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "application/json", format!("{value:#}\n"))
}

/// Whether a request may use the admin API from where it came: its `Host`
/// must be an IP address or `localhost` (a web page that rebinds its own
/// DNS name to 127.0.0.1 sends its name), and a state-changing `POST` must
/// not come from a web page (browsers send `Origin` with those; the CLI and
/// scripts do not).
fn browser_guard(req: &Request<Incoming>) -> Result<(), &'static str> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.parse::<http::uri::Authority>().ok());
    let host_ok = match host {
        // HTTP/1.0 without Host: not a browser.
        None => true,
        Some(None) => false,
        Some(Some(authority)) => {
            let name = authority.host();
            name.eq_ignore_ascii_case("localhost")
                || name.parse::<std::net::IpAddr>().is_ok()
                || name
                    .strip_prefix('[')
                    .and_then(|n| n.strip_suffix(']'))
                    .is_some_and(|n| n.parse::<std::net::Ipv6Addr>().is_ok())
        }
    };
    if !host_ok {
        return Err(
            "the admin API answers only requests addressed to an IP address or localhost\n",
        );
    }
    if req.method() == Method::POST && req.headers().contains_key(http::header::ORIGIN) {
        return Err("the admin API does not take POST requests from web pages\n");
    }
    Ok(())
}

fn handle(req: &Request<Incoming>, proxy: &Proxy, status: &ConfigStatus) -> Response<Full<Bytes>> {
    if let Err(why) = browser_guard(req) {
        return text(StatusCode::FORBIDDEN, why);
    }
    let query = Query::parse(req.uri().query());
    let method = req.method();
    let get = method == Method::GET || method == Method::HEAD;
    match req.uri().path() {
        "/ready" | "/healthz/ready" if get => readiness(status, false),
        "/healthz/live" if get => text(StatusCode::OK, "LIVE\n"),
        "/" | "/help" if get => text(StatusCode::OK, HELP),
        "/config_dump" if get => json(&dump::config_dump(proxy, status)),
        "/redirect" if get => json(
            &serde_json::to_value(&*status.redirect.lock().expect("status lock"))
                .unwrap_or_default(),
        ),
        "/stats" if get => {
            let filter = match query.regex("filter") {
                Ok(f) => f,
                Err(err) => return text(StatusCode::BAD_REQUEST, err),
            };
            let source = query.get("source");
            match query.get("format") {
                None | Some("text") => {
                    text(StatusCode::OK, stats::text(proxy, source, filter.as_ref()))
                }
                Some("json") => json(&stats::json(proxy, source, filter.as_ref())),
                Some(other) => text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown format {other:?}; use text or json\n"),
                ),
            }
        }
        "/endpoints" if get => {
            let rows = stats::endpoint_rows(proxy, query.get("cluster"), query.get("source"));
            match query.get("format") {
                None | Some("text") => text(StatusCode::OK, stats::endpoints_text(&rows)),
                Some("json") => json(&stats::endpoints_json(&rows)),
                Some(other) => text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown format {other:?}; use text or json\n"),
                ),
            }
        }
        "/reset_counters" if method == Method::POST => {
            stats::reset_counters(proxy);
            text(StatusCode::OK, "OK\n")
        }
        "/logging" if method == Method::POST => match query.get("level") {
            None => match logging::current() {
                Some(level) => text(StatusCode::OK, format!("active level: {level}\n")),
                None => text(StatusCode::SERVICE_UNAVAILABLE, logging::NOT_INITIALISED),
            },
            Some(level) => match logging::set(level) {
                Ok(()) => text(StatusCode::OK, format!("active level: {level}\n")),
                Err(logging::SetError::NotInitialised) => {
                    text(StatusCode::SERVICE_UNAVAILABLE, logging::NOT_INITIALISED)
                }
                Err(logging::SetError::Invalid(err)) => text(
                    StatusCode::BAD_REQUEST,
                    format!("invalid level {level:?}: {err}\n"),
                ),
            },
        },
        "/reset_counters" | "/logging" => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "this operation requires a POST\n",
        ),
        "/ready" | "/healthz/ready" | "/" | "/help" | "/config_dump" | "/stats" | "/endpoints"
        | "/redirect" => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "this operation requires a GET\n",
        ),
        _ => text(StatusCode::NOT_FOUND, format!("not found\n{HELP}")),
    }
}
