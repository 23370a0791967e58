//! Self-tests of the network-namespace topology (`nodeway_tests::topology`)
//! and of `pod-client`, without the proxy. They need root and panic when not
//! root (CI runs them as root):
//!
//! ```sh
//! cargo nextest run -p nodeway-tests --test topology_selftest
//! ```
//!
//! All traffic stays inside the namespaces each test creates: the node
//! namespace has no uplink, and VIPs/pod IPs are only dialled from pods.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nodeway_tests::topology::{
    Topology, cgroup2_mount, cleanup_stale, leftovers, require_root, wait_for_stdout_line,
};
use serde_json::Value;

const MOCK: &str = env!("CARGO_BIN_EXE_mock-upstream");
const CLIENT: &str = env!("CARGO_BIN_EXE_pod-client");
/// Upper bound of one pod-client run.
const RUN: Duration = Duration::from_secs(8);

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const BACKEND2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);

/// Runs pod-client in `pod` and parses the JSON line it prints.
fn pod_client(topo: &Topology, pod: &str, args: &[&str]) -> Value {
    let out = topo.run(pod, CLIENT, args, RUN);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pod-client {args:?} in pod {pod}: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("pod-client {args:?} printed nothing; stderr: {stderr}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("pod-client output {line:?}: {e}"))
}

/// Starts mock-upstream named `name` on `<pod ip>:8080` in `pod` and waits
/// until it listens. It is killed when the topology is dropped.
fn start_mock(topo: &Topology, pod: &str, name: &str) -> Child {
    let listen = format!("{}:8080", topo.pod(pod).ip);
    let mut child = topo.spawn(pod, MOCK, &["--listen", &listen, "--name", name]);
    wait_for_stdout_line(&mut child, "listening on", Duration::from_secs(5));
    child
}

/// Drops the topology (which kills everything it spawned) and reaps
/// `children`, checking that each one is gone.
fn teardown(topo: Topology, children: Vec<Child>) {
    drop(topo);
    for mut child in children {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => panic!("pid {} survived the teardown: {other:?}", child.id()),
            }
        }
    }
}

fn header<'a>(v: &'a Value, name: &str) -> &'a str {
    v["headers"][name].as_str().unwrap_or("")
}

fn ip_cmd(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vip_dnat_and_direct() {
    require_root();
    let mut topo = Topology::new();
    topo.add_pod("a", A);
    topo.add_pod("b", B);
    topo.add_pod("backend", BACKEND);
    topo.add_service_vip(VIP, &[SocketAddrV4::new(BACKEND, 8080)]);
    let mock = start_mock(&topo, "backend", "backend");

    for (pod, ip) in [("a", A), ("b", B)] {
        // Through the kube-proxy stand-in: DNAT only, the backend sees the
        // client pod's own address.
        let v = pod_client(&topo, pod, &["http", "http://10.96.0.10/"]);
        assert_eq!(v["status"], 200, "{pod}: {v}");
        assert_eq!(header(&v, "x-served-by"), "backend", "{v}");
        assert!(
            header(&v, "x-mock-peer").starts_with(&format!("{ip}:")),
            "{pod}: {v}"
        );
        // Directly to the pod IP.
        let v = pod_client(&topo, pod, &["http", "http://10.0.0.10:8080/status/201"]);
        assert_eq!(v["status"], 201, "{pod}: {v}");
        assert_eq!(v["body_len"], r#"{"status":201}"#.len(), "{v}");
    }
    let v = pod_client(
        &topo,
        "a",
        &[
            "http",
            "http://10.96.0.10/echo",
            "--h2",
            "--body-size",
            "1000",
        ],
    );
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["body_len"], 1000, "{v}");
    let v = pod_client(
        &topo,
        "a",
        &["grpc", "10.96.0.10:80", "--payload-size", "10"],
    );
    assert_eq!(v["http_status"], 200, "{v}");
    assert_eq!(v["grpc_status"], 0, "{v}");
    assert_eq!(v["served_by"], "backend", "{v}");
    assert_eq!(v["payload_len"], 10, "{v}");
    // A VIP port without a rule is refused by the node, not blackholed.
    let v = pod_client(
        &topo,
        "a",
        &["http", "http://10.96.0.10:81/", "--timeout-secs", "3"],
    );
    let err = v["error"].as_str().unwrap_or("");
    assert!(err.contains("refused"), "{v}");
    teardown(topo, vec![mock]);
}

#[test]
fn vip_round_robin() {
    require_root();
    let mut topo = Topology::new();
    topo.add_pod("a", A);
    topo.add_pod("be1", BACKEND);
    topo.add_pod("be2", BACKEND2);
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80);
    topo.add_service_vip(
        vip,
        &[
            SocketAddrV4::new(BACKEND, 8080),
            SocketAddrV4::new(BACKEND2, 8080),
        ],
    );
    let mocks = vec![
        start_mock(&topo, "be1", "be1"),
        start_mock(&topo, "be2", "be2"),
    ];
    let mut served = Vec::new();
    for _ in 0..4 {
        let v = pod_client(&topo, "a", &["http", "http://10.96.0.20/"]);
        assert_eq!(v["status"], 200, "{v}");
        served.push(header(&v, "x-served-by").to_owned());
    }
    // `numgen inc` alternates per new connection.
    served.sort();
    assert_eq!(served, ["be1", "be1", "be2", "be2"]);
    teardown(topo, mocks);
}

#[test]
fn no_uplink() {
    require_root();
    let mut topo = Topology::new();
    topo.add_pod("a", A);
    // The node namespace: no default route, only lo and the pod veth.
    let node = topo.node_netns().to_owned();
    assert_eq!(
        ip_cmd(&["-n", &node, "route", "show", "default"]).trim(),
        ""
    );
    let links = ip_cmd(&["-n", &node, "-o", "link", "show"]);
    for line in links.lines() {
        let name = line.split(':').nth(1).unwrap_or("").trim();
        assert!(
            name == "lo" || name.starts_with("v0-a@"),
            "unexpected interface in the node namespace: {line}"
        );
    }
    // TEST-NET-1 is not in the topology: nothing answers the pod's ARP
    // request, the connect fails with "no route to host".
    let start = Instant::now();
    let v = pod_client(
        &topo,
        "a",
        &["http", "http://192.0.2.1/", "--timeout-secs", "6"],
    );
    let err = v["error"].as_str().unwrap_or("");
    assert!(!err.is_empty() && v.get("status").is_none(), "{v}");
    assert!(
        !err.contains("timeout"),
        "expected unreachable, not a timeout: {v}"
    );
    assert!(start.elapsed() < Duration::from_secs(6), "{v}");
}

#[test]
fn echo_check_between_pods() {
    require_root();
    let mut topo = Topology::new();
    topo.add_pod("client", A);
    topo.add_pod("server", B);
    let mock = start_mock(&topo, "server", "server");
    for h2 in [false, true] {
        let mut args = vec![
            "echo-check",
            "http://10.0.0.3:8080/echo",
            "--conns",
            "20",
            "--size",
            "65536",
            "--timeout-secs",
            "6",
        ];
        if h2 {
            args.push("--h2");
        }
        let v = pod_client(&topo, "client", &args);
        assert_eq!(v["ok"], 20, "h2={h2}: {v}");
        assert_eq!(v["failed"], 0, "h2={h2}: {v}");
    }
    teardown(topo, vec![mock]);
}

#[test]
fn spawn_places_process_in_pod_cgroup_and_netns() {
    require_root();
    let mut topo = Topology::new();
    topo.add_pod("a", A);
    let proxy_cg = topo.add_cgroup("proxy");
    let rel = |p: &Path| {
        p.strip_prefix(cgroup2_mount())
            .expect("cgroup below the cgroup2 mount")
            .display()
            .to_string()
    };

    let out = topo.run("a", "cat", &["/proc/self/cgroup"], RUN);
    let cg = String::from_utf8_lossy(&out.stdout);
    assert!(
        cg.lines()
            .any(|l| l == format!("0::/{}", rel(&topo.pod("a").cgroup))),
        "{cg}"
    );
    let out = topo.run("a", "ip", &["-o", "-4", "addr", "show"], RUN);
    let addrs = String::from_utf8_lossy(&out.stdout);
    assert!(
        addrs.contains("eth0") && addrs.contains("10.0.0.2/32"),
        "{addrs}"
    );
    assert!(!addrs.contains("10.0.0.3"), "{addrs}");

    // The proxy cgroup: host network namespace.
    let child = topo.spawn_in_cgroup(&proxy_cg, "cat", &["/proc/self/cgroup"]);
    let out = child.wait_with_output().expect("wait");
    let cg = String::from_utf8_lossy(&out.stdout);
    assert!(
        cg.lines().any(|l| l == format!("0::/{}", rel(&proxy_cg))),
        "{cg}"
    );
}

#[test]
fn teardown_leaves_nothing() {
    require_root();
    let mut topo = Topology::new();
    let id = topo.id().to_owned();
    topo.add_pod("a", A);
    topo.add_pod("backend", BACKEND);
    topo.add_service_vip(VIP, &[SocketAddrV4::new(BACKEND, 8080)]);
    let proxy_cg = topo.add_cgroup("proxy");
    let mut mock = start_mock(&topo, "backend", "backend");
    let mut sleeper = topo.spawn_in_cgroup(&proxy_cg, "sleep", &["30"]);
    assert!(!leftovers(&id).is_empty());
    let started = Instant::now();
    drop(topo);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "teardown took {:?}",
        started.elapsed()
    );
    assert_eq!(leftovers(&id), Vec::<String>::new());
    let list = ip_cmd(&["netns", "list"]);
    assert!(!list.contains(&id), "{list}");
    // Processes were killed: waiting returns at once.
    assert!(
        mock.try_wait().expect("try_wait").is_some(),
        "mock still running"
    );
    assert!(
        sleeper.try_wait().expect("try_wait").is_some(),
        "sleeper still running"
    );
}

#[test]
fn teardown_after_panic() {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let res = std::thread::spawn(move || {
        let mut topo = Topology::new();
        topo.add_pod("a", A);
        let sleeper = topo.spawn("a", "sleep", &["30"]);
        let _ = tx.send((topo.id().to_owned(), sleeper));
        panic!("deliberate panic with a live topology");
    })
    .join();
    assert!(res.is_err());
    let (id, mut sleeper) = rx.recv().expect("topology id");
    assert_eq!(leftovers(&id), Vec::<String>::new());
    assert!(
        sleeper.try_wait().expect("try_wait").is_some(),
        "sleeper still running"
    );
}

#[test]
fn stale_cleanup() {
    require_root();
    // A pid that just exited stands for a test process that was killed.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait");
    let id = format!("nw{pid}x0");
    let ns = format!("{id}-node");
    ip_cmd(&["netns", "add", &ns]);
    let cg = cgroup2_mount().join("nodeway-test").join(&id).join("a");
    std::fs::create_dir_all(&cg).expect("create stale cgroup");
    assert_eq!(leftovers(&id).len(), 2, "{:?}", leftovers(&id));
    cleanup_stale();
    assert_eq!(leftovers(&id), Vec::<String>::new());
    cleanup_stale();
}
