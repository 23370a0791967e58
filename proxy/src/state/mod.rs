//! Resolved, validated view of the cluster that the data path reads.
//!
//! `config/` turns Kubernetes and Istio objects into one immutable [`Snapshot`];
//! the proxy swaps whole snapshots (no field-level mutation), so a request sees
//! one consistent generation from start to end.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

mod retry_on;
pub use retry_on::{InvalidRetryOn, RetryOn};

pub type Labels = BTreeMap<String, String>;

/// Namespace + name of a Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

/// Everything the data path needs, built from one configuration generation.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Cluster DNS suffix, `cluster.local` unless configured otherwise.
    pub cluster_domain: String,
    /// Namespace whose DestinationRules apply mesh-wide (Istio's root namespace).
    pub root_namespace: String,
    /// The Node this proxy runs on (`--node`), when the config has it.
    pub node: Option<NodeInfo>,
    pub namespaces: HashMap<String, Labels>,
    /// Services by namespace/name.
    pub services: HashMap<ObjectKey, Arc<Service>>,
    /// `clusterIP:port` → service and the index of the port in `Service::ports`.
    pub service_vips: HashMap<SocketAddr, (Arc<Service>, usize)>,
    /// Pods by every IP in `status.podIPs`; source identity of connections.
    pub pods_by_ip: HashMap<IpAddr, Arc<Workload>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    pub virtual_services: Vec<Arc<VirtualService>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: Option<String>,
    pub zone: Option<String>,
    pub subzone: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Labels,
    pub locality: Locality,
}

/// A client or server pod, named the way Istio names workloads.
#[derive(Debug, Clone)]
pub struct Workload {
    pub pod_name: String,
    pub namespace: String,
    /// Istio's workload name: the owning Deployment (ReplicaSet name minus the
    /// pod-template-hash), else the owner's name, else the pod name.
    pub workload_name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node_name: Option<String>,
    pub locality: Locality,
    /// From the Pod's namespace label `nodeway.io/redirect` and its own label.
    pub redirect_enabled: bool,
    /// `metadata.uid`: finds the pod's processes (and network namespace)
    /// when no annotation names it.
    pub uid: Option<String>,
    /// Network namespace file (annotation `nodeway.io/netns`, file mode).
    pub netns: Option<std::path::PathBuf>,
}

#[derive(Debug)]
pub struct Service {
    pub key: ObjectKey,
    /// `name.namespace.svc.<cluster_domain>`
    pub fqdn: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub labels: Labels,
}

/// How the proxy treats a service port; from `appProtocol` or the port name prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    /// Not declared: sniff the first bytes.
    Unknown,
}

#[derive(Debug)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: AppProtocol,
    /// Ready and not-ready endpoints of this port (targetPort already resolved).
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Istio's cluster name of this port without a subset
    /// (`outbound|PORT||FQDN`), made once instead of per request.
    pub cluster_name: Arc<str>,
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub ready: bool,
    /// From EndpointSlice `zone`/`nodeName`, the pod's `istio-locality` label, or its Node.
    pub locality: Locality,
    pub node_name: Option<String>,
    /// Pod behind the endpoint (EndpointSlice `targetRef`), for subsets and `destination_workload`.
    pub pod: Option<Arc<Workload>>,
}

impl Endpoint {
    /// Labels used by DestinationRule subsets (the target pod's labels).
    pub fn labels(&self) -> Option<&Labels> {
        self.pod.as_ref().map(|p| &p.labels)
    }
}

// ---------------------------------------------------------------------------
// Istio networking (validated; durations parsed, regexes compiled)
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct DestinationRule {
    pub key: ObjectKey,
    /// `host` as written (short name, FQDN or wildcard such as `*.cluster.local`).
    pub host: String,
    /// The host expanded to an FQDN in the rule's namespace (wildcards kept).
    pub host_fqdn: String,
    pub export_to: Vec<String>,
    /// `workloadSelector.matchLabels`, if set.
    pub workload_selector: Option<Labels>,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
}

#[derive(Debug)]
pub struct Subset {
    pub name: String,
    pub labels: Labels,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, Default)]
pub struct TrafficPolicy {
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub load_balancer: Option<LoadBalancer>,
    /// `portLevelSettings`: port number → policy for that port.
    pub port_level_settings: Vec<(u16, TrafficPolicy)>,
}

#[derive(Debug, Clone, Default)]
pub struct ConnectionPool {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, Default)]
pub struct TcpSettings {
    pub max_connections: Option<u32>,
    /// Istio default 10s when unset.
    pub connect_timeout: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<Duration>,
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum H2UpgradePolicy {
    #[default]
    Default,
    DoNotUpgrade,
    Upgrade,
}

#[derive(Debug, Clone, Default)]
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub idle_timeout: Option<Duration>,
    pub max_concurrent_streams: Option<u32>,
    pub h2_upgrade_policy: H2UpgradePolicy,
}

#[derive(Debug, Clone, Default)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub split_external_local_origin_errors: bool,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    pub min_health_percent: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimpleLb {
    LeastRequest,
    RoundRobin,
    Random,
    Passthrough,
}

#[derive(Debug, Clone)]
pub enum ConsistentHashKey {
    HttpHeaderName(String),
    HttpCookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    UseSourceIp,
    HttpQueryParameterName(String),
}

#[derive(Debug, Clone)]
pub enum LbPolicy {
    Simple(SimpleLb),
    ConsistentHash {
        key: ConsistentHashKey,
        minimum_ring_size: Option<u64>,
    },
}

#[derive(Debug, Clone, Default)]
pub struct LoadBalancer {
    pub policy: Option<LbPolicy>,
    pub locality_lb_setting: Option<LocalityLbSetting>,
}

#[derive(Debug, Clone, Default)]
pub struct LocalityLbSetting {
    /// `None` means unset (Istio treats unset as enabled when outlier detection is on).
    pub enabled: Option<bool>,
    /// `from` locality pattern → (`to` locality pattern → weight).
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
    pub failover: Vec<(String, String)>,
    pub failover_priority: Vec<String>,
}

#[derive(Debug)]
pub struct VirtualService {
    pub key: ObjectKey,
    /// Hosts as written.
    pub hosts: Vec<String>,
    /// Hosts expanded to FQDNs in the VirtualService's namespace.
    pub hosts_fqdn: Vec<String>,
    pub gateways: Vec<String>,
    pub export_to: Vec<String>,
    pub http: Vec<HttpRoute>,
}

#[derive(Debug)]
pub struct HttpRoute {
    /// `name` of the route, used as the access log's `route_name`.
    pub name: Option<String>,
    /// Empty means "match everything".
    pub matches: Vec<HttpMatch>,
    pub route: Vec<RouteDestination>,
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
}

#[derive(Debug)]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Header names lower-cased.
    pub headers: Vec<(String, StringMatch)>,
    pub without_headers: Vec<(String, StringMatch)>,
    pub query_params: Vec<(String, StringMatch)>,
    pub port: Option<u16>,
    pub source_labels: Option<Labels>,
    pub source_namespace: Option<String>,
    pub ignore_uri_case: bool,
}

#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// RE2-style full match (anchored).
    Regex(regex::Regex),
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Debug)]
pub struct RouteDestination {
    pub host: String,
    /// `host` expanded to an FQDN in the VirtualService's namespace.
    pub host_fqdn: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    /// Istio: unset weight on a single destination means 100.
    pub weight: u32,
}

/// `retries` of an HTTP route.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    pub retry_remote_localities: bool,
}
