//! Upstream connections, pooled per (client pod, cluster, endpoint), under
//! the cluster's connection limits.
//!
//! Pools are never shared between client pods: that isolation is what lets a
//! DestinationRule's limits apply per client, as with a sidecar. A request
//! that finds no reusable connection and may not open one waits in the
//! cluster's pending queue (bounded by `http1MaxPendingRequests`) until a
//! connection frees up, or overflows (`UO`) at once when the queue is full.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::connect::{ConnectFailure, SendFailure, classify_hyper, connect};
use super::{ConnSettings, UpstreamProtocol};
use crate::proxy::body::RequestBody;
use crate::redirect::netns::Dialer;
use crate::resilience::breaker::{Budgets, Limits, Permit};
use crate::telemetry::stats::ClusterStats;

/// The connection (or stream) an upstream response is using; released when
/// the response body ends cleanly, dropped (closing it) otherwise.
pub enum Lease {
    Http1 {
        pool: Arc<EndpointPool>,
        conn: IdleH1,
        budgets: Budgets,
    },
    Http2 {
        stream: H2Stream,
    },
}

impl Lease {
    /// The exchange completed: a keep-alive connection goes back to its pool.
    pub fn release(self, settings: &ConnSettings) {
        if let Lease::Http1 {
            pool,
            mut conn,
            budgets,
        } = self
        {
            let now = Instant::now();
            if !conn.sender.is_closed() && settings.reusable(conn.created, conn.requests, now) {
                conn.idle_since = now;
                conn.clock.idle();
                pool.h1_idle.lock().expect("pool lock").push(conn);
            }
            // Either way capacity may have changed: a reusable connection, or one closing.
            budgets.cluster.capacity.notify_waiters();
        }
    }
}

pub struct IdleH1 {
    sender: http1::SendRequest<RequestBody>,
    local: SocketAddr,
    created: Instant,
    requests: u32,
    idle_since: Instant,
    clock: Arc<IdleClock>,
}

/// When an upstream connection last went idle (no request on it), so its
/// driver task closes it after the idle timeout by itself, rather than at
/// the next checkout (which may never come).
#[derive(Debug)]
struct IdleClock {
    base: Instant,
    /// Milliseconds after `base` it went idle; `u64::MAX` while busy.
    idle_since_ms: AtomicU64,
}

impl IdleClock {
    fn busy_now() -> Arc<IdleClock> {
        Arc::new(IdleClock {
            base: Instant::now(),
            idle_since_ms: AtomicU64::new(u64::MAX),
        })
    }

    fn busy(&self) {
        self.idle_since_ms.store(u64::MAX, Ordering::Relaxed);
    }

    fn idle(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.idle_since_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the connection has been idle; `None` while busy.
    fn idle_for(&self) -> Option<Duration> {
        match self.idle_since_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(
                self.base
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }
}

/// Drives an upstream connection until it ends, or until it has been idle
/// for `idle_timeout` (`upstream_cx_idle_timeout`): dropping it closes it.
async fn drive_until_idle(
    conn: impl Future<Output = Result<(), hyper::Error>>,
    clock: Arc<IdleClock>,
    idle_timeout: Duration,
    stats: &ClusterStats,
    protocol: &'static str,
) {
    tokio::pin!(conn);
    // Checked four times per period: closed within 1.25 × the timeout.
    let tick = (idle_timeout / 4).max(Duration::from_millis(1));
    loop {
        tokio::select! {
            ended = &mut conn => {
                if let Err(err) = ended {
                    tracing::debug!(%err, protocol, "upstream connection ended");
                }
                return;
            }
            _ = tokio::time::sleep(tick) => {
                if clock.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                    ClusterStats::inc(&stats.upstream_cx_idle_timeout);
                    return;
                }
            }
        }
    }
}

struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    local: SocketAddr,
    created: Instant,
    active: AtomicU32,
    streams: AtomicU32,
    clock: Arc<IdleClock>,
}

/// One open stream on a shared HTTP/2 connection.
pub struct H2Stream {
    conn: Arc<H2Conn>,
    budgets: Budgets,
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.clock.idle();
        }
        self.budgets.cluster.capacity.notify_waiters();
    }
}

/// Connections of one client pod to one endpoint of one cluster.
pub struct EndpointPool {
    pub addr: SocketAddr,
    h1_idle: Mutex<Vec<IdleH1>>,
    h2: Mutex<Vec<Arc<H2Conn>>>,
    /// Connections connecting or open (idle or busy), for Envoy's
    /// first-connection rule.
    open: AtomicU32,
}

/// A connection's place in the limits and in its endpoint's count; both are
/// given back when the connection ends (or fails to open).
pub struct ConnSlot {
    _permit: Permit,
    _open: OpenConn,
}

struct OpenConn(Arc<EndpointPool>);
impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Result of one attempt that got response headers.
pub struct Sent {
    pub response: http::Response<Incoming>,
    pub local: SocketAddr,
    pub lease: Option<Lease>,
}

/// What one attempt needs from its cluster.
pub struct AttemptEnv<'a> {
    pub budgets: &'a Budgets,
    pub limits: &'a Limits,
    pub settings: &'a ConnSettings,
    pub stats: &'a Arc<ClusterStats>,
    /// Where the client's upstream sockets are created (its pod, with eBPF).
    pub dialer: &'a Dialer,
}

/// Decrements a gauge when the scope ends, however it ends.
struct GaugeGuard<'a>(&'a AtomicU64);
impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        ClusterStats::dec(self.0);
    }
}

impl EndpointPool {
    pub fn new(addr: SocketAddr) -> Self {
        EndpointPool {
            addr,
            h1_idle: Mutex::new(Vec::new()),
            h2: Mutex::new(Vec::new()),
            open: AtomicU32::new(0),
        }
    }

    /// Sends one request and waits for response headers: on a reused
    /// connection, a new one if the limits allow, or after waiting in the
    /// pending queue. The caller bounds the call with its timeouts.
    pub async fn send(
        self: &Arc<Self>,
        env: &AttemptEnv<'_>,
        protocol: UpstreamProtocol,
        mut req: http::Request<RequestBody>,
        local: &mut Option<SocketAddr>,
    ) -> Result<Sent, SendFailure> {
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        let mut pending: Option<(Permit, GaugeGuard<'_>)> = None;
        let mut overflow_counted = false;
        loop {
            // Register for a wake-up before looking, so a release in between is not missed.
            let mut capacity = pin!(env.budgets.cluster.capacity.notified());
            capacity.as_mut().enable();

            match protocol {
                UpstreamProtocol::Http1 if !upgrade => {
                    while let Some(conn) = self.take_idle_h1(env) {
                        *local = Some(conn.local);
                        match self.send_h1(env, conn, req).await {
                            Ok(sent) => return Ok(sent),
                            Err((Some(back), _)) => req = back,
                            Err((None, failure)) => return Err(failure),
                        }
                    }
                }
                UpstreamProtocol::Http2 => {
                    if let Some(stream) = self.h2_stream(env) {
                        *local = Some(stream.conn.local);
                        return send_h2(stream, req).await;
                    }
                }
                UpstreamProtocol::Http1 => {}
            }

            if let Some(permit) = self.connection_slot(env) {
                drop(pending.take());
                // Boxed: connecting and the handshakes make a large future,
                // and the reuse path above should not carry (and copy) it.
                return Box::pin(self.connect_and_send(env, protocol, req, permit, upgrade, local))
                    .await;
            }

            // No connection to be had: queue, or overflow if the queue is full.
            if !overflow_counted {
                overflow_counted = true;
                ClusterStats::inc(&env.stats.upstream_cx_overflow);
            }
            if pending.is_none() {
                let Some(permit) = env.budgets.try_pending(env.limits) else {
                    ClusterStats::inc(&env.stats.upstream_rq_pending_overflow);
                    return Err(SendFailure::Overflow);
                };
                ClusterStats::inc(&env.stats.upstream_rq_pending_total);
                ClusterStats::inc(&env.stats.upstream_rq_pending_active);
                pending = Some((permit, GaugeGuard(&env.stats.upstream_rq_pending_active)));
            }
            capacity.await;
        }
    }

    /// Room for one more connection: within the limits, or (Envoy) the
    /// first one to this endpoint even over the cluster's `maxConnections`,
    /// counted as an overflow.
    fn connection_slot(self: &Arc<Self>, env: &AttemptEnv<'_>) -> Option<ConnSlot> {
        let permit = match env.budgets.try_connection(env.limits) {
            Some(permit) => {
                self.open.fetch_add(1, Ordering::AcqRel);
                permit
            }
            None => {
                self.open
                    .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                    .ok()?;
                match env.budgets.try_first_connection() {
                    Some(permit) => {
                        ClusterStats::inc(&env.stats.upstream_cx_overflow);
                        permit
                    }
                    None => {
                        self.open.fetch_sub(1, Ordering::AcqRel);
                        return None;
                    }
                }
            }
        };
        Some(ConnSlot {
            _permit: permit,
            _open: OpenConn(self.clone()),
        })
    }

    fn take_idle_h1(&self, env: &AttemptEnv<'_>) -> Option<IdleH1> {
        let now = Instant::now();
        let mut idle = self.h1_idle.lock().expect("pool lock");
        while let Some(conn) = idle.pop() {
            if conn.sender.is_closed() {
                continue;
            }
            if now - conn.idle_since >= env.settings.idle_timeout {
                ClusterStats::inc(&env.stats.upstream_cx_idle_timeout);
                continue;
            }
            if !env.settings.reusable(conn.created, conn.requests, now) {
                continue;
            }
            conn.clock.busy();
            return Some(conn);
        }
        None
    }

    fn h2_stream(&self, env: &AttemptEnv<'_>) -> Option<H2Stream> {
        let now = Instant::now();
        let mut conns = self.h2.lock().expect("pool lock");
        conns.retain(|c| !c.sender.is_closed());
        for conn in conns.iter() {
            if !env
                .settings
                .reusable(conn.created, conn.streams.load(Ordering::Acquire), now)
            {
                continue;
            }
            let took = conn
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < env.settings.max_concurrent_streams).then_some(n + 1)
                })
                .is_ok();
            if took {
                conn.clock.busy();
                conn.streams.fetch_add(1, Ordering::AcqRel);
                return Some(H2Stream {
                    conn: conn.clone(),
                    budgets: env.budgets.clone(),
                });
            }
        }
        None
    }

    /// Sends on an idle keep-alive connection. A request the connection could
    /// not even start (it closed meanwhile) comes back for a fresh connection.
    async fn send_h1(
        self: &Arc<Self>,
        env: &AttemptEnv<'_>,
        mut conn: IdleH1,
        req: http::Request<RequestBody>,
    ) -> Result<Sent, (Option<http::Request<RequestBody>>, SendFailure)> {
        conn.requests += 1;
        match conn.sender.try_send_request(req).await {
            Ok(response) => Ok(Sent {
                response,
                local: conn.local,
                lease: Some(Lease::Http1 {
                    pool: self.clone(),
                    conn,
                    budgets: env.budgets.clone(),
                }),
            }),
            Err(mut err) => {
                let back = err.take_message();
                Err((back, classify_hyper(err.into_error())))
            }
        }
    }

    async fn connect_and_send(
        self: &Arc<Self>,
        env: &AttemptEnv<'_>,
        protocol: UpstreamProtocol,
        req: http::Request<RequestBody>,
        permit: ConnSlot,
        upgrade: bool,
        local: &mut Option<SocketAddr>,
    ) -> Result<Sent, SendFailure> {
        let connect_started = Instant::now();
        let (stream, local_addr) = match connect(self.addr, env.settings, env.dialer).await {
            Ok(c) => c,
            Err(failure) => {
                let counter = match failure {
                    ConnectFailure::Timeout => &env.stats.upstream_cx_connect_timeout,
                    _ => &env.stats.upstream_cx_connect_fail,
                };
                ClusterStats::inc(counter);
                return Err(SendFailure::Connect(failure));
            }
        };
        *local = Some(local_addr);
        env.stats
            .upstream_cx_connect_ms
            .observe_duration_ms(connect_started.elapsed());
        ClusterStats::inc(&env.stats.upstream_cx_total);
        ClusterStats::inc(&env.stats.upstream_cx_active);
        let stats = env.stats.clone();
        let created = Instant::now();
        match protocol {
            UpstreamProtocol::Http1 => {
                let (mut sender, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(classify_hyper)?;
                let clock = IdleClock::busy_now();
                let idle_timeout = env.settings.idle_timeout;
                let driver_clock = clock.clone();
                tokio::spawn(async move {
                    let conn = conn.with_upgrades();
                    drive_until_idle(conn, driver_clock, idle_timeout, &stats, "HTTP/1.1").await;
                    ClusterStats::dec(&stats.upstream_cx_active);
                    drop(permit);
                });
                let response = sender.send_request(req).await.map_err(classify_hyper)?;
                let lease = (!upgrade).then(|| Lease::Http1 {
                    pool: self.clone(),
                    conn: IdleH1 {
                        sender,
                        local: local_addr,
                        created,
                        requests: 1,
                        idle_since: created,
                        clock,
                    },
                    budgets: env.budgets.clone(),
                });
                Ok(Sent {
                    response,
                    local: local_addr,
                    lease,
                })
            }
            UpstreamProtocol::Http2 => {
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(classify_hyper)?;
                let clock = IdleClock::busy_now();
                let idle_timeout = env.settings.idle_timeout;
                let driver_clock = clock.clone();
                tokio::spawn(async move {
                    drive_until_idle(conn, driver_clock, idle_timeout, &stats, "HTTP/2").await;
                    ClusterStats::dec(&stats.upstream_cx_active);
                    drop(permit);
                });
                let conn = Arc::new(H2Conn {
                    sender,
                    local: local_addr,
                    created,
                    active: AtomicU32::new(1),
                    streams: AtomicU32::new(1),
                    clock,
                });
                self.h2.lock().expect("pool lock").push(conn.clone());
                send_h2(
                    H2Stream {
                        conn,
                        budgets: env.budgets.clone(),
                    },
                    req,
                )
                .await
            }
        }
    }
}

async fn send_h2(stream: H2Stream, req: http::Request<RequestBody>) -> Result<Sent, SendFailure> {
    let mut sender = stream.conn.sender.clone();
    sender.ready().await.map_err(classify_hyper)?;
    let response = sender.send_request(req).await.map_err(classify_hyper)?;
    Ok(Sent {
        response,
        local: stream.conn.local,
        lease: Some(Lease::Http2 { stream }),
    })
}
