//! A one-node mesh on the topology harness, with Nodeway redirecting by eBPF:
//! what the eBPF integration tests and `cargo xtask demo` run.
//!
//! Pods (node netns has no uplink; addresses exist only in the topology):
//! - `sleep` 10.244.0.5, namespace `shop` (enrolled): the client.
//! - `sleep-b` 10.244.0.7, namespace `shop` (enrolled): a second client.
//! - `bystander` 10.244.0.6, namespace `plain` (not enrolled).
//! - `mock-server-a`/`-b` 10.244.0.11/.12 (node-a, zone-a) and
//!   `mock-server-c` 10.244.0.13 (node-b, zone-b), namespace `shop` (labels
//!   `version: v1` for a and b, `v2` for c), serving
//!   `mock-upstream` on :8080. Service `mock-server.shop` is 10.96.0.10:80
//!   (port `web`: protocol sniffed, so HTTP/1.1, HTTP/2 and gRPC all fit);
//!   the node namespace DNATs it for pods that are not redirected.
//!
//! The proxy runs as a child process in the host network namespace, in the
//! topology's cgroup `proxy`, with `--node node-a`.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::access_log::{AccessLog, Entry};
use crate::topology::Topology;

pub const CLIENT: &str = "sleep";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
/// A second enrolled client, in the same namespace (per-client isolation).
pub const CLIENT_B: &str = "sleep-b";
pub const CLIENT_B_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);
pub const BYSTANDER: &str = "bystander";
pub const BYSTANDER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 6);
pub const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
pub const SERVICE_FQDN: &str = "mock-server.shop.svc.cluster.local";
pub const CLUSTER: &str = "outbound|80||mock-server.shop.svc.cluster.local";
/// Service `echo.shop` (port `tcp-echo`, declared TCP): the backends' raw
/// TCP echo on :7000, with [`MeshOptions::echo_service`].
pub const ECHO_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 7000);

/// (pod name, IP, node, zone) of the backends.
pub const BACKENDS: [(&str, Ipv4Addr, &str, &str); 3] = [
    (
        "mock-server-a",
        Ipv4Addr::new(10, 244, 0, 11),
        "node-a",
        "zone-a",
    ),
    (
        "mock-server-b",
        Ipv4Addr::new(10, 244, 0, 12),
        "node-a",
        "zone-a",
    ),
    (
        "mock-server-c",
        Ipv4Addr::new(10, 244, 0, 13),
        "node-b",
        "zone-b",
    ),
];

#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub sockmap: bool,
    /// Namespace `shop` carries `nodeway.io/redirect: enabled`.
    pub shop_enrolled: bool,
    /// Extra YAML documents (DestinationRules, VirtualServices).
    pub extra_yaml: String,
    /// `--fail-rate` of each backend (same order as [`BACKENDS`]).
    pub fail_rates: [f64; 3],
    /// The client pod `sleep` has no `nodeway.io/netns` annotation, only a
    /// UID; a "pause" process in a cgroup named `pod<UID>` (as the kubelet
    /// names them) holds its namespace, and the proxy must find it.
    pub discover_client: bool,
    /// Kubernetes mode: the objects are served by an in-process fake API
    /// server (`--kubernetes --kube-api`), every pod is found by its UID.
    pub kubernetes: bool,
    /// The backends also run a TCP echo on :7000, Service `echo` ([`ECHO_VIP`]).
    pub echo_service: bool,
}

/// `metadata.uid` of a mesh pod (used when its namespace is found by UID).
pub fn pod_uid(name: &str) -> String {
    if name == CLIENT {
        return CLIENT_UID.to_owned();
    }
    let n = name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    format!("00000000-0000-4000-8000-{:012x}", n & 0xffff_ffff_ffff)
}

fn found_by_uid(opts: &MeshOptions, name: &str) -> bool {
    opts.kubernetes || (opts.discover_client && name == CLIENT)
}

/// `metadata.uid` of the client pod when [`MeshOptions::discover_client`].
pub const CLIENT_UID: &str = "6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b";

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            sockmap: false,
            shop_enrolled: true,
            extra_yaml: String::new(),
            fail_rates: [0.0; 3],
            discover_client: false,
            kubernetes: false,
            echo_service: false,
        }
    }
}

pub struct Mesh {
    /// Dropped last: the proxy and the pods' processes are killed with it.
    pub topo: Topology,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: AccessLog,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub proxy: Option<Child>,
    proxy_stderr: PathBuf,
    /// Long-lived processes holding pod namespaces (discovery by UID).
    sandboxes: Vec<Child>,
    /// Kubernetes mode: the fake API server and the runtime serving it.
    kube: Option<(
        tokio::runtime::Runtime,
        crate::fake_apiserver::FakeApiServer,
    )>,
    opts: MeshOptions,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

/// The mesh's Kubernetes and Istio objects.
pub fn config_yaml(topo: &Topology, opts: &MeshOptions) -> String {
    let mut y = String::new();
    let label = if opts.shop_enrolled {
        "\n  labels:\n    nodeway.io/redirect: enabled"
    } else {
        ""
    };
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop{label}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n---\n"
    );
    for (node, zone) in [("node-a", "zone-a"), ("node-b", "zone-b")] {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels:\n    \
             topology.kubernetes.io/region: local\n    topology.kubernetes.io/zone: {zone}\n---\n"
        );
    }
    let mut pod = |name: &str, ns: &str, app: &str, ip: Ipv4Addr, node: &str| {
        let netns = topo.pod(name).netns_path.display().to_string();
        // Subsets: mock-server-a/-b are `version: v1`, mock-server-c `v2`.
        let version = match name {
            "mock-server-c" => "\n    version: v2",
            n if n.starts_with("mock-server") => "\n    version: v1",
            _ => "",
        };
        let identity = if found_by_uid(opts, name) {
            format!("uid: {}", pod_uid(name))
        } else {
            format!("annotations:\n    nodeway.io/netns: {netns}")
        };
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
             labels:\n    app: {app}{version}\n  {identity}\n\
             spec:\n  nodeName: {node}\n  containers:\n    - name: main\n      image: test\n\
             status:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n    - ip: {ip}\n---\n"
        );
    };
    pod(CLIENT, "shop", "sleep", CLIENT_IP, "node-a");
    pod(CLIENT_B, "shop", "sleep-b", CLIENT_B_IP, "node-a");
    pod(BYSTANDER, "plain", "bystander", BYSTANDER_IP, "node-a");
    for (name, ip, node, _) in BACKENDS {
        pod(name, "shop", "mock-server", ip, node);
    }
    service_yaml(&mut y, "mock-server", "web", VIP, 8080);
    if opts.echo_service {
        service_yaml(&mut y, "echo", "tcp-echo", ECHO_VIP, 7000);
    }
    y.push_str(&opts.extra_yaml);
    y
}

/// A Service `name.shop` at `vip` selecting the backends, and its
/// EndpointSlice with every backend on `target_port`.
fn service_yaml(y: &mut String, name: &str, port_name: &str, vip: SocketAddrV4, target_port: u16) {
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n\
         spec:\n  selector:\n    app: mock-server\n  clusterIP: {ip}\n  ports:\n    - name: {port_name}\n      \
         port: {port}\n      targetPort: {target_port}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  \
         namespace: shop\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\n\
         ports:\n  - name: {port_name}\n    port: {target_port}\n    protocol: TCP\nendpoints:\n",
        ip = vip.ip(),
        port = vip.port()
    );
    for (pod, ip, node, zone) in BACKENDS {
        let _ = write!(
            y,
            "  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n    nodeName: {node}\n    \
             zone: {zone}\n    targetRef: {{kind: Pod, namespace: shop, name: {pod}}}\n"
        );
    }
    y.push_str("---\n");
}

/// Arguments of `mixed-load` (tests/src/bin/mixed-load.rs) against the
/// mesh's Services for `seconds`, its answered request ids into `ids`;
/// `extra` adds or overrides options (rates, `--latency-file`).
pub fn mixed_load_args(
    tag: &str,
    seconds: u64,
    ids: &Path,
    extra: &[(&str, String)],
) -> Vec<String> {
    [
        ("--http", VIP.to_string()),
        ("--authority", SERVICE_FQDN.to_owned()),
        ("--tcp", ECHO_VIP.to_string()),
        ("--seconds", seconds.to_string()),
        ("--tag", tag.to_owned()),
        ("--ids-file", ids.display().to_string()),
    ]
    .into_iter()
    .chain(extra.iter().map(|(k, v)| (*k, v.clone())))
    .flat_map(|(k, v)| [k.to_owned(), v])
    .collect()
}

impl Mesh {
    /// Builds the topology, starts the backends and the proxy, and waits
    /// until the proxy reports every expected pod enrolled.
    pub fn start(nodeway: &Path, mock_upstream: &Path, opts: MeshOptions) -> Mesh {
        let mut mesh = Mesh::build(mock_upstream, opts);
        mesh.start_proxy(nodeway);
        mesh
    }

    /// The topology, backends and configuration, without a proxy.
    pub fn build(mock_upstream: &Path, opts: MeshOptions) -> Mesh {
        let mut topo = Topology::new();
        topo.add_pod(CLIENT, CLIENT_IP);
        topo.add_pod(CLIENT_B, CLIENT_B_IP);
        topo.add_pod(BYSTANDER, BYSTANDER_IP);
        let mut backends = Vec::new();
        for (i, (name, ip, _, _)) in BACKENDS.into_iter().enumerate() {
            topo.add_pod(name, ip);
            let listen = format!("{ip}:8080");
            let fail = opts.fail_rates[i].to_string();
            let echo = format!("{ip}:{}", ECHO_VIP.port());
            let mut args = vec!["--listen", &listen, "--name", name, "--fail-rate", &fail];
            if opts.echo_service {
                args.extend(["--echo", &echo]);
            }
            let mut child = topo.spawn(name, mock_upstream, &args);
            crate::topology::wait_for_stdout_line(&mut child, "listening", Duration::from_secs(10));
            backends.push(SocketAddrV4::new(ip, 8080));
        }
        topo.add_service_vip(VIP, &backends);
        if opts.echo_service {
            let echo: Vec<SocketAddrV4> = backends
                .iter()
                .map(|b| SocketAddrV4::new(*b.ip(), ECHO_VIP.port()))
                .collect();
            topo.add_service_vip(ECHO_VIP, &echo);
        }
        let mut sandboxes = Vec::new();
        // Pods found by UID get a "sandbox": a long-lived process in the
        // pod's namespace, in a cgroup named `pod<UID>` as the kubelet names them.
        let names: Vec<String> = topo.pods().iter().map(|p| p.name.clone()).collect();
        for name in names.iter().filter(|n| found_by_uid(&opts, n)) {
            let cgroup = topo.add_cgroup(&format!("pod{}", pod_uid(name)));
            let netns = format!("--net={}", topo.pod(name).netns_path.display());
            sandboxes.push(topo.spawn_in_cgroup(
                &cgroup,
                "nsenter",
                &[netns.as_str(), "--", "sleep", "600"],
            ));
        }
        let dir = std::env::temp_dir().join(format!("{}-mesh", topo.id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mesh temp dir");
        // A bpf filesystem of the mesh's own for the pinned maps, so meshes
        // running at once (and the host's /sys/fs/bpf) never share them.
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs).expect("bpffs mount point");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpffs)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            mounted,
            "cannot mount a bpf filesystem at {}",
            bpffs.display()
        );
        let config = dir.join("mesh.yaml");
        let yaml = config_yaml(&topo, &opts);
        std::fs::write(&config, &yaml).expect("write mesh config");
        let kube = opts.kubernetes.then(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime for the fake API server");
            let server = rt.block_on(crate::fake_apiserver::FakeApiServer::start());
            apply_yaml(&server, &yaml);
            (rt, server)
        });
        Mesh {
            log: AccessLog::new(dir.join("access.log")),
            proxy_stderr: dir.join("nodeway.stderr"),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
            topo,
            dir,
            config,
            proxy: None,
            sandboxes,
            kube,
            opts,
        }
    }

    /// Where the proxies pin their eBPF maps (on the mesh's own bpffs).
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.join("bpffs").join("nodeway")
    }

    /// Arguments of `nodeway run` for this mesh.
    pub fn proxy_args(
        &self,
        admin: SocketAddr,
        metrics: SocketAddr,
        readiness: &str,
        log: &Path,
    ) -> Vec<String> {
        let source: Vec<String> = match &self.kube {
            Some((_, server)) => vec!["--kubernetes".into(), "--kube-api".into(), server.url()],
            None => vec!["--config".into(), self.config.display().to_string()],
        };
        ["run".to_owned()]
            .into_iter()
            .chain(source)
            .chain([
                "--redirect".into(),
                "ebpf".into(),
                "--sockmap".into(),
                if self.opts.sockmap { "on" } else { "off" }.into(),
                "--cgroup".into(),
                self.topo.cgroup_dir().display().to_string(),
                "--bpf-pin-dir".into(),
                self.pin_dir().display().to_string(),
                "--node".into(),
                "node-a".into(),
                "--outbound-addr".into(),
                "127.0.0.1:0".into(),
                "--admin-addr".into(),
                admin.to_string(),
                "--metrics-addr".into(),
                metrics.to_string(),
                "--readiness-addr".into(),
                readiness.to_owned(),
                "--access-log".into(),
                log.display().to_string(),
                "--log-level".into(),
                "info,nodeway::ebpf=debug".into(),
            ])
            .collect()
    }

    /// The topology's cgroup for proxies.
    fn proxy_cgroup(&mut self) -> PathBuf {
        let cgroup = self.topo.cgroup_dir().join("proxy");
        if cgroup.is_dir() {
            cgroup
        } else {
            self.topo.add_cgroup("proxy")
        }
    }

    /// Starts another proxy process (`name` for its files) next to any
    /// running one, on ports of its own; does not wait for it.
    pub fn spawn_generation(&mut self, nodeway: &Path, name: &str, extra: &[&str]) -> Generation {
        let cgroup = self.proxy_cgroup();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let readiness = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = self.dir.join(format!("access-{name}.log"));
        let stderr_path = self.dir.join(format!("nodeway-{name}.stderr"));
        let mut args = self.proxy_args(admin, metrics, &readiness.to_string(), &log);
        if extra.contains(&"--config")
            && let Some(i) = args.iter().position(|a| a == "--config")
        {
            args.drain(i..i + 2);
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut child = self.topo.spawn_in_cgroup(&cgroup, nodeway, &args);
        copy_output(&mut child, &stderr_path);
        Generation {
            name: name.to_owned(),
            child: Some(child),
            admin,
            metrics,
            readiness,
            log: AccessLog::new(log),
            stderr_path,
        }
    }

    /// Starts the proxy (again) and waits for its enrolment. The admin and
    /// metrics ports were free when chosen; if another process took one
    /// since, the proxy is started again on fresh ports.
    pub fn start_proxy(&mut self, nodeway: &Path) {
        for attempt in 1..=3 {
            match self.try_start_proxy(nodeway) {
                Ok(()) => return,
                Err(stderr) if stderr.contains("Address already in use") && attempt < 3 => {
                    self.admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    self.metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
                }
                Err(stderr) => panic!("nodeway exited:\n{stderr}"),
            }
        }
    }

    fn try_start_proxy(&mut self, nodeway: &Path) -> Result<(), String> {
        let cgroup = self.proxy_cgroup();
        let args = self.proxy_args(self.admin, self.metrics, "127.0.0.1:0", self.log.path());
        let mut child = self.topo.spawn_in_cgroup(&cgroup, nodeway, &args);
        // Keep the proxy's stderr in a file the tests can show on failure.
        copy_output(&mut child, &self.proxy_stderr);
        self.proxy = Some(child);
        let expected = self.expected_enrolled();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.redirect_status()
                && status["mode"] == "ebpf"
                && status["enrolled"].as_array().map_or(0, Vec::len) >= expected
            {
                return Ok(());
            }
            if let Some(Ok(Some(exit))) = self.proxy.as_mut().map(Child::try_wait) {
                // Let the stderr copier finish.
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!("({exit}) {}", self.proxy_stderr()));
            }
            assert!(
                Instant::now() < deadline,
                "nodeway did not enroll the pods in 30 s; /redirect: {:?}\n{}",
                self.redirect_status(),
                self.proxy_stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pods of namespace `shop` on node-a: the two clients and two backends.
    fn expected_enrolled(&self) -> usize {
        if self.opts.shop_enrolled { 4 } else { 0 }
    }

    pub fn proxy_stderr(&self) -> String {
        std::fs::read_to_string(&self.proxy_stderr).unwrap_or_default()
    }

    /// GET on the admin API (loopback), parsed as JSON.
    pub fn admin_json(&self, path: &str) -> Option<Value> {
        let body = http_get(self.admin, path)?;
        serde_json::from_str(&body).ok()
    }

    pub fn redirect_status(&self) -> Option<Value> {
        self.admin_json("/redirect")
    }

    /// `/metrics` text (loopback).
    pub fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics").unwrap_or_default()
    }

    /// Rewrites the config with new options and waits until the proxy has
    /// installed it and its enrolment count matches.
    pub fn reconfigure(&mut self, opts: MeshOptions) {
        let before = self
            .admin_json("/config_dump")
            .and_then(|d| d["generation"].as_u64())
            .unwrap_or(0);
        self.opts = opts;
        let yaml = config_yaml(&self.topo, &self.opts);
        std::fs::write(&self.config, &yaml).expect("write config");
        if let Some((_, server)) = &self.kube {
            apply_yaml(server, &yaml);
        }
        let expected = self.expected_enrolled();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let generation = self
                .admin_json("/config_dump")
                .and_then(|d| d["generation"].as_u64())
                .unwrap_or(0);
            let enrolled = self
                .redirect_status()
                .and_then(|s| s["enrolled"].as_array().map(Vec::len))
                .unwrap_or(usize::MAX);
            if generation > before && enrolled == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "config not applied (generation {generation}, enrolled {enrolled})\n{}",
                self.proxy_stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `pod-client ARGS` in `pod` and parses its last JSON line.
    pub fn pod_client(&self, pod_client: &Path, pod: &str, args: &[&str]) -> Value {
        let out: Output = self
            .topo
            .run(pod, pod_client, args, Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| !l.trim().is_empty());
        match line.and_then(|l| serde_json::from_str(l).ok()) {
            Some(v) => v,
            None => panic!(
                "pod-client {args:?} in {pod}: {}\nstdout: {stdout}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Waits until the access log has at least `n` lines; returns them all.
    pub fn wait_log_lines(&self, n: usize, within: Duration) -> Vec<Entry> {
        let deadline = Instant::now() + within;
        loop {
            let lines = self.log.lines();
            if lines.len() >= n || Instant::now() >= deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes `next` the mesh's proxy (after an upgrade): its process, admin,
    /// metrics and access log.
    pub fn adopt(&mut self, mut next: Generation) {
        if let Some(mut old) = self.proxy.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        self.proxy = next.child.take();
        self.admin = next.admin;
        self.metrics = next.metrics;
        self.log = next.log.clone();
        self.proxy_stderr = next.stderr_path.clone();
    }

    /// SIGTERM to the proxy; waits for it to exit and returns its status.
    pub fn stop_proxy(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.proxy.take()?;
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        wait_or_kill(child, Duration::from_secs(20))
    }
}

/// Waits for `child` to exit; kills it after `within`.
fn wait_or_kill(mut child: Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Copies a child's stderr to `path` and discards its stdout, in threads.
fn copy_output(child: &mut Child, path: &Path) {
    let file = std::fs::File::create(path).expect("proxy stderr file");
    if let Some(mut err) = child.stderr.take() {
        let mut file = file;
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut file);
        });
    }
    if let Some(mut out) = child.stdout.take() {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
    }
}

/// One proxy process of an upgrade sequence.
pub struct Generation {
    pub name: String,
    pub child: Option<Child>,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    pub log: AccessLog,
    stderr_path: PathBuf,
}

impl Generation {
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits until `/healthz/ready` answers 200; `Err` with its stderr if
    /// the process exits first or `within` passes.
    pub fn wait_ready(&mut self, within: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            if http_get(self.readiness, "/healthz/ready").is_some() {
                return Ok(start.elapsed());
            }
            if let Some(Ok(Some(exit))) = self.child.as_mut().map(Child::try_wait) {
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!("{} exited ({exit}):\n{}", self.name, self.stderr()));
            }
            if start.elapsed() > within {
                return Err(format!(
                    "{} not ready in {within:?}:\n{}",
                    self.name,
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`TERM`, `KILL`) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = std::process::Command::new("kill")
                .args([format!("-{signal}"), child.id().to_string()])
                .status();
        }
    }

    /// Waits for the process to exit (killed after `within`).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        wait_or_kill(self.child.take()?, within)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for mut child in self.sandboxes.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut child) = self.proxy.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.join("bpffs"))
            .status();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("mesh files kept in {}", self.dir.display());
        }
    }
}

/// Serves every document of `yaml` from the fake API server (as a real API
/// server would after `kubectl apply`).
fn apply_yaml(server: &crate::fake_apiserver::FakeApiServer, yaml: &str) {
    use serde::Deserialize;
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc).expect("mesh YAML");
        if value.is_object() {
            server.apply(value);
        }
    }
}

/// A minimal blocking HTTP/1.1 GET on loopback (admin and metrics only).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some(dechunk(body));
    }
    Some(body.to_owned())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
