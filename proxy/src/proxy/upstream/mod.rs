//! Upstream: connections from a client pod to endpoints. `connect` opens
//! them (inside the client pod's network namespace when it is enrolled) and
//! names failures as Envoy does; `pool` keeps them per (client pod, cluster,
//! endpoint) under the cluster's limits and sends requests on them. The seam
//! for HBONE: a connector that returns a tunnelled stream instead of a socket
//! would plug in at `connect`.

mod connect;
mod pool;

use std::time::{Duration, Instant};

use crate::state::{ConnectionPool, H2UpgradePolicy, TcpKeepalive};

pub use connect::{ConnectFailure, SendFailure, classify_hyper, connect, find_source};
pub use pool::{AttemptEnv, EndpointPool, Lease, Sent};

/// Istio's default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Istio's default HTTP `idleTimeout` for upstream connections.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

/// How connections of one cluster are made and kept (from `connectionPool`).
#[derive(Debug, Clone)]
pub struct ConnSettings {
    pub connect_timeout: Duration,
    /// `http.maxRequestsPerConnection` (1 disables keep-alive).
    pub max_requests_per_connection: Option<u32>,
    /// `http.idleTimeout` (or `tcp.idleTimeout`), default 1 h; `0s` disables it.
    pub idle_timeout: Duration,
    /// `tcp.idleTimeout` for TCP (L4) connections, default 1 h; `0s` disables it.
    pub tcp_idle_timeout: Duration,
    /// `tcp.maxConnectionDuration`; `0s` means none.
    pub max_connection_duration: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `http.maxConcurrentStreams`: streams per upstream HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// `http.h2UpgradePolicy: UPGRADE`: HTTP/1.1 ports talk HTTP/2 upstream.
    pub h2_upgrade: bool,
}

impl Default for ConnSettings {
    fn default() -> Self {
        ConnSettings {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_requests_per_connection: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            tcp_idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connection_duration: None,
            tcp_keepalive: None,
            max_concurrent_streams: u32::MAX,
            h2_upgrade: false,
        }
    }
}

impl ConnSettings {
    pub fn from_istio(pool: Option<&ConnectionPool>) -> Self {
        let tcp = pool.and_then(|p| p.tcp.as_ref());
        let http = pool.and_then(|p| p.http.as_ref());
        let d = ConnSettings::default();
        ConnSettings {
            connect_timeout: tcp
                .and_then(|t| t.connect_timeout)
                .unwrap_or(d.connect_timeout),
            max_requests_per_connection: http
                .and_then(|h| h.max_requests_per_connection)
                .filter(|n| *n > 0),
            // Istio (Envoy) reads 0 as "no timeout", not "expire at once".
            idle_timeout: match http
                .and_then(|h| h.idle_timeout)
                .or_else(|| tcp.and_then(|t| t.idle_timeout))
            {
                Some(zero) if zero.is_zero() => Duration::MAX,
                Some(timeout) => timeout,
                None => d.idle_timeout,
            },
            tcp_idle_timeout: match tcp.and_then(|t| t.idle_timeout) {
                Some(zero) if zero.is_zero() => Duration::MAX,
                Some(timeout) => timeout,
                None => d.tcp_idle_timeout,
            },
            max_connection_duration: tcp
                .and_then(|t| t.max_connection_duration)
                .filter(|d| !d.is_zero()),
            tcp_keepalive: tcp.and_then(|t| t.tcp_keepalive.clone()),
            max_concurrent_streams: http
                .and_then(|h| h.max_concurrent_streams)
                .filter(|n| *n > 0)
                .unwrap_or(d.max_concurrent_streams),
            h2_upgrade: http.is_some_and(|h| h.h2_upgrade_policy == H2UpgradePolicy::Upgrade),
        }
    }

    pub(crate) fn reusable(&self, created: Instant, requests: u32, now: Instant) -> bool {
        self.max_requests_per_connection
            .is_none_or(|max| requests < max)
            && self
                .max_connection_duration
                .is_none_or(|d| now - created < d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_rules() {
        let s = ConnSettings {
            max_requests_per_connection: Some(1),
            ..ConnSettings::default()
        };
        let now = Instant::now();
        assert!(
            !s.reusable(now, 1, now),
            "maxRequestsPerConnection: 1 disables keep-alive"
        );
        let s = ConnSettings {
            max_connection_duration: Some(Duration::from_millis(10)),
            ..ConnSettings::default()
        };
        assert!(!s.reusable(now - Duration::from_millis(20), 0, now));
    }
}
