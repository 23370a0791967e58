//! DestinationRules: traffic policies (connection pool, outlier detection,
//! load balancer) of a host and of its subsets.

use std::collections::HashSet;

use super::services::resolve_short_name;
use super::syntax::{check_export_to, check_labels};
use super::{Cx, Invalid, Minimum, Note, is_dns1123_label, is_valid_domain};
use crate::config::{LoadOptions, istio};
use crate::state::{
    ConnectionPool, ConsistentHashKey, DestinationRule, H2UpgradePolicy, HttpSettings, LbPolicy,
    LoadBalancer, LocalityLbSetting, ObjectKey, OutlierDetection, SimpleLb, Subset, TcpKeepalive,
    TcpSettings, TrafficPolicy,
};

pub(super) fn destination_rule(
    cx: &mut Cx<'_>,
    key: ObjectKey,
    spec: &istio::DestinationRuleSpec,
    opts: &LoadOptions,
) -> DestinationRule {
    let host = spec.host.clone().unwrap_or_default();
    if host.is_empty() {
        cx.error("spec.host", Invalid::Required);
    } else if !is_valid_domain(&host) {
        cx.error("spec.host", Invalid::BadHost(host.clone()));
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
        } else if !is_dns1123_label(&name) {
            cx.error(&format!("{path}.name"), Invalid::SubsetName(name.clone()));
        } else if !names.insert(name.clone()) {
            cx.error(
                &format!("{path}.name"),
                Invalid::DuplicateSubset(name.clone()),
            );
        }
        for problem in check_labels(&subset.labels) {
            cx.error(&format!("{path}.labels"), Invalid::Label(problem));
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
    for problem in check_export_to(
        &spec.export_to,
        &key.namespace,
        spec.workload_selector.is_some(),
    ) {
        cx.error("spec.exportTo", Invalid::ExportTo(problem));
    }
    if let Some(selector) = &spec.workload_selector {
        workload_selector(cx, selector);
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

/// `validateWorkloadSelector`: no empty keys, no wildcards.
fn workload_selector(cx: &mut Cx<'_>, selector: &istio::WorkloadSelector) {
    let path = "spec.workloadSelector.matchLabels";
    if selector.match_labels.is_empty() {
        cx.warn(path, Note::SelectorWithoutLabels);
    }
    for (key, value) in &selector.match_labels {
        let label = format!("{key}={value}");
        if key.is_empty() {
            cx.error(path, Invalid::SelectorLabel(label.clone(), "empty key"));
        }
        if key.contains('*') || value.contains('*') {
            cx.error(
                path,
                Invalid::SelectorLabel(label, "wildcards are not supported"),
            );
        }
    }
}

fn traffic_policy(cx: &mut Cx<'_>, tp: &istio::TrafficPolicy, path: &str) -> TrafficPolicy {
    if tp.is_empty() {
        cx.error(path, Invalid::EmptyPolicy("traffic policy"));
    }
    let mut port_level_settings: Vec<(u16, TrafficPolicy)> = Vec::new();
    for (i, settings) in tp.port_level_settings.iter().enumerate() {
        let path = format!("{path}.portLevelSettings[{i}]");
        if settings.is_empty() {
            cx.error(&path, Invalid::EmptyPolicy("port traffic policy"));
        }
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
    if cp.tcp.is_none() && cp.http.is_none() {
        cx.error(
            &format!("{parent}.connectionPool"),
            Invalid::EmptyPolicy("connection pool"),
        );
    }
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
                    Minimum::OneMillisecond,
                ),
                interval: cx.duration(
                    ka.interval.as_deref(),
                    &field("tcpKeepalive.interval"),
                    Minimum::OneMillisecond,
                ),
            }),
            max_connection_duration: cx.duration(
                tcp.max_connection_duration.as_deref(),
                &field("maxConnectionDuration"),
                Minimum::OneMillisecond,
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
                Minimum::OneMillisecond,
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
    if od.consecutive_local_origin_failures.is_some()
        && od.split_external_local_origin_errors != Some(true)
    {
        cx.error(
            &field("consecutiveLocalOriginFailures"),
            Invalid::LocalOriginWithoutSplit,
        );
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
    if ch.minimum_ring_size.is_some()
        && ch
            .ring_hash
            .as_ref()
            .and_then(|r| r.minimum_ring_size)
            .is_some()
    {
        cx.error(&path, Invalid::TwoRingSizes);
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
    if keys.is_empty() {
        // Valid in Istio; Envoy then has no hash to look up and picks at random.
        cx.warn(&path, Note::HashWithoutKey);
        return Some(LbPolicy::Simple(SimpleLb::Random));
    }
    if keys.len() > 1 {
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
            let field = format!("{rule_path}.to.{locality}");
            if let Some(weight) = cx.uint32(Some(*weight), &field) {
                if !(1..=100).contains(&weight) {
                    cx.error(&field, Invalid::LocalityWeight(weight));
                }
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
            } else if value.contains('*') {
                cx.error(&field, Invalid::FailoverWildcard(value.clone()));
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
