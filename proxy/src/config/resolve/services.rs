//! Services and EndpointSlices: service ports with their endpoints, VIPs,
//! port protocols, and the host names Istio objects refer to Services by.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::workloads::workload_locality;
use super::{Cx, Invalid, Note, SERVICE_NAME_LABEL, Seen};
use crate::config::{LoadOptions, Objects, Problems};
use crate::state::{
    AppProtocol, Endpoint, Labels, Locality, ObjectKey, Service, ServicePort, Snapshot, Workload,
};

/// An EndpointSlice endpoint address, before it is paired with a port.
struct SliceAddress {
    ip: IpAddr,
    ready: bool,
    locality: Locality,
    node_name: Option<String>,
    pod: Option<Arc<Workload>>,
}

/// What one EndpointSlice contributes to its Service.
struct SliceContribution {
    /// Port name ("" when unnamed) → endpoint port.
    ports: Vec<(String, u16)>,
    addresses: Vec<SliceAddress>,
}

pub(super) fn build_services<'o>(
    objects: &'o Objects,
    opts: &LoadOptions,
    nodes: &HashMap<String, &Node>,
    pods: &HashMap<ObjectKey, Arc<Workload>>,
    seen: &mut Seen<'o>,
    problems: &mut Problems,
    snapshot: &mut Snapshot,
) {
    // Service keys first, so that slices can be matched to them.
    let service_keys: HashSet<ObjectKey> = objects
        .services
        .iter()
        .filter_map(|item| {
            let meta = &item.object.metadata;
            Some(ObjectKey {
                namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
                name: meta.name.clone()?,
            })
        })
        .collect();

    let mut slices: HashMap<ObjectKey, Vec<SliceContribution>> = HashMap::new();
    for item in &objects.endpoint_slices {
        let slice: &EndpointSlice = &item.object;
        let Some((mut cx, key)) = seen.open(
            problems,
            &item.origin,
            "EndpointSlice",
            &slice.metadata,
            true,
        ) else {
            continue;
        };
        let labels = slice.metadata.labels.as_ref();
        let Some(service_name) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            cx.warn("metadata.labels", Note::SliceWithoutService);
            continue;
        };
        let service_key = ObjectKey {
            namespace: key.namespace.clone(),
            name: service_name.clone(),
        };
        if !service_keys.contains(&service_key) {
            cx.warn(
                "metadata.labels",
                Note::SliceServiceMissing(format!(
                    "{}/{}",
                    service_key.namespace, service_key.name
                )),
            );
            continue;
        }
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            cx.warn(
                "addressType",
                Note::SliceAddressType(slice.address_type.clone()),
            );
            continue;
        }
        let contribution = slice_contribution(&mut cx, slice, &key.namespace, nodes, pods);
        if !cx.failed() {
            slices.entry(service_key).or_default().push(contribution);
        }
    }

    for item in &objects.services {
        let service = &item.object;
        let Some((mut cx, key)) =
            seen.open(problems, &item.origin, "Service", &service.metadata, true)
        else {
            continue;
        };
        let spec = service.spec.as_ref();
        let mut cluster_ips = Vec::new();
        let mut add_ip = |cx: &mut Cx<'_>, ip: &str, field: &str| {
            if ip.is_empty() || ip == "None" {
                return;
            }
            if let Some(ip) = cx.ip(ip, field)
                && !cluster_ips.contains(&ip)
            {
                cluster_ips.push(ip);
            }
        };
        if let Some(ip) = spec.and_then(|s| s.cluster_ip.as_deref()) {
            add_ip(&mut cx, ip, "spec.clusterIP");
        }
        for (i, ip) in spec
            .and_then(|s| s.cluster_ips.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            add_ip(&mut cx, ip, &format!("spec.clusterIPs[{i}]"));
        }

        let contributions = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
        let fqdn = format!("{}.{}.svc.{}", key.name, key.namespace, opts.cluster_domain);
        let mut ports = Vec::new();
        for (i, port) in spec
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            // Only TCP carries HTTP; UDP and SCTP ports are not proxied.
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Some(number) = cx.port(Some(port.port.into()), &format!("spec.ports[{i}].port"))
            else {
                continue;
            };
            let name = port.name.clone().filter(|n| !n.is_empty());
            ports.push(ServicePort {
                protocol: port_protocol(name.as_deref(), port.app_protocol.as_deref()),
                endpoints: port_endpoints(name.as_deref().unwrap_or(""), contributions),
                name,
                port: number,
                cluster_name: Arc::from(format!("outbound|{number}||{fqdn}")),
            });
        }
        if cx.failed() {
            continue;
        }

        let service = Arc::new(Service {
            key: key.clone(),
            fqdn,
            cluster_ips,
            ports,
            labels: service.metadata.labels.clone().unwrap_or_default(),
        });
        for ip in &service.cluster_ips {
            for (index, port) in service.ports.iter().enumerate() {
                let addr = SocketAddr::new(*ip, port.port);
                if let Some((other, _)) = snapshot.service_vips.get(&addr) {
                    let other = format!("{}/{}", other.key.namespace, other.key.name);
                    cx.error("spec.clusterIP", Invalid::VipInUse { addr, other });
                } else {
                    snapshot.service_vips.insert(addr, (service.clone(), index));
                }
            }
        }
        snapshot.services.insert(key, service);
    }
}

fn slice_contribution(
    cx: &mut Cx<'_>,
    slice: &EndpointSlice,
    namespace: &str,
    nodes: &HashMap<String, &Node>,
    pods: &HashMap<ObjectKey, Arc<Workload>>,
) -> SliceContribution {
    let mut ports = Vec::new();
    for (i, port) in slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        // A port without a number means "all ports", which no Service uses.
        if let Some(number) = cx.port(port.port.map(i64::from), &format!("ports[{i}].port")) {
            ports.push((port.name.clone().unwrap_or_default(), number));
        }
    }

    let mut addresses = Vec::new();
    for (i, endpoint) in slice
        .endpoints
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let pod = endpoint
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| {
                let key = ObjectKey {
                    namespace: r.namespace.clone().unwrap_or_else(|| namespace.to_string()),
                    name: r.name.clone()?,
                };
                pods.get(&key).cloned()
            });
        let node_name = endpoint
            .node_name
            .clone()
            .or_else(|| pod.as_ref().and_then(|p| p.node_name.clone()));
        let node_labels = node_name
            .as_ref()
            .and_then(|n| nodes.get(n))
            .and_then(|n| n.metadata.labels.as_ref());
        let locality = workload_locality(
            pod.as_ref().map(|p| &p.labels).unwrap_or(&Labels::new()),
            node_labels,
            endpoint.zone.as_deref(),
        );
        // Kubernetes: an unknown ready condition is to be treated as ready.
        let ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        for (j, address) in endpoint.addresses.iter().enumerate() {
            if let Some(ip) = cx.ip(address, &format!("endpoints[{i}].addresses[{j}]")) {
                addresses.push(SliceAddress {
                    ip,
                    ready,
                    locality: locality.clone(),
                    node_name: node_name.clone(),
                    pod: pod.clone(),
                });
            }
        }
    }
    SliceContribution { ports, addresses }
}

/// Endpoints of the service port named `port_name` ("" when unnamed), merged
/// over all slices of the service.
fn port_endpoints(port_name: &str, contributions: &[SliceContribution]) -> Vec<Arc<Endpoint>> {
    let mut seen = HashSet::new();
    let mut endpoints = Vec::new();
    for contribution in contributions {
        let Some((_, port)) = contribution
            .ports
            .iter()
            .find(|(name, _)| name == port_name)
        else {
            continue;
        };
        for address in &contribution.addresses {
            let addr = SocketAddr::new(address.ip, *port);
            // Slices may briefly overlap while Kubernetes moves endpoints.
            if seen.insert(addr) {
                endpoints.push(Arc::new(Endpoint {
                    addr,
                    ready: address.ready,
                    locality: address.locality.clone(),
                    node_name: address.node_name.clone(),
                    pod: address.pod.clone(),
                }));
            }
        }
    }
    endpoints
}

/// Protocol of a service port, decided like Istio: `appProtocol` if set, else
/// the port name, each as `<protocol>` or `<protocol>-<suffix>`.
pub fn port_protocol(port_name: Option<&str>, app_protocol: Option<&str>) -> AppProtocol {
    let declared = app_protocol
        .or(port_name)
        .unwrap_or_default()
        .to_ascii_lowercase();
    match declared.as_str() {
        "kubernetes.io/h2c" => return AppProtocol::Http2,
        // gRPC-Web is HTTP/1.1 traffic; checked before the prefix split.
        name if name.starts_with("grpc-web") => return AppProtocol::Http,
        _ => {}
    }
    let prefix = declared.split('-').next().unwrap_or_default();
    match prefix {
        "http" => AppProtocol::Http,
        "http2" | "h2c" => AppProtocol::Http2,
        "grpc" => AppProtocol::Grpc,
        "tcp" | "https" | "tls" | "mongo" | "mysql" | "redis" => AppProtocol::Tcp,
        _ => AppProtocol::Unknown,
    }
}

/// Expands a short host name to an FQDN in `namespace`, exactly like Istio's
/// `ResolveShortnameToFQDN`: names with a dot, `*` and IP addresses are kept.
pub fn resolve_short_name(host: &str, namespace: &str, cluster_domain: &str) -> String {
    if host.is_empty() || host == "*" || host.contains('.') || host.parse::<IpAddr>().is_ok() {
        return host.to_string();
    }
    format!("{host}.{namespace}.svc.{cluster_domain}")
}

/// Whether a (possibly wildcard) config host covers a concrete host.
pub(super) fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_expand_like_istio() {
        let fqdn = |h: &str| resolve_short_name(h, "shop", "cluster.local");
        assert_eq!(fqdn("reviews"), "reviews.shop.svc.cluster.local");
        assert_eq!(fqdn("reviews.other"), "reviews.other");
        assert_eq!(
            fqdn("reviews.other.svc.cluster.local"),
            "reviews.other.svc.cluster.local"
        );
        assert_eq!(fqdn("*"), "*");
        assert_eq!(fqdn("*.cluster.local"), "*.cluster.local");
        assert_eq!(fqdn("::1"), "::1");
        assert_eq!(fqdn(""), "");
        assert_eq!(
            resolve_short_name("a", "b", "example.org"),
            "a.b.svc.example.org"
        );
    }

    #[test]
    fn wildcard_hosts_match_suffixes() {
        assert!(host_matches("*.cluster.local", "a.b.svc.cluster.local"));
        assert!(host_matches("*", "anything"));
        assert!(host_matches(
            "a.b.svc.cluster.local",
            "a.b.svc.cluster.local"
        ));
        assert!(!host_matches("*.example.com", "a.b.svc.cluster.local"));
    }

    #[test]
    fn port_protocol_follows_app_protocol_then_name() {
        use AppProtocol::*;
        let cases: [(Option<&str>, Option<&str>, AppProtocol); 18] = [
            (Some("http"), None, Http),
            (Some("http-web"), None, Http),
            (Some("HTTP"), None, Http),
            (Some("http2"), None, Http2),
            (Some("grpc"), None, Grpc),
            (Some("grpc-api"), None, Grpc),
            (Some("grpc-web"), None, Http),
            (Some("tcp-db"), None, Tcp),
            (Some("https"), None, Tcp),
            (Some("tls-x"), None, Tcp),
            (Some("web"), None, Unknown),
            (Some("httpx"), None, Unknown),
            (None, None, Unknown),
            (Some("web"), Some("http"), Http),
            (Some("http"), Some("kubernetes.io/h2c"), Http2),
            (Some("http"), Some("h2c"), Http2),
            (Some("http"), Some("mysql"), Tcp),
            // appProtocol wins even when it says nothing useful.
            (Some("http"), Some("custom"), Unknown),
        ];
        for (name, app_protocol, expected) in cases {
            assert_eq!(
                port_protocol(name, app_protocol),
                expected,
                "{name:?} {app_protocol:?}"
            );
        }
    }
}
