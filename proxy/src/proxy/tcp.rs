//! Plain TCP to a Service whose port is TCP or whose traffic is not HTTP.
//! Envoy's `tcp_proxy`: one connect attempt, then bytes both ways; the
//! access log line is written when the connection closes.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::net::TcpStream;

use super::cluster::ClientCluster;
use super::route::{RouteDecision, ServiceTarget, default_retry_policy};
use super::{ConnContext, Shared};
use crate::resilience::pool::connect;
use crate::telemetry::ResponseFlag;
use crate::telemetry::access_log::AccessLogEntry;

pub async fn proxy(
    mut downstream: TcpStream,
    ctx: Arc<ConnContext>,
    target: ServiceTarget,
    shared: Arc<Shared>,
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
    let cluster_name: Arc<str> = Arc::from(decision.cluster_name());
    entry.upstream_cluster = Some(cluster_name.clone());
    let snap = shared.snapshot.load_full();
    let client_ns = ctx
        .client
        .as_ref()
        .map_or("default", |w| w.namespace.as_str());
    let cluster: Arc<ClientCluster> =
        shared
            .clusters
            .resolve(&snap, &ctx, client_ns, &decision, cluster_name);
    drop(snap);
    if cluster.endpoints.is_empty() {
        entry.response_flags.set(ResponseFlag::NoHealthyUpstream);
        entry.duration = started.elapsed();
        shared.logger.log(entry);
        return;
    }
    let endpoint = crate::lb::pick(&cluster.endpoints, &[], &cluster.rr).clone();
    entry.upstream_host = Some(endpoint.addr);
    entry.upstream_request_attempt_count = 1;
    match connect(endpoint.addr, cluster.connect_timeout).await {
        Err(failure) => {
            entry
                .response_flags
                .set(ResponseFlag::UpstreamConnectionFailure);
            entry.upstream_transport_failure_reason = failure.transport_failure_reason();
        }
        Ok((mut upstream, local)) => {
            entry.upstream_local_address = Some(local);
            // Draining does not cut TCP streams; the process exit at the end of the drain does.
            match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
                Ok((from_client, from_upstream)) => {
                    entry.bytes_received += from_client;
                    entry.bytes_sent += from_upstream;
                }
                Err(err) => {
                    tracing::debug!(%err, "TCP proxy connection ended with an error");
                    entry
                        .response_flags
                        .set(ResponseFlag::UpstreamConnectionTermination);
                }
            }
        }
    }
    entry.duration = started.elapsed();
    shared.logger.log(entry);
}
