//! Bytes both ways between a downstream connection and a fixed destination,
//! outside any Service cluster; used by inbound and outbound passthrough.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tokio::net::TcpStream;

use super::Proxy;
use super::upstream::DEFAULT_CONNECT_TIMEOUT;
use crate::redirect::netns::Dialer;
use crate::telemetry::ResponseFlag;
use crate::telemetry::access_log::AccessLogEntry;

/// Bytes both ways to a fixed destination, outside any Service cluster:
/// Istio's `PassthroughCluster` (outbound) and `inbound|PORT||` clusters.
/// `entry` arrives with the downstream side and cluster filled in; the line
/// is written when both sides are done.
pub async fn relay(
    mut downstream: TcpStream,
    mut entry: AccessLogEntry,
    dst: SocketAddr,
    dialer: &Dialer,
    bind: Option<IpAddr>,
    proxy: &Proxy,
) {
    let started = Instant::now();
    entry.upstream_host = Some(dst);
    entry.upstream_request_attempt_count = 1;
    let connected = async {
        let socket = dialer.tcp_socket(dst)?;
        if let Some(ip) = bind {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        match tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, socket.connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timeout",
            )),
        }
    }
    .await;
    match connected {
        Err(err) => {
            entry
                .response_flags
                .set(ResponseFlag::UpstreamConnectionFailure);
            entry.upstream_transport_failure_reason = Some(err.to_string());
        }
        Ok(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            entry.upstream_local_address = upstream.local_addr().ok();
            match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
                Ok((from_client, from_upstream)) => {
                    entry.bytes_received += from_client;
                    entry.bytes_sent += from_upstream;
                }
                Err(err) => {
                    tracing::debug!(%err, %dst, "relayed connection ended with an error");
                    entry
                        .response_flags
                        .set(ResponseFlag::UpstreamConnectionTermination);
                }
            }
        }
    }
    entry.duration = started.elapsed();
    proxy.logger.log(entry);
}
