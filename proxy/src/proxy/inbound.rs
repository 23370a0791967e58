//! Inbound: connections to an enrolled pod's own address, which the
//! `sk_lookup` program hands to the pod's inbound listener. They are relayed
//! to the pod (L4 today; the seam for destination-side L7 is here).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::relay::relay;
use super::{ListenerPod, Proxy, is_self_call};
use crate::net::accept_loop;
use crate::telemetry::access_log::AccessLogEntry;

/// Serves an enrolled pod's inbound listener: connections the `sk_lookup`
/// program delivered for the pod's own address. The accepted socket's local
/// address is where the client was going; the proxy forwards there from
/// 127.0.0.6 (which the capture skips) and logs cluster `inbound|PORT||`.
pub async fn serve_inbound(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    pod: Arc<ListenerPod>,
) {
    let forward_src = IpAddr::from(nodeway_ebpf_common::INBOUND_FORWARD_SRC);
    accept_loop(listener, "inbound", Some(shutdown), |stream, peer| {
        let Ok(dst) = stream.local_addr() else {
            return;
        };
        if is_self_call(dst) {
            // The capture skips these ports; a connection here was dialled
            // to the listener itself and forwarding it would loop.
            tracing::warn!(%dst, %peer, "refusing an inbound connection to the proxy's own port");
            return;
        }
        let _ = stream.set_nodelay(true);
        let snap = proxy.snapshot.load();
        let (workload, namespace) = match snap.pods_by_ip.get(&peer.ip()) {
            Some(w) => (
                Arc::from(w.workload_name.as_str()),
                Arc::from(w.namespace.as_str()),
            ),
            None => (Arc::from("unknown"), Arc::from("unknown")),
        };
        drop(snap);
        let mut entry = AccessLogEntry::new(SystemTime::now(), workload, namespace);
        entry.downstream_remote_address = Some(peer);
        entry.downstream_local_address = Some(dst);
        entry.upstream_cluster = Some(Arc::from(format!("inbound|{}||", dst.port())));
        let proxy = proxy.clone();
        let pod = pod.clone();
        tracker.spawn(async move {
            relay(stream, entry, dst, &pod.dialer, Some(forward_src), &proxy).await;
        });
    })
    .await;
}
