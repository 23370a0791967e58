//! Admin API (loopback by default): readiness and a summary of the loaded
//! configuration. Metrics are served on their own port (observability issue).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::ConfigStatus;
use crate::proxy::Shared;

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    status: Arc<ConfigStatus>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
        };
        let shared = shared.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, shared.clone(), status.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Envoy's cluster counters per (client pod, cluster), outlier counters, and
/// each endpoint's state as that client sees it.
fn stats_json(shared: &Shared) -> serde_json::Value {
    let mut clusters = Vec::new();
    for client in shared.clusters.clients() {
        for cluster in client.clusters() {
            let config = cluster.config();
            let mut stats: serde_json::Map<String, serde_json::Value> = cluster
                .stats
                .values()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into()))
                .collect();
            if let Some(detector) = &config.outlier {
                for (k, v) in detector.stats().values() {
                    stats.insert(format!("outlier_detection.{k}"), v.into());
                }
            }
            let endpoints: Vec<serde_json::Value> = config
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    serde_json::json!({
                        "address": h.slot.addr.to_string(),
                        "ejected": h.slot.outlier.is_ejected(),
                        "ejections": h.slot.outlier.ejections(),
                        "active_requests": h.slot.active.load(Ordering::Relaxed),
                        "priority": config.balancer.priority_of(i),
                    })
                })
                .collect();
            clusters.push(serde_json::json!({
                "source_pod": &*client.key,
                "source_workload": &*client.source_workload,
                "source_namespace": &*client.source_namespace,
                "cluster": &*cluster.name,
                "stats": stats,
                "endpoints": endpoints,
            }));
        }
    }
    let node = shared.clusters.node_budget();
    serde_json::json!({
        "node": {
            "upstream_connections": node.connections.get(),
            "max_upstream_connections": node.max_connections,
            "pending_requests": node.pending.get(),
            "max_pending_requests": node.max_pending,
        },
        "clusters": clusters,
    })
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    status: Arc<ConfigStatus>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |code: StatusCode, ct: &str, body: String| {
        Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, ct)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready" | "/healthz/ready") => {
            reply(StatusCode::OK, "text/plain", "LIVE\n".into())
        }
        (&Method::GET, "/config_dump") => {
            let snap = shared.snapshot.load();
            let body = serde_json::json!({
                "generation": status.generation.load(Ordering::Relaxed),
                "last_reload_error": *status.last_error.lock().expect("status lock"),
                "services": snap.services.len(),
                "pods": snap.pods_by_ip.len(),
                "destination_rules": snap.destination_rules.len(),
                "virtual_services": snap.virtual_services.len(),
                "access_log_lines_dropped": shared.logger.dropped(),
            });
            reply(StatusCode::OK, "application/json", format!("{body:#}\n"))
        }
        (&Method::GET, "/stats") => reply(
            StatusCode::OK,
            "application/json",
            format!("{:#}\n", stats_json(&shared)),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /ready, /config_dump or /stats\n".into(),
        ),
    })
}
