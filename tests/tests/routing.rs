//! Istio routing semantics against the real proxy started in-process:
//! VirtualService match conditions and route order, weighted destinations,
//! DestinationRule subsets and the DestinationRule lookup order, retries on
//! gRPC status, per-try timeouts, `retryOn` status-code conditions, and the
//! request authority / upstream protocol across HTTP/1.1 and HTTP/2.
//!
//! Every backend is a mock upstream on its own loopback address (so that the
//! Pod behind an EndpointSlice endpoint can carry that address as its IP);
//! checks look at what the client received (`x-served-by`, status) and at the
//! access log line (route name, cluster, flags, details, attempts).

mod common;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{CLIENT_IP, FixedOriginalDst, Harness, TempDir};
use http::header::HOST;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodeway::app::{self, RunOptions};
use nodeway::telemetry::access_log::AccessLogTarget;
use nodeway_tests::access_log::{AccessLog, Entry};
use nodeway_tests::{MockOptions, MockUpstream, Outcome, Proto, connect_from, request};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// A source address that is no Pod's (the client is `unknown`).
const STRANGER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 99));

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// Namespaces and the client pod `sleep` (labels `app: sleep`, namespace `default`).
const BASE: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {nodeway.io/redirect: enabled}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
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
"#;

/// One endpoint of a Service: the Pod behind it and where it listens.
struct Backend<'a> {
    pod: &'a str,
    /// YAML flow mapping, e.g. `{app: reviews, version: v1}`.
    labels: &'a str,
    addr: SocketAddr,
}

/// A multi-document YAML configuration built piece by piece.
struct Mesh {
    docs: Vec<String>,
    vips: u32,
}

impl Mesh {
    fn new() -> Self {
        Mesh {
            docs: vec![BASE.to_string()],
            vips: 0,
        }
    }

    fn doc(&mut self, yaml: impl Into<String>) -> &mut Self {
        self.docs.push(yaml.into());
        self
    }

    /// Service `ns/name` with port 8080 named `port_name` (and `appProtocol`
    /// if given), one EndpointSlice per backend with a `targetRef` to its Pod.
    fn service(
        &mut self,
        ns: &str,
        name: &str,
        port_name: &str,
        app_protocol: Option<&str>,
        backends: &[Backend<'_>],
    ) -> &mut Self {
        self.vips += 1;
        let vip = format!("10.96.{}.{}", 1 + self.vips / 250, 1 + self.vips % 250);
        let app = app_protocol.map_or(String::new(), |p| format!(", appProtocol: {p}"));
        self.doc(format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  clusterIP: {vip}
  ports:
  - {{name: {port_name}, port: 8080, targetPort: 8080{app}}}
"#
        ));
        for (i, b) in backends.iter().enumerate() {
            let ip = b.addr.ip();
            self.doc(format!(
                r#"apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  namespace: {ns}
  labels: {labels}
spec:
  containers: [{{name: server, image: mock-upstream}}]
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
"#,
                pod = b.pod,
                labels = b.labels,
            ));
            self.doc(format!(
                r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{i}
  namespace: {ns}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: {port_name}, port: {port}}}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, name: {pod}, namespace: {ns}}}
"#,
                port = b.addr.port(),
                pod = b.pod,
            ));
        }
        self
    }

    /// Service `default/name` whose only endpoint is `mock` (pod `name-0`, labels `app: name`).
    fn simple(&mut self, name: &str, port_name: &str, mock: &MockUpstream) -> &mut Self {
        let pod = format!("{name}-0");
        let labels = format!("{{app: {name}}}");
        self.service(
            "default",
            name,
            port_name,
            None,
            &[Backend {
                pod: &pod,
                labels: &labels,
                addr: mock.addr(),
            }],
        )
    }

    fn render(&self) -> String {
        self.docs.join("---\n")
    }
}

fn virtual_service(ns: &str, name: &str, hosts: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: {hosts}\n  http:\n{http}"
    )
}

fn destination_rule(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

/// Starts the proxy in-process on loopback with this configuration.
async fn start(mesh: &Mesh) -> Harness {
    let dir = TempDir::new("routing");
    let config_path = dir.0.join("mesh.yaml");
    std::fs::write(&config_path, mesh.render()).expect("write config");
    let log_path = dir.0.join("access.log");
    let mut opts = RunOptions::new(config_path.clone());
    opts.outbound_addr = "127.0.0.1:0".parse().unwrap();
    opts.admin_addr = "127.0.0.1:0".parse().unwrap();
    opts.metrics_addr = "127.0.0.1:0".parse().unwrap();
    opts.access_log = AccessLogTarget::File(log_path.clone());
    opts.config_poll_interval = Duration::from_millis(100);
    let proxy = app::start(opts, Arc::new(FixedOriginalDst(None)))
        .await
        .unwrap_or_else(|e| panic!("proxy did not start: {e}\nconfig:\n{}", mesh.render()));
    Harness {
        proxy: Some(proxy),
        log: AccessLog::new(log_path),
        config_path,
        dir,
    }
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A fresh loopback address per backend: 127.0.2.1, 127.0.2.2, …
fn next_loopback_ip() -> IpAddr {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        2 + (n / 250) as u8,
        1 + (n % 250) as u8,
    ))
}

async fn backend(name: &str) -> MockUpstream {
    backend_with(name, 0.0).await
}

async fn backend_with(name: &str, fail_rate: f64) -> MockUpstream {
    MockUpstream::start(
        SocketAddr::new(next_loopback_ip(), 0),
        MockOptions {
            fail_rate,
            fail_code: 503,
            ..MockOptions::named(name)
        },
    )
    .await
    .expect("mock upstream starts")
}

/// An upstream that answers every request with the HTTP version it received
/// (`x-upstream-version`) and the authority it saw (`x-upstream-authority`).
struct ProtoProbe {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for ProtoProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn proto_probe() -> ProtoProbe {
    let listener = TcpListener::bind(SocketAddr::new(next_loopback_ip(), 0))
        .await
        .expect("bind probe");
    let addr = listener.local_addr().expect("probe address");
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            while conns.try_join_next().is_some() {}
            conns.spawn(probe_conn(stream));
        }
    });
    ProtoProbe { addr, task }
}

async fn probe_conn(stream: TcpStream) {
    let mut buf = [0u8; 24];
    let mut h2 = false;
    // Bounded: at most 200 partial peeks of 5 ms.
    for _ in 0..200 {
        let Ok(n) = stream.peek(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        if buf[..n] != H2_PREFACE[..n] {
            break;
        }
        if n == H2_PREFACE.len() {
            h2 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let svc = service_fn(|req: Request<Incoming>| async move {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let resp = Response::builder()
            .header("x-served-by", "probe")
            .header("x-upstream-version", format!("{:?}", req.version()))
            .header("x-upstream-authority", authority)
            .body(Full::new(Bytes::from_static(b"ok")))
            .expect("probe response");
        Ok::<_, Infallible>(resp)
    });
    let io = TokioIo::new(stream);
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        if h2 {
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await;
        } else {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    /// The `x-request-id` sent (the access log's `request_id`).
    request_id: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn served_by(&self) -> Option<&str> {
        self.header("x-served-by")
    }
}

/// A request id unique in this test process, in UUID form.
fn next_request_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One request with any method and headers over a fresh connection from
/// `src`: HTTP/1.1 (origin-form with `Host: authority`) or HTTP/2
/// (`:authority`), with a fresh `x-request-id` to find its access log line.
/// Panics on transport errors or after [`CALL_TIMEOUT`].
async fn send(
    h: &Harness,
    proto: Proto,
    src: IpAddr,
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let proxy = h.addr();
    let request_id = next_request_id();
    let what = format!("{proto:?} {method} {authority}{path} {headers:?} from {src}");
    let call = async {
        let stream = connect_from(src, proxy)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let io = TokioIo::new(stream);
        let mut b = Request::builder().method(method);
        b = match proto {
            Proto::Http1 => b.uri(path).header(HOST, authority),
            _ => b.uri(format!("http://{authority}{path}")),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b = b.header("x-request-id", request_id.as_str());
        let req = b.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let (resp, conn) = match proto {
            Proto::Http1 => {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| e.to_string())?;
                let conn = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (sender.send_request(req).await, conn)
            }
            _ => {
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| e.to_string())?;
                let conn = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (sender.send_request(req).await, conn)
            }
        };
        let resp = resp.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        conn.abort();
        Ok::<_, String>(Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            request_id: request_id.clone(),
        })
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: no answer within {CALL_TIMEOUT:?}"),
    }
}

async fn get(h: &Harness, authority: &str, path: &str) -> Resp {
    send(h, Proto::Http1, CLIENT_IP, "GET", authority, path, &[]).await
}

fn field<'a>(line: &'a Entry, key: &str) -> &'a str {
    line.get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("field {key} missing in {line:?}"))
}

/// Asserts some fields of an access log line.
fn assert_fields(line: &Entry, expected: &[(&str, &str)]) {
    for (key, want) in expected {
        assert_eq!(
            field(line, key),
            *want,
            "access log field {key}\nline: {line:?}"
        );
    }
}

/// Waits for exactly `n` access log lines (and checks no more follow soon).
async fn lines(h: &Harness, n: usize) -> Vec<Entry> {
    h.log.wait_for(n, LOG_TIMEOUT).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let lines = h.log.lines();
    assert_eq!(lines.len(), n, "expected {n} access log lines: {lines:?}");
    lines
}

/// The access log line of the request `r`.
fn line_of<'a>(lines: &'a [Entry], r: &Resp) -> &'a Entry {
    lines
        .iter()
        .find(|l| l.get("request_id").and_then(|v| v.as_str()) == Some(r.request_id.as_str()))
        .unwrap_or_else(|| panic!("no access log line for request {}: {lines:?}", r.request_id))
}

fn cluster(subset: &str, fqdn: &str) -> String {
    format!("outbound|8080|{subset}|{fqdn}")
}

// ---------------------------------------------------------------------------
// 1. VirtualService match conditions
// ---------------------------------------------------------------------------

/// Routes of the VirtualService for host `front`, in order: (name, `match`).
/// Each route goes to the Service of the same name (backend of that name).
const MATCH_ROUTES: &[(&str, &str)] = &[
    ("order-first", "[{uri: {prefix: /order}}]"),
    ("order-second", "[{uri: {exact: /order/x}}]"),
    ("exact", "[{uri: {exact: /exact}}]"),
    ("prefix", "[{uri: {prefix: /pre/}}]"),
    ("regex", r#"[{uri: {regex: "/re/[0-9]+"}}]"#),
    ("header", "[{headers: {X-User: {exact: alice}}}]"),
    (
        "header-regex",
        r#"[{headers: {x-tier: {regex: "gold|silver"}}}]"#,
    ),
    (
        "without",
        "[{uri: {prefix: /wh}, withoutHeaders: {x-skip: {}}}]",
    ),
    ("method", "[{method: {exact: DELETE}}]"),
    ("query", "[{queryParams: {color: {exact: blue}}}]"),
    ("any-of", "[{uri: {exact: /or-a}}, {uri: {exact: /or-b}}]"),
    (
        "all-of",
        r#"[{uri: {prefix: /and}, headers: {x-and: {exact: "1"}}}]"#,
    ),
    (
        "source-other",
        "[{uri: {prefix: /src}, sourceLabels: {app: other}}]",
    ),
    (
        "source",
        "[{uri: {prefix: /src}, sourceLabels: {app: sleep}}]",
    ),
    ("ns-other", "[{uri: {prefix: /ns}, sourceNamespace: other}]"),
    ("ns", "[{uri: {prefix: /ns}, sourceNamespace: default}]"),
];

struct MatchCase {
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    src: IpAddr,
    /// Route (and backend) expected, `None` for `404 NR`.
    want: Option<&'static str>,
}

const fn case(
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    want: Option<&'static str>,
) -> MatchCase {
    MatchCase {
        method,
        path,
        headers,
        src: CLIENT_IP,
        want,
    }
}

const MATCH_CASES: &[MatchCase] = &[
    // Routes are tried in order: the earlier prefix wins over the later exact match.
    case("GET", "/order/x", &[], Some("order-first")),
    case("GET", "/exact", &[], Some("exact")),
    // Exact and regex URI matches ignore the query string (Envoy `path`).
    case("GET", "/exact?x=1", &[], Some("exact")),
    case("GET", "/exact/", &[], None),
    case("GET", "/exactly", &[], None),
    case("GET", "/pre/a", &[], Some("prefix")),
    case("GET", "/prefix", &[], None),
    // An earlier route wins even if a later one matches too.
    case("GET", "/pre/a", &[("x-user", "alice")], Some("prefix")),
    case("GET", "/re/123", &[], Some("regex")),
    case("GET", "/re/123?page=2", &[], Some("regex")),
    // Regexes match the whole path.
    case("GET", "/re/123x", &[], None),
    case("GET", "/x/re/1", &[], None),
    // Header names are case-insensitive, values are not.
    case("GET", "/h", &[("x-user", "alice")], Some("header")),
    case("GET", "/h", &[("X-USER", "alice")], Some("header")),
    case("GET", "/h", &[("x-user", "Alice")], None),
    case("GET", "/h", &[("x-user", "alice2")], None),
    case("GET", "/h", &[("x-tier", "silver")], Some("header-regex")),
    case("GET", "/h", &[("x-tier", "gold-plated")], None),
    case("GET", "/h", &[("x-tier", "bronze")], None),
    case("GET", "/wh", &[], Some("without")),
    case("GET", "/wh", &[("x-skip", "yes")], None),
    case("DELETE", "/m", &[], Some("method")),
    case("PUT", "/m", &[], None),
    case("GET", "/q?color=blue", &[], Some("query")),
    case("GET", "/q?size=1&color=blue", &[], Some("query")),
    case("GET", "/q?color=bluish", &[], None),
    case("GET", "/q?colour=blue", &[], None),
    // Several match blocks are ORed, conditions within one are ANDed.
    case("GET", "/or-a", &[], Some("any-of")),
    case("GET", "/or-b", &[], Some("any-of")),
    case("GET", "/and", &[("x-and", "1")], Some("all-of")),
    case("GET", "/and", &[], None),
    // sourceLabels / sourceNamespace select by the client pod.
    case("GET", "/src", &[], Some("source")),
    MatchCase {
        src: STRANGER_IP,
        ..case("GET", "/src", &[], None)
    },
    case("GET", "/ns", &[], Some("ns")),
    // Nothing matches.
    case("GET", "/nothing", &[], None),
];

#[tokio::test]
async fn virtual_service_match_conditions() {
    let front = backend("front").await;
    let mut mocks = Vec::new();
    for (name, _) in MATCH_ROUTES {
        mocks.push(backend(name).await);
    }
    let mut mesh = Mesh::new();
    mesh.simple("front", "http", &front);
    for ((name, _), mock) in MATCH_ROUTES.iter().zip(&mocks) {
        mesh.simple(name, "http", mock);
    }
    let http: String = MATCH_ROUTES
        .iter()
        .map(|(name, m)| {
            format!(
                "  - name: {name}\n    match: {m}\n    route: [{{destination: {{host: {name}}}}}]\n"
            )
        })
        .collect();
    mesh.doc(virtual_service("default", "front", "[front]", &http));
    let h = start(&mesh).await;

    let mut failures = Vec::new();
    let mut resps = Vec::new();
    for c in MATCH_CASES {
        let resp = send(
            &h,
            Proto::Http1,
            c.src,
            c.method,
            "front:8080",
            c.path,
            c.headers,
        )
        .await;
        let (want_status, want_by) = match c.want {
            Some(name) => (200, Some(name)),
            None => (404, None),
        };
        if resp.status != want_status || resp.served_by() != want_by {
            failures.push(format!(
                "{} {} {:?} from {}: got {} served by {:?}, want {} served by {:?}",
                c.method,
                c.path,
                c.headers,
                c.src,
                resp.status,
                resp.served_by(),
                want_status,
                want_by
            ));
        }
        resps.push(resp);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(front.requests(), 0, "no route goes to front itself");

    let lines = lines(&h, MATCH_CASES.len()).await;
    for (c, resp) in MATCH_CASES.iter().zip(&resps) {
        let line = line_of(&lines, resp);
        assert_eq!(field(line, "path"), c.path, "{line:?}");
        match c.want {
            Some(name) => assert_fields(
                line,
                &[
                    ("response_code", "200"),
                    ("response_flags", "-"),
                    ("response_code_details", "via_upstream"),
                    ("route_name", name),
                    (
                        "upstream_cluster",
                        &cluster("", &format!("{name}.default.svc.cluster.local")),
                    ),
                    ("authority", "front:8080"),
                ],
            ),
            None => assert_fields(
                line,
                &[
                    ("response_code", "404"),
                    ("response_flags", "NR"),
                    ("response_code_details", "route_not_found"),
                    ("route_name", "-"),
                    ("upstream_cluster", "-"),
                    ("upstream_host", "-"),
                ],
            ),
        }
    }
}

/// Istio names an Envoy route `<http route name>.<match name>` when the match
/// block has a name (`translateRoute` in pilot's route.go); `%ROUTE_NAME%`
/// logs that.
#[tokio::test]

async fn route_name_includes_match_name() {
    let a = backend("a").await;
    let mut mesh = Mesh::new();
    mesh.simple("a", "http", &a).doc(virtual_service(
        "default",
        "a",
        "[a]",
        "  - name: r\n    match: [{name: by-header, headers: {x-k: {exact: v}}}, {name: by-path, uri: {prefix: /p}}]\n    route: [{destination: {host: a}}]\n",
    ));
    let h = start(&mesh).await;
    let by_header = send(
        &h,
        Proto::Http1,
        CLIENT_IP,
        "GET",
        "a:8080",
        "/x",
        &[("x-k", "v")],
    )
    .await;
    assert_eq!(by_header.status, 200);
    let by_path = get(&h, "a:8080", "/p").await;
    assert_eq!(by_path.status, 200);
    let lines = lines(&h, 2).await;
    assert_fields(
        line_of(&lines, &by_header),
        &[("route_name", "r.by-header")],
    );
    assert_fields(line_of(&lines, &by_path), &[("route_name", "r.by-path")]);
}

/// The `authority` match sees the HTTP/1.1 `Host` and the HTTP/2
/// `:authority` alike, and both route the same way.
#[tokio::test]
async fn host_and_authority_route_alike() {
    let front = backend("front").await;
    let named = backend("named").await;
    let short = backend("short").await;
    let mut mesh = Mesh::new();
    mesh.simple("front", "http", &front)
        .simple("named", "http", &named)
        .simple("short", "http", &short)
        .doc(virtual_service(
            "default",
            "front",
            "[front]",
            "  - name: by-authority\n    match: [{authority: {prefix: front.default.svc}}]\n    route: [{destination: {host: named}}]\n  - name: rest\n    route: [{destination: {host: short}}]\n",
        ));
    let h = start(&mesh).await;
    let cases = [
        (
            Proto::Http1,
            "front.default.svc.cluster.local:8080",
            "named",
        ),
        (
            Proto::Http2,
            "front.default.svc.cluster.local:8080",
            "named",
        ),
        (Proto::Http1, "front:8080", "short"),
        (Proto::Http2, "front:8080", "short"),
        (Proto::Http2, "front.default:8080", "short"),
        (Proto::Http1, "front.default:8080", "short"),
    ];
    let mut resps = Vec::new();
    for (proto, authority, want) in cases {
        let r = send(&h, proto, CLIENT_IP, "GET", authority, "/", &[]).await;
        assert_eq!(r.status, 200, "{proto:?} {authority}: {r:?}");
        assert_eq!(r.served_by(), Some(want), "{proto:?} {authority}: {r:?}");
        resps.push(r);
    }
    let lines = lines(&h, cases.len()).await;
    for ((proto, authority, want), r) in cases.iter().zip(&resps) {
        let line = line_of(&lines, r);
        let route = if *want == "named" {
            "by-authority"
        } else {
            "rest"
        };
        let protocol = if *proto == Proto::Http1 {
            "HTTP/1.1"
        } else {
            "HTTP/2"
        };
        assert_fields(
            line,
            &[
                ("authority", authority),
                ("protocol", protocol),
                ("route_name", route),
                (
                    "upstream_cluster",
                    &cluster("", &format!("{want}.default.svc.cluster.local")),
                ),
            ],
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Weighted destinations
// ---------------------------------------------------------------------------

const REVIEWS: &str = "reviews.default.svc.cluster.local";

/// Service `reviews` with pods labelled `version: v1` and `version: v2`, and
/// a DestinationRule with subsets v1 and v2.
async fn reviews_mesh(extra_v1: bool) -> (Mesh, Vec<MockUpstream>) {
    let v1 = backend("reviews-v1").await;
    let v2 = backend("reviews-v2").await;
    let mut backends = vec![
        Backend {
            pod: "reviews-v1-a",
            labels: "{app: reviews, version: v1}",
            addr: v1.addr(),
        },
        Backend {
            pod: "reviews-v2-a",
            labels: "{app: reviews, version: v2}",
            addr: v2.addr(),
        },
    ];
    let mut mocks = vec![v1, v2];
    if extra_v1 {
        let v1b = backend("reviews-v1-b").await;
        backends.push(Backend {
            pod: "reviews-v1-b",
            labels: "{app: reviews, version: v1}",
            addr: v1b.addr(),
        });
        mocks.push(v1b);
    }
    let mut mesh = Mesh::new();
    mesh.service("default", "reviews", "http", None, &backends)
        .doc(destination_rule(
            "default",
            "reviews",
            "  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n  - {name: v3, labels: {version: v3}}\n",
        ));
    (mesh, mocks)
}

#[tokio::test]
async fn weighted_split_between_subsets() {
    let (mut mesh, mocks) = reviews_mesh(false).await;
    mesh.doc(virtual_service(
        "default",
        "reviews",
        "[reviews]",
        "  - name: split\n    route:\n    - {destination: {host: reviews, subset: v1}, weight: 50}\n    - {destination: {host: reviews, subset: v2}, weight: 50}\n",
    ));
    let h = start(&mesh).await;
    const N: usize = 60;
    let mut resps = Vec::new();
    for _ in 0..N {
        let r = get(&h, "reviews:8080", "/").await;
        assert_eq!(r.status, 200, "{r:?}");
        resps.push(r);
    }
    let served: Vec<&str> = resps.iter().map(|r| r.served_by().unwrap_or("?")).collect();
    let v1 = served.iter().filter(|s| **s == "reviews-v1").count();
    let v2 = served.iter().filter(|s| **s == "reviews-v2").count();
    assert_eq!(v1 + v2, N, "{served:?}");
    // Binomial(60, 0.5): fewer than 12 on one side has a probability below 1e-5.
    assert!(v1 >= N / 5 && v2 >= N / 5, "v1 {v1}, v2 {v2}");
    assert_eq!(mocks[0].requests() + mocks[1].requests(), N as u64);
    let lines = lines(&h, N).await;
    for (by, r) in served.iter().zip(&resps) {
        let subset = by.trim_start_matches("reviews-");
        assert_fields(
            line_of(&lines, r),
            &[
                ("route_name", "split"),
                ("upstream_cluster", &cluster(subset, REVIEWS)),
            ],
        );
    }
}

#[tokio::test]
async fn weighted_split_between_services() {
    let front = backend("front").await;
    let blue = backend("blue").await;
    let green = backend("green").await;
    let mut mesh = Mesh::new();
    mesh.simple("front", "http", &front)
        .simple("blue", "http", &blue)
        .simple("green", "http", &green)
        .doc(virtual_service(
            "default",
            "front",
            "[front]",
            "  - name: canary\n    route:\n    - {destination: {host: blue}, weight: 50}\n    - {destination: {host: green}, weight: 50}\n",
        ));
    let h = start(&mesh).await;
    const N: u64 = 60;
    for _ in 0..N {
        let r = get(&h, "front:8080", "/").await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let (b, g) = (blue.requests(), green.requests());
    assert_eq!(b + g, N);
    assert_eq!(front.requests(), 0);
    assert!(b >= N / 5 && g >= N / 5, "blue {b}, green {g}");
}

#[tokio::test]
async fn weight_100_0_sends_everything_to_one_subset() {
    let (mut mesh, mocks) = reviews_mesh(false).await;
    mesh.doc(virtual_service(
        "default",
        "reviews",
        "[reviews]",
        "  - name: all-v2\n    route:\n    - {destination: {host: reviews, subset: v1}, weight: 0}\n    - {destination: {host: reviews, subset: v2}, weight: 100}\n",
    ));
    let h = start(&mesh).await;
    for _ in 0..30 {
        let r = get(&h, "reviews:8080", "/").await;
        assert_eq!(r.served_by(), Some("reviews-v2"), "{r:?}");
    }
    assert_eq!(mocks[0].requests(), 0);
    assert_eq!(mocks[1].requests(), 30);
}

// ---------------------------------------------------------------------------
// 3. Subsets
// ---------------------------------------------------------------------------

#[tokio::test]
async fn subsets_select_pods_by_label() {
    let (mut mesh, mocks) = reviews_mesh(true).await;
    mesh.doc(virtual_service(
        "default",
        "reviews",
        "[reviews]",
        "  - name: to-v2\n    match: [{headers: {x-version: {exact: v2}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - name: to-v1\n    route: [{destination: {host: reviews, subset: v1}}]\n",
    ));
    let h = start(&mesh).await;
    const N: usize = 20;
    let mut resps = Vec::new();
    for _ in 0..N {
        let r = send(
            &h,
            Proto::Http1,
            CLIENT_IP,
            "GET",
            "reviews:8080",
            "/",
            &[("x-version", "v2")],
        )
        .await;
        assert_eq!(r.served_by(), Some("reviews-v2"), "{r:?}");
        resps.push((r, "to-v2", "v2"));
    }
    for _ in 0..N {
        let r = get(&h, "reviews:8080", "/").await;
        assert!(
            r.served_by().is_some_and(|by| by.starts_with("reviews-v1")),
            "{r:?}"
        );
        resps.push((r, "to-v1", "v1"));
    }
    // Both v1 pods serve the v1 subset, v2 serves only its own.
    assert!(
        mocks[0].requests() > 0 && mocks[2].requests() > 0,
        "v1 pods: {} and {} requests",
        mocks[0].requests(),
        mocks[2].requests()
    );
    assert_eq!(mocks[0].requests() + mocks[2].requests(), N as u64);
    assert_eq!(mocks[1].requests(), N as u64);
    let lines = lines(&h, 2 * N).await;
    for (r, route, subset) in &resps {
        assert_fields(
            line_of(&lines, r),
            &[
                ("response_code", "200"),
                ("route_name", route),
                ("upstream_cluster", &cluster(subset, REVIEWS)),
            ],
        );
    }
}

/// A subset that exists but selects no pod: the cluster has no members,
/// Envoy answers `503 UH no_healthy_upstream`.
#[tokio::test]
async fn subset_without_pods_is_no_healthy_upstream() {
    let (mut mesh, mocks) = reviews_mesh(false).await;
    mesh.doc(virtual_service(
        "default",
        "reviews",
        "[reviews]",
        "  - name: to-v3\n    route: [{destination: {host: reviews, subset: v3}}]\n",
    ));
    let h = start(&mesh).await;
    let r = get(&h, "reviews:8080", "/").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.body, Bytes::from_static(b"no healthy upstream"));
    assert_eq!(mocks[0].requests() + mocks[1].requests(), 0);
    let lines = lines(&h, 1).await;
    assert_fields(
        &lines[0],
        &[
            ("response_code", "503"),
            ("response_flags", "UH"),
            ("response_code_details", "no_healthy_upstream"),
            ("route_name", "to-v3"),
            ("upstream_cluster", &cluster("v3", REVIEWS)),
            ("upstream_host", "-"),
        ],
    );
}

/// A subset no DestinationRule defines: Istio builds no cluster for it, so
/// Envoy's router finds no cluster: `503 NC cluster_not_found`, and the
/// upstream cluster is unknown (`-`).
#[tokio::test]

async fn undefined_subset_is_cluster_not_found() {
    let (mut mesh, mocks) = reviews_mesh(false).await;
    mesh.doc(virtual_service(
        "default",
        "reviews",
        "[reviews]",
        "  - name: to-v9\n    route: [{destination: {host: reviews, subset: v9}}]\n",
    ));
    let h = start(&mesh).await;
    let r = get(&h, "reviews:8080", "/").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(mocks[0].requests() + mocks[1].requests(), 0);
    let lines = lines(&h, 1).await;
    assert_fields(
        &lines[0],
        &[
            ("response_code", "503"),
            ("response_flags", "NC"),
            ("response_code_details", "cluster_not_found"),
            ("route_name", "to-v9"),
            ("upstream_cluster", "-"),
            ("upstream_host", "-"),
        ],
    );
}

/// A route to a host that is no known Service: no such cluster, `503 NC`.
#[tokio::test]
async fn unknown_destination_host_is_cluster_not_found() {
    let front = backend("front").await;
    let mut mesh = Mesh::new();
    mesh.simple("front", "http", &front).doc(virtual_service(
        "default",
        "front",
        "[front]",
        "  - name: nowhere\n    route: [{destination: {host: missing}}]\n",
    ));
    let h = start(&mesh).await;
    let r = get(&h, "front:8080", "/").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(front.requests(), 0);
    let lines = lines(&h, 1).await;
    assert_fields(
        &lines[0],
        &[
            ("response_code", "503"),
            ("response_flags", "NC"),
            ("response_code_details", "cluster_not_found"),
            ("upstream_cluster", "-"),
            ("upstream_host", "-"),
        ],
    );
}

/// Envoy resolves the route before looking up its cluster, so `%ROUTE_NAME%`
/// is known on a `cluster_not_found` reply.
#[tokio::test]

async fn cluster_not_found_logs_the_route_name() {
    let front = backend("front").await;
    let mut mesh = Mesh::new();
    mesh.simple("front", "http", &front).doc(virtual_service(
        "default",
        "front",
        "[front]",
        "  - name: nowhere\n    route: [{destination: {host: missing}}]\n",
    ));
    let h = start(&mesh).await;
    let r = get(&h, "front:8080", "/").await;
    assert_eq!(r.status, 503, "{r:?}");
    let lines = lines(&h, 1).await;
    assert_fields(
        &lines[0],
        &[("response_flags", "NC"), ("route_name", "nowhere")],
    );
}

// ---------------------------------------------------------------------------
// 4. DestinationRule lookup order
// ---------------------------------------------------------------------------

const CART: &str = "cart.shop.svc.cluster.local";

/// A DestinationRule whose subset `pick` selects pods with `track: <track>`.
fn pick_rule(ns: &str, name: &str, host: &str, track: &str, export_to: Option<&str>) -> String {
    let export = export_to.map_or(String::new(), |e| format!("  exportTo: {e}\n"));
    destination_rule(
        ns,
        name,
        &format!(
            "  host: \"{host}\"\n{export}  subsets:\n  - {{name: pick, labels: {{track: {track}}}}}\n"
        ),
    )
}

/// Service `shop/cart` with pods `track: a|b|c`, a VirtualService (in `shop`)
/// sending everything to subset `pick`, and the given DestinationRules.
/// Asserts that the client `sleep` (namespace `default`) reaches `cart-<want>`.
async fn dr_scenario(rules: &[String], want: &str) {
    let a = backend("cart-a").await;
    let b = backend("cart-b").await;
    let c = backend("cart-c").await;
    let mut mesh = Mesh::new();
    mesh.service(
        "shop",
        "cart",
        "http",
        None,
        &[
            Backend {
                pod: "cart-a",
                labels: "{app: cart, track: a}",
                addr: a.addr(),
            },
            Backend {
                pod: "cart-b",
                labels: "{app: cart, track: b}",
                addr: b.addr(),
            },
            Backend {
                pod: "cart-c",
                labels: "{app: cart, track: c}",
                addr: c.addr(),
            },
        ],
    )
    .doc(virtual_service(
        "shop",
        "cart",
        "[cart]",
        "  - name: pick\n    route: [{destination: {host: cart, subset: pick}}]\n",
    ));
    for rule in rules {
        mesh.doc(rule.clone());
    }
    let h = start(&mesh).await;
    let want_by = format!("cart-{want}");
    const N: usize = 6;
    for _ in 0..N {
        let r = get(&h, "cart.shop:8080", "/").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.served_by(), Some(want_by.as_str()), "{r:?}");
    }
    let lines = lines(&h, N).await;
    assert_fields(
        &lines[0],
        &[
            ("route_name", "pick"),
            ("upstream_cluster", &cluster("pick", CART)),
        ],
    );
}

#[tokio::test]
async fn dr_in_client_namespace_wins() {
    dr_scenario(
        &[
            pick_rule("default", "cart", CART, "a", None),
            pick_rule("shop", "cart", "cart", "b", None),
            pick_rule("istio-system", "cart", CART, "c", None),
        ],
        "a",
    )
    .await;
}

#[tokio::test]
async fn dr_in_service_namespace_wins_over_root() {
    dr_scenario(
        &[
            pick_rule("shop", "cart", "cart", "b", None),
            pick_rule("istio-system", "cart", CART, "c", None),
        ],
        "b",
    )
    .await;
}

#[tokio::test]
async fn dr_in_root_namespace_applies_last() {
    dr_scenario(&[pick_rule("istio-system", "cart", CART, "c", None)], "c").await;
}

#[tokio::test]
async fn dr_in_unrelated_namespace_is_ignored() {
    dr_scenario(
        &[
            pick_rule("other", "cart", CART, "a", None),
            pick_rule("istio-system", "cart", CART, "c", None),
        ],
        "c",
    )
    .await;
}

#[tokio::test]
async fn dr_exact_host_before_wildcard_in_service_namespace() {
    dr_scenario(
        &[
            pick_rule("shop", "all", "*.cluster.local", "a", None),
            pick_rule("shop", "cart", "cart", "b", None),
        ],
        "b",
    )
    .await;
}

#[tokio::test]
async fn dr_exact_host_before_wildcard_in_root_namespace() {
    dr_scenario(
        &[
            pick_rule("istio-system", "all", "*.cluster.local", "a", None),
            pick_rule("istio-system", "cart", CART, "c", None),
        ],
        "c",
    )
    .await;
}

#[tokio::test]
async fn dr_most_specific_wildcard_wins() {
    dr_scenario(
        &[
            pick_rule("istio-system", "all", "*.cluster.local", "a", None),
            pick_rule(
                "istio-system",
                "shop",
                "*.shop.svc.cluster.local",
                "b",
                None,
            ),
        ],
        "b",
    )
    .await;
}

/// The namespace comes first: a wildcard rule in the client's namespace beats
/// an exact one in the service's namespace (no merging between them).
#[tokio::test]
async fn dr_client_namespace_wildcard_beats_service_namespace_exact() {
    dr_scenario(
        &[
            pick_rule("default", "all", "*.cluster.local", "a", None),
            pick_rule("shop", "cart", "cart", "b", None),
        ],
        "a",
    )
    .await;
}

#[tokio::test]
async fn dr_not_exported_to_client_is_skipped() {
    dr_scenario(
        &[
            pick_rule("shop", "cart", "cart", "b", Some("[\".\"]")),
            pick_rule("istio-system", "cart", CART, "c", None),
        ],
        "c",
    )
    .await;
}

// ---------------------------------------------------------------------------
// 5. Retries on gRPC status
// ---------------------------------------------------------------------------

/// Service `g` (port named `grpc`) with one backend and a route retrying
/// twice on `retry_on`; one gRPC call to `path`.
async fn grpc_retry_case(retry_on: &str, path: &str) -> (Outcome, Entry, u64) {
    let g = backend("g").await;
    let mut mesh = Mesh::new();
    mesh.simple("g", "grpc", &g).doc(virtual_service(
        "default",
        "g",
        "[g]",
        &format!(
            "  - name: grpc-route\n    timeout: 5s\n    retries: {{attempts: 2, retryOn: \"{retry_on}\"}}\n    route: [{{destination: {{host: g}}}}]\n"
        ),
    ));
    let h = start(&mesh).await;
    let out = request(
        Proto::Grpc,
        h.addr(),
        CLIENT_IP,
        "g.default.svc.cluster.local:8080",
        path,
        Bytes::new(),
        CALL_TIMEOUT,
    )
    .await;
    let line = lines(&h, 1).await.remove(0);
    (out, line, g.requests())
}

#[tokio::test]
async fn grpc_unavailable_is_retried_until_attempts_run_out() {
    let (out, line, requests) = grpc_retry_case("unavailable", "/grpc-status/14").await;
    assert_eq!(out.status, Some(200), "{out:?}");
    assert_eq!(out.grpc_status, Some(14), "{out:?}");
    assert_eq!(requests, 3);
    assert_fields(
        &line,
        &[
            ("response_code", "200"),
            ("response_flags", "URX"),
            ("response_code_details", "via_upstream"),
            ("grpc_status", "Unavailable"),
            ("upstream_request_attempt_count", "3"),
            ("route_name", "grpc-route"),
            ("protocol", "HTTP/2"),
        ],
    );
}

#[tokio::test]
async fn grpc_internal_is_not_retried_on_unavailable() {
    let (out, line, requests) = grpc_retry_case("unavailable", "/grpc-status/13").await;
    assert_eq!(out.grpc_status, Some(13), "{out:?}");
    assert_eq!(requests, 1);
    assert_fields(
        &line,
        &[
            ("response_code", "200"),
            ("response_flags", "-"),
            ("response_code_details", "via_upstream"),
            ("grpc_status", "Internal"),
            ("upstream_request_attempt_count", "1"),
        ],
    );
}

#[tokio::test]
async fn grpc_internal_is_retried_on_internal() {
    let (out, line, requests) = grpc_retry_case("internal", "/grpc-status/13").await;
    assert_eq!(out.grpc_status, Some(13), "{out:?}");
    assert_eq!(requests, 3);
    assert_fields(
        &line,
        &[
            ("response_code", "200"),
            ("response_flags", "URX"),
            ("response_code_details", "via_upstream"),
            ("grpc_status", "Internal"),
            ("upstream_request_attempt_count", "3"),
        ],
    );
}

#[tokio::test]
async fn grpc_ok_is_not_retried() {
    let (out, line, requests) = grpc_retry_case("unavailable,internal", "/grpc-status/0").await;
    assert_eq!(out.grpc_status, Some(0), "{out:?}");
    assert_eq!(requests, 1);
    assert_fields(
        &line,
        &[
            ("response_flags", "-"),
            ("grpc_status", "OK"),
            ("upstream_request_attempt_count", "1"),
        ],
    );
}

// ---------------------------------------------------------------------------
// 6. Per-try timeout
// ---------------------------------------------------------------------------

/// Service `slow` with one backend; route timeout 5 s, 2 retries with a
/// 200 ms per-try timeout on `retry_on`; one HTTP/1.1 GET `/delay/1000`.
async fn per_try_case(retry_on: &str) -> (Resp, Duration, Entry, u64) {
    let slow = backend("slow").await;
    let mut mesh = Mesh::new();
    mesh.simple("slow", "http", &slow).doc(virtual_service(
        "default",
        "slow",
        "[slow]",
        &format!(
            "  - name: slow-route\n    timeout: 5s\n    retries: {{attempts: 2, perTryTimeout: 200ms, retryOn: \"{retry_on}\"}}\n    route: [{{destination: {{host: slow}}}}]\n"
        ),
    ));
    let h = start(&mesh).await;
    let started = std::time::Instant::now();
    let r = get(&h, "slow:8080", "/delay/1000").await;
    let elapsed = started.elapsed();
    let line = lines(&h, 1).await.remove(0);
    (r, elapsed, line, slow.requests())
}

#[tokio::test]
async fn per_try_timeouts_are_retried_until_attempts_run_out() {
    let (r, elapsed, line, requests) = per_try_case("5xx").await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.body, Bytes::from_static(b"upstream request timeout"));
    assert!(
        elapsed >= Duration::from_millis(590) && elapsed < Duration::from_millis(2500),
        "three 200 ms tries plus back-off, took {elapsed:?}"
    );
    assert_eq!(requests, 3);
    // Envoy: maybeRetryReset() sets URX when the budget is spent, then
    // onUpstreamTimeoutAbort() sets UT; flags are logged in that order.
    assert_fields(
        &line,
        &[
            ("response_code", "504"),
            ("response_flags", "URX,UT"),
            ("response_code_details", "upstream_per_try_timeout"),
            ("upstream_request_attempt_count", "3"),
            ("route_name", "slow-route"),
        ],
    );
}

#[tokio::test]
async fn per_try_timeout_is_not_retried_on_connect_failure_only() {
    let (r, elapsed, line, requests) = per_try_case("connect-failure").await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        elapsed >= Duration::from_millis(190) && elapsed < Duration::from_millis(900),
        "one 200 ms try, took {elapsed:?}"
    );
    assert_eq!(requests, 1);
    assert_fields(
        &line,
        &[
            ("response_code", "504"),
            ("response_flags", "UT"),
            ("response_code_details", "upstream_per_try_timeout"),
            ("upstream_request_attempt_count", "1"),
        ],
    );
}

// ---------------------------------------------------------------------------
// 7. retryOn status-code conditions
// ---------------------------------------------------------------------------

/// Service `codes` with one backend and a route retrying twice on
/// `retry_on`; one HTTP/1.1 GET `/status/<code>`.
async fn status_retry_case(retry_on: &str, code: u16) -> (Resp, Entry, u64) {
    let m = backend("codes").await;
    let mut mesh = Mesh::new();
    mesh.simple("codes", "http", &m).doc(virtual_service(
        "default",
        "codes",
        "[codes]",
        &format!(
            "  - name: codes-route\n    timeout: 5s\n    retries: {{attempts: 2, retryOn: \"{retry_on}\"}}\n    route: [{{destination: {{host: codes}}}}]\n"
        ),
    ));
    let h = start(&mesh).await;
    let r = get(&h, "codes:8080", &format!("/status/{code}")).await;
    let line = lines(&h, 1).await.remove(0);
    (r, line, m.requests())
}

async fn assert_retried(retry_on: &str, code: u16, retried: bool) {
    let (r, line, requests) = status_retry_case(retry_on, code).await;
    let ctx = format!("retryOn {retry_on:?}, status {code}");
    assert_eq!(r.status, code, "{ctx}: {r:?}");
    let (attempts, flags) = if retried { (3, "URX") } else { (1, "-") };
    assert_eq!(requests, attempts, "{ctx}: upstream requests");
    assert_eq!(
        field(&line, "upstream_request_attempt_count"),
        attempts.to_string(),
        "{ctx}: {line:?}"
    );
    assert_eq!(field(&line, "response_flags"), flags, "{ctx}: {line:?}");
    assert_eq!(field(&line, "response_code"), code.to_string(), "{ctx}");
    assert_eq!(
        field(&line, "response_code_details"),
        "via_upstream",
        "{ctx}"
    );
}

#[tokio::test]
async fn bare_code_retries_that_code_only() {
    assert_retried("503", 503, true).await;
    assert_retried("503", 500, false).await;
}

#[tokio::test]
async fn retriable_status_codes_with_codes() {
    assert_retried("retriable-status-codes,418", 418, true).await;
    assert_retried("retriable-status-codes,418", 503, false).await;
}

#[tokio::test]
async fn retriable_4xx_retries_409_only() {
    assert_retried("retriable-4xx", 409, true).await;
    assert_retried("retriable-4xx", 404, false).await;
    assert_retried("retriable-4xx", 400, false).await;
    assert_retried("retriable-4xx", 503, false).await;
}

#[tokio::test]
async fn gateway_error_retries_502_503_504_not_500() {
    for code in [502, 503, 504] {
        assert_retried("gateway-error", code, true).await;
    }
    assert_retried("gateway-error", 500, false).await;
}

#[tokio::test]
async fn five_xx_retries_any_5xx_not_4xx() {
    assert_retried("5xx", 500, true).await;
    assert_retried("5xx", 503, true).await;
    assert_retried("5xx", 429, false).await;
}

/// A flaky backend behind `retryOn: 503` ends up answering 200.
#[tokio::test]
async fn retry_on_503_recovers_from_a_flaky_backend() {
    let flaky = backend_with("flaky", 0.3).await;
    let mut mesh = Mesh::new();
    mesh.simple("flaky", "http", &flaky).doc(virtual_service(
        "default",
        "flaky",
        "[flaky]",
        "  - name: flaky-route\n    retries: {attempts: 10, retryOn: \"503\"}\n    route: [{destination: {host: flaky}}]\n",
    ));
    let h = start(&mesh).await;
    // 0.3^11 per request: 5 requests fail with a probability below 1e-5.
    for _ in 0..5 {
        let r = get(&h, "flaky:8080", "/status/200").await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    for line in lines(&h, 5).await {
        assert_fields(&line, &[("response_flags", "-"), ("response_code", "200")]);
    }
}

// ---------------------------------------------------------------------------
// 8. Upstream protocol
// ---------------------------------------------------------------------------

/// Service `p` with the protocol-reporting backend on a port named
/// `port_name` (and `appProtocol`); one request of `proto`.
async fn upstream_protocol_case(
    port_name: &str,
    app_protocol: Option<&str>,
    proto: Proto,
) -> (Resp, Entry) {
    let probe = proto_probe().await;
    let mut mesh = Mesh::new();
    mesh.service(
        "default",
        "p",
        port_name,
        app_protocol,
        &[Backend {
            pod: "p-0",
            labels: "{app: p}",
            addr: probe.addr,
        }],
    );
    let h = start(&mesh).await;
    let r = send(&h, proto, CLIENT_IP, "GET", "p.default:8080", "/", &[]).await;
    let line = lines(&h, 1).await.remove(0);
    drop(probe);
    (r, line)
}

async fn assert_upstream_protocol(
    port_name: &str,
    app_protocol: Option<&str>,
    proto: Proto,
    upstream: &str,
) {
    let (r, line) = upstream_protocol_case(port_name, app_protocol, proto).await;
    let ctx = format!("port {port_name} appProtocol {app_protocol:?}, client {proto:?}");
    assert_eq!(r.status, 200, "{ctx}: {r:?}");
    assert_eq!(
        r.header("x-upstream-version"),
        Some(upstream),
        "{ctx}: {r:?}"
    );
    // The original authority reaches the upstream (Host or :authority).
    assert_eq!(
        r.header("x-upstream-authority"),
        Some("p.default:8080"),
        "{ctx}: {r:?}"
    );
    let downstream = if proto == Proto::Http1 {
        "HTTP/1.1"
    } else {
        "HTTP/2"
    };
    assert_fields(
        &line,
        &[
            ("protocol", downstream),
            ("response_code", "200"),
            ("route_name", "default"),
            (
                "upstream_cluster",
                "outbound|8080||p.default.svc.cluster.local",
            ),
        ],
    );
}

#[tokio::test]
async fn http_port_talks_http1_upstream_to_an_http2_client() {
    assert_upstream_protocol("http", None, Proto::Http2, "HTTP/1.1").await;
    assert_upstream_protocol("http", None, Proto::Http1, "HTTP/1.1").await;
}

#[tokio::test]
async fn app_protocol_http_overrides_the_port_name() {
    assert_upstream_protocol("grpc", Some("http"), Proto::Http2, "HTTP/1.1").await;
}

#[tokio::test]
async fn http2_port_talks_http2_upstream_to_an_http1_client() {
    assert_upstream_protocol("http2", None, Proto::Http1, "HTTP/2.0").await;
    assert_upstream_protocol("grpc", None, Proto::Http1, "HTTP/2.0").await;
}

#[tokio::test]
async fn sniffed_port_keeps_the_client_protocol() {
    assert_upstream_protocol("web", None, Proto::Http1, "HTTP/1.1").await;
    assert_upstream_protocol("web", None, Proto::Http2, "HTTP/2.0").await;
}
