//! Envoy's stream idle timeout (issue 13): a request whose body bytes stop
//! moving in both directions for `--stream-idle-timeout` ends, `408` with
//! `SI` before the response started, a cut response with `SI` after; an
//! exchange that keeps moving is never cut, however long it lasts.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use nodeway_tests::access_log::{Entry, field};
use nodeway_tests::{Proto, connect_from, request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IDLE: Duration = Duration::from_millis(400);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(10);

fn get(line: &Entry, key: &str) -> String {
    field(line, key)
        .unwrap_or_else(|| panic!("field {key} missing in {line:?}"))
        .to_string()
}

async fn start(idle: Duration) -> (Harness, nodeway_tests::MockUpstream) {
    let m = mock("m").await;
    let h = Harness::start_with(
        &MeshConfig::new(vec![m.addr()]),
        Arc::new(FixedOriginalDst(None)),
        |o| o.settings.stream_idle_timeout = idle,
    )
    .await;
    (h, m)
}

async fn call(h: &Harness, path: &str) -> nodeway_tests::Outcome {
    request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        path,
        Bytes::new(),
        CALL_TIMEOUT,
    )
    .await
}

#[tokio::test]
async fn a_request_waiting_on_a_silent_upstream_gets_408_si() {
    let (h, m) = start(IDLE).await;
    let out = call(&h, "/delay/5000").await;
    assert_eq!(out.status, Some(408), "{out:?}");
    assert_eq!(out.body_text(), "stream timeout");
    assert!(
        out.elapsed >= IDLE && out.elapsed < IDLE * 4,
        "answered after {:?}",
        out.elapsed
    );
    let lines = h.log.wait_for(1, WAIT).await;
    let line = &lines[0];
    assert_eq!(get(line, "response_code"), "408");
    assert_eq!(get(line, "response_flags"), "SI");
    assert_eq!(get(line, "response_code_details"), "stream_idle_timeout");
    assert_eq!(get(line, "upstream_host"), m.addr().to_string());
    assert_eq!(
        get(line, "upstream_request_attempt_count"),
        "1",
        "never retried"
    );
}

#[tokio::test]
async fn a_response_that_stalls_midway_is_cut_with_si() {
    let (h, _m) = start(IDLE).await;
    // 200, 100 of 1 024 body bytes, then nothing for 5 s.
    let out = call(&h, "/close-after-response/5000").await;
    assert_eq!(out.status, Some(200), "{out:?}");
    assert!(!out.body_complete, "the body is cut: {out:?}");
    assert_eq!(out.body.len(), 100);
    assert!(out.elapsed < IDLE * 4, "cut after {:?}", out.elapsed);
    let lines = h.log.wait_for(1, WAIT).await;
    let line = &lines[0];
    assert_eq!(get(line, "response_code"), "200");
    assert_eq!(get(line, "response_flags"), "SI");
    assert_eq!(get(line, "response_code_details"), "stream_idle_timeout");
    assert_eq!(get(line, "bytes_sent"), "100");
}

/// A request body trickled over 4× the idle timeout, echoed back as it
/// comes: every gap is shorter than the timeout, so nothing is cut.
#[tokio::test]
async fn an_exchange_that_keeps_moving_is_never_idle() {
    let (h, _m) = start(IDLE).await;
    let mut stream = connect_from(CLIENT_IP, h.addr()).await.unwrap();
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: {AUTHORITY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut sent = String::new();
    for i in 0..12 {
        let piece = format!("piece-{i:02};");
        sent.push_str(&piece);
        stream
            .write_all(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(IDLE / 3).await;
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    assert!(started.elapsed() > IDLE * 4);
    let mut reply = Vec::new();
    tokio::time::timeout(CALL_TIMEOUT, stream.read_to_end(&mut reply))
        .await
        .expect("the response ends")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    let echoed: String = reply
        .split("piece-")
        .skip(1)
        .map(|p| format!("piece-{}", &p[..3]))
        .collect();
    assert_eq!(echoed, sent, "{reply}");
    let lines = h.log.wait_for(1, WAIT).await;
    assert_eq!(get(&lines[0], "response_code"), "200");
    assert_eq!(get(&lines[0], "response_flags"), "-");
}

#[tokio::test]
async fn zero_disables_the_stream_idle_timeout() {
    let (h, _m) = start(Duration::ZERO).await;
    let out = call(&h, "/delay/1000").await;
    assert_eq!(out.status, Some(200), "{out:?}");
}
