//! What the fuzz targets share: the mesh configuration, and an in-process
//! Nodeway with an upstream behind it, both on loopback.
//!
//! libfuzzer-sys installs a panic hook that aborts, so a panic in any proxy
//! task (not only in the target's own code) is reported as a crash.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodeway::app::{Readiness, RunOptions, Running};
use nodeway::config::{LoadOptions, load_str};
use nodeway::redirect::OriginalDst;
use nodeway::state::Snapshot;
use nodeway::telemetry::access_log::AccessLogTarget;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;

/// The mesh of every target; `__PORT__` is the upstream's port.
pub const CONFIG: &str = include_str!("config.yaml");
/// The client pod of [`CONFIG`]: connections from this address are its.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 5);
/// The clusterIP of `web`: every fuzzed connection was "redirected" from here.
pub const SERVICE_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 3, 1)), 80);
const ENDPOINTS: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 2, 1), Ipv4Addr::new(127, 0, 2, 2)];
/// A connection the proxy has not finished this long after its client sent
/// everything and closed its side is a hang.
pub const EXCHANGE_DEADLINE: Duration = Duration::from_secs(5);

/// [`CONFIG`] resolved, with `port` as the upstream port.
pub fn snapshot(port: u16) -> Snapshot {
    let yaml = CONFIG.replace("__PORT__", &port.to_string());
    let opts = LoadOptions {
        node_name: Some("node-a".into()),
        ..LoadOptions::default()
    };
    match load_str("fuzz.yaml", &yaml, &opts) {
        Ok(loaded) => loaded.snapshot,
        Err(problems) => panic!("the fuzz mesh does not load: {problems:?}"),
    }
}

/// Every connection says it was redirected from `web`'s clusterIP, as the
/// eBPF programs would report it.
struct FixedOriginalDst;
impl OriginalDst for FixedOriginalDst {
    fn original_dst(&self, _stream: &TcpStream) -> Option<SocketAddr> {
        Some(SERVICE_VIP)
    }
}

/// A running proxy and upstream, started once per fuzzing process.
pub struct Harness {
    pub runtime: Runtime,
    pub proxy: Running,
}

impl Harness {
    pub fn get() -> &'static Harness {
        static HARNESS: OnceLock<Harness> = OnceLock::new();
        HARNESS.get_or_init(|| {
            let harness = Harness::start();
            // A harness whose requests never reach the upstream would
            // explore nothing: check one before fuzzing.
            let reply = harness.exchange(
                b"GET /fallback HTTP/1.1\r\nHost: web\r\n\r\n",
                Duration::from_secs(2),
            );
            assert!(
                reply.starts_with(b"HTTP/1.1 200 OK\r\n"),
                "the fuzz proxy does not serve a plain GET: {}",
                String::from_utf8_lossy(&reply)
            );
            harness
        })
    }

    fn start() -> Harness {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let proxy = runtime.block_on(async {
            let port = serve_upstream().await;
            let dir = std::env::temp_dir().join(format!("nodeway-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let config = dir.join("mesh.yaml");
            std::fs::write(&config, CONFIG.replace("__PORT__", &port.to_string()))
                .expect("write config");
            let any = SocketAddr::from(([127, 0, 0, 1], 0));
            let mut opts = RunOptions::new(config);
            opts.outbound_addr = any;
            opts.admin_addr = any;
            opts.metrics_addr = any;
            opts.readiness = Readiness::Off;
            opts.node = Some("node-a".into());
            // Every line is still formatted: only the write is skipped.
            opts.access_log = AccessLogTarget::File("/dev/null".into());
            opts.settings.request_header_timeout = Duration::from_secs(1);
            opts.settings.sniff_timeout = Duration::from_secs(1);
            nodeway::app::start(opts, Arc::new(FixedOriginalDst))
                .await
                .expect("the proxy starts")
        });
        Harness { runtime, proxy }
    }

    /// Sends `input` from the client pod to the proxy and reads what comes
    /// back until the proxy closes or is quiet for `quiet` (a keep-alive
    /// connection after its responses); then closes the sending side (which
    /// ends a request still being sent, as a client leaving does) and reads
    /// until the proxy closes. Panics (a crash for libFuzzer) if the proxy
    /// has not closed [`EXCHANGE_DEADLINE`] after that.
    pub fn exchange(&self, input: &[u8], quiet: Duration) -> Vec<u8> {
        let addr = self.proxy.outbound_addr;
        self.runtime.block_on(async move {
            let socket = TcpSocket::new_v4().expect("socket");
            socket
                .bind(SocketAddr::new(IpAddr::V4(CLIENT_IP), 0))
                .expect("bind the client address");
            let mut stream = socket.connect(addr).await.expect("connect to the proxy");
            // The proxy may close early (a 400 and goodbye): not an error.
            let _ = stream.write_all(input).await;
            let mut reply = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return reply,
                    Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
                    Err(_) => break,
                }
            }
            let _ = stream.shutdown().await;
            let rest = async {
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
                rest
            };
            match tokio::time::timeout(EXCHANGE_DEADLINE, rest).await {
                Ok(rest) => {
                    reply.extend_from_slice(&rest);
                    reply
                }
                Err(_) => panic!(
                    "the proxy did not finish a connection within {EXCHANGE_DEADLINE:?} after its client closed"
                ),
            }
        })
    }
}

/// HTTP/1.1 and HTTP/2 on every endpoint address and one port: echoes the
/// request body; `x-status: NNN` chooses the status (to drive retries and
/// outlier detection), `x-close: 1` closes the connection without answering.
async fn serve_upstream() -> u16 {
    let first = TcpListener::bind(SocketAddr::new(IpAddr::V4(ENDPOINTS[0]), 0))
        .await
        .expect("bind the upstream");
    let port = first.local_addr().expect("bound").port();
    let mut listeners = vec![first];
    for ip in &ENDPOINTS[1..] {
        listeners.push(
            TcpListener::bind(SocketAddr::new(IpAddr::V4(*ip), port))
                .await
                .expect("bind the upstream"),
        );
    }
    for listener in listeners {
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let service =
                        service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                            let status = req
                                .headers()
                                .get("x-status")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse::<u16>().ok())
                                .and_then(|v| http::StatusCode::from_u16(v).ok())
                                .unwrap_or(http::StatusCode::OK);
                            let close = req.headers().contains_key("x-close");
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if close {
                                return Err("closing as asked");
                            }
                            let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() = status;
                            Ok(resp)
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    port
}
