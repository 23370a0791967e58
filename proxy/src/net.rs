//! The accept loop every listener shares: the proxy's outbound and inbound
//! listeners and the admin, metrics and readiness servers.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Pause after a failed `accept` (out of file descriptors and the like), so
/// the loop waits for resources instead of spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections on `listener` and hands each to `on_accept`, until
/// `stop` is cancelled (`None`: for the life of the process). `what` names
/// the listener in the log.
pub async fn accept_loop(
    listener: TcpListener,
    what: &'static str,
    stop: Option<CancellationToken>,
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    let stop = stop.unwrap_or_default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => on_accept(stream, peer),
            Err(err) => {
                tracing::warn!(%err, listener = what, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}
