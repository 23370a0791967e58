//! `ebpf-demo --nodeway PATH --mock-upstream PATH --pod-client PATH [--once]`:
//! what `cargo xtask demo` runs (as root). On the one-node topology of
//! [`nodeway_tests::ebpf_mesh`] (client pod `sleep` on node-a/zone-a, backends
//! `mock-server-a`/`-b` in zone-a and `mock-server-c` in zone-b, which
//! answers every request with 503 at first), Nodeway runs with
//! `--redirect ebpf`; the demo drives traffic through it and checks, from the
//! access log, `/metrics` and the admin API, that
//!
//! 1. redirect: the enrolled client pod's plain `http://10.96.0.10/` request
//!    went through Nodeway, the not-enrolled bystander's went direct;
//! 2. retries: requests that hit the faulty backend were retried elsewhere;
//! 3. timeout: the route timeout (0.5 s) cut `/delay/2000` short with `504 UT`;
//! 4. ejection: outlier detection ejected the faulty backend (which is then
//!    restarted healthy and comes back after its ejection time);
//! 5. locality failover: the client's traffic stays in its zone while zone-a
//!    is healthy, and goes to zone-b once zone-a's backends are stopped;
//! 6. upgrade: Nodeway v1 → v2 (a second process takes over, then v1 gets
//!    SIGTERM) under ~550 req/s of HTTP/1.1, HTTP/2, gRPC and
//!    connection-per-request traffic and 20 TCP streams from the client pod
//!    (`mixed-load`): no request fails, none bypasses the proxies (every one
//!    is in v1's or v2's access log), no TCP stream breaks.
//!
//! Prints a summary; exits 1 if a check failed. Without `--once` it then
//! keeps the mesh up (at most 10 minutes) until Enter or Ctrl-C and prints
//! commands to look at it. Everything is torn down on exit, also on Ctrl-C
//! or SIGTERM.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, Write as _};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nodeway_tests::access_log::{Entry, field};
use nodeway_tests::ebpf_mesh::{
    BACKENDS, BYSTANDER, CLIENT, CLUSTER, ECHO_VIP, Mesh, MeshOptions, SERVICE_FQDN, VIP,
    mixed_load_args,
};
use nodeway_tests::topology::{require_root, wait_for_stdout_line};
use serde_json::Value;

const USAGE: &str = "usage: ebpf-demo --nodeway PATH --mock-upstream PATH --pod-client PATH \
                     --mixed-load PATH [--once]";

/// How long the mesh stays up for a look after the summary (without `--once`).
const KEEP_UP: Duration = Duration::from_secs(600);
/// Requests per traffic phase.
const N: usize = 30;
/// The faulty backend (index into [`BACKENDS`]): zone-b.
const FAULTY: usize = 2;
/// Its ejection time: short, so that it is back for the failover part.
const BASE_EJECTION_SECS: u64 = 5;
/// Ejection time in the failover part (Istio's default).
const FAILOVER_EJECTION_SECS: u64 = 30;
const CONSECUTIVE_5XX: u64 = 3;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

type Result<T = ()> = std::result::Result<T, String>;

struct Args {
    nodeway: PathBuf,
    mock_upstream: PathBuf,
    pod_client: PathBuf,
    mixed_load: PathBuf,
    once: bool,
}

fn parse_args() -> Result<Args> {
    let mut nodeway = None;
    let mut mock_upstream = None;
    let mut pod_client = None;
    let mut mixed_load = None;
    let mut once = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().map(PathBuf::from).ok_or(USAGE.to_owned());
        match flag.as_str() {
            "--nodeway" => nodeway = Some(value()?),
            "--mock-upstream" => mock_upstream = Some(value()?),
            "--pod-client" => pod_client = Some(value()?),
            "--mixed-load" => mixed_load = Some(value()?),
            "--once" => once = true,
            _ => return Err(USAGE.to_owned()),
        }
    }
    match (nodeway, mock_upstream, pod_client, mixed_load) {
        (Some(nodeway), Some(mock_upstream), Some(pod_client), Some(mixed_load)) => Ok(Args {
            nodeway,
            mock_upstream,
            pod_client,
            mixed_load,
            once,
        }),
        _ => Err(USAGE.to_owned()),
    }
}

/// The DestinationRule's traffic policy in each part of the demo.
#[derive(Clone, Copy, PartialEq)]
enum Policy {
    /// Round robin, no outlier detection (so no locality either).
    Plain,
    /// Outlier detection, locality off, short ejection time (the ejected
    /// backend is needed again for the failover part).
    Ejection,
    /// Outlier detection with locality load balancing (Istio's default when
    /// outlier detection is set).
    Locality,
}

/// The mesh's VirtualService (route timeout, retries) and DestinationRule.
fn istio_yaml(policy: Policy) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: mock-server\n  \
         namespace: shop\nspec:\n  hosts:\n    - {SERVICE_FQDN}\n  http:\n    - name: default\n      \
         route:\n        - destination:\n            host: {SERVICE_FQDN}\n      timeout: 500ms\n      \
         retries:\n        attempts: 3\n        retryOn: 5xx,reset,connect-failure\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: mock-server\n  \
         namespace: shop\nspec:\n  host: {SERVICE_FQDN}\n  trafficPolicy:\n    loadBalancer:\n      \
         simple: ROUND_ROBIN\n"
    );
    if policy != Policy::Plain {
        let (locality, base) = match policy {
            Policy::Locality => (true, FAILOVER_EJECTION_SECS),
            _ => (false, BASE_EJECTION_SECS),
        };
        let _ = write!(
            y,
            "      localityLbSetting:\n        enabled: {locality}\n    outlierDetection:\n      \
             consecutive5xxErrors: {CONSECUTIVE_5XX}\n      interval: 1s\n      \
             baseEjectionTime: {base}s\n      maxEjectionPercent: 100\n"
        );
    }
    y.push_str("---\n");
    y
}

fn options(policy: Policy) -> MeshOptions {
    let mut fail_rates = [0.0; 3];
    fail_rates[FAULTY] = 1.0;
    MeshOptions {
        extra_yaml: istio_yaml(policy),
        fail_rates,
        echo_service: true,
        ..MeshOptions::default()
    }
}

/// One request's outcome as `pod-client` saw it.
#[derive(Debug)]
struct Reply {
    status: u64,
    served_by: String,
    elapsed_ms: u64,
    raw: Value,
}

/// One line of the summary.
struct Check {
    name: &'static str,
    ok: bool,
    text: String,
}

struct Demo {
    mesh: Mesh,
    nodeway: PathBuf,
    mock_upstream: PathBuf,
    pod_client: PathBuf,
    mixed_load: PathBuf,
}

fn interrupted() -> Result {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".to_owned())
    } else {
        Ok(())
    }
}

fn pod_name(host: &str) -> &'static str {
    BACKENDS
        .iter()
        .find(|(_, ip, _, _)| host == format!("{ip}:8080"))
        .map_or("?", |b| b.0)
}

fn zone_of(pod: &str) -> &'static str {
    BACKENDS.iter().find(|b| b.0 == pod).map_or("?", |b| b.3)
}

fn attempts(e: &Entry) -> u64 {
    e.get("upstream_request_attempt_count")
        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        .unwrap_or(0)
}

fn code(e: &Entry) -> u64 {
    e.get("response_code")
        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        .unwrap_or(0)
}

fn is_outbound(e: &Entry) -> bool {
    field(e, "upstream_cluster") == Some(CLUSTER)
}

fn counts<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for n in names {
        *m.entry(n).or_default() += 1;
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sum of the samples of metric `name` (exact sample name) for the client
/// workload and the service's cluster.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels.contains(&format!("cluster_name=\"{CLUSTER}\""))
                && labels.contains(&format!("source_workload=\"{CLIENT}\"")))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum::<f64>() as u64
}

impl Demo {
    fn get(&self, pod: &str, path: &str) -> Result<Reply> {
        interrupted()?;
        let url = format!("http://{VIP}{path}");
        let raw = self.mesh.pod_client(
            &self.pod_client,
            pod,
            &["http", &url, "--timeout-secs", "10"],
        );
        let status = raw["status"].as_u64().unwrap_or(0);
        Ok(Reply {
            status,
            served_by: raw["headers"]["x-served-by"]
                .as_str()
                .unwrap_or("-")
                .to_owned(),
            elapsed_ms: raw["elapsed_ms"].as_u64().unwrap_or(0),
            raw,
        })
    }

    /// Number of access-log lines so far.
    fn mark(&self) -> usize {
        self.mesh.log.lines().len()
    }

    /// The client's outbound lines after `mark`, waiting (5 s at most) until
    /// there are `n`.
    fn outbound_since(&self, mark: usize, n: usize) -> Vec<Entry> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<Entry> = self
                .mesh
                .log
                .lines()
                .into_iter()
                .skip(mark)
                .filter(is_outbound)
                .collect();
            if lines.len() >= n || Instant::now() >= deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `n` requests for `path` from the client pod.
    fn burst(&self, n: usize, path: &str) -> Result<Vec<Reply>> {
        (0..n).map(|_| self.get(CLIENT, path)).collect()
    }

    /// The client's endpoints of the service (admin `/endpoints`), per
    /// backend pod: ejected by outlier detection?
    fn ejected(&self) -> BTreeMap<&'static str, bool> {
        let path = format!("/endpoints?format=json&source={CLIENT}");
        let rows = self.mesh.admin_json(&path).unwrap_or(Value::Null);
        rows.as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["cluster"] == CLUSTER && r["source_workload"] == CLIENT)
            .filter_map(|r| {
                let pod = pod_name(r["endpoint"].as_str()?);
                (pod != "?").then(|| (pod, r["outlier_check"] == "FAILED"))
            })
            .collect()
    }

    /// Stops the processes of pod `name` (its mock-upstream).
    fn stop_pod(&self, name: &str) -> Result {
        let procs = self.mesh.topo.pod(name).cgroup.join("cgroup.procs");
        let pids = || -> Vec<String> {
            std::fs::read_to_string(&procs)
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        for signal in ["-TERM", "-KILL"] {
            let now = pids();
            if now.is_empty() {
                return Ok(());
            }
            let _ = Command::new("kill").arg(signal).args(&now).status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while !pids().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if pids().is_empty() {
            Ok(())
        } else {
            Err(format!("cannot stop the processes of pod {name}"))
        }
    }

    /// Replaces backend `i`'s mock-upstream by one with `fail_rate`.
    fn restart_backend(&self, i: usize, fail_rate: f64) -> Result {
        let (name, ip, _, _) = BACKENDS[i];
        self.stop_pod(name)?;
        let listen = format!("{ip}:8080");
        let echo = format!("{ip}:{}", ECHO_VIP.port());
        let rate = fail_rate.to_string();
        let mut child = self.mesh.topo.spawn(
            name,
            &self.mock_upstream,
            &[
                "--listen",
                &listen,
                "--name",
                name,
                "--fail-rate",
                &rate,
                "--echo",
                &echo,
            ],
        );
        wait_for_stdout_line(&mut child, "listening", Duration::from_secs(10));
        Ok(())
    }

    // ---------------------------------------------------------------- phases

    fn redirect(&self) -> Result<Check> {
        let mark = self.mark();
        let reply = self.get(CLIENT, "/status/200")?;
        let out = self.outbound_since(mark, 1);
        let line = out.first();
        let mut problems = Vec::new();
        if reply.status != 200 {
            problems.push(format!("client got {}", reply.raw));
        }
        match line {
            None => problems.push("no outbound access-log line for the client".into()),
            Some(l) => {
                if field(l, "source_workload") != Some(CLIENT) {
                    problems.push(format!("source_workload {:?}", field(l, "source_workload")));
                }
                if field(l, "downstream_local_address") != Some(&VIP.to_string()) {
                    problems.push(format!(
                        "original destination {:?}",
                        field(l, "downstream_local_address")
                    ));
                }
                if pod_name(field(l, "upstream_host").unwrap_or("")) == "?" {
                    problems.push(format!("upstream_host {:?}", field(l, "upstream_host")));
                }
            }
        }
        // The bystander (namespace `plain`, not enrolled): the node's DNAT
        // picks the backends in turn, so three requests meet the faulty one
        // once, and nobody retries it.
        let mark = self.mark();
        let replies = (0..3)
            .map(|_| self.get(BYSTANDER, "/status/200"))
            .collect::<Result<Vec<_>>>()?;
        std::thread::sleep(Duration::from_millis(300));
        let bystander_out = self.outbound_since(mark, 0).len();
        if bystander_out != 0 {
            problems.push(format!(
                "{bystander_out} outbound line(s) for the bystander"
            ));
        }
        if replies.iter().any(|r| r.served_by == "-") {
            problems.push("a bystander request got no answer from a backend".into());
        }
        let failed: Vec<&Reply> = replies.iter().filter(|r| r.status != 200).collect();
        let text = match line {
            Some(l) if problems.is_empty() => format!(
                "sleep → http://{}/ went through Nodeway (original destination {VIP}, \
                 {CLUSTER} → {}); the bystander (not enrolled) went direct: no Nodeway line{}",
                VIP.ip(),
                pod_name(field(l, "upstream_host").unwrap_or("")),
                match failed.first() {
                    None => String::new(),
                    Some(f) => format!(
                        ", {} of 3 got {}'s {} (nobody retries outside the mesh)",
                        failed.len(),
                        f.served_by,
                        f.status
                    ),
                }
            ),
            _ => problems.join("; "),
        };
        Ok(Check {
            name: "redirect",
            ok: problems.is_empty(),
            text,
        })
    }

    fn retries(&self) -> Result<Check> {
        let before = metric(
            &self.mesh.metrics_text(),
            "envoy_cluster_upstream_rq_retry_total",
        );
        let mark = self.mark();
        let replies = self.burst(N, "/status/200")?;
        let lines = self.outbound_since(mark, N);
        let ok_replies = replies.iter().filter(|r| r.status == 200).count();
        let retried = lines.iter().filter(|l| attempts(l) > 1).count();
        let urx = lines
            .iter()
            .filter(|l| field(l, "response_flags").is_some_and(|f| f.contains("URX")))
            .count();
        let retry_metric = metric(
            &self.mesh.metrics_text(),
            "envoy_cluster_upstream_rq_retry_total",
        )
        .saturating_sub(before);
        let faulty = BACKENDS[FAULTY].0;
        let served_by_faulty = replies.iter().filter(|r| r.served_by == faulty).count();
        let ok = ok_replies == N
            && lines.len() == N
            && retried > 0
            && urx == 0
            && served_by_faulty == 0
            && retry_metric >= retried as u64;
        Ok(Check {
            name: "retries",
            ok,
            text: format!(
                "{ok_replies}/{N} succeeded although {faulty} answers 503: {retried} were retried \
                 (upstream_request_attempt_count > 1; envoy_cluster_upstream_rq_retry_total +{retry_metric}), \
                 {} ran out of attempts (URX)",
                if urx == 0 {
                    "none".to_owned()
                } else {
                    urx.to_string()
                }
            ),
        })
    }

    fn timeout(&self) -> Result<Check> {
        let mark = self.mark();
        let reply = self.get(CLIENT, "/delay/2000")?;
        let lines = self.outbound_since(mark, 1);
        let flags = lines
            .first()
            .and_then(|l| field(l, "response_flags"))
            .unwrap_or("?")
            .to_owned();
        let logged = lines.first().map_or(0, code);
        let ok = reply.status == 504
            && logged == 504
            && flags.split(',').any(|f| f == "UT")
            && (400..1500).contains(&reply.elapsed_ms);
        Ok(Check {
            name: "timeout",
            ok,
            text: format!(
                "/delay/2000 → {} {flags} after {:.2} s (route timeout 500ms)",
                reply.status,
                reply.elapsed_ms as f64 / 1000.0
            ),
        })
    }

    fn ejection(&mut self) -> Result<Check> {
        self.mesh.reconfigure(options(Policy::Ejection));
        let mark = self.mark();
        let replies = self.burst(N, "/status/200")?;
        let lines = self.outbound_since(mark, N);
        let metrics = self.mesh.metrics_text();
        let enforced = metric(
            &metrics,
            "envoy_cluster_outlier_detection_ejections_enforced_total",
        );
        let ejected = self.ejected();
        let faulty = BACKENDS[FAULTY].0;
        let ok_replies = replies.iter().filter(|r| r.status == 200).count();
        let retried = lines.iter().filter(|l| attempts(l) > 1).count();
        // After the last retry, nobody tried the faulty backend again.
        let last_retry = lines.iter().rposition(|l| attempts(l) > 1);
        let clean_after = last_retry.map_or(lines.len(), |i| lines.len() - i - 1);
        let mut ok = ok_replies == N
            && lines.len() == N
            && enforced >= 1
            && ejected.get(faulty) == Some(&true)
            && retried as u64 >= CONSECUTIVE_5XX
            && clean_after >= N / 2;
        let mut text = format!(
            "{faulty} ejected after {CONSECUTIVE_5XX} consecutive 503s ({retried} requests met it, \
             each retried elsewhere; envoy_cluster_outlier_detection_ejections_enforced_total={enforced}, \
             /endpoints: {}); {ok_replies}/{N} succeeded, the last {clean_after} at the first attempt",
            if ejected.get(faulty) == Some(&true) {
                "FAILED"
            } else {
                "not ejected"
            }
        );
        // Fix the backend: it comes back after its ejection time.
        self.restart_backend(FAULTY, 0.0)?;
        let start = Instant::now();
        let deadline = start + Duration::from_secs(BASE_EJECTION_SECS * 3 + 5);
        while self.ejected().get(faulty) != Some(&false) {
            interrupted()?;
            if Instant::now() >= deadline {
                ok = false;
                text.push_str("; restarted healthy, but still ejected");
                return Ok(Check {
                    name: "ejection",
                    ok,
                    text,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = write!(
            text,
            "; restarted healthy, back in {:.1} s (baseEjectionTime {BASE_EJECTION_SECS}s)",
            start.elapsed().as_secs_f64()
        );
        Ok(Check {
            name: "ejection",
            ok,
            text,
        })
    }

    fn failover(&mut self) -> Result<Vec<Check>> {
        self.mesh.reconfigure(options(Policy::Locality));
        // All healthy: the client (zone-a) stays in zone-a.
        let replies = self.burst(N, "/status/200")?;
        let zone_a = replies
            .iter()
            .filter(|r| r.status == 200 && zone_of(&r.served_by) == "zone-a")
            .count();
        let locality = Check {
            name: "locality",
            ok: zone_a == N,
            text: format!(
                "client in zone-a: {zone_a}/{N} served in zone-a ({}) while {} in zone-b is healthy too",
                counts(replies.iter().map(|r| r.served_by.as_str())),
                BACKENDS[FAULTY].0
            ),
        };
        // Zone-a goes down.
        self.stop_pod(BACKENDS[0].0)?;
        self.stop_pod(BACKENDS[1].0)?;
        let (a, b) = (BACKENDS[0].0, BACKENDS[1].0);
        let mut during = Vec::new();
        let mut detected = false;
        while during.len() < 3 * N {
            during.push(self.get(CLIENT, "/status/200")?);
            let ej = self.ejected();
            if ej.get(a) == Some(&true) && ej.get(b) == Some(&true) {
                detected = true;
                break;
            }
        }
        let lost = during.iter().filter(|r| r.status != 200).count();
        let mark = self.mark();
        let replies = self.burst(N, "/status/200")?;
        let lines = self.outbound_since(mark, N);
        let c = BACKENDS[2].0;
        let by_c = replies
            .iter()
            .filter(|r| r.status == 200 && r.served_by == c)
            .count();
        let direct = lines
            .iter()
            .filter(|l| attempts(l) == 1 && pod_name(field(l, "upstream_host").unwrap_or("")) == c)
            .count();
        let failover = Check {
            name: "failover",
            ok: detected && by_c == N && direct == N,
            text: format!(
                "zone-a down ({a}, {b} stopped) → both ejected within {} requests \
                 ({lost} failed while they were being detected); \
                 then {by_c}/{N} served by {c} in zone-b, {direct} at the first attempt",
                during.len()
            ),
        };
        Ok(vec![locality, failover])
    }

    /// v1 → v2 under load: `mixed-load` in the client pod, v2 started next to
    /// v1 and ready, then SIGTERM to v1.
    fn upgrade(&mut self) -> Result<Check> {
        self.restart_backend(0, 0.0)?;
        self.restart_backend(1, 0.0)?;
        let streams: u64 = 20;
        let ids = self.mesh.dir.join("ids-upgrade");
        let args = mixed_load_args("demo", 12, &ids, &[("--tcp-streams", streams.to_string())]);
        let mut load = self.mesh.topo.spawn(CLIENT, &self.mixed_load, &args);
        std::thread::sleep(Duration::from_secs(3));
        let mut start_v2 = || -> Result<_> {
            interrupted()?;
            let mut next = self.mesh.spawn_generation(&self.nodeway, "v2", &[]);
            next.wait_ready(Duration::from_secs(30))?;
            Ok(next)
        };
        let next = match start_v2() {
            Ok(next) => next,
            Err(e) => {
                let _ = load.kill();
                let _ = load.wait();
                return Err(e);
            }
        };
        let v1_log = self.mesh.log.clone();
        self.mesh.stop_proxy();
        let out = load
            .wait_with_output()
            .map_err(|e| format!("mixed-load: {e}"))?;
        let report: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "mixed-load output: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let kinds = ["h1", "h2", "grpc", "conn"];
        let sent: u64 = kinds
            .iter()
            .map(|k| report[k]["sent"].as_u64().unwrap_or(0))
            .sum();
        let failed: u64 = kinds
            .iter()
            .map(|k| report[k]["failed"].as_u64().unwrap_or(0))
            .sum();
        let tcp_failed = report["tcp"]["failed"].as_u64().unwrap_or(u64::MAX);
        // Every answered request must be in v1's or v2's access log.
        let answered: Vec<String> = std::fs::read_to_string(&ids)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        let bypassed = loop {
            let logged: std::collections::HashSet<String> = v1_log
                .lines()
                .into_iter()
                .chain(next.log.lines())
                .filter_map(|e| field(&e, "request_id").map(str::to_owned))
                .collect();
            let missing = answered.iter().filter(|id| !logged.contains(*id)).count();
            if missing == 0 || Instant::now() > deadline {
                break missing;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let kept = streams.saturating_sub(tcp_failed);
        self.mesh.adopt(next);
        Ok(Check {
            name: "upgrade",
            ok: failed == 0 && bypassed == 0 && tcp_failed == 0 && !answered.is_empty(),
            text: format!(
                "v1 → v2 under {} req/s: {failed} failed, {bypassed} bypassed of {sent}, \
                 {kept}/{streams} TCP streams kept (to v1's drain deadline, then FIN)",
                sent / 12
            ),
        })
    }
}

/// Ctrl-C and SIGTERM set [`INTERRUPTED`] and send on `tx` (the demo then
/// stops at its next step and tears the mesh down).
fn catch_signals(tx: mpsc::Sender<&'static str>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        INTERRUPTED.store(true, Ordering::SeqCst);
        let _ = tx.send("signal");
    });
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let euid = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned));
    if euid.as_deref() != Some("0") {
        eprintln!(
            "ebpf-demo needs root (network namespaces, cgroups, eBPF); \
             `cargo xtask demo --loopback` needs none"
        );
        return ExitCode::FAILURE;
    }
    require_root();
    // After Ctrl-C the pods' processes are gone and a step may panic: say
    // so briefly (the mesh is torn down while the panic unwinds).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("ebpf-demo: interrupted");
        } else {
            default_hook(info);
        }
    }));
    let (tx, rx) = mpsc::channel();
    catch_signals(tx.clone());
    match run(&args, &rx, tx) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ebpf-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn flush() {
    let _ = std::io::stdout().flush();
}

fn run(
    args: &Args,
    rx: &mpsc::Receiver<&'static str>,
    tx: mpsc::Sender<&'static str>,
) -> Result<bool> {
    let started = Instant::now();
    println!(
        "Starting the mesh: pods sleep (client, node-a/zone-a), bystander (not enrolled), \
         mock-server-a/-b (zone-a), mock-server-c (zone-b, answers 503); Nodeway --redirect ebpf"
    );
    flush();
    let mesh = Mesh::start(&args.nodeway, &args.mock_upstream, options(Policy::Plain));
    let mut demo = Demo {
        mesh,
        nodeway: args.nodeway.clone(),
        mock_upstream: args.mock_upstream.clone(),
        pod_client: args.pod_client.clone(),
        mixed_load: args.mixed_load.clone(),
    };
    let mut checks = Vec::new();
    for (phase, what) in [
        (
            "redirect",
            "plain HTTP to the Service VIP from the client pod and the bystander",
        ),
        ("retries", "VirtualService retries: attempts 3, retryOn 5xx"),
        ("timeout", "VirtualService timeout: 500ms"),
        (
            "ejection",
            "DestinationRule outlierDetection: consecutive5xxErrors 3, baseEjectionTime 5s, maxEjectionPercent 100",
        ),
        (
            "failover",
            "DestinationRule localityLbSetting enabled (baseEjectionTime 30s), then zone-a down",
        ),
        (
            "upgrade",
            "zone-a back; Nodeway v2 starts next to v1, takes over, v1 gets SIGTERM, under load",
        ),
    ] {
        println!("  {phase}: {what} …");
        flush();
        match phase {
            "redirect" => checks.push(demo.redirect()?),
            "retries" => checks.push(demo.retries()?),
            "timeout" => checks.push(demo.timeout()?),
            "ejection" => checks.push(demo.ejection()?),
            "failover" => checks.extend(demo.failover()?),
            _ => checks.push(demo.upgrade()?),
        }
    }
    let all_ok = checks.iter().all(|c| c.ok);
    println!(
        "\nNodeway eBPF demo — one node, pods in network namespaces, no sidecars ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    for c in &checks {
        println!(
            "  {} {:<9} {}",
            if c.ok { "✔" } else { "✘" },
            c.name,
            c.text
        );
    }
    let m = &demo.mesh;
    let gone = if args.once { " (removed on exit)" } else { "" };
    println!("  access log: {}{gone}", m.log.path().display());
    println!("  metrics:    curl -s http://{}/metrics", m.metrics);
    println!(
        "  admin:      {} endpoints --admin-addr {}",
        args.nodeway.display(),
        m.admin
    );
    println!("  config:     {}{gone}", m.config.display());
    if !all_ok {
        let keep = std::env::temp_dir().join(format!("nodeway-demo-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(m.log.path(), keep.join("access.log"));
        let _ = std::fs::copy(&m.config, keep.join("mesh.yaml"));
        let _ = std::fs::write(keep.join("nodeway.stderr"), m.proxy_stderr());
        println!(
            "\nSome checks failed (✘); access log, config and Nodeway's log kept in {}",
            keep.display()
        );
    }
    flush();
    if !args.once && !INTERRUPTED.load(Ordering::SeqCst) {
        keep_up(&demo, rx, tx);
    }
    println!("Tearing the mesh down …");
    flush();
    drop(demo);
    Ok(all_ok)
}

/// Keeps the mesh up until Enter, Ctrl-C or [`KEEP_UP`].
fn keep_up(demo: &Demo, rx: &mpsc::Receiver<&'static str>, tx: mpsc::Sender<&'static str>) {
    let m = &demo.mesh;
    let client = m.topo.pod(CLIENT);
    let nodeway = demo.nodeway.display();
    println!(
        "\nThe mesh stays up (zone-a still down) for at most {} minutes: press Enter or Ctrl-C to \
         tear it down. Meanwhile, as root:",
        KEEP_UP.as_secs() / 60
    );
    println!(
        "  curl -s http://{}/metrics | grep -E '^(envoy_cluster_outlier_detection_ejections|envoy_cluster_upstream_rq_retry|istio_requests_total)'",
        m.metrics
    );
    println!("  {nodeway} endpoints --admin-addr {}", m.admin);
    println!(
        "  {nodeway} stats --admin-addr {} --source {CLIENT}",
        m.admin
    );
    println!("  tail -n 3 {}", m.log.path().display());
    println!(
        "  # a request from the client pod (its cgroup and network namespace), redirected by eBPF:"
    );
    println!(
        "  sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net={} curl -si http://{}/status/200'",
        client.cgroup.display(),
        client.netns_path.display(),
        VIP.ip()
    );
    flush();
    std::thread::spawn(move || {
        let mut line = String::new();
        // End of input (no terminal) does not end the wait.
        if std::io::stdin()
            .lock()
            .read_line(&mut line)
            .is_ok_and(|n| n > 0)
        {
            let _ = tx.send("enter");
        }
    });
    let _ = rx.recv_timeout(KEEP_UP);
}
