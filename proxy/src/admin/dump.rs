//! `/config_dump`: the loaded configuration and, per (client pod, cluster),
//! the policy in force after DestinationRule precedence (client namespace,
//! service namespace, root namespace; port-level and subset settings
//! applied) with Istio's defaults filled in, and the rule it came from.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use crate::proxy::Proxy;
use crate::proxy::clients::ClusterConfig;
use crate::state::{ConsistentHashKey, LbPolicy, SimpleLb};
use crate::status::ConfigStatus;

/// Envoy's ring size default for `consistentHash` without `minimumRingSize`.
const DEFAULT_MINIMUM_RING_SIZE: u64 = 1024;

pub(super) fn config_dump(proxy: &Proxy, status: &ConfigStatus) -> Value {
    let snap = proxy.snapshot.load();
    let mut clusters = Vec::new();
    let mut clients = proxy.clients.clients();
    clients.sort_by(|a, b| a.key.cmp(&b.key));
    for client in clients {
        let mut mine = client.clusters();
        mine.sort_by(|a, b| a.name.cmp(&b.name));
        for cluster in mine {
            let config = cluster.config();
            clusters.push(json!({
                "source_pod": &*client.key,
                "source_workload": &*client.source_workload,
                "source_namespace": &*client.source_namespace,
                "cluster": &*cluster.name,
                "destination_rule": config.rule.as_ref().map(|k| format!("{}/{}", k.namespace, k.name)),
                "effective_policy": effective_policy(&config),
            }));
        }
    }
    json!({
        "generation": status.generation.load(Ordering::Relaxed),
        "last_reload_error": *status.last_error.lock().expect("status lock"),
        "services": snap.services.len(),
        "pods": snap.pods_by_ip.len(),
        "destination_rules": snap.destination_rules.len(),
        "virtual_services": snap.virtual_services.len(),
        "access_log_lines_dropped": proxy.logger.dropped(),
        "clusters": clusters,
    })
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// What the data path enforces for one client cluster; unset limits are
/// Istio's 2^32-1.
fn effective_policy(config: &ClusterConfig) -> Value {
    let limits = &config.limits;
    let settings = &config.settings;
    let lb = config.policy.load_balancer.as_ref();
    let outlier = config.outlier.as_ref().map(|d| {
        let c = d.config();
        json!({
            "consecutive_5xx_errors": c.consecutive_5xx,
            // null: not configured, detected but not enforced (as Istio sets up Envoy).
            "consecutive_gateway_errors": c.consecutive_gateway_failure,
            "consecutive_local_origin_failures": c.consecutive_local_origin_failure,
            "split_external_local_origin_errors": c.split_external_local_origin_errors,
            "interval": dur(c.interval),
            "base_ejection_time": dur(c.base_ejection_time),
            "max_ejection_time": dur(c.max_ejection_time),
            "max_ejection_percent": c.max_ejection_percent,
            "min_health_percent": c.min_health_percent,
        })
    });
    json!({
        "connection_pool": {
            "max_connections": limits.max_connections,
            "max_pending_requests": limits.max_pending_requests,
            "max_requests": limits.max_requests,
            "max_retries": limits.max_retries,
            "connect_timeout": dur(settings.connect_timeout),
            // null: disabled (`idleTimeout: 0s`).
            "idle_timeout": (settings.idle_timeout != Duration::MAX).then(|| dur(settings.idle_timeout)),
            "max_requests_per_connection": settings.max_requests_per_connection,
            "max_connection_duration": settings.max_connection_duration.map(dur),
            "max_concurrent_streams": settings.max_concurrent_streams,
            "h2_upgrade": settings.h2_upgrade,
            "tcp_keepalive": settings.tcp_keepalive.as_ref().map(|k| json!({
                "probes": k.probes,
                "time": k.time.map(dur),
                "interval": k.interval.map(dur),
            })),
        },
        "load_balancer": load_balancer(config.lb_policy.as_ref(), lb, config),
        "outlier_detection": outlier,
    })
}

fn load_balancer(
    policy: Option<&LbPolicy>,
    lb: Option<&crate::state::LoadBalancer>,
    config: &ClusterConfig,
) -> Value {
    let mut out = serde_json::Map::new();
    let name = match policy {
        None | Some(LbPolicy::Simple(SimpleLb::LeastRequest)) => "LEAST_REQUEST",
        Some(LbPolicy::Simple(SimpleLb::RoundRobin)) => "ROUND_ROBIN",
        Some(LbPolicy::Simple(SimpleLb::Random)) => "RANDOM",
        Some(LbPolicy::Simple(SimpleLb::Passthrough)) => "PASSTHROUGH",
        Some(LbPolicy::ConsistentHash {
            key,
            minimum_ring_size,
        }) => {
            let key = match key {
                ConsistentHashKey::HttpHeaderName(h) => json!({ "http_header_name": h }),
                ConsistentHashKey::HttpCookie { name, path, ttl } => json!({
                    "http_cookie": { "name": name, "path": path, "ttl": ttl.map(dur) }
                }),
                ConsistentHashKey::UseSourceIp => json!({ "use_source_ip": true }),
                ConsistentHashKey::HttpQueryParameterName(q) => {
                    json!({ "http_query_parameter_name": q })
                }
            };
            out.insert("consistent_hash".into(), key);
            out.insert(
                "minimum_ring_size".into(),
                minimum_ring_size
                    .unwrap_or(DEFAULT_MINIMUM_RING_SIZE)
                    .into(),
            );
            "RING_HASH"
        }
    };
    out.insert("policy".into(), name.into());
    if let Some(setting) = lb.and_then(|l| l.locality_lb_setting.as_ref()) {
        out.insert(
            "locality_lb_setting".into(),
            json!({
                "enabled": setting.enabled,
                "failover": setting.failover.iter().map(|(from, to)| json!({"from": from, "to": to})).collect::<Vec<_>>(),
                "failover_priority": setting.failover_priority,
                "distribute": setting.distribute.iter().map(|(from, to)| json!({
                    "from": from,
                    "to": to.iter().map(|(k, w)| (k.clone(), Value::from(*w))).collect::<serde_json::Map<_, _>>(),
                })).collect::<Vec<_>>(),
            }),
        );
    }
    // Locality priorities are active only with outlier detection (Istio).
    out.insert(
        "locality_priorities".into(),
        config.balancer.priority_count().into(),
    );
    Value::Object(out)
}
