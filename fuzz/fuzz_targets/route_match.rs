//! Routing a request against the fuzz mesh's VirtualService (every kind of
//! match, `ignoreUriCase`, weights). The input is lines: method, request
//! target, authority, then `name: value` headers; any bytes are allowed
//! where `http` accepts them.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nodeway::proxy::route::{RequestView, route, target_for_authority, target_for_vip};
use nodeway::state::Snapshot;
use nodeway_fuzz::{CLIENT_IP, SERVICE_VIP, snapshot};

fn mesh() -> &'static Snapshot {
    static MESH: OnceLock<Snapshot> = OnceLock::new();
    MESH.get_or_init(|| snapshot(8080))
}

fuzz_target!(|input: &[u8]| {
    let mut lines = input.split(|&b| b == b'\n');
    let method = lines.next().unwrap_or_default();
    let target = lines.next().unwrap_or_default();
    let authority = lines.next().unwrap_or_default();
    let mut builder = http::Request::builder().method(method).uri(target);
    for line in lines {
        let mut split = line.splitn(2, |&b| b == b':');
        let (Some(name), Some(value)) = (split.next(), split.next()) else {
            continue;
        };
        builder = builder.header(name, value.strip_prefix(b" ").unwrap_or(value));
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let snap = mesh();
    let authority = String::from_utf8_lossy(authority);
    let client = snap.pods_by_ip.get(&CLIENT_IP.into()).cloned();
    let Some(target) = target_for_authority(snap, &authority, "default")
        .or_else(|| target_for_vip(snap, SERVICE_VIP))
    else {
        panic!("web's clusterIP names no Service");
    };
    let view = RequestView {
        parts: &parts,
        authority: &authority,
        port: target.port(),
        client: client.as_deref(),
        client_ns: "default",
    };
    let _ = route(snap, &target, &view);
});
