//! Idle keep-alive connections: open them slowly, one request each, then
//! hold them until told to stop.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::client::Endpoint;
use super::{Stats, describe, lock, runtime};
use crate::model::LoadResult;

/// Upper bound of opening one connection and its request.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens `count` HTTP/1.1 keep-alive connections, at most `opens_per_sec`
/// per second (0: as fast as possible), sends the endpoint's request on each
/// and reads the whole response. Then writes `{"idle_open":N,"errors":E}` to
/// `out`, holds the connections that answered with a 2xx until `hold`
/// reaches EOF (stdin in production) and returns the result of those
/// requests (elapsed = time to open them all).
pub(super) fn run(
    endpoint: Endpoint,
    count: usize,
    opens_per_sec: u64,
    out: &mut dyn Write,
    hold: &mut dyn Read,
) -> Result<LoadResult, String> {
    let rt = runtime()?;
    let endpoint = Arc::new(endpoint);
    let stats = Stats::shared();
    let (held, elapsed) = rt.block_on(async {
        let start = Instant::now();
        let mut opens = JoinSet::new();
        for k in 0..count {
            if opens_per_sec > 0 {
                // Millisecond timer precision is plenty for a rate limit.
                let ns = u128::try_from(k).unwrap_or(u128::MAX) * 1_000_000_000
                    / u128::from(opens_per_sec);
                let at = start + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
                tokio::time::sleep_until(at.into()).await;
            }
            let endpoint = endpoint.clone();
            let stats = stats.clone();
            opens.spawn(async move {
                let began = Instant::now();
                let outcome = tokio::time::timeout(OPEN_TIMEOUT, open_one(&endpoint))
                    .await
                    .unwrap_or_else(|_| Err(format!("no response within {OPEN_TIMEOUT:?}")));
                let mut stats = lock(&stats);
                match outcome {
                    Ok((stream, done)) => {
                        stats.record_ok(done - began);
                        Some(stream)
                    }
                    Err(msg) => {
                        stats.record_error(&msg);
                        None
                    }
                }
            });
        }
        let mut held = Vec::with_capacity(count);
        while let Some(joined) = opens.join_next().await {
            match joined {
                Ok(Some(stream)) => held.push(stream),
                Ok(None) => {}
                Err(e) => lock(&stats).record_error(&format!("open task failed: {e}")),
            }
        }
        (held, start.elapsed())
    });
    let stats = Stats::take(&stats);
    let line = serde_json::json!({"idle_open": held.len(), "errors": stats.errors});
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("write idle line: {e}"))?;
    // Hold: nothing to do until the harness closes our stdin. A read error
    // ends the hold the same way.
    let _ = std::io::copy(hold, &mut std::io::sink());
    // tokio sockets deregister from their runtime's reactor on drop.
    let guard = rt.enter();
    drop(held);
    drop(guard);
    Ok(stats.into_result(elapsed))
}

/// One connection and its exchange; on success, the bare socket (hyper's
/// buffers freed) and when the response was complete.
async fn open_one(endpoint: &Endpoint) -> Result<(TcpStream, Instant), String> {
    let io = TokioIo::new(endpoint.connect_tcp().await?);
    let (mut sender, conn) = http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {}", describe(&e)))?;
    let req = endpoint.request();
    let exchange = async move {
        let resp = sender.send_request(req).await.map_err(|e| describe(&e))?;
        endpoint.check(resp).await?;
        let done = Instant::now();
        // No more requests: the connection finishes without closing the
        // socket (`without_shutdown`), which is then held bare.
        drop(sender);
        Ok::<_, String>(done)
    };
    let (done, parts) = tokio::join!(exchange, conn.without_shutdown());
    let done = done?;
    let parts = parts.map_err(|e| format!("connection: {}", describe(&e)))?;
    Ok((parts.io.into_inner(), done))
}
