//! `/stats`, `/reset_counters` and `/endpoints`: Envoy's cluster stats and
//! endpoint states, kept per (client pod, cluster) and shown summed over
//! client pods unless `source` picks one client workload.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use regex::Regex;
use serde_json::{Value, json};

use crate::proxy::Proxy;
use crate::proxy::clients::ClientPod;

/// Whether `source` names this client: its workload (`sleep`),
/// `namespace/workload` (`default/sleep`) or its pod (`default/sleep-5d9c7b8f6-abcde`;
/// unknown clients are keyed by IP).
pub(super) fn source_matches(client: &ClientPod, source: Option<&str>) -> bool {
    let Some(source) = source else {
        return true;
    };
    if source == &*client.source_workload || source == &*client.key {
        return true;
    }
    source
        .split_once('/')
        .is_some_and(|(ns, w)| ns == &*client.source_namespace && w == &*client.source_workload)
}

fn clients(proxy: &Proxy, source: Option<&str>) -> Vec<Arc<ClientPod>> {
    let mut clients: Vec<_> = proxy
        .clients
        .clients()
        .into_iter()
        .filter(|c| source_matches(c, source))
        .collect();
    clients.sort_by(|a, b| a.key.cmp(&b.key));
    clients
}

/// Envoy's text form: `cluster.<name>.<stat>: <value>`, sorted by name, summed
/// over the selected client pods; `nodeway.node.*` (the node-wide budget)
/// when no `source` is given.
pub(super) fn text(proxy: &Proxy, source: Option<&str>, filter: Option<&Regex>) -> String {
    let keep = |name: &str| filter.is_none_or(|re| re.is_match(name));
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for client in clients(proxy, source) {
        for cluster in client.clusters() {
            let mut add = |name: String, value: u64| {
                if keep(&name) {
                    let total = totals.entry(name).or_default();
                    *total = total.saturating_add(value);
                }
            };
            for (stat, value) in cluster.stats.values() {
                add(format!("cluster.{}.{stat}", cluster.name), value);
            }
            if let Some(detector) = &cluster.config().outlier {
                for (stat, value) in detector.stats().values() {
                    add(
                        format!("cluster.{}.outlier_detection.{stat}", cluster.name),
                        value,
                    );
                }
            }
        }
    }
    if source.is_none() {
        for (stat, value) in node_values(proxy) {
            let name = format!("nodeway.node.{stat}");
            if keep(&name) {
                totals.insert(name, value);
            }
        }
    }
    let mut out = String::new();
    for (name, value) in totals {
        out.push_str(&format!("{name}: {value}\n"));
    }
    out
}

fn node_values(proxy: &Proxy) -> [(&'static str, u64); 4] {
    let node = proxy.clients.node_budget();
    [
        ("upstream_connections", node.connections.get().into()),
        ("max_upstream_connections", node.max_connections.into()),
        ("pending_requests", node.pending.get().into()),
        ("max_pending_requests", node.max_pending.into()),
    ]
}

/// Per (client pod, cluster): Envoy's cluster counters, outlier counters, and
/// each endpoint's state as that client sees it; plus the node-wide budget.
/// `filter` applies to the full stat name (`cluster.<name>.<stat>`).
pub(super) fn json(proxy: &Proxy, source: Option<&str>, filter: Option<&Regex>) -> Value {
    let keep = |cluster: &str, stat: &str| {
        filter.is_none_or(|re| re.is_match(&format!("cluster.{cluster}.{stat}")))
    };
    let mut clusters = Vec::new();
    for client in clients(proxy, source) {
        let mut mine = client.clusters();
        mine.sort_by(|a, b| a.name.cmp(&b.name));
        for cluster in mine {
            let config = cluster.config();
            let mut stats: serde_json::Map<String, Value> = cluster
                .stats
                .values()
                .into_iter()
                .filter(|(k, _)| keep(&cluster.name, k))
                .map(|(k, v)| (k.to_string(), v.into()))
                .collect();
            if let Some(detector) = &config.outlier {
                for (k, v) in detector.stats().values() {
                    let k = format!("outlier_detection.{k}");
                    if keep(&cluster.name, &k) {
                        stats.insert(k, v.into());
                    }
                }
            }
            let endpoints: Vec<Value> = config
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    json!({
                        "address": h.slot.addr.to_string(),
                        "ejected": h.slot.outlier.is_ejected(),
                        "ejections": h.slot.outlier.ejections(),
                        "active_requests": h.slot.active.load(Ordering::Relaxed),
                        "priority": config.balancer.priority_of(i),
                    })
                })
                .collect();
            clusters.push(json!({
                "source_pod": &*client.key,
                "source_workload": &*client.source_workload,
                "source_namespace": &*client.source_namespace,
                "cluster": &*cluster.name,
                "stats": stats,
                "endpoints": endpoints,
            }));
        }
    }
    let node: serde_json::Map<String, Value> = node_values(proxy)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    json!({ "node": node, "clusters": clusters })
}

/// Envoy's `/reset_counters`: every counter of every client cluster to zero;
/// gauges (`*_active`, `outlier_detection.ejections_active`) keep their value.
pub(super) fn reset_counters(proxy: &Proxy) {
    for client in proxy.clients.clients() {
        for cluster in client.clusters() {
            cluster.stats.reset_counters();
            if let Some(detector) = &cluster.config().outlier {
                detector.stats().reset_counters();
            }
        }
    }
}

/// One endpoint as one client pod sees it.
pub(super) struct EndpointRow {
    pub endpoint: String,
    pub ejected: bool,
    pub cluster: Arc<str>,
    pub source_pod: Arc<str>,
    pub source_workload: Arc<str>,
    pub source_namespace: Arc<str>,
    pub locality: String,
    pub priority: usize,
    pub active_requests: u32,
    pub ejections: u32,
}

impl EndpointRow {
    /// `istioctl proxy-config endpoint`'s OUTLIER CHECK column.
    fn outlier_check(&self) -> &'static str {
        if self.ejected { "FAILED" } else { "OK" }
    }
}

/// Endpoints of the clusters named `cluster` (the full cluster name, or the
/// service FQDN for all its ports and subsets), of the clients `source`
/// names; sorted by cluster, client and address.
pub(super) fn endpoint_rows(
    proxy: &Proxy,
    cluster: Option<&str>,
    source: Option<&str>,
) -> Vec<EndpointRow> {
    let wanted = |name: &str| {
        cluster.is_none_or(|c| c == name || name.rsplit('|').next().is_some_and(|fqdn| fqdn == c))
    };
    let mut rows = Vec::new();
    for client in clients(proxy, source) {
        for cc in client.clusters().into_iter().filter(|c| wanted(&c.name)) {
            let config = cc.config();
            for (i, host) in config.hosts.iter().enumerate() {
                let loc = &host.endpoint.locality;
                let locality = [&loc.region, &loc.zone, &loc.subzone]
                    .iter()
                    .map(|p| p.as_deref().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join("/");
                rows.push(EndpointRow {
                    endpoint: host.slot.addr.to_string(),
                    ejected: host.slot.outlier.is_ejected(),
                    cluster: cc.name.clone(),
                    source_pod: client.key.clone(),
                    source_workload: client.source_workload.clone(),
                    source_namespace: client.source_namespace.clone(),
                    locality: locality.trim_end_matches('/').to_string(),
                    priority: config.balancer.priority_of(i),
                    active_requests: host.slot.active.load(Ordering::Relaxed),
                    ejections: host.slot.outlier.ejections(),
                });
            }
        }
    }
    rows.sort_by(|a, b| {
        (&a.cluster, &a.source_pod, &a.endpoint).cmp(&(&b.cluster, &b.source_pod, &b.endpoint))
    });
    rows
}

/// `istioctl proxy-config endpoint`'s columns, plus the client pod. Nodeway
/// keeps only ready endpoints, hence always `HEALTHY`.
pub(super) fn endpoints_text(rows: &[EndpointRow]) -> String {
    let cells: Vec<Vec<&str>> = rows
        .iter()
        .map(|r| {
            vec![
                r.endpoint.as_str(),
                "HEALTHY",
                r.outlier_check(),
                &r.cluster,
                &r.source_pod,
            ]
        })
        .collect();
    super::render_table(
        &["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER", "SOURCE"],
        &cells,
    )
}

pub(super) fn endpoints_json(rows: &[EndpointRow]) -> Value {
    rows.iter()
        .map(|r| {
            json!({
                "endpoint": r.endpoint,
                "status": "HEALTHY",
                "outlier_check": r.outlier_check(),
                "cluster": &*r.cluster,
                "source_pod": &*r.source_pod,
                "source_workload": &*r.source_workload,
                "source_namespace": &*r.source_namespace,
                "locality": r.locality,
                "priority": r.priority,
                "active_requests": r.active_requests,
                "ejections": r.ejections,
            })
        })
        .collect()
}
