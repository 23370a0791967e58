//! HTTP/1.1 Upgrade (WebSocket and friends): after `101`, bytes flow both
//! ways untouched; the access log line is written when the tunnel closes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::proxy::body::Exchange;
use crate::proxy::clients::UpstreamHold;

/// `_hold` keeps the request slot and in-flight count for the tunnel's life.
pub async fn splice_upgrade(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    mut exchange: Box<Exchange>,
    _hold: Option<UpstreamHold>,
) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(%err, "upgrade failed");
            exchange.finish();
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((from_client, from_upstream)) => {
            exchange.entry.bytes_received = from_client;
            exchange.entry.bytes_sent = from_upstream;
        }
        Err(err) => tracing::debug!(%err, "upgraded connection ended with an error"),
    }
    exchange.request_body = None;
    exchange.finish();
}
