//! Self-tests of the mock upstream and the protocol clients, talking to the
//! mock directly (no proxy).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodeway_tests::clients::Outcome;
use nodeway_tests::{
    MockOptions, MockUpstream, Proto, connect_from, raw_exchange, refused_addr, request,
    request_and_abort,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const POD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 5));
const T: Duration = Duration::from_secs(5);

async fn mock(name: &str) -> MockUpstream {
    MockUpstream::start(SocketAddr::new(LOCAL, 0), MockOptions::named(name))
        .await
        .expect("start mock")
}

async fn call(m: &MockUpstream, proto: Proto, path: &str) -> Outcome {
    request(proto, m.addr(), LOCAL, "mock.test", path, Bytes::new(), T).await
}

#[tokio::test]
async fn status_codes() {
    let m = mock("m1").await;
    for proto in Proto::ALL {
        let ok = call(&m, proto, "/status/200").await;
        assert_eq!(ok.status, Some(200), "{proto:?} {ok:?}");
        assert!(ok.body_complete, "{proto:?} {ok:?}");
        assert!(ok.error.is_none(), "{proto:?} {ok:?}");
        assert_eq!(ok.served_by(), Some("m1"), "{proto:?} {ok:?}");
        let bad = call(&m, proto, "/status/503").await;
        assert_eq!(bad.status, Some(503), "{proto:?} {bad:?}");
        assert_eq!(bad.served_by(), Some("m1"), "{proto:?} {bad:?}");
        match proto {
            Proto::Grpc => {
                assert_eq!(ok.grpc_status, Some(0), "{ok:?}");
                assert_eq!(ok.grpc_code, Some(0), "{ok:?}");
                assert_eq!(bad.grpc_status, None, "{bad:?}");
                assert_eq!(bad.grpc_code, Some(14), "{bad:?}");
                assert!(bad.error.is_some(), "{bad:?}");
            }
            _ => {
                assert_eq!(ok.grpc_status, None);
                assert_eq!(ok.body_text(), r#"{"status":200}"#);
                assert_eq!(bad.body_text(), r#"{"status":503}"#);
                assert!(bad.body_complete && bad.error.is_none(), "{bad:?}");
            }
        }
    }
    assert_eq!(m.requests(), 6);
    assert_eq!(m.connections(), 6, "one fresh connection per call");
}

#[tokio::test]
async fn default_echo_size_and_source_ip() {
    let m = mock("m2").await;
    for proto in Proto::ALL {
        let o = request(proto, m.addr(), POD, "a.b", "/anything", Bytes::new(), T).await;
        assert_eq!(o.status, Some(200), "{proto:?} {o:?}");
        let peer = o.header("x-mock-peer").unwrap_or_default();
        assert!(peer.starts_with("127.0.1.5:"), "{proto:?} {o:?}");
        if proto != Proto::Grpc {
            assert_eq!(o.body_text(), "ok");
        }

        let payload = Bytes::from_static(b"hello echo");
        let o = request(proto, m.addr(), POD, "a.b", "/echo", payload.clone(), T).await;
        assert_eq!(o.status, Some(200), "{proto:?} {o:?}");
        assert_eq!(o.body, payload, "{proto:?} {o:?}");
        assert!(o.body_complete, "{proto:?} {o:?}");

        let o = call(&m, proto, "/size/100000").await;
        assert_eq!(o.status, Some(200), "{proto:?} {o:?}");
        assert_eq!(o.body.len(), 100_000, "{proto:?}");
        assert!(o.body_complete, "{proto:?} {o:?}");
    }
}

#[tokio::test]
async fn delay() {
    let m = mock("m3").await;
    for proto in Proto::ALL {
        let o = call(&m, proto, "/delay/100").await;
        assert_eq!(o.status, Some(200), "{proto:?} {o:?}");
        assert!(o.elapsed >= Duration::from_millis(100), "{proto:?} {o:?}");
        assert!(o.body_complete, "{proto:?} {o:?}");
        if proto != Proto::Grpc {
            assert_eq!(o.body_text(), "delayed 100");
        }
        let o = request(
            proto,
            m.addr(),
            LOCAL,
            "x",
            "/delay/2000",
            Bytes::new(),
            Duration::from_millis(100),
        )
        .await;
        assert!(o.timed_out && o.error.is_some(), "{proto:?} {o:?}");
        assert!(o.elapsed < Duration::from_secs(1), "{proto:?} {o:?}");
    }
}

#[tokio::test]
async fn kills_before_response() {
    let m = mock("m4").await;
    for proto in Proto::ALL {
        for path in ["/reset-before-response/50", "/close-before-response/50"] {
            let o = call(&m, proto, path).await;
            assert_eq!(o.status, None, "{proto:?} {path} {o:?}");
            assert!(o.error.is_some(), "{proto:?} {path} {o:?}");
            assert!(!o.timed_out, "{proto:?} {path} {o:?}");
            assert!(!o.body_complete, "{proto:?} {path} {o:?}");
            assert!(
                o.elapsed >= Duration::from_millis(50),
                "{proto:?} {path} {o:?}"
            );
            if proto == Proto::Grpc {
                assert_eq!(o.grpc_status, None, "{path} {o:?}");
                assert!(o.grpc_code.is_some_and(|c| c != 0), "{path} {o:?}");
            }
        }
    }
}

#[tokio::test]
async fn kills_after_response() {
    let m = mock("m5").await;
    for proto in Proto::ALL {
        for path in ["/reset-after-response/50", "/close-after-response/50"] {
            let o = call(&m, proto, path).await;
            assert_eq!(o.status, Some(200), "{proto:?} {path} {o:?}");
            assert!(!o.body_complete, "{proto:?} {path} {o:?}");
            assert!(o.error.is_some(), "{proto:?} {path} {o:?}");
            assert!(!o.timed_out, "{proto:?} {path} {o:?}");
            match proto {
                Proto::Grpc => {
                    assert_eq!(o.grpc_status, None, "{path} {o:?}");
                    assert!(o.grpc_code.is_some_and(|c| c != 0), "{path} {o:?}");
                }
                _ => {
                    assert_eq!(o.header("content-length"), Some("1024"), "{o:?}");
                    assert_eq!(o.body.len(), 100, "{proto:?} {path} {o:?}");
                }
            }
        }
    }
}

/// On HTTP/2 a kill takes down the whole TCP connection, other streams too.
#[tokio::test]
async fn h2_kill_takes_whole_connection() {
    let m = mock("m6").await;
    for path in ["/reset-before-response/100", "/close-before-response/100"] {
        let stream = connect_from(LOCAL, m.addr()).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let get = |p: &str| {
            let mut s = sender.clone();
            let req = http::Request::get(format!("http://x{p}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            async move {
                match s.send_request(req).await {
                    Ok(r) => r.into_body().collect().await.is_ok(),
                    Err(_) => false,
                }
            }
        };
        let started = Instant::now();
        let (slow, killer) = tokio::join!(get("/delay/3000"), get(path));
        assert!(!slow && !killer, "{path}");
        assert!(started.elapsed() < Duration::from_secs(2), "{path}");
        let _ = tokio::time::timeout(T, conn).await.expect("conn ends");
    }
    assert_eq!(m.connections(), 2);
}

#[tokio::test]
async fn http1_keepalive_and_h2_multiplexing() {
    let m = mock("m12").await;
    let stream = connect_from(LOCAL, m.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for i in 0..3 {
        let req = http::Request::get(format!("/status/20{i}"))
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200 + i);
        resp.into_body().collect().await.unwrap();
    }
    drop(sender);
    let _ = tokio::time::timeout(T, conn).await.expect("conn ends");

    let stream = connect_from(LOCAL, m.addr()).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let calls = (0..3).map(|_| {
        let mut s = sender.clone();
        async move {
            let req = http::Request::get("http://x/delay/100")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = s.send_request(req).await.unwrap();
            resp.into_body().collect().await.unwrap().to_bytes()
        }
    });
    let started = Instant::now();
    let bodies = futures_join_all(calls).await;
    assert!(started.elapsed() < Duration::from_millis(300), "concurrent");
    assert!(bodies.iter().all(|b| b == "delayed 100"), "{bodies:?}");
    drop(sender);
    let _ = tokio::time::timeout(T, conn).await.expect("conn ends");
    assert_eq!(m.connections(), 2);
    assert_eq!(m.requests(), 6);
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn grpc_status_trailers_only() {
    let m = mock("m7").await;
    for n in [14, 4, 8] {
        let o = call(&m, Proto::Grpc, &format!("/grpc-status/{n}")).await;
        assert_eq!(o.status, Some(200), "{o:?}");
        assert_eq!(o.grpc_status, Some(n), "{o:?}");
        assert_eq!(o.grpc_code, Some(n), "{o:?}");
        assert!(o.body_complete, "{o:?}");
        assert!(o.error.is_some(), "{o:?}");
    }
}

#[tokio::test]
async fn abort_does_not_hang() {
    let m = mock("m8").await;
    for proto in Proto::ALL {
        let started = Instant::now();
        request_and_abort(
            proto,
            m.addr(),
            LOCAL,
            "x",
            "/delay/5000",
            Duration::from_millis(100),
        )
        .await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(2),
            "{proto:?} {took:?}"
        );
    }
    assert_eq!(m.requests(), 3);
    // Aborting against a dead address does not hang either.
    request_and_abort(
        Proto::Http2,
        refused_addr(LOCAL),
        LOCAL,
        "x",
        "/",
        Duration::from_millis(50),
    )
    .await;
}

#[tokio::test]
async fn fail_rate() {
    let always = MockUpstream::start(
        SocketAddr::new(LOCAL, 0),
        MockOptions {
            name: "bad".into(),
            fail_rate: 1.0,
            fail_code: 500,
            ..MockOptions::default()
        },
    )
    .await
    .unwrap();
    let never = MockUpstream::start(
        SocketAddr::new(LOCAL, 0),
        MockOptions {
            name: "good".into(),
            fail_rate: 0.0,
            fail_code: 500,
            ..MockOptions::default()
        },
    )
    .await
    .unwrap();
    for proto in Proto::ALL {
        for _ in 0..10 {
            let o = call(&always, proto, "/status/200").await;
            assert_eq!(o.status, Some(500), "{proto:?} {o:?}");
            assert_eq!(o.header("x-mock-injected"), Some("true"), "{o:?}");
            assert_eq!(o.served_by(), Some("bad"), "{o:?}");
            if proto != Proto::Grpc {
                assert_eq!(o.body_text(), r#"{"status":500,"injected":true}"#);
            }
            let o = call(&never, proto, "/status/200").await;
            assert_eq!(o.status, Some(200), "{proto:?} {o:?}");
            assert_eq!(o.header("x-mock-injected"), None, "{o:?}");
        }
    }
}

#[tokio::test]
async fn refused() {
    for proto in Proto::ALL {
        let o = request(proto, refused_addr(LOCAL), LOCAL, "x", "/", Bytes::new(), T).await;
        assert_eq!(o.status, None, "{proto:?} {o:?}");
        assert!(o.error.is_some() && !o.timed_out, "{proto:?} {o:?}");
    }
}

#[tokio::test]
async fn upgrade_echo() {
    let m = mock("m9").await;
    let mut s = connect_from(LOCAL, m.addr()).await.unwrap();
    s.write_all(
        b"GET /upgrade-echo HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 4096, "no end of head: {head:?}");
        let n = tokio::time::timeout(T, s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "eof in head: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"ping"[..], b"some more raw bytes \x00\x01\x02"] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(T, s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn raw_exchange_works() {
    let m = mock("m10").await;
    let resp = raw_exchange(
        m.addr(),
        POD,
        b"GET /status/201 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        T,
    )
    .await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    assert!(text.ends_with(r#"{"status":201}"#), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("x-served-by: m10"),
        "{text}"
    );

    let started = Instant::now();
    let resp = raw_exchange(m.addr(), POD, b"NOT HTTP AT ALL\r\n\r\n", T).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    assert!(started.elapsed() < T, "closed by the server");
}

#[tokio::test]
async fn stop_frees_port() {
    let m = mock("m11").await;
    let addr = m.addr();
    assert_eq!(call(&m, Proto::Http1, "/").await.status, Some(200));
    m.stop().await;
    let o = call_addr(addr).await;
    assert_eq!(o.status, None, "{o:?}");
    let again = MockUpstream::start(addr, MockOptions::named("again"))
        .await
        .expect("rebind same port");
    let o = call_addr(addr).await;
    assert_eq!(o.served_by(), Some("again"), "{o:?}");
    again.shutdown();
}

async fn call_addr(addr: SocketAddr) -> Outcome {
    request(Proto::Http1, addr, LOCAL, "x", "/", Bytes::new(), T).await
}
