//! `nodeway-bench allocators NAME=BINARY…`: the memory allocator chosen by
//! measurement. Each binary is the same source built with a different global
//! allocator (`cargo build --release -p nodeway --features jemalloc`, …).
//! Per round, in the order given (rounds interleave the builds):
//! - memory: the build loads `--services` Services (scenario 10's
//!   generator) and applies `--reloads` updates; RSS after the load and after
//!   the updates (glibc's per-thread arenas keep what reloads free);
//! - CPU: the build carries HTTP/1.1 keep-alive `GET /size/1024` at `--rate`
//!   requests/s for `--seconds` to a loopback backend (this binary's
//!   `backend`); CPU-seconds of the proxy per 10 000 requests.
//!
//! Prints a Markdown table of medians. Loopback only; no root needed.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::config_scale::{Proxy, Shape, TempDir, measure_config};
use crate::model::Load;

const USAGE: &str = "usage: nodeway-bench allocators [--rounds N] [--services N] [--reloads N] \
                     [--rate R] [--seconds S] NAME=BINARY...";

struct Options {
    builds: Vec<(String, PathBuf)>,
    rounds: usize,
    services: usize,
    reloads: usize,
    rate: u64,
    seconds: u64,
}

#[derive(Default)]
struct Samples {
    rss_loaded_mib: Vec<f64>,
    rss_reloaded_mib: Vec<f64>,
    cpu_per_10k: Vec<f64>,
    reload_ms: Vec<f64>,
}

pub fn main(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    let dir = TempDir::new()?;
    let backend = Backend::start()?;
    let mut samples: Vec<Samples> = opts.builds.iter().map(|_| Samples::default()).collect();
    for round in 0..opts.rounds {
        for ((name, binary), s) in opts.builds.iter().zip(&mut samples) {
            eprintln!("allocators: round {}/{}: {name}", round + 1, opts.rounds);
            let shape = Shape {
                services: opts.services,
                endpoints_per_service: 1,
            };
            let m = measure_config(binary, &dir.0, &[], shape, opts.reloads)
                .map_err(|e| format!("{name}, {} services: {e}", opts.services))?;
            s.rss_loaded_mib.push(m.memory.rss_kib as f64 / 1024.0);
            s.rss_reloaded_mib
                .push(m.rss_after_updates_kib as f64 / 1024.0);
            s.reload_ms
                .push(crate::config_scale::median(&m.work).as_secs_f64() * 1000.0);
            s.cpu_per_10k.push(
                cpu_per_10k(binary, &dir.0, backend.addr, &opts)
                    .map_err(|e| format!("{name}: {e}"))?,
            );
        }
    }
    println!(
        "| allocator | RSS after loading {} services (MiB) | after {} reloads (MiB) | reload work (ms) | CPU-s per 10 000 requests at {} req/s |",
        opts.services, opts.reloads, opts.rate
    );
    println!("|---|---|---|---|---|");
    for ((name, _), s) in opts.builds.iter().zip(&mut samples) {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.3} |",
            median(&mut s.rss_loaded_mib),
            median(&mut s.rss_reloaded_mib),
            median(&mut s.reload_ms),
            median(&mut s.cpu_per_10k)
        );
    }
    println!(
        "\nMedians of {} interleaved rounds; every sample: {}",
        opts.rounds,
        opts.builds
            .iter()
            .zip(&samples)
            .map(|((name, _), s)| format!(
                "{name} RSS {:?} → {:?} MiB, CPU {:?}",
                rounded(&s.rss_loaded_mib, 0),
                rounded(&s.rss_reloaded_mib, 0),
                rounded(&s.cpu_per_10k, 3)
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(())
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut opts = Options {
        builds: Vec::new(),
        rounds: 3,
        services: 10_000,
        reloads: 6,
        rate: 2_000,
        seconds: 10,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |what: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what} needs a positive number\n{USAGE}"))
        };
        match arg.as_str() {
            "--rounds" => opts.rounds = number("--rounds")? as usize,
            "--services" => opts.services = number("--services")? as usize,
            "--reloads" => opts.reloads = number("--reloads")? as usize,
            "--rate" => opts.rate = number("--rate")?,
            "--seconds" => opts.seconds = number("--seconds")?,
            build => {
                let (name, binary) = build
                    .split_once('=')
                    .ok_or_else(|| format!("not NAME=BINARY: {build:?}\n{USAGE}"))?;
                opts.builds.push((name.to_owned(), PathBuf::from(binary)));
            }
        }
    }
    if opts.builds.is_empty() {
        return Err(USAGE.to_owned());
    }
    Ok(opts)
}

/// The proxy on a one-Service config whose endpoint is the backend; a
/// warm-up, then the measured load.
fn cpu_per_10k(
    binary: &std::path::Path,
    dir: &std::path::Path,
    backend: SocketAddr,
    opts: &Options,
) -> Result<f64, String> {
    let config = dir.join("cpu.yaml");
    std::fs::write(&config, cpu_config(backend)).map_err(|e| format!("write config: {e}"))?;
    let (proxy, _) = Proxy::launch(binary, &config, dir, &[])?;
    let load = |seconds: u64| Load::Http1 {
        target: proxy.outbound(),
        authority: "web.bench.svc.cluster.local".into(),
        path: "/size/1024".into(),
        connections: 8,
        rate: opts.rate,
        duration_ms: seconds * 1000,
        warmup_ms: 0,
    };
    crate::load::run(&load(1))?;
    let before = proxy.cpu_seconds()?;
    let result = crate::load::run(&load(opts.seconds))?;
    let used = proxy.cpu_seconds()? - before;
    if result.errors > 0 || result.ok == 0 {
        return Err(format!(
            "{} of {} requests failed: {:?}",
            result.errors, result.sent, result.error_samples
        ));
    }
    Ok(used / result.ok as f64 * 10_000.0)
}

fn cpu_config(backend: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: bench}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-a}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: bench}}
spec:
  clusterIP: 10.96.0.1
  ports: [{{name: http, port: 80, targetPort: {port}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: bench
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: {port}, protocol: TCP}}]
endpoints:
- addresses: [\"{ip}\"]
  conditions: {{ready: true}}
",
        port = backend.port(),
        ip = backend.ip()
    )
}

/// `nodeway-bench backend` as a child process, killed when dropped.
struct Backend {
    child: Child,
    addr: SocketAddr,
}

impl Backend {
    fn start() -> Result<Backend, String> {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?;
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let child = Command::new(exe)
            .args(["backend", "--http", &addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start the backend: {e}"))?;
        let backend = Backend { child, addr };
        for _ in 0..500 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(backend);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!("the backend did not listen on {addr}"))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn rounded(values: &[f64], digits: usize) -> Vec<String> {
    values.iter().map(|v| format!("{v:.digits$}")).collect()
}
