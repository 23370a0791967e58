//! Downstream admission (issue 13): node-wide caps on downstream connections
//! and requests, the share one client pod may hold, and the overload manager
//! on memory. What a user checks: the refused client's status and access-log
//! line (`OM`), the neighbours still served, the counters.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use nodeway_tests::access_log::{Entry, field};
use nodeway_tests::{Proto, connect_from, request};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(10);

fn source(last_octet: u8) -> IpAddr {
    IpAddr::from([127, 0, 1, last_octet])
}

fn get(line: &Entry, key: &str) -> String {
    field(line, key)
        .unwrap_or_else(|| panic!("field {key} missing in {line:?}"))
        .to_string()
}

async fn call(h: &Harness, src: IpAddr, path: &str) -> nodeway_tests::Outcome {
    request(
        Proto::Http1,
        h.addr(),
        src,
        AUTHORITY,
        path,
        Bytes::new(),
        CALL_TIMEOUT,
    )
    .await
}

async fn open_from(h: &Harness, src: IpAddr) -> TcpStream {
    connect_from(src, h.addr()).await.expect("connect")
}

/// The proxy closes `stream` without sending anything.
async fn assert_closed_at_once(mut stream: TcpStream) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("a refused connection is closed at once, not held");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a refused connection got bytes: {read:?}"
    );
}

async fn start(tweak: impl FnOnce(&mut nodeway::app::RunOptions)) -> (Harness, MockUpstream) {
    let m = mock("m").await;
    let h = Harness::start_with(
        &MeshConfig::new(vec![m.addr()]),
        Arc::new(FixedOriginalDst(None)),
        tweak,
    )
    .await;
    (h, m)
}

use nodeway_tests::mock::MockUpstream;

#[tokio::test]
async fn a_client_pod_holding_its_share_of_connections_is_refused_more_and_neighbours_are_served() {
    let (h, _m) = start(|o| {
        o.settings.max_downstream_connections = 4;
        o.settings.max_client_share_percent = 50;
    })
    .await;
    // The pod `sleep` holds two idle connections: its whole share of 4.
    let _held = [
        open_from(&h, CLIENT_IP).await,
        open_from(&h, CLIENT_IP).await,
    ];
    wait_for_metric(&h, "nodeway_downstream_connections", &[], 2.0, WAIT).await;
    assert_closed_at_once(open_from(&h, CLIENT_IP).await).await;

    let lines = h.log.wait_for(1, WAIT).await;
    let line = &lines[0];
    assert_eq!(get(line, "response_flags"), "OM", "{line:?}");
    assert_eq!(get(line, "response_code"), "0");
    assert_eq!(
        get(line, "response_code_details"),
        "client_downstream_connection_limit"
    );
    assert_eq!(get(line, "source_workload"), "sleep");
    assert!(get(line, "downstream_remote_address").starts_with("127.0.1.5:"));
    let refused = [("kind", "connection"), ("reason", "client_limit")];
    assert_eq!(
        metric(&h, "nodeway_downstream_rejected_total", &refused).await,
        1.0
    );
    assert_eq!(
        metric(
            &h,
            "nodeway_client_downstream_connections",
            &[("source_workload", "sleep")]
        )
        .await,
        2.0
    );

    // Another client is served while `sleep` is at its share.
    let out = call(&h, source(6), "/status/200").await;
    assert_eq!(out.status, Some(200), "{out:?}");

    // The node-wide cap: two more sources take the last two slots; the
    // next source, though it holds nothing, is refused.
    wait_for_metric(&h, "nodeway_downstream_connections", &[], 2.0, WAIT).await;
    let _more = [
        open_from(&h, source(7)).await,
        open_from(&h, source(8)).await,
    ];
    wait_for_metric(&h, "nodeway_downstream_connections", &[], 4.0, WAIT).await;
    assert_closed_at_once(open_from(&h, source(9)).await).await;
    let node_refused = [("kind", "connection"), ("reason", "node_limit")];
    wait_for_metric(
        &h,
        "nodeway_downstream_rejected_total",
        &node_refused,
        1.0,
        WAIT,
    )
    .await;
    let lines = h.log.wait_for(3, WAIT).await;
    let last = lines.last().unwrap();
    assert_eq!(get(last, "response_flags"), "OM");
    assert_eq!(
        get(last, "response_code_details"),
        "node_downstream_connection_limit"
    );

    // Slots come back when connections close.
    drop(_held);
    wait_for_metric(&h, "nodeway_downstream_connections", &[], 2.0, WAIT).await;
    let out = call(&h, CLIENT_IP, "/status/200").await;
    assert_eq!(out.status, Some(200), "{out:?}");
}

#[tokio::test]
async fn a_client_pod_at_its_share_of_requests_gets_503_om_and_neighbours_are_served() {
    let (h, _m) = start(|o| {
        o.settings.max_downstream_requests = 2;
        o.settings.max_client_share_percent = 50;
    })
    .await;
    let proxy = h.addr();
    let slow = tokio::spawn(async move {
        request(
            Proto::Http1,
            proxy,
            CLIENT_IP,
            AUTHORITY,
            "/delay/1500",
            Bytes::new(),
            CALL_TIMEOUT,
        )
        .await
    });
    wait_for_metric(&h, "nodeway_downstream_requests", &[], 1.0, WAIT).await;

    let refused = call(&h, CLIENT_IP, "/status/200").await;
    assert_eq!(refused.status, Some(503), "{refused:?}");
    assert_eq!(refused.header("x-envoy-overloaded"), Some("true"));
    assert_eq!(refused.body_text(), "envoy overloaded");
    let neighbour = call(&h, source(6), "/status/200").await;
    assert_eq!(neighbour.status, Some(200), "{neighbour:?}");

    let first = h.log.wait_for(1, WAIT).await;
    let line = &first[0];
    assert_eq!(get(line, "response_code"), "503");
    assert_eq!(get(line, "response_flags"), "OM");
    assert_eq!(
        get(line, "response_code_details"),
        "client_downstream_request_limit"
    );
    assert_eq!(get(line, "upstream_host"), "-", "never sent upstream");
    assert_eq!(
        metric(
            &h,
            "nodeway_downstream_rejected_total",
            &[("kind", "request"), ("reason", "client_limit")]
        )
        .await,
        1.0
    );

    // The slot comes back with the slow response.
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, Some(200), "{slow:?}");
    let again = call(&h, CLIENT_IP, "/status/200").await;
    assert_eq!(again.status, Some(200), "{again:?}");
    wait_for_metric(&h, "nodeway_downstream_requests", &[], 0.0, WAIT).await;
}

/// Envoy's overload manager with a fixed memory limit: the process is far
/// above a 1 MiB limit, so both actions are active: requests get `503 OM`
/// and HTTP/1.1 responses close the connection.
#[tokio::test]
async fn above_the_memory_limit_requests_get_503_om_and_keep_alive_is_off() {
    let (h, m) = start(|o| {
        o.settings.overload_memory_limit = Some(1 << 20);
    })
    .await;
    wait_for_metric(
        &h,
        "envoy_overload_envoy_overload_actions_stop_accepting_requests_active",
        &[],
        1.0,
        WAIT,
    )
    .await;
    assert_eq!(
        metric(
            &h,
            "envoy_overload_envoy_overload_actions_disable_http_keepalive_active",
            &[]
        )
        .await,
        1.0
    );
    assert!(
        metric(
            &h,
            "envoy_overload_envoy_resource_monitors_fixed_heap_pressure",
            &[]
        )
        .await
            > 100.0
    );
    let out = call(&h, CLIENT_IP, "/status/200").await;
    assert_eq!(out.status, Some(503), "{out:?}");
    assert_eq!(out.header("x-envoy-overloaded"), Some("true"));
    assert_eq!(out.header("connection"), Some("close"));
    let lines = h.log.wait_for(1, WAIT).await;
    assert_eq!(get(&lines[0], "response_flags"), "OM");
    assert_eq!(get(&lines[0], "response_code_details"), "overload");
    assert_eq!(m.requests(), 0, "nothing reached the upstream");
    assert_eq!(
        metric(
            &h,
            "nodeway_downstream_rejected_total",
            &[("kind", "request"), ("reason", "memory")]
        )
        .await,
        1.0
    );
}

/// Without a memory limit nothing is refused, however large the process.
#[tokio::test]
async fn without_a_memory_limit_there_is_no_pressure() {
    let (h, _m) = start(|_| {}).await;
    let out = call(&h, CLIENT_IP, "/status/200").await;
    assert_eq!(out.status, Some(200), "{out:?}");
    assert_ne!(out.header("connection"), Some("close"));
    assert_eq!(
        metric(
            &h,
            "envoy_overload_envoy_resource_monitors_fixed_heap_pressure",
            &[]
        )
        .await,
        0.0
    );
}
