//! Client pods and their per-cluster upstream state: endpoints with their
//! in-flight counts, outlier state and connection pools; the load balancer;
//! circuit breaker counters; Envoy's cluster stats.
//!
//! A client pod's clusters hang off its [`ClientPod`], found once per
//! downstream connection, so no lock shared between client pods sits on the
//! request path. Configuration changes swap a [`ClusterConfig`] in; endpoint
//! state (pools, ejections, counters) survives them.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::ConnContext;
use super::route::{self, RouteDecision};
use super::upstream::{ConnSettings, EndpointPool, Lease};
use crate::lb::{self, Balancer, BalancerConfig};
use crate::redirect::netns::Dialer;
use crate::resilience::breaker::{Breaker, Budgets, ClientBudget, Limits, NodeBudget, Permit};
use crate::resilience::outlier::{
    AttemptResult, HostOutlier, OutlierConfig, OutlierDetector, OutlierStats,
};
use crate::resilience::overload::ClientDownstream;
use crate::state::{Endpoint, LbPolicy, Snapshot, TrafficPolicy, Workload};
use crate::telemetry::stats::{ClusterStats, PeerLabels, RequestSeries, SeriesMap};

/// State of one endpoint as seen by one client pod; survives reloads.
pub struct EndpointSlot {
    pub addr: SocketAddr,
    /// Requests in flight (LEAST_REQUEST).
    pub active: AtomicU32,
    pub outlier: HostOutlier,
    pub pool: Arc<EndpointPool>,
}

/// An endpoint of the current generation: its slot and its latest description.
#[derive(Clone)]
pub struct Host {
    pub slot: Arc<EndpointSlot>,
    pub endpoint: Arc<Endpoint>,
    /// Istio's destination labels for requests this endpoint serves.
    pub peer: Arc<PeerLabels>,
}

impl lb::Host for Host {
    fn addr(&self) -> SocketAddr {
        self.slot.addr
    }
    fn locality(&self) -> &crate::state::Locality {
        &self.endpoint.locality
    }
    fn labels(&self) -> Option<&crate::state::Labels> {
        self.endpoint.labels()
    }
    fn is_healthy(&self) -> bool {
        !self.slot.outlier.is_ejected()
    }
    fn active_requests(&self) -> u32 {
        self.slot.active.load(Ordering::Relaxed)
    }
}

/// Everything fixed for one configuration generation.
pub struct ClusterConfig {
    pub generation: u64,
    pub hosts: Vec<Host>,
    pub balancer: Balancer,
    pub lb_policy: Option<LbPolicy>,
    /// Kept across generations while its settings stay the same: ejection
    /// deadlines are measured from the detector's own clock.
    pub outlier: Option<Arc<OutlierDetector>>,
    pub limits: Limits,
    pub settings: ConnSettings,
    /// The effective traffic policy and the DestinationRule it came from.
    pub policy: TrafficPolicy,
    pub rule: Option<crate::state::ObjectKey>,
    /// Istio's destination labels before an endpoint is picked (Service only).
    pub peer: Arc<PeerLabels>,
}

/// One client pod's view of one cluster.
pub struct ClientCluster {
    pub name: Arc<str>,
    pub budgets: Budgets,
    pub stats: Arc<ClusterStats>,
    slots: Mutex<HashMap<SocketAddr, Arc<EndpointSlot>>>,
    current: ArcSwap<ClusterConfig>,
    sweeper_running: AtomicBool,
}

impl ClientCluster {
    pub fn config(&self) -> arc_swap::Guard<Arc<ClusterConfig>> {
        self.current.load()
    }

    /// Feeds one attempt's result to outlier detection; an ejection takes the
    /// host out of the balancer at once.
    pub fn record(&self, config: &ClusterConfig, index: usize, result: AttemptResult) {
        let Some(detector) = &config.outlier else {
            return;
        };
        let host = &config.hosts[index];
        if let Some(reason) = detector.record(
            &host.slot.outlier,
            result,
            config.hosts.len(),
            Instant::now(),
        ) {
            tracing::info!(cluster = %self.name, endpoint = %host.slot.addr, ?reason, "outlier detection ejected an endpoint");
            config.balancer.host_health_changed(index, false);
        }
    }

    /// Outlier detection's `interval` sweep, while the cluster lives.
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<ClientCluster> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let interval = {
                    let Some(cluster) = weak.upgrade() else {
                        return;
                    };
                    let config = cluster.config();
                    config
                        .outlier
                        .as_ref()
                        .map_or(Duration::from_secs(10), |d| d.config().interval)
                };
                tokio::time::sleep(interval).await;
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                let config = cluster.config();
                if let Some(detector) = &config.outlier {
                    detector.sweep(config.hosts.iter().map(|h| &h.slot.outlier), Instant::now(), |index| {
                        tracing::info!(cluster = %cluster.name, endpoint = %config.hosts[index].slot.addr, "ejection ended");
                        config.balancer.host_health_changed(index, true);
                    });
                }
            }
        });
    }
}

/// One request in flight to an endpoint: counts for LEAST_REQUEST and `upstream_rq_active`.
pub struct InFlight {
    slot: Arc<EndpointSlot>,
    stats: Arc<ClusterStats>,
}

impl InFlight {
    pub fn start(slot: Arc<EndpointSlot>, stats: Arc<ClusterStats>) -> Self {
        slot.active.fetch_add(1, Ordering::Relaxed);
        ClusterStats::inc(&stats.upstream_rq_active);
        InFlight { slot, stats }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slot.active.fetch_sub(1, Ordering::Relaxed);
        ClusterStats::dec(&self.stats.upstream_rq_active);
    }
}

/// What an upstream response holds until its body ends: the connection
/// lease, the `http2MaxRequests` slot and the endpoint's in-flight count.
pub struct UpstreamHold {
    pub lease: Option<Lease>,
    pub config: Arc<ClusterConfig>,
    pub cluster: Arc<ClientCluster>,
    pub host: usize,
    /// A gRPC response whose status arrives in trailers: outlier detection waits for them.
    pub grpc_in_trailers: bool,
    pub request: Option<Permit>,
    pub in_flight: InFlight,
}

impl UpstreamHold {
    /// The response ended cleanly; `grpc_status` from its trailers, if any.
    pub fn complete(mut self, grpc_status: Option<u32>) {
        if self.grpc_in_trailers {
            let status = grpc_status.map_or(200, crate::resilience::outlier::grpc_to_http);
            self.cluster
                .record(&self.config, self.host, AttemptResult::Status(status));
        }
        if let Some(lease) = self.lease.take() {
            lease.release(&self.config.settings);
        }
    }

    /// The upstream broke the response midway.
    pub fn failed(self) {
        if self.grpc_in_trailers {
            self.cluster
                .record(&self.config, self.host, AttemptResult::Reset);
        }
    }
}

/// One client pod: its share of the node budget and its clusters.
pub struct ClientPod {
    pub key: Arc<str>,
    pub source_workload: Arc<str>,
    pub source_namespace: Arc<str>,
    /// The pod, when the source address is a known one (Istio's source labels).
    pub workload: Option<Arc<Workload>>,
    /// Where this client's upstream connections are opened.
    pub dialer: Dialer,
    /// Istio request series of requests that reached no cluster (`NR`, `NC`, …).
    pub unrouted: Arc<SeriesMap<RequestSeries>>,
    budget: Arc<ClientBudget>,
    /// This client's downstream connections and requests (overload caps).
    pub downstream: Arc<ClientDownstream>,
    clusters: ArcSwap<HashMap<Arc<str>, Arc<ClientCluster>>>,
    /// Serializes additions to `clusters` (readers never take it).
    insert_lock: Mutex<()>,
}

impl ClientPod {
    /// Clusters of this client with their stats (admin `/stats`).
    pub fn clusters(&self) -> Vec<Arc<ClientCluster>> {
        self.clusters.load().values().cloned().collect()
    }

    /// This client's use of the node-wide budget (connections and pending requests).
    pub fn budget(&self) -> &ClientBudget {
        &self.budget
    }

    /// Forgets the clusters `gone` says no longer exist; returns them.
    fn remove_clusters(&self, gone: impl Fn(&str) -> bool) -> Vec<Arc<ClientCluster>> {
        if !self.clusters.load().keys().any(|name| gone(name)) {
            return Vec::new();
        }
        let _writer = self.insert_lock.lock().expect("clusters lock");
        let (kept, removed): (HashMap<_, _>, HashMap<_, _>) = self
            .clusters
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(name, _)| !gone(name));
        self.clusters.store(Arc::new(kept));
        removed.into_values().collect()
    }
}

/// What [`ClientRegistry::prune`] dropped.
#[derive(Default)]
pub struct Pruned {
    /// Client pods no longer in the configuration.
    pub clients: Vec<Arc<ClientPod>>,
    /// Names of clusters whose Service port no longer exists.
    pub clusters: HashSet<Arc<str>>,
}

/// All client pods seen on this node.
pub struct ClientRegistry {
    generation: AtomicU64,
    node: Arc<NodeBudget>,
    clients: Mutex<HashMap<Arc<str>, Arc<ClientPod>>>,
    /// Most clients that match no pod kept apart (by source address);
    /// further ones share [`UNKNOWN_CLIENTS_KEY`].
    max_unknown_clients: usize,
}

/// The one client state of sources beyond `max_unknown_clients`.
pub const UNKNOWN_CLIENTS_KEY: &str = "unknown-clients";

impl ClientRegistry {
    pub fn new(node: NodeBudget, max_unknown_clients: usize) -> Self {
        ClientRegistry {
            generation: AtomicU64::new(0),
            node: Arc::new(node),
            clients: Mutex::default(),
            max_unknown_clients,
        }
    }

    /// Called when a new configuration is installed.
    pub fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn node_budget(&self) -> &Arc<NodeBudget> {
        &self.node
    }

    /// The state of a client pod (once per downstream connection).
    pub fn client(
        &self,
        key: Arc<str>,
        source_workload: Arc<str>,
        source_namespace: Arc<str>,
        workload: Option<Arc<Workload>>,
        dialer: &Dialer,
    ) -> Arc<ClientPod> {
        let mut clients = self.clients.lock().expect("registry lock");
        // Sources that match no pod are kept apart up to a bound, so that
        // connections from many addresses cannot grow the registry forever.
        let key = if workload.is_none()
            && !clients.contains_key(&key)
            && clients.values().filter(|c| c.workload.is_none()).count() >= self.max_unknown_clients
        {
            Arc::from(UNKNOWN_CLIENTS_KEY)
        } else {
            key
        };
        // A pod enrolled again (new network namespace) starts afresh.
        if let Some(existing) = clients.get(&key)
            && !existing.dialer.same_netns(dialer)
        {
            clients.remove(&key);
        }
        clients
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(ClientPod {
                    key,
                    source_workload,
                    source_namespace,
                    workload,
                    dialer: dialer.clone(),
                    unrouted: Arc::default(),
                    budget: Arc::default(),
                    downstream: Arc::default(),
                    clusters: ArcSwap::default(),
                    insert_lock: Mutex::default(),
                })
            })
            .clone()
    }

    pub fn clients(&self) -> Vec<Arc<ClientPod>> {
        self.clients
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// After a configuration change: forgets client pods that left it (a
    /// client whose address was unknown is kept unless the address now belongs
    /// to a pod) and, for the others, clusters whose Service port is gone, so
    /// their state and metric series do not outlive them. Connections still
    /// open keep what they hold; a pod that comes back starts afresh.
    pub fn prune(&self, snap: &Snapshot) -> Pruned {
        let pods: HashSet<String> = snap
            .pods_by_ip
            .values()
            .map(|w| format!("{}/{}", w.namespace, w.pod_name))
            .collect();
        let ports: HashSet<(&str, u16)> = snap
            .services
            .values()
            .flat_map(|s| s.ports.iter().map(|p| (s.fqdn.as_str(), p.port)))
            .collect();
        let mut pruned = Pruned::default();
        let kept: Vec<Arc<ClientPod>> = {
            let mut clients = self.clients.lock().expect("registry lock");
            clients.retain(|key, client| {
                let keep = match &client.workload {
                    Some(_) => pods.contains(&**key),
                    None => key
                        .parse::<IpAddr>()
                        .map_or(true, |ip| !snap.pods_by_ip.contains_key(&ip)),
                };
                if !keep {
                    pruned.clients.push(client.clone());
                }
                keep
            });
            clients.values().cloned().collect()
        };
        let gone = |name: &str| -> bool {
            // outbound|port|subset|fqdn
            let mut parts = name.split('|');
            let (Some(_), Some(port), Some(_), Some(fqdn)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return false;
            };
            port.parse::<u16>()
                .is_ok_and(|port| !ports.contains(&(fqdn, port)))
        };
        for client in kept {
            for cluster in client.remove_clusters(gone) {
                pruned.clusters.insert(cluster.name.clone());
            }
        }
        pruned
    }

    /// The client's cluster for a routing decision, (re)built for the current generation.
    pub fn resolve(
        &self,
        snap: &Snapshot,
        conn: &ConnContext,
        client_ns: &str,
        decision: &RouteDecision,
        cluster_name: Arc<str>,
    ) -> Arc<ClientCluster> {
        let generation = self.generation.load(Ordering::Relaxed);
        let client = &conn.client_pod;
        // Lock-free on the request path; the map is copied only when a new cluster appears.
        let existing = client.clusters.load().get(&cluster_name).cloned();
        let cluster = match existing {
            Some(c) if c.current.load().generation == generation => return c,
            Some(c) => c,
            None => {
                let _writer = client.insert_lock.lock().expect("clusters lock");
                match client.clusters.load().get(&cluster_name).cloned() {
                    // Another request created it meanwhile.
                    Some(c) if c.current.load().generation == generation => return c,
                    Some(c) => c,
                    None => {
                        let fresh = Arc::new(ClientCluster {
                            name: cluster_name.clone(),
                            budgets: Budgets {
                                cluster: Arc::new(Breaker::default()),
                                client: client.budget.clone(),
                                node: self.node.clone(),
                            },
                            stats: Arc::default(),
                            slots: Mutex::default(),
                            current: ArcSwap::from_pointee(empty_config()),
                            sweeper_running: AtomicBool::new(false),
                        });
                        // Publish it only once configured, so concurrent first
                        // requests never see (and rebuild) a placeholder.
                        install_config(
                            &fresh,
                            off_worker(|| {
                                build_config(snap, conn, client_ns, decision, generation, &fresh)
                            }),
                        );
                        let mut map = HashMap::clone(&client.clusters.load());
                        map.insert(cluster_name, fresh.clone());
                        client.clusters.store(Arc::new(map));
                        return fresh;
                    }
                }
            }
        };
        install_config(
            &cluster,
            off_worker(|| build_config(snap, conn, client_ns, decision, generation, &cluster)),
        );
        cluster
    }
}

/// Runs a cluster build, which may take long (a consistent-hash ring of
/// millions of entries: hundreds of milliseconds), without holding up the
/// other tasks of this runtime worker: on the multi-threaded runtime the
/// worker's queue is handed to another thread for the duration
/// (`block_in_place`). Builds happen once per client pod, cluster and
/// configuration generation, not per request.
fn off_worker<T>(build: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(build),
        _ => build(),
    }
}

fn install_config(cluster: &Arc<ClientCluster>, config: ClusterConfig) {
    let has_outlier = config.outlier.is_some();
    cluster.current.store(Arc::new(config));
    if has_outlier {
        cluster.start_sweeper();
    }
}

fn empty_config() -> ClusterConfig {
    ClusterConfig {
        generation: u64::MAX,
        hosts: Vec::new(),
        balancer: Balancer::new::<Host>(
            &[],
            &BalancerConfig {
                policy: None,
                locality_setting: None,
                client_locality: None,
                client_labels: None,
                outlier_detection_enabled: false,
                min_health_percent: 0,
            },
        ),
        lb_policy: None,
        outlier: None,
        limits: Limits::default(),
        settings: ConnSettings::default(),
        policy: TrafficPolicy::default(),
        rule: None,
        peer: PeerLabels::unknown(),
    }
}

fn build_config(
    snap: &Snapshot,
    conn: &ConnContext,
    client_ns: &str,
    decision: &RouteDecision,
    generation: u64,
    cluster: &ClientCluster,
) -> ClusterConfig {
    let service = &decision.target.service;
    let port = &service.ports[decision.target.port_idx];
    let dr = route::destination_rule_for(snap, conn.client.as_deref(), client_ns, service);
    let subset_labels = decision
        .subset
        .as_deref()
        .and_then(|name| dr.and_then(|dr| dr.subsets.iter().find(|s| s.name == name)))
        .map(|s| &s.labels);
    let policy: TrafficPolicy = dr
        .map(|dr| route::effective_policy(dr, decision.subset.as_deref(), port.port))
        .unwrap_or_default();

    let mut slots = cluster.slots.lock().expect("slots lock");
    let hosts: Vec<Host> = port
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter(|e| match (decision.subset.as_ref(), subset_labels) {
            (None, _) => true,
            // A subset no DestinationRule defines selects nothing.
            (Some(_), None) => false,
            (Some(_), Some(sel)) => e
                .labels()
                .is_some_and(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v))),
        })
        .map(|e| Host {
            peer: PeerLabels::destination(Some(service), e.pod.as_deref()),
            slot: slots
                .entry(e.addr)
                .or_insert_with(|| {
                    Arc::new(EndpointSlot {
                        addr: e.addr,
                        active: AtomicU32::new(0),
                        outlier: HostOutlier::default(),
                        pool: Arc::new(EndpointPool::new(e.addr)),
                    })
                })
                .clone(),
            endpoint: e.clone(),
        })
        .collect();
    // Endpoints that left the cluster are forgotten (their pools close when idle).
    slots.retain(|addr, slot| {
        let keep = hosts.iter().any(|h| h.slot.addr == *addr);
        if !keep && let Some(detector) = &cluster.current.load().outlier {
            detector.forget(&slot.outlier);
        }
        keep
    });
    drop(slots);

    let previous = cluster.current.load();
    let outlier = policy.outlier_detection.as_ref().map(|od| {
        let wanted = OutlierConfig::from_istio(od);
        match previous.outlier.as_ref().filter(|d| *d.config() == wanted) {
            Some(same) => same.clone(),
            None => {
                let fresh = Arc::new(OutlierDetector::new(wanted));
                // Counters are the cluster's, not the settings': they keep counting.
                if let Some(old) = &previous.outlier {
                    inherit_counters(old.stats(), fresh.stats());
                }
                fresh
            }
        }
    });
    drop(previous);
    let lb_settings = policy.load_balancer.as_ref();
    let node_locality = snap.node.as_ref().map(|n| &n.locality);
    let balancer = Balancer::new(
        &hosts,
        &BalancerConfig {
            policy: lb_settings.and_then(|l| l.policy.as_ref()),
            locality_setting: lb_settings.and_then(|l| l.locality_lb_setting.as_ref()),
            client_locality: node_locality,
            client_labels: conn.client.as_ref().map(|w| &w.labels),
            outlier_detection_enabled: outlier.is_some(),
            min_health_percent: outlier
                .as_ref()
                .map_or(0, |d| d.config().min_health_percent),
        },
    );
    ClusterConfig {
        generation,
        hosts,
        balancer,
        lb_policy: lb_settings.and_then(|l| l.policy.clone()),
        outlier,
        limits: Limits::from_istio(policy.connection_pool.as_ref()),
        settings: ConnSettings::from_istio(policy.connection_pool.as_ref()),
        rule: dr.map(|dr| dr.key.clone()),
        policy,
        peer: PeerLabels::destination(Some(service), None),
    }
}

/// Carries an outlier detector's counters (not the `ejections_active` gauge,
/// which belongs to the hosts it ejected) over to its replacement.
fn inherit_counters(from: &OutlierStats, to: &OutlierStats) {
    let pairs = [
        (&from.ejections_enforced_total, &to.ejections_enforced_total),
        (&from.ejections_overflow, &to.ejections_overflow),
        (
            &from.ejections_enforced_consecutive_5xx,
            &to.ejections_enforced_consecutive_5xx,
        ),
        (
            &from.ejections_detected_consecutive_5xx,
            &to.ejections_detected_consecutive_5xx,
        ),
        (
            &from.ejections_enforced_consecutive_gateway_failure,
            &to.ejections_enforced_consecutive_gateway_failure,
        ),
        (
            &from.ejections_detected_consecutive_gateway_failure,
            &to.ejections_detected_consecutive_gateway_failure,
        ),
        (
            &from.ejections_enforced_consecutive_local_origin_failure,
            &to.ejections_enforced_consecutive_local_origin_failure,
        ),
        (
            &from.ejections_detected_consecutive_local_origin_failure,
            &to.ejections_detected_consecutive_local_origin_failure,
        ),
    ];
    for (a, b) in pairs {
        b.fetch_add(a.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}
