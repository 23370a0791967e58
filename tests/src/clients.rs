//! Protocol clients that connect from a chosen loopback source IP (the proxy
//! identifies the client pod by source IP, e.g. 127.0.1.5).
//!
//! Every call opens one fresh TCP connection and closes it when done.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint};

use crate::grpc::{METHOD_PATH, MockReply, MockRequest, encode_frame};

/// Protocol spoken by a client call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 cleartext with prior knowledge.
    Http2,
    /// Unary gRPC (tonic client) over HTTP/2 cleartext.
    Grpc,
}

impl Proto {
    /// All protocols, for table-driven tests.
    pub const ALL: [Proto; 3] = [Proto::Http1, Proto::Http2, Proto::Grpc];
}

/// What a client call observed.
///
/// For [`Proto::Grpc`]:
/// - `status`: the HTTP status of the response headers if any were received
///   (200 for gRPC responses, e.g. 503 for a plain HTTP error), else `None`;
/// - `grpc_status`: the `grpc-status` actually received, from the trailers or
///   from the headers of a trailers-only response; `None` if none arrived
///   (transport error, plain HTTP error response);
/// - `grpc_code`: the code the tonic client reported (0 on success), which
///   includes codes tonic synthesizes (e.g. 14 Unavailable for an HTTP 503,
///   13/2 for a broken stream); `None` only if the call did not finish;
/// - `body`: the reply's `payload`;
/// - `body_complete`: true iff the response ended with a grpc-status
///   (trailers, or trailers-only headers) and without a body error;
/// - `error`: `None` on success, else the tonic status text
///   (`"grpc <Code>: <message>"` plus its source chain) or a timeout/connect
///   error.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// HTTP status; `None` if no response headers were received.
    pub status: Option<u16>,
    /// grpc-status received (trailers or trailers-only headers); `None` for
    /// non-gRPC calls.
    pub grpc_status: Option<i32>,
    /// Code reported by the tonic client (gRPC calls only).
    pub grpc_code: Option<i32>,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response trailers (empty if none).
    pub trailers: HeaderMap,
    /// Response body received (possibly partial).
    pub body: Bytes,
    /// False if the body ended in an error (truncated) or was not finished.
    pub body_complete: bool,
    /// Transport / protocol error text, if any.
    pub error: Option<String>,
    /// True if the call hit its timeout.
    pub timed_out: bool,
    /// Time the whole call took.
    pub elapsed: Duration,
}

impl Outcome {
    /// A response header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-served-by` header set by the mock upstream.
    pub fn served_by(&self) -> Option<&str> {
        self.header("x-served-by")
    }

    /// The body as (lossy) UTF-8.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Formats an error with its `source()` chain.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    // Bounded: error chains are short, cap at 16 links anyway.
    for _ in 0..16 {
        let Some(src) = cur else { break };
        let t = src.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = src.source();
    }
    s
}

/// Connects to `dst` from `src` (bound to `src:0`). Both must be loopback
/// addresses (`src` may also be unspecified).
pub async fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    if !dst.ip().is_loopback() || !(src.is_loopback() || src.is_unspecified()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("test traffic must stay on loopback: {src} -> {dst}"),
        ));
    }
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(src, 0))?;
    let stream = socket.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Where a call goes: from `src` to `proxy`, for `authority`.
#[derive(Clone, Copy)]
struct Dest<'a> {
    proxy: SocketAddr,
    src: IpAddr,
    authority: &'a str,
}

/// Aborts (and so closes the connection of) a spawned connection task.
struct ConnTask(Option<JoinHandle<()>>);

impl ConnTask {
    fn spawn<F>(fut: F) -> Self
    where
        F: Future + Send + 'static,
    {
        ConnTask(Some(tokio::spawn(async move {
            let _ = fut.await;
        })))
    }

    /// Aborts the task and waits until it is gone (its socket closed).
    async fn close(mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
            let _ = h.await;
        }
    }
}

impl Drop for ConnTask {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

fn method_for(body: &Bytes) -> Method {
    if body.is_empty() {
        Method::GET
    } else {
        Method::POST
    }
}

/// Opens a connection and sends one request; returns the response future's
/// output and the connection task.
async fn send_http(
    proto: Proto,
    dest: Dest<'_>,
    req: Request<Full<Bytes>>,
    conn_slot: &mut Option<ConnTask>,
) -> Result<Response<Incoming>, String> {
    let Dest {
        proxy,
        src,
        authority,
    } = dest;
    let stream = connect_from(src, proxy)
        .await
        .map_err(|e| format!("connect {src} -> {proxy}: {e}"))?;
    let io = TokioIo::new(stream);
    match proto {
        Proto::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("http1 handshake: {}", error_chain(&e)))?;
            *conn_slot = Some(ConnTask::spawn(conn));
            sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready: {}", error_chain(&e)))?;
            let mut req = req;
            if !req.headers().contains_key(HOST) {
                let host = HeaderValue::from_str(authority)
                    .map_err(|e| format!("bad authority {authority:?}: {e}"))?;
                req.headers_mut().insert(HOST, host);
            }
            sender.send_request(req).await.map_err(|e| error_chain(&e))
        }
        Proto::Http2 | Proto::Grpc => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("http2 handshake: {}", error_chain(&e)))?;
            *conn_slot = Some(ConnTask::spawn(conn));
            sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready: {}", error_chain(&e)))?;
            sender.send_request(req).await.map_err(|e| error_chain(&e))
        }
    }
}

fn build_request(
    proto: Proto,
    authority: &str,
    path: &str,
    method: Method,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, String> {
    let uri = match proto {
        Proto::Http1 => path.to_owned(),
        Proto::Http2 | Proto::Grpc => format!("http://{authority}{path}"),
    };
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(body))
        .map_err(|e| format!("bad request {authority:?} {path:?}: {e}"))
}

async fn http_call(
    proto: Proto,
    dest: Dest<'_>,
    path: &str,
    body: Bytes,
    out: &mut Outcome,
    buf: &mut BytesMut,
) -> Result<(), String> {
    let mut conn = None;
    let method = method_for(&body);
    let head = method == Method::HEAD;
    let req = build_request(proto, dest.authority, path, method, body)?;
    let resp = send_http(proto, dest, req, &mut conn).await?;
    let (parts, mut body) = resp.into_parts();
    out.status = Some(parts.status.as_u16());
    out.headers = parts.headers;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => buf.extend_from_slice(&data),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        out.trailers.extend(t);
                    }
                }
            },
            Some(Err(e)) => return Err(error_chain(&e)),
        }
    }
    // hyper turns an HTTP/2 RST_STREAM(NO_ERROR/CANCEL) into a clean end of
    // body: check the announced length as well.
    let announced = out
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let no_body = head || matches!(parts.status.as_u16(), 204 | 304);
    if let Some(n) = announced
        && !no_body
        && n != buf.len()
    {
        return Err(format!(
            "body length mismatch: content-length {n}, received {}",
            buf.len()
        ));
    }
    out.body_complete = true;
    if let Some(c) = conn {
        c.close().await;
    }
    Ok(())
}

/// What the gRPC recorder saw on the wire.
#[derive(Debug, Default)]
struct GrpcObs {
    status: Option<u16>,
    headers: HeaderMap,
    trailers: HeaderMap,
    body_error: Option<String>,
}

fn grpc_status_of(h: &HeaderMap) -> Option<i32> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// Wraps a tonic channel to record the HTTP status, headers and trailers.
#[derive(Clone)]
struct Recorder {
    inner: Channel,
    obs: Arc<Mutex<GrpcObs>>,
}

impl Service<http::Request<tonic::body::Body>> for Recorder {
    type Response = http::Response<RecBody>;
    type Error = tonic::transport::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let fut = Service::call(&mut self.inner, req);
        let obs = self.obs.clone();
        Box::pin(async move {
            let resp = fut.await?;
            if let Ok(mut o) = obs.lock() {
                o.status = Some(resp.status().as_u16());
                o.headers = resp.headers().clone();
            }
            Ok(resp.map(|inner| RecBody { inner, obs }))
        })
    }
}

struct RecBody {
    inner: tonic::body::Body,
    obs: Arc<Mutex<GrpcObs>>,
}

impl Body for RecBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(r)) = &res
            && let Ok(mut o) = self.obs.lock()
        {
            match r {
                Ok(frame) => {
                    if let Some(t) = frame.trailers_ref() {
                        o.trailers.extend(t.clone());
                    }
                }
                Err(e) => o.body_error = Some(error_chain(e)),
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Connector handing tonic a connection from `src` to `dst`, whatever the URI.
#[derive(Clone, Copy)]
struct SrcConnector {
    src: IpAddr,
    dst: SocketAddr,
}

impl Service<Uri> for SrcConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let SrcConnector { src, dst } = *self;
        Box::pin(async move { connect_from(src, dst).await.map(TokioIo::new) })
    }
}

async fn grpc_call(
    dest: Dest<'_>,
    path: &str,
    body: Bytes,
    obs: Arc<Mutex<GrpcObs>>,
    out: &mut Outcome,
) -> Result<(), String> {
    let Dest {
        proxy,
        src,
        authority,
    } = dest;
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| format!("bad authority {authority:?}: {}", error_chain(&e)))?;
    let channel = endpoint
        .connect_with_connector(SrcConnector { src, dst: proxy })
        .await
        .map_err(|e| format!("connect {src} -> {proxy}: {}", error_chain(&e)))?;
    let mut client = tonic::client::Grpc::new(Recorder {
        inner: channel,
        obs,
    });
    client
        .ready()
        .await
        .map_err(|e| format!("channel not ready: {}", error_chain(&e)))?;
    let req = tonic::Request::new(MockRequest {
        path: path.to_owned(),
        payload: body,
    });
    let res = client
        .unary::<MockRequest, MockReply, _>(
            req,
            http::uri::PathAndQuery::from_static(METHOD_PATH),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    match res {
        Ok(reply) => {
            out.grpc_code = Some(0);
            out.body = reply.into_inner().payload;
            Ok(())
        }
        Err(status) => {
            out.grpc_code = Some(status.code() as i32);
            let mut text = format!("grpc {:?}: {}", status.code(), status.message());
            if let Some(src) = std::error::Error::source(&status) {
                text.push_str(": ");
                text.push_str(&error_chain(src));
            }
            Err(text)
        }
    }
}

/// Sends one request over a fresh connection from `src` to `proxy` with the
/// given authority (Host / :authority) and path. GET if `body` is empty, else
/// POST. For [`Proto::Grpc`] a tonic unary call to `/nodeway.test.Mock/Call`
/// with `MockRequest { path, payload: body }` (see [`Outcome`] for how the
/// result maps). Never panics; errors and timeouts are reported in the
/// outcome.
pub async fn request(
    proto: Proto,
    proxy: SocketAddr,
    src: IpAddr,
    authority: &str,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Outcome {
    let start = Instant::now();
    let dest = Dest {
        proxy,
        src,
        authority,
    };
    let mut out = Outcome::default();
    let res = match proto {
        Proto::Http1 | Proto::Http2 => {
            let mut buf = BytesMut::new();
            let r = tokio::time::timeout(
                timeout,
                http_call(proto, dest, path, body, &mut out, &mut buf),
            )
            .await;
            out.body = buf.freeze();
            r
        }
        Proto::Grpc => {
            let obs = Arc::new(Mutex::new(GrpcObs::default()));
            let r =
                tokio::time::timeout(timeout, grpc_call(dest, path, body, obs.clone(), &mut out))
                    .await;
            let o = match obs.lock() {
                Ok(mut o) => std::mem::take(&mut *o),
                Err(_) => GrpcObs::default(),
            };
            out.status = o.status;
            out.grpc_status = grpc_status_of(&o.trailers).or_else(|| grpc_status_of(&o.headers));
            out.body_complete = out.grpc_status.is_some() && o.body_error.is_none();
            out.headers = o.headers;
            out.trailers = o.trailers;
            r
        }
    };
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            out.error = Some(e);
            if proto != Proto::Grpc {
                out.body_complete = false;
            }
        }
        Err(_) => {
            out.error = Some(format!("timeout after {timeout:?}"));
            out.timed_out = true;
            out.body_complete = false;
        }
    }
    out.elapsed = start.elapsed();
    out
}

/// Sends a request like [`request`] (for gRPC: a hand-built gRPC POST to
/// `/nodeway.test.Mock/Call` over HTTP/2), waits `abort_after` (reading the
/// response meanwhile, if any) and then drops the connection (client
/// disconnect). Returns once the socket is closed.
pub async fn request_and_abort(
    proto: Proto,
    proxy: SocketAddr,
    src: IpAddr,
    authority: &str,
    path: &str,
    abort_after: Duration,
) {
    let mut conn: Option<ConnTask> = None;
    let _ = tokio::time::timeout(abort_after, async {
        let req = match proto {
            Proto::Http1 | Proto::Http2 => {
                build_request(proto, authority, path, Method::GET, Bytes::new())
            }
            Proto::Grpc => {
                let frame = encode_frame(&MockRequest {
                    path: path.to_owned(),
                    payload: Bytes::new(),
                });
                build_request(proto, authority, METHOD_PATH, Method::POST, frame).map(|mut r| {
                    let h = r.headers_mut();
                    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                    h.insert("te", HeaderValue::from_static("trailers"));
                    r
                })
            }
        };
        if let Ok(req) = req
            && let Ok(resp) = send_http(
                proto,
                Dest {
                    proxy,
                    src,
                    authority,
                },
                req,
                &mut conn,
            )
            .await
        {
            let _ = resp.into_body().collect().await;
        }
        std::future::pending::<()>().await;
    })
    .await;
    if let Some(c) = conn {
        c.close().await;
    }
}

/// Writes `bytes_to_send` on a fresh connection from `src` and returns what
/// came back until EOF, a read error or `read_timeout` (total) elapsed
/// (at most 16 MiB).
pub async fn raw_exchange(
    proxy: SocketAddr,
    src: IpAddr,
    bytes_to_send: &[u8],
    read_timeout: Duration,
) -> Vec<u8> {
    let mut received = Vec::new();
    let Ok(mut stream) = connect_from(src, proxy).await else {
        return received;
    };
    if stream.write_all(bytes_to_send).await.is_err() {
        return received;
    }
    let _ = tokio::time::timeout(read_timeout, async {
        let mut buf = vec![0u8; 16384];
        while received.len() < (16 << 20) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    received
}
