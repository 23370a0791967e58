//! HTTP/2 control-frame floods against the shared proxy (issue 13), sent as
//! raw frames: what h2 bounds for us, checked as a client would see it.
//! - PING and SETTINGS floods from a client that does not read: the proxy
//!   answers one frame at a time and stops reading until the answer is
//!   written (no queue of PONGs or SETTINGS ACKs grows; Envoy bounds the same
//!   queue with `max_outbound_control_frames`), and neighbours are served.
//! - Empty DATA frames: after 100 the connection gets `GOAWAY
//!   ENHANCE_YOUR_CALM` (Envoy allows 1 with
//!   `max_consecutive_inbound_frames_with_empty_payload`).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use nodeway_tests::{Proto, connect_from, request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use nodeway_tests::h2_frames::*;

/// `POST /echo` to the mock Service.
fn post_headers() -> Vec<u8> {
    request_block(true, "/echo", AUTHORITY)
}

async fn open_h2(h: &Harness) -> TcpStream {
    let mut stream = connect_from(CLIENT_IP, h.addr()).await.unwrap();
    stream.write_all(&client_preface()).await.unwrap();
    stream
}

/// Writes `unit` repeatedly, without ever reading, until `budget` bytes are
/// out or a write has been blocked for a second (the proxy stopped reading).
async fn flood(stream: &mut TcpStream, unit: &[u8], budget: usize) -> usize {
    let batch: Vec<u8> = unit
        .iter()
        .copied()
        .cycle()
        .take(unit.len() * (65536 / unit.len()))
        .collect();
    let mut written = 0;
    while written < budget {
        match tokio::time::timeout(Duration::from_secs(1), stream.write_all(&batch)).await {
            Ok(Ok(())) => written += batch.len(),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    written
}

async fn neighbour_is_served(h: &Harness) {
    let out = request(
        Proto::Http2,
        h.addr(),
        "127.0.1.6".parse().unwrap(),
        AUTHORITY,
        "/status/200",
        Bytes::new(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(out.status, Some(200), "{out:?}");
    assert!(
        out.elapsed < Duration::from_secs(2),
        "neighbour waited {:?}",
        out.elapsed
    );
}

const BUDGET: usize = 256 << 20;

/// The proxy takes no more than its and the kernel's buffers hold before it
/// pushes back: well under the 256 MiB the flood would send.
async fn control_flood_is_pushed_back(unit: Vec<u8>) {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let mut stream = open_h2(&h).await;
    let started = Instant::now();
    let written = flood(&mut stream, &unit, BUDGET).await;
    assert!(
        written < 64 << 20,
        "the proxy kept reading a flood whose answers nobody reads: {written} bytes in {:?}",
        started.elapsed()
    );
    neighbour_is_served(&h).await;
}

#[tokio::test]
async fn a_ping_flood_from_a_client_that_does_not_read_is_pushed_back() {
    control_flood_is_pushed_back(frame(PING, 0, 0, b"12345678")).await;
}

#[tokio::test]
async fn a_settings_flood_from_a_client_that_does_not_read_is_pushed_back() {
    // SETTINGS_INITIAL_WINDOW_SIZE, again and again: each needs an ACK.
    control_flood_is_pushed_back(frame(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0])).await;
}

#[tokio::test]
async fn empty_data_frames_get_goaway_enhance_your_calm() {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let mut stream = open_h2(&h).await;
    stream
        .write_all(&frame(HEADERS, END_HEADERS, 1, &post_headers()))
        .await
        .unwrap();
    let empty = frame(DATA, 0, 1, &[]);
    for _ in 0..200 {
        if stream.write_all(&empty).await.is_err() {
            break;
        }
    }
    // Read frames until the GOAWAY (or the end of the connection).
    let mut received = Vec::new();
    let mut goaway = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 16384];
    while goaway.is_none() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => received.extend_from_slice(&buf[..n]),
            _ => break,
        }
        let mut at = 0;
        while received.len() >= at + 9 {
            let len =
                u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]]) as usize;
            if received.len() < at + 9 + len {
                break;
            }
            if received[at + 3] == GOAWAY && len >= 8 {
                let p = &received[at + 9..at + 17];
                goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            at += 9 + len;
        }
    }
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "frames received: {}",
        received.len()
    );
    neighbour_is_served(&h).await;
}
