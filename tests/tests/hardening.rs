//! Hostile and careless input against the shared proxy (issue 13): each test
//! is the regression test of one defect found by probing, and checks what a
//! user would see: the status, the access-log line, the proxy still serving.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use nodeway_tests::{Proto, raw_exchange, request};

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
