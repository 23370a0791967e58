//! Listeners and connections: identify the client pod, find where the
//! connection was going, detect the protocol, and serve HTTP or TCP.

pub mod body;
pub mod cluster;
pub mod http;
pub mod route;
pub mod sniff;
pub mod tcp;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::redirect::OriginalDst;
use crate::redirect::netns::Dialer;
use crate::resilience::breaker::NodeBudget;
use crate::state::{AppProtocol, Snapshot, Workload};
use crate::telemetry::ResponseFlag;
use crate::telemetry::access_log::{AccessLogEntry, AccessLogger};
use cluster::ClusterRegistry;
use route::ServiceTarget;
use sniff::Sniffed;

/// Limits of the downstream side. Defaults follow Envoy where it has one.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// A client must finish sending request headers within this time (default 10 s).
    pub request_header_timeout: Duration,
    /// Largest request header block; larger gets 431 (default 60 KiB, Envoy's).
    pub max_request_headers_bytes: usize,
    /// Most request headers; more gets 431 (default 100, Envoy's).
    pub max_request_headers: usize,
    /// HTTP/2 streams a client may open at once on one connection (default 1024).
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client before the proxy handled them,
    /// tolerated at once before the connection is closed (rapid reset; default 20).
    pub http2_max_pending_accept_reset_streams: usize,
    /// How long protocol detection waits for the first bytes (default 10 s, then TCP).
    pub sniff_timeout: Duration,
    /// Node-wide cap on upstream connections across all clients (default 16384).
    pub max_upstream_connections: u32,
    /// Node-wide cap on requests waiting for a connection (default 16384).
    pub max_pending_requests: u32,
    /// Largest share (percent) of each node-wide cap one client pod may hold (default 50).
    pub max_client_share_percent: u32,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            request_header_timeout: Duration::from_secs(10),
            max_request_headers_bytes: 60 * 1024,
            max_request_headers: 100,
            http2_max_concurrent_streams: 1024,
            http2_max_pending_accept_reset_streams: 20,
            sniff_timeout: Duration::from_secs(10),
            max_upstream_connections: 16 * 1024,
            max_pending_requests: 16 * 1024,
            max_client_share_percent: 50,
        }
    }
}

/// State every connection of the proxy shares.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub logger: AccessLogger,
    pub clusters: ClusterRegistry,
    pub settings: ProxySettings,
    pub original_dst: Arc<dyn OriginalDst>,
    /// Counters of client pods pruned from the registry while other pods of
    /// their workload remain, so the workload's metric sums never go down.
    pub retired: crate::telemetry::metrics::Retired,
}

impl Shared {
    pub fn new(
        snapshot: Snapshot,
        logger: AccessLogger,
        settings: ProxySettings,
        original_dst: Arc<dyn OriginalDst>,
    ) -> Self {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            logger,
            clusters: ClusterRegistry::new(NodeBudget::new(
                settings.max_upstream_connections,
                settings.max_pending_requests,
                settings.max_client_share_percent,
            )),
            settings,
            original_dst,
            retired: Default::default(),
        }
    }

    /// Installs a new configuration; in-flight requests keep the old one.
    pub fn install(&self, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        self.snapshot.store(snapshot.clone());
        self.clusters.bump_generation();
        // Client pods and clusters that left the configuration go (and their series).
        self.retired.prune(&self.clusters, &snapshot);
    }
}

/// Facts about one downstream connection.
pub struct ConnContext {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub orig_dst: Option<SocketAddr>,
    pub client: Option<Arc<Workload>>,
    /// Identity for per-client state: the pod, or the peer IP when unknown.
    pub client_key: Arc<str>,
    pub source_workload: Arc<str>,
    pub source_namespace: Arc<str>,
    /// The Service the original destination names, if any.
    pub vip_target: Option<ServiceTarget>,
    /// Per-client upstream state (pools, breakers, outlier detection).
    pub client_state: Arc<cluster::ClientState>,
}

/// The enrolled pod a listener inside a pod's network namespace belongs to:
/// every connection it accepts comes from that pod (eBPF redirect).
#[derive(Debug)]
pub struct ListenerPod {
    pub workload: Arc<Workload>,
    /// Creates upstream sockets in the pod's network namespace.
    pub dialer: Dialer,
}

/// Accepts connections until `shutdown`; each connection is tracked so the
/// caller can wait for them to drain. `pod` is set for in-pod listeners.
pub async fn serve_outbound(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    pod: Option<Arc<ListenerPod>>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tracker.spawn(handle_connection(
                    stream,
                    peer,
                    shared.clone(),
                    shutdown.clone(),
                    pod.clone(),
                ));
            }
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    pod: Option<Arc<ListenerPod>>,
) {
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let orig_dst = shared.original_dst.original_dst(&stream);
    let snap = shared.snapshot.load();
    // An in-pod listener knows its pod; the current config has its labels.
    let client = match &pod {
        Some(pod) => Some(
            pod.workload
                .ips
                .first()
                .and_then(|ip| snap.pods_by_ip.get(ip))
                .filter(|w| w.pod_name == pod.workload.pod_name)
                .cloned()
                .unwrap_or_else(|| pod.workload.clone()),
        ),
        None => snap.pods_by_ip.get(&peer.ip()).cloned(),
    };
    let vip_target = orig_dst.and_then(|d| route::target_for_vip(&snap, d));
    drop(snap);
    let (client_key, source_workload, source_namespace): (Arc<str>, Arc<str>, Arc<str>) =
        match &client {
            Some(w) => (
                Arc::from(format!("{}/{}", w.namespace, w.pod_name)),
                Arc::from(w.workload_name.as_str()),
                Arc::from(w.namespace.as_str()),
            ),
            None => (
                Arc::from(peer.ip().to_string()),
                Arc::from("unknown"),
                Arc::from("unknown"),
            ),
        };
    let client_state = shared.clusters.client(
        client_key.clone(),
        source_workload.clone(),
        source_namespace.clone(),
        client.clone(),
        pod.as_ref().map_or(&Dialer::default(), |p| &p.dialer),
    );
    let ctx = Arc::new(ConnContext {
        client_state,
        peer,
        local,
        orig_dst,
        client,
        client_key,
        source_workload,
        source_namespace,
        vip_target,
    });

    // A redirected connection to something that is not a Service goes where
    // it was going, as Istio's PassthroughCluster does.
    if let Some(pod) = &pod
        && let Some(dst) = ctx.orig_dst
        && ctx.vip_target.is_none()
    {
        if is_self_call(dst) {
            tracing::warn!(%dst, pod = %pod.workload.pod_name, "refusing a connection to the proxy's own in-pod port (it would loop)");
            return;
        }
        let mut entry = AccessLogEntry::new(
            SystemTime::now(),
            ctx.source_workload.clone(),
            ctx.source_namespace.clone(),
        );
        entry.downstream_remote_address = Some(ctx.peer);
        entry.downstream_local_address = Some(dst);
        entry.upstream_cluster = Some(Arc::from("PassthroughCluster"));
        let dialer = &ctx.client_state.dialer;
        return tcp::relay(stream, entry, dst, dialer, None, &shared).await;
    }

    let declared_tcp = ctx
        .vip_target
        .as_ref()
        .is_some_and(|t| t.service.ports[t.port_idx].protocol == AppProtocol::Tcp);
    let sniffed = if declared_tcp {
        Sniffed::Other
    } else {
        sniff::sniff(&stream, shared.settings.sniff_timeout).await
    };
    match sniffed {
        Sniffed::Closed => {}
        Sniffed::Http1 => serve_http1(stream, ctx, shared, shutdown).await,
        Sniffed::Http2 => serve_http2(stream, ctx, shared, shutdown).await,
        Sniffed::Other => match ctx.vip_target.clone() {
            Some(target) => tcp::proxy(stream, ctx, target, shared).await,
            None => {
                // Not HTTP and no original destination: nowhere to send it, and
                // we never relay to an address the client merely names.
                tracing::debug!(%peer, "non-HTTP connection without original destination; closing");
            }
        },
    }
}

/// Serves an enrolled pod's inbound listener: connections the `sk_lookup`
/// program delivered for the pod's own address. The accepted socket's local
/// address is where the client was going; the proxy forwards there from
/// 127.0.0.6 (which the capture skips) and logs cluster `inbound|PORT||`.
pub async fn serve_inbound(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    pod: Arc<ListenerPod>,
) {
    let forward_src = std::net::IpAddr::from(nodeway_ebpf_common::INBOUND_FORWARD_SRC);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                tracing::warn!(%err, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(dst) = stream.local_addr() else {
            continue;
        };
        if is_self_call(dst) {
            // The capture skips these ports; a connection here was dialled
            // to the listener itself and forwarding it would loop.
            tracing::warn!(%dst, %peer, "refusing an inbound connection to the proxy's own port");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let snap = shared.snapshot.load();
        let (workload, namespace) = match snap.pods_by_ip.get(&peer.ip()) {
            Some(w) => (
                Arc::from(w.workload_name.as_str()),
                Arc::from(w.namespace.as_str()),
            ),
            None => (Arc::from("unknown"), Arc::from("unknown")),
        };
        drop(snap);
        let mut entry = AccessLogEntry::new(SystemTime::now(), workload, namespace);
        entry.downstream_remote_address = Some(peer);
        entry.downstream_local_address = Some(dst);
        entry.upstream_cluster = Some(Arc::from(format!("inbound|{}||", dst.port())));
        let shared = shared.clone();
        let pod = pod.clone();
        tracker.spawn(async move {
            tcp::relay(stream, entry, dst, &pod.dialer, Some(forward_src), &shared).await;
        });
    }
}

/// A destination that is one of the proxy's in-pod listeners: forwarding
/// there would come straight back (the eBPF hooks skip these ports, so only a
/// client naming them itself gets here).
fn is_self_call(dst: SocketAddr) -> bool {
    use nodeway_ebpf_common::{INBOUND_PORT, OUTBOUND_PORT};
    dst.port() == OUTBOUND_PORT || dst.port() == INBOUND_PORT
}

/// The hyper service answering every request of one downstream connection.
fn request_service(
    shared: Arc<Shared>,
    ctx: Arc<ConnContext>,
) -> impl hyper::service::Service<
    ::http::Request<hyper::body::Incoming>,
    Response = ::http::Response<body::ResponseBody>,
    Error = std::convert::Infallible,
    Future = impl Future<
        Output = Result<::http::Response<body::ResponseBody>, std::convert::Infallible>,
    > + Send,
> + Clone
+ Send {
    service_fn(move |req| http::serve(shared.clone(), ctx.clone(), req))
}

async fn serve_http1(
    stream: TcpStream,
    ctx: Arc<ConnContext>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let settings = &shared.settings;
    let svc = request_service(shared.clone(), ctx.clone());
    let started = (Instant::now(), SystemTime::now());
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.request_header_timeout)
        .max_buf_size(settings.max_request_headers_bytes.max(8192))
        .max_headers(settings.max_request_headers)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(err) = result {
        log_http1_connection_error(&err, &ctx, &shared, started);
    }
}

/// hyper answers malformed requests itself (400/431/414) before any request
/// reaches us; write the access log line Envoy would (`DPE`).
fn log_http1_connection_error(
    err: &hyper::Error,
    ctx: &ConnContext,
    shared: &Shared,
    started: (Instant, SystemTime),
) {
    if !(err.is_parse() || err.is_parse_too_large()) {
        tracing::debug!(%err, peer = %ctx.peer, "downstream HTTP/1.1 connection ended");
        return;
    }
    let text = err.to_string();
    let (code, details) = if text.contains("URI") {
        (414, "http1.codec_error")
    } else if err.is_parse_too_large() {
        (431, "http1.headers_too_large")
    } else {
        (400, "http1.codec_error")
    };
    let mut entry = AccessLogEntry::new(
        started.1,
        ctx.source_workload.clone(),
        ctx.source_namespace.clone(),
    );
    entry.response_code = code;
    entry
        .response_flags
        .set(ResponseFlag::DownstreamProtocolError);
    entry.response_code_details = Some(details.into());
    entry.protocol = Some("HTTP/1.1");
    entry.downstream_remote_address = Some(ctx.peer);
    entry.downstream_local_address = Some(ctx.orig_dst.unwrap_or(ctx.local));
    entry.duration = started.0.elapsed();
    shared.logger.log(entry);
}

async fn serve_http2(
    stream: TcpStream,
    ctx: Arc<ConnContext>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let settings = &shared.settings;
    let svc = request_service(shared.clone(), ctx.clone());
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_request_headers_bytes as u32)
        .max_concurrent_streams(settings.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(settings.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(1024)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%err, peer = %ctx.peer, "downstream HTTP/2 connection ended");
    }
}
