//! Istio's `PassthroughCluster`: a redirected connection to an address that
//! is no Service goes where it was going, relayed and logged, with no policy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::TcpStream;

use crate::proxy::relay::relay;
use crate::proxy::{ConnContext, ListenerPod, Proxy, is_self_call};
use crate::telemetry::access_log::AccessLogEntry;

/// Relays `stream` to its original destination `dst` from inside the client
/// pod (`pod`'s network namespace).
pub(super) async fn relay_to(
    stream: TcpStream,
    ctx: &ConnContext,
    dst: SocketAddr,
    pod: &ListenerPod,
    proxy: &Proxy,
) {
    if is_self_call(dst) {
        tracing::warn!(%dst, pod = %pod.workload.pod_name, "refusing a connection to the proxy's own in-pod port (it would loop)");
        return;
    }
    let mut entry = AccessLogEntry::new(
        SystemTime::now(),
        ctx.source_workload.clone(),
        ctx.source_namespace.clone(),
    );
    entry.downstream_remote_address = Some(ctx.peer);
    entry.downstream_local_address = Some(dst);
    entry.upstream_cluster = Some(Arc::from("PassthroughCluster"));
    relay(stream, entry, dst, &ctx.client_pod.dialer, None, proxy).await;
}
