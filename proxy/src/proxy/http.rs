//! Outbound HTTP: one request from a client pod to a Service, with Istio's
//! routing, timeouts and retries, answered and logged the way Envoy does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tokio::time::Instant as TokioInstant;

use super::body::{Exchange, RequestBody, ResponseBody, grpc_status};
use super::cluster::{ClientCluster, ClusterConfig, InFlight, UpstreamHold};
use super::route::{self, RequestView, RouteDecision, RouteError};
use super::{ConnContext, Shared};
use crate::lb::{self, PickContext};
use crate::resilience::breaker::Permit;
use crate::resilience::outlier::{AttemptResult, grpc_to_http};
use crate::resilience::pool::{AttemptEnv, EndpointPool, SendFailure, Sent, UpstreamProtocol};
use crate::resilience::retry::backoff;
use crate::state::AppProtocol;
use crate::telemetry::ResponseFlag;
use crate::telemetry::access_log::AccessLogEntry;
use crate::telemetry::stats::{
    ClusterStats, PROTOCOL_GRPC, PROTOCOL_HTTP, PeerLabels, RequestTelemetry,
};

/// Serves one downstream request.
pub async fn serve(
    shared: Arc<Shared>,
    conn: Arc<ConnContext>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    let mut entry = AccessLogEntry::new(
        SystemTime::now(),
        conn.source_workload.clone(),
        conn.source_namespace.clone(),
    );
    entry.method = Some(req.method().to_string());
    entry.path = Some(
        req.uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_string(), |p| p.to_string()),
    );
    entry.protocol = Some(match req.version() {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    });
    entry.downstream_remote_address = Some(conn.peer);
    entry.downstream_local_address = Some(conn.orig_dst.unwrap_or(conn.local));
    let authority = request_authority(&req);
    entry.authority = authority.clone();
    entry.user_agent = header_str(req.headers(), &header::USER_AGENT);
    entry.x_forwarded_for = header_str(req.headers(), &HeaderName::from_static("x-forwarded-for"));
    let request_id = match header_str(req.headers(), &X_REQUEST_ID) {
        Some(id) => id,
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            req.headers_mut().insert(
                X_REQUEST_ID,
                HeaderValue::from_str(&id).expect("uuid is a header value"),
            );
            id
        }
    };
    entry.request_id = Some(request_id);
    let is_grpc = is_grpc(req.headers());

    let mut exchange = Box::new(Exchange {
        entry,
        started,
        logger: shared.logger.clone(),
        request_body: None,
        done: false,
        telemetry: RequestTelemetry {
            series: conn.client_state.unrouted.clone(),
            peer: PeerLabels::unknown(),
            protocol: if is_grpc {
                PROTOCOL_GRPC
            } else {
                PROTOCOL_HTTP
            },
        },
    });

    // hyper's read buffer limit is approximate; Envoy's header limit is exact.
    if req.version() != http::Version::HTTP_2
        && head_size(&req) > shared.settings.max_request_headers_bytes
    {
        exchange
            .entry
            .response_flags
            .set(ResponseFlag::DownstreamProtocolError);
        let mut reply = local_reply(
            exchange,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "http1.headers_too_large",
            "",
            false,
        );
        reply
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(reply);
    }
    let snap = shared.snapshot.load_full();
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
    exchange.request_body = Some(body.replay());
    Ok(forward(
        &shared, &conn, &snap, parts, body, decision, exchange, is_grpc, on_upgrade,
    )
    .await)
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Arc<Shared>,
    conn: &Arc<ConnContext>,
    snap: &crate::state::Snapshot,
    parts: http::request::Parts,
    body: RequestBody,
    decision: RouteDecision,
    mut exchange: Box<Exchange>,
    is_grpc: bool,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ResponseBody> {
    let cluster_name: Arc<str> = Arc::from(decision.cluster_name());
    exchange.entry.upstream_cluster = Some(cluster_name.clone());
    let client_ns: &str = conn
        .client
        .as_ref()
        .map_or("default", |w| w.namespace.as_str());
    let cluster = shared
        .clusters
        .resolve(snap, conn, client_ns, &decision, cluster_name);
    let config = cluster.config().clone();
    let stats = &cluster.stats;
    exchange.telemetry.series = stats.requests.clone();
    exchange.telemetry.peer = config.peer.clone();
    let env = AttemptEnv {
        budgets: &cluster.budgets,
        limits: &config.limits,
        settings: &config.settings,
        stats,
        dialer: &conn.client_state.dialer,
    };
    let service_port = &decision.target.service.ports[decision.target.port_idx];
    let protocol = upstream_protocol(service_port.protocol, parts.version, &config);
    let deadline = decision
        .timeout
        .map(|t| TokioInstant::from_std(exchange.started + t));
    let retry = &decision.retry;
    let hash = lb::request_hash(
        config.lb_policy.as_ref(),
        &parts.headers,
        &parts.uri,
        conn.peer.ip(),
    );
    // Upgrades (WebSocket) are tunnels: one attempt, never replayed.
    let max_attempts = if on_upgrade.is_some() {
        1
    } else {
        1 + retry.attempts
    };
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(max_attempts as usize);
    let mut retry_permit: Option<Permit> = None;
    let mut attempt = 0;

    // `http2MaxRequests` bounds requests in flight to the cluster.
    let Some(request_permit) = cluster.budgets.try_request(&config.limits) else {
        ClusterStats::inc(&stats.upstream_rq_pending_overflow);
        return overflow_reply(exchange, is_grpc);
    };
    let mut request_permit = Some(request_permit);
    let mut cancelled = CancelGuard(Some(stats));

    // Starts the next attempt (after the back-off) when the outcome is
    // retriable and the budgets allow; otherwise falls through.
    macro_rules! retry_if {
        ($retriable:expr) => {
            if $retriable && retry.attempts > 0 {
                if let Some(permit) = next_attempt(
                    attempt,
                    max_attempts,
                    &body,
                    &mut exchange.entry,
                    deadline,
                    &cluster,
                    &config,
                )
                .await
                {
                    retry_permit = Some(permit);
                    continue;
                }
            }
        };
    }

    loop {
        attempt += 1;
        exchange.entry.upstream_request_attempt_count = attempt;
        let picked = if config.balancer.is_passthrough() {
            conn.orig_dst.map(Target::Passthrough)
        } else {
            config
                .balancer
                .pick(
                    &config.hosts,
                    &PickContext {
                        tried: &tried,
                        hash,
                    },
                )
                .map(Target::Host)
        };
        let Some(target) = picked else {
            cancelled.0 = None;
            exchange
                .entry
                .response_flags
                .set(ResponseFlag::NoHealthyUpstream);
            body.drain_available().await;
            return local_reply(
                exchange,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_upstream",
                "no healthy upstream",
                is_grpc,
            );
        };
        let (addr, pool, in_flight) = match target {
            Target::Host(i) => {
                let slot = &config.hosts[i].slot;
                exchange.telemetry.peer = config.hosts[i].peer.clone();
                (
                    slot.addr,
                    slot.pool.clone(),
                    Some(InFlight::start(slot.clone(), stats.clone())),
                )
            }
            Target::Passthrough(addr) => (addr, Arc::new(EndpointPool::new(addr)), None),
        };
        let host_index = match target {
            Target::Host(i) => Some(i),
            Target::Passthrough(_) => None,
        };
        tried.push(addr);
        exchange.entry.upstream_host = Some(addr);
        let upstream_req = upstream_request(
            &parts,
            body.replay(),
            protocol,
            exchange.entry.authority.as_deref(),
        );
        let attempt_started = Instant::now();
        let per_try_deadline = retry.per_try_timeout.map(|t| TokioInstant::now() + t);
        let try_deadline = match (deadline, per_try_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Written as soon as the connection exists, so a client abort mid-attempt still logs it.
        exchange.entry.upstream_local_address = None;
        let send = pool.send(
            &env,
            protocol,
            upstream_req,
            &mut exchange.entry.upstream_local_address,
        );
        let result = match try_deadline {
            Some(at) => tokio::time::timeout_at(at, send).await.ok(),
            None => Some(send.await),
        };
        // Envoy counts a request once it is attached to an upstream connection.
        if exchange.entry.upstream_local_address.is_some() {
            ClusterStats::inc(&stats.upstream_rq_total);
        }
        let record = |result: AttemptResult| {
            if let Some(i) = host_index {
                cluster.record(&config, i, result);
            }
        };

        let failure = match result {
            Some(Ok(sent)) => {
                let status = sent.response.status();
                stats.count_status(status.as_u16());
                let grpc = if is_grpc {
                    grpc_status(sent.response.headers())
                } else {
                    None
                };
                record(AttemptResult::ConnectSucceeded);
                // gRPC errors usually come trailers-only; otherwise the trailers decide (see UpstreamHold).
                let grpc_in_trailers = is_grpc && grpc.is_none() && status == StatusCode::OK;
                if !grpc_in_trailers {
                    record(AttemptResult::Status(
                        grpc.map_or(status.as_u16(), grpc_to_http),
                    ));
                }
                let retriable = retry.retry_on.retries_status(status.as_u16())
                    || grpc.is_some_and(|g| retry.retry_on.retries_grpc_status(g));
                retry_if!(retriable);
                if !retriable && attempt > 1 {
                    ClusterStats::inc(&stats.upstream_rq_retry_success);
                }
                drop(retry_permit);
                cancelled.0 = None;
                let hold = in_flight.map(|in_flight| UpstreamHold {
                    lease: None,
                    config: config.clone(),
                    cluster: cluster.clone(),
                    host: host_index.unwrap_or(0),
                    grpc_in_trailers,
                    request: request_permit.take(),
                    in_flight,
                });
                return upstream_response(
                    shared,
                    exchange,
                    sent,
                    attempt_started,
                    grpc,
                    deadline,
                    on_upgrade,
                    hold,
                );
            }
            None => {
                record(AttemptResult::Timeout);
                let global =
                    deadline.is_some_and(|d| try_deadline == Some(d) && TokioInstant::now() >= d);
                if global {
                    cancelled.0 = None;
                    ClusterStats::inc(&stats.upstream_rq_timeout);
                    exchange
                        .entry
                        .response_flags
                        .set(ResponseFlag::UpstreamRequestTimeout);
                    return local_reply(
                        exchange,
                        StatusCode::GATEWAY_TIMEOUT,
                        "response_timeout",
                        "upstream request timeout",
                        is_grpc,
                    );
                }
                ClusterStats::inc(&stats.upstream_rq_per_try_timeout);
                Failure {
                    flag: ResponseFlag::UpstreamRequestTimeout,
                    status: StatusCode::GATEWAY_TIMEOUT,
                    details: "upstream_per_try_timeout".into(),
                    body: "upstream request timeout".into(),
                    transport: None,
                    retriable: retry.retry_on.retries_per_try_timeout(),
                }
            }
            Some(Err(err)) => {
                match &err {
                    SendFailure::Connect(_) => record(AttemptResult::ConnectFailed),
                    SendFailure::Overflow => {}
                    _ => record(AttemptResult::Reset),
                }
                Failure::from_send(err, retry)
            }
        };
        drop(in_flight);
        retry_if!(failure.retriable);
        cancelled.0 = None;
        exchange.entry.response_flags.set(failure.flag);
        exchange.entry.upstream_transport_failure_reason = failure.transport.clone();
        // Count request bytes that already arrived, as Envoy (which reads them anyway) does.
        body.drain_available().await;
        let retried = attempt > 1;
        let text = if retried {
            failure
                .body
                .replacen("reset reason", "retried and the latest reset reason", 1)
        } else {
            failure.body
        };
        return local_reply(exchange, failure.status, &failure.details, &text, is_grpc);
    }
}

/// Where one attempt goes.
#[derive(Clone, Copy)]
enum Target {
    Host(usize),
    /// `PASSTHROUGH`: the connection's original destination.
    Passthrough(SocketAddr),
}

/// Counts `upstream_rq_cancelled` when the client leaves mid-request.
struct CancelGuard<'a>(Option<&'a Arc<ClusterStats>>);
impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if let Some(stats) = self.0 {
            ClusterStats::inc(&stats.upstream_rq_cancelled);
        }
    }
}

fn overflow_reply(mut exchange: Box<Exchange>, is_grpc: bool) -> Response<ResponseBody> {
    exchange
        .entry
        .response_flags
        .set(ResponseFlag::UpstreamOverflow);
    local_reply(
        exchange,
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_reset_before_response_started{overflow}",
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
        is_grpc,
    )
}

/// For a retriable outcome: takes a `maxRetries` slot and waits the back-off;
/// the slot is held for the retried attempt.
/// Otherwise marks `URX` if the retry budget (attempts or route deadline) ran
/// out. A body too large to replay abandons the retry without `URX`, as Envoy
/// does, and says so in the log; so does a full `maxRetries` budget (counted
/// as `upstream_rq_retry_overflow`).
async fn next_attempt(
    attempt: u32,
    max_attempts: u32,
    body: &RequestBody,
    entry: &mut AccessLogEntry,
    deadline: Option<TokioInstant>,
    cluster: &ClientCluster,
    config: &ClusterConfig,
) -> Option<Permit> {
    if attempt < max_attempts && !body.can_replay() {
        tracing::info!(
            request_id = entry.request_id.as_deref().unwrap_or("-"),
            cluster = entry.upstream_cluster.as_deref().unwrap_or("-"),
            "not retrying: the request body exceeded the {} KiB replay buffer",
            super::body::REPLAY_BUFFER_LIMIT / 1024
        );
        return None;
    }
    if attempt < max_attempts {
        let wake = TokioInstant::now() + backoff(attempt);
        if deadline.is_none_or(|d| wake < d) {
            let Some(permit) = cluster.budgets.try_retry(&config.limits) else {
                ClusterStats::inc(&cluster.stats.upstream_rq_retry_overflow);
                return None;
            };
            ClusterStats::inc(&cluster.stats.upstream_rq_retry);
            tokio::time::sleep_until(wake).await;
            return Some(permit);
        }
    }
    ClusterStats::inc(&cluster.stats.upstream_rq_retry_limit_exceeded);
    entry
        .response_flags
        .set(ResponseFlag::UpstreamRetryLimitExceeded);
    None
}

struct Failure {
    flag: ResponseFlag,
    status: StatusCode,
    details: String,
    body: String,
    transport: Option<String>,
    retriable: bool,
}

impl Failure {
    fn from_send(err: SendFailure, retry: &crate::state::RetryPolicy) -> Self {
        let on = &retry.retry_on;
        let reset = |reason: &str, transport: Option<String>| {
            let details = match &transport {
                Some(t) => format!("upstream_reset_before_response_started{{{reason}|{t}}}"),
                None => format!("upstream_reset_before_response_started{{{reason}}}"),
            };
            let mut body = format!(
                "upstream connect error or disconnect/reset before headers. reset reason: {}",
                reason.replace('_', " ")
            );
            if let Some(t) = &transport {
                body.push_str(", transport failure reason: ");
                body.push_str(&t.replace('_', " "));
            }
            (details, body)
        };
        match err {
            SendFailure::Connect(cf) => {
                let transport = cf.transport_failure_reason();
                let (details, body) = reset(cf.reset_reason(), transport.clone());
                Failure {
                    flag: ResponseFlag::UpstreamConnectionFailure,
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    details,
                    body,
                    transport,
                    retriable: on.retries_connect_failure(),
                }
            }
            SendFailure::ConnectionTermination(msg) => {
                tracing::debug!(%msg, "upstream connection ended before response");
                let (details, body) = reset("connection_termination", None);
                Failure {
                    flag: ResponseFlag::UpstreamConnectionTermination,
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    details,
                    body,
                    transport: None,
                    retriable: on.retries_reset(),
                }
            }
            SendFailure::RemoteReset { refused } => {
                let reason = if refused {
                    "remote_refused_stream_reset"
                } else {
                    "remote_reset"
                };
                let (details, body) = reset(reason, None);
                Failure {
                    flag: ResponseFlag::UpstreamRemoteReset,
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    details,
                    body,
                    transport: None,
                    retriable: if refused {
                        on.retries_refused_stream()
                    } else {
                        on.retries_reset()
                    },
                }
            }
            SendFailure::Overflow => {
                let (details, body) = reset("overflow", None);
                Failure {
                    flag: ResponseFlag::UpstreamOverflow,
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    details,
                    body,
                    transport: None,
                    // Envoy never retries an overflow.
                    retriable: false,
                }
            }
            SendFailure::Protocol(msg) => {
                tracing::debug!(%msg, "upstream protocol error");
                let (details, body) = reset("protocol_error", None);
                Failure {
                    flag: ResponseFlag::UpstreamProtocolError,
                    status: StatusCode::BAD_GATEWAY,
                    details,
                    body,
                    transport: None,
                    retriable: on.retries_reset(),
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn upstream_response(
    shared: &Arc<Shared>,
    mut exchange: Box<Exchange>,
    sent: Sent,
    attempt_started: Instant,
    grpc: Option<u32>,
    deadline: Option<TokioInstant>,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    mut hold: Option<UpstreamHold>,
) -> Response<ResponseBody> {
    let now = Instant::now();
    let Sent {
        mut response,
        local,
        lease,
    } = sent;
    let upstream_upgrade = (response.status() == StatusCode::SWITCHING_PROTOCOLS
        && on_upgrade.is_some())
    .then(|| hyper::upgrade::on(&mut response));
    let (mut parts, body) = response.into_parts();
    exchange.entry.response_code = parts.status.as_u16();
    exchange.entry.response_code_details = Some("via_upstream".into());
    exchange.entry.upstream_service_time = Some(now - attempt_started);
    exchange.entry.response_duration = Some(now - exchange.started);
    exchange.entry.upstream_local_address = Some(local);
    exchange.entry.grpc_status = grpc;
    if let (Some(downstream), Some(upstream)) = (on_upgrade, upstream_upgrade) {
        strip_hop_by_hop(&mut parts.headers, true);
        tokio::spawn(super::tunnel::splice_upgrade(
            downstream,
            upstream,
            exchange,
            shared.clone(),
            hold,
        ));
        return Response::from_parts(parts, ResponseBody::empty());
    }
    strip_hop_by_hop(&mut parts.headers, false);
    if let Some(h) = hold.as_mut() {
        h.lease = lease;
    }
    let deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
    Response::from_parts(
        parts,
        ResponseBody::upstream(body, exchange, deadline, hold),
    )
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
pub fn local_reply(
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

fn percent_encode_grpc_message(text: &str) -> HeaderValue {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// HTTP/2 and gRPC ports talk HTTP/2 upstream; HTTP ports HTTP/1.1; ports
/// whose protocol was sniffed keep the client's protocol (Istio's
/// `USE_DOWNSTREAM_PROTOCOL`).
fn upstream_protocol(
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
fn upstream_request(
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
            if let Some(a) = authority
                && !headers.contains_key(header::HOST)
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
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
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
