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

        let mut per_workload: BTreeMap<(Arc<str>, Arc<str>), (u64, u64)> = BTreeMap::new();
        for client in self.proxy.clients.clients() {
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

// ---------------------------------------------------------------------------
// Process metrics (Linux /proc; absent elsewhere)
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub(super) struct ProcessCollector;

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
}
