//! The admin API (`/stats` text and JSON, `/reset_counters`, `/endpoints`,
//! `/config_dump`, `/logging`, readiness), the `nodeway stats|endpoints|config`
//! subcommands against a running binary, and the Grafana dashboard's metric
//! names.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use nodeway_tests::{Outcome, Proto, request};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Ejects an endpoint at its first 5xx, for long enough to outlive the test.
const DR_EJECT: &str = r#"---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mock, namespace: default}
spec:
  host: mock
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 1, interval: 10s, baseEjectionTime: 300s, maxEjectionPercent: 100}
"#;

/// `mock` with one good and one always-failing endpoint, the DR above, no retries.
fn ejection_config(good: SocketAddr, bad: SocketAddr) -> MeshConfig {
    let mut config = MeshConfig::new(vec![good, bad]).with_route("30s", 0, "5xx");
    config.extra.push_str(DR_EJECT);
    config
}

/// One request over a fresh connection: `(status, body)`.
async fn admin_call(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("admin API reachable");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.expect("admin answer");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("admin answers within 10 s");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line in {head:?}"));
    (status, body.to_string())
}

/// `GET` that must answer 200.
async fn admin_get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = admin_call(addr, "GET", path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// The value of one `name: value` line of `/stats`.
fn stat_line(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.parse().ok())
}

async fn call_from(h: &Harness, src: IpAddr, path: &str) -> Outcome {
    request(
        Proto::Http1,
        h.addr(),
        src,
        AUTHORITY,
        path,
        Bytes::new(),
        Duration::from_secs(10),
    )
    .await
}

/// Sends requests as `sleep` until `bad` is ejected (at most 10).
async fn eject(proxy: SocketAddr, bad: SocketAddr, admin: SocketAddr) {
    for _ in 0..10 {
        let _ = request(
            Proto::Http1,
            proxy,
            CLIENT_IP,
            AUTHORITY,
            "/status/200",
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await;
        let endpoints: Value =
            serde_json::from_str(&admin_get(admin, "/endpoints?format=json").await).unwrap();
        if endpoints
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["endpoint"] == bad.to_string() && e["outlier_check"] == "FAILED")
        {
            return;
        }
    }
    panic!("{bad} was not ejected after 10 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_text_sums_clients_and_filters() {
    let m = mock("m").await;
    let mut config = MeshConfig::new(vec![m.addr()]).with_route("30s", 0, "5xx");
    config.extra.push_str(WEB_POD);
    let h = Harness::start(&config).await;
    for _ in 0..3 {
        assert_eq!(
            call_from(&h, CLIENT_IP, "/status/200").await.status,
            Some(200)
        );
    }
    for _ in 0..2 {
        assert_eq!(call_from(&h, WEB_IP, "/status/200").await.status, Some(200));
    }
    let total = format!("cluster.{CLUSTER}.upstream_rq_total");

    let all = admin_get(h.admin(), "/stats").await;
    assert_eq!(stat_line(&all, &total), Some(5), "{all}");
    assert_eq!(
        stat_line(&all, &format!("cluster.{CLUSTER}.upstream_rq_2xx")),
        Some(5)
    );
    assert!(
        all.lines().any(|l| l == format!("{total}: 5")),
        "Envoy's `name: value` form:\n{all}"
    );
    assert_eq!(
        stat_line(&all, "nodeway.node.max_upstream_connections"),
        Some(16384),
        "{all}"
    );
    let names: Vec<&str> = all.lines().map(|l| l.split(": ").next().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "sorted by name, as Envoy does");
    assert!(
        all.lines()
            .filter(|l| l.starts_with("cluster."))
            .all(|l| l.starts_with(&format!("cluster.{CLUSTER}."))),
        "{all}"
    );

    // One client workload, by name, namespace/name or pod.
    for source in ["sleep", "default/sleep", SLEEP_POD] {
        let text = admin_get(h.admin(), &format!("/stats?source={source}")).await;
        assert_eq!(stat_line(&text, &total), Some(3), "source={source}\n{text}");
        assert!(
            !text.contains("nodeway.node."),
            "node-wide lines only unrestricted"
        );
    }
    let web = admin_get(h.admin(), "/stats?source=default/web").await;
    assert_eq!(stat_line(&web, &total), Some(2), "{web}");
    assert_eq!(admin_get(h.admin(), "/stats?source=nobody").await, "");

    // filter: a regex searched in the full name.
    let filtered = admin_get(h.admin(), "/stats?filter=upstream_rq_%5B0-9%5Dxx$").await;
    let lines: Vec<&str> = filtered.lines().collect();
    assert_eq!(lines.len(), 5, "{filtered}");
    assert!(
        lines.iter().all(|l| l.contains(".upstream_rq_")),
        "{filtered}"
    );
    let one = admin_get(h.admin(), "/stats?filter=rq_total&source=web").await;
    assert_eq!(one, format!("{total}: 2\n"));
    let (status, body) = admin_call(h.admin(), "GET", "/stats?filter=(").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid regex"), "{body}");

    // JSON keeps the per-client view and the node budget, with the same restrictions.
    let json: Value =
        serde_json::from_str(&admin_get(h.admin(), "/stats?format=json&source=web").await).unwrap();
    assert_eq!(json["node"]["max_upstream_connections"], 16384, "{json:#}");
    let clusters = json["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 1, "{json:#}");
    assert_eq!(clusters[0]["source_pod"], WEB_POD_KEY);
    assert_eq!(clusters[0]["stats"]["upstream_rq_total"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_show_ejection_and_reset_keeps_gauges() {
    let good = mock("good").await;
    let bad = mock_with("bad", 1.0, 500).await;
    let h = Harness::start(&ejection_config(good.addr(), bad.addr())).await;
    eject(h.addr(), bad.addr(), h.admin()).await;

    let text = admin_get(h.admin(), &format!("/endpoints?cluster={CLUSTER}")).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let header = lines[0];
    let cols: Vec<usize> = ["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER", "SOURCE"]
        .iter()
        .map(|c| {
            header
                .find(c)
                .unwrap_or_else(|| panic!("{c} in {header:?}"))
        })
        .collect();
    assert_eq!(cols[0], 0);
    let row_of = |addr: SocketAddr| {
        *lines
            .iter()
            .find(|l| l.starts_with(&addr.to_string()))
            .unwrap_or_else(|| panic!("{addr} in\n{text}"))
    };
    for (addr, check) in [(bad.addr(), "FAILED"), (good.addr(), "OK")] {
        let row = row_of(addr);
        // Aligned columns: every value starts where its header does.
        assert_eq!(&row[cols[1]..cols[1] + 7], "HEALTHY", "{text}");
        assert!(row[cols[2]..].starts_with(check), "{text}");
        assert!(row[cols[3]..].starts_with(CLUSTER), "{text}");
        assert_eq!(&row[cols[4]..], SLEEP_POD, "{text}");
    }
    // The service FQDN selects the same cluster; another client sees nothing.
    assert_eq!(
        admin_get(
            h.admin(),
            "/endpoints?cluster=mock.default.svc.cluster.local&source=sleep"
        )
        .await,
        text
    );
    assert_eq!(
        admin_get(h.admin(), "/endpoints?source=web")
            .await
            .lines()
            .count(),
        1
    );
    let json: Value =
        serde_json::from_str(&admin_get(h.admin(), "/endpoints?format=json").await).unwrap();
    let bad_json = json
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == bad.addr().to_string())
        .unwrap();
    assert_eq!(bad_json["outlier_check"], "FAILED");
    assert_eq!(bad_json["status"], "HEALTHY");
    assert_eq!(bad_json["source_workload"], "sleep");
    assert_eq!(bad_json["ejections"], 1);

    // Counters to zero, gauges untouched.
    let stats = admin_get(h.admin(), "/stats").await;
    let name = |s: &str| format!("cluster.{CLUSTER}.{s}");
    assert!(stat_line(&stats, &name("upstream_rq_total")).unwrap() >= 1);
    assert_eq!(
        stat_line(&stats, &name("outlier_detection.ejections_enforced_total")),
        Some(1),
        "{stats}"
    );
    assert_eq!(
        stat_line(&stats, &name("outlier_detection.ejections_active")),
        Some(1)
    );
    let cx_active = stat_line(&stats, &name("upstream_cx_active")).unwrap();
    assert!(cx_active >= 1, "keep-alive connections stay open: {stats}");

    let (status, body) = admin_call(h.admin(), "GET", "/reset_counters").await;
    assert_eq!(status, 405, "mutations need POST: {body}");
    let (status, body) = admin_call(h.admin(), "POST", "/reset_counters").await;
    assert_eq!((status, body.as_str()), (200, "OK\n"));

    let after = admin_get(h.admin(), "/stats").await;
    for counter in [
        "upstream_rq_total",
        "upstream_rq_2xx",
        "upstream_rq_5xx",
        "upstream_cx_total",
        "outlier_detection.ejections_enforced_total",
        "outlier_detection.ejections_enforced_consecutive_5xx",
        "outlier_detection.ejections_detected_consecutive_5xx",
    ] {
        assert_eq!(
            stat_line(&after, &name(counter)),
            Some(0),
            "{counter}\n{after}"
        );
    }
    assert_eq!(
        stat_line(&after, &name("outlier_detection.ejections_active")),
        Some(1)
    );
    assert_eq!(
        stat_line(&after, &name("upstream_cx_active")),
        Some(cx_active)
    );
    assert!(admin_get(h.admin(), "/endpoints").await.contains("FAILED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_shows_effective_policy_and_its_rule() {
    let m = mock("m").await;
    let mut config = MeshConfig::new(vec![m.addr()]).with_route("30s", 0, "5xx");
    // A mesh-wide rule loses to the client namespace's; the port-level
    // connectionPool replaces the top-level one whole.
    config.extra.push_str(
        r#"---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh-default, namespace: istio-system}
spec:
  host: "*.cluster.local"
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 99}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mock, namespace: default}
spec:
  host: mock
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100}
      http: {maxRetries: 2}
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50}
    portLevelSettings:
    - port: {number: 8080}
      connectionPool:
        tcp: {maxConnections: 7, connectTimeout: 250ms}
        http: {http1MaxPendingRequests: 3}
"#,
    );
    let h = Harness::start(&config).await;
    assert_eq!(
        call_from(&h, CLIENT_IP, "/status/200").await.status,
        Some(200)
    );

    let dump: Value = serde_json::from_str(&admin_get(h.admin(), "/config_dump").await).unwrap();
    assert_eq!(dump["generation"], 1, "{dump:#}");
    assert_eq!(dump["destination_rules"], 2);
    let clusters = dump["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 1, "{dump:#}");
    let c = &clusters[0];
    assert_eq!(c["cluster"], CLUSTER);
    assert_eq!(c["source_pod"], SLEEP_POD);
    assert_eq!(c["source_workload"], "sleep");
    assert_eq!(c["destination_rule"], "default/mock", "{c:#}");
    let policy = &c["effective_policy"];
    let pool = &policy["connection_pool"];
    assert_eq!(pool["max_connections"], 7, "{policy:#}");
    assert_eq!(pool["max_pending_requests"], 3);
    assert_eq!(
        pool["max_requests"],
        u64::from(u32::MAX),
        "unset: Istio's 2^32-1"
    );
    assert_eq!(
        pool["max_retries"],
        u64::from(u32::MAX),
        "replaced by the port-level pool"
    );
    assert_eq!(pool["connect_timeout"], "250ms");
    assert_eq!(pool["idle_timeout"], "1h");
    assert_eq!(policy["load_balancer"]["policy"], "ROUND_ROBIN");
    let od = &policy["outlier_detection"];
    assert_eq!(od["consecutive_5xx_errors"], 2, "{od:#}");
    assert_eq!(od["interval"], "5s");
    assert_eq!(od["base_ejection_time"], "1m");
    assert_eq!(od["max_ejection_time"], "5m");
    assert_eq!(od["max_ejection_percent"], 50);
    assert_eq!(od["consecutive_gateway_errors"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_level_changes_at_run_time() {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    let (status, _) = admin_call(h.admin(), "POST", "/logging?level=debug").await;
    assert_eq!(status, 503, "no reloadable logging set up yet");

    nodeway::admin::logging::init("info").expect("first subscriber of this process");
    use tracing::level_filters::LevelFilter;
    assert_eq!(LevelFilter::current(), LevelFilter::INFO);
    let (status, body) = admin_call(h.admin(), "POST", "/logging?level=debug").await;
    assert_eq!((status, body.as_str()), (200, "active level: debug\n"));
    assert_eq!(LevelFilter::current(), LevelFilter::DEBUG);
    let (status, _) = admin_call(h.admin(), "POST", "/logging?level=nodeway%3Dtrace,warn").await;
    assert_eq!(status, 200);
    assert_eq!(LevelFilter::current(), LevelFilter::TRACE);
    let (status, body) = admin_call(h.admin(), "POST", "/logging").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "active level: nodeway=trace,warn\n")
    );

    let (status, body) = admin_call(h.admin(), "POST", "/logging?level=nodeway%3Dloud").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(LevelFilter::current(), LevelFilter::TRACE, "unchanged");
    let (status, _) = admin_call(h.admin(), "GET", "/logging?level=debug").await;
    assert_eq!(status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_help() {
    let m = mock("m").await;
    let h = Harness::start(&MeshConfig::new(vec![m.addr()])).await;
    assert_eq!(admin_get(h.admin(), "/healthz/ready").await, "LIVE\n");
    assert_eq!(admin_get(h.admin(), "/ready").await, "LIVE\n");
    let (status, body) = admin_call(h.admin(), "GET", "/nope").await;
    assert_eq!(status, 404);
    assert!(
        body.contains("/reset_counters") && body.contains("/endpoints"),
        "{body}"
    );

    // The separate readiness listener: not ready until the proxy serves
    // every pod it should, failing once draining starts.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let draining = nodeway::admin::CancellationToken::new();
    let status = std::sync::Arc::new(nodeway::status::ConfigStatus::default());
    tokio::spawn(nodeway::admin::serve_readiness(
        listener,
        status.clone(),
        draining.clone(),
    ));
    assert_eq!(
        admin_call(addr, "GET", "/healthz/ready").await,
        (503, "NOT READY\n".into())
    );
    status
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        admin_call(addr, "GET", "/healthz/ready").await,
        (200, "LIVE\n".into())
    );
    assert_eq!(
        admin_call(addr, "GET", "/stats").await.0,
        404,
        "readiness only"
    );
    draining.cancel();
    assert_eq!(admin_call(addr, "GET", "/healthz/ready").await.0, 503);
}

// ---------------------------------------------------------------------------
// The binary's subcommands (helpers as in cli.rs).
// ---------------------------------------------------------------------------

/// Runs `nodeway ARGS…` to completion.
async fn nodeway(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || Command::new(nodeway_bin()).args(&args).output().unwrap())
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subcommands_query_a_running_proxy() {
    let good = mock("good").await;
    let bad = mock_with("bad", 1.0, 500).await;
    let dir = TempDir::new("admin");
    let config = dir.0.join("mesh.yaml");
    std::fs::write(&config, ejection_config(good.addr(), bad.addr()).render()).unwrap();
    let proxy = NodewayProcess::start(&config, &[]);
    let (outbound, admin, readiness) = (proxy.outbound, proxy.admin, proxy.readiness);
    let admin_s = admin.to_string();
    let a = ["--admin-addr", admin_s.as_str()];

    assert_eq!(
        admin_call(readiness, "GET", "/healthz/ready").await,
        (200, "LIVE\n".to_string())
    );
    eject(outbound, bad.addr(), admin).await;

    // endpoints: istioctl's table, the ejected one FAILED.
    let table = stdout(&nodeway(&["endpoints", a[0], a[1]]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ENDPOINT") && lines[0].contains("OUTLIER CHECK"),
        "{table}"
    );
    let bad_row = lines
        .iter()
        .find(|l| l.starts_with(&bad.addr().to_string()))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        bad_row.contains("HEALTHY") && bad_row.contains("FAILED") && bad_row.contains(CLUSTER),
        "{table}"
    );
    let good_row = lines
        .iter()
        .find(|l| l.starts_with(&good.addr().to_string()))
        .unwrap();
    assert!(!good_row.contains("FAILED"), "{table}");
    let json: Value = serde_json::from_str(&stdout(
        &nodeway(&[
            "endpoints",
            a[0],
            a[1],
            "--cluster",
            CLUSTER,
            "--source",
            "sleep",
            "-o",
            "json",
        ])
        .await,
    ))
    .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2, "{json:#}");

    // stats: a table summed over clients; JSON with -o json.
    let table = stdout(
        &nodeway(&[
            "stats",
            a[0],
            a[1],
            "--filter",
            "upstream_rq_total$|ejections_active",
            "--source",
            "sleep",
        ])
        .await,
    );
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["CLUSTER", "STAT", "VALUE"], "{table}");
    assert!(
        rows.contains(&vec![CLUSTER, "outlier_detection.ejections_active", "1"]),
        "{table}"
    );
    assert!(
        rows.iter()
            .any(|r| r[..2] == [CLUSTER, "upstream_rq_total"]),
        "{table}"
    );
    assert_eq!(rows.len(), 3, "{table}");
    let json: Value = serde_json::from_str(&stdout(
        &nodeway(&["stats", a[0], a[1], "-o", "json"]).await,
    ))
    .unwrap();
    assert!(
        json["node"]["max_upstream_connections"].is_u64(),
        "{json:#}"
    );
    assert_eq!(json["clusters"][0]["cluster"], CLUSTER);

    // config: effective policy and rule.
    let table = stdout(&nodeway(&["config", a[0], a[1]]).await);
    assert!(
        table.starts_with("generation 1, last reload error: none"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(SLEEP_POD))
        .unwrap_or_else(|| panic!("{table}"));
    for want in [
        CLUSTER,
        "default/mock",
        "ROUND_ROBIN",
        "5xx=1",
        "max-ejection=100%",
    ] {
        assert!(row.contains(want), "{want} in {row}");
    }
    let json: Value = serde_json::from_str(&stdout(
        &nodeway(&["config", a[0], a[1], "-o", "json"]).await,
    ))
    .unwrap();
    assert_eq!(json["clusters"][0]["destination_rule"], "default/mock");

    // The binary set up reloadable logging.
    let (status, body) = admin_call(admin, "POST", "/logging?level=debug").await;
    assert_eq!((status, body.as_str()), (200, "active level: debug\n"));
}

#[test]
fn subcommands_explain_an_unreachable_admin_api() {
    let nobody = free_addr().to_string();
    for sub in ["stats", "endpoints", "config"] {
        let out = Command::new(nodeway_bin())
            .args([sub, "--admin-addr", &nobody])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{sub}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("cannot reach the admin API at {nobody}: "))
                && stderr.contains("is nodeway running? use --admin-addr"),
            "{sub}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

// ---------------------------------------------------------------------------
// Grafana dashboard
// ---------------------------------------------------------------------------

/// Metric names Nodeway exports (the observability issue's list).
const METRICS: &[&str] = &[
    "envoy_cluster_upstream_rq_total",
    "envoy_cluster_upstream_rq_xx",
    "envoy_cluster_upstream_rq_timeout_total",
    "envoy_cluster_upstream_rq_per_try_timeout_total",
    "envoy_cluster_upstream_rq_retry_total",
    "envoy_cluster_upstream_rq_retry_limit_exceeded_total",
    "envoy_cluster_upstream_rq_pending_overflow_total",
    "envoy_cluster_upstream_cx_overflow_total",
    "envoy_cluster_outlier_detection_ejections_enforced_total",
    "envoy_cluster_outlier_detection_ejections_active",
    "istio_requests_total",
    "istio_request_duration_milliseconds_bucket",
    "istio_request_duration_milliseconds_sum",
    "istio_request_duration_milliseconds_count",
];

/// Labels those metrics carry (Envoy's by Nodeway, Istio's standard ones).
const LABELS: &[&str] = &[
    "cluster_name",
    "source_workload",
    "source_namespace",
    "envoy_response_code_class",
    "reporter",
    "response_flags",
    "response_code",
    "destination_service",
    "source_workload_namespace",
    "le",
];

/// PromQL functions, aggregations and keywords the dashboard may use.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "rate",
    "increase",
    "histogram_quantile",
    "by",
    "without",
    "max",
    "min",
    "avg",
    "label_values",
];

/// (metric names, label names) in a PromQL expression or `label_values(…)` query:
/// identifiers inside `{…}` before a matcher and inside `by (…)` are labels,
/// quoted strings, `[…]` ranges, `$variables` and numbers are skipped.
fn promql_names(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut metrics, mut labels) = (BTreeSet::new(), BTreeSet::new());
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut in_braces, mut in_by, mut last_word) = (0, false, false, String::new());
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            i += 1;
        } else if c.is_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if in_braces || in_by {
                labels.insert(word.clone());
            } else if !PROMQL_WORDS.contains(&word.as_str()) {
                metrics.insert(word.clone());
            }
            last_word = word;
            continue;
        } else {
            match c {
                '{' => in_braces = true,
                '}' => in_braces = false,
                '(' if last_word == "by" || last_word == "without" => in_by = true,
                ')' if in_by => in_by = false,
                // label_values(metric{…}, label): the label after the comma.
                ',' if !in_braces && !in_by && expr.starts_with("label_values(") => in_by = true,
                _ => {}
            }
            if !c.is_whitespace() {
                last_word.clear();
            }
            i += 1;
        }
    }
    (metrics, labels)
}

#[test]
fn promql_names_tell_metrics_from_labels() {
    let (m, l) = promql_names(
        r#"histogram_quantile(0.99, sum by (le, response_flags) (rate(istio_request_duration_milliseconds_bucket{reporter="source", source_workload=~"$w|x{y}"}[5m])))"#,
    );
    assert_eq!(
        m.into_iter().collect::<Vec<_>>(),
        ["istio_request_duration_milliseconds_bucket"]
    );
    assert_eq!(
        l.into_iter().collect::<Vec<_>>(),
        ["le", "reporter", "response_flags", "source_workload"]
    );
    let (m, l) = promql_names(
        r#"label_values(envoy_cluster_upstream_rq_total{source_workload=~"$w"}, cluster_name)"#,
    );
    assert_eq!(
        m.into_iter().collect::<Vec<_>>(),
        ["envoy_cluster_upstream_rq_total"]
    );
    assert_eq!(
        l.into_iter().collect::<Vec<_>>(),
        ["cluster_name", "source_workload"]
    );
}

#[test]
fn dashboard_is_valid_and_uses_only_exported_metrics() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy/dashboards/nodeway-resilience.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard JSON");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert_eq!(dashboard["uid"], "nodeway-resilience");

    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("template variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let mut queries: Vec<String> = Vec::new();
    for name in ["source_workload", "cluster_name"] {
        queries.push(var(name)["query"]["query"].as_str().unwrap().to_string());
    }

    let mut used = BTreeSet::new();
    let mut panels = 0;
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "unique panel ids"
        );
        if panel["type"] == "row" {
            continue;
        }
        panels += 1;
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}");
            queries.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        queries.push(v["query"]["query"].as_str().unwrap().to_string());
    }
    for q in &queries {
        let (metrics, labels) = promql_names(q);
        assert!(!metrics.is_empty(), "no metric in {q}");
        for m in &metrics {
            assert!(METRICS.contains(&m.as_str()), "unknown metric {m} in {q}");
        }
        for l in &labels {
            assert!(LABELS.contains(&l.as_str()), "unknown label {l} in {q}");
        }
        used.extend(metrics);
    }
    assert!(panels >= 10, "{panels} panels");
    // Every resilience signal of the issue has a panel.
    for m in METRICS
        .iter()
        .filter(|m| !m.ends_with("_sum") && !m.ends_with("_count"))
    {
        assert!(used.contains(*m), "no panel shows {m}");
    }
    // Split by client and by server.
    let exprs = queries.join("\n");
    for split in [
        "sum by (source_workload)",
        "sum by (cluster_name)",
        "sum by (response_flags)",
    ] {
        assert!(exprs.contains(split), "{split}");
    }
}
