//! HTTP plumbing shared by the generators: what to request ([`Endpoint`]),
//! hyper 1 client connections ([`Sender`]) and reading a whole response.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, HeaderName, HeaderValue, TE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nodeway_tests::grpc::{METHOD_PATH, MockRequest, encode_frame};
use tokio::net::TcpStream;

use super::{CONNECT_TIMEOUT, describe};

/// Request body type of every generator (empty for `GET`).
pub(super) type ReqBody = Full<Bytes>;

/// A response on its way, detached from its [`Sender`].
pub(super) type ResponseFuture =
    Pin<Box<dyn Future<Output = hyper::Result<Response<Incoming>>> + Send>>;

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Http1,
    H2,
    Grpc,
}

/// Where to connect and the request to send there, prepared once.
#[derive(Debug)]
pub(super) struct Endpoint {
    pub(super) addr: SocketAddr,
    proto: Proto,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Endpoint {
    /// HTTP/1.1 `GET path` with `host: authority` (and `connection: close`
    /// when `close`).
    pub(super) fn http1(
        addr: SocketAddr,
        authority: &str,
        path: &str,
        close: bool,
    ) -> Result<Endpoint, String> {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, header_value("authority", authority)?);
        if close {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(Endpoint {
            addr,
            proto: Proto::Http1,
            method: Method::GET,
            uri: origin_form(path)?,
            headers,
            body: Bytes::new(),
        })
    }

    /// HTTP/2 (prior knowledge) `GET path` with `:authority` = `authority`.
    pub(super) fn h2(addr: SocketAddr, authority: &str, path: &str) -> Result<Endpoint, String> {
        Ok(Endpoint {
            addr,
            proto: Proto::H2,
            method: Method::GET,
            uri: absolute_form(authority, path)?,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        })
    }

    /// Unary `nodeway.test.Mock/Call` asking the mock for `mock_path`.
    pub(super) fn grpc(
        addr: SocketAddr,
        authority: &str,
        mock_path: &str,
    ) -> Result<Endpoint, String> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        let body = encode_frame(&MockRequest {
            path: mock_path.to_owned(),
            payload: Bytes::new(),
        });
        Ok(Endpoint {
            addr,
            proto: Proto::Grpc,
            method: Method::POST,
            uri: absolute_form(authority, METHOD_PATH)?,
            headers,
            body,
        })
    }

    /// A fresh copy of the request (hyper consumes one per send).
    pub(super) fn request(&self) -> Request<ReqBody> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }

    /// A TCP connection with `TCP_NODELAY` (requests are small and latency
    /// is what we measure).
    pub(super) async fn connect_tcp(&self) -> Result<TcpStream, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| format!("connect: timed out after {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        Ok(stream)
    }

    /// A new client connection, its driver spawned on the current runtime.
    pub(super) async fn connect(&self) -> Result<Sender, String> {
        let io = TokioIo::new(self.connect_tcp().await?);
        match self.proto {
            Proto::Http1 => {
                let (sender, conn) = http1::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1 handshake: {}", describe(&e)))?;
                tokio::spawn(async move {
                    // Its errors reach the requests in flight.
                    let _ = conn.await;
                });
                Ok(Sender::H1(sender))
            }
            Proto::H2 | Proto::Grpc => {
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {}", describe(&e)))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Sender::H2(sender))
            }
        }
    }

    /// Reads the whole response and tells whether it is a success.
    pub(super) async fn check(&self, resp: Response<Incoming>) -> Result<(), String> {
        read_response(resp, self.proto == Proto::Grpc).await
    }
}

fn header_value(what: &str, v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|e| format!("bad {what} {v:?}: {e}"))
}

fn origin_form(path: &str) -> Result<Uri, String> {
    if !path.starts_with('/') {
        return Err(format!("bad path {path:?}: must start with '/'"));
    }
    path.parse().map_err(|e| format!("bad path {path:?}: {e}"))
}

/// `http://authority/path`: hyper's HTTP/2 client takes `:scheme` and
/// `:authority` from the URI.
fn absolute_form(authority: &str, path: &str) -> Result<Uri, String> {
    origin_form(path)?;
    format!("http://{authority}{path}")
        .parse()
        .map_err(|e| format!("bad authority {authority:?} or path {path:?}: {e}"))
}

/// The sending half of a client connection.
pub(super) enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

impl Sender {
    /// The connection is gone: a new one is needed.
    pub(super) fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Waits until a request can be sent (HTTP/1.1: the previous exchange is
    /// fully processed; HTTP/2: a stream is available).
    pub(super) async fn ready(&mut self) -> Result<(), String> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
        .map_err(|e| format!("connection not ready: {}", describe(&e)))
    }

    /// Queues `req` on the connection; the returned future is independent of
    /// `self`, so it can run in its own task.
    pub(super) fn send(&mut self, req: Request<ReqBody>) -> ResponseFuture {
        match self {
            Sender::H1(s) => Box::pin(s.send_request(req)),
            Sender::H2(s) => Box::pin(s.send_request(req)),
        }
    }
}

/// Reads the whole body of `resp` (so an HTTP/1.1 connection can carry the
/// next request) and checks it: a 2xx, or for gRPC HTTP 200 with
/// `grpc-status: 0` in the trailers (or the headers of a trailers-only
/// response).
pub(super) async fn read_response(resp: Response<Incoming>, grpc: bool) -> Result<(), String> {
    let (parts, mut body) = resp.into_parts();
    let mut grpc_status = parts.headers.get(GRPC_STATUS).cloned();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("response body: {}", describe(&e)))?;
        if let Some(trailers) = frame.trailers_ref()
            && let Some(status) = trailers.get(GRPC_STATUS)
        {
            grpc_status = Some(status.clone());
        }
    }
    if grpc {
        if parts.status != StatusCode::OK {
            return Err(format!("HTTP {}", parts.status));
        }
        match grpc_status {
            Some(s) if s == "0" => Ok(()),
            Some(s) => Err(format!(
                "grpc-status {}",
                String::from_utf8_lossy(s.as_bytes())
            )),
            None => Err("gRPC response without grpc-status".to_owned()),
        }
    } else if parts.status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", parts.status))
    }
}
