//! `pod-client`: a test client meant to run inside a pod network namespace
//! (see `nodeway_tests::topology::Topology::spawn`/`run`). It dials whatever
//! address it is given, from the namespace it runs in: the topology tests
//! only ever run it inside their namespaces.
//!
//! Prints one JSON object per line on stdout. Exits 0 when it ran (also when
//! the request failed or got a 5xx: that is in the JSON), 2 on bad arguments.
//!
//! ```text
//! pod-client http <url> [--h2] [--method M] [--body-size N] [--header K:V]... [--timeout-secs S]
//!   {"status":200,"body_len":N,"body_sha":"<fnv1a-64 hex>","headers":{...},"elapsed_ms":T}
//!   {"error":"connect 10.0.0.3:8080: ...","elapsed_ms":T}
//! pod-client grpc <host:port> [--path /pkg.Svc/Method] [--mock-path /status/200]
//!                 [--payload-size N] [--timeout-secs S]
//!   {"http_status":200,"grpc_status":0,"served_by":"...","payload_len":N,"elapsed_ms":T}
//! pod-client echo-check <url> [--conns 200] [--size 1048576] [--h2] [--timeout-secs 60]
//!   {"ok":n,"failed":m,"errors":["first 5 messages"],"elapsed_ms":T}
//! ```
//!
//! `http` sends `--body-size` bytes of the deterministic pattern of seed 0
//! (POST unless `--method` says otherwise). `grpc` makes one unary call of the
//! mock's `nodeway.test.Mock/Call` (`MockRequest { path: --mock-path,
//! payload }`) over HTTP/2 with prior knowledge. `echo-check` opens `--conns`
//! concurrent TCP connections, each POSTing `--size` bytes of its own
//! pseudo-random pattern to the URL (the mock's `/echo`) and checking that
//! the response body is byte-identical.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodeway_tests::clients::error_chain;
use nodeway_tests::grpc::{METHOD_PATH, MockReply, MockRequest, decode_frame, encode_frame};
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const USAGE: &str = "usage:
  pod-client http <url> [--h2] [--method M] [--body-size N] [--header K:V]... [--timeout-secs S]
  pod-client grpc <host:port> [--path /pkg.Svc/Method] [--mock-path P] [--payload-size N] [--timeout-secs S]
  pod-client echo-check <url> [--conns N] [--size N] [--h2] [--timeout-secs S]";

/// Largest body `http`/`grpc` keep in memory (the rest is only counted).
const MAX_KEEP: usize = 16 << 20;
/// Largest `--conns` accepted.
const MAX_CONNS: usize = 10_000;
/// Chunk size of the generated request bodies.
const CHUNK: usize = 64 << 10;

// ---------------------------------------------------------------- pattern

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with bytes `pos..pos + buf.len()` of the pattern of `seed`
/// (random access: byte `p` is byte `p % 8` of `splitmix64(seed ^ p / 8)`).
fn fill_pattern(seed: u64, pos: u64, buf: &mut [u8]) {
    let key = splitmix64(seed);
    let mut p = pos;
    let mut i = 0;
    while i < buf.len() {
        let word = splitmix64(key ^ (p / 8)).to_le_bytes();
        let off = (p % 8) as usize;
        let n = (8 - off).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[off..off + n]);
        i += n;
        p += n as u64;
    }
}

/// Request body of `len` pattern bytes, generated in chunks (exact size
/// hint, so HTTP/1.1 sends a content-length).
struct PatternBody {
    seed: u64,
    pos: u64,
    len: u64,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let left = self.len - self.pos;
        if left == 0 {
            return Poll::Ready(None);
        }
        let n = left.min(CHUNK as u64) as usize;
        let mut buf = BytesMut::zeroed(n);
        fill_pattern(self.seed, self.pos, &mut buf);
        self.pos += n as u64;
        Poll::Ready(Some(Ok(Frame::data(buf.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos == self.len
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.pos)
    }
}

/// FNV-1a 64.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
}

// ---------------------------------------------------------------- arguments

struct Target {
    addr: SocketAddr,
    authority: String,
    path: String,
}

fn parse_authority(authority: &str, default_port: u16) -> Result<SocketAddr, String> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && !p.contains(']') => (
            h,
            p.parse::<u16>()
                .map_err(|e| format!("bad port in {authority:?}: {e}"))?,
        ),
        _ => (authority, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host:?} has no address"))
}

fn parse_url(url: &str) -> Result<Target, String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad url {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("url {url:?}: only http:// is supported"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("url {url:?} has no host"))?
        .as_str()
        .to_owned();
    let addr = parse_authority(&authority, 80)?;
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let path = if path.is_empty() {
        "/".to_owned()
    } else {
        path
    };
    Ok(Target {
        addr,
        authority,
        path,
    })
}

struct Opts {
    positional: Vec<String>,
    h2: bool,
    method: Option<Method>,
    body_size: u64,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    conns: usize,
    size: u64,
    path: String,
    mock_path: String,
    payload_size: usize,
}

fn parse_opts(args: &[String], default_timeout: u64) -> Result<Opts, String> {
    let mut o = Opts {
        positional: Vec::new(),
        h2: false,
        method: None,
        body_size: 0,
        headers: Vec::new(),
        timeout: Duration::from_secs(default_timeout),
        conns: 200,
        size: 1 << 20,
        path: METHOD_PATH.to_owned(),
        mock_path: "/status/200".to_owned(),
        payload_size: 0,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag {
            "-h" | "--help" => return Err(String::new()),
            "--h2" => o.h2 = true,
            "--method" => {
                let v = value()?;
                o.method = Some(
                    Method::from_bytes(v.as_bytes()).map_err(|e| format!("--method {v}: {e}"))?,
                );
            }
            "--body-size" => o.body_size = num(value()?)?,
            "--header" => {
                let v = value()?;
                let (k, val) = v
                    .split_once(':')
                    .ok_or_else(|| format!("--header {v:?}: expected K:V"))?;
                let k = HeaderName::from_bytes(k.trim().as_bytes())
                    .map_err(|e| format!("--header {v:?}: {e}"))?;
                let val = HeaderValue::from_str(val.trim())
                    .map_err(|e| format!("--header {v:?}: {e}"))?;
                o.headers.push((k, val));
            }
            "--timeout-secs" => o.timeout = Duration::from_secs(num(value()?)?.clamp(1, 3600)),
            "--conns" => {
                let n = num(value()?)?;
                if n == 0 || n > MAX_CONNS as u64 {
                    return Err(format!("--conns {n}: must be within 1..={MAX_CONNS}"));
                }
                o.conns = n as usize;
            }
            "--size" => o.size = num(value()?)?,
            "--path" => o.path = value()?,
            "--mock-path" => o.mock_path = value()?,
            "--payload-size" => {
                o.payload_size = usize::try_from(num(value()?)?)
                    .unwrap_or(MAX_KEEP)
                    .min(MAX_KEEP)
            }
            f if f.starts_with("--") => return Err(format!("unknown option {f}")),
            _ => o.positional.push(arg.clone()),
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------- HTTP

/// Aborts the connection task when dropped.
struct ConnTask(JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Resp {
    status: u16,
    headers: HeaderMap,
    body_len: u64,
    /// Error after the response headers (body cut short).
    error: Option<String>,
}

/// Sends one request on a fresh connection to `t.addr` and feeds the
/// response body to `sink`. `Err` if no response headers arrived.
async fn http_request<B>(
    t: &Target,
    h2: bool,
    mut req: Request<B>,
    mut sink: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<Resp, String>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(t.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", t.addr))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let (resp, _conn) = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("http2 handshake: {}", error_chain(&e)))?;
        let conn = ConnTask(tokio::spawn(async move {
            let _ = conn.await;
        }));
        *req.uri_mut() = format!("http://{}{}", t.authority, t.path)
            .parse()
            .map_err(|e| format!("bad uri: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| error_chain(&e))?;
        (resp, conn)
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("http1 handshake: {}", error_chain(&e)))?;
        let conn = ConnTask(tokio::spawn(async move {
            let _ = conn.await;
        }));
        *req.uri_mut() = t.path.parse().map_err(|e| format!("bad path: {e}"))?;
        if !req.headers().contains_key(HOST) {
            let host = HeaderValue::from_str(&t.authority)
                .map_err(|e| format!("bad authority {:?}: {e}", t.authority))?;
            req.headers_mut().insert(HOST, host);
        }
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| error_chain(&e))?;
        (resp, conn)
    };
    let (parts, mut body) = resp.into_parts();
    let mut out = Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body_len: 0,
        error: None,
    };
    // Bounded by the peer: every iteration consumes a frame.
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    out.body_len += data.len() as u64;
                    if let Err(e) = sink(data) {
                        out.error = Some(e);
                        break;
                    }
                } else if let Ok(trailers) = frame.into_trailers() {
                    out.headers.extend(trailers);
                }
            }
            Some(Err(e)) => {
                out.error = Some(format!("response body: {}", error_chain(&e)));
                break;
            }
        }
    }
    Ok(out)
}

fn headers_json(h: &HeaderMap) -> Value {
    let mut m = Map::new();
    for name in h.keys() {
        let v: Vec<String> = h
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        m.insert(name.as_str().to_owned(), Value::String(v.join(", ")));
    }
    Value::Object(m)
}

fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn cmd_http(o: Opts) -> Result<Value, String> {
    let [url] = o.positional.as_slice() else {
        return Err("http needs exactly one <url>".to_owned());
    };
    let t = parse_url(url)?;
    let method = o.method.clone().unwrap_or(if o.body_size > 0 {
        Method::POST
    } else {
        Method::GET
    });
    let mut req = Request::builder()
        .method(method)
        .body(PatternBody {
            seed: 0,
            pos: 0,
            len: o.body_size,
        })
        .map_err(|e| format!("bad request: {e}"))?;
    for (k, v) in &o.headers {
        req.headers_mut().append(k.clone(), v.clone());
    }
    let start = Instant::now();
    let mut fnv = Fnv::new();
    let res = tokio::time::timeout(
        o.timeout,
        http_request(&t, o.h2, req, |d| {
            fnv.update(d);
            Ok(())
        }),
    )
    .await;
    Ok(match res {
        Err(_) => {
            json!({"error": format!("timeout after {:?}", o.timeout), "elapsed_ms": elapsed_ms(start)})
        }
        Ok(Err(e)) => json!({"error": e, "elapsed_ms": elapsed_ms(start)}),
        Ok(Ok(r)) => {
            let mut v = json!({
                "status": r.status,
                "body_len": r.body_len,
                "body_sha": format!("{:016x}", fnv.0),
                "headers": headers_json(&r.headers),
                "elapsed_ms": elapsed_ms(start),
            });
            if let Some(e) = r.error {
                v["error"] = Value::String(e);
            }
            v
        }
    })
}

fn grpc_status_of(h: &HeaderMap) -> Option<i64> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

async fn cmd_grpc(o: Opts) -> Result<Value, String> {
    let [authority] = o.positional.as_slice() else {
        return Err("grpc needs exactly one <host:port>".to_owned());
    };
    let t = Target {
        addr: parse_authority(authority, 80)?,
        authority: authority.clone(),
        path: o.path.clone(),
    };
    let frame = encode_frame(&MockRequest {
        path: o.mock_path.clone(),
        payload: Bytes::from(vec![b'p'; o.payload_size]),
    });
    let req = Request::builder()
        .method(Method::POST)
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Full::new(frame))
        .map_err(|e| format!("bad request: {e}"))?;
    let start = Instant::now();
    let mut body = Vec::new();
    let res = tokio::time::timeout(
        o.timeout,
        http_request(&t, true, req, |d| {
            if body.len() + d.len() > MAX_KEEP {
                return Err(format!("response larger than {MAX_KEEP} bytes"));
            }
            body.extend_from_slice(d);
            Ok(())
        }),
    )
    .await;
    Ok(match res {
        Err(_) => {
            json!({"error": format!("timeout after {:?}", o.timeout), "elapsed_ms": elapsed_ms(start)})
        }
        Ok(Err(e)) => json!({"error": e, "elapsed_ms": elapsed_ms(start)}),
        Ok(Ok(r)) => {
            // Trailers were merged into the headers; a trailers-only
            // response carries grpc-status in the headers.
            let mut v = json!({
                "http_status": r.status,
                "grpc_status": grpc_status_of(&r.headers),
                "elapsed_ms": elapsed_ms(start),
            });
            if let Some(m) = r.headers.get("grpc-message").and_then(|m| m.to_str().ok()) {
                v["grpc_message"] = Value::String(m.to_owned());
            }
            if !body.is_empty() {
                match decode_frame::<MockReply>(&body) {
                    Ok(reply) => {
                        v["served_by"] = Value::String(reply.served_by);
                        v["payload_len"] = json!(reply.payload.len());
                    }
                    Err(e) => v["decode_error"] = Value::String(e),
                }
            }
            if let Some(e) = r.error {
                v["error"] = Value::String(e);
            }
            v
        }
    })
}

/// Compares received bytes with the pattern as they arrive.
struct Verifier {
    seed: u64,
    pos: u64,
    scratch: Vec<u8>,
}

impl Verifier {
    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        self.scratch.resize(data.len(), 0);
        fill_pattern(self.seed, self.pos, &mut self.scratch);
        if let Some(i) = data.iter().zip(&self.scratch).position(|(a, b)| a != b) {
            return Err(format!(
                "body differs at byte {} (got {:#04x}, sent {:#04x})",
                self.pos + i as u64,
                data[i],
                self.scratch[i]
            ));
        }
        self.pos += data.len() as u64;
        Ok(())
    }
}

async fn echo_one(t: Arc<Target>, h2: bool, conn: usize, size: u64) -> Result<(), String> {
    let seed = conn as u64 + 1;
    let req = Request::builder()
        .method(Method::POST)
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(PatternBody {
            seed,
            pos: 0,
            len: size,
        })
        .map_err(|e| format!("bad request: {e}"))?;
    let mut v = Verifier {
        seed,
        pos: 0,
        scratch: Vec::new(),
    };
    let r = http_request(&t, h2, req, |d| v.feed(d)).await?;
    if let Some(e) = r.error {
        return Err(e);
    }
    if r.status != 200 {
        return Err(format!("status {}", r.status));
    }
    if r.body_len != size {
        return Err(format!("received {} bytes, sent {size}", r.body_len));
    }
    Ok(())
}

async fn cmd_echo_check(o: Opts) -> Result<Value, String> {
    let [url] = o.positional.as_slice() else {
        return Err("echo-check needs exactly one <url>".to_owned());
    };
    let t = Arc::new(parse_url(url)?);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + o.timeout;
    let tasks: Vec<_> = (0..o.conns)
        .map(|i| {
            let t = t.clone();
            let (h2, size) = (o.h2, o.size);
            tokio::spawn(async move {
                match tokio::time::timeout_at(deadline, echo_one(t, h2, i, size)).await {
                    Ok(r) => r.map_err(|e| format!("conn {i}: {e}")),
                    Err(_) => Err(format!("conn {i}: timeout")),
                }
            })
        })
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("task: {e}"));
                }
            }
        }
    }
    Ok(json!({"ok": ok, "failed": failed, "errors": errors, "elapsed_ms": elapsed_ms(start)}))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let default_timeout = if cmd == "echo-check" { 60 } else { 10 };
    let opts = match parse_opts(rest, default_timeout) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("pod-client: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pod-client: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        match cmd.as_str() {
            "http" => cmd_http(opts).await,
            "grpc" => cmd_grpc(opts).await,
            "echo-check" => cmd_echo_check(opts).await,
            other => Err(format!("unknown command {other:?}")),
        }
    });
    match res {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pod-client: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_random_access() {
        let mut whole = vec![0u8; 1000];
        fill_pattern(7, 0, &mut whole);
        for (pos, len) in [(0usize, 1usize), (3, 17), (8, 8), (999, 1), (5, 900)] {
            let mut part = vec![0u8; len];
            fill_pattern(7, pos as u64, &mut part);
            assert_eq!(part, whole[pos..pos + len]);
        }
        let mut other = vec![0u8; 1000];
        fill_pattern(8, 0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn urls() {
        let t = parse_url("http://10.96.0.10/").unwrap();
        assert_eq!(t.addr, "10.96.0.10:80".parse().unwrap());
        assert_eq!(t.path, "/");
        let t = parse_url("http://10.0.0.3:8080/echo?x=1").unwrap();
        assert_eq!(t.addr, "10.0.0.3:8080".parse().unwrap());
        assert_eq!(t.authority, "10.0.0.3:8080");
        assert_eq!(t.path, "/echo?x=1");
        assert!(parse_url("https://10.0.0.3/").is_err());
    }
}
