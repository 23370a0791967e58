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
//! from the registry on reload ([`Retired::prune`]); the counters of a pruned
//! pod are kept (as "retired" totals) only while another pod of its workload
//! is still on the node, so the workload's sums never go down.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::stats::{
    ClusterStats, HistogramSnapshot, PROTOCOL_TCP, RequestSeries, SeriesKey, SeriesMap, TcpSeries,
    UNKNOWN, WorkloadLabels,
};
use crate::app::ConfigStatus;
use crate::proxy::Shared;
use crate::proxy::cluster::{ClientState, ClusterRegistry};
use crate::resilience::outlier::OutlierStats;
use crate::state::Snapshot;

/// What the encoder writes (OpenMetrics text; Prometheus negotiates it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Istio's default `source_cluster`/`destination_cluster` (the cluster ID).
const KUBERNETES: &str = "Kubernetes";

/// The registry served on the metrics port. The collectors read the proxy's
/// live state on every scrape.
///
/// Seam for the eBPF issue: its redirect-map and program counters come as one
/// more [`Collector`] registered on the returned registry (see `app::start`);
/// nothing eBPF-related is reported before that.
pub fn registry(shared: Arc<Shared>, status: Arc<ConfigStatus>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(MeshCollector {
        shared: shared.clone(),
    }));
    registry.register_collector(Box::new(NodewayCollector { shared, status }));
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
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(err) => {
                    tracing::warn!(%err, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, registry.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |code: StatusCode, ct: &str, body: String| {
        Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, ct)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    Ok(match (req.method(), req.uri().path()) {
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
    })
}

// ---------------------------------------------------------------------------
// Totals: the registry's counters summed per workload
// ---------------------------------------------------------------------------

/// Envoy stats are labelled per (source workload, namespace, cluster).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EnvoyKey {
    workload: Arc<str>,
    namespace: Arc<str>,
    cluster: Arc<str>,
}

#[derive(Debug, Clone, Default)]
struct EnvoyTotals {
    /// Aligned with [`ClusterStats::NAMES`].
    stats: Vec<u64>,
    /// Aligned with [`outlier_names`].
    outlier: Vec<u64>,
    connect_ms: HistogramSnapshot,
}

impl EnvoyTotals {
    fn add(&mut self, other: &EnvoyTotals) {
        add_aligned(&mut self.stats, &other.stats);
        add_aligned(&mut self.outlier, &other.outlier);
        self.connect_ms.add(&other.connect_ms);
    }
}

fn add_aligned(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Names of the outlier-detection stats (under `outlier_detection.`).
fn outlier_names() -> Vec<&'static str> {
    OutlierStats::default()
        .values()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// Istio's source labels of a client pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SourceLabels {
    workload: Arc<str>,
    namespace: Arc<str>,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
}

impl SourceLabels {
    fn of(client: &ClientState) -> SourceLabels {
        let WorkloadLabels {
            app,
            version,
            canonical_service,
            canonical_revision,
        } = WorkloadLabels::of(client.workload.as_deref());
        SourceLabels {
            workload: client.source_workload.clone(),
            namespace: client.source_namespace.clone(),
            app,
            version,
            canonical_service,
            canonical_revision,
        }
    }
}

/// An Istio series of one cluster (`""` for requests that reached none).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct IstioKey {
    cluster: Arc<str>,
    source: Arc<SourceLabels>,
    series: SeriesKey,
}

#[derive(Debug, Clone, Default)]
struct RequestTotals {
    requests: u64,
    duration_ms: HistogramSnapshot,
    request_bytes: HistogramSnapshot,
    response_bytes: HistogramSnapshot,
}

impl RequestTotals {
    fn of(s: &RequestSeries) -> RequestTotals {
        RequestTotals {
            requests: s.requests.load(Ordering::Relaxed),
            duration_ms: s.duration_ms.snapshot(),
            request_bytes: s.request_bytes.snapshot(),
            response_bytes: s.response_bytes.snapshot(),
        }
    }

    fn add(&mut self, o: &RequestTotals) {
        self.requests += o.requests;
        self.duration_ms.add(&o.duration_ms);
        self.request_bytes.add(&o.request_bytes);
        self.response_bytes.add(&o.response_bytes);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct TcpTotals {
    opened: u64,
    closed: u64,
    sent_bytes: u64,
    received_bytes: u64,
}

impl TcpTotals {
    fn of(s: &TcpSeries) -> TcpTotals {
        TcpTotals {
            opened: s.opened.load(Ordering::Relaxed),
            closed: s.closed.load(Ordering::Relaxed),
            sent_bytes: s.sent_bytes.load(Ordering::Relaxed),
            received_bytes: s.received_bytes.load(Ordering::Relaxed),
        }
    }

    fn add(&mut self, o: &TcpTotals) {
        self.opened += o.opened;
        self.closed += o.closed;
        self.sent_bytes += o.sent_bytes;
        self.received_bytes += o.received_bytes;
    }
}

/// Counters and histograms summed per label set.
#[derive(Debug, Clone, Default)]
struct Totals {
    envoy: HashMap<EnvoyKey, EnvoyTotals>,
    requests: HashMap<IstioKey, RequestTotals>,
    tcp: HashMap<IstioKey, TcpTotals>,
}

impl Totals {
    /// Adds one client pod's clusters. `counters_only` leaves gauges out (for
    /// a pod that is gone: its connections and ejections are not current).
    fn add_client(&mut self, client: &ClientState, counters_only: bool) {
        let source = Arc::new(SourceLabels::of(client));
        let outlier_len = outlier_names().len();
        for cluster in client.clusters() {
            let config = cluster.config();
            let mut stats: Vec<u64> = cluster.stats.values().into_iter().map(|(_, v)| v).collect();
            let mut outlier: Vec<u64> = match &config.outlier {
                Some(d) => d.stats().values().into_iter().map(|(_, v)| v).collect(),
                None => vec![0; outlier_len],
            };
            if counters_only {
                for (v, name) in stats.iter_mut().zip(ClusterStats::NAMES) {
                    if is_gauge(name) {
                        *v = 0;
                    }
                }
                for (v, name) in outlier.iter_mut().zip(outlier_names()) {
                    if is_gauge(name) {
                        *v = 0;
                    }
                }
            }
            self.envoy
                .entry(EnvoyKey {
                    workload: client.source_workload.clone(),
                    namespace: client.source_namespace.clone(),
                    cluster: cluster.name.clone(),
                })
                .or_default()
                .add(&EnvoyTotals {
                    stats,
                    outlier,
                    connect_ms: cluster.stats.upstream_cx_connect_ms.snapshot(),
                });
            self.add_requests(&cluster.name, &source, &cluster.stats.requests);
            self.add_tcp(&cluster.name, &source, &cluster.stats.tcp);
        }
        self.add_requests(&Arc::from(""), &source, &client.unrouted);
    }

    fn add_requests(
        &mut self,
        cluster: &Arc<str>,
        source: &Arc<SourceLabels>,
        map: &SeriesMap<RequestSeries>,
    ) {
        for (key, series) in map.entries().iter() {
            self.requests
                .entry(IstioKey {
                    cluster: cluster.clone(),
                    source: source.clone(),
                    series: key.clone(),
                })
                .or_default()
                .add(&RequestTotals::of(series));
        }
    }

    fn add_tcp(
        &mut self,
        cluster: &Arc<str>,
        source: &Arc<SourceLabels>,
        map: &SeriesMap<TcpSeries>,
    ) {
        for (key, series) in map.entries().iter() {
            self.tcp
                .entry(IstioKey {
                    cluster: cluster.clone(),
                    source: source.clone(),
                    series: key.clone(),
                })
                .or_default()
                .add(&TcpTotals::of(series));
        }
    }

    fn retain(&mut self, keep: impl Fn(&Arc<str>, &Arc<str>, &Arc<str>) -> bool) {
        self.envoy
            .retain(|k, _| keep(&k.workload, &k.namespace, &k.cluster));
        self.requests
            .retain(|k, _| keep(&k.source.workload, &k.source.namespace, &k.cluster));
        self.tcp
            .retain(|k, _| keep(&k.source.workload, &k.source.namespace, &k.cluster));
    }
}

fn is_gauge(stat: &str) -> bool {
    stat.ends_with("_active")
}

/// Counters of client pods pruned from the registry, kept while their
/// workload still has a pod on the node. The lock is taken on reload and on
/// scrape only, never on the request path.
#[derive(Debug, Default)]
pub struct Retired(Mutex<Totals>);

impl Retired {
    /// After a new configuration is installed: prunes the registry (pods and
    /// clusters that left the configuration) and keeps the pruned pods'
    /// counters for their workload. Done under this lock so a scrape sees a
    /// pod either live or retired, never neither.
    pub fn prune(&self, registry: &ClusterRegistry, snap: &Snapshot) {
        let mut retired = self.0.lock().expect("retired lock");
        let pruned = registry.prune(snap);
        for client in &pruned.clients {
            retired.add_client(client, true);
        }
        let live: HashSet<(Arc<str>, Arc<str>)> = registry
            .clients()
            .iter()
            .map(|c| (c.source_workload.clone(), c.source_namespace.clone()))
            .collect();
        retired.retain(|workload, namespace, cluster| {
            live.contains(&(workload.clone(), namespace.clone()))
                && !pruned.clusters.contains(cluster)
        });
        if !pruned.clients.is_empty() || !pruned.clusters.is_empty() {
            tracing::debug!(
                clients = pruned.clients.len(),
                clusters = pruned.clusters.len(),
                "pruned client pods and clusters that left the configuration"
            );
        }
    }

    /// The retired totals and the live clients, read consistently.
    fn with_live(&self, registry: &ClusterRegistry) -> (Totals, Vec<Arc<ClientState>>) {
        let retired = self.0.lock().expect("retired lock");
        (retired.clone(), registry.clients())
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

// ---------------------------------------------------------------------------
// Envoy cluster stats and Istio standard metrics
// ---------------------------------------------------------------------------

struct MeshCollector {
    shared: Arc<Shared>,
}

impl fmt::Debug for MeshCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshCollector")
    }
}

impl Collector for MeshCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let (mut totals, clients) = self.shared.retired.with_live(&self.shared.clusters);
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

// ---------------------------------------------------------------------------
// Nodeway's own gauges
// ---------------------------------------------------------------------------

struct NodewayCollector {
    shared: Arc<Shared>,
    status: Arc<ConfigStatus>,
}

impl fmt::Debug for NodewayCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodewayCollector")
    }
}

fn single(v: u64) -> std::iter::Once<(Labels<'static>, u64)> {
    std::iter::once((Vec::new(), v))
}

impl Collector for NodewayCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let enc = &mut enc;
        family(
            enc,
            "nodeway_config_generation",
            "Configuration generation installed (1 = the initial one; +1 per reload).",
            MetricType::Gauge,
            single(self.status.generation.load(Ordering::Relaxed)),
            gauge,
        )?;
        let ok = self
            .status
            .last_error
            .lock()
            .expect("status lock")
            .is_none();
        family(
            enc,
            "nodeway_config_last_reload_success",
            "1 if the latest configuration (re)load succeeded; 0 if the last good one is kept after an error (file mode) or some objects are skipped as invalid (Kubernetes mode).",
            MetricType::Gauge,
            single(u64::from(ok)),
            gauge,
        )?;
        family(
            enc,
            "nodeway_config_source_up",
            "1 if the configuration source answers (Kubernetes API server, or the config file is readable); 0 while the last known configuration is served without it.",
            MetricType::Gauge,
            single(u64::from(self.status.source_up.load(Ordering::Relaxed))),
            gauge,
        )?;
        let enrolled = {
            let snap = self.shared.snapshot.load();
            snap.pods_by_ip
                .values()
                .filter(|w| w.redirect_enabled)
                .map(|w| (w.namespace.as_str(), w.pod_name.as_str()))
                .collect::<HashSet<_>>()
                .len() as u64
        };
        family(
            enc,
            "nodeway_enrolled_workloads",
            "Pods in the configuration whose traffic is redirected to Nodeway.",
            MetricType::Gauge,
            single(enrolled),
            gauge,
        )?;
        let (attached, enrolled_pods) = {
            let redirect = self.status.redirect.lock().expect("status lock");
            (
                u64::from(redirect.mode == "ebpf"),
                redirect.enrolled.len() as u64,
            )
        };
        family(
            enc,
            "nodeway_redirect_attached",
            "1 if the eBPF redirect programs are loaded and attached (--redirect ebpf), else 0.",
            MetricType::Gauge,
            single(attached),
            gauge,
        )?;
        family(
            enc,
            "nodeway_redirect_enrolled_pods",
            "Pods whose network namespace is in the eBPF enrolment map, with in-pod listeners open.",
            MetricType::Gauge,
            single(enrolled_pods),
            gauge,
        )?;

        let mut per_workload: BTreeMap<(Arc<str>, Arc<str>), (u64, u64)> = BTreeMap::new();
        for client in self.shared.clusters.clients() {
            let e = per_workload
                .entry((
                    client.source_workload.clone(),
                    client.source_namespace.clone(),
                ))
                .or_default();
            e.0 += u64::from(client.budget().connections.get());
            e.1 += u64::from(client.budget().pending.get());
        }
        let workload_labels = |(w, ns): &(Arc<str>, Arc<str>)| -> Labels<'static> {
            vec![
                ("source_workload", Cow::Owned(w.to_string())),
                ("source_namespace", Cow::Owned(ns.to_string())),
            ]
        };
        family(
            enc,
            "nodeway_client_upstream_connections",
            "Upstream connections the workload's client pods hold against the node-wide cap.",
            MetricType::Gauge,
            per_workload.iter().map(|(k, v)| (workload_labels(k), v.0)),
            gauge,
        )?;
        family(
            enc,
            "nodeway_client_pending_requests",
            "Requests of the workload's client pods waiting for a connection, counted against the node-wide cap.",
            MetricType::Gauge,
            per_workload.iter().map(|(k, v)| (workload_labels(k), v.1)),
            gauge,
        )?;
        let node = self.shared.clusters.node_budget();
        for (name, help, v) in [
            (
                "nodeway_node_upstream_connections",
                "Upstream connections held by all client pods on the node.",
                u64::from(node.connections.get()),
            ),
            (
                "nodeway_node_upstream_connections_limit",
                "Node-wide cap on upstream connections (--max-upstream-connections).",
                u64::from(node.max_connections),
            ),
            (
                "nodeway_node_pending_requests",
                "Requests of all client pods waiting for a connection.",
                u64::from(node.pending.get()),
            ),
            (
                "nodeway_node_pending_requests_limit",
                "Node-wide cap on pending requests (--max-pending-requests).",
                u64::from(node.max_pending),
            ),
        ] {
            family(enc, name, help, MetricType::Gauge, single(v), gauge)?;
        }
        family(
            enc,
            "nodeway_access_log_dropped",
            "Access log lines dropped because the writer could not keep up.",
            MetricType::Counter,
            single(self.shared.logger.dropped()),
            counter,
        )
    }
}

// ---------------------------------------------------------------------------
// Process metrics (Linux /proc; absent elsewhere)
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct ProcessCollector;

/// Clock ticks per second of `/proc/<pid>/stat` times: the kernel's USER_HZ,
/// 100 on every architecture Nodeway runs on.
const USER_HZ: f64 = 100.0;

/// Resident set size in bytes (`VmRSS` of `/proc/self/status`, in kB).
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU time in seconds (`utime`, `stime` of `/proc/self/stat`).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may itself contain spaces and ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `state` is field 3 of the man page, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        if let Some(rss) = resident_memory_bytes() {
            family(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                MetricType::Gauge,
                single(rss),
                gauge,
            )?;
        }
        if let Some(cpu) = cpu_seconds() {
            family(
                &mut enc,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                MetricType::Counter,
                std::iter::once((Labels::new(), cpu)),
                |m, v: &f64| m.encode_counter::<NoLabelSet, _, u64>(v, None),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_readings() {
        assert!(resident_memory_bytes().is_some_and(|b| b > 0));
        assert!(cpu_seconds().is_some_and(|s| s >= 0.0));
    }

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
