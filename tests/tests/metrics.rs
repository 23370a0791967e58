//! The Prometheus endpoint: scrapes `/metrics`, parses the exposition, and
//! checks exact counter deltas per (source workload, cluster) for the
//! resilience cases, Istio's request and TCP metrics, Nodeway's gauges, and
//! that the label sets the usual dashboards query exist.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use nodeway_tests::{Outcome, Proto, connect_from, refused_addr, request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVICE: &str = "mock.default.svc.cluster.local";
/// A second pod of the `sleep` Deployment.
const SLEEP2_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, 7));

const SLEEP2_POD: &str = r#"---
apiVersion: v1
kind: Pod
metadata:
  name: sleep-5d9c7b8f6-fghij
  namespace: default
  labels: {app: sleep, pod-template-hash: 5d9c7b8f6}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: sleep-5d9c7b8f6, uid: "1"}
spec:
  containers: [{name: sleep, image: curl}]
status:
  podIP: 127.0.1.7
  podIPs: [{ip: 127.0.1.7}]
"#;

fn with_extra(mut config: MeshConfig, extra: &str) -> MeshConfig {
    config.extra.push_str(extra);
    config
}

// ---------------------------------------------------------------------------
// A small parser for the text exposition
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug)]
struct Scrape {
    content_type: String,
    /// `# TYPE` per family.
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

/// Parses `name{k="v",…} value` lines (with `\\`, `\"`, `\n` escapes in
/// values) and `# TYPE` lines; checks every sample belongs to a declared
/// family and no series appears twice.
fn parse(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
    let mut types = HashMap::new();
    let mut samples = Vec::new();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            assert!(
                types.insert(name.to_string(), ty.to_string()).is_none(),
                "family {name} declared twice"
            );
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name = &line[..name_end];
        let chars: Vec<char> = line[name_end..].chars().collect();
        let mut i = 0;
        let mut labels = BTreeMap::new();
        if chars[0] == '{' {
            i = 1;
            while chars[i] != '}' {
                let mut key = String::new();
                while chars[i] != '=' {
                    key.push(chars[i]);
                    i += 1;
                }
                assert_eq!(chars[i + 1], '"', "label value quoted: {line}");
                i += 2;
                let mut value = String::new();
                loop {
                    match chars[i] {
                        '\\' => {
                            value.push(match chars[i + 1] {
                                'n' => '\n',
                                c => c,
                            });
                            i += 2;
                        }
                        '"' => {
                            i += 1;
                            break;
                        }
                        c => {
                            value.push(c);
                            i += 1;
                        }
                    }
                }
                assert!(
                    labels.insert(key.clone(), value).is_none(),
                    "label {key} twice: {line}"
                );
                if chars[i] == ',' {
                    i += 1;
                }
            }
            i += 1;
        }
        let rest: String = chars[i..].iter().collect();
        let value_text = rest.split_whitespace().next().expect("a value");
        let value: f64 = match value_text {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value {v:?}: {line}")),
        };
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    let mut seen = HashSet::new();
    for s in &samples {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                s.name
                    .strip_suffix(suffix)
                    .filter(|f| types.contains_key(*f))
            })
            .unwrap_or(&s.name);
        assert!(types.contains_key(family), "{} has no # TYPE", s.name);
        assert!(
            seen.insert((s.name.clone(), s.labels.clone())),
            "series twice: {} {:?}",
            s.name,
            s.labels
        );
    }
    (types, samples)
}

impl Scrape {
    /// Sum over the series of `name` that carry all of `labels` (0 if none):
    /// `sum(name{labels})` in PromQL.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Whether every series of `name` has each of `labels` (PromQL `sum by`).
    fn labelled_by(&self, name: &str, labels: &[&str]) -> bool {
        let mut any = false;
        for s in self.matching(name, &[]) {
            any = true;
            if !labels.iter().all(|l| s.labels.contains_key(*l)) {
                return false;
            }
        }
        any
    }

    fn names(&self) -> HashSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }
}

async fn scrape_path(h: &Harness, path: &str) -> Scrape {
    let addr = h.proxy.as_ref().unwrap().metrics_addr;
    let out = request(
        Proto::Http1,
        addr,
        "127.0.0.1".parse().unwrap(),
        "metrics",
        path,
        Bytes::new(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(out.status, Some(200), "{out:?}");
    let text = String::from_utf8(out.body.to_vec()).expect("UTF-8 exposition");
    let (types, samples) = parse(&text);
    Scrape {
        content_type: out
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        types,
        samples,
    }
}

async fn scrape(h: &Harness) -> Scrape {
    scrape_path(h, "/metrics").await
}

/// `(after - before)` of `sum(name{labels})`.
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

/// Labels of one (source workload, cluster) Envoy series.
fn of(workload: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("source_workload", workload),
        ("source_namespace", "default"),
        ("cluster_name", CLUSTER),
    ]
}

async fn call_from(h: &Harness, src: IpAddr, path: &str) -> Outcome {
    request(
        Proto::Http1,
        h.addr(),
        src,
        AUTHORITY,
        path,
        Bytes::new(),
        Duration::from_secs(20),
    )
    .await
}

// ---------------------------------------------------------------------------
// Resilience cases
// ---------------------------------------------------------------------------

/// maxConnections 1, pending 1, three concurrent slow requests from `sleep`:
/// one overflow of the pending queue, two of the connection limit, counted
/// for `sleep` only; `web`, a neighbour with the same DestinationRule, has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_is_counted_for_the_saturating_workload_only() {
    let m = mock("m").await;
    let h = Harness::start(&with_extra(
        with_extra(MeshConfig::new(vec![m.addr()]), DR_A),
        WEB_POD,
    ))
    .await;
    let before = scrape(&h).await;
    let addr = h.addr();
    let spawn_call = || {
        tokio::spawn(async move {
            request(
                Proto::Http1,
                addr,
                CLIENT_IP,
                AUTHORITY,
                "/delay/1000",
                Bytes::new(),
                Duration::from_secs(20),
            )
            .await
        })
    };
    let first = spawn_call();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = spawn_call();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = call_from(&h, CLIENT_IP, "/delay/1000").await;
    assert_eq!(third.status, Some(503), "{third:?}");
    for _ in 0..3 {
        assert_eq!(call_from(&h, WEB_IP, "/status/200").await.status, Some(200));
    }
    assert_eq!(first.await.unwrap().status, Some(200));
    assert_eq!(second.await.unwrap().status, Some(200));
    h.log.wait_for(6, Duration::from_secs(10)).await;
    let after = scrape(&h).await;

    let d = |name: &str, who: &'static str| delta(&before, &after, name, &of(who));
    assert_eq!(
        d("envoy_cluster_upstream_rq_pending_overflow_total", "sleep"),
        1.0
    );
    assert_eq!(d("envoy_cluster_upstream_cx_overflow_total", "sleep"), 2.0);
    assert_eq!(d("envoy_cluster_upstream_rq_pending_total", "sleep"), 1.0);
    assert_eq!(d("envoy_cluster_upstream_cx_total", "sleep"), 1.0);
    assert_eq!(
        d("envoy_cluster_upstream_cx_connect_ms_count", "sleep"),
        1.0
    );
    // One connection: in the +Inf bucket and in every cumulative bucket at
    // or above its connect time (all 20 on an idle machine; fewer when a
    // loaded one took longer than the smallest bounds).
    let mut inf = of("sleep").to_vec();
    inf.push(("le", "+Inf"));
    assert_eq!(
        delta(
            &before,
            &after,
            "envoy_cluster_upstream_cx_connect_ms_bucket",
            &inf
        ),
        1.0
    );
    let buckets = d("envoy_cluster_upstream_cx_connect_ms_bucket", "sleep");
    assert!(
        (1.0..=20.0).contains(&buckets),
        "one connection counted in at most the 19 cumulative buckets and +Inf: {buckets}"
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "envoy_cluster_upstream_rq_xx",
            &[
                ("source_workload", "sleep"),
                ("cluster_name", CLUSTER),
                ("envoy_response_code_class", "2"),
            ]
        ),
        2.0
    );

    assert_eq!(
        d("envoy_cluster_upstream_rq_pending_overflow_total", "web"),
        0.0
    );
    assert_eq!(d("envoy_cluster_upstream_cx_overflow_total", "web"), 0.0);
    assert_eq!(d("envoy_cluster_upstream_rq_total", "web"), 3.0);
    assert_eq!(
        d("envoy_cluster_upstream_cx_connect_ms_count", "web"),
        d("envoy_cluster_upstream_cx_total", "web"),
    );
    assert_eq!(
        after.sum("envoy_cluster_upstream_rq_active", &of("sleep")),
        0.0
    );
    assert_eq!(
        after.sum("envoy_cluster_upstream_cx_active", &of("sleep")),
        1.0,
        "the keep-alive connection stays open"
    );

    // Istio's view of the same requests.
    let istio = |who: &str, code: &str, flags: &str| {
        delta(
            &before,
            &after,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", who),
                ("destination_service", SERVICE),
                ("response_code", code),
                ("response_flags", flags),
            ],
        )
    };
    assert_eq!(istio("sleep", "503", "UO"), 1.0);
    assert_eq!(istio("sleep", "200", "-"), 2.0);
    assert_eq!(istio("web", "200", "-"), 3.0);
    assert_eq!(istio("web", "503", "UO"), 0.0);
    let web = after
        .matching("istio_requests_total", &[("source_workload", "web")])
        .next()
        .expect("a web series")
        .labels
        .clone();
    for (k, v) in [
        ("source_app", "web"),
        ("source_version", "v2"),
        ("source_canonical_service", "web"),
        ("source_canonical_revision", "v2"),
        ("source_workload_namespace", "default"),
        ("source_principal", "unknown"),
        ("source_cluster", "Kubernetes"),
        ("destination_service_name", "mock"),
        ("destination_service_namespace", "default"),
        // The mock's endpoints have no Pod behind them.
        ("destination_workload", "unknown"),
        ("request_protocol", "http"),
        ("grpc_response_status", ""),
        ("connection_security_policy", "unknown"),
    ] {
        assert_eq!(web.get(k).map(String::as_str), Some(v), "{k} in {web:?}");
    }
    assert_eq!(
        delta(
            &before,
            &after,
            "istio_request_duration_milliseconds_count",
            &[("source_workload", "sleep")]
        ),
        3.0
    );
    let slow = after.sum(
        "istio_request_duration_milliseconds_bucket",
        &[
            ("source_workload", "sleep"),
            ("response_code", "200"),
            ("le", "500.0"),
        ],
    );
    assert_eq!(slow, 0.0, "the two 200s took over a second");
    assert_eq!(
        after.sum("istio_response_bytes_count", &[("source_workload", "web")]),
        3.0
    );
}

/// An endpoint refusing connections, retries on connect-failure, DR A:
/// retries, the exhausted retry budget, connect failures and the ejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_ejections_are_counted() {
    let dead = refused_addr("127.0.0.1".parse().unwrap());
    let h = Harness::start(&with_extra(
        MeshConfig::new(vec![dead]).with_route("10s", 2, "connect-failure"),
        DR_A,
    ))
    .await;
    let before = scrape(&h).await;
    for _ in 0..3 {
        assert_eq!(
            call_from(&h, CLIENT_IP, "/status/200").await.status,
            Some(503)
        );
    }
    h.log.wait_for(3, Duration::from_secs(10)).await;
    let after = scrape(&h).await;
    let d = |name: &str| delta(&before, &after, name, &of("sleep"));
    assert_eq!(d("envoy_cluster_upstream_rq_retry_total"), 4.0);
    assert_eq!(
        d("envoy_cluster_upstream_rq_retry_limit_exceeded_total"),
        1.0
    );
    assert_eq!(d("envoy_cluster_upstream_rq_retry_success_total"), 0.0);
    assert_eq!(d("envoy_cluster_upstream_cx_connect_fail_total"), 5.0);
    assert_eq!(d("envoy_cluster_upstream_cx_connect_ms_count"), 0.0);
    assert_eq!(
        d("envoy_cluster_outlier_detection_ejections_enforced_total"),
        1.0
    );
    assert_eq!(
        d("envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx_total"),
        1.0
    );
    assert_eq!(
        d("envoy_cluster_outlier_detection_ejections_detected_consecutive_5xx_total"),
        1.0
    );
    assert_eq!(
        d("envoy_cluster_outlier_detection_ejections_overflow_total"),
        0.0
    );
    assert_eq!(
        after.sum(
            "envoy_cluster_outlier_detection_ejections_active",
            &of("sleep")
        ),
        1.0
    );
    let istio = |code: &str, flags: &str| {
        delta(
            &before,
            &after,
            "istio_requests_total",
            &[
                ("source_workload", "sleep"),
                ("response_code", code),
                ("response_flags", flags),
            ],
        )
    };
    assert_eq!(istio("503", "URX,UF"), 1.0);
    assert_eq!(istio("503", "UH"), 2.0);
}

/// Five 503s from the endpoint eject it; the next three are `UH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_ejection_is_counted() {
    let m = mock("m").await;
    let h = Harness::start(&with_extra(
        MeshConfig::new(vec![m.addr()]).with_route("30s", 0, "5xx"),
        DR_A,
    ))
    .await;
    let before = scrape(&h).await;
    for _ in 0..8 {
        call_from(&h, CLIENT_IP, "/status/503").await;
    }
    h.log.wait_for(8, Duration::from_secs(10)).await;
    let after = scrape(&h).await;
    let d = |name: &str| delta(&before, &after, name, &of("sleep"));
    assert_eq!(
        d("envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx_total"),
        1.0
    );
    assert_eq!(
        d("envoy_cluster_outlier_detection_ejections_enforced_total"),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "envoy_cluster_upstream_rq_xx",
            &[
                ("source_workload", "sleep"),
                ("envoy_response_code_class", "5")
            ]
        ),
        5.0
    );
    let istio = |flags: &str| {
        delta(
            &before,
            &after,
            "istio_requests_total",
            &[
                ("source_workload", "sleep"),
                ("response_code", "503"),
                ("response_flags", flags),
            ],
        )
    };
    assert_eq!(istio("-"), 5.0, "answered by the endpoint");
    assert_eq!(istio("UH"), 3.0, "answered by the proxy after the ejection");
}

/// The route timeout (`upstream_rq_timeout`) and per-try timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_counted() {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()]).with_route("500ms", 0, "5xx")).await;
    let before = scrape(&h).await;
    let out = call_from(&h, CLIENT_IP, "/delay/2000").await;
    assert_eq!(out.status, Some(504));
    h.log.wait_for(1, Duration::from_secs(10)).await;
    let after = scrape(&h).await;
    let d = |name: &str| delta(&before, &after, name, &of("sleep"));
    assert_eq!(d("envoy_cluster_upstream_rq_timeout_total"), 1.0);
    assert_eq!(d("envoy_cluster_upstream_rq_per_try_timeout_total"), 0.0);
    assert_eq!(
        delta(
            &before,
            &after,
            "istio_requests_total",
            &[("response_code", "504"), ("response_flags", "UT")]
        ),
        1.0
    );

    let mut config = MeshConfig::new(vec![m.addr()]);
    config.route_yaml = Some(
        "    timeout: 10s\n    retries:\n      attempts: 1\n      perTryTimeout: 300ms\n      retryOn: 5xx\n"
            .into(),
    );
    let h = Harness::start(&config).await;
    let before = scrape(&h).await;
    let out = call_from(&h, CLIENT_IP, "/delay/2000").await;
    assert_eq!(out.status, Some(504));
    h.log.wait_for(1, Duration::from_secs(10)).await;
    let after = scrape(&h).await;
    let d = |name: &str| delta(&before, &after, name, &of("sleep"));
    assert_eq!(d("envoy_cluster_upstream_rq_per_try_timeout_total"), 2.0);
    assert_eq!(d("envoy_cluster_upstream_rq_retry_total"), 1.0);
    assert_eq!(d("envoy_cluster_upstream_rq_timeout_total"), 0.0);
}

// ---------------------------------------------------------------------------
// TCP, gRPC, the exposition itself, Nodeway's gauges
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_counted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), tokio::io::copy(&mut r, &mut w))
                        .await;
                let _ = w.shutdown().await;
            });
        }
    });
    let mut config = MeshConfig::new(vec![echo]);
    config.port_name = "tcp".into();
    let vip: SocketAddr = "10.96.0.20:8080".parse().unwrap();
    let h = Harness::start_with(&config, Arc::new(FixedOriginalDst(Some(vip))), |_| {}).await;
    let before = scrape(&h).await;
    for _ in 0..2 {
        let mut s = connect_from(CLIENT_IP, h.addr()).await.unwrap();
        s.write_all(b"hello tcp").await.unwrap();
        let mut back = [0u8; 9];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello tcp");
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    h.log.wait_for(2, Duration::from_secs(10)).await;
    let after = scrape(&h).await;
    let labels = [
        ("reporter", "source"),
        ("source_workload", "sleep"),
        ("destination_service", SERVICE),
        ("request_protocol", "tcp"),
    ];
    let d = |name: &str| delta(&before, &after, name, &labels);
    assert_eq!(d("istio_tcp_connections_opened_total"), 2.0);
    assert_eq!(d("istio_tcp_connections_closed_total"), 2.0);
    assert_eq!(d("istio_tcp_sent_bytes_total"), 18.0);
    assert_eq!(d("istio_tcp_received_bytes_total"), 18.0);
    assert_eq!(
        delta(
            &before,
            &after,
            "envoy_cluster_upstream_cx_connect_ms_count",
            &of("sleep")
        ),
        2.0
    );
    assert!(
        after
            .matching("istio_tcp_connections_closed_total", &labels)
            .all(|s| s.labels["response_flags"] == "-" && !s.labels.contains_key("response_code")),
        "TCP series carry response_flags, not response_code"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_carry_grpc_status() {
    let m = mock("m").await;
    let mut config = MeshConfig::new(vec![m.addr()]);
    config.port_name = "grpc".into();
    let h = Harness::start(&config).await;
    let out = request(
        Proto::Grpc,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        "/status/200",
        Bytes::new(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(out.grpc_status.unwrap_or(0), 0, "{out:?}");
    h.log.wait_for(1, Duration::from_secs(10)).await;
    let after = scrape(&h).await;
    assert_eq!(
        after.sum(
            "istio_requests_total",
            &[
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", "0"),
            ]
        ),
        1.0,
        "{:#?}",
        after
            .matching("istio_requests_total", &[])
            .collect::<Vec<_>>()
    );
}

/// Issue 13: a label value an upstream chooses must come from a known set,
/// or one upstream could grow the series without bound. gRPC statuses
/// outside 0–16 are counted as 2 (UNKNOWN, as gRPC reads unknown codes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_chosen_label_values_are_clamped() {
    let m = mock("m").await;
    let mut config = MeshConfig::new(vec![m.addr()]);
    config.port_name = "grpc".into();
    let h = Harness::start(&config).await;
    for status in [17, 1000, 2_000_000_000] {
        let out = request(
            Proto::Grpc,
            h.addr(),
            CLIENT_IP,
            AUTHORITY,
            &format!("/grpc-status/{status}"),
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(out.status, Some(200), "{out:?}");
    }
    h.log.wait_for(3, Duration::from_secs(10)).await;
    let after = scrape(&h).await;
    let statuses: HashSet<String> = after
        .matching("istio_requests_total", &[("request_protocol", "grpc")])
        .filter_map(|s| s.labels.get("grpc_response_status").cloned())
        .collect();
    assert_eq!(statuses, HashSet::from(["2".to_string()]), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_serves_dashboard_queries() {
    let m = mock("m").await;
    let h = Harness::start(&with_extra(MeshConfig::new(vec![m.addr()]), WEB_POD)).await;
    // A request nothing routes: counted with an unknown destination.
    let nr = request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        "nowhere.example:80",
        "/",
        Bytes::new(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(nr.status, Some(404));
    assert_eq!(
        call_from(&h, CLIENT_IP, "/status/200").await.status,
        Some(200)
    );
    h.log.wait_for(2, Duration::from_secs(10)).await;
    let metrics = scrape(&h).await;
    let prom = scrape_path(&h, "/stats/prometheus").await;
    assert_eq!(metrics.content_type, prom.content_type);
    assert!(
        metrics
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        metrics.content_type
    );
    assert_eq!(metrics.names(), prom.names());

    // `sum by (cluster_name) (rate(envoy_cluster_upstream_rq_timeout_total[5m]))`
    assert_eq!(
        metrics
            .types
            .get("envoy_cluster_upstream_rq_timeout")
            .map(String::as_str),
        Some("counter")
    );
    assert!(metrics.labelled_by(
        "envoy_cluster_upstream_rq_timeout_total",
        &["cluster_name", "source_workload", "source_namespace"]
    ));
    // `sum by (response_flags) (rate(istio_requests_total[5m]))`
    assert_eq!(
        metrics.types.get("istio_requests").map(String::as_str),
        Some("counter")
    );
    assert!(metrics.labelled_by(
        "istio_requests_total",
        &[
            "reporter",
            "source_workload",
            "source_workload_namespace",
            "source_principal",
            "source_app",
            "source_version",
            "source_cluster",
            "destination_workload",
            "destination_workload_namespace",
            "destination_principal",
            "destination_app",
            "destination_version",
            "destination_service",
            "destination_service_name",
            "destination_service_namespace",
            "destination_cluster",
            "request_protocol",
            "response_code",
            "response_flags",
            "grpc_response_status",
            "connection_security_policy",
        ]
    ));
    assert_eq!(
        metrics.sum(
            "istio_requests_total",
            &[
                ("response_code", "404"),
                ("response_flags", "NR"),
                ("destination_service", "unknown"),
            ]
        ),
        1.0
    );
    for family in [
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
        "envoy_cluster_upstream_cx_connect_ms",
    ] {
        assert_eq!(
            metrics.types.get(family).map(String::as_str),
            Some("histogram"),
            "{family}"
        );
    }
    for gauge in [
        "envoy_cluster_upstream_rq_pending_active",
        "envoy_cluster_upstream_rq_active",
        "envoy_cluster_upstream_cx_active",
        "envoy_cluster_outlier_detection_ejections_active",
        "nodeway_config_generation",
        "nodeway_config_last_reload_success",
        "nodeway_enrolled_workloads",
        "nodeway_client_upstream_connections",
        "nodeway_node_upstream_connections",
        "nodeway_node_upstream_connections_limit",
        "process_resident_memory_bytes",
    ] {
        assert_eq!(
            metrics.types.get(gauge).map(String::as_str),
            Some("gauge"),
            "{gauge}"
        );
    }
    let names = metrics.names();
    for name in [
        "envoy_cluster_upstream_rq_total",
        "envoy_cluster_upstream_rq_xx",
        "envoy_cluster_upstream_rq_per_try_timeout_total",
        "envoy_cluster_upstream_rq_retry_total",
        "envoy_cluster_upstream_rq_retry_success_total",
        "envoy_cluster_upstream_rq_retry_limit_exceeded_total",
        "envoy_cluster_upstream_rq_retry_overflow_total",
        "envoy_cluster_upstream_rq_pending_total",
        "envoy_cluster_upstream_rq_pending_overflow_total",
        "envoy_cluster_upstream_rq_cancelled_total",
        "envoy_cluster_upstream_cx_total",
        "envoy_cluster_upstream_cx_overflow_total",
        "envoy_cluster_upstream_cx_connect_fail_total",
        "envoy_cluster_upstream_cx_connect_timeout_total",
        "envoy_cluster_upstream_cx_idle_timeout_total",
        "envoy_cluster_outlier_detection_ejections_enforced_total",
        "envoy_cluster_outlier_detection_ejections_overflow_total",
        "envoy_cluster_outlier_detection_ejections_enforced_consecutive_gateway_failure_total",
        "envoy_cluster_outlier_detection_ejections_detected_consecutive_5xx_total",
        "nodeway_access_log_dropped_total",
        "process_cpu_seconds_total",
    ] {
        assert!(names.contains(name), "{name} missing");
    }
    assert_eq!(metrics.sum("nodeway_config_generation", &[]), 1.0);
    assert_eq!(metrics.sum("nodeway_config_last_reload_success", &[]), 1.0);
    assert_eq!(
        metrics.sum("nodeway_enrolled_workloads", &[]),
        2.0,
        "sleep and web"
    );
    assert_eq!(
        metrics.sum("nodeway_node_upstream_connections_limit", &[]),
        16384.0
    );
    assert_eq!(
        metrics.sum(
            "nodeway_client_upstream_connections",
            &[("source_workload", "sleep")]
        ),
        1.0,
        "the keep-alive connection"
    );
    assert_eq!(metrics.sum("nodeway_node_upstream_connections", &[]), 1.0);
    assert!(metrics.sum("process_resident_memory_bytes", &[]) > 0.0);
    // Endpoint addresses never become labels.
    let ep = m.addr().to_string();
    assert!(
        metrics
            .samples
            .iter()
            .all(|s| s.labels.values().all(|v| !v.contains(&ep))),
        "an endpoint address is a label value"
    );

    // A bad reload shows up as last_reload_success 0.
    std::fs::write(&h.config_path, "kind: [not valid").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(&h).await;
        if s.sum("nodeway_config_last_reload_success", &[]) == 0.0 {
            assert_eq!(s.sum("nodeway_config_generation", &[]), 1.0);
            break;
        }
        assert!(Instant::now() < deadline, "reload error not reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until configuration `generation` is installed.
async fn wait_generation(h: &Harness, generation: f64) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(h).await;
        if s.sum("nodeway_config_generation", &[]) >= generation {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "generation {generation} not installed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two pods of `sleep` and one of `web`: a `sleep` pod leaving the config
/// keeps the workload's sums (no false counter reset); `web` leaving takes
/// its series with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_leaving_the_config() {
    let m = mock("m").await;
    let base = MeshConfig::new(vec![m.addr()]);
    let full = with_extra(
        with_extra(MeshConfig::new(vec![m.addr()]), WEB_POD),
        SLEEP2_POD,
    );
    let h = Harness::start(&full).await;
    for src in [CLIENT_IP, SLEEP2_IP, SLEEP2_IP, WEB_IP] {
        assert_eq!(call_from(&h, src, "/status/200").await.status, Some(200));
    }
    h.log.wait_for(4, Duration::from_secs(10)).await;
    let before = scrape(&h).await;
    assert_eq!(
        before.sum("envoy_cluster_upstream_rq_total", &of("sleep")),
        3.0
    );
    assert_eq!(
        before.sum("istio_requests_total", &[("source_workload", "sleep")]),
        3.0
    );
    assert_eq!(
        before.sum("envoy_cluster_upstream_rq_total", &of("web")),
        1.0
    );

    std::fs::write(&h.config_path, base.render()).unwrap();
    let after = wait_generation(&h, 2.0).await;
    assert_eq!(
        after.sum("envoy_cluster_upstream_rq_total", &of("sleep")),
        3.0,
        "the departed sleep pod's requests still count for the workload"
    );
    assert_eq!(
        after.sum("istio_requests_total", &[("source_workload", "sleep")]),
        3.0
    );
    assert_eq!(
        after.sum("envoy_cluster_upstream_cx_active", &of("sleep")),
        1.0,
        "gauges are the live pods' only"
    );
    assert!(
        after
            .samples
            .iter()
            .all(|s| s.labels.get("source_workload").map(String::as_str) != Some("web")),
        "web left the node: its series are gone"
    );
    assert_eq!(after.sum("nodeway_enrolled_workloads", &[]), 1.0);

    // The remaining pod keeps counting on top.
    assert_eq!(
        call_from(&h, CLIENT_IP, "/status/200").await.status,
        Some(200)
    );
    h.log.wait_for(5, Duration::from_secs(10)).await;
    let later = scrape(&h).await;
    assert_eq!(
        later.sum("envoy_cluster_upstream_rq_total", &of("sleep")),
        4.0
    );
}

/// A Service that leaves the configuration takes its cluster's series with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_of_removed_services_disappear() {
    const OTHER_CLUSTER: &str = "outbound|9090||other.default.svc.cluster.local";
    let m = mock("m").await;
    let other = format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: other, namespace: default}}
spec:
  clusterIP: 10.96.0.21
  ports:
  - {{name: web, port: 9090, targetPort: 9090}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other-0
  namespace: default
  labels: {{kubernetes.io/service-name: other}}
addressType: IPv4
ports: [{{name: web, port: {port}}}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ready: true}}
"#,
        port = m.addr().port(),
        ip = m.addr().ip()
    );
    let h = Harness::start(&with_extra(MeshConfig::new(vec![m.addr()]), &other)).await;
    let out = request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        "other.default.svc.cluster.local:9090",
        "/status/200",
        Bytes::new(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(out.status, Some(200), "{out:?}");
    assert_eq!(
        call_from(&h, CLIENT_IP, "/status/200").await.status,
        Some(200)
    );
    h.log.wait_for(2, Duration::from_secs(10)).await;
    let before = scrape(&h).await;
    assert_eq!(
        before.sum(
            "envoy_cluster_upstream_rq_total",
            &[("cluster_name", OTHER_CLUSTER)]
        ),
        1.0
    );
    assert_eq!(
        before.sum(
            "istio_requests_total",
            &[("destination_service_name", "other")]
        ),
        1.0
    );

    std::fs::write(&h.config_path, MeshConfig::new(vec![m.addr()]).render()).unwrap();
    let after = wait_generation(&h, 2.0).await;
    assert!(
        after
            .samples
            .iter()
            .all(
                |s| s.labels.get("cluster_name").map(String::as_str) != Some(OTHER_CLUSTER)
                    && s.labels.get("destination_service_name").map(String::as_str)
                        != Some("other")
            ),
        "the removed Service's series are gone"
    );
    assert_eq!(
        after.sum("envoy_cluster_upstream_rq_total", &of("sleep")),
        1.0,
        "the remaining cluster keeps its counts"
    );
}
