use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::*;
use crate::state::{AppProtocol, LbPolicy, Locality, RetryOn, SimpleLb};

const LOCAL_YAML: &str = include_str!("../../../deploy/examples/local.yaml");

fn load(yaml: &str) -> Result<Loaded, Vec<Problem>> {
    load_str("test.yaml", yaml, &LoadOptions::default())
}

fn load_ok(yaml: &str) -> Loaded {
    load(yaml).unwrap_or_else(|errors| panic!("unexpected errors:\n{}", render(&errors)))
}

fn load_errors(yaml: &str) -> Vec<Problem> {
    match load(yaml) {
        Ok(_) => panic!("expected errors"),
        Err(errors) => errors,
    }
}

fn render(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("{p}\n")).collect()
}

fn locality(region: &str, zone: &str) -> Locality {
    Locality {
        region: Some(region.into()),
        zone: Some(zone.into()),
        subzone: None,
    }
}

#[test]
fn local_example_loads_cleanly() {
    let opts = LoadOptions {
        node_name: Some("node-a".into()),
        ..LoadOptions::default()
    };
    let loaded = load_str("local.yaml", LOCAL_YAML, &opts)
        .unwrap_or_else(|errors| panic!("local.yaml has errors:\n{}", render(&errors)));
    assert!(
        loaded.warnings.is_empty(),
        "local.yaml has warnings:\n{}",
        render(&loaded.warnings)
    );
    let snapshot = loaded.snapshot;
    assert_eq!(snapshot.cluster_domain, "cluster.local");
    assert_eq!(snapshot.root_namespace, "istio-system");

    let node = snapshot.node.as_ref().expect("node-a");
    assert_eq!(node.name, "node-a");
    assert_eq!(node.locality, locality("local", "zone-a"));
    assert_eq!(
        snapshot.namespaces["default"]["nodeway.io/redirect"],
        "enabled"
    );

    // Service VIP → port 0 of mock-server, with the three loopback endpoints.
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let (service, port_index) = &snapshot.service_vips[&vip];
    assert_eq!(*port_index, 0);
    assert_eq!(snapshot.service_vips.len(), 1);
    assert_eq!(service.fqdn, "mock-server.default.svc.cluster.local");
    assert_eq!(service.key.name, "mock-server");
    let port = &service.ports[0];
    assert_eq!(
        (port.name.as_deref(), port.port, port.protocol),
        (Some("http"), 80, AppProtocol::Http)
    );
    let addrs: Vec<String> = port.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(
        addrs,
        ["127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080"]
    );
    assert!(port.endpoints.iter().all(|e| e.ready));
    let localities: Vec<&Locality> = port.endpoints.iter().map(|e| &e.locality).collect();
    assert_eq!(
        localities,
        [
            &locality("local", "zone-a"),
            &locality("local", "zone-a"),
            &locality("local", "zone-b")
        ]
    );
    let versions: Vec<&str> = port
        .endpoints
        .iter()
        .map(|e| e.labels().unwrap()["version"].as_str())
        .collect();
    assert_eq!(versions, ["v1", "v1", "v2"]);
    assert_eq!(port.endpoints[2].node_name.as_deref(), Some("node-b"));
    assert_eq!(
        port.endpoints[0].pod.as_ref().unwrap().workload_name,
        "mock-server-v1"
    );

    // The client is identified by its source IP.
    let client_ip: IpAddr = "127.0.1.5".parse().unwrap();
    let client = &snapshot.pods_by_ip[&client_ip];
    assert_eq!(client.workload_name, "sleep");
    assert_eq!(client.pod_name, "sleep-5d9c7b8f6-abcde");
    assert_eq!(client.namespace, "default");
    assert_eq!(client.node_name.as_deref(), Some("node-a"));
    assert_eq!(client.locality, locality("local", "zone-a"));
    assert!(client.redirect_enabled);
    assert_eq!(snapshot.pods_by_ip.len(), 4);

    let [dr] = snapshot.destination_rules.as_slice() else {
        panic!("one DestinationRule")
    };
    assert_eq!(dr.host_fqdn, "mock-server.default.svc.cluster.local");
    let policy = dr.traffic_policy.as_ref().unwrap();
    let tcp = policy
        .connection_pool
        .as_ref()
        .unwrap()
        .tcp
        .as_ref()
        .unwrap();
    assert_eq!(tcp.connect_timeout, Some(Duration::from_secs(1)));
    assert!(matches!(
        policy.load_balancer.as_ref().unwrap().policy,
        Some(LbPolicy::Simple(SimpleLb::RoundRobin))
    ));
    let subsets: Vec<(&str, &str)> = dr
        .subsets
        .iter()
        .map(|s| (s.name.as_str(), s.labels["version"].as_str()))
        .collect();
    assert_eq!(subsets, [("v1", "v1"), ("v2", "v2")]);

    let [vs] = snapshot.virtual_services.as_slice() else {
        panic!("one VirtualService")
    };
    assert_eq!(vs.hosts_fqdn, ["mock-server.default.svc.cluster.local"]);
    let [route] = vs.http.as_slice() else {
        panic!("one route")
    };
    assert_eq!(route.name.as_deref(), Some("default-route"));
    assert_eq!(route.timeout, Some(Duration::from_secs(3)));
    let [dest] = route.route.as_slice() else {
        panic!("one destination")
    };
    assert_eq!(
        (dest.host_fqdn.as_str(), dest.subset.as_deref(), dest.weight),
        ("mock-server.default.svc.cluster.local", None, 100)
    );
    let retries = route.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, 2);
    assert_eq!(retries.per_try_timeout, Some(Duration::from_secs(1)));
    assert_eq!(
        retries.retry_on,
        "connect-failure,refused-stream,unavailable,cancelled,5xx"
            .parse::<RetryOn>()
            .unwrap()
    );
    assert!(!retries.retry_remote_localities);
}

const BROKEN: &str = r#"# every document but the first has problems
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
    retries:
      attempts: 3
      retryOn: 5xx,sometimes
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: ratings
  namespace: shop
spec:
  hosts: [ratings]
  http:
  - match:
    - uri: {regex: "/v[0-9"}
    route:
    - destination: {host: ratings}
    timeout: 10 seconds
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
spec:
  ports:
  - name: http
    port: x
---
apiVersion: v1
kind: Service
metadata: {name: broken
spec: {}
"#;

#[test]
fn every_problem_of_a_broken_file_is_reported() {
    let errors = load_errors(BROKEN);
    let summary: Vec<(usize, &str, &str, &str)> = errors
        .iter()
        .map(|p| {
            (
                p.document,
                p.kind.as_str(),
                p.name.as_str(),
                p.field.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                2,
                "VirtualService",
                "shop/reviews",
                "spec.http[0].retries.retryOn"
            ),
            (
                3,
                "VirtualService",
                "shop/ratings",
                "spec.http[0].match[0].uri.regex"
            ),
            (3, "VirtualService", "shop/ratings", "spec.http[0].timeout"),
            (4, "Service", "shop/reviews", "spec.ports[0].port"),
            (5, "-", "-", "-"),
        ],
        "{}",
        render(&errors)
    );
    assert_eq!(
        errors[0].to_string(),
        "test.yaml: document 2 (VirtualService shop/reviews): spec.http[0].retries.retryOn: \"sometimes\" is not a \
         valid retryOn condition (expected one of 5xx, gateway-error, reset, connect-failure, retriable-4xx, \
         refused-stream, retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, \
         unavailable or an HTTP status code)"
    );
    assert_eq!(
        errors[2].to_string(),
        "test.yaml: document 3 (VirtualService shop/ratings): spec.http[0].timeout: unknown unit \" seconds\" in \
         duration \"10 seconds\" (valid units: ns, us, µs, ms, s, m, h)"
    );
    assert_eq!(
        errors[3].to_string(),
        "test.yaml: document 4 (Service shop/reviews): spec.ports[0].port: invalid type: string \"x\", expected i32"
    );
    assert!(
        errors[1].message.starts_with("invalid regex: "),
        "{}",
        errors[1]
    );
    // Line numbers are those of the whole file.
    assert!(
        errors[4].message.starts_with("YAML syntax error: "),
        "{}",
        errors[4]
    );
    assert!(
        errors[4].message.contains("at line 48 column 5"),
        "{}",
        errors[4]
    );
}

#[test]
fn a_syntax_error_does_not_hide_later_documents() {
    let errors = load_errors(
        "a: [\n---\napiVersion: v1\nkind: Pod\n---\n---\napiVersion: v2\nkind: Pod\nmetadata: {name: p}\n",
    );
    let summary: Vec<(usize, &str, &str)> = errors
        .iter()
        .map(|p| (p.document, p.field.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(summary[0].0, 1);
    assert_eq!(
        &summary[1..],
        [
            (2, "metadata.name", "is required"),
            (
                4,
                "apiVersion",
                "apiVersion \"v2\" is not valid for kind Pod (expected v1)"
            ),
        ]
    );
}

fn virtual_service(api_version: &str, extra: &str) -> String {
    format!(
        "apiVersion: {api_version}\nkind: VirtualService\nmetadata: {{name: vs}}\nspec:\n  hosts: [a]\n  http:\n  - \
         route:\n    - destination: {{host: a}}\n{extra}"
    )
}

#[test]
fn all_istio_api_versions_are_accepted() {
    for version in [
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    ] {
        let service = "---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n";
        let loaded = load_ok(&(virtual_service(version, "") + service));
        assert!(loaded.warnings.is_empty(), "{}", render(&loaded.warnings));
        assert_eq!(loaded.snapshot.virtual_services[0].key.namespace, "default");
    }
    let errors = load_errors(&virtual_service("networking.istio.io/v2", ""));
    assert_eq!(
        errors[0].to_string(),
        "test.yaml: document 1 (VirtualService default/vs): apiVersion: apiVersion \"networking.istio.io/v2\" is not \
         valid for kind VirtualService (expected networking.istio.io/v1, networking.istio.io/v1beta1, \
         networking.istio.io/v1alpha3)"
    );
}

#[test]
fn unknown_kinds_and_istio_fields_are_warnings() {
    let yaml = virtual_service(
        "networking.istio.io/v1",
        "    fault: {abort: {httpStatus: 500}}\n    retries: {attempts: 1, retyOn: 5xx}\n  tcp:\n  - route: []\n",
    ) + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: x}\n";
    let loaded = load_ok(&yaml);
    let warnings: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        warnings,
        [
            "test.yaml: document 1 (VirtualService default/vs): spec.http[0].fault: field is not supported by Nodeway and \
         is ignored",
            "test.yaml: document 1 (VirtualService default/vs): spec.http[0].retries.retyOn: field is not supported by \
         Nodeway and is ignored",
            "test.yaml: document 1 (VirtualService default/vs): spec.tcp: tcp routes are not supported yet; ignored",
            "test.yaml: document 1 (VirtualService default/vs): spec.http[0].route[0].destination.host: host \"a\" does \
         not match any Service in the config (fine if a ServiceEntry defines it)",
            "test.yaml: document 2 (Deployment x/d): -: kind Deployment is not used by Nodeway; ignored",
        ]
    );
    // Without retryOn, Istio's default conditions apply.
    let retries = loaded.snapshot.virtual_services[0].http[0]
        .retries
        .as_ref()
        .unwrap();
    assert_eq!(
        (retries.attempts, &retries.retry_on),
        (1, &RetryOn::istio_default())
    );
}

#[test]
fn unreadable_file_is_one_problem() {
    let errors = load_file(
        std::path::Path::new("/nonexistent/nodeway.yaml"),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .starts_with("/nonexistent/nodeway.yaml: document 0 (- -): -: cannot read file: "),
        "{}",
        errors[0]
    );
}

#[test]
fn duplicates_are_errors_on_the_second_object() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: n}\n";
    let errors = load_errors(&format!("{pod}---\n{pod}"));
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].to_string(),
        "test.yaml: document 2 (Pod n/p): metadata.name: duplicate Pod n/p (first defined in test.yaml document 1)"
    );
}

#[test]
fn destination_rule_validation_reports_each_field() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: shop}
spec:
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: -1, connectTimeout: 500us}
      http: {h2UpgradePolicy: SOMETIMES}
    outlierDetection: {maxEjectionPercent: 101, interval: 0s, consecutive5xxErrors: 3}
    loadBalancer:
      simple: FASTEST
      localityLbSetting:
        distribute: [{from: "a/*", to: {"a/b/*": 60, "c/*": 30}}]
    portLevelSettings:
    - port: {number: 70000}
      loadBalancer: {consistentHash: {httpHeaderName: x-user, useSourceIp: true}}
  subsets:
  - name: v1
  - name: v1
  - labels: {a: b}
"#;
    let errors = load_errors(yaml);
    let fields: Vec<(&str, &str)> = errors
        .iter()
        .map(|p| (p.field.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("spec.host", "is required"),
            (
                "spec.trafficPolicy.portLevelSettings[0].port.number",
                "must be between 1 and 65535, got 70000"
            ),
            (
                "spec.trafficPolicy.portLevelSettings[0].loadBalancer.consistentHash",
                "must set exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName"
            ),
            (
                "spec.trafficPolicy.connectionPool.tcp.maxConnections",
                "must be between 0 and 2147483647, got -1"
            ),
            (
                "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
                "duration \"500us\" is below Istio's minimum of 1ms"
            ),
            (
                "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
                "unknown value \"SOMETIMES\" (expected one of DEFAULT, DO_NOT_UPGRADE, UPGRADE)"
            ),
            (
                "spec.trafficPolicy.outlierDetection.interval",
                "duration \"0s\" is below Istio's minimum of 1ms; Istio refuses 0s here (leave the field out for its default)"
            ),
            (
                "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
                "must be between 0 and 100, got 101"
            ),
            (
                "spec.trafficPolicy.loadBalancer.simple",
                "unknown value \"FASTEST\" (expected one of UNSPECIFIED, LEAST_REQUEST, LEAST_CONN, ROUND_ROBIN, RANDOM, \
             PASSTHROUGH)"
            ),
            (
                "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to",
                "weights add up to 90, expected 100"
            ),
            ("spec.subsets[1].name", "duplicate subset name \"v1\""),
            ("spec.subsets[2].name", "is required"),
        ]
    );
    assert!(
        errors
            .iter()
            .all(|p| p.document == 1 && p.name == "shop/dr" && p.kind == "DestinationRule")
    );
}

#[test]
fn destination_rule_converts_every_setting() {
    let yaml = r#"
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: dr, namespace: shop}
spec:
  host: "*.example.com"
  exportTo: ["."]
  workloadSelector: {matchLabels: {app: client}}
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 10
        connectTimeout: 250ms
        tcpKeepalive: {probes: 3, time: 1m, interval: 10s}
        maxConnectionDuration: 1h
        idleTimeout: 0s
      http: {http1MaxPendingRequests: 1, http2MaxRequests: 2, maxRequestsPerConnection: 3, maxRetries: 4,
             idleTimeout: 5s, maxConcurrentStreams: 6, h2UpgradePolicy: UPGRADE}
    outlierDetection: {consecutiveErrors: 7, consecutiveLocalOriginFailures: 2, splitExternalLocalOriginErrors: true,
                       interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50, minHealthPercent: 10}
    loadBalancer:
      consistentHash: {httpCookie: {name: user, path: /, ttl: 0s}, ringHash: {minimumRingSize: 1024}}
      localityLbSetting:
        enabled: true
        failover: [{from: us-east, to: us-west}]
        failoverPriority: [topology.kubernetes.io/region]
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: LEAST_CONN}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
"#;
    let loaded = load_ok(yaml);
    let warnings: Vec<&str> = loaded.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        warnings,
        ["spec.trafficPolicy.outlierDetection.consecutiveErrors"]
    );
    let dr = &loaded.snapshot.destination_rules[0];
    assert_eq!(dr.host_fqdn, "*.example.com");
    assert_eq!(dr.export_to, ["."]);
    assert_eq!(dr.workload_selector.as_ref().unwrap()["app"], "client");
    let policy = dr.traffic_policy.as_ref().unwrap();
    let pool = policy.connection_pool.as_ref().unwrap();
    let tcp = pool.tcp.as_ref().unwrap();
    assert_eq!(tcp.max_connections, Some(10));
    assert_eq!(tcp.connect_timeout, Some(Duration::from_millis(250)));
    let keepalive = tcp.tcp_keepalive.as_ref().unwrap();
    assert_eq!(
        (keepalive.probes, keepalive.time, keepalive.interval),
        (
            Some(3),
            Some(Duration::from_secs(60)),
            Some(Duration::from_secs(10))
        )
    );
    assert_eq!(tcp.max_connection_duration, Some(Duration::from_secs(3600)));
    assert_eq!(tcp.idle_timeout, Some(Duration::ZERO));
    let http = pool.http.as_ref().unwrap();
    assert_eq!(
        (
            http.http1_max_pending_requests,
            http.http2_max_requests,
            http.max_requests_per_connection,
            http.max_retries
        ),
        (Some(1), Some(2), Some(3), Some(4))
    );
    assert_eq!(
        (http.idle_timeout, http.max_concurrent_streams),
        (Some(Duration::from_secs(5)), Some(6))
    );
    assert_eq!(
        http.h2_upgrade_policy,
        crate::state::H2UpgradePolicy::Upgrade
    );
    let od = policy.outlier_detection.as_ref().unwrap();
    // Istio: deprecated consecutiveErrors = gateway errors, 5xx ejection off.
    assert_eq!(
        (od.consecutive_gateway_errors, od.consecutive_5xx_errors),
        (Some(7), Some(0))
    );
    assert_eq!(od.consecutive_local_origin_failures, Some(2));
    assert!(od.split_external_local_origin_errors);
    assert_eq!(
        (od.interval, od.base_ejection_time),
        (Some(Duration::from_secs(1)), Some(Duration::from_secs(30)))
    );
    assert_eq!(
        (od.max_ejection_percent, od.min_health_percent),
        (Some(50), Some(10))
    );
    let lb = policy.load_balancer.as_ref().unwrap();
    match &lb.policy {
        Some(LbPolicy::ConsistentHash {
            key: crate::state::ConsistentHashKey::HttpCookie { name, path, ttl },
            minimum_ring_size,
        }) => {
            assert_eq!(
                (name.as_str(), path.as_deref(), *ttl),
                ("user", Some("/"), Some(Duration::ZERO))
            );
            assert_eq!(*minimum_ring_size, Some(1024));
        }
        other => panic!("unexpected policy {other:?}"),
    }
    let locality = lb.locality_lb_setting.as_ref().unwrap();
    assert_eq!(locality.enabled, Some(true));
    assert_eq!(
        locality.failover,
        [("us-east".to_string(), "us-west".to_string())]
    );
    assert_eq!(
        locality.failover_priority,
        ["topology.kubernetes.io/region"]
    );
    let (port, port_policy) = &policy.port_level_settings[0];
    assert_eq!(*port, 8080);
    assert!(matches!(
        port_policy.load_balancer.as_ref().unwrap().policy,
        Some(LbPolicy::Simple(SimpleLb::LeastRequest))
    ));
    let subset_policy = dr.subsets[0].traffic_policy.as_ref().unwrap();
    assert!(matches!(
        subset_policy.load_balancer.as_ref().unwrap().policy,
        Some(LbPolicy::ConsistentHash {
            key: crate::state::ConsistentHashKey::UseSourceIp,
            ..
        })
    ));
}

#[test]
fn virtual_service_validation_reports_each_field() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  http:
  - match:
    - uri: {exact: /a, prefix: /b}
      headers: {X-User: {}}
      port: 0
    route:
    - destination: {host: a, port: {number: 0}}
      weight: 0
    - destination: {host: b}
    - weight: -5
    timeout: 0.5ms
    retries: {attempts: -1, perTryTimeout: 0s}
  - route: []
  - redirect: {uri: /x}
  - redirect: {uri: /x}
    route: [destination: {host: a}]
"#;
    let loaded = load(yaml);
    let errors = loaded.unwrap_err();
    let fields: Vec<(&str, &str)> = errors
        .iter()
        .map(|p| (p.field.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            (
                "spec.http[0].match[0].uri",
                "must set exactly one of exact, prefix or regex"
            ),
            (
                "spec.http[0].route[0].destination.port.number",
                "must be between 1 and 65535, got 0"
            ),
            (
                "spec.http[0].route[2].weight",
                "must be between 0 and 2147483647, got -5"
            ),
            ("spec.http[0].route[2].destination", "is required"),
            (
                "spec.http[0].route",
                "weights of multiple destinations must add up to more than 0"
            ),
            (
                "spec.http[0].timeout",
                "duration \"0.5ms\" is below Istio's minimum of 1ms"
            ),
            (
                "spec.http[0].retries.attempts",
                "must be between 0 and 2147483647, got -1"
            ),
            (
                "spec.http[0].retries.perTryTimeout",
                "duration \"0s\" is below Istio's minimum of 1ms; Istio refuses 0s here (leave the field out for its default)"
            ),
            ("spec.http[1].route", "at least one destination is required"),
            (
                "spec.http[3].redirect",
                "cannot set both route and redirect"
            ),
        ]
    );
}

#[test]
fn virtual_service_converts_matches_and_weights() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: shop}
spec: {ports: [{port: 80, name: grpc-api}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a, namespace: shop}
spec:
  host: a.shop.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  hosts: [a, "*.example.com"]
  gateways: [mesh]
  exportTo: ["*"]
  http:
  - name: r
    match:
    - name: m
      uri: {prefix: /api}
      method: {exact: GET}
      authority: {regex: "a(:80)?"}
      headers: {X-User: {exact: bob}, X-Any: {}}
      withoutHeaders: {X-Debug: {prefix: "1"}}
      queryParams: {Q: {exact: v}}
      port: 80
      sourceLabels: {app: client}
      sourceNamespace: shop
      ignoreUriCase: true
    route:
    - destination: {host: a, subset: v1, port: {number: 80}}
      weight: 30
    - destination: {host: a, subset: v9}
      weight: 70
    retries: {attempts: 0}
"#;
    let loaded = load_ok(yaml);
    let warnings: Vec<String> = loaded
        .warnings
        .iter()
        .map(|w| format!("{}: {}", w.field, w.message))
        .collect();
    assert_eq!(
        warnings,
        [
            "spec.http[0].route[1].destination.subset: subset \"v9\" is not defined by any DestinationRule for \
         a.shop.svc.cluster.local"
        ]
    );
    let snapshot = &loaded.snapshot;
    assert_eq!(
        snapshot.services[&crate::state::ObjectKey {
            namespace: "shop".into(),
            name: "a".into()
        }]
            .ports[0]
            .protocol,
        AppProtocol::Grpc
    );
    assert!(snapshot.service_vips.is_empty(), "no clusterIP, no VIP");
    let vs = &snapshot.virtual_services[0];
    assert_eq!(vs.hosts_fqdn, ["a.shop.svc.cluster.local", "*.example.com"]);
    assert_eq!(
        (vs.gateways.as_slice(), vs.export_to.as_slice()),
        (&["mesh".to_string()][..], &["*".to_string()][..])
    );
    let route = &vs.http[0];
    assert_eq!(route.timeout, None, "no timeout unless one is set");
    let retries = route.retries.as_ref().unwrap();
    assert_eq!(
        (retries.attempts, retries.retry_remote_localities),
        (0, false)
    );
    let weights: Vec<(u32, Option<&str>, Option<u16>)> = route
        .route
        .iter()
        .map(|d| (d.weight, d.subset.as_deref(), d.port))
        .collect();
    assert_eq!(
        weights,
        [(30, Some("v1"), Some(80)), (70, Some("v9"), None)]
    );
    let m = &route.matches[0];
    assert_eq!(m.name.as_deref(), Some("m"));
    assert!(m.uri.as_ref().unwrap().matches("/api/x"));
    assert!(
        m.method.as_ref().unwrap().matches("GET") && !m.method.as_ref().unwrap().matches("get")
    );
    let authority = m.authority.as_ref().unwrap();
    assert!(authority.matches("a") && authority.matches("a:80") && !authority.matches("ba"));
    let header_names: Vec<&str> = m.headers.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(header_names, ["x-any", "x-user"]);
    assert!(m.headers[0].1.matches(""), "an empty match means presence");
    assert_eq!(m.without_headers[0].0, "x-debug");
    assert_eq!(m.query_params[0].0, "Q");
    assert_eq!(m.port, Some(80));
    assert_eq!(m.source_labels.as_ref().unwrap()["app"], "client");
    assert_eq!(m.source_namespace.as_deref(), Some("shop"));
    assert!(m.ignore_uri_case);
}

#[test]
fn kubernetes_objects_resolve_pods_services_and_slices() {
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodeway.io/redirect: enabled}}
---
apiVersion: v1
kind: Node
metadata:
  name: n1
  labels: {topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: z1, topology.istio.io/subzone: s1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {nodeway.io/redirect: disabled}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {istio-locality: ra.za.sa}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default}
spec: {containers: []}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: host-net, namespace: default}
spec: {hostNetwork: true, containers: []}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.1
  clusterIPs: [10.96.0.1, "fd00::a"]
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
  - {name: admin, port: 9000, appProtocol: kubernetes.io/h2c}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: admin, port: 9090}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: false}
  targetRef: {kind: Pod, name: web-0}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.2]
  nodeName: n1
  zone: zone-from-slice
  targetRef: {kind: Pod, name: web-1, namespace: shop}
- addresses: [10.0.0.9]
  nodeName: n1
  zone: zone-from-slice
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, namespace: shop}
addressType: IPv4
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: fqdn, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
"#;
    let opts = LoadOptions {
        node_name: Some("missing-node".into()),
        ..LoadOptions::default()
    };
    let loaded = load_str("test.yaml", yaml, &opts).unwrap_or_else(|e| panic!("{}", render(&e)));
    let warnings: Vec<String> = loaded
        .warnings
        .iter()
        .map(|w| format!("{} {}: {}", w.name, w.field, w.message))
        .collect();
    assert_eq!(
        warnings,
        [
            "shop/orphan metadata.labels: has no label kubernetes.io/service-name; ignored",
            "shop/fqdn addressType: addressType FQDN is not supported; EndpointSlice ignored",
        ]
    );
    let snapshot = loaded.snapshot;
    assert!(snapshot.node.is_none());

    let web0 = &snapshot.pods_by_ip[&"fd00::1".parse::<IpAddr>().unwrap()];
    assert_eq!(web0.pod_name, "web-0");
    assert_eq!(web0.ips.len(), 2);
    assert!(!web0.redirect_enabled, "pod opted out");
    assert_eq!(
        web0.locality,
        Locality {
            subzone: Some("s1".into()),
            ..locality("r1", "z1")
        }
    );
    let web1 = &snapshot.pods_by_ip[&"10.0.0.2".parse::<IpAddr>().unwrap()];
    assert!(web1.redirect_enabled);
    assert_eq!(
        web1.locality,
        Locality {
            subzone: Some("sa".into()),
            ..locality("ra", "za")
        }
    );
    let other = &snapshot.pods_by_ip[&"10.0.0.3".parse::<IpAddr>().unwrap()];
    assert_eq!(
        other.pod_name, "other",
        "host-network pods do not claim IPs"
    );
    assert!(!other.redirect_enabled, "namespace not labelled");

    let service = &snapshot.service_vips[&"[fd00::a]:9000".parse::<SocketAddr>().unwrap()].0;
    assert_eq!(
        snapshot.service_vips.len(),
        4,
        "2 cluster IPs x 2 TCP ports"
    );
    let ports: Vec<(u16, AppProtocol)> =
        service.ports.iter().map(|p| (p.port, p.protocol)).collect();
    assert_eq!(ports, [(80, AppProtocol::Http), (9000, AppProtocol::Http2)]);
    let http: Vec<(String, bool, Option<&str>, Option<&str>)> = service.ports[0]
        .endpoints
        .iter()
        .map(|e| {
            (
                e.addr.to_string(),
                e.ready,
                e.locality.zone.as_deref(),
                e.pod.as_ref().map(|p| p.pod_name.as_str()),
            )
        })
        .collect();
    assert_eq!(
        http,
        [
            (
                "10.0.0.1:8080".to_string(),
                false,
                Some("z1"),
                Some("web-0")
            ),
            ("10.0.0.2:8080".to_string(), true, Some("za"), Some("web-1")),
            (
                "10.0.0.9:8080".to_string(),
                true,
                Some("zone-from-slice"),
                None
            ),
        ]
    );
    let admin: Vec<String> = service.ports[1]
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(admin, ["10.0.0.1:9090"]);
}

#[test]
fn kubernetes_object_errors() {
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: a}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b}
status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.300}]}
---
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {clusterIP: nope, ports: [{port: 0}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: e, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
endpoints: [{addresses: [x]}]
---
- not
- an object
"#;
    let errors = load_errors(yaml);
    let fields: Vec<(usize, &str, &str)> = errors
        .iter()
        .map(|p| (p.document, p.field.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            (
                2,
                "status.podIPs[0].ip",
                "invalid IP address \"10.0.0.300\""
            ),
            (
                2,
                "status.podIP",
                "IP 10.0.0.1 is already used by Pod default/a"
            ),
            (3, "spec.clusterIP", "invalid IP address \"nope\""),
            (
                3,
                "spec.ports[0].port",
                "must be between 1 and 65535, got 0"
            ),
            (4, "endpoints[0].addresses[0]", "invalid IP address \"x\""),
            (
                5,
                "-",
                "document is not a mapping (expected a Kubernetes object)"
            ),
        ]
    );
}

#[test]
fn list_items_are_objects_of_their_document() {
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: b}
- apiVersion: v1
  kind: Service
  metadata: {name: s, namespace: b}
  spec: {ports: [{port: "80"}]}
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRole
  metadata: {name: viewer}
"#;
    let (mut objects, mut problems) = (Objects::default(), Problems::default());
    parse_documents("list.yaml", yaml, &mut objects, &mut problems);
    assert_eq!(objects.namespaces.len(), 2);
    assert_eq!(
        objects.namespaces[1].origin,
        Origin {
            file: "list.yaml".into(),
            document: 2
        }
    );
    let errors: Vec<String> = problems.errors.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        errors,
        [
            "list.yaml: document 2 (Service b/s): items[1].spec.ports[0].port: invalid type: string \"80\", expected i32"
        ]
    );
    let warnings: Vec<String> = problems.warnings.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        warnings,
        [
            "list.yaml: document 2 (ClusterRole viewer): items[2]: kind ClusterRole is not used by Nodeway; ignored"
        ]
    );
}

/// The Kubernetes-API mode fills `Objects` from typed and dynamic objects.
#[test]
fn objects_can_be_built_without_yaml() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    let spec = serde_json::json!({
        "hosts": ["web"],
        "http": [
            {"redirect": {"uri": "/new"}},
            {"route": [{"destination": {"host": "web"}}], "mirror": {"host": "x"}},
        ],
    });
    let (spec, ignored) = istio::deserialize_spec::<istio::VirtualServiceSpec, _>(spec).unwrap();
    assert_eq!(ignored, ["http[1].mirror"]);
    let origin = Origin {
        file: "kubernetes".into(),
        document: 0,
    };
    let metadata = ObjectMeta {
        name: Some("web".into()),
        namespace: Some("shop".into()),
        ..Default::default()
    };
    let objects = Objects {
        virtual_services: vec![Item::new(origin, istio::VirtualService { metadata, spec })],
        ..Objects::default()
    };
    let (snapshot, problems) = resolve::resolve(&objects, &LoadOptions::default());
    assert!(problems.errors.is_empty());
    let warnings: Vec<String> = problems.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        warnings,
        [
            "kubernetes: document 0 (VirtualService shop/web): spec.http[0].redirect: redirect is not supported \
             by Nodeway; this route is ignored",
            "kubernetes: document 0 (VirtualService shop/web): spec.http[1].route[0].destination.host: host \
             \"web\" does not match any Service in the config (fine if a ServiceEntry defines it)",
        ]
    );
    assert_eq!(snapshot.virtual_services[0].http.len(), 1);
}

/// Issue 13: what Istio's validation rejects, `validate` rejects too, with
/// Istio's reason (istio/istio `pkg/config/validation`), and what Istio
/// reads as unset is not an error.
#[test]
fn istio_rejections_are_rejections_here() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: shop}
spec:
  host: a
  subsets:
  - {name: v1.0, labels: {version: "1.0"}}
  - {name: v1_beta, labels: {version: beta}}
  - {name: -v2, labels: {version: "2"}}
  - {name: v3, labels: {version: "3"}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: everything, namespace: shop}
spec:
  hosts: ["*"]
  http:
  - route: [destination: {host: a, subset: v1.0}]
    retries: {perTryTimeout: 2s, retryOn: 5xx}
  - route: [destination: {host: a}]
    retries: {attempts: 0, retryRemoteLocalities: false}
  - route: [destination: {host: a, subset: v3}]
    retries: {attempts: 0}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: gateway-only, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [shop/ingress]
  http:
  - match: [{port: 0}]
    route: [destination: {host: a}]
"#;
    let errors = load(&format!("{yaml}{EMPTY_MATCHES}")).unwrap_err();
    let found: Vec<String> = errors
        .iter()
        .map(|p| format!("{} {}: {}", p.name, p.field, p.message))
        .collect();
    let dns = "it must be a DNS-1123 label (letters, digits and '-', starting and ending with a letter or digit, at most 63)";
    assert_eq!(
        found,
        [
            format!("shop/dr spec.subsets[0].name: subset name \"v1.0\" is invalid: {dns}"),
            format!("shop/dr spec.subsets[1].name: subset name \"v1_beta\" is invalid: {dns}"),
            format!("shop/dr spec.subsets[2].name: subset name \"-v2\" is invalid: {dns}"),
            "shop/everything spec.hosts[0]: wildcard host * is not allowed for virtual services bound to the mesh gateway".to_string(),
            format!("shop/everything spec.http[0].route[0].destination.subset: subset name \"v1.0\" is invalid: {dns}"),
            "shop/everything spec.http[0].retries: http retry policy configured when attempts are set to 0 (disabled); set attempts, or remove the policy".to_string(),
            "shop/everything spec.http[1].retries: http retry policy configured when attempts are set to 0 (disabled); set attempts, or remove the policy".to_string(),
        ]
    );
}

/// Retry conditions Istio accepts but Nodeway does not implement are a
/// warning, not an error: the file still loads and the other conditions apply.
#[test]
fn retry_conditions_istio_accepts_but_nodeway_lacks_are_warnings() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  hosts: [a]
  http:
  - route: [destination: {host: a}]
    retries: {attempts: 2, retryOn: "reset-before-request,5xx,envoy-ratelimited"}
"#;
    let loaded = load_ok(yaml);
    let warnings: Vec<String> = loaded
        .warnings
        .iter()
        .filter(|w| w.field.ends_with("retryOn"))
        .map(|w| w.message.clone())
        .collect();
    assert_eq!(
        warnings,
        [
            "retry condition \"reset-before-request\" is not implemented by Nodeway; ignored (the other conditions apply)",
            "retry condition \"envoy-ratelimited\" is not implemented by Nodeway; ignored (the other conditions apply)",
        ]
    );
    let retries = loaded.snapshot.virtual_services[0].http[0]
        .retries
        .as_ref()
        .unwrap();
    assert!(retries.retry_on.five_xx);
    assert_eq!(retries.retry_on.to_string(), "5xx");
}

/// Valid in Istio (no match type is "any value"): loads, and matches all.
const EMPTY_MATCHES: &str = r#"---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: empty-matches, namespace: shop}
spec:
  hosts: [a]
  http:
  - match: [{uri: {}, method: {}, authority: {}}]
    route: [destination: {host: a}]
"#;

/// `consistentHash: {}` is valid Istio: Envoy has nothing to hash and picks
/// at random, so Nodeway does too, and says so.
#[test]
fn consistent_hash_without_a_key_is_random_with_a_warning() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: shop}
spec:
  host: a
  trafficPolicy:
    loadBalancer: {consistentHash: {ringHash: {minimumRingSize: 1024}}}
"#;
    let loaded = load_ok(yaml);
    let warnings: Vec<String> = loaded
        .warnings
        .iter()
        .map(|w| format!("{}: {}", w.field, w.message))
        .collect();
    assert!(
        warnings.contains(
            &"spec.trafficPolicy.loadBalancer.consistentHash: consistentHash sets no hash key: requests are spread at random (Envoy has nothing to hash)".to_string()
        ),
        "{warnings:?}"
    );
    let dr = &loaded.snapshot.destination_rules[0];
    assert!(matches!(
        dr.traffic_policy
            .as_ref()
            .unwrap()
            .load_balancer
            .as_ref()
            .unwrap()
            .policy,
        Some(LbPolicy::Simple(crate::state::SimpleLb::Random))
    ));
}

/// Istio reads a VirtualService without hosts as a delegate (valid); Nodeway
/// does not follow delegates, says so, and loads the rest.
#[test]
fn a_virtual_service_without_hosts_is_a_delegate_and_a_warning() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: delegate, namespace: shop}
spec:
  http:
  - route: [destination: {host: a}]
"#;
    let loaded = load_ok(yaml);
    let warnings: Vec<String> = loaded
        .warnings
        .iter()
        .map(|w| format!("{}: {}", w.field, w.message))
        .collect();
    assert!(
        warnings.contains(&"spec.hosts: no hosts: a delegate VirtualService, which Nodeway does not support yet; it routes nothing".to_string()),
        "{warnings:?}"
    );
}

/// More of Istio's rejections: host syntax, duplicate hosts, a
/// VirtualService with no routes, `retryOn` items Istio does not trim.
#[test]
fn istio_host_route_and_retry_on_rules() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: port, namespace: shop}
spec: {host: "reviews:9080"}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ip, namespace: shop}
spec: {host: 10.0.0.1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: fine, namespace: shop}
spec: {host: "*.shop.svc.cluster.local"}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hosts, namespace: shop}
spec:
  hosts: [a, "http://b", my_svc, a, 10.0.0.7]
  http:
  - route: [destination: {host: a}]
    retries: {attempts: 2, retryOn: "5xx, connect-failure,"}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: empty, namespace: shop}
spec:
  hosts: [a]
"#;
    let errors = load(yaml).unwrap_err();
    let found: Vec<String> = errors
        .iter()
        .map(|p| format!("{} {}: {}", p.name, p.field, p.message))
        .collect();
    let host = "a DNS name (labels of letters, digits and '-', optionally starting with \"*.\"), without scheme or port";
    let retry = "(Istio splits on \",\" and does not trim: no spaces, no empty items)";
    assert_eq!(
        found,
        [
            format!("shop/port spec.host: invalid host \"reviews:9080\": {host}"),
            format!("shop/ip spec.host: invalid host \"10.0.0.1\": {host}"),
            format!("shop/hosts spec.hosts[1]: invalid host \"http://b\": {host}"),
            format!("shop/hosts spec.hosts[2]: invalid host \"my_svc\": {host}"),
            "shop/hosts spec.hosts[3]: duplicate host \"a\" in virtual service".to_string(),
            format!(
                "shop/hosts spec.http[0].retries.retryOn: \" connect-failure\" is not a valid retryOn policy {retry}"
            ),
            format!(
                "shop/hosts spec.http[0].retries.retryOn: \"\" is not a valid retryOn policy {retry}"
            ),
            "shop/empty spec: http, tcp or tls must be provided in virtual service".to_string(),
        ]
    );
}

/// Istio's rules on durations, outlier detection and locality settings.
#[test]
fn istio_duration_outlier_and_locality_rules() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: shop}
spec:
  host: a
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 1500us}
    outlierDetection: {consecutiveLocalOriginFailures: 3}
    loadBalancer:
      localityLbSetting:
        distribute: [{from: "r/z1/*", to: {"r/z1/*": 100, "r/z2/*": 0}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: failover, namespace: shop}
spec:
  host: b
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        failover: [{from: "*", to: r2}]
"#;
    let errors = load(yaml).unwrap_err();
    let found: Vec<String> = errors
        .iter()
        .map(|p| format!("{} {}: {}", p.name, p.field, p.message))
        .collect();
    assert_eq!(
        found,
        [
            "shop/dr spec.trafficPolicy.connectionPool.tcp.connectTimeout: duration \"1500us\": only durations to ms precision are supported (Istio)",
            "shop/dr spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures: consecutiveLocalOriginFailures needs splitExternalLocalOriginErrors: true (Istio)",
            "shop/dr spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to.r/z2/*: locality weight must be between 1 and 100, got 0",
            "shop/failover spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0].from: failover does not take wildcards: \"*\"",
        ]
    );
}

/// Istio's rules on string matches and ring sizes.
#[test]
fn istio_match_and_ring_size_rules() {
    let long = "a".repeat(1025);
    let yaml = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs, namespace: shop}}
spec:
  hosts: [a]
  http:
  - match:
    - uri: {{prefix: ""}}
      method: {{prefix: ""}}
      headers: {{"x user": {{exact: a}}, x-empty: {{regex: ""}}}}
      queryParams: {{q: {{regex: "{long}"}}}}
    route: [destination: {{host: a}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: dr, namespace: shop}}
spec:
  host: a
  trafficPolicy:
    loadBalancer:
      consistentHash: {{httpHeaderName: x, minimumRingSize: 512, ringHash: {{minimumRingSize: 1024}}}}
"#
    );
    let errors = load(&yaml).unwrap_err();
    let found: Vec<String> = errors
        .iter()
        .map(|p| format!("{} {}: {}", p.name, p.field, p.message))
        .collect();
    assert_eq!(
        found,
        [
            "shop/vs spec.http[0].match[0].method.prefix: must not be empty",
            "shop/vs spec.http[0].match[0].headers.x user: invalid header name \"x user\": letters, digits and !#$%&'*+-.^_`|~ only",
            "shop/vs spec.http[0].match[0].headers.x-empty.regex: must not be empty",
            "shop/vs spec.http[0].match[0].queryParams.q.regex: regex is 1025 characters long; Istio allows at most 1024",
            "shop/dr spec.trafficPolicy.loadBalancer.consistentHash: only one of minimumRingSize and ringHash.minimumRingSize can be set",
        ]
    );
}

/// Istio refuses `0s` for these durations (CRD rule `duration(self) >=
/// duration('1ms')`); only `tcp.idleTimeout: 0s` is legal, meaning "none".
#[test]
fn zero_durations_are_read_as_istio_reads_them() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: shop}
spec:
  host: a
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnectionDuration: 0s
        tcpKeepalive: {time: 0s, interval: 0ms}
        idleTimeout: 0s
      http: {idleTimeout: 0s}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  hosts: [a]
  http:
  - route: [destination: {host: a}]
    timeout: 0s
"#;
    let found: Vec<String> = load_errors(yaml)
        .iter()
        .map(|p| format!("{} {}: {}", p.name, p.field, p.message))
        .collect();
    let zero = |name: &str, field: &str, value: &str| {
        format!(
            "{name} {field}: duration \"{value}\" is below Istio's minimum of 1ms; Istio refuses 0s here (leave the field out for its default)"
        )
    };
    let tcp = "spec.trafficPolicy.connectionPool.tcp";
    assert_eq!(
        found,
        [
            zero("shop/dr", &format!("{tcp}.tcpKeepalive.time"), "0s"),
            zero("shop/dr", &format!("{tcp}.tcpKeepalive.interval"), "0ms"),
            zero("shop/dr", &format!("{tcp}.maxConnectionDuration"), "0s"),
            zero(
                "shop/dr",
                "spec.trafficPolicy.connectionPool.http.idleTimeout",
                "0s"
            ),
            zero("shop/vs", "spec.http[0].timeout", "0s"),
        ]
    );
}

/// Empty policies, label, exportTo, gateway, selector and namespace syntax,
/// and regexes Rust accepts but Istio's RE2 does not.
#[test]
fn istio_policy_label_export_and_regex_rules() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: shop}
spec:
  host: a
  exportTo: ["*", "."]
  workloadSelector: {matchLabels: {"app": "*"}}
  trafficPolicy:
    connectionPool: {}
    portLevelSettings: [{port: {number: 80}}]
  subsets:
  - name: v1
    labels: {"version": "v 1"}
    trafficPolicy: {}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  hosts: [a]
  gateways: [mesh, "istio-system/"]
  exportTo: [shop, "."]
  http:
  - match:
    - uri: {regex: "(?x) /a b"}
      headers: {x-a: {regex: "a{1001}"}, x-b: {regex: "\\bword\\b"}}
      sourceLabels: {"-app": client}
      sourceNamespace: Shop_1
    route: [destination: {host: a}]
"#;
    let found: Vec<String> = load_errors(yaml)
        .iter()
        .map(|p| format!("{} {}: {}", p.name, p.field, p.message))
        .collect();
    assert_eq!(
        found,
        [
            "shop/dr spec.trafficPolicy.portLevelSettings[0]: port traffic policy must have at least one field",
            "shop/dr spec.trafficPolicy.connectionPool: connection pool must have at least one field",
            "shop/dr spec.subsets[0].labels: invalid label value \"v 1\": empty, or letters, digits, '-', '_' and '.' starting and ending with a letter or digit",
            "shop/dr spec.subsets[0].trafficPolicy: traffic policy must have at least one field",
            "shop/dr spec.exportTo: cannot have both public (*) and non-public exportTo values for a resource",
            "shop/dr spec.exportTo: a destination rule with a workload selector cannot be exported beyond its own namespace",
            "shop/dr spec.workloadSelector.matchLabels: workload selector label \"app=*\": wildcards are not supported",
            "shop/vs spec.gateways[1]: invalid gateway name \"istio-system/\": mesh, <namespace>/<name>, or a DNS name",
            "shop/vs spec.exportTo: duplicate entries in exportTo: . and the object's own namespace shop",
            "shop/vs spec.http[0].match[0].uri.regex: regex uses the x flag (RE2 has i, m, s and U), which Istio's RE2 does not support",
            "shop/vs spec.http[0].match[0].headers.x-a.regex: regex uses a repeat count of 1001 (RE2 allows at most 1000), which Istio's RE2 does not support",
            "shop/vs spec.http[0].match[0].sourceLabels: invalid label key \"-app\": [prefix/]name, where name is letters, digits, '-', '_' and '.' starting and ending with a letter or digit",
            "shop/vs spec.http[0].match[0].sourceNamespace: sourceNamespace \"Shop_1\" is not a valid namespace name (a DNS-1123 label)",
        ]
    );
}

/// What Istio accepts here must load: a policy holding only a field Nodeway
/// ignores, RE2's `\Q…\E` quoting, and `withoutHeaders` `regex: "*"`
/// (header absent).
#[test]
fn istio_accepts_these_and_so_does_nodeway() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: shop}
spec:
  host: a
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
  subsets: [{name: v1, labels: {app.kubernetes.io/version: "1.2_b", empty: ""}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  hosts: [a]
  gateways: [mesh]
  exportTo: [".", other]
  http:
  - match:
    - uri: {regex: "\\Q/v1.0\\E/.*"}
      withoutHeaders: {x-debug: {regex: "*"}}
    route: [destination: {host: a}]
"#;
    let loaded = load_ok(yaml);
    let warnings: Vec<String> = loaded
        .warnings
        .iter()
        .map(|w| format!("{}: {}", w.field, w.message))
        .collect();
    assert_eq!(
        warnings,
        [
            "spec.trafficPolicy.tls: field is not supported by Nodeway and is ignored",
            "spec.http[0].route[0].destination.host: host \"a\" does not match any Service in the config (fine if a ServiceEntry defines it)"
        ]
    );
    let matcher = &loaded.snapshot.virtual_services[0].http[0].matches[0];
    let uri = matcher.uri.as_ref().unwrap();
    assert!(uri.matches("/v1.0/x"));
    assert!(!uri.matches("/v1x0/x"), "the quoted dot is literal");
    let (name, absent) = &matcher.without_headers[0];
    assert_eq!(name, "x-debug");
    assert!(
        absent.matches("1") && absent.matches(""),
        "any value counts as present"
    );
}
