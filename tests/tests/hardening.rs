//! Hostile and careless input against the shared proxy (issue 13): each test
//! is the regression test of one defect found by probing, and checks what a
//! user would see: the status, the access-log line, the proxy still serving.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use nodeway_tests::{Proto, raw_exchange, request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

fn field<'a>(line: &'a nodeway_tests::access_log::Entry, key: &str) -> &'a str {
    line.get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("field {key} missing in {line:?}"))
}

/// `GET /status/200` from the client pod, through the proxy.
async fn get_status_200(h: &Harness) -> nodeway_tests::Outcome {
    request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        "/status/200",
        Bytes::new(),
        CALL_TIMEOUT,
    )
    .await
}

/// Status line of a raw HTTP/1.1 response.
fn status_line(raw: &[u8]) -> String {
    let end = raw
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Defect 1: `retries.attempts: 2147483647` is valid config; a request must
/// not allocate per possible attempt (it aborted the process with a 64 GiB
/// allocation before).
#[tokio::test]
async fn the_largest_retry_attempts_serve_a_request() {
    let m = mock("m").await;
    let h =
        Harness::start(&MeshConfig::new(vec![m.addr()]).with_route("5s", 2147483647, "5xx")).await;
    let out = get_status_200(&h).await;
    assert_eq!(out.status, Some(200), "{out:?}");
    h.log.wait_for(1, LOG_TIMEOUT).await;
    let line = &h.log.lines()[0];
    assert_eq!(field(line, "response_code"), "200");
    assert_eq!(field(line, "upstream_request_attempt_count"), "1");
}

/// Defect 7: a case-insensitive prefix shorter than the path in bytes but
/// ending inside a multi-byte character panicked the request task (slicing
/// inside `é`). It is simply no match: `404 NR`, and the proxy keeps serving.
#[tokio::test]
async fn case_insensitive_prefix_against_a_multibyte_path_is_no_match() {
    let m = mock("m").await;
    let mut config = MeshConfig::new(vec![m.addr()]);
    config.route_yaml =
        Some("    match:\n    - uri: {prefix: /st}\n      ignoreUriCase: true\n".into());
    let h = Harness::start(&config).await;
    let raw = raw_exchange(
        h.addr(),
        CLIENT_IP,
        format!("GET /s\u{e9} HTTP/1.1\r\nHost: {AUTHORITY}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_line(&raw), "HTTP/1.1 404 Not Found");
    h.log.wait_for(1, LOG_TIMEOUT).await;
    let line = &h.log.lines()[0];
    assert_eq!(field(line, "response_code"), "404");
    assert_eq!(field(line, "response_flags"), "NR");
    // The route still matches what it should.
    let out = get_status_200(&h).await;
    assert_eq!(out.status, Some(200), "{out:?}");
}

/// CPU time this process has used (user + system), from `/proc/self/stat`.
fn process_cpu() -> Duration {
    CpuClock::open().read()
}

/// `/proc/self/stat`, kept open so it can be read without a new descriptor.
struct CpuClock(std::fs::File);

impl CpuClock {
    fn open() -> Self {
        CpuClock(std::fs::File::open("/proc/self/stat").expect("open /proc/self/stat"))
    }

    fn read(&self) -> Duration {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 1024];
        let n = self.0.read_at(&mut buf, 0).expect("read /proc/self/stat");
        let stat = String::from_utf8_lossy(&buf[..n]);
        // Fields after the command name (which may hold spaces) start after ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10)
    }
}

/// Defect 5: connections that send one byte and stall kept the proxy busy
/// (a peek is ready at once while a byte is buffered, so detection polled in
/// a loop) and were never closed at the sniff deadline. Now they cost
/// nothing while they wait, and are closed when it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_holders_cost_no_cpu_and_are_closed_at_the_sniff_deadline() {
    let m = mock("m").await;
    let sniff_timeout = Duration::from_secs(2);
    let h = Harness::start_with(
        &MeshConfig::new(vec![m.addr()]),
        std::sync::Arc::new(FixedOriginalDst(None)),
        |opts| opts.settings.sniff_timeout = sniff_timeout,
    )
    .await;
    let opened = tokio::time::Instant::now();
    let mut holders = Vec::new();
    for _ in 0..200 {
        let mut s = nodeway_tests::connect_from(CLIENT_IP, h.addr())
            .await
            .expect("connect");
        s.write_all(b"G").await.expect("send one byte");
        holders.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = process_cpu();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = process_cpu() - before;
    assert!(
        used < Duration::from_millis(200),
        "200 idle one-byte connections used {used:?} of CPU in 1 s"
    );
    // Each is closed by the proxy once the deadline passes (EOF or reset).
    for (i, s) in holders.iter_mut().enumerate() {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout_at(
            opened + sniff_timeout + Duration::from_secs(3),
            s.read(&mut buf),
        )
        .await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "holder {i} not closed after the sniff deadline: {read:?}"
        );
    }
    // And the proxy still serves.
    let out = get_status_200(&h).await;
    assert_eq!(out.status, Some(200), "{out:?}");
}

/// Defect 5: a client that sends one byte and closes left a `CLOSE_WAIT`
/// socket behind (the peek kept returning the byte after the FIN). The proxy
/// now sees the end at once and closes its side.
#[tokio::test]
async fn a_byte_then_close_is_closed_at_once() {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let mut s = nodeway_tests::connect_from(CLIENT_IP, h.addr())
        .await
        .expect("connect");
    s.write_all(b"G").await.expect("send one byte");
    s.shutdown().await.expect("half-close");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the proxy kept the half-closed connection open: {read:?}"
    );
}

/// Sends one HTTP/1.1 request on a kept-alive connection and reads its
/// response (head and `Content-Length` body); `None` if the connection ended.
async fn keep_alive_exchange(s: &mut tokio::net::TcpStream, request: &str) -> Option<String> {
    s.write_all(request.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return Some(text);
            }
        }
    }
}

/// Defect 6: hyper's header-read timer also ran between requests, so an
/// idle keep-alive connection was closed exactly at `request_header_timeout`
/// and a request sent just after was lost (EOF, no log line). The header
/// timeout now counts from a request's first byte; idle connections get the
/// idle timeout (Envoy's, 1 h by default).
#[tokio::test]
async fn keep_alive_connections_outlive_the_header_timeout() {
    let m = mock("m").await;
    let h = Harness::start_with(
        &MeshConfig::new(vec![m.addr()]),
        std::sync::Arc::new(FixedOriginalDst(None)),
        |opts| opts.settings.request_header_timeout = Duration::from_millis(500),
    )
    .await;
    let mut s = nodeway_tests::connect_from(CLIENT_IP, h.addr())
        .await
        .expect("connect");
    let get = format!("GET /status/200 HTTP/1.1\r\nHost: {AUTHORITY}\r\n\r\n");
    let first = keep_alive_exchange(&mut s, &get)
        .await
        .expect("first response");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let post =
        format!("POST /status/200 HTTP/1.1\r\nHost: {AUTHORITY}\r\nContent-Length: 5\r\n\r\nhello");
    let second = keep_alive_exchange(&mut s, &post)
        .await
        .expect("the idle keep-alive connection was closed under the request");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    h.log.wait_for(2, LOG_TIMEOUT).await;
    let lines = h.log.lines();
    assert_eq!(field(&lines[1], "method"), "POST");
    assert_eq!(field(&lines[1], "response_code"), "200");
}

/// The idle timeout closes a keep-alive connection with no request in
/// progress; a request that started is still bound by the header timeout.
#[tokio::test]
async fn idle_keep_alive_connections_close_at_the_idle_timeout() {
    let m = mock("m").await;
    let h = Harness::start_with(
        &MeshConfig::new(vec![m.addr()]),
        std::sync::Arc::new(FixedOriginalDst(None)),
        |opts| {
            opts.settings.request_header_timeout = Duration::from_millis(300);
            opts.settings.idle_timeout = Duration::from_secs(1);
        },
    )
    .await;
    let mut s = nodeway_tests::connect_from(CLIENT_IP, h.addr())
        .await
        .expect("connect");
    let get = format!("GET /status/200 HTTP/1.1\r\nHost: {AUTHORITY}\r\n\r\n");
    let first = keep_alive_exchange(&mut s, &get)
        .await
        .expect("first response");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let idle_from = tokio::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    let waited = idle_from.elapsed();
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "closed after {waited:?}, idle timeout 1 s"
    );
    // A second connection that starts a request and stalls is cut at the
    // header timeout, well before the idle timeout.
    let mut s = nodeway_tests::connect_from(CLIENT_IP, h.addr())
        .await
        .expect("connect");
    let first = keep_alive_exchange(&mut s, &get)
        .await
        .expect("first response");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    s.write_all(b"GET /status/200 HT")
        .await
        .expect("partial head");
    let started = tokio::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "{read:?}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "a stalled request head was cut after {:?}",
        started.elapsed()
    );
}

/// Sets this process's soft limit on open files (`prlimit`, util-linux).
fn set_nofile_soft_limit(soft: u64) {
    let pid = std::process::id().to_string();
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .expect("hard limit of open files");
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={soft}:{hard}")])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");
}

/// Defect 8: out of file descriptors, the admin API's accept loop retried at
/// once (both cores busy, 100 000 failed `accept4` in 3 s). Every listener
/// now shares one accept loop that backs off after an error.
/// Connects 64 sockets to ADDR after half a second and holds them for 4 s
/// (in a child process, so they need none of this process's descriptors).
const BACKLOG_FILLER: &str = "import socket, sys, time
host, port = sys.argv[1].rsplit(':', 1)
time.sleep(0.5)
socks = []
for _ in range(64):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((host, int(port)))
    except BlockingIOError:
        pass
    socks.append(s)
time.sleep(4)
";

/// A child process that is killed if the test ends early.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_loops_back_off_when_out_of_file_descriptors() {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let admin = h.admin();
    let clock = CpuClock::open();
    let mut filler = KillOnDrop(
        std::process::Command::new("python3")
            .args(["-c", BACKLOG_FILLER, &admin.to_string()])
            .spawn()
            .expect("start python3"),
    );
    let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    set_nofile_soft_limit(open_now + 16);
    // Use up this process's descriptors: the filler's connections then wait
    // in the admin listener's backlog and every accept fails (EMFILE).
    let mut held = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        held.push(f);
        assert!(held.len() < 1000, "the limit did not take effect");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = clock.read();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = clock.read() - before;
    drop(held);
    set_nofile_soft_limit(65536.min(open_now + 10_000));
    assert!(
        used < Duration::from_millis(300),
        "out of descriptors, the accept loops used {used:?} of CPU in 1 s"
    );
    let _ = filler.0.wait();
    // The admin API recovers once descriptors are free again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = tokio::net::TcpStream::connect(admin)
            .await
            .expect("connect");
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("admin API answers again");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
}

/// Defect 8: a silent connection to the admin API was kept forever. The
/// admin, metrics and readiness servers close it after their header timeout.
#[tokio::test]
async fn silent_admin_connections_are_closed() {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let mut s = tokio::net::TcpStream::connect(h.admin())
        .await
        .expect("connect");
    let opened = tokio::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        nodeway::admin::HEADER_TIMEOUT + Duration::from_secs(3),
        s.read(&mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a silent admin connection stayed open: {read:?}"
    );
    assert!(opened.elapsed() >= nodeway::admin::HEADER_TIMEOUT - Duration::from_millis(100));
}

const EJECT_ON_FIRST_5XX: &str = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mock, namespace: default}
spec:
  host: mock
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}
";

/// Sends a chunked POST's head and first chunk, then `tail` (if any), then
/// closes the connection.
async fn broken_chunked_post(h: &Harness, tail: Option<&[u8]>) {
    let mut s = nodeway_tests::connect_from(CLIENT_IP, h.addr())
        .await
        .expect("connect");
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: {AUTHORITY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    if let Some(tail) = tail {
        s.write_all(tail).await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    }
}

/// An HTTP/1.1 upstream written by hand, to control when it reads and
/// answers: it answers 200 only once a request's chunked body is complete
/// (through its last chunk; at once for a request without a chunked body).
/// With `early_503`, the first connection is answered 503 right after its
/// head, without reading the body.
struct RawUpstream {
    addr: std::net::SocketAddr,
    /// Bodies received complete, as sent on the wire.
    complete: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Heads of the requests answered 200.
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Set when the first connection (the early-503 one) was closed by the proxy.
    first_closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections the proxy has closed.
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RawUpstream {
    async fn start(early_503: bool) -> RawUpstream {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let complete = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let first_closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let closed_count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (bodies, closed, seen_heads, closed_all) = (
            complete.clone(),
            first_closed.clone(),
            heads.clone(),
            closed_count.clone(),
        );
        tokio::spawn(async move {
            let mut index = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let first = index == 0;
                index += 1;
                let (bodies, closed, seen_heads, closed_all) = (
                    bodies.clone(),
                    closed.clone(),
                    seen_heads.clone(),
                    closed_all.clone(),
                );
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    let mut answered_early = false;
                    loop {
                        let text = String::from_utf8_lossy(&got).into_owned();
                        if let Some(end) = text.find("\r\n\r\n") {
                            if early_503 && first && !answered_early {
                                answered_early = true;
                                let _ = s
                                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                                    .await;
                            } else if !answered_early
                                && (!text[..end]
                                    .to_ascii_lowercase()
                                    .contains("transfer-encoding: chunked")
                                    || text[end + 4..].contains("0\r\n\r\n"))
                            {
                                seen_heads.lock().unwrap().push(text[..end].to_string());
                                bodies.lock().unwrap().push(text[end + 4..].to_string());
                                let _ = s
                                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                    .await;
                                got.clear();
                                continue;
                            }
                        }
                        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await
                        {
                            Ok(Ok(0)) | Ok(Err(_)) => {
                                if first {
                                    closed.store(true, Ordering::SeqCst);
                                }
                                closed_all.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        RawUpstream {
            addr,
            complete,
            heads,
            first_closed,
            closed: closed_count,
        }
    }
}

/// Defects 2 and 3: a client that sends part of a chunked body and leaves
/// had its truncated body retried and delivered upstream as complete (the
/// upstream answered 200 to `5\r\nhello\r\n0\r\n\r\n`), logged `503 UC`/`URX`
/// and counted against the endpoints until all were ejected. It is the
/// client's failure: `DC`, no response code, one attempt, no ejection, and
/// no body that looks complete upstream.
#[tokio::test]
async fn a_client_leaving_mid_body_is_its_own_failure() {
    let (a, b, c) = (
        RawUpstream::start(false).await,
        RawUpstream::start(false).await,
        RawUpstream::start(false).await,
    );
    let mut config =
        MeshConfig::new(vec![a.addr, b.addr, c.addr]).with_route("10s", 2, "5xx,reset");
    config.extra = EJECT_ON_FIRST_5XX.into();
    let h = Harness::start(&config).await;
    for _ in 0..3 {
        broken_chunked_post(&h, None).await;
    }
    h.log.wait_for(3, LOG_TIMEOUT).await;
    for line in h.log.lines() {
        assert_eq!(field(&line, "response_code"), "0", "{line:?}");
        assert_eq!(field(&line, "response_flags"), "DC", "{line:?}");
        assert_eq!(
            field(&line, "upstream_request_attempt_count"),
            "1",
            "{line:?}"
        );
        assert_eq!(
            field(&line, "response_code_details"),
            "downstream_remote_disconnect"
        );
    }
    for upstream in [&a, &b, &c] {
        let bodies = upstream.complete.lock().unwrap().clone();
        assert!(
            bodies.is_empty(),
            "a truncated body arrived as complete: {bodies:?}"
        );
    }
    // No endpoint was ejected: a complete request is served at once.
    let mut s = nodeway_tests::connect_from(CLIENT_IP, h.addr())
        .await
        .expect("connect");
    let post = format!(
        "POST /echo HTTP/1.1\r\nHost: {AUTHORITY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let reply = keep_alive_exchange(&mut s, &post)
        .await
        .expect("a response");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    h.log.wait_for(4, LOG_TIMEOUT).await;
    let last = h.log.lines().pop().unwrap();
    assert_eq!(field(&last, "response_flags"), "-");
    assert_eq!(field(&last, "upstream_request_attempt_count"), "1");
}

/// Defect 4: when an upstream answered 503 before reading a chunked body,
/// the retry succeeded but the first attempt's upstream connection kept
/// waiting for the rest of the body forever (both attempts polled one body;
/// only the last poller was woken), holding its pool slot. An abandoned
/// attempt now stops sending and its connection is closed.
#[tokio::test]
async fn an_abandoned_attempt_releases_its_upstream_connection() {
    let upstream = RawUpstream::start(true).await;
    let config = MeshConfig::new(vec![upstream.addr]).with_route("10s", 2, "5xx");
    let h = Harness::start(&config).await;
    let mut s = nodeway_tests::connect_from(CLIENT_IP, h.addr())
        .await
        .expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {AUTHORITY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = keep_alive_exchange(&mut s, "5\r\nworld\r\n0\r\n\r\n")
        .await
        .expect("a response");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let bodies = upstream.complete.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert!(
        bodies[0].contains("hello") && bodies[0].contains("world"),
        "the retry got the whole body: {bodies:?}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !upstream
        .first_closed
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned attempt's upstream connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.log.wait_for(1, LOG_TIMEOUT).await;
    let line = &h.log.lines()[0];
    assert_eq!(field(line, "response_code"), "200");
    assert_eq!(field(line, "upstream_request_attempt_count"), "2");
}

/// Defects 2 and 3: a malformed chunk is a downstream protocol error
/// (`400 DPE`), never retried, and the upstream never gets a body that looks
/// complete.
#[tokio::test]
async fn a_malformed_chunk_is_a_downstream_protocol_error() {
    let a = RawUpstream::start(false).await;
    let config = MeshConfig::new(vec![a.addr]).with_route("10s", 2, "5xx,reset");
    let h = Harness::start(&config).await;
    broken_chunked_post(&h, Some(b"zz\r\nnot a chunk\r\n0\r\n\r\n")).await;
    h.log.wait_for(1, LOG_TIMEOUT).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = h.log.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(field(&lines[0], "response_code"), "400");
    assert_eq!(field(&lines[0], "response_flags"), "DPE");
    assert_eq!(
        field(&lines[0], "response_code_details"),
        "http1.codec_error"
    );
    assert_eq!(field(&lines[0], "upstream_request_attempt_count"), "1");
    let bodies = a.complete.lock().unwrap().clone();
    assert!(
        bodies.is_empty(),
        "a malformed body arrived as complete: {bodies:?}"
    );
}

/// When the upstream already streams its response back, a client that
/// leaves mid-body is still the client's failure (`DC`), not an upstream
/// protocol error.
#[tokio::test]
async fn a_client_leaving_mid_body_of_a_streamed_exchange_is_dc() {
    let a = mock("a").await;
    let config = MeshConfig::new(vec![a.addr()]);
    let h = Harness::start(&config).await;
    broken_chunked_post(&h, None).await;
    h.log.wait_for(1, LOG_TIMEOUT).await;
    let line = &h.log.lines()[0];
    assert_eq!(field(line, "response_code"), "200", "{line:?}");
    assert_eq!(field(line, "response_flags"), "DC", "{line:?}");
    assert_eq!(
        field(line, "response_code_details"),
        "downstream_remote_disconnect"
    );
}

/// Defect 11: a zero idle timeout made every upstream connection unusable
/// after one request. Istio admits `0s` only for `tcp.idleTimeout` (which
/// also covers HTTP pools without `http.idleTimeout`), meaning "no idle
/// timeout"; the other zero durations are refused at load (config tests).
/// Two requests in a row share one connection.
#[tokio::test]
async fn a_zero_tcp_idle_timeout_means_disabled() {
    let m = mock("m").await;
    let mut config = MeshConfig::new(vec![m.addr()]);
    config.extra = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mock, namespace: default}
spec:
  host: mock
  trafficPolicy:
    connectionPool:
      tcp: {idleTimeout: 0s}
"
    .into();
    let h = Harness::start(&config).await;
    for _ in 0..2 {
        let out = get_status_200(&h).await;
        assert_eq!(out.status, Some(200), "{out:?}");
    }
    h.log.wait_for(2, LOG_TIMEOUT).await;
    let lines = h.log.lines();
    assert_eq!(
        field(&lines[0], "upstream_local_address"),
        field(&lines[1], "upstream_local_address"),
        "the second request should reuse the first one's upstream connection"
    );
}

/// Defect 11: an absolute-form request forwarded the client's conflicting
/// `Host`; RFC 9112 §3.2.2: the URI's authority replaces it.
#[tokio::test]
async fn absolute_form_authority_replaces_the_host_header() {
    let up = RawUpstream::start(false).await;
    let h = Harness::start(&MeshConfig::new(vec![up.addr])).await;
    let raw = raw_exchange(
        h.addr(),
        CLIENT_IP,
        format!(
            "GET http://{AUTHORITY}/x HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_line(&raw), "HTTP/1.1 200 OK");
    let heads = up.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let hosts: Vec<&str> = heads[0]
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim())
        .collect();
    assert_eq!(hosts, vec![AUTHORITY], "{}", heads[0]);
}

/// Defect 11: a request with two `Host` headers had both forwarded. It is
/// malformed (RFC 9112 §3.2): `400 DPE`, nothing sent upstream.
#[tokio::test]
async fn two_host_headers_are_refused() {
    let up = RawUpstream::start(false).await;
    let h = Harness::start(&MeshConfig::new(vec![up.addr])).await;
    let raw = raw_exchange(
        h.addr(),
        CLIENT_IP,
        format!("GET /x HTTP/1.1\r\nHost: {AUTHORITY}\r\nHost: other.example\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_line(&raw), "HTTP/1.1 400 Bad Request");
    h.log.wait_for(1, LOG_TIMEOUT).await;
    let line = &h.log.lines()[0];
    assert_eq!(field(line, "response_code"), "400");
    assert_eq!(field(line, "response_flags"), "DPE");
    assert!(up.heads.lock().unwrap().is_empty());
}

/// Sends one raw request to `addr` and returns the response's status line.
async fn raw_status(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    status_line(&out)
}

/// Defect 11: the admin API answered any `Host` (a web page could rebind
/// its DNS name to 127.0.0.1 and read it) and state-changing `POST`s from
/// any `Origin`. Only IP addresses and `localhost` are answered, and a
/// `POST` from a web page is refused.
#[tokio::test]
async fn the_admin_api_refuses_web_pages() {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let admin = h.admin();
    let get =
        |host: &str| format!("GET /stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    assert_eq!(
        raw_status(admin, &get("attacker.example:15000")).await,
        "HTTP/1.1 403 Forbidden"
    );
    for host in [
        admin.to_string(),
        "localhost:15000".into(),
        "[::1]:15000".into(),
    ] {
        assert_eq!(
            raw_status(admin, &get(&host)).await,
            "HTTP/1.1 200 OK",
            "{host}"
        );
    }
    let post = |origin: &str| {
        format!(
            "POST /reset_counters HTTP/1.1\r\nHost: {admin}\r\n{origin}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    assert_eq!(
        raw_status(admin, &post("Origin: http://attacker.example\r\n")).await,
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(raw_status(admin, &post("")).await, "HTTP/1.1 200 OK");
}

/// Defect 10: on SIGTERM, hyper's graceful shutdown closed idle keep-alive
/// connections at once, under requests their clients were sending (one lost
/// request per connection). A draining connection now ends only after a
/// response carrying `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_closes_keep_alive_connections_only_after_a_response() {
    let m = mock("m").await;
    let mut h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let addr = h.addr();
    let client = tokio::spawn(async move {
        let mut s = nodeway_tests::connect_from(CLIENT_IP, addr)
            .await
            .expect("connect");
        let get = format!("GET /status/200 HTTP/1.1\r\nHost: {AUTHORITY}\r\n\r\n");
        let mut answered = 0;
        loop {
            // Mostly idle between requests, as a pooling client is.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let Some(reply) = keep_alive_exchange(&mut s, &get).await else {
                return Err(format!(
                    "request {} lost: the connection closed under it",
                    answered + 1
                ));
            };
            answered += 1;
            if reply.to_ascii_lowercase().contains("connection: close") {
                return Ok(answered);
            }
            if answered > 2000 {
                return Err("never told to close".into());
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = h.proxy.take().expect("running proxy");
    let drained = tokio::time::timeout(Duration::from_secs(10), running.shutdown())
        .await
        .expect("shutdown returns");
    let answered = client.await.unwrap().expect("no request lost");
    assert!(answered > 10, "{answered}");
    assert!(drained, "the connection ended within the drain timeout");
}

/// Defect 11: an HTTP/0.9-style request line (no version) was answered 400
/// by hyper but logged 414: the log now says what the client got.
#[tokio::test]
async fn an_http09_request_is_logged_as_the_400_it_gets() {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let raw = raw_exchange(
        h.addr(),
        CLIENT_IP,
        b"GET /\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_line(&raw), "HTTP/1.1 400 Bad Request");
    h.log.wait_for(1, LOG_TIMEOUT).await;
    let line = &h.log.lines()[0];
    assert_eq!(field(line, "response_code"), "400");
    assert_eq!(field(line, "response_flags"), "DPE");
    assert_eq!(field(line, "response_code_details"), "http1.codec_error");
}

/// Resident memory of this process, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Defect 9: every client pod built its own consistent-hash ring on its
/// first request (and again after any configuration change): with a
/// `minimumRingSize` of millions, tens of MB and hundreds of ms each. Client
/// pods with the same endpoints now share one ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pods_share_one_consistent_hash_ring() {
    let m = mock("m").await;
    let mut config = MeshConfig::new(vec![m.addr()]);
    config.extra = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mock, namespace: default}
spec:
  host: mock
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user, minimumRingSize: 4000000}
"
    .into();
    let h = Harness::start(&config).await;
    // One ring: 4M entries of 12 bytes, ~48 MB (four: ~190 MB).
    let before = rss_bytes();
    for n in 0..4u8 {
        // Distinct source addresses: distinct client pods (unknown ones).
        let src = std::net::IpAddr::from([127, 0, 2, 10 + n]);
        let out = request(
            Proto::Http1,
            h.addr(),
            src,
            AUTHORITY,
            "/status/200",
            Bytes::new(),
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(out.status, Some(200), "{out:?}");
    }
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 110 << 20,
        "4 client pods with the same endpoints grew RSS by {} MiB",
        grown >> 20
    );
}

/// Defect 11: every source address that matched no pod got client state of
/// its own, kept forever: connections from many addresses grew the
/// registry without bound. Past a bound they share one client state.
#[tokio::test]
async fn unknown_sources_share_state_past_a_bound() {
    let m = mock("m").await;
    let h = Harness::start_with(
        &MeshConfig::new(vec![m.addr()]),
        std::sync::Arc::new(FixedOriginalDst(None)),
        |opts| opts.settings.max_unknown_clients = 4,
    )
    .await;
    for n in 1..=8u8 {
        let out = request(
            Proto::Http1,
            h.addr(),
            std::net::IpAddr::from([127, 0, 4, n]),
            AUTHORITY,
            "/status/200",
            Bytes::new(),
            CALL_TIMEOUT,
        )
        .await;
        assert_eq!(out.status, Some(200), "{out:?}");
    }
    let dump = raw_exchange(
        h.admin(),
        "127.0.0.1".parse().unwrap(),
        format!(
            "GET /config_dump HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            h.admin()
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&dump);
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let dump: serde_json::Value = serde_json::from_str(body).expect("config_dump JSON");
    let mut sources: Vec<String> = dump["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["source_pod"].as_str().map(str::to_owned))
        .collect();
    sources.sort();
    sources.dedup();
    assert_eq!(
        sources,
        vec![
            "127.0.4.1",
            "127.0.4.2",
            "127.0.4.3",
            "127.0.4.4",
            "unknown-clients"
        ],
    );
}

/// Defect 11: an HTTP/2 client that resets each stream a few milliseconds
/// after HEADERS was never cut off (2 000 streams reached 864 upstream
/// requests): hyper's limit counts only streams reset before they are
/// handled. Envoy's premature-reset rule closes the connection once half of
/// 500 ended streams were reset within a second of their start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_rapid_reset_is_cut_off_by_the_premature_reset_rule() {
    const STREAMS: usize = 1500;
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let stream = nodeway_tests::connect_from(CLIENT_IP, h.addr())
        .await
        .expect("connect");
    let (mut client, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    let conn_task = tokio::spawn(conn);
    let mut sent = 0usize;
    let run = tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..STREAMS {
            if std::future::poll_fn(|cx| client.poll_ready(cx))
                .await
                .is_err()
            {
                break;
            }
            let req = http::Request::builder()
                .method("GET")
                .uri(format!("http://{AUTHORITY}/delay/1000"))
                .body(())
                .expect("request");
            let Ok((_response, mut send)) = client.send_request(req, true) else {
                break;
            };
            sent += 1;
            // Long enough for the proxy to take the stream and forward it.
            tokio::time::sleep(Duration::from_millis(3)).await;
            send.send_reset(h2::Reason::CANCEL);
        }
    })
    .await;
    assert!(run.is_ok(), "the reset loop must end in time");
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn_task).await;
    assert!(
        sent < 700,
        "the connection took {sent} prematurely reset streams before it was closed"
    );
    assert!(sent >= 500, "closed after only {sent} streams");
}

/// Defect 11: `CONNECT` was forwarded upstream and logged 200. Envoy's
/// routes need a path, which CONNECT lacks: `404 NR`, nothing sent upstream.
#[tokio::test]
async fn connect_requests_find_no_route() {
    let up = RawUpstream::start(false).await;
    let h = Harness::start(&MeshConfig::new(vec![up.addr])).await;
    let raw = raw_exchange(
        h.addr(),
        CLIENT_IP,
        format!("CONNECT {AUTHORITY} HTTP/1.1\r\nHost: {AUTHORITY}\r\n\r\n").as_bytes(),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(status_line(&raw), "HTTP/1.1 404 Not Found");
    h.log.wait_for(1, LOG_TIMEOUT).await;
    let line = &h.log.lines()[0];
    assert_eq!(field(line, "method"), "CONNECT");
    assert_eq!(field(line, "response_code"), "404");
    assert_eq!(field(line, "response_flags"), "NR");
    assert!(up.heads.lock().unwrap().is_empty());
}

/// Defect 11: the DestinationRule's `tcp.idleTimeout` was ignored for TCP
/// (L4) connections, which stayed open forever. An idle TCP connection is
/// closed after it (Envoy's `tcp_proxy` idle timeout; 1 h by default), and
/// the access log says why.
#[tokio::test]
async fn tcp_connections_close_after_the_tcp_idle_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), tokio::io::copy(&mut r, &mut w))
                        .await;
            });
        }
    });
    let mut config = MeshConfig::new(vec![echo]);
    config.port_name = "tcp".into();
    config.extra = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mock, namespace: default}
spec:
  host: mock
  trafficPolicy:
    connectionPool:
      tcp: {idleTimeout: 1s}
"
    .into();
    let vip: std::net::SocketAddr = "10.96.0.20:8080".parse().unwrap();
    let h = Harness::start_with(
        &config,
        std::sync::Arc::new(FixedOriginalDst(Some(vip))),
        |_| {},
    )
    .await;
    let mut s = nodeway_tests::connect_from(CLIENT_IP, h.addr())
        .await
        .expect("connect");
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"ping");
    let idle_from = tokio::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    let waited = idle_from.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "closed after {waited:?}, tcp.idleTimeout 1s"
    );
    h.log.wait_for(1, LOG_TIMEOUT).await;
    let line = &h.log.lines()[0];
    assert_eq!(
        field(line, "connection_termination_details"),
        "idle_timeout"
    );
    assert_eq!(field(line, "bytes_received"), "4");
}

/// Defect 11: a TLS ClientHello or other non-HTTP bytes to the node-side
/// listener, with no Service behind the connection, was closed with no log
/// line. It is logged as Envoy logs a connection no filter chain matches.
#[tokio::test]
async fn unroutable_non_http_connections_are_logged() {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let mut s = nodeway_tests::connect_from(CLIENT_IP, h.addr())
        .await
        .expect("connect");
    s.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    h.log.wait_for(1, LOG_TIMEOUT).await;
    let line = &h.log.lines()[0];
    assert_eq!(field(line, "response_flags"), "NR");
    assert_eq!(field(line, "response_code"), "0");
    assert_eq!(field(line, "source_workload"), "sleep");
    assert_ne!(field(line, "bytes_received"), "0");
}

/// An idle upstream keep-alive connection was only closed when the next
/// request found it too old, so one that was never needed again stayed
/// open for good. Its own timer now closes it after `idleTimeout`.
#[tokio::test]
async fn idle_upstream_connections_close_on_their_own() {
    let up = RawUpstream::start(false).await;
    let mut config = MeshConfig::new(vec![up.addr]);
    config.extra = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mock, namespace: default}
spec:
  host: mock
  trafficPolicy:
    connectionPool:
      http: {idleTimeout: 1s}
"
    .into();
    let h = Harness::start(&config).await;
    let out = get_status_200(&h).await;
    assert_eq!(out.status, Some(200), "{out:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while up.closed.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle upstream connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `tcpKeepalive` values Istio accepts (or rounds) but Linux refuses —
/// `probes: 0`, a time under a second, an interval over 32 767 s — were
/// passed to `setsockopt` as they were, so every connection to the service
/// failed (`503 UF`). Nodeway now leaves a zero count to the kernel, as
/// Istio does, and clamps the rest to what Linux takes.
#[tokio::test]
async fn tcp_keepalive_values_linux_refuses_do_not_break_connections() {
    let m = mock("m").await;
    let mut config = MeshConfig::new(vec![m.addr()]);
    config.extra = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mock, namespace: default}
spec:
  host: mock
  trafficPolicy:
    connectionPool:
      tcp:
        tcpKeepalive: {probes: 0, time: 500ms, interval: 10h}
"
    .into();
    let h = Harness::start(&config).await;
    let out = get_status_200(&h).await;
    assert_eq!(out.status, Some(200), "{out:?}");
    h.log.wait_for(1, LOG_TIMEOUT).await;
    assert_eq!(field(&h.log.lines()[0], "response_flags"), "-");
}

/// Defect 9, the rest: a large consistent-hash ring is built by the first
/// request that needs it, and while it was built the runtime worker serving
/// that request served nothing else: on one worker, every other client pod
/// stalled for the whole build. The build now hands the worker's other
/// tasks to another thread, so a neighbour calling another Service is
/// served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_ring_build_does_not_stall_other_client_pods() {
    let m = mock("m").await;
    let mut config = MeshConfig::new(vec![m.addr()]);
    config.extra = format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: mock, namespace: default}}
spec:
  host: mock
  trafficPolicy:
    loadBalancer:
      consistentHash: {{httpHeaderName: x-user, minimumRingSize: 4000000}}
---
apiVersion: v1
kind: Service
metadata: {{name: plain, namespace: default}}
spec:
  clusterIP: 10.96.0.21
  ports: [{{name: web, port: 8080, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: plain-0
  namespace: default
  labels: {{kubernetes.io/service-name: plain}}
addressType: IPv4
ports: [{{name: web, port: {port}}}]
endpoints:
- addresses: [\"{ip}\"]
  conditions: {{ready: true}}
",
        port = m.addr().port(),
        ip = m.addr().ip()
    );
    let h = Harness::start(&config).await;
    let proxy = h.addr();
    let neighbour = |n: u8| async move {
        request(
            Proto::Http1,
            proxy,
            std::net::IpAddr::from([127, 0, 5, n]),
            "plain.default.svc.cluster.local:8080",
            "/status/200",
            Bytes::new(),
            Duration::from_secs(60),
        )
        .await
    };
    // The neighbour's own cluster exists before the ring build starts.
    assert_eq!(neighbour(1).await.status, Some(200));
    let ring_user = tokio::spawn(async move {
        request(
            Proto::Http1,
            proxy,
            CLIENT_IP,
            AUTHORITY,
            "/status/200",
            Bytes::new(),
            Duration::from_secs(120),
        )
        .await
    });
    let mut slowest = Duration::ZERO;
    let mut calls = 0;
    while !ring_user.is_finished() {
        let out = neighbour(1).await;
        assert_eq!(out.status, Some(200), "{out:?}");
        slowest = slowest.max(out.elapsed);
        calls += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let built = ring_user.await.unwrap();
    assert_eq!(built.status, Some(200), "{built:?}");
    assert!(
        built.elapsed > Duration::from_millis(500),
        "the ring build was too quick to show anything: {:?}",
        built.elapsed
    );
    assert!(
        slowest < built.elapsed / 4,
        "a neighbour waited {slowest:?} while a {:?} ring build ran ({calls} calls)",
        built.elapsed
    );
}
