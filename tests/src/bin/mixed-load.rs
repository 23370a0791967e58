//! `mixed-load`: the traffic of one client pod during an upgrade test, run
//! inside the pod's network namespace (`Topology::spawn`); it only dials the
//! addresses it is given, which exist only in the test topology.
//!
//! ```text
//! mixed-load --http VIP:PORT --authority HOST --tcp VIP:PORT --seconds S --tag T --ids-file F
//!            [--h1-conns 8 --h1-rate 250] [--h2-conns 2 --h2-rate 150] [--grpc-rate 100]
//!            [--new-conn-rate 50] [--tcp-streams 10] [--latency-file F]
//! ```
//!
//! For `--seconds`, all at once, each at a fixed rate: HTTP/1.1 on
//! keep-alive connections, HTTP/2 streams on shared connections, gRPC unary
//! calls on one HTTP/2 connection, HTTP/1.1 on a new connection per request,
//! and TCP streams that send a line every 100 ms and expect it echoed.
//! Behaves as a correct client does: a connection the server closed after a
//! response (`Connection: close`, GOAWAY) is replaced before the next
//! request; a request the server provably did not process (hyper gives it
//! back unsent) goes on a new connection. Every request carries
//! `x-request-id: T-KIND-N`; the ids that got a response go to the ids file.
//! A TCP stream the server ends with FIN between messages is reopened.
//!
//! Prints one JSON object: per kind `sent`, `ok`, `failed` and up to 5
//! `errors`; for TCP also `messages` and `reopened`; and `start_unix_ms`.
//! With `--latency-file`, one line per answered HTTP request: its start (ms
//! after `start_unix_ms`) and latency (µs).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST};
use http::{Method, Request};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodeway_tests::clients::error_chain;
use nodeway_tests::grpc::{METHOD_PATH, MockRequest, encode_frame};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest wait for one response or echo.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Period of each TCP stream's message.
const TCP_PERIOD: Duration = Duration::from_millis(100);

#[derive(Clone)]
struct Args {
    http: SocketAddr,
    authority: String,
    tcp: Option<SocketAddr>,
    seconds: u64,
    tag: String,
    ids_file: String,
    latency_file: Option<String>,
    h1_conns: u32,
    h1_rate: u32,
    h2_conns: u32,
    h2_rate: u32,
    grpc_rate: u32,
    new_conn_rate: u32,
    tcp_streams: u32,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        http: "127.0.0.1:80".parse().expect("literal"),
        authority: String::new(),
        tcp: None,
        seconds: 10,
        tag: "load".into(),
        ids_file: String::new(),
        latency_file: None,
        h1_conns: 8,
        h1_rate: 250,
        h2_conns: 2,
        h2_rate: 150,
        grpc_rate: 100,
        new_conn_rate: 50,
        tcp_streams: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u32>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--http" => a.http = v.parse().map_err(|e| format!("--http {v}: {e}"))?,
            "--authority" => a.authority = v,
            "--tcp" => a.tcp = Some(v.parse().map_err(|e| format!("--tcp {v}: {e}"))?),
            "--seconds" => a.seconds = u64::from(num(&v)?.clamp(1, 600)),
            "--tag" => a.tag = v,
            "--ids-file" => a.ids_file = v,
            "--latency-file" => a.latency_file = Some(v),
            "--h1-conns" => a.h1_conns = num(&v)?.clamp(1, 1000),
            "--h1-rate" => a.h1_rate = num(&v)?.min(100_000),
            "--h2-conns" => a.h2_conns = num(&v)?.clamp(1, 100),
            "--h2-rate" => a.h2_rate = num(&v)?.min(100_000),
            "--grpc-rate" => a.grpc_rate = num(&v)?.min(100_000),
            "--new-conn-rate" => a.new_conn_rate = num(&v)?.min(10_000),
            "--tcp-streams" => a.tcp_streams = num(&v)?.min(1000),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.authority.is_empty() || a.ids_file.is_empty() {
        return Err("--authority and --ids-file are required".into());
    }
    Ok(a)
}

/// Counts of one kind of traffic.
#[derive(Default)]
struct Tally {
    sent: u64,
    ok: u64,
    failed: u64,
    /// Requests the server gave back unsent, sent again on a new connection.
    resent: u64,
    /// TCP only: echoed messages and streams reopened after a FIN.
    messages: u64,
    reopened: u64,
    errors: Vec<String>,
    ids: Vec<String>,
    /// (start in ms after [`START`], latency in µs) of answered requests.
    latencies: Vec<(u32, u32)>,
}

/// When the load started; latencies are placed in time relative to it.
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// [`record`] for a request that started at `started`: its latency is kept.
fn record_timed(t: &Shared, id: Option<String>, started: Instant, result: Result<(), String>) {
    if result.is_ok() {
        let start = START.get().copied().unwrap_or(started);
        let at =
            u32::try_from(started.saturating_duration_since(start).as_millis()).unwrap_or(u32::MAX);
        let took = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        t.lock().expect("tally").latencies.push((at, took));
    }
    record(t, id, result);
}

type Shared = Arc<Mutex<Tally>>;

fn record(t: &Shared, id: Option<String>, result: Result<(), String>) {
    let mut t = t.lock().expect("tally");
    t.sent += 1;
    match result {
        Ok(()) => t.ok += 1,
        Err(e) => {
            t.failed += 1;
            if t.errors.len() < 5 {
                t.errors.push(e);
            }
        }
    }
    if let Some(id) = id {
        t.ids.push(id);
    }
}

/// Ticks `rate / workers` times a second until `end`.
fn ticker(rate: u32, workers: u32) -> Option<tokio::time::Interval> {
    if rate == 0 {
        return None;
    }
    let period = Duration::from_secs_f64(f64::from(workers) / f64::from(rate));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(interval)
}

async fn connect(addr: SocketAddr) -> Result<TokioIo<TcpStream>, String> {
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect {addr}: timeout"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

fn request(a: &Args, id: &str, close: bool) -> Request<Empty<Bytes>> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri("/status/200")
        .header(HOST, &a.authority)
        .header("x-request-id", id);
    if close {
        req = req.header(CONNECTION, "close");
    }
    req.body(Empty::new()).expect("valid request")
}

/// Reads a whole response; `Err` unless it is a complete `200`.
async fn check_response(
    resp: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<(), String> {
    let resp = resp.map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    if status != 200 {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body.to_bytes())
        ));
    }
    Ok(())
}

async fn http1_worker(a: Arc<Args>, worker: u32, end: Instant, tally: Shared) {
    let Some(mut tick) = ticker(a.h1_rate, a.h1_conns) else {
        return;
    };
    let mut sender: Option<http1::SendRequest<Empty<Bytes>>> = None;
    let mut n = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        n += 1;
        let id = format!("{}-h1-{worker}-{n}", a.tag);
        let started = Instant::now();
        let mut req = request(&a, &id, false);
        let result = loop {
            // A connection the server closed after its last response is
            // replaced, as any HTTP client's pool does.
            if sender.as_mut().is_none_or(|s| s.is_closed()) {
                match connect(a.http).await {
                    Ok(io) => match http1::handshake(io).await {
                        Ok((s, conn)) => {
                            tokio::spawn(conn);
                            sender = Some(s);
                        }
                        Err(e) => break Err(format!("handshake: {e}")),
                    },
                    Err(e) => break Err(e),
                }
            }
            let Some(s) = sender.as_mut() else {
                continue;
            };
            if s.ready().await.is_err() {
                sender = None;
                continue;
            }
            let sent = tokio::time::timeout(REQUEST_TIMEOUT, s.try_send_request(req)).await;
            let Ok(sent) = sent else {
                break Err("timeout".to_string());
            };
            match sent {
                Ok(resp) => {
                    break tokio::time::timeout(REQUEST_TIMEOUT, check_response(Ok(resp)))
                        .await
                        .unwrap_or_else(|_| Err("body: timeout".into()));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: the connection closed first. Safe to resend.
                    Some(unsent) => {
                        tally.lock().expect("tally").resent += 1;
                        req = unsent;
                        sender = None;
                    }
                    None => break Err(format!("request: {}", error_chain(e.error()))),
                },
            }
        };
        record_timed(&tally, Some(id), started, result);
    }
}

async fn h2_connect(addr: SocketAddr) -> Result<http2::SendRequest<Full<Bytes>>, String> {
    let io = connect(addr).await?;
    let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
        .await
        .map_err(|e| format!("http2 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One HTTP/2 connection carrying `rate` requests a second (gRPC or not).
async fn http2_worker(
    a: Arc<Args>,
    kind: &'static str,
    worker: u32,
    rate: u32,
    end: Instant,
    tally: Shared,
) {
    let Some(mut tick) = ticker(rate, 1) else {
        return;
    };
    let mut sender: Option<http2::SendRequest<Full<Bytes>>> = None;
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        n += 1;
        let id = format!("{}-{kind}-{worker}-{n}", a.tag);
        let started = Instant::now();
        let req = h2_request(&a, kind, &id);
        let send = loop {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                match h2_connect(a.http).await {
                    Ok(s) => sender = Some(s),
                    Err(e) => break Err(e),
                }
            }
            let Some(s) = sender.as_mut() else {
                continue;
            };
            if s.ready().await.is_err() {
                sender = None;
                continue;
            }
            // GOAWAY arrived: the connection takes no new stream.
            break Ok(s.try_send_request(req));
        };
        let tally = tally.clone();
        match send {
            Err(e) => record_timed(&tally, Some(id), started, Err(e)),
            Ok(future) => {
                let retry_addr = a.http;
                let a = a.clone();
                tasks.spawn(async move {
                    let Ok(sent) = tokio::time::timeout(REQUEST_TIMEOUT, future).await else {
                        record_timed(&tally, Some(id), started, Err("timeout".into()));
                        return;
                    };
                    let result = match sent {
                        Ok(resp) => check_h2(resp, kind).await,
                        Err(mut e) => match e.take_message() {
                            // Refused before processing (RFC 9113 §8.7): send again.
                            Some(unsent) => {
                                tally.lock().expect("tally").resent += 1;
                                match h2_connect(retry_addr).await {
                                    Ok(mut s) => match s.send_request(unsent).await {
                                        Ok(resp) => check_h2(resp, kind).await,
                                        Err(e) => Err(format!("resent request: {e}")),
                                    },
                                    Err(e) => Err(e),
                                }
                            }
                            // Refused, or above the last stream id of a
                            // GOAWAY: not processed, so a client may resend it.
                            None if not_processed(e.error()) => {
                                tally.lock().expect("tally").resent += 1;
                                match h2_connect(retry_addr).await {
                                    Ok(mut s) => {
                                        match s.send_request(h2_request(&a, kind, &id)).await {
                                            Ok(resp) => check_h2(resp, kind).await,
                                            Err(e) => {
                                                Err(format!("resent request: {}", error_chain(&e)))
                                            }
                                        }
                                    }
                                    Err(e) => Err(e),
                                }
                            }
                            None => Err(format!("request: {}", error_chain(e.error()))),
                        },
                    };
                    record_timed(&tally, Some(id), started, result);
                });
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

fn h2_request(a: &Args, kind: &str, id: &str) -> Request<Full<Bytes>> {
    if kind == "grpc" {
        let frame = encode_frame(&MockRequest {
            path: "/status/200".into(),
            payload: Bytes::from_static(b"upgrade"),
        });
        Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}{METHOD_PATH}", a.authority))
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .header("x-request-id", id)
            .body(Full::new(frame))
    } else {
        Request::builder()
            .uri(format!("http://{}/status/200", a.authority))
            .header("x-request-id", id)
            .body(Full::new(Bytes::new()))
    }
    .expect("valid request")
}

/// RFC 9113 §8.7: a stream reset with `REFUSED_STREAM`, or above the last
/// stream id of the server's GOAWAY, was not processed.
fn not_processed(err: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        cur = e.source();
    }
    false
}

async fn check_h2(resp: http::Response<hyper::body::Incoming>, kind: &str) -> Result<(), String> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let collected = tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect())
        .await
        .map_err(|_| "body: timeout".to_string())?
        .map_err(|e| format!("body: {e}"))?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    if kind == "grpc" {
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let grpc_status = trailers
            .get("grpc-status")
            .or_else(|| headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("missing")
            .to_owned();
        if grpc_status != "0" {
            return Err(format!("grpc-status {grpc_status}"));
        }
    }
    Ok(())
}

async fn new_connection_worker(a: Arc<Args>, end: Instant, tally: Shared) {
    let Some(mut tick) = ticker(a.new_conn_rate, 1) else {
        return;
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        n += 1;
        let id = format!("{}-conn-{n}", a.tag);
        let started = Instant::now();
        let a = a.clone();
        let tally = tally.clone();
        tasks.spawn(async move {
            let result = async {
                let io = connect(a.http).await?;
                let (mut s, conn) = http1::handshake(io)
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(conn);
                check_response(s.send_request(request(&a, &id, true)).await).await
            };
            let result = tokio::time::timeout(REQUEST_TIMEOUT, result)
                .await
                .unwrap_or_else(|_| Err("timeout".into()));
            record_timed(&tally, Some(id), started, result);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// One long-lived TCP stream: a line every 100 ms, each echoed back.
async fn tcp_stream(addr: SocketAddr, tag: String, end: Instant, tally: Shared) {
    let mut seq = 0u64;
    'reopen: while Instant::now() < end {
        let stream = match connect(addr).await {
            Ok(io) => io.into_inner(),
            Err(e) => {
                record(&tally, None, Err(e));
                tokio::time::sleep(TCP_PERIOD).await;
                continue;
            }
        };
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        while Instant::now() < end {
            seq += 1;
            let line = format!("{tag}-{seq}");
            let exchange = async {
                write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                match lines.next_line().await {
                    Ok(Some(echo)) if echo == line => Ok(true),
                    Ok(Some(echo)) => Err(format!("echo {echo:?}, sent {line:?}")),
                    // FIN before the echo: the line was written into a
                    // stream the server had already ended.
                    Ok(None) => Ok(false),
                    Err(e) => Err(format!("read: {e}")),
                }
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(true)) => {
                    let mut t = tally.lock().expect("tally");
                    t.messages += 1;
                }
                Ok(Ok(false)) => {
                    tally.lock().expect("tally").reopened += 1;
                    seq -= 1;
                    continue 'reopen;
                }
                Ok(Err(e)) => {
                    record(&tally, None, Err(e));
                    continue 'reopen;
                }
                Err(_) => {
                    record(&tally, None, Err("echo timeout".into()));
                    continue 'reopen;
                }
            }
            tokio::time::sleep(TCP_PERIOD).await;
        }
        record(&tally, None, Ok(()));
    }
}

fn summary(t: &Tally) -> Value {
    json!({
        "sent": t.sent, "ok": t.ok, "failed": t.failed, "resent": t.resent,
        "messages": t.messages, "reopened": t.reopened, "errors": t.errors,
    })
}

async fn run(a: Args) -> Result<Value, String> {
    let a = Arc::new(a);
    let start = *START.get_or_init(Instant::now);
    let start_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let end = start + Duration::from_secs(a.seconds);
    let kinds = ["h1", "h2", "grpc", "conn", "tcp"];
    let tallies: BTreeMap<&str, Shared> = kinds.iter().map(|k| (*k, Shared::default())).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..a.h1_conns {
        tasks.spawn(http1_worker(a.clone(), w, end, tallies["h1"].clone()));
    }
    for w in 0..a.h2_conns {
        let rate = a.h2_rate / a.h2_conns;
        tasks.spawn(http2_worker(
            a.clone(),
            "h2",
            w,
            rate,
            end,
            tallies["h2"].clone(),
        ));
    }
    tasks.spawn(http2_worker(
        a.clone(),
        "grpc",
        0,
        a.grpc_rate,
        end,
        tallies["grpc"].clone(),
    ));
    tasks.spawn(new_connection_worker(
        a.clone(),
        end,
        tallies["conn"].clone(),
    ));
    if let Some(tcp) = a.tcp {
        for s in 0..a.tcp_streams {
            let tag = format!("{}-tcp-{s}", a.tag);
            tasks.spawn(tcp_stream(tcp, tag, end, tallies["tcp"].clone()));
        }
    }
    // Bounded: every worker stops at `end` and waits at most REQUEST_TIMEOUT after.
    let grace = end + REQUEST_TIMEOUT * 2;
    while let Ok(Some(_)) = tokio::time::timeout_at(grace.into(), tasks.join_next()).await {}
    tasks.abort_all();
    let mut ids = String::new();
    let mut latencies = String::new();
    let mut out = serde_json::Map::new();
    for (kind, tally) in &tallies {
        let t = tally.lock().expect("tally");
        for id in &t.ids {
            ids.push_str(id);
            ids.push('\n');
        }
        if a.latency_file.is_some() {
            for (at, took) in &t.latencies {
                latencies.push_str(&format!("{at} {took}\n"));
            }
        }
        out.insert((*kind).to_owned(), summary(&t));
    }
    out.insert("start_unix_ms".into(), json!(start_unix_ms));
    std::fs::write(&a.ids_file, ids).map_err(|e| format!("{}: {e}", a.ids_file))?;
    if let Some(path) = &a.latency_file {
        std::fs::write(path, latencies).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(Value::Object(out))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mixed-load: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mixed-load: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mixed-load: {e}");
            ExitCode::FAILURE
        }
    }
}
