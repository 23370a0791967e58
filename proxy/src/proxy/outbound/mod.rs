//! Outbound: connections a client pod makes. Each is tied to its client pod
//! and original destination, then served by what its first bytes say: HTTP/1.1
//! or HTTP/2 (`http`, attempts in `forward`), or plain TCP to a Service
//! (`tcp`); connections to destinations that are not Services go where they
//! were going (`passthrough`).

mod forward;
pub mod http;
pub(in crate::proxy) mod idle;
mod passthrough;
pub mod sniff;
mod tcp;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use ::http::header::CONNECTION;
use ::http::{HeaderValue, StatusCode};
use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ConnContext, ListenerPod, Proxy, body, route};
use crate::net::accept_loop;
use crate::redirect::netns::Dialer;
use crate::resilience::overload::Admitted;
use crate::state::AppProtocol;
use crate::telemetry::ResponseFlag;
use crate::telemetry::access_log::AccessLogEntry;
use idle::{CountingIo, HeaderTimer, ReadCount};
use sniff::{PrefixedStream, Sniffed};

/// Accepts connections until `shutdown`; each connection is tracked so the
/// caller can wait for them to drain. `pod` is set for in-pod listeners.
pub async fn serve_outbound(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    pod: Option<Arc<ListenerPod>>,
) {
    let stop = shutdown.clone();
    accept_loop(listener, "outbound", Some(stop), |stream, peer| {
        tracker.spawn(handle_connection(
            stream,
            peer,
            proxy.clone(),
            shutdown.clone(),
            pod.clone(),
        ));
    })
    .await;
}

async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    pod: Option<Arc<ListenerPod>>,
) {
    let accepted_at = (Instant::now(), SystemTime::now());
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let orig_dst = proxy.original_dst.original_dst(&stream);
    let snap = proxy.snapshot.load();
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
    let client_pod = proxy.clients.client(
        client_key.clone(),
        source_workload.clone(),
        source_namespace.clone(),
        client.clone(),
        pod.as_ref().map_or(&Dialer::default(), |p| &p.dialer),
    );
    // Refused connections are closed at once, before a byte is read.
    let _admission = match proxy.overload.admit_connection(&client_pod.downstream) {
        Ok(admission) => admission,
        Err(why) => {
            tracing::debug!(%peer, client = %client_key, reason = why.reason(), "downstream connection refused");
            let mut entry = AccessLogEntry::new(accepted_at.1, source_workload, source_namespace);
            entry.response_flags.set(ResponseFlag::OverloadManager);
            entry.response_code_details = Some(Admitted::Connection.details(why).into());
            entry.downstream_remote_address = Some(peer);
            entry.downstream_local_address = Some(orig_dst.unwrap_or(local));
            entry.duration = accepted_at.0.elapsed();
            proxy.logger.log(entry);
            return;
        }
    };
    let ctx = Arc::new(ConnContext {
        client_pod,
        peer,
        local,
        orig_dst,
        client,
        client_key,
        source_workload,
        source_namespace,
        vip_target,
        resets: Arc::default(),
    });

    // A redirected connection to something that is not a Service goes where
    // it was going, as Istio's PassthroughCluster does.
    if let Some(pod) = &pod
        && let Some(dst) = ctx.orig_dst
        && ctx.vip_target.is_none()
    {
        return passthrough::relay_to(stream, &ctx, dst, pod, &proxy).await;
    }

    let declared_tcp = ctx
        .vip_target
        .as_ref()
        .is_some_and(|t| t.service.ports[t.port_idx].protocol == AppProtocol::Tcp);
    let (sniffed, stream) = if declared_tcp {
        (Sniffed::Other, PrefixedStream::new(Bytes::new(), stream))
    } else {
        sniff::sniff(stream, proxy.settings.sniff_timeout).await
    };
    match sniffed {
        Sniffed::Closed => {}
        Sniffed::Http1 => serve_http1(stream, ctx, proxy, shutdown).await,
        Sniffed::Http2 => serve_http2(stream, ctx, proxy, shutdown).await,
        Sniffed::Other => match ctx.vip_target.clone() {
            Some(target) => tcp::serve_service(stream, ctx, target, proxy).await,
            None => {
                // Not HTTP and no Service to send it to (passthrough is for
                // in-pod listeners only): we never relay to an address the
                // client merely names. Logged as Envoy logs a connection no
                // filter chain matches: `NR`.
                tracing::debug!(%peer, "non-HTTP connection to no Service; closing");
                let mut entry = AccessLogEntry::new(
                    accepted_at.1,
                    ctx.source_workload.clone(),
                    ctx.source_namespace.clone(),
                );
                entry.response_flags.set(ResponseFlag::NoRouteFound);
                entry.downstream_remote_address = Some(ctx.peer);
                entry.downstream_local_address = Some(ctx.orig_dst.unwrap_or(ctx.local));
                entry.bytes_received = stream.prefix_len() as u64;
                entry.duration = accepted_at.0.elapsed();
                proxy.logger.log(entry);
            }
        },
    }
}

/// The hyper service answering every request of one downstream connection.
/// Once `draining` is set (HTTP/1.1), or while memory pressure disables
/// keep-alive, responses carry `Connection: close`,
/// so the connection ends after a response, never under a request.
fn request_service(
    proxy: Arc<Proxy>,
    ctx: Arc<ConnContext>,
    draining: Option<Arc<AtomicBool>>,
) -> impl hyper::service::Service<
    ::http::Request<hyper::body::Incoming>,
    Response = ::http::Response<body::ResponseBody>,
    Error = std::convert::Infallible,
    Future = impl Future<
        Output = Result<::http::Response<body::ResponseBody>, std::convert::Infallible>,
    > + Send,
> + Clone
+ Send {
    service_fn(move |req| {
        let answer = http::serve_request(proxy.clone(), ctx.clone(), req);
        let draining = draining.clone();
        // Envoy's `disable_http_keepalive` overload action (HTTP/1.1 only).
        let overloaded = draining.is_some() && proxy.overload.keepalive_disabled();
        async move {
            let mut response = answer.await?;
            if (overloaded || draining.is_some_and(|d| d.load(Ordering::Relaxed)))
                && response.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        }
    })
}

async fn serve_http1(
    stream: PrefixedStream,
    ctx: Arc<ConnContext>,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
) {
    let settings = &proxy.settings;
    let draining = Arc::new(AtomicBool::new(false));
    let svc = request_service(proxy.clone(), ctx.clone(), Some(draining.clone()));
    let started = (Instant::now(), SystemTime::now());
    let read = Arc::new(ReadCount::default());
    let timer = HeaderTimer::new(
        read.clone(),
        settings.request_header_timeout,
        settings.idle_timeout,
    );
    let stream = CountingIo::new(stream, read);
    let conn = http1::Builder::new()
        .timer(timer)
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
            // Closing an idle keep-alive connection would race a request
            // the client may be sending: the next response says
            // `Connection: close` instead, and an idle connection stays
            // open until then or the end of the drain (as Envoy drains).
            draining.store(true, Ordering::Relaxed);
            conn.as_mut().await
        }
    };
    if let Err(err) = result {
        log_http1_connection_error(&err, &ctx, &proxy, started);
    }
}

/// hyper answers malformed requests itself (400/431/414) before any request
/// reaches us; write the access log line Envoy would (`DPE`).
fn log_http1_connection_error(
    err: &hyper::Error,
    ctx: &ConnContext,
    proxy: &Proxy,
    started: (Instant, SystemTime),
) {
    if !(err.is_parse() || err.is_parse_too_large()) {
        tracing::debug!(%err, peer = %ctx.peer, "downstream HTTP/1.1 connection ended");
        return;
    }
    let text = err.to_string();
    // The status hyper answered: 414 only for a URI too long (an invalid
    // one, such as HTTP/0.9's request line, is a 400).
    let (code, details) = if text.contains("URI too long") {
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
    proxy.logger.log(entry);
}

async fn serve_http2(
    stream: PrefixedStream,
    ctx: Arc<ConnContext>,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
) {
    let settings = &proxy.settings;
    let svc = request_service(proxy.clone(), ctx.clone(), None);
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
        _ = ctx.resets.tripped.cancelled() => {
            tracing::warn!(
                peer = %ctx.peer,
                client = %ctx.client_key,
                "closing an HTTP/2 connection: most of its streams were reset by the client right after they started (Envoy's premature-reset rule)"
            );
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%err, peer = %ctx.peer, "downstream HTTP/2 connection ended");
    }
}
