//! The acceptance table: outcomes must match Envoy's, over HTTP/1.1,
//! HTTP/2 and gRPC. Each case checks what the client received and the whole
//! access log line.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use nodeway_tests::access_log::Entry;
use nodeway_tests::grpc::METHOD_PATH;
use nodeway_tests::{Outcome, Proto, refused_addr, request, request_and_abort};

const RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled";
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the access log line of one case must say.
struct Line<'a> {
    proto: Proto,
    path: &'a str,
    code: u16,
    flags: &'a str,
    details: &'a str,
    transport: &'a str,
    upstream: SocketAddr,
    /// The upstream answered (service time, response duration, local address known).
    upstream_answered: bool,
    upstream_connected: bool,
    attempts: u32,
    grpc_status: &'a str,
    proxy: SocketAddr,
    /// The client was the tonic stack (it sends `user-agent: tonic/…`).
    tonic: bool,
}

fn expected(l: &Line<'_>) -> Vec<(&'static str, Expect)> {
    let grpc = l.proto == Proto::Grpc;
    let num_or_dash = |present: bool| if present { Expect::Millis } else { is("-") };
    FIELDS
        .iter()
        .map(|&f| {
            let e = match f {
                "start_time" => Expect::Timestamp,
                "method" => is(if grpc { "POST" } else { "GET" }),
                "path" => is(if grpc { METHOD_PATH } else { l.path }),
                "protocol" => is(if l.proto == Proto::Http1 {
                    "HTTP/1.1"
                } else {
                    "HTTP/2"
                }),
                "response_code" => is(l.code),
                "response_flags" => is(l.flags),
                "response_code_details" => is(l.details),
                "connection_termination_details" => is("-"),
                "upstream_transport_failure_reason" => is(l.transport),
                // gRPC sends one length-prefixed MockRequest{path}: 5 + 2 + len.
                "bytes_received" => is(if grpc { 7 + l.path.len() } else { 0 }),
                "bytes_sent" | "duration" | "request_duration" => Expect::Millis,
                "upstream_service_time" | "response_duration" => num_or_dash(l.upstream_answered),
                "x_forwarded_for" | "requested_server_name" => is("-"),
                "user_agent" => {
                    if l.tonic {
                        Expect::Prefix("tonic/".into())
                    } else {
                        is("-")
                    }
                }
                "request_id" => Expect::Uuid,
                "authority" => is(AUTHORITY),
                "upstream_host" => is(l.upstream),
                "upstream_cluster" => is(CLUSTER),
                "upstream_local_address" => {
                    if l.upstream_connected {
                        Expect::Prefix("127.0.0.1:".into())
                    } else {
                        is("-")
                    }
                }
                "downstream_local_address" => is(l.proxy),
                "downstream_remote_address" => Expect::Prefix("127.0.1.5:".into()),
                "route_name" => is("primary"),
                "grpc_status" => is(l.grpc_status),
                "upstream_request_attempt_count" => is(l.attempts),
                "source_workload" => is("sleep"),
                "source_namespace" => is("default"),
                other => panic!("unexpected field {other}"),
            };
            (f, e)
        })
        .collect()
}

async fn one_line(h: &Harness) -> Entry {
    let lines = h.log.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(
        lines.len(),
        1,
        "exactly one access log line expected: {lines:?}"
    );
    lines.into_iter().next().unwrap()
}

fn route() -> impl Fn(MeshConfig) -> MeshConfig {
    |c| c.with_route("1s", 2, RETRY_ON)
}

async fn call(h: &Harness, proto: Proto, path: &str) -> Outcome {
    request(
        proto,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        path,
        Bytes::new(),
        CALL_TIMEOUT,
    )
    .await
}

/// Client view of a local or upstream error reply.
fn assert_error_reply(proto: Proto, out: &Outcome, http_status: u16) {
    match proto {
        Proto::Grpc => {
            assert_eq!(out.status, Some(200), "{out:?}");
            assert_eq!(
                out.grpc_status,
                Some(14),
                "gRPC local replies carry UNAVAILABLE: {out:?}"
            );
        }
        _ => assert_eq!(out.status, Some(http_status), "{out:?}"),
    }
}

macro_rules! over_protocols {
    ($($case:ident),* $(,)?) => {
        mod http1 { $( #[tokio::test] async fn $case() { super::$case(nodeway_tests::Proto::Http1).await } )* }
        mod http2 { $( #[tokio::test] async fn $case() { super::$case(nodeway_tests::Proto::Http2).await } )* }
        mod grpc { $( #[tokio::test] async fn $case() { super::$case(nodeway_tests::Proto::Grpc).await } )* }
    };
}

over_protocols!(
    status_200,
    status_503,
    client_abort,
    reset_before_response,
    close_before_response,
    reset_after_response,
    close_after_response,
    route_timeout,
    connection_refused,
    flaky_endpoint_retried_on_5xx,
);

async fn status_200(proto: Proto) {
    let m = mock("m1").await;
    let h = Harness::start(&route()(MeshConfig::new(vec![m.addr()]))).await;
    let out = call(&h, proto, "/status/200").await;
    assert_eq!(out.status, Some(200), "{out:?}");
    assert!(out.body_complete, "{out:?}");
    if proto == Proto::Grpc {
        assert_eq!(out.grpc_status, Some(0));
    }
    let line = one_line(&h).await;
    let grpc_status = if proto == Proto::Grpc { "OK" } else { "-" };
    assert_line(
        &line,
        &expected(&Line {
            proto,
            path: "/status/200",
            code: 200,
            flags: "-",
            details: "via_upstream",
            transport: "-",
            upstream: m.addr(),
            upstream_answered: true,
            upstream_connected: true,
            attempts: 1,
            grpc_status,
            proxy: h.addr(),
            tonic: proto == Proto::Grpc,
        }),
    );
    assert_eq!(
        line["bytes_sent"].as_str().unwrap(),
        out.body_len_on_wire(proto).to_string()
    );
}

async fn status_503(proto: Proto) {
    let m = mock("m1").await;
    let h = Harness::start(&route()(MeshConfig::new(vec![m.addr()]))).await;
    let out = call(&h, proto, "/status/503").await;
    assert_eq!(out.status, Some(503), "{out:?}");
    assert_eq!(
        m.requests(),
        1,
        "503 is not in retryOn: exactly one upstream request"
    );
    let line = one_line(&h).await;
    assert_line(
        &line,
        &expected(&Line {
            proto,
            path: "/status/503",
            code: 503,
            flags: "-",
            details: "via_upstream",
            transport: "-",
            upstream: m.addr(),
            upstream_answered: true,
            upstream_connected: true,
            attempts: 1,
            grpc_status: "-",
            proxy: h.addr(),
            tonic: proto == Proto::Grpc,
        }),
    );
}

async fn client_abort(proto: Proto) {
    let m = mock("m1").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()]).with_route("10s", 2, RETRY_ON)).await;
    request_and_abort(
        proto,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        "/delay/5000",
        Duration::from_millis(300),
    )
    .await;
    let line = one_line(&h).await;
    assert_line(
        &line,
        &expected(&Line {
            proto,
            path: "/delay/5000",
            code: 0,
            flags: "DC",
            details: "downstream_remote_disconnect",
            transport: "-",
            upstream: m.addr(),
            upstream_answered: false,
            upstream_connected: true,
            attempts: 1,
            grpc_status: "-",
            proxy: h.addr(),
            tonic: false,
        }),
    );
    let duration: u64 = line["duration"].as_str().unwrap().parse().unwrap();
    assert!(
        duration < 4000,
        "logged when the client left, not when the upstream answered: {duration} ms"
    );
}

async fn upstream_terminates_before_response(proto: Proto, path: &str) {
    let m = mock("m1").await;
    let h = Harness::start(&route()(MeshConfig::new(vec![m.addr()]))).await;
    let out = call(&h, proto, path).await;
    assert_error_reply(proto, &out, 503);
    let line = one_line(&h).await;
    assert_line(
        &line,
        &expected(&Line {
            proto,
            path,
            code: if proto == Proto::Grpc { 200 } else { 503 },
            flags: "UC",
            details: "upstream_reset_before_response_started{connection_termination}",
            transport: "-",
            upstream: m.addr(),
            upstream_answered: false,
            upstream_connected: true,
            attempts: 1,
            grpc_status: if proto == Proto::Grpc {
                "Unavailable"
            } else {
                "-"
            },
            proxy: h.addr(),
            tonic: proto == Proto::Grpc,
        }),
    );
}

async fn reset_before_response(proto: Proto) {
    upstream_terminates_before_response(proto, "/reset-before-response/200").await
}

async fn close_before_response(proto: Proto) {
    upstream_terminates_before_response(proto, "/close-before-response/200").await
}

async fn upstream_terminates_after_response(proto: Proto, path: &str) {
    let m = mock("m1").await;
    let h = Harness::start(&route()(MeshConfig::new(vec![m.addr()]))).await;
    let out = call(&h, proto, path).await;
    assert_eq!(out.status, Some(200), "{out:?}");
    assert!(
        !out.body_complete,
        "the client must see a truncated response: {out:?}"
    );
    let line = one_line(&h).await;
    assert_line(
        &line,
        &expected(&Line {
            proto,
            path,
            code: 200,
            flags: "UPE",
            details: "upstream_reset_after_response_started{protocol_error}",
            transport: "-",
            upstream: m.addr(),
            upstream_answered: true,
            upstream_connected: true,
            attempts: 1,
            grpc_status: "-",
            proxy: h.addr(),
            tonic: proto == Proto::Grpc,
        }),
    );
}

async fn reset_after_response(proto: Proto) {
    upstream_terminates_after_response(proto, "/reset-after-response/200").await
}

async fn close_after_response(proto: Proto) {
    upstream_terminates_after_response(proto, "/close-after-response/200").await
}

async fn route_timeout(proto: Proto) {
    let m = mock("m1").await;
    let h = Harness::start(&route()(MeshConfig::new(vec![m.addr()]))).await;
    let out = call(&h, proto, "/delay/3000").await;
    assert_error_reply(proto, &out, 504);
    assert!(
        out.elapsed < Duration::from_millis(2500),
        "answered at the 1s route timeout: {:?}",
        out.elapsed
    );
    let line = one_line(&h).await;
    assert_line(
        &line,
        &expected(&Line {
            proto,
            path: "/delay/3000",
            code: if proto == Proto::Grpc { 200 } else { 504 },
            flags: "UT",
            details: "response_timeout",
            transport: "-",
            upstream: m.addr(),
            upstream_answered: false,
            upstream_connected: true,
            attempts: 1,
            grpc_status: if proto == Proto::Grpc {
                "Unavailable"
            } else {
                "-"
            },
            proxy: h.addr(),
            tonic: proto == Proto::Grpc,
        }),
    );
}

async fn connection_refused(proto: Proto) {
    let dead = refused_addr("127.0.0.1".parse().unwrap());
    let h = Harness::start(&route()(MeshConfig::new(vec![dead]))).await;
    let out = call(&h, proto, "/status/200").await;
    assert_error_reply(proto, &out, 503);
    let line = one_line(&h).await;
    assert_line(
        &line,
        &expected(&Line {
            proto,
            path: "/status/200",
            code: if proto == Proto::Grpc { 200 } else { 503 },
            flags: "URX,UF",
            details: "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
            transport: "delayed_connect_error:_Connection_refused",
            upstream: dead,
            upstream_answered: false,
            upstream_connected: false,
            attempts: 3,
            grpc_status: if proto == Proto::Grpc {
                "Unavailable"
            } else {
                "-"
            },
            proxy: h.addr(),
            tonic: proto == Proto::Grpc,
        }),
    );
}

/// The Istio demo: one of three backends fails 75% of the time with 503;
/// `retryOn: 5xx` and a retry that avoids the host already tried hide it.
async fn flaky_endpoint_retried_on_5xx(proto: Proto) {
    let good1 = mock("good-1").await;
    let good2 = mock("good-2").await;
    let flaky = mock_with("flaky", 0.75, 503).await;
    let config =
        MeshConfig::new(vec![good1.addr(), flaky.addr(), good2.addr()]).with_route("5s", 2, "5xx");
    let h = Harness::start(&config).await;
    // Enough that the flaky endpoint is picked ~20 times: all of them
    // succeeding (0.25^20) cannot pass for "no retry was needed" (with 24
    // requests, 4 picks that all succeeded failed a run).
    const N: usize = 60;
    for _ in 0..N {
        let out = call(&h, proto, "/status/200").await;
        assert_eq!(out.status, Some(200), "{out:?}");
    }
    let lines = h.log.wait_for(N, Duration::from_secs(10)).await;
    assert_eq!(lines.len(), N);
    let mut retried = 0;
    for line in &lines {
        let attempts: u32 = line["upstream_request_attempt_count"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3).contains(&attempts), "{line:?}");
        if attempts > 1 {
            retried += 1;
        }
        assert_eq!(line["response_code"], "200");
        assert_eq!(line["response_flags"], "-");
        assert_eq!(line["response_code_details"], "via_upstream");
    }
    assert!(
        flaky.requests() >= 3,
        "the balancer reaches the flaky endpoint: {}",
        flaky.requests()
    );
    assert!(
        retried > 0,
        "some requests needed a retry (flaky saw {} requests)",
        flaky.requests()
    );
}

trait WireLen {
    fn body_len_on_wire(&self, proto: Proto) -> usize;
}

impl WireLen for Outcome {
    /// Response body bytes as counted by Envoy's `bytes_sent` (gRPC: framed).
    fn body_len_on_wire(&self, proto: Proto) -> usize {
        match proto {
            Proto::Grpc => nodeway_tests::grpc::encode_frame(&nodeway_tests::grpc::MockReply {
                served_by: self.served_by().unwrap_or_default().to_string(),
                payload: self.body.clone(),
            })
            .len(),
            _ => self.body.len(),
        }
    }
}
