//! The data path: connections from client pods to Services, by traffic
//! direction, as istio/ztunnel lays its proxy out.
//!
//! - `outbound`: what a client pod sends: protocol detection, HTTP (routing,
//!   the attempt loop with timeouts and retries, upgrades), TCP to a Service,
//!   and passthrough to non-Service destinations.
//! - `inbound`: connections to an enrolled pod's own address, relayed to it.
//! - `upstream`: connections to endpoints: the per-client pools, connecting
//!   (inside the client pod's network namespace with eBPF), hyper's clients.
//! - `clients`: per client pod state: its clusters, their endpoints, breakers,
//!   outlier detection and stats, rebuilt per configuration generation.
//! - `route`: which Service, route, subset, timeout and retry policy a
//!   request gets (Istio's VirtualService and DestinationRule rules).
//! - `body`: request bodies that can be replayed for retries, response
//!   bodies that finish the access-log line and release what the request held.

pub mod body;
pub mod clients;
pub mod inbound;
pub mod outbound;
pub(crate) mod relay;
pub mod route;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::redirect::OriginalDst;
use crate::redirect::netns::Dialer;
use crate::resilience::breaker::NodeBudget;
use crate::resilience::overload::{Overload, OverloadLimits};
use crate::state::{Snapshot, Workload};
use crate::telemetry::access_log::AccessLogger;
use clients::{ClientPod, ClientRegistry, Pruned};
use route::ServiceTarget;

pub use inbound::serve_inbound;
pub use outbound::serve_outbound;

/// Limits of the downstream side. Defaults follow Envoy where it has one.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// A client must finish sending request headers within this time, from
    /// the request's first byte (default 10 s).
    pub request_header_timeout: Duration,
    /// A downstream HTTP/1.1 connection with no request in progress is
    /// closed after this time (default 1 h, Envoy's `idle_timeout`).
    pub idle_timeout: Duration,
    /// Largest request header block; larger gets 431 (default 60 KiB, Envoy's).
    pub max_request_headers_bytes: usize,
    /// Most request headers; more gets 431 (default 100, Envoy's).
    pub max_request_headers: usize,
    /// HTTP/2 streams a client may open at once on one connection (default 1024).
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client before the proxy handled them,
    /// tolerated at once before the connection is closed (rapid reset; default 20).
    pub http2_max_pending_accept_reset_streams: usize,
    /// How long protocol detection waits for the first bytes (default 10 s, then TCP).
    pub sniff_timeout: Duration,
    /// Node-wide cap on upstream connections across all clients (default 16384).
    pub max_upstream_connections: u32,
    /// Node-wide cap on requests waiting for a connection (default 16384).
    pub max_pending_requests: u32,
    /// Largest share (percent) of each node-wide cap one client pod may hold (default 50).
    pub max_client_share_percent: u32,
    /// Sources matching no pod that get client state of their own (by
    /// address); more share one (default 1024).
    pub max_unknown_clients: usize,
    /// Node-wide cap on downstream connections (default 50 000; a client
    /// pod may hold `max_client_share_percent` of it).
    pub max_downstream_connections: u32,
    /// Node-wide cap on downstream requests in flight (default 50 000;
    /// shared out the same way).
    pub max_downstream_requests: u32,
    /// Memory the overload manager measures pressure against (default
    /// none: no memory-based actions; the DaemonSet passes its limit).
    pub overload_memory_limit: Option<u64>,
    /// A request with no body bytes in either direction for this long ends
    /// (`408` before the response, a reset after; flag `SI`). Envoy's
    /// `stream_idle_timeout`: default 5 min, zero disables.
    pub stream_idle_timeout: Duration,
}

impl ProxySettings {
    /// The stream idle timeout, `None` when disabled.
    pub fn stream_idle(&self) -> Option<Duration> {
        (!self.stream_idle_timeout.is_zero()).then_some(self.stream_idle_timeout)
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            request_header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            max_request_headers_bytes: 60 * 1024,
            max_request_headers: 100,
            http2_max_concurrent_streams: 1024,
            http2_max_pending_accept_reset_streams: 20,
            sniff_timeout: Duration::from_secs(10),
            max_upstream_connections: 16 * 1024,
            max_pending_requests: 16 * 1024,
            max_client_share_percent: 50,
            max_unknown_clients: 1024,
            max_downstream_connections: 50_000,
            max_downstream_requests: 50_000,
            overload_memory_limit: None,
            stream_idle_timeout: Duration::from_secs(300),
        }
    }
}

/// The proxy every connection shares: the configuration in force, the
/// client pods with their upstream state, the access log and the limits.
pub struct Proxy {
    pub snapshot: ArcSwap<Snapshot>,
    pub logger: AccessLogger,
    pub clients: ClientRegistry,
    /// Downstream caps and the overload manager's state.
    pub overload: Arc<Overload>,
    pub settings: ProxySettings,
    pub original_dst: Arc<dyn OriginalDst>,
    /// Cancelled when a draining Nodeway's deadline passes: TCP and upgraded
    /// connections, kept until then, are closed with FIN.
    pub drain_deadline: CancellationToken,
}

impl Proxy {
    pub fn new(
        snapshot: Snapshot,
        logger: AccessLogger,
        settings: ProxySettings,
        original_dst: Arc<dyn OriginalDst>,
    ) -> Self {
        Proxy {
            snapshot: ArcSwap::from_pointee(snapshot),
            logger,
            clients: ClientRegistry::new(
                NodeBudget::new(
                    settings.max_upstream_connections,
                    settings.max_pending_requests,
                    settings.max_client_share_percent,
                ),
                settings.max_unknown_clients,
            ),
            overload: Arc::new(Overload::new(OverloadLimits {
                max_connections: settings.max_downstream_connections,
                max_requests: settings.max_downstream_requests,
                client_share_percent: settings.max_client_share_percent,
                memory_limit: settings.overload_memory_limit,
            })),
            settings,
            original_dst,
            drain_deadline: CancellationToken::new(),
        }
    }

    /// Installs a new configuration; in-flight requests keep the old one.
    /// Client pods and clusters that left the configuration are forgotten
    /// and returned, so their counters can be kept (see `admin::metrics`).
    pub fn install(&self, snapshot: Snapshot) -> Pruned {
        let snapshot = Arc::new(snapshot);
        self.snapshot.store(snapshot.clone());
        self.clients.bump_generation();
        self.clients.prune(&snapshot)
    }
}

/// Facts about one downstream connection.
pub struct ConnContext {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub orig_dst: Option<SocketAddr>,
    pub client: Option<Arc<Workload>>,
    /// Identity for per-client state: the pod, or the peer IP when unknown.
    pub client_key: Arc<str>,
    pub source_workload: Arc<str>,
    pub source_namespace: Arc<str>,
    /// The Service the original destination names, if any.
    pub vip_target: Option<ServiceTarget>,
    /// Per-client upstream state (pools, breakers, outlier detection).
    pub client_pod: Arc<ClientPod>,
    /// Streams the client reset early (HTTP/2 abuse), as Envoy counts them.
    pub resets: Arc<PrematureResets>,
}

/// Envoy's premature-reset rule for a downstream HTTP/2 connection: once
/// [`PREMATURE_RESET_STREAMS`] streams have ended, the connection is closed
/// if at least half of them were reset by the client within
/// [`PREMATURE_RESET_LIFETIME`] of their start (a slow rapid reset that
/// hyper's pending-reset limit does not see: each stream reaches the
/// upstream before it is cancelled).
#[derive(Debug, Default)]
pub struct PrematureResets {
    ended: AtomicU64,
    premature: AtomicU64,
    /// Cancelled when the rule trips.
    pub tripped: CancellationToken,
}

/// Envoy's `premature_reset_total_stream_count` default.
pub const PREMATURE_RESET_STREAMS: u64 = 500;
/// Envoy's `premature_reset_min_stream_lifetime_seconds` default.
pub const PREMATURE_RESET_LIFETIME: Duration = Duration::from_secs(1);

impl PrematureResets {
    /// One stream ended; `lifetime` is how long it lived, `reset_by_client`
    /// whether the client cut it off before its exchange completed.
    pub fn stream_ended(&self, lifetime: Duration, reset_by_client: bool) {
        let ended = self.ended.fetch_add(1, Ordering::Relaxed) + 1;
        let premature = if reset_by_client && lifetime < PREMATURE_RESET_LIFETIME {
            self.premature.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.premature.load(Ordering::Relaxed)
        };
        if ended >= PREMATURE_RESET_STREAMS && premature * 2 >= ended {
            self.tripped.cancel();
        }
    }
}

/// The enrolled pod a listener inside a pod's network namespace belongs to:
/// every connection it accepts comes from that pod (eBPF redirect).
#[derive(Debug)]
pub struct ListenerPod {
    pub workload: Arc<Workload>,
    /// Creates upstream sockets in the pod's network namespace.
    pub dialer: Dialer,
}

/// A destination that is one of the proxy's in-pod listeners: forwarding
/// there would come straight back (the eBPF hooks skip these ports, so only a
/// client naming them itself gets here).
pub(crate) fn is_self_call(dst: SocketAddr) -> bool {
    use nodeway_ebpf_common::{INBOUND_PORT, INBOUND_PORT_ALT, OUTBOUND_PORT};
    [OUTBOUND_PORT, INBOUND_PORT, INBOUND_PORT_ALT].contains(&dst.port())
}
