//! Nodeway's own gauges (configuration, eBPF redirect, node budget) and the
//! process metrics.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::*;
use crate::proxy::Proxy;
use crate::resilience::overload::{Admitted, Rejection, resident_memory_bytes};
use crate::status::ConfigStatus;

pub(super) struct NodewayCollector {
    pub proxy: Arc<Proxy>,
    pub status: Arc<ConfigStatus>,
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
            let snap = self.proxy.snapshot.load();
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

        let mut per_workload: BTreeMap<(Arc<str>, Arc<str>), [u64; 4]> = BTreeMap::new();
        for client in self.proxy.clients.clients() {
            let e = per_workload
                .entry((
                    client.source_workload.clone(),
                    client.source_namespace.clone(),
                ))
                .or_default();
            e[0] += u64::from(client.budget().connections.get());
            e[1] += u64::from(client.budget().pending.get());
            e[2] += u64::from(client.downstream.connections.get());
            e[3] += u64::from(client.downstream.requests.get());
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
            per_workload.iter().map(|(k, v)| (workload_labels(k), v[0])),
            gauge,
        )?;
        family(
            enc,
            "nodeway_client_pending_requests",
            "Requests of the workload's client pods waiting for a connection, counted against the node-wide cap.",
            MetricType::Gauge,
            per_workload.iter().map(|(k, v)| (workload_labels(k), v[1])),
            gauge,
        )?;
        family(
            enc,
            "nodeway_client_downstream_connections",
            "Downstream connections of the workload's client pods, counted against their share of --max-downstream-connections.",
            MetricType::Gauge,
            per_workload.iter().map(|(k, v)| (workload_labels(k), v[2])),
            gauge,
        )?;
        family(
            enc,
            "nodeway_client_downstream_requests",
            "Downstream requests in flight of the workload's client pods, counted against their share of --max-downstream-requests.",
            MetricType::Gauge,
            per_workload.iter().map(|(k, v)| (workload_labels(k), v[3])),
            gauge,
        )?;
        self.encode_overload(enc)?;
        let node = self.proxy.clients.node_budget();
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
            single(self.proxy.logger.dropped()),
            counter,
        )
    }
}

impl NodewayCollector {
    /// Downstream admission: node-wide gauges, refusals, and the overload
    /// manager's pressure and actions under Envoy's names.
    fn encode_overload(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let overload = &self.proxy.overload;
        for (name, help, v) in [
            (
                "nodeway_downstream_connections",
                "Downstream connections open on the node.",
                overload.connections.get(),
            ),
            (
                "nodeway_downstream_connections_limit",
                "Node-wide cap on downstream connections (--max-downstream-connections).",
                overload.limits.max_connections,
            ),
            (
                "nodeway_downstream_requests",
                "Downstream requests in flight on the node.",
                overload.requests.get(),
            ),
            (
                "nodeway_downstream_requests_limit",
                "Node-wide cap on downstream requests in flight (--max-downstream-requests).",
                overload.limits.max_requests,
            ),
        ] {
            family(
                enc,
                name,
                help,
                MetricType::Gauge,
                single(u64::from(v)),
                gauge,
            )?;
        }
        let rejected = [Admitted::Connection, Admitted::Request]
            .into_iter()
            .flat_map(|what| Rejection::ALL.into_iter().map(move |why| (what, why)))
            // A connection is never refused for memory.
            .filter(|(what, why)| !(*what == Admitted::Connection && *why == Rejection::Memory))
            .map(|(what, why)| {
                let labels: Labels<'static> = vec![
                    ("kind", Cow::Borrowed(what.kind())),
                    ("reason", Cow::Borrowed(why.reason())),
                ];
                (labels, overload.rejected(what, why))
            });
        family(
            enc,
            "nodeway_downstream_rejected",
            "Downstream connections and requests refused (access log flag OM): by the node-wide cap, the client pod's share of it, or memory pressure.",
            MetricType::Counter,
            rejected,
            counter,
        )?;
        family(
            enc,
            "envoy_overload_envoy_resource_monitors_fixed_heap_pressure",
            "Memory pressure in percent of --overload-memory-limit (Envoy's fixed_heap monitor; 0 without a limit).",
            MetricType::Gauge,
            single((overload.pressure() * 100.0) as u64),
            gauge,
        )?;
        family(
            enc,
            "envoy_overload_envoy_overload_actions_disable_http_keepalive_active",
            "1 while memory pressure is at or above 95%: HTTP/1.1 responses carry Connection: close.",
            MetricType::Gauge,
            single(u64::from(overload.keepalive_disabled())),
            gauge,
        )?;
        family(
            enc,
            "envoy_overload_envoy_overload_actions_stop_accepting_requests_active",
            "1 while memory pressure is at or above 98%: new requests get 503 (OM).",
            MetricType::Gauge,
            single(u64::from(!overload.accepting_requests())),
            gauge,
        )
    }
}

// ---------------------------------------------------------------------------
// Process metrics (Linux /proc; absent elsewhere)
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub(super) struct ProcessCollector;

/// Clock ticks per second of `/proc/<pid>/stat` times: the kernel's USER_HZ,
/// 100 on every architecture Nodeway runs on.
const USER_HZ: f64 = 100.0;

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
        assert!(cpu_seconds().is_some_and(|s| s >= 0.0));
    }
}
