//! Envoy's per-cluster upstream counters, kept per (client pod, cluster).
//! Names match Envoy's `cluster.<name>.<stat>` so the metrics endpoint can
//! expose them as `envoy_cluster_<stat>`.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! cluster_stats {
    ($($name:ident),* $(,)?) => {
        /// Counters (and a few gauges: `*_active`) of one client's view of one cluster.
        #[derive(Debug, Default)]
        pub struct ClusterStats {
            $(pub $name: AtomicU64,)*
        }

        impl ClusterStats {
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
