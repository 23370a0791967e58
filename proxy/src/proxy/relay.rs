//! Bytes both ways between a downstream connection and a fixed destination,
//! outside any Service cluster; used by inbound and outbound passthrough.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::Proxy;
use super::outbound::idle::{CountingIo, ReadCount};
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
            let (ended, from_client, from_upstream) =
                copy_until_deadline(&mut downstream, &mut upstream, &proxy.drain_deadline).await;
            entry.bytes_received += from_client;
            entry.bytes_sent += from_upstream;
            match ended {
                Ok(Ended::Closed) => {}
                Ok(Ended::DrainDeadline) => {
                    entry.connection_termination_details = Some("drain_deadline".into());
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

/// How long a connection closed at the drain deadline keeps reading what
/// its client still sends, so that it ends with FIN, not a reset.
pub const LINGER: Duration = Duration::from_secs(1);

/// How a relay of bytes both ways ended without an error.
pub enum Ended {
    /// A side closed.
    Closed,
    /// The drain deadline passed; both sides got FIN.
    DrainDeadline,
}

/// Bytes both ways until a side closes or the drain deadline passes (then
/// [`close_at_deadline`]). Returns how it ended and the bytes read from
/// `down` and from `up`.
pub async fn copy_until_deadline<D, U>(
    down: &mut D,
    up: &mut U,
    deadline: &CancellationToken,
) -> (std::io::Result<Ended>, u64, u64)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (from_down, from_up) = (
        Arc::new(ReadCount::default()),
        Arc::new(ReadCount::default()),
    );
    let mut counted_down = CountingIo::new(&mut *down, from_down.clone());
    let mut counted_up = CountingIo::new(&mut *up, from_up.clone());
    let ended = tokio::select! {
        result = tokio::io::copy_bidirectional(&mut counted_down, &mut counted_up) => {
            result.map(|_| Ended::Closed)
        }
        _ = deadline.cancelled() => Ok(Ended::DrainDeadline),
    };
    if matches!(ended, Ok(Ended::DrainDeadline)) {
        close_at_deadline(&mut counted_down, &mut counted_up).await;
    }
    (ended, from_down.get(), from_up.get())
}

/// At the drain deadline: FIN to both sides, then what the client still
/// sends is read off until it closes too (at most [`LINGER`]): a socket
/// closed with unread bytes sends a reset, which the client would see as a
/// failure rather than the end of the stream.
pub async fn close_at_deadline<D, U>(down: &mut D, up: &mut U)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncWrite + Unpin,
{
    let _ = up.shutdown().await;
    let _ = down.shutdown().await;
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = down.read(&mut scratch).await
            && n > 0
        {}
    })
    .await;
}
