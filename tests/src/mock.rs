//! Mock upstream server: one TCP listener serving HTTP/1.1 (keep-alive,
//! upgrades), HTTP/2 cleartext with prior knowledge and unary gRPC (on the
//! HTTP/2 side), with endpoints that misbehave on purpose (delays, resets,
//! clean closes, truncated bodies, injected failures).
//!
//! HTTP endpoints (any method; every response carries `x-served-by: {name}`
//! and `x-mock-peer: {client ip:port}` as seen by the mock):
//! - `/status/{code}`: that status, body `{"status":code}`
//! - `/delay/{ms}`: 200 `delayed {ms}` after `ms`
//! - `/reset-before-response/{ms}`, `/close-before-response/{ms}`: after `ms`,
//!   kill the whole TCP connection with RST (SO_LINGER 0) or FIN, no response
//! - `/reset-after-response/{ms}`, `/close-after-response/{ms}`: 200 with
//!   `content-length: 1024`, the first 100 body bytes, then after `ms`
//!   (at least 5 ms, so the bytes are flushed) kill the connection (RST / FIN)
//! - `/echo`: 200, streams the request body back; `x-request-id-seen` carries
//!   the request's `x-request-id`
//! - `/size/{n}`: 200 with `n` bytes of body (`a`s)
//! - `/upgrade-echo` (HTTP/1.1, `Connection: upgrade`, `Upgrade: echo`): 101,
//!   then echoes raw bytes until EOF
//! - anything else: 200 `ok`
//!
//! With probability `fail_rate` any request is answered `fail_code` with body
//! `{"status":code,"injected":true}` (empty body for gRPC requests) and header
//! `x-mock-injected: true`.
//!
//! gRPC (`/nodeway.test.Mock/Call`, content-type `application/grpc*` on an
//! HTTP/2 connection): the request's `path` field selects the same behaviours;
//! see [`crate::grpc`]. `/status/{code}` with code != 200 answers a plain HTTP
//! response with that status and an empty body (no grpc-status),
//! `/grpc-status/{n}` answers a trailers-only response with `grpc-status: n`
//! (any n ≥ 0, also codes gRPC does not define),
//! after-response kills send the response headers and a gRPC frame header
//! announcing 1024 bytes followed by only 95 of them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::grpc::{MockReply, MockRequest, decode_frame, encode_frame};

/// Boxed error used by the mock's bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RespBody = BoxBody<Bytes, BoxError>;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Upper bound of any delay the mock honours (longer values are clamped).
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// Upper bound of `/size/{n}`.
const MAX_SIZE: u64 = 1 << 30;
/// Upper bound of a gRPC request body the mock reads.
const MAX_GRPC_REQUEST: usize = 16 << 20;
/// Announced body length of the after-response kills.
const PARTIAL_ANNOUNCED: usize = 1024;
/// Body bytes actually sent by the after-response kills.
const PARTIAL_SENT: usize = 100;
/// Minimum wait between sending the partial body and killing the connection.
const MIN_FLUSH_WAIT: Duration = Duration::from_millis(5);
/// How long a clean close waits for the peer to close its side.
const CLOSE_DRAIN: Duration = Duration::from_secs(2);
/// How long a connection may stay silent before the first bytes are seen.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound of an upgraded echo session.
const UPGRADE_MAX: Duration = Duration::from_secs(300);

static FILLER: [u8; 65536] = [b'a'; 65536];

/// Options of a [`MockUpstream`].
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Put in the `x-served-by` response header (and gRPC `served_by`).
    pub name: String,
    /// 0.0..=1.0: probability that any request is answered `fail_code`
    /// instead of its normal behaviour.
    pub fail_rate: f64,
    /// Status of injected failures.
    pub fail_code: u16,
    /// 0.0..=1.0: probability that a request is first held for `slow`
    /// (the Istio demo backend's "slow half the time").
    pub slow_rate: f64,
    pub slow: std::time::Duration,
}

impl MockOptions {
    /// Named mock that never injects failures (`fail_code` 503).
    pub fn named(name: impl Into<String>) -> Self {
        MockOptions {
            name: name.into(),
            ..MockOptions::default()
        }
    }
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            name: "mock".to_owned(),
            fail_rate: 0.0,
            fail_code: 503,
            slow_rate: 0.0,
            slow: std::time::Duration::ZERO,
        }
    }
}

struct Shared {
    name: String,
    name_header: HeaderValue,
    /// `f64` bits, changeable while running ([`MockUpstream::set_fail_rate`]).
    fail_rate: AtomicU64,
    fail_code: StatusCode,
    slow_rate: f64,
    slow: std::time::Duration,
    requests: AtomicU64,
    connections: AtomicU64,
}

/// A running mock upstream. Dropping it (or [`MockUpstream::shutdown`]) stops
/// it; [`MockUpstream::stop`] also waits until the listener and every
/// connection are closed.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .field("name", &self.shared.name)
            .finish()
    }
}

impl MockUpstream {
    /// Binds `addr` (port 0 picks a free port) and starts serving.
    pub async fn start(addr: SocketAddr, opts: MockOptions) -> io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let fail_code = StatusCode::from_u16(opts.fail_code).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fail_code {}: {e}", opts.fail_code),
            )
        })?;
        let name_header = HeaderValue::from_str(&opts.name)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-name"));
        let shared = Arc::new(Shared {
            name: opts.name,
            name_header,
            fail_rate: AtomicU64::new(opts.fail_rate.clamp(0.0, 1.0).to_bits()),
            fail_code,
            slow_rate: opts.slow_rate.clamp(0.0, 1.0),
            slow: opts.slow,
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        Ok(MockUpstream {
            addr,
            shared,
            shutdown_tx,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configured name (`x-served-by`).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Requests received so far (HTTP/1.1, HTTP/2 and gRPC).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Changes the injected failure probability while running.
    pub fn set_fail_rate(&self, rate: f64) {
        self.shared
            .fail_rate
            .store(rate.clamp(0.0, 1.0).to_bits(), Ordering::SeqCst);
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Signals the mock to stop (listener and connections are closed
    /// asynchronously shortly after).
    pub fn shutdown(self) {
        drop(self);
    }

    /// Stops the mock and waits until its listener and all its connections
    /// are closed (the port can be bound again afterwards).
    pub async fn stop(mut self) {
        let _ = self.shutdown_tx.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
    }
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    // Resolves when the value becomes true or the sender is gone.
    let _ = rx.wait_for(|v| *v).await;
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        tokio::select! {
            _ = wait_true(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_conn(stream, peer, shared.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::debug!("mock accept error: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Peeks the first bytes: `Some(true)` for the HTTP/2 preface, `Some(false)`
/// for anything else, `None` if the peer closed before sending anything.
async fn detect_h2(stream: &TcpStream) -> io::Result<Option<bool>> {
    let mut buf = [0u8; 24];
    // Bounded: at most ~2000 partial peeks (the caller also applies a timeout).
    for _ in 0..2000 {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Some(false));
        }
        if n >= H2_PREFACE.len() {
            return Ok(Some(true));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(None)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    Reset,
    Close,
}

#[derive(Clone)]
struct ConnCtx {
    shared: Arc<Shared>,
    /// The client's address, sent back in `x-mock-peer`.
    peer: HeaderValue,
    is_h2: bool,
    kill_tx: mpsc::UnboundedSender<Kill>,
    closed: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
}

impl ConnCtx {
    /// Sleeps `d` unless the connection dies first; true if it slept fully.
    async fn sleep(&self, d: Duration) -> bool {
        let mut closed = self.closed.clone();
        tokio::select! {
            _ = tokio::time::sleep(d.min(MAX_DELAY)) => true,
            _ = wait_true(&mut closed) => false,
        }
    }

    /// Asks the connection task to kill the connection and waits (bounded)
    /// until it is gone; never yields a response.
    async fn kill(&self, mode: Kill) -> Result<Response<RespBody>, BoxError> {
        let _ = self.kill_tx.send(mode);
        let mut closed = self.closed.clone();
        let _ = tokio::time::timeout(Duration::from_secs(30), wait_true(&mut closed)).await;
        Err(format!("connection killed by mock ({mode:?})").into())
    }

    /// Streams `first` as the beginning of the response body, waits until it
    /// was taken by the connection, sleeps `ms` (at least [`MIN_FLUSH_WAIT`])
    /// and kills the connection. The returned body never ends by itself.
    fn partial_body(&self, first: Bytes, wait: Duration, mode: Kill) -> RespBody {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let ctx = self.clone();
        tokio::spawn(async move {
            if tx.send(Ok(Frame::data(first))).await.is_err() {
                return;
            }
            // Capacity 1: the permit is available once the frame was taken.
            let mut closed = ctx.closed.clone();
            let taken = tokio::select! {
                permit = tx.reserve() => permit.is_ok(),
                _ = wait_true(&mut closed) => false,
            };
            if !taken {
                return;
            }
            if ctx.sleep(wait.max(MIN_FLUSH_WAIT)).await {
                let _ = ctx.kill(mode).await;
            }
            drop(tx);
        });
        ChannelBody { rx }.boxed()
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let detected = tokio::select! {
        r = tokio::time::timeout(FIRST_BYTES_TIMEOUT, detect_h2(&stream)) => r,
        _ = wait_true(&mut shutdown) => return,
    };
    let is_h2 = match detected {
        Ok(Ok(Some(h2))) => h2,
        _ => return,
    };
    // Keep a duplicate of the socket so that the connection can be killed
    // (RST or FIN) whatever hyper is doing with it.
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    let Ok(dup) = std_stream.try_clone() else {
        return;
    };
    let Ok(stream) = TcpStream::from_std(std_stream) else {
        return;
    };

    let (kill_tx, mut kill_rx) = mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = watch::channel(false);
    let ctx = ConnCtx {
        shared,
        peer: HeaderValue::from_str(&peer.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        is_h2,
        kill_tx,
        closed: closed_rx,
        shutdown: shutdown.clone(),
    };
    let svc = service_fn(move |req| handle(ctx.clone(), req));
    let io = TokioIo::new(stream);
    let mut conn: Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>> = if is_h2 {
        Box::pin(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, svc),
        )
    } else {
        Box::pin(
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .serve_connection(io, svc)
                .with_upgrades(),
        )
    };
    let kill = tokio::select! {
        _ = &mut conn => None,
        k = kill_rx.recv() => k,
        _ = wait_true(&mut shutdown) => None,
    };
    match kill {
        Some(Kill::Reset) => {
            let _ = socket2::SockRef::from(&dup).set_linger(Some(Duration::ZERO));
            drop(conn);
            drop(dup);
            let _ = closed_tx.send(true);
        }
        Some(Kill::Close) => {
            let _ = dup.shutdown(Shutdown::Write);
            drop(conn);
            let _ = closed_tx.send(true);
            // Drain what the peer still sends until it closes too, so that the
            // final close does not turn into a RST because of unread data.
            if dup.set_nonblocking(true).is_ok()
                && let Ok(mut s) = TcpStream::from_std(dup)
            {
                let _ = tokio::time::timeout(CLOSE_DRAIN, async {
                    let mut buf = vec![0u8; 16384];
                    let mut total = 0usize;
                    while total < (64 << 20) {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => total += n,
                        }
                    }
                })
                .await;
            }
        }
        None => {
            drop(conn);
            drop(dup);
            let _ = closed_tx.send(true);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Status(u16),
    GrpcStatus(i32),
    Delay(Duration),
    ResetBefore(Duration),
    CloseBefore(Duration),
    ResetAfter(Duration),
    CloseAfter(Duration),
    Echo,
    Size(u64),
    UpgradeEcho,
    Default,
    Bad(String),
}

fn route(path: &str) -> Route {
    let path = path.split('?').next().unwrap_or("");
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let (head, arg) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    let ms = |f: fn(Duration) -> Route| match arg.parse::<u64>() {
        Ok(ms) => f(Duration::from_millis(ms).min(MAX_DELAY)),
        Err(_) => Route::Bad(format!("bad milliseconds {arg:?}")),
    };
    match head {
        "status" => match arg.parse::<u16>() {
            Ok(code) if (200..=999).contains(&code) => Route::Status(code),
            _ => Route::Bad(format!("bad status {arg:?}")),
        },
        "grpc-status" => match arg.parse::<i32>() {
            Ok(n) if n >= 0 => Route::GrpcStatus(n),
            _ => Route::Bad(format!("bad grpc-status {arg:?}")),
        },
        "delay" => ms(Route::Delay),
        "reset-before-response" => ms(Route::ResetBefore),
        "close-before-response" => ms(Route::CloseBefore),
        "reset-after-response" => ms(Route::ResetAfter),
        "close-after-response" => ms(Route::CloseAfter),
        "echo" if arg.is_empty() => Route::Echo,
        "size" => match arg.parse::<u64>() {
            Ok(n) if n <= MAX_SIZE => Route::Size(n),
            _ => Route::Bad(format!("bad size {arg:?}")),
        },
        "upgrade-echo" if arg.is_empty() => Route::UpgradeEcho,
        _ => Route::Default,
    }
}

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

fn empty() -> RespBody {
    Empty::<Bytes>::new()
        .map_err(|e: Infallible| match e {})
        .boxed()
}

fn response(status: StatusCode, content_type: &'static str, body: RespBody) -> Response<RespBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if !content_type.is_empty() {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    response(status, "text/plain", full(body))
}

fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn handle(ctx: ConnCtx, req: Request<Incoming>) -> Result<Response<RespBody>, BoxError> {
    ctx.shared.requests.fetch_add(1, Ordering::SeqCst);
    let is_grpc = ctx.is_h2
        && req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
    if ctx.shared.slow_rate > 0.0 && fastrand::f64() < ctx.shared.slow_rate {
        tokio::time::sleep(ctx.shared.slow).await;
    }
    let fail_rate = f64::from_bits(ctx.shared.fail_rate.load(Ordering::SeqCst));
    let injected = fail_rate > 0.0 && fastrand::f64() < fail_rate;
    let mut resp = if injected {
        let code = ctx.shared.fail_code;
        let body = if is_grpc {
            empty()
        } else {
            full(format!(
                "{{\"status\":{},\"injected\":true}}",
                code.as_u16()
            ))
        };
        let mut resp = response(code, "application/json", body);
        resp.headers_mut().insert(
            HeaderName::from_static("x-mock-injected"),
            HeaderValue::from_static("true"),
        );
        resp
    } else if is_grpc {
        handle_grpc(&ctx, req).await?
    } else {
        handle_http(&ctx, req).await?
    };
    resp.headers_mut().insert(
        HeaderName::from_static("x-served-by"),
        ctx.shared.name_header.clone(),
    );
    resp.headers_mut()
        .insert(HeaderName::from_static("x-mock-peer"), ctx.peer.clone());
    Ok(resp)
}

fn partial_http_response(ctx: &ConnCtx, wait: Duration, mode: Kill) -> Response<RespBody> {
    let body = ctx.partial_body(Bytes::from_static(&FILLER[..PARTIAL_SENT]), wait, mode);
    let mut resp = response(StatusCode::OK, "application/octet-stream", body);
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(PARTIAL_ANNOUNCED));
    resp
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

async fn handle_http(
    ctx: &ConnCtx,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, BoxError> {
    match route(req.uri().path()) {
        Route::Status(code) => Ok(response(
            status_code(code),
            "application/json",
            full(format!("{{\"status\":{code}}}")),
        )),
        Route::Delay(d) => {
            if !ctx.sleep(d).await {
                return Err("connection closed during delay".into());
            }
            Ok(text(StatusCode::OK, format!("delayed {}", d.as_millis())))
        }
        Route::ResetBefore(d) => {
            ctx.sleep(d).await;
            ctx.kill(Kill::Reset).await
        }
        Route::CloseBefore(d) => {
            ctx.sleep(d).await;
            ctx.kill(Kill::Close).await
        }
        Route::ResetAfter(d) => Ok(partial_http_response(ctx, d, Kill::Reset)),
        Route::CloseAfter(d) => Ok(partial_http_response(ctx, d, Kill::Close)),
        Route::Echo => {
            let seen = req.headers().get("x-request-id").cloned();
            let body = req.into_body().map_err(BoxError::from).boxed();
            let mut resp = response(StatusCode::OK, "application/octet-stream", body);
            if let Some(id) = seen {
                resp.headers_mut()
                    .insert(HeaderName::from_static("x-request-id-seen"), id);
            }
            Ok(resp)
        }
        Route::Size(n) => {
            let mut resp = response(
                StatusCode::OK,
                "application/octet-stream",
                RepeatBody { remaining: n }.boxed(),
            );
            resp.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(n));
            Ok(resp)
        }
        Route::UpgradeEcho => {
            let wants = !ctx.is_h2
                && has_token(req.headers(), CONNECTION, "upgrade")
                && has_token(req.headers(), UPGRADE, "echo");
            if !wants {
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    "upgrade-echo needs HTTP/1.1 with Connection: upgrade, Upgrade: echo",
                ));
            }
            let on_upgrade = hyper::upgrade::on(&mut req);
            let mut shutdown = ctx.shutdown.clone();
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let io = TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(io);
                tokio::select! {
                    _ = tokio::time::timeout(UPGRADE_MAX, tokio::io::copy(&mut r, &mut w)) => {}
                    _ = wait_true(&mut shutdown) => {}
                }
                let _ = w.shutdown().await;
            });
            let mut resp = response(StatusCode::SWITCHING_PROTOCOLS, "", empty());
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            resp.headers_mut()
                .insert(UPGRADE, HeaderValue::from_static("echo"));
            Ok(resp)
        }
        Route::Bad(msg) => Ok(text(StatusCode::BAD_REQUEST, msg)),
        Route::GrpcStatus(_) | Route::Default => Ok(text(StatusCode::OK, "ok")),
    }
}

fn grpc_headers(resp: &mut Response<RespBody>) {
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
}

fn grpc_trailers_only(code: i32, message: &str) -> Response<RespBody> {
    let mut resp = response(StatusCode::OK, "application/grpc", empty());
    resp.headers_mut().insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from(code),
    );
    if let Ok(msg) = HeaderValue::from_str(message) {
        resp.headers_mut()
            .insert(HeaderName::from_static("grpc-message"), msg);
    }
    resp
}

fn grpc_ok(name: &str, payload: Bytes) -> Response<RespBody> {
    let reply = MockReply {
        served_by: name.to_owned(),
        payload,
    };
    let mut trailers = HeaderMap::new();
    trailers.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from_static("0"),
    );
    let frames = VecDeque::from([Frame::data(encode_frame(&reply)), Frame::trailers(trailers)]);
    let mut resp = response(StatusCode::OK, "", FramesBody { frames }.boxed());
    grpc_headers(&mut resp);
    resp
}

fn grpc_partial(ctx: &ConnCtx, wait: Duration, mode: Kill) -> Response<RespBody> {
    let mut first = BytesMut::with_capacity(PARTIAL_SENT);
    first.put_u8(0);
    first.put_u32(PARTIAL_ANNOUNCED as u32);
    first.put_slice(&FILLER[..PARTIAL_SENT - 5]);
    let body = ctx.partial_body(first.freeze(), wait, mode);
    let mut resp = response(StatusCode::OK, "", body);
    grpc_headers(&mut resp);
    resp
}

async fn handle_grpc(
    ctx: &ConnCtx,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, BoxError> {
    let body = Limited::new(req.into_body(), MAX_GRPC_REQUEST)
        .collect()
        .await?
        .to_bytes();
    let msg: MockRequest = match decode_frame(&body) {
        Ok(m) => m,
        Err(e) => return Ok(grpc_trailers_only(13, &e)),
    };
    let name = ctx.shared.name.as_str();
    match route(&msg.path) {
        Route::Status(200) | Route::Default | Route::Echo | Route::UpgradeEcho => {
            Ok(grpc_ok(name, msg.payload))
        }
        Route::Status(code) => Ok(response(status_code(code), "text/plain", empty())),
        Route::GrpcStatus(n) => Ok(grpc_trailers_only(n, &format!("mock grpc-status {n}"))),
        Route::Delay(d) => {
            if !ctx.sleep(d).await {
                return Err("connection closed during delay".into());
            }
            Ok(grpc_ok(name, msg.payload))
        }
        Route::ResetBefore(d) => {
            ctx.sleep(d).await;
            ctx.kill(Kill::Reset).await
        }
        Route::CloseBefore(d) => {
            ctx.sleep(d).await;
            ctx.kill(Kill::Close).await
        }
        Route::ResetAfter(d) => Ok(grpc_partial(ctx, d, Kill::Reset)),
        Route::CloseAfter(d) => Ok(grpc_partial(ctx, d, Kill::Close)),
        Route::Size(n) => {
            let n = usize::try_from(n.min(MAX_GRPC_REQUEST as u64)).unwrap_or(0);
            Ok(grpc_ok(name, Bytes::from(vec![b'a'; n])))
        }
        Route::Bad(msg) => Ok(grpc_trailers_only(3, &msg)),
    }
}

/// Body fed by a channel (used for bodies that stop half-way).
struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}

/// Body of a fixed list of frames (data and trailers).
struct FramesBody {
    frames: VecDeque<Frame<Bytes>>,
}

impl Body for FramesBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.frames.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}

/// Body of `remaining` filler bytes, produced in 64 KiB chunks.
struct RepeatBody {
    remaining: u64,
}

impl Body for RepeatBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(FILLER.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &FILLER[..n as usize],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/status/503"), Route::Status(503));
        assert_eq!(
            route("/delay/100?x=1"),
            Route::Delay(Duration::from_millis(100))
        );
        assert_eq!(
            route("/reset-after-response/5"),
            Route::ResetAfter(Duration::from_millis(5))
        );
        assert_eq!(route("/grpc-status/14"), Route::GrpcStatus(14));
        assert_eq!(route("/size/10"), Route::Size(10));
        assert_eq!(route("/echo"), Route::Echo);
        assert_eq!(route("/"), Route::Default);
        assert_eq!(route("/anything/else"), Route::Default);
        assert!(matches!(route("/status/abc"), Route::Bad(_)));
        assert!(matches!(route("/status/100"), Route::Bad(_)));
    }
}
