//! Validation of input [`Objects`] and their conversion into a [`Snapshot`].
//!
//! Every problem of every object is collected. An object with an error is left
//! out of the snapshot (like Istio skips invalid configs), so the snapshot is
//! usable even when errors are reported (the file loader refuses it anyway).
//! The exception is a Pod whose IP another Pod already has: it stays, but only
//! the first Pod is found by that IP.
//!
//! Split by object kind: `workloads` (Namespaces, Nodes, Pods), `services`
//! (Services, EndpointSlices), `destination_rule` and `virtual_service`; this
//! module holds the shared validation machinery and the entry point
//! [`resolve`].

mod destination_rule;
mod services;
mod syntax;
mod virtual_service;
mod workloads;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::config::duration::{DurationError, parse_duration};
use crate::config::{LoadOptions, Objects, Origin, Problem, Problems};
use crate::state::{InvalidRetryOn, NodeInfo, ObjectKey, Snapshot};

use destination_rule::destination_rule;
use services::build_services;
pub use services::{port_protocol, resolve_short_name};
use syntax::{BadExportTo, BadLabel, is_dns1123_label, is_valid_domain};
use virtual_service::{check_destinations, virtual_service};
pub use workloads::{NETNS_ANNOTATION, workload_name};
use workloads::{build_pods, node_locality};

/// EndpointSlice label naming the Service the slice belongs to.
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
    #[error("duration {0:?}: only durations to ms precision are supported (Istio)")]
    NotWholeMilliseconds(String),
    #[error("consecutiveLocalOriginFailures needs splitExternalLocalOriginErrors: true (Istio)")]
    LocalOriginWithoutSplit,
    #[error("locality weight must be between 1 and 100, got {0}")]
    LocalityWeight(u32),
    #[error("failover does not take wildcards: {0:?}")]
    FailoverWildcard(String),
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
    #[error("regex is {0} characters long; Istio allows at most {1}")]
    RegexTooLong(usize, usize),
    #[error("invalid header name {0:?}: letters, digits and !#$%&'*+-.^_`|~ only")]
    HeaderName(String),
    #[error("only one of minimumRingSize and ringHash.minimumRingSize can be set")]
    TwoRingSizes,
    #[error("at least one destination is required")]
    NoDestinations,
    #[error("cannot set both route and {0}")]
    RouteAndAction(&'static str),
    #[error("weights of multiple destinations must add up to more than 0")]
    ZeroTotalWeight,
    #[error("wildcard host * is not allowed for virtual services bound to the mesh gateway")]
    MeshWildcardHost,
    #[error(
        "invalid host {0:?}: a DNS name (labels of letters, digits and '-', optionally starting with \"*.\"), without scheme or port"
    )]
    BadHost(String),
    #[error("duplicate host {0:?} in virtual service")]
    DuplicateHost(String),
    #[error("http, tcp or tls must be provided in virtual service")]
    NoRoutes,
    #[error(
        "{0:?} is not a valid retryOn policy (Istio splits on \",\" and does not trim: no spaces, no empty items)"
    )]
    RetryOnItem(String),
    #[error(
        "http retry policy configured when attempts are set to 0 (disabled); set attempts, or remove the policy"
    )]
    RetriesWithoutAttempts,
    #[error(
        "subset name {0:?} is invalid: it must be a DNS-1123 label (letters, digits and '-', starting and ending with a letter or digit, at most 63)"
    )]
    SubsetName(String),
    #[error("duplicate subset name {0:?}")]
    DuplicateSubset(String),
    #[error("{0}")]
    Label(#[from] BadLabel),
    #[error("{0}")]
    ExportTo(#[from] BadExportTo),
    #[error("invalid gateway name {0:?}: mesh, <namespace>/<name>, or a DNS name")]
    GatewayName(String),
    #[error("sourceNamespace {0:?} is not a valid namespace name (a DNS-1123 label)")]
    SourceNamespace(String),
    #[error("workload selector label {0:?}: {1}")]
    SelectorLabel(String, &'static str),
    #[error("regex uses {0}, which Istio's RE2 does not support")]
    NotRe2(String),
    #[error("{0} must have at least one field")]
    EmptyPolicy(&'static str),
    #[error(
        "duration {0:?} is below Istio's minimum of 1ms; Istio refuses 0s here (leave the field out for its default)"
    )]
    ZeroDuration(String),
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
    #[error(
        "retry condition {0:?} is not implemented by Nodeway; ignored (the other conditions apply)"
    )]
    UnimplementedRetryOn(String),
    #[error(
        "consistentHash sets no hash key: requests are spread at random (Envoy has nothing to hash)"
    )]
    HashWithoutKey,
    #[error(
        "no hosts: a delegate VirtualService, which Nodeway does not support yet; it routes nothing"
    )]
    DelegateVirtualService,
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
    #[error("workload selector specified without labels")]
    SelectorWithoutLabels,
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
            Ok(Duration::ZERO) if minimum == Minimum::OneMillisecond => {
                self.error(field, Invalid::ZeroDuration(value.to_string()));
                None
            }
            Ok(d) if minimum == Minimum::OneMillisecond && d < Duration::from_millis(1) => {
                self.error(field, Invalid::BelowOneMillisecond(value.to_string()));
                None
            }
            Ok(d) if d.subsec_nanos() % 1_000_000 != 0 => {
                self.error(field, Invalid::NotWholeMilliseconds(value.to_string()));
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
