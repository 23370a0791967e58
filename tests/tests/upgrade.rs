//! Hitless upgrades on the real kernel, in the eBPF test topology: Nodeway
//! rolled v1 → v2 → v3 → v4 under load from two enrolled client pods, a new
//! version that fails to start, and the only proxy killed with SIGKILL.
//!
//! Needs root (eBPF, namespaces, a bpf filesystem); fails loudly without it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use nodeway_tests::access_log::field;
use nodeway_tests::ebpf_mesh::{
    CLIENT, CLIENT_B, CLUSTER, Generation, Mesh, MeshOptions, VIP, mixed_load_args,
};
use nodeway_tests::topology::require_root;
use serde_json::Value;

mod common;

fn bin(name: &str) -> PathBuf {
    match name {
        "mixed-load" => PathBuf::from(env!("CARGO_BIN_EXE_mixed-load")),
        "pod-client" => PathBuf::from(env!("CARGO_BIN_EXE_pod-client")),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_mock-upstream")),
    }
}

/// Drain deadline of every generation: TCP streams through a draining
/// proxy are kept this long, then closed with FIN (and reopened by the client).
const DRAIN: &str = "3s";
const READY_WITHIN: Duration = Duration::from_secs(30);

fn start_load(mesh: &Mesh, pod: &str, tag: &str, seconds: u64) -> (Child, PathBuf) {
    let ids = mesh.dir.join(format!("ids-{tag}"));
    let args = mixed_load_args(tag, seconds, &ids, &[]);
    (mesh.topo.spawn(pod, bin("mixed-load"), &args), ids)
}

fn finish_load(child: Child) -> Value {
    let out = child.wait_with_output().expect("mixed-load output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "mixed-load ({}): {e}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn ready(mesh: &mut Mesh, name: &str) -> Generation {
    let mut generation =
        mesh.spawn_generation(&common::nodeway_bin(), name, &["--drain-timeout", DRAIN]);
    if let Err(e) = generation.wait_ready(READY_WITHIN) {
        panic!("{e}");
    }
    generation
}

/// SIGTERM, then the process must exit by itself after its drain.
fn stop(mut generation: Generation) -> Generation {
    generation.signal("TERM");
    let status = generation.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "{} did not exit cleanly ({status:?}):\n{}",
        generation.name,
        generation.stderr()
    );
    generation
}

/// Every id the clients got an answer for, and how often each appears in
/// the access logs of all generations.
fn check_no_bypass(ids_files: &[PathBuf], generations: &[&Generation]) {
    let mut sent: Vec<String> = Vec::new();
    for file in ids_files {
        let text = std::fs::read_to_string(file).expect("ids file");
        sent.extend(text.lines().map(str::to_owned));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut logged: HashMap<String, usize> = HashMap::new();
    loop {
        logged.clear();
        for g in generations {
            for entry in g.log.lines() {
                // TCP lines have no request id ("-").
                if let Some(id) = field(&entry, "request_id").filter(|id| *id != "-") {
                    *logged.entry(id.to_owned()).or_default() += 1;
                }
            }
        }
        let missing = sent.iter().filter(|id| !logged.contains_key(*id)).count();
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let missing: Vec<&String> = sent.iter().filter(|id| !logged.contains_key(*id)).collect();
    let twice: Vec<(&String, &usize)> = logged.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty(),
        "{} of {} requests bypassed every proxy (in no access log), e.g. {:?}",
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        twice.is_empty(),
        "logged twice: {:?}",
        &twice[..twice.len().min(5)]
    );
}

/// bpftool's JSON.
fn bpftool(args: &[&str]) -> Value {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// Programs and links of the proxies sharing `pin_dir`: exactly those of
/// the one still running, and only the shared maps are pinned.
fn check_no_leftovers(pin_dir: &Path, current: &Generation) {
    let map_ids: Vec<u64> = ["ENROLLED", "INBOUND_LISTENERS"]
        .iter()
        .map(|name| {
            let map = bpftool(&[
                "map",
                "show",
                "pinned",
                &pin_dir.join(name).display().to_string(),
            ]);
            map["id"].as_u64().expect("map id")
        })
        .collect();
    let users: Vec<u64> = bpftool(&["prog", "show"])
        .as_array()
        .expect("programs")
        .iter()
        .filter(|p| {
            p["map_ids"].as_array().is_some_and(|ids| {
                ids.iter()
                    .any(|id| id.as_u64().is_some_and(|id| map_ids.contains(&id)))
            })
        })
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let redirect = nodeway_tests::ebpf_mesh::http_get(current.admin, "/redirect")
        .and_then(|body| serde_json::from_str::<Value>(&body).ok())
        .expect("/redirect of the running proxy");
    let mut own: Vec<u64> = redirect["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let mut users_sorted = users.clone();
    users_sorted.sort_unstable();
    own.sort_unstable();
    assert_eq!(
        users_sorted, own,
        "programs using the shared maps must be the running proxy's only"
    );
    let links = bpftool(&["link", "show"]);
    let ours: Vec<&Value> = links
        .as_array()
        .expect("links")
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| own.contains(&id)))
        .collect();
    // connect4, connect6, sockops on the cgroup; sk_lookup per enrolled pod.
    let enrolled_pods = redirect["enrolled"].as_array().map_or(0, Vec::len);
    assert_eq!(ours.len(), 3 + enrolled_pods, "links: {ours:?}");
    let mut pins: Vec<String> = std::fs::read_dir(pin_dir)
        .expect("pin dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    pins.sort();
    assert_eq!(
        pins,
        [
            "ENROLLED",
            "INBOUND_LISTENERS",
            "ORIG_BY_COOKIE",
            "ORIG_BY_TUPLE",
            "SOCKETS"
        ]
    );
}

fn assert_no_failures(pod: &str, report: &Value) {
    for kind in ["h1", "h2", "grpc", "conn", "tcp"] {
        let r = &report[kind];
        assert_eq!(r["failed"], 0, "{pod} {kind}: {r}");
    }
    for kind in ["h1", "h2", "grpc", "conn"] {
        assert!(
            report[kind]["ok"].as_u64().unwrap_or(0) > 100,
            "{pod} {kind}: {}",
            report[kind]
        );
    }
    assert!(
        report["tcp"]["messages"].as_u64().unwrap_or(0) > 1000,
        "{pod} tcp: {}",
        report["tcp"]
    );
}

/// Three upgrades back to back and three versions that fail to start, under
/// HTTP/1.1, HTTP/2, gRPC, connection-per-request and TCP load from two
/// pods: no request fails, none bypasses the proxies, nothing is left over.
#[test]
fn upgrades_under_load_fail_no_request_and_bypass_none() {
    require_root();
    let mut mesh = Mesh::build(
        &bin("mock-upstream"),
        MeshOptions {
            echo_service: true,
            ..MeshOptions::default()
        },
    );
    let first = ready(&mut mesh, "v1");
    let seconds = 40;
    let (load_a, ids_a) = start_load(&mesh, CLIENT, "a", seconds);
    let (load_b, ids_b) = start_load(&mesh, CLIENT_B, "b", seconds);
    let load_start = Instant::now();
    std::thread::sleep(Duration::from_secs(3));

    let mut done: Vec<Generation> = Vec::new();
    let mut current = first;
    let mut handovers = Vec::new();
    for (i, name) in ["v2", "v3", "v4"].into_iter().enumerate() {
        if i == 1 {
            // Versions that cannot start, during the load: a bad flag, a bad
            // configuration, an eBPF load that fails (never ready).
            let bad_config = mesh.dir.join("bad.yaml");
            std::fs::write(
                &bad_config,
                "kind: VirtualService\nspec: {hosts: [\"*\"]}\n",
            )
            .expect("bad config");
            for (label, extra) in [
                ("bad-flag", vec!["--max-client-share", "0"]),
                (
                    "bad-config",
                    vec!["--config", bad_config.to_str().expect("utf-8 path")],
                ),
                ("no-ebpf", vec!["--cgroup", "/nonexistent-cgroup"]),
            ] {
                let mut failing = mesh.spawn_generation(&common::nodeway_bin(), label, &extra);
                let outcome = failing.wait_ready(Duration::from_secs(3));
                assert!(outcome.is_err(), "{label} became ready");
                failing.signal("TERM");
                failing.wait_exit(Duration::from_secs(10));
                done.push(failing);
            }
        }
        let started = Instant::now();
        let next = ready(&mut mesh, name);
        let ready_after = started.elapsed();
        let stderr = next.stderr();
        assert!(
            stderr.contains("taking over the eBPF maps of the Nodeway running on this node"),
            "{name}:\n{stderr}"
        );
        let old = stop(current);
        assert!(
            old.stderr()
                .contains("another Nodeway shares the eBPF maps"),
            "{}:\n{}",
            old.name,
            old.stderr()
        );
        handovers.push((name, ready_after));
        done.push(old);
        current = next;
        std::thread::sleep(Duration::from_secs(4));
    }
    assert!(
        load_start.elapsed() < Duration::from_secs(seconds),
        "the upgrades outlasted the load"
    );
    let report_a = finish_load(load_a);
    let report_b = finish_load(load_b);
    eprintln!("handovers (ready after): {handovers:?}\nclient a: {report_a}\nclient b: {report_b}");
    assert_no_failures(CLIENT, &report_a);
    assert_no_failures(CLIENT_B, &report_b);
    // TCP streams through each old proxy were kept to its drain deadline.
    let reopened = report_a["tcp"]["reopened"].as_u64().unwrap_or(0)
        + report_b["tcp"]["reopened"].as_u64().unwrap_or(0);
    assert!(
        reopened >= 1,
        "no TCP stream was closed at a drain deadline: {reopened}"
    );

    let mut all: Vec<&Generation> = done.iter().collect();
    all.push(&current);
    check_no_bypass(&[ids_a, ids_b], &all);
    let outbound = all
        .iter()
        .flat_map(|g| g.log.lines())
        .filter(|e| field(e, "upstream_cluster") == Some(CLUSTER))
        .count();
    assert!(outbound > 1000, "outbound lines: {outbound}");
    check_no_leftovers(&mesh.pin_dir(), &current);
}

/// Fail open: SIGKILL of the only proxy detaches its programs with it, so
/// the pods' next connections go direct at once (no proxy, no log line);
/// a new proxy removes the dead one's pins and redirects again.
#[test]
fn a_killed_proxy_fails_open_and_a_restart_restores_redirection() {
    require_root();
    let mut mesh = Mesh::build(&bin("mock-upstream"), MeshOptions::default());
    let first = ready(&mut mesh, "v1");
    let url = format!("http://{VIP}/status/200");
    let via_proxy = mesh.pod_client(
        &bin("pod-client"),
        CLIENT,
        &["http", &url, "--header", "x-request-id:before"],
    );
    assert_eq!(via_proxy["status"], 200, "{via_proxy}");
    first.signal("KILL");
    let mut first = first;
    first.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    let direct = mesh.pod_client(
        &bin("pod-client"),
        CLIENT,
        &["http", &url, "--header", "x-request-id:after-kill"],
    );
    let direct_after = killed.elapsed();
    assert_eq!(
        direct["status"], 200,
        "connects go direct after SIGKILL: {direct}"
    );
    assert!(direct_after < Duration::from_secs(2), "{direct_after:?}");
    let ids: Vec<String> = first
        .log
        .lines()
        .iter()
        .filter_map(|e| field(e, "request_id").map(str::to_owned))
        .collect();
    assert_eq!(ids, ["before"], "the direct request is in no log");

    let second = ready(&mut mesh, "v2");
    assert!(
        second
            .stderr()
            .contains("removed eBPF map pins left by a Nodeway that is no longer running"),
        "{}",
        second.stderr()
    );
    let again = mesh.pod_client(
        &bin("pod-client"),
        CLIENT,
        &["http", &url, "--header", "x-request-id:restarted"],
    );
    assert_eq!(again["status"], 200, "{again}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ids: Vec<String> = second
            .log
            .lines()
            .iter()
            .filter_map(|e| field(e, "request_id").map(str::to_owned))
            .collect();
        if ids == ["restarted"] {
            break;
        }
        assert!(Instant::now() < deadline, "v2 log: {ids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    check_no_leftovers(&mesh.pin_dir(), &second);
    drop(first);
}

/// A version whose shared maps differ from the running one's refuses to take
/// over (naming the map and both layouts); pins nobody uses are removed.
/// Maps made with bpftool stand in for another version's.
#[test]
fn a_different_map_layout_is_refused_and_stale_pins_are_removed() {
    use nodeway::redirect::pins::{PinError, PinState, prepare};
    require_root();
    let dir = std::env::temp_dir().join(format!("nodeway-pins-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "cannot mount bpffs at {}", dir.display());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unmount = Unmount(dir.clone());
    let pins = dir.join("nodeway");
    let ours = nodeway::redirect::ebpf::object_layouts().expect("layouts of the embedded object");
    std::fs::create_dir_all(&pins).unwrap();
    // ENROLLED as another version might have it: a 16-byte value instead of 8.
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(pins.join("ENROLLED"))
        .args([
            "type", "hash", "key", "8", "value", "16", "entries", "4096", "name", "ENROLLED",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(made, "bpftool map create");

    let refused = prepare(&pins, &ours, |_| true).expect_err("a live process with another layout");
    assert!(
        matches!(
            refused,
            PinError::LayoutMismatch {
                name: "ENROLLED",
                ..
            }
        ),
        "{refused}"
    );
    let message = refused.to_string();
    assert!(
        message.contains("value 16 B")
            && message.contains("value 8 B")
            && message.contains("refuses to take over"),
        "{message}"
    );
    assert!(
        pins.join("ENROLLED").exists(),
        "the running one's pins are untouched"
    );

    // Nobody uses it: left by a dead process, removed.
    assert_eq!(
        prepare(&pins, &ours, |_| false).unwrap(),
        PinState::Fresh {
            removed_stale: true
        }
    );
    assert!(!pins.join("ENROLLED").exists());
}

/// While two generations run, new inbound connections (here: a bystander's,
/// to a backend pod, captured by `sk_lookup`) reach only the newest one. The
/// inbound listeners once shared a reuseport group and the kernel spread
/// them over the old one too, whose drain deadline then cut them.
#[test]
fn new_inbound_connections_reach_only_the_newest_proxy() {
    use nodeway_tests::ebpf_mesh::{BACKENDS, BYSTANDER};
    require_root();
    let mut mesh = Mesh::build(&bin("mock-upstream"), MeshOptions::default());
    let old = ready(&mut mesh, "v1");
    let new = ready(&mut mesh, "v2");
    let url = format!("http://{}:8080/status/200", BACKENDS[0].1);
    let n = 20;
    for _ in 0..n {
        let reply = mesh.pod_client(&bin("pod-client"), BYSTANDER, &["http", &url]);
        assert_eq!(reply["status"], 200, "{reply}");
    }
    let inbound = |g: &Generation| {
        g.log
            .lines()
            .iter()
            .filter(|e| field(e, "upstream_cluster") == Some("inbound|8080||"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while inbound(&new) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        (inbound(&old), inbound(&new)),
        (0, n),
        "inbound lines in v1's and v2's logs"
    );
}
