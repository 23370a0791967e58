//! Validation of input [`Objects`] and their conversion into a [`Snapshot`].
//!
//! Every problem of every object is collected. An object with an error is left
//! out of the snapshot (like Istio skips invalid configs), so the snapshot is
//! usable even when errors are reported (the file loader refuses it anyway).
//! The exception is a Pod whose IP another Pod already has: it stays, but only
//! the first Pod is found by that IP.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::config::duration::{DurationError, parse_duration};
use crate::config::{LoadOptions, Objects, Origin, Problem, Problems, istio};
use crate::state::{
    AppProtocol, ConnectionPool, ConsistentHashKey, DestinationRule, Endpoint, H2UpgradePolicy,
    HttpMatch, HttpRoute, HttpSettings, InvalidRetryOn, Labels, LbPolicy, LoadBalancer, Locality,
    LocalityLbSetting, NodeInfo, ObjectKey, OutlierDetection, RetryOn, RetryPolicy,
    RouteDestination, Service, ServicePort, SimpleLb, Snapshot, StringMatch, Subset, TcpKeepalive,
    TcpSettings, TrafficPolicy, VirtualService, Workload,
};

/// Pod label with Istio's locality override, `region.zone[.subzone]`.
const ISTIO_LOCALITY_LABEL: &str = "istio-locality";
const REGION_LABELS: [&str; 2] = [
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/region",
];
const ZONE_LABELS: [&str; 2] = [
    "topology.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/zone",
];
const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// Namespace label that turns traffic redirection on (`enabled`); a Pod can opt out with `disabled`.
const REDIRECT_LABEL: &str = "nodeway.io/redirect";
/// Pod annotation naming its network namespace file (file mode).
pub const NETNS_ANNOTATION: &str = "nodeway.io/netns";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a field is invalid (the message of an error [`Problem`]).
#[derive(Debug, thiserror::Error)]
enum Invalid {
    #[error("is required")]
    Required,
    #[error("must not be empty")]
    Empty,
    #[error("duplicate {kind} {name} (first defined in {first})")]
    Duplicate {
        kind: &'static str,
        name: String,
        first: String,
    },
    #[error("invalid IP address {0:?}")]
    Ip(String),
    #[error("{0}")]
    Duration(#[from] DurationError),
    #[error("duration {0:?} is below Istio's minimum of 1ms")]
    BelowOneMillisecond(String),
    #[error("must be between {min} and {max}, got {value}")]
    OutOfRange { value: i64, min: i64, max: i64 },
    #[error("unknown value {value:?} (expected one of {expected})")]
    UnknownEnumValue { value: String, expected: String },
    #[error("{0}")]
    RetryOn(#[from] InvalidRetryOn),
    #[error("must set exactly one of exact, prefix or regex")]
    StringMatchOneOf,
    #[error("invalid regex: {0}")]
    Regex(String),
    #[error("at least one destination is required")]
    NoDestinations,
    #[error("cannot set both route and {0}")]
    RouteAndAction(&'static str),
    #[error("weights of multiple destinations must add up to more than 0")]
    ZeroTotalWeight,
    #[error("at least one host is required")]
    NoHosts,
    #[error("duplicate subset name {0:?}")]
    DuplicateSubset(String),
    #[error("duplicate port {0} in portLevelSettings")]
    DuplicatePortSettings(u16),
    #[error("cannot set both simple and consistentHash")]
    SimpleAndConsistentHash,
    #[error(
        "must set exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName"
    )]
    HashKeyOneOf,
    #[error("cannot set both distribute and failover")]
    DistributeAndFailover,
    #[error("weights add up to {0}, expected 100")]
    DistributeTotal(i64),
    #[error("failover from and to must be different regions")]
    FailoverSameRegion,
    #[error("failover only accepts regions, not {0:?}")]
    FailoverNotRegion(String),
    #[error("IP {ip} is already used by Pod {other}")]
    PodIpInUse { ip: IpAddr, other: String },
    #[error("{addr} is already used by Service {other}")]
    VipInUse { addr: SocketAddr, other: String },
}

/// Things that load but deserve the user's attention (the message of a warning [`Problem`]).
#[derive(Debug, thiserror::Error)]
enum Note {
    #[error("{0} routes are not supported yet; ignored")]
    UnsupportedRoutes(&'static str),
    #[error("{0} is not supported by Nodeway; this route is ignored")]
    UnsupportedRouteAction(&'static str),
    #[error(
        "host {0:?} does not match any Service in the config (fine if a ServiceEntry defines it)"
    )]
    UnknownHost(String),
    #[error("subset {subset:?} is not defined by any DestinationRule for {host}")]
    UnknownSubset { subset: String, host: String },
    #[error(
        "deprecated; treated like Istio does, as consecutiveGatewayErrors (and 5xx ejection off)"
    )]
    DeprecatedConsecutiveErrors,
    #[error("has no label {SERVICE_NAME_LABEL}; ignored")]
    SliceWithoutService,
    #[error("Service {0} is not in the config; EndpointSlice ignored")]
    SliceServiceMissing(String),
    #[error("addressType {0} is not supported; EndpointSlice ignored")]
    SliceAddressType(String),
}

/// How small a duration Istio accepts for a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Minimum {
    Zero,
    OneMillisecond,
}

/// Reports problems for one object.
struct Cx<'a> {
    problems: &'a mut Problems,
    origin: &'a Origin,
    kind: &'static str,
    name: String,
    errors_before: usize,
}

impl<'a> Cx<'a> {
    fn new(
        problems: &'a mut Problems,
        origin: &'a Origin,
        kind: &'static str,
        name: String,
    ) -> Self {
        let errors_before = problems.errors.len();
        Cx {
            problems,
            origin,
            kind,
            name,
            errors_before,
        }
    }

    fn problem(&self, field: &str, message: impl ToString) -> Problem {
        Problem {
            file: self.origin.file.clone(),
            document: self.origin.document,
            kind: self.kind.to_string(),
            name: self.name.clone(),
            field: field.to_string(),
            message: message.to_string(),
        }
    }

    fn error(&mut self, field: &str, message: impl ToString) {
        let problem = self.problem(field, message);
        self.problems.errors.push(problem);
    }

    fn warn(&mut self, field: &str, message: impl ToString) {
        let problem = self.problem(field, message);
        self.problems.warnings.push(problem);
    }

    /// Whether any error was reported for this object.
    fn failed(&self) -> bool {
        self.problems.errors.len() > self.errors_before
    }

    fn duration(&mut self, value: Option<&str>, field: &str, minimum: Minimum) -> Option<Duration> {
        let value = value?;
        match parse_duration(value) {
            Ok(d) if minimum == Minimum::OneMillisecond && d < Duration::from_millis(1) => {
                self.error(field, Invalid::BelowOneMillisecond(value.to_string()));
                None
            }
            Ok(d) => Some(d),
            Err(err) => {
                self.error(field, Invalid::Duration(err));
                None
            }
        }
    }

    fn int_in(&mut self, value: Option<i64>, field: &str, min: i64, max: i64) -> Option<i64> {
        let value = value?;
        if (min..=max).contains(&value) {
            Some(value)
        } else {
            self.error(field, Invalid::OutOfRange { value, min, max });
            None
        }
    }

    /// Istio `uint32`/`UInt32Value`.
    fn uint32(&mut self, value: Option<i64>, field: &str) -> Option<u32> {
        self.int_in(value, field, 0, u32::MAX.into())
            .map(|v| v as u32)
    }

    /// Istio `int32` fields that must not be negative.
    fn non_negative_int32(&mut self, value: Option<i64>, field: &str) -> Option<u32> {
        self.int_in(value, field, 0, i32::MAX.into())
            .map(|v| v as u32)
    }

    fn percent(&mut self, value: Option<i64>, field: &str) -> Option<u32> {
        self.int_in(value, field, 0, 100).map(|v| v as u32)
    }

    fn port(&mut self, value: Option<i64>, field: &str) -> Option<u16> {
        self.int_in(value, field, 1, 65535).map(|v| v as u16)
    }

    fn ip(&mut self, value: &str, field: &str) -> Option<IpAddr> {
        match value.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.error(field, Invalid::Ip(value.to_string()));
                None
            }
        }
    }

    fn enum_value<T: Copy>(&mut self, value: &str, field: &str, table: &[(&str, T)]) -> Option<T> {
        let found = table
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, v)| *v);
        if found.is_none() {
            let expected = table
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ");
            self.error(
                field,
                Invalid::UnknownEnumValue {
                    value: value.to_string(),
                    expected,
                },
            );
        }
        found
    }
}

/// Detects duplicate objects (same kind, namespace and name).
#[derive(Default)]
struct Seen<'o> {
    first: HashMap<(&'static str, ObjectKey), &'o Origin>,
}

impl<'o> Seen<'o> {
    /// Starts reporting for an object; `None` (after reporting) when it has no
    /// name or repeats an earlier one, so the caller skips it.
    fn open<'a>(
        &mut self,
        problems: &'a mut Problems,
        origin: &'o Origin,
        kind: &'static str,
        meta: &ObjectMeta,
        namespaced: bool,
    ) -> Option<(Cx<'a>, ObjectKey)>
    where
        'o: 'a,
    {
        let namespace = if namespaced {
            meta.namespace.clone().unwrap_or_else(|| "default".into())
        } else {
            String::new()
        };
        let name = meta.name.clone().filter(|n| !n.is_empty());
        let label = match &name {
            None => "-".to_string(),
            Some(name) if namespaced => format!("{namespace}/{name}"),
            Some(name) => name.clone(),
        };
        let mut cx = Cx::new(problems, origin, kind, label.clone());
        let Some(name) = name else {
            cx.error("metadata.name", Invalid::Required);
            return None;
        };
        let key = ObjectKey { namespace, name };
        if let Some(first) = self.first.get(&(kind, key.clone())) {
            let first = format!("{} document {}", first.file, first.document);
            cx.error(
                "metadata.name",
                Invalid::Duplicate {
                    kind,
                    name: label,
                    first,
                },
            );
            return None;
        }
        self.first.insert((kind, key.clone()), origin);
        Some((cx, key))
    }
}

/// Validates `objects` and resolves them into a snapshot. Problems are
/// returned, not logged; objects with errors are left out of the snapshot.
pub fn resolve(objects: &Objects, opts: &LoadOptions) -> (Snapshot, Problems) {
    let mut problems = Problems::default();
    let mut seen = Seen::default();
    let mut snapshot = Snapshot {
        cluster_domain: opts.cluster_domain.clone(),
        root_namespace: opts.root_namespace.clone(),
        ..Default::default()
    };

    for item in &objects.namespaces {
        let meta = &item.object.metadata;
        if let Some((_, key)) = seen.open(&mut problems, &item.origin, "Namespace", meta, false) {
            snapshot
                .namespaces
                .insert(key.name, meta.labels.clone().unwrap_or_default());
        }
    }

    let mut nodes: HashMap<String, &Node> = HashMap::new();
    for item in &objects.nodes {
        if let Some((_, key)) = seen.open(
            &mut problems,
            &item.origin,
            "Node",
            &item.object.metadata,
            false,
        ) {
            nodes.insert(key.name, &item.object);
        }
    }
    if let Some(node) = opts.node_name.as_ref().and_then(|name| nodes.get(name)) {
        let labels = node.metadata.labels.clone().unwrap_or_default();
        snapshot.node = Some(NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            locality: node_locality(&labels),
            labels,
        });
    }

    let pods = build_pods(
        objects,
        &nodes,
        &snapshot.namespaces,
        &mut seen,
        &mut problems,
        &mut snapshot.pods_by_ip,
    );
    build_services(
        objects,
        opts,
        &nodes,
        &pods,
        &mut seen,
        &mut problems,
        &mut snapshot,
    );

    for item in &objects.destination_rules {
        let meta = &item.object.metadata;
        if let Some((mut cx, key)) =
            seen.open(&mut problems, &item.origin, "DestinationRule", meta, true)
        {
            let rule = destination_rule(&mut cx, key, &item.object.spec, opts);
            if !cx.failed() {
                snapshot.destination_rules.push(Arc::new(rule));
            }
        }
    }

    let known_hosts: HashSet<&str> = snapshot
        .services
        .values()
        .map(|s| s.fqdn.as_str())
        .collect();
    let mut virtual_services = Vec::new();
    for item in &objects.virtual_services {
        let meta = &item.object.metadata;
        if let Some((mut cx, key)) =
            seen.open(&mut problems, &item.origin, "VirtualService", meta, true)
        {
            let (vs, spec_indices) = virtual_service(&mut cx, key, &item.object.spec, opts);
            if !cx.failed() {
                let rules = &snapshot.destination_rules;
                check_destinations(&mut cx, &vs, &spec_indices, &known_hosts, rules);
                virtual_services.push(Arc::new(vs));
            }
        }
    }
    snapshot.virtual_services = virtual_services;

    (snapshot, problems)
}

// ---------------------------------------------------------------------------
// Kubernetes objects
// ---------------------------------------------------------------------------

/// Builds workloads, fills `pods_by_ip`, and returns the workloads by pod key.
fn build_pods<'o>(
    objects: &'o Objects,
    nodes: &HashMap<String, &Node>,
    namespaces: &HashMap<String, Labels>,
    seen: &mut Seen<'o>,
    problems: &mut Problems,
    pods_by_ip: &mut HashMap<IpAddr, Arc<Workload>>,
) -> HashMap<ObjectKey, Arc<Workload>> {
    let mut pods = HashMap::new();
    let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
    for item in &objects.pods {
        let pod: &Pod = &item.object;
        let Some((mut cx, key)) = seen.open(problems, &item.origin, "Pod", &pod.metadata, true)
        else {
            continue;
        };
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let status = pod.status.as_ref();
        let mut ips = Vec::new();
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .filter(|ip| !ip.is_empty())
        {
            ips.extend(cx.ip(ip, "status.podIP"));
        }
        for (i, pod_ip) in status
            .and_then(|s| s.pod_ips.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(ip) = cx.ip(&pod_ip.ip, &format!("status.podIPs[{i}].ip"))
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
        // A Pod with a bad IP is left out, after its other IPs are checked too.
        let invalid = cx.failed();
        let spec = pod.spec.as_ref();
        let node_name = spec.and_then(|s| s.node_name.clone());
        let node_labels = node_name
            .as_ref()
            .and_then(|n| nodes.get(n))
            .and_then(|n| n.metadata.labels.as_ref());
        let namespace_enabled = namespaces
            .get(&key.namespace)
            .and_then(|l| l.get(REDIRECT_LABEL))
            .is_some_and(|v| v == "enabled");
        let pod_disabled = labels.get(REDIRECT_LABEL).is_some_and(|v| v == "disabled");
        let workload = Arc::new(Workload {
            pod_name: key.name.clone(),
            namespace: key.namespace.clone(),
            workload_name: workload_name(
                &key.name,
                &labels,
                pod.metadata.owner_references.as_deref().unwrap_or_default(),
            ),
            locality: workload_locality(&labels, node_labels, None),
            labels,
            ips,
            node_name,
            redirect_enabled: namespace_enabled && !pod_disabled,
            uid: pod.metadata.uid.clone().filter(|u| !u.is_empty()),
            netns: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(NETNS_ANNOTATION))
                .filter(|p| !p.is_empty())
                .map(std::path::PathBuf::from),
        });

        // Host-network pods share the node's IP and finished pods may have
        // handed their IP to a new pod: neither identifies a client.
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if !host_network && !finished {
            for ip in &workload.ips {
                if let Some(other) = ip_owner.get(ip) {
                    cx.error(
                        "status.podIP",
                        Invalid::PodIpInUse {
                            ip: *ip,
                            other: other.clone(),
                        },
                    );
                } else if !invalid {
                    ip_owner.insert(*ip, cx.name.clone());
                    pods_by_ip.insert(*ip, workload.clone());
                }
            }
        }
        if !invalid {
            pods.insert(key, workload);
        }
    }
    pods
}

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

fn build_services<'o>(
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
            });
        }
        if cx.failed() {
            continue;
        }

        let fqdn = format!("{}.{}.svc.{}", key.name, key.namespace, opts.cluster_domain);
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

/// Istio's workload name for a pod: the Deployment behind a ReplicaSet, the
/// CronJob behind a Job, else the controller's name, else the pod's name.
pub fn workload_name(pod_name: &str, labels: &Labels, owners: &[OwnerReference]) -> String {
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())
    else {
        return pod_name.to_string();
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            if let Some(hash) = labels.get("pod-template-hash")
                && let Some(deployment) = owner
                    .name
                    .strip_suffix(hash.as_str())
                    .and_then(|n| n.strip_suffix('-'))
                && !deployment.is_empty()
            {
                return deployment.to_string();
            }
        }
        "Job" => {
            // CronJobs name their Jobs `<cronjob>-<scheduled time in minutes>`.
            if let Some((cron_job, suffix)) = owner.name.rsplit_once('-')
                && (8..=10).contains(&suffix.len())
                && suffix.bytes().all(|b| b.is_ascii_digit())
                && !cron_job.is_empty()
            {
                return cron_job.to_string();
            }
        }
        _ => {}
    }
    owner.name.clone()
}

/// Locality of a pod or endpoint: the pod's `istio-locality` label wins; else
/// the region and subzone of its Node and the zone from the EndpointSlice or
/// the Node.
fn workload_locality(
    pod_labels: &Labels,
    node_labels: Option<&Labels>,
    slice_zone: Option<&str>,
) -> Locality {
    if let Some(label) = pod_labels.get(ISTIO_LOCALITY_LABEL) {
        let mut parts = label
            .splitn(3, '.')
            .map(|p| Some(p.to_string()).filter(|p| !p.is_empty()));
        return Locality {
            region: parts.next().flatten(),
            zone: parts.next().flatten(),
            subzone: parts.next().flatten(),
        };
    }
    let node = node_labels.map(node_locality).unwrap_or_default();
    Locality {
        zone: slice_zone.map(str::to_string).or(node.zone),
        ..node
    }
}

fn node_locality(labels: &Labels) -> Locality {
    let first_of = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
    Locality {
        region: first_of(&REGION_LABELS),
        zone: first_of(&ZONE_LABELS),
        subzone: first_of(&[SUBZONE_LABEL]),
    }
}

// ---------------------------------------------------------------------------
// Istio objects
// ---------------------------------------------------------------------------

/// Expands a short host name to an FQDN in `namespace`, exactly like Istio's
/// `ResolveShortnameToFQDN`: names with a dot, `*` and IP addresses are kept.
pub fn resolve_short_name(host: &str, namespace: &str, cluster_domain: &str) -> String {
    if host.is_empty() || host == "*" || host.contains('.') || host.parse::<IpAddr>().is_ok() {
        return host.to_string();
    }
    format!("{host}.{namespace}.svc.{cluster_domain}")
}

/// Whether a (possibly wildcard) config host covers a concrete host.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

fn destination_rule(
    cx: &mut Cx<'_>,
    key: ObjectKey,
    spec: &istio::DestinationRuleSpec,
    opts: &LoadOptions,
) -> DestinationRule {
    let host = spec.host.clone().unwrap_or_default();
    if host.is_empty() {
        cx.error("spec.host", Invalid::Required);
    }
    let top_policy = spec
        .traffic_policy
        .as_ref()
        .map(|tp| traffic_policy(cx, tp, "spec.trafficPolicy"));
    let mut names = HashSet::new();
    let mut subsets = Vec::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        let name = subset.name.clone().unwrap_or_default();
        if name.is_empty() {
            cx.error(&format!("{path}.name"), Invalid::Required);
        } else if !names.insert(name.clone()) {
            cx.error(
                &format!("{path}.name"),
                Invalid::DuplicateSubset(name.clone()),
            );
        }
        let traffic_policy = subset
            .traffic_policy
            .as_ref()
            .map(|tp| traffic_policy(cx, tp, &format!("{path}.trafficPolicy")));
        subsets.push(Subset {
            name,
            labels: subset.labels.clone(),
            traffic_policy,
        });
    }
    DestinationRule {
        host_fqdn: resolve_short_name(&host, &key.namespace, &opts.cluster_domain),
        host,
        key,
        export_to: spec.export_to.clone(),
        workload_selector: spec
            .workload_selector
            .as_ref()
            .map(|s| s.match_labels.clone()),
        traffic_policy: top_policy,
        subsets,
    }
}

fn traffic_policy(cx: &mut Cx<'_>, tp: &istio::TrafficPolicy, path: &str) -> TrafficPolicy {
    let mut port_level_settings: Vec<(u16, TrafficPolicy)> = Vec::new();
    for (i, settings) in tp.port_level_settings.iter().enumerate() {
        let path = format!("{path}.portLevelSettings[{i}]");
        let port = match settings.port.as_ref().and_then(|p| p.number) {
            None => {
                cx.error(&format!("{path}.port.number"), Invalid::Required);
                None
            }
            number => cx.port(number, &format!("{path}.port.number")),
        };
        let policy = TrafficPolicy {
            connection_pool: settings
                .connection_pool
                .as_ref()
                .map(|cp| connection_pool(cx, cp, &path)),
            outlier_detection: settings
                .outlier_detection
                .as_ref()
                .map(|od| outlier_detection(cx, od, &path)),
            load_balancer: settings
                .load_balancer
                .as_ref()
                .map(|lb| load_balancer(cx, lb, &path)),
            port_level_settings: Vec::new(),
        };
        let Some(port) = port else { continue };
        if port_level_settings.iter().any(|(p, _)| *p == port) {
            cx.error(
                &format!("{path}.port.number"),
                Invalid::DuplicatePortSettings(port),
            );
            continue;
        }
        port_level_settings.push((port, policy));
    }
    TrafficPolicy {
        connection_pool: tp
            .connection_pool
            .as_ref()
            .map(|cp| connection_pool(cx, cp, path)),
        outlier_detection: tp
            .outlier_detection
            .as_ref()
            .map(|od| outlier_detection(cx, od, path)),
        load_balancer: tp
            .load_balancer
            .as_ref()
            .map(|lb| load_balancer(cx, lb, path)),
        port_level_settings,
    }
}

/// `parent` is the path of the traffic policy holding `connectionPool`.
fn connection_pool(
    cx: &mut Cx<'_>,
    cp: &istio::ConnectionPoolSettings,
    parent: &str,
) -> ConnectionPool {
    let tcp = cp.tcp.as_ref().map(|tcp| {
        let path = format!("{parent}.connectionPool.tcp");
        let field = |name: &str| format!("{path}.{name}");
        TcpSettings {
            max_connections: cx.non_negative_int32(tcp.max_connections, &field("maxConnections")),
            connect_timeout: cx.duration(
                tcp.connect_timeout.as_deref(),
                &field("connectTimeout"),
                Minimum::OneMillisecond,
            ),
            tcp_keepalive: tcp.tcp_keepalive.as_ref().map(|ka| TcpKeepalive {
                probes: cx.uint32(ka.probes, &field("tcpKeepalive.probes")),
                time: cx.duration(
                    ka.time.as_deref(),
                    &field("tcpKeepalive.time"),
                    Minimum::Zero,
                ),
                interval: cx.duration(
                    ka.interval.as_deref(),
                    &field("tcpKeepalive.interval"),
                    Minimum::Zero,
                ),
            }),
            max_connection_duration: cx.duration(
                tcp.max_connection_duration.as_deref(),
                &field("maxConnectionDuration"),
                Minimum::Zero,
            ),
            idle_timeout: cx.duration(
                tcp.idle_timeout.as_deref(),
                &field("idleTimeout"),
                Minimum::Zero,
            ),
        }
    });
    let http = cp.http.as_ref().map(|http| {
        let path = format!("{parent}.connectionPool.http");
        let field = |name: &str| format!("{path}.{name}");
        HttpSettings {
            http1_max_pending_requests: cx.non_negative_int32(
                http.http1_max_pending_requests,
                &field("http1MaxPendingRequests"),
            ),
            http2_max_requests: cx
                .non_negative_int32(http.http2_max_requests, &field("http2MaxRequests")),
            max_requests_per_connection: cx.non_negative_int32(
                http.max_requests_per_connection,
                &field("maxRequestsPerConnection"),
            ),
            max_retries: cx.non_negative_int32(http.max_retries, &field("maxRetries")),
            idle_timeout: cx.duration(
                http.idle_timeout.as_deref(),
                &field("idleTimeout"),
                Minimum::Zero,
            ),
            max_concurrent_streams: cx
                .non_negative_int32(http.max_concurrent_streams, &field("maxConcurrentStreams")),
            h2_upgrade_policy: http
                .h2_upgrade_policy
                .as_deref()
                .and_then(|policy| {
                    cx.enum_value(
                        policy,
                        &field("h2UpgradePolicy"),
                        &[
                            ("DEFAULT", H2UpgradePolicy::Default),
                            ("DO_NOT_UPGRADE", H2UpgradePolicy::DoNotUpgrade),
                            ("UPGRADE", H2UpgradePolicy::Upgrade),
                        ],
                    )
                })
                .unwrap_or_default(),
        }
    });
    ConnectionPool { tcp, http }
}

fn outlier_detection(
    cx: &mut Cx<'_>,
    od: &istio::OutlierDetection,
    parent: &str,
) -> OutlierDetection {
    let path = format!("{parent}.outlierDetection");
    let field = |name: &str| format!("{path}.{name}");
    let mut consecutive_5xx_errors = None;
    let mut consecutive_gateway_errors = None;
    // Istio maps the deprecated field to gateway errors and turns 5xx ejection
    // off; the explicit fields below still override both.
    if let Some(errors) = cx.non_negative_int32(od.consecutive_errors, &field("consecutiveErrors"))
    {
        cx.warn(
            &field("consecutiveErrors"),
            Note::DeprecatedConsecutiveErrors,
        );
        if errors > 0 {
            consecutive_gateway_errors = Some(errors);
            consecutive_5xx_errors = Some(0);
        }
    }
    if let Some(v) = cx.uint32(od.consecutive_5xx_errors, &field("consecutive5xxErrors")) {
        consecutive_5xx_errors = Some(v);
    }
    if let Some(v) = cx.uint32(
        od.consecutive_gateway_errors,
        &field("consecutiveGatewayErrors"),
    ) {
        consecutive_gateway_errors = Some(v);
    }
    OutlierDetection {
        consecutive_5xx_errors,
        consecutive_gateway_errors,
        consecutive_local_origin_failures: cx.uint32(
            od.consecutive_local_origin_failures,
            &field("consecutiveLocalOriginFailures"),
        ),
        split_external_local_origin_errors: od.split_external_local_origin_errors.unwrap_or(false),
        interval: cx.duration(
            od.interval.as_deref(),
            &field("interval"),
            Minimum::OneMillisecond,
        ),
        base_ejection_time: cx.duration(
            od.base_ejection_time.as_deref(),
            &field("baseEjectionTime"),
            Minimum::OneMillisecond,
        ),
        max_ejection_percent: cx.percent(od.max_ejection_percent, &field("maxEjectionPercent")),
        min_health_percent: cx.percent(od.min_health_percent, &field("minHealthPercent")),
    }
}

fn load_balancer(cx: &mut Cx<'_>, lb: &istio::LoadBalancerSettings, parent: &str) -> LoadBalancer {
    let path = format!("{parent}.loadBalancer");
    let simple = lb.simple.as_deref().and_then(|simple| {
        cx.enum_value(
            simple,
            &format!("{path}.simple"),
            &[
                ("UNSPECIFIED", None),
                ("LEAST_REQUEST", Some(SimpleLb::LeastRequest)),
                ("LEAST_CONN", Some(SimpleLb::LeastRequest)),
                ("ROUND_ROBIN", Some(SimpleLb::RoundRobin)),
                ("RANDOM", Some(SimpleLb::Random)),
                ("PASSTHROUGH", Some(SimpleLb::Passthrough)),
            ],
        )
    });
    let consistent_hash = lb
        .consistent_hash
        .as_ref()
        .and_then(|ch| consistent_hash(cx, ch, &path));
    let policy = match (simple, consistent_hash) {
        (Some(_), Some(_)) => {
            cx.error(&path, Invalid::SimpleAndConsistentHash);
            None
        }
        (Some(simple), None) => simple.map(LbPolicy::Simple),
        (None, hash) => hash,
    };
    LoadBalancer {
        policy,
        locality_lb_setting: lb
            .locality_lb_setting
            .as_ref()
            .map(|setting| locality_lb_setting(cx, setting, &format!("{path}.localityLbSetting"))),
    }
}

fn consistent_hash(cx: &mut Cx<'_>, ch: &istio::ConsistentHash, parent: &str) -> Option<LbPolicy> {
    let path = format!("{parent}.consistentHash");
    let mut keys = Vec::new();
    if let Some(header) = &ch.http_header_name {
        keys.push(ConsistentHashKey::HttpHeaderName(header.clone()));
    }
    if let Some(cookie) = &ch.http_cookie {
        let cookie_path = format!("{path}.httpCookie");
        let name = cookie.name.clone().unwrap_or_default();
        if name.is_empty() {
            cx.error(&format!("{cookie_path}.name"), Invalid::Required);
        }
        let ttl = cx.duration(
            cookie.ttl.as_deref(),
            &format!("{cookie_path}.ttl"),
            Minimum::Zero,
        );
        keys.push(ConsistentHashKey::HttpCookie {
            name,
            path: cookie.path.clone(),
            ttl,
        });
    }
    if ch.use_source_ip == Some(true) {
        keys.push(ConsistentHashKey::UseSourceIp);
    }
    if let Some(param) = &ch.http_query_parameter_name {
        keys.push(ConsistentHashKey::HttpQueryParameterName(param.clone()));
    }
    let ring_size = match ch.ring_hash.as_ref().and_then(|r| r.minimum_ring_size) {
        Some(size) => cx.int_in(
            Some(size),
            &format!("{path}.ringHash.minimumRingSize"),
            0,
            i64::MAX,
        ),
        None => cx.int_in(
            ch.minimum_ring_size,
            &format!("{path}.minimumRingSize"),
            0,
            i64::MAX,
        ),
    };
    if keys.len() != 1 {
        cx.error(&path, Invalid::HashKeyOneOf);
        return None;
    }
    Some(LbPolicy::ConsistentHash {
        key: keys.remove(0),
        minimum_ring_size: ring_size.map(|s| s as u64),
    })
}

fn locality_lb_setting(
    cx: &mut Cx<'_>,
    setting: &istio::LocalityLbSetting,
    path: &str,
) -> LocalityLbSetting {
    if !setting.distribute.is_empty() && !setting.failover.is_empty() {
        cx.error(path, Invalid::DistributeAndFailover);
    }
    let mut distribute = Vec::new();
    for (i, rule) in setting.distribute.iter().enumerate() {
        let rule_path = format!("{path}.distribute[{i}]");
        let from = rule.from.clone().unwrap_or_default();
        if from.is_empty() {
            cx.error(&format!("{rule_path}.from"), Invalid::Required);
        }
        let mut to = Vec::new();
        let mut total = 0i64;
        for (locality, weight) in &rule.to {
            if let Some(weight) = cx.uint32(Some(*weight), &format!("{rule_path}.to.{locality}")) {
                total += i64::from(weight);
                to.push((locality.clone(), weight));
            }
        }
        if total != 100 {
            cx.error(&format!("{rule_path}.to"), Invalid::DistributeTotal(total));
        }
        distribute.push((from, to));
    }
    let mut failover = Vec::new();
    for (i, rule) in setting.failover.iter().enumerate() {
        let rule_path = format!("{path}.failover[{i}]");
        let mut region = |value: &Option<String>, name: &str| {
            let value = value.clone().unwrap_or_default();
            let field = format!("{rule_path}.{name}");
            if value.is_empty() {
                cx.error(&field, Invalid::Required);
            } else if value.contains('/') {
                cx.error(&field, Invalid::FailoverNotRegion(value.clone()));
            }
            value
        };
        let (from, to) = (region(&rule.from, "from"), region(&rule.to, "to"));
        if !from.is_empty() && from == to {
            cx.error(&rule_path, Invalid::FailoverSameRegion);
        }
        failover.push((from, to));
    }
    LocalityLbSetting {
        enabled: setting.enabled,
        distribute,
        failover,
        failover_priority: setting.failover_priority.clone(),
    }
}

/// Also returns, for each converted HTTP route, its index in `spec.http`
/// (unsupported routes are skipped).
fn virtual_service(
    cx: &mut Cx<'_>,
    key: ObjectKey,
    spec: &istio::VirtualServiceSpec,
    opts: &LoadOptions,
) -> (VirtualService, Vec<usize>) {
    if spec.hosts.is_empty() {
        cx.error("spec.hosts", Invalid::NoHosts);
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        if host.is_empty() {
            cx.error(&format!("spec.hosts[{i}]"), Invalid::Empty);
        }
    }
    if !spec.tcp.is_empty() {
        cx.warn("spec.tcp", Note::UnsupportedRoutes("tcp"));
    }
    if !spec.tls.is_empty() {
        cx.warn("spec.tls", Note::UnsupportedRoutes("tls"));
    }
    let mut http = Vec::new();
    let mut spec_indices = Vec::new();
    for (i, route) in spec.http.iter().enumerate() {
        if let Some(route) = http_route(cx, route, &format!("spec.http[{i}]"), &key.namespace, opts)
        {
            http.push(route);
            spec_indices.push(i);
        }
    }
    let expand = |host: &String| resolve_short_name(host, &key.namespace, &opts.cluster_domain);
    let vs = VirtualService {
        hosts_fqdn: spec.hosts.iter().map(expand).collect(),
        hosts: spec.hosts.clone(),
        gateways: spec.gateways.clone(),
        export_to: spec.export_to.clone(),
        http,
        key,
    };
    (vs, spec_indices)
}

fn http_route(
    cx: &mut Cx<'_>,
    route: &istio::HttpRoute,
    path: &str,
    namespace: &str,
    opts: &LoadOptions,
) -> Option<HttpRoute> {
    let field = |name: &str| format!("{path}.{name}");
    let matches = route
        .matches
        .iter()
        .enumerate()
        .map(|(k, m)| http_match(cx, m, &field(&format!("match[{k}]"))))
        .collect();

    // Alternatives to `route` (a oneof in Istio) that Nodeway does not implement.
    let action = [
        (route.redirect.is_some(), "redirect"),
        (route.direct_response.is_some(), "directResponse"),
        (route.delegate.is_some(), "delegate"),
    ]
    .into_iter()
    .find_map(|(set, name)| set.then_some(name));
    match (route.route.is_empty(), action) {
        (true, Some(action)) => {
            cx.warn(&field(action), Note::UnsupportedRouteAction(action));
            return None;
        }
        (true, None) => {
            cx.error(&field("route"), Invalid::NoDestinations);
            return None;
        }
        (false, Some(action)) => cx.error(&field(action), Invalid::RouteAndAction(action)),
        (false, None) => {}
    }

    let mut destinations = Vec::new();
    let mut total_weight = 0i64;
    for (j, dest) in route.route.iter().enumerate() {
        let dest_path = field(&format!("route[{j}]"));
        let weight = cx.int_in(
            dest.weight,
            &format!("{dest_path}.weight"),
            0,
            i32::MAX.into(),
        );
        total_weight += weight.unwrap_or(0);
        let Some(destination) = &dest.destination else {
            cx.error(&format!("{dest_path}.destination"), Invalid::Required);
            continue;
        };
        let host = destination.host.clone().unwrap_or_default();
        if host.is_empty() {
            cx.error(&format!("{dest_path}.destination.host"), Invalid::Required);
        }
        let port = match &destination.port {
            None => None,
            Some(port) if port.number.is_none() => {
                cx.error(
                    &format!("{dest_path}.destination.port.number"),
                    Invalid::Required,
                );
                None
            }
            Some(port) => cx.port(port.number, &format!("{dest_path}.destination.port.number")),
        };
        destinations.push(RouteDestination {
            host_fqdn: resolve_short_name(&host, namespace, &opts.cluster_domain),
            host,
            subset: destination.subset.clone().filter(|s| !s.is_empty()),
            port,
            weight: weight.unwrap_or(0) as u32,
        });
    }
    if let [single] = destinations.as_mut_slice() {
        // Istio sends everything to a lone destination, whatever its weight.
        single.weight = 100;
    } else if route.route.len() > 1 && total_weight == 0 {
        cx.error(&field("route"), Invalid::ZeroTotalWeight);
    }

    // Istio: a zero route timeout means "no timeout".
    let timeout = match route.timeout.as_deref() {
        Some(t) if parse_duration(t) == Ok(Duration::ZERO) => None,
        t => cx.duration(t, &field("timeout"), Minimum::OneMillisecond),
    };
    let retries = route.retries.as_ref().map(|retries| {
        let retry_on = match retries.retry_on.as_deref().map(str::trim) {
            None | Some("") => Some(RetryOn::istio_default()),
            Some(conditions) => RetryOn::from_str(conditions)
                .map_err(|err| cx.error(&field("retries.retryOn"), Invalid::RetryOn(err)))
                .ok(),
        };
        RetryPolicy {
            attempts: cx
                .non_negative_int32(retries.attempts, &field("retries.attempts"))
                .unwrap_or(0),
            per_try_timeout: cx.duration(
                retries.per_try_timeout.as_deref(),
                &field("retries.perTryTimeout"),
                Minimum::OneMillisecond,
            ),
            retry_on: retry_on.unwrap_or_default(),
            retry_remote_localities: retries.retry_remote_localities.unwrap_or(false),
        }
    });

    Some(HttpRoute {
        name: route.name.clone(),
        matches,
        route: destinations,
        timeout,
        retries,
    })
}

fn http_match(cx: &mut Cx<'_>, m: &istio::HttpMatchRequest, path: &str) -> HttpMatch {
    let field = |name: &str| format!("{path}.{name}");
    let mut single = |value: &Option<istio::StringMatch>, name: &str| {
        value
            .as_ref()
            .and_then(|sm| string_match(cx, sm, &field(name), false))
    };
    let uri = single(&m.uri, "uri");
    let method = single(&m.method, "method");
    let authority = single(&m.authority, "authority");
    let mut map = |values: &std::collections::BTreeMap<String, istio::StringMatch>,
                   name: &str,
                   lower: bool| {
        values
            .iter()
            .filter_map(|(key, sm)| {
                let matcher = string_match(cx, sm, &field(&format!("{name}.{key}")), true)?;
                Some((
                    if lower {
                        key.to_ascii_lowercase()
                    } else {
                        key.clone()
                    },
                    matcher,
                ))
            })
            .collect::<Vec<_>>()
    };
    let headers = map(&m.headers, "headers", true);
    let without_headers = map(&m.without_headers, "withoutHeaders", true);
    let query_params = map(&m.query_params, "queryParams", false);
    HttpMatch {
        name: m.name.clone(),
        uri,
        method,
        authority,
        headers,
        without_headers,
        query_params,
        port: m.port.and_then(|port| cx.port(Some(port), &field("port"))),
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
    }
}

/// `presence_if_empty`: for headers and query parameters, Istio reads `{}` as
/// "present with any value".
fn string_match(
    cx: &mut Cx<'_>,
    sm: &istio::StringMatch,
    path: &str,
    presence_if_empty: bool,
) -> Option<StringMatch> {
    match (&sm.exact, &sm.prefix, &sm.regex) {
        (Some(exact), None, None) => Some(StringMatch::Exact(exact.clone())),
        (None, Some(prefix), None) => Some(StringMatch::Prefix(prefix.clone())),
        (None, None, Some(regex)) => full_match_regex(regex)
            .map_err(|err| cx.error(&format!("{path}.regex"), Invalid::Regex(err)))
            .ok()
            .map(StringMatch::Regex),
        (None, None, None) if presence_if_empty => {
            full_match_regex("(?s:.*)").ok().map(StringMatch::Regex)
        }
        _ => {
            cx.error(path, Invalid::StringMatchOneOf);
            None
        }
    }
}

/// Istio regexes are RE2 and must match the whole value.
fn full_match_regex(regex: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{regex})$")).map_err(|err| match err {
        // The syntax error message spans several lines with a caret; keep one line.
        regex::Error::Syntax(text) => text.lines().last().unwrap_or_default().trim().to_string(),
        other => other.to_string(),
    })
}

/// Cross-reference warnings: Istio accepts these, but they are often typos.
/// Only called for valid VirtualServices, where every `route[j]` was converted.
fn check_destinations(
    cx: &mut Cx<'_>,
    vs: &VirtualService,
    spec_indices: &[usize],
    known_hosts: &HashSet<&str>,
    rules: &[Arc<DestinationRule>],
) {
    for (route, i) in vs.http.iter().zip(spec_indices) {
        for (j, dest) in route.route.iter().enumerate() {
            let path = format!("spec.http[{i}].route[{j}].destination");
            if !dest.host_fqdn.contains('*') && !known_hosts.contains(dest.host_fqdn.as_str()) {
                cx.warn(
                    &format!("{path}.host"),
                    Note::UnknownHost(dest.host.clone()),
                );
            }
            if let Some(subset) = &dest.subset {
                let defined = rules
                    .iter()
                    .filter(|r| host_matches(&r.host_fqdn, &dest.host_fqdn))
                    .any(|r| r.subsets.iter().any(|s| &s.name == subset));
                if !defined {
                    let host = dest.host_fqdn.clone();
                    cx.warn(
                        &format!("{path}.subset"),
                        Note::UnknownSubset {
                            subset: subset.clone(),
                            host,
                        },
                    );
                }
            }
        }
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

    fn owner(kind: &str, name: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            controller: Some(controller),
            ..Default::default()
        }
    }

    #[test]
    fn workload_names_follow_istio() {
        let hash = Labels::from([("pod-template-hash".to_string(), "7cd856754".to_string())]);
        let none = Labels::new();
        let rs = [owner("ReplicaSet", "foo-7cd856754", true)];
        assert_eq!(workload_name("foo-7cd856754-x1", &hash, &rs), "foo");
        assert_eq!(
            workload_name("foo-7cd856754-x1", &none, &rs),
            "foo-7cd856754"
        );
        let other_hash = Labels::from([("pod-template-hash".to_string(), "abc".to_string())]);
        assert_eq!(workload_name("p", &other_hash, &rs), "foo-7cd856754");
        assert_eq!(
            workload_name("db-0", &none, &[owner("StatefulSet", "db", true)]),
            "db"
        );
        assert_eq!(
            workload_name("job-1", &none, &[owner("Job", "backup-28000000", true)]),
            "backup"
        );
        assert_eq!(
            workload_name("job-1", &none, &[owner("Job", "migrate-v2", true)]),
            "migrate-v2"
        );
        assert_eq!(workload_name("lonely", &none, &[]), "lonely");
        // The controller reference wins over other owners.
        let owners = [
            owner("Other", "x", false),
            owner("DaemonSet", "agent", true),
        ];
        assert_eq!(workload_name("agent-abcde", &none, &owners), "agent");
    }

    #[test]
    fn locality_prefers_the_istio_label() {
        let node = Labels::from([
            ("topology.kubernetes.io/region".to_string(), "r".to_string()),
            ("topology.kubernetes.io/zone".to_string(), "z".to_string()),
            ("topology.istio.io/subzone".to_string(), "s".to_string()),
        ]);
        let pod = Labels::from([(
            "istio-locality".to_string(),
            "us-east.us-east-1a".to_string(),
        )]);
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            workload_locality(&pod, Some(&node), Some("slice-zone")),
            Locality {
                region: some("us-east"),
                zone: some("us-east-1a"),
                subzone: None
            }
        );
        assert_eq!(
            workload_locality(&Labels::new(), Some(&node), Some("slice-zone")),
            Locality {
                region: some("r"),
                zone: some("slice-zone"),
                subzone: some("s")
            }
        );
        assert_eq!(
            workload_locality(&Labels::new(), Some(&node), None),
            Locality {
                region: some("r"),
                zone: some("z"),
                subzone: some("s")
            }
        );
        assert_eq!(
            workload_locality(&Labels::new(), None, None),
            Locality::default()
        );
    }

    #[test]
    fn regexes_match_the_whole_value() {
        let re = full_match_regex("/api/.*|/v[0-9]").unwrap();
        assert!(re.is_match("/api/x"));
        assert!(re.is_match("/v1"));
        assert!(!re.is_match("/v12"));
        assert!(!re.is_match("x/api/"));
        assert!(
            full_match_regex("(")
                .unwrap_err()
                .contains("unclosed group")
        );
    }
}
