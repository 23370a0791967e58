//! Protocol edge cases against the real proxy started in-process: malformed
//! and oversized HTTP/1.1 requests, slow clients, HTTP/2 rapid reset, chunked
//! bodies and `Expect: 100-continue`, upgrades, absolute-form URIs and Host
//! forms (no open relay), plain TCP, request body replay on retry, Istio's
//! default retry policy, and no retry once the response started.
//!
//! Each test checks what a user would: what the client received and the
//! fields of the access log line.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use nodeway_tests::access_log::Entry;
use nodeway_tests::{Outcome, Proto, connect_from, raw_exchange, refused_addr, request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// `clusterIP:port` of the `mock` Service in the generated config (never dialled).
const MOCK_VIP: &str = "10.96.0.20:8080";
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Asserts a subset of the fields of an access log line.
fn assert_fields(line: &Entry, expected: &[(&str, &str)]) {
    for (key, want) in expected {
        let got = line
            .get(*key)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("field {key} missing in {line:?}"));
        assert_eq!(got, *want, "access log field {key}\nline: {line:?}");
    }
}

fn field<'a>(line: &'a Entry, key: &str) -> &'a str {
    line.get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("field {key} missing in {line:?}"))
}

/// Waits for exactly one access log line (and checks no second one follows soon).
async fn one_line(h: &Harness) -> Entry {
    h.log.wait_for(1, LOG_TIMEOUT).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let lines = h.log.lines();
    assert_eq!(
        lines.len(),
        1,
        "exactly one access log line expected: {lines:?}"
    );
    lines.into_iter().next().unwrap()
}

async fn get(h: &Harness, authority: &str, path: &str) -> Outcome {
    request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        authority,
        path,
        Bytes::new(),
        CALL_TIMEOUT,
    )
    .await
}

async fn post(h: &Harness, path: &str, body: Bytes) -> Outcome {
    request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        path,
        body,
        CALL_TIMEOUT,
    )
    .await
}

/// Deterministic, non-repeating-looking body bytes.
fn pattern(len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i * 7 + i / 36) % 36])
            .collect::<Vec<u8>>(),
    )
}

/// Status line of a raw HTTP/1.1 response.
fn status_line(raw: &[u8]) -> String {
    let end = raw
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// A raw client connection with a read buffer, for hand-written HTTP/1.1.
struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One parsed HTTP/1.1 response head (and body, if read).
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

impl RawConn {
    async fn open(h: &Harness) -> RawConn {
        let stream = connect_from(CLIENT_IP, h.addr())
            .await
            .expect("connect to proxy");
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to proxy");
    }

    /// Reads more bytes into the buffer; false on EOF or error.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Takes `n` bytes from the buffer, reading as needed.
    async fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// Takes one CRLF-terminated line (without the CRLF).
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if self.buf.len() > 1 << 20 || !self.fill().await {
                return None;
            }
        }
    }

    /// Reads one response head.
    async fn head(&mut self) -> Option<RawResponse> {
        let mut head = String::new();
        for _ in 0..200 {
            let line = self.line().await?;
            if line.is_empty() {
                let status = head.split_whitespace().nth(1)?.parse().ok()?;
                return Some(RawResponse {
                    status,
                    head,
                    body: Vec::new(),
                });
            }
            head.push_str(&line);
            head.push_str("\r\n");
        }
        None
    }

    /// Reads one complete response (head and body: content-length, chunked,
    /// or until EOF). `None` if the connection ended before it was complete.
    async fn response(&mut self) -> Option<RawResponse> {
        let mut resp = self.head().await?;
        if (100..200).contains(&resp.status) || resp.status == 204 || resp.status == 304 {
            return Some(resp);
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            for _ in 0..100_000 {
                let size_line = self.line().await?;
                let size_hex = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_hex, 16).ok()?;
                if size == 0 {
                    // Trailers, then the empty line.
                    loop {
                        if self.line().await?.is_empty() {
                            return Some(resp);
                        }
                    }
                }
                let data = self.take(size + 2).await?;
                resp.body.extend_from_slice(&data[..size]);
            }
            None
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().ok()?;
            resp.body = self.take(len).await?;
            Some(resp)
        } else {
            while self.fill().await {}
            resp.body = std::mem::take(&mut self.buf);
            Some(resp)
        }
    }
}

/// A TCP echo server on loopback; returns its address.
async fn tcp_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        // Bounded by the test's lifetime (the runtime ends with the test).
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = timeout(Duration::from_secs(30), tokio::io::copy(&mut r, &mut w)).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------
// 1. Malformed HTTP/1.1 request
// ---------------------------------------------------------------------------

#[tokio::test]
async fn malformed_request_gets_400_and_dpe_line() {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let raw = raw_exchange(
        h.addr(),
        CLIENT_IP,
        b"GET / HTTP/1.1\r\nHost: mock\r\nbad header line\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        raw.starts_with(b"HTTP/1.1 400"),
        "client must receive 400: {:?}",
        String::from_utf8_lossy(&raw)
    );
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("response_code", "400"),
            ("response_flags", "DPE"),
            ("response_code_details", "http1.codec_error"),
            ("protocol", "HTTP/1.1"),
            ("upstream_cluster", "-"),
            ("upstream_host", "-"),
            ("source_workload", "sleep"),
            ("source_namespace", "default"),
        ],
    );
    assert!(field(&line, "downstream_remote_address").starts_with("127.0.1.5:"));
    assert_eq!(m.requests(), 0, "a malformed request never goes upstream");
}

// ---------------------------------------------------------------------------
// 2. Request headers over 60 KiB
// ---------------------------------------------------------------------------

fn request_with_header_bytes(n: usize) -> Vec<u8> {
    let mut req = format!("GET /status/200 HTTP/1.1\r\nHost: {AUTHORITY}\r\nx-big: ").into_bytes();
    req.extend(std::iter::repeat_n(b'x', n));
    req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    req
}

/// Sends a request whose header block is `kib` KiB and expects 431 + `DPE`.
async fn oversized_headers_get_431(kib: usize) {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let raw = raw_exchange(
        h.addr(),
        CLIENT_IP,
        &request_with_header_bytes(kib * 1024),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        raw.starts_with(b"HTTP/1.1 431"),
        "client must receive 431: {:?}",
        status_line(&raw)
    );
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("response_code", "431"),
            ("response_flags", "DPE"),
            ("response_code_details", "http1.headers_too_large"),
            ("source_workload", "sleep"),
        ],
    );
    assert_eq!(m.requests(), 0);
}

/// Envoy's limit (`max_request_headers_kb: 60`) is exact: 70 KiB is refused.
#[tokio::test]
async fn headers_over_60k_get_431() {
    oversized_headers_get_431(70).await
}

/// Far over the limit: refused whatever the read sizes.
#[tokio::test]
async fn headers_of_200k_get_431() {
    oversized_headers_get_431(200).await
}

#[tokio::test]
async fn headers_of_50k_are_accepted() {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let mut c = RawConn::open(&h).await;
    c.send(&request_with_header_bytes(50 * 1024)).await;
    let resp = timeout(CALL_TIMEOUT, c.response())
        .await
        .expect("response in time")
        .expect("complete response");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"{\"status\":200}");
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("response_code", "200"),
            ("response_flags", "-"),
            ("response_code_details", "via_upstream"),
        ],
    );
    assert_eq!(m.requests(), 1);
}

#[tokio::test]
async fn more_than_100_headers_get_431() {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let mut req = format!("GET /status/200 HTTP/1.1\r\nHost: {AUTHORITY}\r\n");
    for i in 0..120 {
        req.push_str(&format!("x-h-{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let raw = raw_exchange(h.addr(), CLIENT_IP, req.as_bytes(), Duration::from_secs(3)).await;
    assert!(
        raw.starts_with(b"HTTP/1.1 431"),
        "client must receive 431: {:?}",
        status_line(&raw)
    );
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("response_code", "431"),
            ("response_flags", "DPE"),
            ("response_code_details", "http1.headers_too_large"),
        ],
    );
    assert_eq!(m.requests(), 0);
}

// ---------------------------------------------------------------------------
// 3. Request header timeout (slowloris)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn partial_request_line_is_cut_at_header_timeout() {
    let m = mock("m1").await;
    let h = Harness::start_with(
        &MeshConfig::new(vec![m.addr()]),
        Arc::new(FixedOriginalDst(None)),
        |opts| opts.settings.request_header_timeout = Duration::from_millis(500),
    )
    .await;
    let mut s = connect_from(CLIENT_IP, h.addr()).await.expect("connect");
    s.write_all(b"GET /status/200 HT").await.expect("write");
    let sent = Instant::now();
    let mut received = Vec::new();
    let closed = timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let elapsed = sent.elapsed();
    assert!(
        closed.is_ok(),
        "the proxy must close a client that stalls in its request head (after 2 s still open)"
    );
    assert!(
        elapsed >= Duration::from_millis(400),
        "closed before the 500 ms header timeout: {elapsed:?}"
    );
    // The connection is gone without a request: nothing went upstream.
    assert_eq!(m.requests(), 0);
    if !received.is_empty() {
        // Envoy answers 408 here; anything else sent would be a bug.
        assert!(
            received.starts_with(b"HTTP/1.1 408"),
            "unexpected bytes before the close: {:?}",
            String::from_utf8_lossy(&received)
        );
    }
}

// ---------------------------------------------------------------------------
// 4. HTTP/2 rapid reset
// ---------------------------------------------------------------------------

/// HTTP/2 "rapid reset" (CVE-2023-44487): the client opens streams and
/// resets each at once. The proxy serves HTTP/2 with hyper/h2, configured in
/// `proxy/src/proxy/mod.rs` with:
///
/// - `max_pending_accept_reset_streams(20)`: h2 counts streams the client
///   reset while they still sit in the accept queue (HEADERS + RST_STREAM
///   read in the same I/O batch, before hyper accepted the stream). When the
///   count would exceed 20, h2 sends GOAWAY(ENHANCE_YOUR_CALM) and closes the
///   connection. This is what bounds the attack: the reset streams a client
///   can make the proxy hold at once, and so (with the GOAWAY) the requests
///   one connection can push through;
/// - `max_local_error_reset_streams(1024)`: streams the *proxy* resets
///   because of client protocol errors ("MadeYouReset"); not exercised here.
///
/// A stream that hyper accepted before its reset arrived runs the request
/// handler until its first await, which may already have sent the request
/// upstream, so the upstream can see some requests; what is bounded is how
/// many before the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_is_bounded() {
    const STREAMS: usize = 2000;
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let stream = connect_from(CLIENT_IP, h.addr()).await.expect("connect");
    let (mut client, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    let mut conn_task = tokio::spawn(conn);

    let mut sent = 0usize;
    let mut stopped_by: Option<String> = None;
    let run = timeout(Duration::from_secs(20), async {
        for i in 0..STREAMS {
            if let Err(e) = std::future::poll_fn(|cx| client.poll_ready(cx)).await {
                stopped_by = Some(format!("poll_ready: {e}"));
                break;
            }
            let req = http::Request::builder()
                .method("GET")
                .uri(format!("http://{AUTHORITY}/status/200"))
                .body(())
                .expect("request");
            match client.send_request(req, true) {
                Ok((_response, mut send)) => {
                    send.send_reset(h2::Reason::CANCEL);
                    sent += 1;
                }
                Err(e) => {
                    stopped_by = Some(format!("send_request: {e}"));
                    break;
                }
            }
            // Let the connection task write, as a real attacker's socket would.
            if i % 16 == 15 {
                tokio::task::yield_now().await;
            }
        }
    })
    .await;
    assert!(run.is_ok(), "the rapid reset loop must end in time");
    // The client stays open: if its connection ends now, the proxy ended it,
    // either way it may: hyper's pending-reset limit (GOAWAY
    // ENHANCE_YOUR_CALM; a client still writing may see a broken pipe or a
    // reset first) or, when every stream was accepted before its reset
    // arrived, Envoy's premature-reset rule (a graceful GOAWAY after 500).
    let conn_result = timeout(Duration::from_secs(5), &mut conn_task).await;
    conn_task.abort();
    drop(client);
    let upstream_seen = m.requests();
    eprintln!(
        "rapid reset: {sent} streams sent, stopped by {stopped_by:?}, connection result {conn_result:?}, upstream saw {upstream_seen}"
    );
    let closed_by_proxy = match &conn_result {
        Ok(Ok(Ok(()))) => true,
        Ok(Ok(Err(e))) => {
            (e.is_go_away() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM))
                || e.get_io().is_some_and(|io| {
                    matches!(
                        io.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    )
                })
        }
        _ => false,
    };
    assert!(
        closed_by_proxy,
        "the proxy must close the connection: {conn_result:?} (sent {sent}, stopped by {stopped_by:?})"
    );
    assert!(
        (upstream_seen as usize) < STREAMS / 10,
        "the upstream must see far fewer than {STREAMS} requests: {upstream_seen}"
    );

    // The proxy still serves a well-behaved client.
    let out = request(
        Proto::Http2,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        "/status/200",
        Bytes::new(),
        CALL_TIMEOUT,
    )
    .await;
    assert_eq!(out.status, Some(200), "{out:?}");
    assert!(out.body_complete, "{out:?}");
}

// ---------------------------------------------------------------------------
// 5. Chunked request body, Expect: 100-continue
// ---------------------------------------------------------------------------

#[tokio::test]
async fn chunked_request_body_is_echoed_intact() {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let mut c = RawConn::open(&h).await;
    c.send(
        format!(
            "POST /echo HTTP/1.1\r\nHost: {AUTHORITY}\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let chunks: [&[u8]; 4] = [b"hello ", b"chunked ", &[b'z'; 3000], b" world"];
    let mut expected = Vec::new();
    for chunk in chunks {
        c.send(format!("{:x}\r\n", chunk.len()).as_bytes()).await;
        c.send(chunk).await;
        c.send(b"\r\n").await;
        expected.extend_from_slice(chunk);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.send(b"0\r\n\r\n").await;
    let resp = timeout(CALL_TIMEOUT, c.response())
        .await
        .expect("response in time")
        .expect("complete response");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, expected, "echoed body differs");
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("method", "POST"),
            ("path", "/echo"),
            ("response_code", "200"),
            ("response_flags", "-"),
            ("bytes_received", &expected.len().to_string()),
            ("bytes_sent", &expected.len().to_string()),
        ],
    );
}

#[tokio::test]
async fn expect_100_continue_then_final_response() {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let body = b"continued body";
    let mut c = RawConn::open(&h).await;
    c.send(
        format!(
            "POST /echo HTTP/1.1\r\nHost: {AUTHORITY}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let interim = timeout(Duration::from_secs(5), c.head())
        .await
        .expect("100 Continue in time")
        .expect("a response head");
    assert_eq!(interim.status, 100, "{interim:?}");
    c.send(body).await;
    let resp = timeout(CALL_TIMEOUT, c.response())
        .await
        .expect("response in time")
        .expect("complete response");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, body);
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("response_code", "200"),
            ("response_flags", "-"),
            ("bytes_received", &body.len().to_string()),
        ],
    );
}

// ---------------------------------------------------------------------------
// 6. Upgrade pass-through
// ---------------------------------------------------------------------------

#[tokio::test]
async fn upgrade_is_passed_through() {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let mut c = RawConn::open(&h).await;
    c.send(
        format!(
            "GET /upgrade-echo HTTP/1.1\r\nHost: {AUTHORITY}\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let head = timeout(Duration::from_secs(5), c.head())
        .await
        .expect("101 in time")
        .expect("a response head");
    assert_eq!(head.status, 101, "{head:?}");
    assert_eq!(head.header("upgrade").as_deref(), Some("echo"), "{head:?}");
    let mut total = 0;
    for msg in [
        &b"ping through the tunnel"[..],
        b"\x00\x01binary\xff",
        b"last",
    ] {
        c.send(msg).await;
        let back = timeout(Duration::from_secs(5), c.take(msg.len()))
            .await
            .expect("echo in time")
            .expect("echo before EOF");
        assert_eq!(back, msg);
        total += msg.len();
    }
    c.stream.shutdown().await.expect("half-close");
    let eof = timeout(Duration::from_secs(5), async { while c.fill().await {} }).await;
    assert!(eof.is_ok(), "the tunnel closes after the client closed");
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("method", "GET"),
            ("path", "/upgrade-echo"),
            ("response_code", "101"),
            ("response_flags", "-"),
            ("response_code_details", "via_upstream"),
            ("upstream_cluster", CLUSTER),
            ("upstream_host", &m.addr().to_string()),
            ("upstream_request_attempt_count", "1"),
            ("bytes_received", &total.to_string()),
            ("bytes_sent", &total.to_string()),
        ],
    );
}

// ---------------------------------------------------------------------------
// 7. Absolute-form URIs, Host forms, no open relay
// ---------------------------------------------------------------------------

#[tokio::test]
async fn absolute_form_request_is_routed() {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let mut c = RawConn::open(&h).await;
    c.send(
        format!("GET http://{AUTHORITY}/status/200 HTTP/1.1\r\nHost: {AUTHORITY}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let resp = timeout(CALL_TIMEOUT, c.response())
        .await
        .expect("response in time")
        .expect("complete response");
    assert_eq!(resp.status, 200, "{resp:?}");
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("response_code", "200"),
            ("path", "/status/200"),
            ("authority", AUTHORITY),
            ("upstream_cluster", CLUSTER),
            ("route_name", "default"),
        ],
    );
    assert_eq!(m.requests(), 1);
}

#[tokio::test]
async fn short_host_forms_route_to_the_service() {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let forms = [
        "mock:8080",
        "mock.default:8080",
        "mock.default.svc:8080",
        "mock.default.svc.cluster.local:8080",
        MOCK_VIP,
    ];
    for host in forms {
        let out = get(&h, host, "/status/200").await;
        assert_eq!(out.status, Some(200), "Host {host}: {out:?}");
        assert_eq!(out.served_by(), Some("m1"), "Host {host}: {out:?}");
    }
    let lines = h.log.wait_for(forms.len(), LOG_TIMEOUT).await;
    for (line, host) in lines.iter().zip(forms) {
        assert_fields(
            line,
            &[
                ("response_code", "200"),
                ("authority", host),
                ("upstream_cluster", CLUSTER),
            ],
        );
    }
    assert_eq!(m.requests(), forms.len() as u64);
}

#[tokio::test]
async fn unknown_host_gets_404_nr() {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let host = "nothere.default.svc.cluster.local:8080";
    let out = get(&h, host, "/status/200").await;
    assert_eq!(out.status, Some(404), "{out:?}");
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("response_code", "404"),
            ("response_flags", "NR"),
            ("response_code_details", "route_not_found"),
            ("authority", host),
            ("upstream_cluster", "-"),
            ("upstream_host", "-"),
            ("source_workload", "sleep"),
        ],
    );
    assert_eq!(m.requests(), 0);
}

/// The proxy only reaches Services: a Host or absolute URI naming anything
/// else (an external name, an arbitrary IP:port) gets 404 NR, never a relay.
#[tokio::test]
async fn external_hosts_are_not_relayed() {
    let m = mock("m1").await;
    // Listening, reachable, but not a Service endpoint.
    let bystander = mock("bystander").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let ip_host = bystander.addr().to_string();
    let hosts = ["example.com:80", "example.com", ip_host.as_str()];
    for host in hosts {
        let out = get(&h, host, "/status/200").await;
        assert_eq!(out.status, Some(404), "Host {host}: {out:?}");
    }
    // Absolute form naming the bystander, with a Service in Host: the URI wins.
    let mut c = RawConn::open(&h).await;
    c.send(
        format!("GET http://{ip_host}/status/200 HTTP/1.1\r\nHost: {AUTHORITY}\r\n\r\n").as_bytes(),
    )
    .await;
    let resp = timeout(CALL_TIMEOUT, c.response())
        .await
        .expect("response in time")
        .expect("complete response");
    assert_eq!(resp.status, 404, "{resp:?}");

    let lines = h.log.wait_for(hosts.len() + 1, LOG_TIMEOUT).await;
    for line in &lines {
        assert_fields(
            line,
            &[
                ("response_code", "404"),
                ("response_flags", "NR"),
                ("response_code_details", "route_not_found"),
                ("upstream_cluster", "-"),
                ("upstream_host", "-"),
            ],
        );
    }
    assert_eq!(
        bystander.requests(),
        0,
        "open relay: the bystander was reached"
    );
    assert_eq!(
        bystander.connections(),
        0,
        "open relay: the bystander was dialled"
    );
    assert_eq!(m.requests(), 0);
}

// ---------------------------------------------------------------------------
// 8. Plain TCP
// ---------------------------------------------------------------------------

/// Sends `first` then more bytes through the proxy, checks the echo, closes,
/// and returns the number of bytes sent.
async fn tcp_round_trip(h: &Harness, first: &[u8]) -> usize {
    let mut c = RawConn::open(h).await;
    let mut total = 0;
    for msg in [first, b"second message", &[0u8, 1, 2, 255, 254]] {
        c.send(msg).await;
        let back = timeout(Duration::from_secs(5), c.take(msg.len()))
            .await
            .expect("echo in time")
            .expect("echo before EOF");
        assert_eq!(back, msg);
        total += msg.len();
    }
    c.stream.shutdown().await.expect("half-close");
    let eof = timeout(Duration::from_secs(5), async { while c.fill().await {} }).await;
    assert!(
        eof.is_ok(),
        "the TCP session closes after the client closed"
    );
    total
}

async fn assert_tcp_line(h: &Harness, echo: SocketAddr, total: usize) {
    let line = one_line(h).await;
    assert_fields(
        &line,
        &[
            ("method", "-"),
            ("protocol", "-"),
            ("response_flags", "-"),
            ("upstream_cluster", CLUSTER),
            ("upstream_host", &echo.to_string()),
            ("downstream_local_address", MOCK_VIP),
            ("bytes_received", &total.to_string()),
            ("bytes_sent", &total.to_string()),
            ("source_workload", "sleep"),
            ("source_namespace", "default"),
        ],
    );
    assert!(field(&line, "upstream_local_address").starts_with("127.0.0.1:"));
}

fn vip_original_dst() -> Arc<FixedOriginalDst> {
    Arc::new(FixedOriginalDst(Some(MOCK_VIP.parse().unwrap())))
}

#[tokio::test]
async fn tcp_port_is_proxied() {
    let echo = tcp_echo_server().await;
    let mut config = MeshConfig::new(vec![echo]);
    config.port_name = "tcp".into();
    let h = Harness::start_with(&config, vip_original_dst(), |_| {}).await;
    // Even HTTP-looking bytes are plain TCP on a declared TCP port.
    let total = tcp_round_trip(&h, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_tcp_line(&h, echo, total).await;
}

#[tokio::test]
async fn sniffed_port_proxies_non_http_as_tcp() {
    let echo = tcp_echo_server().await;
    let config = MeshConfig::new(vec![echo]);
    assert_eq!(config.port_name, "web");
    let h = Harness::start_with(&config, vip_original_dst(), |_| {}).await;
    let total = tcp_round_trip(&h, b"\x16\x03\x01\x00\x05hello").await;
    assert_tcp_line(&h, echo, total).await;
}

// ---------------------------------------------------------------------------
// 9. Request body replay on retry
// ---------------------------------------------------------------------------

fn attempts(line: &Entry) -> u32 {
    field(line, "upstream_request_attempt_count")
        .parse()
        .unwrap_or_else(|_| panic!("attempts not a number: {line:?}"))
}

const ROUND_ROBIN_DR: &str = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: mock, namespace: default}\nspec:\n  host: mock\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n";

/// Connect failures happen before any body byte is read, so the retry sends
/// the complete body, whatever its size.
async fn body_survives_connect_failure_retry(len: usize) {
    let dead = refused_addr("127.0.0.1".parse().unwrap());
    let m = mock("m1").await;
    // Round robin makes every other request start on the dead endpoint.
    let mut config = MeshConfig::new(vec![dead, m.addr()]).with_route("5s", 2, "connect-failure");
    config.extra.push_str(ROUND_ROBIN_DR);
    let h = Harness::start(&config).await;
    const N: usize = 6;
    let body = pattern(len);
    for _ in 0..N {
        let out = post(&h, "/echo", body.clone()).await;
        assert_eq!(out.status, Some(200), "{out:?}");
        assert!(out.body_complete, "{out:?}");
        assert!(
            out.body == body,
            "echoed body differs ({} bytes)",
            out.body.len()
        );
    }
    let lines = h.log.wait_for(N, LOG_TIMEOUT).await;
    let mut retried = 0;
    for line in &lines {
        assert_fields(
            line,
            &[
                ("response_code", "200"),
                ("response_flags", "-"),
                ("response_code_details", "via_upstream"),
                ("upstream_host", &m.addr().to_string()),
                ("bytes_received", &len.to_string()),
                ("bytes_sent", &len.to_string()),
            ],
        );
        match attempts(line) {
            1 => {}
            2 => retried += 1,
            n => panic!("unexpected attempts {n}: {line:?}"),
        }
    }
    assert!(
        retried > 0,
        "round robin over [refused, mock] must retry some requests: {lines:?}"
    );
}

#[tokio::test]
async fn small_body_is_replayed_after_connect_failure() {
    body_survives_connect_failure_retry(10 * 1024).await
}

/// A body larger than the replay buffer still goes out whole on the retry
/// after a connect failure: nothing was consumed by the failed attempt.
#[tokio::test]
async fn large_body_is_sent_whole_after_connect_failure() {
    body_survives_connect_failure_retry(nodeway::proxy::body::REPLAY_BUFFER_LIMIT * 3).await
}

/// Two endpoints that both reset the connection 300 ms into the request,
/// retried on `reset`.
async fn reset_endpoints() -> (MockPair, Harness) {
    let a = mock("a").await;
    let b = mock("b").await;
    let h =
        Harness::start(&MeshConfig::new(vec![a.addr(), b.addr()]).with_route("10s", 2, "reset"))
            .await;
    (MockPair(a, b), h)
}

struct MockPair(nodeway_tests::MockUpstream, nodeway_tests::MockUpstream);

impl MockPair {
    fn requests(&self) -> u64 {
        self.0.requests() + self.1.requests()
    }
}

/// Control case for the overflow test: a body within the buffer is replayed.
#[tokio::test]
async fn body_within_buffer_is_replayed_after_reset() {
    let (mocks, h) = reset_endpoints().await;
    let out = post(&h, "/reset-before-response/300", pattern(10 * 1024)).await;
    assert_eq!(out.status, Some(503), "{out:?}");
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("response_code", "503"),
            ("response_flags", "URX,UC"),
            (
                "response_code_details",
                "upstream_reset_before_response_started{connection_termination}",
            ),
            ("upstream_request_attempt_count", "3"),
        ],
    );
    assert_eq!(mocks.requests(), 3);
}

/// Once the body outgrew the replay buffer while an attempt was sending it,
/// the request is never replayed: one attempt, one upstream request.
#[tokio::test]
async fn body_over_buffer_is_not_replayed() {
    let (mocks, h) = reset_endpoints().await;
    let len = nodeway::proxy::body::REPLAY_BUFFER_LIMIT * 3;
    let out = post(&h, "/reset-before-response/300", pattern(len)).await;
    assert_eq!(out.status, Some(503), "{out:?}");
    let line = one_line(&h).await;
    assert_eq!(mocks.requests(), 1, "never replayed: {line:?}");
    assert_fields(
        &line,
        &[
            ("response_code", "503"),
            (
                "response_code_details",
                "upstream_reset_before_response_started{connection_termination}",
            ),
            ("upstream_request_attempt_count", "1"),
            ("bytes_received", &len.to_string()),
        ],
    );
}

/// Envoy drops the retry state when the request outgrows its buffer
/// (`retry_or_shadow_abandoned`), so the failure is logged as a plain `UC`:
/// no retry happened and no retry limit was exceeded.
#[tokio::test]
async fn body_over_buffer_failure_has_no_retry_limit_flag() {
    let (_mocks, h) = reset_endpoints().await;
    let len = nodeway::proxy::body::REPLAY_BUFFER_LIMIT * 3;
    let out = post(&h, "/reset-before-response/300", pattern(len)).await;
    assert_eq!(out.status, Some(503), "{out:?}");
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("response_flags", "UC"),
            ("upstream_request_attempt_count", "1"),
        ],
    );
}

// ---------------------------------------------------------------------------
// 10. No VirtualService: Istio's default retry policy
// ---------------------------------------------------------------------------

async fn default_policy_case(code: u16) -> (Outcome, Entry, u64) {
    let m = mock_with("failing", 1.0, code).await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let out = get(&h, AUTHORITY, "/status/200").await;
    let line = one_line(&h).await;
    (out, line, m.requests())
}

#[tokio::test]
async fn default_policy_retries_503_twice() {
    let (out, line, seen) = default_policy_case(503).await;
    assert_eq!(out.status, Some(503), "{out:?}");
    assert_eq!(out.header("x-mock-injected"), Some("true"), "{out:?}");
    assert_fields(
        &line,
        &[
            ("response_code", "503"),
            ("response_flags", "URX"),
            ("response_code_details", "via_upstream"),
            ("route_name", "default"),
            ("upstream_cluster", CLUSTER),
            ("upstream_request_attempt_count", "3"),
        ],
    );
    assert_eq!(seen, 3);
}

#[tokio::test]
async fn default_policy_does_not_retry_500() {
    let (out, line, seen) = default_policy_case(500).await;
    assert_eq!(out.status, Some(500), "{out:?}");
    assert_fields(
        &line,
        &[
            ("response_code", "500"),
            ("response_flags", "-"),
            ("response_code_details", "via_upstream"),
            ("route_name", "default"),
            ("upstream_request_attempt_count", "1"),
        ],
    );
    assert_eq!(seen, 1);
}

// ---------------------------------------------------------------------------
// 11. No retry after response bytes reached the client
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_retry_after_response_started() {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()]).with_route("5s", 2, "5xx,reset")).await;
    let out = get(&h, AUTHORITY, "/reset-after-response/200").await;
    assert_eq!(out.status, Some(200), "{out:?}");
    assert!(
        !out.body_complete,
        "the client sees a truncated body: {out:?}"
    );
    let line = one_line(&h).await;
    assert_fields(
        &line,
        &[
            ("response_code", "200"),
            ("response_flags", "UPE"),
            (
                "response_code_details",
                "upstream_reset_after_response_started{protocol_error}",
            ),
            ("upstream_request_attempt_count", "1"),
        ],
    );
    assert_eq!(m.requests(), 1, "never retried once the response started");
}
