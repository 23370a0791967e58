//! VirtualServices: HTTP routes with their matches, destinations, timeouts
//! and retries, and cross-reference warnings about their destinations.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;

use super::services::{host_matches, resolve_short_name};
use super::syntax::{
    check_export_to, check_labels, expand_re2_quotes, is_valid_gateway_name, re2_incompatibility,
};
use super::{Cx, Invalid, Minimum, Note, is_dns1123_label, is_valid_domain};
use crate::config::{LoadOptions, istio};
use crate::state::{
    DestinationRule, HttpMatch, HttpRoute, ObjectKey, RetryOn, RetryPolicy, RouteDestination,
    StringMatch, VirtualService,
};

/// `retryOn` conditions Istio accepts (its `supportedRetryOnPolicies`) that
/// Nodeway does not implement.
const UNIMPLEMENTED_RETRY_ON: [&str; 4] = [
    "reset-before-request",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
];

/// Also returns, for each converted HTTP route, its index in `spec.http`
/// (unsupported routes are skipped).
pub(super) fn virtual_service(
    cx: &mut Cx<'_>,
    key: ObjectKey,
    spec: &istio::VirtualServiceSpec,
    opts: &LoadOptions,
) -> (VirtualService, Vec<usize>) {
    if spec.hosts.is_empty() {
        // Istio reads a VirtualService without hosts as a delegate, valid
        // only through another's `delegate:`, which Nodeway does not follow.
        cx.warn("spec.hosts", Note::DelegateVirtualService);
    }
    let mesh_bound = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    let mut seen = HashSet::new();
    for (i, host) in spec.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        if host.is_empty() {
            cx.error(&path, Invalid::Empty);
        } else if host == "*" && mesh_bound {
            cx.error(&path, Invalid::MeshWildcardHost);
        } else if !is_valid_domain(host) && host.parse::<std::net::IpAddr>().is_err() {
            // VirtualService hosts may also be IP addresses.
            cx.error(&path, Invalid::BadHost(host.clone()));
        } else if !seen.insert(host.as_str()) {
            cx.error(&path, Invalid::DuplicateHost(host.clone()));
        }
    }
    for (i, gateway) in spec.gateways.iter().enumerate() {
        if !is_valid_gateway_name(gateway) {
            cx.error(
                &format!("spec.gateways[{i}]"),
                Invalid::GatewayName(gateway.clone()),
            );
        }
    }
    for problem in check_export_to(&spec.export_to, &key.namespace, false) {
        cx.error("spec.exportTo", Invalid::ExportTo(problem));
    }
    if !spec.hosts.is_empty() && spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty()
    {
        cx.error("spec", Invalid::NoRoutes);
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
        if let Some(subset) = destination.subset.as_deref()
            && !subset.is_empty()
            && !is_dns1123_label(subset)
        {
            cx.error(
                &format!("{dest_path}.destination.subset"),
                Invalid::SubsetName(subset.to_string()),
            );
        }
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

    // Istio's admission refuses `0s`; no timeout is written by leaving it out.
    let timeout = cx.duration(
        route.timeout.as_deref(),
        &field("timeout"),
        Minimum::OneMillisecond,
    );
    if let Some(retries) = &route.retries
        && retries.attempts.unwrap_or(0) == 0
        && (retries.per_try_timeout.is_some()
            || retries.retry_on.as_deref().is_some_and(|r| !r.is_empty())
            || retries.retry_remote_localities.is_some())
    {
        cx.error(&field("retries"), Invalid::RetriesWithoutAttempts);
    }
    let retries = route.retries.as_ref().map(|retries| {
        let retry_on = match retries.retry_on.as_deref().map(str::trim) {
            None | Some("") => Some(RetryOn::istio_default()),
            Some(conditions) => {
                // Conditions Istio accepts that Nodeway does not implement:
                // a warning each, and the rest of the policy applies.
                for item in conditions.split(',') {
                    if item.is_empty() || item.trim() != item {
                        cx.error(
                            &field("retries.retryOn"),
                            Invalid::RetryOnItem(item.to_string()),
                        );
                    }
                }
                let (unimplemented, known): (Vec<&str>, Vec<&str>) = conditions
                    .split(',')
                    .partition(|c| UNIMPLEMENTED_RETRY_ON.contains(&c.trim()));
                for condition in unimplemented {
                    cx.warn(
                        &field("retries.retryOn"),
                        Note::UnimplementedRetryOn(condition.trim().to_string()),
                    );
                }
                RetryOn::from_str(&known.join(","))
                    .map_err(|err| cx.error(&field("retries.retryOn"), Invalid::RetryOn(err)))
                    .ok()
            }
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
    // Istio reads `uri: {}` as every path and `method: {}`, `authority: {}`
    // as "present": with no exact, prefix or regex, any value matches.
    let mut single = |value: &Option<istio::StringMatch>, name: &str| {
        let path = field(name);
        // Istio allows an empty prefix for `uri` only.
        if name != "uri" {
            refuse_empty_prefix(cx, value.as_ref(), &path);
        }
        value
            .as_ref()
            .and_then(|sm| string_match(cx, sm, &path, true))
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
                let path = field(&format!("{name}.{key}"));
                if !is_header_name(key) && name != "queryParams" {
                    cx.error(&path, Invalid::HeaderName(key.clone()));
                }
                refuse_empty_prefix(cx, Some(sm), &path);
                // Istio reads `withoutHeaders: {h: {regex: "*"}}` as "h is absent".
                let matcher = if name == "withoutHeaders" && sm.regex.as_deref() == Some("*") {
                    string_match(cx, &istio::StringMatch::default(), &path, true)?
                } else {
                    string_match(cx, sm, &path, true)?
                };
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
        // Istio reads port 0 as unset.
        port: m
            .port
            .filter(|port| *port != 0)
            .and_then(|port| cx.port(Some(port), &field("port"))),
        source_labels: m.source_labels.clone().inspect(|labels| {
            for problem in check_labels(labels) {
                cx.error(&field("sourceLabels"), Invalid::Label(problem));
            }
        }),
        source_namespace: m.source_namespace.clone().inspect(|namespace| {
            if !namespace.is_empty() && !is_dns1123_label(namespace) {
                cx.error(
                    &field("sourceNamespace"),
                    Invalid::SourceNamespace(namespace.clone()),
                );
            }
        }),
        ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
    }
}

/// `presence_if_empty`: Istio reads `{}` as "present with any value" (for
/// `uri`, `method` and `authority`: any value).
fn string_match(
    cx: &mut Cx<'_>,
    sm: &istio::StringMatch,
    path: &str,
    presence_if_empty: bool,
) -> Option<StringMatch> {
    match (&sm.exact, &sm.prefix, &sm.regex) {
        (Some(exact), None, None) => Some(StringMatch::Exact(exact.clone())),
        (None, Some(prefix), None) => Some(StringMatch::Prefix(prefix.clone())),
        (None, None, Some(regex)) if regex.is_empty() => {
            cx.error(&format!("{path}.regex"), Invalid::Empty);
            None
        }
        (None, None, Some(regex)) if regex.len() > MAX_REGEX_LEN => {
            cx.error(
                &format!("{path}.regex"),
                Invalid::RegexTooLong(regex.len(), MAX_REGEX_LEN),
            );
            None
        }
        (None, None, Some(regex)) => {
            let regex = expand_re2_quotes(regex);
            if let Some(syntax) = re2_incompatibility(&regex) {
                cx.error(&format!("{path}.regex"), Invalid::NotRe2(syntax));
                return None;
            }
            full_match_regex(&regex)
                .map_err(|err| cx.error(&format!("{path}.regex"), Invalid::Regex(err)))
                .ok()
                .map(StringMatch::Regex)
        }
        (None, None, None) if presence_if_empty => {
            full_match_regex("(?s:.*)").ok().map(StringMatch::Regex)
        }
        _ => {
            cx.error(path, Invalid::StringMatchOneOf);
            None
        }
    }
}

/// Istio refuses `prefix: ""` everywhere but in `uri`.
fn refuse_empty_prefix(cx: &mut Cx<'_>, sm: Option<&istio::StringMatch>, path: &str) {
    if sm.and_then(|sm| sm.prefix.as_deref()) == Some("") {
        cx.error(&format!("{path}.prefix"), Invalid::Empty);
    }
}

/// An RFC 7230 token, as Istio checks header names in matches.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Istio's limit on a regex's length.
const MAX_REGEX_LEN: usize = 1024;

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
pub(super) fn check_destinations(
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
