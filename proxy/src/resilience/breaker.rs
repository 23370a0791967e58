//! Circuit breaking: Envoy's cluster resource limits, kept per (client pod,
//! cluster), under a node-wide cap that no single client may exhaust.
//!
//! Every limit is an atomic counter; a permit is an owned RAII guard (it can
//! travel into a connection task or a response body) that gives its slot back;
//! a connection slot also wakes requests waiting in the pending queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::Notify;

use crate::state::ConnectionPool;

/// Istio leaves unset limits at 2^32-1.
pub const UNLIMITED: u32 = u32::MAX;

/// Cluster limits from a DestinationRule's `connectionPool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `tcp.maxConnections`.
    pub max_connections: u32,
    /// `http.http1MaxPendingRequests` (also bounds HTTP/2, as in Istio).
    pub max_pending_requests: u32,
    /// `http.http2MaxRequests` (also bounds HTTP/1.1, as in Istio).
    pub max_requests: u32,
    /// `http.maxRetries`: concurrent retries.
    pub max_retries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: UNLIMITED,
            max_pending_requests: UNLIMITED,
            max_requests: UNLIMITED,
            max_retries: UNLIMITED,
        }
    }
}

impl Limits {
    pub fn from_istio(pool: Option<&ConnectionPool>) -> Self {
        let tcp = pool.and_then(|p| p.tcp.as_ref());
        let http = pool.and_then(|p| p.http.as_ref());
        let positive = |v: Option<u32>| v.filter(|n| *n > 0).unwrap_or(UNLIMITED);
        Limits {
            max_connections: positive(tcp.and_then(|t| t.max_connections)),
            max_pending_requests: positive(http.and_then(|h| h.http1_max_pending_requests)),
            max_requests: positive(http.and_then(|h| h.http2_max_requests)),
            max_retries: positive(http.and_then(|h| h.max_retries)),
        }
    }
}

/// A counter with a ceiling.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU32);

impl Gauge {
    /// Takes one slot if the count stays within `max`.
    pub(super) fn try_take(&self, max: u32) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub(super) fn give(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Node-wide caps across all clients (`--max-upstream-connections`,
/// `--max-pending-requests`), and the largest share of them one client pod
/// may hold (`--max-client-share`, percent), so a flooding client cannot
/// starve its neighbours.
#[derive(Debug)]
pub struct NodeBudget {
    pub max_connections: u32,
    pub max_pending: u32,
    pub client_share_percent: u32,
    pub connections: Gauge,
    pub pending: Gauge,
}

impl NodeBudget {
    pub fn new(max_connections: u32, max_pending: u32, client_share_percent: u32) -> Self {
        NodeBudget {
            max_connections,
            max_pending,
            client_share_percent,
            connections: Gauge::default(),
            pending: Gauge::default(),
        }
    }

    fn client_cap(&self, node_max: u32) -> u32 {
        ((u64::from(node_max) * u64::from(self.client_share_percent) / 100) as u32).max(1)
    }
}

impl Default for NodeBudget {
    fn default() -> Self {
        NodeBudget::new(16 * 1024, 16 * 1024, 50)
    }
}

/// One client pod's use of the node budget.
#[derive(Debug, Default)]
pub struct ClientBudget {
    pub connections: Gauge,
    pub pending: Gauge,
}

/// Live counters of one (client pod, cluster) plus the wake-up for its pending queue.
#[derive(Debug, Default)]
pub struct Breaker {
    pub connections: Gauge,
    pub pending: Gauge,
    pub requests: Gauge,
    pub retries: Gauge,
    /// Signalled whenever connection capacity may have become free.
    pub capacity: Notify,
}

/// What a permit gives back on drop.
#[derive(Debug)]
enum Slot {
    Connection,
    Pending,
    Request,
    Retry,
}

/// Shared handles a permit needs to return its slots.
#[derive(Debug, Clone)]
pub struct Budgets {
    pub cluster: Arc<Breaker>,
    pub client: Arc<ClientBudget>,
    pub node: Arc<NodeBudget>,
}

/// An owned slot; dropping it frees the slot (a connection slot also wakes
/// requests waiting for a connection).
#[derive(Debug)]
pub struct Permit {
    budgets: Budgets,
    slot: Slot,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let b = &self.budgets;
        match self.slot {
            Slot::Connection => {
                b.cluster.connections.give();
                b.client.connections.give();
                b.node.connections.give();
            }
            Slot::Pending => {
                b.cluster.pending.give();
                b.client.pending.give();
                b.node.pending.give();
            }
            Slot::Request => b.cluster.requests.give(),
            Slot::Retry => b.cluster.retries.give(),
        }
        if matches!(self.slot, Slot::Connection) {
            b.cluster.capacity.notify_waiters();
        }
    }
}

impl Budgets {
    /// A new upstream connection: cluster `maxConnections`, the client's share, the node cap.
    pub fn try_connection(&self, limits: &Limits) -> Option<Permit> {
        self.connection_under(limits.max_connections)
    }

    /// Envoy's exception to `maxConnections`: an endpoint with no connection
    /// at all gets one even when the cluster's limit is reached, so requests
    /// queued for it cannot wait forever. The node-wide caps still apply.
    pub fn try_first_connection(&self) -> Option<Permit> {
        self.connection_under(u32::MAX)
    }

    fn connection_under(&self, cluster_limit: u32) -> Option<Permit> {
        self.take_three(
            (&self.cluster.connections, cluster_limit),
            (
                &self.client.connections,
                self.node.client_cap(self.node.max_connections),
            ),
            (&self.node.connections, self.node.max_connections),
        )
        .then(|| Permit {
            budgets: self.clone(),
            slot: Slot::Connection,
        })
    }

    /// A place in the pending queue.
    pub fn try_pending(&self, limits: &Limits) -> Option<Permit> {
        self.take_three(
            (&self.cluster.pending, limits.max_pending_requests),
            (
                &self.client.pending,
                self.node.client_cap(self.node.max_pending),
            ),
            (&self.node.pending, self.node.max_pending),
        )
        .then(|| Permit {
            budgets: self.clone(),
            slot: Slot::Pending,
        })
    }

    /// An active request (`http2MaxRequests`).
    pub fn try_request(&self, limits: &Limits) -> Option<Permit> {
        self.cluster
            .requests
            .try_take(limits.max_requests)
            .then(|| Permit {
                budgets: self.clone(),
                slot: Slot::Request,
            })
    }

    /// A retry in flight (`maxRetries`).
    pub fn try_retry(&self, limits: &Limits) -> Option<Permit> {
        self.cluster
            .retries
            .try_take(limits.max_retries)
            .then(|| Permit {
                budgets: self.clone(),
                slot: Slot::Retry,
            })
    }

    fn take_three(&self, a: (&Gauge, u32), b: (&Gauge, u32), c: (&Gauge, u32)) -> bool {
        if !a.0.try_take(a.1) {
            return false;
        }
        if !b.0.try_take(b.1) {
            a.0.give();
            return false;
        }
        if !c.0.try_take(c.1) {
            b.0.give();
            a.0.give();
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(node: NodeBudget) -> Budgets {
        Budgets {
            cluster: Arc::default(),
            client: Arc::default(),
            node: Arc::new(node),
        }
    }

    #[test]
    fn cluster_limit_and_release() {
        let b = budgets(NodeBudget::default());
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let first = b.try_connection(&limits).expect("first connection");
        assert!(b.try_connection(&limits).is_none());
        drop(first);
        assert!(b.try_connection(&limits).is_some());
    }

    #[test]
    fn one_client_gets_at_most_its_share_of_the_node() {
        let node = Arc::new(NodeBudget::new(4, 4, 50));
        let a = Budgets {
            cluster: Arc::default(),
            client: Arc::default(),
            node: node.clone(),
        };
        let b = Budgets {
            cluster: Arc::default(),
            client: Arc::default(),
            node,
        };
        let limits = Limits::default();
        let held: Vec<_> = (0..2).map(|_| a.try_connection(&limits).unwrap()).collect();
        assert!(
            a.try_connection(&limits).is_none(),
            "client a is at its 50% share"
        );
        let other: Vec<_> = (0..2).map(|_| b.try_connection(&limits).unwrap()).collect();
        assert!(
            b.try_connection(&limits).is_none(),
            "the node cap is reached"
        );
        drop(held);
        drop(other);
        assert_eq!(a.node.connections.get(), 0);
    }

    #[test]
    fn istio_limits_default_to_unlimited() {
        assert_eq!(Limits::from_istio(None), Limits::default());
    }
}
