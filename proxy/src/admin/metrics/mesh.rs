//! Envoy's cluster stats and Istio's standard metrics, summed per workload.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::totals::*;
use super::*;
use crate::proxy::Proxy;
use crate::telemetry::stats::{ClusterStats, PROTOCOL_TCP, SeriesKey, UNKNOWN};

pub(super) struct MeshCollector {
    pub proxy: Arc<Proxy>,
    pub retired: Arc<Retired>,
}

impl fmt::Debug for MeshCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshCollector")
    }
}

impl Collector for MeshCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let (mut totals, clients) = self.retired.with_live(&self.proxy.clients);
        for client in &clients {
            totals.add_client(client, false);
        }
        encode_envoy(&mut enc, &totals)?;
        encode_istio(&mut enc, &totals)
    }
}

fn envoy_labels(k: &EnvoyKey) -> Labels<'_> {
    vec![
        ("cluster_name", Cow::Borrowed(&*k.cluster)),
        ("source_workload", Cow::Borrowed(&*k.workload)),
        ("source_namespace", Cow::Borrowed(&*k.namespace)),
    ]
}

/// `upstream_rq_2xx` → its class digit.
fn status_class(stat: &str) -> Option<&'static str> {
    match stat {
        "upstream_rq_1xx" => Some("1"),
        "upstream_rq_2xx" => Some("2"),
        "upstream_rq_3xx" => Some("3"),
        "upstream_rq_4xx" => Some("4"),
        "upstream_rq_5xx" => Some("5"),
        _ => None,
    }
}

fn encode_envoy(enc: &mut DescriptorEncoder, totals: &Totals) -> fmt::Result {
    let sorted: BTreeMap<&EnvoyKey, &EnvoyTotals> = totals.envoy.iter().collect();
    let value = |t: &EnvoyTotals, i: usize| t.stats.get(i).copied().unwrap_or(0);

    // Envoy's tag extraction turns `upstream_rq_5xx` into
    // `envoy_cluster_upstream_rq_xx{envoy_response_code_class="5"}`. The
    // OpenMetrics encoder would append `_total` to a counter, so this one is
    // typed `unknown` to keep Istio's exact name.
    let classes: Vec<(usize, &str)> = ClusterStats::NAMES
        .iter()
        .enumerate()
        .filter_map(|(i, s)| status_class(s).map(|c| (i, c)))
        .collect();
    family(
        enc,
        "envoy_cluster_upstream_rq_xx",
        "Upstream responses by status class (Envoy's upstream_rq_<N>xx), summed over the workload's client pods on this node.",
        MetricType::Unknown,
        sorted.iter().flat_map(|(k, t)| {
            classes.iter().map(move |(i, class)| {
                let mut labels = envoy_labels(k);
                labels.push(("envoy_response_code_class", Cow::Borrowed(*class)));
                (labels, value(t, *i))
            })
        }),
        gauge,
    )?;

    for (i, stat) in ClusterStats::NAMES.iter().enumerate() {
        if status_class(stat).is_some() {
            continue;
        }
        let help = format!(
            "Envoy's cluster.<name>.{stat}, summed over the workload's client pods on this node."
        );
        let rows = sorted.iter().map(|(k, t)| (envoy_labels(k), value(t, i)));
        if is_gauge(stat) {
            let name = format!("envoy_cluster_{stat}");
            family(enc, &name, &help, MetricType::Gauge, rows, gauge)?;
        } else {
            // The encoder appends `_total`: `upstream_rq_total` stays
            // `envoy_cluster_upstream_rq_total`, `upstream_rq_timeout`
            // becomes `envoy_cluster_upstream_rq_timeout_total`.
            let name = format!(
                "envoy_cluster_{}",
                stat.strip_suffix("_total").unwrap_or(stat)
            );
            family(enc, &name, &help, MetricType::Counter, rows, counter)?;
        }
    }

    family(
        enc,
        "envoy_cluster_upstream_cx_connect_ms",
        "Upstream connection establishment time in milliseconds, summed over the workload's client pods on this node.",
        MetricType::Histogram,
        sorted.iter().map(|(k, t)| (envoy_labels(k), t.connect_ms)),
        histogram,
    )?;

    for (i, stat) in outlier_names().into_iter().enumerate() {
        let help = format!(
            "Envoy's cluster.<name>.outlier_detection.{stat}, summed over the workload's client pods on this node."
        );
        let rows = sorted
            .iter()
            .map(|(k, t)| (envoy_labels(k), t.outlier.get(i).copied().unwrap_or(0)));
        if is_gauge(stat) {
            let name = format!("envoy_cluster_outlier_detection_{stat}");
            family(enc, &name, &help, MetricType::Gauge, rows, gauge)?;
        } else {
            let name = format!(
                "envoy_cluster_outlier_detection_{}",
                stat.strip_suffix("_total").unwrap_or(stat)
            );
            family(enc, &name, &help, MetricType::Counter, rows, counter)?;
        }
    }
    Ok(())
}

/// Istio's labels for `reporter="source"`; `http` adds the response labels
/// of request metrics, TCP metrics have only `response_flags`.
fn istio_labels<'a>(source: &'a SourceLabels, key: &'a SeriesKey, http: bool) -> Labels<'a> {
    let p = &*key.peer;
    let known_destination = p.service != UNKNOWN;
    let mut l: Labels<'a> = vec![
        ("reporter", "source".into()),
        ("source_workload", Cow::Borrowed(&*source.workload)),
        (
            "source_canonical_service",
            Cow::Borrowed(&*source.canonical_service),
        ),
        (
            "source_canonical_revision",
            Cow::Borrowed(&*source.canonical_revision),
        ),
        (
            "source_workload_namespace",
            Cow::Borrowed(&*source.namespace),
        ),
        ("source_principal", UNKNOWN.into()),
        ("source_app", Cow::Borrowed(&*source.app)),
        ("source_version", Cow::Borrowed(&*source.version)),
        (
            "source_cluster",
            if &*source.workload == UNKNOWN {
                UNKNOWN
            } else {
                KUBERNETES
            }
            .into(),
        ),
        ("destination_workload", Cow::Borrowed(&*p.workload)),
        (
            "destination_workload_namespace",
            Cow::Borrowed(&*p.workload_namespace),
        ),
        ("destination_principal", UNKNOWN.into()),
        ("destination_app", Cow::Borrowed(&*p.labels.app)),
        ("destination_version", Cow::Borrowed(&*p.labels.version)),
        ("destination_service", Cow::Borrowed(&*p.service)),
        (
            "destination_canonical_service",
            Cow::Borrowed(&*p.labels.canonical_service),
        ),
        (
            "destination_canonical_revision",
            Cow::Borrowed(&*p.labels.canonical_revision),
        ),
        ("destination_service_name", Cow::Borrowed(&*p.service_name)),
        (
            "destination_service_namespace",
            Cow::Borrowed(&*p.service_namespace),
        ),
        (
            "destination_cluster",
            if known_destination {
                KUBERNETES
            } else {
                UNKNOWN
            }
            .into(),
        ),
        ("request_protocol", key.protocol.into()),
    ];
    if http {
        l.push(("response_code", key.response_code.to_string().into()));
        l.push((
            "grpc_response_status",
            key.grpc_status
                .map_or(Cow::Borrowed(""), |g| g.to_string().into()),
        ));
    }
    l.push(("response_flags", key.flags.to_string().into()));
    l.push(("connection_security_policy", UNKNOWN.into()));
    l
}

/// Series of different clusters (two subsets, two ports of one Service, or
/// requests that reached no cluster) can carry the same Istio labels: merged.
fn merge_istio<T: Clone, F: Fn(&mut T, &T)>(
    map: &HashMap<IstioKey, T>,
    add: F,
) -> Vec<(&SourceLabels, &SeriesKey, T)> {
    let mut merged: HashMap<(&SourceLabels, &SeriesKey), T> = HashMap::new();
    for (k, v) in map {
        match merged.get_mut(&(&*k.source, &k.series)) {
            Some(t) => add(t, v),
            None => {
                merged.insert((&*k.source, &k.series), v.clone());
            }
        }
    }
    merged.into_iter().map(|((s, k), v)| (s, k, v)).collect()
}

fn encode_istio(enc: &mut DescriptorEncoder, totals: &Totals) -> fmt::Result {
    let mut requests: Vec<(Labels, RequestTotals)> =
        merge_istio(&totals.requests, RequestTotals::add)
            .into_iter()
            .filter(|(_, k, _)| k.protocol != PROTOCOL_TCP)
            .map(|(s, k, v)| (istio_labels(s, k, true), v))
            .collect();
    requests.sort_by(|a, b| a.0.cmp(&b.0));
    family(
        enc,
        "istio_requests",
        "Requests handled, reported by the client side (Istio's istio_requests_total).",
        MetricType::Counter,
        requests.iter().map(|(l, v)| (l.clone(), v.requests)),
        counter,
    )?;
    family(
        enc,
        "istio_request_duration_milliseconds",
        "Request duration in milliseconds (Istio's).",
        MetricType::Histogram,
        requests.iter().map(|(l, v)| (l.clone(), v.duration_ms)),
        histogram,
    )?;
    family(
        enc,
        "istio_request_bytes",
        "Request body sizes in bytes (Istio's).",
        MetricType::Histogram,
        requests.iter().map(|(l, v)| (l.clone(), v.request_bytes)),
        histogram,
    )?;
    family(
        enc,
        "istio_response_bytes",
        "Response body sizes in bytes (Istio's).",
        MetricType::Histogram,
        requests.iter().map(|(l, v)| (l.clone(), v.response_bytes)),
        histogram,
    )?;

    let mut tcp: Vec<(Labels, TcpTotals)> = merge_istio(&totals.tcp, TcpTotals::add)
        .into_iter()
        .map(|(s, k, v)| (istio_labels(s, k, false), v))
        .collect();
    tcp.sort_by(|a, b| a.0.cmp(&b.0));
    let tcp_family = |enc: &mut DescriptorEncoder,
                      name: &str,
                      help: &str,
                      get: fn(&TcpTotals) -> u64|
     -> fmt::Result {
        family(
            enc,
            name,
            help,
            MetricType::Counter,
            tcp.iter().map(|(l, v)| (l.clone(), get(v))),
            counter,
        )
    };
    tcp_family(
        enc,
        "istio_tcp_connections_opened",
        "TCP connections opened (Istio's istio_tcp_connections_opened_total).",
        |t| t.opened,
    )?;
    tcp_family(
        enc,
        "istio_tcp_connections_closed",
        "TCP connections closed (Istio's istio_tcp_connections_closed_total).",
        |t| t.closed,
    )?;
    tcp_family(
        enc,
        "istio_tcp_sent_bytes",
        "Bytes sent to the client over TCP connections (Istio's istio_tcp_sent_bytes_total).",
        |t| t.sent_bytes,
    )?;
    tcp_family(
        enc,
        "istio_tcp_received_bytes",
        "Bytes received from the client over TCP connections (Istio's istio_tcp_received_bytes_total).",
        |t| t.received_bytes,
    )
}
