//! The eBPF data path on the real kernel, in network namespaces built per
//! test (`nodeway_tests::topology`): redirect of enrolled pods, bystanders
//! untouched, live enrolment, no loops, protocols and resilience through the
//! redirect, socket-map acceleration, inbound capture, clean exit.
//!
//! These tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and fail
//! loudly without it; CI runs them as root.

use std::path::PathBuf;
use std::time::Duration;

use nodeway_tests::access_log::{Entry, field};
use nodeway_tests::ebpf_mesh::{
    BACKENDS, BYSTANDER, CLIENT, CLIENT_IP, CLUSTER, Mesh, MeshOptions, VIP,
};
use nodeway_tests::topology::require_root;
use serde_json::Value;

mod common;

fn pod_client() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pod-client"))
}

fn mock_upstream() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mock-upstream"))
}

fn start(opts: MeshOptions) -> Mesh {
    require_root();
    Mesh::start(&common::nodeway_bin(), &mock_upstream(), opts)
}

fn vip_url(path: &str) -> String {
    format!("http://{VIP}{path}")
}

fn outbound_lines(lines: &[Entry]) -> Vec<&Entry> {
    lines
        .iter()
        .filter(|e| field(e, "upstream_cluster") == Some(CLUSTER))
        .collect()
}

fn inbound_lines(lines: &[Entry]) -> Vec<&Entry> {
    lines
        .iter()
        .filter(|e| field(e, "upstream_cluster") == Some("inbound|8080||"))
        .collect()
}

fn status_of(v: &Value) -> u64 {
    v["status"]
        .as_u64()
        .unwrap_or_else(|| panic!("no status in {v}"))
}

#[test]
fn enrolled_pod_is_redirected_and_bystander_goes_direct() {
    let mesh = start(MeshOptions::default());
    let reply = mesh.pod_client(&pod_client(), CLIENT, &["http", &vip_url("/status/200")]);
    assert_eq!(status_of(&reply), 200, "{reply}\n{}", mesh.proxy_stderr());

    // Outbound on the client's side, inbound on the backend's: one each.
    let lines = mesh.wait_log_lines(2, Duration::from_secs(5));
    let out = outbound_lines(&lines);
    let inb = inbound_lines(&lines);
    assert_eq!(out.len(), 1, "{lines:#?}");
    assert_eq!(inb.len(), 1, "{lines:#?}");
    let out = out[0];
    assert_eq!(field(out, "source_workload"), Some("sleep"));
    assert_eq!(field(out, "source_namespace"), Some("shop"));
    assert_eq!(out["response_code"], 200);
    // The original destination the app dialled, recovered from the eBPF map.
    assert_eq!(
        field(out, "downstream_local_address"),
        Some(&*VIP.to_string())
    );
    // The proxy dialled from inside the pod: the pod's own source address.
    let upstream_local = field(out, "upstream_local_address").expect("upstream_local_address");
    assert!(
        upstream_local.starts_with(&format!("{CLIENT_IP}:")),
        "{out:?}"
    );
    let upstream_host = field(out, "upstream_host").expect("upstream_host");
    assert!(
        BACKENDS
            .iter()
            .any(|(_, ip, _, _)| upstream_host == format!("{ip}:8080")),
        "{out:?}"
    );
    // The backend pod's inbound capture saw the client pod's address, and
    // forwarded to the app on the address the client was going to.
    let inb = inb[0];
    assert_eq!(field(inb, "source_workload"), Some("sleep"));
    assert!(
        field(inb, "downstream_remote_address")
            .is_some_and(|a| a.starts_with(&format!("{CLIENT_IP}:"))),
        "{inb:?}"
    );
    assert_eq!(field(inb, "downstream_local_address"), Some(upstream_host));
    assert!(
        field(inb, "upstream_local_address").is_some_and(|a| a.starts_with("127.0.0.6:")),
        "{inb:?}"
    );

    // The bystander's identical request reaches a backend through the node's
    // DNAT, with no outbound line (its backend-side inbound line only).
    let before = mesh.log.lines().len();
    let reply = mesh.pod_client(&pod_client(), BYSTANDER, &["http", &vip_url("/status/200")]);
    assert_eq!(status_of(&reply), 200, "{reply}");
    let lines = mesh.wait_log_lines(before + 1, Duration::from_secs(5));
    let new = &lines[before..];
    assert!(outbound_lines(new).is_empty(), "{new:#?}");
    assert_eq!(inbound_lines(new).len(), 1, "{new:#?}");
    assert_eq!(
        field(inbound_lines(new)[0], "source_workload"),
        Some("bystander")
    );
}
