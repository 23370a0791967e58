//! The registry's counters summed per workload, and the counters of client
//! pods that left the configuration (`Retired`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::proxy::clients::{ClientPod, ClientRegistry, Pruned};
use crate::resilience::outlier::OutlierStats;
use crate::telemetry::stats::{
    ClusterStats, HistogramSnapshot, RequestSeries, SeriesKey, SeriesMap, TcpSeries, WorkloadLabels,
};

/// Envoy stats are labelled per (source workload, namespace, cluster).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct EnvoyKey {
    pub(super) workload: Arc<str>,
    pub(super) namespace: Arc<str>,
    pub(super) cluster: Arc<str>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct EnvoyTotals {
    /// Aligned with [`ClusterStats::NAMES`].
    pub(super) stats: Vec<u64>,
    /// Aligned with [`outlier_names`].
    pub(super) outlier: Vec<u64>,
    pub(super) connect_ms: HistogramSnapshot,
}

impl EnvoyTotals {
    pub(super) fn add(&mut self, other: &EnvoyTotals) {
        add_aligned(&mut self.stats, &other.stats);
        add_aligned(&mut self.outlier, &other.outlier);
        self.connect_ms.add(&other.connect_ms);
    }
}

pub(super) fn add_aligned(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Names of the outlier-detection stats (under `outlier_detection.`).
pub(super) fn outlier_names() -> Vec<&'static str> {
    OutlierStats::default()
        .values()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// Istio's source labels of a client pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct SourceLabels {
    pub(super) workload: Arc<str>,
    pub(super) namespace: Arc<str>,
    pub(super) app: String,
    pub(super) version: String,
    pub(super) canonical_service: String,
    pub(super) canonical_revision: String,
}

impl SourceLabels {
    fn of(client: &ClientPod) -> SourceLabels {
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
pub(super) struct IstioKey {
    pub(super) cluster: Arc<str>,
    pub(super) source: Arc<SourceLabels>,
    pub(super) series: SeriesKey,
}

#[derive(Debug, Clone, Default)]
pub(super) struct RequestTotals {
    pub(super) requests: u64,
    pub(super) duration_ms: HistogramSnapshot,
    pub(super) request_bytes: HistogramSnapshot,
    pub(super) response_bytes: HistogramSnapshot,
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

    pub(super) fn add(&mut self, o: &RequestTotals) {
        self.requests += o.requests;
        self.duration_ms.add(&o.duration_ms);
        self.request_bytes.add(&o.request_bytes);
        self.response_bytes.add(&o.response_bytes);
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TcpTotals {
    pub(super) opened: u64,
    pub(super) closed: u64,
    pub(super) sent_bytes: u64,
    pub(super) received_bytes: u64,
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

    pub(super) fn add(&mut self, o: &TcpTotals) {
        self.opened += o.opened;
        self.closed += o.closed;
        self.sent_bytes += o.sent_bytes;
        self.received_bytes += o.received_bytes;
    }
}

/// Counters and histograms summed per label set.
#[derive(Debug, Clone, Default)]
pub(super) struct Totals {
    pub(super) envoy: HashMap<EnvoyKey, EnvoyTotals>,
    pub(super) requests: HashMap<IstioKey, RequestTotals>,
    pub(super) tcp: HashMap<IstioKey, TcpTotals>,
}

impl Totals {
    /// Adds one client pod's clusters. `counters_only` leaves gauges out (for
    /// a pod that is gone: its connections and ejections are not current).
    pub(super) fn add_client(&mut self, client: &ClientPod, counters_only: bool) {
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

pub(super) fn is_gauge(stat: &str) -> bool {
    stat.ends_with("_active")
}

/// Counters of client pods pruned from the registry, kept while their
/// workload still has a pod on the node. The lock is taken on reload and on
/// scrape only, never on the request path.
#[derive(Debug, Default)]
pub struct Retired(Mutex<Totals>);

impl Retired {
    /// Installs a new configuration with `install`, which prunes the
    /// registry (pods and clusters that left the configuration) and returns
    /// what it pruned; the pruned pods' counters are kept for their workload.
    /// Done under this lock so a scrape sees a pod either live or retired,
    /// never neither.
    pub fn retire_while(&self, registry: &ClientRegistry, install: impl FnOnce() -> Pruned) {
        let mut retired = self.0.lock().expect("retired lock");
        let pruned = install();
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
    pub(super) fn with_live(&self, registry: &ClientRegistry) -> (Totals, Vec<Arc<ClientPod>>) {
        let retired = self.0.lock().expect("retired lock");
        (retired.clone(), registry.clients())
    }
}
