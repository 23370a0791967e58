//! Opening a connection to an endpoint, and Envoy's names for what went wrong
//! before response headers arrived.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::ConnSettings;
use crate::redirect::netns::Dialer;

/// Why a connection to an endpoint could not be made (Envoy `UF`).
#[derive(Debug)]
pub enum ConnectFailure {
    /// The peer refused or the network said no: Envoy's `remote_connection_failure`.
    Remote(io::Error),
    /// The local stack could not even try: `local_connection_failure`.
    Local(io::Error),
    /// `connectTimeout` elapsed: `connection_timeout`.
    Timeout,
}

impl ConnectFailure {
    /// Envoy's reset reason name.
    pub fn reset_reason(&self) -> &'static str {
        match self {
            ConnectFailure::Remote(_) => "remote_connection_failure",
            ConnectFailure::Local(_) => "local_connection_failure",
            ConnectFailure::Timeout => "connection_timeout",
        }
    }

    /// Envoy's `upstream_transport_failure_reason`, spaces as underscores.
    pub fn transport_failure_reason(&self) -> Option<String> {
        match self {
            ConnectFailure::Remote(err) | ConnectFailure::Local(err) => {
                Some(format!("delayed connect error: {}", strerror(err)).replace(' ', "_"))
            }
            ConnectFailure::Timeout => None,
        }
    }
}

/// The OS's text for an error, without Rust's ` (os error N)` suffix.
fn strerror(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Failure of one attempt before response headers arrived.
#[derive(Debug)]
pub enum SendFailure {
    Connect(ConnectFailure),
    /// The connection closed or was reset before response headers (`UC`).
    ConnectionTermination(String),
    /// HTTP/2 stream reset by the upstream (`UR`); `refused` for REFUSED_STREAM.
    RemoteReset {
        refused: bool,
    },
    /// The upstream spoke invalid HTTP (`UPE`).
    Protocol(String),
    /// A circuit-breaker limit said no (`UO`).
    Overflow,
}

/// Linux's bounds on `TCP_KEEPIDLE` / `TCP_KEEPINTVL` and `TCP_KEEPCNT`.
const KEEPALIVE_MIN: Duration = Duration::from_secs(1);
const KEEPALIVE_MAX: Duration = Duration::from_secs(32767);
const KEEPALIVE_MAX_PROBES: u32 = 127;

/// Opens a TCP connection with Istio's `connectTimeout` and `tcpKeepalive`.
pub async fn connect(
    addr: SocketAddr,
    settings: &ConnSettings,
    dialer: &Dialer,
) -> Result<(TcpStream, SocketAddr), ConnectFailure> {
    let socket = dialer.tcp_socket(addr).map_err(ConnectFailure::Local)?;
    socket.set_nodelay(true).map_err(ConnectFailure::Local)?;
    if let Some(ka) = &settings.tcp_keepalive {
        // Linux refuses (EINVAL) times outside 1..=32767 s and probe counts
        // outside 1..=127, which would fail every connection of the cluster:
        // clamp them, and leave a zero count to the kernel as Istio does
        // (it does not send `probes: 0` to Envoy).
        let seconds = |d: Duration| d.clamp(KEEPALIVE_MIN, KEEPALIVE_MAX);
        let mut keepalive = socket2::TcpKeepalive::new();
        if let Some(t) = ka.time {
            keepalive = keepalive.with_time(seconds(t));
        }
        if let Some(i) = ka.interval {
            keepalive = keepalive.with_interval(seconds(i));
        }
        if let Some(p) = ka.probes.filter(|p| *p > 0) {
            keepalive = keepalive.with_retries(p.min(KEEPALIVE_MAX_PROBES));
        }
        socket2::SockRef::from(&socket)
            .set_tcp_keepalive(&keepalive)
            .map_err(ConnectFailure::Local)?;
    }
    match tokio::time::timeout(settings.connect_timeout, socket.connect(addr)).await {
        Err(_) => Err(ConnectFailure::Timeout),
        Ok(Err(err)) => Err(match err.kind() {
            io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::AddrInUse
            | io::ErrorKind::PermissionDenied => ConnectFailure::Local(err),
            _ => ConnectFailure::Remote(err),
        }),
        Ok(Ok(stream)) => {
            let local = stream.local_addr().map_err(ConnectFailure::Local)?;
            Ok((stream, local))
        }
    }
}

/// Maps a hyper client error before response headers to Envoy's categories.
pub fn classify_hyper(err: hyper::Error) -> SendFailure {
    if let Some(h2) = find_source::<h2::Error>(&err) {
        if let Some(reason) = h2.reason() {
            if h2.is_remote() && !h2.is_go_away() {
                return SendFailure::RemoteReset {
                    refused: reason == h2::Reason::REFUSED_STREAM,
                };
            }
            if reason == h2::Reason::PROTOCOL_ERROR {
                return SendFailure::Protocol(err.to_string());
            }
        }
        return SendFailure::ConnectionTermination(err.to_string());
    }
    if err.is_parse() || err.is_parse_status() || err.is_parse_too_large() {
        return SendFailure::Protocol(err.to_string());
    }
    SendFailure::ConnectionTermination(err.to_string())
}

/// Walks an error's source chain looking for a specific type.
pub fn find_source<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_reason_reads_like_envoy() {
        let f = ConnectFailure::Remote(io::Error::from_raw_os_error(111));
        assert_eq!(
            f.transport_failure_reason().as_deref(),
            Some("delayed_connect_error:_Connection_refused")
        );
        assert_eq!(f.reset_reason(), "remote_connection_failure");
    }
}
