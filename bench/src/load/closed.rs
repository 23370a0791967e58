//! Closed-loop generators: each worker starts its next operation when the
//! previous one is done; latency is per operation, rate = operations/s.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::timeout_at;

use super::client::Endpoint;
use super::{CONNECT_TIMEOUT, GRACE, Stats, TIMEOUT_AT_END, describe, lock, runtime};
use crate::model::LoadResult;

/// Upper bound of one ping-pong read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Ping-pong stops trying after this many failed round trips in a row (the
/// rest count as errors), so a dead target cannot stretch a run.
const MAX_FAILURES_IN_ROW: u32 = 3;
/// Ping-pong bytes written ahead of those read back at most: larger
/// messages are streamed so neither side's socket buffers can fill up and
/// block both (a deadlock with an echo server).
const PING_WINDOW: usize = 64 * 1024;
/// How long a `connect` worker waits for the peer's close.
const PEER_CLOSE_WAIT: Duration = Duration::from_secs(1);
/// A closed-loop worker pauses this long after a failed operation, so a
/// refusing target is not hammered in a tight loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(1);

/// `count` recorded round trips (after `warmup` unrecorded ones) of `size`
/// bytes on one TCP connection, with plain blocking sockets. A failed round
/// trip is an error and the next one reconnects.
pub(super) fn ping_pong(
    target: SocketAddr,
    size: usize,
    count: u64,
    warmup: u64,
) -> Result<LoadResult, String> {
    if size == 0 {
        return Err("ping_pong size must be positive".to_owned());
    }
    let mut stats = Stats::new();
    let ping = vec![b'p'; size];
    let mut pong = vec![0u8; size];
    // Connect before the clock runs; a failure here is retried below.
    let mut conn = ping_connect(target).ok();
    let mut failures_in_row = 0;
    let mut recorded_since = None;
    for i in 0..warmup + count {
        let recorded = i >= warmup;
        if recorded && recorded_since.is_none() {
            recorded_since = Some(Instant::now());
        }
        if failures_in_row >= MAX_FAILURES_IN_ROW {
            if recorded {
                stats.record_error(&format!(
                    "gave up after {MAX_FAILURES_IN_ROW} failed round trips in a row"
                ));
            }
            continue;
        }
        let began = Instant::now();
        match round_trip(&mut conn, target, &ping, &mut pong) {
            Ok(()) => {
                failures_in_row = 0;
                if recorded {
                    stats.record_ok(began.elapsed());
                }
            }
            Err(msg) => {
                conn = None;
                failures_in_row += 1;
                if recorded {
                    stats.record_error(&msg);
                }
            }
        }
    }
    let elapsed = recorded_since.map_or(Duration::ZERO, |t| t.elapsed());
    Ok(stats.into_result(elapsed))
}

fn ping_connect(target: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    Ok(stream)
}

/// Writes `ping`, reads as many bytes back into `pong`, keeping at most
/// [`PING_WINDOW`] bytes outstanding.
fn round_trip(
    conn: &mut Option<TcpStream>,
    target: SocketAddr,
    ping: &[u8],
    pong: &mut [u8],
) -> Result<(), String> {
    let stream = match conn {
        Some(stream) => stream,
        None => conn.insert(ping_connect(target)?),
    };
    let size = ping.len();
    let (mut sent, mut got) = (0, 0);
    while got < size {
        if sent < size {
            let n = (size - sent).min(PING_WINDOW - (sent - got));
            if n > 0 {
                stream
                    .write_all(&ping[sent..sent + n])
                    .map_err(|e| format!("write: {e}"))?;
                sent += n;
                continue;
            }
        }
        match stream.read(&mut pong[got..sent]) {
            Ok(0) => return Err("read: connection closed".to_owned()),
            Ok(n) => got += n,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(())
}

/// `concurrency` workers, each connecting, sending one `GET` with
/// `connection: close`, reading the whole response and closing, for
/// `duration`. Latency = connect + request + response.
pub(super) fn conn_per_request(
    endpoint: Endpoint,
    concurrency: usize,
    duration: Duration,
) -> Result<LoadResult, String> {
    let endpoint = Arc::new(endpoint);
    workers(concurrency, duration, move || {
        let endpoint = endpoint.clone();
        async move { one_shot(&endpoint).await }
    })
}

async fn one_shot(endpoint: &Endpoint) -> Result<Instant, String> {
    let io = TokioIo::new(endpoint.connect_tcp().await?);
    let (mut sender, conn) = http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {}", describe(&e)))?;
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(endpoint.request())
        .await
        .map_err(|e| describe(&e))?;
    endpoint.check(resp).await?;
    let done = Instant::now();
    drop(sender);
    // Let the connection wind down before the next one starts, so workers
    // never pile up half-closed connections.
    let _ = conn.await;
    Ok(done)
}

/// `concurrency` workers, each opening a TCP connection and closing it, for
/// `duration`. Latency = connect.
///
/// Closing waits (at most [`PEER_CLOSE_WAIT`]) for the peer to close its
/// side too: a connect completes before the server even accepts, so without
/// that wait the loop would outrun the server's accept queue, overflow it
/// and measure 1 s SYN retransmissions instead of the server.
pub(super) fn connect(
    target: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> Result<LoadResult, String> {
    workers(concurrency, duration, move || async move {
        let mut stream = tokio::net::TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let done = Instant::now();
        let _ = tokio::time::timeout(PEER_CLOSE_WAIT, async {
            stream.shutdown().await?;
            let mut buf = [0u8; 512];
            while stream.read(&mut buf).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
        Ok(done)
    })
}

/// Runs `concurrency` workers repeating `op` until `duration` has passed;
/// `op` returns when it completed (what is after that, like closing, is not
/// charged). Operations still running [`GRACE`] after the end are errors.
fn workers<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Result<LoadResult, String>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Instant, String>> + Send + 'static,
{
    if concurrency == 0 {
        return Err("concurrency must be positive".to_owned());
    }
    let rt = runtime()?;
    let stats = Stats::shared();
    let elapsed = rt.block_on(async {
        let start = Instant::now();
        let end = start + duration;
        let deadline = (end + GRACE).into();
        let mut set = JoinSet::new();
        for _ in 0..concurrency {
            let op = op.clone();
            let stats = stats.clone();
            set.spawn(async move {
                while Instant::now() < end {
                    let began = Instant::now();
                    match timeout_at(deadline, op()).await {
                        Ok(Ok(done)) => lock(&stats).record_ok(done - began),
                        Ok(Err(msg)) => {
                            lock(&stats).record_error(&msg);
                            tokio::time::sleep(ERROR_BACKOFF).await;
                        }
                        Err(_) => {
                            lock(&stats).record_error(TIMEOUT_AT_END);
                            return;
                        }
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
        start.elapsed()
    });
    Ok(Stats::take(&stats).into_result(elapsed))
}
