//! Per-(client, cluster) upstream state: the seam where connection limits,
//! breakers and outlier detection attach. Entries are rebuilt when the
//! configuration changes, keeping their pooled connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ConnContext;
use super::route::{self, RouteDecision};
use crate::resilience::pool::{DEFAULT_CONNECT_TIMEOUT, EndpointPool};
use crate::state::{Endpoint, Snapshot};

/// Upstream state of one client pod towards one cluster.
pub struct ClientCluster {
    pub generation: u64,
    /// Ready endpoints of the cluster (subset applied).
    pub endpoints: Vec<Arc<Endpoint>>,
    pub connect_timeout: Duration,
    /// Round-robin cursor.
    pub rr: AtomicUsize,
    pools: Mutex<HashMap<SocketAddr, Arc<EndpointPool>>>,
}

impl ClientCluster {
    pub fn pool(&self, addr: SocketAddr) -> Arc<EndpointPool> {
        self.pools
            .lock()
            .expect("pools lock")
            .entry(addr)
            .or_insert_with(|| Arc::new(EndpointPool::new(addr)))
            .clone()
    }
}

/// (client pod, cluster name).
type ClientClusterKey = (Arc<str>, Arc<str>);

#[derive(Default)]
pub struct ClusterRegistry {
    generation: std::sync::atomic::AtomicU64,
    by_client: Mutex<HashMap<ClientClusterKey, Arc<ClientCluster>>>,
}

impl ClusterRegistry {
    /// Called when a new configuration is installed.
    pub fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn resolve(
        &self,
        snap: &Snapshot,
        conn: &ConnContext,
        client_ns: &str,
        decision: &RouteDecision,
        cluster_name: Arc<str>,
    ) -> Arc<ClientCluster> {
        let generation = self.generation.load(Ordering::Relaxed);
        let key = (conn.client_key.clone(), cluster_name);
        let mut map = self.by_client.lock().expect("registry lock");
        if let Some(existing) = map.get(&key)
            && existing.generation == generation
        {
            return existing.clone();
        }
        let service = &decision.target.service;
        let port = &service.ports[decision.target.port_idx];
        let dr = route::destination_rule_for(snap, conn.client.as_deref(), client_ns, service);
        let subset_labels = decision
            .subset
            .as_deref()
            .and_then(|name| dr.and_then(|dr| dr.subsets.iter().find(|s| s.name == name)))
            .map(|s| &s.labels);
        let endpoints: Vec<Arc<Endpoint>> = port
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter(|e| match (decision.subset.as_ref(), subset_labels) {
                (None, _) => true,
                // A subset no DestinationRule defines selects nothing (Envoy: no cluster members).
                (Some(_), None) => false,
                (Some(_), Some(sel)) => e
                    .labels()
                    .is_some_and(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v))),
            })
            .cloned()
            .collect();
        let policy =
            dr.map(|dr| route::effective_policy(dr, decision.subset.as_deref(), port.port));
        let connect_timeout = policy
            .as_ref()
            .and_then(|p| p.connection_pool.as_ref())
            .and_then(|cp| cp.tcp.as_ref())
            .and_then(|tcp| tcp.connect_timeout)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let pools = map
            .get(&key)
            .map(|old| old.pools.lock().expect("pools lock").clone())
            .unwrap_or_default();
        let fresh = Arc::new(ClientCluster {
            generation,
            endpoints,
            connect_timeout,
            rr: AtomicUsize::new(fastrand::usize(..)),
            pools: Mutex::new(pools),
        });
        map.insert(key, fresh.clone());
        fresh
    }
}
