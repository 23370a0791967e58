//! Upstream connections, pooled per (client workload, cluster, endpoint).
//!
//! Pools are never shared between client workloads: that isolation is what
//! lets connection limits and breakers apply per client, as a sidecar would.
//! HTTP/1.1 keeps idle keep-alive connections; HTTP/2 multiplexes over one.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpSocket, TcpStream};

use crate::proxy::body::RequestBody;

/// Istio's default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

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
}

/// A connection handed back to its pool once the response body ended cleanly.
pub struct PoolReturn {
    pool: std::sync::Arc<EndpointPool>,
    sender: http1::SendRequest<RequestBody>,
    local: SocketAddr,
}

impl PoolReturn {
    pub fn give_back(self) {
        if !self.sender.is_closed() {
            self.pool.h1_idle.lock().expect("pool lock").push(IdleH1 {
                sender: self.sender,
                local: self.local,
            });
        }
    }
}

struct IdleH1 {
    sender: http1::SendRequest<RequestBody>,
    local: SocketAddr,
}

#[derive(Clone)]
struct SharedH2 {
    sender: http2::SendRequest<RequestBody>,
    local: SocketAddr,
}

/// Connections of one client workload to one endpoint of one cluster.
pub struct EndpointPool {
    pub addr: SocketAddr,
    h1_idle: Mutex<Vec<IdleH1>>,
    h2: Mutex<Option<SharedH2>>,
}

/// Result of one attempt that got response headers.
pub struct Sent {
    pub response: http::Response<Incoming>,
    pub local: SocketAddr,
    pub pool_return: Option<PoolReturn>,
}

impl EndpointPool {
    pub fn new(addr: SocketAddr) -> Self {
        EndpointPool {
            addr,
            h1_idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }
    }

    /// Sends one request and waits for response headers. The caller bounds
    /// the whole call with its per-try/route timeout.
    pub async fn send(
        self: &std::sync::Arc<Self>,
        protocol: UpstreamProtocol,
        req: http::Request<RequestBody>,
        connect_timeout: Duration,
        local: &mut Option<SocketAddr>,
    ) -> Result<Sent, SendFailure> {
        match protocol {
            UpstreamProtocol::Http1 => self.send_h1(req, connect_timeout, local).await,
            UpstreamProtocol::Http2 => self.send_h2(req, connect_timeout, local).await,
        }
    }

    async fn send_h1(
        self: &std::sync::Arc<Self>,
        mut req: http::Request<RequestBody>,
        connect_timeout: Duration,
        local: &mut Option<SocketAddr>,
    ) -> Result<Sent, SendFailure> {
        // Reuse an idle keep-alive connection; a request it could not even
        // start (connection closed meanwhile) comes back and goes on a fresh one.
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        loop {
            let idle = if upgrade {
                None
            } else {
                self.h1_idle.lock().expect("pool lock").pop()
            };
            let Some(mut idle) = idle else { break };
            if idle.sender.is_closed() || futures_ready(&mut idle.sender).await.is_err() {
                continue;
            }
            *local = Some(idle.local);
            match idle.sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(Sent {
                        response,
                        local: idle.local,
                        pool_return: Some(PoolReturn {
                            pool: self.clone(),
                            sender: idle.sender,
                            local: idle.local,
                        }),
                    });
                }
                Err(mut err) => match err.take_message() {
                    Some(back) => req = back,
                    None => return Err(classify_hyper(err.into_error())),
                },
            }
        }
        let (stream, local_addr) = connect(self.addr, connect_timeout)
            .await
            .map_err(SendFailure::Connect)?;
        *local = Some(local_addr);
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(classify_hyper)?;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                tracing::debug!(%err, "upstream HTTP/1.1 connection ended");
            }
        });
        let response = sender.send_request(req).await.map_err(classify_hyper)?;
        let pool_return = (!upgrade).then(|| PoolReturn {
            pool: self.clone(),
            sender,
            local: local_addr,
        });
        Ok(Sent {
            response,
            local: local_addr,
            pool_return,
        })
    }

    async fn send_h2(
        self: &std::sync::Arc<Self>,
        req: http::Request<RequestBody>,
        connect_timeout: Duration,
        local: &mut Option<SocketAddr>,
    ) -> Result<Sent, SendFailure> {
        let existing = self
            .h2
            .lock()
            .expect("pool lock")
            .clone()
            .filter(|c| !c.sender.is_closed());
        let mut conn = match existing {
            Some(c) => c,
            None => {
                let (stream, local_addr) = connect(self.addr, connect_timeout)
                    .await
                    .map_err(SendFailure::Connect)?;
                *local = Some(local_addr);
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(classify_hyper)?;
                tokio::spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!(%err, "upstream HTTP/2 connection ended");
                    }
                });
                let shared = SharedH2 {
                    sender,
                    local: local_addr,
                };
                *self.h2.lock().expect("pool lock") = Some(shared.clone());
                shared
            }
        };
        *local = Some(conn.local);
        conn.sender.ready().await.map_err(classify_hyper)?;
        let response = conn
            .sender
            .send_request(req)
            .await
            .map_err(classify_hyper)?;
        Ok(Sent {
            response,
            local: conn.local,
            pool_return: None,
        })
    }
}

async fn futures_ready(sender: &mut http1::SendRequest<RequestBody>) -> hyper::Result<()> {
    // An idle connection is ready at once or is dead; never wait on it.
    match tokio::time::timeout(Duration::from_millis(1), sender.ready()).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

/// Opens a TCP connection with Istio's `connectTimeout` semantics.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), ConnectFailure> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ConnectFailure::Local)?;
    socket.set_nodelay(true).map_err(ConnectFailure::Local)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
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
