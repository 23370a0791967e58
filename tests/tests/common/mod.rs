//! Starts Nodeway in-process on loopback with a generated configuration,
//! plus mock upstreams, and reads its access log.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nodeway::app::{self, RunOptions, Running};
use nodeway::redirect::OriginalDst;
use nodeway::telemetry::access_log::AccessLogTarget;
use nodeway_tests::access_log::AccessLog;
use nodeway_tests::mock::{MockOptions, MockUpstream};
use serde_json::{Map, Value};

/// Source address of the client pod `sleep` in every generated config.
pub const CLIENT_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, 5));
pub const AUTHORITY: &str = "mock.default.svc.cluster.local:8080";

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nodeway-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Config pieces for the `mock` Service.
pub struct MeshConfig {
    /// Endpoint addresses of Service `mock` port 8080.
    pub endpoints: Vec<SocketAddr>,
    /// Service port name (decides the protocol: `web` is sniffed).
    pub port_name: String,
    /// VirtualService `spec.http[0]` body after `- name: primary` (YAML, indented 4), or None for no VirtualService.
    pub route_yaml: Option<String>,
    /// Extra YAML documents appended.
    pub extra: String,
}

impl MeshConfig {
    pub fn new(endpoints: Vec<SocketAddr>) -> Self {
        MeshConfig {
            endpoints,
            port_name: "web".into(),
            route_yaml: None,
            extra: String::new(),
        }
    }

    /// A VirtualService route with the given timeout and retries (no
    /// `retryOn` with 0 attempts: Istio refuses a policy that cannot retry).
    pub fn with_route(mut self, timeout: &str, attempts: u32, retry_on: &str) -> Self {
        let retry_on = if attempts == 0 {
            String::new()
        } else {
            format!("      retryOn: {retry_on}\n")
        };
        self.route_yaml = Some(format!(
            "    timeout: {timeout}\n    retries:\n      attempts: {attempts}\n{retry_on}"
        ));
        self
    }

    pub fn render(&self) -> String {
        let mut y = String::from(
            r#"apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    nodeway.io/redirect: enabled
---
apiVersion: v1
kind: Pod
metadata:
  name: sleep-5d9c7b8f6-abcde
  namespace: default
  labels: {app: sleep, pod-template-hash: 5d9c7b8f6}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: sleep-5d9c7b8f6, uid: "1"}
spec:
  containers: [{name: sleep, image: curl}]
status:
  podIP: 127.0.1.5
  podIPs: [{ip: 127.0.1.5}]
---
apiVersion: v1
kind: Service
metadata: {name: mock, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports:
"#,
        );
        y.push_str(&format!(
            "  - {{name: {}, port: 8080, targetPort: 8080}}\n",
            self.port_name
        ));
        for (i, ep) in self.endpoints.iter().enumerate() {
            y.push_str(&format!(
                r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: mock-{i}
  namespace: default
  labels: {{kubernetes.io/service-name: mock}}
addressType: IPv4
ports: [{{name: {name}, port: {port}}}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ready: true}}
"#,
                name = self.port_name,
                port = ep.port(),
                ip = ep.ip()
            ));
        }
        if let Some(route) = &self.route_yaml {
            y.push_str(
                "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: mock, namespace: default}\nspec:\n  hosts: [mock]\n  http:\n  - name: primary\n    route:\n    - destination: {host: mock}\n",
            );
            y.push_str(route);
        }
        y.push_str(&self.extra);
        y
    }
}

/// Supplies a fixed original destination, standing in for the eBPF map.
pub struct FixedOriginalDst(pub Option<SocketAddr>);

impl OriginalDst for FixedOriginalDst {
    fn original_dst(&self, _stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
        self.0
    }
}

pub struct Harness {
    pub proxy: Option<Running>,
    pub log: AccessLog,
    pub config_path: PathBuf,
    pub dir: TempDir,
}

impl Harness {
    pub async fn start(config: &MeshConfig) -> Harness {
        Self::start_with(config, Arc::new(FixedOriginalDst(None)), |_| {}).await
    }

    pub async fn start_with(
        config: &MeshConfig,
        original_dst: Arc<dyn OriginalDst>,
        tweak: impl FnOnce(&mut RunOptions),
    ) -> Harness {
        let dir = TempDir::new("l7");
        let config_path = dir.0.join("mesh.yaml");
        std::fs::write(&config_path, config.render()).expect("write config");
        let log_path = dir.0.join("access.log");
        let mut opts = RunOptions::new(config_path.clone());
        opts.outbound_addr = "127.0.0.1:0".parse().unwrap();
        opts.admin_addr = "127.0.0.1:0".parse().unwrap();
        opts.metrics_addr = "127.0.0.1:0".parse().unwrap();
        opts.access_log = AccessLogTarget::File(log_path.clone());
        opts.config_poll_interval = Duration::from_millis(100);
        tweak(&mut opts);
        let proxy = app::start(opts, original_dst)
            .await
            .unwrap_or_else(|e| panic!("proxy did not start: {e}"));
        Harness {
            proxy: Some(proxy),
            log: AccessLog::new(log_path),
            config_path,
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy.as_ref().unwrap().outbound_addr
    }

    pub fn admin(&self) -> SocketAddr {
        self.proxy.as_ref().unwrap().admin_addr
    }
}

pub async fn mock(name: &str) -> MockUpstream {
    mock_with(name, 0.0, 503).await
}

pub async fn mock_opts(opts: MockOptions) -> MockUpstream {
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), opts)
        .await
        .expect("mock upstream starts")
}

pub async fn mock_with(name: &str, fail_rate: f64, fail_code: u16) -> MockUpstream {
    MockUpstream::start(
        "127.0.0.1:0".parse().unwrap(),
        MockOptions {
            name: name.into(),
            fail_rate,
            fail_code,
            ..MockOptions::default()
        },
    )
    .await
    .expect("mock upstream starts")
}

/// Checks a field against an exact value or a shape.
pub enum Expect {
    Is(String),
    /// Decimal milliseconds.
    Millis,
    /// `ip:port`.
    Addr,
    /// RFC 3339 UTC with milliseconds.
    Timestamp,
    Uuid,
    Prefix(String),
}

pub fn is(v: impl ToString) -> Expect {
    Expect::Is(v.to_string())
}

/// Asserts the whole line: exactly these fields, each as expected.
pub fn assert_line(line: &Map<String, Value>, expected: &[(&str, Expect)]) {
    let fields: Vec<&str> = line.keys().map(String::as_str).collect();
    let names: Vec<&str> = expected.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        fields, names,
        "access log fields/order differ\nline: {line:?}"
    );
    for (key, exp) in expected {
        let got = line[*key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} is not a string in {line:?}"));
        let ok = match exp {
            Expect::Is(want) => got == want,
            Expect::Millis => got.parse::<u64>().is_ok(),
            Expect::Addr => got.parse::<SocketAddr>().is_ok(),
            Expect::Timestamp => {
                got.len() == 24 && got.ends_with('Z') && got.as_bytes()[10] == b'T'
            }
            Expect::Uuid => got.len() == 36 && got.chars().filter(|c| *c == '-').count() == 4,
            Expect::Prefix(p) => got.starts_with(p.as_str()),
        };
        let want = match exp {
            Expect::Is(w) => w.clone(),
            Expect::Millis => "<millis>".into(),
            Expect::Addr => "<ip:port>".into(),
            Expect::Timestamp => "<timestamp>".into(),
            Expect::Uuid => "<uuid>".into(),
            Expect::Prefix(p) => format!("{p}…"),
        };
        assert!(
            ok,
            "access log field {key}: got {got:?}, want {want}\nline: {line:?}"
        );
    }
}

/// The documented field order.
pub const FIELDS: [&str; 30] = [
    "start_time",
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "response_code_details",
    "connection_termination_details",
    "upstream_transport_failure_reason",
    "bytes_received",
    "bytes_sent",
    "duration",
    "upstream_service_time",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "upstream_host",
    "upstream_cluster",
    "upstream_local_address",
    "downstream_local_address",
    "downstream_remote_address",
    "requested_server_name",
    "route_name",
    "grpc_status",
    "upstream_request_attempt_count",
    "request_duration",
    "response_duration",
    "source_workload",
    "source_namespace",
];

/// Cluster of the generated `mock` Service (port 8080, no subset).
pub const CLUSTER: &str = "outbound|8080||mock.default.svc.cluster.local";
/// The `sleep` client pod's key in `/stats` and the registry.
pub const SLEEP_POD: &str = "default/sleep-5d9c7b8f6-abcde";
/// A second client pod, `web` (source 127.0.1.6), as a YAML document to append.
pub const WEB_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, 6));
pub const WEB_POD_KEY: &str = "default/web-6b7c9d8f5-xyz12";
pub const WEB_POD: &str = r#"---
apiVersion: v1
kind: Pod
metadata:
  name: web-6b7c9d8f5-xyz12
  namespace: default
  labels: {app: web, version: v2, pod-template-hash: 6b7c9d8f5}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: web-6b7c9d8f5, uid: "2"}
spec:
  containers: [{name: web, image: web}]
status:
  podIP: 127.0.1.6
  podIPs: [{ip: 127.0.1.6}]
"#;

/// DestinationRule A of the resilience issue: one connection, one pending request,
/// outlier detection after five consecutive 5xx.
pub const DR_A: &str = r#"---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mock, namespace: default}
spec:
  host: mock
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxConcurrentStreams: 1}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 100}
"#;

/// Builds the binary once per test process and returns its path.
pub fn nodeway_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "nodeway", "--bin", "nodeway"])
            .current_dir(&root)
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building nodeway failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug/nodeway")
    })
    .clone()
}

/// `sum(name{labels})` from the proxy's `/metrics` (0 if no series matches):
/// a plain scan of the text exposition, for tests that read a few values.
pub async fn metric(h: &Harness, name: &str, labels: &[(&str, &str)]) -> f64 {
    let addr = h.proxy.as_ref().unwrap().metrics_addr;
    let out = nodeway_tests::request(
        nodeway_tests::Proto::Http1,
        addr,
        "127.0.0.1".parse().unwrap(),
        &addr.to_string(),
        "/metrics",
        bytes::Bytes::new(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(out.status, Some(200), "{out:?}");
    let text = out.body_text();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Polls `metric` until it equals `want` (or panics after `timeout`).
pub async fn wait_for_metric(
    h: &Harness,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let now = metric(h, name, labels).await;
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} is {now}, not {want}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free loopback address (released at once: a later bind may race).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free loopback port")
}

/// `nodeway run --config CONFIG` as a child process on free loopback ports
/// (access log off, `extra` flags added), waited for until its readiness
/// port answers; killed when dropped.
pub struct NodewayProcess {
    child: std::process::Child,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub readiness: SocketAddr,
}

impl NodewayProcess {
    pub fn start(config: &std::path::Path, extra: &[&str]) -> Self {
        let (outbound, admin, readiness) = (free_addr(), free_addr(), free_addr());
        let child = Command::new(nodeway_bin())
            .args(["run", "--config"])
            .arg(config)
            .args(["--outbound-addr", &outbound.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--readiness-addr", &readiness.to_string()])
            .args(["--metrics-addr", "127.0.0.1:0", "--access-log", "off"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nodeway");
        let process = NodewayProcess {
            child,
            outbound,
            admin,
            readiness,
        };
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(readiness).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nodeway did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NodewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
