//! From a request to an upstream cluster: which Service was meant, which
//! VirtualService route applies, and which DestinationRule shapes it.

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;

use crate::state::{
    DestinationRule, HttpMatch, HttpRoute, ObjectKey, RetryOn, RetryPolicy, Service, Snapshot,
    TrafficPolicy, VirtualService, Workload,
};

/// A Service port a connection or request is addressed to.
#[derive(Debug, Clone)]
pub struct ServiceTarget {
    pub service: Arc<Service>,
    pub port_idx: usize,
}

impl ServiceTarget {
    pub fn port(&self) -> u16 {
        self.service.ports[self.port_idx].port
    }
}

/// The service behind a `clusterIP:port`.
pub fn target_for_vip(snap: &Snapshot, dst: std::net::SocketAddr) -> Option<ServiceTarget> {
    snap.service_vips
        .get(&dst)
        .map(|(service, port_idx)| ServiceTarget {
            service: service.clone(),
            port_idx: *port_idx,
        })
}

/// The service named by a `Host`/`:authority` value, resolved like cluster DNS
/// from the client's namespace: `name`, `name.ns`, `name.ns.svc`,
/// `name.ns.svc.<domain>`, or a clusterIP, each with an optional port.
pub fn target_for_authority(
    snap: &Snapshot,
    authority: &str,
    client_ns: &str,
) -> Option<ServiceTarget> {
    let (host, port) = split_authority(authority)?;
    let host = host.trim_end_matches('.');
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        return target_for_vip(snap, std::net::SocketAddr::new(ip, port.unwrap_or(80)));
    }
    let key = service_key_for_host(host, client_ns, &snap.cluster_domain)?;
    let service = snap.services.get(&key)?;
    let port_idx = match port {
        Some(p) => service.ports.iter().position(|sp| sp.port == p)?,
        // A client that omits the port dialled 80; single-port services are forgiven.
        None => service
            .ports
            .iter()
            .position(|sp| sp.port == 80)
            .or_else(|| (service.ports.len() == 1).then_some(0))?,
    };
    Some(ServiceTarget {
        service: service.clone(),
        port_idx,
    })
}

fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    if authority.is_empty() {
        return None;
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &authority[..end + 2];
        let port = rest[end + 1..]
            .strip_prefix(':')
            .map(|p| p.parse().ok())
            .unwrap_or(Some(0));
        return Some((host, port.filter(|p| *p != 0)));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((authority, None)),
    }
}

/// Parses `name[.ns[.svc[.domain]]]` into a Service key (case-insensitive).
fn service_key_for_host(host: &str, client_ns: &str, domain: &str) -> Option<ObjectKey> {
    let host = host.to_ascii_lowercase();
    let mut parts = host.splitn(4, '.');
    let name = parts.next().filter(|n| !n.is_empty())?.to_string();
    let namespace = match parts.next() {
        None => {
            return Some(ObjectKey {
                namespace: client_ns.to_string(),
                name,
            });
        }
        Some(ns) => ns.to_string(),
    };
    match (parts.next(), parts.next()) {
        (None, _) => {}
        (Some("svc"), None) => {}
        (Some("svc"), Some(d)) if d == domain => {}
        _ => return None,
    }
    Some(ObjectKey { namespace, name })
}

/// Service for an FQDN `name.ns.svc.<domain>` (as found in routes).
pub fn service_for_fqdn(snap: &Snapshot, fqdn: &str) -> Option<Arc<Service>> {
    let key = service_key_for_host(fqdn, "", &snap.cluster_domain)?;
    if key.namespace.is_empty() {
        return None;
    }
    snap.services.get(&key).cloned()
}

/// Istio's `exportTo` visibility of an object in `obj_ns` from `client_ns`.
fn visible(export_to: &[String], obj_ns: &str, client_ns: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || (e == "." && obj_ns == client_ns) || e == client_ns)
}

/// Whether an Istio host (FQDN or wildcard) covers `fqdn`; returns the
/// specificity (longer is more specific) for choosing among matches.
fn host_covers(pattern: &str, fqdn: &str) -> Option<usize> {
    if pattern == fqdn {
        Some(usize::MAX)
    } else if pattern == "*" {
        Some(0)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        fqdn.ends_with(suffix).then_some(suffix.len())
    } else {
        None
    }
}

/// The DestinationRule for a service as seen by a client: the client's
/// namespace, then the service's, then the root namespace; within each,
/// exact host before the most specific wildcard. No merging between them.
pub fn destination_rule_for<'a>(
    snap: &'a Snapshot,
    client: Option<&Workload>,
    client_ns: &str,
    service: &Service,
) -> Option<&'a Arc<DestinationRule>> {
    let applies = |dr: &DestinationRule| {
        visible(&dr.export_to, &dr.key.namespace, client_ns)
            && dr.workload_selector.as_ref().is_none_or(|sel| {
                dr.key.namespace == client_ns
                    && client.is_some_and(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            })
    };
    for ns in [
        client_ns,
        service.key.namespace.as_str(),
        snap.root_namespace.as_str(),
    ] {
        let best = snap
            .destination_rules
            .iter()
            .filter(|dr| dr.key.namespace == ns && applies(dr))
            .filter_map(|dr| host_covers(&dr.host_fqdn, &service.fqdn).map(|s| (s, dr)))
            .max_by_key(|(s, _)| *s);
        if let Some((_, dr)) = best {
            return Some(dr);
        }
    }
    None
}

/// Effective policy for a subset and port: top level, then its port-level
/// settings, then the subset's, then the subset's port-level; each section
/// (connection pool, outlier detection, load balancer) replaces the earlier one whole.
pub fn effective_policy(dr: &DestinationRule, subset: Option<&str>, port: u16) -> TrafficPolicy {
    let mut out = TrafficPolicy::default();
    let mut apply = |p: &TrafficPolicy| {
        let mut layer = |p: &TrafficPolicy| {
            if p.connection_pool.is_some() {
                out.connection_pool = p.connection_pool.clone();
            }
            if p.outlier_detection.is_some() {
                out.outlier_detection = p.outlier_detection.clone();
            }
            if p.load_balancer.is_some() {
                out.load_balancer = p.load_balancer.clone();
            }
        };
        layer(p);
        if let Some((_, pl)) = p.port_level_settings.iter().find(|(n, _)| *n == port) {
            layer(pl);
        }
    };
    if let Some(tp) = &dr.traffic_policy {
        apply(tp);
    }
    if let Some(tp) = subset
        .and_then(|s| dr.subsets.iter().find(|ss| ss.name == s))
        .and_then(|ss| ss.traffic_policy.as_ref())
    {
        apply(tp);
    }
    out
}

/// What a request was routed to.
#[derive(Debug, Clone)]
pub struct RouteDecision {
    /// VirtualService route name, or `default` when no VirtualService applies.
    pub route_name: Option<Arc<str>>,
    pub target: ServiceTarget,
    pub subset: Option<String>,
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
}

impl RouteDecision {
    /// Istio's cluster name: `outbound|8080|subset|svc.ns.svc.cluster.local`
    /// (without a subset, the one the Service port keeps).
    pub fn cluster_name(&self) -> Arc<str> {
        match self.subset.as_deref() {
            None => self.target.service.ports[self.target.port_idx]
                .cluster_name
                .clone(),
            Some(subset) => Arc::from(format!(
                "outbound|{}|{subset}|{}",
                self.target.port(),
                self.target.service.fqdn
            )),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// A VirtualService covers the host but none of its routes match: 404 `NR`.
    #[error("no route matched")]
    NoRoute,
    /// The route names a host that is not a known Service, or a subset no
    /// DestinationRule defines (Istio builds no cluster for it): 503 `NC`.
    #[error("{cluster} is not a known cluster")]
    NoCluster {
        cluster: String,
        /// The route that matched, for the access log.
        route_name: Option<Arc<str>>,
    },
}

/// Request facts the VirtualService matchers look at.
pub struct RequestView<'a> {
    pub parts: &'a Parts,
    pub authority: &'a str,
    pub port: u16,
    pub client: Option<&'a Workload>,
    pub client_ns: &'a str,
}

/// Istio's retry policy for routes that do not set `retries`.
pub fn default_retry_policy() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        per_try_timeout: None,
        retry_on: RetryOn::istio_default(),
        retry_remote_localities: false,
    }
}

/// Applies the first VirtualService that covers the target's host.
pub fn route(
    snap: &Snapshot,
    target: &ServiceTarget,
    req: &RequestView<'_>,
) -> Result<RouteDecision, RouteError> {
    let Some(vs) = virtual_service_for(snap, &target.service, req.client_ns) else {
        return Ok(RouteDecision {
            route_name: Some(Arc::from("default")),
            target: target.clone(),
            subset: None,
            timeout: None,
            retry: default_retry_policy(),
        });
    };
    let (http_route, matched) = vs
        .http
        .iter()
        .find_map(|r| {
            if r.matches.is_empty() {
                Some((r, None))
            } else {
                r.matches
                    .iter()
                    .find(|m| matches(m, req))
                    .map(|m| (r, Some(m)))
            }
        })
        .ok_or(RouteError::NoRoute)?;
    // Istio names the Envoy route `<route>.<match>` when the match block is named.
    let route_name: Option<Arc<str>> = match (
        http_route.name.as_deref(),
        matched.and_then(|m| m.name.as_deref()),
    ) {
        (name, Some(match_name)) => Some(Arc::from(format!(
            "{}.{match_name}",
            name.unwrap_or_default()
        ))),
        (name, None) => name.map(Arc::from),
    };
    decide(snap, target, http_route, route_name, req)
}

fn virtual_service_for<'a>(
    snap: &'a Snapshot,
    service: &Service,
    client_ns: &str,
) -> Option<&'a VirtualService> {
    let candidates = snap.virtual_services.iter().filter(|vs| {
        (vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh"))
            && visible(&vs.export_to, &vs.key.namespace, client_ns)
            && vs
                .hosts_fqdn
                .iter()
                .any(|h| host_covers(h, &service.fqdn).is_some())
    });
    // Prefer the client's namespace, then the service's, then any other.
    let rank = |vs: &VirtualService| {
        if vs.key.namespace == client_ns {
            0
        } else if vs.key.namespace == service.key.namespace {
            1
        } else {
            2
        }
    };
    // Compared by reference: no key is cloned per request.
    candidates
        .min_by(|a, b| (rank(a), &a.key).cmp(&(rank(b), &b.key)))
        .map(|vs| &**vs)
}

fn decide(
    snap: &Snapshot,
    target: &ServiceTarget,
    http_route: &HttpRoute,
    route_name: Option<Arc<str>>,
    req: &RequestView<'_>,
) -> Result<RouteDecision, RouteError> {
    let dest = pick_weighted(&http_route.route).ok_or(RouteError::NoRoute)?;
    let no_cluster = |cluster: String| RouteError::NoCluster {
        cluster,
        route_name: route_name.clone(),
    };
    let service = if dest.host_fqdn == target.service.fqdn {
        target.service.clone()
    } else {
        service_for_fqdn(snap, &dest.host_fqdn).ok_or_else(|| no_cluster(dest.host_fqdn.clone()))?
    };
    if let Some(subset) = &dest.subset {
        let defined = destination_rule_for(snap, req.client, req.client_ns, &service)
            .is_some_and(|dr| dr.subsets.iter().any(|s| &s.name == subset));
        if !defined {
            return Err(no_cluster(format!("subset {subset} of {}", service.fqdn)));
        }
    }
    let port_idx = match dest.port {
        Some(p) => service.ports.iter().position(|sp| sp.port == p),
        None if Arc::ptr_eq(&service, &target.service) => Some(target.port_idx),
        None => service
            .ports
            .iter()
            .position(|sp| sp.port == target.port())
            .or_else(|| (service.ports.len() == 1).then_some(0)),
    }
    .ok_or_else(|| no_cluster(dest.host_fqdn.clone()))?;
    Ok(RouteDecision {
        route_name,
        target: ServiceTarget { service, port_idx },
        subset: dest.subset.clone(),
        timeout: http_route.timeout.filter(|t| !t.is_zero()),
        retry: http_route
            .retries
            .clone()
            .unwrap_or_else(default_retry_policy),
    })
}

fn pick_weighted(
    dests: &[crate::state::RouteDestination],
) -> Option<&crate::state::RouteDestination> {
    if dests.len() <= 1 {
        return dests.first();
    }
    let total: u64 = dests.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return dests.first();
    }
    let mut n = fastrand::u64(0..total);
    for d in dests {
        let w = u64::from(d.weight);
        if n < w {
            return Some(d);
        }
        n -= w;
    }
    dests.last()
}

fn matches(m: &HttpMatch, req: &RequestView<'_>) -> bool {
    let path = req.parts.uri.path();
    if let Some(uri) = &m.uri {
        let ok = if m.ignore_uri_case {
            match uri {
                crate::state::StringMatch::Exact(s) => path.eq_ignore_ascii_case(s),
                // Bytes, not `str` slices: the path may end a prefix's length
                // inside a multi-byte character.
                crate::state::StringMatch::Prefix(p) => path
                    .as_bytes()
                    .get(..p.len())
                    .is_some_and(|head| head.eq_ignore_ascii_case(p.as_bytes())),
                crate::state::StringMatch::Regex(_) => uri.matches(path),
            }
        } else {
            uri.matches(path)
        };
        if !ok {
            return false;
        }
    }
    if let Some(method) = &m.method
        && !method.matches(req.parts.method.as_str())
    {
        return false;
    }
    if let Some(authority) = &m.authority
        && !authority.matches(req.authority)
    {
        return false;
    }
    if m.port.is_some_and(|p| p != req.port) {
        return false;
    }
    let header = |name: &str| req.parts.headers.get(name).and_then(|v| v.to_str().ok());
    if !m
        .headers
        .iter()
        .all(|(name, sm)| header(name).is_some_and(|v| sm.matches(v)))
    {
        return false;
    }
    if m.without_headers
        .iter()
        .any(|(name, sm)| header(name).is_some_and(|v| sm.matches(v)))
    {
        return false;
    }
    if !m.query_params.is_empty() {
        let query = req.parts.uri.query().unwrap_or("");
        let param = |name: &str| {
            query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == name).then_some(v)
            })
        };
        if !m
            .query_params
            .iter()
            .all(|(name, sm)| param(name).is_some_and(|v| sm.matches(v)))
        {
            return false;
        }
    }
    if let Some(labels) = &m.source_labels
        && !req
            .client
            .is_some_and(|w| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    {
        return false;
    }
    if let Some(ns) = &m.source_namespace
        && ns != req.client_ns
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_forms_resolve_like_cluster_dns() {
        let d = "cluster.local";
        let k = |ns: &str, n: &str| {
            Some(ObjectKey {
                namespace: ns.into(),
                name: n.into(),
            })
        };
        assert_eq!(service_key_for_host("mock", "shop", d), k("shop", "mock"));
        assert_eq!(
            service_key_for_host("mock.default", "shop", d),
            k("default", "mock")
        );
        assert_eq!(
            service_key_for_host("mock.default.svc", "shop", d),
            k("default", "mock")
        );
        assert_eq!(
            service_key_for_host("Mock.default.svc.cluster.local", "shop", d),
            k("default", "mock")
        );
        assert_eq!(
            service_key_for_host("mock.default.svc.other.domain", "shop", d),
            None
        );
        assert_eq!(
            service_key_for_host("example.com", "shop", d),
            k("com", "example")
        );
        assert_eq!(service_key_for_host("www.example.com", "shop", d), None);
    }

    #[test]
    fn authority_split() {
        assert_eq!(split_authority("a:8080"), Some(("a", Some(8080))));
        assert_eq!(split_authority("a"), Some(("a", None)));
        assert_eq!(split_authority("a:x"), None);
        assert_eq!(split_authority("[::1]:80"), Some(("[::1]", Some(80))));
        assert_eq!(split_authority("[::1]"), Some(("[::1]", None)));
    }

    #[test]
    fn wildcard_specificity() {
        assert_eq!(
            host_covers("a.b.svc.cluster.local", "a.b.svc.cluster.local"),
            Some(usize::MAX)
        );
        assert!(
            host_covers("*.cluster.local", "a.b.svc.cluster.local").unwrap()
                > host_covers("*", "x").unwrap()
        );
        assert_eq!(host_covers("*.example.com", "a.b.svc.cluster.local"), None);
    }
}
