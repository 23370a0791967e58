//! Plain TCP to a Service whose port is TCP or whose traffic is not HTTP.
//! Envoy's `tcp_proxy`: one connect attempt under the cluster's connection
//! limit (`UO` when it is reached), then bytes both ways; the access log line
//! and Istio's TCP metrics (`istio_tcp_*`) are written when the connection
//! closes (`istio_tcp_connections_opened_total` when it is accepted).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use super::idle::{CountingIo, ReadCount};
use super::sniff::PrefixedStream;

use crate::lb::PickContext;
use crate::proxy::clients::InFlight;
use crate::proxy::relay::close_at_deadline;
use crate::proxy::route::{RouteDecision, ServiceTarget, default_retry_policy};
use crate::proxy::upstream::{ConnectFailure, connect};
use crate::proxy::{ConnContext, Proxy};
use crate::resilience::outlier::AttemptResult;
use crate::telemetry::access_log::AccessLogEntry;
use crate::telemetry::stats::{ClusterStats, PROTOCOL_TCP, PeerLabels, SeriesKey};
use crate::telemetry::{ResponseFlag, ResponseFlags};

/// Envoy's `tcp_proxy` for one connection to a Service port.
pub(super) async fn serve_service(
    mut downstream: PrefixedStream,
    ctx: Arc<ConnContext>,
    target: ServiceTarget,
    proxy: Arc<Proxy>,
) {
    let started = Instant::now();
    let mut entry = AccessLogEntry::new(
        SystemTime::now(),
        ctx.source_workload.clone(),
        ctx.source_namespace.clone(),
    );
    entry.downstream_remote_address = Some(ctx.peer);
    entry.downstream_local_address = Some(ctx.orig_dst.unwrap_or(ctx.local));
    let decision = RouteDecision {
        route_name: None,
        target,
        subset: None,
        timeout: None,
        retry: default_retry_policy(),
    };
    let cluster_name: Arc<str> = decision.cluster_name();
    entry.upstream_cluster = Some(cluster_name.clone());
    let snap = proxy.snapshot.load_full();
    let client_ns = ctx
        .client
        .as_ref()
        .map_or("default", |w| w.namespace.as_str());
    let cluster = proxy
        .clients
        .resolve(&snap, &ctx, client_ns, &decision, cluster_name);
    drop(snap);
    let config = cluster.config().clone();
    let tcp_key = |peer: &Arc<PeerLabels>, flags: ResponseFlags| SeriesKey {
        peer: peer.clone(),
        protocol: PROTOCOL_TCP,
        response_code: 0,
        flags,
        grpc_status: None,
    };
    let mut peer = config.peer.clone();
    let finish = |mut entry: AccessLogEntry, peer: &Arc<PeerLabels>| {
        entry.duration = started.elapsed();
        cluster
            .stats
            .tcp
            .with(&tcp_key(peer, entry.response_flags), |s| {
                s.closed.fetch_add(1, Ordering::Relaxed);
                // Istio's sides: sent = to the client (response), received = from it.
                s.sent_bytes.fetch_add(entry.bytes_sent, Ordering::Relaxed);
                s.received_bytes
                    .fetch_add(entry.bytes_received, Ordering::Relaxed);
            });
        proxy.logger.log(entry);
    };
    let opened = |peer: &Arc<PeerLabels>| {
        cluster
            .stats
            .tcp
            .with(&tcp_key(peer, ResponseFlags::default()), |s| {
                s.opened.fetch_add(1, Ordering::Relaxed);
            });
    };
    let Some(index) = config.balancer.pick(
        &config.hosts,
        &PickContext {
            tried: &[],
            hash: None,
        },
    ) else {
        opened(&peer);
        entry.response_flags.set(ResponseFlag::NoHealthyUpstream);
        return finish(entry, &peer);
    };
    peer = config.hosts[index].peer.clone();
    opened(&peer);
    let slot = config.hosts[index].slot.clone();
    entry.upstream_host = Some(slot.addr);
    entry.upstream_request_attempt_count = 1;
    let Some(permit) = cluster.budgets.try_connection(&config.limits) else {
        ClusterStats::inc(&cluster.stats.upstream_cx_overflow);
        entry.response_flags.set(ResponseFlag::UpstreamOverflow);
        return finish(entry, &peer);
    };
    let _in_flight = InFlight::start(slot.clone(), cluster.stats.clone());
    let connect_started = Instant::now();
    match connect(slot.addr, &config.settings, &ctx.client_pod.dialer).await {
        Err(failure) => {
            cluster.record(&config, index, AttemptResult::ConnectFailed);
            ClusterStats::inc(match failure {
                ConnectFailure::Timeout => &cluster.stats.upstream_cx_connect_timeout,
                _ => &cluster.stats.upstream_cx_connect_fail,
            });
            entry
                .response_flags
                .set(ResponseFlag::UpstreamConnectionFailure);
            entry.upstream_transport_failure_reason = failure.transport_failure_reason();
        }
        Ok((mut upstream, local)) => {
            cluster
                .stats
                .upstream_cx_connect_ms
                .observe_duration_ms(connect_started.elapsed());
            cluster.record(&config, index, AttemptResult::ConnectSucceeded);
            ClusterStats::inc(&cluster.stats.upstream_cx_total);
            ClusterStats::inc(&cluster.stats.upstream_cx_active);
            entry.upstream_local_address = Some(local);
            // Draining keeps TCP streams until its deadline, then closes them with FIN.
            let (end, from_client, from_upstream) = relay_until_idle(
                &mut downstream,
                &mut upstream,
                config.settings.tcp_idle_timeout,
                &proxy.drain_deadline,
            )
            .await;
            entry.bytes_received += from_client;
            entry.bytes_sent += from_upstream;
            match end {
                RelayEnd::Closed => {}
                RelayEnd::Failed(err) => {
                    tracing::debug!(%err, "TCP proxy connection ended with an error");
                    entry
                        .response_flags
                        .set(ResponseFlag::UpstreamConnectionTermination);
                }
                RelayEnd::Idle => {
                    tracing::debug!("TCP proxy connection closed after its idle timeout");
                    entry.connection_termination_details = Some("idle_timeout".into());
                }
                RelayEnd::DrainDeadline => {
                    entry.connection_termination_details = Some("drain_deadline".into());
                }
            }
            ClusterStats::dec(&cluster.stats.upstream_cx_active);
        }
    }
    drop(permit);
    finish(entry, &peer);
}

/// How a relay ended.
enum RelayEnd {
    Closed,
    Failed(std::io::Error),
    /// Nothing was read from either side for the idle timeout.
    Idle,
    /// The proxy's drain deadline passed; both sides got FIN.
    DrainDeadline,
}

/// Bytes both ways until either side ends, or until nothing was read from
/// either side for `idle` (DestinationRule `tcp.idleTimeout`, as Envoy's
/// `tcp_proxy`); dropping the streams then closes them. Returns how it
/// ended and the bytes read from the client and from the upstream.
async fn relay_until_idle(
    downstream: &mut PrefixedStream,
    upstream: &mut tokio::net::TcpStream,
    idle: std::time::Duration,
    drain_deadline: &tokio_util::sync::CancellationToken,
) -> (RelayEnd, u64, u64) {
    let (from_client, from_upstream) = (
        Arc::new(ReadCount::default()),
        Arc::new(ReadCount::default()),
    );
    let mut down = CountingIo::new(downstream, from_client.clone());
    let mut up = CountingIo::new(upstream, from_upstream.clone());
    let mut copy = Box::pin(tokio::io::copy_bidirectional(&mut down, &mut up));
    let activity = || from_client.get() + from_upstream.get();
    // Checked four times per period: closed within 1.25 × `idle` of the last byte.
    let tick = (idle / 4).max(std::time::Duration::from_millis(1));
    let mut quiet = std::time::Duration::ZERO;
    let end = loop {
        let seen = activity();
        tokio::select! {
            result = &mut copy => break match result {
                Ok(_) => RelayEnd::Closed,
                Err(err) => RelayEnd::Failed(err),
            },
            _ = drain_deadline.cancelled() => break RelayEnd::DrainDeadline,
            _ = tokio::time::sleep(tick) => {
                if activity() == seen {
                    quiet += tick;
                    if quiet >= idle {
                        break RelayEnd::Idle;
                    }
                } else {
                    quiet = std::time::Duration::ZERO;
                }
            }
        }
    };
    drop(copy);
    if matches!(end, RelayEnd::DrainDeadline) {
        close_at_deadline(&mut down, &mut up).await;
    }
    (end, from_client.get(), from_upstream.get())
}
