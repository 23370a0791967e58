//! The attempt loop of one HTTP request, as a small state machine:
//!
//! ```text
//! Forwarder::start ── http2MaxRequests permit (else 503 UO)
//!   └─ loop: begin_attempt   pick an endpoint not tried yet (else 503 UH)
//!            send            check out or connect, send, wait for headers,
//!                            bounded by the route timeout and perTryTimeout;
//!                            classify the result into an `Outcome` (stats
//!                            and outlier detection see it)
//!            retry_decision  the one place that decides on a retry:
//!                            retryOn, attempts, replay buffer, maxRetries,
//!                            route deadline
//!              ├─ retry:  drop the attempt, back off, loop
//!              └─ answer: the upstream response, or the local reply
//! ```
//!
//! What the request holds, and when it lets go: the `http2MaxRequests`
//! [`Permit`] and the endpoint's [`InFlight`] move into the response's
//! [`UpstreamHold`] and are released when its body ends (for `PASSTHROUGH`,
//! which has no endpoint state, the permit goes when the headers arrive); a
//! `maxRetries` permit is held from a retry's decision until the next retry's
//! back-off ends or the request is answered; an abandoned attempt drops its
//! connection (a lease not released is closed).
//! If the client goes away, the future is dropped and [`CancelGuard`] counts
//! `upstream_rq_cancelled`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant as TokioInstant;

use super::http::{local_reply, strip_hop_by_hop, upstream_protocol, upstream_request};
use super::tunnel::splice_upgrade;
use crate::lb::{self, PickContext};
use tokio_util::sync::CancellationToken;

use crate::proxy::body::{
    ClientBodyFailure, Exchange, REPLAY_BUFFER_LIMIT, RequestBody, ResponseBody, grpc_status,
};
use crate::proxy::clients::{ClientCluster, ClusterConfig, InFlight, UpstreamHold};
use crate::proxy::route::RouteDecision;
use crate::proxy::upstream::{AttemptEnv, EndpointPool, SendFailure, Sent, UpstreamProtocol};
use crate::proxy::{ConnContext, Proxy};
use crate::resilience::breaker::Permit;
use crate::resilience::outlier::{AttemptResult, grpc_to_http};
use crate::resilience::retry::backoff;
use crate::state::{RetryPolicy, Snapshot};
use crate::telemetry::ResponseFlag;
use crate::telemetry::stats::ClusterStats;

/// A request that has been routed, ready for its attempts.
pub(super) struct RoutedRequest {
    pub parts: http::request::Parts,
    pub body: RequestBody,
    pub decision: RouteDecision,
    pub exchange: Box<Exchange>,
    pub is_grpc: bool,
    /// Set for an HTTP/1.1 Upgrade (WebSocket): one attempt, then a tunnel.
    pub on_upgrade: Option<OnUpgrade>,
}

/// Sends a routed request to its cluster, retrying as its route says, and
/// returns what the client gets.
pub(super) async fn forward(
    proxy: &Proxy,
    conn: &ConnContext,
    snap: &Snapshot,
    request: RoutedRequest,
) -> Response<ResponseBody> {
    let mut fwd = match Forwarder::start(proxy, conn, snap, request) {
        Ok(fwd) => fwd,
        Err(Overflow { exchange, is_grpc }) => return overflow_reply(exchange, is_grpc),
    };
    loop {
        let Some(mut attempt) = fwd.begin_attempt() else {
            return fwd.no_healthy_upstream().await;
        };
        let outcome = fwd.send(&mut attempt).await;
        if let Some(retry) = fwd.retry_decision(&outcome) {
            // The abandoned attempt lets go of its endpoint and connection now.
            drop((attempt, outcome));
            fwd.back_off(retry).await;
            continue;
        }
        return fwd.answer(attempt, outcome).await;
    }
}

/// One request on its way upstream: what every attempt shares.
struct Forwarder<'a> {
    conn: &'a ConnContext,
    parts: http::request::Parts,
    body: RequestBody,
    exchange: Box<Exchange>,
    is_grpc: bool,
    on_upgrade: Option<OnUpgrade>,
    /// For an upgrade: when a draining proxy closes the tunnel.
    drain_deadline: Option<CancellationToken>,
    retry: RetryPolicy,
    cluster: Arc<ClientCluster>,
    config: Arc<ClusterConfig>,
    protocol: UpstreamProtocol,
    /// The route's `timeout`, counted from the request's arrival.
    deadline: Option<TokioInstant>,
    /// Envoy's stream idle timeout (`None`: disabled).
    stream_idle: Option<Duration>,
    /// Consistent-hash key of the request, if the cluster hashes.
    hash: Option<u64>,
    max_attempts: u32,
    /// Attempts started so far (1 during the first).
    attempt: u32,
    /// Endpoints tried, so retries go elsewhere when they can.
    tried: Vec<SocketAddr>,
    /// `http2MaxRequests` slot; moves into the response's hold.
    request_permit: Option<Permit>,
    /// `maxRetries` slot of the latest retry.
    retry_permit: Option<Permit>,
    cancelled: CancelGuard,
}

/// Where one attempt goes, and what it holds while it runs.
struct Attempt {
    /// Index of the endpoint in the cluster's hosts; `None` for `PASSTHROUGH`.
    host: Option<usize>,
    pool: Arc<EndpointPool>,
    in_flight: Option<InFlight>,
    started: Instant,
    /// The earlier of the route deadline and this try's `perTryTimeout`.
    deadline: Option<TokioInstant>,
}

/// A request refused at the start: `http2MaxRequests` is reached.
struct Overflow {
    exchange: Box<Exchange>,
    is_grpc: bool,
}

/// What one attempt came to. It lives for one step of the loop; boxing the
/// response would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// Response headers arrived.
    Response {
        sent: Sent,
        grpc: Option<u32>,
        /// A gRPC status may still come in trailers (outlier detection waits).
        grpc_in_trailers: bool,
        retriable: bool,
    },
    /// The route's own timeout elapsed: answered at once, never retried.
    RouteTimeout,
    /// No response headers: connect failure, reset, per-try timeout, overflow.
    Failed(Failure),
    /// The client's request body failed (it left, or sent a malformed
    /// chunk): the client's fault, never retried, not held against the
    /// endpoint.
    ClientFailed(ClientBodyFailure),
    /// Nothing moved in either direction for the stream idle timeout.
    StreamIdle,
}

impl Outcome {
    fn retriable(&self) -> bool {
        match self {
            Outcome::Response { retriable, .. } => *retriable,
            Outcome::RouteTimeout | Outcome::ClientFailed(_) | Outcome::StreamIdle => false,
            Outcome::Failed(failure) => failure.retriable,
        }
    }
}

/// A retry that was granted: the `maxRetries` slot and when to start.
struct Retry {
    permit: Permit,
    wake: TokioInstant,
}

impl<'a> Forwarder<'a> {
    /// Resolves the client's cluster and takes the `http2MaxRequests` slot;
    /// without one the request overflows (`503 UO`).
    fn start(
        proxy: &Proxy,
        conn: &'a ConnContext,
        snap: &Snapshot,
        request: RoutedRequest,
    ) -> Result<Self, Overflow> {
        let RoutedRequest {
            parts,
            body,
            decision,
            mut exchange,
            is_grpc,
            on_upgrade,
        } = request;
        let cluster_name: Arc<str> = decision.cluster_name();
        exchange.entry.upstream_cluster = Some(cluster_name.clone());
        let client_ns: &str = conn
            .client
            .as_ref()
            .map_or("default", |w| w.namespace.as_str());
        let cluster = proxy
            .clients
            .resolve(snap, conn, client_ns, &decision, cluster_name);
        let config = Arc::clone(&cluster.config());
        exchange.telemetry.series = cluster.stats.requests.clone();
        exchange.telemetry.peer = config.peer.clone();
        let service_port = &decision.target.service.ports[decision.target.port_idx];
        let protocol = upstream_protocol(service_port.protocol, parts.version, &config);
        let deadline = decision
            .timeout
            .map(|t| TokioInstant::from_std(exchange.started + t));
        let hash = lb::request_hash(
            config.lb_policy.as_ref(),
            &parts.headers,
            &parts.uri,
            conn.peer.ip(),
        );
        let retry = decision.retry;
        // Upgrades (WebSocket) are tunnels: one attempt, never replayed.
        let max_attempts = if on_upgrade.is_some() {
            1
        } else {
            retry.attempts.saturating_add(1)
        };
        let Some(request_permit) = cluster.budgets.try_request(&config.limits) else {
            ClusterStats::inc(&cluster.stats.upstream_rq_pending_overflow);
            return Err(Overflow { exchange, is_grpc });
        };
        let cancelled = CancelGuard(Some(cluster.stats.clone()));
        Ok(Forwarder {
            conn,
            parts,
            body,
            exchange,
            is_grpc,
            drain_deadline: on_upgrade.as_ref().map(|_| proxy.drain_deadline.clone()),
            on_upgrade,
            retry,
            cluster,
            config,
            protocol,
            deadline,
            stream_idle: proxy.settings.stream_idle(),
            hash,
            max_attempts,
            attempt: 0,
            tried: Vec::new(),
            request_permit: Some(request_permit),
            retry_permit: None,
            cancelled,
        })
    }

    /// Picks the endpoint of the next attempt; `None` when none is healthy.
    fn begin_attempt(&mut self) -> Option<Attempt> {
        self.attempt += 1;
        self.exchange.entry.upstream_request_attempt_count = self.attempt;
        let config = &self.config;
        let (addr, host, pool, in_flight) = if config.balancer.is_passthrough() {
            let addr = self.conn.orig_dst?;
            (addr, None, Arc::new(EndpointPool::new(addr)), None)
        } else {
            let index = config.balancer.pick(
                &config.hosts,
                &PickContext {
                    tried: &self.tried,
                    hash: self.hash,
                },
            )?;
            let chosen = &config.hosts[index];
            self.exchange.telemetry.peer = chosen.peer.clone();
            let in_flight = InFlight::start(chosen.slot.clone(), self.cluster.stats.clone());
            (
                chosen.slot.addr,
                Some(index),
                chosen.slot.pool.clone(),
                Some(in_flight),
            )
        };
        self.tried.push(addr);
        self.exchange.entry.upstream_host = Some(addr);
        let per_try_deadline = self.retry.per_try_timeout.map(|t| TokioInstant::now() + t);
        let deadline = match (self.deadline, per_try_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Some(Attempt {
            host,
            pool,
            in_flight,
            started: Instant::now(),
            deadline,
        })
    }

    /// Runs one attempt up to response headers, then classifies it: the
    /// cluster's stats and outlier detection see every result.
    async fn send(&mut self, attempt: &mut Attempt) -> Outcome {
        let request = upstream_request(
            &self.parts,
            self.body.replay(),
            self.protocol,
            self.exchange.entry.authority.as_deref(),
        );
        let stats = &self.cluster.stats;
        let env = AttemptEnv {
            budgets: &self.cluster.budgets,
            limits: &self.config.limits,
            settings: &self.config.settings,
            stats,
            dialer: &self.conn.client_pod.dialer,
        };
        // Written as soon as the connection exists, so a client abort mid-attempt still logs it.
        self.exchange.entry.upstream_local_address = None;
        let send = attempt.pool.send(
            &env,
            self.protocol,
            request,
            &mut self.exchange.entry.upstream_local_address,
        );
        let send = async {
            match attempt.deadline {
                Some(at) => tokio::time::timeout_at(at, send).await.ok(),
                None => Some(send.await),
            }
        };
        let result = match self.stream_idle {
            None => send.await,
            Some(idle) => {
                let since = self.exchange.started;
                tokio::select! {
                    result = send => result,
                    () = stream_idle(&self.body, since, idle) => return Outcome::StreamIdle,
                }
            }
        };
        // Envoy counts a request once it is attached to an upstream connection.
        if self.exchange.entry.upstream_local_address.is_some() {
            ClusterStats::inc(&stats.upstream_rq_total);
        }
        let record = |result: AttemptResult| {
            if let Some(index) = attempt.host {
                self.cluster.record(&self.config, index, result);
            }
        };
        let on = &self.retry.retry_on;
        match result {
            Some(Ok(sent)) => {
                let status = sent.response.status();
                stats.count_status(status.as_u16());
                let grpc = if self.is_grpc {
                    grpc_status(sent.response.headers())
                } else {
                    None
                };
                record(AttemptResult::ConnectSucceeded);
                // gRPC errors usually come trailers-only; otherwise the trailers decide (see UpstreamHold).
                let grpc_in_trailers = self.is_grpc && grpc.is_none() && status == StatusCode::OK;
                if !grpc_in_trailers {
                    record(AttemptResult::Status(
                        grpc.map_or(status.as_u16(), grpc_to_http),
                    ));
                }
                let retriable = on.retries_status(status.as_u16())
                    || grpc.is_some_and(|g| on.retries_grpc_status(g));
                Outcome::Response {
                    sent,
                    grpc,
                    grpc_in_trailers,
                    retriable,
                }
            }
            None => {
                record(AttemptResult::Timeout);
                let route_deadline = self
                    .deadline
                    .is_some_and(|d| attempt.deadline == Some(d) && TokioInstant::now() >= d);
                if route_deadline {
                    return Outcome::RouteTimeout;
                }
                ClusterStats::inc(&stats.upstream_rq_per_try_timeout);
                Outcome::Failed(Failure {
                    flag: ResponseFlag::UpstreamRequestTimeout,
                    status: StatusCode::GATEWAY_TIMEOUT,
                    details: "upstream_per_try_timeout".into(),
                    body: "upstream request timeout".into(),
                    transport: None,
                    retriable: on.retries_per_try_timeout(),
                })
            }
            Some(Err(err)) => {
                if let Some(failure) = self.body.client_failure() {
                    tracing::debug!(?err, "attempt ended by the client's request body");
                    return Outcome::ClientFailed(failure);
                }
                match &err {
                    SendFailure::Connect(_) => record(AttemptResult::ConnectFailed),
                    SendFailure::Overflow => {}
                    _ => record(AttemptResult::Reset),
                }
                Outcome::Failed(Failure::from_send(err, &self.retry))
            }
        }
    }

    /// Whether a retriable outcome is retried: attempts left, a body that
    /// can be replayed, a free `maxRetries` slot (else
    /// `upstream_rq_retry_overflow`) and a back-off that ends before the
    /// route deadline. Out of attempts or time marks `URX`; a body too large
    /// to replay gives up without `URX`, as Envoy does, and says so in the log.
    fn retry_decision(&mut self, outcome: &Outcome) -> Option<Retry> {
        if !outcome.retriable() || self.retry.attempts == 0 {
            return None;
        }
        let stats = &self.cluster.stats;
        if self.attempt < self.max_attempts {
            if !self.body.can_replay() {
                let entry = &self.exchange.entry;
                tracing::info!(
                    request_id = entry.request_id.as_deref().unwrap_or("-"),
                    cluster = entry.upstream_cluster.as_deref().unwrap_or("-"),
                    "not retrying: the request body exceeded the {} KiB replay buffer",
                    REPLAY_BUFFER_LIMIT / 1024
                );
                return None;
            }
            let wake = TokioInstant::now() + backoff(self.attempt);
            if self.deadline.is_none_or(|d| wake < d) {
                let Some(permit) = self.cluster.budgets.try_retry(&self.config.limits) else {
                    ClusterStats::inc(&stats.upstream_rq_retry_overflow);
                    return None;
                };
                ClusterStats::inc(&stats.upstream_rq_retry);
                return Some(Retry { permit, wake });
            }
        }
        ClusterStats::inc(&stats.upstream_rq_retry_limit_exceeded);
        self.exchange
            .entry
            .response_flags
            .set(ResponseFlag::UpstreamRetryLimitExceeded);
        None
    }

    /// Waits out a granted retry's back-off, then keeps its `maxRetries`
    /// slot (giving back the previous retry's, held until now).
    async fn back_off(&mut self, retry: Retry) {
        tokio::time::sleep_until(retry.wake).await;
        self.retry_permit = Some(retry.permit);
    }

    /// The client's answer for the last attempt's outcome.
    async fn answer(mut self, attempt: Attempt, outcome: Outcome) -> Response<ResponseBody> {
        self.cancelled.disarm();
        let stats = self.cluster.stats.clone();
        match outcome {
            Outcome::Response {
                sent,
                grpc,
                grpc_in_trailers,
                retriable,
            } => {
                if !retriable && self.attempt > 1 {
                    ClusterStats::inc(&stats.upstream_rq_retry_success);
                }
                self.retry_permit = None;
                let Attempt {
                    host,
                    in_flight,
                    started,
                    ..
                } = attempt;
                let hold = in_flight.map(|in_flight| UpstreamHold {
                    lease: None,
                    config: self.config.clone(),
                    cluster: self.cluster.clone(),
                    host: host.unwrap_or(0),
                    grpc_in_trailers,
                    request: self.request_permit.take(),
                    in_flight,
                });
                self.upstream_response(sent, started, grpc, hold)
            }
            Outcome::RouteTimeout => {
                ClusterStats::inc(&stats.upstream_rq_timeout);
                self.exchange
                    .entry
                    .response_flags
                    .set(ResponseFlag::UpstreamRequestTimeout);
                local_reply(
                    self.exchange,
                    StatusCode::GATEWAY_TIMEOUT,
                    "response_timeout",
                    "upstream request timeout",
                    self.is_grpc,
                )
            }
            Outcome::ClientFailed(failure) => {
                drop(attempt);
                self.client_failed(failure)
            }
            Outcome::StreamIdle => {
                drop(attempt);
                self.exchange
                    .entry
                    .response_flags
                    .set(ResponseFlag::StreamIdleTimeout);
                local_reply(
                    self.exchange,
                    StatusCode::REQUEST_TIMEOUT,
                    "stream_idle_timeout",
                    "stream timeout",
                    self.is_grpc,
                )
            }
            Outcome::Failed(failure) => {
                drop(attempt);
                let entry = &mut self.exchange.entry;
                entry.response_flags.set(failure.flag);
                entry.upstream_transport_failure_reason = failure.transport.clone();
                // Count request bytes that already arrived, as Envoy (which reads them anyway) does.
                self.body.drain_available().await;
                let text = if self.attempt > 1 {
                    failure
                        .body
                        .replacen("reset reason", "retried and the latest reset reason", 1)
                } else {
                    failure.body
                };
                local_reply(
                    self.exchange,
                    failure.status,
                    &failure.details,
                    &text,
                    self.is_grpc,
                )
            }
        }
    }

    /// The client broke its own request: logged as Envoy does, `DC` with no
    /// response code when it left (nobody reads an answer), `400 DPE` for a
    /// malformed body. Either way the connection closes.
    fn client_failed(mut self, failure: ClientBodyFailure) -> Response<ResponseBody> {
        let mut reply = match failure {
            ClientBodyFailure::Disconnected => {
                let entry = &mut self.exchange.entry;
                entry
                    .response_flags
                    .set(ResponseFlag::DownstreamConnectionTermination);
                entry.response_code = 0;
                entry.response_code_details = Some("downstream_remote_disconnect".into());
                let mut reply =
                    Response::new(ResponseBody::local(Bytes::new(), Some(self.exchange)));
                *reply.status_mut() = StatusCode::BAD_REQUEST;
                reply
            }
            ClientBodyFailure::Malformed => {
                self.exchange
                    .entry
                    .response_flags
                    .set(ResponseFlag::DownstreamProtocolError);
                local_reply(
                    self.exchange,
                    StatusCode::BAD_REQUEST,
                    "http1.codec_error",
                    "",
                    self.is_grpc,
                )
            }
        };
        reply.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        reply
    }

    /// `503 UH`: no endpoint of the cluster may take the request.
    async fn no_healthy_upstream(mut self) -> Response<ResponseBody> {
        self.cancelled.disarm();
        self.exchange
            .entry
            .response_flags
            .set(ResponseFlag::NoHealthyUpstream);
        self.body.drain_available().await;
        local_reply(
            self.exchange,
            StatusCode::SERVICE_UNAVAILABLE,
            "no_healthy_upstream",
            "no healthy upstream",
            self.is_grpc,
        )
    }

    /// The upstream's response for the client: its body streams through
    /// (the hold is released when it ends), or, after `101`, a tunnel.
    fn upstream_response(
        mut self,
        sent: Sent,
        attempt_started: Instant,
        grpc: Option<u32>,
        mut hold: Option<UpstreamHold>,
    ) -> Response<ResponseBody> {
        let now = Instant::now();
        let Sent {
            mut response,
            local,
            lease,
        } = sent;
        let upstream_upgrade = (response.status() == StatusCode::SWITCHING_PROTOCOLS
            && self.on_upgrade.is_some())
        .then(|| hyper::upgrade::on(&mut response));
        let (mut parts, body) = response.into_parts();
        let exchange = &mut self.exchange;
        exchange.entry.response_code = parts.status.as_u16();
        exchange.entry.response_code_details = Some("via_upstream".into());
        exchange.entry.upstream_service_time = Some(now - attempt_started);
        exchange.entry.response_duration = Some(now - exchange.started);
        exchange.entry.upstream_local_address = Some(local);
        exchange.entry.grpc_status = grpc;
        if let (Some(downstream), Some(upstream)) = (self.on_upgrade, upstream_upgrade) {
            strip_hop_by_hop(&mut parts.headers, true);
            let drain_deadline = self.drain_deadline.unwrap_or_default();
            tokio::spawn(splice_upgrade(
                downstream,
                upstream,
                self.exchange,
                hold,
                drain_deadline,
            ));
            return Response::from_parts(parts, ResponseBody::empty());
        }
        strip_hop_by_hop(&mut parts.headers, false);
        if let Some(h) = hold.as_mut() {
            h.lease = lease;
        }
        let deadline = self.deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        Response::from_parts(
            parts,
            ResponseBody::upstream(body, self.exchange, deadline, hold, self.stream_idle),
        )
    }
}

/// Returns once neither the request's arrival (`since`) nor any later
/// request body bytes are within `idle` of now: Envoy's stream idle timeout
/// while waiting for response headers.
async fn stream_idle(body: &RequestBody, since: Instant, idle: Duration) {
    loop {
        let last = body.last_read().map_or(since, |read| read.max(since));
        let due = TokioInstant::from_std(last + idle);
        if TokioInstant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due).await;
    }
}

/// Counts `upstream_rq_cancelled` when the client leaves mid-request (the
/// request's future is dropped while the guard is armed).
struct CancelGuard(Option<Arc<ClusterStats>>);

impl CancelGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(stats) = &self.0 {
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

/// An attempt that ended before response headers, in Envoy's terms: the
/// flag, the local reply and whether `retryOn` covers it.
struct Failure {
    flag: ResponseFlag,
    status: StatusCode,
    details: String,
    body: String,
    transport: Option<String>,
    retriable: bool,
}

impl Failure {
    fn from_send(err: SendFailure, retry: &RetryPolicy) -> Self {
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
