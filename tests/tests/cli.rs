//! The `nodeway` binary's contract: `validate` output and exit codes,
//! startup errors, and SIGTERM draining.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use nodeway_tests::{Proto, request};

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join(rel)
}

#[test]
fn validate_accepts_the_example() {
    let out = Command::new(nodeway_bin())
        .args(["validate", "--config"])
        .arg(repo_file("deploy/examples/local.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

#[test]
fn validate_lists_every_problem_with_location() {
    let dir = TempDir::new("cli");
    let path = dir.0.join("bad.yaml");
    std::fs::write(
        &path,
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports:
  - {name: http, port: "eighty"}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - timeout: 3 seconds
    retries: {attempts: 2, retryOn: "5xx,sometimes"}
    route: [{destination: {host: web}}]
"#,
    )
    .unwrap();
    let out = Command::new(nodeway_bin())
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "three problems, one per line:\n{stdout}");
    let file = path.display().to_string();
    assert!(lines.iter().all(|l| l.starts_with(&file)), "{stdout}");
    assert!(
        lines.iter().any(|l| l.contains("document 1")
            && l.contains("Service")
            && l.contains("spec.ports[0].port")),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.contains("document 2")
            && l.contains("shop/web")
            && l.contains("spec.http[0].timeout")),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.contains("document 2")
            && l.contains("spec.http[0].retries.retryOn")
            && l.contains("sometimes")),
        "{stdout}"
    );
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_binary(
    config: &std::path::Path,
    log: &std::path::Path,
    extra: &[&str],
) -> (Proc, std::net::SocketAddr) {
    let port = free_port();
    let outbound: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(nodeway_bin())
        .args(["run", "--config"])
        .arg(config)
        .args([
            "--outbound-addr",
            &outbound.to_string(),
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--access-log")
        .arg(log)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(outbound).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nodeway did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (proc, outbound)
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < within,
            "nodeway did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let m = mock("m").await;
    let dir = TempDir::new("cli");
    let config = dir.0.join("mesh.yaml");
    std::fs::write(
        &config,
        MeshConfig::new(vec![m.addr()])
            .with_route("10s", 0, "5xx")
            .render(),
    )
    .unwrap();
    let (mut proc, outbound) = start_binary(&config, &dir.0.join("access.log"), &[]);

    let in_flight = tokio::spawn(async move {
        request(
            Proto::Http1,
            outbound,
            CLIENT_IP,
            AUTHORITY,
            "/delay/1000",
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&proc.0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        std::net::TcpStream::connect(outbound).is_err(),
        "no new connections are accepted while draining"
    );

    let out = in_flight.await.unwrap();
    assert_eq!(
        out.status,
        Some(200),
        "the in-flight request completed: {out:?}"
    );
    assert!(out.body_complete);
    let status = wait_exit(&mut proc.0, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    let log = nodeway_tests::AccessLog::new(dir.0.join("access.log")).lines();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["response_code"], "200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_bounded() {
    let m = mock("m").await;
    let dir = TempDir::new("cli");
    let config = dir.0.join("mesh.yaml");
    std::fs::write(
        &config,
        MeshConfig::new(vec![m.addr()])
            .with_route("30s", 0, "5xx")
            .render(),
    )
    .unwrap();
    let (mut proc, outbound) = start_binary(
        &config,
        &dir.0.join("access.log"),
        &["--drain-timeout", "1s"],
    );
    let stuck = tokio::spawn(async move {
        request(
            Proto::Http1,
            outbound,
            CLIENT_IP,
            AUTHORITY,
            "/delay/20000",
            Bytes::new(),
            Duration::from_secs(25),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    sigterm(&proc.0);
    let status = wait_exit(&mut proc.0, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "exit after the 1s drain: {took:?}"
    );
    stuck.abort();
}

#[test]
fn run_with_bad_config_exits_nonzero_with_every_problem() {
    let dir = TempDir::new("cli");
    let config = dir.0.join("bad.yaml");
    std::fs::write(
        &config,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: x}\nspec:\n  hosts: [\"*\"]\n  http:\n  - route: []\n",
    )
    .unwrap();
    let mut child = Command::new(nodeway_bin())
        .args(["run", "--config"])
        .arg(&config)
        .args([
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--access-log",
            "off",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("spec.hosts[0]: wildcard host *") && stderr.contains("spec.http[0].route"),
        "{stderr}"
    );
}

#[test]
fn run_reports_a_busy_port_clearly() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let mut child = Command::new(nodeway_bin())
        .args(["run", "--config"])
        .arg(repo_file("deploy/examples/local.yaml"))
        .args([
            "--outbound-addr",
            &addr,
            "--admin-addr",
            "127.0.0.1:0",
            "--access-log",
            "off",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "cannot listen on {addr} for the outbound listener"
        )),
        "{stderr}"
    );
}

/// The command line takes durations in the config's grammar (Go's), so one
/// spelling works everywhere a user types a duration.
#[test]
fn command_line_durations_use_the_config_grammar() {
    let run = |value: &str| {
        Command::new(nodeway_bin())
            .args(["run", "--config", "/nonexistent/nodeway.yaml"])
            .args(["--drain-timeout", value])
            .output()
            .unwrap()
    };
    let out = run("1min");
    assert_eq!(out.status.code(), Some(2), "clap rejects the value");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value '1min' for '--drain-timeout <DRAIN_TIMEOUT>'")
            && stderr.contains("unknown unit \"min\""),
        "{stderr}"
    );
    // Accepted: the process gets past argument parsing and fails on the
    // missing file instead.
    let out = run("1m30s");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/nodeway.yaml"), "{stderr}");
}

/// The overload manager's memory limit takes what the downward API writes
/// (bytes) and Kubernetes quantities; anything else is refused by name.
#[test]
fn overload_memory_limits_are_kubernetes_quantities() {
    let run = |value: &str| {
        Command::new(nodeway_bin())
            .args(["run", "--config", "/nonexistent/nodeway.yaml"])
            .args(["--overload-memory-limit", value])
            .output()
            .unwrap()
    };
    for bad in ["512MB", "lots", "0", "99999999999Ti"] {
        let out = run(bad);
        assert_eq!(out.status.code(), Some(2), "{bad} is refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "invalid value '{bad}' for '--overload-memory-limit"
            )),
            "{stderr}"
        );
    }
    for good in ["536870912", "512Mi", "1Gi", "500M"] {
        let out = run(good);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(2), "{good}: {stderr}");
        assert!(stderr.contains("/nonexistent/nodeway.yaml"), "{stderr}");
    }
}

/// Issue 13: deeply nested YAML took the parser time that grows with the
/// square of the depth (40 000 levels: 11.6 s); such a document is refused
/// before parsing, with a clear problem, and the other documents are read.
#[test]
fn validate_refuses_absurdly_nested_yaml() {
    let dir = TempDir::new("cli");
    let path = dir.0.join("deep.yaml");
    let deep = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: deep, labels: {{a: {}{}}}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: fine, labels: {{a: b}}}}\n",
        "[".repeat(40_000),
        "]".repeat(40_000)
    );
    std::fs::write(&path, deep).unwrap();
    let out = Command::new(nodeway_bin())
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("document 1")
            && stdout.contains("nested deeper than 64 levels of [ ] or { }"),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().count(),
        1,
        "only the deep document: {stdout}"
    );
}
