//! Istio `networking.istio.io` objects as written by users (camelCase YAML/JSON).
//!
//! These structs only capture shape; values stay raw (durations as strings,
//! enums as strings, integers as `i64`) so that `config::resolve` can validate
//! every field and report all problems of a document at once instead of
//! stopping at the first one serde meets. Fields Nodeway does not implement
//! are left out on purpose: [`deserialize_spec`] reports them as warnings.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::IgnoredAny;

/// API versions under which Istio serves the same networking schema.
pub const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

#[derive(Debug, Clone, Default)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    pub spec: DestinationRuleSpec,
}

#[derive(Debug, Clone, Default)]
pub struct VirtualService {
    pub metadata: ObjectMeta,
    pub spec: VirtualServiceSpec,
}

/// A spec field that failed to deserialize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// Path inside the spec, e.g. `http[0].retries.attempts`.
    pub path: String,
    pub message: String,
}

/// Deserializes an Istio spec, returning it with the paths (inside the spec)
/// of every field that was not understood and therefore ignored.
///
/// Works with any self-describing deserializer, so the Kubernetes-API mode
/// can feed it a `serde_json::Value` taken from a dynamic object.
pub fn deserialize_spec<'de, T, D>(deserializer: D) -> Result<(T, Vec<String>), SpecError>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    let mut ignored = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| ignored.push(ignored_path(&path));
    let tracked = serde_ignored::Deserializer::new(deserializer, &mut record);
    let spec = serde_path_to_error::deserialize(tracked).map_err(|err| SpecError {
        path: err.path().to_string(),
        message: err.into_inner().to_string(),
    })?;
    Ok((spec, ignored))
}

/// Formats a serde_ignored path like serde_path_to_error does (`a.b[0].c`).
fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => {
            let parent = ignored_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

// ---------------------------------------------------------------------------
// VirtualService
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    /// Declared so that they get a dedicated "not supported yet" warning.
    pub tcp: Vec<serde_json::Value>,
    pub tls: Vec<serde_json::Value>,
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    pub route: Vec<HttpRouteDestination>,
    /// Alternatives to `route` that Nodeway does not implement; declared so a
    /// route using them is reported as such rather than as "route is empty".
    pub redirect: Option<serde_json::Value>,
    pub direct_response: Option<serde_json::Value>,
    pub delegate: Option<serde_json::Value>,
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: BTreeMap<String, StringMatch>,
    pub without_headers: BTreeMap<String, StringMatch>,
    pub query_params: BTreeMap<String, StringMatch>,
    pub port: Option<i64>,
    pub source_labels: Option<BTreeMap<String, String>>,
    pub source_namespace: Option<String>,
    pub ignore_uri_case: Option<bool>,
}

/// Istio's `StringMatch` oneof; validation checks that exactly one is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HttpRouteDestination {
    pub destination: Option<Destination>,
    pub weight: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Destination {
    pub host: Option<String>,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PortSelector {
    pub number: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRetry {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
}

// ---------------------------------------------------------------------------
// DestinationRule
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: Option<String>,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    pub export_to: Vec<String>,
    pub workload_selector: Option<WorkloadSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WorkloadSelector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Subset {
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub port_level_settings: Vec<PortTrafficPolicy>,
    // Istio fields Nodeway does not implement. Only their presence is kept
    // (for "must have at least one field"); they are still reported as
    // ignored, since `IgnoredAny` goes through serde_ignored's callback.
    pub tls: Option<IgnoredAny>,
    pub tunnel: Option<IgnoredAny>,
    pub proxy_protocol: Option<IgnoredAny>,
    pub retry_budget: Option<IgnoredAny>,
}

impl TrafficPolicy {
    /// Istio refuses a traffic policy with no field set.
    pub fn is_empty(&self) -> bool {
        self.load_balancer.is_none()
            && self.connection_pool.is_none()
            && self.outlier_detection.is_none()
            && self.port_level_settings.is_empty()
            && self.tls.is_none()
            && self.tunnel.is_none()
            && self.proxy_protocol.is_none()
            && self.retry_budget.is_none()
    }
}

/// `portLevelSettings[i]`: a traffic policy for one port (cannot nest further).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    /// Not implemented; kept for presence like [`TrafficPolicy::tls`].
    pub tls: Option<IgnoredAny>,
}

impl PortTrafficPolicy {
    pub fn is_empty(&self) -> bool {
        self.load_balancer.is_none()
            && self.connection_pool.is_none()
            && self.outlier_detection.is_none()
            && self.tls.is_none()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ConnectionPoolSettings {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TcpSettings {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<String>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<String>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TcpKeepalive {
    pub probes: Option<i64>,
    pub time: Option<String>,
    pub interval: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpSettings {
    #[serde(rename = "http1MaxPendingRequests")]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(rename = "http2MaxRequests")]
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub idle_timeout: Option<String>,
    #[serde(rename = "h2UpgradePolicy")]
    pub h2_upgrade_policy: Option<String>,
    pub max_concurrent_streams: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Deprecated by Istio; means consecutive gateway errors.
    pub consecutive_errors: Option<i64>,
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub consecutive_local_origin_failures: Option<i64>,
    pub split_external_local_origin_errors: Option<bool>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
    pub min_health_percent: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHash>,
    pub locality_lb_setting: Option<LocalityLbSetting>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ConsistentHash {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Option<RingHash>,
    /// Deprecated in favour of `ringHash.minimumRingSize`.
    pub minimum_ring_size: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HttpCookie {
    pub name: Option<String>,
    pub path: Option<String>,
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RingHash {
    pub minimum_ring_size: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LocalityLbSetting {
    pub enabled: Option<bool>,
    pub distribute: Vec<LocalityDistribute>,
    pub failover: Vec<LocalityFailover>,
    pub failover_priority: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LocalityDistribute {
    pub from: Option<String>,
    pub to: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LocalityFailover {
    pub from: Option<String>,
    pub to: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_reported_with_their_path() {
        let value: serde_json::Value = serde_json::json!({
            "hosts": ["a"],
            "http": [{"route": [], "fault": {"abort": {}}, "mirror": {"host": "m"}}],
            "tcp": [{"route": []}],
        });
        let (spec, ignored): (VirtualServiceSpec, _) = deserialize_spec(value).unwrap();
        assert_eq!(spec.hosts, ["a"]);
        assert_eq!(spec.tcp.len(), 1);
        assert_eq!(ignored, ["http[0].fault", "http[0].mirror"]);
    }

    #[test]
    fn type_errors_carry_the_path() {
        let value = serde_json::json!({"http": [{"retries": {"attempts": "three"}}]});
        let err = deserialize_spec::<VirtualServiceSpec, _>(value).unwrap_err();
        assert_eq!(err.path, "http[0].retries.attempts");
        assert_eq!(err.message, "invalid type: string \"three\", expected i64");
    }
}
