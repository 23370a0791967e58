//! `cargo xtask …`: project automation with nothing but std.
//!
//! - `setup`: installs what the project needs beyond the Rust toolchain (idempotent).
//! - `demo [--once]` (root): builds, then runs `ebpf-demo` (tests/src/bin): a
//!   one-node topology of pods in network namespaces, Nodeway with the eBPF
//!   redirect, traffic showing redirect, retries, a timeout, an ejection and
//!   locality failover, and a checked summary; without `--once` the mesh then
//!   stays up (at most 10 minutes) until Enter or Ctrl-C.
//! - `demo --loopback [--once]`: no root needed; starts three mock upstreams
//!   and Nodeway with `deploy/examples/local.yaml`, sends requests as the
//!   example client pod.
//! - `test`: the whole test suite, as CI runs it (with a short fuzz run).
//! - `fuzz [--seconds N] [TARGET…]`: builds the cargo-fuzz targets in `fuzz/`
//!   and runs each for N seconds (default 60); fails on a crash.
//! - `bench-scrape`: latency of proxied requests with and without a
//!   `/metrics` scrape every 100 ms (release builds, loopback only).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        // Every command that builds installs what is missing first.
        Some("demo") => setup().and_then(|_| demo(&args[1..])),
        Some("test") => setup().and_then(|_| test()),
        Some("bench") => setup().and_then(|_| bench(&args[1..])),
        Some("bench-scrape") => setup().and_then(|_| bench_scrape()),
        Some("fuzz") => setup().and_then(|_| fuzz(&args[1..])),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|demo [--loopback] [--once]|test|fuzz [--seconds N] [TARGET...]|bench [--quick|--smoke]|bench-scrape>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Font of the benchmark's plots (Debian's `fonts-dejavu-core`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Installs what is missing, idempotently: `curl` (demo), `cargo-nextest`
/// (test runner), `nft` and `bpftool` (eBPF test topology and checks), the
/// eBPF toolchain: LLVM 22, nightly's `rust-src`, `bpf-linker`, and for the
/// `deploy/` checks `kubectl` (its `kustomize`) and `kubernetes-validate`.
fn setup() -> Result {
    let mut packages = Vec::new();
    for (program, package) in [
        ("curl", "curl"),
        ("nft", "nftables"),
        ("bpftool", "bpftool"),
        ("kubectl", "kubernetes-client"),
        ("haproxy", "haproxy"),
        // jemalloc (the proxy's allocator) is built from source with make.
        ("make", "make"),
    ] {
        if !have(program) {
            packages.push(package);
        }
    }
    // The benchmark's plots are labelled with DejaVu Sans.
    if !Path::new(FONT).exists() {
        packages.push("fonts-dejavu-core");
    }
    if !Path::new("/usr/lib/llvm-22/lib/libLLVM.so").exists()
        || !Path::new("/usr/lib/llvm-22/lib/libPolly.a").exists()
    {
        packages.extend(["llvm-22-dev", "libpolly-22-dev"]);
    }
    if !packages.is_empty() {
        apt_install(&packages)?;
    }
    // Offline schema validation of the manifests (tests/tests/deploy.rs);
    // brings PyYAML and jsonschema, which those tests use too.
    let validator = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "1.37.0");
    if !validator {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "kubernetes-validate==1.37.0",
        ]))?;
        // Under pyenv a new console script needs a shim before it is on PATH.
        if have("pyenv") {
            run(Command::new("pyenv").arg("rehash"))?;
        }
    }
    if !have("cargo-nextest") {
        run(Command::new("cargo").args(["install", "--locked", "cargo-nextest"]))?;
    }
    if !have("cargo-fuzz") {
        run(Command::new("cargo").args([
            "install",
            "--locked",
            "cargo-fuzz",
            "--version",
            "0.13.2",
        ]))?;
    }
    let has_rust_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"));
    if !has_rust_src {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if !have("bpf-linker") {
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", "0.13.0"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path))?;
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> Result {
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn test() -> Result {
    let root = root();
    run(Command::new("cargo")
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(&root))?;
    run(Command::new("cargo")
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(&root))?;
    run(Command::new("cargo")
        .args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .current_dir(&root))?;
    // Every fuzz target, briefly: the harnesses must build and the seeds
    // must not crash (long campaigns: `cargo xtask fuzz --seconds 3600`).
    fuzz(&["--seconds".to_owned(), "20".to_owned()])?;
    // Both demos the README shows must work as written.
    loopback_demo(true)?;
    run(&mut ebpf_demo(true)?)?;
    // The benchmark harness must not rot: a few seconds of every scenario.
    bench(&["--smoke".to_owned()])
}

/// `cargo xtask bench [--quick|--smoke]`: release builds (debug for
/// `--smoke`), then `nodeway-bench run`; the report lands in `target/bench`
/// (`target/bench-smoke` for `--smoke`).
fn bench(flags: &[String]) -> Result {
    let mut mode = None;
    for flag in flags {
        match flag.as_str() {
            "--quick" | "--smoke" if mode.is_none() => mode = Some(flag.clone()),
            other => {
                return Err(format!(
                    "bench: unknown argument {other:?} (--quick, --smoke)"
                ));
            }
        }
    }
    if !is_root() {
        return Err(
            "cargo xtask bench needs root: it builds network namespaces and loads eBPF programs"
                .to_owned(),
        );
    }
    let smoke = mode.as_deref() == Some("--smoke");
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--quiet"]);
    if !smoke {
        cmd.arg("--release");
    }
    run(cmd
        .args([
            "-p",
            "nodeway",
            "-p",
            "nodeway-bench",
            "-p",
            "nodeway-tests",
            "--bins",
        ])
        .current_dir(root()))?;
    let bin = target_dir().join(if smoke { "debug" } else { "release" });
    let out = target_dir().join(if smoke { "bench-smoke" } else { "bench" });
    let mut cmd = Command::new(bin.join("nodeway-bench"));
    cmd.arg("run")
        .arg("--nodeway")
        .arg(bin.join("nodeway"))
        .arg("--out")
        .arg(&out);
    if let Some(m) = &mode {
        cmd.arg(m);
    }
    run(&mut cmd)?;
    // Upgrades under load: 10× the upgrade test's rate (a fifth of it for --smoke).
    let mut upgrade = Command::new(bin.join("nodeway-bench"));
    upgrade
        .arg("upgrade")
        .arg("--nodeway")
        .arg(bin.join("nodeway"))
        .arg("--mock-upstream")
        .arg(bin.join("mock-upstream"))
        .arg("--mixed-load")
        .arg(bin.join("mixed-load"))
        .arg("--out")
        .arg(&out);
    if smoke {
        upgrade.args(["--scale", "0.2", "--seconds", "15"]);
    }
    run(&mut upgrade)
}

/// The cargo-fuzz targets of `fuzz/` (see its `Cargo.toml`).
const FUZZ_TARGETS: [&str; 5] = [
    "config_load",
    "sniff",
    "route_match",
    "admin_query",
    "http_request",
];

/// `cargo xtask fuzz [--seconds N] [TARGET…]`: builds every target
/// (nightly, coverage instrumentation, debug assertions; no sanitizer: the
/// fuzzed code has no `unsafe`, and panics, aborts, hangs and memory blow-ups
/// are what libFuzzer catches without one), then runs each in turn on its
/// committed seeds (`fuzz/seeds/`) and growing corpus (`fuzz/corpus/`).
/// A crash fails the command and leaves its input in `fuzz/artifacts/`.
fn fuzz(args: &[String]) -> Result {
    let mut seconds = 60u64;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("fuzz: --seconds needs a positive number")?;
            }
            t if FUZZ_TARGETS.contains(&t) => targets.push(t),
            other => {
                return Err(format!(
                    "fuzz: unknown argument {other:?} (targets: {})",
                    FUZZ_TARGETS.join(", ")
                ));
            }
        }
    }
    if targets.is_empty() {
        targets = FUZZ_TARGETS.to_vec();
    }
    let fuzz_dir = root().join("fuzz");
    run(Command::new("cargo")
        .args([
            "+nightly",
            "fuzz",
            "build",
            "--sanitizer",
            "none",
            "--debug-assertions",
        ])
        .current_dir(root()))?;
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("create {corpus:?}: {e}"))?;
        run(Command::new("cargo")
            .args([
                "+nightly",
                "fuzz",
                "run",
                "--sanitizer",
                "none",
                "--debug-assertions",
            ])
            .arg(target)
            .arg(&corpus)
            .arg(fuzz_dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // A single input may take 10 s (the request-path harness waits
            // up to 5 s for the proxy); 2 GiB of RSS is a memory blow-up.
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .current_dir(root()))?;
    }
    Ok(())
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Endpoints of `deploy/examples/local.yaml`, served by the mock upstream.
const ENDPOINTS: [(&str, &str); 3] = [
    ("127.0.0.11:8080", "mock-server-v1-a"),
    ("127.0.0.12:8080", "mock-server-v1-b"),
    ("127.0.0.13:8080", "mock-server-v2"),
];
/// Source address of the example client pod `sleep`.
const CLIENT_IP: &str = "127.0.1.5";

/// `cargo xtask demo [--loopback] [--once]`.
fn demo(flags: &[String]) -> Result {
    let mut once = false;
    let mut loopback = false;
    for flag in flags {
        match flag.as_str() {
            "--once" => once = true,
            "--loopback" => loopback = true,
            other => {
                return Err(format!(
                    "demo: unknown argument {other:?} (--loopback, --once)"
                ));
            }
        }
    }
    if loopback {
        return loopback_demo(once);
    }
    // The demo becomes `ebpf-demo`: Ctrl-C reaches it alone, and it tears
    // the mesh down before exiting.
    use std::os::unix::process::CommandExt as _;
    let mut cmd = ebpf_demo(once)?;
    eprintln!("+ {cmd:?}");
    Err(format!("cannot run {cmd:?}: {}", cmd.exec()))
}

/// Effective uid 0 (from `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        == Some("0")
}

/// The workspace's target directory (`CARGO_TARGET_DIR` if set).
fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

/// Builds `nodeway` and the test binaries (mock upstream, clients, demos);
/// returns the directory they are in.
fn build_bins(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--quiet"]);
    if release {
        cmd.arg("--release");
    }
    run(cmd
        .args(["-p", "nodeway", "-p", "nodeway-tests", "--bins"])
        .current_dir(root()))?;
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// Builds Nodeway and the test binaries; returns the command running the
/// eBPF demo (`ebpf-demo`, see tests/src/bin/ebpf-demo.rs) with them.
fn ebpf_demo(once: bool) -> Result<Command> {
    if !is_root() {
        return Err(
            "cargo xtask demo needs root (eBPF); use --loopback for the loopback demo".to_owned(),
        );
    }
    let bin = build_bins(false)?;
    let mut cmd = Command::new(bin.join("ebpf-demo"));
    cmd.arg("--nodeway")
        .arg(bin.join("nodeway"))
        .arg("--mock-upstream")
        .arg(bin.join("mock-upstream"))
        .arg("--pod-client")
        .arg(bin.join("pod-client"))
        .arg("--mixed-load")
        .arg(bin.join("mixed-load"));
    if once {
        cmd.arg("--once");
    }
    Ok(cmd)
}

/// The loopback demo (`demo --loopback`): no root, no eBPF; the client pod
/// is a source address, requests go to the proxy with `curl -x`.
fn loopback_demo(once: bool) -> Result {
    let bin = build_bins(false)?;
    let (proxy, mocks) = start_example_mesh(
        &bin,
        &[
            "--access-log",
            "stdout",
            "--node",
            "node-a",
            "--log-level",
            "warn",
        ],
    )?;
    eprintln!("\n== Nodeway is running; requests from the example client pod ({CLIENT_IP}) ==");
    let requests = [
        "http://mock-server/status/200",
        "http://mock-server.default.svc.cluster.local/status/503",
        "http://mock-server/delay/5000",
    ];
    let mut failures = 0;
    for url in requests {
        eprintln!("\n$ curl -sS --interface {CLIENT_IP} -x http://127.0.0.1:15001 {url}");
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}\n",
                "--interface",
                CLIENT_IP,
                "-x",
                "http://127.0.0.1:15001",
                url,
            ])
            .output()
            .map_err(|e| format!("curl: {e}"))?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        eprintln!("HTTP {code}");
        let expected = match url {
            u if u.ends_with("/status/200") => "200",
            u if u.ends_with("/status/503") => "503",
            _ => "504",
        };
        if code != expected {
            eprintln!("expected HTTP {expected}");
            failures += 1;
        }
    }
    sleep(Duration::from_millis(200));
    if failures > 0 {
        return Err(format!(
            "{failures} demo request(s) did not get the expected status"
        ));
    }
    if once {
        drop(proxy);
        drop(mocks);
        eprintln!("\ndemo ok");
        return Ok(());
    }
    eprintln!(
        "\nTry more, e.g.: curl --interface {CLIENT_IP} -x http://127.0.0.1:15001 http://mock-server/status/200"
    );
    eprintln!("Admin: curl http://127.0.0.1:15000/config_dump — press Ctrl-C to stop.");
    let mut proxy = proxy;
    let _ = proxy.0.wait();
    Ok(())
}

/// Starts the three mock upstreams of `deploy/examples/local.yaml` and
/// Nodeway with that file (plus `nodeway_args`), and waits until all listen.
/// Returns (proxy, mocks); dropping them stops the processes.
fn start_example_mesh(bin: &Path, nodeway_args: &[&str]) -> Result<(KillOnDrop, Vec<KillOnDrop>)> {
    let mut mocks = Vec::new();
    for (addr, name) in ENDPOINTS {
        mocks.push(KillOnDrop(
            Command::new(bin.join("mock-upstream"))
                .args(["--listen", addr, "--name", name])
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("mock-upstream: {e}"))?,
        ));
    }
    let proxy = KillOnDrop(
        Command::new(bin.join("nodeway"))
            .args(["run", "--config"])
            .arg(root().join("deploy/examples/local.yaml"))
            .args(nodeway_args)
            .spawn()
            .map_err(|e| format!("nodeway: {e}"))?,
    );
    wait_for_port("127.0.0.1:15001", Duration::from_secs(10))?;
    for (addr, _) in ENDPOINTS {
        wait_for_port(addr, Duration::from_secs(10))?;
    }
    Ok((proxy, mocks))
}

fn wait_for_port(addr: &str, within: Duration) -> Result {
    let start = Instant::now();
    while start.elapsed() < within {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        sleep(Duration::from_millis(50));
    }
    Err(format!("{addr} did not start listening within {within:?}"))
}

/// Reads `"key":number` from the loadgen's one-line JSON.
fn json_number(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Proxied-request latency with and without a Prometheus-like scrape of
/// `/metrics` every 100 ms: five interleaved runs of each (A B A B …) after a
/// warm-up, medians compared. Writes `target/bench/scrape-overhead.md`.
fn bench_scrape() -> Result {
    let bin = build_bins(true)?;
    let (proxy, mocks) = start_example_mesh(
        &bin,
        &[
            "--access-log",
            "off",
            "--log-level",
            "warn",
            "--worker-threads",
            "1",
            "--metrics-addr",
            "127.0.0.1:15020",
            "--readiness-addr",
            "127.0.0.1:15121",
        ],
    )?;
    let load = |requests: &str, scrape: bool| -> Result<String> {
        let mut cmd = Command::new(bin.join("loadgen"));
        cmd.args([
            "--target",
            "127.0.0.1:15001",
            "--src",
            CLIENT_IP,
            "--authority",
            "mock-server",
        ]);
        cmd.args([
            "--path",
            "/status/200",
            "--concurrency",
            "16",
            "--requests",
            requests,
            "--rate",
            "5000",
        ]);
        if scrape {
            cmd.args(["--scrape", "127.0.0.1:15020", "--scrape-every-ms", "100"]);
        }
        let out = cmd.output().map_err(|e| format!("loadgen: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "loadgen failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    load("10000", false)?;
    let mut results: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for round in 0..5 {
        for (i, scrape) in [false, true].into_iter().enumerate() {
            let line = load("50000", scrape)?;
            eprintln!("round {round} scrape={scrape}: {line}");
            results[i].push(line);
        }
    }
    drop(proxy);
    drop(mocks);
    let mut report = String::from(
        "# Scrape overhead\n\nHTTP/1.1 through Nodeway (release, 1 worker thread, access log off), 16 keep-alive\n\
         connections, open loop at 5 000 req/s (latency from each request's due time), 50 000 requests\n\
         per run; five interleaved runs per case, medians.\n\n\
         | case | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | scrapes |\n|---|---|---|---|---|---|---|\n",
    );
    for (i, name) in ["no scrape", "scrape /metrics every 100 ms"]
        .iter()
        .enumerate()
    {
        let m = |key: &str| {
            median(
                results[i]
                    .iter()
                    .filter_map(|l| json_number(l, key))
                    .collect(),
            )
        };
        report.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            m("rps"),
            m("p50_us"),
            m("p90_us"),
            m("p99_us"),
            m("p999_us"),
            m("scrapes")
        ));
    }
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("scrape-overhead.md"), &report).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}
