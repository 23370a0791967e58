//! The Prometheus endpoint (`--metrics-addr`, `GET /metrics` and Envoy's
//! `GET /stats/prometheus`): Envoy's cluster stats and Istio's standard
//! metrics under their own names and labels, so dashboards built for sidecars
//! keep working, plus Nodeway's own gauges and the process metrics.
//!
//! Nothing is registered per request: the data path only bumps atomics in
//! [`ClusterStats`] and its series maps, and the collectors here read them at
//! scrape time, summing the client pods of one workload (a sidecar mesh
//! reports per pod; Prometheus adds the pod label from the scrape target,
//! which here is the node, so the natural unit is the workload). The text is
//! written by `prometheus_client`'s OpenMetrics encoder, which appends
//! `_total` to counters: `envoy_cluster_upstream_rq_timeout` is registered and
//! `envoy_cluster_upstream_rq_timeout_total` comes out.
//!
//! Cardinality: labels are workloads, namespaces, services, cluster names,
//! response codes and flags; never endpoint addresses. Only what exists is
//! walked: client pods and clusters that leave the configuration are pruned
//! from the registry on reload ([`Retired::retire_while`]); the counters of a pruned
//! pod are kept (as "retired" totals) only while another pod of its workload
//! is still on the node, so the workload's sums never go down.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod mesh;
mod nodeway;
mod totals;

use crate::proxy::Proxy;
use crate::status::ConfigStatus;
use crate::telemetry::stats::HistogramSnapshot;
use mesh::MeshCollector;
use nodeway::{NodewayCollector, ProcessCollector};
pub use totals::Retired;

/// What the encoder writes (OpenMetrics text; Prometheus negotiates it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Istio's default `source_cluster`/`destination_cluster` (the cluster ID).
const KUBERNETES: &str = "Kubernetes";

/// The registry served on the metrics port. The collectors read the proxy's
/// live state on every scrape; `retired` keeps the counters of client pods
/// that left the configuration.
pub fn registry(proxy: Arc<Proxy>, status: Arc<ConfigStatus>, retired: Arc<Retired>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(MeshCollector {
        proxy: proxy.clone(),
        retired,
    }));
    registry.register_collector(Box::new(NodewayCollector { proxy, status }));
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

/// The whole exposition, as served.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::with_capacity(64 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// Serves `GET /metrics` and `GET /stats/prometheus` until `shutdown`.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, shutdown: CancellationToken) {
    super::serve_http(listener, "metrics", Some(shutdown), move |req| {
        handle(req, registry.clone())
    })
    .await;
}

async fn handle(req: Request<Incoming>, registry: Arc<Registry>) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ct: &str, body: String| {
        Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, ct)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    match (req.method(), req.uri().path()) {
        // Encoding walks every series; keep it off the runtime workers that carry traffic.
        (&Method::GET, "/metrics" | "/stats/prometheus") => {
            match tokio::task::spawn_blocking(move || encode(&registry)).await {
                Ok(Ok(text)) => reply(StatusCode::OK, CONTENT_TYPE, text),
                _ => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding metrics failed\n".into(),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics or /stats/prometheus\n".into(),
        ),
    }
}

// ---------------------------------------------------------------------------
// Encoding helpers
// ---------------------------------------------------------------------------

type Labels<'a> = Vec<(&'static str, Cow<'a, str>)>;

/// One metric family: descriptor, then every series.
fn family<'a, T>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: impl IntoIterator<Item = (Labels<'a>, T)>,
    emit: impl Fn(&mut MetricEncoder, &T) -> fmt::Result,
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, value) in rows {
        if labels.is_empty() {
            // Without labels: `name 1`, not `name{} 1`.
            emit(&mut metric, &value)?;
        } else {
            let mut series = metric.encode_family(&labels)?;
            emit(&mut series, &value)?;
        }
    }
    Ok(())
}

fn counter(m: &mut MetricEncoder, v: &u64) -> fmt::Result {
    m.encode_counter::<NoLabelSet, _, u64>(v, None)
}

fn gauge(m: &mut MetricEncoder, v: &u64) -> fmt::Result {
    m.encode_gauge(v)
}

fn histogram(m: &mut MetricEncoder, h: &HistogramSnapshot) -> fmt::Result {
    m.encode_histogram::<NoLabelSet>(h.sum, h.count(), &h.buckets(), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;

    #[test]
    fn histogram_encodes_cumulative_buckets() {
        #[derive(Debug)]
        struct One;
        impl Collector for One {
            fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
                let h = crate::telemetry::stats::Histogram::default();
                h.observe(0.2);
                h.observe(7.0);
                family(
                    &mut enc,
                    "x_ms",
                    "x",
                    MetricType::Histogram,
                    std::iter::once((vec![("a", Cow::Borrowed("b"))], h.snapshot())),
                    histogram,
                )
            }
        }
        let mut r = Registry::default();
        r.register_collector(Box::new(One));
        let text = encode(&r).unwrap();
        assert!(text.contains("x_ms_count{a=\"b\"} 2\n"), "{text}");
        assert!(
            text.contains("x_ms_bucket{le=\"0.5\",a=\"b\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_ms_bucket{le=\"10.0\",a=\"b\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_ms_bucket{le=\"+Inf\",a=\"b\"} 2\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
