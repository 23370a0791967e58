//! Outbound HTTP: one request from a client pod to a Service. This file
//! reads the request (access-log fields, `x-request-id`, header limits),
//! routes it, and builds the messages on both sides (the upstream request's
//! form, local replies in Envoy's words); `forward` runs its attempts.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use super::forward::{RoutedRequest, forward};
use crate::proxy::body::{Exchange, RequestBody, ResponseBody};
use crate::proxy::clients::ClusterConfig;
use crate::proxy::route::{self, RequestView, RouteError};
use crate::proxy::upstream::UpstreamProtocol;
use crate::proxy::{ConnContext, Proxy};
use crate::resilience::overload::Admitted;
use crate::state::AppProtocol;
use crate::telemetry::ResponseFlag;
use crate::telemetry::access_log::AccessLogEntry;
use crate::telemetry::stats::{PROTOCOL_GRPC, PROTOCOL_HTTP, PeerLabels, RequestTelemetry};

/// Serves one downstream request.
pub async fn serve_request(
    proxy: Arc<Proxy>,
    conn: Arc<ConnContext>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    let mut entry = AccessLogEntry::new(
        SystemTime::now(),
        conn.source_workload.clone(),
        conn.source_namespace.clone(),
    );
    // Fields only the access log shows are not built when it is off.
    let logging = proxy.logger.is_enabled();
    if logging {
        entry.method = Some(req.method().to_string());
        entry.path = Some(
            req.uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_string(), |p| p.to_string()),
        );
        entry.user_agent = header_str(req.headers(), &header::USER_AGENT);
        entry.x_forwarded_for =
            header_str(req.headers(), &HeaderName::from_static("x-forwarded-for"));
    }
    entry.protocol = Some(match req.version() {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    });
    entry.downstream_remote_address = Some(conn.peer);
    entry.downstream_local_address = Some(conn.orig_dst.unwrap_or(conn.local));
    let authority = request_authority(&req);
    entry.authority = authority.clone();
    // Envoy adds an `x-request-id` to requests without one, logged or not.
    entry.request_id = if req.headers().contains_key(&X_REQUEST_ID) {
        logging
            .then(|| header_str(req.headers(), &X_REQUEST_ID))
            .flatten()
    } else {
        let id = uuid::Uuid::new_v4().to_string();
        req.headers_mut().insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&id).expect("uuid is a header value"),
        );
        logging.then_some(id)
    };
    let is_grpc = is_grpc(req.headers());

    let mut exchange = Box::new(Exchange {
        entry,
        started,
        logger: proxy.logger.clone(),
        request_body: None,
        done: false,
        resets: Some(conn.resets.clone()),
        telemetry: RequestTelemetry {
            series: conn.client_pod.unrouted.clone(),
            peer: PeerLabels::unknown(),
            protocol: if is_grpc {
                PROTOCOL_GRPC
            } else {
                PROTOCOL_HTTP
            },
        },
        admission: None,
    });
    match proxy.overload.admit_request(&conn.client_pod.downstream) {
        Ok(admission) => exchange.admission = Some(admission),
        Err(why) => {
            return Ok(overloaded(
                exchange,
                Admitted::Request.details(why),
                is_grpc,
            ));
        }
    }

    // hyper's read buffer limit is approximate; Envoy's header limit is exact.
    if req.version() != http::Version::HTTP_2
        && head_size(&req) > proxy.settings.max_request_headers_bytes
    {
        return Ok(protocol_error(
            exchange,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "http1.headers_too_large",
            false,
        ));
    }
    // RFC 9112 §3.2: more than one Host makes the request invalid.
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Ok(protocol_error(
            exchange,
            StatusCode::BAD_REQUEST,
            "http1.codec_error",
            is_grpc,
        ));
    }
    // Envoy's routes match on paths, which CONNECT has none of: `404 NR`
    // (tunnelling through the mesh is not offered).
    if req.method() == http::Method::CONNECT {
        return Ok(no_route(exchange, is_grpc));
    }
    let snap = proxy.snapshot.load_full();
    let client_ns: &str = conn
        .client
        .as_ref()
        .map_or("default", |w| w.namespace.as_str());
    let target = match &conn.vip_target {
        Some(t) => Some(t.clone()),
        None => authority
            .as_deref()
            .and_then(|a| route::target_for_authority(&snap, a, client_ns)),
    };
    let Some(target) = target else {
        return Ok(no_route(exchange, is_grpc));
    };

    let on_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let view = RequestView {
        parts: &parts,
        authority: authority.as_deref().unwrap_or(""),
        port: target.port(),
        client: conn.client.as_deref(),
        client_ns,
    };
    let decision = match route::route(&snap, &target, &view) {
        Ok(d) => d,
        Err(RouteError::NoRoute) => {
            return Ok(no_route(exchange, is_grpc));
        }
        Err(RouteError::NoCluster {
            cluster,
            route_name,
        }) => {
            tracing::debug!(%cluster, "route destination is not a known cluster");
            exchange.entry.route_name = route_name;
            exchange
                .entry
                .response_flags
                .set(ResponseFlag::NoClusterFound);
            return Ok(local_reply(
                exchange,
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster_not_found",
                "",
                is_grpc,
            ));
        }
    };
    exchange.entry.route_name = decision.route_name.clone();
    let body = RequestBody::new(body);
    exchange.request_body = body.progress();
    let request = RoutedRequest {
        parts,
        body,
        decision,
        exchange,
        is_grpc,
        on_upgrade,
    };
    // Boxed: the attempt loop's future is several KiB; inline, it made this
    // request's future 8.8 KiB, which hyper and the service wrapper copy
    // (memmove was ~8% of the proxy's CPU). Boxed, it is 1.7 KiB.
    Ok(Box::pin(forward(&proxy, &conn, &snap, request)).await)
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A malformed request (`DPE`): answered, and the connection closed.
fn protocol_error(
    mut exchange: Box<Exchange>,
    status: StatusCode,
    details: &str,
    is_grpc: bool,
) -> Response<ResponseBody> {
    exchange
        .entry
        .response_flags
        .set(ResponseFlag::DownstreamProtocolError);
    let mut reply = local_reply(exchange, status, details, "", is_grpc);
    reply
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    reply
}

/// `503` with `OM`, as Envoy's overload manager answers: a downstream cap or
/// memory pressure refused the request.
fn overloaded(mut exchange: Box<Exchange>, details: &str, is_grpc: bool) -> Response<ResponseBody> {
    exchange
        .entry
        .response_flags
        .set(ResponseFlag::OverloadManager);
    let mut reply = local_reply(
        exchange,
        StatusCode::SERVICE_UNAVAILABLE,
        details,
        "envoy overloaded",
        is_grpc,
    );
    reply.headers_mut().insert(
        HeaderName::from_static("x-envoy-overloaded"),
        HeaderValue::from_static("true"),
    );
    reply
}

/// `404` with `NR`: nothing this client may reach answers to that name.
fn no_route(mut exchange: Box<Exchange>, is_grpc: bool) -> Response<ResponseBody> {
    exchange
        .entry
        .response_flags
        .set(ResponseFlag::NoRouteFound);
    local_reply(
        exchange,
        StatusCode::NOT_FOUND,
        "route_not_found",
        "",
        is_grpc,
    )
}

/// A reply made by the proxy. gRPC requests get HTTP 200 with the mapped
/// `grpc-status` (trailers-only), as Envoy does, and are logged as 200.
pub(super) fn local_reply(
    mut exchange: Box<Exchange>,
    status: StatusCode,
    details: &str,
    text: &str,
    is_grpc: bool,
) -> Response<ResponseBody> {
    exchange.entry.response_code_details = Some(details.to_string());
    exchange.entry.response_duration = None;
    let mut builder = Response::builder();
    let body = if is_grpc {
        let code = http_to_grpc_status(status);
        exchange.entry.response_code = 200;
        exchange.entry.grpc_status = Some(code);
        builder = builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", code.to_string())
            .header("grpc-message", percent_encode_grpc_message(text));
        Bytes::new()
    } else {
        exchange.entry.response_code = status.as_u16();
        builder = builder.status(status);
        if !text.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, "text/plain");
        }
        Bytes::from(text.to_string())
    };
    builder
        .body(ResponseBody::local(body, Some(exchange)))
        .expect("local reply is valid")
}

/// Envoy's HTTP → gRPC status mapping for local replies.
pub fn http_to_grpc_status(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

fn percent_encode_grpc_message(text: &str) -> HeaderValue {
    let encoded = utf8_percent_encode(text, GRPC_MESSAGE).to_string();
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// HTTP/2 and gRPC ports talk HTTP/2 upstream; HTTP ports HTTP/1.1; ports
/// whose protocol was sniffed keep the client's protocol (Istio's
/// `USE_DOWNSTREAM_PROTOCOL`).
pub(super) fn upstream_protocol(
    port: AppProtocol,
    downstream: http::Version,
    config: &ClusterConfig,
) -> UpstreamProtocol {
    match port {
        AppProtocol::Http2 | AppProtocol::Grpc => UpstreamProtocol::Http2,
        AppProtocol::Http if config.settings.h2_upgrade => UpstreamProtocol::Http2,
        AppProtocol::Http => UpstreamProtocol::Http1,
        AppProtocol::Tcp | AppProtocol::Unknown => {
            if downstream == http::Version::HTTP_2 {
                UpstreamProtocol::Http2
            } else {
                UpstreamProtocol::Http1
            }
        }
    }
}

/// Builds the request for one attempt in the upstream protocol's form.
pub(super) fn upstream_request(
    parts: &http::request::Parts,
    body: RequestBody,
    protocol: UpstreamProtocol,
    authority: Option<&str>,
) -> Request<RequestBody> {
    let mut headers = parts.headers.clone();
    let upgrade = headers.contains_key(header::UPGRADE) && protocol == UpstreamProtocol::Http1;
    strip_hop_by_hop(&mut headers, upgrade);
    headers.remove(header::EXPECT);
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let (uri, version) = match protocol {
        UpstreamProtocol::Http1 => {
            // An absolute-form target's authority replaces any Host (RFC
            // 9112 §3.2.2); otherwise a missing Host is filled in.
            let absolute_form = parts.uri.authority().is_some();
            if let Some(a) = authority
                && (absolute_form || !headers.contains_key(header::HOST))
                && let Ok(v) = HeaderValue::from_str(a)
            {
                headers.insert(header::HOST, v);
            }
            (
                path.parse::<Uri>()
                    .unwrap_or_else(|_| Uri::from_static("/")),
                http::Version::HTTP_11,
            )
        }
        UpstreamProtocol::Http2 => {
            headers.remove(header::HOST);
            let uri = Uri::builder()
                .scheme("http")
                .authority(authority.unwrap_or("localhost"))
                .path_and_query(path)
                .build()
                .unwrap_or_else(|_| Uri::from_static("/"));
            (uri, http::Version::HTTP_2)
        }
    };
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    req
}

/// Removes connection-specific headers (RFC 9110 §7.6.1); keeps `te: trailers`
/// for gRPC and the upgrade pair for tunnels.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove(HeaderName::from_static("keep-alive"));
    headers.remove(HeaderName::from_static("proxy-connection"));
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::PROXY_AUTHORIZATION);
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Bytes of the request line and header block as they came on the wire.
fn head_size(req: &Request<Incoming>) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri
            .authority()
            .map_or(0, |a| a.as_str().len() + "http://".len());
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    req.headers()
        .iter()
        .fold(line + 2, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// `:authority`, the absolute-form URI's authority, or `Host`.
fn request_authority(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| header_str(req.headers(), &header::HOST))
}

fn header_str(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}
