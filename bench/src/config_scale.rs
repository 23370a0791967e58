//! Scenario 10, config scale: how Nodeway's memory, start-up time and reload
//! time grow with the size of its configuration, and what one endpoint pick
//! costs over large clusters.
//!
//! The proxy runs in file mode (`nodeway run --config FILE`, no eBPF, every
//! listener on a free `127.0.0.1` port) on generated configurations (see
//! [`config_yaml`]): a base of one service with one endpoint, then N services
//! with one endpoint each and one service with N endpoints. For each it
//! records the time to ready, RSS/PSS, and the time until a rewritten file is
//! applied; the largest N-services config is run again with one malloc arena
//! to tell memory the allocator keeps from memory the proxy holds. Endpoint
//! picks are timed in process with [`nodeway::lb`].
//!
//! Needs no root: nothing here leaves the loopback interface.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nodeway::lb::{Balancer, BalancerConfig, Host, PickContext};
use nodeway::state::{Labels, LbPolicy, Locality, SimpleLb};

use crate::model::{Mode, Scenario, Table};

/// How often the proxy checks its config file: `RunOptions::new`'s default,
/// which `nodeway run` has no flag to change.
const CONFIG_POLL: Duration = Duration::from_secs(1);
/// How often the admin API is asked whether a new configuration is in force
/// (or whether the proxy is ready) at first; see [`poll_interval`].
const ADMIN_POLL: Duration = Duration::from_millis(1);
/// The slowest admin polling gets while a long load goes on.
const ADMIN_POLL_MAX: Duration = Duration::from_millis(20);
/// Pause after ready before reading memory or writing the first update: the
/// file watcher task takes its baseline copy of the file just after the
/// admin API comes up, and an update written before that would go unseen.
const SETTLE: Duration = Duration::from_millis(250);
/// Longest wait for the proxy to answer `/ready`, and for an update to be
/// applied. Generous (a debug build, or a regression that makes loading
/// super-linear, takes minutes on 10 000 services): they only catch a hung
/// proxy.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
const APPLY_TIMEOUT: Duration = Duration::from_secs(600);
/// Per-request timeout on the admin API, except while awaiting a reload.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// An admin request slower than this counts as a stall in the notes.
const STALL: Duration = Duration::from_millis(100);
/// Every `DESTINATION_RULE_EVERY`-th service gets a DestinationRule and a
/// VirtualService, as in a mesh where some services are tuned.
const DESTINATION_RULE_EVERY: usize = 10;
/// Endpoints per EndpointSlice: Kubernetes' default `--max-endpoints-per-slice`.
const SLICE_SIZE: usize = 100;
/// The Node the generated pods run on and the proxy is told it runs on.
const NODE: &str = "node-a";
const NAMESPACE: &str = "bench";

/// A generated configuration: `services` Services with
/// `endpoints_per_service` ready endpoints each (every endpoint backed by a
/// Pod).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub services: usize,
    pub endpoints_per_service: usize,
}

impl Shape {
    /// The counts after `added` updates: each update scales the config up by
    /// one service, or, for one service with many endpoints, by one endpoint
    /// (one more replica), the common changes in a cluster.
    pub fn after_updates(self, added: usize) -> Shape {
        if self.grows_endpoints() {
            Shape {
                endpoints_per_service: self.endpoints_per_service + added,
                ..self
            }
        } else {
            Shape {
                services: self.services + added,
                ..self
            }
        }
    }

    fn grows_endpoints(self) -> bool {
        self.services == 1 && self.endpoints_per_service > 1
    }

    fn endpoints(self) -> usize {
        self.services * self.endpoints_per_service
    }

    /// Row label, e.g. `1 000 services × 1 endpoint`.
    fn label(self) -> String {
        let plural = |n: usize, what: &str| {
            format!("{} {what}{}", thousands(n), if n == 1 { "" } else { "s" })
        };
        format!(
            "{} × {}",
            plural(self.services, "service"),
            plural(self.endpoints_per_service, "endpoint")
        )
    }
}

/// Multi-document YAML for `shape` after `added` updates (see
/// [`Shape::after_updates`]): a Namespace, the Node, a client Pod, and per
/// service a Service, its EndpointSlices (at most [`SLICE_SIZE`] endpoints
/// each) and a Pod per endpoint; every [`DESTINATION_RULE_EVERY`]-th service
/// also has a DestinationRule and a VirtualService.
///
/// Addresses are unique up to 65 535 services and endpoints: Service `i` has
/// clusterIP `10.96.x.y`, endpoint `e` (counted over the whole file) pod IP
/// `10.1.x.y`.
pub fn config_yaml(shape: Shape, added: usize) -> String {
    let shape = shape.after_updates(added);
    let mut out = String::with_capacity(shape.endpoints() * 900 + shape.services * 600);
    // `write!` into a String cannot fail.
    let _ = write!(
        out,
        "# Generated by nodeway-bench (scenario 10, config scale): {}.
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: v1
kind: Node
metadata:
  name: {NODE}
  labels: {{topology.kubernetes.io/region: local, topology.kubernetes.io/zone: zone-a}}
---
apiVersion: v1
kind: Pod
metadata:
  name: client-5d9c7b8f6-abcde
  namespace: {NAMESPACE}
  labels: {{app: client, pod-template-hash: 5d9c7b8f6}}
spec:
  nodeName: {NODE}
  containers: [{{name: client, image: client}}]
status: {{phase: Running, podIP: 127.0.1.5}}
",
        shape.label()
    );
    for service in 0..shape.services {
        let name = format!("svc-{service:05}");
        let _ = write!(
            out,
            "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{app: {name}}}}}
spec:
  selector: {{app: {name}}}
  clusterIP: {cluster_ip}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
",
            cluster_ip = address(96, service)
        );
        let first = service * shape.endpoints_per_service;
        let endpoints: Vec<usize> = (first..first + shape.endpoints_per_service).collect();
        for (slice, chunk) in endpoints.chunks(SLICE_SIZE).enumerate() {
            let _ = write!(
                out,
                "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-s{slice}
  namespace: {NAMESPACE}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
"
            );
            for &endpoint in chunk {
                let _ = write!(
                    out,
                    "  - addresses: [\"{ip}\"]
    conditions: {{ready: true}}
    nodeName: {NODE}
    zone: zone-a
    targetRef: {{kind: Pod, namespace: {NAMESPACE}, name: {name}-{endpoint}}}
",
                    ip = address(1, endpoint)
                );
            }
        }
        for endpoint in endpoints {
            let _ = write!(
                out,
                "---
apiVersion: v1
kind: Pod
metadata:
  name: {name}-{endpoint}
  namespace: {NAMESPACE}
  labels: {{app: {name}, version: v1}}
spec:
  nodeName: {NODE}
  containers: [{{name: app, image: app}}]
status: {{phase: Running, podIP: {ip}}}
",
                ip = address(1, endpoint)
            );
        }
        if service % DESTINATION_RULE_EVERY == 0 {
            let _ = write!(
                out,
                "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  host: {name}
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    connectionPool:
      tcp: {{maxConnections: 100, connectTimeout: 1s}}
      http: {{http1MaxPendingRequests: 100}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  hosts: [{name}]
  http:
    - route: [{{destination: {{host: {name}}}}}]
      timeout: 3s
      retries: {{attempts: 2, perTryTimeout: 1s, retryOn: \"connect-failure,5xx\"}}
"
            );
        }
    }
    out
}

/// `10.<second>.x.y` for index `n` (counted from 1, so never `x.y = 0.0`).
fn address(second: u8, n: usize) -> String {
    let n = n + 1;
    assert!(n < 1 << 16, "address space of the generator exhausted");
    format!("10.{second}.{}.{}", n >> 8, n & 0xff)
}

/// Runs scenario 10 with the proxy binary `nodeway`; see the module docs.
pub fn run(nodeway: &Path, mode: Mode) -> Result<Scenario, String> {
    let sizes: &[usize] = match mode {
        Mode::Smoke => &[100, 1_000],
        // Quick must stay under 3 minutes in all; 10 000 services alone take
        // about a minute with their updates.
        Mode::Quick => &[1_000, 3_000],
        Mode::Full => &[1_000, 10_000],
    };
    let runs = mode.runs();
    let dir = TempDir::new()?;

    let base = Shape {
        services: 1,
        endpoints_per_service: 1,
    };
    let mut shapes = vec![base];
    for &n in sizes {
        shapes.push(Shape {
            services: n,
            endpoints_per_service: 1,
        });
    }
    for &n in sizes {
        shapes.push(Shape {
            services: 1,
            endpoints_per_service: n,
        });
    }

    let mut measured = Vec::new();
    for &shape in &shapes {
        let m = measure_config(nodeway, &dir.0, &[], shape, runs)
            .map_err(|e| format!("config scale, {}: {e}", shape.label()))?;
        measured.push((shape, m));
    }
    let base_rss = measured[0].1.memory.rss_kib;

    let mut memory = Table {
        title: "Memory and update time".into(),
        columns: [
            "config",
            "services",
            "endpoints",
            "ready after (ms)",
            "RSS (MiB)",
            "PSS (MiB)",
            "RSS growth over base (MiB)",
            "update applied after (ms, median)",
            "reload work (ms, median)",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut notes = vec![
        format!(
            "The proxy checks its config file every {} s (`config_poll_interval`; `nodeway run` \
             has no flag for it). Each update was written (temp file + rename) half-way between \
             two checks, timed from the previous reload, so \"update applied after\" includes \
             ≈ {} ms of waiting, the mean for a write at a random moment; \"reload work\" is \
             that time minus the wait: reading, parsing, building and installing the new \
             configuration. Each update adds one service (one endpoint for the 1-service rows).",
            CONFIG_POLL.as_secs(),
            CONFIG_POLL.as_millis() / 2
        ),
        format!(
            "Applied = the `generation` in the admin API's `GET /config_dump` went up (polled \
             on loopback every {} ms, slowing to 0.5% of the wait so far, at most {} ms, \
             during long loads); the run stops on a `last_reload_error`. The service count \
             in the dump was checked after start and after every update. Medians over {runs} \
             update(s) after one unrecorded update.",
            ADMIN_POLL.as_millis(),
            ADMIN_POLL_MAX.as_millis()
        ),
        format!(
            "RSS and PSS from /proc/PID/smaps_rollup {} ms after ready. They include the file's \
             text, which the watcher keeps to compare each poll against. Ready = the admin API \
             answers `GET /ready`, counted from spawning the process.",
            SETTLE.as_millis()
        ),
    ];
    let mut after_updates = Vec::new();
    let mut stalls = Vec::new();
    let mut file_sizes = Vec::new();
    for (shape, m) in &measured {
        memory.rows.push(vec![
            shape.label(),
            thousands(shape.services),
            thousands(shape.endpoints()),
            ms(m.ready),
            mib(m.memory.rss_kib),
            mib(m.memory.pss_kib),
            mib(m.memory.rss_kib.saturating_sub(base_rss)),
            ms(median(&m.applied)),
            ms(median(&m.work)),
        ]);
        after_updates.push(format!(
            "{} {} MiB",
            shape.label(),
            mib(m.rss_after_updates_kib)
        ));
        file_sizes.push(format!("{} {}", shape.label(), size(m.file_bytes)));
        if m.admin_stall > STALL {
            stalls.push(format!("{} {} ms", shape.label(), ms(m.admin_stall)));
        }
    }
    notes.push(format!(
        "RSS after the updates: {}.",
        after_updates.join("; ")
    ));
    notes.extend(arena_note(nodeway, &dir.0, &measured, runs)?);
    notes.push(format!("Config file sizes: {}.", file_sizes.join("; ")));
    notes.extend(superlinear_note(&measured));
    if !stalls.is_empty() {
        notes.push(format!(
            "While a reload ran, the admin API left a request unanswered for up to: {} (the \
             data path shares its runtime; not measured here).",
            stalls.join("; ")
        ));
    }
    if nodeway.components().any(|c| c.as_os_str() == "debug") {
        notes.push(format!(
            "{} looks like a debug build: these numbers do not represent a release build.",
            nodeway.display()
        ));
    }

    let (picks, pick_rows) = pick_table(mode);
    notes.push(format!(
        "Endpoint pick: `Balancer::pick` in process, {} picks per timing, median of {runs}, \
         after a warm-up; no locality tiers, every endpoint healthy, in-flight counts 0..6 \
         (LEAST_REQUEST compares two random endpoints).",
        thousands(picks as usize)
    ));

    Ok(Scenario {
        id: 10,
        title: "Config scale".into(),
        setup: format!(
            "Nodeway in file mode (no eBPF, loopback only) on generated configurations: a base \
             of 1 service with 1 endpoint, N services with 1 endpoint each and 1 service with N \
             endpoints, N ∈ {{{}}}; every endpoint has its Pod, every {DESTINATION_RULE_EVERY}th \
             service a DestinationRule and a VirtualService. Endpoint picks timed in process \
             over 1 000 and 10 000 endpoints.",
            sizes
                .iter()
                .map(|&n| thousands(n))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        tables: vec![
            memory,
            Table {
                title: "Endpoint pick".into(),
                columns: ["policy", "endpoints", "ns per pick"]
                    .map(String::from)
                    .to_vec(),
                rows: pick_rows,
            },
        ],
        notes,
    })
}

// ---------------------------------------------------------------------------
// The proxy process
// ---------------------------------------------------------------------------

/// What one configuration measured.
pub(crate) struct Measured {
    /// From spawn to the first answer of `/ready`.
    ready: Duration,
    pub(crate) memory: Memory,
    /// Per recorded update: from the rename to the new generation seen.
    applied: Vec<Duration>,
    /// Per recorded update: `applied` minus the wait for the poll.
    pub(crate) work: Vec<Duration>,
    pub(crate) rss_after_updates_kib: u64,
    file_bytes: usize,
    /// The slowest admin answer while updates were awaited.
    admin_stall: Duration,
}

/// Environment for a control run with one glibc malloc arena.
const ONE_ARENA: &[(&str, &str)] = &[("MALLOC_ARENA_MAX", "1")];

/// Starts the proxy on `shape` with `env` added to its environment,
/// measures, applies `runs` recorded updates (after one unrecorded one that
/// finds the poll phase), stops it.
pub(crate) fn measure_config(
    nodeway: &Path,
    dir: &Path,
    env: &[(&str, &str)],
    shape: Shape,
    runs: usize,
) -> Result<Measured, String> {
    let config = dir.join("config.yaml");
    let yaml = config_yaml(shape, 0);
    let file_bytes = yaml.len();
    write_atomically(&config, &yaml)?;
    let (mut proxy, ready) = Proxy::launch(nodeway, &config, dir, env)?;

    let dump = proxy.config_dump(HTTP_TIMEOUT)?;
    check_dump(&dump, 1, shape.services)?;
    std::thread::sleep(SETTLE);
    let memory = proxy.memory()?;

    let mut applied = Vec::new();
    let mut work = Vec::new();
    let mut generation = 1;
    let mut added = 0;
    // The previous update's arrival: the next poll starts one period later.
    let mut previous: Option<Instant> = None;
    let mut attempts = 0;
    let mut admin_stall = Duration::ZERO;
    while applied.len() < runs {
        attempts += 1;
        if attempts > 3 * (runs + 1) {
            return Err(format!(
                "could not place {runs} update(s) between two polls in {attempts} attempts \
                 (is the machine overloaded?)"
            ));
        }
        let next_poll = previous.map(|p| p + CONFIG_POLL);
        if let Some(poll) = next_poll {
            sleep_until(poll - CONFIG_POLL / 2);
        }
        added += 1;
        write_atomically(&config, &config_yaml(shape, added))?;
        let written = Instant::now();
        // Stay quiet until shortly before the poll so that the admin requests
        // do not compete with the reload for the CPU.
        let quiet_until = next_poll.map(|p| p.checked_sub(Duration::from_millis(20)).unwrap_or(p));
        generation += 1;
        let (seen, slowest) = proxy.wait_generation(generation, quiet_until)?;
        admin_stall = admin_stall.max(slowest);
        let dump = proxy.config_dump(HTTP_TIMEOUT)?;
        check_dump(&dump, generation, shape.after_updates(added).services)?;
        // Recorded only when the write surely preceded the next poll (a late
        // wake-up would add a whole period).
        if let Some(poll) = next_poll
            && written + Duration::from_millis(50) < poll
        {
            applied.push(seen - written);
            work.push(seen.saturating_duration_since(poll));
        }
        previous = Some(seen);
    }
    let rss_after_updates_kib = proxy.memory()?.rss_kib;
    drop(proxy);
    Ok(Measured {
        ready,
        memory,
        applied,
        work,
        rss_after_updates_kib,
        file_bytes,
        admin_stall,
    })
}

/// Repeats the largest N-services config with one malloc arena and compares
/// the RSS after the updates: tells memory the allocator keeps from memory
/// the proxy holds.
fn arena_note(
    nodeway: &Path,
    dir: &Path,
    measured: &[(Shape, Measured)],
    runs: usize,
) -> Result<Option<String>, String> {
    let Some((shape, default)) = measured.iter().rfind(|(s, _)| s.services > 1) else {
        return Ok(None);
    };
    let control = measure_config(nodeway, dir, ONE_ARENA, *shape, runs)
        .map_err(|e| format!("config scale, {} with one arena: {e}", shape.label()))?;
    let (one, many) = (control.rss_after_updates_kib, default.rss_after_updates_kib);
    let why = if (one as f64) < 0.8 * many as f64 {
        "; the difference is memory freed by the proxy but kept by glibc in its per-thread \
         malloc arenas"
    } else {
        ""
    };
    Ok(Some(format!(
        "Control run, {} with MALLOC_ARENA_MAX=1: RSS {} MiB after load, {} MiB after the same \
         updates (default malloc: {} MiB){why}.",
        shape.label(),
        mib(control.memory.rss_kib),
        mib(one),
        mib(many)
    )))
}

/// A note when start-up time grew much faster than the config between the
/// smallest and the largest size of either family (N services, N endpoints).
fn superlinear_note(measured: &[(Shape, Measured)]) -> Option<String> {
    let mut grew = Vec::new();
    for what in ["services", "endpoints"] {
        let family: Vec<&(Shape, Measured)> = measured
            .iter()
            .filter(|(s, _)| match what {
                "services" => s.services > 1,
                _ => s.endpoints_per_service > 1,
            })
            .collect();
        let (Some((small, a)), Some((large, b))) = (family.first(), family.last()) else {
            continue;
        };
        let size = large.endpoints() as f64 / small.endpoints() as f64;
        let time = b.ready.as_secs_f64() / a.ready.as_secs_f64().max(1e-6);
        if time > 2.0 * size {
            grew.push(format!("{time:.0}× for {size:.0}× the {what}"));
        }
    }
    if grew.is_empty() {
        return None;
    }
    Some(format!(
        "Start-up time grows faster than linearly with the config: {}; reloads follow \
         (`nodeway validate --config` on a generated file reproduces it for profiling).",
        grew.join(", ")
    ))
}

/// Fails unless the dump shows `generation`, `services` and no reload error.
fn check_dump(dump: &serde_json::Value, generation: u64, services: usize) -> Result<(), String> {
    if let Some(error) = dump["last_reload_error"].as_str() {
        return Err(format!("the proxy rejected the configuration: {error}"));
    }
    let got = (dump["generation"].as_u64(), dump["services"].as_u64());
    if got != (Some(generation), Some(services as u64)) {
        return Err(format!(
            "expected generation {generation} with {services} services in /config_dump, got {got:?}"
        ));
    }
    Ok(())
}

/// Resident and proportional set size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Memory {
    pub(crate) rss_kib: u64,
    pss_kib: u64,
}

/// A running `nodeway run`; killed (and reaped) when dropped.
pub(crate) struct Proxy {
    child: Child,
    admin: SocketAddr,
    outbound: SocketAddr,
    stderr: PathBuf,
}

impl Proxy {
    /// Spawns the proxy on `config` and waits until its admin API answers;
    /// returns it with the time that took. Retries with other ports if one
    /// was taken between choosing and binding it.
    pub(crate) fn launch(
        nodeway: &Path,
        config: &Path,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<(Proxy, Duration), String> {
        let mut last_error = String::new();
        for _ in 0..3 {
            let mut proxy = Proxy::spawn(nodeway, config, dir, env)?;
            match proxy.wait_ready() {
                Ok(ready) => return Ok((proxy, ready)),
                Err(e) if e.contains("cannot listen") => last_error = e,
                Err(e) => return Err(e),
            }
        }
        Err(last_error)
    }

    fn spawn(
        nodeway: &Path,
        config: &Path,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<Proxy, String> {
        let [outbound, admin, metrics, readiness] = free_ports()?;
        let stdout = dir.join("nodeway.stdout");
        let stderr = dir.join("nodeway.stderr");
        let create = |p: &Path| File::create(p).map_err(|e| format!("create {}: {e}", p.display()));
        let child = Command::new(nodeway)
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(["--outbound-addr", &outbound.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--readiness-addr", &readiness.to_string()])
            .args(["--access-log", "off", "--node", NODE, "--log-level", "info"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            // Files, not pipes: the proxy can never block on a full pipe.
            .stdout(create(&stdout)?)
            .stderr(create(&stderr)?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", nodeway.display()))?;
        Ok(Proxy {
            child,
            admin,
            outbound,
            stderr,
        })
    }

    /// Polls `GET /ready` until it answers `200`; returns the time since spawn.
    fn wait_ready(&mut self) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(self.admin, "/ready", HTTP_TIMEOUT) {
                return Ok(started.elapsed());
            }
            self.check_alive("becoming ready")?;
            if started.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "timed out after {READY_TIMEOUT:?} waiting for the admin API at {} to answer \
                     /ready{}",
                    self.admin,
                    self.log_tail()
                ));
            }
            std::thread::sleep(poll_interval(started.elapsed()));
        }
    }

    /// Waits until `/config_dump` shows `generation` (or more) and returns
    /// when that was seen, with the slowest admin answer meanwhile. Polls
    /// every 50 ms until `quiet_until`, then as [`poll_interval`] says.
    ///
    /// The admin API may be slow to answer while the proxy loads a large
    /// file (a loader running on a runtime worker once stalled it for the
    /// whole load), so each request may wait until the deadline rather than
    /// fail.
    fn wait_generation(
        &mut self,
        generation: u64,
        quiet_until: Option<Instant>,
    ) -> Result<(Instant, Duration), String> {
        let started = Instant::now();
        let deadline = started + APPLY_TIMEOUT;
        let mut slowest = Duration::ZERO;
        loop {
            let asked = Instant::now();
            let patience = deadline.saturating_duration_since(asked).max(HTTP_TIMEOUT);
            let dump = self.config_dump(patience).map_err(|e| {
                format!("waiting {APPLY_TIMEOUT:?} at most for generation {generation}: {e}")
            })?;
            let now = Instant::now();
            slowest = slowest.max(now - asked);
            if let Some(error) = dump["last_reload_error"].as_str() {
                return Err(format!("the proxy rejected the update: {error}"));
            }
            if dump["generation"].as_u64().is_some_and(|g| g >= generation) {
                return Ok((now, slowest));
            }
            self.check_alive("applying an update")?;
            if now > deadline {
                return Err(format!(
                    "timed out after {APPLY_TIMEOUT:?} waiting for /config_dump to show generation \
                     {generation} (still {}){}",
                    dump["generation"],
                    self.log_tail()
                ));
            }
            let active_since = quiet_until.unwrap_or(started);
            std::thread::sleep(match now.checked_duration_since(active_since) {
                Some(active) => poll_interval(active),
                None => Duration::from_millis(50).min(active_since - now),
            });
        }
    }

    fn config_dump(&mut self, timeout: Duration) -> Result<serde_json::Value, String> {
        let (status, body) = http_get(self.admin, "/config_dump", timeout)
            .map_err(|e| format!("GET /config_dump: {e}{}", self.log_tail()))?;
        if status != 200 {
            return Err(format!("GET /config_dump answered {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("GET /config_dump: bad JSON: {e}"))
    }

    /// RSS and PSS from `/proc/PID/smaps_rollup` (no root needed for our own child).
    /// The outbound listener (`--outbound-addr`).
    pub(crate) fn outbound(&self) -> SocketAddr {
        self.outbound
    }

    /// User + system CPU time of the proxy process so far, in seconds.
    pub(crate) fn cpu_seconds(&self) -> Result<f64, String> {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        match (ticks(11), ticks(12)) {
            // USER_HZ is 100 on every architecture Nodeway runs on.
            (Some(user), Some(system)) => Ok((user + system) as f64 / 100.0),
            _ => Err(format!("unexpected {path}: {stat}")),
        }
    }

    pub(crate) fn memory(&self) -> Result<Memory, String> {
        let path = format!("/proc/{}/smaps_rollup", self.child.id());
        let text = fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("no {name} in {path}"))
        };
        Ok(Memory {
            rss_kib: field("Rss:")?,
            pss_kib: field("Pss:")?,
        })
    }

    fn check_alive(&mut self, doing: &str) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "nodeway exited ({status}) while {doing}{}",
                self.log_tail()
            )),
            Err(e) => Err(format!("cannot check the nodeway process: {e}")),
        }
    }

    /// The end of the proxy's stderr, for error messages.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; nodeway's stderr ends with:\n  {tail}")
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGKILL cannot be ignored, so the wait is short.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Admin polling interval after `active` of waiting: [`ADMIN_POLL`] at
/// first, then 0.5% of the wait so far (at most [`ADMIN_POLL_MAX`]), which
/// keeps the error under 1% while sparing the CPU the reload needs during a
/// load of many seconds.
fn poll_interval(active: Duration) -> Duration {
    (active / 200).clamp(ADMIN_POLL, ADMIN_POLL_MAX)
}

/// Four distinct free loopback ports. They are released before the proxy
/// binds them; [`Proxy::launch`] retries if one is taken meanwhile.
fn free_ports() -> Result<[SocketAddr; 4], String> {
    let listeners: Vec<TcpListener> = (0..4)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
    Ok([addrs[0], addrs[1], addrs[2], addrs[3]])
}

/// `GET path` on the admin API (HTTP/1.1, one connection per request), each
/// step bounded by `timeout`; returns the status and the body.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{addr}: {e}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}{path}: incomplete HTTP response"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{addr}{path}: bad status line"))?;
    // The admin API sends whole bodies with a Content-Length (never chunked).
    Ok((status, body.to_owned()))
}

/// Replaces `path` the way kubelet updates a ConfigMap volume: write a
/// temporary file next to it, then rename it over (readers never see half a
/// file).
fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path)
        .map_err(|e| format!("rename {} to {}: {e}", tmp.display(), path.display()))
}

fn sleep_until(when: Instant) {
    if let Some(d) = when.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// A unique directory under the system temp dir, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> Result<TempDir, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "nodeway-bench-config-scale-{}-{nanos}",
            std::process::id()
        ));
        // `create_dir` (not `_all`) fails if the name is somehow taken.
        fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Endpoint pick
// ---------------------------------------------------------------------------

/// An endpoint slot as the balancer sees it (as in `proxy/benches/lb_pick.rs`).
struct PickHost {
    addr: SocketAddr,
    locality: Locality,
    healthy: AtomicBool,
    active: AtomicU32,
}

impl Host for PickHost {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn locality(&self) -> &Locality {
        &self.locality
    }
    fn labels(&self) -> Option<&Labels> {
        None
    }
    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    fn active_requests(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

/// `n` healthy endpoints in one locality with varied in-flight counts.
fn pick_hosts(n: usize) -> Vec<PickHost> {
    (0..n)
        .map(|i| PickHost {
            addr: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)),
            locality: Locality::default(),
            healthy: AtomicBool::new(true),
            active: AtomicU32::new((i % 7) as u32),
        })
        .collect()
}

/// Median over `repeats` timings of `picks` picks, in ns per pick.
fn pick_ns(policy: &LbPolicy, n: usize, picks: u64, repeats: usize) -> f64 {
    let hosts = pick_hosts(n);
    let balancer = Balancer::new(
        &hosts,
        &BalancerConfig {
            policy: Some(policy),
            ..Default::default()
        },
    );
    let ctx = PickContext::default();
    assert!(balancer.pick(&hosts, &ctx).is_some(), "no endpoint picked");
    let mut timings: Vec<f64> = Vec::new();
    // One unrecorded round first: caches, branch predictors, CPU clock.
    for round in 0..=repeats {
        let start = Instant::now();
        for _ in 0..picks {
            black_box(balancer.pick(black_box(&hosts), &ctx));
        }
        if round > 0 {
            timings.push(start.elapsed().as_nanos() as f64 / picks as f64);
        }
    }
    median_f64(&mut timings)
}

/// The endpoint-pick rows, and how many picks each timing took.
fn pick_table(mode: Mode) -> (u64, Vec<Vec<String>>) {
    let picks = match mode {
        Mode::Smoke => 100_000,
        Mode::Quick => 300_000,
        Mode::Full => 1_000_000,
    };
    let mut rows = Vec::new();
    for (name, policy) in [
        ("LEAST_REQUEST", LbPolicy::Simple(SimpleLb::LeastRequest)),
        ("ROUND_ROBIN", LbPolicy::Simple(SimpleLb::RoundRobin)),
    ] {
        for n in [1_000, 10_000] {
            let ns = pick_ns(&policy, n, picks, mode.runs());
            rows.push(vec![name.to_owned(), thousands(n), format!("{ns:.1}")]);
        }
    }
    (picks, rows)
}

// ---------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------

/// `10000` → `10 000`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// File size in kB below 1 MB, else in MB.
fn size(bytes: usize) -> String {
    match bytes as f64 {
        b if b < 1e6 => format!("{:.0} kB", b / 1e3),
        b => format!("{:.1} MB", b / 1e6),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

pub(crate) fn median(durations: &[Duration]) -> Duration {
    let mut sorted = durations.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

fn median_f64(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeway::config::{LoadOptions, load_str};

    fn load(shape: Shape, added: usize) -> nodeway::state::Snapshot {
        let opts = LoadOptions {
            node_name: Some(NODE.into()),
            ..LoadOptions::default()
        };
        let loaded = load_str("generated.yaml", &config_yaml(shape, added), &opts).unwrap_or_else(
            |errors| {
                let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                panic!("generated config has errors:\n{}", list.join("\n"))
            },
        );
        let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
        assert!(warnings.is_empty(), "warnings:\n{}", warnings.join("\n"));
        loaded.snapshot
    }

    fn endpoint_counts(snapshot: &nodeway::state::Snapshot) -> Vec<usize> {
        let mut counts: Vec<usize> = snapshot
            .services
            .values()
            .map(|s| s.ports.iter().map(|p| p.endpoints.len()).sum())
            .collect();
        counts.sort();
        counts
    }

    #[test]
    fn generated_services_parse_with_the_proxys_loader() {
        let shape = Shape {
            services: 3,
            endpoints_per_service: 1,
        };
        let snapshot = load(shape, 0);
        assert_eq!(snapshot.services.len(), 3);
        assert_eq!(endpoint_counts(&snapshot), [1, 1, 1]);
        assert_eq!(snapshot.destination_rules.len(), 1);
        assert_eq!(snapshot.virtual_services.len(), 1);
        // 3 backends and the client.
        assert_eq!(snapshot.pods_by_ip.len(), 4);
        // An update adds a service.
        assert_eq!(load(shape, 2).services.len(), 5);
    }

    #[test]
    fn generated_endpoints_span_slices_and_updates_add_one() {
        let shape = Shape {
            services: 1,
            endpoints_per_service: 250,
        };
        let snapshot = load(shape, 0);
        assert_eq!(endpoint_counts(&snapshot), [250]);
        assert_eq!(endpoint_counts(&load(shape, 1)), [251]);
        assert_eq!(shape.after_updates(1).services, 1);
    }

    #[test]
    fn formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1 000");
        assert_eq!(thousands(10_000), "10 000");
        assert_eq!(thousands(1_234_567), "1 234 567");
        assert_eq!(
            Shape {
                services: 10_000,
                endpoints_per_service: 1
            }
            .label(),
            "10 000 services × 1 endpoint"
        );
        assert_eq!(address(96, 0), "10.96.0.1");
        assert_eq!(address(1, 256), "10.1.1.1");
    }

    /// The debug proxy binary, honouring `CARGO_TARGET_DIR`.
    /// Builds the debug proxy (a no-op when it is up to date; the test
    /// runner may start this test before anything else built it).
    fn debug_nodeway() -> PathBuf {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "nodeway", "--bin", "nodeway"])
            .current_dir(&workspace)
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building the nodeway binary failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map_or_else(|| workspace.join("target"), |t| workspace.join(t));
        let nodeway = target.join("debug").join("nodeway");
        assert!(nodeway.is_file(), "{} is missing", nodeway.display());
        nodeway
    }

    fn number(cell: &str) -> f64 {
        cell.replace(' ', "")
            .parse()
            .unwrap_or_else(|e| panic!("{cell:?} is not a number: {e}"))
    }

    #[test]
    fn smoke_run_against_the_debug_proxy() {
        let scenario = run(&debug_nodeway(), Mode::Smoke).unwrap_or_else(|e| panic!("{e}"));
        println!("{}", serde_json::to_string_pretty(&scenario).unwrap());
        assert_eq!((scenario.id, scenario.title.as_str()), (10, "Config scale"));
        let [memory, picks] = scenario.tables.as_slice() else {
            panic!("two tables expected, got {}", scenario.tables.len())
        };

        // Base, then 100 and 1 000 services, then 1 service of 100 and 1 000 endpoints.
        assert_eq!(memory.columns.len(), 9);
        assert_eq!(memory.rows.len(), 5);
        assert!(memory.rows.iter().all(|r| r.len() == memory.columns.len()));
        let column = |name: &str| {
            let i = memory.columns.iter().position(|c| c == name).unwrap();
            memory
                .rows
                .iter()
                .map(|r| number(&r[i]))
                .collect::<Vec<f64>>()
        };
        let rss = column("RSS (MiB)");
        assert!(rss.iter().all(|&r| r > 0.0), "RSS {rss:?}");
        assert!(column("PSS (MiB)").iter().all(|&p| p > 0.0));
        assert_eq!(column("services"), [1.0, 100.0, 1_000.0, 1.0, 1.0]);
        assert_eq!(column("endpoints"), [1.0, 100.0, 1_000.0, 100.0, 1_000.0]);
        assert!(
            rss[2] >= rss[0],
            "1 000 services {} < base {}",
            rss[2],
            rss[0]
        );
        assert!(
            rss[4] >= rss[0],
            "1 000 endpoints {} < base {}",
            rss[4],
            rss[0]
        );
        let applied = column("update applied after (ms, median)");
        assert!(applied.iter().all(|&t| t > 0.0), "applied {applied:?}");
        assert!(column("ready after (ms)").iter().all(|&t| t > 0.0));

        assert_eq!(picks.columns.len(), 3);
        assert_eq!(picks.rows.len(), 4);
        assert!(picks.rows.iter().all(|r| number(&r[2]) > 0.0));
    }
}
