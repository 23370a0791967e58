//! HTTP/1.1 Upgrade (WebSocket and friends): after `101`, bytes flow both
//! ways untouched; the access log line is written when the tunnel closes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use tokio_util::sync::CancellationToken;

use crate::proxy::body::Exchange;
use crate::proxy::clients::UpstreamHold;
use crate::proxy::relay::{Ended, copy_until_deadline};

/// `_hold` keeps the request slot and in-flight count for the tunnel's life.
pub async fn splice_upgrade(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    mut exchange: Box<Exchange>,
    _hold: Option<UpstreamHold>,
    drain_deadline: CancellationToken,
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
    let (ended, from_client, from_upstream) =
        copy_until_deadline(&mut down, &mut up, &drain_deadline).await;
    exchange.entry.bytes_received = from_client;
    exchange.entry.bytes_sent = from_upstream;
    match ended {
        Ok(Ended::Closed) => {}
        Ok(Ended::DrainDeadline) => {
            exchange.entry.connection_termination_details = Some("drain_deadline".into());
        }
        Err(err) => tracing::debug!(%err, "upgraded connection ended with an error"),
    }
    exchange.request_body = None;
    exchange.finish();
}
