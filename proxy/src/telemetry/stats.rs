//! Envoy's per-cluster upstream counters and Istio's request series, kept per
//! (client pod, cluster). Names match Envoy's `cluster.<name>.<stat>` so the
//! metrics endpoint (`admin::metrics`) can expose them as
//! `envoy_cluster_<stat>`.
//!
//! Everything here is recorded on the request path with atomics only: no lock
//! is taken except when a new Istio label set appears for the first time in a
//! (client pod, cluster) (copy on insert, as the per-client cluster map does).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;

use super::access_log::AccessLogEntry;
use super::flags::ResponseFlags;
use crate::state::{Labels, Service, Workload};

/// Envoy's default histogram bucket bounds, used by Envoy's
/// `upstream_cx_connect_ms` (milliseconds) and by Istio's
/// `istio_request_duration_milliseconds`, `istio_request_bytes` and
/// `istio_response_bytes` (milliseconds, bytes).
pub const DEFAULT_BUCKETS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    30_000.0,
    60_000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];

/// Buckets plus the `+Inf` overflow bucket.
const SLOTS: usize = DEFAULT_BUCKETS.len() + 1;

/// A lock-free histogram with [`DEFAULT_BUCKETS`]: one atomic per bucket and
/// the sum as `f64` bits.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; SLOTS],
    sum_bits: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl Histogram {
    pub fn observe(&self, value: f64) {
        // `le` semantics: the first bucket whose bound is >= the value.
        let slot = DEFAULT_BUCKETS.partition_point(|bound| *bound < value);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    pub fn observe_duration_ms(&self, d: std::time::Duration) {
        self.observe(d.as_secs_f64() * 1000.0);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
        }
    }
}

/// A histogram's values at one moment; can be summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Per bucket (not cumulative), the last one is `+Inf`.
    pub counts: [u64; SLOTS],
    pub sum: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn add(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum += other.sum;
    }

    /// `(upper bound, count in this bucket)`, the last bound `+Inf`: the
    /// shape `prometheus_client`'s histogram encoder takes.
    pub fn buckets(&self) -> [(f64, u64); SLOTS] {
        std::array::from_fn(|i| {
            (
                DEFAULT_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                self.counts[i],
            )
        })
    }
}

macro_rules! cluster_stats {
    ($($name:ident),* $(,)?) => {
        /// Counters (and a few gauges: `*_active`) of one client's view of one
        /// cluster, the `upstream_cx_connect_ms` histogram, and the Istio
        /// request/TCP series recorded against the cluster.
        #[derive(Debug, Default)]
        pub struct ClusterStats {
            $(pub $name: AtomicU64,)*
            /// Envoy's `upstream_cx_connect_ms`: time to establish upstream connections.
            pub upstream_cx_connect_ms: Histogram,
            /// Istio's request metrics, one series per label set.
            pub requests: Arc<SeriesMap<RequestSeries>>,
            /// Istio's TCP metrics, one series per label set.
            pub tcp: SeriesMap<TcpSeries>,
        }

        impl ClusterStats {
            /// Envoy stat names in the order of [`ClusterStats::values`].
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name),)*];

            /// Zeroes the counters (Envoy's `/reset_counters`); gauges (`*_active`) keep their value.
            pub fn reset_counters(&self) {
                $(if !stringify!($name).ends_with("_active") {
                    self.$name.store(0, Ordering::Relaxed);
                })*
            }

            /// `(envoy stat name, value)` pairs.
            pub fn values(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

cluster_stats!(
    upstream_rq_total,
    upstream_rq_1xx,
    upstream_rq_2xx,
    upstream_rq_3xx,
    upstream_rq_4xx,
    upstream_rq_5xx,
    upstream_rq_timeout,
    upstream_rq_per_try_timeout,
    upstream_rq_retry,
    upstream_rq_retry_success,
    upstream_rq_retry_limit_exceeded,
    upstream_rq_retry_overflow,
    upstream_rq_pending_total,
    upstream_rq_pending_overflow,
    upstream_rq_pending_active,
    upstream_rq_active,
    upstream_rq_cancelled,
    upstream_cx_total,
    upstream_cx_active,
    upstream_cx_overflow,
    upstream_cx_connect_fail,
    upstream_cx_connect_timeout,
    upstream_cx_idle_timeout,
    upstream_cx_max_requests,
    upstream_cx_max_duration_reached,
);

impl ClusterStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(gauge: &AtomicU64) {
        gauge.fetch_sub(1, Ordering::Relaxed);
    }

    /// `upstream_rq_<class>xx` for a response status.
    pub fn count_status(&self, status: u16) {
        let class = match status / 100 {
            1 => &self.upstream_rq_1xx,
            2 => &self.upstream_rq_2xx,
            3 => &self.upstream_rq_3xx,
            4 => &self.upstream_rq_4xx,
            _ => &self.upstream_rq_5xx,
        };
        Self::inc(class);
    }
}

// ---------------------------------------------------------------------------
// Istio standard metrics
// ---------------------------------------------------------------------------

/// Istio's `app`, `version` and canonical service/revision of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadLabels {
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl WorkloadLabels {
    /// As Istio derives them: `app`/`version` labels (else `unknown`); the
    /// canonical service from `service.istio.io/canonical-name`,
    /// `app.kubernetes.io/name`, `app`, else the workload name; the canonical
    /// revision from `service.istio.io/canonical-revision`,
    /// `app.kubernetes.io/version`, `version`, else `latest`.
    pub fn of(workload: Option<&Workload>) -> WorkloadLabels {
        let Some(w) = workload else {
            return WorkloadLabels {
                app: UNKNOWN.into(),
                version: UNKNOWN.into(),
                canonical_service: UNKNOWN.into(),
                canonical_revision: UNKNOWN.into(),
            };
        };
        let first = |labels: &Labels, keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).cloned())
        };
        WorkloadLabels {
            app: first(&w.labels, &["app"]).unwrap_or_else(|| UNKNOWN.into()),
            version: first(&w.labels, &["version"]).unwrap_or_else(|| UNKNOWN.into()),
            canonical_service: first(
                &w.labels,
                &[
                    "service.istio.io/canonical-name",
                    "app.kubernetes.io/name",
                    "app",
                ],
            )
            .unwrap_or_else(|| w.workload_name.clone()),
            canonical_revision: first(
                &w.labels,
                &[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ],
            )
            .unwrap_or_else(|| "latest".into()),
        }
    }
}

pub const UNKNOWN: &str = "unknown";

/// The destination side of Istio's labels: the Service a request went to and
/// the workload (pod) behind the endpoint that served it. Built once per
/// endpoint and configuration generation, then shared by `Arc`; equality and
/// hash are by content (the hash is computed once), so the same labels built
/// for another generation or client fall in the same series.
#[derive(Debug)]
pub struct PeerLabels {
    pub workload: String,
    pub workload_namespace: String,
    pub labels: WorkloadLabels,
    /// FQDN, e.g. `reviews.default.svc.cluster.local`.
    pub service: String,
    pub service_name: String,
    pub service_namespace: String,
    hash: u64,
}

impl PeerLabels {
    pub fn destination(service: Option<&Service>, pod: Option<&Workload>) -> Arc<PeerLabels> {
        let (service, service_name, service_namespace) = match service {
            Some(s) => (s.fqdn.clone(), s.key.name.clone(), s.key.namespace.clone()),
            None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        let (workload, workload_namespace) = match pod {
            Some(w) => (w.workload_name.clone(), w.namespace.clone()),
            None => (UNKNOWN.into(), UNKNOWN.into()),
        };
        let mut peer = PeerLabels {
            workload,
            workload_namespace,
            labels: WorkloadLabels::of(pod),
            service,
            service_name,
            service_namespace,
            hash: 0,
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        peer.content().hash(&mut h);
        peer.hash = h.finish();
        Arc::new(peer)
    }

    /// Nothing known about the destination (no route, no cluster).
    pub fn unknown() -> Arc<PeerLabels> {
        static UNKNOWN_PEER: OnceLock<Arc<PeerLabels>> = OnceLock::new();
        UNKNOWN_PEER
            .get_or_init(|| PeerLabels::destination(None, None))
            .clone()
    }

    fn content(&self) -> (&str, &str, &WorkloadLabels, &str, &str, &str) {
        (
            &self.workload,
            &self.workload_namespace,
            &self.labels,
            &self.service,
            &self.service_name,
            &self.service_namespace,
        )
    }
}

impl PartialEq for PeerLabels {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other) || (self.hash == other.hash && self.content() == other.content())
    }
}

impl Eq for PeerLabels {}

impl Hash for PeerLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// `request_protocol` values.
pub const PROTOCOL_HTTP: &str = "http";
pub const PROTOCOL_GRPC: &str = "grpc";
pub const PROTOCOL_TCP: &str = "tcp";

/// What varies between the Istio series of one (client pod, cluster). The
/// source labels come from the client pod, added when the metrics are read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    pub peer: Arc<PeerLabels>,
    pub protocol: &'static str,
    /// 0 for TCP and for requests that got no response.
    pub response_code: u16,
    pub flags: ResponseFlags,
    /// Only for gRPC.
    pub grpc_status: Option<u32>,
}

/// `istio_requests_total` and the three request histograms of one label set.
#[derive(Debug, Default)]
pub struct RequestSeries {
    pub requests: AtomicU64,
    pub duration_ms: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

/// Istio's TCP counters of one label set.
#[derive(Debug, Default)]
pub struct TcpSeries {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub received_bytes: AtomicU64,
}

/// Series by label set. Reads are lock-free (`ArcSwap`); the map is copied
/// only when a label set appears for the first time, under a lock that only
/// writers of this map take.
#[derive(Debug)]
pub struct SeriesMap<V> {
    map: ArcSwap<HashMap<SeriesKey, Arc<V>>>,
    insert: Mutex<()>,
}

impl<V> Default for SeriesMap<V> {
    fn default() -> Self {
        SeriesMap {
            map: ArcSwap::from_pointee(HashMap::new()),
            insert: Mutex::new(()),
        }
    }
}

impl<V: Default> SeriesMap<V> {
    /// Runs `f` on the series of `key`, creating it if needed.
    pub fn with(&self, key: &SeriesKey, f: impl FnOnce(&V)) {
        if let Some(series) = self.map.load().get(key) {
            return f(series);
        }
        let series = {
            let _writer = self.insert.lock().expect("series map lock");
            let current = self.map.load_full();
            match current.get(key) {
                Some(s) => s.clone(),
                None => {
                    let fresh = Arc::new(V::default());
                    let mut map = HashMap::clone(&current);
                    map.insert(key.clone(), fresh.clone());
                    self.map.store(Arc::new(map));
                    fresh
                }
            }
        };
        f(&series);
    }

    /// All series (for the metrics endpoint).
    pub fn entries(&self) -> Arc<HashMap<SeriesKey, Arc<V>>> {
        self.map.load_full()
    }
}

/// Where one HTTP exchange's Istio metrics go, carried by the exchange and
/// narrowed as the request is routed: the client pod's unrouted series with an
/// unknown destination at first, then the cluster's series with the Service,
/// then with the endpoint's workload.
#[derive(Debug, Clone)]
pub struct RequestTelemetry {
    pub series: Arc<SeriesMap<RequestSeries>>,
    pub peer: Arc<PeerLabels>,
    pub protocol: &'static str,
}

impl RequestTelemetry {
    /// Records the finished exchange (`istio_requests_total`, duration and sizes).
    pub fn record(&self, entry: &AccessLogEntry) {
        // Label values an upstream chooses come from a known set, so no
        // upstream can grow the series without bound.
        let key = SeriesKey {
            peer: self.peer.clone(),
            protocol: self.protocol,
            response_code: if (100..=599).contains(&entry.response_code) {
                entry.response_code
            } else {
                0
            },
            flags: entry.response_flags,
            grpc_status: if self.protocol == PROTOCOL_GRPC {
                // gRPC reads codes it does not define as UNKNOWN (2).
                entry
                    .grpc_status
                    .map(|code| if code <= 16 { code } else { 2 })
            } else {
                None
            },
        };
        self.series.with(&key, |s| {
            s.requests.fetch_add(1, Ordering::Relaxed);
            s.duration_ms.observe_duration_ms(entry.duration);
            s.request_bytes.observe(entry.bytes_received as f64);
            s.response_bytes.observe(entry.bytes_sent as f64);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::ResponseFlag;

    #[test]
    fn histogram_buckets_are_le() {
        let h = Histogram::default();
        for v in [0.0, 0.5, 0.6, 1.0, 4_000_000.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 5);
        assert_eq!(s.counts[0], 2, "0 and 0.5 are <= 0.5");
        assert_eq!(s.counts[1], 2, "0.6 and 1 are <= 1");
        assert_eq!(s.counts[SLOTS - 1], 1, "past the last bound: +Inf");
        assert!((s.sum - 4_000_002.1).abs() < 1e-6);
        let b = s.buckets();
        assert_eq!(b[0].0, 0.5);
        assert_eq!(b[SLOTS - 1].0, f64::INFINITY);
    }

    #[test]
    fn peer_labels_compare_by_content() {
        let a = PeerLabels::destination(None, None);
        let b = PeerLabels::destination(None, None);
        assert!(!Arc::ptr_eq(&a, &b));
        let key = |peer: Arc<PeerLabels>| SeriesKey {
            peer,
            protocol: PROTOCOL_HTTP,
            response_code: 503,
            flags: {
                let mut f = ResponseFlags::default();
                f.set(ResponseFlag::UpstreamOverflow);
                f
            },
            grpc_status: None,
        };
        let map: SeriesMap<RequestSeries> = SeriesMap::default();
        map.with(&key(a), |s| {
            s.requests.fetch_add(1, Ordering::Relaxed);
        });
        map.with(&key(b), |s| {
            s.requests.fetch_add(1, Ordering::Relaxed);
        });
        let entries = map.entries();
        assert_eq!(entries.len(), 1);
        let series = entries.values().next().unwrap();
        assert_eq!(series.requests.load(Ordering::Relaxed), 2);
    }
}
