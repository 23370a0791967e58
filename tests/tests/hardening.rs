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
    let out = request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        "/status/200",
        Bytes::new(),
        CALL_TIMEOUT,
    )
    .await;
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
    let out = request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        "/status/200",
        Bytes::new(),
        CALL_TIMEOUT,
    )
    .await;
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
    let out = request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        "/status/200",
        Bytes::new(),
        CALL_TIMEOUT,
    )
    .await;
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
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
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
