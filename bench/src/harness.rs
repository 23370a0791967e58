//! The benchmark's world: a topology of network namespaces with no uplink
//! (client and bystander pods, backend pods, the node in between), the
//! systems under test started and stopped in it, and the readings taken from
//! them (cgroup `cpu.stat`, eBPF run time, `smaps_rollup`).
//!
//! Pods (addresses exist only inside the topology):
//! - `client` 10.244.0.5, namespace `shop` (enrolled when Nodeway runs):
//!   runs the load generator.
//! - `bystander` 10.244.0.6, namespace `plain` (never enrolled).
//! - `server-a` 10.244.0.11, `server-b` 10.244.0.12, namespace `backend`
//!   (not enrolled: only the client side is proxied, as with one sidecar):
//!   the backend, HTTP on :8080, TCP echo on :9000, and on :8081 a copy that
//!   answers 10% of requests with 503 (scenario 8).
//! - `server-dead` 10.244.0.13: a pod where nothing listens (refused).
//!
//! Services (kube-proxy's DNAT in the node namespace for the direct path):
//! - `web` 10.96.0.10:80 → server-a:8080 (port `web`: protocol sniffed, so
//!   HTTP/2 and gRPC stay HTTP/2 to the backend, as Istio does), and :9000 →
//!   server-a:9000 (port `tcp-echo`, plain TCP for Nodeway).
//! - `clean` 10.96.0.20:80 → server-a:8080, server-b:8080.
//! - `faulty` 10.96.0.30:80 → server-a:8081, server-b:8081, server-dead:8081.
//!
//! Every process is pinned: proxies to CPU 0, generator and backends to CPU 1.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nodeway_tests::topology::{Topology, wait_for_stdout_line};

use crate::model::{Load, LoadResult};

pub const CLIENT: &str = "client";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
pub const BYSTANDER: &str = "bystander";
pub const BYSTANDER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 6);
pub const SERVER_A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
pub const SERVER_B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 12);
pub const SERVER_DEAD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 13);
pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const CLEAN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const FAULTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
pub const HTTP_PORT: u16 = 8080;
pub const FAULTY_PORT: u16 = 8081;
pub const ECHO_PORT: u16 = 9000;
/// Where HAProxy listens inside the client pod (loopback of the pod).
pub const HAPROXY_WEB: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10080));
pub const HAPROXY_ECHO: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10090));
pub const HAPROXY_CLEAN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10081));
pub const HAPROXY_FAULTY: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10082));
/// CPU of the proxies; the generator and backends get [`LOAD_CPU`].
pub const PROXY_CPU: &str = "0";
pub const LOAD_CPU: &str = "1";

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum System {
    Direct,
    Haproxy,
    /// Nodeway, `--redirect ebpf --sockmap off`.
    Nodeway,
    /// Nodeway, `--redirect ebpf --sockmap on`.
    NodewaySockmap,
    /// Nodeway (sockmap off) with retries, timeouts, outlier detection and
    /// pool limits configured on `clean` and `faulty`.
    NodewayResilience,
    /// HAProxy with the same policies in its own terms.
    HaproxyResilience,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Haproxy => "HAProxy",
            System::Nodeway => "Nodeway",
            System::NodewaySockmap => "Nodeway sockmap",
            System::NodewayResilience => "Nodeway + resilience",
            System::HaproxyResilience => "HAProxy + resilience",
        }
    }

    pub fn is_haproxy(self) -> bool {
        matches!(self, System::Haproxy | System::HaproxyResilience)
    }

    /// Where the client sends HTTP for service `web`.
    pub fn web(self) -> SocketAddr {
        if self.is_haproxy() {
            HAPROXY_WEB
        } else {
            SocketAddr::from((WEB_VIP, 80))
        }
    }

    /// Where the client sends the L4 ping-pong.
    pub fn echo(self) -> SocketAddr {
        if self.is_haproxy() {
            HAPROXY_ECHO
        } else {
            SocketAddr::from((WEB_VIP, ECHO_PORT))
        }
    }

    pub fn clean(self) -> SocketAddr {
        if self.is_haproxy() {
            HAPROXY_CLEAN
        } else {
            SocketAddr::from((CLEAN_VIP, 80))
        }
    }

    pub fn faulty(self) -> SocketAddr {
        if self.is_haproxy() {
            HAPROXY_FAULTY
        } else {
            SocketAddr::from((FAULTY_VIP, 80))
        }
    }
}

/// Kills and reaps a child on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies a child's stdout and stderr into `file` (so pipes never fill up).
fn drain_to(child: &mut Child, file: &Path) {
    let out = std::fs::File::create(file).ok();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let mut sink = out.as_ref().and_then(|f| f.try_clone().ok());
        std::thread::spawn(move || {
            let mut pipe = pipe;
            match sink.as_mut() {
                Some(f) => {
                    let _ = std::io::copy(&mut pipe, f);
                }
                None => {
                    let _ = std::io::copy(&mut pipe, &mut std::io::sink());
                }
            }
        });
    }
}

/// The topology, backends running; systems come and go on top of it.
pub struct World {
    pub topo: Topology,
    pub bench_bin: PathBuf,
    pub nodeway_bin: PathBuf,
    pub dir: PathBuf,
    pub proxy_cgroup: PathBuf,
    pub haproxy_cgroup: PathBuf,
    _backends: Vec<Proc>,
}

/// A running system: its proxy process (none for direct) and where to read
/// its readings.
pub struct Running {
    pub system: System,
    pub proxy: Option<Proc>,
    pub cgroup: Option<PathBuf>,
}

impl World {
    pub fn new(bench_bin: &Path, nodeway_bin: &Path, dir: &Path) -> Result<World, String> {
        let mut topo = Topology::new();
        topo.add_pod(CLIENT, CLIENT_IP);
        topo.add_pod(BYSTANDER, BYSTANDER_IP);
        topo.add_pod("server-a", SERVER_A);
        topo.add_pod("server-b", SERVER_B);
        topo.add_pod("server-dead", SERVER_DEAD);
        let http = |ip: Ipv4Addr, port: u16| SocketAddrV4::new(ip, port);
        topo.add_service_vip(SocketAddrV4::new(WEB_VIP, 80), &[http(SERVER_A, HTTP_PORT)]);
        topo.add_service_vip(
            SocketAddrV4::new(WEB_VIP, ECHO_PORT),
            &[http(SERVER_A, ECHO_PORT)],
        );
        topo.add_service_vip(
            SocketAddrV4::new(CLEAN_VIP, 80),
            &[http(SERVER_A, HTTP_PORT), http(SERVER_B, HTTP_PORT)],
        );
        topo.add_service_vip(
            SocketAddrV4::new(FAULTY_VIP, 80),
            &[
                http(SERVER_A, FAULTY_PORT),
                http(SERVER_B, FAULTY_PORT),
                http(SERVER_DEAD, FAULTY_PORT),
            ],
        );
        // Connection-per-request loads leave TIME_WAIT sockets behind on the
        // client side (the generator's, and the proxies' upstream ones, all
        // in the client pod): let them be reused, as busy clients do.
        // (The ephemeral port range stays the default, 32768-60999: a wider
        // one would hand out the proxy's in-pod ports 15001/15006.)
        for pod in [CLIENT, BYSTANDER] {
            let ns = topo.pod(pod).netns_path.display().to_string();
            let status = Command::new("nsenter")
                .arg(format!("--net={ns}"))
                .args(["--", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse"])
                .status()
                .map_err(|e| format!("nsenter: {e}"))?;
            if !status.success() {
                return Err(format!("cannot set net.ipv4.tcp_tw_reuse=1 in pod {pod}"));
            }
        }
        let proxy_cgroup = topo.add_cgroup("proxy");
        let haproxy_cgroup = topo.add_cgroup("haproxy");
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut backends = Vec::new();
        for (pod, ip) in [("server-a", SERVER_A), ("server-b", SERVER_B)] {
            for (port, fail, echo) in [(HTTP_PORT, "0", true), (FAULTY_PORT, "0.1", false)] {
                let mut args: Vec<String> = vec![
                    "-c".into(),
                    LOAD_CPU.into(),
                    bench_bin.display().to_string(),
                    "backend".into(),
                    "--http".into(),
                    format!("{ip}:{port}"),
                    "--name".into(),
                    format!("{pod}:{port}"),
                    "--fail-rate".into(),
                    fail.into(),
                ];
                if echo {
                    args.extend(["--echo".into(), format!("{ip}:{ECHO_PORT}")]);
                }
                let mut child = topo.spawn(pod, "taskset", &args);
                wait_for_stdout_line(&mut child, "ready", Duration::from_secs(10));
                drain_to(&mut child, &dir.join(format!("{pod}-{port}.log")));
                backends.push(Proc { child });
            }
        }
        Ok(World {
            topo,
            bench_bin: bench_bin.to_owned(),
            nodeway_bin: nodeway_bin.to_owned(),
            dir: dir.to_owned(),
            proxy_cgroup,
            haproxy_cgroup,
            _backends: backends,
        })
    }

    /// Starts `system` and waits until it carries traffic.
    pub fn start(&self, system: System) -> Result<Running, String> {
        match system {
            System::Direct => Ok(Running {
                system,
                proxy: None,
                cgroup: None,
            }),
            System::Haproxy | System::HaproxyResilience => self.start_haproxy(system),
            System::Nodeway | System::NodewaySockmap | System::NodewayResilience => {
                self.start_nodeway(system)
            }
        }
    }

    fn start_haproxy(&self, system: System) -> Result<Running, String> {
        let cfg = self.dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(system == System::HaproxyResilience))
            .map_err(|e| format!("{}: {e}", cfg.display()))?;
        let netns = format!("--net={}", self.topo.pod(CLIENT).netns_path.display());
        let args: Vec<String> = vec![
            netns,
            "--".into(),
            "taskset".into(),
            "-c".into(),
            PROXY_CPU.into(),
            "haproxy".into(),
            "-db".into(),
            "-f".into(),
            cfg.display().to_string(),
        ];
        let mut child = self
            .topo
            .spawn_in_cgroup(&self.haproxy_cgroup, "nsenter", &args);
        drain_to(&mut child, &self.dir.join("haproxy.log"));
        let proc = Proc { child };
        self.probe(HAPROXY_WEB, false)?;
        self.probe(HAPROXY_ECHO, true)?;
        Ok(Running {
            system,
            proxy: Some(proc),
            cgroup: Some(self.haproxy_cgroup.clone()),
        })
    }

    fn start_nodeway(&self, system: System) -> Result<Running, String> {
        let cfg = self.dir.join("nodeway.yaml");
        std::fs::write(
            &cfg,
            nodeway_config(
                |pod| self.topo.pod(pod).netns_path.display().to_string(),
                system == System::NodewayResilience,
            ),
        )
        .map_err(|e| format!("{}: {e}", cfg.display()))?;
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let sockmap = if system == System::NodewaySockmap {
            "on"
        } else {
            "off"
        };
        let args: Vec<String> = vec![
            "-c".into(),
            PROXY_CPU.into(),
            self.nodeway_bin.display().to_string(),
            "run".into(),
            "--config".into(),
            cfg.display().to_string(),
            "--redirect".into(),
            "ebpf".into(),
            "--sockmap".into(),
            sockmap.into(),
            "--cgroup".into(),
            self.topo.cgroup_dir().display().to_string(),
            // Private maps: a benchmark never shares the host's pins.
            "--bpf-pin-dir".into(),
            "none".into(),
            "--node".into(),
            "node-a".into(),
            "--worker-threads".into(),
            "1".into(),
            "--outbound-addr".into(),
            "127.0.0.1:0".into(),
            "--admin-addr".into(),
            admin.to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
            "--readiness-addr".into(),
            "127.0.0.1:0".into(),
            "--access-log".into(),
            "off".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        let mut child = self
            .topo
            .spawn_in_cgroup(&self.proxy_cgroup, "taskset", &args);
        drain_to(&mut child, &self.dir.join("nodeway.log"));
        let mut proc = Proc { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let enrolled = http_get(admin, "/redirect")
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v["enrolled"].as_array().map(Vec::len))
                .unwrap_or(0);
            if enrolled >= 1 {
                break;
            }
            if let Ok(Some(exit)) = proc.child.try_wait() {
                return Err(format!(
                    "nodeway exited ({exit}) before enrolling the client:\n{}",
                    self.log_tail("nodeway.log")
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nodeway did not enroll the client in 30 s:\n{}",
                    self.log_tail("nodeway.log")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.probe(system.web(), false)?;
        self.probe(system.echo(), true)?;
        Ok(Running {
            system,
            proxy: Some(proc),
            cgroup: Some(self.proxy_cgroup.clone()),
        })
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until an HTTP GET from the client pod to `addr` succeeds.
    fn probe(&self, addr: SocketAddr, tcp: bool) -> Result<(), String> {
        let mut args = vec!["probe".to_owned(), addr.to_string()];
        if tcp {
            args.push("--tcp".to_owned());
        }
        let out = self
            .topo
            .run(CLIENT, &self.bench_bin, &args, Duration::from_secs(20));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{addr} does not answer from the client pod: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs one generator job in `pod`, pinned to the load CPU.
    pub fn load(&self, pod: &str, load: &Load) -> Result<LoadResult, String> {
        let spec = serde_json::to_string(load).map_err(|e| e.to_string())?;
        let args = [
            "-c".to_owned(),
            LOAD_CPU.into(),
            self.bench_bin.display().to_string(),
            "gen".into(),
            spec,
        ];
        let out = self
            .topo
            .run(pod, "taskset", &args, Duration::from_secs(600));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        if !out.status.success() {
            return Err(format!(
                "generator failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_str(last).map_err(|e| format!("generator output {last:?}: {e}"))
    }

    /// Starts an `Idle` generator job in `pod` and waits until it holds its
    /// connections; close its stdin (drop [`IdleHolder`]) to finish it.
    pub fn hold_idle(&self, pod: &str, load: &Load) -> Result<IdleHolder, String> {
        let spec = serde_json::to_string(load).map_err(|e| e.to_string())?;
        let p = self.topo.pod(pod);
        let netns = format!("--net={}", p.netns_path.display());
        // In the pod's cgroup, as `Topology::spawn` does: the eBPF programs
        // only see processes below the topology's cgroup.
        let procs = p.cgroup.join("cgroup.procs");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                r#"echo $$ > '{}' && exec "$0" "$@""#,
                procs.display()
            ))
            .args(["nsenter", &netns, "--", "taskset", "-c", LOAD_CPU])
            .arg(&self.bench_bin)
            .arg("gen")
            .arg(spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn idle generator: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(120)).map_err(|_| {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            format!("idle generator did not report its connections open: {err}")
        })?;
        let opened: serde_json::Value =
            serde_json::from_str(&first).map_err(|e| format!("idle line {first:?}: {e}"))?;
        Ok(IdleHolder {
            child: Some(child),
            lines: rx,
            open: opened["idle_open"].as_u64().unwrap_or(0),
            errors: opened["errors"].as_u64().unwrap_or(0),
        })
    }
}

/// A generator holding idle connections.
pub struct IdleHolder {
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    pub open: u64,
    pub errors: u64,
}

impl IdleHolder {
    /// Closes the connections (stdin EOF) and returns the generator's result.
    pub fn finish(mut self) -> Result<LoadResult, String> {
        let mut child = self.child.take().ok_or("already finished")?;
        drop(child.stdin.take());
        let last = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| "idle generator did not finish".to_owned());
        let _ = child.kill();
        let _ = child.wait();
        let last = last?;
        serde_json::from_str(&last).map_err(|e| format!("idle result {last:?}: {e}"))
    }
}

impl Drop for IdleHolder {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU time of a cgroup, microseconds (user + system, from `cpu.stat`).
pub fn cgroup_cpu_us(cgroup: &Path) -> u64 {
    let text = std::fs::read_to_string(cgroup.join("cpu.stat")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Total run time of Nodeway's eBPF programs, nanoseconds (needs
/// `kernel.bpf_stats_enabled=1`), from `bpftool prog show`.
pub fn ebpf_run_ns() -> u64 {
    let Ok(out) = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
    else {
        return 0;
    };
    let Ok(progs) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return 0;
    };
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("nodeway_"))
        })
        .filter_map(|p| p["run_time_ns"].as_u64())
        .sum()
}

/// Turns on eBPF run-time statistics; returns the previous value.
pub fn enable_bpf_stats() -> Result<String, String> {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let old = std::fs::read_to_string(path)
        .map_err(|e| format!("{path}: {e}"))?
        .trim()
        .to_owned();
    std::fs::write(path, "1").map_err(|e| format!("{path}: {e}"))?;
    Ok(old)
}

pub fn restore_bpf_stats(old: &str) {
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", old);
}

/// `Rss` of a process from `/proc/PID/smaps_rollup`, kB.
pub fn rss_kb(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// One HTTP/1.0 GET on loopback (the proxy's admin API); the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}

/// HAProxy's configuration: one thread, HTTP frontends for `web` (HTTP/2
/// requests go on to the backend in HTTP/2, like Nodeway's sniffed port),
/// `clean` and `faulty`, a TCP frontend for the echo; with `resilience`, the nearest
/// equivalents of the Istio policies Nodeway gets (retries on 5xx and
/// connect failure, a per-try timeout, passive health checks, limits).
pub fn haproxy_config(resilience: bool) -> String {
    let mut c = String::new();
    let _ = write!(
        c,
        "global\n  nbthread 1\n  maxconn 9980\n\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  \
         timeout server 60s\n  timeout http-keep-alive 60s\n  http-reuse always\n\n\
         frontend web\n  bind {HAPROXY_WEB}\n  use_backend web_h2 if {{ req.ver 2.0 }}\n  \
         default_backend web\n\n\
         backend web\n  server a {SERVER_A}:{HTTP_PORT}\n\n\
         backend web_h2\n  server a {SERVER_A}:{HTTP_PORT} proto h2\n\n\
         frontend echo\n  mode tcp\n  bind {HAPROXY_ECHO}\n  default_backend echo\n\n\
         backend echo\n  mode tcp\n  server a {SERVER_A}:{ECHO_PORT}\n\n\
         frontend clean\n  bind {HAPROXY_CLEAN}\n  default_backend clean\n\n\
         frontend faulty\n  bind {HAPROXY_FAULTY}\n  default_backend faulty\n\n"
    );
    let policy = if resilience {
        "  balance leastconn\n  retries 2\n  retry-on 503 conn-failure empty-response response-timeout\n  \
         option redispatch 1\n  timeout server 2s\n"
    } else {
        "  balance roundrobin\n"
    };
    let server_opts = if resilience {
        " maxconn 1024 check observe layer7 error-limit 5 on-error mark-down inter 10s"
    } else {
        ""
    };
    for (name, port, servers) in [
        ("clean", HTTP_PORT, &[SERVER_A, SERVER_B][..]),
        (
            "faulty",
            FAULTY_PORT,
            &[SERVER_A, SERVER_B, SERVER_DEAD][..],
        ),
    ] {
        let _ = writeln!(c, "backend {name}");
        c.push_str(policy);
        for (i, ip) in servers.iter().enumerate() {
            let _ = writeln!(c, "  server s{i} {ip}:{port}{server_opts}");
        }
        c.push('\n');
    }
    c
}

/// Nodeway's objects: the client enrolled, backends not; with
/// `resilience`, a DestinationRule (pool limits, outlier detection) and a
/// VirtualService (retries, timeout) on `clean` and `faulty`.
/// `netns_of(pod)` gives the pod's network namespace file.
pub fn nodeway_config(netns_of: impl Fn(&str) -> String, resilience: bool) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    \
         nodeway.io/redirect: enabled\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: backend\n---\n\
         apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels:\n    \
         topology.kubernetes.io/region: local\n    topology.kubernetes.io/zone: zone-a\n---\n",
    );
    let mut pod = |name: &str, ns: &str, app: &str, ip: Ipv4Addr| {
        let netns = netns_of(name);
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
             labels:\n    app: {app}\n  annotations:\n    nodeway.io/netns: {netns}\n\
             spec:\n  nodeName: node-a\n  containers:\n    - name: main\n      image: bench\n\
             status:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n    - ip: {ip}\n---\n"
        );
    };
    pod(CLIENT, "shop", "client", CLIENT_IP);
    pod(BYSTANDER, "plain", "bystander", BYSTANDER_IP);
    pod("server-a", "backend", "server", SERVER_A);
    pod("server-b", "backend", "server", SERVER_B);
    pod("server-dead", "backend", "server", SERVER_DEAD);
    // (name, VIP, ports as (name, port, target port), endpoints)
    type ServiceSpec<'a> = (&'a str, Ipv4Addr, &'a [(&'a str, u16, u16)], &'a [Ipv4Addr]);
    let services: [ServiceSpec; 3] = [
        (
            "web",
            WEB_VIP,
            &[("web", 80, HTTP_PORT), ("tcp-echo", ECHO_PORT, ECHO_PORT)],
            &[SERVER_A],
        ),
        (
            "clean",
            CLEAN_VIP,
            &[("web", 80, HTTP_PORT)],
            &[SERVER_A, SERVER_B],
        ),
        (
            "faulty",
            FAULTY_VIP,
            &[("web", 80, FAULTY_PORT)],
            &[SERVER_A, SERVER_B, SERVER_DEAD],
        ),
    ];
    for (name, vip, ports, endpoints) in services {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: backend\n\
             spec:\n  clusterIP: {vip}\n  ports:\n"
        );
        for (pname, port, target) in ports {
            let _ = write!(
                y,
                "    - name: {pname}\n      port: {port}\n      targetPort: {target}\n"
            );
        }
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: {name}-1\n  namespace: backend\n  labels:\n    \
             kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n"
        );
        for (pname, _, target) in ports {
            let _ = write!(
                y,
                "  - name: {pname}\n    port: {target}\n    protocol: TCP\n"
            );
        }
        y.push_str("endpoints:\n");
        for ip in endpoints {
            let pod = match *ip {
                SERVER_A => "server-a",
                SERVER_B => "server-b",
                _ => "server-dead",
            };
            let _ = write!(
                y,
                "  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n    nodeName: node-a\n    \
                 zone: zone-a\n    targetRef: {{kind: Pod, namespace: backend, name: {pod}}}\n"
            );
        }
        y.push_str("---\n");
    }
    if resilience {
        for name in ["clean", "faulty"] {
            let host = format!("{name}.backend.svc.cluster.local");
            let _ = write!(
                y,
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  \
                 name: {name}\n  namespace: backend\nspec:\n  host: {host}\n  trafficPolicy:\n    \
                 loadBalancer:\n      simple: LEAST_REQUEST\n    connectionPool:\n      tcp:\n        \
                 maxConnections: 1024\n        connectTimeout: 1s\n      http:\n        \
                 http1MaxPendingRequests: 1024\n        http2MaxRequests: 1024\n    \
                 outlierDetection:\n      consecutive5xxErrors: 5\n      interval: 1s\n      \
                 baseEjectionTime: 30s\n      maxEjectionPercent: 50\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  \
                 name: {name}\n  namespace: backend\nspec:\n  hosts: [\"{host}\"]\n  http:\n    \
                 - route:\n        - destination:\n            host: {host}\n      \
                 timeout: 5s\n      retries:\n        attempts: 2\n        perTryTimeout: 2s\n        \
                 retryOn: 5xx,connect-failure,reset\n---\n"
            );
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark's objects are valid Nodeway config, with and without
    /// the resilience policies, and the policies really land.
    #[test]
    fn nodeway_config_loads() {
        let opts = nodeway::config::LoadOptions {
            node_name: Some("node-a".into()),
            ..Default::default()
        };
        for resilience in [false, true] {
            let yaml = nodeway_config(|pod| format!("/run/netns/x-{pod}"), resilience);
            let loaded = nodeway::config::load_str("bench.yaml", &yaml, &opts)
                .unwrap_or_else(|e| panic!("resilience {resilience}: {e:#?}"));
            assert!(
                loaded.warnings.is_empty(),
                "resilience {resilience}: {:#?}",
                loaded.warnings
            );
            let dr = yaml.matches("kind: DestinationRule").count();
            let vs = yaml.matches("kind: VirtualService").count();
            assert_eq!((dr, vs), if resilience { (2, 2) } else { (0, 0) });
        }
    }

    /// HAProxy accepts its configuration (`haproxy -c`), both variants.
    #[test]
    fn haproxy_config_checks() {
        let dir =
            std::env::temp_dir().join(format!("nodeway-bench-haproxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for resilience in [false, true] {
            let path = dir.join(format!("haproxy-{resilience}.cfg"));
            std::fs::write(&path, haproxy_config(resilience)).unwrap();
            let out = Command::new("haproxy")
                .arg("-c")
                .arg("-f")
                .arg(&path)
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run haproxy (install it: cargo xtask setup): {e}")
                });
            assert!(
                out.status.success(),
                "resilience {resilience}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
